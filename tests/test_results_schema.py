"""The results' schema (``metrics.json``): records written and read back unchanged, and a file that does not match
them (a missing or unknown key, a value of another type, another schema version) refused naming where."""

import json

import pytest

from polca_jax.errors import PolcaError
from polca_jax.pipeline import RunMetrics, read_metrics
from polca_jax.pipeline._results import (SCHEMA_VERSION, Breakthrough, BreakthroughNull, CausalCheck, CausalSummary,
                                         ClusterRecord, DirectionSpread, FilterSummary, LabelScore, LabelSetSummary,
                                         ScoreSettings, StrategyResult, TopCluster, Verdict, VerdictCluster,
                                         write_metrics)


def score(scored_class, homogeneity: float) -> LabelScore:
    return LabelScore(scored_class=scored_class, homogeneity=homogeneity, recall=0.5, f1=0.4, base_rate=0.25,
                      qualifies=True, pvalue=0.01, pvalue_adjusted=0.03, beats_null=True, testable=True)


def cluster(direction, index: int, *, hidden: bool, causal: bool) -> ClusterRecord:
    """A cluster record; ``causal``: with its causal check (left out of the file otherwise)."""
    null = BreakthroughNull(null_hidden_rate=0.4, pvalue=0.2, null_median_step=30.0, beats_null=False)
    return ClusterRecord(
        direction=direction, cluster=index, size=10 + index, breakthrough_step=40.0 if hidden else 10.0,
        hidden=hidden, breakthrough_null=null if hidden else None,
        labels={"carry": score(True, 0.9), "place": score("10s", 0.5)},
        causal=CausalCheck(member_mean=0.5, others_mean=None, difference=None, rank=1, pvalue=0.01,
                           pvalue_adjusted=0.02, null_std=0.1, hurt_more=True) if causal else None,
        nearest_samples=[3, 1, 4])


def sample_metrics() -> RunMetrics:
    """Every record of the schema, with None where the file may hold null and omitted keys both present and not."""
    clusters = [cluster(0, 0, hidden=True, causal=True), cluster(0, 1, hidden=False, causal=False)]
    top = TopCluster(direction=0, cluster=0, size=10, scored_class=True, homogeneity=0.9, recall=0.5, f1=0.4,
                     base_rate=0.25, qualifies=True, pvalue=None, pvalue_adjusted=None, beats_null=False,
                     testable=False)
    polca = StrategyResult(
        label="POLCA", basis="hessian", trajectory="projected_loss", num_directions=2, num_clusters=2,
        hidden_breakthrough_fraction=0.5, hidden_beating_null_fraction=0.0,
        breakthroughs=[Breakthrough(direction=0, cluster=0, size=10, mean_step=40.0, hidden=True,
                                    null=clusters[0].breakthrough_null),
                       Breakthrough(direction=0, cluster=1, size=11, mean_step=10.0, hidden=False)],
        label_sets={"carry": LabelSetSummary(scored_class=True, stratified_by="place", max_homogeneity=0.9,
                                             top_clusters=[top], clusters_beating_null=1,
                                             per_direction_best=DirectionSpread(directions=1, median=0.9, q25=0.9,
                                                                                q75=0.9))},
        causal=CausalSummary(clusters=1, hurt_more_than_others=1, positive_difference=1, median_difference=0.4,
                             rule="a rule"),
        clusters=clusters)
    exact = StrategyResult(
        label="Exact loss", basis="hessian", trajectory="loss", num_directions=1, num_clusters=1,
        hidden_breakthrough_fraction=None, hidden_beating_null_fraction=None, breakthroughs=[],
        label_sets={"carry": LabelSetSummary(scored_class=None, stratified_by=None, max_homogeneity=None,
                                             top_clusters=[], per_direction_best=None, clusters_beating_null=0)},
        causal=None, clusters=[cluster(None, 0, hidden=False, causal=False)])
    best = VerdictCluster(strategy="polca", label="POLCA", direction=0, cluster=0, size=10, scored_class=True,
                          homogeneity=0.9, recall=0.5, base_rate=0.25, pvalue_adjusted=0.03, beats_null=True)
    return RunMetrics(
        settings=ScoreSettings(window_steps=10, threshold_step=25, threshold_source="config", null_permutations=99,
                               breakthrough_shuffles=20, significance=0.05),
        num_samples=40,
        filters={"hessian": FilterSummary(num_directions=3, kept_directions=[0, 1], dropped_directions=[2],
                                          mean_final_projected_loss=[-1.0, -0.5, 0.25], relying_samples=[40, 30, 2])},
        variants={"exact_loss": exact, "polca": polca},
        verdicts={"carry": Verdict(found=True, condition="scored for class 'True'", rule="the rule",
                                   strategies=["polca"], random_basis_found=None, recovers_class=False,
                                   random_twin=None, beyond_random_twin=None, control=best, beyond_controls=False,
                                   best=best)})


@pytest.fixture
def written(tmp_path):
    """``metrics.json`` of :func:`sample_metrics` and its JSON contents."""
    path = tmp_path / "metrics.json"
    write_metrics(path, sample_metrics())
    return path, json.loads(path.read_text())


def test_records_written_and_read_back_are_equal(written):
    path, contents = written
    assert read_metrics(path) == sample_metrics()
    assert contents["schema_version"] == SCHEMA_VERSION and next(iter(contents)) == "schema_version"
    first, second = contents["variants"]["polca"]["clusters"]
    assert "causal" in first and "causal" not in second  # left out when None, as the score stage always wrote it
    assert "null" not in contents["variants"]["polca"]["breakthroughs"][1]
    assert first["labels"]["place"]["class"] == "10s" and first["labels"]["carry"]["class"] is True


def test_a_file_without_schema_version_is_read_as_version_1(written):
    path, contents = written
    del contents["schema_version"]
    path.write_text(json.dumps(contents))
    assert read_metrics(path) == sample_metrics()


def rewritten(path, contents, change) -> str:
    """The refusal of the file after ``change(contents)``."""
    change(contents)
    path.write_text(json.dumps(contents))
    with pytest.raises(PolcaError) as refusal:
        read_metrics(path)
    return str(refusal.value)


def test_a_missing_key_is_refused_naming_its_path(written):
    path, contents = written
    message = rewritten(path, contents, lambda c: c["variants"]["polca"]["clusters"][1].pop("size"))
    assert message.startswith(f"{path}: variants.polca.clusters[1]: missing key 'size'")
    assert "--stage score" in message


def test_an_unknown_key_is_refused_naming_its_path(written):
    path, contents = written
    message = rewritten(path, contents, lambda c: c["verdicts"]["carry"]["best"].update(score=1.0))
    assert message.startswith(f"{path}: verdicts.carry.best: unknown key 'score'")


@pytest.mark.parametrize("change, refusal", [
    (lambda c: c["settings"].update(window_steps="10"), "settings.window_steps: expected int, got '10'"),
    (lambda c: c["filters"]["hessian"]["kept_directions"].append(None),
     "filters.hessian.kept_directions[2]: expected int, got None"),
    (lambda c: c["variants"]["polca"].update(causal=[]), "variants.polca.causal: expected an object"),
])
def test_a_value_of_another_type_is_refused_naming_its_path(written, change, refusal):
    path, contents = written
    assert rewritten(path, contents, change).startswith(f"{path}: {refusal}")


def test_another_schema_version_is_refused_with_the_stage_to_redo(written):
    path, contents = written
    message = rewritten(path, contents, lambda c: c.update(schema_version=SCHEMA_VERSION + 1))
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert "redo the score stage: polca run TASK --out RUN_DIR --stage score --force" in message
