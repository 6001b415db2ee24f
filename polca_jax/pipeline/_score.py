"""The score stage: the filters, every cluster's breakthrough (Eqs. 9-10) and its scores against every label set, for
every strategy, to ``metrics.json``. Host code: it reads only the run directory.

``metrics.json``::

    settings    window_steps (Δ), threshold_step (τ) and where τ came from
    num_samples N
    filters     per basis with projected-loss trajectories: directions kept by the oscillation filter, dropped ones,
                and per direction the samples relying on it
    variants    per strategy: label, basis, trajectory, clusterings, clusters, hidden-breakthrough fraction,
                breakthroughs, and per label set its class, maximum homogeneity and top clusters (Tables 1, 8, 10);
                ``clusters`` lists every cluster with its breakthrough, its scores against each label set and (when
                the task has sample texts) the samples nearest its medoid
"""

from __future__ import annotations

import numpy as np

import polca_jax as pj
from polca_jax import analysis
from polca_jax._files import write_json_atomic
from polca_jax.pipeline._rundir import RunDirectory, load_labels
from polca_jax.pipeline._stages import NEAREST_SAMPLES, variant_trajectories, variants_of
from polca_jax.pipeline._task import LabelSet

TOP_CLUSTERS = 3
THRESHOLD_FRACTION = 0.9  # automatic τ: where the mean exact loss has made this fraction of its fall


def score_stage(run: RunDirectory) -> dict:
    """Write ``metrics.json`` (see the module docstring); returns a summary for the stage record."""
    config = run.config
    label_sets, texts = load_labels(run.path)
    results = {}

    def result_of(basis: str) -> pj.POLCAResult:
        if basis not in results:
            results[basis] = pj.POLCAResult.load(run / "polca" / basis)
        return results[basis]

    main = result_of("hessian")
    threshold, source = threshold_step(config.threshold_step, main)
    window = config.window
    variants, filters = {}, {}
    for variant in variants_of(config):
        result = result_of(variant.basis)
        trajectories, steps = variant_trajectories(result, variant.trajectory)
        clusterings = analysis.load_clusterings(run / "clusters" / f"{variant.name}.npz")
        if variant.trajectory == "projected_loss":
            filters[variant.basis] = filter_summary(trajectories)
        variants[variant.name] = variant_scores(variant, clusterings, trajectories, steps, label_sets, texts,
                                                window, threshold)
    metrics = {
        "settings": {"window_steps": window, "threshold_step": threshold, "threshold_source": source},
        "num_samples": int(main.loss.shape[1]),
        "filters": filters,
        "variants": variants,
    }
    write_json_atomic(run / "metrics.json", metrics)
    return {"variants": list(variants), "threshold_step": threshold}


def threshold_step(configured: int | None, result: pj.POLCAResult) -> tuple[int, str]:
    """τ of Eq. 10 and where it came from: the configured step, or the first checkpoint at which the mean exact loss
    has made ``THRESHOLD_FRACTION`` of its fall from the first checkpoint to its minimum."""
    if configured is not None:
        return int(configured), "config"
    mean = np.asarray(result.loss).mean(axis=1)
    fall = mean[0] - mean.min()
    if not fall > 0:
        return int(result.steps[-1]), "automatic: the mean exact loss never fell, so τ is the last step"
    first = int(np.argmax(mean[0] - mean >= THRESHOLD_FRACTION * fall))
    return int(result.steps[first]), (f"automatic: the first checkpoint where the mean exact loss has made "
                                      f"{THRESHOLD_FRACTION:.0%} of its fall")


def filter_summary(projected_loss: np.ndarray) -> dict:
    """The paper's two filters on ``[T, N, K]`` projected losses, as JSON."""
    kept = analysis.kept_directions(projected_loss)
    mean_curve = np.asarray(projected_loss).mean(axis=1)  # [T, K]
    return {
        "num_directions": int(kept.size),
        "kept_directions": np.flatnonzero(kept).tolist(),
        "dropped_directions": np.flatnonzero(~kept).tolist(),
        "mean_final_projected_loss": (mean_curve[-1] - mean_curve[0]).tolist(),
        "relying_samples": analysis.relying_samples(projected_loss).sum(axis=0).tolist(),
    }


def variant_scores(variant, clusterings: list[analysis.Clustering], trajectories: np.ndarray, steps: np.ndarray,
                   label_sets: dict[str, LabelSet], texts, window: int, threshold: int) -> dict:
    """One strategy's entry of ``metrics.json``."""
    per_direction = trajectories.ndim == 3
    breakthroughs = breakthrough_records(clusterings, trajectories, steps, window)
    for record in breakthroughs:
        record["hidden"] = record["mean_step"] > threshold
    hidden = [record["hidden"] for record in breakthroughs]
    scores = {name: label_scores(clusterings, label_set, label_sets) for name, label_set in label_sets.items()}
    summary = {}
    for name, records in scores.items():
        top = analysis.top_clusters(records, TOP_CLUSTERS, qualifying_only=per_direction)
        best = analysis.max_homogeneity(records, qualifying_only=per_direction)
        summary[name] = {
            "class": label_sets[name].positive,
            "max_homogeneity": None if np.isnan(best) else best,
            "top_clusters": [_score_json(record) for record in top],
        }
    by_cluster = {(b["direction"], b["cluster"]): b for b in breakthroughs}
    cluster_records = []
    for index, clustering in enumerate(clusterings):
        for cluster in range(clustering.num_clusters):
            members = clustering.members(cluster)
            breakthrough = by_cluster.get((clustering.direction, cluster), {})
            record = {
                "direction": clustering.direction, "cluster": cluster, "size": int(members.size),
                "breakthrough_step": breakthrough.get("mean_step"), "hidden": breakthrough.get("hidden"),
                "labels": {name: _score_json(_find(records, clustering.direction, cluster), brief=True)
                           for name, records in scores.items()},
            }
            if texts is not None:
                record["nearest_samples"] = nearest_to_medoid(trajectories, clustering, members).tolist()
            cluster_records.append(record)
    return {
        "label": variant.label,
        "basis": variant.basis,
        "trajectory": variant.trajectory,
        "num_directions": len(clusterings),
        "num_clusters": sum(c.num_clusters for c in clusterings),
        "hidden_breakthrough_fraction": float(np.mean(hidden)) if hidden else None,
        "breakthroughs": breakthroughs,
        "label_sets": summary,
        "clusters": cluster_records,
    }


def label_scores(clusterings, label_set: LabelSet, label_sets: dict[str, LabelSet]) -> list[analysis.ClusterScore]:
    """Every cluster scored against one label set, with its qualifier (if any) applied."""
    qualifier = label_set.qualifier
    qualifying = None
    if qualifier is not None:
        qualifying = np.isin(label_sets[qualifier.label_set].values, np.asarray(qualifier.classes))
    return analysis.cluster_label_scores(
        clusterings, label_set.values, positive=label_set.positive, qualifying=qualifying,
        **({} if qualifier is None else {"min_qualifying_fraction": qualifier.min_fraction}))


def breakthrough_records(clusterings: list[analysis.Clustering], trajectories: np.ndarray, steps: np.ndarray,
                         window_steps: int) -> list[dict]:
    """``{"direction", "cluster", "size", "mean_step"}`` for every cluster: its mean Eq. 9 breakthrough step on the
    clustered trajectories ``[T, N(, K)]`` at ``steps [T]``."""
    clustered = [c for c in clusterings if c.num_clusters]
    found = analysis.cluster_breakthroughs(clustered, trajectories, steps, window_steps) if clustered else []
    return [{"direction": b.direction, "cluster": b.cluster, "size": b.size, "mean_step": b.mean_step} for b in found]


def nearest_to_medoid(trajectories: np.ndarray, clustering: analysis.Clustering, members: np.ndarray) -> np.ndarray:
    """int[≤ NEAREST_SAMPLES]: the cluster's members nearest its medoid in trajectory space, the medoid first."""
    direction = clustering.direction
    curves = np.asarray(trajectories[:, members] if direction is None else trajectories[:, members, direction]).T
    centre = curves[analysis.medoid(curves)]
    order = np.argsort(np.linalg.norm(curves - centre, axis=1), kind="stable")
    return members[order[:NEAREST_SAMPLES]]


def _find(records: list[analysis.ClusterScore], direction, cluster) -> analysis.ClusterScore:
    return next(r for r in records if r.direction == direction and r.cluster == cluster)


def _score_json(record: analysis.ClusterScore, brief: bool = False) -> dict:
    scores = {"class": record.label, "homogeneity": record.homogeneity, "recall": record.recall, "f1": record.f1,
              "base_rate": record.base_rate, "qualifies": record.qualifies}
    if brief:
        return scores
    return {"direction": record.direction, "cluster": record.cluster, "size": record.size, **scores}
