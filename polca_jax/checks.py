"""Input checks shared by the kernels: each raises ``ValueError`` naming the problem and what to do about it.

Public so that code built on the kernels refuses the inputs they would refuse, with the same words, before it
calls them: the pipeline checks a user's ``Task`` (its batches, its loss' dtype, its checkpoints) with these.

The checks run once per public call, on the host. Those that only look at shapes and dtypes also work on tracers
(inside a user's ``jax.jit``); those that look at values (:func:`check_finite_params`, :func:`check_finite_tree`)
skip traced arrays, so the kernels stay usable under ``jit``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from polca_jax import tree
from polca_jax.errors import PolcaError

PyTree = Any


def check_same_structure(reference: PyTree, params: PyTree, what: str) -> None:
    """Raise unless ``params`` has the tree structure, leaf shapes and dtypes of ``reference``."""
    expected, got = tree.structure_signature(reference), tree.structure_signature(params)
    if expected[0] != got[0]:
        raise PolcaError(f"{what} has a different parameter tree structure than the first checkpoint")
    for (shape_a, dtype_a), (shape_b, dtype_b), path in zip(expected[1], got[1], leaf_paths(reference)):
        if shape_a != shape_b or dtype_a != dtype_b:
            raise PolcaError(
                f"{what}: parameter {path} has shape {shape_b} {dtype_b}, expected {shape_a} {dtype_a} "
                "(as in the first checkpoint)"
            )


def check_params(params: PyTree, what: str) -> None:
    """Raise unless ``params`` has at least one leaf and all its leaves share one floating-point dtype.

    Only shapes and dtypes are read, so this works on tracers.
    """
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise PolcaError(f"{what}: the parameters have no arrays; pass a pytree of floating-point arrays")
    dtypes = [jnp.result_type(leaf) for leaf in leaves]
    for path, dtype in zip(leaf_paths(params), dtypes):
        if not jnp.issubdtype(dtype, jnp.floating):
            raise PolcaError(
                f"{what}: parameters must be floating point; leaf {path} has dtype {dtype} "
                "(cast it, e.g. with .astype(jnp.float32), or keep non-trainable values out of params)"
            )
    if len(set(dtypes)) > 1:
        found = {}
        for path, dtype in zip(leaf_paths(params), dtypes):
            found.setdefault(str(dtype), path)
        listing = ", ".join(f"{dtype} (e.g. leaf {path})" for dtype, path in found.items())
        raise PolcaError(
            f"{what}: the parameters mix floating-point dtypes: {listing}; cast every leaf to one dtype, e.g. "
            "jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)"
        )


def check_finite_params(params: PyTree, what: str) -> None:
    """Raise if any parameter is NaN or inf, naming the first such leaf (skipped for traced parameters)."""
    bad = _nonfinite_counts(params)
    if bad is None:
        return
    for path, count in zip(leaf_paths(params), bad):
        if count:
            raise PolcaError(
                f"{what}: parameter {path} contains NaN or inf ({count} entries); training diverged or the "
                "checkpoint is corrupt: use an earlier checkpoint"
            )


def check_finite_tree(values: PyTree, what: str, fix: str = "every entry must be finite") -> None:
    """Raise if any array of ``values`` contains NaN or inf, saying how many entries (skipped for traced values)."""
    bad = count_nonfinite(values)
    if bad:
        raise PolcaError(f"{what} contains NaN or inf ({bad} entries); {fix}")


def count_nonfinite(values: PyTree) -> int | None:
    """How many entries of all arrays of ``values`` are NaN or inf (one device call); None if any is traced."""
    bad = _nonfinite_counts(values)
    return None if bad is None else int(bad.sum())


def check_finite(values: jax.Array | np.ndarray, what: str, fix: str = "") -> None:
    """Raise if an array (e.g. per-sample losses) contains NaN or inf, saying how many entries (and ``fix``)."""
    values = np.asarray(values)
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise PolcaError(f"{what} contains {bad} NaN or inf value(s) of {values.size}" + (f"; {fix}" if fix else ""))


def batch_size(batch: PyTree, what: str = "the kernel") -> int:
    """The shared leading (sample) axis of every leaf of ``batch``; raise if empty or inconsistent.

    Only shapes are read, so this works on tracers (shapes are static under ``jit``).
    """
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise PolcaError(f"{what}: the batch has no arrays; pass a pytree of arrays with a leading sample axis")
    paths = leaf_paths(batch)
    for path, leaf in zip(paths, leaves):
        if np.ndim(leaf) == 0:
            raise PolcaError(f"{what}: batch leaf {path} is a scalar; every batch array needs a leading sample axis")
    sizes = {path: np.shape(leaf)[0] for path, leaf in zip(paths, leaves)}
    if len(set(sizes.values())) != 1:
        listing = ", ".join(f"{path}: {size}" for path, size in sizes.items())
        raise PolcaError(f"{what}: every batch array needs the same leading sample axis, got {listing}")
    size = next(iter(sizes.values()))
    if size == 0:
        raise PolcaError(f"{what}: the batch is empty (0 samples); pass at least one sample")
    return size


def check_loss_dtype(dtype, what: str) -> None:
    """Raise :class:`polca_jax.PolcaError` unless a loss of ``dtype`` can be differentiated: real floating point."""
    if not jnp.issubdtype(dtype, jnp.floating):
        kind = "complex" if jnp.issubdtype(dtype, jnp.complexfloating) else "not floating point"
        raise PolcaError(f"{what} returns losses of dtype {dtype} ({kind}); POLCA differentiates the loss, so it must "
                         "return real floating-point values (e.g. float32): cast it, or return the real loss")


def check_checkpoints(checkpoints: Any, what: str) -> None:
    """Raise unless ``checkpoints`` supports ``len()`` and indexing (a list, tuple, :class:`OrbaxCheckpoints`...)."""
    if isinstance(checkpoints, Mapping):
        raise PolcaError(
            f"{what}: checkpoints must be a sequence of params pytrees, got a {type(checkpoints).__name__} "
            "(one params pytree?); pass [params_0, params_1, ...]"
        )
    kind = type(checkpoints)
    if isinstance(checkpoints, str | bytes | os.PathLike):
        raise PolcaError(
            f"{what}: checkpoints must be a sequence (list, tuple or OrbaxCheckpoints), got the path {checkpoints!r}; "
            "open a checkpoint directory with OrbaxCheckpoints(path)"
        )
    if not (hasattr(kind, "__len__") and hasattr(kind, "__getitem__")):
        raise PolcaError(
            f"{what}: checkpoints must be a sequence (list, tuple or OrbaxCheckpoints), got {kind.__name__}; "
            "wrap it in list(...)"
        )


def checkpoint_steps(
    checkpoints: Sequence[PyTree], steps: Sequence[int] | None, what: str, *, increasing: bool
) -> list[int]:
    """The training step of each checkpoint: ``steps``, else ``checkpoints.steps``, else ``0..T-1``.

    Raise unless there is one step per checkpoint and, with ``increasing``, the steps strictly increase.
    """
    check_checkpoints(checkpoints, what)
    if steps is None:
        steps = getattr(checkpoints, "steps", None)
    steps = list(range(len(checkpoints))) if steps is None else [int(s) for s in steps]
    if len(steps) != len(checkpoints):
        raise PolcaError(f"{what}: got {len(steps)} steps for {len(checkpoints)} checkpoints; pass one per checkpoint")
    if increasing:
        check_increasing(steps, what)
    return steps


def check_increasing(steps: Sequence[int], what: str) -> None:
    """Raise unless ``steps`` strictly increase, naming the first pair that does not."""
    for i in range(1, len(steps)):
        if steps[i] <= steps[i - 1]:
            raise PolcaError(
                f"{what}: steps must be strictly increasing (training order), but step {steps[i]} at position {i} "
                f"follows step {steps[i - 1]}; sort them and drop duplicates"
            )


def is_traced(values: PyTree) -> bool:
    """Whether any leaf of ``values`` is a tracer (inside ``jit``, ``vmap``, ``grad``...)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(values))


def leaf_paths(params: PyTree) -> list[str]:
    """Each leaf's key path as text, e.g. ``['w1']``, in ``tree_leaves`` order."""
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _nonfinite_counts(values: PyTree) -> np.ndarray | None:
    """``[leaves]`` count of NaN/inf entries per leaf, from one device call and one transfer; None if traced."""
    leaves = jax.tree_util.tree_leaves(values)
    if is_traced(leaves):
        return None
    if not leaves:
        return np.zeros(0, int)
    return np.asarray(_count_nonfinite(leaves))


@jax.jit
def _count_nonfinite(leaves: list) -> jax.Array:
    return jnp.stack([jnp.sum(~jnp.isfinite(leaf), dtype=jnp.int32) for leaf in leaves])
