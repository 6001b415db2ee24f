"""The POLCA decomposition (paper Eqs. 2–8) over a sequence of checkpoints.

For checkpoints θ_0..θ_{T-1}, samples x and basis directions b, with g_t(x) = ⟨b, ∇L(x; θ_t)⟩ and the projected
step s_t = ⟨b, θ_{t+1} − θ_t⟩:

* first order (Eq. 2): g_t(x) · s_t
* second order, by ``second_order=`` (a :class:`polca_jax.SecondOrder`, or its kind's name):
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

Every term of interval t depends only on checkpoints t and t+1 (:func:`interval_rows`), so :func:`polca` writes each
checkpoint's rows as soon as they are computed (to memory-mapped files with ``out=``, :mod:`polca_jax._result_store`)
and resumes a killed run at its first unfinished checkpoint. The result type is :mod:`polca_jax._result`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import hashlib
import math
import operator
from pathlib import Path
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from polca_jax import tree
from polca_jax._basis import Basis, check_width
from polca_jax._checkpoints import OrbaxCheckpoints
from polca_jax.checks import (
    batch_size,
    check_finite,
    check_finite_params,
    check_params,
    check_same_structure,
    checkpoint_steps,
)
from polca_jax._distributed import sync, to_host
from polca_jax.fingerprints import loss_digest, params_digest
from polca_jax._interrupt import stop_if_requested, stop_on_sigterm
from polca_jax._progress import progress_bar
from polca_jax._projections import PerSampleLossFn, projections_curvature_and_losses
from polca_jax._result import POLCAResult
from polca_jax._result_store import CURVATURE, ResultRows
from polca_jax._second_order import SecondOrder
from polca_jax._sharding import check_mesh, shard_params
from polca_jax.errors import PolcaError

PyTree = Any
_DIGEST_BLOCK_BYTES = 1 << 26  # the basis is copied to the host for its digest 64 MiB at a time


def polca(
    per_sample_loss_fn: PerSampleLossFn,
    checkpoints: Sequence[PyTree] | str | Path,
    batch: PyTree,
    basis: Basis,
    *,
    second_order: SecondOrder | Literal["none", "paper", "trapezoid", "exact"] = "paper",
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
      second_order: a :class:`polca_jax.SecondOrder`, or ``"none" | "paper" | "trapezoid" | "exact"`` (see the module
        docstring).
      eigenvalues: with a name for ``second_order="paper"``: ``"stored"`` (the basis' own eigenvalues) or
        ``"current"`` (bᵀH_t(X)b).
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

    Returns:
      A :class:`polca_jax.POLCAResult` over the T checkpoints, N samples and K directions (memory-mapped from
      ``out`` when given).

    Raises:
      PolcaError: (before any work where it can) for unknown options, an empty batch, fewer than two checkpoints,
        steps that do not strictly increase, checkpoints that are not a sequence or differ in structure, parameters
        that are not floating point, a basis that is not a :class:`Basis`, not orthonormal or of the wrong width (or
        without eigenvalues for ``"paper"`` with stored ones), an ``out`` that holds another computation
        (:class:`polca_jax.ResumeMismatch`) or an unreadable progress record; and, at the checkpoint where it
        happens, for NaN parameters, NaN per-sample losses, and NaN projected gradients or curvatures (a loss that
        is finite where its gradient is not). With ``out``, :class:`polca_jax.Interrupted` after a SIGTERM.

    Example:
      Three steps of gradient descent, decomposed along the top two Hessian directions (``params``, ``batch``,
      ``per_sample_loss``, ``loss``: the least squares of :func:`polca_jax.hvp`'s example).

      >>> checkpoints = [params]
      >>> for _ in range(3):
      ...     grads = jax.grad(loss)(checkpoints[-1], batch)
      ...     checkpoints.append(jax.tree.map(lambda w, g: w - 0.5 * g, checkpoints[-1], grads))
      >>> basis = pj.hessian_basis(loss, checkpoints[:1], batch, k_per_checkpoint=2, num_iters=3,
      ...                          key=jax.random.key(0), progress=False)
      >>> result = pj.polca(per_sample_loss, checkpoints, batch, basis, progress=False)
      >>> result.loss.shape, result.projected_loss.shape  # [T, N]; [T, N, K]: each sample's loss change, accumulated
      ((4, 4), (4, 4, 2))
    """
    rule = SecondOrder.of(second_order, eigenvalues)
    batch_size(batch, "polca")
    check_mesh(mesh, "polca")
    if not isinstance(basis, Basis):
        raise PolcaError("basis must be a polca_jax.Basis (make one with basis_from_matrix)")
    kernel_options = dict(mask=mask, method=method, chunk_size=chunk_size, chunks_per_call=chunks_per_call,
                          basis_chunk_size=basis_chunk_size, mesh=mesh)
    if isinstance(checkpoints, str | Path):
        with OrbaxCheckpoints(checkpoints, steps) as store:
            return _decompose(per_sample_loss_fn, store, None, batch, basis, rule, kernel_options, progress, out)
    return _decompose(per_sample_loss_fn, checkpoints, steps, batch, basis, rule, kernel_options, progress, out)


def _decompose(per_sample_loss_fn, checkpoints, steps, batch, basis: Basis, rule: SecondOrder, kernel_options: dict,
               progress: bool, out) -> POLCAResult:
    """:func:`polca` on a sequence of checkpoints, its options checked and gathered (``kernel_options``: the keyword
    arguments of the projection kernels)."""
    steps = np.asarray(checkpoint_steps(checkpoints, steps, "polca", increasing=True))
    if len(checkpoints) < 2:
        raise PolcaError(f"POLCA needs at least two checkpoints, got {len(checkpoints)}")
    basis.check_orthonormal()
    if rule.kind == "paper" and rule.eigenvalues == "stored" and not np.all(np.isfinite(basis.eigenvalues)):
        raise PolcaError(
            f"second_order='paper' needs the basis' eigenvalues, but this {basis.method!r} basis has none; "
            "use eigenvalues='current', second_order='trapezoid' or 'exact'"
        )
    mesh = kernel_options["mesh"]
    count = len(steps)
    rows = ResultRows(out, count)
    start = min(rows.complete, count)  # the first unfinished checkpoint
    first_index = max(start - 1, 0)  # a resumed run reads its last finished checkpoint again, for the step
    first = checkpoints[first_index]
    check_params(first, f"polca: checkpoint at step {steps[first_index]}")
    check_width(basis, first)
    config = {
        "second_order": rule.kind,
        "eigenvalues": rule.eigenvalues,
        "method": kernel_options["method"],
        "basis_method": basis.method,
        "basis_size": basis.size,
        "basis_steps": basis.steps.tolist(),
        "num_params": basis.dim,
    }
    if out is not None:
        rows.bind(_fingerprint(per_sample_loss_fn, first, batch, basis, config, steps, kernel_options["mask"], mesh))
        rows.check_checkpoint(first_index, steps[first_index], params_digest(first))
        sync("polca_jax polca bound")  # every process has read the directory before process 0 writes to it
        if rows.finished:
            return POLCAResult.load(out)

    reads = _read_ahead(checkpoints, first_index, first, count)  # checkpoint t+1 is restored while t is decomposed
    previous = None
    if start > 0:
        previous = _CheckpointRows(
            _prepared(next(reads), first, f"checkpoint at step {steps[first_index]}", mesh), None,
            rows.read("projections", first_index), rows.read(CURVATURE, first_index) if rule.needs_curvature else None)
    checkpoint_range = progress_bar(range(start, count), progress, desc="POLCA checkpoints", initial=start,
                                    total=count)
    with stop_on_sigterm() if out is not None else contextlib.nullcontext():  # streamed: a SIGTERM stops cleanly
        for t, params in zip(checkpoint_range, reads):
            what = f"checkpoint at step {steps[t]}"
            current = checkpoint_rows(per_sample_loss_fn, _prepared(params, first, what, mesh), batch, basis, rule,
                                      kernel_options, what)
            row = {"loss": current.loss, "projections": current.projections}
            if rule.needs_curvature:
                row[CURVATURE] = current.curvature
            if previous is not None:
                row.update(interval_rows(previous, current, basis, rule))
            rows.write(t, row, params_digest(current.params))
            previous = current
            if out is not None and t + 1 < count:
                stop_if_requested(f"{t + 1} of {count} POLCA checkpoints (through step {steps[t]}) in {out}",
                                  "the same call resumes after them")
    return rows.finish(steps, config)


class _CheckpointRows:
    """What one checkpoint contributes: its parameters, per-sample losses ``[N]``, projected gradients ``[N, K]``
    and (when the rule needs them) curvatures ``[N, K]``, on the host."""

    def __init__(self, params: PyTree, loss, projections: np.ndarray, curvature: np.ndarray | None):
        self.params, self.loss, self.projections, self.curvature = params, loss, projections, curvature


def checkpoint_rows(per_sample_loss_fn, params: PyTree, batch, basis: Basis, rule: SecondOrder, kernel_options: dict,
                    what: str) -> _CheckpointRows:
    """One pass of the projection kernel at one checkpoint: the losses with the projections (and curvatures), checked
    finite; no separate loss pass."""
    g, c, loss = projections_curvature_and_losses("polca", per_sample_loss_fn, params, batch, basis,
                                                  curvature=rule.needs_curvature, **kernel_options)
    loss = to_host(loss)
    check_finite(loss, f"polca: the per-sample loss at {what}", "check per_sample_loss_fn on these samples")
    curvature = _finite_terms(c, "curvatures bᵀH(x)b", what) if rule.needs_curvature else None
    return _CheckpointRows(params, loss, _finite_terms(g, "projected gradients ⟨b, ∇L(x)⟩", what), curvature)


def interval_rows(previous: _CheckpointRows, current: _CheckpointRows, basis: Basis, rule: SecondOrder) -> dict:
    """The terms of interval t → t+1, from its two checkpoints only: the projected step ``[K]``, the fraction of
    ‖θ_{t+1} − θ_t‖² outside the basis span, and the second-order terms ``[N, K]``."""
    coordinates, total = _step_coordinates(basis, current.params, previous.params)
    return {
        "step_projection": coordinates,
        "outside_fraction": np.float64(0.0 if total == 0 else max(0.0, 1.0 - float(coordinates @ coordinates) / total)),
        "second_order": rule.term(previous.projections, current.projections, coordinates, previous.curvature,
                                  basis.eigenvalues),
    }


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
            # run in the caller's context, so that its partition rules place what the thread restores
            upcoming = (pool.submit(contextvars.copy_context().run, operator.getitem, checkpoints, t + 1)
                        if t + 1 < count else None)
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






