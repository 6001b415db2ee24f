"""Placing work on a device mesh: samples over its data axes, parameters and bases over a ``"model"`` axis.

A mesh has an optional axis ``"model"`` and one or more other axes, its *data axes*, which split the samples
together (:func:`data_mesh` makes a 1-D ``("data",)`` one, :func:`device_mesh` a 2-D ``("data", "model")`` one; a
mesh of one's own may add, say, a ``"replica"`` axis across slices or hosts: ``("replica", "data", "model")``). Parameters are split FSDP-style over ``"model"`` by one rule for any
pytree (:func:`param_spec`): each leaf along its largest dimension that the model axis divides, replicated when none
does. :func:`partition_rules` overrides the rule by each leaf's path, for tensor parallelism (attention heads and MLP
hidden units split, so that XLA splits the activations too: ``polca_jax.pipeline.models.TENSOR_PARALLEL_RULES``) or
a layout of one's own. A basis held as a params-shaped pytree of ``[K, *leaf.shape]`` leaves (and Lanczos' Krylov
vectors) is split like the parameters, its leading ``K`` axis whole, so its memory per device falls as
``1 / model-axis size``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
import warnings
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from polca_jax.errors import PolcaError

PyTree = Any
DATA_AXIS = "data"
MODEL_AXIS = "model"
REPLICATED_WARNING_FRACTION = 0.1  # warn when more of the parameters than this stay whole on every device


@dataclasses.dataclass(frozen=True)
class PartitionRules:
    """Which dimension of each parameter the ``"model"`` axis splits, by the parameter's path.

    The first rule whose pattern ``re.search`` finds in a leaf's path (:func:`leaf_path`, e.g.
    ``"blocks/0/attention/query/kernel"``) gives the dimension; a leaf no pattern finds is split by the default rule
    (:func:`param_spec`). Searching, not matching, lets one rule cover a parameter and the optimiser's moments of it
    (``"0/mu/blocks/0/attention/query/kernel"``). Hashable: the kernels compile once per set of rules. Put them in
    force with :func:`partition_rules`.

    Args:
      rules: ``(pattern, dimension)`` pairs, tried in order; ``dimension`` None keeps the leaf whole on every device.

    Raises:
      PolcaError: a rule that is not a ``(regular expression, int or None)`` pair.

    Example:
      >>> rules = pj.PartitionRules(((r"query/kernel$", 1), (r"output/bias$", None)))
      >>> rules.dimension("attention/query/kernel", (16, 16), 4), rules.dimension("mlp/output/bias", (16,), 4)
      (1, None)
      >>> rules.dimension("mlp/hidden/kernel", (16, 64), 4)  # no rule names it: the default rule decides
      False
    """

    rules: tuple[tuple[str, int | None], ...]

    def __post_init__(self):
        rules = tuple(tuple(rule) if isinstance(rule, list | tuple) else rule for rule in self.rules)
        object.__setattr__(self, "rules", rules)  # hashable, as the compiled kernels' keys need
        for rule in rules:
            if (not isinstance(rule, tuple) or len(rule) != 2 or not isinstance(rule[0], str)
                    or not (rule[1] is None or (isinstance(rule[1], int) and not isinstance(rule[1], bool)))):
                raise PolcaError(f"a partition rule is a (pattern, dimension or None) pair, got {rule!r}")
            try:
                re.compile(rule[0])
            except re.error as error:
                raise PolcaError(f"partition rule {rule[0]!r} is not a regular expression: {error}") from error

    def dimension(self, path: str, shape: tuple[int, ...], model_shards: int) -> int | None | bool:
        """The dimension of the leaf at ``path`` to split, None to keep it whole, or False where no rule names it.

        Args:
          path: the leaf's path (:func:`leaf_path`).
          shape: the leaf's shape.
          model_shards: the devices on the mesh's ``"model"`` axis (1: nothing is split, None).

        Returns:
          The first matching rule's dimension (counted from 0), None, or False.

        Raises:
          PolcaError: the rule's dimension is out of range or not divisible by ``model_shards``.
        """
        for pattern, dimension in self.rules:
            if re.search(pattern, path):
                if dimension is None or model_shards == 1:
                    return None
                if not -len(shape) <= dimension < len(shape):
                    raise PolcaError(f"partition rule {pattern!r} splits dimension {dimension} of {path!r}, whose "
                                     f"shape {shape} has {len(shape)}")
                if shape[dimension] % model_shards:
                    raise PolcaError(f"partition rule {pattern!r}: a model axis of {model_shards} devices does not "
                                     f"divide dimension {dimension} of {path!r} (shape {shape})")
                return dimension % len(shape)
        return False


_ACTIVE_RULES: contextvars.ContextVar[PartitionRules | None] = contextvars.ContextVar("partition_rules", default=None)


@contextlib.contextmanager
def partition_rules(rules: PartitionRules | Sequence[tuple[str, int | None]] | None) -> Iterator[PartitionRules | None]:
    """Within the block, every kernel and :func:`shard_params` split the parameters by ``rules`` first.

    Args:
      rules: a :class:`PartitionRules`, its ``(pattern, dimension)`` pairs, or None (the default rule alone).

    Returns:
      A context manager; ``with`` gives the rules in force (a :class:`PartitionRules`, or None).

    Raises:
      PolcaError: for a rule that is not a ``(pattern, dimension or None)`` pair.

    Example:
      >>> with pj.partition_rules([("w2", None)]):  # keep w2 whole, split the rest by the default rule
      ...     tuple(pj.param_spec((16, 2), 2, path="w2")), tuple(pj.param_spec((3, 16), 2, path="w1"))
      ((), (None, 'model'))
    """
    if rules is not None and not isinstance(rules, PartitionRules):
        rules = PartitionRules(tuple(rules))
    token = _ACTIVE_RULES.set(rules)
    try:
        yield rules
    finally:
        _ACTIVE_RULES.reset(token)


def active_partition_rules() -> PartitionRules | None:
    """The rules of the innermost :func:`partition_rules` block, or None."""
    return _ACTIVE_RULES.get()


def leaf_path(path) -> str:
    """A pytree key path as the rules see it: ``"blocks/0/attention/query/kernel"``."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def data_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all) with the axis ``"data"``: samples split, parameters whole.

    Args:
      devices: the devices (default ``jax.devices()``, every process' devices in a multi-process run).

    Returns:
      A ``jax.sharding.Mesh`` with the one axis ``"data"``; pass it as ``mesh=`` to any kernel.

    Example:
      >>> mesh = pj.data_mesh(jax.devices()[:1])
      >>> mesh.axis_names, dict(mesh.shape)
      (('data',), {'data': 1})
    """
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def device_mesh(model: int = 1, data: int | None = None, devices: list | None = None) -> Mesh:
    """A 2-D ``("data", "model")`` mesh: ``model`` devices share each parameter, ``data`` groups split the samples.

    The devices are laid out by ``jax.experimental.mesh_utils.create_device_mesh`` (the model axis, which
    communicates most, along the fastest links of a TPU or GPU topology; on CPUs in ``devices`` order).

    Args:
      model: devices along ``"model"`` (each parameter leaf split over them, FSDP-style).
      data: devices along ``"data"`` (default: all the remaining ones, ``len(devices) // model``).
      devices: default ``jax.devices()`` (every process' devices in a multi-process run).

    Returns:
      A ``jax.sharding.Mesh`` of shape ``(data, model)``; pass it as ``mesh=`` to any kernel.

    Raises:
      PolcaError: when ``model`` is below 1 or does not divide the number of devices, or ``data × model`` is not
        the number of devices.

    Example:
      >>> mesh = pj.device_mesh(model=1, devices=jax.devices()[:1])
      >>> mesh.axis_names, dict(mesh.shape)
      (('data', 'model'), {'data': 1, 'model': 1})
    """
    devices = list(jax.devices() if devices is None else devices)
    if model < 1 or len(devices) % model:
        raise PolcaError(f"a model axis of {model} does not divide the {len(devices)} devices")
    data = len(devices) // model if data is None else data
    if data * model != len(devices):
        raise PolcaError(f"a {data} x {model} (data x model) mesh needs {data * model} devices, got {len(devices)}")
    layout = mesh_utils.create_device_mesh((data, model), devices, allow_split_physical_axes=True)
    return Mesh(layout, (DATA_AXIS, MODEL_AXIS))


def check_mesh(mesh: Mesh | None, what: str) -> None:
    """Raise ``PolcaError`` unless ``mesh`` is None or a ``Mesh`` with at least one axis besides ``"model"``."""
    if mesh is None:
        return
    if not isinstance(mesh, Mesh):
        raise PolcaError(f"{what}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if not data_axes(mesh):
        raise PolcaError(
            f"{what}: the mesh has only the axis {MODEL_AXIS!r} (parameters); polca_jax splits the samples over its "
            f"other axes and needs at least one, e.g. {DATA_AXIS!r}: make it with pj.data_mesh() or "
            "pj.device_mesh(model=...)"
        )


def data_axes(mesh: Mesh) -> tuple[str, ...]:
    """The axes of ``mesh`` that split the samples: every axis but ``"model"``, in the mesh's order."""
    return tuple(name for name in mesh.axis_names if name != MODEL_AXIS)


def data_spec(mesh: Mesh) -> str | tuple[str, ...]:
    """The ``PartitionSpec`` entry of a sample axis: the data axis' name, or the data axes together."""
    axes = data_axes(mesh)
    return axes[0] if len(axes) == 1 else axes


def num_data_shards(mesh: Mesh | None) -> int:
    """How many ways samples are split: the product of the mesh's data axes (1 without a mesh).

    Args:
      mesh: a mesh, or None.

    Returns:
      The number of sample shards.

    Example:
      >>> from jax.sharding import Mesh
      >>> mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("replica", "data", "model"))
      >>> pj.num_data_shards(mesh), pj.num_data_shards(None)
      (1, 1)
    """
    return 1 if mesh is None else math.prod(dict(mesh.shape)[name] for name in data_axes(mesh))


def num_model_shards(mesh: Mesh | None) -> int:
    """How many ways each parameter is split (1 without a mesh or without a ``"model"`` axis)."""
    return 1 if mesh is None else dict(mesh.shape).get(MODEL_AXIS, 1)


def param_spec(shape: tuple[int, ...], model_shards: int, *, path: str | tuple | None = None) -> PartitionSpec:
    """The sharding rule for one parameter: which of its dimensions a ``"model"`` axis splits.

    Where a :func:`partition_rules` block's rule names the parameter's ``path``, that rule decides. Otherwise the
    largest dimension of ``shape`` that ``model_shards`` divides (the first of equals) is split over ``"model"``; a
    parameter none of whose dimensions it divides (any, when ``model_shards`` is 1) is replicated. :func:`shard_params`
    places parameters, and the kernels a basis' rows, by it.

    Args:
      shape: the parameter's shape.
      model_shards: the devices on the mesh's ``"model"`` axis.
      path: the parameter's path, for the rules in force: a ``jax.tree_util`` key path or its string
        (:func:`leaf_path`).

    Returns:
      A ``PartitionSpec``: ``"model"`` at the split dimension, or ``PartitionSpec()`` (replicated).

    Raises:
      PolcaError: a rule in force names a dimension the model axis does not divide.

    Example:
      >>> tuple(pj.param_spec((3, 8), 4))  # 4 divides 8, not 3
      (None, 'model')
      >>> tuple(pj.param_spec((3, 5), 4))  # it divides neither: replicated on every device
      ()
    """
    rules = active_partition_rules()
    if rules is not None and path is not None:
        dimension = rules.dimension(path if isinstance(path, str) else leaf_path(path), tuple(shape), model_shards)
        if dimension is None:
            return PartitionSpec()
        if dimension is not False:
            return PartitionSpec(*([None] * dimension), MODEL_AXIS)
    if model_shards > 1:
        divisible = [axis for axis, size in enumerate(shape) if size % model_shards == 0]
        if divisible:
            axis = max(divisible, key=lambda a: (shape[a], -a))
            return PartitionSpec(*([None] * axis), MODEL_AXIS)
    return PartitionSpec()


def param_shardings(params: PyTree, mesh: Mesh, *, leading_axes: int = 0) -> PyTree:
    """A ``NamedSharding`` per leaf of ``params`` by :func:`param_spec`; ``leading_axes`` unsplit axes come first
    (1 for a basis' ``[K, *leaf.shape]`` rows, whose shapes are then those of the parameters after ``K``)."""

    def sharding(path, leaf):
        spec = param_spec(tuple(np.shape(leaf))[leading_axes:], num_model_shards(mesh), path=leaf_path(path))
        return NamedSharding(mesh, PartitionSpec(*([None] * leading_axes), *spec))

    return jax.tree_util.tree_map_with_path(sharding, params)


def replicated_fraction(params: PyTree, mesh: Mesh | None) -> tuple[float, list[str]]:
    """The fraction of the parameters that the sharding rule (:func:`param_spec`) leaves whole on every device.

    :func:`shard_params` warns when it is above 10%. Only the mesh's shape is read, so a
    ``jax.sharding.AbstractMesh`` tells it for devices this machine does not have.

    Args:
      params: the parameters pytree (arrays or ``jax.ShapeDtypeStruct``s).
      mesh: a mesh with a ``"model"`` axis (:func:`device_mesh`), or None (nothing is split: 0).

    Returns:
      ``(fraction, paths)``: the fraction of the scalars that lie in replicated leaves, and those leaves' paths.

    Example:
      >>> mesh = jax.sharding.AbstractMesh((1, 4), ("data", "model"))
      >>> pj.replicated_fraction({"w": np.zeros((8, 3)), "b": np.zeros(3)}, mesh)  # 4 divides no dimension of b
      (0.111..., ["['b']"])
    """
    model_shards = num_model_shards(mesh)
    if model_shards == 1:
        return 0.0, []
    leaves = jax.tree_util.tree_leaves_with_path(params)
    whole = [(path, leaf) for path, leaf in leaves
             if param_spec(np.shape(leaf), model_shards, path=leaf_path(path)) == PartitionSpec()]
    total = sum(math.prod(np.shape(leaf)) for _, leaf in leaves)
    share = sum(math.prod(np.shape(leaf)) for _, leaf in whole) / max(total, 1)
    return share, [jax.tree_util.keystr(path) for path, _ in whole]


def warn_if_replicated(params: PyTree, mesh: Mesh | None, what: str) -> None:
    """Warn when the model axis splits less than 90% of the parameters (e.g. it divides no leaf), and when partition
    rules are in force that name none of the parameters (e.g. rules for another model)."""
    rules = active_partition_rules()
    if rules is not None and num_model_shards(mesh) > 1:
        names = [leaf_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
        if not any(re.search(pattern, name) for pattern, _ in rules.rules for name in names):
            warnings.warn(f"{what}: no partition rule in force names any of the parameters (paths such as "
                          f"{names[:3]}), so the default rule splits them all", stacklevel=3)
    share, paths = replicated_fraction(params, mesh)
    if share > REPLICATED_WARNING_FRACTION:
        shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        reason = ("divides no dimension of" if rules is None
                  else "divides no dimension of, or the partition rules keep whole,")
        warnings.warn(
            f"{what}: the model axis of {num_model_shards(mesh)} devices {reason} {shown}, so "
            f"{share:.0%} of the parameters are replicated on every device; choose a model axis that divides the "
            "large dimensions (e.g. a power of two)",
            stacklevel=3,
        )


def shard_params(params: PyTree, mesh: Mesh | None) -> PyTree:
    """Place ``params`` on ``mesh`` by the sharding rule (whole on every device without a ``"model"`` axis).

    Each leaf is split over ``"model"`` along its largest dimension that the axis divides (the first of equals),
    replicated when none does; a warning says when more than 10% of the parameters stay whole on every device.

    Args:
      params: the parameters pytree.
      mesh: a mesh of :func:`device_mesh` or :func:`data_mesh`, or None.

    Returns:
      ``params`` placed on the mesh; ``params`` itself without one.

    Example:
      ``params``: the least squares of :func:`polca_jax.hvp`'s example.

      >>> placed = pj.shard_params(params, pj.device_mesh(devices=jax.devices()[:1]))
      >>> placed["w"].sharding.is_fully_replicated  # a model axis of 1 splits nothing
      True
    """
    if mesh is None:
        return params
    warn_if_replicated(params, mesh, "shard_params")
    return jax.device_put(params, param_shardings(params, mesh))


def shard_rows(rows: PyTree, mesh: Mesh | None) -> PyTree:
    """Place a basis' params-shaped ``[K, *leaf.shape]`` rows like the parameters, ``K`` whole; unchanged without a
    mesh."""
    if mesh is None:
        return rows
    return jax.device_put(rows, param_shardings(rows, mesh, leading_axes=1))


def shard_batch(batch: PyTree, mesh: Mesh | None) -> PyTree:
    """Place ``batch`` with its leading axis split over the mesh's data axes (whole over ``"model"``).

    Args:
      batch: a pytree of arrays with a shared leading axis (sequences or samples).
      mesh: a mesh of :func:`device_mesh` or :func:`data_mesh`, or None.

    Returns:
      ``batch`` placed on the mesh; ``batch`` itself without one.

    Raises:
      PolcaError: the leading axis is not divisible by the data axes' devices.

    Example:
      >>> import numpy as np
      >>> placed = pj.shard_batch({"x": np.ones((4, 3))}, pj.data_mesh(jax.devices()[:1]))
      >>> placed["x"].shape, tuple(placed["x"].sharding.spec)
      ((4, 3), ('data',))
    """
    if mesh is None:
        return batch
    shards = num_data_shards(mesh)
    sizes = {np.shape(leaf)[0] for leaf in jax.tree_util.tree_leaves(batch)}
    if any(size % shards for size in sizes):
        raise PolcaError(f"batch size {sorted(sizes)} is not divisible by the {shards} devices of the data axes "
                         f"{data_axes(mesh)}")
    return jax.device_put(batch, NamedSharding(mesh, PartitionSpec(data_spec(mesh))))


def per_device_bytes(arrays: PyTree) -> int:
    """Bytes the leaves of ``arrays`` occupy on one device (the first device's shards: all are equal under the rule).

    Args:
      arrays: a pytree of ``jax.Array`` (placed or not) or numpy arrays (counted whole).

    Returns:
      The bytes of the first addressable shard of every leaf, summed.

    Example:
      >>> pj.per_device_bytes({"w": jnp.zeros((4, 3), jnp.float32)})
      48
    """
    total = 0
    for leaf in jax.tree_util.tree_leaves(arrays):
        shards = getattr(leaf, "addressable_shards", None)
        total += shards[0].data.nbytes if shards else np.asarray(leaf).nbytes
    return total
