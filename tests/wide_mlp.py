"""A 3 → 16 → 2 tanh MLP whose large dimensions 2, 4 and 8 devices divide, with a few gradient-descent checkpoints:
the model of the multi-device and multi-process tests (imported by their subprocess scripts; float64 by the caller)."""

import jax
import jax.numpy as jnp
import numpy as np


def token_losses(params, batch):
    """[n, 2] squared errors: two token samples per row."""
    hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return (hidden @ params["w2"] + params["b2"] - batch["y"]) ** 2


def mean_loss(params, batch):
    return token_losses(params, batch).mean()


def problem(num_checkpoints: int = 4):
    """``(checkpoints, batch [13 rows], hessian_batch [12 rows], mask [13, 2])``; 98 parameters (96 in leaves that
    2, 4 or 8 devices split, b2's 2 replicated)."""
    keys = jax.random.split(jax.random.key(0), 4)
    params = {"w1": jax.random.normal(keys[0], (3, 16)), "b1": 0.1 * jax.random.normal(keys[1], (16,)),
              "w2": jax.random.normal(keys[2], (16, 2)) / 4, "b2": jnp.zeros(2)}
    data = jax.random.normal(keys[3], (13, 5))
    batch = {"x": data[:, :3], "y": data[:, 3:]}
    grad = jax.jit(jax.grad(mean_loss))
    checkpoints = [params]
    for _ in range(num_checkpoints - 1):
        checkpoints.append(jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, checkpoints[-1],
                                                  grad(checkpoints[-1], batch)))
    mask = np.ones((13, 2), bool)
    mask[2, 1] = mask[7, 0] = False
    hessian_batch = jax.tree_util.tree_map(lambda x: x[:12], batch)  # the aggregate loss' batch: divisible by "data"
    return checkpoints, batch, hessian_batch, mask
