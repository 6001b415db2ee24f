"""One row per finished run of a planted benchmark (``planted`` or ``planted-entangled``): each strategy's ARI against
the planted groups and how many groups it recovers, beside the label-free controls and a supervised upper bound.

    python experiments/planted/entangled_table.py RUN_DIR [RUN_DIR ...] [--strategies NAME,NAME,...]

Columns: the run's variant (an entangled run's gate rule, or a block run's departures from the defaults) and seed; per strategy (the paper's POLCA, POLCA's allocation profiles, its
projected-gradient trajectories, the same trajectories along the random basis, and the pipeline's label-free control)
``ARI / groups recovered`` (recovered: a cluster with homogeneity >= 0.9 at recall >= 0.5 over all members); the
trivial control of ``trivial_controls.py`` (k-means on where each sample's gradient lies among the first layer's
rows, at the second POLCA checkpoint); the cross-validated ROC AUC of a logistic probe on the exact-loss
trajectories (supervised: an upper bound no strategy may use; a mirrored run keeps each sample and its mirror image
in one fold); and the report's verdict for the label set ``group``.
``--strategies`` names other strategies' columns (any registered strategy a run clustered, e.g. those of an
ablation basis).
"""

import argparse
from pathlib import Path

import polca_jax as pj
from polca_jax import analysis
from polca_jax.pipeline import read_metrics
from polca_jax.pipeline.tasks.planted import strategy_summary

from trivial_controls import exact_loss_probe_auc, gradient_share_ari, load_planted_run, mirror_pairs

STRATEGIES = {"polca": "POLCA", "polca_profile": "Profiles", "polca_gradients": "Gradient trajectories",
              "random_gradients": "Random-basis gradient trajectories", "gradient_norms": "Control (pipeline)"}


def variant_text(options: dict) -> str:
    """The benchmark variant a run's task options name: its gate rule, or the block variant's departures."""
    if "rule" in options:
        parts = [f"entangled, {options['rule']}"]
        parts += [f"B's amplitude {options['amplitude_b']}"] if options.get("amplitude_b", 0.5) != 0.5 else []
        parts += [f"B from step {options['late_step']}"] if options.get("late_step") else []
        parts += ["same mechanism"] if options.get("same_mechanism") else []
        parts += ["mirror images"] if options.get("mirror") is True else []
        return ", ".join(parts)
    parts = [f"weights {options.get('group_weights', '1,1')}"]
    parts += ["shared head"] if options.get("shared_readout") else []
    parts += [f"mirror {options['mirror']}"] if options.get("mirror", "full") != "full" else []
    parts += [f"{options['shared_dims']} shared dims"] if options.get("shared_dims") else []
    parts += [f"noise {options['noise']}"] if options.get("noise") else []
    return ", ".join(parts)


def verdict_text(verdict) -> str:
    """The report's verdict (a ``Verdict`` of :func:`read_metrics`) in a few words."""
    if not verdict.found:
        return "not found"
    found = "found" if verdict.recovers_class else "found, partly"
    return f"{found}, a control as good" if verdict.beyond_controls is False else found


def row(run_dir: Path, strategies) -> list[str]:
    config, task, groups = load_planted_run(run_dir)
    cells = [variant_text(config["task_options"]), str(config["seed"])]
    for name in strategies:
        path = run_dir / "clusters" / f"{name}.npz"
        if not path.is_file():
            cells.append("not run")
            continue
        summary = strategy_summary(analysis.load_clusterings(path), groups)
        recovered = sum(group["recovered"] for group in summary["groups"].values())
        cells.append(f"{summary['best_ari']:.2f} / {recovered}")
    result = pj.POLCAResult.load(run_dir / "polca" / "hessian")
    with pj.OrbaxCheckpoints(run_dir / "checkpoints", [int(result.steps[1])]) as store:
        cells.append(f"{gradient_share_ari(task, store[0], groups):.2f}")
    cells.append(f"{exact_loss_probe_auc(result.loss, groups, mirror_pairs(config, groups.size)):.2f}")
    cells.append(verdict_text(read_metrics(run_dir / "metrics.json").verdicts["group"]))
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--strategies", type=lambda text: text.split(","), default=list(STRATEGIES),
                        help="comma-separated strategy names, one column each (default: %(default)s)")
    args = parser.parse_args()
    header = ["Variant", "Seed", *(STRATEGIES.get(name, f"`{name}`") for name in args.strategies),
              "Trivial control (k-means)", "Exact-loss probe AUC", "Verdict"]
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for run_dir in args.run_dirs:
        print("| " + " | ".join(row(run_dir, args.strategies)) + " |")


if __name__ == "__main__":
    main()
