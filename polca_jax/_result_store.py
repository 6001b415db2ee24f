"""The arrays of a :func:`polca_jax.polca` run, filled one checkpoint at a time: in memory, or streamed to fixed-size
memory-mapped ``.npy`` files with a progress record, so that a killed run resumes at its first unfinished
checkpoint and a resumed run can never mix two computations or trust a damaged file."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import numpy as np

from polca_jax._distributed import is_writer, sync
from polca_jax.files import bytes_digest, check_npy_size, read_json, save_npy_atomic, write_json_atomic
from polca_jax.fingerprints import digests_differ
from polca_jax._result import (
    ARRAYS,
    FORMAT_VERSION,
    INTERVAL_ARRAYS,
    MANIFEST,
    POLCAResult,
    file_checksums,
    write_manifest,
)
from polca_jax.errors import CorruptRunDirectory, PolcaError, ResumeMismatch

PROGRESS = "progress.json"
CURVATURE = "curvature"  # bᵀH(x)b [2, N, K] of the last two checkpoints (row t % 2), kept only while computing


class ResultRows:
    """The arrays of a result, filled one checkpoint at a time by :func:`polca`: numpy arrays in memory, or, with a
    directory, fixed-size memory-mapped ``.npy`` files there and a progress record (``progress.json``: the
    computation's fingerprint and how many checkpoints are complete) written after the rows it counts are flushed.

    Row t of ``loss``, ``projections`` and (row t % 2) of ``curvature`` is checkpoint t's; row t-1 of the interval
    arrays is written with checkpoint t. A file is created with its first row and opened again by a resumed run.
    In a multi-process run process 0 writes the directory and every process reads it (a file system they share).
    """

    def __init__(self, directory: str | Path | None, num_checkpoints: int):
        self.directory = None if directory is None else Path(directory)
        self.num_checkpoints = num_checkpoints
        self.arrays: dict[str, np.ndarray] = {}
        self.complete = 0  # checkpoints whose rows are written
        self.finished = False  # the directory holds a complete result (a manifest)
        self.fingerprint: dict | None = None
        self.checkpoint_digests: list[str] = []  # the digest of each complete checkpoint's parameters
        self.row_digests: list[str] = []  # the checksum of each complete checkpoint's rows, as written
        self._saved: dict | None = None  # the directory's record (manifest or progress)
        if self.directory is None:
            return
        if self.directory.exists() and not self.directory.is_dir():
            raise PolcaError(f"out={self.directory} is a file, not a directory: give polca a directory to write the "
                             "result to (a new one, or the one of a run to resume); nothing was changed")
        manifest, progress = self.directory / MANIFEST, self.directory / PROGRESS
        if manifest.exists():
            self._saved = self._read_record(manifest, "config")
            if "fingerprint" not in self._saved:
                raise PolcaError(
                    f"{self.directory} holds a POLCA result saved without the fingerprint of its computation "
                    "(POLCAResult.save), so polca cannot tell whether it is this one: read it with POLCAResult.load, "
                    f"or {self._start_over}")
            self.finished, self.complete = True, num_checkpoints
        elif progress.exists():
            self._saved = self._read_record(progress, "complete")
            self.complete = self._saved["complete"]
            if not isinstance(self.complete, int) or isinstance(self.complete, bool) or self.complete < 1:
                raise PolcaError(f"{progress} is corrupt: 'complete' must be a positive number of checkpoints, got "
                                 f"{self.complete!r}; {self._start_over}")
        if self._saved is not None:
            digests = self._saved.get("checkpoints", [])
            self.checkpoint_digests = list(digests) if isinstance(digests, list) else []
            rows = self._saved.get("rows", []) if not self.finished else []
            self.row_digests = list(rows) if isinstance(rows, list) else []
        if self._saved is not None and not isinstance(self._saved.get("fingerprint"), dict):
            raise PolcaError(f"{manifest if self.finished else progress} is corrupt: it holds no fingerprint object; "
                             f"{self._start_over}")

    @property
    def _start_over(self) -> str:
        return (f"remove {self.directory} to start over (in a pipeline run: redo the decompose stage with --force); "
                "nothing was changed")

    def _read_record(self, path: Path, required: str) -> dict:
        try:
            return read_json(path, required=[required])
        except ValueError as error:
            raise PolcaError(f"cannot resume the POLCA result in {self.directory}: {error}; {self._start_over}") \
                from error

    def bind(self, fingerprint: dict) -> None:
        """Check that the directory's partial or complete result (if any) is of the computation ``fingerprint``
        describes; raise ``ValueError`` naming what differs, having changed nothing."""
        self.fingerprint = fingerprint
        if self._saved is None:
            return
        what = "complete" if self.finished else "partial"
        saved = self._saved["fingerprint"]
        differences = [_describe_difference(key, saved.get(key), fingerprint.get(key))
                       for key in sorted(set(saved) | set(fingerprint)) if saved.get(key) != fingerprint.get(key)]
        if differences:
            raise ResumeMismatch(f"{self.directory} holds a {what} POLCA result of another computation: "
                             f"{'; '.join(differences)}; {self._start_over}")
        if self.complete > self.num_checkpoints:
            raise PolcaError(f"{self.directory / PROGRESS} is corrupt: it counts {self.complete} complete checkpoints "
                             f"of {self.num_checkpoints}; {self._start_over}")
        if not self.finished:
            self._verify_rows()

    def _verify_rows(self) -> None:
        """Raise :class:`CorruptRunDirectory` unless every row the progress record counts as complete is on disk as
        it was written (the checksum recorded when its checkpoint was flushed); the curvature rows are not checked."""
        progress = self.directory / PROGRESS
        if len(self.row_digests) < self.complete:
            raise CorruptRunDirectory(
                f"{progress} is corrupt: it counts {self.complete} complete checkpoints but holds the checksums of "
                f"the rows of {len(self.row_digests)} (written by an earlier polca_jax, or edited); resuming could "
                f"leave rows that were never computed; {self._start_over}")
        for t in range(self.complete):
            if self._row_digest(t) != self.row_digests[t]:
                names = ", ".join(f"{name}.npy" for name in self._row_names(t))
                raise CorruptRunDirectory(
                    f"the rows of checkpoint {t} in {self.directory} ({names}) do not match the checksum {progress} "
                    f"recorded when they were written: the files changed since; {self._start_over}")

    def _row_names(self, t: int) -> list[str]:
        return ["loss", "projections"] + (list(INTERVAL_ARRAYS) if t > 0 else [])

    def _row_digest(self, t: int) -> str:
        """The checksum of checkpoint t's rows as stored (loss, projections and, from t = 1, interval t-1's)."""
        return bytes_digest(*(self._array(name)[t - 1 if name in INTERVAL_ARRAYS else t]
                              for name in self._row_names(t)))

    def check_checkpoint(self, t: int, step: int, digest: str) -> None:
        """Raise ``ResumeMismatch`` when checkpoint t, read again by a resumed (or loaded) result, is not the one its
        rows were computed from (the checkpoints were re-recorded or replaced)."""
        saved = self.checkpoint_digests[t] if t < len(self.checkpoint_digests) else None
        if self._saved is not None and digests_differ(saved, digest):
            raise ResumeMismatch(
                f"the checkpoint at step {step} differs from the one the {'complete' if self.finished else 'partial'} "
                f"POLCA result in {self.directory} was computed from (the checkpoints were re-recorded or replaced): "
                f"its rows would mix two trainings; {self._start_over}")

    def read(self, name: str, t: int) -> np.ndarray:
        """Checkpoint t's row of ``projections`` or ``curvature``, written before (a copy)."""
        return np.array(self._array(name)[t % 2 if name == CURVATURE else t])

    def write(self, t: int, row: dict[str, np.ndarray], digest: str) -> None:
        """Store checkpoint t's rows (and those of interval t-1), then count checkpoint t as complete; in a
        multi-process run only process 0 stores rows in a directory."""
        if self.directory is not None and not is_writer():
            self.complete = t + 1
            return
        for name, value in row.items():
            index = t % 2 if name == CURVATURE else t - 1 if name in INTERVAL_ARRAYS else t
            self._array(name, value)[index] = value
        self.checkpoint_digests[t:] = [digest]
        self.complete = t + 1
        if self.directory is not None:
            for array in self.arrays.values():
                array.flush()
            self.row_digests[t:] = [self._row_digest(t)]
            record = {"format": FORMAT_VERSION, "complete": self.complete, "fingerprint": self.fingerprint}
            record["checkpoints"] = self.checkpoint_digests
            record["rows"] = self.row_digests  # the checksum of each complete checkpoint's rows, verified on resume
            write_json_atomic(self.directory / PROGRESS, record)

    def finish(self, steps: np.ndarray, config: dict) -> POLCAResult:
        """The result, once every checkpoint is complete; in a directory: ``steps.npy`` and the manifest are written
        (the manifest last), the progress record and the curvature file removed, and the result loaded from there."""
        computed = [name for name in ARRAYS if name != "steps"]
        if self.directory is None:
            return POLCAResult(steps=steps, config=config, **{name: self.arrays[name] for name in computed})
        if is_writer():
            shapes = {name: self._array(name).shape for name in computed}
            self.arrays.clear()  # closes the memory maps
            save_npy_atomic(self.directory / "steps.npy", steps)
            write_manifest(self.directory, config, {"steps": steps.shape, **shapes}, self.fingerprint,
                            checkpoint_digests=self.checkpoint_digests, checksums=file_checksums(self.directory))
            (self.directory / PROGRESS).unlink(missing_ok=True)
            (self.directory / f"{CURVATURE}.npy").unlink(missing_ok=True)
        sync("polca_jax polca written")  # the other processes read process 0's files (a shared file system)
        return POLCAResult.load(self.directory, verify=False)  # its checksums were just taken from these files

    def _array(self, name: str, first_row: np.ndarray | None = None) -> np.ndarray:
        """The array ``name``: opened from its file when a finished checkpoint wrote to it, else made for rows like
        ``first_row``."""
        if name not in self.arrays:
            first_checkpoint = 1 if name in INTERVAL_ARRAYS else 0
            rows = 2 if name == CURVATURE else self.num_checkpoints - first_checkpoint
            if self.complete > first_checkpoint:
                self.arrays[name] = self._open(name, rows)
            else:
                shape, dtype = (rows, *np.shape(first_row)), np.result_type(first_row)
                if self.directory is None:
                    self.arrays[name] = np.empty(shape, dtype)
                else:
                    self.arrays[name] = self._allocate(name, shape, dtype)
        return self.arrays[name]

    def _allocate(self, name: str, shape: tuple, dtype) -> np.memmap:
        """A new memory-mapped ``.npy`` file, its disk space reserved now: a full disk is an error here, not a
        SIGBUS when a later row is written."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{name}.npy"
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        if hasattr(os, "posix_fallocate"):
            with open(path, "r+b") as file:
                try:
                    os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
                except OSError as error:
                    if error.errno == errno.ENOSPC:
                        raise PolcaError(f"no room on the disk for {path} ({os.fstat(file.fileno()).st_size} "
                                         "bytes): free some space or choose another out directory") from error
                    # a file system that cannot reserve space: the rows are written as they come
        return array

    def _open(self, name: str, rows: int) -> np.ndarray:
        path = self.directory / f"{name}.npy"
        try:
            check_npy_size(path)  # a writable memory map would pad a truncated file with zeros
            array = np.lib.format.open_memmap(path, mode="r+")
        except CorruptRunDirectory as error:
            raise CorruptRunDirectory(f"cannot resume the POLCA result in {self.directory}: {error}") from error
        except (OSError, ValueError) as error:
            raise PolcaError(f"cannot resume the POLCA result in {self.directory}: {path} cannot be opened "
                             f"({error}); {self._start_over}") from error
        if len(array) != rows:
            raise PolcaError(f"cannot resume the POLCA result in {self.directory}: {path} has shape {array.shape}, "
                             f"not {rows} rows; {self._start_over}")
        return array


def _describe_difference(key: str, saved: Any, now: Any) -> str:
    """A part of the fingerprint that differs from the saved one, in words."""
    if key == "basis" and isinstance(saved, dict):
        parts = [part for part in now if saved.get(part) != now[part]]
        return f"the basis differs (its {', '.join(parts)})"
    if key == "steps":
        return "the steps differ"
    if key in ("basis", "batch", "mask"):
        return f"the {key} differs"
    if key == "per_sample_loss":
        return "the per-sample loss function differs (its code or the arrays it captures)"
    return f"{key} differs ({saved!r} on disk, {now!r} now)"
