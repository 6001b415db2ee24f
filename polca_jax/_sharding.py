"""Placing work on a device mesh: samples sharded over a ``"data"`` axis, parameters and bases replicated."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any
DATA_AXIS = "data"


def data_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all) with the axis ``"data"``."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def num_data_shards(mesh: Mesh | None) -> int:
    """How many ways samples are split (1 without a mesh)."""
    return 1 if mesh is None else mesh.shape[DATA_AXIS]


def shard_batch(batch: PyTree, mesh: Mesh | None) -> PyTree:
    """Place ``batch`` with its leading axis split over ``"data"`` (unchanged without a mesh)."""
    if mesh is None:
        return batch
    shards = num_data_shards(mesh)
    sizes = {np.shape(leaf)[0] for leaf in jax.tree_util.tree_leaves(batch)}
    if any(size % shards for size in sizes):
        raise ValueError(f"batch size {sorted(sizes)} is not divisible by the {shards} devices of the 'data' axis")
    return jax.device_put(batch, NamedSharding(mesh, PartitionSpec(DATA_AXIS)))


def replicate(params: PyTree, mesh: Mesh | None) -> PyTree:
    """Place ``params`` whole on every device of ``mesh`` (unchanged without a mesh)."""
    if mesh is None:
        return params
    return jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
