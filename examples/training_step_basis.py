"""A basis of one's own, in one file: the top principal directions of the training steps between basis checkpoints.

    polca run examples/training_step_basis.py:make_task --preset tiny --set ablation_bases=random,training_steps \
        --out runs/training-steps

Registered here, it is built, decomposed, clustered, scored against the nulls, reported and planned like the
built-in bases; any task works (here the planted benchmark).
"""

import numpy as np
from jax.flatten_util import ravel_pytree

import polca_jax as pj
from polca_jax.pipeline import BasisInputs, BasisKind, Variant, register_basis
from polca_jax.pipeline.tasks.planted import make_task  # noqa: F401  (the task ``polca run`` names)


def training_step_basis(inputs: BasisInputs) -> pj.Basis:
    """Rows ``[S, P]``: the right singular vectors of the steps θ(s_i) − θ(s_i−1) between the S basis checkpoints
    (θ(s_0) the initial parameters), largest singular value first."""
    flat = [ravel_pytree(params)[0] for params in (inputs.task.init_params, *inputs.checkpoints)]
    _, _, rows = np.linalg.svd(np.diff(np.asarray(flat, np.float64), axis=0), full_matrices=False)
    return pj.basis_from_matrix(rows.astype(flat[0].dtype), method="training_steps")


register_basis(
    BasisKind("training_steps", "Principal directions of the training steps", training_step_basis,
              size=lambda config: len(config.basis_steps)),
    Variant("training_steps", "Training-step basis", "training_steps", "projected_loss", "ablation"),
    Variant("training_steps_profile", "Training-step basis, allocation profiles", "training_steps", "profile",
            "ablation"),
)
