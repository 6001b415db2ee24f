"""The POLCA decomposition (paper Eqs. 2–8) over a sequence of checkpoints, and its on-disk result.

For checkpoints θ_0..θ_{T-1}, samples x and basis directions b, with g_t(x) = ⟨b, ∇L(x; θ_t)⟩ and the projected
step s_t = ⟨b, θ_{t+1} − θ_t⟩:

* first order (Eq. 2): g_t(x) · s_t
* second order, by ``second_order=``:
  - ``"none"``: 0
  - ``"paper"`` (Eqs. 4–5): ½ λ(X,b) s_t² · Δg(x) / Δg(X), with Δg = g_{t+1} − g_t and Δg(X) its mean over the
    samples (the aggregate loss is the mean, matching the Hessian of ``hessian_basis``'s mean loss). λ(X,b) is the
    eigenvalue stored with the basis vector when it was found (``eigenvalues="stored"``, the paper's "keeping track
    of the eigenvalues"), or bᵀH_t(X)b recomputed at every checkpoint as the mean per-sample curvature on the
    evaluated samples (``eigenvalues="current"``). Where |Δg(X)| is below 1e-12 times its largest value over the
    directions in the same interval, the term is 0.
    By construction the terms of one step sum over the samples to N · ½ λ s_t² ≥ 0 for a positive eigenvalue; with
    a stored eigenvalue that is larger than the direction's later curvature (and large steps), this positive term
    can outweigh the first-order one and make every direction fail the oscillation filter — ``"current"``,
    ``"trapezoid"`` or ``"exact"`` then track the actual curvature.
  - ``"trapezoid"``: ½ s_t · Δg(x) (what ``"paper"`` becomes when Δg(X) = λ s_t holds exactly); no eigenvalue.
  - ``"exact"`` (Eq. 3): ½ bᵀH_t(x)b · s_t², with the exact per-sample curvature (forward-over-forward AD).
* projected loss (Eq. 8): L_b(x, θ_t) = Σ_{i<t} POLCA(x, b; θ_i), so ``projected_loss[0] == 0``.

Every term of interval t depends only on checkpoints t and t+1, so :func:`polca` can write each checkpoint's rows as
soon as they are computed (to memory-mapped files with ``out=``) and resume a killed run at its first unfinished
checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import functools
import hashlib
import math
import operator
import os
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from polca_jax import _tree as tree
from polca_jax._basis import Basis, check_width
from polca_jax._checkpoints import OrbaxCheckpoints
from polca_jax._checks import (
    batch_size,
    check_finite,
    check_finite_params,
    check_params,
    check_same_structure,
    checkpoint_steps,
)
from polca_jax._distributed import is_writer, sync, to_host
from polca_jax.errors import CorruptRunDirectory, PolcaError, ResumeMismatch
from polca_jax._fingerprints import loss_digest, params_digest
from polca_jax._files import (
    bytes_digest,
    check_npy_size,
    file_digest,
    load_npy,
    read_json,
    save_npy_atomic,
    write_json_atomic,
)
from polca_jax._progress import progress_bar
from polca_jax._projections import PerSampleLossFn, projections_curvature_and_losses
from polca_jax._sharding import check_mesh, shard_params

PyTree = Any
SecondOrder = Literal["none", "paper", "trapezoid", "exact"]
SECOND_ORDER_CHOICES = ("none", "paper", "trapezoid", "exact")
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
_ARRAYS = ("steps", "loss", "projections", "step_projection", "second_order", "outside_fraction")
_INTERVAL_ARRAYS = ("step_projection", "second_order", "outside_fraction")  # row t-1 is written at checkpoint t
_CURVATURE = "curvature"  # bᵀH(x)b [2, N, K] of the last two checkpoints (row t % 2), kept only while computing
_DIGEST_BLOCK_BYTES = 1 << 26  # the basis is copied to the host for its digest 64 MiB at a time


@dataclasses.dataclass(eq=False)
class POLCAResult:
    """POLCA over T checkpoints, N samples and K directions (arrays are numpy, memory-mapped when loaded or when
    :func:`polca` streamed the result to a directory).

    Attributes:
      steps: ``[T]`` training step of each checkpoint.
      loss: ``[T, N]`` exact per-sample loss L(x; θ_t).
      projections: ``[T, N, K]`` projected per-sample gradients ⟨b, ∇L(x; θ_t)⟩.
      step_projection: ``[T-1, K]`` projected steps ⟨b, θ_{t+1} − θ_t⟩.
      second_order: ``[T-1, N, K]`` second-order terms (zeros for ``"none"``).
      outside_fraction: ``[T-1]`` fraction of ‖θ_{t+1} − θ_t‖² outside the basis span.
      config: how the result was computed (second_order, method, basis method, ...).
    """

    steps: np.ndarray
    loss: np.ndarray
    projections: np.ndarray
    step_projection: np.ndarray
    second_order: np.ndarray
    outside_fraction: np.ndarray
    config: dict

    def __post_init__(self):
        t, n, k = self.projections.shape
        expected = {
            "steps": (t,),
            "loss": (t, n),
            "step_projection": (t - 1, k),
            "second_order": (t - 1, n, k),
            "outside_fraction": (t - 1,),
        }
        for name, shape in expected.items():
            if np.shape(getattr(self, name)) != shape:
                raise ValueError(f"POLCAResult.{name} must have shape {shape}, got {np.shape(getattr(self, name))}")

    @property
    def first_order(self) -> np.ndarray:
        """``[T-1, N, K]`` first-order terms g_t(x) · s_t (Eq. 2)."""
        return self.projections[:-1] * self.step_projection[:, None, :]

    @property
    def terms(self) -> np.ndarray:
        """``[T-1, N, K]`` POLCA(x, b; θ_t), first plus second order (Eq. 7)."""
        return self.first_order + self.second_order

    @functools.cached_property
    def projected_loss(self) -> np.ndarray:
        """``[T, N, K]`` cumulative projected loss L_b(x, θ_t) (Eq. 8); row 0 is zero."""
        return _cumulative(self.terms)

    def projected_loss_with(self, second_order: SecondOrder, eigenvalues=None) -> np.ndarray:
        """``[T, N, K]`` projected loss under another second-order rule, from the stored arrays (no recomputation).

        second_order: ``"none"``, ``"trapezoid"`` or ``"paper"``; the last needs ``eigenvalues`` ``[K]`` (e.g. the
        basis' stored ones). ``"exact"`` needs per-sample curvature, which a result does not store.
        """
        if second_order not in ("none", "trapezoid", "paper"):
            raise ValueError(f"second_order must be 'none', 'trapezoid' or 'paper' from stored arrays, got "
                             f"{second_order!r}")
        if second_order == "paper" and eigenvalues is None:
            raise ValueError("second_order='paper' needs eigenvalues [K]")
        g, s = self.projections, self.step_projection
        second = np.stack([_second_order_term(second_order, g[t], g[t + 1], s[t], None, eigenvalues)
                           for t in range(len(s))])
        return _cumulative(self.first_order + second)

    @property
    def loss_change(self) -> np.ndarray:
        """``[T-1, N]`` true per-sample loss change L(x; θ_{t+1}) − L(x; θ_t)."""
        return np.diff(self.loss, axis=0)

    @property
    def decomposed_change(self) -> np.ndarray:
        """``[T-1, N]`` Σ_b POLCA(x, b; θ_t): the part of the loss change the basis accounts for."""
        return self.terms.sum(axis=-1)

    def save(self, directory: str | Path) -> None:
        """Write each array as ``.npy``, then a ``manifest.json`` (config, shapes, package versions).

        Every file is written atomically and the manifest last, after removing an old one: a directory with a
        manifest holds a complete save, and saving over an earlier save (even the one this result was
        memory-mapped from) replaces it cleanly.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST).unlink(missing_ok=True)
        for name in _ARRAYS:
            save_npy_atomic(directory / f"{name}.npy", getattr(self, name))
        _write_manifest(directory, self.config, {name: np.shape(getattr(self, name)) for name in _ARRAYS},
                        checksums=_file_checksums(directory))

    @classmethod
    def load(cls, directory: str | Path, *, mmap: bool = True, verify: bool = True) -> "POLCAResult":
        """Read a result written by :meth:`save` or :func:`polca` (memory-mapped by default); raise ``ValueError``
        naming the file that is missing, unreadable or of the wrong shape, and :class:`polca_jax.CorruptRunDirectory`
        for a file whose size does not match its header (checked before it is mapped) or, with ``verify`` (the
        default), whose bytes do not match the checksum the manifest recorded when it was written (a result saved by
        a polca_jax without checksums is not verified). ``verify=False`` skips reading every byte, for a huge result
        known to be intact."""
        directory = Path(directory)
        try:
            manifest = read_json(directory / MANIFEST, required=("config", "shapes"))
            arrays = {name: load_npy(directory / f"{name}.npy", mmap_mode="r" if mmap else None) for name in _ARRAYS}
        except CorruptRunDirectory:
            raise
        except ValueError as error:
            raise ValueError(f"cannot read a POLCA result from {directory}: {error}") from error
        shapes = manifest["shapes"] if isinstance(manifest["shapes"], dict) else {}
        for name in _ARRAYS:
            if list(arrays[name].shape) != shapes.get(name):
                raise CorruptRunDirectory(
                    f"corrupt POLCA result in {directory}: {directory / name}.npy has shape {arrays[name].shape}, "
                    f"but {MANIFEST} says {shapes.get(name)}"
                )
        checksums = manifest.get("checksums")
        if verify and isinstance(checksums, dict):
            for name in _ARRAYS:
                path = directory / f"{name}.npy"
                if checksums.get(name) != file_digest(path):
                    raise CorruptRunDirectory(
                        f"{path} does not match the checksum {MANIFEST} recorded when the result was written (a "
                        f"byte of it changed since); the POLCA result in {directory} cannot be trusted: delete the "
                        "directory and compute it again (in a pipeline run: rerun the decompose stage with --force)")
        return cls(config=manifest["config"], **arrays)


def polca(
    per_sample_loss_fn: PerSampleLossFn,
    checkpoints: Sequence[PyTree] | str | Path,
    batch: PyTree,
    basis: Basis,
    *,
    second_order: SecondOrder = "paper",
    eigenvalues: Literal["stored", "current"] = "stored",
    steps: Sequence[int] | None = None,
    mask: np.ndarray | None = None,
    method: str = "auto",
    chunk_size: int | None = None,
    chunks_per_call: int = 1,
    basis_chunk_size: int = 8,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
    out: str | Path | None = None,
) -> POLCAResult:
    """Decompose every sample's loss change between consecutive checkpoints along every basis direction.

    Args:
      per_sample_loss_fn: ``(params, batch) -> [n_seq]`` or ``[n_seq, n_tok]`` per-sample losses.
      checkpoints: T ≥ 2 params pytrees in training order, or an orbax checkpoint directory (then ``steps``
        chooses the steps; default all).
      batch: the evaluation samples (leaves with a leading ``n_seq`` axis).
      basis: orthonormal :class:`Basis` of K directions.
      second_order: ``"none" | "paper" | "trapezoid" | "exact"`` (see the module docstring).
      eigenvalues: for ``"paper"``: ``"stored"`` (the basis' own eigenvalues) or ``"current"`` (bᵀH_t(X)b).
      steps: training step of each checkpoint (default: the store's steps, else 0..T-1).
      mask, method, chunk_size, chunks_per_call, basis_chunk_size, mesh: as in :func:`per_sample_projections`.
      progress: show a progress bar over checkpoints.
      out: a directory to stream the result to. Without it the result is held in memory. With it, every array is
        a fixed-size memory-mapped ``.npy`` file there, each checkpoint's rows are flushed as soon as they are
        computed, then ``progress.json`` records how many checkpoints are complete (with a fingerprint of the
        computation: basis, options, steps, samples); when all are, ``manifest.json`` is written last and the
        result is returned as :meth:`POLCAResult.load` reads it (memory-mapped): no ``[T, N, K]`` array is held in
        memory. A ``progress.json`` in ``out`` (a killed run) is resumed from its first unfinished checkpoint (only
        the last finished one is read again, for the step), with the same result bit for bit; a complete result in
        ``out`` is loaded, not recomputed. Either must come from the same computation (chunk sizes and the mesh may
        change), else ``ValueError`` names what differs and nothing is changed; remove ``out`` to start over.
        ``progress.json`` also holds a checksum of each complete checkpoint's rows and the manifest one of each
        finished file: a file truncated, changed or over-counted since is refused before any work
        (:class:`polca_jax.CorruptRunDirectory`), never padded or read as zeros.

    Raises ``ValueError`` (before any work where it can) for unknown options, an empty batch, fewer than two
    checkpoints, steps that do not strictly increase, checkpoints that are not a sequence or differ in structure,
    parameters that are not floating point, a basis that is not orthonormal or of the wrong width, an ``out`` that
    holds another computation or an unreadable progress record; and, at the checkpoint where it happens, for NaN
    parameters, NaN per-sample losses, and NaN projected gradients or curvatures (a loss that is finite where its
    gradient is not).
    """
    if second_order not in SECOND_ORDER_CHOICES:
        raise ValueError(f"second_order must be one of {SECOND_ORDER_CHOICES}, got {second_order!r}")
    if eigenvalues not in ("stored", "current"):
        raise ValueError(f"eigenvalues must be 'stored' or 'current', got {eigenvalues!r}")
    batch_size(batch, "polca")
    check_mesh(mesh, "polca")
    if isinstance(checkpoints, str | Path):
        with OrbaxCheckpoints(checkpoints, steps) as store:
            return polca(
                per_sample_loss_fn, store, batch, basis, second_order=second_order, eigenvalues=eigenvalues,
                mask=mask, method=method, chunk_size=chunk_size, chunks_per_call=chunks_per_call,
                basis_chunk_size=basis_chunk_size, mesh=mesh, progress=progress, out=out,
            )
    steps = np.asarray(checkpoint_steps(checkpoints, steps, "polca", increasing=True))
    if len(checkpoints) < 2:
        raise ValueError(f"POLCA needs at least two checkpoints, got {len(checkpoints)}")
    if not isinstance(basis, Basis):
        raise ValueError("basis must be a polca_jax.Basis (make one with basis_from_matrix)")
    basis.check_orthonormal()
    needs_curvature = second_order == "exact" or (second_order == "paper" and eigenvalues == "current")
    if second_order == "paper" and eigenvalues == "stored" and not np.all(np.isfinite(basis.eigenvalues)):
        raise ValueError(
            f"second_order='paper' needs the basis' eigenvalues, but this {basis.method!r} basis has none; "
            "use eigenvalues='current', second_order='trapezoid' or 'exact'"
        )

    count = len(steps)
    rows = _ResultRows(out, count)
    start = min(rows.complete, count)  # the first unfinished checkpoint
    first_index = max(start - 1, 0)  # a resumed run reads its last finished checkpoint again, for the step
    first = checkpoints[first_index]
    check_params(first, f"polca: checkpoint at step {steps[first_index]}")
    check_width(basis, first)
    config = {
        "second_order": second_order,
        "eigenvalues": eigenvalues if second_order == "paper" else None,
        "method": method,
        "basis_method": basis.method,
        "basis_size": basis.size,
        "basis_steps": basis.steps.tolist(),
        "num_params": basis.dim,
    }
    if out is not None:
        rows.bind(_fingerprint(per_sample_loss_fn, first, batch, basis, config, steps, mask, mesh))
        rows.check_checkpoint(first_index, steps[first_index], params_digest(first))
        sync("polca_jax polca bound")  # every process has read the directory before process 0 writes to it
        if rows.finished:
            return POLCAResult.load(out)

    kernel_options = dict(
        mask=mask, chunk_size=chunk_size, chunks_per_call=chunks_per_call, basis_chunk_size=basis_chunk_size,
        mesh=mesh,
    )
    reads = _read_ahead(checkpoints, first_index, first, count)  # checkpoint t+1 is restored while t is decomposed
    previous = previous_g = previous_c = None
    if start > 0:
        previous = _prepared(next(reads), first, f"checkpoint at step {steps[first_index]}", mesh)
        previous_g = rows.read("projections", first_index)
        previous_c = rows.read(_CURVATURE, first_index) if needs_curvature else None
    checkpoint_range = progress_bar(range(start, count), progress, desc="POLCA checkpoints", initial=start,
                                    total=count)
    for t, params in zip(checkpoint_range, reads):
        what = f"checkpoint at step {steps[t]}"
        params = _prepared(params, first, what, mesh)
        # One pass gives the losses with the projections (and curvatures): no separate loss pass.
        g, c, loss = projections_curvature_and_losses(
            "polca", per_sample_loss_fn, params, batch, basis, method=method, curvature=needs_curvature,
            **kernel_options,
        )
        loss = to_host(loss)
        check_finite(loss, f"polca: the per-sample loss at {what}", "check per_sample_loss_fn on these samples")
        row = {"loss": loss}
        if needs_curvature:
            row[_CURVATURE] = _finite_terms(c, "curvatures bᵀH(x)b", what)
        row["projections"] = _finite_terms(g, "projected gradients ⟨b, ∇L(x)⟩", what)
        if previous is not None:
            coordinates, total = _step_coordinates(basis, params, previous)
            row["step_projection"] = coordinates
            row["outside_fraction"] = np.float64(
                0.0 if total == 0 else max(0.0, 1.0 - float(coordinates @ coordinates) / total))
            row["second_order"] = _second_order_term(
                second_order, previous_g, row["projections"], coordinates, previous_c, basis.eigenvalues)
        rows.write(t, row, params_digest(params))
        previous, previous_g, previous_c = params, row["projections"], row.get(_CURVATURE)
    return rows.finish(steps, config)


class _ResultRows:
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
        self.checkpoint_digests: list[str | None] = []  # the digest of each complete checkpoint's parameters
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
                raise ValueError(
                    f"{self.directory} holds a POLCA result saved without the fingerprint of its computation "
                    "(POLCAResult.save), so polca cannot tell whether it is this one: read it with POLCAResult.load, "
                    f"or {self._start_over}")
            self.finished, self.complete = True, num_checkpoints
        elif progress.exists():
            self._saved = self._read_record(progress, "complete")
            self.complete = self._saved["complete"]
            if not isinstance(self.complete, int) or isinstance(self.complete, bool) or self.complete < 1:
                raise ValueError(f"{progress} is corrupt: 'complete' must be a positive number of checkpoints, got "
                                 f"{self.complete!r}; {self._start_over}")
        if self._saved is not None:
            digests = self._saved.get("checkpoints", [])
            self.checkpoint_digests = list(digests) if isinstance(digests, list) else []
            rows = self._saved.get("rows", []) if not self.finished else []
            self.row_digests = list(rows) if isinstance(rows, list) else []
        if self._saved is not None and not isinstance(self._saved.get("fingerprint"), dict):
            raise ValueError(f"{manifest if self.finished else progress} is corrupt: it holds no fingerprint object; "
                             f"{self._start_over}")

    @property
    def _start_over(self) -> str:
        return (f"remove {self.directory} to start over (in a pipeline run: redo the decompose stage with --force); "
                "nothing was changed")

    def _read_record(self, path: Path, required: str) -> dict:
        try:
            return read_json(path, required=[required])
        except ValueError as error:
            raise ValueError(f"cannot resume the POLCA result in {self.directory}: {error}; {self._start_over}") \
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
            raise ValueError(f"{self.directory / PROGRESS} is corrupt: it counts {self.complete} complete checkpoints "
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
        return ["loss", "projections"] + (list(_INTERVAL_ARRAYS) if t > 0 else [])

    def _row_digest(self, t: int) -> str:
        """The checksum of checkpoint t's rows as stored (loss, projections and, from t = 1, interval t-1's)."""
        return bytes_digest(*(self._array(name)[t - 1 if name in _INTERVAL_ARRAYS else t]
                              for name in self._row_names(t)))

    def check_checkpoint(self, t: int, step: int, digest: str | None) -> None:
        """Raise ``ResumeMismatch`` when checkpoint t, read again by a resumed (or loaded) result, is not the one its
        rows were computed from (the checkpoints were re-recorded or replaced)."""
        saved = self.checkpoint_digests[t] if t < len(self.checkpoint_digests) else None
        if self._saved is not None and saved is not None and digest is not None and saved != digest:
            raise ResumeMismatch(
                f"the checkpoint at step {step} differs from the one the {'complete' if self.finished else 'partial'} "
                f"POLCA result in {self.directory} was computed from (the checkpoints were re-recorded or replaced): "
                f"its rows would mix two trainings; {self._start_over}")

    def read(self, name: str, t: int) -> np.ndarray:
        """Checkpoint t's row of ``projections`` or ``curvature``, written before (a copy)."""
        return np.array(self._array(name)[t % 2 if name == _CURVATURE else t])

    def write(self, t: int, row: dict[str, np.ndarray], digest: str | None = None) -> None:
        """Store checkpoint t's rows (and those of interval t-1), then count checkpoint t as complete; in a
        multi-process run only process 0 stores rows in a directory."""
        if self.directory is not None and not is_writer():
            self.complete = t + 1
            return
        for name, value in row.items():
            index = t % 2 if name == _CURVATURE else t - 1 if name in _INTERVAL_ARRAYS else t
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
        computed = [name for name in _ARRAYS if name != "steps"]
        if self.directory is None:
            return POLCAResult(steps=steps, config=config, **{name: self.arrays[name] for name in computed})
        if is_writer():
            shapes = {name: self._array(name).shape for name in computed}
            self.arrays.clear()  # closes the memory maps
            save_npy_atomic(self.directory / "steps.npy", steps)
            _write_manifest(self.directory, config, {"steps": steps.shape, **shapes}, self.fingerprint,
                            checkpoint_digests=self.checkpoint_digests, checksums=_file_checksums(self.directory))
            (self.directory / PROGRESS).unlink(missing_ok=True)
            (self.directory / f"{_CURVATURE}.npy").unlink(missing_ok=True)
        sync("polca_jax polca written")  # the other processes read process 0's files (a shared file system)
        return POLCAResult.load(self.directory, verify=False)  # its checksums were just taken from these files

    def _array(self, name: str, first_row: np.ndarray | None = None) -> np.ndarray:
        """The array ``name``: opened from its file when a finished checkpoint wrote to it, else made for rows like
        ``first_row``."""
        if name not in self.arrays:
            first_checkpoint = 1 if name in _INTERVAL_ARRAYS else 0
            rows = 2 if name == _CURVATURE else self.num_checkpoints - first_checkpoint
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
                        raise ValueError(f"no room on the disk for {path} ({os.fstat(file.fileno()).st_size} "
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
            raise ValueError(f"cannot resume the POLCA result in {self.directory}: {path} cannot be opened "
                             f"({error}); {self._start_over}") from error
        if len(array) != rows:
            raise ValueError(f"cannot resume the POLCA result in {self.directory}: {path} has shape {array.shape}, "
                             f"not {rows} rows; {self._start_over}")
        return array


def _fingerprint(per_sample_loss_fn, params, batch, basis: Basis, config: dict, steps, mask, mesh) -> dict:
    """What decides the numbers of a :func:`polca` run (besides its checkpoints and loss function), as JSON: the
    basis (method, K, P, digests of its vectors and eigenvalues), the second-order rule and projection method, the
    steps, the number of samples N and digests of the batch and mask."""
    if mask is None:
        num_samples = math.prod(jax.eval_shape(per_sample_loss_fn, params, batch).shape)
    else:
        num_samples = int(np.count_nonzero(mask))
    return {
        "basis": {
            "method": basis.method, "size": basis.size, "dim": basis.dim,
            "vectors": _vectors_digest(basis, params, mesh), "eigenvalues": tree.digest(basis.eigenvalues),
        },
        "second_order": config["second_order"],
        "eigenvalues": config["eigenvalues"],
        "method": config["method"],
        "steps": [int(step) for step in steps],
        "num_samples": num_samples,
        "batch": tree.digest(batch),
        "mask": None if mask is None else tree.digest(np.asarray(mask, bool)),
        "per_sample_loss": loss_digest(per_sample_loss_fn, params, batch),
    }


def _vectors_digest(basis: Basis, like: PyTree, mesh) -> str:
    """SHA-256 of the basis' rows as the kernels use them (:meth:`Basis.as_tree`, split over the mesh like theirs),
    copied to the host a block of rows at a time."""
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(basis.as_tree(like, mesh)):
        block = max(1, _DIGEST_BLOCK_BYTES * len(leaf) // max(leaf.nbytes, 1))
        for start in range(0, len(leaf), block):
            digest.update(np.ascontiguousarray(to_host(leaf[start : start + block])).tobytes())
    return digest.hexdigest()


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


def _write_manifest(directory: Path, config: dict, shapes: dict, fingerprint: dict | None = None, *,
                    checkpoint_digests: list | None = None, checksums: dict | None = None) -> None:
    """``manifest.json`` of a complete result: config, array shapes, package versions, the checksum of each array's
    file (verified by :meth:`POLCAResult.load`) (and, from :func:`polca`, the computation's fingerprint)."""
    manifest = {
        "format": FORMAT_VERSION,
        "config": config,
        "shapes": {name: list(shape) for name, shape in shapes.items()},
        "versions": _versions(),
    }
    if fingerprint is not None:
        manifest["fingerprint"] = fingerprint
    if checkpoint_digests is not None:
        manifest["checkpoints"] = checkpoint_digests  # each checkpoint's parameters' digest
    if checksums is not None:
        manifest["checksums"] = checksums
    write_json_atomic(directory / MANIFEST, manifest)


def _file_checksums(directory: Path) -> dict:
    """The checksum of each array's ``.npy`` file in ``directory`` (:func:`polca_jax._files.file_digest`)."""
    return {name: file_digest(directory / f"{name}.npy") for name in _ARRAYS}


def _prepared(params: PyTree, first: PyTree, what: str, mesh) -> PyTree:
    """``params`` checked (structure like ``first``, finite) and placed on the mesh."""
    check_same_structure(first, params, f"polca: {what}")
    check_finite_params(params, f"polca: {what}")
    return shard_params(params, mesh)


def _read_ahead(checkpoints: Sequence[PyTree], start: int, first: PyTree, count: int):
    """``checkpoints[start..count-1]`` in order (``first`` is item ``start``, already read), each next one read in a
    background thread while the caller works on the current one: restoring from a store overlaps the projection
    pass. One read at a time, in order, so a store need not be thread-safe; an error of a read is raised when its
    item is reached. In a multi-process run the reads stay in the caller's thread: a restore onto a mesh that spans
    the processes holds collectives, which must come in the same order in every process."""
    if jax.process_count() > 1:
        yield first
        yield from (checkpoints[t] for t in range(start + 1, count))
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="polca-read-ahead") as pool:
        upcoming = None
        for t in range(start, count):
            current = first if t == start else upcoming.result()
            upcoming = pool.submit(operator.getitem, checkpoints, t + 1) if t + 1 < count else None
            yield current


def _step_coordinates(basis: Basis, params: PyTree, previous: PyTree) -> tuple[np.ndarray, float]:
    """⟨b, θ_{t+1} − θ_t⟩ for every direction ``[K]`` and ‖θ_{t+1} − θ_t‖², leaf by leaf (the step is never
    flattened, so it stays split over the mesh like the parameters)."""
    delta = jax.tree_util.tree_map(jnp.subtract, params, previous)
    coordinates = to_host(basis.coordinates(delta))
    return coordinates, float(_squared_norm(delta))


@jax.jit
def _squared_norm(vector: PyTree) -> jax.Array:
    return sum(jnp.vdot(leaf, leaf) for leaf in jax.tree_util.tree_leaves(vector))


def _finite_terms(values: jax.Array, name: str, what: str) -> np.ndarray:
    """``values`` on the host, or ``ValueError`` if some are NaN or inf (the loss is finite, its derivatives not)."""
    values = to_host(values)
    check_finite(
        values,
        f"polca: the per-sample {name} at {what}",
        "the losses are finite there, so the loss is not differentiable at these parameters (e.g. sqrt or log at 0, "
        "or a jnp.where whose unused branch is NaN); make it differentiable, e.g. clip the argument of sqrt or log",
    )
    return values


def _cumulative(terms: np.ndarray) -> np.ndarray:
    """``[T, N, K]`` running sums of per-interval terms ``[T-1, N, K]``, starting from zero (Eq. 8)."""
    return np.concatenate([np.zeros_like(terms[:1]), np.cumsum(terms, axis=0)])


def _second_order_term(kind, g, g_next, s, curvature, stored_eigenvalues) -> np.ndarray:
    """``[N, K]`` second-order terms of one interval, from g and the curvature ``[N, K]`` at its first checkpoint,
    g at the next ``[N, K]`` and the projected step s ``[K]``."""
    if kind == "none":
        return np.zeros_like(g)
    if kind == "exact":
        return 0.5 * curvature * s**2
    change = g_next - g  # Δg(x)
    if kind == "trapezoid":
        return 0.5 * s * change
    aggregate = change.mean(axis=0)  # Δg(X) [K]
    eigenvalue = np.asarray(stored_eigenvalues, g.dtype) if curvature is None else curvature.mean(axis=0)
    usable = np.abs(aggregate) > 1e-12 * np.max(np.abs(aggregate), initial=0.0)
    ratio = np.divide(change, aggregate, out=np.zeros_like(change), where=usable)
    return 0.5 * eigenvalue * s**2 * ratio


def _versions() -> dict:
    versions = {}
    for package in ("polca_jax", "jax", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions
