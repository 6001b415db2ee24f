"""Validation of the arrays the host analysis reads."""

from __future__ import annotations

import numpy as np

from polca_jax.errors import PolcaError


def checked_array(array, name: str, ndim: int, *, dtype=float) -> np.ndarray:
    """``array`` as a finite, non-empty ``dtype`` array with ``ndim`` axes, or a PolcaError naming ``name``."""
    array = np.asarray(array)
    if array.ndim != ndim:
        raise PolcaError(f"{name} must have {ndim} axes, got shape {array.shape}")
    if array.size == 0:
        raise PolcaError(f"{name} is empty (shape {array.shape})")
    if dtype is float:
        if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
            raise PolcaError(f"{name} must be real-valued, got dtype {array.dtype}")
        array = array.astype(np.float64, copy=False)
        if not np.all(np.isfinite(array)):
            raise PolcaError(f"{name} contains NaN or infinite values")
    elif dtype is int:
        if not np.issubdtype(array.dtype, np.integer):
            raise PolcaError(f"{name} must hold integers, got dtype {array.dtype}")
    elif dtype is bool:
        if array.dtype != np.bool_:
            raise PolcaError(f"{name} must be boolean, got dtype {array.dtype}")
    return array


def checked_directions(directions, num_directions: int) -> np.ndarray:
    """int64[m]: ``directions`` as integer indices in [0, num_directions) (m may be 0), or a PolcaError."""
    directions = np.asarray(directions).reshape(-1)
    if directions.size and directions.dtype.kind not in "iu":
        raise PolcaError(f"directions must be integer indices, got {directions.tolist()}")
    directions = directions.astype(np.int64)
    if np.any((directions < 0) | (directions >= num_directions)):
        raise PolcaError(f"directions must lie in [0, {num_directions}), got {directions.tolist()}")
    return directions
