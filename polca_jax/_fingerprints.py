"""Digests of what a result depends on besides its settings: a loss function's code and a checkpoint's parameters.

A loss' digest is the SHA-256 of its jaxpr traced on abstract arguments (shapes and dtypes only, so nothing is
computed) with memory addresses removed, and of the constants it closes over: it changes when the loss' code or
its captured arrays change, and is the same in every process that traces the same code. A checkpoint's digest is
:func:`polca_jax._tree.digest` of its restored parameters.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from typing import Any, Callable

import jax
import numpy as np

from polca_jax import _tree as tree

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


def params_digest(params: Any) -> str | None:
    """:func:`polca_jax._tree.digest` of a checkpoint's parameters; None when they are split across processes (a
    multi-process run), where a digest would need every process' shards."""
    for leaf in jax.tree_util.tree_leaves(params):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return None
    return tree.digest(params)
