"""Crash-safe files: every write goes to a temporary file in the same directory, then ``os.replace`` puts it in place.

A killed process therefore leaves either the old file or the new one under the final name, never a truncated one
(at worst a stray ``.NAME.*.tmp`` beside it). Every read failure is a ``ValueError`` that names the file.

What the kernels, :mod:`polca_jax.analysis` and the pipeline (its run directory, results and tasks) write and read
their files with; public for code of one's own that keeps files beside theirs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import uuid
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable

import numpy as np

from polca_jax.errors import CorruptRunDirectory, PolcaError

_HASH_BLOCK_BYTES = 1 << 24  # files are hashed 16 MiB at a time


OBJECT_STORES = ("gs://",)  # the URL schemes orbax writes checkpoints to besides local paths (tensorstore's gcs)


def storage_path(location: str | os.PathLike) -> Path:
    """A checkpoint directory's path: a local one user-expanded and absolute, or an object-store URL
    (``gs://bucket/dir``) as an ``etils.epath.Path``, which orbax and the file operations here read through gcsfs.

    Raises ``PolcaError`` for a URL scheme orbax cannot write arrays to (``s3://``: orbax's tensorstore specs know
    ``gs://`` and local files only) and for ``gs://`` without gcsfs installed (``pip install 'polca_jax[gcs]'``).
    """
    text = os.fspath(location)
    if "://" not in text:
        return Path(text).expanduser().absolute()
    if not text.startswith(OBJECT_STORES):
        raise PolcaError(f"{text}: checkpoints live on a local path or on {', '.join(OBJECT_STORES)} (orbax writes "
                         "their arrays through tensorstore, which it configures for Google Cloud Storage and local "
                         "files only); copy them to a local directory first")
    if importlib.util.find_spec("gcsfs") is None:  # etils.epath reads gs:// through it
        raise PolcaError(f"{text} is on Google Cloud Storage: reading and writing it needs gcsfs, "
                         "pip install 'polca_jax[gcs]'")
    import fsspec
    from etils import epath

    # gcsfs caches directory listings, and tensorstore writes orbax's arrays past it: listings made before a save
    # would hide it (the instance is the one etils.epath uses, fsspec caching it by its arguments)
    fsspec.filesystem("gs", finalize_on_close=True).invalidate_cache()
    return epath.Path(text)


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
        raise PolcaError(f"{path} is missing") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PolcaError(f"{path} cannot be read as JSON ({error}); it may be from an interrupted write") from error
    required = list(required)
    if required:
        missing = [key for key in required if not isinstance(value, dict) or key not in value]
        if missing:
            raise PolcaError(f"{path} lacks the field(s) {missing}")
    return value


def load_npy(path: str | Path, *, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load`` of a ``.npy`` file; raise ``ValueError`` naming the file if it is missing or not a ``.npy`` array,
    and :class:`CorruptRunDirectory` if its size is not the one its header's shape and dtype make
    (:func:`check_npy_size`, before anything maps it)."""
    path = Path(path)
    try:
        check_npy_size(path)
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except FileNotFoundError as error:
        raise PolcaError(f"{path} is missing") from error
    except CorruptRunDirectory:
        raise
    except (OSError, ValueError, EOFError) as error:
        raise PolcaError(f"{path} is not a readable .npy array ({error})") from error


def load_npz(path: str | Path, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz`` file (``names``, default every one) read into memory; ``PolcaError`` naming the
    file if it is missing, torn, not an ``.npz`` archive, holds pickled objects or lacks one of ``names``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {name: stored[name] for name in (stored.files if names is None else names)}
    except FileNotFoundError as error:
        raise PolcaError(f"{path} is missing") from error
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise PolcaError(f"{path} is not a readable .npz archive ({type(error).__name__}: {error}); it may be "
                         "from an interrupted write") from error


def npy_header(path: str | Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """The shape, dtype and data offset (header length in bytes) of the ``.npy`` file ``path``; ``ValueError`` if its
    header cannot be read."""
    with open(path, "rb") as file:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(file)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(file)
        else:
            shape, fortran_order, dtype = np.lib.format._read_array_header(file, version)
        return tuple(shape), dtype, file.tell()


def check_npy_size(path: str | Path) -> None:
    """Raise :class:`CorruptRunDirectory` unless the ``.npy`` file ``path`` is exactly as long as its header says (a
    truncated file would otherwise be padded with zeros by a writable memory map, or be read short). A header that
    cannot be read is a ``ValueError`` from :func:`npy_header`."""
    path = Path(path)
    shape, dtype, offset = npy_header(path)
    if dtype.hasobject:
        return  # object arrays are pickles, of no fixed size (polca_jax never writes them)
    expected = offset + math.prod(shape) * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise CorruptRunDirectory(
            f"{path} is {'truncated' if actual < expected else 'longer than its header says'}: its header describes "
            f"a {dtype} array of shape {shape}, {expected} bytes with the header, but the file has {actual} bytes "
            "(an interrupted copy or a full disk?); nothing was read from it. Delete the directory that holds it and "
            "compute it again (in a pipeline run: rerun the stage with --force)")


def file_digest(path: str | Path) -> str:
    """``"blake2b:<hex>"``, the BLAKE2b digest of the bytes of ``path`` (read a block at a time)."""
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as file:
        while block := file.read(_HASH_BLOCK_BYTES):
            digest.update(block)
    return f"blake2b:{digest.hexdigest()}"


def bytes_digest(*arrays: Any) -> str:
    """``"blake2b:<hex>"`` of the bytes of ``arrays`` (C order), each with its dtype and shape."""
    digest = hashlib.blake2b(digest_size=32)
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return f"blake2b:{digest.hexdigest()}"
