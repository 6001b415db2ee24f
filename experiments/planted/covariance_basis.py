"""The planted groups along a basis of per-sample gradient covariance, beside the run's Hessian basis, a random basis
and a label-free control, on a finished planted-benchmark run.

    python experiments/planted/covariance_basis.py RUN_DIR [--checkpoint-index 1]

Builds, over the run's basis checkpoints and on its Hessian sample, ``pj.gradient_covariance_basis`` with the
default RMS scale and without it (as many directions as the run's Hessian basis, same Lanczos steps), decomposes the
evaluation samples along each basis and along the run's Hessian and a random basis (first order, in memory), and
prints, for each, the adjusted Rand index against the planted groups of

- a Gaussian mixture (as many components as groups) on the projected gradients ⟨b, ∇L(x)⟩ at one checkpoint
  (``--checkpoint-index``, default the second POLCA checkpoint), and
- the allocation-profile strategy with a Gaussian mixture (its count chosen by BIC), the report's lead strategy;

beside the label-free control of ``trivial_controls.py`` (where each sample's gradient lies in the first layer) at
the same checkpoint. The labels are used only to score.
"""

import argparse
from pathlib import Path

import jax
import numpy as np
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture

import polca_jax as pj
from polca_jax import analysis

from trivial_controls import gradient_norm_shares, load_planted_run


def best_ari(clusterings, groups) -> float:
    values = [analysis.adjusted_rand(c, groups) for c in clusterings]
    values = [v for v in values if np.isfinite(v)]
    return max(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint-index", type=int, default=1)
    args = parser.parse_args()
    config, task, groups = load_planted_run(args.run_dir)
    num_groups = np.unique(groups).size
    hessian = pj.Basis.load(args.run_dir / "basis" / "hessian")
    basis_steps = sorted({int(s) for s in hessian.steps})
    polca_steps = [int(s) for s in pj.POLCAResult.load(args.run_dir / "polca" / "hessian").steps]
    key = jax.random.key(config["seed"])
    options = dict(num_iters=config["lanczos_iters"], key=key, progress=False)
    with pj.OrbaxCheckpoints(args.run_dir / "checkpoints", basis_steps) as store:
        bases = {
            "Hessian (the run's)": hessian,
            "scaled gradient covariance": pj.gradient_covariance_basis(
                task.per_sample_loss, store, task.hessian_batch, k_per_checkpoint=config["k_per_checkpoint"],
                **options),
            "gradient covariance, unscaled": pj.gradient_covariance_basis(
                task.per_sample_loss, store, task.hessian_batch, scale=None,
                k_per_checkpoint=config["k_per_checkpoint"], **options),
            "random": pj.random_basis(task.init_params, hessian.size, jax.random.fold_in(key, 2)),
        }
    step = polca_steps[args.checkpoint_index]
    print(f"{args.run_dir}: {groups.size} samples, {num_groups} groups, {hessian.size} directions; projected "
          f"gradients at step {step}")
    print("| Basis | GMM on projected gradients | Allocation profiles + GMM |")
    print("|---|---|---|")
    with pj.OrbaxCheckpoints(args.run_dir / "checkpoints", polca_steps) as store:
        for name, basis in bases.items():
            result = pj.polca(task.per_sample_loss, store, task.eval_batch, basis, second_order="none",
                              progress=False)
            gradients = np.asarray(result.projections[args.checkpoint_index])
            found = GaussianMixture(num_groups, random_state=0).fit_predict(gradients)
            profiles = analysis.strategy_clusterings(result.projected_loss, "profile", clusterer="gmm",
                                                     min_cluster_size=max(2, groups.size // 20))
            print(f"| {name} | {adjusted_rand_score(groups, found):.2f} | {best_ari(profiles, groups):.2f} |")
        control = gradient_norm_shares(task, store[args.checkpoint_index])
    found = GaussianMixture(num_groups, random_state=0).fit_predict(control)
    print(f"label-free control, gradient norm shares per w_in row at step {step}, GMM: ARI "
          f"{adjusted_rand_score(groups, found):.2f}")


if __name__ == "__main__":
    main()
