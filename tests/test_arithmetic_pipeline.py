"""The arithmetic task end to end on the tiny preset through the generic pipeline: artifacts, metrics from the saved
clusters, the metrics of the pre-pipeline implementation, resume, and the re-clustering sweep script."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from synthetic_runs import synthetic_run

import polca_jax as pj
from polca_jax import analysis
from polca_jax.pipeline import VARIANTS, load_labels, load_task_definition, make_config, read_metrics
from polca_jax.pipeline.cli import main
from polca_jax.pipeline._registry import variants_of
from experiments.arithmetic import PAPER_CPU_CUTS

PINNED_TINY = {  # variant: (clusters, max carry homogeneity, hidden-breakthrough fraction)
    "exact_loss": (2, 40 / 117, 0.0),
    "loss_change": (2, 5 / 13, 0.0),
    "fisher": (0, None, None),
    "lca": (8, 5 / 12, 0.25),
    "first_order_polca": (4, 9 / 22, 0.0),
    "polca": (5, 8 / 20, 0.0),
    "random_basis": (4, 12 / 49, 0.25),
    "shuffled_hessian": (7, 4 / 11, 0.0),
}
"""The tiny preset's metrics as the experiment-specific pipeline gave them before the generic one replaced it
(``polca arithmetic --preset tiny`` at commit bc4fb22; deterministic on one machine): the generic pipeline must
reproduce them exactly."""


@pytest.fixture(scope="module")
def interrupted_then_resumed(tmp_path_factory, kill_cli_run_after):
    """A tiny run killed right after its basis stage, then resumed to the end with the CLI."""
    run_dir = tmp_path_factory.mktemp("arithmetic") / "run"
    finished_before = kill_cli_run_after(["arithmetic", "--preset", "tiny"], run_dir)
    assert not (run_dir / "stages" / "decompose.json").exists()
    assert main(["arithmetic", "--out", str(run_dir), "--quiet"]) == 0
    return run_dir, finished_before


@pytest.mark.slow
def test_resume_skips_finished_stages(interrupted_then_resumed, check_resumed):
    check_resumed(*interrupted_then_resumed)


@pytest.mark.slow
def test_the_tiny_preset_gives_the_metrics_of_the_experiment_specific_pipeline(interrupted_then_resumed):
    run_dir, _ = interrupted_then_resumed
    variants = read_metrics(run_dir / "metrics.json").variants
    assert set(PINNED_TINY) <= set(variants)  # and the allocation-profile strategies, which came later
    for variant, (clusters, homogeneity, hidden) in PINNED_TINY.items():
        ours = variants[variant]
        assert ours.num_clusters == clusters, variant
        assert ours.label_sets["carry"].max_homogeneity == pytest.approx(homogeneity), variant
        assert ours.hidden_breakthrough_fraction == pytest.approx(hidden), variant


@pytest.mark.slow
def test_every_artifact_is_written(interrupted_then_resumed):
    run_dir, _ = interrupted_then_resumed
    config = make_config(load_task_definition("arithmetic"), "arithmetic", "tiny")
    steps = pj.OrbaxCheckpoints(run_dir / "checkpoints").steps
    assert steps == config.checkpoint_steps
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == config.num_steps // config.metrics_every
    assert {"eval_loss", "accuracy_1000s", "accuracy_1s"} <= set(log[-1])
    label_sets, texts = load_labels(run_dir)
    num_tokens = 4 * config.task_options["num_eval_problems"]
    assert {name: ls.values.shape for name, ls in label_sets.items()} == {
        "carry": (num_tokens,), "place": (num_tokens,), "skill": (num_tokens,), "digit": (num_tokens,)}
    problem = [text.replace("⟦", "").replace("⟧", "") for text in texts[:4]]
    assert len(set(problem)) == 1 and problem[0][3] == "+" and problem[0][7] == "="
    assert [text.index("⟦") for text in texts[:4]] == [8, 9, 10, 11]  # the 1000s, 100s, 10s and 1s answer tokens
    hessian = pj.Basis.load(run_dir / "basis" / "hessian")
    assert hessian.size == len(config.basis_steps) * config.k_per_checkpoint
    np.testing.assert_allclose(hessian.vectors @ hessian.vectors.T, np.eye(hessian.size), atol=1e-4)
    for name in ("hessian", "shuffled_hessian", "random", "parameter_axes"):
        result = pj.POLCAResult.load(run_dir / "polca" / name)
        assert result.loss.shape == (len(config.polca_steps), num_tokens)
        assert np.all(np.isfinite(result.projected_loss))
    for variant in VARIANTS:  # every strategy of the config's bases, and none of the others
        configured = variant in variants_of(config)
        assert (run_dir / "clusters" / f"{variant.name}.npz").exists() == configured, variant.name
    assert {v.basis for v in variants_of(config)} == {"hessian", "shuffled_hessian", "random", "parameter_axes"}
    report = (run_dir / "report" / "report.md").read_text()
    assert "### Table 1 — cluster quality" in report and "## What this run found" in report


@pytest.mark.slow
def test_metrics_are_those_of_the_saved_clusters(interrupted_then_resumed):
    run_dir, _ = interrupted_then_resumed
    label_sets, _ = load_labels(run_dir)
    carry, place = label_sets["carry"].values, label_sets["place"].values
    metrics = read_metrics(run_dir / "metrics.json").variants
    for variant, reported in metrics.items():
        clusterings = analysis.load_clusterings(run_dir / "clusters" / f"{variant}.npz")
        scores = analysis.cluster_label_scores(clusterings, carry, positive=True, qualifying=np.isin(place, (1, 2)))
        per_sample_signal = variant in ("exact_loss", "loss_change")  # scored without the qualifying rule
        top = analysis.top_clusters(scores, 3, qualifying_only=not per_sample_signal)
        assert reported.num_clusters == sum(c.num_clusters for c in clusterings)
        reported_top = reported.label_sets["carry"].top_clusters
        assert [(r.direction, r.cluster, r.homogeneity) for r in reported_top] == [
            (r.direction, r.cluster, r.homogeneity) for r in top]
        for record in reported_top:  # homogeneity is the carry fraction of the cluster's members
            clustering = next(c for c in clusterings if c.direction == record.direction)
            members = clustering.members(record.cluster)
            assert record.size == members.size
            assert record.homogeneity == pytest.approx(carry[members].mean())


PAPER_CPU_CUTS_TINY = {"polca_every": 10, "polca_until": 40, "ablation_bases": "parameter_axes,random"}
"""The ``paper-cpu`` preset's cuts (``PAPER_CPU_CUTS``) at the tiny preset's sizes: 60 steps, POLCA through step 40."""


def test_the_paper_cpu_preset_is_the_paper_with_only_its_cuts():
    presets = load_task_definition("arithmetic").presets
    assert presets["paper-cpu"] == {**presets["paper"], **PAPER_CPU_CUTS}
    assert set(PAPER_CPU_CUTS_TINY) == set(PAPER_CPU_CUTS)  # the tiny counterpart below cuts the same settings
    config = make_config(load_task_definition("arithmetic"), "arithmetic", "paper-cpu")
    assert (len(config.polca_steps), config.polca_steps[-1], len(config.basis_steps), config.window,
            config.threshold_step) == (51, 4000, 50, 100, 1000)


@pytest.mark.slow
def test_the_paper_cpu_cuts_run_end_to_end_on_the_tiny_preset(tmp_path):
    run_dir = tmp_path / "run"
    settings = [f"--set={key}={value}" for key, value in PAPER_CPU_CUTS_TINY.items()]
    assert main(["arithmetic", "--preset", "tiny", *settings, "--out", str(run_dir), "--quiet"]) == 0
    config = make_config(load_task_definition("arithmetic"), "arithmetic", "tiny", PAPER_CPU_CUTS_TINY)
    assert sorted(path.name for path in (run_dir / "basis").iterdir()) == ["hessian", "parameter_axes", "random"]
    for name in ("hessian", "parameter_axes", "random"):
        assert pj.POLCAResult.load(run_dir / "polca" / name).steps.tolist() == list(range(0, 41, 10))
    assert pj.OrbaxCheckpoints(run_dir / "checkpoints").steps == config.checkpoint_steps  # the final step 60 too
    variants = read_metrics(run_dir / "metrics.json").variants
    assert {"exact_loss", "lca", "first_order_polca", "polca", "random_basis"} <= set(variants)
    assert "shuffled_hessian" not in variants
    report = (run_dir / "report" / "report.md").read_text()
    assert "### Table 1 — cluster quality" in report


SWEEP_SCRIPT = Path(__file__).parents[1] / "experiments" / "arithmetic" / "sweep_clustering.py"
INTERIM_SCRIPT = Path(__file__).parents[1] / "experiments" / "arithmetic" / "interim_table.py"


def _sweep_module():
    spec = importlib.util.spec_from_file_location("sweep_clustering", SWEEP_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_within_digit_separability_sees_a_carry_signal_the_answer_digit_masks():
    rng = np.random.default_rng(0)
    place = np.repeat([1, 2], 400)
    digit = rng.integers(0, 10, place.size)
    carry = rng.random(place.size) < 0.5
    final = 1.0 * digit + 0.5 * carry  # carry raises every digit's value by less than the spread between digits
    projected = np.stack([np.zeros_like(final), final])[:, :, None]  # [T=2, N, K=1]
    sweep = _sweep_module()
    pooled = sweep.carry_separability(projected, place, carry)
    within = sweep.within_digit_separability(projected, place, carry, digit)
    assert np.all(pooled < 0.7)
    np.testing.assert_allclose(within, 1.0)


@pytest.mark.slow
def test_sweep_script_runs_on_a_finished_run(interrupted_then_resumed):
    run_dir, _ = interrupted_then_resumed
    output = subprocess.run([sys.executable, str(SWEEP_SCRIPT), str(run_dir), "--min-cluster-sizes", "8",
                             "--random-directions", "3"], capture_output=True, text=True, check=True).stdout
    for line in ("linear probe on exact-loss trajectories", "within one answer digit, second order none",
                 "second order trapezoid, normalize=unit, min_cluster_size=8",
                 "carry separability, 3 random directions, first order",
                 "second order none along 3 random directions, normalize=None, min_cluster_size=8"):
        assert line in output


def test_sweep_script_refuses_a_run_without_the_arithmetic_labels(tmp_path):
    run = synthetic_run(tmp_path / "run")  # its label sets are carry and place only
    failed = subprocess.run([sys.executable, str(SWEEP_SCRIPT), str(run.path)], capture_output=True, text=True)
    assert failed.returncode != 0 and "no label set(s) ['digit']" in failed.stderr


@pytest.mark.slow
def test_the_interim_table_reproduces_the_finished_run_s_table_1(interrupted_then_resumed):
    """experiments/arithmetic/interim_table.py, which scores the Table 1 strategies along one finished basis, gives
    the carry homogeneities and hidden-breakthrough fractions the score stage wrote (the pinned ones above)."""
    run_dir, _ = interrupted_then_resumed
    output = subprocess.run([sys.executable, str(INTERIM_SCRIPT), str(run_dir)], capture_output=True, text=True,
                            check=True).stdout
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in output.splitlines()
             if line.startswith("| ") and not line.startswith("| Strategy")]
    rows = {row[0]: row[1:] for row in cells}
    for variant, name in (("polca", "POLCA"), ("first_order_polca", "First-order POLCA"),
                          ("exact_loss", "Exact loss"), ("loss_change", "Change in exact loss")):
        homogeneity, hidden = rows[name]
        assert float(homogeneity.split(" / ")[0]) == pytest.approx(PINNED_TINY[variant][1], abs=5e-4), name
        assert float(hidden) == pytest.approx(PINNED_TINY[variant][2], abs=5e-4), name
    rule = read_metrics(run_dir / "metrics.json").variants["polca_gradients"]
    homogeneity, hidden = rows["Projected-gradient trajectories (the rule)"]
    best = rule.label_sets["carry"].max_homogeneity
    assert homogeneity.startswith("no qualifying") if best is None else float(homogeneity.split(" / ")[0]) == (
        pytest.approx(best, abs=5e-4))
    assert hidden == "—" if rule.hidden_breakthrough_fraction is None else float(hidden) == pytest.approx(
        rule.hidden_breakthrough_fraction, abs=5e-4)
