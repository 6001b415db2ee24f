"""The causal check's host summary: how removing a direction's share of the training displacement hurts each of its
clusters, from the per-sample loss increases that :func:`polca_jax.direction_ablation_losses` computes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from polca_jax.analysis._arrays import checked_array
from polca_jax.analysis._clustering import Clustering
from polca_jax.errors import PolcaError


@dataclass(frozen=True)
class AblationEffect:
    """How removing a clustering's direction hurts one of its clusters (see :func:`ablation_effects`).

    Attributes:
      direction: the clustering's basis direction (None for a per-sample signal).
      cluster: the cluster id.
      size: its number of members.
      num_others: the number of kept samples outside it that it is compared with.
      member_mean: mean loss increase over the cluster's ``size`` members.
      others_mean: mean over the other ``num_others`` kept samples (NaN when there are none).
      difference: member_mean − others_mean.
      rank: 1 for the cluster with the largest member_mean among this clustering's clusters, 2 for the next, ...
      hurt_most: (a property) rank == 1.
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
        """rank == 1: no other cluster of the clustering has a larger member_mean."""
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
            raise PolcaError(f"a boolean kept mask must have shape ({n},), got {kept.shape}")
        return kept
    if kept.ndim != 1 or not np.issubdtype(kept.dtype, np.integer) or np.any((kept < 0) | (kept >= n)):
        raise PolcaError(f"kept must be a bool[{n}] mask or sample indices in [0, {n}), got {kept!r}")
    mask[kept] = True
    return mask


def ablation_effects(loss_increase, clustering: Clustering, *, kept=None) -> list[AblationEffect]:
    """One :class:`AblationEffect` per cluster of ``clustering`` (in cluster order; empty without clusters).

    Args:
      loss_increase: float[N], the per-sample loss increase from removing the clustering's direction (a row of
        :func:`polca_jax.direction_ablation_losses`).
      clustering: the :class:`Clustering` of the direction.
      kept: the samples the clusters are compared with, as a bool[N] mask or indices; default the clustering's
        ``sample_indices`` (the samples that went into HDBSCAN, noise included). Each cluster's members are left out
        of its own comparison set.

    Returns:
      A list of :class:`AblationEffect`, one per cluster.

    Raises:
      PolcaError: for a loss increase that is not a finite float[N] array, or a ``kept`` that is neither a bool[N]
        mask nor indices in [0, N).

    Example:
      ``clustering``: the setup of :class:`Clustering`'s example; removing its direction hurts cluster 0.

      >>> increase = np.array([0.9, 1.1, 1.0, 0.1, 0.2, 0.0, 0.1, 0.0])  # [N]
      >>> effects = analysis.ablation_effects(increase, clustering)
      >>> [(e.cluster, round(e.member_mean, 3), round(e.difference, 3), e.rank, e.hurt_most) for e in effects]
      [(0, 1.0, 0.9, 1, True), (1, 0.1, -0.675, 2, False)]
    """
    loss_increase = checked_array(loss_increase, "loss_increase", 1)
    if loss_increase.shape != (clustering.num_samples,):
        raise PolcaError(
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


@dataclass(frozen=True)
class AblationTest:
    """Whether removing a clustering's direction hurts each of its clusters more than the rest beyond noise.

    What :func:`ablation_pvalues` returns.

    Attributes:
      difference: float[C], each cluster's member mean minus the mean of the other kept samples (as
        :class:`AblationEffect`).
      pvalues: float[C], one-sided permutation p-values, (1 + #{null ≥ observed}) / (1 + B); 1 for a cluster holding
        every clustered sample (nothing to compare it with; its difference is NaN).
      null_mean, null_std: float[C], the difference's mean and spread under the null.
      num_permutations: B.
    """

    difference: np.ndarray
    pvalues: np.ndarray
    null_mean: np.ndarray
    null_std: np.ndarray
    num_permutations: int


def ablation_pvalues(loss_increase, clustering: Clustering, *, num_permutations: int = 1000,
                     seed: int | None = 0) -> AblationTest:
    """Is each cluster hurt more than the rest of its clustering by removing the direction, beyond noise?

    Statistic: a cluster's mean loss increase minus that of the other samples its clustering saw
    (``clustering.sample_indices``, HDBSCAN noise included), the ``difference`` of :func:`ablation_effects`. Null:
    the cluster assignment permuted among those samples, every cluster's size fixed (B permutations from
    ``numpy.random.default_rng(seed)``); the p-value is one-sided (hurt more). A difference of 1e-7 among increases
    that vary by 1e-2 is as likely under the null as observed and gets a large p-value; a cluster whose increase
    stands out from the spread of the same statistic over random clusters of its size gets a small one. A
    clustering without clusters returns empty arrays.

    Args:
      loss_increase: float[N], the per-sample loss increase from removing the clustering's direction (a row of
        :func:`polca_jax.direction_ablation_losses`).
      clustering: the :class:`Clustering` of the direction.
      num_permutations: B.
      seed: for ``numpy.random.default_rng``.

    Returns:
      An :class:`AblationTest` (arrays of C entries, one per cluster).

    Raises:
      PolcaError: for a loss increase that is not a finite float[N] array, a ``num_permutations`` that is not an
        integer >= 1, or a clustering with cluster members outside its ``sample_indices``.

    Example:
      ``clustering``: the setup of :class:`Clustering`'s example.

      >>> increase = np.array([0.9, 1.1, 1.0, 0.1, 0.2, 0.0, 0.1, 0.0])  # [N]
      >>> test = analysis.ablation_pvalues(increase, clustering, num_permutations=200)
      >>> test.difference.round(3).tolist(), test.pvalues.round(3).tolist()
      ([0.9, -0.675], [0.03, 0.955])
    """
    loss_increase = checked_array(loss_increase, "loss_increase", 1)
    if loss_increase.shape != (clustering.num_samples,):
        raise PolcaError(f"loss_increase must have shape ({clustering.num_samples},) to match the clustering, "
                         f"got {loss_increase.shape}")
    if isinstance(num_permutations, bool) or not isinstance(num_permutations, int | np.integer) or \
            num_permutations < 1:
        raise PolcaError(f"num_permutations must be an integer >= 1, got {num_permutations!r}")
    num_clusters = clustering.num_clusters
    if num_clusters == 0:
        empty = np.zeros(0)
        return AblationTest(empty, empty, empty, empty, int(num_permutations))
    kept = np.asarray(clustering.sample_indices, dtype=np.int64)
    values = np.asarray(loss_increase, np.float64)[kept]
    cluster_of = clustering.labels[kept]
    if np.count_nonzero(cluster_of >= 0) != np.count_nonzero(clustering.labels >= 0):
        raise PolcaError("the clustering has cluster members outside its sample_indices; it is inconsistent")
    sizes = np.bincount(cluster_of[cluster_of >= 0], minlength=num_clusters).astype(np.float64)
    total, n = values.sum(), values.size

    def differences(assignment: np.ndarray) -> np.ndarray:  # assignment int[..., n] -> float[..., C]
        rows = assignment.reshape(-1, n)
        offsets = (np.arange(rows.shape[0]) * (num_clusters + 1))[:, None]
        sums = np.bincount((np.where(rows >= 0, rows, num_clusters) + offsets).ravel(),
                           weights=np.broadcast_to(values, rows.shape).ravel(),
                           minlength=rows.shape[0] * (num_clusters + 1)).reshape(rows.shape[0], -1)[:, :-1]
        others = n - sizes
        with np.errstate(invalid="ignore", divide="ignore"):
            return sums / sizes - (total - sums) / others

    observed = differences(cluster_of[None])[0]
    rng = np.random.default_rng(seed)
    chunk = max(1, min(int(num_permutations), 2_000_000 // max(n, 1)))
    null = []
    for start in range(0, int(num_permutations), chunk):
        count = min(chunk, int(num_permutations) - start)
        null.append(differences(rng.permuted(np.broadcast_to(cluster_of, (count, n)), axis=1)))
    null = np.concatenate(null)
    tolerance = 1e-12 * max(1.0, float(np.abs(values).max()))  # sums in another order: equal up to rounding
    exceed = np.count_nonzero(null >= observed - tolerance, axis=0)
    pvalues = np.where(np.isfinite(observed), (1 + exceed) / (1 + int(num_permutations)), 1.0)
    return AblationTest(difference=observed, pvalues=pvalues,
                        null_mean=null.mean(axis=0), null_std=null.std(axis=0), num_permutations=int(num_permutations))
