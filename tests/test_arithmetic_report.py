"""The arithmetic report on a small synthetic run directory written through the real classes."""

import dataclasses
import json
import math
import re

import numpy as np
import pytest

import polca_jax
from polca_jax.analysis import (
    carry_cluster_scores,
    cluster_breakthroughs,
    cluster_directions,
    cluster_signal,
    hidden_breakthrough_fraction,
    max_carry_homogeneity,
    save_clusterings,
    top_carry_clusters,
)
from polca_jax.experiments.arithmetic.report import write_report

STEPS = np.array([0, 10, 20, 30, 40, 50])
WINDOW, THRESHOLD = 10, 25
NUM_PROBLEMS, NUM_DIRECTIONS = 10, 3
TABLE_HEADINGS = ("## Table 1", "## Table 8", "## Table 9", "## Table 10", "## Table 11")


def synthetic_labels():
    """place int[40] (4 answer tokens per problem) and carry bool[40]: carries into the 100s and 10s of the even
    problems only."""
    place = np.tile(np.arange(4), NUM_PROBLEMS)
    carry = np.isin(place, (1, 2)) & (np.repeat(np.arange(NUM_PROBLEMS), 4) % 2 == 0)
    return place, carry


def synthetic_result(place, carry, rng):
    """POLCAResult (T=6, N=40, K=3) with no second order and unit steps, so projected loss = cumsum of projections.

    Direction 0: carry tokens drop late (after step 30), the others early; direction 1: 1000s tokens drop, the others
    rise; direction 2: a random walk. Exact loss: falls faster for higher digit places.
    """
    num_samples = place.size
    late = np.array([0, 0, 0, -0.1, -1.0, -1.05])
    early = np.array([0, -1.0, -1.05, -1.1, -1.1, -1.1])
    projected = np.zeros((STEPS.size, num_samples, NUM_DIRECTIONS))
    projected[:, :, 0] = np.where(carry[None, :], late[:, None], early[:, None])
    projected[:, :, 1] = np.where(place[None, :] == 0, -1.0, 0.5) * (STEPS[:, None] / STEPS[-1])
    projected[1:] += 0.02 * rng.standard_normal((STEPS.size - 1, num_samples, NUM_DIRECTIONS))
    projected[:, :, 2] = np.cumsum(rng.standard_normal((STEPS.size, num_samples)), axis=0)
    projections = np.concatenate([np.diff(projected, axis=0), rng.standard_normal((1, num_samples, NUM_DIRECTIONS))])
    loss = 2.3 * np.exp(-STEPS[:, None] / (10.0 * (place[None, :] + 1))) + 0.01 * rng.random((STEPS.size, num_samples))
    result = polca_jax.POLCAResult(
        STEPS, loss, projections, np.ones((STEPS.size - 1, NUM_DIRECTIONS)),
        np.zeros((STEPS.size - 1, num_samples, NUM_DIRECTIONS)), np.zeros(STEPS.size - 1), {"second_order": "none"},
    )
    np.testing.assert_allclose(result.projected_loss, projected - projected[:1], atol=1e-12)
    return result


def variant_metrics(label, basis, trajectory, clusterings, signal, steps, place, carry):
    """One metrics.json variant entry, computed with the real analysis functions (signal float[T, N(, K)] at steps)."""
    scores = carry_cluster_scores(clusterings, place, carry)

    def finite_or_none(value):
        return None if math.isnan(value) else value

    def without_qualifies(record):
        return {key: value for key, value in dataclasses.asdict(record).items() if key != "qualifies"}

    return {
        "label": label,
        "basis": basis,
        "trajectory": trajectory,
        "num_clusters": sum(c.num_clusters for c in clusterings),
        "max_carry_homogeneity": finite_or_none(max_carry_homogeneity(scores)),
        "top_clusters": [without_qualifies(record) for record in top_carry_clusters(scores, 3)],
        "hidden_breakthrough_fraction": finite_or_none(
            hidden_breakthrough_fraction(clusterings, signal, steps, WINDOW, THRESHOLD)),
        "breakthroughs": [dataclasses.asdict(b) for b in cluster_breakthroughs(clusterings, signal, steps, WINDOW)],
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with the hessian POLCA result, its basis, and the polca / exact_loss / loss_change variants."""
    run_dir = tmp_path_factory.mktemp("arithmetic_run")
    rng = np.random.default_rng(0)
    place, carry = synthetic_labels()
    config = {"preset": "tiny-test", "num_steps": 50, "polca_every": 10, "basis_every": 10,
              "window_steps": WINDOW, "threshold_step": THRESHOLD, "second_order": "none"}
    (run_dir / "config.json").write_text(json.dumps(config))
    log = [
        {"step": step, "loss": 2.0 / (1 + step), "answer_accuracy": [min(1.0, step / (20 * (p + 1))) for p in range(4)]}
        for step in STEPS.tolist()
    ]
    log.append({"step": 55})  # a row without metrics must be skipped
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(row) for row in log) + "\n")
    np.savez(run_dir / "labels.npz", place=place, carry=carry)

    result = synthetic_result(place, carry, rng)
    result.save(run_dir / "polca" / "hessian")
    basis = polca_jax.basis_from_matrix(np.eye(5)[:NUM_DIRECTIONS], eigenvalues=np.array([3.0, 2.0, 1.0]),
                                        steps=np.array([0, 10, 20]), method="hessian")
    basis.save(run_dir / "basis" / "hessian")

    options = {"min_cluster_size": 5}
    signals = {
        "polca": ("POLCA", "hessian", "projected_loss", result.projected_loss, STEPS),
        "exact_loss": ("Exact loss", None, "loss", result.loss, STEPS),
        "loss_change": ("Change in exact loss", None, "loss_change", result.loss_change, STEPS[1:]),
    }
    clusterings = {
        "polca": cluster_directions(result.projected_loss, **options),
        "exact_loss": [cluster_signal(result.loss, **options)],
        "loss_change": [cluster_signal(result.loss_change, **options)],
    }
    (run_dir / "clusters").mkdir()
    variants = {}
    for variant, (label, basis_name, trajectory, signal, steps) in signals.items():
        save_clusterings(run_dir / "clusters" / f"{variant}.npz", clusterings[variant])
        variants[variant] = variant_metrics(label, basis_name, trajectory, clusterings[variant], signal, steps,
                                            place, carry)
    assert variants["polca"]["top_clusters"], "the fixture should give POLCA a qualifying carry cluster"
    metrics = {"settings": {"window_steps": WINDOW, "threshold_step": THRESHOLD}, "variants": variants}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))

    (run_dir / "stages").mkdir()
    for seconds, stage in enumerate(("train", "basis", "decompose"), start=1):
        (run_dir / "stages" / f"{stage}.json").write_text(json.dumps({"wall_seconds": 1.5 * seconds}))
    return run_dir


@pytest.fixture(scope="module")
def report(run_dir):
    path = write_report(run_dir)
    return path, path.read_text(), json.loads((run_dir / "metrics.json").read_text())


def linked_figures(report_path, text):
    return [report_path.parent / link for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)]


def test_report_has_the_tables_with_our_and_the_papers_numbers(report):
    path, text, metrics = report
    assert path == path.parent.parent / "report" / "report.md" and path.is_file()
    assert "tiny-test" in text
    for heading in TABLE_HEADINGS:
        assert heading in text
    polca = metrics["variants"]["polca"]
    ours = [polca["max_carry_homogeneity"], polca["hidden_breakthrough_fraction"]]
    ours += [record[key] for record in polca["top_clusters"] for key in ("homogeneity", "recall", "f1")]
    ours += [metrics["variants"]["exact_loss"]["hidden_breakthrough_fraction"]]
    for value in ours:
        assert f"{value:.3f}" in text
    for paper_value in ("0.973", "0.514", "0.355", "0.031", "0.304", "0.948", "0.792"):
        assert paper_value in text
    assert "4.5 s" in text and "not recorded" in text  # the decompose stage time; the cluster stage is missing


def test_missing_variants_are_reported_as_not_run(report):
    _, text, _ = report
    for strategy in ("Fisher information", "LCA", "First-order POLCA", "Random orthonormal", "Random shuffled Hessian"):
        rows = [line for line in text.splitlines() if line.startswith(f"| {strategy} |")]
        assert rows and all("not run" in row for row in rows), strategy


def test_every_linked_figure_is_a_png(report):
    path, text, metrics = report
    figures = linked_figures(path, text)
    names = {figure.name for figure in figures}
    top_directions = {record["direction"] for record in metrics["variants"]["polca"]["top_clusters"]}
    expected = {"training_curves.png", "place_loss.png", "place_carry_loss.png", "exact_loss_clusters.png"}
    expected |= {f"polca_direction_{direction}.png" for direction in top_directions}
    assert expected <= names
    for figure in figures:
        assert figure.is_file() and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
    assert set((path.parent / "figures").glob("*.png")) == set(figures)


def test_an_almost_empty_run_directory_still_gives_a_report(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"settings": {}, "variants": {}}))
    text = write_report(tmp_path).read_text()
    for heading in TABLE_HEADINGS:
        assert heading in text
    assert "not run" in text and "0.973" in text
    assert "config.json is missing" in text and "metrics.jsonl is missing" in text
    assert linked_figures(tmp_path / "report" / "report.md", text) == []
