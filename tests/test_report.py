"""The host stages (cluster, score, report) on synthetic run directories with planted answers, written through the
real classes: scores against label sets, breakthroughs, empty results explained, the paper tables of a paper task."""

import dataclasses
import json
import re
import time

import numpy as np
import pytest

from synthetic_runs import THRESHOLD, synthetic_labels, synthetic_run

import polca_jax as pj
from polca_jax import analysis
from polca_jax.files import write_json_atomic
from polca_jax.errors import PolcaError
from polca_jax.pipeline import (LabelSet, RunConfig, RunDirectory, load_labels, load_task_definition, read_metrics,
                                run_stages)
from polca_jax.pipeline import run as polca_run
from polca_jax.pipeline._config import apply_overrides
from polca_jax.pipeline._host_settings import host_result
from polca_jax.pipeline._results import ClusterRecord, LabelScore, StrategyResult
from polca_jax.pipeline._score import label_verdict, permutation_tests
from polca_jax.pipeline._report import write_report

PAPER_HEADINGS = ("### Table 1", "### Table 8", "### Table 9", "### Table 10", "### Table 11")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = synthetic_run(tmp_path_factory.mktemp("report") / "run", coin=True)
    run_stages(run, load_task_definition("arithmetic"), ["cluster", "score", "report"], progress=False,
               log=lambda _: None)
    text = (run / "report" / "report.md").read_text()
    return run, text, read_metrics(run / "metrics.json")


def linked_figures(report_path, text):
    return [report_path.parent / link for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)]


def test_the_planted_late_carry_drop_is_found_scored_and_called_hidden(finished):
    _, _, metrics = finished
    polca = metrics.variants["polca"]
    assert metrics.filters["hessian"].kept_directions == [0, 1]
    best = polca.label_sets["carry"].top_clusters[0]
    assert (best.direction, best.scored_class, best.homogeneity, best.recall) == (0, True, 1.0, 1.0)
    assert best.base_rate == pytest.approx(10 / 40)
    carry_cluster = next(c for c in polca.clusters if c.direction == 0 and c.cluster == best.cluster)
    assert carry_cluster.hidden and carry_cluster.breakthrough_step > THRESHOLD
    assert carry_cluster.labels["place"].scored_class in (1, 2)
    # the samples nearest the medoid are members of the cluster
    place, carry = synthetic_labels()
    assert all(carry[i] for i in carry_cluster.nearest_samples)
    place_best = polca.label_sets["place"].top_clusters[0]  # direction 1 isolates the 1000s tokens
    assert (place_best.direction, place_best.scored_class, place_best.homogeneity) == (1, 0, 1.0)
    exact = metrics.variants["exact_loss"].label_sets["carry"]
    assert exact.max_homogeneity is None or exact.max_homogeneity < 1.0


def test_the_planted_clusters_beat_their_nulls_and_the_causal_check_finds_their_direction(finished):
    _, text, metrics = finished
    polca = metrics.variants["polca"]
    carry_cluster = next(c for c in polca.clusters if c.direction == 0 and c.labels["carry"].homogeneity == 1.0)
    carry = carry_cluster.labels["carry"]
    # 10 carry tokens among 40: a pure cluster of 10 happens by chance with probability 1 / C(40, 10)
    assert carry.testable and carry.pvalue < 0.01 and carry.beats_null
    assert carry.pvalue_adjusted >= carry.pvalue
    assert carry_cluster.causal.rank == 1 and carry_cluster.causal.difference > 0.9
    assert carry_cluster.causal.hurt_more and carry_cluster.causal.pvalue_adjusted < 0.05
    # hidden, but 6 checkpoints leave Eq. 9 four candidate steps: shuffled increments land as late too often
    null = carry_cluster.breakthrough_null
    assert carry_cluster.hidden and 0.2 < null.null_hidden_rate < 0.8 and not null.beats_null
    others = [c for c in polca.clusters if c.direction == 0 and c is not carry_cluster]
    assert all(c.causal.difference < 0 and not c.causal.hurt_more for c in others)
    assert polca.causal.hurt_more_than_others >= 2  # the carry cluster and direction 1's 1000s cluster
    assert "## Against the nulls" in text and "## Causal check" in text and "✓" in text
    assert "*The random-basis null is not run: `--set ablations=true` adds it.*" in text


def test_each_label_set_gets_a_verdict_the_planted_carry_found_the_coin_flips_not(finished):
    _, text, metrics = finished
    verdicts = metrics.verdicts
    carry = verdicts["carry"]
    assert carry.found and carry.best.strategy in ("polca", "first_order_polca", "polca_profile")
    assert carry.best.homogeneity == 1.0 and carry.best.recall == 1.0 and carry.best.beats_null
    assert verdicts["place"].found  # direction 1 isolates the 1000s tokens
    coin = verdicts["coin"]
    assert not coin.found and coin.best is not None and not coin.best.beats_null
    findings = text.split("## What this run found")[1].split("## Strategies")[0]
    line = next(line for line in findings.splitlines() if "**carry: found** —" in line)
    assert re.search(r"direction \d, cluster \d, homogeneity 1\.000 \(recall 1\.000\), Holm p = [0-9.e-]+", line)
    coin_line = next(line for line in findings.splitlines() if "**coin: not found**" in line)
    assert re.search(r"\(best .+ [01]\.\d{3}, p = [0-9.e-]+\)", coin_line)
    assert "**What \"found\" requires:**" in findings and "Holm-corrected p < 0.05" in findings
    assert "within each class" not in carry.condition and "'place' in [1, 2]" in carry.condition
    assert "(`carry` scored for class 'True'; qualifying: more than 85%" in findings


def test_a_causal_difference_of_1e_7_inside_noise_is_no_effect(tmp_path):
    run = synthetic_run(tmp_path / "run", baselines=False)
    place, carry = synthetic_labels()
    noise = 0.01 * np.random.default_rng(5).standard_normal((3, place.size))
    np.save(run / "causal" / "hessian.npy", noise + 1e-7 * np.stack([carry, place == 0, carry]))
    run_stages(run, load_task_definition("arithmetic"), ["cluster", "score", "report"], progress=False,
               log=lambda _: None)
    polca = read_metrics(run / "metrics.json").variants["polca"]
    checked = [c.causal for c in polca.clusters]
    assert checked and polca.causal.positive_difference >= 1  # some differences are positive ...
    assert polca.causal.hurt_more_than_others == 0 and not any(c.hurt_more for c in checked)  # ... no effect
    text = (run / "report" / "report.md").read_text()
    assert "**Rule:** a cluster is hurt more than the rest when" in text and "Holm-corrected across" in text
    assert "POLCA: 0 of 4 clusters hurt more than the rest beyond noise" in text


def test_the_report_describes_the_run_and_the_paper_tables(finished):
    run, text, metrics = finished
    assert "## What this run found" in text and "2 of 3 basis directions pass" in text
    assert "**Label set `carry`**" in text and "POLCA 1.000 (direction 0" in text
    for heading in ("## Strategies", "## Label set `carry`", "## Label set `place`", *PAPER_HEADINGS):
        assert heading in text
    for paper_value in ("0.973", "0.514", "0.355", "0.031", "0.304", "0.948", "0.792"):
        assert paper_value in text
    rows = [line for line in text.splitlines() if line.startswith("| Random orthonormal basis |")]
    assert rows and "not run" in rows[0]
    assert "problem 0, place 1" in text or "problem 2, place 1" in text  # texts nearest a medoid
    stage_rows = {line.split(" | ")[0].strip("| ") for line in text.splitlines() if " s |" in line}
    assert {"train", "decompose", "report"} <= stage_rows  # the report stage lists its own time
    assert "0 task option(s) above are the task factory's" in text  # the synthetic task has no options


def test_every_linked_figure_is_a_png_and_every_kept_direction_is_drawn(finished):
    run, text, _ = finished
    path = run / "report" / "report.md"
    figures = linked_figures(path, text)
    names = {figure.name for figure in figures}
    assert {"training_curves.png", "exact_loss_per_class.png", "directions_overview.png", "exact_loss_clusters.png",
            "polca_direction_0.png", "polca_direction_1.png"} <= names
    for figure in figures:
        assert figure.is_file() and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
    assert set((path.parent / "figures").glob("*.png")) == set(figures)


def test_a_label_confounded_with_the_strata_a_clustering_separates_does_not_beat_the_stratified_null():
    place = np.repeat(np.arange(4), 200)  # carry lives only in places 1 and 2, half of their samples
    carry = np.isin(place, (1, 2)) & (np.random.default_rng(0).random(place.size) < 0.5)
    by_place = analysis.Clustering(np.where(np.isin(place, (1, 2)), 0, 1), None, np.arange(place.size), 2, 2,
                                   "euclidean", None)
    config = RunConfig(task="arithmetic", preset=None, task_options={}, null_permutations=199)
    places = LabelSet(place)
    plain = permutation_tests([by_place], LabelSet(carry, positive=True), config, {"place": places})
    stratified = permutation_tests([by_place], LabelSet(carry, positive=True, stratify_by="place"), config,
                                   {"place": places})
    assert plain[None, 0]["beats_null"] and plain[None, 0]["pvalue"] == pytest.approx(1 / 200)
    assert not stratified[None, 0]["beats_null"] and stratified[None, 0]["pvalue"] == 1.0


def test_a_stratified_label_set_is_scored_and_reported_as_such(tmp_path):
    run = synthetic_run(tmp_path / "run", baselines=False, carry_stratified_by="place")
    run_stages(run, load_task_definition("arithmetic"), ["cluster", "score", "report"], progress=False,
               log=lambda _: None)
    assert load_labels(run)[0]["carry"].stratify_by == "place"
    metrics = read_metrics(run / "metrics.json")
    assert metrics.variants["polca"].label_sets["carry"].stratified_by == "place"
    text = (run / "report" / "report.md").read_text()
    assert "The permutation null shuffles `carry` within each class of `place`" in text


def test_the_report_says_which_strategies_too_few_permutations_keep_from_beating_the_null(tmp_path):
    for permutations, blocked in ((9, True), (1000, False)):
        run = synthetic_run(tmp_path / str(permutations), baselines=False, null_permutations=permutations)
        run_stages(run, load_task_definition("arithmetic"), ["cluster", "score", "report"], progress=False,
                   log=lambda _: None)
        metrics = read_metrics(run / "metrics.json")
        clusters = metrics.variants["polca"].num_clusters
        text = (run / "report" / "report.md").read_text()
        assert ("**No cluster of these strategies can beat the permutation null** at 9 permutations" in text) is blocked
        if blocked:  # POLCA's 4 clusters: Holm puts every p at or above 4 / 10
            assert f"POLCA ({clusters} clusters: p ≥ {clusters / 10:.2g})" in text
            most = max(info.num_clusters for info in metrics.variants.values())  # every one blocked at 9
            assert f"`--set null_permutations={most * 20}` with `--stage score`" in text  # M / 0.05
            every = [score for record in metrics.variants["polca"].clusters for score in record.labels.values()]
            assert every and all(score.pvalue_adjusted is None or score.pvalue_adjusted >= clusters / 10 - 1e-12
                                 for score in every)


def test_the_arithmetic_task_stratifies_carry_by_place():
    definition = load_task_definition("arithmetic")
    options = {k: v for k, v in definition.presets["tiny"].items() if k in ("num_layers", "d_model", "num_heads",
               "d_mlp", "num_train_problems", "num_eval_problems", "num_hessian_problems", "batch_size")}
    task = definition(**options)
    assert task.labels["carry"].stratify_by == "place"
    with pytest.raises(PolcaError, match="stratified by 'nowhere', which is not another label set"):
        dataclasses.replace(task, labels={**task.labels, "carry": dataclasses.replace(
            task.labels["carry"], stratify_by="nowhere")}).check()


def test_no_direction_kept_is_explained_with_what_to_try(tmp_path):
    run = synthetic_run(tmp_path / "run", rising=True, baselines=False)
    run_stages(run, load_task_definition("arithmetic"), ["cluster", "score", "report"], progress=False,
               log=lambda _: None)
    text = (run / "report" / "report.md").read_text()
    assert "0 of 3 basis directions pass" in text
    assert "no direction passed the oscillation filter" in text and "--set basis_every" in text
    assert "directions_overview.png" in text  # the method is still visible


def test_only_noise_is_explained_with_the_settings_used(tmp_path):
    run = synthetic_run(tmp_path / "run", baselines=False, min_cluster_size=35)
    run_stages(run, load_task_definition("arithmetic"), ["cluster", "score", "report"], progress=False,
               log=lambda _: None)
    text = (run / "report" / "report.md").read_text()
    assert "HDBSCAN labelled every sample as noise" in text and "min_cluster_size=35" in text
    assert "#### Direction 0" in text and "no cluster;" in text  # unclustered kept directions are drawn


def test_a_run_that_has_not_scored_yet_still_gives_a_report(tmp_path):
    RunDirectory(tmp_path / "run", RunConfig(task="arithmetic", preset="tiny", task_options={}))
    text = write_report(tmp_path / "run").read_text()
    assert "No numbers yet: the score stage has not run (finished stages: none)" in text
    assert "metrics.json is missing" in text and "polca/hessian/ is missing" in text
    assert linked_figures(tmp_path / "run" / "report" / "report.md", text) == []


# --- re-clustering and re-scoring an existing run without recomputing ------------------------------------------------


@pytest.fixture
def finished_arithmetic(tmp_path):
    """A synthetic run with the arithmetic task's options written out, as ``polca run arithmetic`` reopens it."""
    run = synthetic_run(tmp_path / "run", baselines=False)
    write_json_atomic(run / "config.json",
                      apply_overrides(load_task_definition("arithmetic"), run.config, {}).to_dict())
    polca_run("arithmetic", run.path, stages=["cluster", "score", "report"], progress=False, log=lambda _: None)
    return run.path


def test_reclustering_with_another_min_cluster_size_redoes_only_the_host_stages(finished_arithmetic):
    out = finished_arithmetic
    earlier = {stage: (out / "stages" / f"{stage}.json").read_bytes() for stage in ("train", "basis", "decompose",
                                                                                    "causal")}
    clusters_before = analysis.load_clusterings(out / "clusters" / "polca.npz")
    assert "min_cluster_size=5," in (out / "report" / "report.md").read_text()
    messages = []
    started = time.perf_counter()
    polca_run("arithmetic", out, stages=["cluster"], settings=["min_cluster_size=12"], progress=False,
              log=messages.append)
    assert time.perf_counter() - started < 60
    ran = [m.split("]")[0].strip("[") for m in messages if m.endswith("running")]
    assert ran == ["cluster", "score", "report"] and "min_cluster_size 5 -> 12" in messages[0]
    assert {stage: (out / "stages" / f"{stage}.json").read_bytes() for stage in earlier} == earlier
    assert json.loads((out / "config.json").read_text())["min_cluster_size"] == 12
    assert json.loads((out / "stages" / "cluster.json").read_text())["settings"]["min_cluster_size"] == 12
    clusters_after = analysis.load_clusterings(out / "clusters" / "polca.npz")
    assert sum(c.num_clusters for c in clusters_before) == 4 and sum(c.num_clusters for c in clusters_after) == 0
    text = (out / "report" / "report.md").read_text()
    line = next(line for line in text.splitlines() if "**Settings of these results:**" in line)
    assert "min_cluster_size=12," in line and "min_cluster_size 5 → 12" in line
    assert not read_metrics(out / "metrics.json").verdicts["carry"].found


def test_a_change_of_a_setting_the_earlier_stages_used_is_refused_naming_it(finished_arithmetic):
    out = finished_arithmetic
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    with pytest.raises(ValueError, match=r"learning_rate: 0.001 on disk vs 0.01; min_cluster_size: 5 on disk vs 3\); "
                                         r"learning_rate would change what the train"):
        polca_run("arithmetic", out, stages=["cluster"], settings=["learning_rate=0.01", "min_cluster_size=3"],
                  progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="min_cluster_size can change on the existing run .* only when host stages "
                                         "alone run .*add --stage cluster"):
        polca_run("arithmetic", out, settings=["min_cluster_size=3"], progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match="second_order=exact needs the per-sample curvature"):
        polca_run("arithmetic", out, stages=["cluster"], settings=["second_order=exact"], progress=False,
                  log=lambda _: None)
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_another_second_order_is_redone_from_the_stored_arrays(finished_arithmetic):
    out = finished_arithmetic
    polca_run("arithmetic", out, stages=["score"], settings=["second_order=trapezoid"], progress=False,
              log=lambda _: None)  # a clustering setting: cluster is redone too
    record = json.loads((out / "stages" / "cluster.json").read_text())
    assert record["settings"]["second_order"] == "trapezoid" and record["second_order_redone"] == {
        "hessian": "none -> trapezoid"}
    stored = pj.POLCAResult.load(out / "polca" / "hessian")
    redone = host_result(out, "hessian", "trapezoid")
    np.testing.assert_allclose(redone.projected_loss, stored.projected_loss_with("trapezoid"), atol=1e-12)
    assert redone.config["recomputed_from"] == "none"
    assert host_result(out, "hessian", "none").config == stored.config
    text = (out / "report" / "report.md").read_text()
    assert "redone from the stored arrays with another second order than the decomposition's (hessian: none -> " \
           "trapezoid)" in text


def test_projected_gradients_reclustered_per_direction_after_a_rotation_are_scored_and_reported(tmp_path):
    run = synthetic_run(tmp_path / "run")
    write_json_atomic(run / "config.json",
                      apply_overrides(load_task_definition("arithmetic"), run.config, {}).to_dict())
    polca_run("arithmetic", run.path, stages=["cluster"], progress=False, log=lambda _: None,
              settings=["gradient_directions=each", "gradient_increments=true", "gradient_rotation=varimax"])
    record = json.loads((run / "stages" / "cluster.json").read_text())["settings"]
    assert (record["gradient_directions"], record["gradient_increments"], record["gradient_rotation"]) == (
        "each", True, "varimax")
    clusterings = analysis.load_clusterings(run / "clusters" / "polca_gradients.npz")
    assert [clustering.direction for clustering in clusterings] == [0, 1, 2]
    metrics = read_metrics(run / "metrics.json")
    gradients = metrics.variants["polca_gradients"]
    assert gradients.num_directions == 3 and gradients.num_clusters == sum(c.num_clusters for c in clusterings)
    assert {c.direction for c in gradients.clusters} <= {0, 1, 2} and gradients.label_sets["carry"].per_direction_best
    text = (run / "report" / "report.md").read_text()
    line = next(line for line in text.splitlines() if "**Settings of these results:**" in line)
    assert "gradient_directions=each" in line and "gradient_rotation=varimax" in line


def test_a_finding_that_a_label_free_control_matches_is_marked_so():
    def strategy(label, homogeneity, beats_null=True):
        score = LabelScore(scored_class=1, homogeneity=homogeneity, recall=0.8, f1=0.5, base_rate=0.5, qualifies=True,
                           pvalue=0.001, pvalue_adjusted=0.001 if beats_null else 0.5, beats_null=beats_null,
                           testable=True)
        cluster = ClusterRecord(direction=0, cluster=0, size=40, breakthrough_step=None, hidden=None,
                                breakthrough_null=None, labels={"group": score})
        return StrategyResult(label=label, basis="hessian", trajectory="projected_loss", num_directions=1,
                              num_clusters=1, hidden_breakthrough_fraction=None, hidden_beating_null_fraction=None,
                              breakthroughs=[], label_sets={}, causal=None, clusters=[cluster])

    config = RunConfig(task="t", preset=None, task_options={})
    label_set = LabelSet(np.array([0, 1] * 40), positive=1)
    for control, beyond in ((0.95, True), (0.97, False), (0.99, False)):
        variants = {"polca": strategy("POLCA", 0.97), "gradient_norms": strategy("Control", control, False)}
        verdict = label_verdict("group", label_set, variants, config)
        assert verdict.found and verdict.beyond_controls is beyond, control
        assert verdict.control.homogeneity == control and verdict.control.strategy == "gradient_norms"
        assert verdict.recovers_class  # homogeneity 0.97 at recall 0.8
    partial = label_verdict("group", label_set, {"polca": strategy("POLCA", 0.7)}, config)
    assert partial.found and partial.recovers_class is False
    assert partial.beyond_random_twin is None and partial.random_twin is None  # the random basis did not run
    for random, beyond in ((0.9, True), (0.97, False)):  # POLCA's random-basis twin, whether or not it beats its null
        verdict = label_verdict("group", label_set, {"polca": strategy("POLCA", 0.97),
                                                     "random_basis": strategy("Random", random, False)}, config)
        assert verdict.beyond_random_twin is beyond and verdict.random_twin.homogeneity == random
    without_control = label_verdict("group", label_set, {"polca": strategy("POLCA", 0.97)}, config)
    assert without_control.beyond_controls is None and without_control.control is None
    not_found = label_verdict("group", label_set, {"polca": strategy("POLCA", 0.97, False),
                                                   "gradient_norms": strategy("Control", 0.5)}, config)
    assert not not_found.found and not_found.beyond_controls is None
