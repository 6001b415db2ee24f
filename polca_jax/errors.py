"""The errors polca_jax raises for a mistake in what it was given (an input, a setting, a file on disk).

Every refusal in polca_jax raises :class:`PolcaError` or one of its subclasses; it subclasses ``ValueError``, so
``except ValueError`` keeps working.
The ``polca`` command prints any of them as one paragraph and exits 2; any other exception is a bug in polca_jax
(exit 1, ``--debug`` shows the traceback).
"""

from __future__ import annotations


class PolcaError(ValueError):
    """A mistake in the input, the settings or the files polca_jax was given; the message says what to do.

    Every refusal of polca_jax raises it or one of its subclasses (a ``ValueError``, so ``except ValueError`` catches
    them too).

    Example:
      ``params``: the least squares of :func:`polca_jax.hvp`'s example (3 parameters).

      >>> try:
      ...     pj.random_basis(params, 5, jax.random.key(0))
      ... except pj.PolcaError as error:
      ...     print(isinstance(error, ValueError), error)
      True need 1 <= k <= 3 random directions, got 5
    """


class ResumeMismatch(PolcaError):
    """A stage's stored result was made from other inputs (checkpoints, loss, basis, settings) than this run's.

    Nothing is overwritten; the message names what changed and how to start afresh. Raised when resuming
    :func:`polca_jax.polca` (``out=``), a Hessian or gradient-covariance basis (``partial_dir=``) or a pipeline stage.
    """


class CorruptRunDirectory(PolcaError):
    """A file in a run or result directory is missing, truncated, or does not match its checksum.

    Raised when reading a result (:meth:`polca_jax.POLCAResult.load`, a resumed :func:`polca_jax.polca`), a partial
    basis, or a checkpoint whose save never finished (:class:`polca_jax.OrbaxCheckpoints`).
    """


class Interrupted(PolcaError):
    """A resumable computation stopped on request (SIGTERM) after a unit of work it keeps; the same call resumes.

    Raised by :func:`polca_jax.polca` with ``out=`` and the Hessian or gradient-covariance bases with ``partial_dir=``
    (so also by the pipeline's stages that run them).
    """


class TaskError(PolcaError):
    """An exception raised in the user's code (a task factory, a loss, a batch iterator), with the stage it ran in.

    The original exception is chained as ``__cause__``. Raised by the pipeline (:mod:`polca_jax.pipeline`).
    """


__all__ = ["CorruptRunDirectory", "Interrupted", "PolcaError", "ResumeMismatch", "TaskError"]
