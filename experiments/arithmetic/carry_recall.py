"""What keeps the per-direction projected-gradient carry clusters at a quarter of the carry tokens (issue 21).

On finished arithmetic runs, for each basis: every direction's projected gradients over the POLCA checkpoints
clustered alone (GMM with BIC, the pipeline's clusterer and minimum cluster size), with the trajectory scaled three
ways, and a consensus of those per-direction clusterings:

- ``unit``: each sample's trajectory divided by its norm (the pipeline's ``gradient_directions=each``; over every
  checkpoint, ``--window 1.0``, and over the last half);
- ``raw``: the trajectory as it is (its size kept);
- ``standard``: each checkpoint's value standardised over the samples;
- ``unit per direction, all directions joined``: the ``unit`` trajectories of every direction side by side, one
  clustering (PCA to 10 components, the pipeline's clusterer);
- ``upper bound``: not a strategy, the carry labels choose it: the union of every ``unit`` per-direction cluster
  that qualifies with at least 0.8 carry, what the best merge of per-direction clusters could reach;
- ``consensus``: how often two samples share a cluster over the ``unit`` directions (evidence accumulation), clustered
  with HDBSCAN (precomputed distance 1 − that share) and with average linkage into 4, 8 and 16 clusters.

    python experiments/arithmetic/carry_recall.py RUN_DIR [RUN_DIR ...] [--bases hessian,random] [--grid]

With ``--grid``, the ``unit`` features over every checkpoint instead, with 3 to 40 principal components and each of
the GMM (with BIC), HDBSCAN and k-means (k from the silhouette) clusterers.

Prints per run, basis and feature the best qualifying carry cluster (the run's own rule for the carry label set, the
paper's: more than 85% of its carry tokens in the 10s or 100s place; at least the pipeline's minimum cluster size) as
homogeneity / recall over all carry tokens / size, and the best one with recall >= 0.5 (issue 21's goal is
homogeneity >= 0.9 there). No permutation null: the pipeline's score stage gives it for the strategy it runs
(``--set gradient_directions=each``).
"""

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from sklearn.cluster import HDBSCAN, AgglomerativeClustering
from sklearn.decomposition import PCA

import polca_jax as pj
from polca_jax import analysis
from polca_jax.pipeline import LabelSet, RunConfig, cluster_gradient_trajectories, load_labels


@dataclasses.dataclass(frozen=True)
class CarryRule:
    """Which clusters count: the carry flags ``[N]``, the run's qualifier for them (``qualifying [N]`` and the share of
    a cluster's carry tokens that must qualify) and the pipeline's minimum cluster size."""

    carry: np.ndarray
    qualifying: np.ndarray
    min_fraction: float
    min_size: int

    @classmethod
    def of_run(cls, labels: dict[str, LabelSet], config: RunConfig) -> "CarryRule":
        carry = labels["carry"]
        qualifier = carry.qualifier
        return cls(carry.values, np.isin(labels[qualifier.label_set].values, qualifier.classes),
                   qualifier.min_fraction, min_cluster_size(config, carry.values.size))

    def counts(self, members: np.ndarray) -> bool:
        """Whether the cluster with ``members`` (bool ``[N]``) is large enough and qualifies."""
        carries = self.carry[members].sum()
        return bool(members.sum() >= self.min_size and carries
                    and (self.carry & self.qualifying)[members].sum() / carries > self.min_fraction)


def best_carry_clusters(labels: np.ndarray, rule: CarryRule) -> tuple[tuple, tuple]:
    """(homogeneity, recall, size) of the most carry-homogeneous cluster of ``labels [N]`` that counts by ``rule``,
    and of the most homogeneous one with recall >= 0.5 (zeros where none)."""
    carry = rule.carry
    best, best_half = (0.0, 0.0, 0), (0.0, 0.0, 0)
    for cluster in range(labels.max() + 1):
        members = labels == cluster
        if not rule.counts(members):
            continue
        carries = int(carry[members].sum())
        score = (float(carry[members].mean()), carries / int(carry.sum()), int(members.sum()))
        best = max(best, score)
        if score[1] >= 0.5:
            best_half = max(best_half, score)
    return best, best_half


def scaled_features(trajectory: np.ndarray, scaling: str, seed: int) -> np.ndarray:
    """One direction's ``[T, N]`` trajectories as ``[N, C]`` PCA features, scaled ``raw`` or ``standard``."""
    rows = trajectory.T
    if scaling == "standard":
        rows = (rows - rows.mean(0)) / np.maximum(rows.std(0), 1e-30)
    return PCA(n_components=min(10, rows.shape[1]), random_state=seed).fit_transform(rows)


def min_cluster_size(config: RunConfig, num_samples: int) -> int:
    """The pipeline's minimum cluster size for ``num_samples`` samples."""
    return analysis.hdbscan_params(num_samples, min_cluster_size=config.min_cluster_size,
                                   min_samples_divisor=config.min_samples_divisor,
                                   reference_num_samples=config.reference_num_samples)[0]


def feature_clusterings(projections: np.ndarray, config: RunConfig) -> dict[str, list[np.ndarray]]:
    """feature name -> the label arrays ``[N]`` of its clusterings (one per direction, or the consensus')."""
    each = dataclasses.replace(config, gradient_directions="each", gradient_increments=False,
                               gradient_rotation="none")
    unit = [c.labels for c in cluster_gradient_trajectories(projections, dataclasses.replace(each, gradient_window=1.0))]
    out = {"unit, every checkpoint": unit,
           "unit, last half": [c.labels for c in cluster_gradient_trajectories(
               projections, dataclasses.replace(each, gradient_window=0.5))]}
    smallest = min_cluster_size(config, projections.shape[1])
    for scaling in ("raw", "standard"):
        out[scaling] = [analysis.cluster_features(scaled_features(projections[:, :, k], scaling, config.seed),
                                                  method=config.profile_clusterer, min_cluster_size=smallest,
                                                  seed=config.seed).labels
                        for k in range(projections.shape[2])]
    per_direction_unit = projections / np.maximum(np.linalg.norm(projections, axis=0, keepdims=True), 1e-30)
    joined = per_direction_unit.transpose(1, 0, 2).reshape(projections.shape[1], -1)
    out["unit per direction, all directions joined"] = [analysis.cluster_features(
        PCA(n_components=10, random_state=config.seed).fit_transform(joined), method=config.profile_clusterer,
        min_cluster_size=smallest, seed=config.seed).labels]
    together = sum((labels[:, None] == labels[None, :]) & (labels[:, None] >= 0) for labels in unit) / len(unit)
    distance = 1.0 - together
    out["consensus, HDBSCAN"] = [HDBSCAN(min_cluster_size=smallest, metric="precomputed",
                                         copy=True).fit_predict(distance)]
    out["consensus, average linkage"] = [
        AgglomerativeClustering(n_clusters=n, metric="precomputed", linkage="average").fit_predict(distance)
        for n in (4, 8, 16)]
    return out


def clusterer_grid(projections: np.ndarray, smallest: int, seed: int) -> dict[str, list[np.ndarray]]:
    """"<clusterer>, <C> components" -> per direction the labels ``[N]`` of its ``unit`` features' clustering."""
    return {f"unit, {method}, {components} components": [
        analysis.cluster_features(analysis.joint_features(projections, directions=[k], max_components=components,
                                                          seed=seed),
                                  method=method, min_cluster_size=smallest, seed=seed).labels
        for k in range(projections.shape[2])]
        for components in (3, 5, 10, 20, 40) for method in ("gmm", "hdbscan", "kmeans")}


def labelled_union(clusterings: list[np.ndarray], rule: CarryRule, min_homogeneity: float = 0.8) -> np.ndarray:
    """A supervised upper bound for merging clusters across directions: labels ``[N]`` with one cluster (0), the
    union of every cluster of ``clusterings`` that counts by ``rule`` with carry homogeneity >= ``min_homogeneity``;
    the rest -1. Chosen with the carry labels, so not a strategy."""
    union = np.zeros(rule.carry.size, bool)
    for labels in clusterings:
        for cluster in range(labels.max() + 1):
            members = labels == cluster
            if rule.counts(members) and rule.carry[members].mean() >= min_homogeneity:
                union |= members
    return np.where(union, 0, -1)


def cell(score: tuple) -> str:
    """A table cell: homogeneity / recall / size, or "none" where no cluster counts."""
    return f"{score[0]:.3f} / {score[1]:.2f} / {score[2]}" if score[2] else "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--bases", default="hessian,random", help="comma-separated bases the runs decomposed")
    parser.add_argument("--grid", action="store_true", help="the unit features' components x clusterer grid")
    args = parser.parse_args()
    print("| run | basis | feature | best qualifying carry cluster | best with recall >= 0.5 |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        config = RunConfig.from_dict(json.loads((run / "config.json").read_text()), str(run / "config.json"))
        rule = CarryRule.of_run(load_labels(run)[0], config)
        for basis in args.bases.split(","):
            projections = np.asarray(pj.POLCAResult.load(run / "polca" / basis).projections)
            features = (clusterer_grid(projections, rule.min_size, config.seed) if args.grid
                        else feature_clusterings(projections, config))
            if not args.grid:
                features["upper bound (carry labels used): union of the unit clusters >= 0.8 carry"] = [
                    labelled_union(features["unit, every checkpoint"], rule)]
            for feature, clusterings in features.items():
                scores = [best_carry_clusters(labels_, rule) for labels_ in clusterings]
                best, half = max(score[0] for score in scores), max(score[1] for score in scores)
                print(f"| {run.name} | {basis} | {feature} | {cell(best)} | {cell(half)} |", flush=True)


if __name__ == "__main__":
    main()
