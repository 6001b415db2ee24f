"""Shared fixtures: tiny float64 models (an MLP and a transformer) whose kernels compile once per session.

Nothing here imports the pipeline extra (flax, optax, matplotlib) at import time, so the tests marked ``core`` run
with the core install alone (``pytest -m core``); the transformer is built on first use, and its fixture skips
when the extra is missing."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import functools

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from polca_jax._command import missing_pipeline_modules  # noqa: E402


_MISSING_EXTRA = missing_pipeline_modules()


# test directories collected only in a pytest process of their own, which tests/test_separate_processes.py starts
# with the variable set (it says why each runs apart)
SEPARATE_PROCESSES = {Path(__file__).parent / "torch": "POLCA_TORCH_TESTS",
                      Path(__file__).parent / "object_store": "POLCA_OBJECT_STORE_TESTS"}


def pytest_ignore_collect(collection_path, config):
    """With the core install alone (no pipeline extra), a test module with no test marked ``core`` is not collected:
    it imports the pipeline, which cannot be imported. The tests that load PyTorch (``tests/torch/``) and those of
    checkpoints on an object store (``tests/object_store/``) are collected only in a process of their own
    (``tests/test_separate_processes.py`` starts it and says why)."""
    if collection_path in SEPARATE_PROCESSES and not os.environ.get(SEPARATE_PROCESSES[collection_path]):
        return True
    if _MISSING_EXTRA and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        if "pytest.mark.core" not in collection_path.read_text():
            return True
    return None


def pytest_report_header(config):
    if _MISSING_EXTRA:
        return (f"pipeline extra not installed ({', '.join(_MISSING_EXTRA)} missing): only the test modules with tests "
                "marked core are collected")
    return None


def mlp_token_losses(params, batch):
    """[n, 2] squared errors of a 3→4→2 tanh MLP: two token-level samples per row."""
    hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return (hidden @ params["w2"] - batch["y"]) ** 2


def mlp_sequence_losses(params, batch):
    """[n] one sample per row."""
    return mlp_token_losses(params, batch).sum(axis=1)


def mlp_mean_loss(params, batch):
    return mlp_token_losses(params, batch).mean()


class Problem:
    """A model's loss functions, parameters and an evaluation batch."""

    def __init__(self, name, params, batch, token_losses, sequence_losses, mean_loss):
        self.name, self.params, self.batch = name, params, batch
        self.token_losses, self.sequence_losses, self.mean_loss = token_losses, sequence_losses, mean_loss

    def single(self, i):
        """The batch restricted to row i (keeping the leading axis)."""
        return jax.tree_util.tree_map(lambda x: x[i : i + 1], self.batch)


@pytest.fixture(scope="session")
def mlp():
    keys = jax.random.split(jax.random.key(0), 4)
    params = {
        "w1": jax.random.normal(keys[0], (3, 4)),
        "b1": 0.1 * jax.random.normal(keys[1], (4,)),
        "w2": jax.random.normal(keys[2], (4, 2)),
    }
    data = jax.random.normal(keys[3], (11, 5))
    batch = {"x": data[:, :3], "y": data[:, 3:]}
    return Problem("mlp", params, batch, mlp_token_losses, mlp_sequence_losses, mlp_mean_loss)


@functools.cache
def tiny_transformer():
    """The tiny transformer's config, graph definition and initial parameters (flax nnx: the pipeline extra)."""
    from polca_jax.pipeline.models import TransformerConfig, init_params

    config = TransformerConfig(
        vocab_size=5, context_length=6, num_layers=1, d_model=8, num_heads=2, d_mlp=16, param_dtype="float64"
    )
    return (config, *init_params(config, seed=0))


def transformer_token_losses(params, batch):
    """[n, 5] next-token cross-entropy at every position of 6-token sequences."""
    from polca_jax.pipeline.models import apply, token_cross_entropy

    tokens = batch["tokens"]
    return token_cross_entropy(apply(tiny_transformer()[1], params, tokens[:, :-1]), tokens[:, 1:])


def transformer_sequence_losses(params, batch):
    return transformer_token_losses(params, batch).sum(axis=1)


def transformer_mean_loss(params, batch):
    return transformer_token_losses(params, batch).mean()


@pytest.fixture(scope="session")
def transformer():
    missing = missing_pipeline_modules()
    if missing:
        pytest.skip(f"the tiny transformer needs the pipeline extra ({', '.join(missing)} missing): "
                    "pip install 'polca_jax[pipeline]'")
    config, _, params = tiny_transformer()
    tokens = jax.random.randint(jax.random.key(1), (7, 6), 0, config.vocab_size)
    return Problem(
        "transformer",
        params,
        {"tokens": tokens},
        transformer_token_losses,
        transformer_sequence_losses,
        transformer_mean_loss,
    )


def sgd_checkpoints(problem, num, learning_rate=0.05):
    """``num`` parameter pytrees along plain gradient descent on the mean loss."""
    grad = jax.jit(jax.grad(problem.mean_loss))
    checkpoints = [problem.params]
    for _ in range(num - 1):
        g = grad(checkpoints[-1], problem.batch)
        checkpoints.append(jax.tree_util.tree_map(lambda p, d: p - learning_rate * d, checkpoints[-1], g))
    return checkpoints


def dense_hessian(loss, params):
    """[P, P] Hessian of ``loss(params)`` in the flat (ravel_pytree) order."""
    from polca_jax import tree

    flat = tree.ravel(params)
    return np.asarray(jax.jit(jax.hessian(lambda v: loss(tree.unravel(v, params))))(flat))


def _kill_cli_run_after(arguments: list[str], run_dir, stage: str = "basis") -> dict[str, str]:
    """Run ``polca ARGUMENTS --out run_dir --quiet`` in a subprocess, SIGKILL it as soon as ``stage`` has finished,
    and return the record (``stages/<name>.json`` text) of every stage finished by then."""
    command = [sys.executable, "-m", "polca_jax.pipeline.cli", *arguments, "--out", str(run_dir), "--quiet"]
    process = subprocess.Popen(command, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (run_dir / "stages" / f"{stage}.json").exists():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.time() < deadline, f"the run did not finish its {stage} stage in 5 minutes"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return {path.stem: path.read_text() for path in (run_dir / "stages").glob("*.json")}


@pytest.fixture(scope="session")
def kill_cli_run_after():
    """``kill_cli_run_after(arguments, run_dir, stage="basis") -> {stage: record}``: a CLI run killed mid-way."""
    return _kill_cli_run_after


def _check_resumed(run_dir, finished_before: dict[str, str]) -> None:
    """After a killed run was resumed: the stages finished before the kill were not redone, and every stage ran."""
    import json

    from polca_jax.pipeline import STAGES

    for stage, record in finished_before.items():
        assert (run_dir / "stages" / f"{stage}.json").read_text() == record, f"stage {stage} was redone"
    for stage in STAGES:
        assert json.loads((run_dir / "stages" / f"{stage}.json").read_text())["wall_seconds"] >= 0


@pytest.fixture(scope="session")
def check_resumed():
    """``check_resumed(run_dir, finished_before)``: the resumed run redid no finished stage and ran every stage."""
    return _check_resumed
