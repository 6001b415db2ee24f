"""Flat vectors and params-shaped pytrees: the helpers the kernels share, public for code built on them (the
pipeline, benchmarks, notebooks), e.g. :func:`num_params` to count a model's parameters.

A basis lives in the flat parameter space of ``jax.flatten_util.ravel_pytree``: row ``k`` of a ``[K, P]``
matrix is one direction. The fast kernels instead contract per-leaf, so the same rows are also presented as a
params-shaped pytree whose leaves have a leading ``K`` axis (``[K, *leaf.shape]``).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def num_params(params: PyTree) -> int:
    """Total number of scalars P in a params pytree."""
    return sum(math.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params))


def ravel(params: PyTree) -> jax.Array:
    """Flatten a params pytree into a ``[P]`` vector (``ravel_pytree`` order)."""
    leaves = jax.tree_util.tree_leaves(params)
    return jnp.concatenate([jnp.ravel(leaf) for leaf in leaves])


def unravel_rows(rows: jax.Array, like: PyTree) -> PyTree:
    """Split ``rows [K, P]`` into a pytree shaped like ``like`` with leaves ``[K, *leaf.shape]`` of ``like``'s dtypes.

    The cast lets a basis of another precision (a float64 basis on float32 parameters) serve as tangents of ``like``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(like)
    sizes = [math.prod(np.shape(leaf)) for leaf in leaves]
    offsets = np.cumsum([0] + sizes)
    pieces = [
        rows[:, start:stop].reshape((rows.shape[0], *np.shape(leaf))).astype(jnp.result_type(leaf))
        for start, stop, leaf in zip(offsets[:-1], offsets[1:], leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, pieces)


def unravel(vector: jax.Array, like: PyTree) -> PyTree:
    """Split a flat ``[P]`` vector into a pytree shaped like ``like`` (and of its dtypes)."""
    return jax.tree_util.tree_map(lambda leaf: leaf[0], unravel_rows(vector[None], like))


def structure_signature(params: PyTree) -> tuple:
    """Hashable description of a pytree's structure, leaf shapes and dtypes (for compatibility checks)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return (treedef, tuple((tuple(np.shape(x)), jnp.result_type(x)) for x in leaves))


def from_signature(signature: tuple) -> PyTree:
    """The ``jax.ShapeDtypeStruct`` pytree that :func:`structure_signature` describes."""
    treedef, leaves = signature
    return jax.tree_util.tree_unflatten(treedef, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in leaves])


def abstract(params: PyTree) -> PyTree:
    """``jax.ShapeDtypeStruct`` pytree mirroring ``params``."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), params)


def digest(tree: PyTree) -> str:
    """SHA-256 of a pytree: its structure and every leaf's dtype, shape and bytes (leaves copied to the host)."""
    hashed = hashlib.sha256()
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    hashed.update(str(treedef).encode())
    for leaf in leaves:
        array = np.ascontiguousarray(np.asarray(leaf))
        hashed.update(f"{array.dtype}{array.shape}".encode())
        hashed.update(array.tobytes())
    return hashed.hexdigest()
