"""What a user supplies to run POLCA on their own problem: a :class:`Task`, built by a factory from options.

A *task* is everything the pipeline needs and nothing more: the parameters at step 0, a per-sample loss, the
evaluation and Hessian samples, training batches (or none, when the run brings its own checkpoints), and optionally
named categorical label sets and a short text per evaluation sample for the report.

A *task definition* is a factory ``(**options) -> Task`` with presets of options, made with :func:`task_factory`;
``polca run path/to/file.py:factory`` or ``polca run module:factory`` loads one (:func:`load_task_definition`). Two
factory parameters are reserved and filled by the pipeline when the factory declares them: ``seed`` (the run's seed)
and ``workdir`` (the run directory, for files the task wants to keep, such as a trained tokenizer).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from polca_jax.checks import batch_size, check_loss_dtype
from polca_jax.errors import PolcaError

PyTree = Any
RESERVED_OPTIONS = ("seed", "workdir")
BUILTIN_TASKS = {
    "arithmetic": "experiments.arithmetic:make_task",
    "english": "experiments.english:make_task",
    "planted": "polca_jax.pipeline.tasks.planted:make_task",
    "planted-entangled": "polca_jax.pipeline.tasks.planted:make_entangled_task",
}


HUGGING_FACE = "hf:"  # polca run hf:PATH_OR_REPO: a Hugging Face model's checkpoints (experiments/huggingface)
EXPERIMENTS_PACKAGE = "experiments"
"""The package of the paper's experiments in a clone of the repository (not installed with polca_jax)."""


@dataclasses.dataclass(frozen=True)
class Qualifier:
    """Which clusters count for a label set (:attr:`LabelSet.qualifier`): a rule on another label set.

    A cluster counts for the label set only when more than ``min_fraction`` of its members of the label set's
    positive (scored) class have a class in ``classes`` of the label set ``label_set``. The paper's arithmetic rule:
    a carry cluster counts only when more than 85% of its carry tokens are in the 10s or 100s place
    (``Qualifier("place", (1, 2), 0.85)``). Per-sample baselines (exact loss and its change) are scored without it,
    as in the paper.

    Attributes:
      label_set: the name of the other label set of the task whose classes qualify.
      classes: those of its classes that qualify.
      min_fraction: the share of the scored class's members in the cluster that must qualify (strictly more).

    Example:
      >>> from polca_jax.pipeline import Qualifier
      >>> Qualifier("place", (1, 2), 0.85).to_dict()
      {'label_set': 'place', 'classes': [1, 2], 'min_fraction': 0.85}
    """

    label_set: str
    classes: tuple
    min_fraction: float

    def to_dict(self) -> dict:
        """Its fields as JSON values (``classes`` a list), as ``task.json`` stores them."""
        return {"label_set": self.label_set, "classes": _jsonable(list(self.classes)),
                "min_fraction": self.min_fraction}


@dataclasses.dataclass(frozen=True, eq=False)
class LabelSet:
    """Categorical labels of the N evaluation samples, used to score clusters.

    Attributes:
      values: ``[N]`` class of each sample (ints, bools or strings).
      positive: the class clusters are scored for (e.g. ``True`` for carry tokens); None scores each cluster for its
        majority class.
      qualifier: an optional :class:`Qualifier` restricting which clusters count.
      class_names: optional class -> display name for reports (e.g. place 0 -> "1000s").
      stratify_by: optional name of another label set that confounds this one (e.g. ``"place"`` for carry, which
        lives only in some places): the permutation null then shuffles this label only within each of its classes,
        so clusters that merely separate those classes do not beat the null.

    Raises:
      PolcaError: ``values`` is not one-dimensional. :meth:`Task.check` checks the rest (one label per sample, at
        least two classes, ``positive`` among them, the other label sets named exist).

    Example:
      >>> import numpy as np
      >>> from polca_jax.pipeline import LabelSet, Qualifier
      >>> place = LabelSet(np.array([0, 1, 2, 1]), class_names={0: "100s", 1: "10s", 2: "1s"})
      >>> carry = LabelSet(np.array([True, False, True, False]), positive=True,
      ...                  qualifier=Qualifier("place", (1, 2), 0.85), stratify_by="place")
      >>> place.name_of(1), carry.values.shape
      ('10s', (4,))
      >>> carry.metadata()["qualifier"]
      {'label_set': 'place', 'classes': [1, 2], 'min_fraction': 0.85}
    """

    values: np.ndarray
    positive: Any = None
    qualifier: Qualifier | None = None
    class_names: Mapping[Any, str] | None = None
    stratify_by: str | None = None

    def __post_init__(self):
        values = np.asarray(self.values)
        if values.ndim != 1:
            raise PolcaError(f"label values must be one class per sample, [N], got shape {values.shape}")
        object.__setattr__(self, "values", values)

    def name_of(self, value) -> str:
        """The display name of one class."""
        names = {str(_plain(k)): v for k, v in (self.class_names or {}).items()}
        return str(names.get(str(_plain(value)), _plain(value)))

    def metadata(self) -> dict:
        """What a run directory stores beside the values (``task.json``)."""
        return {
            "positive": _jsonable(self.positive),
            "qualifier": None if self.qualifier is None else self.qualifier.to_dict(),
            "class_names": None if self.class_names is None else {
                str(_plain(k)): v for k, v in self.class_names.items()},
            "stratify_by": self.stratify_by,
        }


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """Everything the pipeline needs to run POLCA on one problem.

    Attributes:
      init_params: the parameters at step 0 (a pytree of floating-point arrays); also the template every checkpoint
        is restored into.
      per_sample_loss: ``(params, batch) -> [n_seq]`` (one sample per sequence) or ``[n_seq, n_tok]`` (one sample per
        token); a pure JAX function.
      eval_batch: the evaluation samples POLCA decomposes: a pytree of arrays with a leading ``n_seq`` axis.
      hessian_batch: the training sample whose Hessian Algorithm 1 uses (same layout).
      train_batches: ``step -> batch``, a pure function of the step (so a resumed run sees the same data); None when
        the run brings its own checkpoints (``polca run ... --checkpoints DIR``).
      eval_mask: optional bool ``[n_seq, n_tok]``: the token samples that count; N is its number of True entries.
      labels: name -> :class:`LabelSet` (or a plain ``[N]`` array) of the evaluation samples.
      sample_texts: optional ``[N]`` short text per sample, shown in reports (e.g. the context of a token).
      loss: optional ``(params, batch) -> scalar`` aggregate loss for training and the Hessian; default: the mean of
        ``per_sample_loss`` over every entry.
      training_metrics: optional ``params -> {name: float or array}`` logged every ``metrics_every`` training steps
        beside the training and evaluation loss.
      checkpoints: optional: the task brings its own checkpoints, which a run reads instead of training:
        ``(steps, template, mesh) -> store``, a sequence of the parameters at ``steps`` (restored like ``template``,
        placed on ``mesh`` when one is given) with a ``close()`` method, like :class:`polca_jax.OrbaxCheckpoints` and
        :class:`polca_jax.hf.HFCheckpoints` (the Hugging Face task's). None: the run trains, or reads the orbax
        directory ``--checkpoints`` names.
      description: one line for the report.

    Raises:
      PolcaError: ``labels`` is not a mapping (and a label set's values not ``[N]``: :class:`LabelSet`);
        :meth:`check` raises for the rest.

    Example:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from polca_jax.pipeline import Task
      >>> x = np.linspace(-1, 1, 6, dtype=np.float32)[:, None]  # 6 sequences of one sample each
      >>> task = Task(init_params={"w": jnp.ones((1, 2))},
      ...             per_sample_loss=lambda params, batch: ((batch["x"] @ params["w"]) ** 2).sum(1),
      ...             eval_batch={"x": x}, hessian_batch={"x": x}, train_batches=lambda step: {"x": x},
      ...             labels={"sign": x[:, 0] > 0})
      >>> task.check()  # raises PolcaError naming the first part that cannot work
      >>> task.num_samples, task.labels["sign"].values.tolist()
      (6, [False, False, False, True, True, True])
    """

    init_params: PyTree
    per_sample_loss: Callable[[PyTree, PyTree], jax.Array]
    eval_batch: PyTree
    hessian_batch: PyTree
    train_batches: Callable[[int], PyTree] | None = None
    eval_mask: np.ndarray | None = None
    labels: Mapping[str, LabelSet | np.ndarray] = dataclasses.field(default_factory=dict)
    sample_texts: Sequence[str] | None = None
    loss: Callable[[PyTree, PyTree], jax.Array] | None = None
    training_metrics: Callable[[PyTree], Mapping[str, Any]] | None = None
    checkpoints: Callable[[Sequence[int], PyTree, Any], Sequence[PyTree]] | None = None
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.labels, Mapping):
            raise PolcaError(f"Task.labels must be a dict of name -> LabelSet or [N] array, got "
                             f"{type(self.labels).__name__}")
        labels = {str(name): value if isinstance(value, LabelSet) else LabelSet(value)
                  for name, value in self.labels.items()}
        object.__setattr__(self, "labels", labels)
        if self.loss is None:
            object.__setattr__(self, "loss", _MeanLoss(self.per_sample_loss))

    @property
    def num_samples(self) -> int:
        """N, the evaluation samples (tokens or sequences) POLCA decomposes."""
        if self.eval_mask is not None:
            return int(np.count_nonzero(self.eval_mask))
        return int(np.prod(jax.eval_shape(self.per_sample_loss, self.init_params, self.eval_batch).shape))

    def check(self) -> None:
        """Raise ``PolcaError`` (a ``ValueError``) naming the first part of the task that cannot work; where
        ``per_sample_loss`` fails on the evaluation batch, a ``TaskError`` (the failure is in the user's code) or a
        ``PolcaError`` naming the failure."""
        for name in ("per_sample_loss", "loss"):
            if not callable(getattr(self, name)):
                raise PolcaError(f"Task.{name} must be a function (params, batch) -> losses")
        if self.train_batches is not None and not callable(self.train_batches):
            raise PolcaError("Task.train_batches must be a function step -> batch, or None")
        if self.checkpoints is not None and not callable(self.checkpoints):
            raise PolcaError("Task.checkpoints must be a function (steps, template, mesh) -> checkpoint store, or None")
        leaves = jax.tree_util.tree_leaves(self.init_params)
        if not leaves:
            raise PolcaError("Task.init_params holds no arrays")
        for path, leaf in jax.tree_util.tree_flatten_with_path(self.init_params)[0]:
            dtype = jax.numpy.result_type(leaf)
            if not jax.numpy.issubdtype(dtype, jax.numpy.floating):
                raise PolcaError(f"Task.init_params{jax.tree_util.keystr(path)} has dtype {dtype}; "
                                 "POLCA differentiates every parameter, so they must be floating point")
            if np.size(leaf) == 0:
                raise PolcaError(f"Task.init_params{jax.tree_util.keystr(path)} has shape {np.shape(leaf)}, no "
                                 "entries: checkpoints cannot hold an empty array; leave it out of the parameters")
        for name in ("eval_batch", "hessian_batch"):
            _check_batch(getattr(self, name), f"Task.{name}")
        try:
            out = jax.eval_shape(self.per_sample_loss, self.init_params, self.eval_batch)
        except Exception as error:  # a user's function may fail in any way: say where
            from polca_jax.pipeline._usercode import as_task_error

            wrapped = as_task_error(error, "Task.per_sample_loss on (init_params, eval_batch)")
            raise wrapped or PolcaError(f"Task.per_sample_loss fails on (init_params, eval_batch): {error}") \
                from error
        check_loss_dtype(out.dtype, "Task.per_sample_loss")
        shape = out.shape
        n_seq = _check_batch(self.eval_batch, "Task.eval_batch")
        if len(shape) not in (1, 2) or shape[0] != n_seq:
            raise PolcaError(f"Task.per_sample_loss must return [n_seq] or [n_seq, n_tok] with n_seq={n_seq}, "
                             f"got shape {shape}")
        if self.eval_mask is not None:
            mask = np.asarray(self.eval_mask)
            if mask.dtype != np.bool_ or mask.shape != tuple(shape):
                raise PolcaError(f"Task.eval_mask must be bool {tuple(shape)} like the per-sample losses, got "
                                 f"{mask.dtype} {mask.shape}")
        num_samples = self.num_samples
        if num_samples < 2:
            raise PolcaError(f"the task has {num_samples} evaluation sample(s); POLCA clusters need at least 2")
        for name, label_set in self.labels.items():
            if label_set.values.dtype.kind not in "biufUS":  # object arrays: None or mixed types
                kinds = sorted({type(value).__name__ for value in label_set.values.tolist()})
                raise PolcaError(f"label set {name!r} holds values of dtype {label_set.values.dtype} (of types "
                                 f"{', '.join(kinds[:5])}): labels must be all ints, all bools or all strings, one "
                                 "per sample; give missing labels a class of their own (e.g. 'none')")
            if label_set.values.shape != (num_samples,):
                raise PolcaError(f"label set {name!r} has {label_set.values.shape[0]} values but the task has "
                                 f"{num_samples} evaluation samples (one label per sample, in the order of the "
                                 "flattened per-sample losses)")
            classes = np.unique(label_set.values)
            if classes.size < 2:
                raise PolcaError(f"label set {name!r} has a single class ({_plain(classes[0])!r}): it cannot tell "
                                 "clusters apart; drop it")
            if label_set.positive is not None and label_set.positive not in classes.tolist():
                raise PolcaError(f"label set {name!r}: positive class {label_set.positive!r} is not among its "
                                 f"classes {classes.tolist()[:10]}")
            qualifier = label_set.qualifier
            if qualifier is not None and qualifier.label_set not in self.labels:
                raise PolcaError(f"label set {name!r} qualifies clusters by label set {qualifier.label_set!r}, which "
                                 f"the task does not have (it has {sorted(self.labels)})")
            if label_set.stratify_by is not None and (label_set.stratify_by == name
                                                      or label_set.stratify_by not in self.labels):
                raise PolcaError(f"label set {name!r} is stratified by {label_set.stratify_by!r}, which is not another "
                                 f"label set of the task (it has {sorted(self.labels)})")
        if self.sample_texts is not None and len(self.sample_texts) != num_samples:
            raise PolcaError(f"Task.sample_texts has {len(self.sample_texts)} entries for {num_samples} samples")


@dataclasses.dataclass(frozen=True)
class _MeanLoss:
    """The mean of a per-sample loss: the default aggregate loss (hashable, so kernels compile once)."""

    per_sample_loss: Callable

    def __call__(self, params, batch):
        return self.per_sample_loss(params, batch).mean()


@dataclasses.dataclass(frozen=True)
class TaskDefinition:
    """A task factory with its presets: what ``polca run TASK`` loads.

    Attributes:
      factory: ``(**options) -> Task``; its keyword parameters are the task's options (``--set name=value``), with
        ``seed`` and ``workdir`` reserved (see the module docstring).
      presets: preset name -> settings; a setting is a task option or a pipeline config key
        (:class:`polca_jax.pipeline.RunConfig`).
      default_preset: the preset a new run takes without ``--preset`` (None: the defaults of the factory and the
        pipeline).
      report_sections: optional ``(run: RunView) -> list[str]`` of markdown parts the task adds to its report (e.g.
        the paper's numbers beside the run's); host code reading only the run directory.

    Raises:
      PolcaError: ``factory`` is not callable or has positional-only parameters, or ``default_preset`` is not one
        of ``presets``.

    Example:
      >>> from polca_jax.pipeline import load_task_definition
      >>> planted = load_task_definition("planted")
      >>> planted.name, planted.default_preset, planted.presets["tiny"]["width"]
      ('make_task', 'cpu', 8)
    """

    factory: Callable[..., Task]
    presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    default_preset: str | None = None
    report_sections: Callable[[Any], list[str]] | None = None

    def __post_init__(self):
        if not callable(self.factory):
            raise PolcaError(f"a task factory must be callable, got {self.factory!r}")
        positional = [name for name, p in inspect.signature(self.factory).parameters.items()
                      if p.kind == p.POSITIONAL_ONLY]
        if positional:
            raise PolcaError(f"the task factory {self.name}'s parameter(s) {positional} are positional-only, so no "
                             "--set can reach them: a task's options are keyword parameters (remove the '/')")
        if self.default_preset is not None and self.default_preset not in self.presets:
            raise PolcaError(f"default_preset {self.default_preset!r} is not one of the presets {sorted(self.presets)}")

    def __call__(self, *args, **kwargs) -> Task:
        return self.factory(*args, **kwargs)

    @property
    def name(self) -> str:
        """The factory's name, for messages."""
        return getattr(self.factory, "__name__", type(self.factory).__name__)

    def options(self) -> dict[str, inspect.Parameter]:
        """The factory's keyword parameters other than the reserved ones: name -> parameter."""
        parameters = inspect.signature(self.factory).parameters
        return {name: p for name, p in parameters.items()
                if name not in RESERVED_OPTIONS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def build(self, options: Mapping[str, Any], *, seed: int, workdir: Path | None) -> Task:
        """The task for ``options``, checked (:meth:`Task.check`); a wrong return type raises ``PolcaError``."""
        parameters = inspect.signature(self.factory).parameters
        reserved = {"seed": seed, "workdir": workdir}
        kwargs = {**options, **{name: value for name, value in reserved.items() if name in parameters}}
        task = self.factory(**kwargs)
        if not isinstance(task, Task):
            raise PolcaError(f"the task factory {self.name} returned {type(task).__name__}, expected a "
                             "polca_jax.pipeline.Task")
        task.check()
        return task


def task_factory(*, presets: Mapping[str, Mapping[str, Any]] | None = None, default_preset: str | None = None,
                 report_sections: Callable | None = None) -> Callable[[Callable[..., Task]], TaskDefinition]:
    """Decorator making a function ``(**options) -> Task`` a :class:`TaskDefinition` with presets.

    The function's keyword parameters are the task's options (``--set name=value``); ``seed`` (the run's seed) and
    ``workdir`` (the run directory) are reserved, filled by the pipeline when it declares them.

    Args:
      presets: preset name -> settings: task options and pipeline config keys (:class:`RunConfig`).
      default_preset: the preset a new run takes without ``--preset`` (None: the factory's and the pipeline's
        defaults).
      report_sections: optional ``(run: RunView) -> list[str]``, markdown parts the task adds to its report.

    Returns:
      The decorator: ``factory -> TaskDefinition(factory, presets, default_preset, report_sections)``.

    Raises:
      PolcaError: when it decorates, as :class:`TaskDefinition` does: the factory has positional-only parameters,
        or ``default_preset`` is not one of ``presets``.

    Example:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> from polca_jax.pipeline import Task, task_factory
      >>> @task_factory(presets={"tiny": {"num_steps": 20, "width": 2}}, default_preset="tiny")
      ... def make_task(width: int = 3, seed: int = 0) -> Task:  # seed: reserved, the run's
      ...     x = np.random.default_rng(seed).normal(size=(8, 2)).astype(np.float32)
      ...     return Task(init_params={"w": jnp.ones((2, width))},
      ...                 per_sample_loss=lambda params, batch: ((batch["x"] @ params["w"]) ** 2).sum(1),
      ...                 eval_batch={"x": x}, hessian_batch={"x": x}, train_batches=lambda step: {"x": x})
      >>> list(make_task.options()), make_task.default_preset
      (['width'], 'tiny')
      >>> make_task.build({"width": 2}, seed=1, workdir=None).init_params["w"].shape
      (2, 2)
    """

    def wrap(factory: Callable[..., Task]) -> TaskDefinition:
        return TaskDefinition(factory, dict(presets or {}), default_preset, report_sections)

    return wrap


def canonical_reference(reference: str) -> str:
    """The form of a task reference stored in a run's config: a built-in name as is, a file path made absolute (and
    the local directory of ``hf:PATH``)."""
    if reference in BUILTIN_TASKS:
        return reference
    if reference.startswith(HUGGING_FACE):
        source = reference.removeprefix(HUGGING_FACE)
        local = Path(source).expanduser()
        return HUGGING_FACE + (str(local.resolve()) if local.exists() else source)
    target, sep, attribute = reference.rpartition(":")
    if not sep or not target or not attribute:
        raise PolcaError(f"unknown task {reference!r}: give a built-in task ({', '.join(BUILTIN_TASKS)}), "
                         "path/to/file.py:factory or module:factory")
    if target.endswith(".py"):
        return f"{Path(target).expanduser().resolve()}:{attribute}"
    return reference


def load_task_definition(reference: str) -> TaskDefinition:
    """The task definition a reference names: a built-in task, a task file or module, or ``hf:PATH_OR_REPO``.

    ``hf:PATH_OR_REPO`` is a Hugging Face model's training checkpoints (``experiments/huggingface``).

    ``BUILTIN_TASKS`` maps each built-in task's name (``arithmetic``, ``english``, ``planted``,
    ``planted-entangled``) to the ``module:factory`` that defines it. A file is imported (its code runs; a relative
    path is taken from the working directory, see :func:`canonical_reference`); a factory that is a plain function
    (no :func:`task_factory`) becomes a definition without presets.

    Args:
      reference: a key of ``BUILTIN_TASKS``, ``path/to/file.py:factory``, ``module:factory`` or ``hf:PATH_OR_REPO``.

    Returns:
      The :class:`TaskDefinition`.

    Raises:
      PolcaError: the reference is none of those forms, its file or module cannot be found or imported, has no
        such name, or that is not callable; the message says what to fix.

    Example:
      >>> from polca_jax.pipeline import BUILTIN_TASKS, load_task_definition
      >>> sorted(BUILTIN_TASKS)
      ['arithmetic', 'english', 'planted', 'planted-entangled']
      >>> definition = load_task_definition("planted")
      >>> definition.default_preset, sorted(definition.presets)[:3]
      ('cpu', ['cpu', 'cpu-late', 'cpu-shared'])
    """
    reference = canonical_reference(reference)
    if reference.startswith(HUGGING_FACE):  # the model's checkpoints decide the presets' steps
        return import_experiment("huggingface").task_definition(reference.removeprefix(HUGGING_FACE))
    target, _, attribute = BUILTIN_TASKS.get(reference, reference).rpartition(":")
    if target.endswith(".py"):
        module = _import_file(Path(target))
    elif reference in BUILTIN_TASKS and target.startswith(EXPERIMENTS_PACKAGE + "."):
        module = import_experiment(target.removeprefix(EXPERIMENTS_PACKAGE + "."))
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as error:
            raise PolcaError(f"cannot import the task module {target!r}: {error}") from error
    if not hasattr(module, attribute):
        public = sorted(name for name in vars(module) if not name.startswith("_"))
        raise PolcaError(f"{target} has no {attribute!r} (it defines {', '.join(public[:12]) or 'nothing public'})")
    found = getattr(module, attribute)
    if isinstance(found, TaskDefinition):
        return found
    if callable(found):
        return TaskDefinition(found)
    raise PolcaError(f"{reference} is a {type(found).__name__}, not a task factory (a function returning a Task)")


def import_experiment(name: str) -> ModuleType:
    """The module of one of the paper's experiments, ``experiments/<name>/`` of a clone of the repository.

    The experiments are not installed with polca_jax: they are looked up in the working directory, then in the clone
    polca_jax itself was installed from (``pip install -e``), and that directory is put on ``sys.path`` so that the
    experiment's modules import each other (and a script imports them) as ``experiments.<name>``.

    Args:
      name: the experiment's directory under ``experiments/``: ``"arithmetic"`` or ``"english"``.

    Returns:
      The imported module ``experiments.<name>``.

    Raises:
      PolcaError: no clone with ``experiments/<name>/__init__.py`` is found, or another package named
        ``experiments`` was imported first; the message says where to run from.

    Example:
      >>> from polca_jax.pipeline import import_experiment
      >>> arithmetic = import_experiment("arithmetic")
      >>> arithmetic.__name__, arithmetic.PRESETS["tiny"]["num_steps"]
      ('experiments.arithmetic', 60)
    """
    import polca_jax

    candidates = [Path.cwd(), Path(polca_jax.__file__).resolve().parent.parent]
    roots = [root for root in candidates if (root / EXPERIMENTS_PACKAGE / name / "__init__.py").is_file()]
    if not roots:
        raise PolcaError(
            f"the {name!r} task is one of the paper's experiments: it lives in {EXPERIMENTS_PACKAGE}/{name}/ of a "
            "clone of the polca_jax repository, not in the installed package; run polca from the clone's root (or "
            f"install polca_jax from the clone with pip install -e). Looked in: {', '.join(map(str, candidates))}")
    root = roots[0].resolve()
    loaded = sys.modules.get(EXPERIMENTS_PACKAGE)
    if loaded is not None and Path(loaded.__file__ or "").resolve().parent.parent != root:
        raise PolcaError(f"another package named {EXPERIMENTS_PACKAGE!r} ({loaded.__file__}) was imported before "
                         f"the paper's experiments in {root}; run polca from the clone's root")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"{EXPERIMENTS_PACKAGE}.{name}")


def _import_file(path: Path):
    if path.is_dir():
        raise PolcaError(f"task file {path} is a directory, not a Python file; name the .py file that defines the "
                         "task factory (path/to/file.py:factory)")
    if not path.is_file():
        raise PolcaError(f"task file {path} does not exist")
    name = f"polca_user_task_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # the user's file may raise anything at import: report it with the file named
        del sys.modules[name]
        raise PolcaError(f"cannot import the task file {path}: {type(error).__name__}: {error}") from error
    return module


def _check_batch(batch: PyTree, what: str) -> int:
    """The leading axis shared by every leaf of ``batch``; raise, naming ``what``, if it is empty or ragged."""
    try:
        return batch_size(batch)
    except ValueError as error:
        raise PolcaError(f"{what}: {error}") from error


def _plain(value):
    """A numpy scalar as the Python value it holds."""
    return value.item() if isinstance(value, np.generic) else value


def _jsonable(value):
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return _plain(value)
