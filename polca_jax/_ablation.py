"""The causal check per direction: remove a basis direction's part of the training displacement, see whose loss rises.

A direction b of the basis carries the component ⟨θ_T − θ_0, b⟩ b of the training displacement. Taking it out of the
final parameters, θ_T − ⟨θ_T − θ_0, b⟩ b, undoes what training did along b and nothing else (for an orthonormal
basis the other directions' components are untouched). If a cluster found along b is a real mechanism that lives in
b, its members' losses should rise more than the other samples' (docs/pipeline.md, the causal stage).

- :func:`remove_direction`: the ablated parameters for one flat direction.
- :func:`direction_ablation_losses`: per-sample loss increase ``[D, N]`` for chosen basis directions (JAX; one
  compiled loss kernel reused for every direction and every parameter set of the same shapes).
- the host summary per cluster is :func:`polca_jax.analysis.ablation_effects`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from polca_jax import tree
from polca_jax._basis import Basis, check_width
from polca_jax.checks import check_finite, check_finite_params, check_same_structure
from polca_jax._projections import PerSampleLossFn, per_sample_losses
from polca_jax.errors import PolcaError

PyTree = Any
UNIT_NORM_TOLERANCE = 1e-3  # loose enough for float32 / bfloat16 bases


@jax.jit
def _without_direction(final_params: PyTree, initial_params: PyTree, direction: jax.Array) -> PyTree:
    """θ_T − ⟨θ_T − θ_0, b⟩ b for a flat ``[P]`` direction b (one compilation for every direction of a basis; only
    b reaches the device, not the basis' ``[K, P]``), as a pytree with the leaf shapes and dtypes of
    final_params."""
    final = tree.ravel(final_params)
    direction = direction.astype(final.dtype)
    coefficient = jnp.dot(final - tree.ravel(initial_params), direction, precision=jax.lax.Precision.HIGHEST)
    ablated = tree.unravel(final - coefficient * direction, final_params)
    return jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype), ablated, final_params)


def _check_params(final_params: PyTree, initial_params: PyTree) -> None:
    check_same_structure(final_params, initial_params, "initial_params")
    check_finite_params(final_params, "final_params")
    check_finite_params(initial_params, "initial_params")


def _check_unit_rows(rows: jax.Array, what: str) -> None:
    norms = np.asarray(jnp.linalg.norm(rows.astype(jnp.float32), axis=-1)).reshape(-1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)
    if bad.size:
        raise PolcaError(
            f"{what} must have unit norm, got norm {norms[bad[0]]:.6g}; normalise it (or build the basis with "
            "basis_from_matrix(..., orthonormalize=True))"
        )


def remove_direction(final_params: PyTree, initial_params: PyTree, direction) -> PyTree:
    """θ_T − ⟨θ_T − θ_0, b⟩ b: the final parameters without the training displacement along b.

    Args:
      final_params: θ_T, a params pytree.
      initial_params: θ_0, a params pytree of the same structure, shapes and dtypes.
      direction: b, a flat unit vector ``[P]`` in ``ravel_pytree`` order (e.g. a row of ``Basis.vectors``).

    Returns:
      A pytree shaped like ``final_params``, with its leaf dtypes.

    Raises:
      PolcaError: for parameters that differ in structure or are not finite, or a direction that is not ``[P]`` or
        not of unit norm (within 1e-3).

    Example:
      ``params``: the least squares of :func:`polca_jax.hvp`'s example (zeros, as θ_0).

      >>> final = {"w": jnp.array([1.0, 2.0, 3.0])}
      >>> pj.remove_direction(final, params, jnp.array([0.0, 1.0, 0.0]))["w"].tolist()
      [1.0, 0.0, 3.0]
    """
    _check_params(final_params, initial_params)
    direction = jnp.asarray(direction)
    num = tree.num_params(final_params)
    if direction.shape != (num,):
        raise PolcaError(f"direction must be a flat [{num}] vector (one entry per parameter), got {direction.shape}")
    _check_unit_rows(direction, "direction")
    return _without_direction(final_params, initial_params, direction)


def _checked_directions(directions, num_directions: int) -> np.ndarray:
    if directions is None:
        return np.arange(num_directions)
    directions = np.asarray(directions)
    if directions.ndim != 1 or directions.size == 0 or not np.issubdtype(directions.dtype, np.integer):
        raise PolcaError(f"directions must be a non-empty 1-D array of basis indices, got {directions!r}")
    if np.any((directions < 0) | (directions >= num_directions)):
        raise PolcaError(f"directions must lie in [0, {num_directions}) (the basis size), got {directions.tolist()}")
    return directions


def direction_ablation_losses(
    per_sample_loss_fn: PerSampleLossFn,
    final_params: PyTree,
    initial_params: PyTree,
    basis: Basis,
    batch: PyTree,
    *,
    directions=None,
    mask: np.ndarray | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> jax.Array:
    """Per-sample loss increase when each chosen direction is removed: ``[D, N]``.

    Row d is L(x; θ_T − ⟨θ_T − θ_0, b_d⟩ b_d) − L(x; θ_T) for every sample x, b_d = ``basis.vectors[directions[d]]``.
    The loss kernel is compiled once (cached by loss function and shapes) and reused for every direction and for
    new parameters of the same shapes; the ablated parameters come from one compiled function of the removed row
    (only that ``[P]`` row reaches the device, never the basis' ``[K, P]``).

    Args:
      per_sample_loss_fn, batch, mask, mesh: as for :func:`polca_jax.per_sample_losses` (``[n_seq]`` or
        ``[n_seq, n_tok]`` losses; N samples in its order).
      final_params, initial_params: θ_T and θ_0, params pytrees of the same structure.
      basis: a :class:`Basis` of the parameter space (width P).
      directions: int[D], the basis rows to remove one at a time (default: all K).

    Returns:
      ``[D, N]`` loss increases (negative where removing the direction lowers a sample's loss).

    Raises:
      PolcaError: for a basis of another width, parameters that differ in structure or are not finite, directions
        that are not a non-empty int array of rows in [0, K), chosen rows not of unit norm, the inputs
        :func:`polca_jax.per_sample_losses` refuses, and per-sample losses that are not finite.

    Example:
      Removing the first and the third parameter axis from a fit θ_T (θ_0 = ``params``; ``batch``,
      ``per_sample_loss``: the least squares of :func:`polca_jax.hvp`'s example).

      >>> final = {"w": jnp.array([-0.5, -1.0, -4.0])}  # fits samples 0–2 exactly
      >>> increase = pj.direction_ablation_losses(per_sample_loss, final, params, pj.basis_from_matrix(jnp.eye(3)),
      ...                                         batch, directions=[0, 2])
      >>> np.asarray(increase, float).round(3).tolist()
      [[0.5, 0.0, 0.0, -2.375], [0.0, 0.0, 2.0, -12.0]]
    """
    check_width(basis, final_params)
    _check_params(final_params, initial_params)
    directions = _checked_directions(directions, basis.size)
    _check_unit_rows(basis.vectors[directions], "every chosen basis direction")
    reference = per_sample_losses(per_sample_loss_fn, final_params, batch, mask=mask, mesh=mesh)
    check_finite(reference, "the per-sample losses at final_params")
    increases = []
    for row in directions:
        ablated = _without_direction(final_params, initial_params, jnp.asarray(basis.vectors[row]))
        losses = per_sample_losses(per_sample_loss_fn, ablated, batch, mask=mask, mesh=mesh)
        check_finite(losses, f"the per-sample losses without direction {int(row)}")
        increases.append(losses - reference)
    return jnp.stack(increases)
