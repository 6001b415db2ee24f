"""How well clusters match a categorical label set (the paper's Tables 1, 8, 10, for any label).

Samples carry a class (``labels [N]``: ints, bools or strings). A cluster is scored for one class: the ``positive``
class when one is given (the paper: carry tokens), else its majority class. For one cluster of one clustering:

- homogeneity = members of the class / cluster size;
- recall = members of the class / samples of the class that the clustering put in *some* cluster (the paper's
  "recall leaves out HDBSCAN outliers"; for POLCA the samples a direction's filter dropped are left out too);
- F1 = harmonic mean of homogeneity and recall (0 when both are 0);
- base rate = the class's share of the samples the clustering clustered (its ``sample_indices``): the homogeneity a
  cluster drawn at random from them would have on average.

Qualifying (an option): with ``qualifying`` bool ``[N]``, a cluster *qualifies* when more than
``min_qualifying_fraction`` of its members of the scored class are ``qualifying`` samples. The paper's arithmetic
rule counts a carry cluster only when more than 85% of its carry tokens are in the 10s or 100s place. Without it,
a cluster qualifies when it has at least one member of the scored class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from polca_jax.analysis._arrays import checked_array
from polca_jax.analysis._clustering import Clustering
from polca_jax.errors import PolcaError


@dataclass(frozen=True)
class ClusterScore:
    """One cluster scored against one label set (see the module docstring for the scores).

    Attributes:
      direction: the clustering's basis direction; None for per-sample baselines.
      cluster: the cluster id.
      size: its number of members.
      label: the class it is scored for (``positive``, or its majority class).
      homogeneity: members of the class / size.
      recall: members of the class / samples of the class that the clustering put in some cluster.
      f1: the harmonic mean of homogeneity and recall (0 when both are 0).
      base_rate: the class's share of the samples the clustering clustered (its ``sample_indices``).
      qualifies: whether the cluster counts (see ``qualifying`` of :func:`cluster_label_scores`).
    """

    direction: int | None
    cluster: int
    size: int
    label: Any
    homogeneity: float
    recall: float
    f1: float
    base_rate: float
    qualifies: bool


def cluster_label_scores(
    clusterings: list[Clustering],
    labels,
    *,
    positive: Any = None,
    qualifying=None,
    min_qualifying_fraction: float = 0.85,
) -> list[ClusterScore]:
    """Every cluster of every clustering scored against ``labels [N]`` (see the module docstring).

    Args:
      clusterings: :class:`Clustering` of the N samples.
      labels: ``[N]`` categorical (ints, bools or strings), the class of each sample.
      positive: the class to score every cluster for; None scores each cluster for its majority class.
      qualifying: optional bool ``[N]``; with it a cluster qualifies only when more than ``min_qualifying_fraction``
        of its members of the scored class are qualifying samples (without it, when it has one such member).
      min_qualifying_fraction: in [0, 1).

    Returns:
      One :class:`ClusterScore` per cluster, clustering by clustering, in cluster order.

    Raises:
      PolcaError: for labels that are not a non-empty ``[N]`` array, a ``qualifying`` that is not bool ``[N]``, a
        fraction outside [0, 1), or a clustering of another N.

    Example:
      ``clustering``, ``labels``: the setup of :class:`Clustering`'s example (samples 0–5 clustered; classes
      a a a | b b a).

      >>> scores = analysis.cluster_label_scores([clustering], labels)
      >>> [(s.cluster, s.label, round(s.homogeneity, 3), round(s.recall, 3), round(s.base_rate, 3)) for s in scores]
      [(0, 'a', 1.0, 0.75, 0.571), (1, 'b', 0.667, 1.0, 0.429)]
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise PolcaError(f"labels must be a non-empty [N] array, got shape {labels.shape}")
    if qualifying is not None:
        qualifying = checked_array(qualifying, "qualifying", 1, dtype=bool)
        if qualifying.shape != labels.shape:
            raise PolcaError(f"qualifying must have shape {labels.shape} like labels, got {qualifying.shape}")
    if not 0 <= min_qualifying_fraction < 1:
        raise PolcaError(f"min_qualifying_fraction must lie in [0, 1), got {min_qualifying_fraction}")
    records = []
    for clustering in clusterings:
        if clustering.num_samples != labels.shape[0]:
            raise PolcaError(f"clustering labels cover {clustering.num_samples} samples, labels has {labels.shape[0]}")
        clustered = clustering.labels >= 0
        kept = labels[clustering.sample_indices]
        for cluster in range(clustering.num_clusters):
            in_cluster = clustering.labels == cluster
            members = labels[in_cluster]
            label = positive if positive is not None else _majority(members)
            of_class = labels == label
            count = np.count_nonzero(of_class & in_cluster)
            homogeneity = count / members.size
            recall = count / np.count_nonzero(of_class & clustered) if count else 0.0
            f1 = 2 * homogeneity * recall / (homogeneity + recall) if count else 0.0
            qualifies = bool(count) and (
                qualifying is None
                or np.count_nonzero(of_class & in_cluster & qualifying) / count > min_qualifying_fraction
            )
            base_rate = np.count_nonzero(kept == label) / kept.size if kept.size else float("nan")
            records.append(ClusterScore(clustering.direction, cluster, int(members.size), _plain(label),
                                        float(homogeneity), float(recall), float(f1), float(base_rate),
                                        bool(qualifies)))
    return records


def top_clusters(records: list[ClusterScore], n: int = 3, *, qualifying_only: bool = True,
                 one_per_direction: bool = False) -> list[ClusterScore]:
    """The n most homogeneous clusters, most homogeneous first (Table 8/10 rows).

    Args:
      records: :class:`ClusterScore` records, as :func:`cluster_label_scores` gives them.
      n: how many to return (fewer when fewer qualify).
      qualifying_only: consider only qualifying clusters.
      one_per_direction: first reduce each direction to its most homogeneous cluster (the paper's "homogeneity of a
        basis vector"), so the rows come from n different directions. The paper's caption reads "the three most
        homogeneous clusters across all vectors", hence the default False.

    Returns:
      Up to n records, by decreasing homogeneity (ties keep their input order).

    Example:
      ``clustering``, ``labels``: the setup of :class:`Clustering`'s example.

      >>> scores = analysis.cluster_label_scores([clustering], labels)
      >>> [(s.cluster, s.label, s.homogeneity) for s in analysis.top_clusters(scores, 1)]
      [(0, 'a', 1.0)]
    """
    candidates = [record for record in records if record.qualifies or not qualifying_only]
    candidates.sort(key=lambda record: record.homogeneity, reverse=True)  # stable: ties keep their input order
    if one_per_direction:
        seen, best_per_direction = set(), []
        for record in candidates:
            if record.direction not in seen:
                seen.add(record.direction)
                best_per_direction.append(record)
        candidates = best_per_direction
    return candidates[:n]


def max_homogeneity(records: list[ClusterScore], *, qualifying_only: bool = True) -> float:
    """The highest homogeneity over the (qualifying) clusters (Table 1); NaN if there is none.

    Args:
      records: :class:`ClusterScore` records, as :func:`cluster_label_scores` gives them.
      qualifying_only: consider only qualifying clusters.

    Returns:
      The largest ``homogeneity``, or NaN.

    Example:
      ``clustering``, ``labels``: the setup of :class:`Clustering`'s example.

      >>> round(analysis.max_homogeneity(analysis.cluster_label_scores([clustering], labels, positive="b")), 3)
      0.667
    """
    top = top_clusters(records, 1, qualifying_only=qualifying_only)
    return top[0].homogeneity if top else float("nan")


def _majority(values: np.ndarray):
    classes, counts = np.unique(values, return_counts=True)
    return classes[np.argmax(counts)]


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value
