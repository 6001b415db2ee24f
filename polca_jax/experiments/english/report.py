"""Markdown report with PNG figures for one English run directory (the paper's §5.1, Figs. 5 and 9–11).

:func:`write_report` reads the files the English pipeline writes into a run directory (``config.json``,
``metrics.jsonl``, ``polca/hessian/``, ``basis/hessian/``, ``clusters/{polca,exact_loss}.npz``, ``metrics.json``,
``labels.json``, ``stages/<stage>.json``; any of them may be missing) and writes ``report/report.md`` with its
figures in ``report/figures/``: a summary beside the paper's numbers (:data:`PAPER_ENGLISH_RESULTS`), the training
curves, the exact-loss baseline clusters, and for every kept direction its clusters' projected and exact loss with
their labels, top tokens and the contexts nearest their medoids.

Directions are 0-based indices into the basis: the paper's "basis vector 13" is our direction 12.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polca_jax.analysis import Clustering
from polca_jax._decomposition import POLCAResult
from polca_jax.experiments import reporting
from polca_jax.experiments.reporting import MISSING

PAPER_ENGLISH_RESULTS = {
    "num_directions": 30,
    "kept_directions": 26,
    "mean_tokens_dropped": 6655.5,
    "num_samples": 12_600,
    "directions_with_simple_label": 22,
    "exact_loss_clusters": ("repeated tokens", "continuing a noun (nouns of several tokens)"),
}
"""The paper's English numbers (§5.1, Appendix E.2, Fig. 9)."""

STAGES = ("train", "basis", "decompose", "cluster", "label")
MAIN_BASIS = "hessian"
REPORT_CONTEXTS = 3  # contexts nearest the medoid shown per cluster (as in the paper's Fig. 5); labels.json has all
LEGEND_LABEL_CHARS = 48


@dataclass(frozen=True)
class _Run:
    """What a run directory holds; None (or empty) for the parts it lacks."""

    directory: Path
    config: dict
    log: list[dict]
    metrics: dict | None
    labels: dict | None
    result: POLCAResult | None
    basis_steps: np.ndarray
    clusterings: dict[str, list[Clustering]]
    stages: dict[str, dict]

    def setting(self, name: str):
        """A breakthrough setting (window_steps, threshold_step): from metrics.json, else the config."""
        return (self.metrics or {}).get("settings", {}).get(name, self.config.get(name))

    def breakthroughs(self, variant: str) -> list[dict]:
        return (self.metrics or {}).get("variants", {}).get(variant, {}).get("breakthroughs", [])

    def cluster_records(self, variant: str, direction) -> dict[int, dict]:
        """cluster -> its labels.json record, for one direction (None: the exact-loss baseline)."""
        records = (self.labels or {}).get("variants", {}).get(variant, [])
        return {r["cluster"]: r for r in records if r.get("direction") == direction}


def _load_run(run_dir: Path) -> _Run:
    return _Run(
        directory=run_dir,
        config=reporting.read_json(run_dir / "config.json") or {},
        log=reporting.read_log(run_dir / "metrics.jsonl"),
        metrics=reporting.read_json(run_dir / "metrics.json"),
        labels=reporting.read_json(run_dir / "labels.json"),
        result=reporting.read_result(run_dir / "polca" / MAIN_BASIS),
        basis_steps=reporting.read_basis_steps(run_dir / "basis" / MAIN_BASIS),
        clusterings=reporting.read_clusterings(run_dir),
        stages=reporting.read_stages(run_dir),
    )


# ---------------------------------------------------------------- summary


def _simply_labelled_directions(run: _Run) -> list[int]:
    """POLCA directions with at least one cluster whose label is simple."""
    records = (run.labels or {}).get("variants", {}).get("polca", [])
    return sorted({r["direction"] for r in records if r["label"]["simple"]})


def _summary_table(run: _Run) -> str:
    """The paper's English summary numbers (§5.1), ours beside theirs."""
    paper = PAPER_ENGLISH_RESULTS
    filters = (run.metrics or {}).get("filters")
    variants = (run.metrics or {}).get("variants", {})
    rows = []
    if filters is None:
        rows.append(["directions kept by the oscillation filter", "metrics.json missing",
                     str(paper["kept_directions"])])
    else:
        kept, num_samples = filters["kept_directions"], run.metrics["num_samples"]
        dropped_tokens = [num_samples - filters["relying_samples"][k] for k in kept]
        rows += [
            ["basis directions", str(filters["num_directions"]), str(paper["num_directions"])],
            ["kept by the oscillation filter (mean projected loss falls)", str(len(kept)),
             str(paper["kept_directions"])],
            ["dropped by it", ", ".join(map(str, filters["dropped_directions"])) or "none",
             str(paper["num_directions"] - paper["kept_directions"])],
            ["tokens dropped per kept direction (mean; their projected loss rises)",
             f"{np.mean(dropped_tokens):.1f} of {num_samples}" if kept else MISSING,
             f"{paper['mean_tokens_dropped']} of {paper['num_samples']}"],
        ]
    if run.labels is None:
        rows.append(["kept directions with a simply-labelled cluster", "labels.json missing",
                     f"{paper['directions_with_simple_label']} of {paper['kept_directions']}"])
    else:
        kept_count = len((filters or {}).get("kept_directions", []))
        rows.append(["kept directions with a simply-labelled cluster",
                     f"{len(_simply_labelled_directions(run))} of {kept_count}",
                     f"{paper['directions_with_simple_label']} of {paper['kept_directions']}"])
    threshold = run.setting("threshold_step")
    for variant, name in (("polca", "POLCA"), ("exact_loss", "exact-loss baseline")):
        info = variants.get(variant)
        rows.append([f"{name} clusters", MISSING if info is None else str(info["num_clusters"]),
                     "not reported" if variant == "polca" else "2"])
        rows.append([f"{name}: fraction of clusters with a breakthrough after τ = {threshold}",
                     MISSING if info is None else reporting.number(info["hidden_breakthrough_fraction"]),
                     "not reported"])
    return reporting.markdown_table(["Quantity", "This run", "Paper"], rows)


# ---------------------------------------------------------------- cluster tables


def _token_list(top_tokens) -> str:
    return ", ".join(f"{json.dumps(token, ensure_ascii=False)} ×{count}" for token, count in top_tokens)


def _label_text(record: dict | None) -> str:
    if record is None:
        return "not labelled"
    label = record["label"]
    return f"{'**simple**: ' if label['simple'] else ''}{label['text']}"


def _short_label(record: dict | None) -> str | None:
    """The label for a legend: its target and −1 offsets, at most ``LEGEND_LABEL_CHARS`` characters."""
    if record is None:
        return None
    text = " · ".join(record["label"]["text"].split(" · ")[:2])
    return text if len(text) <= LEGEND_LABEL_CHARS else text[: LEGEND_LABEL_CHARS - 1] + "…"


def _clusters_section(records: dict[int, dict], clusters) -> list[str]:
    """A table of the clusters (size, label, breakthrough, top tokens) and their contexts nearest the medoid."""
    rows = []
    for cluster in clusters:
        record = records.get(cluster)
        step = None if record is None else record.get("breakthrough_step")
        rows.append([
            str(cluster), MISSING if record is None else str(record["size"]), _label_text(record),
            MISSING if step is None else f"{step:.0f}{' (after τ)' if record.get('hidden') else ''}",
            MISSING if record is None else _token_list(record["top_tokens"]),
        ])
    parts = [reporting.markdown_table(["Cluster", "Tokens", "Label (POS/token tags covering the cluster)",
                                       "Breakthrough step", "Top target tokens"], rows)]
    lines = [
        f"c{cluster} │ {context.replace('```', 'ˋˋˋ')}"
        for cluster in clusters if cluster in records
        for context in records[cluster]["nearest_contexts"][:REPORT_CONTEXTS]
    ]
    if lines:
        parts.append(f"Contexts nearest each cluster's medoid (target in ⟦ ⟧, newlines as ⏎; first "
                     f"{REPORT_CONTEXTS}, all in labels.json):\n\n```\n" + "\n".join(lines) + "\n```")
    return parts


# ---------------------------------------------------------------- figures


def _training_figure(run: _Run, figures_dir: Path) -> str | None:
    """Training loss (of each step's batch) and validation loss (of the evaluation contexts) from metrics.jsonl."""
    rows = [row for row in run.log if "step" in row]
    if not rows:
        return None
    figure, (ax,) = reporting.new_figure(1, panel_width=6.5)
    for key, color, label in (("loss", "0.5", "training batch"), ("validation_loss", "black", "validation")):
        points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
        if points:
            ax.plot(*zip(*points), color=color, label=label)
    reporting.mark_steps(ax, run.setting("threshold_step"))
    ax.set(title="language-model loss", xlabel="training step", ylabel="cross-entropy (nats / token)")
    ax.legend(fontsize=8)
    return reporting.save_figure(figure, figures_dir, "training_curves")


def _clusters_figure(run: _Run, variant: str, clustering: Clustering, clusters, name: str,
                     figures_dir: Path) -> str:
    """POLCA: a direction's projected loss per cluster beside the same clusters' exact loss (Fig. 5); the exact-loss
    baseline: its clusters' exact loss (Fig. 9). Median and 25–75% band; dots at mean breakthrough steps."""
    result, direction = run.result, clustering.direction
    records = run.cluster_records(variant, direction)
    names = {cluster: _short_label(records.get(cluster)) for cluster in clusters}
    breakthroughs = reporting.breakthrough_steps(run.breakthroughs(variant), direction)
    threshold = run.setting("threshold_step")
    if direction is None:
        figure, (exact_ax,) = reporting.new_figure(1, panel_width=7.0, height=4.2)
        reporting.plot_cluster_curves(exact_ax, result.steps, result.loss, clustering, clusters, breakthroughs,
                                      names)
        exact_ax.set(title=f"exact-loss clusters ({reporting.clusters_title(clustering, clusters)})")
    else:
        figure, (projected_ax, exact_ax) = reporting.new_figure(2, panel_width=6.0, height=4.2)
        projected = reporting.direction_projected_loss(result, direction)
        reporting.plot_cluster_curves(projected_ax, result.steps, projected, clustering, clusters, breakthroughs)
        reporting.plot_cluster_curves(exact_ax, result.steps, result.loss, clustering, clusters, {}, names)
        reporting.mark_steps(projected_ax, threshold, run.basis_steps)
        projected_ax.set(title=f"direction {direction}: projected loss", ylabel="projected loss $L_b$")
        exact_ax.set(title=f"exact loss of the same clusters ({reporting.clusters_title(clustering, clusters)})")
    reporting.mark_steps(exact_ax, threshold, run.basis_steps if direction is not None else ())
    exact_ax.set_ylabel("exact loss")
    exact_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return reporting.save_figure(figure, figures_dir, name)


# ---------------------------------------------------------------- report


def _exact_loss_section(run: _Run, figures_dir: Path) -> list[str]:
    parts = ["## Exact-loss baseline clusters (Fig. 9)"]
    clusterings = run.clusterings.get("exact_loss")
    if not clusterings or run.result is None:
        return parts + ["*clusters/exact_loss.npz or polca/hessian/ is missing.*"]
    clustering = clusterings[0]
    clusters = list(range(clustering.num_clusters))
    if not clusters:
        return parts + ["*HDBSCAN found no cluster in the exact-loss trajectories.*"]
    shown = reporting.shown_clusters(clustering)
    link = _clusters_figure(run, "exact_loss", clustering, shown, "exact_loss_clusters", figures_dir)
    parts.append(reporting.figure_markdown(
        link, "Exact-loss clusters",
        "Median exact loss and 25–75% band of each cluster of exact-loss trajectories; dots mark mean breakthrough "
        f"steps. The paper finds only \"{PAPER_ENGLISH_RESULTS['exact_loss_clusters'][0]}\" and "
        f"\"{PAPER_ENGLISH_RESULTS['exact_loss_clusters'][1]}\", with breakthroughs only early in training."))
    return parts + _clusters_section(run.cluster_records("exact_loss", None), clusters)


def _directions_section(run: _Run, figures_dir: Path) -> list[str]:
    parts = ["## POLCA clusters per kept direction (Figs. 5, 10, 11)"]
    clusterings = run.clusterings.get("polca")
    if not clusterings or run.result is None:
        return parts + ["*clusters/polca.npz or polca/hessian/ is missing.*"]
    window = run.setting("window_steps")
    parts.append(
        f"Each kept direction's clusters: left, the median projected loss and 25–75% band per cluster, dots at each "
        f"cluster's mean breakthrough step (Eq. 9, Δ = {window}; dotted line τ = {run.setting('threshold_step')}); "
        "right, the exact loss of the same tokens, with each cluster's label. Look for sharp projected-loss changes "
        "that the smooth exact loss hides. Dashed lines: steps where basis directions were found.")
    unclustered = [c.direction for c in clusterings if c.num_clusters == 0]
    if unclustered:
        parts.append(f"Kept directions where HDBSCAN found no cluster: {', '.join(map(str, unclustered))}.")
    for clustering in clusterings:
        if clustering.num_clusters == 0:
            continue
        direction = clustering.direction
        shown = reporting.shown_clusters(clustering)
        parts.append(f"### Direction {direction}")
        parts.append(reporting.figure_markdown(
            _clusters_figure(run, "polca", clustering, shown, f"polca_direction_{direction}", figures_dir),
            f"POLCA direction {direction}",
            f"Direction {direction}: {reporting.clusters_title(clustering, shown)} of "
            f"{int((clustering.labels >= 0).sum())} clustered tokens."))
        parts += _clusters_section(run.cluster_records("polca", direction), range(clustering.num_clusters))
    return parts


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report/report.md`` and its PNG figures in ``run_dir/report/figures/``; returns the report path.

    Reads whatever the run directory holds (see the module docstring) and says in the report what is missing.
    PNGs left in the figures folder by an earlier report are removed first.
    """
    run = _load_run(Path(run_dir))
    report_dir = run.directory / "report"
    figures_dir = reporting.figures_directory(report_dir)
    training = _training_figure(run, figures_dir)
    labels_note = "" if run.labels is None else (
        f" Labels: `{run.labels['tagger']}` tagger, tags covering {run.labels['coverage']:.0%} of a cluster at each "
        f"offset (target, −1, −2, −3); simple if no offset needs more than {run.labels['max_simple_tags']} tags.")
    parts = [
        f"# POLCA English language-model run — preset `{run.config.get('preset', 'unknown')}`",
        f"Run directory: `{run.directory}`. Data: `{run.config.get('data', MISSING)}`. Directions are 0-based basis "
        "indices (the paper's basis vector 13 is our direction 12)." + labels_note,
        "## Summary",
        _summary_table(run),
        "## Training",
        reporting.figure_markdown(training, "Training curves", "Loss of each training batch and of the evaluation "
                                  "contexts (metrics.jsonl); the dotted line is τ, after which a breakthrough counts "
                                  "as late.") if training else "*metrics.jsonl is missing.*",
        *_exact_loss_section(run, figures_dir),
        *_directions_section(run, figures_dir),
        "## Configuration",
        reporting.config_table(run.config) if run.config else "*config.json is missing.*",
        "## Stage wall times",
        reporting.stages_table(run.stages, STAGES),
    ]
    report_path = report_dir / "report.md"
    report_path.write_text("\n\n".join(parts) + "\n")
    return report_path
