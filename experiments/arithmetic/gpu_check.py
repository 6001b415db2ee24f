"""The paper-scale arithmetic run as one prepared check for a GPU machine that comes with a time limit.

    PYTHONPATH=. python3 experiments/arithmetic/gpu_check.py OUT_DIR [--budget-minutes 9] [--preset paper]
                                                               [--set KEY=VALUE ...] [--run-dir DIR]

Runs from the source tree on the machine's own packages (jax, flax, optax, orbax-checkpoint, scikit-learn,
matplotlib, tqdm; nothing is installed). It

1. plans the run: the ``paper`` preset with every baseline and ablation (LCA, random and shuffled bases, first
   order), chunk sizes from the device's memory, and an estimate of each stage from a short timed warm-up
   (``polca plan``); if the estimate exceeds the budget it cuts, in this order, the POLCA checkpoints after step
   4000 (the paper's plots stop there) and then the shuffled-basis ablation, and says what it cut (``plan.txt``);
2. runs the stages one at a time and copies after each what it has made into OUT_DIR (``stages.json``,
   ``metrics.json``), so a run cut off by the time limit still returns what it did and its stage times;
3. ends with the report and at most 4 of its figures: at most 8 files in OUT_DIR.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from polca_jax import tree  # noqa: E402
from polca_jax.pipeline import STAGES, load_task_definition, make_config, open_run, run_stages  # noqa: E402
from polca_jax.pipeline import parse_overrides, plan_run  # noqa: E402

TASK = "arithmetic"
FULL = {"ablations": True, "baselines": True}
CUTS = (("polca_until", 4000, "POLCA checkpoints after step 4000"),
        ("ablation_bases", "random,parameter_axes", "the shuffled-basis ablation"))
FIGURES = ("directions_overview.png", "exact_loss_clusters.png", "training_curves.png")
MEMORY_SHARE = 0.1  # of the device's memory for one chunk of per-sample gradients


def chunk_size_for(samples_per_sequence: int, num_params: int) -> int | None:
    """Sequences per chunk so that one chunk of per-sample gradients takes ``MEMORY_SHARE`` of the device's memory;
    None (the kernels' default) when the device does not report its memory (a CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if not limit:
        return None
    per_sequence = samples_per_sequence * num_params * 4
    return int(max(8, min(1024, MEMORY_SHARE * limit // per_sequence)))


def planned_config(preset: str, assignments: list[str], budget_seconds: float, log) -> tuple:
    """The config to run and its plan: the preset with every ablation, cut until its estimate fits the budget."""
    definition = load_task_definition(TASK)
    settings = {**FULL, **parse_overrides(definition, assignments)}
    config = make_config(definition, TASK, preset, settings)
    task = definition.build(config.task_options, seed=config.seed, workdir=None)
    if "chunk_size" not in settings:
        shape = jax.eval_shape(task.per_sample_loss, task.init_params, task.eval_batch).shape
        chunk = chunk_size_for(1 if len(shape) == 1 else shape[1], tree.num_params(task.init_params))
        if chunk is not None:
            settings["chunk_size"] = chunk
            config = make_config(definition, TASK, preset, settings)
    plan = plan_run(config, task)
    log(f"estimate for {preset} with every ablation:\n{plan.table()}")
    cut = []
    for key, value, what in CUTS:
        if plan.total_seconds <= budget_seconds:
            break
        if key == "polca_until" and config.num_steps <= value:
            continue
        settings[key] = value
        config = make_config(definition, TASK, preset, settings)
        plan = plan_run(config, task)
        cut.append(what)
        log(f"over the budget of {budget_seconds / 60:.1f} min: cut {what}; new estimate:\n{plan.table()}")
    if plan.total_seconds > budget_seconds:
        log(f"WARNING: still over the budget ({plan.total_seconds / 60:.1f} min > {budget_seconds / 60:.1f} min); "
            "the run will be cut off by the time limit and return the stages it finished")
    log(f"cut: {', '.join(cut) or 'nothing'}; settings: {json.dumps(settings)}")
    return definition, settings


def copy_outputs(run_dir: Path, out: Path, final: bool) -> None:
    """What the run has made so far, into ``out``: stage records, metrics, and at the end the report and figures."""
    stages = {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "stages").glob("*.json"))}
    (out / "stages.json").write_text(json.dumps(stages, indent=2))
    if (run_dir / "metrics.json").is_file():
        shutil.copy(run_dir / "metrics.json", out / "metrics.json")
    if final and (run_dir / "report" / "report.md").is_file():
        shutil.copy(run_dir / "report" / "report.md", out / "report.md")
        figures = run_dir / "report" / "figures"
        chosen = [figures / name for name in FIGURES if (figures / name).is_file()]
        chosen += sorted(figures.glob("polca_direction_*.png"))[:4 - len(chosen)]
        for figure in chosen[:4]:
            shutil.copy(figure, out / figure.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="where the results go (at most 8 files)")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--budget-minutes", type=float, default=9.0)
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run-dir", type=Path, help="the run directory (default: OUT/../polca-run)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [f"devices: {jax.devices()}; jax {jax.__version__}"]

    def log(text: str) -> None:
        print(text, flush=True)
        lines.append(text)
        (args.out / "plan.txt").write_text("\n".join(lines) + "\n")

    log(lines[0])
    definition, settings = planned_config(args.preset, args.settings, 60 * args.budget_minutes, log)
    run_dir = args.run_dir or args.out.parent / "polca-run"
    run, _ = open_run(TASK, run_dir, preset=args.preset, settings=settings)
    for stage in STAGES:
        run_stages(run, definition, [stage], progress=False, log=log)
        copy_outputs(run.path, args.out, final=stage == STAGES[-1])
    log(f"done in {(time.perf_counter() - started) / 60:.1f} min (planning included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
