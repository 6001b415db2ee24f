"""A synthetic run directory written through the real classes: the train, basis, decompose and causal stages done,
a POLCA result and causal check with planted answers, arithmetic-like label sets. Tests of the host stages use it."""

import json

import numpy as np

import polca_jax as pj
from polca_jax.pipeline import LabelSet, Qualifier, RunConfig, RunDirectory, Task

STEPS = np.array([0, 10, 20, 30, 40, 50])
NUM_PROBLEMS, NUM_DIRECTIONS = 10, 3
THRESHOLD = 25


def synthetic_labels():
    """place int[40] (4 answer tokens per problem) and carry bool[40]: carries into the 100s and 10s of the even
    problems only."""
    place = np.tile(np.arange(4), NUM_PROBLEMS)
    carry = np.isin(place, (1, 2)) & (np.repeat(np.arange(NUM_PROBLEMS), 4) % 2 == 0)
    return place, carry


def synthetic_result(place, carry, rng, rising=False):
    """POLCAResult (T=6, N=40, K=3) with no second order and unit steps, so projected loss = cumsum of projections.

    Direction 0: carry tokens drop late (after step 30), the others early; direction 1: 1000s tokens drop, the others
    fall less; direction 2: a rising random walk (the oscillation filter drops it). ``rising``: every direction's loss
    rises instead. Exact loss: falls faster for higher digit places.
    """
    num_samples = place.size
    late = np.array([0, 0, 0, -0.1, -1.0, -1.05])
    early = np.array([0, -1.0, -1.05, -1.1, -1.1, -1.1])
    projected = np.zeros((STEPS.size, num_samples, NUM_DIRECTIONS))
    projected[:, :, 0] = np.where(carry[None, :], late[:, None], early[:, None])
    projected[:, :, 1] = np.where(place[None, :] == 0, -1.0, -0.1) * (STEPS[:, None] / STEPS[-1])
    projected[1:] += 0.02 * rng.standard_normal((STEPS.size - 1, num_samples, NUM_DIRECTIONS))
    projected[:, :, 2] = np.cumsum(rng.standard_normal((STEPS.size, num_samples)), axis=0) + STEPS[:, None] / 5
    if rising:
        projected = np.abs(projected) + STEPS[:, None, None] / 10
    projections = np.concatenate([np.diff(projected, axis=0), rng.standard_normal((1, num_samples, NUM_DIRECTIONS))])
    loss = 2.3 * np.exp(-STEPS[:, None] / (10.0 * (place[None, :] + 1))) + 0.01 * rng.random((STEPS.size, num_samples))
    return pj.POLCAResult(
        STEPS, loss, projections, np.ones((STEPS.size - 1, NUM_DIRECTIONS)),
        np.zeros((STEPS.size - 1, num_samples, NUM_DIRECTIONS)), np.zeros(STEPS.size - 1), {"second_order": "none"},
    )


def labelled_task(place, carry, carry_stratified_by=None, coin=False) -> Task:
    """A task carrying only what the host stages read: its labels and texts (its model is never run here).
    ``coin``: a third label set, ``coin``, of fair coin flips unrelated to anything the result plants."""
    extra = {"coin": LabelSet(np.random.default_rng(7).random(place.size) < 0.5, positive=True)} if coin else {}
    return Task(
        init_params={"w": np.zeros(5, np.float32)},
        per_sample_loss=lambda params, batch: batch["x"] * params["w"].sum(),
        eval_batch={"x": np.zeros(place.size, np.float32)}, hessian_batch={"x": np.zeros(4, np.float32)},
        labels={"carry": LabelSet(carry, positive=True, qualifier=Qualifier("place", (1, 2), 0.85),
                                  stratify_by=carry_stratified_by),
                "place": LabelSet(place, class_names={0: "1000s", 1: "100s", 2: "10s", 3: "1s"}), **extra},
        sample_texts=[f"problem {i // 4}, place {p}" for i, p in enumerate(place)],
        description="synthetic answer tokens",
    )


def synthetic_run(path, *, rising=False, carry_stratified_by=None, coin=False, **settings) -> RunDirectory:
    """A run directory whose stages up to the causal check are done, holding a synthetic POLCA result (``coin``:
    with the noise label set of :func:`labelled_task`)."""
    place, carry = synthetic_labels()
    settings = dict(num_steps=50, polca_every=10, basis_every=10, window_steps=10, threshold_step=THRESHOLD,
                    second_order="none", min_cluster_size=5, reference_num_samples=None, ablations=False) | settings
    config = RunConfig(task="arithmetic", preset=None, task_options={}, **settings)
    run = RunDirectory(path, config)
    run.bind_task(labelled_task(place, carry, carry_stratified_by, coin))
    synthetic_result(place, carry, np.random.default_rng(0), rising=rising).save(run / "polca" / "hessian")
    basis = pj.basis_from_matrix(np.eye(5)[:NUM_DIRECTIONS], eigenvalues=np.array([3.0, 2.0, 1.0]),
                                 steps=np.array([10, 20, 30]), method="hessian")
    basis.save(run / "basis" / "hessian")
    log = [{"step": int(step), "loss": 2.0 / (1 + step), "eval_loss": 2.1 / (1 + step), "accuracy_10s": step / 50}
           for step in STEPS]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(row) for row in log) + "\n{torn")
    # the causal check: removing direction 0 hurts the carry tokens, direction 1 the 1000s tokens, direction 2 nobody
    noise = 0.01 * np.random.default_rng(1).standard_normal((NUM_DIRECTIONS, place.size))
    increase = np.stack([carry * 1.0, (place == 0) * 0.5, np.zeros(place.size)]) + noise
    (run / "causal").mkdir()
    np.save(run / "causal" / "hessian.npy", increase)
    for seconds, stage in enumerate(("train", "basis", "decompose", "causal"), start=1):
        run.mark_done(stage, {"wall_seconds": 1.5 * seconds})
    return run
