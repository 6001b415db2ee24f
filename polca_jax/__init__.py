"""polca_jax: POLCA (Projection Oriented Loss Change Allocation) in JAX.

Kernels are pure functions of a params pytree and a batch pytree; see docs/kernels.md for the data flow.
"""

from polca_jax._ablation import direction_ablation_losses, remove_direction
from polca_jax._basis import (
    Basis,
    basis_from_matrix,
    gradient_covariance_basis,
    hessian_basis,
    load_basis_info,
    parameter_axis_basis,
    random_basis,
    rms_gradient_scale,
    shuffled_hessian_basis,
)
from polca_jax._checkpoints import PARAMS_ITEM, OrbaxCheckpoints
from polca_jax._decomposition import polca
from polca_jax._distributed import cluster_launcher, initialize_distributed, is_writer, sync, to_host
from polca_jax._hvp import FlatHessianMatvec, hvp
from polca_jax._lanczos import Eigenpairs, check_orthonormal, lanczos_kernel_cost, top_eigenpairs
from polca_jax._recorder import CheckpointRecorder
from polca_jax._result import POLCAResult
from polca_jax._second_order import SecondOrder
from polca_jax._projections import (
    choose_method,
    gradient_blocks,
    per_sample_curvature,
    per_sample_gradient_norms,
    per_sample_losses,
    per_sample_projections,
    per_sample_projections_and_curvature,
    projection_kernel_cost,
)
from polca_jax._sharding import (
    PartitionRules,
    data_mesh,
    device_mesh,
    param_spec,
    partition_rules,
    num_data_shards,
    per_device_bytes,
    replicated_fraction,
    shard_batch,
    shard_params,
)
from polca_jax.errors import CorruptRunDirectory, Interrupted, PolcaError, ResumeMismatch, TaskError

__version__ = "0.1.0"

__all__ = [
    "Basis",
    "CheckpointRecorder",
    "CorruptRunDirectory",
    "Eigenpairs",
    "FlatHessianMatvec",
    "Interrupted",
    "OrbaxCheckpoints",
    "PARAMS_ITEM",
    "PartitionRules",
    "POLCAResult",
    "PolcaError",
    "ResumeMismatch",
    "SecondOrder",
    "TaskError",
    "basis_from_matrix",
    "check_orthonormal",
    "choose_method",
    "cluster_launcher",
    "data_mesh",
    "device_mesh",
    "direction_ablation_losses",
    "gradient_blocks",
    "gradient_covariance_basis",
    "hessian_basis",
    "hvp",
    "initialize_distributed",
    "is_writer",
    "lanczos_kernel_cost",
    "load_basis_info",
    "param_spec",
    "partition_rules",
    "parameter_axis_basis",
    "num_data_shards",
    "per_device_bytes",
    "per_sample_curvature",
    "per_sample_gradient_norms",
    "per_sample_losses",
    "per_sample_projections",
    "per_sample_projections_and_curvature",
    "polca",
    "projection_kernel_cost",
    "random_basis",
    "rms_gradient_scale",
    "remove_direction",
    "replicated_fraction",
    "shard_batch",
    "shard_params",
    "shuffled_hessian_basis",
    "sync",
    "to_host",
    "top_eigenpairs",
]
