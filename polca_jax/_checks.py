"""Input checks shared by the kernels: each raises ``ValueError`` naming the problem."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from polca_jax import _tree as tree

PyTree = Any


def check_same_structure(reference: PyTree, params: PyTree, what: str) -> None:
    """Raise unless ``params`` has the tree structure, leaf shapes and dtypes of ``reference``."""
    expected, got = tree.structure_signature(reference), tree.structure_signature(params)
    if expected[0] != got[0]:
        raise ValueError(f"{what} has a different parameter tree structure than the first checkpoint")
    for (shape_a, dtype_a), (shape_b, dtype_b), path in zip(expected[1], got[1], _leaf_paths(reference)):
        if shape_a != shape_b or dtype_a != dtype_b:
            raise ValueError(
                f"{what}: parameter {path} has shape {shape_b} {dtype_b}, expected {shape_a} {dtype_a} "
                "(as in the first checkpoint)"
            )


def check_finite_params(params: PyTree, what: str) -> None:
    """Raise if any parameter is NaN or inf."""
    finite = jax.tree_util.tree_map(lambda x: jnp.all(jnp.isfinite(x)), params)
    for path, ok in zip(_leaf_paths(params), jax.tree_util.tree_leaves(finite)):
        if not bool(ok):
            raise ValueError(f"{what}: parameter {path} contains NaN or inf")


def check_finite(values: jax.Array | np.ndarray, what: str) -> None:
    """Raise if an array (e.g. per-sample losses) contains NaN or inf, saying how many entries."""
    bad = int(np.size(values) - np.count_nonzero(np.isfinite(np.asarray(values))))
    if bad:
        raise ValueError(f"{what} contains {bad} NaN or inf value(s)")


def batch_size(batch: PyTree) -> int:
    """The shared leading (sample) axis of every leaf of ``batch``; raise if empty or inconsistent."""
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError("the batch has no arrays")
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"every batch array needs the same leading sample axis, got sizes {sorted(map(str, sizes))}")
    (size,) = sizes
    if size == 0:
        raise ValueError("the batch is empty")
    return size


def _leaf_paths(params: PyTree) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
