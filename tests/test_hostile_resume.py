"""Hostile resumes and command lines: each case must be refused with its error class and a message naming the
problem, and leave every file on disk as it was (compared by digest before and after).

Inputs mixed on resume (checkpoints re-recorded, an edited loss) in a pipeline run directory and in
``polca(out=...)``; a second run on a run directory in use; settings, meshes and processes refused before any work
by ``polca run`` and ``polca plan`` alike; ``polca report`` running no code a run directory names.
"""

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import polca_jax as pj
from conftest import sgd_checkpoints
from polca_jax.errors import PolcaError, ResumeMismatch
from polca_jax.pipeline import run
from polca_jax.pipeline.cli import main
from test_decomposition import Checkpoints, interrupted

USER_TASK = '''
import jax.numpy as jnp
import numpy as np
from polca_jax.pipeline import LabelSet, Task, task_factory

PRESETS = {"tiny": dict(num_steps=20, polca_every=5, window_steps=5, basis_every=10, lanczos_iters=4,
                        min_cluster_size=4, reference_num_samples=None, ablations=False, baselines=False,
                        metrics_every=5)}


@task_factory(presets=PRESETS, default_preset="tiny")
def make_task(width: int = 3, labels: str = "sign") -> Task:
    x = np.linspace(-1, 1, 24, dtype=np.float32)[:, None].repeat(2, 1)
    values = {"sign": x[:, 0] > 0, "object": np.array([None, "a"] * 12, dtype=object),
              "mixed": [None, "a"] * 12}[labels]
    return Task(init_params={"w": jnp.full((2, width), 0.3)},
                per_sample_loss=lambda p, b: ((b["x"] @ p["w"]) ** 2).sum(1),
                eval_batch={"x": x}, hessian_batch={"x": x}, train_batches=lambda step: {"x": x},
                labels={"sign": LabelSet(values)})
'''
EDITED_LOSS = ("((b[\"x\"] @ p[\"w\"]) ** 2).sum(1)", "jnp.abs(b[\"x\"] @ p[\"w\"]).sum(1)")


def quiet(_):
    pass


def digests(directory: Path) -> dict[str, str]:
    """Every file below ``directory`` (relative path -> SHA-256 of its bytes): what "nothing changed" compares."""
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def record_checkpoints(directory: Path, scale: float = 1.0) -> None:
    """Checkpoints of the user task's model at its tiny preset's steps 0, 5, ..., 20."""
    with pj.CheckpointRecorder(directory, steps=range(0, 21, 5)) as recorder:
        for step in range(0, 21, 5):
            recorder.save(step, {"w": jnp.full((2, 3), 0.3 * scale - 0.01 * step, jnp.float32)})


@pytest.fixture(scope="module")
def finished_basis(tmp_path_factory):
    """Two run directories of the user task with the train and basis stages finished: one trained, one reading
    recorded checkpoints (``--checkpoints``)."""
    root = tmp_path_factory.mktemp("hostile_resume")
    (root / "user_task.py").write_text(USER_TASK)
    task = f"{root / 'user_task.py'}:make_task"
    run(task, root / "trained", stages=["train", "basis"], progress=False, log=quiet)
    record_checkpoints(root / "recorded")
    run(task, root / "read", checkpoints=root / "recorded", stages=["train", "basis"], progress=False, log=quiet)
    return root


def rerecord(root: Path) -> None:
    shutil.rmtree(root / "recorded")
    record_checkpoints(root / "recorded", scale=2.0)


def replace_trained(root: Path) -> None:
    shutil.rmtree(root / "trained" / "checkpoints")
    record_checkpoints(root / "trained" / "checkpoints")


def edit_loss(root: Path) -> None:
    text = (root / "user_task.py").read_text()
    (root / "user_task.py").write_text(text.replace(*EDITED_LOSS))


# (name, run directory, what changes before the resume, stages resumed, force, message)
PIPELINE_CASES = [
    ("checkpoints re-recorded between stages", "read", rerecord, ["decompose"], False,
     r"the checkpoint at step 0 in .*recorded differs from the one this run read before .*--force.*new --out"),
    ("the run's own checkpoints replaced", "trained", replace_trained, ["decompose"], False,
     r"the checkpoint at step 0 in .*trained/checkpoints differs from the one this run trained before"),
    ("loss edited after train and basis", "trained", edit_loss, ["decompose"], False,
     r"the task's loss differs from the one the train stage of this run used .*--stage train --force"),
    ("loss edited, read checkpoints", "read", edit_loss, ["decompose"], False,
     r"the task's loss differs from the one the basis stage of this run used .*--stage basis --force"),
    ("loss edited, a later stage forced", "trained", edit_loss, ["basis", "decompose"], True,
     r"the task's loss differs from the one the train stage of this run used"),
]


@pytest.mark.parametrize("name, which, change, stages, force, message", PIPELINE_CASES,
                         ids=[c[0] for c in PIPELINE_CASES])
def test_a_resume_on_other_inputs_is_refused_and_changes_nothing(finished_basis, tmp_path, name, which, change,
                                                                  stages, force, message):
    root = tmp_path / "copy"
    shutil.copytree(finished_basis, root)
    out = root / which
    config = json.loads((out / "config.json").read_text())  # the copy runs its own task file and checkpoints
    config["task"] = f"{root / 'user_task.py'}:make_task"
    config["checkpoints"] = config["checkpoints"] and str(root / "recorded")
    (out / "config.json").write_text(json.dumps(config))
    change(root)
    before = digests(root)
    with pytest.raises(ResumeMismatch, match=message):
        run(f"{root / 'user_task.py'}:make_task", out, stages=stages, force=force, progress=False, log=quiet)
    assert digests(root) == before


# --- polca(out=...) resumed on other inputs ----------------------------------------------------------------------


def other_checkpoints(checkpoints):
    return [jax.tree_util.tree_map(lambda leaf: leaf * 1.5, params) for params in checkpoints]


def other_loss(mlp):
    return lambda params, batch: mlp.token_losses(params, batch) * 2.0  # the same shapes, another function


# (name, complete result?, what the resume is given instead, message)
POLCA_CASES = [
    ("partial result, other checkpoints", False, dict(checkpoints=other_checkpoints),
     r"the checkpoint at step 2 differs from the one the partial POLCA result in .* was computed from"),
    ("complete result, other checkpoints", True, dict(checkpoints=other_checkpoints),
     r"the checkpoint at step 4 differs from the one the complete POLCA result"),
    ("partial result, other per-sample loss", False, dict(loss=other_loss),
     r"partial POLCA result of another computation: the per-sample loss function differs"),
    ("complete result, other per-sample loss", True, dict(loss=other_loss),
     r"complete POLCA result of another computation: the per-sample loss function differs"),
]


@pytest.mark.parametrize("name, complete, change, message", POLCA_CASES, ids=[c[0] for c in POLCA_CASES])
def test_polca_out_resumed_on_other_inputs_is_refused_and_changes_nothing(tmp_path, mlp, name, complete, change,
                                                                          message):
    checkpoints = sgd_checkpoints(mlp, 5)
    basis = pj.random_basis(mlp.params, 3, jax.random.key(7))
    out = tmp_path / "polca"
    if complete:
        pj.polca(mlp.token_losses, checkpoints, mlp.batch, basis, second_order="none", progress=False, out=out)
    else:
        interrupted(out, mlp, checkpoints, basis, second_order="none")  # 3 of 5 checkpoints complete
    before = digests(out)
    loss = change["loss"](mlp) if "loss" in change else mlp.token_losses
    given = change["checkpoints"](checkpoints) if "checkpoints" in change else checkpoints
    with pytest.raises(ResumeMismatch, match=message) as error:
        pj.polca(loss, Checkpoints(given), mlp.batch, basis, second_order="none", progress=False, out=out)
    assert f"remove {out} to start over" in str(error.value)
    assert digests(out) == before
    record = json.loads((out / ("manifest.json" if complete else "progress.json")).read_text())
    assert len(record["checkpoints"]) == (5 if complete else 3)  # each complete checkpoint's digest


LOSS_DIGEST_SCRIPT = """
import sys
import jax, jax.numpy as jnp
sys.path.insert(0, sys.argv[1])
from conftest import mlp_token_losses
from polca_jax.fingerprints import loss_digest

@jax.custom_vjp
def doubled(x):
    return 2 * x
doubled.defvjp(lambda x: (doubled(x), None), lambda _, g: (2 * g,))
table = jnp.arange(3.0)  # a captured constant

def loss(params, batch):
    return jax.nn.relu(mlp_token_losses(params, batch)) + doubled(batch["x"]).sum() + table[1]

f32 = jnp.float32  # the same arguments with or without jax_enable_x64
params = {"w1": jnp.zeros((3, 4), f32), "b1": jnp.zeros(4, f32), "w2": jnp.zeros((4, 2), f32)}
batch = {"x": jnp.zeros((5, 3), f32), "y": jnp.zeros((5, 2), f32)}
print(loss_digest(loss, params, batch))
"""


@pytest.mark.slow
def test_the_loss_digest_is_the_same_in_two_processes():
    """Two processes (other hash seeds, one with jax_enable_x64 as the tests set it) trace the same digest."""
    digests_seen = {
        subprocess.run([sys.executable, "-c", textwrap.dedent(LOSS_DIGEST_SCRIPT), str(Path(__file__).parent)],
                       env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONHASHSEED=str(seed), JAX_ENABLE_X64=x64),
                       capture_output=True, text=True, check=True, timeout=300).stdout.strip()
        for seed, x64 in ((1, "0"), (2, "1"))}
    assert len(digests_seen) == 1 and len(next(iter(digests_seen))) == 64


def test_checkpoint_digests_of_an_earlier_format_are_recorded_again_not_refused(finished_basis, tmp_path):
    """A run directory whose fingerprints.json holds checkpoint digests of an earlier format (plain SHA-256 of the
    parameters) resumes: the digests are recorded again in the current format, and are checked from then on."""
    root = tmp_path / "copy"
    shutil.copytree(finished_basis, root)
    out = root / "trained"
    config = json.loads((out / "config.json").read_text())
    config["task"] = f"{root / 'user_task.py'}:make_task"
    (out / "config.json").write_text(json.dumps(config))
    fingerprints = json.loads((out / "fingerprints.json").read_text())
    fingerprints["checkpoints"] = {step: "0" * 64 for step in fingerprints["checkpoints"]}
    (out / "fingerprints.json").write_text(json.dumps(fingerprints))
    run(config["task"], out, stages=["decompose"], progress=False, log=quiet)
    recorded = json.loads((out / "fingerprints.json").read_text())["checkpoints"]
    assert recorded and all(digest.startswith("sum64:") for digest in recorded.values())


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "int8", "bool", "complex128"])
def test_a_parameters_digest_adds_up_over_any_split_and_changes_with_any_element(dtype):
    """The digest a multi-process run computes from shards: the partial sums of any blocks of a leaf (as processes
    hold them) add up to the whole leaf's; changing one element, or moving one, changes the digest."""
    from polca_jax.fingerprints import _weighted_sum, params_digest

    values = np.random.default_rng(0).normal(size=(6, 10)) * 3
    values = {"bool": values > 0, "complex128": values + 1j * values[::-1]}.get(dtype, values)
    whole = np.asarray(jnp.asarray(values, dtype=dtype))
    total = _weighted_sum(whole, [0, 0], whole.shape) % 2**64
    for rows, cols in ((2, 10), (3, 5), (1, 1), (6, 4)):
        blocks = sum(_weighted_sum(whole[r:r + rows, c:c + cols], [r, c], whole.shape)
                     for r in range(0, 6, rows) for c in range(0, 10, cols))
        assert blocks % 2**64 == total, (rows, cols)
    digest = params_digest({"w": whole})
    changed = whole.copy()
    changed[4, 7] = ~changed[4, 7] if dtype == "bool" else changed[4, 7] + (1 if dtype == "int8" else 0.5)
    swapped = whole.copy()
    swapped[[0, 5]] = swapped[[5, 0]]
    assert len({digest, params_digest({"w": changed}), params_digest({"w": swapped}), params_digest({"v": whole}),
                params_digest({"w": whole.reshape(10, 6)})}) == 5
    assert params_digest({"w": jnp.asarray(whole)}) == digest  # on a device or the host alike


# --- a run directory in use ----------------------------------------------------------------------------------------


@pytest.fixture
def user_task(tmp_path):
    (tmp_path / "user_task.py").write_text(USER_TASK)
    return f"{tmp_path / 'user_task.py'}:make_task"


def test_a_second_run_on_a_directory_in_use_is_refused_naming_the_holder(user_task, tmp_path, capsys):
    from polca_jax.pipeline import open_run

    out = tmp_path / "run"
    holder, _ = open_run(user_task, out)
    holder.lock()  # another run holds the directory (a separate open file: flock refuses it like another process)
    try:
        before = digests(out)
        with pytest.raises(PolcaError, match=rf"{out} is in use by another polca run \(pid {os.getpid()} on "
                                             rf"{socket.gethostname()}, started 20.*\); wait for it"):
            run(user_task, out, stages=["train"], progress=False, log=quiet)
        assert main(["run", user_task, "--out", str(out), "--quiet"]) == 2
        assert "is in use by another polca run" in capsys.readouterr().err
        assert digests(out) == before and not (out / "stages").exists()
    finally:
        holder.unlock()


def test_a_lock_left_by_a_dead_process_is_taken_over(user_task, tmp_path):
    from polca_jax.pipeline import open_run

    out = tmp_path / "run"
    run_dir, _ = open_run(user_task, out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "run.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                              "started": "2020-01-01T00:00:00+00:00"}))
    run_dir.lock()
    try:
        assert json.loads((out / "run.lock").read_text())["pid"] == os.getpid()
    finally:
        run_dir.unlock()
    again, _ = open_run(user_task, out)  # released: the next run takes it
    again.lock()
    again.unlock()


# --- polca report runs no code a run directory names ---------------------------------------------------------------


def test_report_runs_no_task_code_the_run_directory_names_unless_the_task_is_named(user_task, tmp_path, capsys):
    from polca_jax.pipeline import open_run

    out = tmp_path / "run"
    open_run(user_task, out)
    marker = tmp_path / "task_code_ran"
    task_file = Path(user_task.rpartition(":")[0])
    task_file.write_text(f"open({str(marker)!r}, 'w').close()\n" + task_file.read_text())  # hostile task code
    assert main(["report", str(out)]) == 0
    assert not marker.exists()
    report = (out / "report" / "report.md").read_text()
    assert "`polca report` runs no task code" in report and f"--task {user_task}" in report
    assert main(["report", str(out), "--task", user_task]) == 0  # named on the command line: it runs
    assert marker.exists()
    assert "runs no task code" not in (out / "report" / "report.md").read_text()


# --- refused before any work, by polca run and polca plan alike ----------------------------------------------------

BOTH = ("run", "plan")
# (commands, arguments after the task, error class, message)
COMMAND_CASES = [
    (BOTH, ["--set", "window_steps=none"], PolcaError,
     r"the breakthrough window Δ = 25 steps \(the default, 5 × polca_every=5\) is too wide for the 5 POLCA "
     r"checkpoints at steps 0\.\.20: .* Δ can be at most 10; --set window_steps=10"),
    (BOTH, ["--set", "window_steps=none", "--set", "polca_every=10"], PolcaError,
     r"Δ = 50 steps .* too wide for the 3 POLCA checkpoints"),
    (BOTH, ["--set", "polca_until=10", "--set", "window_steps=8"], PolcaError,
     r"Δ = 8 steps \(window_steps\) is too wide .* at most 5"),
    (BOTH, ["--set", "threshold_step=30"], PolcaError,
     r"threshold_step \(τ = 30\) must lie within the POLCA steps 0\.\.20"),
    (BOTH, ["--checkpoints", "/nonexistent/checkpoints"], ValueError,
     r"checkpoint directory /nonexistent/checkpoints does not exist"),
    (("plan",), ["--mesh", "1000000x1"], PolcaError,
     r"a data axis of 1000000 devices exceeds the task's 24 evaluation or Hessian sequences"),
    (("run",), ["--mesh", "1000000x1"], ValueError, r"--mesh 1000000x1 needs 1000000 devices, but 1 are visible"),
    (("run",), ["--num-processes", "0"], PolcaError, r"the number of processes must be at least 1, got 0 "
                                                     r"\(--num-processes"),
    (("run",), ["--num-processes", "2", "--process-id", "-1", "--coordinator", "localhost:1234"], PolcaError,
     r"the process id must be 0 or more, got -1"),
    (("run",), ["--coordinator", "localhost:70000", "--num-processes", "2", "--process-id", "0"], PolcaError,
     r"coordinator address 'localhost:70000': port 70000 is not in 1\.\.65535"),
    (("run",), ["--coordinator", "localhost:0", "--num-processes", "2", "--process-id", "0"], PolcaError,
     r"port 0 is not in 1\.\.65535"),
    (("run",), ["--coordinator", ":1234", "--num-processes", "2", "--process-id", "1"], PolcaError,
     r"coordinator address ':1234' must be host:port"),
    (("run",), ["--coordinator", "local host:1234", "--num-processes", "2", "--process-id", "1"], PolcaError,
     r"must be host:port"),
    (BOTH, ["--set", "labels=object"], PolcaError,
     r"label set 'sign' holds values of dtype object \(of types NoneType, str\): labels must be all ints"),
    (BOTH, ["--set", "labels=mixed"], PolcaError, r"label set 'sign' holds values of dtype object"),
    (BOTH, ["{directory_task}"], PolcaError, r"task file .*x\.py is a directory, not a Python file"),
]
COMMANDS = [(command, arguments, error, message) for commands, arguments, error, message in COMMAND_CASES
            for command in commands]


@pytest.mark.parametrize("command, arguments, error, message", COMMANDS,
                         ids=[f"{c} {' '.join(a)}" for c, a, _, _ in COMMANDS])
def test_a_mistake_is_refused_before_any_work_by_run_and_plan(user_task, tmp_path, capsys, monkeypatch, command,
                                                               arguments, error, message):
    from polca_jax.pipeline import cli

    (tmp_path / "x.py").mkdir()
    caught = []

    def recording(function):
        def wrapper(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except BaseException as raised:
                caught.append(raised)
                raise
        return wrapper

    for name in ("run", "_plan", "_run_mesh"):
        monkeypatch.setattr(cli, name, recording(getattr(cli, name)))
    monkeypatch.chdir(tmp_path)
    task = user_task
    if arguments[0] == "{directory_task}":
        task, arguments = f"{tmp_path / 'x.py'}:make_task", arguments[1:]
    out = tmp_path / "run"
    line = [command, task, *arguments] + (["--out", str(out), "--quiet"] if command == "run" else [])
    before = digests(tmp_path)
    assert main(line) == 2
    printed = capsys.readouterr().err
    assert re.search(message, printed), printed
    assert "Traceback" not in printed
    assert caught and isinstance(caught[-1], error) and re.search(message, str(caught[-1]))
    assert digests(tmp_path) == before and not out.exists()


@pytest.mark.slow
def test_the_refusals_way_out_redoes_the_stage_with_the_new_inputs(finished_basis, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(finished_basis, root)
    task = f"{root / 'user_task.py'}:make_task"
    for which in ("trained", "read"):
        config = json.loads((root / which / "config.json").read_text())
        config["task"], config["checkpoints"] = task, config["checkpoints"] and str(root / "recorded")
        (root / which / "config.json").write_text(json.dumps(config))
    rerecord(root)
    edit_loss(root)
    for which, stage in (("trained", "train"), ("read", "basis")):
        out = root / which
        old = json.loads((out / "fingerprints.json").read_text())
        with pytest.raises(ResumeMismatch, match=f"the task's loss differs .* --stage {stage} --force"):
            run(task, out, stages=["decompose"], progress=False, log=quiet)
        if which == "read":  # redoing the basis stage then meets the re-recorded checkpoints
            with pytest.raises(ResumeMismatch, match="the checkpoint at step 10 .* --stage train --force"):
                run(task, out, stages=["basis", "decompose"], force=True, progress=False, log=quiet)
        run(task, out, stages=["train", "basis", "decompose"], force=True, progress=False, log=quiet)
        new = json.loads((out / "fingerprints.json").read_text())
        assert new["losses"]["per_sample_loss"]["stage"] == "decompose"
        assert new["losses"]["loss"]["digest"] != old["losses"]["loss"]["digest"]
        if which == "read":  # the re-recorded checkpoints' digests replace the old ones
            assert new["checkpoints"]["0"] != old["checkpoints"]["0"]
