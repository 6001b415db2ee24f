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
    evaluated samples (``eigenvalues="current"``). Where |Δg(X)| is below 1e-12 · max|Δg(X)| the term is 0.
    By construction the terms of one step sum over the samples to N · ½ λ s_t² ≥ 0 for a positive eigenvalue; with
    a stored eigenvalue that is larger than the direction's later curvature (and large steps), this positive term
    can outweigh the first-order one and make every direction fail the oscillation filter — ``"current"``,
    ``"trapezoid"`` or ``"exact"`` then track the actual curvature.
  - ``"trapezoid"``: ½ s_t · Δg(x) (what ``"paper"`` becomes when Δg(X) = λ s_t holds exactly); no eigenvalue.
  - ``"exact"`` (Eq. 3): ½ bᵀH_t(x)b · s_t², with the exact per-sample curvature (forward-over-forward AD).
* projected loss (Eq. 8): L_b(x, θ_t) = Σ_{i<t} POLCA(x, b; θ_i), so ``projected_loss[0] == 0``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import operator
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

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
from polca_jax._files import load_npy, read_json, save_npy_atomic, write_json_atomic
from polca_jax._progress import progress_bar
from polca_jax._projections import PerSampleLossFn, projections_curvature_and_losses
from polca_jax._sharding import shard_params

PyTree = Any
SecondOrder = Literal["none", "paper", "trapezoid", "exact"]
SECOND_ORDER_CHOICES = ("none", "paper", "trapezoid", "exact")
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_ARRAYS = ("steps", "loss", "projections", "step_projection", "second_order", "outside_fraction")


@dataclasses.dataclass(eq=False)
class POLCAResult:
    """POLCA over T checkpoints, N samples and K directions (arrays are numpy, possibly memory-mapped).

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
        projections = np.asarray(self.projections)
        second = _second_order_terms(second_order, projections, np.asarray(self.step_projection), None, eigenvalues)
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
        manifest = {
            "format": FORMAT_VERSION,
            "config": self.config,
            "shapes": {name: list(np.shape(getattr(self, name))) for name in _ARRAYS},
            "versions": _versions(),
        }
        write_json_atomic(directory / MANIFEST, manifest)

    @classmethod
    def load(cls, directory: str | Path, *, mmap: bool = True) -> "POLCAResult":
        """Read a result written by :meth:`save` (memory-mapped by default); raise ``ValueError`` naming the file
        that is missing, unreadable or of the wrong shape."""
        directory = Path(directory)
        try:
            manifest = read_json(directory / MANIFEST, required=("config", "shapes"))
            arrays = {name: load_npy(directory / f"{name}.npy", mmap_mode="r" if mmap else None) for name in _ARRAYS}
        except ValueError as error:
            raise ValueError(f"cannot read a POLCA result from {directory}: {error}") from error
        shapes = manifest["shapes"] if isinstance(manifest["shapes"], dict) else {}
        for name in _ARRAYS:
            if list(arrays[name].shape) != shapes.get(name):
                raise ValueError(
                    f"corrupt POLCA result in {directory}: {directory / name}.npy has shape {arrays[name].shape}, "
                    f"but {MANIFEST} says {shapes.get(name)}"
                )
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

    Raises ``ValueError`` (before any work where it can) for unknown options, an empty batch, fewer than two
    checkpoints, steps that do not strictly increase, checkpoints that are not a sequence or differ in structure,
    parameters that are not floating point, a basis that is not orthonormal or of the wrong width; and, at the
    checkpoint where it happens, for NaN parameters, NaN per-sample losses, and NaN projected gradients or curvatures
    (a loss that is finite where its gradient is not).
    """
    if second_order not in SECOND_ORDER_CHOICES:
        raise ValueError(f"second_order must be one of {SECOND_ORDER_CHOICES}, got {second_order!r}")
    if eigenvalues not in ("stored", "current"):
        raise ValueError(f"eigenvalues must be 'stored' or 'current', got {eigenvalues!r}")
    batch_size(batch, "polca")
    if isinstance(checkpoints, str | Path):
        with OrbaxCheckpoints(checkpoints, steps) as store:
            return polca(
                per_sample_loss_fn, store, batch, basis, second_order=second_order, eigenvalues=eigenvalues,
                mask=mask, method=method, chunk_size=chunk_size, chunks_per_call=chunks_per_call,
                basis_chunk_size=basis_chunk_size, mesh=mesh, progress=progress,
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

    kernel_options = dict(
        mask=mask, chunk_size=chunk_size, chunks_per_call=chunks_per_call, basis_chunk_size=basis_chunk_size,
        mesh=mesh,
    )
    first = checkpoints[0]
    check_params(first, f"polca: checkpoint at step {steps[0]}")
    check_width(basis, first)
    losses, projections, curvatures, step_projection, outside = [], [], [], [], []
    previous = None
    reads = _read_ahead(checkpoints, first, len(steps))  # checkpoint t+1 is restored while t is decomposed
    for t, params in zip(progress_bar(range(len(steps)), progress, desc="POLCA checkpoints"), reads):
        what = f"checkpoint at step {steps[t]}"
        check_same_structure(first, params, f"polca: {what}")
        check_finite_params(params, f"polca: {what}")
        params = shard_params(params, mesh)
        # One pass gives the losses with the projections (and curvatures): no separate loss pass.
        g, c, loss = projections_curvature_and_losses(
            "polca", per_sample_loss_fn, params, batch, basis, method=method, curvature=needs_curvature,
            **kernel_options,
        )
        loss = np.asarray(loss)
        check_finite(loss, f"polca: the per-sample loss at {what}", "check per_sample_loss_fn on these samples")
        losses.append(loss)
        if needs_curvature:
            curvatures.append(_finite_terms(c, "curvatures bᵀH(x)b", what))
        projections.append(_finite_terms(g, "projected gradients ⟨b, ∇L(x)⟩", what))
        if previous is not None:
            coordinates, total = _step_coordinates(basis, params, previous)
            step_projection.append(coordinates)
            outside.append(0.0 if total == 0 else max(0.0, 1.0 - float(coordinates @ coordinates) / total))
        previous = params

    projections = np.stack(projections)
    step_projection = np.stack(step_projection)
    second = _second_order_terms(
        second_order, projections, step_projection, np.stack(curvatures) if curvatures else None, basis.eigenvalues
    )
    config = {
        "second_order": second_order,
        "eigenvalues": eigenvalues if second_order == "paper" else None,
        "method": method,
        "basis_method": basis.method,
        "basis_size": basis.size,
        "basis_steps": basis.steps.tolist(),
        "num_params": basis.dim,
    }
    return POLCAResult(
        steps, np.stack(losses), projections, step_projection, second, np.asarray(outside), config
    )


def _read_ahead(checkpoints: Sequence[PyTree], first: PyTree, count: int):
    """``checkpoints[0..count-1]`` in order (``first`` is item 0, already read), each next one read in a background
    thread while the caller works on the current one: restoring from a store overlaps the projection pass. One read
    at a time, in order, so a store need not be thread-safe; an error of a read is raised when its item is reached."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="polca-read-ahead") as pool:
        upcoming = None
        for t in range(count):
            current = first if t == 0 else upcoming.result()
            upcoming = pool.submit(operator.getitem, checkpoints, t + 1) if t + 1 < count else None
            yield current


def _step_coordinates(basis: Basis, params: PyTree, previous: PyTree) -> tuple[np.ndarray, float]:
    """⟨b, θ_{t+1} − θ_t⟩ for every direction ``[K]`` and ‖θ_{t+1} − θ_t‖², leaf by leaf (the step is never
    flattened, so it stays split over the mesh like the parameters)."""
    delta = jax.tree_util.tree_map(jnp.subtract, params, previous)
    coordinates = np.asarray(basis.coordinates(delta))
    return coordinates, float(_squared_norm(delta))


@jax.jit
def _squared_norm(vector: PyTree) -> jax.Array:
    return sum(jnp.vdot(leaf, leaf) for leaf in jax.tree_util.tree_leaves(vector))


def _finite_terms(values: jax.Array, name: str, what: str) -> np.ndarray:
    """``values`` on the host, or ``ValueError`` if some are NaN or inf (the loss is finite, its derivatives not)."""
    values = np.asarray(values)
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


def _second_order_terms(kind, projections, step_projection, curvatures, stored_eigenvalues) -> np.ndarray:
    """``[T-1, N, K]`` second-order terms from g ``[T, N, K]``, s ``[T-1, K]`` and curvature ``[T, N, K]``."""
    s = step_projection[:, None, :]
    if kind == "none":
        return np.zeros_like(projections[:-1])
    if kind == "exact":
        return 0.5 * curvatures[:-1] * s**2
    change = np.diff(projections, axis=0)  # Δg(x) [T-1, N, K]
    if kind == "trapezoid":
        return 0.5 * s * change
    aggregate = change.mean(axis=1, keepdims=True)  # Δg(X) [T-1, 1, K]
    if curvatures is None:
        eigenvalue = np.asarray(stored_eigenvalues, projections.dtype)[None, None, :]
    else:
        eigenvalue = curvatures[:-1].mean(axis=1, keepdims=True)
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
