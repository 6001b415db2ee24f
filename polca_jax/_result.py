"""The result of :func:`polca_jax.polca` and its files: ``POLCAResult`` holds the arrays (memory-mapped when loaded),
saves and loads itself, and derives the first-order terms, the POLCA terms and the projected loss (Eqs. 2, 7, 8).

On disk: one ``.npy`` per array and ``manifest.json`` (config, shapes, package versions, each file's checksum),
written last: a directory with a manifest holds a complete result.
"""

from __future__ import annotations

import dataclasses
import functools
from importlib import metadata
from pathlib import Path

import numpy as np

from polca_jax.files import file_digest, load_npy, read_json, save_npy_atomic, write_json_atomic
from polca_jax._second_order import SecondOrder
from polca_jax.errors import CorruptRunDirectory, PolcaError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = ("steps", "loss", "projections", "step_projection", "second_order", "outside_fraction")
INTERVAL_ARRAYS = ("step_projection", "second_order", "outside_fraction")  # row t-1 is written at checkpoint t


@dataclasses.dataclass(eq=False)
class POLCAResult:
    """POLCA over T checkpoints, N samples and K directions: what :func:`polca_jax.polca` returns.

    The arrays are numpy, memory-mapped when loaded or when :func:`polca` streamed the result to a directory. The
    first-order terms, the POLCA terms and the projected loss (Eqs. 2, 7, 8) are derived from them.

    Attributes:
      steps: ``[T]`` training step of each checkpoint.
      loss: ``[T, N]`` exact per-sample loss L(x; θ_t).
      projections: ``[T, N, K]`` projected per-sample gradients ⟨b, ∇L(x; θ_t)⟩.
      step_projection: ``[T-1, K]`` projected steps ⟨b, θ_{t+1} − θ_t⟩.
      second_order: ``[T-1, N, K]`` second-order terms (zeros for ``"none"``).
      outside_fraction: ``[T-1]`` fraction of ‖θ_{t+1} − θ_t‖² outside the basis span.
      config: how the result was computed (second_order, method, basis method, ...).

    Raises:
      PolcaError: for arrays whose shapes do not match ``projections [T, N, K]``.

    Example:
      Two checkpoints, one sample, one direction: g = 2 then 1, a projected step of −0.25, no second-order term.

      >>> result = pj.POLCAResult(steps=np.array([0, 10]), loss=np.array([[1.0], [0.5]]),
      ...                         projections=np.array([[[2.0]], [[1.0]]]), step_projection=np.array([[-0.25]]),
      ...                         second_order=np.zeros((1, 1, 1)), outside_fraction=np.zeros(1), config={})
      >>> result.terms.tolist(), result.projected_loss[:, 0, 0].tolist(), result.loss_change.tolist()
      ([[[-0.5]]], [0.0, -0.5], [[-0.5]])
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
                raise PolcaError(f"POLCAResult.{name} must have shape {shape}, got {np.shape(getattr(self, name))}")

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
        return cumulative(self.terms)

    def projected_loss_with(self, second_order: SecondOrder | str, eigenvalues=None) -> np.ndarray:
        """``[T, N, K]`` projected loss under another second-order rule, from the stored arrays (no recomputation).

        second_order: ``"none"``, ``"trapezoid"`` or ``"paper"`` (with stored eigenvalues; it needs ``eigenvalues``
        ``[K]``, e.g. the basis' own). Rules that need per-sample curvature (``"exact"``, ``"paper"`` with current
        eigenvalues) cannot be made from a result, which does not store it.
        """
        rule = SecondOrder.of(second_order)
        if rule.needs_curvature:
            raise PolcaError(f"second_order must be 'none', 'trapezoid' or 'paper' from stored arrays, got "
                             f"{second_order!r}: it needs the per-sample curvature, which a result does not store")
        if rule.kind == "paper" and eigenvalues is None:
            raise PolcaError("second_order='paper' needs eigenvalues [K]")
        g, s = self.projections, self.step_projection
        second = np.stack([rule.term(g[t], g[t + 1], s[t], None, eigenvalues) for t in range(len(s))])
        return cumulative(self.first_order + second)

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
        for name in ARRAYS:
            save_npy_atomic(directory / f"{name}.npy", getattr(self, name))
        write_manifest(directory, self.config, {name: np.shape(getattr(self, name)) for name in ARRAYS},
                        checksums=file_checksums(directory))

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
            arrays = {name: load_npy(directory / f"{name}.npy", mmap_mode="r" if mmap else None) for name in ARRAYS}
        except CorruptRunDirectory:
            raise
        except ValueError as error:
            raise PolcaError(f"cannot read a POLCA result from {directory}: {error}") from error
        shapes = manifest["shapes"] if isinstance(manifest["shapes"], dict) else {}
        for name in ARRAYS:
            if list(arrays[name].shape) != shapes.get(name):
                raise CorruptRunDirectory(
                    f"corrupt POLCA result in {directory}: {directory / name}.npy has shape {arrays[name].shape}, "
                    f"but {MANIFEST} says {shapes.get(name)}"
                )
        checksums = manifest.get("checksums")
        if verify and isinstance(checksums, dict):
            for name in ARRAYS:
                path = directory / f"{name}.npy"
                if checksums.get(name) != file_digest(path):
                    raise CorruptRunDirectory(
                        f"{path} does not match the checksum {MANIFEST} recorded when the result was written (a "
                        f"byte of it changed since); the POLCA result in {directory} cannot be trusted: delete the "
                        "directory and compute it again (in a pipeline run: rerun the decompose stage with --force)")
        return cls(config=manifest["config"], **arrays)


def write_manifest(directory: Path, config: dict, shapes: dict, fingerprint: dict | None = None, *,
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


def file_checksums(directory: Path) -> dict:
    """The checksum of each array's ``.npy`` file in ``directory`` (:func:`polca_jax.files.file_digest`)."""
    return {name: file_digest(directory / f"{name}.npy") for name in ARRAYS}


def cumulative(terms: np.ndarray) -> np.ndarray:
    """``[T, N, K]`` running sums of per-interval terms ``[T-1, N, K]``, starting from zero (Eq. 8)."""
    return np.concatenate([np.zeros_like(terms[:1]), np.cumsum(terms, axis=0)])


def _versions() -> dict:
    versions = {}
    for package in ("polca_jax", "jax", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions
