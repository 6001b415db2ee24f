"""Table 1's rows along one finished basis of a run whose other bases are still being decomposed.

The pipeline clusters and scores only once every basis of a run is decomposed; the `paper-cpu` run takes hours per
basis. This reads the finished decomposition along one basis (``polca/<basis>/``, every checkpoint done) and the
run's labels and config, clusters the strategies of Table 1 that need only that basis as the cluster stage does
(POLCA's projected loss and first-order POLCA per kept direction; the exact loss and its change per sample; and the
projected-gradient trajectories, the decision rule of experiments/planted/results.md) and
scores them for carry as the score stage does (the task's qualifier on the per-direction strategies, none on the
per-sample ones, as in the paper): the maximum carry homogeneity, and for that cluster its recall and its
permutation p-value against carry shuffled within each place (Holm-adjusted over the strategy's clusters); and the
hidden-breakthrough fraction, the share of clusters whose mean Eq. 9 breakthrough step (window Δ of the config)
lies after τ (the config's ``threshold_step``; "—" when the run chooses τ from its loss curve).

    python experiments/arithmetic/interim_table.py RUN_DIR [--basis hessian] [--min-cluster-size N]
        [--gradient-directions joint|each|subspace]

On a finished run it reproduces the report's Table 1 homogeneities and hidden-breakthrough fractions (a test checks
it on the `tiny` preset).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

import polca_jax as pj
from polca_jax import analysis
from polca_jax.errors import PolcaError
from polca_jax.pipeline import RunConfig, cluster_gradient_trajectories, load_labels, variant_trajectories

STRATEGIES = (("projected_loss", "POLCA"), ("first_order", "First-order POLCA"), ("loss", "Exact loss"),
              ("loss_change", "Change in exact loss"), ("gradients", "Projected-gradient trajectories (the rule)"))
PER_SAMPLE = ("loss", "loss_change")  # scored without the task's qualifier, as in the paper
"""(trajectory kind, Table 1's name) of the strategies that need only the decomposition along one basis."""


def clusterings_of(trajectories: np.ndarray, config: RunConfig) -> list[analysis.Clustering]:
    """The cluster stage's HDBSCAN of ``[T, N, K]`` (per kept direction) or ``[T, N]`` (one per-sample signal)."""
    options = dict(min_cluster_size=config.min_cluster_size, min_samples_divisor=config.min_samples_divisor,
                   reference_num_samples=config.reference_num_samples, normalize=config.normalize)
    if trajectories.ndim == 2:
        return [analysis.cluster_signal(trajectories, **options)]
    return analysis.cluster_directions(trajectories, **options)


def best_carry(clusterings: list[analysis.Clustering], label_sets: dict, config: RunConfig, per_direction: bool) -> str:
    """``homogeneity / recall / Holm p (direction, size)`` of the most carry-homogeneous (qualifying) cluster."""
    carry = label_sets["carry"]
    qualifier = carry.qualifier if per_direction else None
    qualifying = None if qualifier is None else np.isin(label_sets[qualifier.label_set].values, qualifier.classes)
    records = analysis.cluster_label_scores(
        clusterings, carry.values, positive=carry.positive, qualifying=qualifying,
        **({} if qualifier is None else {"min_qualifying_fraction": qualifier.min_fraction}))
    best = analysis.max_homogeneity(records, qualifying_only=per_direction)
    clusters = sum(clustering.num_clusters for clustering in clusterings)
    if np.isnan(best):
        return f"no qualifying cluster ({clusters} clusters)"
    record = analysis.top_clusters(records, 1, qualifying_only=per_direction)[0]
    keys, pvalues = [], []  # every cluster's p-value, Holm-adjusted across all of them as the score stage does
    for clustering in clusterings:
        if clustering.num_clusters:
            test = analysis.homogeneity_pvalues(clustering, carry.values, positive=carry.positive,
                                                num_permutations=config.null_permutations, seed=config.seed,
                                                strata=label_sets[carry.stratify_by].values)
            keys += [(clustering.direction, cluster) for cluster in range(clustering.num_clusters)]
            pvalues += [float(p) for p in test.pvalues]
    adjusted = dict(zip(keys, analysis.adjust_pvalues(np.asarray(pvalues), "holm")))
    where = "—" if record.direction is None else record.direction
    return (f"{best:.3f} / {record.recall:.2f} / p {adjusted[record.direction, record.cluster]:.3g} (direction "
            f"{where}, size {record.size}; {clusters} clusters)")


def hidden_fraction(clusterings: list[analysis.Clustering], trajectories: np.ndarray, steps: np.ndarray,
                    config: RunConfig) -> str:
    """The share of clusters whose mean breakthrough step (Eq. 9) is after τ (Eq. 10), as the score stage counts."""
    clustered = [clustering for clustering in clusterings if clustering.num_clusters]
    if not clustered or config.threshold_step is None:
        return "—"
    found = analysis.cluster_breakthroughs(clustered, trajectories, steps, config.window)
    return f"{np.mean([breakthrough.mean_step > config.threshold_step for breakthrough in found]):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--basis", default="hessian", help="the finished basis (a directory of RUN_DIR/polca/)")
    parser.add_argument("--min-cluster-size", type=int,
                        help="HDBSCAN's min_cluster_size instead of the run's (before its scaling to the samples)")
    parser.add_argument("--gradient-directions", help="the projected-gradient strategy's features instead of the "
                        "run's setting (joint, each or subspace: the pipeline's gradient_directions)")
    args = parser.parse_args()
    config_file = args.run_dir / "config.json"
    config = RunConfig.from_dict(json.loads(config_file.read_text()), str(config_file))
    if args.min_cluster_size is not None:
        config = dataclasses.replace(config, min_cluster_size=args.min_cluster_size)
    if args.gradient_directions is not None:
        try:
            config = dataclasses.replace(config, gradient_directions=args.gradient_directions)
        except PolcaError as error:
            parser.error(str(error))
    result = pj.POLCAResult.load(args.run_dir / "polca" / args.basis)
    label_sets, _ = load_labels(args.run_dir)
    print(f"{args.run_dir}: basis `{args.basis}`, {result.steps.size} checkpoints {result.steps[0]}–"
          f"{result.steps[-1]}, {np.asarray(result.loss).shape[1]} samples, "
          f"{np.asarray(result.projections).shape[2]} directions, min_cluster_size {config.min_cluster_size}\n")
    print(f"| Strategy | Max carry homogeneity / recall / Holm p of that cluster | Hidden-breakthrough fraction "
          f"(τ = {config.threshold_step}, Δ = {config.window}) |\n|---|---|---|")
    for kind, name in STRATEGIES:
        trajectories, steps = variant_trajectories(result, kind)
        trajectories = np.asarray(trajectories)  # for "gradients", the exact loss its breakthroughs are read on
        clusterings = (cluster_gradient_trajectories(np.asarray(result.projections), config) if kind == "gradients"
                       else clusterings_of(trajectories, config))
        if kind == "gradients" and args.gradient_directions is not None:
            name = f"Projected-gradient trajectories (gradient_directions={args.gradient_directions})"
        print(f"| {name} | {best_carry(clusterings, label_sets, config, kind not in PER_SAMPLE)} | "
              f"{hidden_fraction(clusterings, trajectories, steps, config)} |", flush=True)


if __name__ == "__main__":
    main()
