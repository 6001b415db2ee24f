"""Saving the checkpoints POLCA needs from a training loop of your own.

The layout is the one :class:`polca_jax.OrbaxCheckpoints` reads and ``polca run TASK --checkpoints DIR`` decomposes:
an orbax ``CheckpointManager`` directory with one step per saved checkpoint, holding the item ``"params"``.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401 (its exit hook must be registered before ours)
import itertools
import sys
import threading
from pathlib import Path
from typing import Any, Iterable

import orbax.checkpoint as ocp

from polca_jax._checkpoints import PARAMS_ITEM
from polca_jax.checks import check_finite_params
from polca_jax.files import storage_path
from polca_jax.errors import PolcaError

PyTree = Any


class CheckpointRecorder:
    """Saves the parameters at chosen steps of your own training loop.

    Call :meth:`save` with every step's parameters ("step s" = the parameters after s updates, so step 0 is the
    initialisation); it saves only at ``steps`` and ignores the others. Use it as a context manager (or call
    :meth:`close`) so the asynchronous saves finish. The directory is the one :class:`polca_jax.OrbaxCheckpoints`
    reads.

    Args:
      directory: the checkpoint directory (created if missing): a local path, or ``gs://bucket/dir`` on Google
        Cloud Storage (the ``gcs`` extra).
      steps: the steps to keep (POLCA's, e.g. every 10 steps, and Algorithm 1's); non-negative integers.

    Raises:
      PolcaError: for no steps, a step that is not a non-negative integer, or a ``directory`` that is a file.

    Example:
      A training loop of your own: three steps of gradient descent, every other step kept (``params``, ``batch``,
      ``loss``: the least squares of :func:`polca_jax.hvp`'s example).

      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     with pj.CheckpointRecorder(directory, steps=[0, 2]) as recorder:
      ...         w = params
      ...         for step in range(3):
      ...             saved = recorder.save(step, w)  # only steps 0 and 2 are saved
      ...             w = jax.tree.map(lambda p, g: p - 0.5 * g, w, jax.grad(loss)(w, batch))
      ...     with pj.OrbaxCheckpoints(directory) as checkpoints:
      ...         print(recorder.missing, checkpoints.steps)
      [] [0, 2]
    """

    def __init__(self, directory: str | Path, steps: Iterable[int]):
        self.steps = sorted({_step(s) for s in steps})
        if not self.steps:
            raise PolcaError("CheckpointRecorder needs at least one step to save")
        self.directory = storage_path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise PolcaError(f"{self.directory} is a file, not a checkpoint directory")
        options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(PARAMS_ITEM,))
        self._wanted = set(self.steps)
        self._last: int | None = max(self._manager.all_steps(), default=None)  # the highest step saved or issued
        self._key = next(_KEYS)
        _OPEN[self._key] = (self.directory, self._manager)  # finished at interpreter exit if never closed

    def save(self, step: int, params: PyTree) -> bool:
        """Save ``params`` as step ``step`` if it is one of ``steps``; returns whether it saved.

        True means the save was issued and reaches disk (by :meth:`wait`, :meth:`close`, or at the latest when the
        interpreter exits). Steps must be saved in increasing order: a step at or below one already saved (in this
        directory, by this recorder or before), or parameters holding NaN or inf, raise
        :class:`polca_jax.PolcaError` (a ``ValueError``), and nothing is saved.
        """
        step = _step(step)
        if step not in self._wanted:
            return False
        if self._manager is None:
            raise PolcaError(f"the CheckpointRecorder of {self.directory} is closed; open a new one to save step "
                             f"{step}")
        if self._last is not None and step <= self._last:
            raise PolcaError(
                f"step {step} cannot be saved in {self.directory}: step {self._last} is already saved there, and "
                "checkpoints must be saved in increasing step order; nothing was saved (save the steps in order, or "
                "record a new run into a new directory)")
        check_finite_params(params, f"the parameters at step {step}")
        issued = self._manager.save(step, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardSave(params)}))
        if not issued:  # orbax declined the step: say so rather than report a save that never happens
            raise PolcaError(f"orbax did not save step {step} in {self.directory} (its saved steps: "
                             f"{sorted(self._manager.all_steps())}); nothing was saved")
        self._last = step
        return True

    @property
    def missing(self) -> list[int]:
        """The steps not saved (yet): neither on disk nor being saved."""
        saved = set(_saved_steps(self.directory) if self._manager is None else self._manager.all_steps())
        return [s for s in self.steps if s not in saved]

    def wait(self) -> None:
        """Block until every save so far is on disk (saves run in the background)."""
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for the saves to finish and release orbax's threads (a second call does nothing).

        A recorder never closed is closed when the interpreter exits, before the threads orbax saves with stop, so
        its last saves still reach disk.
        """
        manager, self._manager = self._manager, None
        _OPEN.pop(self._key, None)
        if manager is not None:
            _finish(manager)

    def __enter__(self) -> "CheckpointRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_OPEN: dict[int, tuple[Path, ocp.CheckpointManager]] = {}  # the recorders not closed yet: directory, manager
_KEYS = itertools.count()


def _finish(manager: ocp.CheckpointManager) -> None:
    try:
        manager.wait_until_finished()
    finally:
        manager.close()


def _finish_open_recorders() -> None:
    """Close every recorder still open: their saves finish before the interpreter stops the threads they use."""
    while _OPEN:
        directory, manager = _OPEN.popitem()[1]
        try:
            _finish(manager)
        except (OSError, RuntimeError, ValueError) as error:  # at exit no caller is left to raise to: say what
            # was lost, in one line (any other exception is a bug and keeps its traceback)
            saved = _saved_steps(directory)
            print(f"polca_jax: error: a CheckpointRecorder left open could not finish its saves in {directory} "
                  f"({type(error).__name__}: {' '.join(str(error).split())}); the steps on disk are {saved}",
                  file=sys.stderr)


def _saved_steps(directory: Path) -> list[int]:
    """The steps whose directories are complete on disk (a save's temporary directory is not one)."""
    if not directory.is_dir():
        return []
    return sorted(int(path.name) for path in directory.iterdir() if path.is_dir() and path.name.isdigit())


# threading's exit hooks run before the interpreter joins threads and stops thread pools (which would make orbax's
# background save fail with "cannot schedule new futures after interpreter shutdown" and lose the step); they run
# in reverse order of registration, so this one runs before concurrent.futures' own (registered at its import).
if hasattr(threading, "_register_atexit"):
    threading._register_atexit(_finish_open_recorders)
else:  # pragma: no cover - every supported Python has it
    atexit.register(_finish_open_recorders)


def _step(step) -> int:
    if isinstance(step, bool) or not hasattr(step, "__index__") or step.__index__() < 0:
        raise PolcaError(f"a checkpoint step must be a non-negative integer, got {step!r}")
    return step.__index__()
