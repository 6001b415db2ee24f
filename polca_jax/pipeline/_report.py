"""The report of any run: ``report/report.md`` with PNG figures in ``report/figures/``.

It reads whatever the run directory holds (any part may be missing, and the report says which) and describes any
task: what the run found, with the reason and a remedy for every empty result; every strategy's clusters scored
against every label set; the projected loss of every kept direction, clustered or not, so the method is visible on
every run; then the task's own sections (the paper tasks put the paper's numbers there), the config and stage times.

Directions are 0-based basis indices (the paper's "basis vector #1" is direction 0).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import matplotlib
import numpy as np

from polca_jax.pipeline import reporting
from polca_jax.pipeline._registry import (EXACT_LOSS, POLCA, POLCA_PROFILE, RANDOM_POLCA, RANDOM_PROFILE, STAGES,
                                          VARIANTS)
from polca_jax.pipeline._results import Breakthrough, CausalCheck, LabelScore, StrategyResult, TopCluster
from polca_jax.pipeline._task import BUILTIN_TASKS, TaskDefinition, load_task_definition
from polca_jax.pipeline.reporting import MISSING, RunView, load_run_view

MAX_DIRECTION_FIGURES = 6
MAX_CLASSES_PLOTTED = 9
CLUSTER_TABLE_LABEL_SETS = 4
REPORT_TEXTS = 3  # samples nearest a cluster's medoid shown per cluster (metrics.json keeps more)
NOT_RUN = "not run"
LINE_COLORS = matplotlib.colormaps["tab10"]


def report_stage(run, definition: TaskDefinition) -> dict:
    """The report stage: write the report of ``run`` with the sections of its task definition."""
    return {"report": str(write_report(run.path, definition, started=time.perf_counter()))}


def write_report(run_dir: str | Path, definition: TaskDefinition | None = None, *,
                 started: float | None = None) -> Path:
    """Write ``run_dir/report/report.md`` and its figures; returns the report's path.

    definition: the run's task definition, for its own report sections. Default: a built-in task (planted,
    arithmetic, english) named by the run's config is loaded; no other task code the directory names is run (a
    task file is code, like any Python module), so its sections are left out with a note saying how to name the
    task (``polca report DIR --task path/file.py:factory``); a task that cannot be loaded only loses those
    sections. started: ``time.perf_counter()`` when the report stage began, to list its own time so far among
    the stage times.

    Args:
      run_dir: the run directory; any part of it may be missing (the report says which).
      definition: as above.
      started: as above (None: the report stage's time is not listed).

    Returns:
      The report's path, ``run_dir/report/report.md`` (figures in ``run_dir/report/figures/``, replaced).

    Raises:
      PolcaError: a file of the run is unreadable or torn, or ``metrics.json`` does not match its schema.

    Example:
      ``out``: the run directory of :func:`polca_jax.pipeline.run`'s example (a built-in task: its sections are
      included).

      >>> from polca_jax.pipeline import write_report
      >>> report = write_report(out)
      >>> report == out / "report" / "report.md", report.read_text().splitlines()[0]
      (True, '# POLCA run — task `planted`, preset `tiny`')
      >>> "## Planted ground truth" in report.read_text()
      True
    """
    view = load_run_view(Path(run_dir).absolute())
    definition, definition_note = _definition(view, definition)
    report_dir = view.directory / "report"
    figures_dir = reporting.figures_directory(report_dir)
    config = view.config
    task_options = config.get("task_options") or {}
    num_samples = (view.task_info or {}).get("num_samples")
    parts = [
        f"# POLCA run — task `{config.get('task', MISSING)}`, preset `{config.get('preset')}`",
        " ".join(filter(None, [
            (view.task_info or {}).get("description"),
            f"Run directory: `{view.directory}`.",
            f"{num_samples} evaluation samples." if num_samples else None,
            "Directions are 0-based basis indices (the paper's basis vector #1 is direction 0).",
        ])),
        "## What this run found",
        *_findings(view),
        "## Strategies",
        _strategies_table(view),
        *_nulls_section(view),
        *_causal_section(view),
        *_label_set_sections(view),
        "## Figures",
        *_figures(view, figures_dir),
    ]
    if definition is not None and definition.report_sections is not None:
        parts += definition.report_sections(view)
    elif definition_note:
        parts.append(definition_note)
    stages = dict(view.stages)
    if started is not None:
        stages["report"] = {"wall_seconds": time.perf_counter() - started}
    parts += [
        "## Configuration",
        reporting.config_table(config) if config else "*config.json is missing.*",
        f"{len(task_options)} task option(s) above are the task factory's; the rest are the pipeline's.",
        "## Stage wall times",
        reporting.stages_table(stages, STAGES),
    ]
    report_path = report_dir / "report.md"
    report_path.write_text("\n\n".join(parts) + "\n")
    return report_path


def _definition(view: RunView, definition: TaskDefinition | None) -> tuple[TaskDefinition | None, str | None]:
    if definition is not None or "task" not in view.config:
        return definition, None
    if view.config["task"] not in BUILTIN_TASKS:
        return None, (f"*The task's own report sections are left out: `polca report` runs no task code that a run "
                      f"directory names. To include them, name the task: `polca report {view.directory} --task "
                      f"{view.config['task']}`.*")
    try:
        return load_task_definition(view.config["task"]), None
    except ValueError as error:
        return None, f"*The task's own report sections are missing: {error}*"


# ---------------------------------------------------------------- findings


def _findings(view: RunView) -> list[str]:
    """Bullets: what POLCA found, and for every empty result which filter or setting emptied it and what to try."""
    if view.metrics is None:
        done = [stage for stage in STAGES if stage in view.stages]
        return [f"*No numbers yet: the score stage has not run (finished stages: {', '.join(done) or 'none'}).*"]
    bullets = _verdict_lines(view) + _settings_lines(view)
    polca = view.variants.get(POLCA)
    filters = view.hessian_filter
    config = view.config
    if filters is not None:
        kept = filters.kept_directions
        listed = ": " + ", ".join(map(str, kept)) if kept else ""
        bullets.append(f"**Oscillation filter:** {len(kept)} of {filters.num_directions} basis directions pass (a "
                       f"direction is kept when its mean projected loss falls over training){listed}.")
        if not kept:
            rises = np.asarray(filters.mean_final_projected_loss)
            bullets.append(
                f"**POLCA found no cluster because no direction passed the oscillation filter**: in every direction "
                f"the mean projected loss ends higher than it starts (by {rises.min():+.3g} to {rises.max():+.3g}). "
                + _second_order_advice(config.get("second_order")))
    if view.result is not None:
        advised = filters is not None and not filters.kept_directions
        bullets.append(_coverage_line(view, advise=not advised))
    if polca is not None and filters is not None and filters.kept_directions:
        clustered = sorted({c.direction for c in polca.clusters})
        bullets.append(f"**POLCA:** {polca.num_clusters} cluster(s) in {len(clustered)} of "
                       f"{len(filters.kept_directions)} kept directions.")
        if polca.num_clusters == 0:
            bullets.append(_no_cluster_advice(view, POLCA))
        unclustered = sorted(set(filters.kept_directions) - set(clustered))
        if unclustered and polca.num_clusters:
            bullets.append(f"Kept directions where HDBSCAN found only noise: {', '.join(map(str, unclustered))} "
                           "(their projected loss is still plotted below).")
    exact = view.variants.get(EXACT_LOSS)
    if exact is not None and exact.num_clusters == 0:
        bullets.append("**Exact loss:** no cluster. " + _no_cluster_advice(view, EXACT_LOSS))
    for name, label_set in view.label_sets.items():
        bullets.append(_best_clusters_line(view, name, label_set))
    if view.label_sets and any(view.variants[v].num_clusters for v in (POLCA, RANDOM_POLCA) if v in view.variants):
        bullets.append(_against_chance_line(view))
    settings = view.metrics.settings
    if polca is not None and polca.hidden_breakthrough_fraction is not None:
        hidden = [b for b in polca.breakthroughs if b.hidden]
        bullets.append(f"**Breakthroughs:** {len(hidden)} of {len(polca.breakthroughs)} POLCA clusters have their "
                       f"mean breakthrough step (Eq. 9, Δ = {settings.window_steps}) after τ = "
                       f"{settings.threshold_step} ({settings.threshold_source}), i.e. hidden by the flat exact loss "
                       f"(Eq. 10); {_beating_their_null(hidden)} of them are later than the same increments shuffled "
                       f"in time would make them (p < {settings.significance}).")
    return ["\n".join(f"- {bullet}" for bullet in bullets)]


def _beating_their_null(hidden: list[Breakthrough]) -> int:
    """How many hidden breakthroughs beat their shuffled-increment null."""
    return sum(b.null is not None and b.null.beats_null for b in hidden)


def _verdict_lines(view: RunView) -> list[str]:
    """One line per label set, found or not found (``metrics.json`` ``verdicts``), and what "found" requires."""
    verdicts = view.metrics.verdicts
    lines, rules = [], []
    for name, verdict in verdicts.items():
        best = verdict.best
        if verdict.found:
            where = "" if best.direction is None else f"direction {best.direction}, "
            partly = verdict.recovers_class is False
            line = (f"**{name}: found{', partly' if partly else ''}** — {best.label}, {where}cluster "
                    f"{best.cluster}, homogeneity {best.homogeneity:.3f} (recall {best.recall:.3f}), Holm p = "
                    f"{best.pvalue_adjusted:.3g}")
            if partly:
                line += (" (a cluster richer in the class than chance, not the class recovered: that needs "
                         "homogeneity >= 0.9 at recall >= 0.5)")
        elif best is None:
            line = f"**{name}: not found** (no qualifying cluster scored for its class)"
        else:
            p = best.pvalue_adjusted
            line = (f"**{name}: not found** (best {best.label} {best.homogeneity:.3f}, "
                    f"p = {MISSING if p is None else f'{p:.3g}'})")
        if verdict.random_basis_found:
            line += "; the random basis has such a cluster too, so the finding may not need the Hessian basis"
        twin = verdict.random_twin
        if verdict.beyond_random_twin is False:
            line += (f"; **the same strategy along the random basis does as well** ({twin.label}, homogeneity "
                     f"{twin.homogeneity:.3f}), so the finding does not need the Hessian basis")
        control = verdict.control
        if verdict.beyond_controls is False:
            line += (f"; **a label-free control does as well** ({control.label}, homogeneity "
                     f"{control.homogeneity:.3f}), so this finding does not show POLCA at work")
        elif verdict.beyond_controls:
            line += ("; beyond the label-free controls (best "
                     + ("none qualifying" if control is None else f"{control.label} {control.homogeneity:.3f}")
                     + ")")
        elif not verdict.found and control is not None and control.beats_null:
            line += (f"; a label-free control finds it ({control.label}, homogeneity "
                     f"{control.homogeneity:.3f}, Holm p = {control.pvalue_adjusted:.3g})")
        lines.append(line + ".")
        rules.append(f"`{name}` {verdict.condition}")
    if rules:
        rule = next(iter(verdicts.values())).rule
        lines.append(f"**What \"found\" requires:** {rule}. " + "; ".join(f"({r})" for r in rules) + ".")
    if any(verdict.beyond_controls is not None for verdict in verdicts.values()):
        lines.append("**Against the label-free controls:** a finding shows POLCA at work only when its homogeneity "
                     "exceeds that of the best cluster (scored and qualifying the same way) of a control that needs "
                     "no basis and no training dynamics: where each sample's gradient lies among the parameters (its "
                     "norm per parameter block, as shares, at the first POLCA checkpoint after step 0), and, with the "
                     "random basis, its gradient along the random directions at that checkpoint; each clustered like "
                     "the allocation profiles.")
    return lines


def _settings_lines(view: RunView) -> list[str]:
    """The settings the clusters and scores came from (the cluster and score stages' records), any second order
    redone from the stored arrays, and the host-stage settings changed on this run directory since it began."""
    parts = []
    for stage, what in (("cluster", "clusters"), ("score", "scores")):
        settings = view.stages.get(stage, {}).get("settings")
        if settings:
            parts.append(f"{what} from the {stage} stage with "
                         + ", ".join(f"{key}={value}" for key, value in settings.items()))
    if not parts:
        return []
    line = "**Settings of these results:** " + "; ".join(parts) + "."
    redone = view.stages.get("cluster", {}).get("second_order_redone")
    if redone:
        line += (" The projected loss was redone from the stored arrays with another second order than the "
                 "decomposition's (" + ", ".join(f"{basis}: {change}" for basis, change in redone.items()) + ").")
    history = view.directory / "settings_history.jsonl"
    if history.is_file():
        changes = []
        for row in history.read_text().splitlines():
            try:
                entry = json.loads(row)
                changes.append(f"{entry['time']}: " + ", ".join(f"{key} {old} → {new}" for key, (old, new)
                                                                in entry["changes"].items()))
            except (ValueError, KeyError, TypeError):
                continue
        if changes:
            line += " Changed on this run directory after its decomposition (cluster, score and report redone): " \
                    + "; ".join(changes) + "."
    return [line]


def _against_chance_line(view: RunView) -> str:
    """How many clusters of POLCA, of the random basis and of the exact loss beat their permutation null."""
    level = view.metrics.settings.significance
    parts = []
    for variant in (POLCA, RANDOM_POLCA, POLCA_PROFILE, RANDOM_PROFILE, EXACT_LOSS):
        info = view.variants.get(variant)
        if info is None:
            continue
        beating = sum(any(score.beats_null for score in record.labels.values()) for record in info.clusters)
        parts.append(f"{info.label} {beating} of {info.num_clusters}")
    return (f"**Against chance:** clusters more homogeneous in some label set than the same labels shuffled among "
            f"the samples their clustering saw (Holm-corrected p < {level}): " + "; ".join(parts) + ". A cluster that "
            "does not beat this null is no finding, whatever its homogeneity.")


def _coverage_line(view: RunView, advise: bool) -> str:
    """How much of the exact loss change the basis accounts for, with a warning when the two disagree."""
    result = view.result
    loss = np.asarray(result.loss).mean(axis=1)
    exact = float(loss[-1] - loss[0])
    decomposed = float(np.asarray(result.terms).mean(axis=1).sum())
    inside = 1 - float(np.median(result.outside_fraction))
    line = (f"**Coverage:** over training the mean exact loss changed by {exact:+.3g}; the sum over all directions of "
            f"the mean projected loss by {decomposed:+.3g}. The basis spans a median {inside:.1%} of each step "
            "(of ‖θ_t+1 − θ_t‖²).")
    if exact * decomposed < 0 or abs(decomposed) > 2 * abs(exact):
        line += (" **The decomposition does not track the loss**: its per-direction terms do not add up to the "
                 "loss change, so its trajectories describe the basis more than the training."
                 + (" " + _second_order_advice(view.config.get("second_order")) if advise else ""))
    return line


def _second_order_advice(second_order) -> str:
    if second_order == "paper":
        return ("With `second_order=paper` the stored eigenvalue's term is positive in every interval and can "
                "outweigh the first-order one when steps are large (a high learning rate); try "
                "`--set second_order=trapezoid` (it follows the actual curvature) or `--set second_order=none` with "
                "`--stage cluster` on this run directory (redone from the stored arrays, in seconds).")
    return ("The basis directions mostly carry oscillation, not the loss's long-term fall: try more basis "
            "directions (a smaller `--set basis_every=...`), basis checkpoints while the loss still falls "
            "(`--set basis_until=...`), or another second order (`--set second_order=...`), on a new --out "
            "directory.")


def _no_cluster_advice(view: RunView, variant: str) -> str:
    clusterings = view.clusterings.get(variant, [])
    sizes = sorted({c.min_cluster_size for c in clusterings if c.min_cluster_size is not None})
    samples = sorted({c.min_samples for c in clusterings if c.min_samples is not None})
    settings = (f"min_cluster_size {', '.join(map(str, sizes))} and min_samples {', '.join(map(str, samples))}"
                if sizes else "too few samples to cluster")
    reference = view.config.get("reference_num_samples")
    scaled = f" scaled by N / reference_num_samples={reference}" if reference is not None else ""
    return (f"HDBSCAN labelled every sample as noise ({settings}, from min_cluster_size="
            f"{view.config.get('min_cluster_size')}{scaled}, and min_samples = samples / "
            f"{view.config.get('min_samples_divisor')}). Try a smaller `--set min_cluster_size=...`"
            + (" or `--set reference_num_samples=none`" if reference is not None else "")
            + ", a larger `--set min_samples_divisor=...`, or `--set normalize=unit` (cluster the trajectories' "
            "shape), with `--stage cluster` on this run directory (it redoes only cluster, score and report).")


def _best_clusters_line(view: RunView, name: str, label_set) -> str:
    cls = label_set.positive
    target = f"class {label_set.name_of(cls)!r}" if cls is not None else "its majority class"
    parts = []
    for variant in (POLCA, EXACT_LOSS, RANDOM_POLCA):
        info = view.variants.get(variant)
        if info is None:
            continue
        top = _top_clusters(info, name)
        if top:
            best = top[0]
            where = "" if best.direction is None else f"direction {best.direction}, "
            parts.append(f"{info.label} {best.homogeneity:.3f} ({where}cluster {best.cluster}, "
                         f"{best.size} samples, base rate {best.base_rate:.3f})")
        else:
            parts.append(f"{info.label} {MISSING}")
    qualifier = " among qualifying clusters" if label_set.qualifier is not None else ""
    return (f"**Label set `{name}`** (scored for {target}{qualifier}): the most homogeneous cluster — "
            + "; ".join(parts) + ".")


def _top_clusters(info: StrategyResult, name: str) -> list[TopCluster]:
    """A strategy's most homogeneous clusters for label set ``name`` (none when it was not scored)."""
    summary = info.label_sets.get(name)
    return [] if summary is None else summary.top_clusters


# ---------------------------------------------------------------- tables


def _strategies_table(view: RunView) -> str:
    names = list(view.label_sets)
    header = ["Strategy", "Basis", "Clustered trajectory", "Clusterings", "Clusters", "Hidden-breakthrough fraction",
              *[f"Max homogeneity `{name}`" for name in names]]
    rows = []
    for variant in VARIANTS:
        info = view.variants.get(variant.name)
        if info is None:
            rows.append([variant.label, variant.basis, variant.trajectory, NOT_RUN, NOT_RUN, NOT_RUN,
                         *[NOT_RUN] * len(names)])
            continue
        rows.append([info.label, info.basis, info.trajectory, str(info.num_directions), str(info.num_clusters),
                     reporting.number(info.hidden_breakthrough_fraction),
                     *[reporting.number(_max_homogeneity(info, name)) for name in names]])
    note = (f"`{NOT_RUN}`: the strategy is off in this config (`baselines`, `ablations`, `ablation_bases`); "
            f"`{MISSING}`: no value (no cluster, or none qualifies). Homogeneity is the share of a cluster's samples "
            "in the label set's scored class; per-direction strategies count only qualifying clusters.")
    return reporting.markdown_table(header, rows) + "\n\n" + note


def _max_homogeneity(info: StrategyResult, name: str) -> float | None:
    """A strategy's best homogeneity for label set ``name`` (None: no qualifying cluster, or not scored)."""
    summary = info.label_sets.get(name)
    return None if summary is None else summary.max_homogeneity


def _label_set_sections(view: RunView) -> list[str]:
    parts = []
    for name, label_set in view.label_sets.items():
        cls = label_set.positive
        target = f"class `{label_set.name_of(cls)}`" if cls is not None else "each cluster's majority class"
        qualifier = label_set.qualifier
        rule = ("" if qualifier is None else
                f" A cluster of a decomposition qualifies only when more than {qualifier.min_fraction:.0%} of its "
                f"scored members have `{qualifier.label_set}` in {list(qualifier.classes)}.")
        header = ["Strategy", "#", "Direction", "Cluster", "Size", "Class", "Homogeneity", "Base rate", "Recall",
                  "F1", "p (Holm)"]
        rows = []
        for variant in VARIANTS:
            info = view.variants.get(variant.name)
            if info is None:
                continue
            top = _top_clusters(info, name)
            if not top:
                rows.append([info.label, "—", "—", "—", "—", "—", "no qualifying cluster", "", "", "", ""])
            for rank, record in enumerate(top):
                rows.append([info.label if rank == 0 else "", str(rank + 1),
                             "—" if record.direction is None else str(record.direction),
                             str(record.cluster), str(record.size), label_set.name_of(record.scored_class),
                             *map(reporting.number, (record.homogeneity, record.base_rate, record.recall, record.f1)),
                             _pvalue_text(record)])
        parts += [f"## Label set `{name}`",
                  f"The most homogeneous clusters of each strategy, scored for {target}.{rule} Base rate: the "
                  "class's share among the samples the clustering saw (what a random cluster would score); recall "
                  "and F1 leave HDBSCAN's outliers out; p: the homogeneity's permutation p-value, Holm-corrected "
                  "across the strategy's clusters (✓ beats the null).",
                  reporting.markdown_table(header, rows)]
    return parts


def _pvalue_text(score: LabelScore) -> str:
    """``0.003 ✓`` (beats the null), ``0.41``, or ``not testable``."""
    if not score.testable:
        return "not testable"
    return f"{score.pvalue_adjusted:.3g}{' ✓' if score.beats_null else ''}"


def _permutation_floor_line(view: RunView) -> str | None:
    """The strategies none of whose clusters can beat the permutation null: with B permutations every p-value is at
    least 1 / (B + 1), and Holm's correction over a strategy's M clusters multiplies the smallest by M."""
    settings = view.metrics.settings
    floors = {info.label: (info.num_clusters, info.num_clusters / (settings.null_permutations + 1))
              for info in view.variants.values() if info.num_clusters}
    blocked = {label: value for label, value in floors.items() if value[1] >= settings.significance}
    if not blocked:
        return None
    needed = math.ceil(max(m for m, _ in blocked.values()) / settings.significance)
    listed = "; ".join(f"{label} ({m} clusters: p ≥ {floor:.2g})" for label, (m, floor) in blocked.items())
    return (f"**No cluster of these strategies can beat the permutation null** at {settings.null_permutations} "
            f"permutations: every p-value is at least 1/{settings.null_permutations + 1}, and Holm's correction over "
            f"a strategy's clusters multiplies the smallest by their number, so its adjusted p cannot fall below "
            f"{settings.significance}: {listed}. This run cannot tell their clusters from chance, however homogeneous; "
            f"`--set null_permutations={needed}` with `--stage score` on this run directory rescores the same "
            "clusters.")


def _nulls_section(view: RunView) -> list[str]:
    """Per label set: POLCA beside the random-basis null (same checkpoints, filters and clustering) and the exact
    loss, with the clusters that beat the permutation null and the hidden breakthroughs that beat theirs."""
    if view.metrics is None or not view.label_sets:
        return []
    rows_of = sorted((v.name for v in VARIANTS if v.in_nulls and v.name in view.variants),
                     key=lambda name: name == EXACT_LOSS)  # the strategies, then the exact loss
    header = ["Strategy", "Best homogeneity", "Directions' best: median (25–75%)", "Clusters beating the null",
              "Hidden breakthroughs beating theirs"]
    parts = ["## Against the nulls",
             "A finding must beat three nulls: its homogeneity against the same labels shuffled among the samples its "
             "clustering saw (cluster sizes fixed, Holm-corrected); POLCA's numbers against the same pipeline along "
             "random orthonormal directions through the same checkpoints (`Random orthonormal basis`, run with "
             "`ablations`); a hidden breakthrough against its increments shuffled in time."]
    stratified = [f"`{name}` within each class of `{ls.stratify_by}`" for name, ls in view.label_sets.items()
                  if ls.stratify_by is not None]
    if stratified:
        parts.append("The permutation null shuffles " + ", ".join(stratified) + " (a confounder named by the task): a "
                     "cluster that only separates those classes does not beat it.")
    if RANDOM_POLCA not in view.variants:
        parts.append("*The random-basis null is not run: `--set ablations=true` adds it.*")
    floor = _permutation_floor_line(view)
    if floor:
        parts.append(floor)
    for name, label_set in view.label_sets.items():
        rows = []
        for variant in rows_of:
            info = view.variants[variant]
            summary = info.label_sets.get(name)
            spread = None if summary is None else summary.per_direction_best
            hidden = [b for b in info.breakthroughs if b.hidden]
            rows.append([
                info.label, reporting.number(_max_homogeneity(info, name)),
                MISSING if spread is None or spread.median is None else
                f"{spread.median:.3f} ({spread.q25:.3f}–{spread.q75:.3f}) over {spread.directions}",
                f"{0 if summary is None else summary.clusters_beating_null} of {info.num_clusters}",
                f"{_beating_their_null(hidden)} of {len(hidden)}",
            ])
        difference = _difference(view, name)
        parts += [f"### Label set `{name}`", reporting.markdown_table(header, rows)]
        if difference:
            parts.append(difference)
    return parts


def _difference(view: RunView, name: str) -> str | None:
    polca, random = view.variants.get(POLCA), view.variants.get(RANDOM_POLCA)
    if polca is None or random is None:
        return None
    ours, theirs = _max_homogeneity(polca, name), _max_homogeneity(random, name)
    if ours is None or theirs is None:
        return f"POLCA − random basis, best homogeneity: {MISSING} (one of them has no qualifying cluster)."
    spread = random.label_sets[name].per_direction_best  # a qualifying cluster: q25 and q75 are numbers
    return (f"POLCA − random basis, best homogeneity: {ours - theirs:+.3f}; the random directions' best clusters "
            f"spread over {spread.q25:.3f}–{spread.q75:.3f} (25–75%).")


def _causal_section(view: RunView) -> list[str]:
    """The causal check: per POLCA cluster, the loss increase when its direction is removed, against the rest."""
    polca = view.variants.get(POLCA)
    if polca is None or polca.causal is None:
        return [] if view.metrics is None else ["## Causal check", "*Not run (the causal stage has not finished).*"]
    records = [r for r in polca.clusters if r.causal is not None]
    parts = ["## Causal check",
             "Each POLCA cluster's mean loss increase when its direction's share of the training displacement is "
             "removed from the final parameters (θ_T − ⟨θ_T − θ_0, b⟩ b), against the other samples its clustering "
             "saw. A cluster that is a mechanism living in its direction should be hurt more than the rest, and most "
             "among its direction's clusters (rank 1)."]
    parts.append(f"**Rule:** {polca.causal.rule} (✓); a positive difference inside the spread of the same difference "
                 "over random clusters of the cluster's size (its null's standard deviation, shown) is no effect.")
    if not records:
        return parts + ["*No POLCA cluster to check.*"]
    names = list(view.label_sets)[:CLUSTER_TABLE_LABEL_SETS]
    header = ["Direction", "Cluster", "Size", "Loss increase: members", "others", "difference", "null sd",
              "p (Holm)", "Rank", *[f"`{name}`" for name in names]]
    rows = []
    for r in records:
        causal = r.causal
        rows.append([str(r.direction), str(r.cluster), str(r.size), f"{causal.member_mean:+.4g}",
                     _signed(causal.others_mean), _signed(causal.difference),
                     MISSING if causal.null_std is None else f"{causal.null_std:.2g}",
                     _causal_pvalue_text(causal), str(causal.rank),
                     *[_class_share(view, name, r.labels.get(name)) for name in names]])
    parts.append(reporting.markdown_table(header, rows))
    lines = []
    for variant in (POLCA, RANDOM_POLCA):
        info = view.variants.get(variant)
        summary = None if info is None else info.causal
        if summary is not None and summary.clusters:
            lines.append(f"{info.label}: {summary.hurt_more_than_others} of {summary.clusters} clusters hurt more "
                         f"than the rest beyond noise ({summary.positive_difference} with a positive difference), "
                         f"median difference {summary.median_difference:+.4g}")
    if lines:
        parts.append("; ".join(lines) + ".")
    return parts


def _causal_pvalue_text(causal: CausalCheck) -> str:
    """``0.001 ✓`` (hurt more beyond noise) or ``0.41``."""
    return f"{causal.pvalue_adjusted:.3g}{' ✓' if causal.hurt_more else ''}"


def _signed(value: float | None) -> str:
    return MISSING if value is None else f"{value:+.4g}"


def _class_share(view: RunView, name: str, score: LabelScore | None) -> str:
    if score is None:
        return MISSING
    return (f"{view.label_sets[name].name_of(score.scored_class)} {score.homogeneity:.0%}"
            f"{' ✓' if score.beats_null else ''}")


# ---------------------------------------------------------------- figures


def _figures(view: RunView, figures_dir: Path) -> list[str]:
    parts = []
    training = _training_figure(view, figures_dir)
    parts.append(reporting.figure_markdown(
        training, "Training curves", "Training loss, evaluation loss and the task's training metrics "
        "(metrics.jsonl); the dotted line is τ.") if training else
        "*Training curves: metrics.jsonl is missing or empty (a run on existing checkpoints has none).*")
    if view.result is None:
        return parts + ["*No trajectory figures: polca/hessian/ is missing (the decompose stage has not run).*"]
    per_class = _class_loss_figure(view, figures_dir)
    if per_class:
        parts.append(reporting.figure_markdown(
            per_class, "Exact loss per class", "Mean exact loss of the evaluation samples of each class, per label "
            "set. Classes that move together here cannot be told apart by exact-loss clustering."))
    parts.append(reporting.figure_markdown(
        _directions_overview_figure(view, figures_dir), "Every direction's projected loss",
        "Left: the mean projected loss (Eq. 8) of every basis direction over training; directions kept by the "
        "oscillation filter in colour, dropped ones in grey. Right: the mean exact loss change against the part the "
        "basis accounts for (the sum over directions of the mean projected loss)."))
    parts += _exact_loss_clusters_section(view, figures_dir)
    parts += _directions_section(view, figures_dir)
    return parts


def _training_figure(view: RunView, figures_dir: Path) -> str | None:
    rows = [row for row in view.log if "step" in row]
    if not rows:
        return None
    extra = sorted({key for row in rows for key, value in row.items()
                    if key not in ("step", "loss", "eval_loss") and isinstance(value, int | float)})
    figure, axes = reporting.new_figure(2 if extra else 1, panel_width=5.5)
    for key, color, label in (("loss", "0.5", "training batch"), ("eval_loss", "black", "evaluation samples")):
        points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
        if points:
            axes[0].plot(*zip(*points), color=color, label=label)
    reporting.mark_steps(axes[0], view.threshold_step)
    axes[0].set(title="loss", xlabel="training step", ylabel="loss")
    axes[0].legend(fontsize=8)
    if extra:
        for index, key in enumerate(extra):
            points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), int | float)]
            axes[1].plot(*zip(*points), color=LINE_COLORS(index % 10), label=key)
        axes[1].set(title="training metrics", xlabel="training step")
        axes[1].legend(fontsize=7)
    return reporting.save_figure(figure, figures_dir, "training_curves")


def _class_loss_figure(view: RunView, figures_dir: Path) -> str | None:
    label_sets = dict(view.label_sets)
    if not label_sets:
        return None
    figure, axes = reporting.new_figure(len(label_sets), panel_width=4.5)
    steps, loss = view.result.steps, np.asarray(view.result.loss)
    for ax, (name, label_set) in zip(axes, label_sets.items()):
        for index, cls in enumerate(reporting.top_classes(label_set, MAX_CLASSES_PLOTTED)):
            members = label_set.values == cls
            ax.plot(steps, loss[:, members].mean(axis=1), color=LINE_COLORS(index % 10),
                    label=f"{label_set.name_of(cls)} (n={members.sum()})")
        reporting.mark_steps(ax, view.threshold_step)
        ax.set(title=f"mean exact loss by {name}", xlabel="training step")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("exact loss")
    return reporting.save_figure(figure, figures_dir, "exact_loss_per_class")


def _directions_overview_figure(view: RunView, figures_dir: Path) -> str:
    result = view.result
    steps = result.steps
    mean_projected = np.asarray(result.terms).mean(axis=1).cumsum(axis=0)  # [T-1, K]
    mean_projected = np.concatenate([np.zeros((1, mean_projected.shape[1])), mean_projected])
    filters = view.hessian_filter
    kept = set(filters.kept_directions) if filters else set(range(mean_projected.shape[1]))
    figure, (directions_ax, total_ax) = reporting.new_figure(2, panel_width=5.5)
    for direction in range(mean_projected.shape[1]):
        if direction in kept:
            directions_ax.plot(steps, mean_projected[:, direction], color=LINE_COLORS(direction % 10),
                               label=f"{direction}" if direction < 10 else None)
        else:
            directions_ax.plot(steps, mean_projected[:, direction], color="0.75", linestyle="--", linewidth=0.8)
    reporting.mark_steps(directions_ax, view.threshold_step, view.basis_steps)
    directions_ax.set(title="mean projected loss per direction", xlabel="training step",
                      ylabel="mean projected loss $L_b$")
    directions_ax.legend(fontsize=7, title="kept direction", ncols=2)
    loss = np.asarray(result.loss).mean(axis=1)
    total_ax.plot(steps, loss - loss[0], color="black", label="exact loss change")
    total_ax.plot(steps, mean_projected.sum(axis=1), color="tab:red", label="sum over directions")
    total_ax.set(title="what the basis accounts for", xlabel="training step", ylabel="change since step 0")
    total_ax.legend(fontsize=8)
    return reporting.save_figure(figure, figures_dir, "directions_overview")


def _composition_label_set(view: RunView):
    """(name, label set) whose make-up the cluster figures show: the one with the most classes that still fit in a
    plot (the most detailed make-up), else the first; (None, None) without label sets."""
    sizes = {name: np.unique(label_set.values).size for name, label_set in view.label_sets.items()}
    fitting = [name for name, size in sizes.items() if size <= MAX_CLASSES_PLOTTED]
    name = max(fitting, key=sizes.get) if fitting else next(iter(sizes), None)
    return (name, view.label_sets[name]) if name is not None else (None, None)


def _exact_loss_clusters_section(view: RunView, figures_dir: Path) -> list[str]:
    clusterings = view.clusterings.get(EXACT_LOSS)
    if not clusterings:
        return [f"*Exact-loss clusters: clusters/exact_loss.npz {NOT_RUN}.*"]
    clustering = clusterings[0]
    if clustering.num_clusters == 0:
        return ["*Exact-loss clustering found no cluster: nothing to plot.*"]
    clusters = reporting.shown_clusters(clustering)
    name, label_set = _composition_label_set(view)
    figure, axes = reporting.new_figure(2 if label_set is not None else 1, panel_width=5.5)
    breakthroughs = reporting.breakthrough_steps(view.variants.get(EXACT_LOSS), None)
    reporting.plot_cluster_curves(axes[0], view.result.steps, np.asarray(view.result.loss), clustering, clusters,
                                  breakthroughs)
    reporting.mark_steps(axes[0], view.threshold_step)
    axes[0].set(title=f"exact loss, {reporting.clusters_title(clustering, clusters)}", ylabel="exact loss")
    axes[0].legend(fontsize=8)
    if label_set is not None:
        reporting.plot_composition(axes[1], clustering, clusters, label_set, name)
    link = reporting.save_figure(figure, figures_dir, "exact_loss_clusters")
    return [reporting.figure_markdown(
        link, "Exact-loss clusters", "The baseline: clusters of exact-loss trajectories. Median (line) and 25–75% "
        "band per cluster, dots at each cluster's mean breakthrough step" + (f"; right, their make-up by `{name}`."
                                                                          if name else "."))]


def _directions_to_show(view: RunView) -> list[int]:
    """Kept directions, those holding the best POLCA clusters of any label set first, then clustered ones, then the
    rest, at most ``MAX_DIRECTION_FIGURES``."""
    filters, polca = view.hessian_filter, view.variants.get(POLCA)
    kept = filters.kept_directions if filters else []
    best = [] if polca is None else [record.direction for summary in polca.label_sets.values()
                                     for record in summary.top_clusters]
    clustered = [] if polca is None else sorted({c.direction for c in polca.clusters})
    ordered = list(dict.fromkeys([*best, *clustered, *kept]))
    return [d for d in ordered if d in kept][:MAX_DIRECTION_FIGURES]


def _directions_section(view: RunView, figures_dir: Path) -> list[str]:
    parts = ["### POLCA directions"]
    clusterings = {c.direction: c for c in view.clusterings.get(POLCA, [])}
    directions = _directions_to_show(view)
    if not directions:
        return parts + ["*No kept direction to show (see \"What this run found\").*"]
    kept = view.hessian_filter.kept_directions
    parts.append(
        f"Directions shown: {', '.join(map(str, directions))} of the {len(kept)} kept (those "
        f"holding the best clusters first; at most {MAX_DIRECTION_FIGURES}). Left: median projected loss and 25–75% "
        f"band per cluster, dots at each cluster's mean breakthrough step (Eq. 9, Δ = "
        f"{reporting.value_text(view.window_steps)}), hidden if right of the dotted τ line; a direction without clusters "
        "shows the samples relying on it (projected loss falls) against the rest. Middle: the exact loss of the "
        "same samples — look for sharp projected-loss changes the smooth exact loss hides. Dashed lines: steps "
        "where basis directions were found.")
    for direction in directions:
        clustering = clusterings.get(direction)
        parts.append(f"#### Direction {direction}")
        parts.append(reporting.figure_markdown(_direction_figure(view, direction, clustering, figures_dir),
                                               f"POLCA direction {direction}", _direction_caption(view, direction,
                                                                                                  clustering)))
        if clustering is not None and clustering.num_clusters:
            parts.append(_cluster_table(view, POLCA, direction))
    return parts


def _direction_caption(view: RunView, direction: int, clustering) -> str:
    relying = view.hessian_filter.relying_samples[direction]
    if clustering is None or clustering.num_clusters == 0:
        return f"Direction {direction}: no cluster; {relying} samples rely on it."
    return (f"Direction {direction}: {clustering.num_clusters} cluster(s) among the {relying} samples relying on it "
            f"({int((clustering.labels >= 0).sum())} clustered, the rest HDBSCAN noise).")


def _direction_figure(view: RunView, direction: int, clustering, figures_dir: Path) -> str:
    result = view.result
    projected = reporting.direction_projected_loss(result, direction)
    loss = np.asarray(result.loss)
    name, label_set = _composition_label_set(view)
    clustered = clustering is not None and clustering.num_clusters > 0
    figure, axes = reporting.new_figure(3 if clustered and label_set is not None else 2, panel_width=5.0)
    threshold = view.threshold_step
    if clustered:
        clusters = reporting.shown_clusters(clustering)
        breakthroughs = reporting.breakthrough_steps(view.variants.get(POLCA), direction)
        reporting.plot_cluster_curves(axes[0], result.steps, projected, clustering, clusters, breakthroughs)
        reporting.plot_cluster_curves(axes[1], result.steps, loss, clustering, clusters, {})
        if label_set is not None:
            reporting.plot_composition(axes[2], clustering, clusters, label_set, name)
        title = reporting.clusters_title(clustering, clusters)
    else:
        relying = projected[-1] < projected[0]
        for ax, signal in ((axes[0], projected), (axes[1], loss)):
            for members, color, label in ((relying, "tab:blue", "relying on it"), (~relying, "0.5", "the rest")):
                if members.any():
                    reporting.plot_median_band(ax, result.steps, signal[:, members].T, color,
                                               f"{label} (n={members.sum()})")
            ax.set_xlabel("training step")
        title = "no cluster"
    reporting.mark_steps(axes[0], threshold, view.basis_steps)
    reporting.mark_steps(axes[1], threshold)
    axes[0].set(title=f"direction {direction}: projected loss", ylabel="projected loss $L_b$")
    axes[1].set(title=f"exact loss of the same samples ({title})", ylabel="exact loss")
    axes[0].legend(fontsize=7)
    return reporting.save_figure(figure, figures_dir, f"polca_direction_{direction}")


def _cluster_table(view: RunView, variant: str, direction) -> str:
    """One row per cluster of a direction: size, breakthrough (✓ when it beats its shuffled-increment null), the
    share of its main class per label set (✓ when it beats the permutation null), and the texts of the samples
    nearest its medoid."""
    records = view.variant_clusters(variant, direction)
    names = list(view.label_sets)[:CLUSTER_TABLE_LABEL_SETS]
    header = ["Cluster", "Size", "Breakthrough step", *[f"`{name}`" for name in names]]
    has_texts = view.texts is not None
    if has_texts:
        header.append("Samples nearest the medoid")
    rows = []
    for cluster, record in sorted(records.items()):
        step, null = record.breakthrough_step, record.breakthrough_null
        beats = null is not None and null.beats_null
        hidden = (" (after τ" + (", beats its null ✓" if beats else ", not beyond its null") + ")"
                  if record.hidden else "")
        row = [str(cluster), str(record.size), MISSING if step is None else f"{step:.0f}{hidden}"]
        for name in names:
            score = record.labels.get(name)
            row.append(MISSING if score is None else f"{_class_share(view, name, score)} (base {score.base_rate:.0%})")
        if has_texts:
            row.append(" ⁞ ".join(str(view.texts[i]) for i in (record.nearest_samples or [])[:REPORT_TEXTS]))
        rows.append(row)
    return reporting.markdown_table(header, rows)
