"""Check `polca plan`'s measured estimates against real runs on this machine (results in plan_check.md).

For each case: plan it (``plan_run``, as ``polca plan`` does, timing a sample of each stage's work here), then run it
(``polca run ... --no-compile-cache`` in a fresh process) and compare the plan's seconds per stage with the stage's
wall time less its compile time (``stages/<stage>.json``); the plan's compile time against the sum of the stages'.

Usage: python experiments/plan_check.py RUNS_DIR [--case NAME ...]   (about 40 min on a quiet 2-core CPU)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from polca_jax.pipeline import load_task_definition, make_config, parse_overrides, plan_run

CASES = {  # name -> (task, preset, settings)
    "arithmetic-cpu": ("arithmetic", "cpu", []),
    "arithmetic-cpu-ablations": ("arithmetic", "cpu", ["ablations=true"]),
    "planted-cpu": ("planted", "cpu", []),
    "english-cpu": ("english", "cpu", []),
    # the paper's 9.5 M-parameter model and optimiser, shortened to a CPU's budget
    "arithmetic-paper-short": ("arithmetic", "paper", [
        "num_steps=400", "num_train_problems=25600", "num_eval_problems=250", "num_hessian_problems=128",
        "polca_every=40", "basis_every=100", "basis_until=300", "second_order=trapezoid", "ablations=false"]),
}


def check(name: str, runs: Path) -> list[str]:
    """Plan and run one case; the markdown rows of its comparison."""
    task_name, preset, settings = CASES[name]
    out = runs / name
    if out.exists():  # polca run would resume it, and the comparison would read an earlier run's stage times
        raise SystemExit(f"{out} exists: give plan_check.py an empty RUNS_DIR")
    definition = load_task_definition(task_name)
    config = make_config(definition, task_name, preset, parse_overrides(definition, settings))
    task = definition.build(config.task_options, seed=config.seed, workdir=None)
    started = time.perf_counter()
    plan = plan_run(config, task)
    plan_seconds = time.perf_counter() - started

    command = ["polca", "run", task_name, "--preset", preset, "--out", str(out), "--quiet", "--no-compile-cache"]
    command += [part for setting in settings for part in ("--set", setting)]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    run_seconds = time.perf_counter() - started

    rows, compiled = [], 0.0
    for stage, estimate in plan.stages.items():
        record = json.loads((out / "stages" / f"{stage}.json").read_text())
        compiled += record.get("compile_seconds", 0.0)
        measured = record["wall_seconds"] - record.get("compile_seconds", 0.0)
        rows.append(f"| {name} | {stage} | {estimate:.1f} | {measured:.1f} | {estimate / measured:.2f} |")
    rows.append(f"| {name} | compiling | {plan.compile_seconds:.1f} | {compiled:.1f} | "
                f"{plan.compile_seconds / compiled:.2f} |")
    total = plan.total_seconds
    rows.append(f"| {name} | **run, in all** | {total:.1f} | {run_seconds:.1f} | {total / run_seconds:.2f} |")
    print(f"{name}: planned in {plan_seconds:.0f} s, ran in {run_seconds:.0f} s", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="a directory for the runs (each case's run directory inside)")
    parser.add_argument("--case", dest="cases", action="append", choices=sorted(CASES),
                        help="check only this case (repeatable; default all)")
    args = parser.parse_args()
    print("| Case | Stage | Plan (s) | Measured (s) | Plan / measured |")
    print("|---|---|---|---|---|")
    for name in args.cases or CASES:
        print("\n".join(check(name, args.runs)), flush=True)


if __name__ == "__main__":
    main()
