import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.arithmetic import (
    OUTPUT_SIZE,
    SEQUENCE_LENGTH,
    VOCAB_SIZE,
    answer_accuracy,
    make_loss_fns,
    make_problems,
    training_batches,
)
from polca_jax.pipeline.models import TransformerConfig, init_params
from polca_jax.pipeline._training import AdamScales, adamw_paper, checkpoint_steps, restore_params, train

NUM_STEPS = 30
SAVE_STEPS = (0, 10, 20, 30)
CONFIG = TransformerConfig(vocab_size=VOCAB_SIZE, context_length=SEQUENCE_LENGTH, num_layers=1, d_model=16,
                           num_heads=2, d_mlp=32, output_size=OUTPUT_SIZE)


@pytest.fixture(scope="module")
def setup():
    graphdef, params = init_params(CONFIG, seed=0)
    _, loss_fn = make_loss_fns(graphdef)
    batches = training_batches(make_problems(512, seed=0), batch_size=16)
    optimizer = adamw_paper(learning_rate=1e-2, warmup_steps=2)
    return graphdef, params, loss_fn, batches, optimizer


@pytest.fixture(scope="module")
def full_run(setup, tmp_path_factory):
    graphdef, params, loss_fn, batches, optimizer = setup
    directory = tmp_path_factory.mktemp("full")
    metrics_path = directory / "metrics.jsonl"
    final = train(loss_fn, params, optimizer, batches, NUM_STEPS, directory / "checkpoints", SAVE_STEPS,
                  metrics_fn=lambda p: {"accuracy": answer_accuracy(graphdef, p, batches(0)["tokens"])},
                  metrics_every=1, metrics_path=metrics_path, progress=False)
    return final, directory / "checkpoints", metrics_path


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_loss_decreases_and_metrics_are_logged(full_run):
    _, _, metrics_path = full_run
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(NUM_STEPS))
    assert len(records[0]["accuracy"]) == 4
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2


def test_saves_exactly_the_requested_steps(setup, full_run):
    final, directory, _ = full_run
    assert checkpoint_steps(directory) == list(SAVE_STEPS)
    assert_trees_equal(restore_params(directory, NUM_STEPS, template=setup[1]), final)
    assert_trees_equal(restore_params(directory, NUM_STEPS), final)  # string keys: same tree without a template
    assert_trees_equal(restore_params(directory, 0), setup[1])


def test_interrupted_run_resumes_bit_identically(setup, full_run, tmp_path):
    _, params, loss_fn, batches, optimizer = setup
    directory, metrics_path = tmp_path / "checkpoints", tmp_path / "metrics.jsonl"
    # Stop between checkpoints: the resumed run restores step 10 and replays steps 10..14.
    train(loss_fn, params, optimizer, batches, 15, directory, SAVE_STEPS, metrics_every=1,
          metrics_path=metrics_path, progress=False)
    assert checkpoint_steps(directory) == [0, 10]
    resumed = train(loss_fn, params, optimizer, batches, NUM_STEPS, directory, SAVE_STEPS, metrics_every=1,
                    metrics_path=metrics_path, progress=False)
    assert_trees_equal(resumed, full_run[0])
    assert checkpoint_steps(directory) == list(SAVE_STEPS)
    steps = [json.loads(line)["step"] for line in metrics_path.read_text().splitlines()]
    assert steps == list(range(NUM_STEPS))
    with pytest.raises(ValueError, match="beyond num_steps"):
        train(loss_fn, params, optimizer, batches, 20, directory, SAVE_STEPS, progress=False)


def test_missing_checkpoints_are_value_errors(full_run, tmp_path):
    _, directory, _ = full_run
    with pytest.raises(ValueError, match="does not exist"):
        checkpoint_steps(tmp_path / "missing")
    with pytest.raises(ValueError, match="does not exist"):
        restore_params(tmp_path / "missing", 0)
    with pytest.raises(ValueError, match="have no checkpoint"):
        restore_params(directory, 7)


def test_adamw_paper_warmup_starts_at_zero():
    optimizer = adamw_paper(learning_rate=1.0, warmup_steps=4)
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.ones(3)}
    state = optimizer.init(params)
    first, state = optimizer.update(grads, state, params)
    second, _ = optimizer.update(grads, state, params)
    np.testing.assert_array_equal(first["w"], 0.0)
    np.testing.assert_allclose(second["w"], -0.25 * (1.0 + 0.1), rtol=1e-5)  # lr 1/4 times (adam step 1 + wd * 1)
    with pytest.raises(ValueError, match="warmup_steps"):
        adamw_paper(warmup_steps=-1)


def test_adam_scales_are_adams_preconditioner_from_the_saved_state(setup, full_run):
    """s = (√v̂ + ε)^(-1/2), v̂ = ν / (1 − b2^t), from the optimiser's own state replayed by hand to each saved step;
    before the first update (ν = 0) s = ε^(-1/2)."""
    _, params, loss_fn, batches, optimizer = setup
    scales = AdamScales(full_run[1], [0, 10, 30], params, optimizer, b2=0.95)
    assert len(scales) == 3
    np.testing.assert_allclose(jax.tree.leaves(scales[0])[0], 1e4, rtol=1e-6)
    state, current = optimizer.init(params), params
    grad = jax.jit(jax.grad(loss_fn))
    for step in range(NUM_STEPS + 1):
        if step in (10, 30):
            expected = jax.tree.map(lambda v: np.sqrt(v / (1 - 0.95**step)), state[0].nu)  # √v̂
            largest = max(float(np.max(leaf)) for leaf in jax.tree.leaves(expected))
            for got, want in zip(jax.tree.leaves(scales[[0, 10, 30].index(step)]), jax.tree.leaves(expected)):
                # √v̂ = s^-2 − ε; the replay's rounding differs from train()'s jitted step (leaves whose gradient is
                # float noise differ most), so compared to 1e-3 of the largest √v̂
                np.testing.assert_allclose(np.asarray(got, np.float64) ** -2 - 1e-8, want, rtol=0.02,
                                           atol=1e-3 * largest)
        if step < NUM_STEPS:
            updates, state = optimizer.update(grad(current, batches(step)), state, current)
            current = optax.apply_updates(current, updates)


TRAINING_SCRIPT = """
import tempfile
import jax, numpy as np, optax
jax.config.update("jax_enable_x64", True)
assert jax.device_count() == 8, jax.devices()
import polca_jax as pj
from polca_jax.pipeline import train

from wide_mlp import mean_loss, problem

checkpoints, _, hessian_batch, _ = problem()
batches = lambda step: jax.tree.map(lambda x: np.roll(np.asarray(x), step, axis=0), hessian_batch)  # 12 rows

def trained(mesh, directory, num_steps=20):
    return train(mean_loss, checkpoints[0], optax.adamw(1e-2), batches, num_steps, directory, [0, 10, 20],
                 progress=False, mesh=mesh)

with tempfile.TemporaryDirectory() as directory:
    reference = trained(None, f"{directory}/one")
    for data, model in ((2, 4), (1, 8), (4, 2)):
        mesh = pj.device_mesh(model=model, data=data)
        out = trained(mesh, f"{directory}/{data}x{model}")
        for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(reference)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-14)
        assert tuple(out["w1"].sharding.spec) == tuple(pj.param_spec((3, 16), model)) == (None, "model")
        share = sum(leaf.nbytes // (model if tuple(pj.param_spec(leaf.shape, model)) else 1)
                    for leaf in jax.tree.leaves(reference))  # one device's share: b2 (2 floats) stays whole
        assert pj.per_device_bytes(out) == share < pj.per_device_bytes(reference), (pj.per_device_bytes(out), share)
        trained(mesh, f"{directory}/{data}x{model}-resumed", num_steps=10)  # stopped at step 10, then resumed
        resumed = trained(mesh, f"{directory}/{data}x{model}-resumed")
        assert tuple(resumed["w1"].sharding.spec) == (None, "model")
        for got, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(out)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        print("TRAIN-OK", data, model)
"""


@pytest.mark.slow
def test_training_on_a_mesh_keeps_the_state_split_and_gives_the_one_device_result():
    """FSDP training (``train(..., mesh=...)``): float64 updates equal one device's on meshes 2x4, 1x8 and 4x2, the
    parameters stay split over the model axis (per-device bytes ~1/model), and a run stopped at a checkpoint and
    resumed on the mesh ends bit-identical to an uninterrupted one."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    completed = subprocess.run([sys.executable, "-c", textwrap.dedent(TRAINING_SCRIPT)], cwd=Path(__file__).parent,
                               env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    for mesh in ("2 4", "1 8", "4 2"):
        assert f"TRAIN-OK {mesh}" in completed.stdout
