"""The claims of docs/guarantees.md that no other test module checks, one test (or table) per claim.

Most run on copies of one tiny run directory (``finished``: the train, basis, decompose and causal stages of a
6-parameter user task, about 10 s once per module).
"""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import polca_jax as pj
from conftest import sgd_checkpoints
from polca_jax.fingerprints import PARAMS_DIGEST, loss_digest, params_digest
from polca_jax.errors import PolcaError, ResumeMismatch
from polca_jax.pipeline import open_run, run
from polca_jax.pipeline.cli import main
from test_hostile_resume import USER_TASK, digests, quiet, record_checkpoints
from test_pipeline import USER_TASK as DATA_TASK  # the same task with a ``data`` option: a .npy file to load

# The user task of test_hostile_resume with an aggregate loss of its own, so that its per-sample loss can be edited
# alone.
TASK = USER_TASK.replace('labels={"sign": LabelSet(values)})',
                         'labels={"sign": LabelSet(values)},\n'
                         '                loss=lambda p, b: ((b["x"] @ p["w"]) ** 2).sum(1).mean())')
assert TASK != USER_TASK
PER_SAMPLE_LOSS_EDIT = ('per_sample_loss=lambda p, b: ((b["x"] @ p["w"]) ** 2).sum(1),',
                        'per_sample_loss=lambda p, b: jnp.abs(b["x"] @ p["w"]).sum(1),')
INIT_PARAMS_EDIT = ("jnp.full((2, width), 0.3)", "jnp.full((2, width), 0.4)")
LABELS_EDIT = ('{"sign": x[:, 0] > 0,', '{"sign": x[:, 0] > 0.5,')
for _old, _new in (PER_SAMPLE_LOSS_EDIT, INIT_PARAMS_EDIT, LABELS_EDIT):
    assert TASK.count(_old) == 1, _old
CHECKPOINT_STEPS = ["0", "5", "10", "15", "20"]  # the tiny preset's POLCA and basis steps


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """``root/run``: the train, basis, decompose and causal stages of ``root/user_task.py:make_task``."""
    root = tmp_path_factory.mktemp("guarantees")
    (root / "user_task.py").write_text(TASK)
    run(f"{root / 'user_task.py'}:make_task", root / "run", stages=["train", "basis", "decompose", "causal"],
        progress=False, log=quiet)
    return root


def copy_of(finished: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the finished run directory and its task file, bound to the copied task file: (run dir, task)."""
    root = tmp_path / "copy"
    shutil.copytree(finished, root)
    task = f"{root / 'user_task.py'}:make_task"
    config = json.loads((root / "run" / "config.json").read_text())
    config["task"] = task
    (root / "run" / "config.json").write_text(json.dumps(config))
    return root / "run", task


def edit(task: str, old: str, new: str) -> None:
    path = Path(task.rpartition(":")[0])
    path.write_text(path.read_text().replace(old, new))


def undo(out: Path, *stages: str) -> None:
    """Remove the markers and outputs of ``stages`` by hand (what a run killed before they finished leaves)."""
    outputs = {"basis": ["basis"], "decompose": ["polca", "controls"], "causal": ["causal"]}
    for stage in stages:
        (out / "stages" / f"{stage}.json").unlink()
        for name in outputs[stage]:
            shutil.rmtree(out / name, ignore_errors=True)


# --- config.json: written once, atomically -------------------------------------------------------------------------


def test_a_kill_while_config_json_is_written_leaves_no_torn_config(finished, tmp_path, monkeypatch):
    """Written atomically: a process killed at the rename leaves no config.json and no temporary file, and the
    same command can then start the run there."""
    import polca_jax.files as files

    task, out = f"{finished / 'user_task.py'}:make_task", tmp_path / "run"

    def killed(source, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        open_run(task, out)
    monkeypatch.undo()
    assert not (out / "config.json").exists() and list(out.iterdir()) == []
    run_dir, _ = open_run(task, out)
    assert json.loads((out / "config.json").read_text())["task"] == run_dir.config.task


def test_a_resume_does_not_write_config_json_again(finished, tmp_path):
    out, task = copy_of(finished, tmp_path)
    undo(out, "causal")
    before = (out / "config.json").read_bytes(), (out / "config.json").stat().st_mtime_ns
    run(task, out, stages=["causal"], settings=["learning_rate=0.001"], progress=False, log=quiet)  # its own value
    assert ((out / "config.json").read_bytes(), (out / "config.json").stat().st_mtime_ns) == before


# --- finished stages are skipped; a killed basis stage resumes --------------------------------------------------------


def test_a_finished_stage_leaves_its_record_and_is_skipped(finished, tmp_path, monkeypatch):
    out, task = copy_of(finished, tmp_path)
    before = digests(out)
    built = []
    monkeypatch.setattr("polca_jax.pipeline._stages.build_task", lambda *a, **k: built.append(1))
    messages = []
    run(task, out, stages=["train", "basis", "decompose", "causal"], progress=False, log=messages.append)
    assert messages == [f"[{stage}] already finished in {out}, skipped"
                        for stage in ("train", "basis", "decompose", "causal")]
    assert built == [] and digests(out) == before
    for stage in ("train", "basis", "decompose", "causal"):
        assert json.loads((out / "stages" / f"{stage}.json").read_text())["wall_seconds"] >= 0


@pytest.fixture
def eigenpair_calls(monkeypatch):
    """The checkpoint positions Algorithm 1 runs Lanczos at (each call of ``tree_eigenpairs``)."""
    import polca_jax._basis as basis_module

    calls, real = [], basis_module.tree_eigenpairs

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(basis_module, "tree_eigenpairs", counted)
    return calls


def test_a_basis_stage_killed_after_its_basis_was_saved_keeps_it(finished, tmp_path, eigenpair_calls):
    """The basis stage resumes from the last basis it finished: a saved basis is not computed again."""
    out, task = copy_of(finished, tmp_path)
    (out / "stages" / "basis.json").unlink()  # killed after basis/hessian/ was saved, before the marker
    saved = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in (out / "basis").rglob("*")
             if path.is_file()}
    run(task, out, stages=["basis"], progress=False, log=quiet)
    assert eigenpair_calls == []
    assert {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in (out / "basis").rglob("*")
            if path.is_file()} == saved
    assert (out / "stages" / "basis.json").exists()


def test_a_basis_stage_killed_inside_algorithm_1_resumes_after_its_last_kept_checkpoint_bit_for_bit(
        finished, tmp_path, monkeypatch, eigenpair_calls):
    from polca_jax.pipeline._stages import CheckedCheckpoints

    out, task = copy_of(finished, tmp_path)
    undo(out, "basis", "decompose", "causal")
    read, kill_at = CheckedCheckpoints.__getitem__, [1]

    def killed(store, index):
        if index in kill_at:
            raise KeyboardInterrupt("killed")  # while the second of the two basis checkpoints is read
        return read(store, index)

    monkeypatch.setattr(CheckedCheckpoints, "__getitem__", killed)
    with pytest.raises(KeyboardInterrupt, match="killed"):
        run(task, out, stages=["basis"], progress=False, log=quiet)
    partial = out / "basis" / "hessian.partial"
    assert sorted(path.name for path in partial.iterdir()) == ["done_0000.json", "fingerprint.json", "rows_0000.npy"]
    assert eigenpair_calls == [1] and not (out / "stages" / "basis.json").exists()
    kill_at.clear()
    run(task, out, stages=["basis"], progress=False, log=quiet)
    assert eigenpair_calls == [1, 1]  # Lanczos ran at the second checkpoint only
    assert not partial.exists()
    resumed, whole = (pj.Basis.load(d / "basis" / "hessian") for d in (out, finished / "run"))
    np.testing.assert_array_equal(np.asarray(resumed.vectors), np.asarray(whole.vectors))
    np.testing.assert_array_equal(resumed.eigenvalues, whole.eigenvalues)


def test_a_kept_partial_basis_of_other_inputs_is_refused_and_force_removes_it_and_every_later_output(
        finished, tmp_path):
    out, task = copy_of(finished, tmp_path)
    (out / "stages" / "basis.json").unlink()
    shutil.rmtree(out / "basis" / "hessian")
    partial = out / "basis" / "hessian.partial"
    partial.mkdir()
    (partial / "fingerprint.json").write_text(json.dumps({"method": "hessian", "num_iters": 99}))
    before = digests(out)
    with pytest.raises(ResumeMismatch, match=r"hessian\.partial keeps a partial basis of another computation "
                                             r"\(differs in: .*num_iters"):
        run(task, out, stages=["basis"], progress=False, log=quiet)
    assert digests(out) == before
    run(task, out, stages=["basis"], force=True, progress=False, log=quiet)  # removes it first: no refusal
    assert not partial.exists()
    for later in ("polca", "controls", "causal", "stages/decompose.json", "stages/causal.json"):
        assert not (out / later).exists(), later
    rebuilt, whole = (pj.Basis.load(d / "basis" / "hessian") for d in (out, finished / "run"))
    np.testing.assert_array_equal(np.asarray(rebuilt.vectors), np.asarray(whole.vectors))


def test_a_partial_basis_of_another_batch_is_refused(tmp_path, mlp):
    checkpoints = sgd_checkpoints(mlp, 2)
    options = dict(num_iters=12, key=jax.random.key(0), steps=[0, 10], progress=False, partial_dir=tmp_path / "kept")
    pj.hessian_basis(mlp.mean_loss, checkpoints, mlp.batch, **options)
    before = digests(tmp_path)
    other = dict(mlp.batch, y=mlp.batch["y"] + 1.0)  # the same shapes
    with pytest.raises(ResumeMismatch, match=r"another computation \(differs in: batch\)"):
        pj.hessian_basis(mlp.mean_loss, checkpoints, other, **options)
    assert digests(tmp_path) == before


# --- the read errors name the file -----------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 16)


@pytest.mark.parametrize("name, stages", [("controls/gradient_norms.npy", ["cluster"]),
                                          ("causal/hessian.npy", ["cluster", "score"])])
def test_a_truncated_array_a_host_stage_reads_is_named(finished, tmp_path, name, stages):
    out, task = copy_of(finished, tmp_path)
    truncate(out / name)
    with pytest.raises(ValueError) as error:
        run(task, out, stages=stages, progress=False, log=quiet)
    assert str(out / name) in str(error.value), str(error.value)


def test_a_kill_while_clusters_are_written_leaves_no_torn_file(finished, tmp_path, monkeypatch):
    out, task = copy_of(finished, tmp_path)
    real = np.savez

    def killed(file, *args, **kwargs):  # a process killed halfway through writing an .npz
        if isinstance(file, (str, os.PathLike)):
            Path(file).write_bytes(b"PK\x03\x04 torn")
        else:
            file.write(b"PK\x03\x04 torn")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        run(task, out, stages=["cluster"], progress=False, log=quiet)
    monkeypatch.setattr(np, "savez", real)
    for path in (out / "clusters").glob("*.npz"):  # under its final name: complete, or absent
        try:
            with np.load(path) as arrays:
                arrays["labels"]
        except Exception as error:  # noqa: BLE001 (whatever numpy raises for a torn file)
            raise AssertionError(f"a torn file under its final name: {path}: {error!r}") from error


@pytest.mark.parametrize("name", ["clusters/polca.npz", "labels.npz"])
def test_a_torn_npz_file_is_named_and_exits_2(finished, tmp_path, capsys, name):
    out, task = copy_of(finished, tmp_path)
    run(task, out, stages=["cluster"], progress=False, log=quiet)
    path = out / name
    os.truncate(path, path.stat().st_size // 2)
    status = main(["run", task, "--out", str(out), "--stage", "score", "--quiet", "--no-compile-cache"])
    error = capsys.readouterr().err
    assert status == 2 and error.startswith("polca: error: ") and str(path) in error, error


# --- task.json: the task's data ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, part", [(INIT_PARAMS_EDIT, "init_params"), (LABELS_EDIT, "labels")],
                         ids=["initial parameters", "labels"])
def test_an_edited_task_file_that_builds_other_data_is_refused_before_anything_is_written(finished, tmp_path,
                                                                                         change, part):
    out, task = copy_of(finished, tmp_path)
    undo(out, "causal")
    edit(task, *change)
    before = digests(out.parent)
    with pytest.raises(PolcaError, match=rf"the task built now differs from the one this run started with in: "
                                         rf"{part} \(fingerprints in .*task\.json\)"):
        run(task, out, stages=["causal"], progress=False, log=quiet)
    assert digests(out.parent) == before


def test_a_relative_data_path_resumed_from_another_directory_is_refused(tmp_path, monkeypatch):
    (tmp_path / "user_task.py").write_text(DATA_TASK)
    task = f"{tmp_path / 'user_task.py'}:make_task"
    for name, scale in (("a", 1), ("b", 2)):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "x.npy", np.linspace(-scale, scale, 24, dtype=np.float32)[:, None].repeat(2, 1))
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path / "a")
    run(task, out, settings={"data": "x.npy"}, stages=["train"], progress=False, log=quiet)
    monkeypatch.chdir(tmp_path / "b")
    before = digests(out)
    with pytest.raises(PolcaError, match=r"differs from the one this run started with in: eval_batch, "
                                         r"first_train_batch, hessian_batch .*relative data path"):
        run(task, out, stages=["basis"], progress=False, log=quiet)
    assert digests(out) == before


# --- fingerprints.json: the checkpoints' and the losses' digests -----------------------------------------------------


def test_every_checkpoint_is_digested_as_training_writes_it(finished):
    out = finished / "run"
    fingerprints = json.loads((out / "fingerprints.json").read_text())
    assert sorted(fingerprints["checkpoints"], key=int) == CHECKPOINT_STEPS
    with pj.OrbaxCheckpoints(out / "checkpoints") as store:
        for index, step in enumerate(store.steps):
            assert fingerprints["checkpoints"][str(step)] == params_digest(store[index])
    # the loss functions, by the first stage whose results use them
    assert {kind: record["stage"] for kind, record in fingerprints["losses"].items()} == {
        "loss": "train", "per_sample_loss": "decompose"}


def test_checkpoints_given_with_checkpoints_are_all_digested_by_the_train_stage(finished, tmp_path):
    record_checkpoints(tmp_path / "recorded")
    out = tmp_path / "run"
    run(f"{finished / 'user_task.py'}:make_task", out, checkpoints=tmp_path / "recorded", stages=["train"],
        progress=False, log=quiet)
    fingerprints = json.loads((out / "fingerprints.json").read_text())
    assert sorted(fingerprints["checkpoints"], key=int) == CHECKPOINT_STEPS
    assert all(digest.startswith(PARAMS_DIGEST) for digest in fingerprints["checkpoints"].values())
    assert fingerprints["losses"] == {}  # nothing the train stage wrote depends on the loss
    assert not (out / "checkpoints").exists()


def test_a_per_sample_loss_edited_after_the_decompose_stage_is_refused_naming_it(finished, tmp_path):
    """The causal stage checks the per-sample loss the decompose stage recorded; --force of a later stage does not
    change that, and nothing is removed."""
    out, task = copy_of(finished, tmp_path)
    edit(task, *PER_SAMPLE_LOSS_EDIT)
    before = digests(out)
    for force in (False, True):
        if not force:
            (out / "stages" / "causal.json").rename(out / "causal.json.kept")
            before_unforced = digests(out)
        with pytest.raises(ResumeMismatch, match=r"the task's per_sample_loss differs from the one the decompose "
                                                 rf"stage of this run used .*--out {re.escape(str(out))} --stage "
                                                 r"decompose --force, or start a new --out directory \(nothing was "
                                                 r"changed\)"):
            run(task, out, stages=["causal"], force=force, progress=False, log=quiet)
        assert digests(out) == (before if force else before_unforced)
        if not force:
            (out / "causal.json.kept").rename(out / "stages" / "causal.json")


def test_the_loss_digest_changes_with_the_arrays_the_loss_captures(mlp):
    def capturing(table):
        return lambda params, batch: mlp.mean_loss(params, batch) + table.sum()

    table = jnp.arange(3.0)
    digest = loss_digest(capturing(table), mlp.params, mlp.batch)
    assert loss_digest(capturing(jnp.arange(3.0)), mlp.params, mlp.batch) == digest
    assert loss_digest(capturing(table.at[2].set(5.0)), mlp.params, mlp.batch) != digest


# --- run.lock -------------------------------------------------------------------------------------------------------


def test_in_a_multi_process_run_only_process_0_holds_the_lock(finished, tmp_path, monkeypatch):
    from polca_jax.pipeline import _rundir

    task, out = f"{finished / 'user_task.py'}:make_task", tmp_path / "run"
    process_0, _ = open_run(task, out)
    process_0.lock()
    try:
        record = (out / "run.lock").read_text()
        assert json.loads(record)["pid"] == os.getpid()
        monkeypatch.setattr(_rundir, "is_writer", lambda: False)  # another process of the same run
        process_1, _ = open_run(task, out)
        process_1.lock()  # not refused: it takes no lock
        process_1.unlock()
        assert (out / "run.lock").read_text() == record
    finally:
        process_0.unlock()


# --- settings checked before any work --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "plan"])
def test_checkpoints_lacking_a_step_the_run_needs_are_refused_before_any_work(finished, tmp_path, capsys, command):
    with pj.CheckpointRecorder(tmp_path / "few", steps=[0, 5]) as recorder:
        for step in (0, 5):
            recorder.save(step, {"w": jnp.full((2, 3), 0.3)})
    out = tmp_path / "run"
    line = [command, f"{finished / 'user_task.py'}:make_task", "--checkpoints", str(tmp_path / "few")]
    line += ["--out", str(out), "--quiet", "--no-compile-cache"] if command == "run" else []
    before = digests(tmp_path)
    assert main(line) == 2
    error = capsys.readouterr().err
    assert error.startswith("polca: error: ") and re.search(r"steps \[10, 15, 20\] have no checkpoint", error), error
    assert digests(tmp_path) == before and not out.exists()


def test_a_data_axis_wider_than_the_tasks_sequences_is_refused_by_polca_run_before_any_work(finished, tmp_path):
    """polca run (polca plan: test_hostile_resume), on 25 simulated devices: the task has 24 sequences. Forced, the
    refusal comes before the stage's outputs are removed."""
    out, task = copy_of(finished, tmp_path)
    before = digests(out)
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=25")
    done = subprocess.run([sys.executable, "-m", "polca_jax.pipeline.cli", "run", task, "--out", str(out), "--stage",
                           "basis", "--force", "--mesh", "25x1", "--quiet", "--no-compile-cache"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert re.fullmatch(r"polca: error: --mesh: a data axis of 25 devices exceeds the task's 24 evaluation or "
                        r"Hessian sequences[^\n]*\n", done.stderr), done.stderr[-3000:]
    assert digests(out) == before


# --- polca report ----------------------------------------------------------------------------------------------------


def test_polca_report_loads_a_built_in_task_by_name(tmp_path, capsys):
    from synthetic_runs import synthetic_run

    from polca_jax.pipeline import load_task_definition, run_stages

    run_dir = synthetic_run(tmp_path / "run", baselines=False)
    run_stages(run_dir, load_task_definition("arithmetic"), ["cluster", "score"], progress=False, log=quiet)
    assert main(["report", str(run_dir.path)]) == 0
    text = (run_dir.path / "report" / "report.md").read_text()
    assert "### Table 1" in text and "runs no task code" not in text


# --- the checkpoint recorder -----------------------------------------------------------------------------------------


def test_a_recorder_returns_true_only_for_a_save_orbax_takes(tmp_path, monkeypatch):
    params = {"w": jnp.arange(3.0)}
    with pj.CheckpointRecorder(tmp_path / "ckpt", steps=[0, 5, 10]) as recorder:
        monkeypatch.setattr(recorder._manager, "save", lambda *args, **kwargs: False)  # orbax declines the step
        with pytest.raises(PolcaError, match=r"orbax did not save step 5 in .*; nothing was saved"):
            recorder.save(5, params)
        monkeypatch.undo()
        assert recorder.missing == [0, 5, 10]
        assert recorder.save(5, params) is True
    with pj.CheckpointRecorder(tmp_path / "ckpt", steps=[0, 5, 10]) as recorder:  # a step saved before: refused
        with pytest.raises(PolcaError, match=r"step 0 cannot be saved .*: step 5 is already saved there"):
            recorder.save(0, params)
        assert recorder.save(10, params) is True
    assert pj.OrbaxCheckpoints(tmp_path / "ckpt").steps == [5, 10]


# --- errors ----------------------------------------------------------------------------------------------------------


def test_a_refused_permission_is_one_paragraph_and_exit_2(monkeypatch, tmp_path, capsys):
    from polca_jax.pipeline import cli

    denied = PermissionError(errno.EACCES, "Permission denied", "/runs/a/stages/train.json")
    monkeypatch.setattr(cli, "run", mock.Mock(side_effect=denied))
    assert main(["arithmetic", "--out", str(tmp_path / "run"), "--quiet", "--no-compile-cache"]) == 2
    assert re.fullmatch(r"polca: error: the system refused a file operation \(/runs/a/stages/train\.json\): "
                        r"Permission denied; [^\n]*permissions of the run directory[^\n]*\n", capsys.readouterr().err)


def test_a_peer_that_never_starts_ends_the_run_after_the_init_timeout_of_300_s_by_default(monkeypatch, tmp_path,
                                                                                         capsys):
    seen = {}

    def never_joined(*args, **kwargs):
        seen.update(kwargs)
        raise ConnectionError("not every process joined within --init-timeout seconds")

    monkeypatch.setattr(pj, "initialize_distributed", never_joined)
    out = tmp_path / "run"
    assert main(["arithmetic", "--out", str(out), "--coordinator", "127.0.0.1:1234", "--num-processes", "2",
                 "--process-id", "1", "--quiet", "--no-compile-cache"]) == 2
    assert seen["timeout_s"] == 300
    assert re.fullmatch(r"polca: error: not every process joined within --init-timeout seconds\n",
                        capsys.readouterr().err)
    assert not out.exists()
