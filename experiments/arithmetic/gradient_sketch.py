"""Is carry in the per-sample gradients at all, whatever the basis? On a finished arithmetic run, the projected-gradient
strategy's features (each answer token's projected gradients over the last ``gradient_window`` of the POLCA
checkpoints, normalised, PCA, the run's clusterer) along a random sketch of K directions (K much larger than the
basis: by the Johnson-Lindenstrauss argument it keeps the distances between the tokens' whole gradients), beside the
same features along the run's own bases (read from its stored decompositions).

    python experiments/arithmetic/gradient_sketch.py RUN_DIR [--dims 256] [--seed 0] [--window FRACTION]

Per feature: the best qualifying carry cluster (the task's rule: more than 85 % of its carry tokens in the 10s or
100s place) with its homogeneity, recall, and Holm-adjusted permutation p-value against carry shuffled within each
place (the pipeline's null), the number of clusters, and the cluster's three largest skills (answer place and
carry). The planted benchmark's version of this question is
``experiments/planted/random_subspace.py``.
"""

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

import polca_jax as pj
from polca_jax import analysis
from polca_jax.pipeline import RunConfig, cluster_gradient_trajectories, load_labels, load_task_definition


def clustering_of(projections: np.ndarray, config: RunConfig) -> analysis.Clustering:
    """The pipeline's projected-gradient clustering of all of ``projections [W, N, K]`` (the window already cut)."""
    return cluster_gradient_trajectories(projections, dataclasses.replace(config, gradient_window=1.0))[0]


def best_carry_cluster(clustering: analysis.Clustering, label_sets: dict, config: dict) -> str:
    """The best qualifying carry cluster as ``homogeneity / recall / adjusted p`` and the cluster count."""
    carry = label_sets["carry"]
    qualifier = carry.qualifier
    qualifying = np.isin(label_sets[qualifier.label_set].values, np.asarray(qualifier.classes))
    scores = analysis.cluster_label_scores([clustering], carry.values, positive=carry.positive,
                                           qualifying=qualifying, min_qualifying_fraction=qualifier.min_fraction)
    test = analysis.homogeneity_pvalues(clustering, carry.values, positive=carry.positive,
                                        num_permutations=config["null_permutations"], seed=config["seed"],
                                        strata=label_sets[carry.stratify_by].values)
    adjusted = analysis.adjust_pvalues(np.asarray(test.pvalues, np.float64), "holm")
    candidates = [s for s in scores if s.qualifies and s.label == carry.positive]
    if not candidates:
        return f"no qualifying carry cluster ({clustering.num_clusters} clusters)"
    best = max(candidates, key=lambda s: (s.homogeneity, s.recall))
    skills, counts = np.unique(label_sets["skill"].values[clustering.members(best.cluster)], return_counts=True)
    composition = ", ".join(f"{count} {skill}" for count, skill in sorted(zip(counts, skills), reverse=True)[:3])
    return (f"{best.homogeneity:.3f} / {best.recall:.2f} / p {adjusted[best.cluster]:.3g} "
            f"({clustering.num_clusters} clusters, base rate {best.base_rate:.3f}; {composition})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--dims", type=int, nargs="*", default=[256])
    parser.add_argument("--seed", type=int, default=0, help="the random sketch's seed")
    parser.add_argument("--window", type=float, help="the last fraction of the POLCA checkpoints read (default: the "
                        "run's gradient_window, as the pipeline's strategy reads)")
    args = parser.parse_args()
    run_dir = args.run_dir
    config = json.loads((run_dir / "config.json").read_text())
    run_config = RunConfig.from_dict(config, str(run_dir / "config.json"))
    task = load_task_definition(config["task"])(**config["task_options"], seed=config["seed"])
    label_sets = load_labels(run_dir)[0]
    hessian = pj.POLCAResult.load(run_dir / "polca" / "hessian")
    window = max(2, round((args.window or config["gradient_window"]) * len(hessian.steps)))
    steps = [int(s) for s in hessian.steps[-window:]]
    print(f"{run_dir}: {label_sets['carry'].values.size} answer tokens, checkpoints {steps[0]}–{steps[-1]} "
          f"({window})\n\n| Features along | Best qualifying carry cluster: homogeneity / recall / Holm p |\n|---|---|")
    for basis in sorted(path.name for path in (run_dir / "polca").iterdir()):
        projections = np.asarray(pj.POLCAResult.load(run_dir / "polca" / basis).projections[-window:])
        print(f"| basis `{basis}` (K={projections.shape[2]}) | "
              f"{best_carry_cluster(clustering_of(projections, run_config), label_sets, config)} |", flush=True)
    store = pj.OrbaxCheckpoints(run_dir / "checkpoints", steps)
    for k in args.dims:
        sketch = pj.random_basis(store[0], k, jax.random.key(args.seed))
        projections = np.stack([np.asarray(pj.per_sample_projections(task.per_sample_loss, store[t], task.eval_batch,
                                                                     sketch, mask=task.eval_mask))
                                for t in range(len(steps))])  # [W, N, K]
        print(f"| random sketch (K={k}, seed {args.seed}) | "
              f"{best_carry_cluster(clustering_of(projections, run_config), label_sets, config)} |", flush=True)


if __name__ == "__main__":
    main()
