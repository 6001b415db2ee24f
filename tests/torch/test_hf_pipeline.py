"""Hugging Face checkpoints in the pipeline: finding a run's checkpoints by step (directories, state-dict files, the
Trainer's names), reading them lazily (safetensors and PyTorch files, agreeing), the steps a run takes from them,
and ``polca run hf:DIR`` end to end on a GPT-NeoX trained here in PyTorch, whose exact losses the decomposition must
reproduce from PyTorch's own forward pass."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import polca_jax as pj
from polca_jax.errors import PolcaError
from polca_jax.hf import HFCheckpoints, checkpoint_steps, read_state_dict
from polca_jax.pipeline.cli import main as polca
from experiments.huggingface import position_quarters, step_settings
from experiments.huggingface import train_torch
from experiments.huggingface.train_torch import train_checkpoints


@pytest.fixture(scope="module")
def neox_run(tmp_path_factory):
    """A GPT-NeoX trained 40 steps in PyTorch, saved every 5 steps (safetensors) with its tokenizer."""
    return train_checkpoints(tmp_path_factory.mktemp("hf") / "neox", steps=40, every=5)


def test_checkpoint_steps_reads_every_naming(tmp_path, neox_run):
    assert sorted(checkpoint_steps(neox_run)) == list(range(0, 41, 5))
    trainer = tmp_path / "trainer"
    trainer.mkdir()
    for step in (0, 10):  # the Trainer's checkpoint-N, and state-dict files beside one config.json
        shutil.copytree(neox_run / f"step{step}", trainer / f"checkpoint-{step}")
    shutil.copy(neox_run / "step20" / "model.safetensors", trainer / "step_20.safetensors")
    (trainer / "notes").mkdir()  # no weights: not a checkpoint
    assert sorted(checkpoint_steps(trainer)) == [0, 10, 20]
    shutil.copy(neox_run / "step20" / "model.safetensors", trainer / "20.safetensors")
    with pytest.raises(PolcaError, match="two checkpoints .* step 20"):
        checkpoint_steps(trainer)
    with pytest.raises(PolcaError, match="no checkpoint named by a step"):
        checkpoint_steps(trainer / "notes")
    with pytest.raises(PolcaError, match="neither a directory"):
        checkpoint_steps(tmp_path / "missing" / "deeper")


def test_checkpoints_read_lazily_and_agree_across_formats(tmp_path, neox_run):
    with HFCheckpoints(neox_run, steps=[0, 40]) as store:
        assert store.steps == [0, 40] and store.config.model_type == "gpt_neox"
        final = store[1]
    saved = read_state_dict(neox_run / "step40")
    name = "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"
    np.testing.assert_array_equal(np.asarray(final[name]), np.asarray(saved[name]))
    # the same weights as a PyTorch state-dict file beside the run's config.json read the same
    files = tmp_path / "files"
    files.mkdir()
    shutil.copy(neox_run / "step40" / "config.json", files / "config.json")
    model = transformers.AutoModelForCausalLM.from_pretrained(neox_run / "step40")
    torch.save(model.state_dict(), files / "step40.pt")
    shutil.copy(neox_run / "step0" / "model.safetensors", files / "step0.safetensors")
    with HFCheckpoints(files) as store:
        from_torch = store[1]
    assert sorted(from_torch) == sorted(final)
    for key in final:
        np.testing.assert_array_equal(np.asarray(from_torch[key]), np.asarray(final[key]), err_msg=key)
    with pytest.raises(PolcaError, match=r"steps \[7\] have no checkpoint .* \(found: 0, 5, 10"):
        HFCheckpoints(neox_run, steps=[0, 7])


def test_a_damaged_checkpoint_is_refused_by_name(tmp_path, neox_run):
    damaged = tmp_path / "damaged"
    shutil.copytree(neox_run, damaged)
    weights = damaged / "step40" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with HFCheckpoints(damaged, steps=[0, 40]) as store:
        store[0]
        with pytest.raises(PolcaError, match="step40.*truncated"):
            store[1]
    config = json.loads((damaged / "step5" / "config.json").read_text())
    config["model_type"] = "llama_unknown"
    (damaged / "step0" / "config.json").write_text(json.dumps(config))
    with pytest.raises(PolcaError, match="gpt2"):  # names the supported types
        HFCheckpoints(damaged)


def test_position_quarters_follow_the_samples_order():
    quarters = position_quarters(8, 2)
    assert quarters.tolist()[:8] == ["1st quarter"] * 2 + ["2nd quarter"] * 2 + ["3rd quarter"] * 2 + ["4th quarter"] * 2
    assert quarters.tolist()[8:] == quarters.tolist()[:8]


def test_step_settings_follow_the_checkpoints():
    pythia = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512] + list(range(1000, 143_001, 1000))
    settings = step_settings(pythia, "pythia")
    assert settings["polca_every"] == 1000 and settings["num_steps"] == 143_000
    assert settings["basis_every"] == 18_000 and settings["window_steps"] == 5000
    assert step_settings(list(range(0, 41, 5)), "run")["polca_every"] == 5
    with pytest.raises(PolcaError, match="step 0"):
        step_settings([500, 1000, 1500], "trainer")
    with pytest.raises(PolcaError, match="at least 4"):
        step_settings([0, 10, 20], "short")


@pytest.mark.slow
def test_docs_huggingface_runs_as_written(tmp_path, monkeypatch, capsys):
    """The page's offline example (train in PyTorch, polca run hf:) and its kernel snippet, as written."""
    page = (Path(__file__).parents[2] / "docs" / "huggingface.md").read_text()
    lines = [line for code in re.findall(r"```bash\n(.*?)```", page, re.S) for line in code.splitlines()]
    (train,) = [line for line in lines if line.startswith("python -m experiments.huggingface.train_torch")]
    (run,) = [line for line in lines if line.startswith("polca run hf:runs/tiny-neox")]
    monkeypatch.chdir(tmp_path)
    train_torch.main(train.split("#")[0].split()[3:])
    assert polca([*run.split()[1:], "--quiet", "--no-compile-cache"]) == 0
    out, checkpoints = Path("runs/tiny-neox-polca"), Path("runs/tiny-neox")
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == f"hf:{checkpoints.resolve()}" and config["polca_every"] == 5
    assert not (out / "checkpoints").exists()  # read where they are, never copied
    # the decomposition's exact losses are PyTorch's own per-token losses of each checkpoint
    result = pj.POLCAResult.load(out / "polca" / "hessian")
    tokens = np.load(out / "tokens.npz")["ids"]
    for index, step in ((0, 0), (-1, 40)):
        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoints / f"step{step}").eval()
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(tokens[:, :-1].astype(np.int64))).logits
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), torch.from_numpy(
                tokens[:, 1:].astype(np.int64)), reduction="none")
        np.testing.assert_allclose(np.asarray(result.loss[index]), losses.numpy().reshape(-1), rtol=1e-4, atol=1e-5)
    report = (out / "report" / "report.md").read_text()
    assert "Top target tokens" in report and "POLCA clusters per kept direction" in report
    assert {"kind", "token", "position"} <= set(json.loads((out / "metrics.json").read_text())["variants"]["polca"][
        "label_sets"])
    capsys.readouterr()
    assert polca([*run.split()[1:], "--quiet", "--no-compile-cache"]) == 0
    assert "already finished" in capsys.readouterr().out  # resumed: nothing redone

    (snippet,) = [code for code in re.findall(r"```python\n(.*?)```", page, re.S) if "token_losses" in code]
    namespace = {}
    exec(compile(snippet, "docs/huggingface.md", "exec"), namespace)
    assert namespace["projections"].shape == (namespace["tokens"].shape[1] - 1, 8)
    assert np.all(np.isfinite(np.asarray(namespace["projections"])))


def test_hf_runs_refuse_an_orbax_directory_too(tmp_path, neox_run):
    code = polca(["run", f"hf:{neox_run}", "--preset", "tiny", "--out", str(tmp_path / "run"), "--quiet",
                  "--checkpoints", str(tmp_path), "--stage", "train", "--no-compile-cache"])
    assert code == 2


def test_text_is_an_hf_option_only(tmp_path, capsys):
    assert polca(["run", "planted", "--text", "lee", "--out", str(tmp_path / "run"), "--no-compile-cache"]) == 2
    assert "--text is the evaluation text of an hf: task" in capsys.readouterr().err


def test_a_path_that_is_no_repository_id_is_refused_without_the_network():
    with pytest.raises(PolcaError, match="neither a directory"):
        checkpoint_steps("./not/a/repo")


GPT2_MESH_SCRIPT = """
import sys, tempfile
from pathlib import Path
import jax, numpy as np, torch, transformers
assert jax.device_count() == 4, jax.devices()
import polca_jax as pj
from polca_jax.pipeline.cli import main
from experiments.huggingface.train_torch import train_checkpoints

with tempfile.TemporaryDirectory() as directory:
    root = train_checkpoints(Path(directory) / "gpt2", model_type="gpt2", steps=20, every=5, weights="bin")
    assert (root / "step20" / "pytorch_model.bin").is_file()
    out = Path(directory) / "polca"
    assert main(["run", f"hf:{root}", "--preset", "tiny", "--out", str(out), "--quiet", "--mesh", "2x2",
                 "--no-compile-cache", "--stage", "train", "--stage", "basis", "--stage", "decompose"]) == 0
    result = pj.POLCAResult.load(out / "polca" / "hessian")
    tokens = np.load(out / "tokens.npz")["ids"].astype(np.int64)
    for index, step in ((0, 0), (-1, 20)):
        model = transformers.AutoModelForCausalLM.from_pretrained(root / f"step{step}").eval()
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(tokens[:, :-1])).logits
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), torch.from_numpy(tokens[:, 1:]),
                                                       reduction="none")
        np.testing.assert_allclose(np.asarray(result.loss[index]), losses.numpy().reshape(-1), rtol=1e-4, atol=1e-5)
    print("HF-MESH-OK", result.loss.shape)
"""


@pytest.mark.slow
def test_gpt2_pytorch_files_decompose_on_a_mesh_as_pytorch_computes_them():
    """A GPT-2 trained in PyTorch and saved as ``pytorch_model.bin`` files, its checkpoints placed on a 2x2 mesh of
    simulated devices (samples over data, parameters over model): the decomposition's exact losses are PyTorch's."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    completed = subprocess.run([sys.executable, "-c", GPT2_MESH_SCRIPT], cwd=Path(__file__).parents[2], env=env,
                               capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "HF-MESH-OK" in completed.stdout


@pytest.mark.slow
def test_polca_plan_estimates_an_hf_run(neox_run, capsys):
    assert polca(["plan", f"hf:{neox_run}", "--preset", "tiny"]) == 0
    plan = capsys.readouterr().out
    assert f"plan for hf:{neox_run.resolve()}, preset tiny" in plan
    assert "9 checkpoints" in plan and "fits" in plan  # steps 0..40 every 5, read from the checkpoints found
    assert "checkpoints (parameters and Adam moments) 0 B" in plan  # nothing trained, nothing saved
