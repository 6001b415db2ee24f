"""Is it the features or the choice of the cluster count? The decision rule's features clustered with the true count.

    python experiments/planted/true_count.py RUN_DIR [RUN_DIR ...]

For each finished planted run (``planted`` or ``planted-entangled``), along the Hessian basis and the random basis:
the ARI of the decision rule's clustering (the run's own ``polca_gradients`` / ``random_gradients`` strategy: the
projected-gradient trajectories over the last ``gradient_window`` of the checkpoints, a Gaussian mixture whose count
BIC picks) beside a Gaussian mixture of the *true* number of groups on the same features (a supervised choice: an
upper bound for the count, not a strategy), and the rule's clusters as ``size:share of its largest group`` (their
purity). Beside them the same two clusterings of the *subspace* features of the same window
(``gradient_directions=subspace``, :func:`polca_jax.analysis.subspace_features`: which directions each sample's
gradients move in together, whatever their signs). Also each group's median exact loss at the first and the last
POLCA checkpoint (has the student learned it?).
"""

import argparse
import dataclasses
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture

import polca_jax as pj
from polca_jax import analysis
from polca_jax.pipeline import RunConfig, cluster_gradient_trajectories

from trivial_controls import load_planted_run


def true_count_labels(projections: np.ndarray, config: RunConfig, count: int, features=analysis.joint_features
                      ) -> np.ndarray:
    """int[N]: ``features`` (default the rule's: unit norm, PCA) of ``projections [T, N, K]`` over the last
    ``gradient_window`` clustered by a full-covariance Gaussian mixture of ``count`` components (5 starts)."""
    window = max(2, round(config.gradient_window * projections.shape[0]))
    rows = features(projections[-window:], seed=config.seed)
    return GaussianMixture(count, covariance_type="full", n_init=5, random_state=config.seed).fit_predict(rows)


def purity(labels: np.ndarray, groups: np.ndarray) -> str:
    """Each cluster of ``labels [N]`` (noise left out) as ``size:share of its largest group``."""
    cells = []
    for cluster in range(labels.max() + 1):
        members = groups[labels == cluster]
        if members.size:
            cells.append(f"{members.size}:{np.unique(members, return_counts=True)[1].max() / members.size:.2f}")
    return " ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    args = parser.parse_args()
    print("| Run | Median loss per group, first → last checkpoint | Basis | Rule (BIC count) | True count | "
          "Rule's clusters (size:purity) | Subspace (BIC count) | Subspace, true count |")
    print("|---|---|---|---|---|---|---|---|")
    for run_dir in args.run_dirs:
        stored, _, groups = load_planted_run(run_dir)
        config = RunConfig.from_dict(stored, str(run_dir / "config.json"))
        names = np.unique(groups)
        loss = np.asarray(pj.POLCAResult.load(run_dir / "polca" / "hessian").loss)
        losses = ", ".join(f"{name} {np.median(loss[0, groups == name]):.3f} → "
                           f"{np.median(loss[-1, groups == name]):.4f}" for name in names)
        for basis in ("hessian", "random"):
            projections = np.asarray(pj.POLCAResult.load(run_dir / "polca" / basis).projections)
            rule = cluster_gradient_trajectories(projections, config)[0].labels
            fixed = true_count_labels(projections, config, names.size)
            subspace = dataclasses.replace(config, gradient_directions="subspace")
            subspace_bic = cluster_gradient_trajectories(projections, subspace)[0].labels
            subspace_fixed = true_count_labels(projections, config, names.size, analysis.subspace_features)
            print(f"| {run_dir.name} | {losses} | {basis} | {adjusted_rand_score(groups, rule):.2f} | "
                  f"{adjusted_rand_score(groups, fixed):.2f} | {purity(rule, groups)} | "
                  f"{adjusted_rand_score(groups, subspace_bic):.2f} | "
                  f"{adjusted_rand_score(groups, subspace_fixed):.2f} |", flush=True)


if __name__ == "__main__":
    main()
