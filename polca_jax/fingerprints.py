"""Digests of what a result depends on besides its settings: a loss function's code and a checkpoint's parameters.

A loss' digest is the SHA-256 of its jaxpr traced on abstract arguments (shapes and dtypes only, so nothing is
computed) with memory addresses removed, and of the constants it closes over: it changes when the loss' code or
its captured arrays change, and is the same in every process that traces the same code. A checkpoint's digest
(:func:`params_digest`) is one that the processes of a multi-process run compute together from their shards.

The kernels record them to refuse a resume with other inputs; the pipeline records them in a run directory
(public for that, and for code of one's own that does the same).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from typing import Any, Callable

import jax
import numpy as np

from polca_jax import tree

_ADDRESS = re.compile(r"\s*at 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{6,}")


def loss_digest(loss_fn: Callable, params: Any, batch: Any) -> str:
    """SHA-256 of ``loss_fn``'s jaxpr on the shapes and dtypes of ``(params, batch)`` and of the constants it
    captures; the text has no object ids or addresses, so two processes tracing the same code agree."""
    arguments = (tree.abstract(params), tree.abstract(batch))
    wide = any(np.dtype(leaf.dtype).itemsize > 4 for leaf in jax.tree_util.tree_leaves(arguments))
    with contextlib.nullcontext() if wide else _without_x64():
        # 32-bit arguments trace to the same program whether or not jax_enable_x64 is set (its indices and literals
        # would otherwise be 64-bit); 64-bit ones need it set in every process that builds them
        closed = jax.make_jaxpr(loss_fn)(*arguments)
    hashed = hashlib.sha256(_ADDRESS.sub("", str(closed.jaxpr)).encode())
    consts = [np.asarray(const) for const in closed.consts]
    hashed.update(tree.digest([const.astype(np.int64) if const.dtype.kind in "biu" else const
                               for const in consts]).encode())
    return hashed.hexdigest()


def _without_x64():
    """A context in which ``jax_enable_x64`` is off."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(False)
    from jax.experimental import disable_x64  # older jax

    return disable_x64()


PARAMS_DIGEST = "sum64:"  # the prefix of a parameters digest in the current format
_ROWS_PER_BLOCK = 1 << 20  # elements summed at a time, bounding the temporaries of a large leaf


def params_digest(params: Any) -> str:
    """Digest of a checkpoint's parameters that every process of a multi-process run computes alike from the shards
    it holds: SHA-256 of the tree's structure and, per leaf, its dtype, shape and the position-weighted sum of its
    bits, ``sum_i w(i) * bits(x_i) mod 2**64`` (``w(i)`` an odd hash of the flat index ``i``). Each process sums
    the shards it holds a first replica of; the processes' partial sums (8 bytes a leaf) add up to the whole's."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    split = [isinstance(leaf, jax.Array) and not leaf.is_fully_addressable for leaf in leaves]
    sums = [_bits_sum(leaf) for leaf in leaves]
    if any(split):
        sums = _sum_over_processes(sums)
    hashed = hashlib.sha256(str(treedef).encode())
    for leaf, total in zip(leaves, sums):
        hashed.update(f"{np.dtype(leaf.dtype)}{tuple(np.shape(leaf))}{total:016x}".encode())
    return PARAMS_DIGEST + hashed.hexdigest()


def digests_differ(saved: str | None, current: str) -> bool:
    """Whether a recorded parameters digest names other parameters than ``current``; a record made in an earlier
    format (or none) cannot tell, and is not held against them."""
    return isinstance(saved, str) and saved.startswith(PARAMS_DIGEST) and saved != current


def _bits_sum(leaf) -> int:
    """``sum_i w(i) * bits(x_i) mod 2**64`` over the elements of ``leaf`` that this process holds a first replica of
    (all of them for an array on this host alone)."""
    shape = tuple(np.shape(leaf))
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        blocks = [(np.asarray(shard.data), shard.index) for shard in leaf.addressable_shards if shard.replica_id == 0]
    else:
        blocks = [(np.asarray(leaf), (slice(None),) * len(shape))]
    if not shape:  # a scalar: the one element of a [1] array (flat index 0 either way)
        blocks, shape = [(block.reshape(1), (slice(None),)) for block, _ in blocks], (1,)
    total = 0
    for block, index in blocks:  # a leading-axis slab at a time
        starts = [0 if part.start is None else part.start for part in index]
        rows = max(1, _ROWS_PER_BLOCK // max(1, int(np.prod(block.shape[1:], dtype=np.int64))))
        for first in range(0, block.shape[0], rows):
            total += _weighted_sum(block[first:first + rows], [starts[0] + first, *starts[1:]], shape)
    return total % (1 << 64)


def _weighted_sum(block: np.ndarray, starts: list[int], shape: tuple[int, ...]) -> int:
    """``sum w(i) * bits(x_i) mod 2**64`` over ``block``, the part of an array of ``shape`` starting at ``starts``."""
    block = np.ascontiguousarray(block)
    word = min(block.dtype.itemsize, 8)
    words = block.dtype.itemsize // word
    bits = block.reshape(-1).view(np.dtype(f"u{word}")).astype(np.uint64).reshape(block.shape + (words,))
    strides = np.cumprod((1,) + shape[:0:-1], dtype=np.int64)[::-1]  # row-major element strides of the whole
    flat = np.zeros((1,) * block.ndim, np.uint64)
    for axis, (start, size) in enumerate(zip(starts, block.shape)):
        positions = (np.arange(size, dtype=np.uint64) + np.uint64(start)) * np.uint64(strides[axis])
        flat = flat + positions.reshape([size if a == axis else 1 for a in range(block.ndim)])
    index = flat[..., None] * np.uint64(words) + np.arange(words, dtype=np.uint64)
    return int(np.sum(_odd_hash(index) * bits, dtype=np.uint64))


def _odd_hash(index: np.ndarray) -> np.ndarray:
    """splitmix64 of each index, made odd (so no change of an element's bits leaves its term unchanged)."""
    z = index + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))) | np.uint64(1)


def _sum_over_processes(sums: list[int]) -> list[int]:
    """Each leaf's partial sums added over the processes (mod 2**64), exchanged as 32-bit halves."""
    from jax.experimental import multihost_utils

    halves = np.array([[total & 0xFFFFFFFF, total >> 32] for total in sums], np.uint32).reshape(-1, 2)
    gathered = np.asarray(multihost_utils.process_allgather(halves)).astype(np.uint64).reshape(-1, len(sums), 2)
    return [int(sum(int(lo) + (int(hi) << 32) for lo, hi in gathered[:, leaf])) % (1 << 64)
            for leaf in range(len(sums))]
