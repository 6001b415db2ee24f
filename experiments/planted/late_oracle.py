"""Where Eq. 9 puts the breakthrough of a late-learned planted group, sample by sample.

    python experiments/planted/late_oracle.py RUN_DIR [RUN_DIR ...]

For a run of ``planted-entangled --preset cpu-late`` (group B enters training at ``late_step``): group B's mean exact
loss just before and after ``late_step``, then Eq. 9 on each member's exact-loss curve with the run's Δ (both sign
conventions): the mean the report's oracle shows, the median, and how many members' argmax falls before
``late_step``. A mean between two modes is not a breakthrough step of anyone.
"""

import argparse
import json
from pathlib import Path

import numpy as np

import polca_jax as pj
from polca_jax import analysis
from polca_jax.pipeline import load_labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    args = parser.parse_args()
    print("| Run | B's mean loss before → after late_step | sign | mean | median | members before late_step |")
    print("|---|---|---|---|---|---|")
    for run_dir in args.run_dirs:
        config = json.loads((run_dir / "config.json").read_text())
        late = config["task_options"]["late_step"]
        result = pj.POLCAResult.load(run_dir / "polca" / "hessian")
        groups = load_labels(run_dir)[0]["group"]
        late_group = groups.values == np.unique(groups.values)[-1]
        curves = np.asarray(result.loss)[:, late_group].T  # [n, T]
        mean = curves.mean(axis=0)
        before, after = np.searchsorted(result.steps, late) - 1, np.searchsorted(result.steps, late, side="right")
        fall = (f"{mean[before]:.3f} (step {result.steps[before]}) → {mean[after + 1]:.3f} "
                f"(step {result.steps[after + 1]})")
        window = float(config["window_steps"] or 5 * config["polca_every"])  # the planted report's default
        for sign in ("paper", "drop"):
            steps = analysis.breakthrough_step(curves, result.steps, window, sign=sign)
            print(f"| {run_dir.name} | {fall} | {sign} | {steps.mean():.0f} | {np.median(steps):.0f} | "
                  f"{np.mean(steps < late):.0%} |")


if __name__ == "__main__":
    main()
