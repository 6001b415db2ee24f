"""What the experiments' reports share: reading a run directory's files, markdown tables, and matplotlib figures of
cluster trajectories (median and quartile band per cluster, breakthrough markers, basis and τ marks).

Host code only (numpy, matplotlib's object API, no pyplot state): safe to call from a stage or a notebook.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from polca_jax.analysis import Clustering, load_clusterings, quartile_curves
from polca_jax._basis import load_basis_info
from polca_jax._decomposition import POLCAResult

MAX_CLUSTERS_PER_PANEL = 6
MISSING = "n/a"
CLUSTER_COLORS = matplotlib.colormaps["tab10"]


# ---------------------------------------------------------------- reading a run directory


def read_json(path: Path):
    """The parsed file, or None if it does not exist."""
    return json.loads(path.read_text()) if path.is_file() else None


def read_log(path: Path) -> list[dict]:
    """The rows of a JSON-lines file such as metrics.jsonl (empty if the file is missing)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_basis_steps(directory: Path) -> np.ndarray:
    """float[K] training step each basis direction was found at (those >= 0); empty if the basis is missing."""
    if not (directory / "basis.json").is_file():
        return np.zeros(0)
    steps = load_basis_info(directory)["steps"]
    return steps[steps >= 0].astype(float)


def read_result(directory: Path) -> POLCAResult | None:
    """The POLCA result saved in ``directory`` (memory-mapped), or None if there is none."""
    return POLCAResult.load(directory) if (directory / "manifest.json").is_file() else None


def read_clusterings(run_dir: Path) -> dict[str, list[Clustering]]:
    """variant → its clusterings, from ``clusters/<variant>.npz``."""
    return {path.stem: load_clusterings(path) for path in sorted((run_dir / "clusters").glob("*.npz"))}


def read_stages(run_dir: Path) -> dict[str, dict]:
    """stage → the record it wrote when it finished (``stages/<stage>.json``)."""
    return {path.stem: json.loads(path.read_text()) for path in sorted((run_dir / "stages").glob("*.json"))}


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


def _cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; cells that are not strings are written as JSON, pipes and newlines escaped."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def config_table(config: dict) -> str:
    return markdown_table(["Setting", "Value"], [[key, value] for key, value in config.items()])


def duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def stages_table(stages: dict[str, dict], order: tuple[str, ...]) -> str:
    """Wall time of each stage in ``order`` (then any other recorded stage) and their total."""
    names = list(order) + [name for name in stages if name not in order]
    rows, total = [], 0.0
    for name in names:
        seconds = stages.get(name, {}).get("wall_seconds")
        if seconds is None:
            rows.append([name, "not recorded"])
        else:
            total += seconds
            rows.append([name, duration(seconds)])
    rows.append(["**total recorded**", duration(total)])
    return markdown_table(["Stage", "Wall time"], rows)


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


def breakthrough_steps(records: list[dict], direction) -> dict[int, float]:
    """cluster -> mean breakthrough step of one direction (None for a per-sample baseline), from breakthrough
    records ``{"direction", "cluster", "mean_step", ...}``."""
    return {
        record["cluster"]: record["mean_step"]
        for record in records
        if record.get("direction") == direction and record.get("mean_step") is not None
    }


def direction_projected_loss(result: POLCAResult, direction: int) -> np.ndarray:
    """float[T, N] projected loss (Eq. 8) of one direction, without forming the [T, N, K] array."""
    k = slice(direction, direction + 1)
    one_direction = POLCAResult(result.steps, result.loss, result.projections[:, :, k], result.step_projection[:, k],
                                result.second_order[:, :, k], result.outside_fraction, result.config)
    return one_direction.projected_loss[:, :, 0]
