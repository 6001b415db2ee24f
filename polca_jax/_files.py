"""Crash-safe files: every write goes to a temporary file in the same directory, then ``os.replace`` puts it in place.

A killed process therefore leaves either the old file or the new one under the final name, never a truncated one
(at worst a stray ``.NAME.*.tmp`` beside it). Every read failure is a ``ValueError`` that names the file.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Iterable

import numpy as np


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, flush and fsync it, then rename it to ``path``."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # permissions as open() would give
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (values JSON cannot hold are written as ``str``)."""
    text = json.dumps(obj, indent=2, default=str)
    write_atomic(path, lambda file: file.write(text.encode()))


def save_npy_atomic(path: str | Path, array: Any) -> None:
    """``np.save`` to ``path`` (which should end in ``.npy``) atomically."""
    write_atomic(path, lambda file: np.save(file, np.asarray(array)))


def save_npz_atomic(path: str | Path, **arrays: Any) -> None:
    """``np.savez`` of ``arrays`` to ``path`` (which should end in ``.npz``) atomically."""
    write_atomic(path, lambda file: np.savez(file, **arrays))


def read_json(path: str | Path, required: Iterable[str] = ()) -> Any:
    """The JSON value in ``path``; raise ``ValueError`` naming the file if it is missing or not valid JSON, or, when
    ``required`` keys are given, if it is not an object holding all of them."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ValueError(f"{path} is missing") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} cannot be read as JSON ({error}); it may be from an interrupted write") from error
    required = list(required)
    if required:
        missing = [key for key in required if not isinstance(value, dict) or key not in value]
        if missing:
            raise ValueError(f"{path} lacks the field(s) {missing}")
    return value


def load_npy(path: str | Path, *, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load`` of a ``.npy`` file; raise ``ValueError`` naming the file if it is missing or not a ``.npy`` array."""
    path = Path(path)
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except FileNotFoundError as error:
        raise ValueError(f"{path} is missing") from error
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"{path} is not a readable .npy array ({error})") from error
