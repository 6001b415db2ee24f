"""Score a finished planted-benchmark run directory against its ground truth, for the paper's unsupervised step
and the alternatives of ``polca_jax.analysis.strategy_clusterings``, along the Hessian and the random basis.

    python experiments/planted/evaluate.py RUN_DIR [--json OUT.json] [--second-order run|none|trapezoid]

Prints, per basis and strategy: clusters, the best clustering's ARI (with its permutation p-value), per group the
best cluster's homogeneity / recall, and whether every group is recovered (homogeneity >= 0.9 at recall >= 0.5);
the exact-loss baseline under the same clusterers; where each basis vector's mass lies (group-private parameters,
shared ones); and a supervised diagnostic that uses the labels (never used by any clustering): the cross-validated
ROC AUC of a logistic probe for group A vs the rest from each feature set.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import polca_jax as pj
from polca_jax import analysis
from polca_jax import analysis as unsup
from polca_jax.pipeline import RunDirectory, load_labels
from polca_jax.pipeline.tasks.planted import make_spec
from polca_jax.pipeline.tasks.planted import late_breakthrough, matched_loss_gap, parameter_roles, strategy_summary

BASES = ("hessian", "random", "first_layer", "first_layer_random")  # the last two from restricted_basis.py
ALTERNATIVES = [("paper", "hdbscan"), ("unit", "hdbscan"), ("shape", "hdbscan"), ("profile", "hdbscan"),
                ("profile", "kmeans"), ("profile", "gmm"), ("profile", "agglomerative"), ("joint", "hdbscan"),
                ("joint", "kmeans"), ("joint", "gmm")]


def trajectories(result: pj.POLCAResult, second_order: str) -> np.ndarray:
    """[T, N, K] projected loss under the run's own second-order rule or another one free from stored arrays."""
    return result.projected_loss if second_order == "run" else result.projected_loss_with(second_order)


def score(clusterings, groups, permutations: int, seed: int) -> dict:
    """Ground-truth summary plus the best clustering's ARI p-value and the Holm-corrected homogeneity nulls."""
    summary = strategy_summary(clusterings, groups)
    best = next((c for c in clusterings if c.direction == summary["best_ari_direction"]
                 and np.isfinite(unsup.adjusted_rand(c, groups))
                 and np.isclose(unsup.adjusted_rand(c, groups), summary["best_ari"])), None)
    summary["best_ari_pvalue"] = (unsup.ari_pvalue(best, groups, num_permutations=permutations, seed=seed)
                                  if best is not None else None)
    pvalues = []
    for clustering in clusterings:
        if clustering.num_clusters:
            test = analysis.homogeneity_pvalues(clustering, groups, num_permutations=permutations, seed=seed)
            pvalues.extend(test.pvalues.tolist())
    adjusted = analysis.adjust_pvalues(np.asarray(pvalues), "holm") if pvalues else np.zeros(0)
    summary["clusters_beating_null"] = int(np.sum(adjusted < 0.05))
    return summary


def probe_auc(features: np.ndarray, target: np.ndarray, seed: int) -> float:
    """5-fold cross-validated ROC AUC of a standardised logistic regression (a supervised diagnostic)."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(cross_val_score(probe, features, target, cv=5, scoring="roc_auc").mean())


def basis_mass(run_dir: Path, config: dict) -> dict:
    """Per basis: [K] mass of each vector on each parameter role (group-private, shared input, readout)."""
    options = config["task_options"]
    spec = make_spec(options["group_weights"], options["private_dims"], options["shared_dims"], options["width"],
                     options["shared_readout"], options["loss"], options["noise"])
    roles = parameter_roles(spec)
    out = {}
    for name in BASES:
        if not (run_dir / "basis" / name / "basis.json").exists():
            continue
        vectors = np.asarray(pj.Basis.load(run_dir / "basis" / name).vectors, dtype=float)
        out[name] = {role: (vectors[:, mask] ** 2).sum(axis=1).round(3).tolist() for role, mask in roles.items()}
    return out


def evaluate(run_dir: Path, second_order: str = "run", permutations: int = 200, seed: int = 0,
             alternatives=ALTERNATIVES) -> dict:
    run = RunDirectory(run_dir)
    config = run.config.to_dict()
    label_sets, _ = load_labels(run.path)
    groups = np.asarray(label_sets["group"].values)
    options = dict(min_cluster_size=run.config.min_cluster_size, min_samples_divisor=run.config.min_samples_divisor,
                   seed=seed)
    late_step = config["task_options"].get("late_step", 0)
    late_group = str(np.unique(groups)[-1]) if late_step else None
    report = {"run": str(run_dir), "second_order": second_order, "task_options": config["task_options"],
              "num_samples": int(groups.size)}
    main = pj.POLCAResult.load(run_dir / "polca" / "hessian")
    report["loss_gap"] = matched_loss_gap(main.loss, groups, exclude=(late_group,) if late_group else ())
    report["basis_mass"] = basis_mass(run_dir, config)
    exact = np.asarray(main.loss)  # [T, N]
    report["exact_loss"] = {
        "paper": score([analysis.cluster_signal(exact, min_cluster_size=options["min_cluster_size"],
                                                min_samples_divisor=options["min_samples_divisor"])], groups,
                       permutations, seed),
        **{f"shape+{m}": score([unsup.cluster_features(unsup.shape_features(exact.T), method=m,
                                                       **options)], groups, permutations, seed)
           for m in ("hdbscan", "kmeans", "gmm")},
    }
    target = groups == np.unique(groups)[0]
    report["probe_auc"] = {"exact_loss": probe_auc(exact.T, target, seed)}
    report["bases"] = {}
    for basis in BASES:
        if not (run_dir / "polca" / basis / "manifest.json").exists():
            continue
        result = main if basis == "hessian" else pj.POLCAResult.load(run_dir / "polca" / basis)
        projected = trajectories(result, second_order)
        kept = np.flatnonzero(analysis.kept_directions(projected))
        relying = analysis.relying_samples(projected)
        entry = {"kept_directions": kept.tolist(),
                 "relying_per_group": {str(g): relying[groups == g].sum(axis=0).tolist() for g in np.unique(groups)},
                 "outside_fraction_median": float(np.median(result.outside_fraction)),
                 "strategies": {}}
        for strategy, clusterer in alternatives:
            clusterings = unsup.strategy_clusterings(projected, strategy, clusterer=clusterer, **options)
            entry["strategies"][f"{strategy}+{clusterer}"] = score(clusterings, groups, permutations, seed)
            if late_group is not None:
                entry["strategies"][f"{strategy}+{clusterer}"]["late"] = late_cluster_step(
                    clusterings, projected, result.steps, groups, late_group, run)
        report["probe_auc"][basis] = {
            "profile": probe_auc(unsup.allocation_profiles(projected), target, seed),
            "trajectories": probe_auc(projected.transpose(1, 0, 2).reshape(groups.size, -1), target, seed),
        }
        report["bases"][basis] = entry
    if late_group is not None:
        window = run.config.window
        report["late"] = {"group": late_group, "planted_step": late_step, "window": window,
                          "oracle_step": late_breakthrough(main.loss, main.steps, groups, late_group, window)}
    return report


def late_cluster_step(clusterings, projected, steps, groups, late_group, run) -> dict | None:
    """The mean Eq. 9 breakthrough of the cluster best matching the late group (max F1): on its direction's
    projected loss (per-direction strategies) or, for the joint ones, on the members' projected loss summed over
    all directions (the part of their loss change the basis accounts for)."""
    recovery = {str(r.label): r for r in unsup.group_recovery(clusterings, groups)} if clusterings else {}
    record = recovery.get(late_group)
    if record is None or record.best is None:
        return None
    direction, cluster = record.best
    clustering = next(c for c in clusterings if c.direction == direction)
    members = clustering.members(cluster)
    curves = projected[:, members, direction] if direction is not None else projected[:, members].sum(axis=2)
    step = float(analysis.breakthrough_step(curves.T, steps, run.config.window).mean())
    return {"direction": direction, "size": int(members.size), "homogeneity": record.homogeneity,
            "recall": record.recall, "breakthrough_step": step}


def print_report(report: dict) -> None:
    gap = report["loss_gap"]
    print(f"# {report['run']}  (second order: {report['second_order']})")
    print(f"loss gap between groups {gap['groups']}: {gap['max_gap']:.4g} = {gap['relative']:.1%} of the fall")
    for basis, mass in report["basis_mass"].items():
        print(f"{basis} basis mass per role: " + "; ".join(f"{r}: {np.round(v, 2).tolist()}" for r, v in mass.items()))
    print("probe AUC (supervised diagnostic):", json.dumps(report["probe_auc"]))

    def row(name, s):
        groups = " ".join(f"{g}:{r['homogeneity']:.2f}/{r['recall']:.2f}{'*' if r['recovered'] else ''}"
                          for g, r in s["groups"].items())
        p = s.get("best_ari_pvalue")
        ptext = "" if p is None else f" p={p:.3f}"
        late = s.get("late")
        ltext = "" if not late else f" late-step={late['breakthrough_step']:.0f}"
        print(f"  {name:28s} clusters={s['clusters']:3d} ARI={s['best_ari']:.2f}{ptext} cov="
              f"{s['best_ari_coverage'] if s['best_ari_coverage'] is None else round(s['best_ari_coverage'], 2)} "
              f"beat-null={s['clusters_beating_null']} {groups} all={s['all_recovered']}{ltext}")

    print("exact loss:")
    for name, s in report["exact_loss"].items():
        row(name, s)
    for basis, entry in report["bases"].items():
        print(f"{basis}: kept {entry['kept_directions']}, outside fraction {entry['outside_fraction_median']:.3f}, "
              f"relying per group {entry['relying_per_group']}")
        for name, s in entry["strategies"].items():
            row(name, s)
    if "late" in report:
        print("late:", report["late"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--second-order", default="run", choices=("run", "none", "trapezoid"))
    parser.add_argument("--permutations", type=int, default=200)
    args = parser.parse_args(argv)
    report = evaluate(args.run_dir, args.second_order, args.permutations)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=float))


if __name__ == "__main__":
    sys.exit(main())
