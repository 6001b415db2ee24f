"""How much of the projected-gradient strategy's result is the basis, and how much the per-sample gradients it
projects? On a finished planted run, the rule's features (each sample's projected gradients over the last
``gradient_window`` of the POLCA checkpoints, normalised, PCA, the run's clusterer) along:

- the run's own bases (``basis/*``: the Hessian basis, its random twin, any ablation basis), recomputed here from
  the checkpoints as a check that this script reproduces the pipeline's features;
- random orthonormal subspaces of K = 2 … P dimensions (several draws each), in raw parameter coordinates;
- the whole per-sample gradient (K = P: no basis at all), as it is and with each coordinate divided by its RMS over
  the samples at each checkpoint (a per-parameter rescaling like the scaled covariance basis').

    python experiments/planted/random_subspace.py RUN_DIR [RUN_DIR ...] [--dims 2 5 10 20 40 80] [--draws 5] \
        [--window FRACTION]

Prints one row per run and feature: the ARI against the planted groups (over the clustered samples) and how many
groups are recovered (homogeneity >= 0.9 at recall >= 0.5 over all members), for random subspaces the median and
range over draws. If random subspaces of the basis' own size already match it, the finding is in the gradients'
geometry, not in the basis; if the whole gradient does as well, no subspace is needed to find the groups.
"""

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

import polca_jax as pj
from polca_jax import analysis
from polca_jax.pipeline import RunConfig, cluster_gradient_trajectories, load_labels, load_task_definition
from polca_jax.pipeline.tasks.planted import strategy_summary


def window_steps(run_dir: Path, gradient_window: float) -> np.ndarray:
    """The POLCA checkpoint steps the projected-gradient strategies read: the last ``gradient_window`` of them."""
    steps = pj.POLCAResult.load(run_dir / "polca" / "hessian").steps
    return np.asarray(steps[-max(2, round(gradient_window * len(steps))):])


def gradient_function(task, template):
    """Compiled once per run: flat parameters float[P] (``ravel_pytree`` order of ``template``) -> float[N, P], every
    evaluation sample's loss gradient."""
    _, unravel = ravel_pytree(template)

    def sample_gradient(flat, sample):
        single = jax.tree_util.tree_map(lambda leaf: leaf[None], sample)
        return jax.grad(lambda v: task.per_sample_loss(unravel(v), single)[0])(flat)

    return jax.jit(lambda flat: jax.vmap(lambda sample: sample_gradient(flat, sample))(task.eval_batch))


def cluster_projections(projections: np.ndarray, config: RunConfig) -> analysis.Clustering:
    """The pipeline's projected-gradient clustering of all of ``projections [W, N, K]`` (the window already cut)."""
    return cluster_gradient_trajectories(projections, dataclasses.replace(config, gradient_window=1.0))[0]


def score(clustering: analysis.Clustering, groups: np.ndarray) -> tuple[float, int]:
    summary = strategy_summary([clustering], groups)
    return summary["best_ari"], sum(g["recovered"] for g in summary["groups"].values())


def random_rows(k: int, p: int, rng: np.random.Generator) -> np.ndarray:
    """float64[k, P] orthonormal rows spanning a uniformly random k-dimensional subspace."""
    q, _ = np.linalg.qr(rng.standard_normal((p, k)))
    return q.T


def run_rows(run_dir: Path, dims: list[int], draws: int, window: float | None) -> list[str]:
    config = json.loads((run_dir / "config.json").read_text())
    run_config = RunConfig.from_dict(config, str(run_dir / "config.json"))
    task = load_task_definition(config["task"])(**config["task_options"], seed=config["seed"])
    groups = load_labels(run_dir)[0]["group"].values
    steps = window_steps(run_dir, window or config["gradient_window"])
    store = pj.OrbaxCheckpoints(run_dir / "checkpoints", [int(s) for s in steps])
    gradients_at = gradient_function(task, store[0])
    gradients = np.stack([np.asarray(gradients_at(ravel_pytree(store[i])[0]), np.float64)
                          for i in range(len(steps))])  # [W, N, P]
    p = gradients.shape[2]
    name = f"{run_dir.name} (P={p}, W={len(steps)})"
    rows = []
    for basis_dir in sorted((run_dir / "basis").iterdir()):
        rows_kp = np.asarray(pj.Basis.load(basis_dir).vectors, np.float64)
        stored = pj.POLCAResult.load(run_dir / "polca" / basis_dir.name).projections[-len(steps):]
        projections = gradients @ rows_kp.T
        check = float(np.max(np.abs(projections - stored)) / max(np.max(np.abs(stored)), 1e-30))
        ari, recovered = score(cluster_projections(projections, run_config), groups)
        rows.append(f"| {name} | basis `{basis_dir.name}` (K={rows_kp.shape[0]}) | {ari:.2f} / {recovered} | "
                    f"stored projections reproduced to {check:.0e} |")
    rng = np.random.default_rng(1000 + config["seed"])
    for k in [d for d in dims if d < p]:
        results = [score(cluster_projections(gradients @ random_rows(k, p, rng).T, run_config), groups)
                   for _ in range(draws)]
        aris = np.asarray([a for a, _ in results])
        recovered = [r for _, r in results]
        rows.append(f"| {name} | random K={k} | {np.nanmedian(aris):.2f} ({np.nanmin(aris):.2f}–"
                    f"{np.nanmax(aris):.2f}) / {max(recovered)} | {draws} draws, median (range) / most recovered |")
    ari, recovered = score(cluster_projections(gradients, run_config), groups)
    rows.append(f"| {name} | whole gradient (K=P) | {ari:.2f} / {recovered} | no basis |")
    rms = np.sqrt(np.mean(gradients**2, axis=1, keepdims=True))  # [W, 1, P]
    scaled = gradients / np.maximum(rms, np.finfo(np.float64).tiny)
    ari, recovered = score(cluster_projections(scaled, run_config), groups)
    rows.append(f"| {name} | whole gradient / RMS per coordinate | {ari:.2f} / {recovered} | no basis |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--dims", type=int, nargs="*", default=[2, 5, 10, 20, 40, 80])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--window", type=float, help="the last fraction of the POLCA checkpoints read (default: the "
                        "run's gradient_window, as the pipeline's strategy reads)")
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)
    print("| Run | Features along | ARI / groups recovered | Note |\n|---|---|---|---|")
    for run_dir in args.run_dirs:
        for row in run_rows(run_dir, args.dims, args.draws, args.window):
            print(row, flush=True)


if __name__ == "__main__":
    main()
