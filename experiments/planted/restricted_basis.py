"""A layer-restricted basis for a finished run: Algorithm 1 on the Hessian of the first layer only (the readout
excluded), and as its null random orthonormal directions in the same parameters; both decomposed like the run's
own bases, to ``RUN_DIR/polca/first_layer`` and ``RUN_DIR/polca/first_layer_random``.

    python experiments/planted/restricted_basis.py RUN_DIR [--exclude w_out b_out]

The restriction is exact: the loss whose Hessian Algorithm 1 takes sees the excluded leaves through
``jax.lax.stop_gradient``, so its Hessian-vector products are M H M with M the projector onto the other
parameters, and every eigenvector with a non-zero eigenvalue lies in them. Works for any task whose parameters are
a dict (the planted task: ``w_in``, ``w_out``, ``b_out``). ``evaluate.py`` scores these bases when present.
"""

import argparse
import dataclasses
from pathlib import Path

import jax
import numpy as np

import polca_jax as pj
from polca_jax.pipeline import RunDirectory, build_task, checkpoint_store

RESTRICTED_BASES = ("first_layer", "first_layer_random")


@dataclasses.dataclass(frozen=True)
class FrozenLeaves:
    """``(params, batch) -> scalar``: ``loss`` with the leaves named in ``frozen`` behind stop_gradient (hashable,
    so the kernels compile once)."""

    loss: object
    frozen: tuple

    def __call__(self, params, batch):
        return self.loss({k: jax.lax.stop_gradient(v) if k in self.frozen else v for k, v in params.items()}, batch)


def restricted_random_basis(params: dict, exclude: tuple, size: int, key) -> pj.Basis:
    """``size`` random orthonormal directions with zero entries on the excluded leaves."""
    # ravel_pytree order of a dict: its keys sorted, each leaf flattened row-major
    flat_mask = np.concatenate([np.full(np.size(params[k]), k not in exclude) for k in sorted(params)])
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    matrix = rng.normal(size=(size, flat_mask.size)) * flat_mask
    return pj.basis_from_matrix(np.asarray(matrix, np.float32), orthonormalize=True, method="random_restricted")


def build(run_dir: Path, exclude: tuple) -> None:
    run = RunDirectory(run_dir)
    task = build_task(run)
    config = run.config
    if not isinstance(task.init_params, dict) or not set(exclude) <= set(task.init_params):
        raise ValueError(f"--exclude {exclude} must name top-level leaves of the task's params "
                         f"({sorted(task.init_params) if isinstance(task.init_params, dict) else 'not a dict'})")
    key = jax.random.fold_in(jax.random.key(config.seed), 11)
    size = len(config.basis_steps) * config.k_per_checkpoint
    bases = {}
    with checkpoint_store(run, task, config.basis_steps) as store:
        bases["first_layer"] = pj.hessian_basis(FrozenLeaves(task.loss, tuple(exclude)), store, task.hessian_batch,
                                                k_per_checkpoint=config.k_per_checkpoint,
                                                num_iters=config.lanczos_iters, key=key, progress=False)
    bases["first_layer_random"] = restricted_random_basis(task.init_params, tuple(exclude), size,
                                                          jax.random.fold_in(key, 1))
    with checkpoint_store(run, task, config.polca_steps) as store:
        for name, basis in bases.items():
            if (run_dir / "polca" / name / "manifest.json").exists():
                continue
            basis.save(run_dir / "basis" / name)
            eigen = "stored" if np.all(np.isfinite(basis.eigenvalues)) else "current"
            result = pj.polca(task.per_sample_loss, store, task.eval_batch, basis, second_order=config.second_order,
                              eigenvalues=eigen, progress=False)
            result.save(run_dir / "polca" / name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--exclude", nargs="+", default=["w_out", "b_out"])
    args = parser.parse_args(argv)
    build(args.run_dir, tuple(args.exclude))


if __name__ == "__main__":
    main()
