"""The unsupervised-step alternatives on a finished arithmetic run: does any of them change the carry finding?

    python experiments/planted/arithmetic_alternatives.py RUN_DIR [--second-order run trapezoid none]

For the Hessian basis and (when the run has ablations) the random basis, each second-order rule and each strategy
of ``polca_jax.analysis.strategy_clusterings``, prints: clusters; the most carry-homogeneous cluster that qualifies
under the paper's rule (>85% of its carry tokens in the 10s or 100s place), with its size and recall among clustered
tokens (the paper's recall); how many of the strategy's clusters beat the carry-homogeneity permutation null
(Holm-corrected, 0.05); and the best clustering's adjusted Rand index against the ``skill`` labels (place × carry).
The labels only score; no clustering sees them. min_cluster_size is the run's, scaled as the pipeline scales it.
"""

import argparse
from pathlib import Path

import numpy as np

import polca_jax as pj
from polca_jax import analysis
from polca_jax import analysis as unsup
from polca_jax.pipeline import RunDirectory, load_labels

STRATEGIES = [("paper", "hdbscan"), ("unit", "hdbscan"), ("shape", "hdbscan"), ("profile", "hdbscan"),
              ("profile", "gmm"), ("profile", "kmeans"), ("joint", "hdbscan")]


def carry_scores(clusterings, label_sets, permutations: int, seed: int) -> dict:
    """Best qualifying carry cluster, clusters beating the homogeneity null, best ARI against ``skill``."""
    carry = label_sets["carry"]
    qualifier = carry.qualifier
    qualifying = np.isin(label_sets[qualifier.label_set].values, np.asarray(qualifier.classes))
    records = analysis.cluster_label_scores(clusterings, carry.values, positive=carry.positive, qualifying=qualifying,
                                            min_qualifying_fraction=qualifier.min_fraction)
    top = analysis.top_clusters(records, 1, qualifying_only=True)
    pvalues = []
    for clustering in clusterings:
        if clustering.num_clusters:
            pvalues += analysis.homogeneity_pvalues(clustering, carry.values, positive=carry.positive,
                                                    num_permutations=permutations, seed=seed).pvalues.tolist()
    adjusted = analysis.adjust_pvalues(np.asarray(pvalues), "holm") if pvalues else np.zeros(0)
    aris = [unsup.adjusted_rand(c, label_sets["skill"].values) for c in clusterings]
    aris = [a for a in aris if np.isfinite(a)]
    return {"clusters": sum(c.num_clusters for c in clusterings),
            "best": None if not top else (top[0].homogeneity, top[0].size, top[0].recall),
            "beating_null": int(np.sum(adjusted < 0.05)), "best_skill_ari": max(aris) if aris else float("nan")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--second-order", nargs="+", default=["run", "trapezoid", "none"])
    parser.add_argument("--permutations", type=int, default=200)
    args = parser.parse_args(argv)
    run = RunDirectory(args.run_dir)
    config = run.config
    label_sets, _ = load_labels(run.path)
    num_samples = label_sets["carry"].values.size
    size, _ = analysis.hdbscan_params(num_samples, min_cluster_size=config.min_cluster_size,
                                      reference_num_samples=config.reference_num_samples)
    print(f"# {args.run_dir}: {num_samples} tokens, min_cluster_size {size} "
          f"({config.min_cluster_size} scaled by N/{config.reference_num_samples})")
    print("| Basis | Second order | Strategy | Clusters | Best qualifying carry cluster: homogeneity (size, recall) | "
          "Clusters beating the carry null | Best ARI vs skill |")
    print("|---|---|---|---|---|---|---|")
    for basis in ("hessian", "random"):
        if not (args.run_dir / "polca" / basis / "manifest.json").exists():
            continue
        result = pj.POLCAResult.load(args.run_dir / "polca" / basis)
        for rule in args.second_order:
            projected = result.projected_loss if rule == "run" else result.projected_loss_with(rule)
            name = f"run ({result.config['second_order']})" if rule == "run" else rule
            for strategy, clusterer in STRATEGIES:
                clusterings = unsup.strategy_clusterings(projected, strategy, clusterer=clusterer,
                                                         min_cluster_size=size, seed=config.seed)
                s = carry_scores(clusterings, label_sets, args.permutations, config.seed)
                best = "none" if s["best"] is None else f"{s['best'][0]:.2f} ({s['best'][1]}, {s['best'][2]:.2f})"
                ari = "–" if not np.isfinite(s["best_skill_ari"]) else f"{s['best_skill_ari']:.2f}"
                print(f"| {basis} | {name} | {strategy}+{clusterer} | {s['clusters']} | {best} | "
                      f"{s['beating_null']} | {ari} |", flush=True)


if __name__ == "__main__":
    main()
