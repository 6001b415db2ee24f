"""The configuration of one run: the task and its options, and the pipeline's settings (training, checkpoints,
Algorithm 1, decomposition, clustering, breakthroughs, baselines).

The pipeline's settings fall into the sections of :data:`SECTIONS` (training, basis, decompose, cluster, score), and
a setting may be named with its section or without: ``--set basis.lanczos_iters=30`` or ``--set lanczos_iters=30``,
``{"basis": {"lanczos_iters": 30}}`` or ``{"lanczos_iters": 30}`` in Python (:func:`flat_settings`); the task
factory's options are the section ``task`` (``--set task.d_model=64`` or ``--set d_model=64``). Setting names are
unique across sections, so :class:`RunConfig` and ``config.json`` keep them flat and every run directory written
before the sections existed resumes as it is. A run directory holds exactly one config (``config.json``), with
every task option written out, defaults included.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from typing import Any, Mapping

from polca_jax import SecondOrder
from polca_jax.analysis import CLUSTERERS, NORMALIZATIONS, ROTATIONS
from polca_jax.errors import PolcaError
from polca_jax.pipeline._registry import ablation_basis_names, basis_kind
from polca_jax.pipeline._task import TaskDefinition

PROJECTION_METHODS = ("auto", "reverse", "forward")
GRADIENT_DIRECTIONS = ("joint", "each", "subspace")
NOT_SETTABLE = ("task", "preset", "task_options")
TASK_SECTION = "task"
SECTIONS = {
    "training": ("checkpoints", "learning_rate", "num_steps", "weight_decay", "b1", "b2", "warmup_steps",
                 "metrics_every", "seed"),
    "basis": ("basis_every", "basis_until", "k_per_checkpoint", "lanczos_iters", "ablations", "ablation_bases",
              "lca_axes"),
    "decompose": ("polca_every", "polca_until", "second_order", "projection_method", "chunk_size"),
    "cluster": ("min_cluster_size", "min_samples_divisor", "reference_num_samples", "normalize", "profile_clusterer",
                "gradient_window", "gradient_increments", "gradient_rotation", "gradient_directions", "baselines"),
    "score": ("window_steps", "threshold_step", "null_permutations", "breakthrough_shuffles", "significance"),
}
"""The pipeline's settings by section: section -> the names of its fields of :class:`RunConfig` (each in one)."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run: ``config.json`` of its run directory.

    ``window_steps`` (Δ of Eq. 9) and ``threshold_step`` (τ of Eq. 10) may be None: Δ is then 5 POLCA intervals
    (the paper's 100 steps at its 20-step interval) and τ the first checkpoint at which the mean exact loss of the
    evaluation samples has made 90% of its fall, i.e. where the loss curve flattens (the paper's reading of τ).
    Every field but the first three is a setting that presets and ``--set`` write (:func:`make_config`).

    Attributes:
      task: a built-in task, ``/absolute/path/to/file.py:factory`` or ``module:factory``.
      preset: the preset the run started from (None: none).
      task_options: the task factory's options, every one written out (defaults included).
      checkpoints: an existing orbax checkpoint directory to read instead of training (None: train).
      learning_rate: AdamW's peak rate, reached by ``lr · min(i / warmup_steps, 1)`` (:func:`adamw_paper`).
      num_steps: training steps (updates).
      weight_decay: AdamW's decoupled weight decay.
      b1: Adam's first-moment decay.
      b2: Adam's second-moment decay.
      warmup_steps: the linear warm-up's length (0: a constant rate).
      polca_every: the interval of the POLCA checkpoints 0, polca_every, ..., polca_until.
      polca_until: the last POLCA checkpoint, a multiple of ``polca_every`` (None: ``num_steps``).
      basis_every: the interval of Algorithm 1's checkpoints basis_every, 2·basis_every, ... <= basis_until.
      basis_until: the last step a basis checkpoint may lie at (None: ``num_steps``).
      k_per_checkpoint: Algorithm 1's directions per basis checkpoint.
      lanczos_iters: Lanczos iterations (Hessian-vector products) per basis checkpoint.
      second_order: the decomposition's second-order rule (:class:`polca_jax.SecondOrder` kind: ``"paper"``,
        ``"trapezoid"``, ``"exact"`` or ``"none"``).
      projection_method: ``"auto"``, ``"reverse"`` or ``"forward"`` (:func:`polca_jax.polca`'s ``method``).
      chunk_size: sequences per chunk of the per-sample kernels (None: the kernels' default).
      min_cluster_size: HDBSCAN's smallest cluster (for ``reference_num_samples`` samples when that is set).
      min_samples_divisor: HDBSCAN's min_samples = samples clustered / this.
      reference_num_samples: the sample count ``min_cluster_size`` was tuned for; it is scaled by N / this (None:
        used as given).
      normalize: how trajectories are normalized before clustering: None, ``"unit"`` or ``"standardize"``.
      profile_clusterer: the clusterer of the allocation profiles, the projected-gradient trajectories and the
        control: ``"hdbscan"``, ``"kmeans"``, ``"gmm"`` or ``"agglomerative"``.
      gradient_window: the last fraction of the POLCA checkpoints the projected-gradient strategies read, in (0, 1].
      gradient_increments: those strategies cluster the changes of the projected gradients between successive
        checkpoints of the window instead of their values.
      gradient_rotation: new directions within the basis' span before they cluster
        (:func:`polca_jax.analysis.rotate_within_span`): ``"none"``, ``"varimax"`` or ``"ica"``.
      gradient_directions: ``"joint"`` (one clustering of all directions' trajectories together), ``"each"``
        (one clustering per direction, as the paper's step clusters the projected loss) or ``"subspace"`` (one
        clustering of which directions each sample's gradients move in together, whatever their signs:
        :func:`polca_jax.analysis.subspace_features`).
      window_steps: Δ of Eq. 9 in steps (None: 5 × ``polca_every``).
      threshold_step: τ of Eq. 10 (None: chosen from the loss curve, as above).
      baselines: run the ``"baseline"`` strategies (change in exact loss, Fisher, first-order POLCA, allocation
        profiles, projected gradients).
      ablations: run the ``"ablation"`` strategies, along the bases of ``ablation_bases``.
      ablation_bases: the ablations' bases, names of registered bases (``BASES``): a tuple (a list in
        ``config.json``), or one comma-separated text as ``--set`` gives it.
      null_permutations: label permutations per homogeneity test.
      breakthrough_shuffles: shuffles per hidden-breakthrough test.
      significance: the level both nulls are judged at, in (0, 1).
      lca_axes: directions of LCA's ``parameter_axes`` basis (the largest parameters).
      seed: the run's seed (the task factory's ``seed``, the bases' and the clusterers' keys).
      metrics_every: the interval of the training log's records (``metrics.jsonl``).

    Raises:
      PolcaError: a setting out of its range or of the wrong type, steps that do not fit together (``num_steps``
        not a multiple of ``polca_every``, no basis checkpoint, Δ too wide for the POLCA checkpoints, ...), or
        ``ablation_bases`` naming an unregistered basis; the message names the setting.

    Example:
      >>> from polca_jax.pipeline import RunConfig
      >>> config = RunConfig(task="planted", preset=None, task_options={}, num_steps=200, polca_every=5,
      ...                    basis_every=40)
      >>> config.polca_steps[:3], config.basis_steps, config.window
      ([0, 5, 10], [40, 80, 120, 160, 200], 25)
      >>> config.ablation_base_names
      ('shuffled_hessian', 'random', 'parameter_axes')
      >>> config.sections()["basis"]["lanczos_iters"], config.sections()["decompose"]["polca_every"]
      (20, 5)
    """

    task: str  # a built-in task, path/to/file.py:factory or module:factory
    preset: str | None
    task_options: Mapping[str, Any]
    checkpoints: str | None = None  # an existing orbax checkpoint directory: no training
    # training (AdamW, lr · min(i / warmup, 1))
    learning_rate: float = 1e-3
    num_steps: int = 1000
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    warmup_steps: int = 100
    # checkpoints: POLCA at 0, polca_every, ..., num_steps; Algorithm 1 at basis_every, 2·basis_every, ..., basis_until
    polca_every: int = 10
    polca_until: int | None = None  # last POLCA checkpoint (default num_steps)
    basis_every: int = 100
    basis_until: int | None = None
    k_per_checkpoint: int = 1
    lanczos_iters: int = 20
    # decomposition
    second_order: str = "paper"
    projection_method: str = "auto"
    chunk_size: int | None = None  # sequences per chunk of the per-sample kernels (None: the kernels' default)
    # clustering: HDBSCAN per direction; min_cluster_size scaled by N / reference_num_samples, min_samples = n / divisor
    min_cluster_size: int = 150
    min_samples_divisor: float = 15.0
    reference_num_samples: int | None = 5000
    normalize: str | None = None
    profile_clusterer: str = "gmm"  # the allocation-profile strategy's clusterer: hdbscan, kmeans, gmm, agglomerative
    gradient_window: float = 0.25  # the projected-gradient strategies read the last fraction of the POLCA checkpoints
    gradient_increments: bool = False  # ... and cluster their values (False) or their changes between checkpoints
    gradient_rotation: str = "none"  # ... along the basis (none) or new directions in its span: varimax, ica
    gradient_directions: str = "joint"  # ... all directions' values (joint), one per direction (each), or subspace
    # breakthroughs (Eqs. 9-10)
    window_steps: int | None = None
    threshold_step: int | None = None
    # baselines (change in exact loss, Fisher, first-order POLCA) and ablations (LCA, random and shuffled bases)
    baselines: bool = True
    ablations: bool = True
    ablation_bases: tuple[str, ...] = ("shuffled_hessian", "random", "parameter_axes")  # the ablations' bases
    # nulls: label permutations per homogeneity test, shuffles per breakthrough test, the level both are judged at
    null_permutations: int = 1000
    breakthrough_shuffles: int = 200
    significance: float = 0.05
    lca_axes: int = 50
    seed: int = 0
    metrics_every: int = 50

    def __post_init__(self):
        object.__setattr__(self, "task_options", dict(self.task_options))
        object.__setattr__(self, "ablation_bases", _basis_names(self.ablation_bases))
        for name in ("num_steps", "polca_every", "basis_every", "k_per_checkpoint", "lanczos_iters",
                     "min_cluster_size", "lca_axes", "metrics_every", "null_permutations", "breakthrough_shuffles"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("warmup_steps", "seed"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("basis_until", "polca_until", "window_steps", "threshold_step", "reference_num_samples",
                     "chunk_size"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1, optional=True)
        for name in ("learning_rate", "min_samples_divisor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and
                                                                                     value > 0):
                raise PolcaError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("weight_decay", "b1", "b2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and
                                                                                     value >= 0):
                raise PolcaError(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(self.significance, bool) or not isinstance(self.significance, int | float) or not (
                0 < self.significance < 1):
            raise PolcaError(f"significance must lie strictly between 0 and 1, got {self.significance!r}")
        for name in ("baselines", "ablations", "gradient_increments"):
            if not isinstance(getattr(self, name), bool):
                raise PolcaError(f"{name} must be true or false, got {getattr(self, name)!r}")
        SecondOrder(self.second_order)  # refuses an unknown rule, naming the choices
        if self.projection_method not in PROJECTION_METHODS:
            raise PolcaError(f"projection_method must be one of {PROJECTION_METHODS}, got {self.projection_method!r}")
        if isinstance(self.gradient_window, bool) or not isinstance(self.gradient_window, int | float) or not (
                0 < self.gradient_window <= 1):
            raise PolcaError(f"gradient_window must be a fraction in (0, 1], got {self.gradient_window!r}")
        if self.gradient_rotation not in ROTATIONS:
            raise PolcaError(f"gradient_rotation must be one of {ROTATIONS}, got {self.gradient_rotation!r}")
        if self.gradient_directions not in GRADIENT_DIRECTIONS:
            raise PolcaError(f"gradient_directions must be one of {GRADIENT_DIRECTIONS}, got "
                             f"{self.gradient_directions!r}")
        if self.profile_clusterer not in CLUSTERERS:
            raise PolcaError(f"profile_clusterer must be one of {CLUSTERERS}, got {self.profile_clusterer!r}")
        if self.normalize not in NORMALIZATIONS:
            raise PolcaError(f"normalize must be None, 'unit' or 'standardize', got {self.normalize!r}")
        if self.num_steps % self.polca_every:
            raise PolcaError(f"num_steps ({self.num_steps}) must be a multiple of polca_every ({self.polca_every})")
        if self.polca_until is not None and (self.polca_until > self.num_steps or self.polca_until % self.polca_every
                                             or self.polca_until < 2 * self.polca_every):
            raise PolcaError(f"polca_until must be a multiple of polca_every ({self.polca_every}) in "
                             f"[{2 * self.polca_every}, num_steps={self.num_steps}], got {self.polca_until}")
        unknown = sorted(set(self.ablation_bases) - set(ablation_basis_names()))
        if unknown:
            raise PolcaError(f"ablation_bases must name registered bases among {', '.join(ablation_basis_names())} "
                             f"(a list, or comma-separated), got {list(self.ablation_bases)}; a basis of your own "
                             "is registered by the file that defines it (polca_jax.pipeline.register_basis): name "
                             "that file's task (path/to/file.py:factory) so that it is imported first")
        if self.basis_until is not None and self.basis_until > self.num_steps:
            raise PolcaError(f"basis_until must lie in [1, num_steps={self.num_steps}], got {self.basis_until}")
        if not self.basis_steps:
            raise PolcaError(f"no basis checkpoint: basis_every={self.basis_every} exceeds "
                             f"{'basis_until' if self.basis_until is not None else 'num_steps'}="
                             f"{self.basis_until or self.num_steps}")
        if self.window_steps is not None and 2 * self.window_steps >= self.num_steps:
            raise PolcaError(f"window_steps (Δ = {self.window_steps}) must be less than half of num_steps "
                             f"({self.num_steps}): Eq. 9 needs t - Δ and t + Δ inside training")
        check_breakthrough_window(self)

    @property
    def polca_steps(self) -> list[int]:
        """Steps of the POLCA checkpoints: 0, polca_every, ..., polca_until (default num_steps)."""
        until = self.num_steps if self.polca_until is None else self.polca_until
        return list(range(0, until + 1, self.polca_every))

    @property
    def ablation_base_names(self) -> tuple[str, ...]:
        """The bases of the ablations (none without ``ablations``)."""
        return self.ablation_bases if self.ablations else ()

    @property
    def basis_steps(self) -> list[int]:
        """Steps of the Algorithm 1 checkpoints: basis_every, 2·basis_every, ... <= basis_until (default num_steps)."""
        until = self.num_steps if self.basis_until is None else self.basis_until
        return list(range(self.basis_every, until + 1, self.basis_every))

    @property
    def checkpoint_steps(self) -> list[int]:
        """Every step a run needs a checkpoint at: the POLCA and the basis steps, and the last step."""
        return sorted(set(self.polca_steps) | set(self.basis_steps) | {self.num_steps})

    def second_order_for(self, basis: str) -> SecondOrder:
        """The rule the decompose stage uses along ``basis`` (its :class:`BasisKind`'s curvature): none for LCA's
        parameter axes; ``second_order`` for the others, the paper's with the eigenvalues stored with Algorithm 1's
        vectors, or with the current curvature along a basis that has none (the random one)."""
        return basis_kind(basis).second_order(self.second_order)

    @property
    def window(self) -> int:
        """Δ of Eq. 9 in steps: ``window_steps``, or 5 POLCA intervals."""
        return self.window_steps if self.window_steps is not None else 5 * self.polca_every

    def sections(self) -> dict[str, dict[str, Any]]:
        """The settings by section (:data:`SECTIONS`), the task's options as the section ``task``."""
        return {TASK_SECTION: dict(self.task_options),
                **{section: {name: getattr(self, name) for name in names} for section, names in SECTIONS.items()}}

    def to_dict(self) -> dict[str, Any]:
        """Every field, as ``config.json`` stores it (:meth:`from_dict` reads it back)."""
        return dataclasses.asdict(self)

    def settings(self) -> dict[str, Any]:
        """The flat ``key -> value`` view (pipeline fields and task options) that presets and ``--set`` write."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in NOT_SETTABLE}
        return {**flat, **self.task_options}

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any], source: str) -> "RunConfig":
        """The config stored in ``source`` (a file name, for error messages)."""
        if not isinstance(saved, Mapping):
            raise PolcaError(f"{source} does not hold a config object")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(saved) - fields)
        missing = sorted({"task", "preset", "task_options"} - set(saved))
        if unknown or missing:
            raise PolcaError(f"{source} is not a polca run config (unknown keys {unknown}, missing {missing}); it "
                             "may come from an older version of polca_jax: start a new run directory")
        return cls(**saved)


def check_breakthrough_window(config: RunConfig) -> None:
    """Raise ``PolcaError`` unless Eq. 9 can be evaluated on the config's POLCA checkpoints: some checkpoint t has
    t − Δ and t + Δ inside them (Δ = ``config.window``, by default 5 × polca_every), and τ (``threshold_step``,
    when set) lies inside them. Checked when the config is made and again by the score stage."""
    steps = config.polca_steps
    first, last = steps[0], steps[-1]
    widest = max(min(t - first, last - t) for t in steps)  # the largest Δ some checkpoint fits
    if config.window > widest:
        origin = ("window_steps" if config.window_steps is not None
                  else f"the default, 5 × polca_every={config.polca_every}")
        raise PolcaError(
            f"the breakthrough window Δ = {config.window} steps ({origin}) is too wide for the {len(steps)} POLCA "
            f"checkpoints at steps {first}..{last}: Eq. 9 needs a checkpoint t with t − Δ and t + Δ among them, so "
            f"Δ can be at most {widest}; " + (f"--set window_steps={widest}, or " if widest >= 1 else "")
            + "more POLCA checkpoints (a smaller polca_every, a larger num_steps or polca_until)")
    if config.threshold_step is not None and not first <= config.threshold_step <= last:
        raise PolcaError(f"threshold_step (τ = {config.threshold_step}) must lie within the POLCA steps "
                         f"{first}..{last}: Eq. 10 compares breakthrough steps with it")


PIPELINE_KEYS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in NOT_SETTABLE)
SECTION_OF = {name: section for section, names in SECTIONS.items() for name in names}


def flat_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as flat keys, whichever way each is named: ``key``, ``section.key`` or ``{section: {key: value}}``.

    Args:
      settings: ``name -> value``; a name is a setting (``lanczos_iters``), a setting with its section
        (``basis.lanczos_iters``, a section of ``SECTIONS``; ``task.NAME`` for a task option) or a section whose
        value maps its settings.

    Returns:
      ``key -> value`` with flat keys (a key that names no setting is left for :func:`make_config` to refuse).

    Raises:
      PolcaError: an unknown section, a setting named under a section that does not hold it (the message names the
        one that does), or one setting given twice.

    Example:
      >>> from polca_jax.pipeline import flat_settings
      >>> flat_settings({"basis": {"lanczos_iters": 30}, "decompose.polca_every": 5, "task.width": 8, "seed": 1})
      {'lanczos_iters': 30, 'polca_every': 5, 'width': 8, 'seed': 1}
    """
    flat: dict[str, Any] = {}
    for name, value in settings.items():
        if (name in SECTIONS or name == TASK_SECTION) and isinstance(value, Mapping):
            named = [(f"{name}.{key}", inner) for key, inner in value.items()]
        else:
            named = [(name, value)]
        for full_name, inner in named:
            key = _flat_key(full_name)
            if key in flat:
                raise PolcaError(f"setting {key!r} is given twice (as {full_name!r} and before)")
            flat[key] = inner
    return flat


def _flat_key(name: str) -> str:
    section, dot, key = name.partition(".")
    if not dot:
        return name
    if section == TASK_SECTION:
        if key in SECTION_OF:
            raise PolcaError(f"{name!r}: {key!r} is a pipeline setting, not a task option: {SECTION_OF[key]}.{key}")
        return key
    if section not in SECTIONS:
        raise PolcaError(f"{name!r}: unknown section {section!r}; the sections are "
                         f"{', '.join([*SECTIONS, TASK_SECTION])} (or name the setting alone: {key})")
    if key not in SECTIONS[section]:
        where = f"it is {SECTION_OF[key]}.{key}" if key in SECTION_OF else f"the {section} settings are " + ", ".join(
            SECTIONS[section])
        raise PolcaError(f"{name!r}: {key!r} is not a {section} setting; {where}")
    return key


def make_config(definition: TaskDefinition, task: str, preset: str | None = None,
                overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """The config of a new run: ``preset`` (default: the definition's) with ``overrides`` (key -> value) on top.

    Args:
      definition: the task's definition (:func:`load_task_definition`).
      task: the task's reference as the config stores it (a built-in name, ``/absolute/path/file.py:factory`` or
        ``module:factory``), also named in messages.
      preset: one of ``definition.presets``; None: ``definition.default_preset`` (if that is None too, the
        defaults of the factory and the pipeline).
      overrides: ``key -> value`` on top of the preset's settings: pipeline settings (fields of
        :class:`RunConfig`) and task options (the factory's keyword parameters); :func:`parse_overrides` makes
        them from ``--set`` text.

    Returns:
      The validated :class:`RunConfig`, with every task option written out (defaults included).

    Raises:
      PolcaError: an unknown preset or setting, a task option without a default that nothing sets, a task option
        named like a pipeline setting, ``task``, ``preset`` or ``task_options`` given as a setting, or a value
        :class:`RunConfig` refuses.

    Example:
      >>> from polca_jax.pipeline import load_task_definition, make_config
      >>> config = make_config(load_task_definition("planted"), "planted", "tiny", {"num_steps": 400})
      >>> config.preset, config.num_steps, config.basis_every, config.task_options["width"]
      ('tiny', 400, 40, 8)
    """
    preset = definition.default_preset if preset is None else preset
    if preset is not None and preset not in definition.presets:
        choices = sorted(definition.presets) or ["none: this task has no presets"]
        raise PolcaError(f"unknown preset {preset!r} for task {task}; choose one of {choices}")
    settings = {**flat_settings(definition.presets.get(preset, {}) if preset else {}),
                **flat_settings(overrides or {})}
    return _config_from_settings(definition, task, preset, settings)


def apply_overrides(definition: TaskDefinition, config: RunConfig, overrides: Mapping[str, Any]) -> RunConfig:
    """``config`` with ``overrides`` (key -> value) applied to its own settings, not to a preset's."""
    settings = {**config.settings(), **flat_settings(overrides)}
    return _config_from_settings(definition, config.task, config.preset, settings)


def parse_overrides(definition: TaskDefinition, assignments: list[str]) -> dict[str, Any]:
    """``["learning_rate=1e-3", "d_model=64", ...]`` (as ``--set`` gives them) -> ``key -> value``, typed.

    Args:
      definition: the task's definition: its factory's keyword parameters are the task options.
      assignments: ``"KEY=VALUE"`` texts, KEY a pipeline setting (a field of :class:`RunConfig`) or a task option.

    Returns:
      ``key -> value``, each coerced to its key's type (a setting's annotation; a task option's annotation, else
      its default's type, else ``str``): ``none`` -> None where the type allows None, ``true``/``false`` for
      booleans.

    Raises:
      PolcaError: an assignment without ``=``, an unknown key, ``task``, ``preset`` or ``task_options`` as a key,
        or a value that is not of its key's type.

    Example:
      >>> from polca_jax.pipeline import load_task_definition, parse_overrides
      >>> planted = load_task_definition("planted")
      >>> parse_overrides(planted, ["learning_rate=1e-3", "width=16", "ablations=false", "window_steps=none"])
      {'learning_rate': 0.001, 'width': 16, 'ablations': False, 'window_steps': None}
    """
    types = {f.name: f.type for f in dataclasses.fields(RunConfig) if f.name not in NOT_SETTABLE}
    for name, parameter in definition.options().items():
        types[name] = _parameter_type(parameter)
    overrides = {}
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        try:
            key = _flat_key(name)
        except PolcaError as error:
            raise PolcaError(f"--set {assignment}: {error}") from None
        if key in NOT_SETTABLE:
            raise PolcaError(f"--set {assignment}: {key!r} is not a setting; "
                             + ("use --preset NAME" if key == "preset" else "name the task on the command line"))
        if not sep or key not in types:
            raise PolcaError(f"bad --set {assignment!r}: expected KEY=VALUE with KEY one of the pipeline settings "
                             f"{sorted(PIPELINE_KEYS)} or the task options {sorted(definition.options())} (each "
                             "may be named with its section, e.g. basis.lanczos_iters or task.NAME)")
        overrides[key] = _coerce(key, text, types[key])
    return overrides


def config_differences(saved: RunConfig, new: RunConfig) -> list[str]:
    """``"key: saved on disk vs new"`` for every setting that differs."""
    a, b = {**saved.settings(), "task": saved.task}, {**new.settings(), "task": new.task}
    return [f"{key}: {a.get(key)!r} on disk vs {b.get(key)!r}" for key in sorted(set(a) | set(b))
            if a.get(key) != b.get(key)]


def _config_from_settings(definition: TaskDefinition, task: str, preset: str | None,
                          settings: Mapping[str, Any]) -> RunConfig:
    options = definition.options()
    clashes = sorted(set(options) & set(PIPELINE_KEYS))
    if clashes:
        raise PolcaError(f"the task factory {definition.name} has options named like pipeline settings {clashes}; "
                         "rename them")
    for key in NOT_SETTABLE:
        if key in settings:
            raise PolcaError(f"{key!r} cannot be set as a setting (use --preset, or name the task)")
    unknown = sorted(set(settings) - set(options) - set(PIPELINE_KEYS))
    if unknown:
        raise PolcaError(f"unknown setting(s) {unknown} for task {task}: the pipeline settings are "
                         f"{sorted(PIPELINE_KEYS)} and the task options {sorted(options)}")
    task_options = {}
    for name, parameter in options.items():
        if name in settings:
            task_options[name] = settings[name]
        elif parameter.default is not inspect.Parameter.empty:
            task_options[name] = parameter.default
        else:
            raise PolcaError(f"task option {name!r} of {task} has no default and no preset sets it: "
                             f"--set {name}=VALUE")
    pipeline = {key: value for key, value in settings.items() if key in PIPELINE_KEYS}
    return RunConfig(task=task, preset=preset, task_options=task_options, **pipeline)


def _basis_names(value) -> tuple[str, ...]:
    """``ablation_bases`` as a tuple of names: from a tuple or list, or from comma-separated text."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not all(isinstance(name, str) for name in names):
        raise PolcaError(f"ablation_bases must be a list of basis names (or comma-separated text), got {value!r}")
    return tuple(name.strip() for name in names if name.strip())


def _parameter_type(parameter: inspect.Parameter) -> str:
    """A factory parameter's type as text (its annotation, else its default's type)."""
    annotation = parameter.annotation
    if annotation is not inspect.Parameter.empty:
        return annotation if isinstance(annotation, str) else _type_name(annotation)
    if parameter.default is not inspect.Parameter.empty and parameter.default is not None:
        return type(parameter.default).__name__
    return "str"


def _type_name(annotation) -> str:
    args = typing.get_args(annotation)
    if args:
        return " | ".join(_type_name(arg) for arg in args)
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _coerce(key: str, text: str, type_name) -> Any:
    type_name = type_name if isinstance(type_name, str) else _type_name(type_name)
    if text.lower() == "none" and "None" in type_name:
        return None
    try:
        if type_name.startswith("bool"):
            if text.lower() not in ("true", "false"):
                raise PolcaError(text)
            return text.lower() == "true"
        if type_name.startswith("int"):
            return int(text)
        if type_name.startswith("float"):
            return float(text)
    except ValueError:
        raise PolcaError(f"--set {key}={text}: expected {type_name.split(' |')[0]}") from None
    return text


def _check_int(name: str, value, *, minimum: int, optional: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "None or an integer" if optional else "an integer"
        raise PolcaError(f"{name} must be {kind} >= {minimum}, got {value!r}")
