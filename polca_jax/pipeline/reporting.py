"""What reports share: a view of a run directory's files, markdown tables, and matplotlib figures of cluster
trajectories (median and quartile band per cluster, breakthrough markers, basis and τ marks).

Host code only (numpy, matplotlib's object API, no pyplot state): safe to call from a stage or a notebook. A task's
``report_sections`` (:func:`polca_jax.pipeline.task_factory`) build their markdown with :func:`markdown_table`,
:func:`number`, :func:`value_text` and :data:`MISSING`, as the built-in tasks' do.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from polca_jax import POLCAResult, load_basis_info
from polca_jax.analysis import Clustering, load_clusterings, quartile_curves
from polca_jax.errors import PolcaError
from polca_jax.files import read_json
from polca_jax.pipeline._host_settings import host_result
from polca_jax.pipeline._registry import MAIN_BASIS
from polca_jax.pipeline._results import ClusterRecord, FilterSummary, RunMetrics, StrategyResult, read_metrics
from polca_jax.pipeline._rundir import load_labels
from polca_jax.pipeline._task import LabelSet

MAX_CLUSTERS_PER_PANEL = 6
MISSING = "n/a"
CLUSTER_COLORS = matplotlib.colormaps["tab10"]


# ---------------------------------------------------------------- reading a run directory


@dataclass(frozen=True)
class RunView:
    """What a run directory holds, for reports; None (or empty) for the parts it lacks.

    :func:`load_run_view` reads it; a task's ``report_sections`` receive it.

    Attributes:
      directory: the run directory.
      config: the raw ``config.json`` (a dict).
      task_info: the raw ``task.json``: fingerprint, ``num_samples``, description, label-set metadata.
      log: ``metrics.jsonl`` rows (the training log).
      metrics: the records of ``metrics.json`` (:func:`read_metrics`).
      label_sets: name -> :class:`LabelSet` with ``[N]`` values (``labels.npz`` with ``task.json``).
      texts: the ``[N]`` sample texts.
      result: the POLCA result along the Hessian basis (:class:`polca_jax.POLCAResult`, ``[T, N, K]``), with the
        second order its clusters came from.
      basis_steps: float ``[K]``, the steps its directions were found at.
      clusterings: strategy -> its clusterings (``clusters/<strategy>.npz``).
      stages: stage -> its record (``stages/<stage>.json``).
    """

    directory: Path
    config: dict
    task_info: dict | None
    log: list[dict]
    metrics: RunMetrics | None
    label_sets: dict[str, LabelSet]
    texts: np.ndarray | None
    result: POLCAResult | None
    basis_steps: np.ndarray
    clusterings: dict[str, list[Clustering]]
    stages: dict[str, dict]

    @property
    def variants(self) -> dict[str, StrategyResult]:
        """strategy -> its results (empty before the score stage)."""
        return {} if self.metrics is None else self.metrics.variants

    @property
    def window_steps(self) -> int | None:
        """Δ of Eq. 9: the score stage's, else the config's; None if neither has it."""
        return self.config.get("window_steps") if self.metrics is None else self.metrics.settings.window_steps

    @property
    def threshold_step(self) -> int | None:
        """τ of Eq. 10: the score stage's, else the config's; None if neither has it (τ chosen automatically)."""
        return self.config.get("threshold_step") if self.metrics is None else self.metrics.settings.threshold_step

    @property
    def hessian_filter(self) -> FilterSummary | None:
        """The oscillation filter along the Hessian basis; None before the score stage."""
        return None if self.metrics is None else self.metrics.filters.get(MAIN_BASIS)

    def variant_clusters(self, variant: str, direction) -> dict[int, ClusterRecord]:
        """cluster -> its record, for one direction of a strategy (None: a per-sample signal)."""
        records = self.variants[variant].clusters if variant in self.variants else []
        return {r.cluster: r for r in records if r.direction == direction}


def load_run_view(run_dir: str | Path) -> RunView:
    """Everything a report reads from ``run_dir``; missing parts are None or empty.

    Args:
      run_dir: the run directory.

    Returns:
      The :class:`RunView`.

    Raises:
      PolcaError: a file it reads is unreadable or torn, or ``metrics.json`` does not match its schema
        (:func:`read_metrics`).

    Example:
      ``out``: the run directory of :func:`polca_jax.pipeline.run`'s example (9 POLCA checkpoints, 160 samples, one
      direction found at step 40).

      >>> from polca_jax.pipeline import load_run_view
      >>> view = load_run_view(out)
      >>> view.config["preset"], view.metrics.num_samples, view.result.projected_loss.shape
      ('tiny', 160, (9, 160, 1))
      >>> view.basis_steps.tolist(), view.window_steps, sorted(view.clusterings)
      ([40.0], 10, ['exact_loss', 'gradient_norms', 'polca'])
    """
    run_dir = Path(run_dir) if isinstance(run_dir, str) else run_dir  # a Path or a RunDirectory
    has_labels = (run_dir / "task.json").is_file() and (run_dir / "labels.npz").is_file()
    label_sets, texts = load_labels(run_dir) if has_labels else ({}, None)
    stages = {path.stem: read_json(path) for path in sorted((run_dir / "stages").glob("*.json"))}
    return RunView(
        directory=run_dir,
        config=read_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else {},
        task_info=read_json(run_dir / "task.json") if (run_dir / "task.json").is_file() else None,
        log=read_log(run_dir / "metrics.jsonl"),
        metrics=read_metrics(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else None,
        label_sets=label_sets,
        texts=texts,
        result=_clustered_result(run_dir, stages)
        if (run_dir / "polca" / "hessian" / "manifest.json").is_file() else None,
        basis_steps=read_basis_steps(run_dir / "basis" / "hessian"),
        clusterings={path.stem: load_clusterings(path) for path in sorted((run_dir / "clusters").glob("*.npz"))},
        stages=stages,
    )


def _clustered_result(run_dir: Path, stages: dict[str, dict]) -> POLCAResult:
    """The POLCA result along the Hessian basis with the second order its clusters came from (the cluster stage's
    record; the decomposition's own when none is recorded or it cannot be redone)."""
    second_order = stages.get("cluster", {}).get("settings", {}).get("second_order")
    try:
        return host_result(run_dir, "hessian", second_order)
    except PolcaError:
        return POLCAResult.load(run_dir / "polca" / "hessian")


def read_log(path: Path) -> list[dict]:
    """The rows of a JSON-lines file such as metrics.jsonl (empty if the file is missing; torn lines skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_basis_steps(directory: Path) -> np.ndarray:
    """float[K] training step each basis direction was found at (those >= 0); empty if the basis is missing."""
    if not (directory / "basis.json").is_file():
        return np.zeros(0)
    steps = load_basis_info(directory)["steps"]
    return steps[steps >= 0].astype(float)


def figures_directory(report_dir: Path) -> Path:
    """``report_dir/figures``, created, with the PNGs of an earlier report removed."""
    figures_dir = report_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    for stale in figures_dir.glob("*.png"):
        stale.unlink()
    return figures_dir


# ---------------------------------------------------------------- markdown


def number(value) -> str:
    """A metric with 3 decimals; ``MISSING`` for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{value:.3f}"


def value_text(value) -> str:
    """A setting as written; ``MISSING`` for None."""
    return MISSING if value is None else str(value)


def _cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; cells that are not strings are written as JSON, pipes and newlines escaped."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def config_table(config: dict) -> str:
    """The run's settings, task options listed as ``task option NAME``."""
    rows = [[key, value] for key, value in config.items() if key != "task_options"]
    rows += [[f"task option {key}", value] for key, value in (config.get("task_options") or {}).items()]
    return markdown_table(["Setting", "Value"], rows)


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def stages_table(stages: dict[str, dict], order: tuple[str, ...]) -> str:
    """Wall time of each stage in ``order`` (then any other recorded stage), the part of it spent compiling (with the
    persistent cache's hits and misses), and their totals."""
    names = list(order) + [name for name in stages if name not in order]
    rows, total, compiling = [], 0.0, 0.0
    for name in names:
        record = stages.get(name, {})
        seconds = record.get("wall_seconds")
        if seconds is None:
            rows.append([name, "not recorded", ""])
            continue
        total += seconds
        compile_text = ""
        if "compile_seconds" in record:
            compiling += record["compile_seconds"]
            compile_text = (f"{duration(record['compile_seconds'])} ({record['compiles']} kernels; cache "
                            f"{record['compile_cache_hits']} hits, {record['compile_cache_misses']} misses)")
        rows.append([name, duration(seconds), compile_text])
    rows.append(["**total recorded**", duration(total), duration(compiling)])
    return markdown_table(["Stage", "Wall time", "of which compiling"], rows)


def figure_markdown(link: str, title: str, caption: str) -> str:
    return f"![{title}]({link})\n\n*{caption}*"


# ---------------------------------------------------------------- figures


def new_figure(num_panels: int, panel_width: float = 5.0, height: float = 3.8):
    """A figure with ``num_panels`` side by side -> (figure, axes array)."""
    figure = Figure(figsize=(panel_width * num_panels, height), layout="constrained")
    return figure, np.atleast_1d(figure.subplots(1, num_panels))


def save_figure(figure: Figure, figures_dir: Path, name: str) -> str:
    """Write the figure as ``figures_dir/name.png``; returns its link relative to the report."""
    figure.savefig(figures_dir / f"{name}.png", dpi=110)
    return f"{figures_dir.name}/{name}.png"


def plot_median_band(ax, steps, curves, color, label: str) -> np.ndarray:
    """Median of curves float[n, T] as a line over its 25-75% band; returns the median float[T]."""
    q25, median, q75 = quartile_curves(curves)
    ax.fill_between(steps, q25, q75, color=color, alpha=0.2, linewidth=0)
    ax.plot(steps, median, color=color, label=label)
    return median


def mark_steps(ax, threshold_step, basis_steps=()) -> None:
    """Dashed lines where basis directions were found; a dotted line at τ (breakthroughs later are hidden).
    The marks never widen the x-axis."""
    limits = ax.get_xlim()
    for index, step in enumerate(basis_steps):
        ax.axvline(step, color="0.6", linestyle="--", linewidth=0.7,
                   label="basis direction found" if index == 0 else None)
    if threshold_step is not None:
        ax.axvline(threshold_step, color="black", linestyle=":", linewidth=1.2, label=f"τ = {threshold_step}")
    ax.set_xlim(limits)


def shown_clusters(clustering: Clustering, first=()) -> list[int]:
    """Up to ``MAX_CLUSTERS_PER_PANEL`` clusters, in cluster order: those in ``first``, then the largest."""
    sizes = np.bincount(clustering.labels[clustering.labels >= 0], minlength=clustering.num_clusters)
    ordered = dict.fromkeys([*first, *np.argsort(-sizes, kind="stable").tolist()])
    return sorted(list(ordered)[:MAX_CLUSTERS_PER_PANEL])


def clusters_title(clustering: Clustering, clusters) -> str:
    shown, total = len(clusters), clustering.num_clusters
    return f"{shown} clusters" if shown == total else f"{shown} of {total} clusters"


def plot_cluster_curves(ax, steps, signal, clustering: Clustering, clusters, breakthroughs: dict,
                        names: dict[int, str] | None = None) -> None:
    """Median + quartile band of signal float[T, N] over each cluster's members; a marker at each cluster's
    breakthrough step (``breakthroughs``: cluster -> step) on its median. ``names``: cluster -> text added to its
    legend entry."""
    for cluster in clusters:
        members = clustering.members(cluster)
        color = CLUSTER_COLORS(cluster % CLUSTER_COLORS.N)
        label = f"cluster {cluster} (n={members.size})"
        if names and names.get(cluster):
            label += f": {names[cluster]}"
        median = plot_median_band(ax, steps, signal[:, members].T, color, label)
        if cluster in breakthroughs:
            step = breakthroughs[cluster]
            ax.plot(step, np.interp(step, steps, median), "o", color=color, markersize=8, markeredgecolor="black",
                    zorder=4)
    ax.set_xlabel("training step")


def breakthrough_steps(strategy: StrategyResult | None, direction) -> dict[int, float]:
    """cluster -> mean breakthrough step of one direction (None for a per-sample baseline) of a strategy's results
    (None: not run)."""
    if strategy is None:
        return {}
    return {record.cluster: record.mean_step for record in strategy.breakthroughs if record.direction == direction}


def direction_projected_loss(result: POLCAResult, direction: int) -> np.ndarray:
    """float[T, N] projected loss (Eq. 8) of one direction, without forming the [T, N, K] array."""
    k = slice(direction, direction + 1)
    one_direction = POLCAResult(result.steps, result.loss, result.projections[:, :, k], result.step_projection[:, k],
                                result.second_order[:, :, k], result.outside_fraction, result.config)
    return one_direction.projected_loss[:, :, 0]


def top_classes(label_set: LabelSet, max_classes: int) -> list:
    """The label set's classes, the most frequent first, at most ``max_classes`` (the rest count as "other")."""
    classes, counts = np.unique(label_set.values, return_counts=True)
    return classes[np.argsort(-counts, kind="stable")][:max_classes].tolist()


def plot_composition(ax, clustering: Clustering, clusters, label_set: LabelSet, name: str,
                     max_classes: int = 9) -> None:
    """Stacked bars: the share of each class of ``label_set`` in each cluster (rarer classes as "other")."""
    shown = top_classes(label_set, max_classes)
    colors = matplotlib.colormaps["Dark2"]  # not the clusters' palette: these colours are classes
    members = [clustering.members(cluster) for cluster in clusters]
    positions = np.arange(len(clusters))
    bottom = np.zeros(len(clusters))
    groups = [(label_set.name_of(c), label_set.values == c) for c in shown]
    if len(shown) < np.unique(label_set.values).size:
        groups.append(("other", ~np.isin(label_set.values, shown)))
    for index, (label, in_class) in enumerate(groups):
        fractions = np.array([np.mean(in_class[m]) for m in members])
        ax.bar(positions, fractions, bottom=bottom, color=colors(index % colors.N) if label != "other" else "0.7",
               edgecolor="white", label=label)
        bottom += fractions
    ax.set_xticks(positions, [str(cluster) for cluster in clusters])
    ax.set(xlabel="cluster", ylabel="share of cluster", ylim=(0, 1), title=f"make-up by {name}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
