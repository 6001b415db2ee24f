"""The causal check's host summary: how removing a direction's share of the training displacement hurts each of its
clusters, from the per-sample loss increases that :func:`polca_jax.direction_ablation_losses` computes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from polca_jax.analysis._arrays import checked_array
from polca_jax.analysis._clustering import Clustering


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
      :func:`polca_jax.direction_ablation_losses`).
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
