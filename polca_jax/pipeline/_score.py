"""The score stage: the filters, every cluster's breakthrough (Eqs. 9-10), its scores against every label set and the
nulls it must beat, and the causal check, for every strategy, to ``metrics.json``. Host code: it reads only the run
directory.

Nulls (docs/pipeline.md): a cluster's homogeneity in a label set is tested against the same labels permuted among
the samples its clustering saw, cluster sizes fixed (Holm-corrected across the strategy's clusters); a hidden
breakthrough against the cluster's increments shuffled in time; and every strategy along the Hessian basis stands
beside the same pipeline along random orthonormal directions (with ``ablations``). The causal check: each cluster's
mean loss increase when its direction's share of the training displacement is removed, against the other samples
its clustering saw; a cluster counts as hurt more only beyond noise (``CAUSAL_RULE``: a permutation test of the
difference, Holm-corrected). A label set is found when ``VERDICT_RULE`` holds for one of its clusters.

The layout of ``metrics.json`` and its records: :mod:`polca_jax.pipeline._results`.
"""

from __future__ import annotations

import numpy as np

import polca_jax as pj
from polca_jax import analysis
from polca_jax.files import load_npy
from polca_jax.pipeline._config import check_breakthrough_window
from polca_jax.pipeline._host_settings import host_result, stage_settings
from polca_jax.pipeline._results import (Breakthrough, BreakthroughNull, CausalCheck, CausalSummary, ClusterRecord,
                                         DirectionSpread, FilterSummary, LabelScore, LabelSetSummary, RunMetrics,
                                         ScoreSettings, StrategyResult, TopCluster, Verdict, VerdictCluster,
                                         write_metrics)
from polca_jax.pipeline._rundir import RunDirectory, load_labels
from polca_jax.pipeline._registry import (FIRST_ORDER_POLCA, NEAREST_SAMPLES, PER_SAMPLE_SIGNALS, POLCA,
                                          POLCA_GRADIENTS, POLCA_PROFILE, RANDOM_POLCA, VARIANTS,
                                          variant_trajectories, variants_of)
from polca_jax.pipeline._task import LabelSet

TOP_CLUSTERS = 3
THRESHOLD_FRACTION = 0.9  # automatic τ: where the mean exact loss has made this fraction of its fall


def score_stage(run: RunDirectory) -> dict:
    """Write ``metrics.json`` (:class:`RunMetrics`); returns a summary for the stage record."""
    config = run.config
    check_breakthrough_window(config)  # the rule the config was made with (a run directory may be older)
    label_sets, texts = load_labels(run.path)
    results = {}
    # the trajectories the clusters came from: the second order the cluster stage ran with
    cluster_record = run.stage_record("cluster") if run.done("cluster") else {}
    cluster_settings = cluster_record.get("settings", {})

    def result_of(basis: str) -> pj.POLCAResult:
        if basis not in results:
            results[basis] = host_result(run.path, basis, cluster_settings.get("second_order", config.second_order))
        return results[basis]

    main = result_of("hessian")
    threshold, source = threshold_step(config.threshold_step, main)
    window = config.window
    variants, filters = {}, {}
    for variant in (v for v in variants_of(config) if v.name not in cluster_record.get("skipped", {})):
        result = result_of(variant.basis)
        trajectories, steps = variant_trajectories(result, variant.trajectory)
        clusterings = analysis.load_clusterings(run / "clusters" / f"{variant.name}.npz")
        if variant.trajectory == "projected_loss":
            filters[variant.basis] = filter_summary(trajectories)
        causal_file = run / "causal" / f"{variant.basis}.npy"
        causal = load_npy(causal_file) if causal_file.is_file() and trajectories.ndim == 3 else None
        variants[variant.name] = variant_scores(variant, clusterings, trajectories, steps, label_sets, texts,
                                                window, threshold, config, causal)
    verdicts = {name: label_verdict(name, label_set, variants, config)
                for name, label_set in label_sets.items()}
    settings = ScoreSettings(window_steps=window, threshold_step=threshold, threshold_source=source,
                             null_permutations=config.null_permutations,
                             breakthrough_shuffles=config.breakthrough_shuffles, significance=config.significance)
    write_metrics(run / "metrics.json", RunMetrics(settings=settings, num_samples=int(main.loss.shape[1]),
                                                   filters=filters, variants=variants, verdicts=verdicts))
    return {"variants": list(variants), "threshold_step": threshold, "settings": stage_settings(config, "score")}


RECOVERED = (0.9, 0.5)  # homogeneity and recall of a found cluster that recovers its class, not just beats chance
FINDING_VARIANTS = (POLCA, FIRST_ORDER_POLCA, POLCA_PROFILE, POLCA_GRADIENTS)  # along the Hessian basis


VERDICT_RULE = ("a cluster of a decomposition along the Hessian basis (POLCA, first-order POLCA, POLCA allocation "
                "profiles or projected-gradient trajectories), scored for the label set's class and qualifying, whose homogeneity beats the label "
                "permutation null (cluster sizes fixed, {permutations} permutations) with a Holm-corrected p < "
                "{significance} across its strategy's clusters")


def verdict_condition(label_set: LabelSet) -> str:
    """The label set's own part of what "found" requires: its class, qualifier and null."""
    target = ("its majority class" if label_set.positive is None else
              f"class {label_set.name_of(label_set.positive)!r}")
    qualifier = label_set.qualifier
    qualifying = ("at least one member of that class" if qualifier is None else
                  f"more than {qualifier.min_fraction:.0%} of its members of that class with "
                  f"{qualifier.label_set!r} in {list(qualifier.classes)}")
    null = ("labels permuted among the samples its clustering saw" if label_set.stratify_by is None else
            f"labels permuted within each class of {label_set.stratify_by!r}")
    return f"scored for {target}; qualifying: {qualifying}; null: {null}"


def label_verdict(name: str, label_set: LabelSet, variants: dict[str, StrategyResult], config) -> Verdict:
    """Was label set ``name`` found? ``found`` when some cluster meets ``VERDICT_RULE`` (with the label set's own
    :func:`verdict_condition`) in a strategy of
    ``FINDING_VARIANTS``; then the best such cluster (highest homogeneity, then lowest adjusted p-value, then
    highest recall), else the best cluster that is scored for the label set's class and qualifies, found or not
    (None without one). ``random_basis_found``: whether the random-basis strategy (when run) has a cluster meeting
    the same rule, a warning that the finding may not need the Hessian basis. ``recovers_class``: whether the
    finding's cluster also has homogeneity and recall of at least ``RECOVERED`` (a class recovered, not only a
    cluster richer in it than chance; None when nothing was found). ``random_twin``: the best such cluster of the
    finding's strategy along the random basis (``Variant.random_twin``), and ``beyond_random_twin`` whether the
    finding's homogeneity exceeds it (None when nothing was found or the twin did not run). ``control``: the best such cluster
    of the label-free controls (group ``control``, when run); ``beyond_controls``: whether the finding's homogeneity
    exceeds it (None when nothing was found or no control ran): a finding a control matches does not show POLCA at
    work."""

    def candidates(variant_names):
        for variant in variant_names:
            for record in variants[variant].clusters if variant in variants else ():
                score = record.labels[name]
                scored = label_set.positive is None or score.scored_class == label_set.positive
                if scored and score.qualifies:
                    yield variant, record, score

    def rank(candidate):
        _, _, score = candidate
        p = score.pvalue_adjusted
        return (-score.homogeneity, 1.0 if p is None else p, -score.recall)

    def brief(candidate) -> VerdictCluster | None:
        if candidate is None:
            return None
        variant, record, score = candidate
        return VerdictCluster(strategy=variant, label=variants[variant].label, direction=record.direction,
                              cluster=record.cluster, size=record.size, scored_class=score.scored_class,
                              homogeneity=score.homogeneity, recall=score.recall, base_rate=score.base_rate,
                              pvalue_adjusted=score.pvalue_adjusted, beats_null=score.beats_null)

    found = sorted((c for c in candidates(FINDING_VARIANTS) if c[2].beats_null), key=rank)
    finding = found[0][2] if found else None
    best = found[0] if found else min(candidates(FINDING_VARIANTS), key=rank, default=None)
    controls = [v.name for v in VARIANTS if v.group == "control" and v.name in variants]
    control = min(candidates(controls), key=rank, default=None)
    twin_name = next((v.random_twin for v in VARIANTS if found and v.name == found[0][0]), None)
    twin = min(candidates((twin_name,)), key=rank, default=None) if twin_name in variants else None
    return Verdict(
        found=bool(found), condition=verdict_condition(label_set),
        rule=VERDICT_RULE.format(permutations=config.null_permutations, significance=config.significance),
        strategies=[v for v in FINDING_VARIANTS if v in variants],
        random_basis_found=(None if RANDOM_POLCA not in variants else
                            any(c[2].beats_null for c in candidates((RANDOM_POLCA,)))),
        recovers_class=(None if finding is None else finding.homogeneity >= RECOVERED[0]
                        and finding.recall >= RECOVERED[1]),
        random_twin=brief(twin),
        beyond_random_twin=(None if twin_name not in variants else
                            twin is None or finding.homogeneity > twin[2].homogeneity),
        control=brief(control),
        beyond_controls=(None if finding is None or not controls else
                         control is None or finding.homogeneity > control[2].homogeneity),
        best=brief(best))


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


def filter_summary(projected_loss: np.ndarray) -> FilterSummary:
    """The paper's two filters on ``[T, N, K]`` projected losses."""
    kept = analysis.kept_directions(projected_loss)
    mean_curve = np.asarray(projected_loss).mean(axis=1)  # [T, K]
    return FilterSummary(num_directions=int(kept.size), kept_directions=np.flatnonzero(kept).tolist(),
                         dropped_directions=np.flatnonzero(~kept).tolist(),
                         mean_final_projected_loss=(mean_curve[-1] - mean_curve[0]).tolist(),
                         relying_samples=analysis.relying_samples(projected_loss).sum(axis=0).tolist())


def variant_scores(variant, clusterings: list[analysis.Clustering], trajectories: np.ndarray, steps: np.ndarray,
                   label_sets: dict[str, LabelSet], texts, window: int, threshold: int, config,
                   causal: np.ndarray | None) -> StrategyResult:
    """One strategy's results; ``causal``: the per-sample loss increase ``[K, N]`` of removing each direction of the
    strategy's basis, or None."""
    per_direction = variant.trajectory not in PER_SAMPLE_SIGNALS  # the qualifying rules apply to decompositions
    breakthroughs = breakthrough_records(clusterings, trajectories, steps, window, threshold, config)
    scores = {name: label_scores(clusterings, label_set, label_sets) for name, label_set in label_sets.items()}
    tests = {name: permutation_tests(clusterings, label_set, config, label_sets) for name, label_set in
             label_sets.items()}
    summary = {}
    for name, records in scores.items():
        top = analysis.top_clusters(records, TOP_CLUSTERS, qualifying_only=per_direction)
        best = analysis.max_homogeneity(records, qualifying_only=per_direction)
        summary[name] = LabelSetSummary(
            scored_class=label_sets[name].positive, stratified_by=label_sets[name].stratify_by,
            max_homogeneity=None if np.isnan(best) else best,
            top_clusters=[TopCluster(direction=record.direction, cluster=record.cluster, size=record.size,
                                     **_scores(record), **tests[name][record.direction, record.cluster])
                          for record in top],
            per_direction_best=_per_direction_best(records) if per_direction else None,
            clusters_beating_null=sum(test["beats_null"] for test in tests[name].values()))
    by_cluster = {(b.direction, b.cluster): b for b in breakthroughs}
    causal_tests = {} if causal is None else causal_pvalues(clusterings, causal, config)
    cluster_records = []
    for clustering in clusterings:
        effects = ({} if causal is None else
                   {e.cluster: e for e in analysis.ablation_effects(causal[clustering.direction], clustering)})
        for cluster in range(clustering.num_clusters):
            members = clustering.members(cluster)
            key = (clustering.direction, cluster)
            breakthrough = by_cluster.get(key)
            effect = effects.get(cluster)
            cluster_records.append(ClusterRecord(
                direction=clustering.direction, cluster=cluster, size=int(members.size),
                breakthrough_step=None if breakthrough is None else breakthrough.mean_step,
                hidden=None if breakthrough is None else breakthrough.hidden,
                breakthrough_null=None if breakthrough is None else breakthrough.null,
                labels={name: LabelScore(**_scores(_find(records, *key)), **tests[name][key])
                        for name, records in scores.items()},
                causal=None if effect is None else CausalCheck(
                    member_mean=effect.member_mean, others_mean=_finite(effect.others_mean),
                    difference=_finite(effect.difference), rank=effect.rank, **causal_tests[key]),
                nearest_samples=(None if texts is None else
                                 nearest_to_medoid(trajectories, clustering, members).tolist())))
    hidden = [b.hidden for b in breakthroughs]
    hidden_beating = [b.null is not None and b.null.beats_null for b in breakthroughs]
    return StrategyResult(
        label=variant.label, basis=variant.basis, trajectory=variant.trajectory, num_directions=len(clusterings),
        num_clusters=sum(c.num_clusters for c in clusterings),
        hidden_breakthrough_fraction=float(np.mean(hidden)) if hidden else None,
        hidden_beating_null_fraction=float(np.mean(hidden_beating)) if hidden_beating else None,
        breakthroughs=breakthroughs, label_sets=summary,
        causal=_causal_summary(cluster_records, config) if causal is not None else None,
        clusters=cluster_records)


def permutation_tests(clusterings, label_set: LabelSet, config, label_sets: dict[str, LabelSet]) -> dict[tuple, dict]:
    """(direction, cluster) -> the :class:`LabelScore` fields of its permutation test: its homogeneity p-value (label
    permutations, cluster sizes fixed; within the classes of ``label_set.stratify_by`` when it names one), the
    Holm-adjusted p-value across all the strategy's clusters, and whether the adjusted p-value is below
    ``config.significance``. A cluster holding every sample its clustering saw has nothing to be compared with:
    ``"testable": False``."""
    strata = None if label_set.stratify_by is None else label_sets[label_set.stratify_by].values
    keys, pvalues, testable = [], [], []
    for clustering in clusterings:
        if clustering.num_clusters == 0:
            continue
        test = analysis.homogeneity_pvalues(clustering, label_set.values, positive=label_set.positive,
                                            num_permutations=config.null_permutations, seed=config.seed,
                                            strata=strata)
        kept = clustering.sample_indices.size
        for cluster in range(clustering.num_clusters):
            keys.append((clustering.direction, cluster))
            pvalues.append(float(test.pvalues[cluster]))
            testable.append(int(np.count_nonzero(clustering.labels == cluster)) < kept)
    adjusted = analysis.adjust_pvalues(np.asarray(pvalues), "holm") if pvalues else np.zeros(0)
    return {key: {"pvalue": p if ok else None, "pvalue_adjusted": float(a) if ok else None,
                  "beats_null": bool(ok and a < config.significance), "testable": ok}
            for key, p, a, ok in zip(keys, pvalues, adjusted, testable)}


def _breakthrough_null(clusterings, trajectories, steps, found: analysis.ClusterBreakthrough, window, threshold,
                       config) -> BreakthroughNull:
    """A hidden breakthrough against the cluster's increments shuffled in time (``analysis.breakthrough_null``)."""
    clustering = next(c for c in clusterings if c.direction == found.direction)
    curves = _member_curves(trajectories, clustering, clustering.members(found.cluster)).T
    null = analysis.breakthrough_null(curves, steps, window, threshold,
                                      num_shuffles=config.breakthrough_shuffles, seed=config.seed)
    return BreakthroughNull(null_hidden_rate=null.null_hidden_rate, pvalue=null.pvalue,
                            null_median_step=null.null_median, beats_null=bool(null.pvalue < config.significance))


def _per_direction_best(records: list[analysis.ClusterScore]) -> DirectionSpread:
    """The spread over directions of each direction's most homogeneous qualifying cluster."""
    best = {}
    for record in records:
        if record.qualifies:
            best[record.direction] = max(best.get(record.direction, 0.0), record.homogeneity)
    values = np.asarray(list(best.values()))
    if not values.size:
        return DirectionSpread(directions=0, median=None, q25=None, q75=None)
    q25, median, q75 = np.quantile(values, [0.25, 0.5, 0.75])
    return DirectionSpread(directions=int(values.size), median=float(median), q25=float(q25), q75=float(q75))


CAUSAL_RULE = ("a cluster is hurt more than the rest when its mean loss increase exceeds that of the other samples "
               "its clustering saw by more than chance: a one-sided permutation test of the difference (cluster "
               "membership shuffled among those samples, sizes fixed, {permutations} permutations, seed {seed}), "
               "Holm-corrected across the strategy's clusters, p < {significance}")


def causal_pvalues(clusterings, causal: np.ndarray, config) -> dict[tuple, dict]:
    """(direction, cluster) -> the :class:`CausalCheck` fields of the causal check: its permutation p-value
    (``analysis.ablation_pvalues`` on the row of ``causal [K, N]`` of the cluster's direction), its Holm adjustment
    across all the strategy's clusters, the null's spread, and ``hurt_more``: the adjusted p-value is below
    ``config.significance`` (``CAUSAL_RULE``)."""
    keys, pvalues, spreads = [], [], []
    for clustering in clusterings:
        if clustering.num_clusters == 0:
            continue
        test = analysis.ablation_pvalues(causal[clustering.direction], clustering,
                                         num_permutations=config.null_permutations, seed=config.seed)
        for cluster in range(clustering.num_clusters):
            keys.append((clustering.direction, cluster))
            pvalues.append(float(test.pvalues[cluster]))
            spreads.append(_finite(test.null_std[cluster]))
    adjusted = analysis.adjust_pvalues(np.asarray(pvalues), "holm") if pvalues else np.zeros(0)
    return {key: {"pvalue": p, "pvalue_adjusted": float(a), "null_std": spread,
                  "hurt_more": bool(a < config.significance)}
            for key, p, a, spread in zip(keys, pvalues, adjusted, spreads)}


def _causal_summary(cluster_records: list[ClusterRecord], config) -> CausalSummary:
    """How the strategy's clusters fare in the causal check: the median difference between a cluster's mean loss
    increase and the other samples', how many clusters have a positive difference, and how many are hurt more than
    the rest beyond noise (``CAUSAL_RULE``)."""
    checked = [r.causal for r in cluster_records if r.causal is not None and r.causal.difference is not None]
    differences = np.asarray([c.difference for c in checked])
    return CausalSummary(clusters=len(checked), hurt_more_than_others=sum(c.hurt_more for c in checked),
                         positive_difference=int(np.sum(differences > 0)),
                         median_difference=float(np.median(differences)) if checked else None,
                         rule=CAUSAL_RULE.format(permutations=config.null_permutations, seed=config.seed,
                                                 significance=config.significance))


def _finite(value: float) -> float | None:
    return None if not np.isfinite(value) else float(value)


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
                         window_steps: int, threshold: int, config) -> list[Breakthrough]:
    """Every cluster's mean Eq. 9 breakthrough step on the clustered trajectories ``[T, N(, K)]`` at ``steps [T]``,
    whether it is hidden (after τ = ``threshold``) and then its null (:func:`_breakthrough_null`)."""
    clustered = [c for c in clusterings if c.num_clusters]
    found = analysis.cluster_breakthroughs(clustered, trajectories, steps, window_steps) if clustered else []
    records = []
    for breakthrough in found:
        hidden = bool(breakthrough.mean_step > threshold)
        null = (_breakthrough_null(clusterings, trajectories, steps, breakthrough, window_steps, threshold, config)
                if hidden else None)
        records.append(Breakthrough(direction=breakthrough.direction, cluster=breakthrough.cluster,
                                    size=breakthrough.size, mean_step=breakthrough.mean_step, hidden=hidden,
                                    null=null))
    return records


def nearest_to_medoid(trajectories: np.ndarray, clustering: analysis.Clustering, members: np.ndarray) -> np.ndarray:
    """int[≤ NEAREST_SAMPLES]: the cluster's members nearest its medoid in trajectory space, the medoid first."""
    curves = _member_curves(trajectories, clustering, members)
    centre = curves[analysis.medoid(curves)]
    order = np.argsort(np.linalg.norm(curves - centre, axis=1), kind="stable")
    return members[order[:NEAREST_SAMPLES]]


def _member_curves(trajectories: np.ndarray, clustering: analysis.Clustering, members: np.ndarray) -> np.ndarray:
    """float[m, T]: the members' curves, of trajectories ``[T, N, K]`` at the clustering's direction, or of one signal
    ``[T, N]`` (the exact loss the joint and the projected-gradient strategies read, whatever their direction)."""
    if trajectories.ndim == 2:
        return np.asarray(trajectories[:, members]).T
    return np.asarray(trajectories[:, members, clustering.direction]).T


def _find(records: list[analysis.ClusterScore], direction, cluster) -> analysis.ClusterScore:
    return next(r for r in records if r.direction == direction and r.cluster == cluster)


def _scores(record: analysis.ClusterScore) -> dict:
    """A cluster's scores against one label set: the :class:`LabelScore` fields besides its permutation test."""
    return dict(scored_class=record.label, homogeneity=record.homogeneity, recall=record.recall, f1=record.f1,
                base_rate=record.base_rate, qualifies=record.qualifies)
