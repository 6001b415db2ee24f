"""What the pipeline is made of, in one place that the stages, the plan and the report all read: its stages, the
bases it can decompose along, and the clustering strategies it scores.

A basis is a :class:`BasisKind` (how to build it from the run's checkpoints, where its second-order term comes from,
what it costs); a strategy is a :class:`Variant` (which basis, which trajectory). :func:`register_basis` adds a
basis of a user's own with its strategies; a config then names it in ``ablation_bases`` and it is built, decomposed,
clustered, scored against the nulls, reported and planned like the built-in ones (``examples/training_step_basis.py``
shows one in a single file).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import polca_jax as pj
from polca_jax.errors import PolcaError

STAGES = ("train", "basis", "decompose", "causal", "cluster", "score", "report")
HOST_STAGES = ("cluster", "score", "report")
MESH_STAGES = ("train", "basis", "decompose", "causal")  # the stages that run on a mesh (``--mesh``)
PROCESS_STAGES = ("basis", "decompose")  # the stages that run across the processes of a multi-process run
STAGE_OUTPUTS = {
    "train": ("checkpoints", "metrics.jsonl"),
    "basis": ("basis",),
    "decompose": ("polca", "controls"),
    "causal": ("causal",),
    "cluster": ("clusters",),
    "score": ("metrics.json",),
    "report": ("report",),
}
STAGE_LOSSES = {"train": ("loss",), "basis": ("loss",), "decompose": ("per_sample_loss",),
                "causal": ("per_sample_loss",)}  # the task's loss functions each stage's results depend on
MAIN_BASIS = "hessian"
RANDOM_BASIS = "random"  # the null every strategy along the Hessian basis stands beside, and the causal check's
NEAREST_SAMPLES = 10  # samples nearest each cluster's medoid, kept for reports
CURVATURES = ("stored", "current", "none")


# --- bases ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BasisInputs:
    """What a basis builder (``BasisKind.build``) may use: the run's config, task and checkpoints.

    The basis stage makes one per basis; :func:`register_basis`'s example writes a builder.

    Attributes:
      config: the run's :class:`RunConfig`.
      task: the run's :class:`Task`.
      checkpoints: the run's parameters at ``config.basis_steps`` (a sequence of pytrees; each read checked against
        the run's digest).
      key: the run's key (``jax.random.key(config.seed)``): fold in a constant of the basis' own.
      partial_dir: a directory where a builder may keep its work so far, so that a killed stage resumes (removed
        once the basis is saved).
      mesh: the mesh the basis stage runs on (:func:`polca_jax.device_mesh`), or None (one device); for the kernels.
      progress: whether to show progress bars.
      final_params: a function that restores the parameters at the last step (``config.num_steps``).
      adam_scales: a function giving Adam's preconditioner at ``config.basis_steps``
        (:class:`polca_jax.pipeline.AdamScales`), None when the run read checkpoints it did not train
        (``--checkpoints``), which hold no optimiser state.
    """

    config: Any  # RunConfig
    task: Any  # Task
    checkpoints: Sequence
    key: jax.Array
    partial_dir: Path
    mesh: Any
    progress: bool
    final_params: Callable[[], Any]
    adam_scales: Callable[[], Sequence] | None = None

    @property
    def size(self) -> int:
        """Algorithm 1's basis size: basis checkpoints × ``k_per_checkpoint``."""
        return len(self.config.basis_steps) * self.config.k_per_checkpoint

    def algorithm1_options(self) -> dict:
        """The keyword arguments Algorithm 1 and its variants take from the config."""
        return dict(k_per_checkpoint=self.config.k_per_checkpoint, num_iters=self.config.lanczos_iters,
                    progress=self.progress, mesh=self.mesh, partial_dir=self.partial_dir)


@dataclasses.dataclass(frozen=True)
class BasisKind:
    """A basis the pipeline can build, decompose along and report; ``BASES`` holds the registered ones.

    ``BASES`` maps a name to its kind: the built-in ``hessian`` (Algorithm 1), ``shuffled_hessian``, ``random``,
    ``parameter_axes`` (LCA), ``scaled_gradient_covariance``, ``gradient_covariance`` and ``preconditioned_hessian``,
    then those added with :func:`register_basis`. A run builds ``hessian`` and the ones its config names in
    ``ablation_bases``.

    Attributes:
      name: its name, as ``ablation_bases`` and ``Variant.basis`` give it.
      label: its name in reports.
      build: ``BasisInputs -> polca_jax.Basis``, its directions in the task's parameter space.
      curvature: where the paper's second-order term along it comes from — ``"stored"`` (its eigenvalues, as
        Algorithm 1 stores them), ``"current"`` (the per-sample curvature at each checkpoint) or ``"none"`` (first
        order only, as LCA).
      lanczos: building it takes one Lanczos run of ``lanczos_iters`` products per basis checkpoint (what
        ``polca plan`` times for it); otherwise building it is taken as free.
      size: ``config -> int``, its number of directions for a config (None: basis checkpoints ×
        ``k_per_checkpoint``).

    Raises:
      PolcaError: ``curvature`` is not ``"stored"``, ``"current"`` or ``"none"``.

    Example:
      >>> from polca_jax.pipeline import BASES, load_task_definition, make_config
      >>> hessian, lca = BASES["hessian"], BASES["parameter_axes"]
      >>> hessian.label, hessian.curvature, hessian.lanczos
      ('Hessian (Algorithm 1)', 'stored', True)
      >>> config = make_config(load_task_definition("planted"), "planted", "tiny")  # 5 basis steps, lca_axes=8
      >>> hessian.size_for(config), lca.size_for(config)
      (5, 8)
      >>> hessian.second_order("paper"), lca.second_order("paper")
      (SecondOrder(kind='paper', eigenvalues='stored'), SecondOrder(kind='none', eigenvalues=None))
    """

    name: str
    label: str
    build: Callable[[BasisInputs], pj.Basis]
    curvature: str = "current"
    lanczos: bool = False
    size: Callable[[Any], int] | None = None

    def __post_init__(self):
        if self.curvature not in CURVATURES:
            raise PolcaError(f"basis {self.name!r}: curvature must be one of {CURVATURES}, got {self.curvature!r}")

    def size_for(self, config) -> int:
        """Its number of directions under ``config`` (a :class:`RunConfig`)."""
        return self.size(config) if self.size is not None else len(config.basis_steps) * config.k_per_checkpoint

    def second_order(self, rule: str) -> pj.SecondOrder:
        """The decomposition's second-order rule along it, for the config's ``second_order`` ``rule``."""
        return pj.SecondOrder("none") if self.curvature == "none" else pj.SecondOrder(rule, self.curvature)


def _hessian(inputs: BasisInputs) -> pj.Basis:
    return pj.hessian_basis(inputs.task.loss, inputs.checkpoints, inputs.task.hessian_batch, key=inputs.key,
                            **inputs.algorithm1_options())


def _shuffled_hessian(inputs: BasisInputs) -> pj.Basis:
    return pj.shuffled_hessian_basis(inputs.task.loss, inputs.checkpoints, inputs.task.hessian_batch,
                                     key=jax.random.fold_in(inputs.key, 1), **inputs.algorithm1_options())


def _random(inputs: BasisInputs) -> pj.Basis:
    return pj.random_basis(inputs.task.init_params, inputs.size, jax.random.fold_in(inputs.key, 2))


def _parameter_axes(inputs: BasisInputs) -> pj.Basis:
    return pj.parameter_axis_basis(inputs.final_params(), inputs.config.lca_axes, step=inputs.config.num_steps)


def _scaled_gradient_covariance(inputs: BasisInputs) -> pj.Basis:
    return pj.gradient_covariance_basis(inputs.task.per_sample_loss, inputs.checkpoints, inputs.task.hessian_batch,
                                        key=jax.random.fold_in(inputs.key, 3), **inputs.algorithm1_options())


def _gradient_covariance(inputs: BasisInputs) -> pj.Basis:
    return pj.gradient_covariance_basis(inputs.task.per_sample_loss, inputs.checkpoints, inputs.task.hessian_batch,
                                        scale=None, key=jax.random.fold_in(inputs.key, 4),
                                        **inputs.algorithm1_options())


def _preconditioned_hessian(inputs: BasisInputs) -> pj.Basis:
    """S H S with S² Adam's 1/(√v̂ + ε) where the run trained, else 1/RMS of the per-sample gradients."""
    if inputs.adam_scales is not None:
        scale = inputs.adam_scales()
    else:
        def scale(params):
            rms = pj.rms_gradient_scale(inputs.task.per_sample_loss, params, inputs.task.hessian_batch)
            return jax.tree_util.tree_map(jnp.sqrt, rms)
    return pj.hessian_basis(inputs.task.loss, inputs.checkpoints, inputs.task.hessian_batch, scale=scale,
                            key=jax.random.fold_in(inputs.key, 5), **inputs.algorithm1_options())


BASES: dict[str, BasisKind] = {kind.name: kind for kind in (
    BasisKind(MAIN_BASIS, "Hessian (Algorithm 1)", _hessian, curvature="stored", lanczos=True),
    BasisKind("shuffled_hessian", "Algorithm 1, checkpoints shuffled", _shuffled_hessian, curvature="stored",
              lanczos=True),
    BasisKind(RANDOM_BASIS, "Random orthonormal", _random),
    BasisKind("parameter_axes", "Largest parameters (LCA)", _parameter_axes, curvature="none",
              size=lambda config: config.lca_axes),
    BasisKind("scaled_gradient_covariance", "Scaled per-sample gradient covariance", _scaled_gradient_covariance,
              lanczos=True),  # a covariance product costs about an HVP
    BasisKind("gradient_covariance", "Per-sample gradient covariance, unscaled", _gradient_covariance, lanczos=True),
    BasisKind("preconditioned_hessian", "Hessian of the preconditioned loss (Adam's √v)", _preconditioned_hessian,
              lanczos=True),
)}
BUILTIN_BASES = tuple(BASES)


def basis_kind(name: str) -> BasisKind:
    """The registered basis ``name``; ``PolcaError`` naming the registered ones otherwise."""
    if name not in BASES:
        raise PolcaError(f"no basis named {name!r} is registered (registered: {', '.join(BASES)}); a basis of your "
                         "own is registered by the file that defines it (polca_jax.pipeline.register_basis): name "
                         "that file's task (path/to/file.py:factory) so that it is imported")
    return BASES[name]


def ablation_basis_names() -> tuple[str, ...]:
    """Every registered basis but the Hessian one: what ``ablation_bases`` may name."""
    return tuple(name for name in BASES if name != MAIN_BASIS)


# --- strategies -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """One clustering strategy: what it decomposes along and which trajectory it clusters.

    ``VARIANTS`` lists every strategy, built-in and registered (:func:`register_basis`), in the report's order; a
    run runs those of its config's groups along its bases. The strategies the score stage, the report and a task's
    ``report_sections`` name are exported as their names: ``EXACT_LOSS`` (the exact loss), ``POLCA`` (the projected
    loss along the Hessian basis, Eq. 8), ``FIRST_ORDER_POLCA`` (its first-order part), ``RANDOM_POLCA`` (POLCA
    along the random basis: the null beside POLCA), ``POLCA_PROFILE`` and ``RANDOM_PROFILE`` (allocation profiles
    along the Hessian and the random basis), ``POLCA_GRADIENTS`` and ``RANDOM_GRADIENTS`` (projected-gradient
    trajectories along them) and the label-free controls ``GRADIENT_NORMS`` (each sample's gradient norm per
    parameter block) and ``RANDOM_SNAPSHOT`` (its gradient along the random directions at one checkpoint, run with
    the random basis).

    Attributes:
      name: its name, the key of its results in ``metrics.json`` (``RunMetrics.variants``) and ``clusters/``.
      label: its name in reports.
      basis: the basis it decomposes along (a key of ``BASES``).
      trajectory: what it clusters (:func:`variant_trajectories`): ``loss``, ``loss_change``, ``fisher``,
        ``first_order``, ``projected_loss``, ``profile``, ``gradients``, ``gradient_norms`` or
        ``checkpoint_gradients``.
      group: ``"main"`` (POLCA and the exact loss, always run), ``"baseline"`` (config ``baselines``),
        ``"ablation"`` (another basis, config ``ablations``) or ``"control"`` (a label-free feature that needs no
        POLCA, which a finding must beat; always run).
      in_nulls: a row of the report's table against the nulls.
      random_twin: the name of the same strategy along the random basis, the null a finding of this one must beat
        (None: none).

    Raises:
      PolcaError: ``trajectory`` or ``group`` is not one of the choices above.

    Example:
      >>> from polca_jax.pipeline import POLCA, RANDOM_POLCA, VARIANTS
      >>> polca = next(strategy for strategy in VARIANTS if strategy.name == POLCA)
      >>> polca.basis, polca.trajectory, polca.group, polca.random_twin == RANDOM_POLCA
      ('hessian', 'projected_loss', 'main', True)
    """

    name: str
    label: str
    basis: str
    trajectory: str
    group: str
    in_nulls: bool = True
    random_twin: str | None = None

    def __post_init__(self):
        if self.trajectory not in TRAJECTORY_KINDS:
            raise PolcaError(f"strategy {self.name!r}: trajectory must be one of {TRAJECTORY_KINDS}, got "
                             f"{self.trajectory!r}")
        if self.group not in GROUPS:
            raise PolcaError(f"strategy {self.name!r}: group must be one of {GROUPS}, got {self.group!r}")


TRAJECTORY_KINDS = ("loss", "loss_change", "fisher", "first_order", "projected_loss", "profile", "gradients",
                    "gradient_norms", "checkpoint_gradients")
PER_SAMPLE_SIGNALS = ("loss", "loss_change")  # clustered as one signal per sample, scored without qualifying rules
JOINT_KINDS = ("profile", "gradients", "gradient_norms", "checkpoint_gradients")  # one clustering of all features
GROUPS = ("main", "baseline", "ablation", "control")

# the strategies the score stage, the report and the tasks' sections name (every strategy is in VARIANTS; exported
# by polca_jax.pipeline for a task's report_sections, which read them in a run's metrics)
EXACT_LOSS = "exact_loss"
POLCA = "polca"
FIRST_ORDER_POLCA = "first_order_polca"
RANDOM_POLCA = "random_basis"  # POLCA along the random basis: the null beside POLCA
POLCA_PROFILE = "polca_profile"
RANDOM_PROFILE = "random_profile"
POLCA_GRADIENTS = "polca_gradients"
RANDOM_GRADIENTS = "random_gradients"
GRADIENT_NORMS = "gradient_norms"
RANDOM_SNAPSHOT = "random_snapshot"

VARIANTS: list[Variant] = [
    Variant(EXACT_LOSS, "Exact loss", MAIN_BASIS, "loss", "main"),
    Variant("loss_change", "Change in exact loss", MAIN_BASIS, "loss_change", "baseline", in_nulls=False),
    Variant("fisher", "Fisher information", MAIN_BASIS, "fisher", "baseline", in_nulls=False),
    Variant("lca", "LCA (parameter axes)", "parameter_axes", "first_order", "ablation", in_nulls=False),
    Variant(FIRST_ORDER_POLCA, "First-order POLCA", MAIN_BASIS, "first_order", "baseline"),
    Variant(POLCA, "POLCA", MAIN_BASIS, "projected_loss", "main", random_twin=RANDOM_POLCA),
    Variant(RANDOM_POLCA, "Random orthonormal basis", RANDOM_BASIS, "projected_loss", "ablation"),
    Variant("shuffled_hessian", "Random shuffled Hessian", "shuffled_hessian", "projected_loss", "ablation"),
    Variant(POLCA_PROFILE, "POLCA, allocation profiles", MAIN_BASIS, "profile", "baseline",
            random_twin=RANDOM_PROFILE),
    Variant(RANDOM_PROFILE, "Random basis, allocation profiles", RANDOM_BASIS, "profile", "ablation"),
    Variant("covariance_basis", "Scaled gradient covariance basis", "scaled_gradient_covariance", "projected_loss",
            "ablation"),
    Variant("covariance_profile", "Scaled gradient covariance, allocation profiles", "scaled_gradient_covariance",
            "profile", "ablation"),
    Variant(POLCA_GRADIENTS, "POLCA, projected-gradient trajectories", MAIN_BASIS, "gradients", "baseline",
            random_twin=RANDOM_GRADIENTS),
    Variant(RANDOM_GRADIENTS, "Random basis, projected-gradient trajectories", RANDOM_BASIS, "gradients",
            "ablation"),
    Variant("covariance_gradients", "Scaled gradient covariance, projected-gradient trajectories",
            "scaled_gradient_covariance", "gradients", "ablation"),
    Variant("unscaled_covariance_basis", "Unscaled gradient covariance basis", "gradient_covariance",
            "projected_loss", "ablation"),
    Variant("unscaled_covariance_gradients", "Unscaled gradient covariance, projected-gradient trajectories",
            "gradient_covariance", "gradients", "ablation"),
    Variant("preconditioned_basis", "Preconditioned Hessian basis", "preconditioned_hessian", "projected_loss",
            "ablation"),
    Variant("preconditioned_profile", "Preconditioned Hessian, allocation profiles", "preconditioned_hessian",
            "profile", "ablation"),
    Variant("preconditioned_gradients", "Preconditioned Hessian, projected-gradient trajectories",
            "preconditioned_hessian", "gradients", "ablation"),
    Variant(GRADIENT_NORMS, "Control: gradient norm per parameter block", MAIN_BASIS, "gradient_norms", "control"),
    Variant(RANDOM_SNAPSHOT, "Control: random projected gradients at one checkpoint", RANDOM_BASIS,
            "checkpoint_gradients", "control"),
]  # the report's order
BUILTIN_VARIANTS = tuple(v.name for v in VARIANTS)


def register_basis(kind: BasisKind, *strategies: Variant) -> None:
    """Add a basis of one's own, and the strategies that cluster along it, so that a config may name it.

    Call it at import of the file that defines the task (the CLI imports that file before it reads a config). A
    config then names the basis in ``ablation_bases``, and it is built, decomposed, clustered, scored against the
    nulls, reported and planned like the built-in ones (it joins ``BASES``, its strategies ``VARIANTS``);
    ``examples/training_step_basis.py`` shows one in a single file. Registering a name again replaces the earlier
    registration, its strategies included (a file imported twice).

    Args:
      kind: the basis (:class:`BasisKind`); ``kind.name`` is what ``ablation_bases`` names.
      *strategies: the strategies along it, each ``Variant(..., basis=kind.name, group="ablation")``.

    Raises:
      PolcaError: ``kind.name`` is a built-in basis' name, a strategy clusters along another basis or in another
        group than ``"ablation"``, or a strategy has a built-in strategy's name.

    Example:
      >>> import jax
      >>> import polca_jax as pj
      >>> from polca_jax.pipeline import (BASES, VARIANTS, BasisKind, Variant, load_task_definition, make_config,
      ...                                 register_basis)
      >>> def my_basis(inputs):  # BasisInputs -> Basis: here random directions, as many as Algorithm 1's
      ...     return pj.random_basis(inputs.task.init_params, inputs.size, jax.random.fold_in(inputs.key, 7))
      >>> register_basis(BasisKind("mine", "My basis", my_basis),
      ...                Variant("mine", "POLCA along my basis", "mine", "projected_loss", "ablation"))
      >>> config = make_config(load_task_definition("planted"), "planted", "tiny", {"ablation_bases": "random,mine"})
      >>> config.ablation_base_names
      ('random', 'mine')
      >>> del BASES["mine"]; VARIANTS[:] = [v for v in VARIANTS if v.basis != "mine"]  # undone, for this example
    """
    if kind.name in BUILTIN_BASES:
        raise PolcaError(f"{kind.name!r} is a built-in basis; choose another name for yours")
    for strategy in strategies:
        if strategy.basis != kind.name or strategy.group != "ablation":
            raise PolcaError(f"strategy {strategy.name!r} must cluster along the basis it is registered with "
                             f"({kind.name!r}) in the group 'ablation', got basis {strategy.basis!r}, group "
                             f"{strategy.group!r}")
        if strategy.name in BUILTIN_VARIANTS:
            raise PolcaError(f"{strategy.name!r} is a built-in strategy; choose another name for yours")
    VARIANTS[:] = [v for v in VARIANTS if v.basis != kind.name and v.name not in {s.name for s in strategies}]
    VARIANTS.extend(strategies)
    BASES[kind.name] = kind


def bases_of(config) -> tuple[str, ...]:
    """The bases a config builds and decomposes along: the Hessian basis and the ablations' ones."""
    return (MAIN_BASIS, *config.ablation_base_names)


def variants_of(config) -> tuple[Variant, ...]:
    """The strategies a config runs."""
    enabled = {"main": True, "baseline": config.baselines, "ablation": config.ablations, "control": True}
    return tuple(v for v in VARIANTS if enabled[v.group] and v.basis in bases_of(config))


def variant_trajectories(result: pj.POLCAResult, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The trajectories a strategy clusters, ``[T, N, K]`` or ``[T, N]``, and their steps ``[T]``.

    Args:
      result: a POLCA result (:class:`polca_jax.POLCAResult`) of T checkpoints, N samples and K directions.
      kind: a strategy's trajectory (``Variant.trajectory``): ``loss`` (exact loss), ``loss_change`` (its change
        per interval), ``fisher`` (⟨b, ∇L(x)⟩²), ``first_order`` (cumulative first-order POLCA),
        ``projected_loss`` (POLCA, Eq. 8), ``profile`` (clustered on the allocation profiles of the projected
        loss), ``gradients`` (clustered on each sample's projected gradients over the last checkpoints),
        ``gradient_norms`` (clustered on each sample's gradient norm per parameter block at one checkpoint, the
        decompose stage's ``controls/``) or ``checkpoint_gradients`` (clustered on each sample's projected gradient
        at that checkpoint); the clusters of the last four have their breakthroughs and medoids read on the exact
        loss, which is what they return here.

    Returns:
      ``(trajectories, steps)``: the exact loss ``[T, N]`` for ``loss``, ``profile``, ``gradients``,
      ``gradient_norms`` and ``checkpoint_gradients``; ``[T - 1, N]`` and the steps from the second checkpoint on for ``loss_change``;
      ``[T, N, K]`` for ``fisher``, ``first_order`` and ``projected_loss``.

    Raises:
      PolcaError: ``kind`` is not one of those.

    Example:
      ``out``: the run directory of :func:`polca_jax.pipeline.run`'s example (9 checkpoints, 160 samples, 1
      direction).

      >>> import polca_jax as pj
      >>> from polca_jax.pipeline import variant_trajectories
      >>> result = pj.POLCAResult.load(out / "polca" / "hessian")
      >>> trajectories, steps = variant_trajectories(result, "projected_loss")
      >>> trajectories.shape, steps.tolist()
      ((9, 160, 1), [0, 5, 10, 15, 20, 25, 30, 35, 40])
      >>> changes, steps = variant_trajectories(result, "loss_change")
      >>> changes.shape, steps.tolist()
      ((8, 160), [5, 10, 15, 20, 25, 30, 35, 40])
    """
    if kind in ("loss",) + JOINT_KINDS:
        return np.asarray(result.loss), result.steps
    if kind == "loss_change":
        return result.loss_change, result.steps[1:]
    if kind == "fisher":
        return np.asarray(result.projections) ** 2, result.steps
    if kind == "first_order":
        return result.projected_loss_with("none"), result.steps
    if kind == "projected_loss":
        return result.projected_loss, result.steps
    raise PolcaError(f"unknown trajectory kind {kind!r}; choose from {TRAJECTORY_KINDS}")
