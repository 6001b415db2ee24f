"""The permutation null of cluster homogeneity: ``analysis.homogeneity_pvalues`` (all permutations drawn at once, one
``bincount``) against the obvious reference (a Python loop over permutations, one ``np.random.permutation`` and one
homogeneity per cluster each), side by side in one process, on the score stage's size (5000 samples, 10 clusters and
noise, 1000 permutations).

    python benchmarks/nulls.py [--rounds 5]

Prints the median seconds of each and their ratio, and checks that the two agree: the same observed homogeneities,
and p-values within 0.05 of each other (both estimate the same tail probability from 1000 draws each).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from polca_jax import analysis

NUM_SAMPLES, NUM_CLUSTERS, NUM_PERMUTATIONS = 5000, 10, 1000


def reference_pvalues(cluster_of: np.ndarray, labels: np.ndarray, num_permutations: int, seed: int) -> np.ndarray:
    """``[C]`` p-values of each cluster's fraction of True labels: a loop over permutations of every sample's label."""
    rng = np.random.default_rng(seed)
    clusters = np.arange(cluster_of.max() + 1)
    observed = np.array([labels[cluster_of == c].mean() for c in clusters])
    exceed = np.zeros(clusters.size)
    for _ in range(num_permutations):
        permuted = rng.permutation(labels)
        exceed += np.array([permuted[cluster_of == c].mean() for c in clusters]) >= observed
    return (1 + exceed) / (1 + num_permutations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    cluster_of = rng.integers(-1, NUM_CLUSTERS, NUM_SAMPLES)
    labels = rng.random(NUM_SAMPLES) < 0.35 + 0.006 * np.maximum(cluster_of, 0)  # a weak signal in later clusters
    clustering = analysis.Clustering(labels=cluster_of, sample_indices=np.arange(NUM_SAMPLES), direction=None,
                                     min_cluster_size=1, min_samples=1, metric="euclidean", normalize=None)
    cases = {
        "homogeneity_pvalues": lambda: analysis.homogeneity_pvalues(
            clustering, labels, positive=True, num_permutations=NUM_PERMUTATIONS, seed=1).pvalues,
        "loop over permutations": lambda: reference_pvalues(cluster_of, labels, NUM_PERMUTATIONS, seed=1),
    }
    results = {name: case() for name, case in cases.items()}  # warm-up, and the results compared
    ours, theirs = results["homogeneity_pvalues"], results["loop over permutations"]
    assert np.max(np.abs(ours - theirs)) < 0.05, (ours, theirs)
    times = {name: [] for name in cases}
    for _ in range(args.rounds):  # interleaved, so the load of a shared machine hits both alike
        for name, case in cases.items():
            start = time.perf_counter()
            case()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{NUM_SAMPLES} samples, {NUM_CLUSTERS} clusters, {NUM_PERMUTATIONS} permutations, {args.rounds} rounds "
          f"(p-values agree within {np.max(np.abs(ours - theirs)):.3f})")
    for name, seconds in medians.items():
        print(f"  {name:<24} {seconds:8.3f} s")
    print(f"  speed-up: {medians['loop over permutations'] / medians['homogeneity_pvalues']:.1f}x")


if __name__ == "__main__":
    main()
