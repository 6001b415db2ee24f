"""Telling an exception raised in the user's code (a task factory, a loss, a batch function) from one of polca_jax.

An exception whose traceback passes through a file outside polca_jax, the standard library and the installed
packages came from the user's code: it is raised again as :class:`polca_jax.TaskError`, naming the stage it ran in
and the innermost such frame (file:line), with the original chained as ``__cause__``.
"""

from __future__ import annotations

import contextlib
import site
import sysconfig
import traceback
from pathlib import Path

from polca_jax.errors import PolcaError, TaskError

_POLCA_JAX = Path(__file__).resolve().parent.parent


def _library_roots() -> tuple[str, ...]:
    paths = {sysconfig.get_paths()[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")}
    with contextlib.suppress(AttributeError):
        paths.update(site.getsitepackages())
    with contextlib.suppress(AttributeError):
        paths.add(site.getusersitepackages())
    return tuple(str(Path(path).resolve()) for path in paths if path) + (str(_POLCA_JAX),)


_LIBRARIES = _library_roots()


def is_user_file(filename: str) -> bool:
    """Whether ``filename`` is the user's code: not polca_jax, the standard library or an installed package."""
    if not filename or filename.startswith("<"):
        return False
    path = str(Path(filename).resolve())
    return not any(path == root or path.startswith(root.rstrip("/") + "/") for root in _LIBRARIES)


def user_frame(error: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of ``error``'s traceback in the user's code (None: it did not pass through any)."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if is_user_file(frame.filename)]
    return frames[-1] if frames else None


def as_task_error(error: Exception, where: str) -> TaskError | None:
    """``error`` as a :class:`TaskError` naming ``where`` (e.g. "the train stage") and the user's code location, or
    None when it did not come from the user's code (or is already a :class:`PolcaError`)."""
    if isinstance(error, PolcaError):
        return None
    frame = user_frame(error)
    if frame is None:
        return None
    message = str(error) or "(no message)"
    return TaskError(f"{where} failed in the task's code at {frame.filename}:{frame.lineno} (in {frame.name}): "
                     f"{type(error).__name__}: {message}; fix it there and run the same command again (finished "
                     "stages are kept)")


@contextlib.contextmanager
def user_code_errors(where: str):
    """Raise an exception from the user's code in the block as :class:`TaskError` (see :func:`as_task_error`)."""
    try:
        yield
    except TaskError as error:
        if getattr(error, "stage", None) is not None:
            raise
        wrapped = TaskError(f"{where}: {error}")  # raised by a check (Task.check) that does not know the stage
        wrapped.stage = where
        raise wrapped from (error.__cause__ or error)
    except Exception as error:
        wrapped = as_task_error(error, where)
        if wrapped is None:
            raise
        wrapped.stage = where
        raise wrapped from error
