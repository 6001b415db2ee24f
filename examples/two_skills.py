"""POLCA on your own model: a plain-JAX MLP that learns two skills, a slow and a fast wave, at different times.

    polca run examples/two_skills.py:make_task --preset tiny --out runs/two-skills
"""

import jax
import jax.numpy as jnp
import numpy as np

from polca_jax.pipeline import LabelSet, Task, task_factory

PRESETS = {
    "tiny": dict(num_samples=256, width=32, num_steps=300, learning_rate=1e-2, warmup_steps=10, polca_every=5,
                 basis_every=50, lanczos_iters=10, min_cluster_size=20, reference_num_samples=None, metrics_every=25),
    "cpu": dict(num_samples=2048, width=128, num_steps=2000, learning_rate=3e-3, polca_every=10, basis_every=100,
                min_cluster_size=60, reference_num_samples=None),
}


def predict(params, x):
    """A 2-layer tanh MLP: x [n, 2] (position, skill flag) -> [n]."""
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


def squared_errors(params, batch):
    """The per-sample loss POLCA decomposes: [n]."""
    return (predict(params, batch["x"]) - batch["y"]) ** 2


def make_data(rng: np.random.Generator, n: int) -> dict:
    """n samples: half ask for a slow wave sin(2x), half (flag 1) for a fast one, sin(6x)."""
    position, fast = rng.uniform(-np.pi, np.pi, n), rng.permutation(np.arange(n) % 2)
    target = np.where(fast == 1, np.sin(6 * position), np.sin(2 * position))
    return {"x": np.stack([position, fast], axis=1).astype(np.float32), "y": target.astype(np.float32)}


@task_factory(presets=PRESETS, default_preset="tiny")
def make_task(num_samples: int = 1024, width: int = 64, batch_size: int = 64, seed: int = 0) -> Task:
    rng = np.random.default_rng(seed)
    train, evaluation, hessian = (make_data(rng, size) for size in (8 * num_samples, num_samples, 256))
    keys = jax.random.split(jax.random.key(seed), 2)
    params = {"w1": jax.random.normal(keys[0], (2, width)), "b1": jnp.zeros(width),
              "w2": jax.random.normal(keys[1], (width,)) / np.sqrt(width), "b2": jnp.zeros(())}

    def train_batches(step: int) -> dict:  # a pure function of the step, so a resumed run sees the same data
        rows = np.random.default_rng([seed, step]).integers(0, len(train["y"]), batch_size)
        return {name: values[rows] for name, values in train.items()}

    skill = np.where(evaluation["x"][:, 1] == 1, "fast wave", "slow wave")
    return Task(init_params=params, per_sample_loss=squared_errors, eval_batch=evaluation, hessian_batch=hessian,
                train_batches=train_batches, labels={"skill": LabelSet(skill)},
                sample_texts=[f"{s} at x={x:+.2f}" for s, x in zip(skill, evaluation["x"][:, 0])],
                description="A 2-layer MLP fitting a slow and a fast sine wave, told apart by an input flag.")
