"""Memory per device of every mesh stage, measured, beside what ``polca plan`` estimates, on 8 simulated CPU devices.

Run ``XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/stage_memory.py [--preset cpu]
[--tensor-parallel]``. For the arithmetic task at the preset's size and the meshes 1 × 1, 8 × 1, 4 × 2, 2 × 4 and
1 × 8 (data × model), with the parameters split by the default rule or (``--tensor-parallel``) by the transformer's
``TENSOR_PARALLEL_RULES`` (attention by heads, the MLP by hidden units), it prints, per stage (train, basis,
decompose, causal):

- measured: :func:`polca_jax.pipeline.measured_memory`, XLA's bytes of the stage's kernel compiled on that mesh of
  real (simulated) devices, its inputs placed as the stage places them (arguments + outputs + temporaries, per device);
- planned: the stage's memory per device of :func:`polca_jax.pipeline.plan_run` for the same mesh (planned for an
  H100, so that nothing is run: the memory does not depend on it), which compiles on one device and splits by rule;
- their ratio, and whether it lies within 2×.

Nothing runs on the devices; the whole script is compiling (about 10 minutes for ``cpu`` on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
from pathlib import Path

import jax

import polca_jax as pj
from polca_jax.pipeline import build_task, device_named, measured_memory, open_run, plan_run
from polca_jax.pipeline.models import TENSOR_PARALLEL_RULES

MESHES = ((1, 1), (8, 1), (4, 2), (2, 4), (1, 8))  # data × model
WITHIN = 2.0  # the goal: the plan within 2× of the measurement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", help="the arithmetic task's preset (default: cpu)")
    parser.add_argument("--tensor-parallel", action="store_true",
                        help="split the parameters by the transformer's TENSOR_PARALLEL_RULES")
    args = parser.parse_args()
    if jax.device_count() < 8:
        raise SystemExit("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 python "
                         "benchmarks/stage_memory.py")
    with tempfile.TemporaryDirectory() as directory:
        run, definition = open_run("arithmetic", Path(directory) / "run", preset=args.preset)
        task = build_task(run, definition)
        rows = []
        for mesh in MESHES:
            with pj.partition_rules(TENSOR_PARALLEL_RULES if args.tensor_parallel else None):
                measured = measured_memory(run.config, task, mesh=mesh)
                plan = plan_run(run.config, task, mesh=mesh, device=device_named("h100"))
            for stage, size in measured.items():
                rows.append((mesh, stage, sum(plan.memory[stage].values()), size))
    rule = "tensor-parallel rules" if args.tensor_parallel else "the default rule"
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, jax {jax.__version__}, arithmetic "
          f"preset {args.preset!r}, parameters split by {rule}, load average {os.getloadavg()[0]:.1f}\n")
    print("| mesh (data × model) | stage | planned / device | measured / device | planned / measured |")
    print("| --- | --- | --- | --- | --- |")
    for (data, model), stage, planned, size in rows:
        print(f"| {data} × {model} | {stage} | {planned / 1e6:.2f} MB | {size / 1e6:.2f} MB | {planned / size:.2f} |")
    ratios = [planned / size for *_, planned, size in rows]
    inside = sum(1 / WITHIN <= ratio <= WITHIN for ratio in ratios)
    print(f"\nwithin {WITHIN:g}×: {inside} of {len(ratios)} (ratios {min(ratios):.2f}–{max(ratios):.2f})")


if __name__ == "__main__":
    main()
