"""Top eigenpairs of a symmetric operator by Lanczos, compiled as one loop.

The Krylov basis is preallocated as ``[m, P]`` (memory ``m × P``) and fully reorthogonalised at every step by
classical Gram–Schmidt applied twice, as matrix products at the highest matmul precision. With ``orthogonal_to=B``
(orthonormal rows ``[r, P]``) the operator is the deflated ``Π⊥ A Π⊥`` with ``Π⊥ = I − BᵀB`` and the Krylov vectors
are kept orthogonal to ``B``, so the eigenvectors found are orthogonal to it (Algorithm 1 of the paper).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from polca_jax import tree
from polca_jax._hvp import HessianMatvec
from polca_jax._sharding import (active_partition_rules, check_mesh, param_shardings, partition_rules, shard_batch,
                                 shard_params, shard_rows)
from polca_jax.checks import batch_size, check_finite_tree, check_params
from polca_jax.errors import PolcaError

PyTree = Any
HIGHEST = lax.Precision.HIGHEST


class Eigenpairs(NamedTuple):
    """Top-k algebraic eigenpairs, largest first (what :func:`top_eigenpairs` returns).

    Attributes:
      values: ``[k]`` Ritz values (eigenvalue estimates), largest first.
      vectors: ``[k, P]`` their Ritz vectors, orthonormal rows.
      residuals: ``[k]`` Ritz residual norms ‖A x − θ x‖ (the Lanczos estimate |β_m y_m|).
    """

    values: jax.Array  # [k]
    vectors: jax.Array  # [k, P], orthonormal rows
    residuals: jax.Array  # [k], Ritz residual norms ‖A x − θ x‖ (Lanczos estimate |β_m y_m|)


def top_eigenpairs(
    matvec: Callable[..., jax.Array],
    dim: int,
    k: int,
    num_iters: int,
    key: jax.Array,
    *,
    orthogonal_to: jax.Array | None = None,
    matvec_args: tuple = (),
    num_deflated: int | None = None,
    dtype: Any = None,
) -> Eigenpairs:
    """Top-``k`` algebraic eigenpairs of the symmetric operator ``v [P] -> matvec(v, *matvec_args) [P]``.

    Args:
      matvec: hashable function (it is a static argument of the compiled loop; pass data through ``matvec_args``
        so that new parameters do not trigger a recompilation).
      dim: P, the operator's dimension.
      k: number of eigenpairs returned.
      num_iters: m, Lanczos steps (``k <= m <= P - r``).
      key: PRNG key for the start vector (and restarts after an exact invariant subspace is found).
      orthogonal_to: optional ``[r, P]`` orthonormal rows B; the eigenpairs are those of ``Π⊥ A Π⊥`` on the
        complement of B.
      matvec_args: traced arguments passed to ``matvec`` after the vector.
      num_deflated: how many leading rows of ``orthogonal_to`` are filled; the remaining rows must be zero (they
        deflate nothing), so a preallocated, growing basis is passed without recompiling.
      dtype: dtype of the Krylov vectors; default: ``orthogonal_to``'s, else the first floating array in
        ``matvec_args``, else JAX's default float.

    Returns:
      :class:`Eigenpairs`: ``values [k]``, ``vectors [k, P]`` (orthonormal, and orthogonal to ``orthogonal_to``),
      ``residuals [k]``.

    Raises:
      PolcaError: for ``orthogonal_to`` not ``[r, P]``, not finite or not orthonormal, ``k`` or ``num_iters``
        outside ``1 <= k <= num_iters <= P - r``, or a ``matvec`` that does not map a ``[P]`` vector to a ``[P]`` one.

    Example:
      ``params``, ``batch``, ``loss``: the least squares of :func:`polca_jax.hvp`'s example; 3 Lanczos steps are exact
      for its 3 parameters.

      >>> pairs = pj.top_eigenpairs(pj.FlatHessianMatvec(loss), dim=3, k=2, num_iters=3, key=jax.random.key(0),
      ...                           matvec_args=(params, batch))
      >>> np.asarray(pairs.values, float).round(3).tolist(), pairs.vectors.shape
      ([1.416, 0.512], (2, 3))
    """
    if orthogonal_to is not None and (orthogonal_to.ndim != 2 or orthogonal_to.shape[1] != dim):
        raise PolcaError(f"orthogonal_to must have shape [r, {dim}], got {orthogonal_to.shape}")
    rank = 0 if orthogonal_to is None else orthogonal_to.shape[0] if num_deflated is None else num_deflated
    if orthogonal_to is not None:
        check_orthonormal(orthogonal_to[:rank], name="orthogonal_to")
    if not 1 <= k <= num_iters:
        raise PolcaError(f"need 1 <= k <= num_iters, got k={k}, num_iters={num_iters}")
    if num_iters > dim - rank:
        raise PolcaError(
            f"num_iters={num_iters} exceeds the dimension of the search space ({dim} parameters - {rank} deflated)"
        )
    dtype = jnp.dtype(dtype or _infer_dtype(orthogonal_to, matvec_args))
    _check_matvec_shape(matvec, dim, dtype, tuple(matvec_args))
    deflate = None if orthogonal_to is None else jnp.asarray(orthogonal_to, dtype)
    like = tree.structure_signature(jax.ShapeDtypeStruct((dim,), dtype))
    return _lanczos(matvec, like, k, num_iters, None, key, deflate, tuple(matvec_args))


def _check_matvec_shape(matvec, dim: int, dtype, matvec_args: tuple) -> None:
    """Raise ``ValueError`` unless ``matvec`` maps a ``[dim]`` vector to a ``[dim]`` one (traced, not run)."""
    signature = tree.structure_signature(matvec_args)
    try:
        shape = _matvec_output_shape(matvec, dim, dtype, signature)
    except (TypeError, ValueError) as error:
        raise PolcaError(
            f"top_eigenpairs: matvec fails on a [{dim}] vector ({error}); is dim={dim} the operator's dimension "
            "(for FlatHessianMatvec, the number of parameters)?"
        ) from error
    if shape != (dim,):
        raise PolcaError(
            f"top_eigenpairs: matvec maps a [{dim}] vector to shape {list(shape)}, expected [{dim}]; dim must be the "
            "operator's dimension (for FlatHessianMatvec, the number of parameters)"
        )


@functools.lru_cache(maxsize=64)
def _matvec_output_shape(matvec, dim: int, dtype, signature: tuple) -> tuple:
    """The output shape of ``matvec`` on a ``[dim]`` vector and arguments of ``signature`` (cached: traced once)."""
    vector = jax.ShapeDtypeStruct((dim,), dtype)
    return tuple(jax.eval_shape(lambda v, args: matvec(v, *args), vector, tree.from_signature(signature)).shape)


def _infer_dtype(orthogonal_to, matvec_args) -> Any:
    if orthogonal_to is not None:
        return orthogonal_to.dtype
    for leaf in jax.tree_util.tree_leaves(matvec_args):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            return jnp.result_type(leaf)
    return jnp.result_type(float)


# The products below contract over a leaf's own axes without flattening it: a leaf split over a mesh's "model" axis
# on a non-leading dimension is then contracted shard by shard and the partial sums added, where a reshape to
# [r, -1] would first gather the whole leaf (and the Krylov and deflated rows) on every device.


def _contract(a: jax.Array, b: jax.Array, leading: int) -> jax.Array:
    """``a`` (``[r, *leaf]`` when ``leading`` is 1, else ``[*leaf]``) contracted with ``b`` (``[*leaf]``) over the
    leaf's axes: ``[r]`` or a scalar."""
    axes = tuple(range(b.ndim))
    return lax.dot_general(a, b, ((tuple(range(leading, a.ndim)), axes), ((), ())), precision=HIGHEST)


def _row_dots(rows: PyTree, w: PyTree) -> jax.Array:
    """``[r]`` inner products of the rows of ``rows`` (leaves ``[r, ...]``) with ``w`` (leaves ``[...]``)."""
    return sum(_contract(r, x, 1) for r, x in zip(jax.tree_util.tree_leaves(rows), jax.tree_util.tree_leaves(w)))


def _combine(coefficients: jax.Array, rows: PyTree) -> PyTree:
    """``coefficientsᵀ rows``: ``[m, r]`` (or ``[r]``) times rows (leaves ``[r, ...]``), leaves ``[m, ...]`` (or
    ``[...]``)."""
    return jax.tree_util.tree_map(
        lambda r: lax.dot_general(coefficients, r, (((coefficients.ndim - 1,), (0,)), ((), ())), precision=HIGHEST),
        rows)


def _project_out(rows: PyTree, w: PyTree) -> PyTree:
    """w − rowsᵀ (rows w): remove the span of orthonormal ``rows`` (leaves ``[r, ...]``) from ``w``."""
    return jax.tree_util.tree_map(jnp.subtract, w, _combine(_row_dots(rows, w), rows))


def _dot(a: PyTree, b: PyTree) -> jax.Array:
    return sum(_contract(x, y, 0) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _norm(w: PyTree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(leaf * leaf) for leaf in jax.tree_util.tree_leaves(w)))  # = jnp.linalg.norm for one leaf


def tree_eigenpairs(
    matvec: Callable[..., PyTree],
    like: tuple,
    k: int,
    num_iters: int,
    key: jax.Array,
    *,
    orthogonal_to: PyTree | None = None,
    matvec_args: tuple = (),
    num_deflated: int | None = None,
    mesh: Mesh | None = None,
) -> Eigenpairs:
    """Lanczos on vectors that are pytrees: :func:`top_eigenpairs` for ``matvec(v, *matvec_args)`` mapping a pytree of
    the :func:`polca_jax.tree.structure_signature` ``like`` to one of the same structure.

    The Krylov vectors, the deflated rows ``orthogonal_to`` (leaves ``[r, ...]``) and the returned ``vectors``
    (leaves ``[k, ...]``) are pytrees of leaves with a leading row axis; with a ``mesh`` they are split over its
    ``"model"`` axis like the parameters (:func:`polca_jax.param_spec`), the row axis whole. The
    start vector is a flat ``[P]`` Gaussian split into leaves: the same numbers as the flat form's. No input checks:
    callers check (see :func:`top_eigenpairs`).
    """
    return _lanczos(matvec, like, k, num_iters, mesh, key, orthogonal_to, tuple(matvec_args),
                    rules=active_partition_rules())


@dataclasses.dataclass(frozen=True)
class LanczosCost:
    """What one checkpoint's Lanczos run of :func:`polca_jax.hessian_basis` costs (see :func:`lanczos_kernel_cost`)."""

    flops: float  # XLA's FLOPs of the run's num_iters Hessian-vector products
    temp_bytes: int  # XLA's temporary buffers of one Hessian-vector product
    compile_seconds: float  # compiling the run, on this machine
    seconds: float  # one run on this machine's default device; NaN unless timed
    run_temp_bytes: int  # XLA's temporaries of the whole run: one product's, the Krylov vectors' and the rest
    run_bytes: int  # XLA's bytes of the whole run: its arguments, outputs and temporaries (per device on a mesh)


def lanczos_kernel_cost(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    *,
    k_per_checkpoint: int = 1,
    num_iters: int = 20,
    num_deflated: int = 0,
    timed: bool = False,
    mesh: Mesh | None = None,
) -> LanczosCost:
    """Compile one checkpoint's Lanczos run of :func:`hessian_basis`, and report its FLOPs, memory and time.

    The run is compiled as ``hessian_basis`` compiles it, kept orthogonal to ``num_deflated`` rows found before, and
    is run only when ``timed``: what :func:`projection_kernel_cost` is to the projection pass, this is to the basis.

    Args:
      loss_fn, params, batch: as in :func:`hessian_basis` (the parameters of one checkpoint).
      k_per_checkpoint, num_iters: as in :func:`hessian_basis`.
      num_deflated: rows of the basis found at earlier checkpoints (rows of zeros here: the cost does not depend on
        their values).
      timed: also run it, once to warm up and once timed; otherwise nothing runs and ``seconds`` is NaN.
      mesh: compile it for this mesh as ``hessian_basis(mesh=...)`` runs it (parameters, Krylov vectors and rows
        split over ``"model"``, the batch over ``"data"``); the byte counts are then per device.

    Returns:
      A ``LanczosCost``: ``flops`` (XLA's, of the run's ``num_iters`` Hessian-vector products: it counts a loop's
      body once; the Gram–Schmidt steps add a few multiples of P per iteration), ``temp_bytes`` (the temporaries of
      one product), ``compile_seconds`` (compiling the run), ``seconds`` (one run), ``run_temp_bytes`` (the whole
      run's temporaries) and ``run_bytes`` (its arguments, outputs and temporaries).

    Raises:
      PolcaError: for an empty batch, parameters that are not all of one floating dtype, or a mesh that is not a
        ``("data"[, "model"])`` mesh.

    Example:
      ``params``, ``batch``, ``loss``: the least squares of :func:`polca_jax.hvp`'s example.

      >>> cost = pj.lanczos_kernel_cost(loss, params, batch, k_per_checkpoint=2, num_iters=3, timed=True)
      >>> cost.flops > 0, cost.seconds > 0
      (True, True)
    """
    batch_size(batch, "lanczos_kernel_cost")
    check_params(params, "lanczos_kernel_cost")
    check_mesh(mesh, "lanczos_kernel_cost")
    params, batch = shard_params(params, mesh), shard_batch(batch, mesh)  # placed as hessian_basis places them
    matvec = HessianMatvec(loss_fn)
    product = jax.jit(matvec).lower(jax.tree_util.tree_map(jnp.ones_like, params), params, batch).compile()
    analysis = product.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    found = jax.tree_util.tree_map(lambda p: jax.ShapeDtypeStruct((num_deflated, *np.shape(p)), p.dtype), params)
    if mesh is not None:
        found = jax.tree_util.tree_map(lambda row, sharding: jax.ShapeDtypeStruct(row.shape, row.dtype,
                                                                                   sharding=sharding),
                                       found, param_shardings(found, mesh, leading_axes=1))
    if timed:  # rows of zeros to run on; otherwise only shapes, to compile without running
        found = shard_rows(jax.tree_util.tree_map(lambda row: jnp.zeros(row.shape, row.dtype), found), mesh)
    arguments = (jax.random.key(0), found, (params, batch))
    start = time.perf_counter()
    compiled = _lanczos.lower(matvec, tree.structure_signature(params), k_per_checkpoint, num_iters, mesh,
                              *arguments, rules=active_partition_rules()).compile()
    compile_seconds = time.perf_counter() - start
    seconds = math.nan
    if timed:
        jax.block_until_ready(compiled(*arguments))
        start = time.perf_counter()
        jax.block_until_ready(compiled(*arguments))
        seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return LanczosCost(num_iters * float(analysis.get("flops", 0.0)), int(product.memory_analysis().temp_size_in_bytes),
                       compile_seconds, seconds, int(memory.temp_size_in_bytes),
                       int(memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                           - memory.alias_size_in_bytes))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4), static_argnames=("rules",))
def _lanczos(matvec, like, k, num_iters, mesh, key, deflate, matvec_args, rules=None) -> Eigenpairs:
    template = tree.from_signature(like)
    dtype = jax.tree_util.tree_leaves(template)[0].dtype
    dim = tree.num_params(template)
    eps = jnp.finfo(dtype).eps

    def place(rows):
        if mesh is None:
            return rows
        with partition_rules(rules):  # the rules of the call, which are part of the compiled kernel's key
            return lax.with_sharding_constraint(rows, param_shardings(rows, mesh, leading_axes=1))

    def orthogonalise(w, krylov):
        for _ in range(2):  # classical Gram–Schmidt, twice
            w = _project_out(krylov, w)
            if deflate is not None:
                w = _project_out(deflate, w)
        return w

    def operator(v):
        if deflate is None:
            return _cast(matvec(v, *matvec_args), dtype)
        v = _project_out(deflate, v)
        return _project_out(deflate, _cast(matvec(v, *matvec_args), dtype))

    def random_unit(j, krylov):
        flat = jax.random.normal(jax.random.fold_in(key, j), (dim,), dtype)
        w = orthogonalise(tree.unravel(flat, template), krylov)
        norm = _norm(w)
        return jax.tree_util.tree_map(lambda x: x / norm, w)

    def step(j, state):
        krylov, alphas, betas, q, scale = state
        krylov = jax.tree_util.tree_map(lambda rows, x: rows.at[j].set(x), krylov, q)
        w = operator(q)
        alpha = _dot(q, w)
        w = orthogonalise(w, krylov)
        beta = _norm(w)
        scale = jnp.maximum(scale, jnp.maximum(jnp.abs(alpha), beta))
        invariant = beta <= jnp.sqrt(eps) * scale  # Krylov space exhausted: restart, uncoupled
        q = lax.cond(
            invariant,
            lambda: random_unit(j + 1, krylov),
            lambda: jax.tree_util.tree_map(lambda x: x / jnp.where(invariant, 1, beta), w),
        )
        beta = jnp.where(invariant, 0, beta)
        return krylov, alphas.at[j].set(alpha), betas.at[j].set(beta), q, scale

    krylov = place(jax.tree_util.tree_map(lambda x: jnp.zeros((num_iters, *x.shape), dtype), template))
    start = random_unit(0, krylov)
    init = (krylov, jnp.zeros(num_iters, dtype), jnp.zeros(num_iters, dtype), start, jnp.zeros((), dtype))
    krylov, alphas, betas, _, _ = lax.fori_loop(0, num_iters, step, init)

    tridiagonal = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    theta, y = jnp.linalg.eigh(tridiagonal)
    top = jnp.argsort(-theta)[:k]
    vectors = place(_combine(y[:, top].T, krylov))
    residuals = jnp.abs(betas[-1] * y[-1, top])
    return Eigenpairs(theta[top], vectors, residuals)


def _cast(vector: PyTree, dtype) -> PyTree:
    return jax.tree_util.tree_map(lambda x: x.astype(dtype), vector)


def check_orthonormal(rows: jax.Array | np.ndarray, *, atol: float | None = None, name: str = "basis") -> None:
    """Raise :class:`polca_jax.PolcaError` unless ``rows [r, P]`` are finite and orthonormal (``|R Rᵀ − I| <= atol``).

    Args:
      rows: ``[r, P]`` floating rows (e.g. ``Basis.vectors``).
      atol: the largest entry of ``|R Rᵀ − I|`` allowed (default 1e-8 for float64 rows, else 1e-4).
      name: what the rows are, for the error message.

    Raises:
      PolcaError: for rows that are not a 2-D matrix, hold NaN or inf, or are not orthonormal within ``atol``.

    Example:
      >>> pj.check_orthonormal(jnp.eye(3)[:2])  # passes: returns None
      >>> pj.check_orthonormal(jnp.array([[1.0, 1.0, 0.0]]))
      Traceback (most recent call last):
        ...
      polca_jax.errors.PolcaError: basis rows are not orthonormal: max |B Bᵀ − I| = 1 > ...
    """
    rows = jnp.asarray(rows)
    if rows.ndim != 2:
        raise PolcaError(f"{name} must be a [K, P] matrix, got shape {rows.shape}")
    check_finite_tree(rows, name)
    if atol is None:
        atol = 1e-8 if rows.dtype == jnp.float64 else 1e-4
    gram = np.asarray(jnp.dot(rows, rows.T, precision=HIGHEST), np.float64)  # [r, r], computed on device
    error = float(np.max(np.abs(gram - np.eye(len(gram))))) if len(gram) else 0.0
    if error > atol:
        raise PolcaError(
            f"{name} rows are not orthonormal: max |B Bᵀ − I| = {error:.3g} > {atol:g}; "
            "orthonormalise it (e.g. basis_from_matrix(..., orthonormalize=True))"
        )
