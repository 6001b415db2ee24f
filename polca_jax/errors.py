"""The errors polca_jax raises for a mistake in what it was given (an input, a setting, a file on disk).

Every refusal in polca_jax raises :class:`PolcaError` or one of its subclasses; it subclasses ``ValueError``, so
``except ValueError`` keeps working.
The ``polca`` command prints any of them as one paragraph and exits 2; any other exception is a bug in polca_jax
(exit 1, ``--debug`` shows the traceback).
"""

from __future__ import annotations


class PolcaError(ValueError):
    """A mistake in the input, the settings or the files polca_jax was given; the message says what to do."""


class ResumeMismatch(PolcaError):
    """A stage's stored result was made from other inputs (checkpoints, loss, basis, settings) than this run's.

    Nothing is overwritten; the message names what changed and how to start afresh.
    """


class CorruptRunDirectory(PolcaError):
    """A file in a run or result directory is missing, truncated, or does not match its checksum."""


class Interrupted(PolcaError):
    """A resumable computation stopped on request (SIGTERM) after a unit of work it keeps; the same call resumes."""


class TaskError(PolcaError):
    """An exception raised in the user's code (a task factory, a loss, a batch iterator), with the stage it ran in.

    The original exception is chained as ``__cause__``.
    """


__all__ = ["CorruptRunDirectory", "Interrupted", "PolcaError", "ResumeMismatch", "TaskError"]
