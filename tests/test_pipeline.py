"""The generic pipeline on a user's own task: the worked example end to end from the CLI, bringing your own
checkpoints, the task interface's errors, and what a run directory guarantees (config binding, atomic markers,
refusals that change nothing, --force, the data fingerprint)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import polca_jax as pj
from polca_jax.pipeline import load_task_definition, make_config, open_run, read_metrics, run
from polca_jax.pipeline.cli import main
from polca_jax.pipeline._training import train

ROOT = Path(__file__).parents[1]
EXAMPLE = f"{ROOT / 'examples' / 'two_skills.py'}:make_task"


def quiet(_):
    pass


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    """The worked example of docs/your-own-task.md: ``polca run examples/two_skills.py:make_task --preset tiny``."""
    out = tmp_path_factory.mktemp("example") / "run"
    assert main(["run", EXAMPLE, "--preset", "tiny", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.mark.slow
def test_the_worked_example_runs_end_to_end(example_run):
    metrics = read_metrics(example_run / "metrics.json")
    assert metrics.settings.threshold_source.startswith("automatic")
    polca = metrics.variants["polca"]
    assert polca.num_clusters > 0 and "skill" in polca.label_sets
    report = (example_run / "report" / "report.md").read_text()
    assert "Label set `skill`" in report and "slow wave" in report and "#### Direction" in report
    assert json.loads((example_run / "config.json").read_text())["task"] == EXAMPLE


@pytest.mark.slow
def test_a_run_on_existing_checkpoints_skips_training_and_decomposes_the_same(example_run, tmp_path):
    out = tmp_path / "from_checkpoints"
    run(EXAMPLE, out, preset="tiny", checkpoints=example_run / "checkpoints",
        stages=["train", "basis", "decompose"], progress=False, log=quiet)
    assert json.loads((out / "stages" / "train.json").read_text())["trained"] is False
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    ours, theirs = (pj.POLCAResult.load(d / "polca" / "hessian") for d in (out, example_run))
    np.testing.assert_array_equal(ours.projected_loss, theirs.projected_loss)


@pytest.mark.slow
def test_report_is_rerendered_and_force_redoes_a_stage_fully(example_run, capsys):
    report = example_run / "report" / "report.md"
    report.unlink()
    assert main(["report", str(example_run)]) == 0 and report.is_file()
    assert f"report: {report}" in capsys.readouterr().out
    (example_run / "clusters" / "polca.npz").write_bytes(b"torn")
    assert main(["run", EXAMPLE, "--out", str(example_run), "--stage", "cluster", "--force", "--quiet"]) == 0
    assert pj.analysis.load_clusterings(example_run / "clusters" / "polca.npz")  # rebuilt
    assert not (example_run / "metrics.json").exists() and not (example_run / "stages" / "score.json").exists()
    # a torn basis.json: reading it names the file, and --force rebuilds the basis instead of keeping the directory
    basis_file = example_run / "basis" / "hessian" / "basis.json"
    good = pj.Basis.load(basis_file.parent).vectors
    basis_file.write_text('{"format": ')
    with pytest.raises(ValueError, match="basis.json"):
        pj.Basis.load(basis_file.parent)
    assert main(["run", EXAMPLE, "--out", str(example_run), "--stage", "basis", "--force", "--quiet"]) == 0
    np.testing.assert_array_equal(pj.Basis.load(basis_file.parent).vectors, good)  # the same basis, rebuilt
    assert not (example_run / "polca").exists() and not (example_run / "stages" / "decompose.json").exists()


def test_the_recorder_saves_what_polca_reads(tmp_path):
    params = {"w": jnp.arange(3.0), "b": jnp.ones(())}
    with pj.CheckpointRecorder(tmp_path / "ckpt", steps=[0, 2]) as recorder:
        saved = [recorder.save(step, jax.tree.map(lambda x: x + step, params)) for step in range(4)]
        assert recorder.missing == []
    assert saved == [True, False, True, False]
    with pj.OrbaxCheckpoints(tmp_path / "ckpt", template=params) as store:
        assert store.steps == [0, 2]
        np.testing.assert_array_equal(store[1]["w"], params["w"] + 2)
    with pj.CheckpointRecorder(tmp_path / "ckpt", steps=[2, 3]) as recorder:
        with pytest.raises(ValueError, match="step 2 is already saved"):
            recorder.save(2, params)
        with pytest.raises(ValueError, match="NaN or inf"):
            recorder.save(3, {"w": jnp.full(3, jnp.nan), "b": jnp.ones(())})
        assert recorder.missing == [3]
    with pytest.raises(ValueError, match="non-negative integer"):
        pj.CheckpointRecorder(tmp_path / "other", steps=[-1])


def test_training_stops_at_the_first_non_finite_loss_and_keeps_earlier_checkpoints(tmp_path):
    def loss(params, batch):  # finite until step 3, then NaN
        return jnp.where(batch["step"] >= 3, jnp.nan, jnp.sum(params["w"] ** 2))

    with pytest.raises(ValueError, match="not finite at step 3"):
        train(loss, {"w": jnp.ones(2)}, __import__("optax").sgd(0.1), lambda step: {"step": jnp.asarray(step)}, 6,
              tmp_path / "ckpt", [0, 2, 3, 4, 6], progress=False)
    assert pj.OrbaxCheckpoints(tmp_path / "ckpt").steps == [0, 2, 3]  # step 4's parameters came from the NaN loss


# --- the task interface (its refusals of bad input: test_hostile_cli_inputs.py) ---------------------------------

USER_TASK = '''
import jax.numpy as jnp
import numpy as np
from polca_jax.pipeline import LabelSet, Task, task_factory

PRESETS = {"tiny": dict(num_steps=20, polca_every=5, window_steps=5, basis_every=10, lanczos_iters=4,
                        min_cluster_size=4, reference_num_samples=None, ablations=False, baselines=False, metrics_every=5)}


@task_factory(presets=PRESETS, default_preset="tiny")
def make_task(width: int = 3, data: str = "") -> Task:
    x = np.load(data) if data else np.linspace(-1, 1, 24, dtype=np.float32)[:, None].repeat(2, 1)
    labels = {"sign": LabelSet(x[:, 0] > 0)}
    return Task(init_params={"w": jnp.full((2, width), 0.3)},
                per_sample_loss=lambda p, b: ((b["x"] @ p["w"]) ** 2).sum(1),
                eval_batch={"x": x}, hessian_batch={"x": x}, train_batches=lambda step: {"x": x}, labels=labels)
'''


@pytest.fixture
def user_task(tmp_path):
    path = tmp_path / "user_task.py"
    path.write_text(USER_TASK)
    return f"{path}:make_task"


def test_checkpoints_of_another_model_are_refused(user_task, tmp_path):
    with pj.CheckpointRecorder(tmp_path / "ckpt", steps=range(0, 21, 5)) as recorder:
        for step in range(0, 21, 5):
            recorder.save(step, {"w": jnp.zeros((2, 5))})  # the task's model has width 3
    with pytest.raises(ValueError, match="another model than the task's"):
        run(user_task, tmp_path / "run", checkpoints=tmp_path / "ckpt", stages=["train"], progress=False, log=quiet)
    with pj.CheckpointRecorder(tmp_path / "few", steps=[0, 5]) as recorder:
        for step in (0, 5):
            recorder.save(step, {"w": jnp.zeros((2, 3))})
    with pytest.raises(ValueError, match=r"steps \[10, 15, 20\] have no checkpoint"):
        run(user_task, tmp_path / "run2", checkpoints=tmp_path / "few", stages=["train"], progress=False, log=quiet)


def test_a_task_without_training_batches_asks_for_checkpoints(tmp_path):
    path = tmp_path / "no_training.py"
    path.write_text(USER_TASK.replace("train_batches=lambda step: {\"x\": x}, ", ""))
    with pytest.raises(ValueError, match="no training batches.*--checkpoints DIR"):
        run(f"{path}:make_task", tmp_path / "run", stages=["train"], progress=False, log=quiet)


# --- what a run directory guarantees ------------------------------------------------------------------------------


def test_settings_apply_to_the_stored_config_and_a_real_difference_changes_nothing(user_task, tmp_path):
    out = tmp_path / "run"
    created, _ = open_run(user_task, out, settings=["learning_rate=0.01", "width=4"])
    stored = (out / "config.json").read_bytes()
    reopened, _ = open_run(user_task, out, settings=["learning_rate=0.01"])  # its own value: not a difference
    assert reopened.config == created.config
    reopened, _ = open_run(user_task, out)
    assert reopened.config.task_options["width"] == 4
    with pytest.raises(ValueError, match=r"another config \(learning_rate: 0.01 on disk vs 0.02\)"):
        open_run(user_task, out, settings=["learning_rate=0.02"])
    with pytest.raises(ValueError, match="width: 4 on disk vs 3"):
        open_run(user_task, out, preset="tiny")  # a preset is a whole config: width goes back to its default
    with pytest.raises(ValueError, match="holds a run of task"):
        open_run("arithmetic", out)
    assert (out / "config.json").read_bytes() == stored
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "run.lock"]


def test_a_torn_config_names_the_file(user_task, tmp_path):
    out = tmp_path / "run"
    open_run(user_task, out)
    (out / "config.json").write_text('{"task": ')
    with pytest.raises(ValueError, match="config.json"):
        open_run(user_task, out)


def test_a_resume_on_other_data_is_refused(user_task, tmp_path):
    data = tmp_path / "x.npy"
    np.save(data, np.linspace(-1, 1, 24, dtype=np.float32)[:, None].repeat(2, 1))
    out = tmp_path / "run"
    run(user_task, out, settings={"data": str(data)}, stages=["train"], progress=False, log=quiet)
    np.save(data, np.linspace(-2, 2, 24, dtype=np.float32)[:, None].repeat(2, 1))  # the data file changes
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    with pytest.raises(ValueError, match="differs from the one this run started with in: eval_batch, "
                                         "first_train_batch, hessian_batch"):
        run(user_task, out, stages=["basis"], progress=False, log=quiet)
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_a_killed_decompose_stage_resumes_at_its_last_finished_checkpoint(user_task, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(user_task, out, stages=["train", "basis"], progress=False, log=quiet)
    reads, interrupt_at = [], [3]
    restore = pj.OrbaxCheckpoints.__getitem__

    def recorded(store, t):
        reads.append(t)
        if t in interrupt_at:
            raise KeyboardInterrupt("killed")  # a kill (an exception from this test would be the task's code)
        return restore(store, t)

    def decompose(force=False):
        reads.clear()
        run(user_task, out, stages=["decompose"], force=force, progress=False, log=quiet)
        return list(reads)

    monkeypatch.setattr(pj.OrbaxCheckpoints, "__getitem__", recorded)
    result = out / "polca" / "hessian"
    with pytest.raises(KeyboardInterrupt, match="killed"):
        decompose()
    assert json.loads((result / "progress.json").read_text())["complete"] == 3
    assert not (result / "manifest.json").exists() and not (out / "stages" / "decompose.json").exists()
    interrupt_at.clear()
    # the last finished of the 5 POLCA checkpoints, then the unfinished ones; then the control's one checkpoint
    assert decompose() == [2, 3, 4, 0]
    resumed = {name: np.array(getattr(pj.POLCAResult.load(result), name)) for name in ("loss", "projected_loss")}
    interrupt_at.append(3)
    with pytest.raises(KeyboardInterrupt, match="killed"):
        decompose(force=True)
    interrupt_at.clear()
    assert decompose(force=True) == [0, 1, 2, 3, 4, 0]  # --force removed the partial result: from the start
    assert not (result / "progress.json").exists()
    for name, array in resumed.items():
        np.testing.assert_array_equal(getattr(pj.POLCAResult.load(result), name), array)


@pytest.mark.slow
def test_a_second_process_loads_every_kernel_from_the_compile_cache(user_task, tmp_path):
    def run_in_a_process(out):
        command = [sys.executable, "-m", "polca_jax.pipeline.cli", "run", user_task, "--out", str(out), "--quiet",
                   "--compile-cache", str(tmp_path / "cache")]
        subprocess.run(command, check=True, capture_output=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        return [json.loads((out / "stages" / f"{stage}.json").read_text()) for stage in ("train", "basis", "decompose")]

    first, second = run_in_a_process(tmp_path / "first"), run_in_a_process(tmp_path / "second")
    assert sum(record["compile_cache_misses"] for record in first) > 0
    assert sum(record["compile_cache_misses"] for record in second) == 0
    assert sum(record["compile_cache_hits"] for record in second) == sum(record["compiles"] for record in second) > 0


def test_the_core_imports_and_runs_without_the_pipeline_extra():
    """polca_jax and polca_jax.analysis need neither flax, optax nor matplotlib; polca_jax.pipeline says what to
    install."""
    script = textwrap.dedent('''
        import sys
        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"flax", "optax", "matplotlib"}:
                    raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
        sys.meta_path.insert(0, Blocker())
        import jax.numpy as jnp, numpy as np
        import polca_jax as pj, polca_jax.analysis
        params = {"w": jnp.ones(3)}
        loss = lambda p, b: (b["x"] @ p["w"]) ** 2
        basis = pj.random_basis(params, 2, __import__("jax").random.key(0))
        print(pj.per_sample_projections(loss, params, {"x": jnp.eye(3)}, basis).shape)
        try:
            import polca_jax.pipeline
        except ImportError as error:
            print(error)
    ''')
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu")).stdout
    assert "(3, 2)" in output
    assert "pip install 'polca_jax[pipeline]'" in output


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"polca_jax {pj.__version__}"


def test_preset_defaults_and_unknown_presets():
    definition = load_task_definition("arithmetic")
    assert make_config(definition, "arithmetic").preset == "cpu"  # the task's default preset
    with pytest.raises(ValueError, match=r"unknown preset 'huge' for task arithmetic; choose one of \['cpu', "):
        make_config(definition, "arithmetic", "huge")


PIPELINE_MESH_SCRIPT = """
import sys, tempfile
from pathlib import Path
import jax, numpy as np
assert jax.device_count() == 8, jax.devices()
import polca_jax as pj
from polca_jax.pipeline.cli import main

stages = ["--stage", "train", "--stage", "basis", "--stage", "decompose", "--stage", "causal"]
with tempfile.TemporaryDirectory() as directory:
    runs = {mesh: Path(directory) / mesh for mesh in ("one", "2x4")}
    assert main(["run", "planted", "--preset", "tiny", "--out", str(runs["one"]), "--quiet", *stages]) == 0
    assert main(["run", "planted", "--preset", "tiny", "--out", str(runs["2x4"]), "--quiet", "--mesh", "2x4",
                 *stages]) == 0
    loaded = {mesh: (np.load(run / "causal" / "hessian.npy"), pj.POLCAResult.load(run / "polca" / "hessian"),
                     pj.Basis.load(run / "basis" / "hessian")) for mesh, run in runs.items()}
    (causal, result, basis), (causal_mesh, result_mesh, basis_mesh) = loaded["one"], loaded["2x4"]
    signs = np.sign(np.sum(np.asarray(basis.vectors) * np.asarray(basis_mesh.vectors), axis=1))
    np.testing.assert_allclose(np.asarray(basis_mesh.vectors) * signs[:, None], basis.vectors, atol=1e-4)
    np.testing.assert_allclose(np.asarray(result_mesh.loss), np.asarray(result.loss), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(causal_mesh, causal, rtol=1e-4, atol=1e-4)  # measured: 4e-6 at most
    print("PIPELINE-MESH-OK", float(np.abs(causal).max()))
"""


@pytest.mark.slow
def test_the_pipeline_trains_decomposes_and_checks_causally_on_a_mesh_as_on_one_device():
    """``polca run planted --preset tiny --mesh 2x4`` (train, basis, decompose and causal on 8 simulated devices)
    against the same run on one device, float32: the trained losses, the basis (up to each vector's sign) and the
    causal check agree to float32 rounding through training."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    completed = subprocess.run([sys.executable, "-c", textwrap.dedent(PIPELINE_MESH_SCRIPT)],
                               cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "PIPELINE-MESH-OK" in completed.stdout
