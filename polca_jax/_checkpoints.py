"""Reading parameter checkpoints written by an orbax ``CheckpointManager``.

The convention: each step is saved with ``ocp.args.Composite(params=ocp.args.StandardSave(params), ...)``; other
items (optimizer state, ...) may sit beside ``params`` and are ignored here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from polca_jax import tree
from polca_jax.checks import check_increasing
from polca_jax._sharding import param_shardings
from polca_jax.files import storage_path
from polca_jax.errors import CorruptRunDirectory, PolcaError

PyTree = Any
PARAMS_ITEM = "params"  # the item of a step that holds the parameters


class OrbaxCheckpoints(Sequence):
    """The params saved at ``steps`` in an orbax checkpoint directory, restored lazily one at a time.

    Each step's parameters are its item ``PARAMS_ITEM`` (``"params"``): a ``CheckpointManager`` of one's own saves
    them with ``ocp.args.Composite(**{pj.PARAMS_ITEM: ocp.args.StandardSave(params)}, ...)``, other items (an
    optimizer's state) beside them, as :class:`CheckpointRecorder` and the pipeline's training do. Use it as a context
    manager (or call :meth:`close`) to release orbax's background threads when done.

    Args:
      directory: the ``CheckpointManager`` directory: a local path, or ``gs://bucket/dir`` on Google Cloud Storage
        (the ``gcs`` extra; :func:`polca_jax.files.storage_path`).
      steps: the steps to use, strictly increasing (default: every step on disk).
      template: optional params pytree (or ``ShapeDtypeStruct``s) to restore into, fixing shapes and dtypes.
      mesh: optional mesh (needs ``template``): each checkpoint is restored split over it like
        :func:`polca_jax.shard_params` places parameters, each process reading only its own shards.

    Raises:
      PolcaError: for a missing directory, one with no orbax checkpoints, steps that do not strictly increase or are
        not on disk (:class:`polca_jax.CorruptRunDirectory` for a step whose save was interrupted, naming its
        leftover temporary directory, which is otherwise ignored), a ``mesh`` without a ``template``, and a
        checkpoint that cannot be read (when indexed). Indexing past the end raises ``IndexError`` (so iteration
        stops there).

    Example:
      Two checkpoints saved with :class:`polca_jax.CheckpointRecorder`, read back (``params``: the least squares of
      :func:`polca_jax.hvp`'s example).

      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     with pj.CheckpointRecorder(directory, steps=[0, 10]) as recorder:
      ...         saved = recorder.save(0, params), recorder.save(10, jax.tree.map(lambda w: w + 1.0, params))
      ...     with pj.OrbaxCheckpoints(directory) as checkpoints:
      ...         print(checkpoints.steps, len(checkpoints), checkpoints[1]["w"].tolist())
      [0, 10] 2 [1.0, 1.0, 1.0]
    """

    def __init__(
        self,
        directory: str | Path,
        steps: Sequence[int] | None = None,
        template: PyTree | None = None,
        mesh: Mesh | None = None,
    ):
        if mesh is not None and template is None:
            raise PolcaError("OrbaxCheckpoints: restoring onto a mesh needs a template (the parameters' shapes)")
        self.directory = storage_path(directory)
        if not self.directory.is_dir():
            raise PolcaError(f"checkpoint directory {self.directory} does not exist")
        self._manager = ocp.CheckpointManager(self.directory, item_names=(PARAMS_ITEM,))
        try:
            self.steps = self._checked_steps(steps)
        except ValueError:
            self._manager.close()
            raise
        self._target = None if template is None else _restore_target(template, mesh)

    def _checked_steps(self, steps: Sequence[int] | None) -> list[int]:
        available = sorted(self._manager.all_steps())
        if not available:
            raise PolcaError(
                f"no orbax checkpoints in {self.directory}; pass the directory an orbax CheckpointManager saved "
                "the params in"
            )
        if steps is None:
            return available
        steps = [int(s) for s in steps]
        check_increasing(steps, f"OrbaxCheckpoints({self.directory})")
        missing = sorted(set(steps) - set(available))
        unfinished = sorted(path for path in self.directory.glob("*.orbax-checkpoint-tmp*")
                            if path.name.split(".")[0].isdigit() and int(path.name.split(".")[0]) in missing)
        if unfinished:
            raise CorruptRunDirectory(
                f"{unfinished[0]} is a checkpoint whose save never finished (its writer stopped during the save), so "
                f"step {unfinished[0].name.split('.')[0]} is not in {self.directory} (complete steps: {available}); "
                "save that step again (rerun the training, e.g. polca run with --force on the train stage) or "
                "choose steps that are on disk")
        if missing:
            raise PolcaError(f"steps {missing} have no checkpoint in {self.directory} (available: {available})")
        return steps

    def __len__(self) -> int:
        return len(self.steps)

    def close(self) -> None:
        """Release the orbax manager (its background threads); the store cannot restore afterwards."""
        self._manager.close()

    def __enter__(self) -> "OrbaxCheckpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getitem__(self, index: int) -> PyTree:
        if isinstance(index, slice):
            raise TypeError("OrbaxCheckpoints does not support slicing; index one checkpoint at a time")
        if not -len(self.steps) <= index < len(self.steps):
            raise IndexError(
                f"checkpoint index {index} is out of range for the {len(self.steps)} selected steps of "
                f"{self.directory}"
            )
        step = self.steps[index]
        restore = ocp.args.StandardRestore(self._target)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{PARAMS_ITEM: restore}))
        except (OSError, ValueError, KeyError) as error:
            raise PolcaError(f"checkpoint step {step} in {self.directory} cannot be read: {error}") from error
        return restored[PARAMS_ITEM]


def _restore_target(template: PyTree, mesh: Mesh | None) -> PyTree:
    """``ShapeDtypeStruct``s of ``template``, carrying the rule's shardings on ``mesh`` when one is given."""
    target = tree.abstract(template)
    if mesh is None:
        return target
    return jax.tree_util.tree_map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        target, param_shardings(target, mesh),
    )
