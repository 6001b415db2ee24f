"""Saving the checkpoints POLCA needs from a training loop of your own.

The layout is the one :class:`polca_jax.OrbaxCheckpoints` reads and ``polca run TASK --checkpoints DIR`` decomposes:
an orbax ``CheckpointManager`` directory with one step per saved checkpoint, holding the item ``"params"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import orbax.checkpoint as ocp

from polca_jax._checkpoints import PARAMS_ITEM
from polca_jax._checks import check_finite_params

PyTree = Any


class CheckpointRecorder:
    """Saves the parameters at chosen steps of your own training loop.

    Call :meth:`save` with every step's parameters ("step s" = the parameters after s updates, so step 0 is the
    initialisation); it saves only at ``steps`` and ignores the others. Use it as a context manager (or call
    :meth:`close`) so the asynchronous saves finish::

        with pj.CheckpointRecorder("ckpts", steps=range(0, 1001, 10)) as recorder:
            for step in range(1001):
                recorder.save(step, params)
                params, opt_state = update(params, opt_state, batches(step))

    Args:
      directory: the checkpoint directory (created if missing).
      steps: the steps to keep (POLCA's, e.g. every 10 steps, and Algorithm 1's).
    """

    def __init__(self, directory: str | Path, steps: Iterable[int]):
        self.steps = sorted({_step(s) for s in steps})
        if not self.steps:
            raise ValueError("CheckpointRecorder needs at least one step to save")
        self.directory = Path(directory).expanduser().absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"{self.directory} is a file, not a checkpoint directory")
        options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(PARAMS_ITEM,))
        self._wanted = set(self.steps)

    def save(self, step: int, params: PyTree) -> bool:
        """Save ``params`` as step ``step`` if it is one of ``steps``; returns whether it saved.

        A step already in the directory, or parameters holding NaN or inf, raise ``ValueError`` (nothing is saved).
        """
        step = _step(step)
        if step not in self._wanted:
            return False
        if step in self._manager.all_steps():
            raise ValueError(f"step {step} is already saved in {self.directory}; record a new run into a new "
                             "directory")
        check_finite_params(params, f"the parameters at step {step}")
        self._manager.save(step, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardSave(params)}))
        return True

    @property
    def missing(self) -> list[int]:
        """The steps not saved (yet)."""
        saved = set(self._manager.all_steps())
        return [s for s in self.steps if s not in saved]

    def wait(self) -> None:
        """Block until every save so far is on disk (saves run in the background)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for the saves to finish and release orbax's threads."""
        self.wait()
        self._manager.close()

    def __enter__(self) -> "CheckpointRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _step(step) -> int:
    if isinstance(step, bool) or not hasattr(step, "__index__") or step.__index__() < 0:
        raise ValueError(f"a checkpoint step must be a non-negative integer, got {step!r}")
    return step.__index__()
