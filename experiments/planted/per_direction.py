"""Why the paper's per-direction step finds no planted group: what each Hessian direction's filter keeps and what
HDBSCAN makes of it, on a finished planted run.

    python experiments/planted/per_direction.py RUN_DIR [--directions 0 1 2]

Per direction: the basis vector's mass on each group's private parameters; per group, the median |final projected
loss| and the fraction of samples whose projected loss rises (those the paper's per-sample filter drops); how many
samples of each group the filter keeps; and HDBSCAN with the run's settings on the kept samples, as the pipeline
runs it (``allow_single_cluster=False``, scikit-learn's default) and with a single cluster allowed.
"""

import argparse
import warnings
from pathlib import Path

import numpy as np
from sklearn.cluster import HDBSCAN

import polca_jax as pj
from polca_jax import analysis
from polca_jax.pipeline import RunDirectory, load_labels
from polca_jax.pipeline.tasks.planted import make_spec
from polca_jax.pipeline.tasks.planted import parameter_roles


def print_dense_spectrum(run: RunDirectory, step: int, top: int = 6) -> None:
    """The top eigenvalues of the dense aggregate Hessian on the task's Hessian sample at ``step``."""
    import jax
    from jax.flatten_util import ravel_pytree

    from polca_jax.pipeline import build_task, checkpoint_store

    task = build_task(run)
    with checkpoint_store(run, task, [step]) as store:
        flat, unravel = ravel_pytree(store[0])
    hessian = np.asarray(jax.hessian(lambda f: task.loss(unravel(f), task.hessian_batch))(flat), dtype=float)
    print(f"dense Hessian at step {step}: top eigenvalues {np.round(np.linalg.eigvalsh(hessian)[::-1][:top], 5)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--directions", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dense-hessian-step", type=int, help="also print the top eigenvalues of the dense Hessian "
                        "of the Hessian sample at this checkpoint step (small models only)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    run = RunDirectory(args.run_dir)
    options = run.config.task_options
    spec = make_spec(options["group_weights"], options["private_dims"], options["shared_dims"], options["width"],
                     options["shared_readout"], options["loss"], options["noise"])
    roles = parameter_roles(spec)
    groups = load_labels(run.path)[0]["group"].values
    names = np.unique(groups)
    result = pj.POLCAResult.load(args.run_dir / "polca" / "hessian")
    vectors = np.asarray(pj.Basis.load(args.run_dir / "basis" / "hessian").vectors, dtype=float)
    projected = np.asarray(result.projected_loss)
    relying = analysis.relying_samples(projected)
    if args.dense_hessian_step is not None:
        print_dense_spectrum(run, args.dense_hessian_step)
    for k in args.directions:
        mass = {name: float((vectors[k, roles[f"group {g}"]] ** 2).sum()) for g, name in enumerate(names)}
        final = projected[-1, :, k]
        print(f"direction {k}: mass " + ", ".join(f"{n} {m:.4f}" for n, m in mass.items()))
        for name in names:
            of = groups == name
            print(f"  group {name}: median |final| {np.median(np.abs(final[of])):.4g}, "
                  f"rising {np.mean(final[of] > 0):.2f}, kept by the filter {np.count_nonzero(relying[of, k])}")
        kept = np.flatnonzero(relying[:, k])
        size, min_samples = analysis.hdbscan_params(kept.size, min_cluster_size=run.config.min_cluster_size,
                                                    min_samples_divisor=run.config.min_samples_divisor)
        for single in (False, True):
            labels = HDBSCAN(min_cluster_size=size, min_samples=min_samples, allow_single_cluster=single,
                             copy=True).fit_predict(projected[:, kept, k].T)
            found = {int(c): {str(n): int(np.count_nonzero(groups[kept][labels == c] == n)) for n in names}
                     for c in np.unique(labels)}
            print(f"  HDBSCAN (min_cluster_size {size}, min_samples {min_samples}, single cluster "
                  f"{'allowed' if single else 'not allowed'}): {found}  (-1: noise)")


if __name__ == "__main__":
    main()
