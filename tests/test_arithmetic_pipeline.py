"""The arithmetic experiment end to end on the tiny preset: artifacts, metrics from the saved clusters, resume,
rejected configs and run directories, and the re-clustering sweep script on a finished run."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import polca_jax as pj
from polca_jax import analysis
from polca_jax.cli import main
from polca_jax.experiments.arithmetic.config import make_config, parse_overrides
from polca_jax.experiments.arithmetic.pipeline import STAGES, VARIANTS, RunDirectory


@pytest.fixture(scope="module")
def interrupted_then_resumed(tmp_path_factory, kill_cli_run_after):
    """A tiny run killed right after its basis stage, then resumed to the end with the CLI."""
    run_dir = tmp_path_factory.mktemp("arithmetic") / "run"
    finished_before = kill_cli_run_after(["arithmetic", "--preset", "tiny"], run_dir)
    assert not (run_dir / "stages" / "decompose.json").exists()
    assert main(["arithmetic", "--out", str(run_dir), "--quiet"]) == 0
    return run_dir, finished_before


def test_resume_skips_finished_stages(interrupted_then_resumed):
    run_dir, finished_before = interrupted_then_resumed
    for stage, record in finished_before.items():
        assert (run_dir / "stages" / f"{stage}.json").read_text() == record  # not redone
    for stage in STAGES[:-1]:
        assert json.loads((run_dir / "stages" / f"{stage}.json").read_text())["wall_seconds"] > 0


def test_every_artifact_is_written(interrupted_then_resumed):
    run_dir, _ = interrupted_then_resumed
    config = make_config("tiny")
    steps = pj.OrbaxCheckpoints(run_dir / "checkpoints").steps
    assert steps == sorted(set(config.polca_steps) | set(config.basis_steps))
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == config.num_steps // config.metrics_every
    labels = np.load(run_dir / "labels.npz")
    num_tokens = 4 * config.num_eval_problems
    assert labels["place"].shape == labels["carry"].shape == (num_tokens,)
    hessian = pj.Basis.load(run_dir / "basis" / "hessian")
    assert hessian.size == len(config.basis_steps) * config.k_per_checkpoint
    np.testing.assert_allclose(hessian.vectors @ hessian.vectors.T, np.eye(hessian.size), atol=1e-4)
    for name in ("hessian", "shuffled_hessian", "random", "parameter_axes"):
        result = pj.POLCAResult.load(run_dir / "polca" / name)
        assert result.loss.shape == (len(config.polca_steps), num_tokens)
        assert np.all(np.isfinite(result.projected_loss))
    for variant in VARIANTS:
        assert (run_dir / "clusters" / f"{variant}.npz").exists()
    report = run_dir / "report" / "report.md"
    assert report.exists() and "POLCA" in report.read_text()


def test_metrics_are_those_of_the_saved_clusters(interrupted_then_resumed):
    run_dir, _ = interrupted_then_resumed
    labels = np.load(run_dir / "labels.npz")
    metrics = json.loads((run_dir / "metrics.json").read_text())["variants"]
    assert set(metrics) == set(VARIANTS)
    for variant, reported in metrics.items():
        clusterings = analysis.load_clusterings(run_dir / "clusters" / f"{variant}.npz")
        scores = analysis.carry_cluster_scores(clusterings, labels["place"], labels["carry"])
        per_sample_signal = clusterings[0].direction is None
        top = analysis.top_carry_clusters(scores, 3, qualifying_only=not per_sample_signal)
        assert reported["num_clusters"] == sum(c.num_clusters for c in clusterings)
        assert [(r["direction"], r["cluster"], r["homogeneity"]) for r in reported["top_clusters"]] == [
            (r.direction, r.cluster, r.homogeneity) for r in top
        ]
        for record in reported["top_clusters"]:  # homogeneity is the carry fraction of the cluster's members
            clustering = next(c for c in clusterings if c.direction == record["direction"])
            members = clustering.members(record["cluster"])
            assert record["size"] == members.size
            assert record["homogeneity"] == pytest.approx(labels["carry"][members].mean())


SWEEP_SCRIPT = Path(__file__).parents[1] / "experiments" / "arithmetic" / "sweep_clustering.py"


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


def test_sweep_script_runs_on_a_finished_run(interrupted_then_resumed):
    run_dir, _ = interrupted_then_resumed
    output = subprocess.run([sys.executable, str(SWEEP_SCRIPT), str(run_dir), "--min-cluster-sizes", "8"],
                            capture_output=True, text=True, check=True).stdout
    for line in ("linear probe on exact-loss trajectories", "within one answer digit, second order none",
                 "second order trapezoid, normalize=unit, min_cluster_size=8"):
        assert line in output


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        make_config("tiny", {"learning_rate": -1.0})
    with pytest.raises(ValueError, match="unknown config key"):
        make_config("tiny", {"learning_rat": 1.0})
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("huge")
    with pytest.raises(ValueError, match="multiple of polca_every"):
        make_config("tiny", {"num_steps": 61})
    with pytest.raises(ValueError, match="expected int"):
        parse_overrides(["num_steps=ten"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["num_steps"])
    assert parse_overrides(["reference_num_samples=none", "ablations=false", "learning_rate=1e-3"]) == {
        "reference_num_samples": None, "ablations": False, "learning_rate": 1e-3}


def test_cli_rejects_another_config_and_missing_stages(tmp_path, capsys):
    run_dir = tmp_path / "run"
    RunDirectory(run_dir, make_config("tiny"))
    saved = (run_dir / "config.json").read_text()
    assert main(["arithmetic", "--preset", "tiny", "--set", "learning_rate=0.5", "--out", str(run_dir)]) == 2
    assert "learning_rate: 0.001 on disk vs 0.5" in capsys.readouterr().err
    assert (run_dir / "config.json").read_text() == saved
    assert main(["arithmetic", "cluster", "--out", str(run_dir)]) == 2
    assert "stage 'train' has not finished" in capsys.readouterr().err
    assert main(["arithmetic", "--preset", "tiny", "--set", "num_heads=0", "--out", str(tmp_path / "other")]) == 2
    assert "num_heads must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
