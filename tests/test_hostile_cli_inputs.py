"""Hostile command lines: each must end in exit code 2 and a message that names the problem, with nothing written.

Every case runs ``polca ...`` (the CLI's ``main``) in a fresh directory; none of them trains, so the table is fast.
The kernels' hostile inputs are in test_hostile_kernel_inputs.py; run-directory rules that need a run in progress
(resume, refusals, fingerprints, --force) in test_pipeline.py.
"""

import re
from pathlib import Path

import pytest

from polca_jax.pipeline.cli import main

USER_TASK = '''
import jax.numpy as jnp
import numpy as np
from polca_jax.pipeline import LabelSet, Task, task_factory


@task_factory(presets={"tiny": dict(num_steps=20, polca_every=5, window_steps=5, basis_every=10)}, default_preset="tiny")
def make_task(bug: str = "none") -> Task:
    x = np.linspace(-1, 1, 24, dtype=np.float32)[:, None].repeat(2, 1)
    labels = {"sign": LabelSet(x[:, 0] > 0)}
    params = {"w": jnp.full((2, 3), 0.3)}
    eval_batch = {"x": x}
    if bug == "labels":
        labels = {"sign": LabelSet((x[:, 0] > 0)[:-1])}
    if bug == "one_class":
        labels = {"sign": LabelSet(np.ones(len(x), bool))}
    if bug == "not_a_task":
        return {"params": 1}
    if bug == "int_params":
        params = {"w": jnp.ones((2, 3), jnp.int32)}
    if bug == "empty_eval":
        eval_batch = {"x": x[:0]}
    if bug == "mean_loss":
        return Task(init_params=params, per_sample_loss=lambda p, b: ((b["x"] @ p["w"]) ** 2).mean(),
                    eval_batch=eval_batch, hessian_batch={"x": x})
    if bug == "qualifier":
        from polca_jax.pipeline import Qualifier
        labels = {"sign": LabelSet(x[:, 0] > 0, positive=True, qualifier=Qualifier("place", (1,), 0.5))}
    if bug == "positive":
        labels = {"sign": LabelSet(x[:, 0] > 0, positive="yes")}
    return Task(init_params=params, per_sample_loss=lambda p, b: ((b["x"] @ p["w"]) ** 2).sum(1),
                eval_batch=eval_batch, hessian_batch={"x": x}, train_batches=lambda step: {"x": x}, labels=labels)
'''

USER = "{user}"  # replaced by the user task file's reference
CASES = [
    # task references
    (["run", "arith"], r"unknown task 'arith': give a built-in task"),
    (["run", "nowhere.py:make_task"], r"task file .*nowhere\.py does not exist"),
    (["run", "polca_jax:nothing"], r"polca_jax has no 'nothing'"),
    (["run", "no_such_package_q:make"], r"cannot import the task module 'no_such_package_q'"),
    (["run", "{broken}"], r"cannot import the task file .*broken\.py: ZeroDivisionError"),
    (["run", "{not_callable}"], r"is a int, not a task factory"),
    (["run", "{positional}"], r"parameter\(s\) \['bug'\] are positional-only, so no --set can reach them"),
    # the task a factory builds
    (["run", USER, "--set", "bug=labels"], r"label set 'sign' has 23 values but the task has 24 evaluation samples"),
    (["run", USER, "--set", "bug=one_class"], r"label set 'sign' has a single class \(True\)"),
    (["run", USER, "--set", "bug=not_a_task"], r"returned dict, expected a polca_jax\.pipeline\.Task"),
    (["run", USER, "--set", "bug=int_params"], r"Task\.init_params\['w'\] has dtype int32"),
    (["run", USER, "--set", "bug=empty_eval"], r"Task\.eval_batch: .*empty"),
    (["run", USER, "--set", "bug=mean_loss"], r"must return \[n_seq\] or \[n_seq, n_tok\]"),
    (["run", USER, "--set", "bug=qualifier"], r"qualifies clusters by label set 'place', which the task does not have"),
    (["run", USER, "--set", "bug=positive"], r"positive class 'yes' is not among its classes"),
    (["run", USER], r"lca_axes=50 exceeds the task's 6 parameters"),
    (["run", USER, "--set", "ablations=false"], r"lanczos_iters=20 plus the 2 basis directions exceed the task's 6"),
    (["run", USER, "--set", "basis_every=5", "--set", "k_per_checkpoint=2"],
     r"the basis would have 8 directions .* but the task's model has 6 parameters"),
    # settings
    (["run", USER, "--preset", "huge"], r"unknown preset 'huge' for task .*; choose one of \['tiny'\]"),
    (["run", USER, "--set", "bogus=1"], r"bad --set 'bogus=1': expected KEY=VALUE"),
    (["run", USER, "--set", "num_steps"], r"bad --set 'num_steps'"),
    (["run", USER, "--set", "num_steps=ten"], r"--set num_steps=ten: expected int"),
    (["run", USER, "--set", "ablations=maybe"], r"--set ablations=maybe: expected bool"),
    (["run", USER, "--set", "ablation_bases=random,lca"], r"ablation_bases must name registered bases among"),
    (["run", USER, "--set", "polca_until=7"], r"polca_until must be a multiple of polca_every \(5\)"),
    (["run", USER, "--set", "chunk_size=0"], r"chunk_size must be None or an integer >= 1"),
    (["run", USER, "--set", "significance=1.5"], r"significance must lie strictly between 0 and 1"),
    (["run", USER, "--set", "gradient_window=1.5"], r"gradient_window must be a fraction in \(0, 1\]"),
    (["run", USER, "--set", "gradient_rotation=pca"], r"gradient_rotation must be one of \('none', 'varimax', 'ica'\)"),
    (["run", USER, "--set", "gradient_directions=all"],
     r"gradient_directions must be one of \('joint', 'each', 'subspace'\)"),
    (["run", USER, "--set", "null_permutations=0"], r"null_permutations must be an integer >= 1"),
    (["run", USER, "--set", "preset=paper"], r"'preset' is not a setting; use --preset NAME"),
    (["run", USER, "--set", "task=english"], r"'task' is not a setting; name the task on the command line"),
    (["run", USER, "--set", "seed=-1"], r"seed must be an integer >= 0, got -1"),
    (["run", USER, "--set", "learning_rate=inf"], r"learning_rate must be a finite number > 0, got inf"),
    (["run", USER, "--set", "learning_rate=-1"], r"learning_rate must be a finite number > 0"),
    (["run", USER, "--set", "learning_rate=nan"], r"learning_rate must be a finite number > 0"),
    (["run", USER, "--set", "num_steps=0"], r"num_steps must be an integer >= 1"),
    (["run", USER, "--set", "num_steps=22"], r"num_steps \(22\) must be a multiple of polca_every \(5\)"),
    (["run", USER, "--set", "basis_every=40"], r"no basis checkpoint: basis_every=40 exceeds num_steps=20"),
    (["run", USER, "--set", "basis_until=40"], r"basis_until must lie in \[1, num_steps=20\]"),
    (["run", USER, "--set", "second_order=third"], r"second_order must be one of"),
    (["run", USER, "--set", "projection_method=sideways"], r"projection_method must be one of"),
    (["run", USER, "--set", "normalize=l1"], r"normalize must be None, 'unit' or 'standardize'"),
    (["run", USER, "--set", "window_steps=10"], r"window_steps \(Δ = 10\) must be less than half of num_steps"),
    (["run", USER, "--set", "min_cluster_size=0"], r"min_cluster_size must be an integer >= 1"),
    (["run", USER, "--set", "weight_decay=-0.1"], r"weight_decay must be a finite number >= 0"),
    (["run", USER, "--set", "metrics_every=0"], r"metrics_every must be an integer >= 1"),
    # the paper tasks' options
    (["arithmetic", "--preset", "tiny", "--set", "num_heads=3"], r"d_model \(32\) must be divisible by num_heads"),
    (["arithmetic", "--preset", "tiny", "--set", "num_train_problems=2000000"], r"only 1,000,000 pairs"),
    (["arithmetic", "--preset", "tiny", "--set", "d_modle=3"], r"bad --set 'd_modle=3'"),
    (["english", "--preset", "tiny", "--set", "model_context_length=8"], r"exceeds the model's context length"),
    (["english", "--preset", "tiny", "--set", "validation_fraction=1.0"], r"validation_fraction must lie strictly"),
    (["english", "--preset", "tiny", "--data", "missing.txt"], r"missing\.txt"),
    # meshes and processes (nothing here joins a multi-process run: each is refused before)
    (["run", USER, "--mesh", "3x3"], r"--mesh 3x3 needs 9 devices, but 1 are visible"),
    (["run", USER, "--mesh", "2by2"], r"--mesh '2by2': expected DATAxMODEL"),
    (["run", USER, "--mesh", "0x1"], r"--mesh '0x1': expected DATAxMODEL, two positive integers"),
    (["run", USER, "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
     r"process id 2 is not one of the 2 processes"),
    (["run", USER, "--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], r"must be host:port"),
    (["run", USER, "--num-processes", "2", "--process-id", "0"], r"needs the coordinator address"),
    # stages and directories
    (["run", USER, "--stage", "cluster"], r"stage 'train' has not finished"),
    (["arithmetic", "--preset", "tiny", "--stage", "score"], r"stage 'train' has not finished"),
    (["arithmetic", "report", "--preset", "tiny"], r"stage 'train' has not finished"),
    (["report", "{out}"], r"is not a run directory \(no config\.json\)"),
]


@pytest.fixture
def references(tmp_path):
    files = {"user": ("user_task.py", USER_TASK), "broken": ("broken.py", "1 / 0\n"),
             "not_callable": ("not_callable.py", "make_task = 3\n"),
             "positional": ("positional.py", USER_TASK.replace('bug: str = "none"', 'bug: str = "none", /'))}
    names = {}
    for key, (name, text) in files.items():
        (tmp_path / name).write_text(text)
        names[key] = f"{tmp_path / name}:make_task"
    return names


@pytest.mark.parametrize("arguments, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_hostile_command_lines_fail_cleanly_and_write_nothing(arguments, message, references, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    filled = [argument.format(**references, out=out) for argument in arguments]
    if filled[0] != "report":
        filled += ["--out", str(out), "--quiet"]
    before = sorted(path.name for path in tmp_path.iterdir())
    assert main(filled) == 2
    error = capsys.readouterr().err
    assert error.startswith("polca: error: ") and re.search(message, error), error
    assert "Traceback" not in error
    assert not out.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == before


@pytest.mark.parametrize("where, message", [
    ("file", r"is a file, not a directory"),
    ("below_file", r"lies below .*, which is a file"),
    ("foreign", r"holds files but no config\.json"),
])
def test_out_paths_that_cannot_be_run_directories(where, message, references, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    if where == "foreign":
        blocker.mkdir()
        (blocker / "notes.txt").write_text("mine")
        out = blocker
    else:
        blocker.write_text("not a directory")
        out = blocker if where == "file" else blocker / "run"
    snapshot = {path: path.read_bytes() for path in Path(tmp_path).rglob("*") if path.is_file()}
    assert main(["run", references["user"], "--out", str(out), "--quiet"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert {path: path.read_bytes() for path in Path(tmp_path).rglob("*") if path.is_file()} == snapshot
