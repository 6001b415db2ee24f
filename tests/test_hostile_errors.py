"""Hostile conditions that once ended in a silent loss or a traceback: each must end in the exact error class, a message
that names the problem and what to do, and (where it applies) nothing written or changed on disk.

Covered: the checkpoint recorder (steps out of order, a recorder never closed, a save interrupted), result files
(truncated, over-counted, changed), ``polca(out=<a file>)``, losses that are not real floating point, and the
command line's one error hierarchy (the user's code failing, the machine's resources, ``--debug``).
"""

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import polca_jax as pj
from polca_jax import CorruptRunDirectory, PolcaError, TaskError
from polca_jax.pipeline import cli
from polca_jax.pipeline.cli import main


def files_of(directory: Path) -> dict:
    """Every file under ``directory`` with its bytes (to assert that nothing changed)."""
    return {path: path.read_bytes() for path in sorted(Path(directory).rglob("*")) if path.is_file()}


def sgd_checkpoints(problem, num, learning_rate=0.05):
    grad = jax.jit(jax.grad(problem.mean_loss))
    params, checkpoints = problem.params, [problem.params]
    for _ in range(num - 1):
        params = jax.tree_util.tree_map(lambda p, g: p - learning_rate * g, params, grad(params, problem.batch))
        checkpoints.append(params)
    return checkpoints


class Interrupted:
    """Checkpoints whose item ``fail_at`` cannot be read (a killed run)."""

    def __init__(self, items, fail_at):
        self.items, self.fail_at = items, fail_at

    def __len__(self):
        return len(self.items)

    def __getitem__(self, t):
        if t == self.fail_at:
            raise RuntimeError(f"interrupted at checkpoint {t}")
        return self.items[t]


# --- the checkpoint recorder ----------------------------------------------------------------------------------------


def test_a_recorder_refuses_steps_out_of_order_instead_of_dropping_them(tmp_path):
    params = {"w": jnp.arange(3.0)}
    with pj.CheckpointRecorder(tmp_path / "ckpt", steps=[0, 5, 10]) as recorder:
        assert recorder.save(10, params)
        for step in (5, 0, 10):
            with pytest.raises(PolcaError, match=rf"step {step} cannot be saved .*: step 10 is already saved there, "
                                                 "and checkpoints must be saved in increasing step order"):
                recorder.save(step, params)
    assert sorted(path.name for path in (tmp_path / "ckpt").iterdir()) == ["10"]  # what True promised, nothing else
    assert recorder.missing == [0, 5]


NEVER_CLOSED = """
import sys
import jax.numpy as jnp
import polca_jax as pj

recorder = pj.CheckpointRecorder(sys.argv[1], steps=[0, 1, 2])
for step in range(3):
    assert recorder.save(step, {"w": jnp.full(4096, float(step))})
"""


def test_a_recorder_never_closed_still_writes_its_last_step(tmp_path):
    script = tmp_path / "never_closed.py"
    script.write_text(NEVER_CLOSED)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "cannot schedule new futures" not in done.stderr, done.stderr
    assert sorted(path.name for path in (tmp_path / "ckpt").iterdir()) == ["0", "1", "2"]
    with pj.OrbaxCheckpoints(tmp_path / "ckpt") as store:
        np.testing.assert_array_equal(store[2]["w"], np.full(4096, 2.0))


KILLED_DURING_A_SAVE = """
import os, signal, sys, time
import jax.numpy as jnp
import polca_jax as pj

recorder = pj.CheckpointRecorder(sys.argv[1], steps=[0, 1, 2])
for step in (0, 1):
    recorder.save(step, {"w": jnp.full(8, float(step))})
recorder.wait()
recorder.save(2, {"w": jnp.ones(1 << 24)})  # 128 MiB: still being written when the process is killed
time.sleep(float(sys.argv[2]))
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("delay", [0.0, 0.2])
def test_a_kill_during_a_save_leaves_a_store_read_or_refused_by_name(tmp_path, delay):
    script = tmp_path / "killed.py"
    script.write_text(KILLED_DURING_A_SAVE)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt"), str(delay)], capture_output=True,
                          timeout=300)
    assert done.returncode == -9, done.stderr
    with pj.OrbaxCheckpoints(tmp_path / "ckpt") as store:  # every complete step is read
        assert store.steps[:2] == [0, 1]
        np.testing.assert_array_equal(store[1]["w"], np.ones(8))
        complete = store.steps
    if complete == [0, 1]:  # step 2 never finished: asking for it is refused, by name
        with pytest.raises(ValueError, match=r"(save never finished .* step 2 is not in)|(steps \[2\] have no "
                                             r"checkpoint)"):
            pj.OrbaxCheckpoints(tmp_path / "ckpt", steps=[0, 1, 2])


def test_a_save_interrupted_midway_is_named_not_read(tmp_path):
    with pj.CheckpointRecorder(tmp_path / "ckpt", steps=[0, 1]) as recorder:
        for step in (0, 1):
            recorder.save(step, {"w": jnp.full(3, float(step))})
    leftover = tmp_path / "ckpt" / "2.orbax-checkpoint-tmp-1712345678"  # what a save killed before its rename leaves
    leftover.mkdir()
    before = files_of(tmp_path)
    with pytest.raises(CorruptRunDirectory, match=rf"{re.escape(str(leftover))} is a checkpoint whose save never "
                                                  r"finished .* step 2 is not in .*save that step again"):
        pj.OrbaxCheckpoints(tmp_path / "ckpt", steps=[0, 1, 2])
    with pj.OrbaxCheckpoints(tmp_path / "ckpt") as store:  # the complete steps stay readable
        assert store.steps == [0, 1]
    assert files_of(tmp_path) == before


# --- result files ---------------------------------------------------------------------------------------------------


@pytest.fixture
def partial(tmp_path, mlp):
    """A POLCA result interrupted after 2 of its 4 checkpoints, and a function resuming it."""
    checkpoints = sgd_checkpoints(mlp, 4)
    basis = pj.random_basis(mlp.params, 2, jax.random.key(3))
    out = tmp_path / "polca"

    def run(items=checkpoints):
        return pj.polca(mlp.token_losses, items, mlp.batch, basis, second_order="trapezoid", progress=False, out=out)

    run.uninterrupted = lambda: pj.polca(mlp.token_losses, checkpoints, mlp.batch, basis, second_order="trapezoid",
                                         progress=False)
    with pytest.raises(RuntimeError, match="interrupted"):
        run(Interrupted(checkpoints, 2))
    assert json.loads((out / "progress.json").read_text())["complete"] == 2
    return out, run


def truncate_projections(out: Path):
    path = out / "projections.npy"
    size = path.stat().st_size
    os.truncate(path, size // 2 + 64)  # the header survives, half the rows do not


def over_claim(out: Path):
    record = json.loads((out / "progress.json").read_text())
    (out / "progress.json").write_text(json.dumps(dict(record, complete=3)))


def over_claim_with_a_copied_checksum(out: Path):
    record = json.loads((out / "progress.json").read_text())
    rows = record["rows"] + record["rows"][-1:]
    (out / "progress.json").write_text(json.dumps(dict(record, complete=3, rows=rows)))


def flip_a_byte(path: Path, offset: int = -3):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


PARTIAL_DAMAGE = [
    ("truncated projections", truncate_projections,
     r"projections\.npy is truncated: its header describes a float64 array of shape \(4, 22, 2\), (\d+) bytes with "
     r"the header, but the file has (\d+) bytes .*Delete the directory .*--force"),
    ("progress over-claims", over_claim,
     r"progress\.json is corrupt: it counts 3 complete checkpoints but holds the checksums of the rows of 2"),
    ("progress over-claims with a copied checksum", over_claim_with_a_copied_checksum,
     r"the rows of checkpoint 2 in .* do not match the checksum"),
    ("a changed loss row", lambda out: flip_a_byte(out / "loss.npy", 128 + 8),
     r"the rows of checkpoint 0 in .* \(loss\.npy, projections\.npy\) do not match the checksum"),
]


@pytest.mark.parametrize("damage, message", [case[1:] for case in PARTIAL_DAMAGE],
                         ids=[case[0] for case in PARTIAL_DAMAGE])
def test_a_damaged_partial_result_is_refused_before_any_work_and_left_unchanged(partial, damage, message):
    out, run = partial
    damage(out)
    before = files_of(out)
    with pytest.raises(CorruptRunDirectory, match=message) as error:
        run()
    assert "remove" in str(error.value) or "Delete" in str(error.value)
    assert files_of(out) == before  # never padded with zeros, never overwritten


def test_a_truncated_file_is_refused_with_its_sizes(partial):
    out, run = partial
    size = (out / "projections.npy").stat().st_size
    truncate_projections(out)
    with pytest.raises(CorruptRunDirectory) as error:
        run()
    expected, actual = map(int, re.search(r"(\d+) bytes with the header, but the file has (\d+) bytes",
                                          str(error.value)).groups())
    assert (expected, actual) == (size, size // 2 + 64)
    assert (out / "projections.npy").stat().st_size == actual


def test_an_intact_partial_result_still_resumes_bit_for_bit(partial):
    out, run = partial
    resumed = run()
    whole = run.uninterrupted()
    for name in ("loss", "projections", "step_projection", "second_order", "outside_fraction"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(whole, name))
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["checksums"]) == {"steps", "loss", "projections", "step_projection", "second_order",
                                          "outside_fraction"}
    assert not (out / "progress.json").exists()


@pytest.fixture
def finished(partial):
    out, run = partial
    run()
    return out, run


FINISHED_DAMAGE = [
    ("a flipped byte", lambda out: flip_a_byte(out / "second_order.npy"),
     r"second_order\.npy does not match the checksum manifest\.json recorded .* delete the directory"),
    ("a truncated file", lambda out: os.truncate(out / "loss.npy", (out / "loss.npy").stat().st_size - 8),
     r"loss\.npy is truncated: .* but the file has \d+ bytes"),
]


@pytest.mark.parametrize("damage, message", [case[1:] for case in FINISHED_DAMAGE],
                         ids=[case[0] for case in FINISHED_DAMAGE])
def test_a_damaged_finished_result_is_refused_on_load(finished, damage, message):
    out, run = finished
    damage(out)
    before = files_of(out)
    with pytest.raises(CorruptRunDirectory, match=message):
        pj.POLCAResult.load(out)
    with pytest.raises(CorruptRunDirectory, match=message):
        run()  # polca(out=) loads a finished result: the same refusal
    assert files_of(out) == before


def test_verify_false_skips_the_checksums_but_not_the_sizes(finished):
    out, _ = finished
    flip_a_byte(out / "second_order.npy")
    assert pj.POLCAResult.load(out, verify=False).second_order.shape == (3, 22, 2)


def test_a_saved_result_is_verified_too(tmp_path, finished):
    out, _ = finished
    copy = tmp_path / "copy"
    pj.POLCAResult.load(out).save(copy)
    flip_a_byte(copy / "projections.npy")
    with pytest.raises(CorruptRunDirectory, match=r"projections\.npy does not match the checksum"):
        pj.POLCAResult.load(copy)


# --- polca's own refusals -------------------------------------------------------------------------------------------


def test_out_naming_a_file_is_refused(tmp_path, mlp):
    blocker = tmp_path / "result"
    blocker.write_text("mine")
    basis = pj.random_basis(mlp.params, 2, jax.random.key(3))
    with pytest.raises(PolcaError, match=r"out=.*result is a file, not a directory.*nothing was changed"):
        pj.polca(mlp.token_losses, sgd_checkpoints(mlp, 2), mlp.batch, basis, second_order="none", progress=False,
                 out=blocker)
    assert blocker.read_text() == "mine" and sorted(tmp_path.iterdir()) == [blocker]


@pytest.mark.parametrize("dtype, kind", [(jnp.int32, "not floating point"), (jnp.complex64, "complex")])
def test_a_loss_that_is_not_real_floating_point_is_named(tmp_path, mlp, dtype, kind):
    def loss(params, batch):
        return mlp.token_losses(params, batch).astype(dtype)

    basis = pj.random_basis(mlp.params, 2, jax.random.key(3))
    with pytest.raises(PolcaError, match=rf"returns losses of dtype {jnp.dtype(dtype).name} \({kind}\)"):
        pj.polca(loss, sgd_checkpoints(mlp, 2), mlp.batch, basis, second_order="none", progress=False,
                 out=tmp_path / "polca")
    assert not (tmp_path / "polca").exists()


# --- the command line -----------------------------------------------------------------------------------------------

TASK = '''
import jax.numpy as jnp
import numpy as np
from polca_jax.pipeline import LabelSet, Task, task_factory

PRESETS = {"tiny": dict(num_steps=20, polca_every=5, window_steps=5, basis_every=10, lanczos_iters=4,
                        min_cluster_size=4, reference_num_samples=None, ablations=False, baselines=False,
                        metrics_every=5)}


@task_factory(presets=PRESETS, default_preset="tiny")
def make_task(bug: str = "none") -> Task:
    if bug == "factory":
        raise RuntimeError("the data file is gone")  # FACTORY_LINE
    x = np.linspace(-1, 1, 24, dtype=np.float32)[:, None].repeat(3, 1)
    params = {"w": jnp.full((3, 4), 0.3), "v": jnp.full((4,), 0.1)}
    if bug == "empty_leaf":
        params["unused"] = jnp.zeros((0, 4))

    def per_sample_loss(p, b):
        losses = jnp.tanh(b["x"] @ p["w"]) @ p["v"] - b["x"][:, 0]  # LOSS_LINE
        if bug == "int_loss":
            return (losses * 100).astype(jnp.int32)
        if bug == "missing_key":
            return losses + b["y"][:, 0]  # MISSING_KEY_LINE
        return losses ** 2

    def train_batches(step):
        if bug == "batches" and step == 3:
            raise IndexError(f"no batch for step {step}")  # BATCHES_LINE
        return {"inputs": x} if bug == "train_key" else {"x": x}

    return Task(init_params=params, per_sample_loss=per_sample_loss, eval_batch={"x": x}, hessian_batch={"x": x},
                train_batches=train_batches, labels={"sign": LabelSet(x[:, 0] > 0)})
'''


def line_of(marker: str) -> int:
    return next(number for number, line in enumerate(TASK.splitlines(), 1) if marker in line)


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "user_task.py"
    path.write_text(TASK)
    return path


CLI_CASES = [
    ("factory raises", "factory", rf"the train stage failed in the task's code at {{file}}:{line_of('FACTORY_LINE')} "
     r"\(in make_task\): RuntimeError: the data file is gone; fix it there"),
    ("loss returns int", "int_loss", r"Task\.per_sample_loss returns losses of dtype int32 \(not floating point\)"),
    ("a zero-size parameter", "empty_leaf", r"Task\.init_params\['unused'\] has shape \(0, 4\), no entries: "
     r"checkpoints cannot hold an empty array"),
    ("a training batch misses a key", "train_key", rf"the train stage failed in the task's code at "
     rf"{{file}}:{line_of('LOSS_LINE')} \(in per_sample_loss\): KeyError: 'x'"),
    ("batch misses a key", "missing_key", rf"the train stage: Task\.per_sample_loss on \(init_params, eval_batch\) "
     rf"failed in the task's code at {{file}}:{line_of('MISSING_KEY_LINE')} \(in per_sample_loss\): KeyError: 'y'"),
]


@pytest.mark.parametrize("bug, message", [case[1:] for case in CLI_CASES], ids=[case[0] for case in CLI_CASES])
def test_the_users_code_failing_is_one_paragraph_naming_its_line(bug, message, task_file, tmp_path, capsys):
    before = sorted(tmp_path.iterdir())
    status = main(["run", f"{task_file}:make_task", "--set", f"bug={bug}", "--out", str(tmp_path / "run"),
                   "--quiet", "--no-compile-cache"])
    error = capsys.readouterr().err
    assert status == 2, error
    assert error.startswith("polca: error: ") and error.count("\n") == 1 and "Traceback" not in error, error
    assert re.search(message.format(file=re.escape(str(task_file))), error), error
    if bug != "train_key":  # (training had begun: its run directory stays, to resume once the task is fixed)
        assert sorted(tmp_path.iterdir()) == before  # the new run directory was removed again


def test_train_batches_failing_midway_is_named_with_its_step(task_file, tmp_path, capsys):
    status = main(["run", f"{task_file}:make_task", "--set", "bug=batches", "--out", str(tmp_path / "run"),
                   "--quiet", "--no-compile-cache"])
    error = capsys.readouterr().err
    assert status == 2, error
    assert error.count("\n") == 1 and "Traceback" not in error, error
    assert re.search(rf"the train stage failed in the task's code at {re.escape(str(task_file))}:"
                     rf"{line_of('BATCHES_LINE')} \(in train_batches\): IndexError: no batch for step 3", error), error


def test_polca_plan_names_the_factorys_line_too(task_file, capsys):
    assert main(["plan", f"{task_file}:make_task", "--set", "bug=factory"]) == 2
    error = capsys.readouterr().err
    assert re.fullmatch(rf"polca: error: polca plan failed in the task's code at {re.escape(str(task_file))}:"
                        rf"{line_of('FACTORY_LINE')} \(in make_task\): RuntimeError: the data file is gone;[^\n]*\n",
                        error), error


@pytest.mark.parametrize("where", ["before the command", "after it"])
def test_debug_raises_the_error_with_its_cause(where, task_file, tmp_path):
    arguments = ["run", f"{task_file}:make_task", "--set", "bug=factory", "--out", str(tmp_path / "run"), "--quiet",
                 "--no-compile-cache"]
    with pytest.raises(TaskError, match="the data file is gone") as error:
        main(["--debug", *arguments] if where == "before the command" else [*arguments, "--debug"])
    assert isinstance(error.value.__cause__, RuntimeError)


def xla_out_of_memory():
    from jax.errors import JaxRuntimeError

    return JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.20GiB.")


MACHINE_CASES = [
    ("disk full", lambda: OSError(errno.ENOSPC, "No space left on device", "/runs/a/polca/loss.npy"), 2,
     r"polca: error: the system refused a file operation \(/runs/a/polca/loss\.npy\): No space left on device; "
     r"check the disk's free space"),
    ("read-only", lambda: OSError(errno.EROFS, "Read-only file system", "/runs/a"), 2,
     r"polca: error: the system refused a file operation \(/runs/a\): Read-only file system"),
    ("host memory", MemoryError, 2, r"polca: error: out of memory \(MemoryError\); lower the chunk sizes"),
    ("device memory", xla_out_of_memory, 2,
     r"polca: error: out of memory \(RESOURCE_EXHAUSTED: Out of memory .*\); lower the chunk sizes"),
    ("anything else", lambda: KeyError("lanczos"), 1,
     r"polca: internal error: KeyError: 'lanczos'; this is a bug in polca_jax; rerun with --debug for the traceback"),
]


@pytest.mark.parametrize("make, status, message", [case[1:] for case in MACHINE_CASES],
                         ids=[case[0] for case in MACHINE_CASES])
def test_the_machines_limits_are_one_paragraph_and_exit_2(make, status, message, monkeypatch, tmp_path, capsys):
    # where the run meets the disk or the device (a Mock: raised from the standard library, not from a test's frame,
    # which the command would take for the task's code)
    monkeypatch.setattr(cli, "run", mock.Mock(side_effect=make()))
    assert main(["arithmetic", "--out", str(tmp_path / "run"), "--quiet", "--no-compile-cache"]) == status
    error = capsys.readouterr().err
    assert re.fullmatch(message + r"[^\n]*\n", error), error
    with pytest.raises(type(make())):
        main(["--debug", "arithmetic", "--out", str(tmp_path / "run"), "--quiet", "--no-compile-cache"])
