"""Ground-truth scores of a planted-mechanism run, from its run directory (host code): how far apart the groups'
exact-loss curves are, each strategy's adjusted Rand index and per-group recovery, and the planted breakthrough
against the one found. The same functions feed the report section and ``experiments/planted``."""

from __future__ import annotations

import numpy as np

from polca_jax import analysis
from polca_jax.analysis import adjusted_rand, group_recovery
from polca_jax.errors import PolcaError
from polca_jax.pipeline import (EXACT_LOSS, FIRST_ORDER_POLCA, GRADIENT_NORMS, POLCA, POLCA_GRADIENTS, POLCA_PROFILE,
                                RANDOM_GRADIENTS, RANDOM_POLCA, RANDOM_PROFILE)

REPORTED_VARIANTS = (POLCA, EXACT_LOSS, RANDOM_POLCA, FIRST_ORDER_POLCA, POLCA_PROFILE, RANDOM_PROFILE,
                     POLCA_GRADIENTS, RANDOM_GRADIENTS, GRADIENT_NORMS)


def matched_loss_gap(loss, groups, *, exclude=()) -> dict:
    """How far apart the groups' mean exact-loss curves are, loss float[T, N] and groups [N].

    Returns ``{"max_gap": max_t max_{g,h} |mean_g L_t − mean_h L_t|, "fall": mean L_0 − min_t mean L_t (all
    compared samples), "relative": max_gap / fall, "at_step_index": argmax t}`` over the groups not in ``exclude``
    (e.g. a late group, which is meant to differ)."""
    loss = np.asarray(loss, dtype=float)
    groups = np.asarray(groups)
    names = [g for g in np.unique(groups) if g not in set(exclude)]
    if len(names) < 2:
        raise PolcaError(f"need at least 2 groups to compare, got {names}")
    means = np.stack([loss[:, groups == g].mean(axis=1) for g in names], axis=1)  # [T, G]
    gaps = means.max(axis=1) - means.min(axis=1)
    compared = np.isin(groups, names)
    mean = loss[:, compared].mean(axis=1)
    fall = float(mean[0] - mean.min())
    return {"groups": [str(g) for g in names], "max_gap": float(gaps.max()), "fall": fall,
            "relative": float(gaps.max() / fall) if fall > 0 else float("nan"), "at_step_index": int(gaps.argmax())}


def strategy_summary(clusterings: list[analysis.Clustering], groups) -> dict:
    """One strategy's ground-truth scores: the best clustering's ARI (NaN-free maximum over its clusterings, with
    that clustering's direction and the fraction of all N samples it clustered), the number of clusterings with an
    ARI, and per group its :class:`~polca_jax.analysis.GroupRecovery` as a dict."""
    groups = np.asarray(groups)
    aris = [(adjusted_rand(c, groups), c) for c in clusterings]
    scored = [(a, c) for a, c in aris if np.isfinite(a)]
    best_ari, best = max(scored, key=lambda pair: pair[0]) if scored else (float("nan"), None)
    recovery = group_recovery(clusterings, groups) if clusterings else []
    return {
        "best_ari": best_ari,
        "best_ari_direction": None if best is None else best.direction,
        "best_ari_coverage": None if best is None else float(np.mean(best.labels >= 0)),
        "clusterings_with_ari": len(scored),
        "clusters": sum(c.num_clusters for c in clusterings),
        "groups": {str(r.label): {"homogeneity": r.homogeneity, "recall": r.recall, "f1": r.f1,
                                  "recovered": r.recovered, "best": r.best} for r in recovery},
        "all_recovered": bool(recovery) and all(r.recovered for r in recovery),
    }


def late_breakthrough(loss, steps, groups, late_group, window_steps: float) -> float:
    """The planted group's own breakthrough: the mean Eq. 9 step (the package's sign convention) of its members'
    exact-loss curves, loss float[T, N] at steps [T]."""
    members = np.asarray(groups) == late_group
    return float(analysis.breakthrough_step(np.asarray(loss)[:, members].T, steps, window_steps).mean())


def planted_report_sections(run) -> list[str]:
    """The report's section on the planted ground truth (``run``: a :class:`polca_jax.pipeline.RunView`)."""
    if run.result is None or "group" not in run.label_sets:
        return []
    groups = run.label_sets["group"].values
    options = run.config.get("task_options", {})
    late_step = int(options.get("late_step", 0) or 0)
    late_group = str(np.unique(groups)[-1]) if late_step else None
    compared = [g for g in np.unique(groups) if str(g) != late_group]  # the late group is meant to differ
    parts = ["## Planted ground truth"]
    if len(compared) >= 2:
        gap = matched_loss_gap(run.result.loss, groups, exclude=(late_group,) if late_group else ())
        parts.append(f"Groups {', '.join(gap['groups'])}: the largest gap between their mean exact-loss curves is "
                     f"{gap['max_gap']:.4g} (at step {int(run.result.steps[gap['at_step_index']])}), "
                     f"{gap['relative']:.1%} of the mean loss's fall ({gap['fall']:.4g}).")
    table = ["| Strategy | Clusters | Best ARI (direction, coverage) | " + " | ".join(
                 f"Group {g}: homogeneity / recall (recovered)" for g in np.unique(groups)) + " |",
             "|---" * (3 + np.unique(groups).size) + "|"]
    for name in REPORTED_VARIANTS:
        clusterings = run.clusterings.get(name)
        if clusterings is None:
            continue
        summary = strategy_summary(clusterings, groups)
        ari = ("n/a" if not np.isfinite(summary["best_ari"]) else
               f"{summary['best_ari']:.2f} ({_direction_text(summary['best_ari_direction'])}, "
               f"{summary['best_ari_coverage']:.0%})")
        cells = [f"{r['homogeneity']:.2f} / {r['recall']:.2f} ({'yes' if r['recovered'] else 'no'})"
                 for r in summary["groups"].values()]
        label = run.variants[name].label if name in run.variants else name
        table.append(f"| {label} | {summary['clusters']} | {ari} | "
                     + " | ".join(cells) + " |")
    parts += ["\n".join(table),
              "ARI: scikit-learn's adjusted Rand index over the samples a clustering put in a cluster (kept by its "
              "filter, not noise), best over the strategy's clusterings; recall over all members of the group; "
              "recovered: some cluster has homogeneity >= 0.9 at recall >= 0.5."]
    if late_group is not None:
        window = run.window_steps or 5 * int(run.config.get("polca_every", 10))
        oracle = late_breakthrough(run.result.loss, run.result.steps, groups, late_group, float(window))
        parts += [f"Planted late breakthrough: group {late_group} enters training at step {late_step}; Eq. 9 on "
                  f"its members' exact-loss curves gives step {oracle:.0f} (Δ = {window})."]
        clusterings = run.clusterings.get(POLCA, [])
        best = strategy_summary(clusterings, groups)["groups"].get(late_group, {}).get("best") if clusterings else None
        found = None if best is None else run.variant_clusters(POLCA, best[0]).get(best[1])
        if found is not None and found.breakthrough_step is not None:
            parts.append(f"POLCA's cluster best matching group {late_group} (direction {best[0]}, cluster {best[1]}) "
                         f"has its breakthrough at step {found.breakthrough_step:.0f}.")
    return parts


def _direction_text(direction) -> str:
    return "all directions" if direction is None else f"direction {direction}"
