"""The projected-gradient features' options side by side on finished planted runs (issue 21, item 3).

For each run and each of its bases, the pipeline's projected-gradient clustering
(:func:`polca_jax.pipeline.cluster_gradient_trajectories`, the run's own window and clusterer) with every
combination of its options, from the stored projections alone (seconds per run):

- ``gradient_increments``: the gradients' values, or their changes between successive checkpoints;
- ``gradient_directions``: one joint clustering of all directions, or one clustering per direction;
- ``gradient_rotation``: along the basis, or along new directions in its span (varimax, FastICA). Varimax is an
  orthogonal rotation, which leaves the joint features' distances as they are, so it is only run per direction.

    python experiments/planted/gradient_features.py RUN_DIR [RUN_DIR ...] [--bases hessian,random,...] \
        [--window FRACTION]

Prints one table row per run and basis: the best ARI against the planted groups over the strategy's clusterings
(one joint clustering, or the best direction's) and how many groups any of its clusterings recovers (homogeneity
>= 0.9 at recall >= 0.5 over all members). The first column is the pipeline's default (the decision rule). Then a
summary per family of runs (the run directories' names up to the last "-", e.g. ``parity`` for ``parity-3``) and
basis: the median ARI, the runs with ARI >= 0.8 and the runs with every group recovered.
"""

import argparse
import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

import polca_jax as pj
from polca_jax.pipeline import RunConfig, cluster_gradient_trajectories, load_labels
from polca_jax.pipeline.tasks.planted import strategy_summary

OPTIONS = [  # (increments, directions, rotation); the first is the pipeline's default
    (False, "joint", "none"), (True, "joint", "none"), (False, "joint", "ica"), (True, "joint", "ica"),
    (False, "each", "none"), (True, "each", "none"), (False, "each", "varimax"), (True, "each", "varimax"),
    (False, "each", "ica"), (True, "each", "ica"),
]


def option_name(increments: bool, directions: str, rotation: str) -> str:
    return " ".join(["increments" if increments else "values", directions] + ([rotation] if rotation != "none" else []))


def run_scores(run_dir: Path, bases: list[str], window: float | None) -> dict[str, list[tuple[float, int, int]]]:
    """basis -> per option (best ARI, groups recovered, groups), for the bases the run has (``window``: another
    ``gradient_window`` than the run's)."""
    config = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()), str(run_dir / "config.json"))
    if window is not None:
        config = dataclasses.replace(config, gradient_window=window)
    groups = load_labels(run_dir)[0]["group"].values
    scores = {}
    for basis in bases:
        if not (run_dir / "polca" / basis).is_dir():
            continue
        projections = np.asarray(pj.POLCAResult.load(run_dir / "polca" / basis).projections)
        scores[basis] = []
        for increments, directions, rotation in OPTIONS:
            options = dataclasses.replace(config, gradient_increments=increments, gradient_directions=directions,
                                          gradient_rotation=rotation)
            summary = strategy_summary(cluster_gradient_trajectories(projections, options), groups)
            recovered = sum(group["recovered"] for group in summary["groups"].values())
            scores[basis].append((summary["best_ari"], recovered, len(summary["groups"])))
    return scores


def table_header(first: str) -> str:
    return (f"| {first} | Basis | " + " | ".join(option_name(*option) for option in OPTIONS) + " |\n"
            + "|---|---|" + "---|" * len(OPTIONS))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--bases", default="hessian,preconditioned_hessian,random",
                        help="comma-separated bases (those a run lacks are skipped)")
    parser.add_argument("--window", type=float, help="the last fraction of the checkpoints to read (default: the run's)")
    args = parser.parse_args()
    print(table_header("Run"))
    families = defaultdict(list)  # (family, basis) -> per run, per option (ARI, recovered, groups)
    for run_dir in args.runs:
        for basis, scores in run_scores(run_dir, args.bases.split(","), args.window).items():
            families[run_dir.name.rsplit("-", 1)[0], basis].append(scores)
            print(f"| {run_dir.name} | {basis} | " + " | ".join(f"{ari:.2f} / {recovered}"
                                                                for ari, recovered, _ in scores) + " |", flush=True)
    print("\n(Summary: median ARI, no cluster counting as 0; runs with ARI >= 0.8; runs with every group recovered; "
          "of the runs given.)\n")
    print(table_header("Family"))
    for (family, basis), runs in families.items():
        cells = []
        for option in range(len(OPTIONS)):
            aris = [np.nan_to_num(run[option][0]) for run in runs]  # no cluster at all: 0
            every = sum(run[option][1] == run[option][2] for run in runs)
            cells.append(f"{np.median(aris):.2f}; {sum(a >= 0.8 for a in aris)}; {every} of {len(runs)}")
        print(f"| {family} | {basis} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
