"""The causal check per direction: remove a basis direction's part of the training displacement, see whose loss rises.

A direction b of the basis carries the component ⟨θ_T − θ_0, b⟩ b of the training displacement. Taking it out of the
final parameters, θ_T − ⟨θ_T − θ_0, b⟩ b, undoes what training did along b and nothing else (for an orthonormal
basis the other directions' components are untouched). If a cluster found along b is a real mechanism that lives in
b, its members' losses should rise more than the other samples' (DESIGN.md, "Trust").

- :func:`remove_direction`: the ablated parameters for one flat direction.
- :func:`direction_ablation_losses`: per-sample loss increase ``[D, N]`` for chosen basis directions (JAX; one
  compiled loss kernel reused for every direction and every parameter set of the same shapes).
- :func:`ablation_effects`: host summary for one clustering: per cluster, its members' mean loss increase against
  the other clustered samples', and whether it is the cluster hurt most.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from polca_jax import _tree as tree
from polca_jax._basis import Basis, check_width
from polca_jax._checks import check_finite, check_finite_params, check_same_structure
from polca_jax._projections import PerSampleLossFn, per_sample_losses
from polca_jax.analysis._arrays import checked_array
from polca_jax.analysis._clustering import Clustering

PyTree = Any
UNIT_NORM_TOLERANCE = 1e-3  # loose enough for float32 / bfloat16 bases


@jax.jit
def _without_row(final_params: PyTree, initial_params: PyTree, vectors: jax.Array, row: jax.Array) -> PyTree:
    """θ_T − ⟨θ_T − θ_0, b⟩ b with b = vectors[row] (a traced index: one compilation for every row), as a pytree
    with the leaf shapes and dtypes of final_params."""
    final = tree.ravel(final_params)
    direction = jax.lax.dynamic_index_in_dim(vectors, row, keepdims=False).astype(final.dtype)
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
        raise ValueError(
            f"{what} must have unit norm, got norm {norms[bad[0]]:.6g}; normalise it (or build the basis with "
            "basis_from_matrix(..., orthonormalize=True))"
        )


def remove_direction(final_params: PyTree, initial_params: PyTree, direction) -> PyTree:
    """θ_T − ⟨θ_T − θ_0, b⟩ b: the final parameters without the training displacement along b.

    final_params, initial_params: params pytrees of the same structure (θ_T, θ_0).
    direction: b, a flat unit vector ``[P]`` in ``ravel_pytree`` order (e.g. a row of ``Basis.vectors``).
    Returns a pytree shaped like final_params, with its leaf dtypes.
    """
    _check_params(final_params, initial_params)
    direction = jnp.asarray(direction)
    num = tree.num_params(final_params)
    if direction.shape != (num,):
        raise ValueError(f"direction must be a flat [{num}] vector (one entry per parameter), got {direction.shape}")
    _check_unit_rows(direction, "direction")
    return _without_row(final_params, initial_params, direction[None], jnp.asarray(0, jnp.int32))


def _checked_directions(directions, num_directions: int) -> np.ndarray:
    if directions is None:
        return np.arange(num_directions)
    directions = np.asarray(directions)
    if directions.ndim != 1 or directions.size == 0 or not np.issubdtype(directions.dtype, np.integer):
        raise ValueError(f"directions must be a non-empty 1-D array of basis indices, got {directions!r}")
    if np.any((directions < 0) | (directions >= num_directions)):
        raise ValueError(f"directions must lie in [0, {num_directions}) (the basis size), got {directions.tolist()}")
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

    per_sample_loss_fn, batch, mask, mesh: as for :func:`polca_jax._projections.per_sample_losses` (``[n_seq]`` or
      ``[n_seq, n_tok]`` losses; N samples in its order).
    final_params, initial_params: θ_T and θ_0, params pytrees of the same structure.
    basis: a :class:`Basis` of the parameter space (width P).
    directions: int[D], the basis rows to remove one at a time (default: all K).

    The loss kernel is compiled once (cached by loss function and shapes) and reused for every direction and for
    new parameters of the same shapes; the ablated parameters come from one compiled function indexed by row.
    """
    check_width(basis, final_params)
    _check_params(final_params, initial_params)
    directions = _checked_directions(directions, basis.size)
    _check_unit_rows(basis.vectors[directions], "every chosen basis direction")
    reference = per_sample_losses(per_sample_loss_fn, final_params, batch, mask=mask, mesh=mesh)
    check_finite(reference, "the per-sample losses at final_params")
    increases = []
    for row in directions:
        ablated = _without_row(final_params, initial_params, basis.vectors, jnp.asarray(row, jnp.int32))
        losses = per_sample_losses(per_sample_loss_fn, ablated, batch, mask=mask, mesh=mesh)
        check_finite(losses, f"the per-sample losses without direction {int(row)}")
        increases.append(losses - reference)
    return jnp.stack(increases)


# --- host summary -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AblationEffect:
    """How removing a clustering's direction hurts one of its clusters.

    member_mean: mean loss increase over the cluster's ``size`` members.
    others_mean: mean over the other ``num_others`` kept samples (NaN when there are none).
    difference: member_mean − others_mean.
    rank: 1 for the cluster with the largest member_mean among this clustering's clusters, 2 for the next, ...
    hurt_most: rank == 1.
    """

    direction: int | None
    cluster: int
    size: int
    num_others: int
    member_mean: float
    others_mean: float
    difference: float
    rank: int

    @property
    def hurt_most(self) -> bool:
        return self.rank == 1


def _kept_mask(kept, clustering: Clustering) -> np.ndarray:
    """bool[N] from kept: None (the clustering's sample_indices), a bool[N] mask or int sample indices."""
    n = clustering.num_samples
    mask = np.zeros(n, bool)
    if kept is None:
        mask[clustering.sample_indices] = True
        return mask
    kept = np.asarray(kept)
    if kept.dtype == np.bool_:
        if kept.shape != (n,):
            raise ValueError(f"a boolean kept mask must have shape ({n},), got {kept.shape}")
        return kept
    if kept.ndim != 1 or not np.issubdtype(kept.dtype, np.integer) or np.any((kept < 0) | (kept >= n)):
        raise ValueError(f"kept must be a bool[{n}] mask or sample indices in [0, {n}), got {kept!r}")
    mask[kept] = True
    return mask


def ablation_effects(loss_increase, clustering: Clustering, *, kept=None) -> list[AblationEffect]:
    """One :class:`AblationEffect` per cluster of ``clustering`` (in cluster order; empty without clusters).

    loss_increase: float[N], the per-sample loss increase from removing the clustering's direction (a row of
      :func:`direction_ablation_losses`).
    kept: the samples the clusters are compared with, as a bool[N] mask or indices; default the clustering's
      ``sample_indices`` (the samples that went into HDBSCAN, noise included). Each cluster's members are left out
      of its own comparison set.
    """
    loss_increase = checked_array(loss_increase, "loss_increase", 1)
    if loss_increase.shape != (clustering.num_samples,):
        raise ValueError(
            f"loss_increase must have shape ({clustering.num_samples},) to match the clustering, "
            f"got {loss_increase.shape}"
        )
    kept = _kept_mask(kept, clustering)
    members = [clustering.labels == cluster for cluster in range(clustering.num_clusters)]
    member_means = np.array([loss_increase[in_cluster].mean() for in_cluster in members])
    ranks = np.empty(len(members), np.int64)
    ranks[np.argsort(-member_means, kind="stable")] = np.arange(1, len(members) + 1)
    effects = []
    for cluster, in_cluster in enumerate(members):
        others = kept & ~in_cluster
        num_others = int(np.count_nonzero(others))
        others_mean = float(loss_increase[others].mean()) if num_others else float("nan")
        effects.append(
            AblationEffect(
                direction=clustering.direction,
                cluster=cluster,
                size=int(np.count_nonzero(in_cluster)),
                num_others=num_others,
                member_mean=float(member_means[cluster]),
                others_mean=others_mean,
                difference=float(member_means[cluster]) - others_mean,
                rank=int(ranks[cluster]),
            )
        )
    return effects
