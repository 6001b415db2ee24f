"""Run the planted benchmark over its variants and a one-factor-at-a-time sweep of signal strength, then score
every run directory against the ground truth (``evaluate.py``) and print the tables of ``results.md``.

    python experiments/planted/sweep.py --out runs/planted [--seeds 0 1 2] [--only NAME ...] [--list]

Each configuration is the ``cpu`` preset (or the one named) with the overrides listed in ``CONFIGS``; its run
directory is ``OUT/NAME-sSEED``. Runs are resumable (a finished pipeline stage is skipped) and a run directory
that already holds ``planted_eval.json`` is not scored again, so the command can be interrupted and repeated.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from evaluate import evaluate  # noqa: E402

from polca_jax.pipeline import run  # noqa: E402

TASK = str(Path(__file__).resolve().parents[2] / "polca_jax" / "pipeline" / "tasks" / "planted" / "__init__.py") + \
    ":make_task"
SWEEP_ALTERNATIVES = [("paper", "hdbscan"), ("unit", "hdbscan"), ("shape", "hdbscan"), ("profile", "hdbscan"),
                      ("profile", "gmm"), ("profile", "kmeans"), ("joint", "hdbscan")]

# name -> (preset, overrides, what the configuration varies)
CONFIGS = {
    "base": ("cpu", {}, "the benchmark: 2 mirrored groups, private blocks of 8, width 16, one head per group"),
    "late": ("cpu-late", {}, "3 groups (2:2:1), C enters training at step 300"),
    "shared-readout": ("cpu", {"shared_readout": True}, "one output head for both groups (the issue's probe)"),
    "overlap-2": ("cpu", {"shared_dims": 2}, "2 input dims shared (overlap 2/10)"),
    "overlap-8": ("cpu", {"shared_dims": 8}, "8 input dims shared (overlap 8/16)"),
    "overlap-24": ("cpu", {"shared_dims": 24}, "24 input dims shared (overlap 24/32)"),
    "weights-2-1": ("cpu", {"group_weights": "2,1"}, "group A twice as frequent"),
    "weights-4-1": ("cpu", {"group_weights": "4,1"}, "group A four times as frequent"),
    "noise-0.3": ("cpu", {"noise": 0.3}, "target noise sd 0.3"),
    "noise-1": ("cpu", {"noise": 1.0}, "target noise sd 1.0"),
    "width-8": ("cpu", {"width": 8}, "8 hidden units"),
    "width-64": ("cpu", {"width": 64}, "64 hidden units"),
    "logistic": ("cpu", {"loss": "logistic"}, "binary classification (logistic loss) instead of regression"),
    "mirror-init": ("cpu", {"mirror": "init"}, "mirrored start, independent training draws per group"),
    "mirror-none": ("cpu", {"mirror": "none"}, "independent start and draws"),
    "shared-readout-overlap-8": ("cpu", {"shared_readout": True, "shared_dims": 8}, "shared head and overlap 8/16"),
}


def run_and_score(name: str, seed: int, out: Path) -> dict:
    """Run one configuration at one seed (resuming) and score it; the score is cached in the run directory."""
    preset, overrides, _ = CONFIGS[name]
    run_dir = out / f"{name}-s{seed}"
    cached = run_dir / "planted_eval.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    start = time.perf_counter()
    run(TASK, run_dir, preset=preset, settings={**overrides, "seed": seed}, progress=False, log=lambda _: None)
    pipeline_seconds = time.perf_counter() - start
    report = evaluate(run_dir, alternatives=SWEEP_ALTERNATIVES, seed=seed)
    report["pipeline_seconds"] = pipeline_seconds
    cached.write_text(json.dumps(report, default=float))
    return report


def localisation(mass: dict) -> float:
    """Mean over basis vectors of the largest share of a vector's squared norm on one group's private parameters."""
    groups = np.array([v for role, v in mass.items() if role.startswith("group")])  # [G, K]
    return float(groups.max(axis=0).mean())


def cell(summary: dict) -> str:
    """``ARI (recovered groups/all)`` for one strategy."""
    ari = summary["best_ari"]
    recovered = sum(g["recovered"] for g in summary["groups"].values())
    text = "–" if not np.isfinite(ari) else f"{ari:.2f}"
    return f"{text} ({recovered}/{len(summary['groups'])})"


def table(reports: dict[str, list[dict]]) -> str:
    """The markdown table: per configuration, seeds pooled as 'seed0; seed1; ...'."""
    head = ("| Configuration | Loss gap | Localisation | Exact loss | POLCA (paper) | POLCA unit | Random (paper) | "
            "Profile+HDBSCAN | Random profile+HDBSCAN | Profile+GMM | Joint+HDBSCAN | Pipeline s |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for name, runs in reports.items():
        def pooled(get):
            return "; ".join(get(r) for r in runs)
        lines.append("| " + " | ".join([
            name,
            pooled(lambda r: f"{r['loss_gap']['relative']:.1%}"),
            pooled(lambda r: f"{localisation(r['basis_mass']['hessian']):.2f}"),
            pooled(lambda r: cell(r["exact_loss"]["paper"])),
            pooled(lambda r: cell(r["bases"]["hessian"]["strategies"]["paper+hdbscan"])),
            pooled(lambda r: cell(r["bases"]["hessian"]["strategies"]["unit+hdbscan"])),
            pooled(lambda r: cell(r["bases"]["random"]["strategies"]["paper+hdbscan"])),
            pooled(lambda r: cell(r["bases"]["hessian"]["strategies"]["profile+hdbscan"])),
            pooled(lambda r: cell(r["bases"]["random"]["strategies"]["profile+hdbscan"])),
            pooled(lambda r: cell(r["bases"]["hessian"]["strategies"]["profile+gmm"])),
            pooled(lambda r: cell(r["bases"]["hessian"]["strategies"]["joint+hdbscan"])),
            pooled(lambda r: f"{r['pipeline_seconds']:.0f}"),
        ]) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="+", choices=sorted(CONFIGS))
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, (preset, overrides, what) in CONFIGS.items():
            print(f"{name}: --preset {preset} {' '.join(f'--set {k}={v}' for k, v in overrides.items())}  ({what})")
        return
    reports = {}
    for name in args.only or CONFIGS:
        reports[name] = []
        for seed in args.seeds:
            reports[name].append(run_and_score(name, seed, args.out))
            print(f"done {name} seed {seed}", file=sys.stderr, flush=True)
    print(table(reports))


if __name__ == "__main__":
    main()
