"""Null models for clusters: is a cluster a finding, or what chance gives? (docs/pipeline.md, the score stage)

- :func:`homogeneity_pvalues` answers "is this cluster more homogeneous in a label than chance, given its size?".
  The labels are permuted among the samples that went into the clustering (its ``sample_indices``: those kept by the
  filter, HDBSCAN noise included) while the cluster assignment, hence every cluster size, stays fixed; given a
  confounder (``strata``), only within each stratum.
- :func:`adjust_pvalues` corrects a family of such p-values (all clusters of a report): Holm for the family-wise
  error rate, Benjamini–Hochberg for the false discovery rate.
- :func:`breakthrough_null` answers "would the same increments, shuffled in time, look as hidden?" for one
  cluster's Eq. 9/10 breakthrough: it permutes the per-interval increments of the members' curves and recomputes the
  cluster's mean breakthrough step.

Every p-value is a permutation p-value, p = (1 + #{null ≥ observed}) / (1 + B) for B permutations: never 0, and
valid (P(p ≤ α) ≤ α under the null) for any B. Host code: numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from polca_jax.analysis._arrays import checked_array
from polca_jax.analysis._breakthroughs import SIGNS, breakthrough_step
from polca_jax.analysis._clustering import Clustering
from polca_jax.errors import PolcaError

ADJUST_METHODS = ("holm", "bh")
_CHUNK_ELEMENTS = 1 << 22  # permutations are drawn in chunks of about this many array entries (32 MiB of int64)


def _permutation_pvalue(null: np.ndarray, observed) -> np.ndarray:
    """(1 + #{null ≥ observed}) / (1 + B) for null [B, ...] and observed [...]. The comparison is exact, so ties
    count: pass integer counts, or floats that observed and null got through the same arithmetic."""
    return (1.0 + np.count_nonzero(null >= observed, axis=0)) / (1.0 + null.shape[0])


def _checked_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PolcaError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# --- label homogeneity -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PermutationTest:
    """Label-homogeneity permutation test of every cluster of one clustering (arrays indexed by cluster id).

    What :func:`homogeneity_pvalues` returns.

    Attributes:
      observed: float[C], the statistic of each cluster: the fraction of its members in ``classes[c]``.
      classes: [C], the class each cluster was scored for: ``positive``, or the cluster's majority class (ties go to
        the first class in sorted order).
      pvalues: float[C], (1 + #{null ≥ observed}) / (1 + num_permutations).
      null_mean, null_q95: float[C], the mean and 95th percentile of the statistic under the null.
      num_permutations: B.
    """

    observed: np.ndarray
    classes: np.ndarray
    pvalues: np.ndarray
    null_mean: np.ndarray
    null_q95: np.ndarray
    num_permutations: int

    @property
    def num_clusters(self) -> int:
        """C, the number of clusters tested."""
        return int(self.observed.shape[0])


def _empty_test(classes: np.ndarray, num_permutations: int) -> PermutationTest:
    empty = np.zeros(0)
    return PermutationTest(empty, classes[:0], empty, empty, empty, num_permutations)


def _cluster_class_counts(cluster_of: np.ndarray, codes: np.ndarray, num_clusters: int, num_classes: int) -> np.ndarray:
    """int[..., C, K]: how many samples of each cluster carry each class code, for codes int[..., m] (leading axes:
    permutations) and the cluster of each of the m samples, cluster_of int[m] (all >= 0)."""
    leading = codes.shape[:-1]
    rows = int(np.prod(leading))
    cells = num_clusters * num_classes
    combined = (cluster_of * num_classes + codes).reshape(rows, -1) + (np.arange(rows) * cells)[:, None]
    counts = np.bincount(combined.ravel(), minlength=rows * cells)
    return counts.reshape(*leading, num_clusters, num_classes)


def _statistic_counts(counts: np.ndarray, positive_code: int | None) -> np.ndarray:
    """int[..., C]: the count of the positive class, or of the majority class, in each cluster."""
    if positive_code is None:
        return counts.max(axis=-1)
    if positive_code < 0:  # the positive class never occurs among the clustered samples
        return np.zeros(counts.shape[:-1], np.int64)
    return counts[..., positive_code]


def _checked_labels(labels, num_samples: int, name: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != num_samples:
        raise PolcaError(
            f"{name} must have shape ({num_samples},), one per sample of the clustering, got {labels.shape}"
        )
    if labels.dtype.kind == "f" and not np.all(np.isfinite(labels)):
        raise PolcaError(f"{name} contain NaN or infinite values; give every sample a class")
    return labels


def homogeneity_pvalues(
    clustering: Clustering, labels, *, positive=None, num_permutations: int = 1000, seed: int | None = 0,
    strata=None,
) -> PermutationTest:
    """Is each cluster of ``clustering`` more homogeneous in ``labels`` than chance, given its size?

    Null: the labels are permuted among the clustered samples (``clustering.sample_indices``, HDBSCAN noise
    included) with the cluster assignment fixed. Samples outside ``sample_indices`` (filtered out) never enter:
    their labels do not matter. All B permutations are drawn at once, in chunks (``Generator.permuted`` on a
    [chunk, n] array), and counted per (cluster, class) with one ``bincount``: 1000 permutations of 5000 samples in
    10 clusters take a fraction of a second. A clustering without clusters returns empty arrays.

    Args:
      clustering: the :class:`Clustering` whose clusters are tested.
      labels: categorical [N] (ints, bools or strings), the class of each of the clustering's N samples.
      positive: the class whose fraction is scored (e.g. ``True`` for carry tokens). None scores each cluster's
        majority class, and the null then takes the maximum over classes too, as the observed statistic does;
        scoring the null at the observed majority class would make the test anti-conservative.
      num_permutations: B, label permutations.
      seed: for ``numpy.random.default_rng``.
      strata: optional categorical [N], a confounder of ``labels`` (e.g. the answer place of a carry label): the
        labels are then permuted only among samples of the same stratum, so a cluster that merely gathers the strata
        where the label is common does not beat the null; only homogeneity beyond what its strata explain does.

    Returns:
      A :class:`PermutationTest` (arrays of C entries, one per cluster).

    Raises:
      PolcaError: for ``num_permutations`` that is not a positive integer, labels or strata that are not ``[N]`` or
        hold NaN, or a clustering with cluster members outside its ``sample_indices``.

    Example:
      ``clustering``, ``labels``: the setup of :class:`Clustering`'s example (7 clustered samples, 4 of class a).

      >>> test = analysis.homogeneity_pvalues(clustering, labels, positive="a", num_permutations=200)
      >>> test.observed.round(3).tolist(), test.pvalues.round(3).tolist()
      ([1.0, 0.333], [0.164, 0.965])
    """
    num_permutations = _checked_count(num_permutations, "num_permutations")
    labels = _checked_labels(labels, clustering.num_samples)
    kept = np.asarray(clustering.sample_indices, dtype=np.int64)
    num_clusters = clustering.num_clusters
    if num_clusters == 0:
        return _empty_test(labels, num_permutations)
    cluster_of = clustering.labels[kept]
    if np.count_nonzero(cluster_of >= 0) != np.count_nonzero(clustering.labels >= 0):
        raise PolcaError("the clustering has cluster members outside its sample_indices; it is inconsistent")

    classes, codes = np.unique(labels[kept], return_inverse=True)
    codes = codes.reshape(-1)
    if positive is None:
        positive_code = None
    else:
        found = np.flatnonzero(classes == positive)
        positive_code = int(found[0]) if found.size else -1
    in_cluster = cluster_of >= 0
    sizes = np.bincount(cluster_of[in_cluster], minlength=num_clusters)

    observed_counts = _cluster_class_counts(cluster_of[in_cluster], codes[in_cluster], num_clusters, classes.size)
    observed = _statistic_counts(observed_counts, positive_code)
    if positive is None:
        scored_classes = classes[observed_counts.argmax(axis=-1)]
    else:
        scored_classes = np.full(num_clusters, positive, dtype=np.asarray(positive).dtype)

    groups = [np.arange(kept.size)]
    if strata is not None:
        strata = _checked_labels(strata, clustering.num_samples, "strata")
        _, stratum_of = np.unique(strata[kept], return_inverse=True)
        groups = [np.flatnonzero(stratum_of.reshape(-1) == s) for s in range(stratum_of.max(initial=-1) + 1)]
    null = _null_statistic_counts(codes, in_cluster, cluster_of, num_clusters, classes.size, positive_code,
                                  num_permutations, np.random.default_rng(seed), groups)
    null_fractions = null / sizes
    return PermutationTest(
        observed=observed / sizes,
        classes=scored_classes,
        pvalues=_permutation_pvalue(null, observed),
        null_mean=null_fractions.mean(axis=0),
        null_q95=np.quantile(null_fractions, 0.95, axis=0),
        num_permutations=num_permutations,
    )


def _null_statistic_counts(codes, in_cluster, cluster_of, num_clusters, num_classes, positive_code, num_permutations,
                           rng, groups) -> np.ndarray:
    """int[B, C]: the statistic's count in each cluster under B permutations of codes int[n] among the n clustered
    samples (in_cluster bool[n] marks those in some cluster, cluster_of int[n] their cluster), each permutation
    moving codes only within each of ``groups`` (index arrays that partition the n samples)."""
    n = codes.size
    per_permutation = max(n, num_clusters * num_classes)
    chunk = max(1, min(num_permutations, _CHUNK_ELEMENTS // per_permutation))
    members = np.flatnonzero(in_cluster)
    member_clusters = cluster_of[members]
    parts = []
    for start in range(0, num_permutations, chunk):
        rows = min(chunk, num_permutations - start)
        shuffled = np.empty((rows, n), codes.dtype)
        for group in groups:
            shuffled[:, group] = rng.permuted(np.broadcast_to(codes[group], (rows, group.size)), axis=1)
        counts = _cluster_class_counts(member_clusters, shuffled[:, members], num_clusters, num_classes)
        parts.append(_statistic_counts(counts, positive_code))
    return np.concatenate(parts)


# --- multiple testing ------------------------------------------------------------------------------------------------


def adjust_pvalues(pvalues, method: str = "holm") -> np.ndarray:
    """p-values float[m] adjusted for testing m hypotheses together, in the input order, clipped to ≤ 1.

    Both methods are monotone in p. An empty input gives an empty output.

    Args:
      pvalues: float[m], each in [0, 1].
      method: one of :data:`ADJUST_METHODS`: "holm" (Holm–Bonferroni step-down; controls the family-wise error
        rate): with p sorted ascending, p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) p_(j)); "bh" (Benjamini–Hochberg
        step-up; controls the false discovery rate for independent or positively dependent tests):
        p̃_(i) = min_{j ≥ i} min(1, m p_(j) / j).

    Returns:
      float[m], the adjusted p-values in the input order.

    Raises:
      PolcaError: for an unknown method, or p-values that are not 1-D, not finite or outside [0, 1].

    Example:
      >>> analysis.adjust_pvalues([0.01, 0.04, 0.03], "holm").round(3).tolist()
      [0.03, 0.06, 0.06]
      >>> analysis.adjust_pvalues([0.01, 0.04, 0.03], "bh").round(3).tolist()
      [0.03, 0.04, 0.04]
    """
    if method not in ADJUST_METHODS:
        raise PolcaError(f"method must be one of {ADJUST_METHODS}, got {method!r}")
    pvalues = np.asarray(pvalues, dtype=float)
    if pvalues.ndim != 1:
        raise PolcaError(f"pvalues must have 1 axis, got shape {pvalues.shape}")
    if pvalues.size == 0:
        return pvalues.copy()
    pvalues = checked_array(pvalues, "pvalues", 1)
    if np.any((pvalues < 0) | (pvalues > 1)):
        raise PolcaError("pvalues must lie in [0, 1]")
    m = pvalues.size
    order = np.argsort(pvalues, kind="stable")
    ranked = pvalues[order]
    rank = np.arange(1, m + 1)
    if method == "holm":
        adjusted = np.maximum.accumulate(np.minimum(1.0, (m - rank + 1) * ranked))
    else:
        adjusted = np.minimum.accumulate(np.minimum(1.0, m * ranked / rank)[::-1])[::-1]
    result = np.empty(m)
    result[order] = adjusted
    return result


# --- breakthroughs ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BreakthroughNull:
    """One cluster's Eq. 9/10 breakthrough against its increments shuffled in time (see :func:`breakthrough_null`).

    Attributes:
      observed_mean_step: the cluster's mean Eq. 9 breakthrough step.
      observed_hidden: whether it exceeds threshold_step (Eq. 10).
      null_mean_steps: float[S], the mean breakthrough step under each of the S shuffles.
      null_hidden_rate: the fraction of shuffles whose mean step exceeds threshold_step (would be called hidden).
      pvalue: (1 + #{null mean step ≥ observed}) / (1 + S): how surprising so late a breakthrough is.
      null_q05, null_median, null_q95: quantiles of null_mean_steps.
      threshold_step: τ of Eq. 10.
    """

    observed_mean_step: float
    observed_hidden: bool
    null_mean_steps: np.ndarray
    null_hidden_rate: float
    pvalue: float
    null_q05: float
    null_median: float
    null_q95: float
    threshold_step: float

    @property
    def num_shuffles(self) -> int:
        """S, the number of shuffles."""
        return int(self.null_mean_steps.shape[0])


def _mean_steps(curve_sets: np.ndarray, steps, window_steps: float, sign: str) -> np.ndarray:
    """float[S]: the mean Eq. 9 breakthrough step of each of S sets of curves, curve_sets float[S, T, n] (observed
    and null go through this same arithmetic, so equal curves give exactly equal means)."""
    num_sets, num_checkpoints, num_members = curve_sets.shape
    curves = curve_sets.transpose(0, 2, 1).reshape(num_sets * num_members, num_checkpoints)
    return breakthrough_step(curves, steps, window_steps, sign=sign).reshape(num_sets, num_members).mean(axis=1)


def breakthrough_null(
    trajectories,
    steps,
    window_steps: float,
    threshold_step: float,
    *,
    num_shuffles: int = 200,
    seed: int | None = 0,
    sign: str = "paper",
) -> BreakthroughNull:
    """Would the same increments, shuffled in time, give as late (as hidden) a breakthrough? For ONE cluster.

    Null: the per-interval increments f(t_{i+1}) − f(t_i) (``np.diff`` along T) are permuted in time and re-summed
    from the same starting value f(t_0), so each shuffled curve has the same start, end and set of jumps. One
    permutation per shuffle is *shared by all members*: the members of a cluster were clustered because their curves
    move together, and the question is whether the *timing* of that joint movement is special, not whether n
    independent shuffles would still line up (they would not, so independent shuffles would make any coherent
    cluster look surprising and pull every null mean step to the middle of the range). The step grid is kept: with
    unevenly spaced checkpoints an increment can move to an interval of another length, so the null also ignores how
    long each increment took.

    For a cluster whose members share one sharp drop, the null mean step is spread roughly uniformly over the
    candidate steps of Eq. 9, so the p-value is about the fraction of candidates later than the observed step:
    only breakthroughs late in the range can be significant. null_hidden_rate says how often shuffled increments
    alone would be called hidden at all.

    Args:
      trajectories: float[T, n], the curves of the cluster's n members (e.g. the projected loss along its direction,
        ``projected_loss[:, members, k]``).
      steps: [T], the training step of each checkpoint, strictly increasing.
      window_steps, threshold_step, sign: Δ, τ and the sign convention of Eq. 9/10 (see
        :mod:`polca_jax.analysis._breakthroughs`, whose :func:`breakthrough_step` computes every breakthrough here).
      num_shuffles: S.
      seed: for ``numpy.random.default_rng``.

    Returns:
      A :class:`BreakthroughNull`.

    Raises:
      PolcaError: for trajectories that are not a finite float[T, n] array of at least 3 checkpoints, a
        ``num_shuffles`` that is not a positive integer, an unknown sign, a threshold that is not finite, and the
        inputs of :func:`breakthrough_step`.

    Example:
      ``projected_loss``, ``steps``: the setup of :class:`Clustering`'s example; cluster 1 (samples 3–5) drops over
      steps 300–500.

      >>> null = analysis.breakthrough_null(projected_loss[:, 3:6, 0], steps, 100, threshold_step=400, num_shuffles=100)
      >>> null.observed_mean_step, null.observed_hidden, round(null.pvalue, 3), null.num_shuffles
      (500.0, True, 0.089, 100)
    """
    trajectories = checked_array(trajectories, "trajectories", 2)
    num_shuffles = _checked_count(num_shuffles, "num_shuffles")
    if sign not in SIGNS:
        raise PolcaError(f"sign must be one of {SIGNS}, got {sign!r}")
    if not np.isfinite(threshold_step):
        raise PolcaError(f"threshold_step must be finite, got {threshold_step}")
    num_checkpoints, num_members = trajectories.shape
    if num_checkpoints < 3:
        raise PolcaError(f"trajectories need at least 3 checkpoints to shuffle increments, got {num_checkpoints}")
    observed = float(_mean_steps(trajectories[None], steps, window_steps, sign)[0])

    rng = np.random.default_rng(seed)
    start, increments = trajectories[0], np.diff(trajectories, axis=0)  # [n], [T-1, n]
    chunk = max(1, min(num_shuffles, _CHUNK_ELEMENTS // (num_checkpoints * num_members)))
    null = []
    for first in range(0, num_shuffles, chunk):
        rows = min(chunk, num_shuffles - first)
        order = rng.permuted(np.broadcast_to(np.arange(num_checkpoints - 1), (rows, num_checkpoints - 1)), axis=1)
        shuffled = np.concatenate(
            [np.broadcast_to(start, (rows, 1, num_members)), start + np.cumsum(increments[order], axis=1)], axis=1
        )  # [rows, T, n]
        null.append(_mean_steps(shuffled, steps, window_steps, sign))
    null = np.concatenate(null)
    q05, median, q95 = np.quantile(null, [0.05, 0.5, 0.95])
    return BreakthroughNull(
        observed_mean_step=observed,
        observed_hidden=bool(observed > threshold_step),
        null_mean_steps=null,
        null_hidden_rate=float(np.mean(null > threshold_step)),
        pvalue=float(_permutation_pvalue(null, observed)),
        null_q05=float(q05),
        null_median=float(median),
        null_q95=float(q95),
        threshold_step=float(threshold_step),
    )
