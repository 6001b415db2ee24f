"""Carry-skill cluster quality for the arithmetic task (Tables 1, 8, 10 of the paper).

Samples are answer tokens with a digit place (``place`` int[N]; 0..3 = 1000s, 100s, 10s, 1s) and a carry label
(``carry`` bool[N]). For one cluster of one clustering:

- homogeneity = carry tokens in the cluster / cluster size;
- recall = carry tokens in the cluster / carry tokens with a label >= 0 in that clustering. The denominator leaves out
  HDBSCAN outliers ("recall leaves out HDBSCAN outliers") and, for POLCA, the samples the per-direction filter
  dropped (both carry label -1): it counts the carry tokens that were clustered into *some* cluster;
- F1 = harmonic mean of homogeneity and recall (0 when both are 0).

A cluster *qualifies* when more than 85% of its carry tokens are in the 10s or 100s place: carrying into the 1000s
place only means predicting a leading 0 or 1, which every trajectory type except exact loss recovers. A cluster
without carry tokens does not qualify.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from polca_jax.analysis._clustering import Clustering
from polca_jax.analysis._arrays import checked_array

PLACE_1000S, PLACE_100S, PLACE_10S, PLACE_1S = 0, 1, 2, 3
QUALIFYING_PLACES = (PLACE_100S, PLACE_10S)
MIN_QUALIFYING_FRACTION = 0.85


@dataclass(frozen=True)
class CarryClusterScore:
    """Carry metrics of one cluster (one table row); direction is None for baseline clusterings."""

    direction: int | None
    cluster: int
    size: int
    homogeneity: float
    recall: float
    f1: float
    qualifies: bool


def carry_cluster_scores(
    clusterings: list[Clustering],
    place,
    carry,
    *,
    qualifying_places=QUALIFYING_PLACES,
    min_qualifying_fraction: float = MIN_QUALIFYING_FRACTION,
) -> list[CarryClusterScore]:
    """Homogeneity, recall, F1 and qualification of every cluster of every clustering (see the module docstring).

    place: int[N] digit place of each sample; carry: bool[N] carry label of each sample.
    qualifying_places / min_qualifying_fraction: a cluster qualifies when more than this fraction of its carry
    tokens have one of these places.
    """
    place = checked_array(place, "place", 1, dtype=int)
    carry = checked_array(carry, "carry", 1, dtype=bool)
    if place.shape != carry.shape:
        raise ValueError(f"place and carry must have the same shape, got {place.shape} and {carry.shape}")
    in_qualifying_place = np.isin(place, qualifying_places)
    records = []
    for clustering in clusterings:
        if clustering.num_samples != carry.shape[0]:
            raise ValueError(f"clustering labels cover {clustering.num_samples} samples, carry has {carry.shape[0]}")
        clustered_carry_count = np.count_nonzero(carry & (clustering.labels >= 0))
        for cluster in range(clustering.num_clusters):
            in_cluster = clustering.labels == cluster
            carry_in_cluster = carry & in_cluster
            carry_count = np.count_nonzero(carry_in_cluster)
            homogeneity = carry_count / np.count_nonzero(in_cluster)
            recall = carry_count / clustered_carry_count if carry_count else 0.0
            f1 = 2 * homogeneity * recall / (homogeneity + recall) if carry_count else 0.0
            qualifies = bool(carry_count) and (
                np.count_nonzero(carry_in_cluster & in_qualifying_place) / carry_count > min_qualifying_fraction
            )
            records.append(
                CarryClusterScore(
                    clustering.direction,
                    cluster,
                    int(np.count_nonzero(in_cluster)),
                    float(homogeneity),
                    float(recall),
                    float(f1),
                    bool(qualifies),
                )
            )
    return records


def top_carry_clusters(
    records: list[CarryClusterScore], n: int = 3, *, qualifying_only: bool = True, one_per_direction: bool = False
) -> list[CarryClusterScore]:
    """The n most carry-homogeneous clusters, most homogeneous first (Table 8/10 rows).

    qualifying_only: consider only clusters passing the 10s/100s rule.
    one_per_direction: first reduce each direction to its most homogeneous cluster (the paper's "homogeneity of a
    basis vector"), so the rows come from n different directions. The paper's caption reads "the three most
    homogeneous clusters across all vectors", hence the default False.
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


def max_carry_homogeneity(records: list[CarryClusterScore], *, qualifying_only: bool = True) -> float:
    """The highest carry homogeneity over the (qualifying) clusters (Table 1); NaN if there is none."""
    top = top_carry_clusters(records, 1, qualifying_only=qualifying_only)
    return top[0].homogeneity if top else float("nan")
