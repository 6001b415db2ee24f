"""Digests of what a result depends on besides its settings: a loss function's code and a checkpoint's parameters.

A loss' digest is the SHA-256 of its jaxpr traced on abstract arguments (shapes and dtypes only, so nothing is
computed) with memory addresses removed, and of the constants it closes over: it changes when the loss' code or
its captured arrays change, and is the same in every process that traces the same code. A checkpoint's digest is
:func:`polca_jax._tree.digest` of its restored parameters.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Callable

import jax

from polca_jax import _tree as tree

_ADDRESS = re.compile(r"\s*at 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{6,}")


def loss_digest(loss_fn: Callable, params: Any, batch: Any) -> str:
    """SHA-256 of ``loss_fn``'s jaxpr on the shapes and dtypes of ``(params, batch)`` and of the constants it
    captures; the text has no object ids or addresses, so two processes tracing the same code agree."""
    closed = jax.make_jaxpr(loss_fn)(tree.abstract(params), tree.abstract(batch))
    hashed = hashlib.sha256(_ADDRESS.sub("", str(closed.jaxpr)).encode())
    hashed.update(tree.digest(list(closed.consts)).encode())
    return hashed.hexdigest()


def params_digest(params: Any) -> str | None:
    """:func:`polca_jax._tree.digest` of a checkpoint's parameters; None when they are split across processes (a
    multi-process run), where a digest would need every process' shards."""
    for leaf in jax.tree_util.tree_leaves(params):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return None
    return tree.digest(params)
