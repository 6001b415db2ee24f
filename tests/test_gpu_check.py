"""The prepared GPU check, on the CPU with the tiny preset: it plans, cuts what does not fit, runs every stage and
returns at most 8 files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from polca_jax.pipeline import read_metrics

SCRIPT = Path(__file__).parents[1] / "experiments" / "arithmetic" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_plans_cuts_and_returns_what_it_ran(tmp_path):
    out = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--preset", "tiny", "--budget-minutes", "0.01"],
        capture_output=True, text=True, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    plan = (out / "plan.txt").read_text()
    assert "estimate for tiny with every ablation" in plan and "compiling" in plan
    assert "cut: the shuffled-basis ablation" in plan  # tiny trains 60 steps: there is no step 4000 to cut at
    assert "WARNING: still over the budget" in plan
    stages = json.loads((out / "stages.json").read_text())
    assert list(stages) == sorted(stages) and {"train", "basis", "decompose", "causal", "cluster", "score",
                                                "report"} == set(stages)
    variants = read_metrics(out / "metrics.json").variants
    assert "shuffled_hessian" not in variants and "random_basis" in variants
    assert "lca" in variants and "first_order_polca" in variants
    files = sorted(path.name for path in out.iterdir())
    assert len(files) <= 8 and "report.md" in files and any(name.endswith(".png") for name in files)
