"""Markdown report with PNG figures for one arithmetic run directory (the paper's Tables 1, 8-11; Figures 3, 4, 6-8).

:func:`write_report` reads the files the arithmetic pipeline writes into a run directory (``config.json``,
``metrics.jsonl``, ``labels.npz``, ``polca/<basis>/``, ``basis/<basis>/``, ``clusters/<variant>.npz``,
``metrics.json``, ``stages/<stage>.json``; any of them may be missing) and writes ``report/report.md`` with its
figures in ``report/figures/``. Every table puts the paper's number (:data:`PAPER_ARITHMETIC_RESULTS`) beside ours;
a variant the run did not produce is reported as "not run".

Directions are 0-based indices into the basis: the paper's "basis vector #1" is our direction 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np

from polca_jax.analysis import PLACE_1S, Clustering
from polca_jax._decomposition import POLCAResult
from polca_jax.experiments import reporting
from polca_jax.experiments.arithmetic.task import ANSWER_PLACES
from polca_jax.experiments.reporting import MAX_CLUSTERS_PER_PANEL, MISSING

PAPER_ARITHMETIC_RESULTS = {
    "exact_loss": {"hidden_breakthrough_fraction": 0.0, "top_clusters": [(0.514, 0.771, 0.617)]},
    "loss_change": {"hidden_breakthrough_fraction": 0.0, "top_clusters": [(0.524, 0.958, 0.678)]},
    "fisher": {
        "hidden_breakthrough_fraction": 0.284,
        "top_clusters": [(0.664, 0.947, 0.781), (0.643, 0.740, 0.688), (0.637, 0.874, 0.737)],
    },
    "lca": {
        "hidden_breakthrough_fraction": 0.019,
        "top_clusters": [(0.792, 0.772, 0.782), (0.614, 0.873, 0.721), (0.592, 0.626, 0.609)],
    },
    "first_order_polca": {
        "hidden_breakthrough_fraction": 0.307,
        "top_clusters": [(0.948, 0.767, 0.848), (0.928, 0.769, 0.841), (0.887, 0.751, 0.813)],
    },
    "polca": {
        "hidden_breakthrough_fraction": 0.355,
        "top_clusters": [(0.973, 0.736, 0.838), (0.946, 0.773, 0.850), (0.903, 0.762, 0.827)],
    },
    "random_basis": {
        "hidden_breakthrough_fraction": 0.031,
        "top_clusters": [(0.902, 0.655, 0.759), (0.858, 0.533, 0.658), (0.838, 0.586, 0.689)],
    },
    "shuffled_hessian": {
        "hidden_breakthrough_fraction": 0.304,
        "top_clusters": [(0.856, 0.699, 0.769), (0.852, 0.734, 0.789), (0.834, 0.730, 0.779)],
    },
}
"""The paper's arithmetic numbers per variant: the hidden-breakthrough fraction (Tables 1, 9, 11) and the
(homogeneity, recall, F1) of the top carry clusters (Tables 8, 10). Table 1's maximum carry homogeneity is the first
of these rows (0.514, 0.524, 0.792, 0.973 in the paper)."""

# Rows of each table: (variant, the paper's name for it).
TABLE_1_ROWS = (
    ("exact_loss", "Exact loss"),
    ("loss_change", "Change in exact loss"),
    ("lca", "LCA (Lan et al., 2020)"),
    ("polca", "POLCA"),
)
TABLE_8_ROWS = (
    ("exact_loss", "Loss"),
    ("loss_change", "Change in exact loss"),
    ("fisher", "Fisher information"),
    ("lca", "LCA"),
    ("first_order_polca", "First-order POLCA"),
    ("polca", "POLCA"),
)
TABLE_10_ROWS = (
    ("random_basis", "Random orthonormal"),
    ("shuffled_hessian", "Random shuffled Hessian"),
    ("polca", "POLCA (top Hessian)"),
)
TABLE_8_TOP = 3
STAGES = ("train", "basis", "decompose", "cluster")
MAIN_BASIS = "hessian"
MAX_DIRECTION_FIGURES = 4
NOT_RUN = "not run"

PLACE_COLORS = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85, len(ANSWER_PLACES)))
SKILLS = tuple(
    (place, has_carry)
    for place in range(len(ANSWER_PLACES))
    for has_carry in (True, False)
    if not (has_carry and place == PLACE_1S)
)
"""(place, carry) categories of answer tokens; the 1s digit never receives a carry."""


@dataclass(frozen=True)
class _Run:
    """What a run directory holds; None (or empty) for the parts it lacks."""

    directory: Path
    config: dict
    log: list[dict]
    metrics: dict | None
    place: np.ndarray | None
    carry: np.ndarray | None
    result: POLCAResult | None
    basis_steps: np.ndarray
    clusterings: dict[str, list[Clustering]]
    stages: dict[str, dict]

    @property
    def variants(self) -> dict:
        return (self.metrics or {}).get("variants", {})

    def setting(self, name: str):
        """A breakthrough setting (window_steps, threshold_step): from metrics.json, else the config; None if absent."""
        return (self.metrics or {}).get("settings", {}).get(name, self.config.get(name))

    def setting_text(self, name: str) -> str:
        value = self.setting(name)
        return MISSING if value is None else str(value)


def _load_run(run_dir: Path) -> _Run:
    """Everything :func:`write_report` uses; labels are flattened in the order of the per-sample losses."""
    labels = np.load(run_dir / "labels.npz") if (run_dir / "labels.npz").is_file() else None
    return _Run(
        directory=run_dir,
        config=reporting.read_json(run_dir / "config.json") or {},
        log=reporting.read_log(run_dir / "metrics.jsonl"),
        metrics=reporting.read_json(run_dir / "metrics.json"),
        place=None if labels is None else labels["place"].reshape(-1),
        carry=None if labels is None else labels["carry"].astype(bool).reshape(-1),
        result=reporting.read_result(run_dir / "polca" / MAIN_BASIS),
        basis_steps=reporting.read_basis_steps(run_dir / "basis" / MAIN_BASIS),
        clusterings=reporting.read_clusterings(run_dir),
        stages=reporting.read_stages(run_dir),
    )


# ---------------------------------------------------------------- tables


def _summary_table(run: _Run, rows, with_homogeneity: bool) -> str:
    """Tables 1, 9, 11: per strategy, (max carry homogeneity,) hidden-breakthrough fraction and cluster count."""
    header = ["Strategy"]
    if with_homogeneity:
        header += ["Max carry homogeneity (ours)", "(paper)"]
    header += ["Hidden-breakthrough fraction (ours)", "(paper)", "Clusters (ours)"]
    table = []
    for variant, name in rows:
        ours, paper = run.variants.get(variant), PAPER_ARITHMETIC_RESULTS[variant]
        row = [name]
        if with_homogeneity:
            row += [NOT_RUN if ours is None else reporting.number(ours.get("max_carry_homogeneity")),
                    reporting.number(paper["top_clusters"][0][0])]
        row += [NOT_RUN if ours is None else reporting.number(ours.get("hidden_breakthrough_fraction")),
                reporting.number(paper["hidden_breakthrough_fraction"]),
                NOT_RUN if ours is None else str(ours.get("num_clusters", MISSING))]
        table.append(row)
    return reporting.markdown_table(header, table)


def _top_clusters_table(run: _Run, rows) -> str:
    """Tables 8, 10: the top carry clusters per strategy, ours beside the paper's."""
    header = ["Strategy", "#", "Direction", "Size", "Homogeneity (ours)", "(paper)", "Recall (ours)", "(paper)",
              "F1 (ours)", "(paper)"]
    table = []
    for variant, name in rows:
        ours = run.variants.get(variant)
        top = [] if ours is None else ours.get("top_clusters", [])[:TABLE_8_TOP]
        paper = PAPER_ARITHMETIC_RESULTS[variant]["top_clusters"]
        for rank in range(max(len(top), len(paper))):
            if ours is None:
                where, scores = [NOT_RUN] * 2, [NOT_RUN] * 3
            elif rank < len(top):
                record = top[rank]
                direction = record.get("direction")
                where = ["—" if direction is None else str(direction), str(record.get("size", MISSING))]
                scores = [reporting.number(record.get(key)) for key in ("homogeneity", "recall", "f1")]
            else:
                where, scores = ["—"] * 2, ["no qualifying cluster" if rank == 0 else "—", "—", "—"]
            theirs = [reporting.number(value) for value in paper[rank]] if rank < len(paper) else ["—"] * 3
            side_by_side = [cell for pair in zip(scores, theirs) for cell in pair]
            table.append([name if rank == 0 else "", str(rank + 1), *where, *side_by_side])
    return reporting.markdown_table(header, table)


def _variants_table(run: _Run) -> str:
    rows = [
        [variant, info.get("label", ""), info.get("basis") or "—", info.get("trajectory", MISSING),
         str(info.get("num_clusters", MISSING)), "yes" if variant in run.clusterings else "missing"]
        for variant, info in run.variants.items()
    ]
    header = ["Variant", "Label", "Basis", "Clustered trajectory", "Clusters", "clusters/*.npz"]
    return reporting.markdown_table(header, rows)


# ---------------------------------------------------------------- figures


def _plot_composition(ax, clustering: Clustering, clusters, place, carry) -> None:
    """Stacked bars: the fraction of each cluster's tokens in each (digit place, carry) category."""
    members = [clustering.members(cluster) for cluster in clusters]
    positions = np.arange(len(clusters))
    bottom = np.zeros(len(clusters))
    for skill_place, has_carry in SKILLS:
        fractions = np.array([np.mean((place[m] == skill_place) & (carry[m] == has_carry)) for m in members])
        ax.bar(positions, fractions, bottom=bottom, color=PLACE_COLORS[skill_place], alpha=1.0 if has_carry else 0.45,
               hatch="//" if has_carry else None, edgecolor="white",
               label=f"{ANSWER_PLACES[skill_place]} {'carry' if has_carry else 'no carry'}")
        bottom += fractions
    ax.set_xticks(positions, [str(cluster) for cluster in clusters])
    ax.set_xlabel("cluster")
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of cluster")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def _training_figure(run: _Run, figures_dir: Path) -> str | None:
    """Loss and per-place answer accuracy over training (metrics.jsonl)."""
    loss_rows = [row for row in run.log if "step" in row and row.get("loss") is not None]
    accuracy_rows = [row for row in run.log if "step" in row and row.get("answer_accuracy") is not None]
    if not loss_rows and not accuracy_rows:
        return None
    figure, (loss_ax, accuracy_ax) = reporting.new_figure(2)
    if loss_rows:
        loss_ax.plot([row["step"] for row in loss_rows], [row["loss"] for row in loss_rows], color="black")
        loss_ax.set_yscale("log")
    loss_ax.set(title="training loss", xlabel="training step", ylabel="loss (log scale)")
    if accuracy_rows:
        accuracy = np.array([row["answer_accuracy"] for row in accuracy_rows], float)
        for place, name in enumerate(ANSWER_PLACES[: accuracy.shape[1]]):
            accuracy_ax.plot([row["step"] for row in accuracy_rows], accuracy[:, place], color=PLACE_COLORS[place],
                             label=name)
        accuracy_ax.legend(title="answer digit", fontsize=8)
    accuracy_ax.set(title="answer accuracy per digit place", xlabel="training step", ylabel="accuracy", ylim=(0, 1.02))
    return reporting.save_figure(figure, figures_dir, "training_curves")


def _place_loss_figure(run: _Run, figures_dir: Path) -> str:
    """Fig. 6: mean exact loss per digit place over the POLCA checkpoints."""
    figure, (ax,) = reporting.new_figure(1, panel_width=6.0)
    for place, name in enumerate(ANSWER_PLACES):
        ax.plot(run.result.steps, run.result.loss[:, run.place == place].mean(axis=1), color=PLACE_COLORS[place],
                label=name)
    reporting.mark_steps(ax, run.setting("threshold_step"))
    ax.set(title="mean exact loss per digit place", xlabel="training step", ylabel="exact loss")
    ax.legend(fontsize=8)
    return reporting.save_figure(figure, figures_dir, "place_loss")


def _place_carry_loss_figure(run: _Run, figures_dir: Path) -> str:
    """Fig. 7: mean exact loss per digit place, carry vs no carry."""
    figure, axes = reporting.new_figure(len(ANSWER_PLACES), panel_width=3.6)
    for ax, (place, name) in zip(axes, enumerate(ANSWER_PLACES)):
        for has_carry, style in ((False, "-"), (True, "--")):
            tokens = (run.place == place) & (run.carry == has_carry)
            if tokens.any():
                ax.plot(run.result.steps, run.result.loss[:, tokens].mean(axis=1), style, color=PLACE_COLORS[place],
                        label=f"{'carry' if has_carry else 'no carry'} (n={tokens.sum()})")
        ax.set(title=f"{name} digit", xlabel="training step")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("mean exact loss")
    return reporting.save_figure(figure, figures_dir, "place_carry_loss")


def _exact_loss_clusters_figure(run: _Run, figures_dir: Path) -> str | None:
    """Fig. 3: exact-loss trajectories of the exact-loss clusters and their skill make-up."""
    clustering = run.clusterings["exact_loss"][0]
    clusters = reporting.shown_clusters(clustering)
    if not clusters:
        return None
    figure, (curves_ax, bars_ax) = reporting.new_figure(2, panel_width=5.5)
    breakthroughs = reporting.breakthrough_steps(run.variants.get("exact_loss", {}).get("breakthroughs", []), None)
    reporting.plot_cluster_curves(curves_ax, run.result.steps, run.result.loss, clustering, clusters, breakthroughs)
    reporting.mark_steps(curves_ax, run.setting("threshold_step"))
    curves_ax.set(title=f"exact loss, {reporting.clusters_title(clustering, clusters)}", ylabel="exact loss")
    curves_ax.legend(fontsize=8)
    _plot_composition(bars_ax, clustering, clusters, run.place, run.carry)
    bars_ax.set_title("skill make-up")
    return reporting.save_figure(figure, figures_dir, "exact_loss_clusters")


def _directions_to_plot(run: _Run) -> list[int]:
    """The directions holding POLCA's top carry clusters, then the lowest clustered directions, up to
    ``MAX_DIRECTION_FIGURES``."""
    top_clusters = run.variants.get("polca", {}).get("top_clusters", [])
    top = [record["direction"] for record in top_clusters if record.get("direction") is not None]
    clustered = sorted(c.direction for c in run.clusterings["polca"] if c.num_clusters > 0)
    ordered = list(dict.fromkeys(top + clustered))
    return [d for d in ordered if d in clustered][:MAX_DIRECTION_FIGURES]


def _direction_figure(run: _Run, direction: int, figures_dir: Path) -> str:
    """Figs. 4/8: one POLCA direction's clusters: projected loss, exact loss and skill make-up."""
    clustering = next(c for c in run.clusterings["polca"] if c.direction == direction)
    top_clusters = run.variants.get("polca", {}).get("top_clusters", [])
    clusters = reporting.shown_clusters(
        clustering, [r["cluster"] for r in top_clusters if r.get("direction") == direction])
    result = run.result
    projected_loss = reporting.direction_projected_loss(result, direction)
    figure, (projected_ax, exact_ax, bars_ax) = reporting.new_figure(3, panel_width=5.0)
    threshold = run.setting("threshold_step")
    breakthroughs = reporting.breakthrough_steps(run.variants.get("polca", {}).get("breakthroughs", []), direction)
    reporting.plot_cluster_curves(projected_ax, result.steps, projected_loss, clustering, clusters, breakthroughs)
    reporting.plot_cluster_curves(exact_ax, result.steps, result.loss, clustering, clusters, {})
    for ax in (projected_ax, exact_ax):
        reporting.mark_steps(ax, threshold, run.basis_steps)
    projected_ax.set(title=f"direction {direction}: projected loss", ylabel="projected loss $L_b$")
    exact_ax.set(title="exact loss of the same clusters", ylabel="exact loss")
    projected_ax.legend(fontsize=7)
    _plot_composition(bars_ax, clustering, clusters, run.place, run.carry)
    bars_ax.set_title(f"skill make-up ({reporting.clusters_title(clustering, clusters)})")
    return reporting.save_figure(figure, figures_dir, f"polca_direction_{direction}")


# ---------------------------------------------------------------- report


def _figures_section(run: _Run, figures_dir: Path) -> list[str]:
    """Draw every figure the run's files allow; a note for each one that cannot be drawn."""
    threshold, window = run.setting_text("threshold_step"), run.setting_text("window_steps")
    parts = ["## Figures"]
    training = _training_figure(run, figures_dir)
    parts.append(
        reporting.figure_markdown(training, "Training curves",
                                  "Training loss and per-place answer accuracy (metrics.jsonl). Look for the order in "
                                  "which the digit places are learned: the paper finds 1000s first, then 100s, 10s, "
                                  "1s.")
        if training else "*Training curves: metrics.jsonl is missing or has no `loss`/`answer_accuracy` entries.*"
    )
    if run.result is None or run.place is None:
        missing = "polca/hessian/" if run.result is None else "labels.npz"
        parts.append(f"*No exact-loss or cluster figures: {missing} is missing.*")
        return parts
    parts.append(reporting.figure_markdown(
        _place_loss_figure(run, figures_dir), "Exact loss per digit place (Fig. 6)",
        f"Mean exact loss of the evaluation tokens per digit place (paper Fig. 6). The dotted line is "
        f"τ = {threshold}: the paper's mean loss is flat after it, so breakthroughs later than τ are hidden."))
    parts.append(reporting.figure_markdown(
        _place_carry_loss_figure(run, figures_dir), "Exact loss per place, carry vs no carry (Fig. 7)",
        "Mean exact loss per digit place split by whether a carry comes into it (the 1s digit never has one). "
        "The paper finds carry and no-carry curves almost identical: the exact loss does not reveal carrying."))
    if run.clusterings.get("exact_loss"):
        link = _exact_loss_clusters_figure(run, figures_dir)
        parts.append(reporting.figure_markdown(
            link, "Exact-loss clusters (Fig. 3)",
            "Left: median exact loss (line) and 25–75% band of each exact-loss cluster (the paper's Fig. 3 shows the "
            "mean); dots mark each cluster's mean breakthrough step. Right: each cluster's make-up by digit place, "
            "carry hatched. The paper's clusters split by digit place, not by carry.")
            if link else "*Exact-loss clustering found no cluster: nothing to plot.*")
    else:
        parts.append(f"*Exact-loss clusters: clusters/exact_loss.npz {NOT_RUN}.*")
    if not run.clusterings.get("polca"):
        parts.append(f"*POLCA direction figures: clusters/polca.npz {NOT_RUN}.*")
        return parts
    directions = _directions_to_plot(run)
    if not directions:
        parts.append("*POLCA found no cluster in any direction: no direction figures.*")
        return parts
    parts.append(
        f"Directions shown: {', '.join(map(str, directions))} (those holding the top carry clusters of Table 8, then "
        f"the lowest-numbered clustered directions; at most {MAX_DIRECTION_FIGURES}).")
    for direction in directions:
        parts.append(reporting.figure_markdown(
            _direction_figure(run, direction, figures_dir), f"POLCA direction {direction} (Figs. 4, 8)",
            f"Direction {direction}. Left: median projected loss and 25–75% band per cluster; dots mark each "
            f"cluster's mean breakthrough step (Eq. 9, Δ = {window}), hidden if right of the dotted τ line. Middle: "
            "the exact loss of the same tokens: look for sharp projected-loss changes that the smooth exact loss "
            "hides. Dashed lines: steps where basis directions were found. Right: skill make-up, carry hatched. "
            f"At most {MAX_CLUSTERS_PER_PANEL} clusters are drawn: the top carry clusters, then the largest."))
    return parts


def _tables_section(run: _Run) -> list[str]:
    window, threshold = run.setting_text("window_steps"), run.setting_text("threshold_step")
    note = (f"Ours: this run (Δ = {window}, τ = {threshold} steps); paper: Δ = 100, τ = 1000. "
            f"`{NOT_RUN}`: the run has no such variant; `{MISSING}`: the run produced no value (e.g. no cluster "
            "qualifies under the paper's rule that >85% of a cluster's carry tokens lie in the 10s/100s places); "
            "`—`: no such row.")
    if run.metrics is None:
        note += " **metrics.json is missing: no number of this run is available.**"
    return [
        "## Table 1 — cluster quality", note, _summary_table(run, TABLE_1_ROWS, with_homogeneity=True),
        "## Table 8 — top carry clusters per strategy",
        f"The {TABLE_8_TOP} most carry-homogeneous qualifying clusters across all directions, with recall and F1 "
        "(outliers excluded).",
        _top_clusters_table(run, TABLE_8_ROWS),
        "## Table 9 — hidden-breakthrough fraction per strategy",
        "Fraction of clusters whose mean breakthrough step (Eq. 9) is later than τ (Eq. 10).",
        _summary_table(run, TABLE_8_ROWS, with_homogeneity=False),
        "## Table 10 — basis ablation: top carry clusters", _top_clusters_table(run, TABLE_10_ROWS),
        "## Table 11 — hidden-breakthrough fraction by basis",
        _summary_table(run, TABLE_10_ROWS, with_homogeneity=False),
    ]


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report/report.md`` and its PNG figures in ``run_dir/report/figures/``; returns the report path.

    Reads whatever the run directory holds (see the module docstring) and says in the report what is missing.
    PNGs left in the figures folder by an earlier report are removed first.
    """
    run = _load_run(Path(run_dir))
    report_dir = run.directory / "report"
    figures_dir = reporting.figures_directory(report_dir)
    parts = [
        f"# POLCA arithmetic run — preset `{run.config.get('preset', 'unknown')}`",
        f"Run directory: `{run.directory}`. Directions are 0-based basis indices (the paper's vector #1 is our "
        "direction 0).",
        "## Configuration",
        reporting.config_table(run.config) if run.config else "*config.json is missing.*",
        "## Stage wall times",
        reporting.stages_table(run.stages, STAGES),
        "## Variants run",
        _variants_table(run) if run.variants else "*No variant in metrics.json.*",
        *_tables_section(run),
        *_figures_section(run, figures_dir),
    ]
    report_path = report_dir / "report.md"
    report_path.write_text("\n\n".join(parts) + "\n")
    return report_path
