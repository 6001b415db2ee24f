"""POLCA on any training run: a task interface, one resumable pipeline and its report, the ``polca`` CLI.

Needs the ``pipeline`` extra (``pip install "polca_jax[pipeline]"``: flax, optax, matplotlib). A user supplies a
:class:`Task` (parameters, a per-sample loss, evaluation and Hessian samples, training batches or existing
checkpoints, optional label sets) from a factory (:func:`task_factory`); :func:`run` trains, builds the basis,
decomposes, clusters, scores and reports; :func:`register_basis` adds a basis of one's own::

    train → basis → decompose → causal → cluster → score → report

The ``polca`` command is :func:`polca_jax.pipeline.cli.main`. A task's ``report_sections`` read a run's metrics by the
strategies' names (``POLCA``, ``EXACT_LOSS``, ...) and write markdown with :mod:`polca_jax.pipeline.reporting`.
The paper's experiments are two such tasks in ``experiments/arithmetic`` and ``experiments/english`` of a clone of the
repository (:func:`import_experiment`); they import from the pipeline only what this package exports, as a task of
one's own would. The planted task of the quick start ships with the package (``polca_jax.pipeline.tasks.planted``).
"""

try:
    import matplotlib  # noqa: F401
    import optax  # noqa: F401
except ImportError as error:
    raise ImportError(f"polca_jax.pipeline needs the pipeline extra ({error}): pip install 'polca_jax[pipeline]'. The "
                      "kernels, polca_jax and polca_jax.analysis, work without it.") from error

from polca_jax.pipeline._config import SECTIONS, RunConfig, flat_settings, make_config, parse_overrides  # noqa: E402
from polca_jax.pipeline._plan import Device, Plan, device_named, measured_memory, plan_run  # noqa: E402
from polca_jax.pipeline._report import write_report  # noqa: E402
from polca_jax.pipeline._results import RunMetrics, read_metrics  # noqa: E402
from polca_jax.pipeline._run import open_run, run  # noqa: E402
from polca_jax.pipeline._rundir import RunDirectory, load_labels  # noqa: E402
from polca_jax.pipeline._registry import (  # noqa: E402
    BASES,
    EXACT_LOSS,
    FIRST_ORDER_POLCA,
    GRADIENT_NORMS,
    POLCA,
    POLCA_GRADIENTS,
    POLCA_PROFILE,
    RANDOM_GRADIENTS,
    RANDOM_POLCA,
    RANDOM_PROFILE,
    RANDOM_SNAPSHOT,
    STAGES,
    VARIANTS,
    BasisInputs,
    BasisKind,
    Variant,
    register_basis,
    variant_trajectories,
)
from polca_jax.pipeline._stages import (  # noqa: E402
    build_task,
    checkpoint_store,
    cluster_gradient_trajectories,
    run_stages,
)
from polca_jax.pipeline._task import (  # noqa: E402
    BUILTIN_TASKS,
    LabelSet,
    Qualifier,
    Task,
    TaskDefinition,
    import_experiment,
    load_task_definition,
    task_factory,
)
from polca_jax.pipeline._training import AdamScales, adamw_paper, train  # noqa: E402
from polca_jax.pipeline.reporting import RunView, load_run_view  # noqa: E402

__all__ = [
    "AdamScales",
    "BASES",
    "BUILTIN_TASKS",
    "EXACT_LOSS",
    "FIRST_ORDER_POLCA",
    "GRADIENT_NORMS",
    "POLCA",
    "POLCA_GRADIENTS",
    "POLCA_PROFILE",
    "RANDOM_GRADIENTS",
    "RANDOM_POLCA",
    "RANDOM_PROFILE",
    "RANDOM_SNAPSHOT",
    "SECTIONS",
    "STAGES",
    "VARIANTS",
    "BasisInputs",
    "BasisKind",
    "Device",
    "LabelSet",
    "Plan",
    "Qualifier",
    "RunConfig",
    "RunDirectory",
    "RunMetrics",
    "RunView",
    "Task",
    "TaskDefinition",
    "Variant",
    "adamw_paper",
    "build_task",
    "checkpoint_store",
    "cluster_gradient_trajectories",
    "device_named",
    "flat_settings",
    "import_experiment",
    "load_labels",
    "load_run_view",
    "load_task_definition",
    "make_config",
    "measured_memory",
    "open_run",
    "parse_overrides",
    "plan_run",
    "read_metrics",
    "register_basis",
    "run",
    "run_stages",
    "task_factory",
    "train",
    "variant_trajectories",
    "write_report",
]
