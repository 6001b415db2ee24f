"""Per-sample projected gradients ⟨b, ∇L(x)⟩ and curvatures bᵀH(x)b for N samples × K directions.

A *sample* is a sequence (``per_sample_loss_fn`` returns ``[n_seq]``) or one token of a sequence (it returns
``[n_seq, n_tok]``; an optional ``mask [n_seq, n_tok]`` keeps the tokens that count). Two strategies compute the
projections, chosen by cost (see :func:`choose_method` and benchmarks/README.md):

* ``"reverse"``: per-sample gradients on chunks of sequences (``vmap`` of ``grad``), each parameter leaf
  contracted with its slice of the params-shaped basis; about one backward pass per sample, plus ``2·P·K`` flops.
* ``"forward"``: one ``jvp`` per basis direction over a chunk of sequences (vmapped over groups of directions);
  about ``2K`` forward passes per *sequence*, whatever its number of samples.

All chunks of sequences run in one compiled call, a ``lax.scan`` over the chunks, so XLA keeps one chunk's temporaries
alive at a time: the memory is bounded by one chunk (plus the ``[N, K]`` outputs) whatever N — about
``chunk_size × samples per sequence`` per-sample gradients contracted leaf by leaf (reverse), or one group of
``basis_chunk_size`` tangents of a chunk's activations (forward) — and never an ``[N, P]`` array. Chunks and direction
groups are balanced so that they divide the work (300 sequences, at most 32 per chunk → 10 chunks of 30; K = 15,
groups of at most 8 → 8 + 7): nothing is padded but less than one sequence per chunk. The pass also returns each
sample's loss (the primal of the ``jvp``, the value of ``value_and_grad``), which :func:`polca_jax.polca` uses instead
of a separate loss pass. Compiled kernels are cached on (loss function, shapes, chunking, mesh), so a second call with
new parameters of the same shapes does not recompile; :func:`projection_kernel_cost` reports a pass' temporaries and
FLOPs from XLA without running it.

The kernels cannot know which positions a loss reads: a model whose loss reads a few positions of a sequence should
compute only what those positions need (see ``positions=`` of ``polca_jax.pipeline.models.apply``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from polca_jax import tree
from polca_jax._basis import Basis, split_rows
from polca_jax._sharding import (
    MODEL_AXIS, active_partition_rules, check_mesh, data_axes, data_spec, leaf_path, num_data_shards, param_spec,
    partition_rules, shard_batch, shard_params, shard_rows,
)
from polca_jax.checks import batch_size, check_finite_params, check_finite_tree, check_loss_dtype, check_params
from polca_jax.errors import PolcaError

PyTree = Any
PerSampleLossFn = Callable[[PyTree, PyTree], jax.Array]
Method = Literal["auto", "reverse", "forward"]
HIGHEST = lax.Precision.HIGHEST
REVERSE_SAMPLES_PER_CHUNK = 64
FORWARD_SEQUENCES_PER_CHUNK = 32


def choose_method(samples_per_sequence: int, num_directions: int) -> Literal["reverse", "forward"]:
    """The cheaper strategy by the cost model, in units of one batched forward pass of the sequences.

    Measured on a 2-core CPU (benchmarks/README.md): forward ≈ 1 + 1.25·K (one tangent pass per direction, whatever
    the number of samples s per sequence); reverse ≈ s·(5 + 0.04·K) (one forward and backward per sample, plus the
    contraction with the basis). So forward wins when K < 4·s: token-level samples of long sequences, or few
    directions.

    Args:
      samples_per_sequence: s, the samples per sequence (1 for ``[n_seq]`` losses, ``n_tok`` for token-level ones).
      num_directions: K, the basis size.

    Returns:
      ``"forward"`` when K < 4·s, else ``"reverse"``.

    Example:
      >>> pj.choose_method(samples_per_sequence=1, num_directions=10), pj.choose_method(64, 10)
      ('reverse', 'forward')
    """
    return "forward" if num_directions < 4 * samples_per_sequence else "reverse"


def _resolved_method(method: str, samples_per_sequence: int, num_directions: int) -> Literal["reverse", "forward"]:
    """``method`` with ``"auto"`` replaced by :func:`choose_method`'s choice; an unknown method is a PolcaError."""
    if method == "auto":
        return choose_method(samples_per_sequence, num_directions)
    if method not in ("reverse", "forward"):
        raise PolcaError(f"method must be 'auto', 'reverse' or 'forward', got {method!r}")
    return method


def per_sample_projections(
    per_sample_loss_fn: PerSampleLossFn,
    params: PyTree,
    batch: PyTree,
    basis: Basis | jax.Array | PyTree,
    *,
    mask: np.ndarray | None = None,
    method: Method = "auto",
    chunk_size: int | None = None,
    chunks_per_call: int = 1,
    basis_chunk_size: int = 8,
    mesh: jax.sharding.Mesh | None = None,
) -> jax.Array:
    """⟨b, ∇L(x; params)⟩ for every sample x and direction b: ``[N, K]``.

    Args:
      per_sample_loss_fn: ``(params, batch) -> [n_seq]`` or ``[n_seq, n_tok]`` losses, one per sample.
      params: parameters pytree.
      batch: pytree of arrays with a leading ``n_seq`` axis.
      basis: a :class:`Basis`, a ``[K, P]`` matrix, or a params-shaped pytree of ``[K, ...]`` leaves.
      mask: optional bool ``[n_seq, n_tok]``; N is its count of True, rows in row-major (sequence, token) order.
        Without it N = ``n_seq · n_tok``.
      method: ``"reverse"``, ``"forward"`` or ``"auto"`` (:func:`choose_method`).
      chunk_size: at most this many sequences per chunk (default: 64 samples' worth for reverse, 32 sequences for
        forward); the chunks are made equal, so fewer may be used (300 sequences, 32 → 10 chunks of 30).
      chunks_per_call: chunks per step of the compiled loop (its ``unroll``); memory grows with it.
      basis_chunk_size: at most this many directions per vmapped group in forward mode (groups of equal size up to
        one: K = 15 → 8 + 7).
      mesh: optional mesh (:func:`polca_jax.device_mesh`); sequences are split over its ``"data"`` axis, the
        basis over its ``"model"`` axis like the parameters (place them with :func:`polca_jax.shard_params`).

    A basis of another float dtype than the parameters is cast to theirs. The result itself is not checked for NaN
    (see :func:`polca_jax.polca`, which does).

    Returns:
      ``[N, K]`` projected gradients, samples in row-major (sequence, token) order.

    Raises:
      PolcaError: for an empty batch, parameters that are not all of one floating dtype, NaN parameters or basis
        entries (checked when concrete; skipped under a caller's ``jit``), a basis of the wrong shape, losses that
        are not ``[n_seq]`` or ``[n_seq, n_tok]`` floating point, an unknown ``method``, a mask of the wrong shape or
        selecting nothing, chunk sizes below 1, and a mesh that is not a ``("data"[, "model"])`` mesh or whose
        ``"data"`` axis does not divide the batch.

    Example:
      The first two parameter axes as the basis: each sample's gradient ``(x·w − y) x`` read off on them
      (``params``, ``batch``, ``per_sample_loss``: the least squares of :func:`polca_jax.hvp`'s example).

      >>> basis = pj.basis_from_matrix(jnp.eye(3)[:2])
      >>> pj.per_sample_projections(per_sample_loss, params, batch, basis).tolist()
      [[2.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.5, 0.5]]
    """
    return projections_curvature_and_losses(
        "per_sample_projections", per_sample_loss_fn, params, batch, basis, method=method, mask=mask,
        chunk_size=chunk_size, chunks_per_call=chunks_per_call, basis_chunk_size=basis_chunk_size, mesh=mesh,
    )[0]


def per_sample_curvature(per_sample_loss_fn: PerSampleLossFn, params, batch, basis, **kwargs) -> jax.Array:
    """bᵀH(x)b exactly for every sample x and direction b, ``[N, K]``, by forward-over-forward AD (no Hessian).

    Args:
      per_sample_loss_fn, params, batch, basis: as in :func:`per_sample_projections`.
      **kwargs: its other options (``mask``, ``chunk_size``, ``chunks_per_call``, ``basis_chunk_size``, ``mesh``);
        ``method`` does not apply (one nested ``jvp`` per direction).

    Returns:
      ``[N, K]`` per-sample curvatures, in the sample order of :func:`per_sample_projections`.

    Raises:
      PolcaError: as :func:`per_sample_projections`.

    Example:
      The per-sample Hessian of least squares is ``x xᵀ``, so bᵀH(x)b = (x·b)² (``params``, ``batch``,
      ``per_sample_loss``: the least squares of :func:`polca_jax.hvp`'s example).

      >>> pj.per_sample_curvature(per_sample_loss, params, batch, pj.basis_from_matrix(jnp.eye(3)[:2])).tolist()
      [[4.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
    """
    return projections_curvature_and_losses(
        "per_sample_curvature", per_sample_loss_fn, params, batch, basis, curvature=True, **kwargs
    )[1]


def per_sample_projections_and_curvature(
    per_sample_loss_fn: PerSampleLossFn,
    params: PyTree,
    batch: PyTree,
    basis: Basis | jax.Array | PyTree,
    *,
    mask: np.ndarray | None = None,
    chunk_size: int | None = None,
    chunks_per_call: int = 1,
    basis_chunk_size: int = 8,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(⟨b, ∇L(x)⟩, bᵀH(x)b), both ``[N, K]``, from one nested ``jvp`` per direction.

    Args:
      per_sample_loss_fn, params, batch, basis, mask, chunk_size, chunks_per_call, basis_chunk_size, mesh: as in
        :func:`per_sample_projections` (there is no ``method``: the pass is forward-over-forward).

    Returns:
      ``(projections [N, K], curvatures [N, K])``, in the sample order of :func:`per_sample_projections`.

    Raises:
      PolcaError: as :func:`per_sample_projections`.

    Example:
      ``params``, ``batch``, ``per_sample_loss``: the least squares of :func:`polca_jax.hvp`'s example.

      >>> g, c = pj.per_sample_projections_and_curvature(per_sample_loss, params, batch,
      ...                                                pj.basis_from_matrix(jnp.eye(3)[:2]))
      >>> g.tolist(), c.tolist()
      ([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.5, 0.5]], [[4.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    """
    return projections_curvature_and_losses(
        "per_sample_projections_and_curvature", per_sample_loss_fn, params, batch, basis, curvature=True,
        mask=mask, chunk_size=chunk_size, chunks_per_call=chunks_per_call, basis_chunk_size=basis_chunk_size,
        mesh=mesh,
    )[:2]


def projections_curvature_and_losses(
    what: str,
    per_sample_loss_fn: PerSampleLossFn,
    params: PyTree,
    batch: PyTree,
    basis: Basis | jax.Array | PyTree,
    *,
    method: Method = "auto",
    curvature: bool = False,
    mask: np.ndarray | None = None,
    chunk_size: int | None = None,
    chunks_per_call: int = 1,
    basis_chunk_size: int = 8,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """One pass over the samples: ``(projections [N, K], curvature [N, K] or None, losses [N])``.

    With ``curvature=True`` the projections and curvatures come from one nested ``jvp`` per direction (``method`` is
    then ignored). The losses come from the same pass (the primal of the ``jvp``, the value of ``value_and_grad``),
    so no separate loss pass is needed; ``what`` names the caller in error messages.
    """
    n_seq = _check_inputs(what, params, batch, mesh)
    params = shard_params(params, mesh)
    directions, num_directions = _directions(basis, params, what, mesh)
    samples = _samples_per_sequence(per_sample_loss_fn, params, batch, n_seq, what)
    method = _resolved_method(method, samples, num_directions)
    method = "curvature" if curvature else method
    if chunk_size is None:
        chunk_size = _default_chunk("forward" if method == "curvature" else method, samples)
    outputs = _run_chunked(
        method, per_sample_loss_fn, params, batch, directions, chunk_size, chunks_per_call, basis_chunk_size, mesh
    )
    projections, losses = _select_samples(outputs[0], mask), _select_samples(outputs[-1], mask)[:, 0]
    curvatures = _select_samples(outputs[1], mask) if curvature else None
    return projections, curvatures, losses


def per_sample_losses(
    per_sample_loss_fn: PerSampleLossFn,
    params: PyTree,
    batch: PyTree,
    *,
    mask: np.ndarray | None = None,
    chunk_size: int = FORWARD_SEQUENCES_PER_CHUNK,
    mesh: jax.sharding.Mesh | None = None,
) -> jax.Array:
    """L(x; params) for every sample: ``[N]``, in the sample order of :func:`per_sample_projections`.

    Args:
      per_sample_loss_fn, params, batch, mask, mesh: as in :func:`per_sample_projections`.
      chunk_size: at most this many sequences per compiled step.

    Returns:
      ``[N]`` per-sample losses.

    Raises:
      PolcaError: as :func:`per_sample_projections` (less the basis and ``method``).

    Example:
      ``params``, ``batch``, ``per_sample_loss``: the least squares of :func:`polca_jax.hvp`'s example (at w = 0,
      ½ y²).

      >>> pj.per_sample_losses(per_sample_loss, params, batch).tolist()
      [0.5, 0.5, 2.0, 0.125]
    """
    what = "per_sample_losses"
    n_seq = _check_inputs(what, params, batch, mesh)
    _samples_per_sequence(per_sample_loss_fn, params, batch, n_seq, what)
    params = shard_params(params, mesh)
    (losses,) = _run_chunked("loss", per_sample_loss_fn, params, batch, None, chunk_size, 1, 1, mesh)
    return _select_samples(losses, mask)[:, 0]


def gradient_blocks(params: PyTree) -> list[str]:
    """The names of the blocks of :func:`per_sample_gradient_norms`, in its column order.

    A block is every row (first axis) of each leaf of two or more dimensions, and each other leaf whole.

    Args:
      params: the parameters pytree (only its structure and shapes are read).

    Returns:
      ``B`` names: ``"<leaf path>[<row>]"`` or ``"<leaf path>"``.

    Example:
      >>> pj.gradient_blocks({"b": jnp.zeros(2), "w": jnp.zeros((2, 3))})
      ["['b']", "['w'][0]", "['w'][1]"]
    """
    names = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path)
        names += [f"{name}[{row}]" for row in range(leaf.shape[0])] if np.ndim(leaf) >= 2 else [name]
    return names


def per_sample_gradient_norms(
    per_sample_loss_fn: PerSampleLossFn,
    params: PyTree,
    batch: PyTree,
    *,
    mask: np.ndarray | None = None,
    chunk_size: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> jax.Array:
    """‖∇L(x)‖ restricted to each parameter block, for every sample: ``[N, B]`` (blocks: :func:`gradient_blocks`).

    Where a sample's gradient lies among the parameters, with no basis and no training dynamics: a label-free
    control that a POLCA finding should beat (samples that use different parameters separate here already). Samples
    and chunking as :func:`per_sample_projections` in reverse mode; never an ``[N, P]`` array.

    Args:
      per_sample_loss_fn, params, batch, mask, mesh: as in :func:`per_sample_projections`.
      chunk_size: at most this many sequences per chunk (default: 64 samples' worth).

    Returns:
      ``[N, B]`` gradient norms, columns in the order of :func:`gradient_blocks`.

    Raises:
      PolcaError: as :func:`per_sample_projections` (less the basis and ``method``).

    Example:
      At w = 0 a sample's gradient is ``−y x``; one block, the 1-d leaf ``w`` (``params``, ``batch``,
      ``per_sample_loss``: the least squares of :func:`polca_jax.hvp`'s example).

      >>> np.asarray(pj.per_sample_gradient_norms(per_sample_loss, params, batch), float).round(3).tolist()
      [[2.0], [1.0], [1.0], [0.866]]
    """
    what = "per_sample_gradient_norms"
    n_seq = _check_inputs(what, params, batch, mesh)
    samples = _samples_per_sequence(per_sample_loss_fn, params, batch, n_seq, what)
    params = shard_params(params, mesh)
    chunk_size = _default_chunk("reverse", samples) if chunk_size is None else chunk_size
    norms, _ = _run_chunked("block_norms", per_sample_loss_fn, params, batch, None, chunk_size, 1, 1, mesh)
    return _select_samples(norms, mask)


# --- chunk kernels: (groups, loss_fn, params, directions [K, ...] leaves, chunk) -> tuple of [c, s, K] -------------
# Every kernel ends its tuple with the chunk's losses [c, s, 1]: the projection pass computes them anyway.


def _loss_chunk(groups, loss_fn, params, directions, chunk):
    return (_as_matrix(loss_fn(params, chunk))[..., None],)


def _per_sample_gradients(loss_fn, params, chunk) -> tuple[jax.Array, PyTree, int, int]:
    """``(losses [c·s], gradients (params-shaped, [c·s, ...] leaves), c, s)`` of a chunk of c sequences of s samples,
    as ``vmap(grad)`` over (sequence, sample) pairs: each sequence repeated once per sample.

    On XLA CPU this is 23–35% faster than ``vmap(jacrev)`` over sequences (benchmarks/README.md), though it repeats the
    forward pass per sample; for many samples per sequence ``"auto"`` picks forward mode instead.
    """
    c = batch_size(chunk)
    shape = jax.eval_shape(loss_fn, params, chunk).shape
    s = 1 if len(shape) == 1 else shape[1]

    def sample_loss(p, example, j):
        return loss_fn(p, jax.tree_util.tree_map(lambda x: x[None], example)).reshape(-1)[j]

    examples = jax.tree_util.tree_map(lambda x: jnp.repeat(x, s, axis=0), chunk)
    losses, grads = jax.vmap(jax.value_and_grad(sample_loss), in_axes=(None, 0, 0))(
        params, examples, jnp.tile(jnp.arange(s), c)
    )
    return losses, grads, c, s


def _block_norm_chunk(groups, loss_fn, params, directions, chunk):
    """Each sample's gradient norm over every block of :func:`gradient_blocks`: ``[c, s, B]``."""
    losses, grads, c, s = _per_sample_gradients(loss_fn, params, chunk)
    norms = [jnp.sqrt(jnp.sum(g.reshape(c * s, g.shape[1] if g.ndim > 2 else 1, -1) ** 2, axis=-1))
             for g in jax.tree_util.tree_leaves(grads)]
    return jnp.concatenate(norms, axis=1).reshape(c, s, -1), losses.reshape(c, s, 1)


def _reverse_chunk(groups, loss_fn, params, directions, chunk):
    """Per-sample gradients (:func:`_per_sample_gradients`), each leaf contracted with its slice of the basis."""
    losses, grads, c, s = _per_sample_gradients(loss_fn, params, chunk)
    model_shards = _auto_model_shards()
    if model_shards == 1:  # one device, or a mesh without a split "model" axis: the flattened product
        total = sum(
            jnp.dot(g.reshape(c * s, -1), b.reshape(b.shape[0], -1).T, precision=HIGHEST)
            for g, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(directions))
        )
    else:
        total = sum(
            _local_contraction(g, b, model_shards, leaf_path(path))
            for g, (path, b) in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves_with_path(directions))
        )
    return total.reshape(c, s, -1), losses.reshape(c, s, 1)


def _auto_model_shards() -> int:
    """The size of the mesh axis "model" when tracing inside the kernel's ``shard_map`` (manual over the data axes,
    "model" left to XLA); 1 outside it (without a mesh, whatever mesh the caller set) or without a "model" axis."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not mesh.manual_axes or MODEL_AXIS not in mesh.auto_axes:
        return 1
    return dict(mesh.shape)[MODEL_AXIS]


def _local_contraction(g: jax.Array, b: jax.Array, model_shards: int, path: str) -> jax.Array:
    """``[n, K]`` products of per-sample gradients ``g`` ``[n, *leaf]`` with basis rows ``b`` ``[K, *leaf]`` on a
    split "model" axis: both pinned to the parameters' split (:func:`param_spec` of the leaf at ``path``, the leading
    axis whole) and contracted over the leaf's own axes without flattening them, so that XLA contracts each shard
    locally and sums the ``[K, n]`` partial products over "model" (the flattened product all-gathers the gradients
    and the rows). The rows are the dot's left operand: as the right one, XLA CPU copies them into a ``K``-minor
    layout first (a copy of the basis shard among the temporaries)."""
    spec = PartitionSpec(None, *param_spec(b.shape[1:], model_shards, path=path))
    g = lax.with_sharding_constraint(g, spec)
    b = lax.with_sharding_constraint(b, spec)
    axes = tuple(range(1, b.ndim))
    return lax.dot_general(b, g, ((axes, axes), ((), ())), precision=HIGHEST).T


def direction_groups(num_directions: int, max_group: int) -> tuple[tuple[int, int], ...]:
    """K directions split into the fewest groups of at most ``max_group``, of equal size up to one: no padding.

    Returns ``((size, count), ...)`` in order: K = 15, max 8 → ``((8, 1), (7, 1))``; K = 12 → ``((6, 2),)``.
    """
    if max_group < 1:
        raise PolcaError(f"basis_chunk_size must be >= 1, got {max_group}")
    count = -(-num_directions // max_group)
    small, larger = divmod(num_directions, count)
    return tuple((size, n) for size, n in ((small + 1, larger), (small, count - larger)) if n)


def _grouped_directional(groups, directions, along):
    """Apply ``along(direction) -> [m, c, s]`` to every direction, one group of directions at a time: ``[m, c, s, K]``.

    ``groups`` is :func:`direction_groups`' split of K. Each group's directions are sliced from the basis leaves
    inside the loop (never a padded or regrouped copy of the whole basis); the groups of one size run in a
    ``lax.map``, so the memory is one group's.
    """
    parts, start = [], 0
    for size, count in groups:

        def group(i, start=start, size=size):
            rows = jax.tree_util.tree_map(lambda leaf: lax.dynamic_slice_in_dim(leaf, start + i * size, size), directions)
            return jax.vmap(along)(rows)  # [size, m, c, s]

        out = group(0) if count == 1 else lax.map(group, jnp.arange(count))
        parts.append(out.reshape(count * size, *out.shape[-3:]))
        start += size * count
    return jnp.moveaxis(jnp.concatenate(parts) if len(parts) > 1 else parts[0], 0, -1)


def _forward_chunk(groups, loss_fn, params, directions, chunk):
    """``jax.linearize`` once (the primal pass gives the losses), then the tangent map per group of directions."""
    losses, tangent = jax.linearize(lambda p: _as_matrix(loss_fn(p, chunk)), params)
    out = _grouped_directional(groups, directions, lambda direction: tangent(direction)[None])
    return out[0], losses[..., None]


def _curvature_chunk(groups, loss_fn, params, directions, chunk):
    def along(direction):
        def directional(p):
            return jax.jvp(lambda q: _as_matrix(loss_fn(q, chunk)), (p,), (direction,))

        (losses, first), (_, second) = jax.jvp(directional, (params,), (direction,))
        return jnp.stack([first, second, jnp.broadcast_to(losses, first.shape)])

    out = _grouped_directional(groups, directions, along)
    return out[0], out[1], out[2][..., :1]


def _as_matrix(losses: jax.Array) -> jax.Array:
    return losses.reshape(losses.shape[0], -1)


# --- driver ---------------------------------------------------------------------------------------------------------


_CHUNK_KERNELS = {
    "loss": _loss_chunk,
    "block_norms": _block_norm_chunk,
    "reverse": _reverse_chunk,
    "forward": _forward_chunk,
    "curvature": _curvature_chunk,
}


def _stage_kernel(kind: str, loss_fn, chunk_size: int, num_chunks: int, groups: tuple, unroll: int, mesh):
    """Compiled: all ``num_chunks`` chunks of ``chunk_size`` sequences (per device) in one ``lax.scan``, for the
    partition rules in force (:func:`polca_jax.partition_rules`).

    The scan keeps one chunk's temporaries alive at a time (``unroll`` chunks per loop step), so the memory does not
    grow with the number of samples; the outputs are the only buffers that do.
    """
    return _compiled_stage_kernel(kind, loss_fn, chunk_size, num_chunks, groups, unroll, mesh, active_partition_rules())


@functools.lru_cache(maxsize=None)
def _compiled_stage_kernel(kind: str, loss_fn, chunk_size: int, num_chunks: int, groups: tuple, unroll: int, mesh,
                           rules):
    chunk_kernel = _CHUNK_KERNELS[kind]

    def run(params, directions, sequences):
        with partition_rules(rules):  # traced under the rules of the cache key
            return scanned(params, directions, sequences)

    def scanned(params, directions, sequences):
        if num_chunks == 1:
            return chunk_kernel(groups, loss_fn, params, directions, sequences)
        chunks = jax.tree_util.tree_map(lambda x: x.reshape(num_chunks, chunk_size, *x.shape[1:]), sequences)

        def step(carry, chunk):
            return carry, chunk_kernel(groups, loss_fn, params, directions, chunk)

        _, outputs = lax.scan(step, None, chunks, unroll=min(unroll, num_chunks))
        return tuple(out.reshape(num_chunks * chunk_size, *out.shape[2:]) for out in outputs)

    if mesh is not None:
        per_device = run

        def run(params, directions, sequences):
            # Mark the inputs that are whole over "data" as varying per device: otherwise the transpose of their
            # implicit broadcast sums every per-sample gradient over the "data" axis. Only "data" is manual: XLA
            # partitions the work over "model" from the parameters' and basis' shardings.
            params, directions = lax.pcast((params, directions), data_axes(mesh), to="varying")
            return per_device(params, directions, sequences)

        run = jax.shard_map(
            run,
            mesh=mesh,
            in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec(data_spec(mesh))),
            out_specs=PartitionSpec(data_spec(mesh)),
            axis_names=set(data_axes(mesh)),
        )
    return jax.jit(run)


def chunk_plan(num_sequences: int, max_chunk: int, shards: int = 1) -> tuple[int, int]:
    """``(chunk_size, num_chunks)`` per device: the fewest chunks of at most ``max_chunk`` sequences, of equal size,
    so that ``shards · num_chunks · chunk_size`` exceeds ``num_sequences`` by less than one sequence per chunk and
    shard (300 sequences, at most 32 per chunk → 10 chunks of 30, no padding)."""
    per_shard = -(-num_sequences // shards)
    num_chunks = -(-per_shard // max_chunk)
    return -(-per_shard // num_chunks), num_chunks


def _planned(kind, loss_fn, batch, directions, chunk_size, chunks_per_call, group_size, mesh):
    """The compiled-kernel function for ``kind`` and the batch padded to its whole chunks: ``(kernel, batch, n_seq,
    chunk, num_chunks)``."""
    if chunk_size < 1 or chunks_per_call < 1:
        raise PolcaError(f"chunk_size and chunks_per_call must be >= 1, got {chunk_size}, {chunks_per_call}")
    n_seq = batch_size(batch)
    shards = num_data_shards(mesh)
    size, num_chunks = chunk_plan(n_seq, chunk_size, shards)
    padded = size * num_chunks * shards
    if padded != n_seq:  # pad by repeating the last sequence; dropped from the outputs
        order = np.minimum(np.arange(padded), n_seq - 1)
        batch = jax.tree_util.tree_map(lambda x: x[order], batch)
    k = None if directions is None else jax.tree_util.tree_leaves(directions)[0].shape[0]
    groups = () if k is None else direction_groups(k, group_size)
    kernel = _stage_kernel(kind, loss_fn, size, num_chunks, groups, chunks_per_call, mesh)
    return kernel, shard_batch(batch, mesh), n_seq, size, num_chunks


def _run_chunked(kind, loss_fn, params, batch, directions, chunk_size, chunks_per_call, group_size, mesh):
    """Run the ``kind`` chunk kernel over all sequences in one compiled call; its outputs as arrays ``[n_seq, s, K]``
    (the last one the losses ``[n_seq, s, 1]``)."""
    kernel, batch, n_seq, _, _ = _planned(
        kind, loss_fn, batch, directions, chunk_size, chunks_per_call, group_size, mesh
    )
    outputs = kernel(params, directions, batch)
    return tuple(out[:n_seq] if out.shape[0] != n_seq else out for out in outputs)


@dataclasses.dataclass(frozen=True)
class KernelCost:
    """What XLA reports for the compiled kernel of one projection pass (see :func:`projection_kernel_cost`).

    Attributes:
      kind: ``"reverse"``, ``"forward"`` or ``"curvature"``.
      chunk_size, num_chunks: sequences per chunk (per device) and chunks per pass.
      temp_bytes: XLA's temporary buffers of the whole pass (``memory_analysis().temp_size_in_bytes``).
      output_bytes, argument_bytes: the pass' outputs and arguments (parameters, basis, batch).
      flops: floating-point operations of the whole pass (XLA's cost analysis of one chunk × ``num_chunks``; the
        loop's own analysis counts its body once).
    """

    kind: str
    chunk_size: int
    num_chunks: int
    temp_bytes: int
    output_bytes: int
    argument_bytes: int
    flops: float


def projection_kernel_cost(
    per_sample_loss_fn: PerSampleLossFn,
    params: PyTree,
    batch: PyTree,
    basis: Basis | jax.Array | PyTree,
    *,
    method: Method = "auto",
    curvature: bool = False,
    chunk_size: int | None = None,
    chunks_per_call: int = 1,
    basis_chunk_size: int = 8,
    mesh: jax.sharding.Mesh | None = None,
    with_flops: bool = True,
) -> KernelCost:
    """Compile, without running it, the kernel of a projection pass on these inputs, and report its memory and FLOPs.

    The kernel is the one :func:`per_sample_projections` (or, with ``curvature=True``,
    :func:`per_sample_projections_and_curvature`) would run.

    Args:
      per_sample_loss_fn, params, batch, basis, method, chunk_size, chunks_per_call, basis_chunk_size, mesh: as in
        :func:`per_sample_projections`.
      curvature: cost the pass with curvatures (:func:`per_sample_projections_and_curvature`) instead.
      with_flops: also compile one chunk for XLA's FLOP count; False: ``flops`` is NaN, one compilation instead of
        two.

    Returns:
      A ``KernelCost``: ``kind``, ``chunk_size``, ``num_chunks``, ``temp_bytes``, ``output_bytes``,
      ``argument_bytes`` (as XLA reports them for the whole pass) and ``flops``.

    Raises:
      PolcaError: for the inputs :func:`per_sample_projections` refuses.

    Example:
      ``params``, ``batch``, ``per_sample_loss``: the least squares of :func:`polca_jax.hvp`'s example.

      >>> cost = pj.projection_kernel_cost(per_sample_loss, params, batch, pj.basis_from_matrix(jnp.eye(3)[:2]),
      ...                                  with_flops=False)
      >>> cost.kind, cost.chunk_size, cost.num_chunks  # K = 2 < 4·s: forward mode, the 4 sequences in one chunk
      ('forward', 4, 1)
    """
    what = "projection_kernel_cost"
    n_seq = _check_inputs(what, params, batch, mesh)
    params = shard_params(params, mesh)  # laid out as the kernels it measures lay it out
    directions, num_directions = _directions(basis, params, what, mesh)
    samples = _samples_per_sequence(per_sample_loss_fn, params, batch, n_seq, what)
    method = _resolved_method(method, samples, num_directions)
    kind = "curvature" if curvature else method
    if chunk_size is None:
        chunk_size = _default_chunk("forward" if curvature else method, samples)
    kernel, padded, _, size, num_chunks = _planned(
        kind, per_sample_loss_fn, batch, directions, chunk_size, chunks_per_call, basis_chunk_size, mesh
    )
    compiled = kernel.lower(params, directions, padded).compile()
    memory = compiled.memory_analysis()
    flops = float("nan")
    if with_flops:
        one_chunk = jax.tree_util.tree_map(lambda x: x[: size * num_data_shards(mesh)], padded)
        groups = direction_groups(num_directions, basis_chunk_size)
        single = _stage_kernel(kind, per_sample_loss_fn, size, 1, groups, 1, mesh).lower(params, directions, one_chunk)
        analysis = single.compile().cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        flops = float(analysis.get("flops", 0.0)) * num_chunks
    return KernelCost(
        kind, size, num_chunks, int(memory.temp_size_in_bytes), int(memory.output_size_in_bytes),
        int(memory.argument_size_in_bytes), flops,
    )


def _check_inputs(what: str, params: PyTree, batch: PyTree, mesh) -> int:
    """The checks every public kernel runs once, on the host: a non-empty batch (its size n_seq is returned),
    parameters of one floating dtype, finite parameter values (when not traced), a mesh with the expected axes."""
    n_seq = batch_size(batch, what)
    check_mesh(mesh, what)
    check_params(params, what)
    check_finite_params(params, what)
    return n_seq


def _directions(basis, params, what: str, mesh) -> tuple[PyTree, int]:
    """The basis as a params-shaped pytree of ``[K, ...]`` leaves in the parameters' dtype (split like the
    parameters over ``mesh``'s ``"model"`` axis), and K.

    A :class:`Basis` was checked finite when made; a matrix or pytree is checked here (when not traced).
    """
    if isinstance(basis, Basis):
        return basis.as_tree(params, mesh), basis.size
    fix = "every basis entry must be finite"
    if isinstance(basis, jax.Array | np.ndarray):
        if basis.ndim != 2 or basis.shape[1] != tree.num_params(params):
            raise PolcaError(f"{what}: basis matrix must be [K, {tree.num_params(params)}], got shape {basis.shape}")
        check_finite_tree(basis, f"{what}: the basis matrix", fix)
        return shard_rows(split_rows(jnp.asarray(basis), tree.structure_signature(params)), mesh), basis.shape[0]
    leaves, treedef = jax.tree_util.tree_flatten(basis)
    if treedef != jax.tree_util.tree_structure(params):
        raise PolcaError(f"{what}: a basis pytree must have the structure of params, with [K, ...] leaves")
    k = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    shapes_ok = all(np.shape(b)[1:] == np.shape(p) for b, p in zip(leaves, jax.tree_util.tree_leaves(params)))
    if len(k) != 1 or None in k or not shapes_ok:
        raise PolcaError(f"{what}: every basis leaf must be [K, *param.shape] with the same K")
    check_finite_tree(basis, f"{what}: the basis pytree", fix)
    rows = jax.tree_util.tree_map(lambda b, p: jnp.asarray(b, jnp.result_type(p)), basis, params)
    return shard_rows(rows, mesh), k.pop()


def _samples_per_sequence(loss_fn, params, batch, n_seq: int, what: str) -> int:
    """Samples per sequence s of ``loss_fn``'s ``[n_seq]`` (s = 1) or ``[n_seq, s]`` output; raise for other shapes."""
    out = jax.eval_shape(loss_fn, params, batch)
    check_loss_dtype(out.dtype, f"{what}: per_sample_loss_fn")
    shape = out.shape
    if len(shape) not in (1, 2) or shape[0] != n_seq:
        raise PolcaError(
            f"{what}: per_sample_loss_fn must return [n_seq] or [n_seq, n_tok] losses with n_seq={n_seq}, got shape "
            f"{shape}; return one loss per sample (or per token), not their mean"
        )
    return 1 if len(shape) == 1 else shape[1]


def _default_chunk(method: str, samples_per_sequence: int) -> int:
    if method == "reverse":
        return max(1, REVERSE_SAMPLES_PER_CHUNK // samples_per_sequence)
    return FORWARD_SEQUENCES_PER_CHUNK


def _select_samples(values: jax.Array, mask: np.ndarray | None) -> jax.Array:
    """``[n_seq, s, K]`` → ``[N, K]``, keeping the samples where ``mask`` is True."""
    flat = values.reshape(-1, values.shape[-1])
    if mask is None:
        return flat
    mask = np.asarray(mask, bool)
    if mask.size != flat.shape[0] or mask.shape[0] != values.shape[0]:
        raise PolcaError(f"mask must have shape {values.shape[:2]} (sequences × samples), got {mask.shape}")
    if not mask.any():
        raise PolcaError("the mask selects no samples; pass a mask with at least one True entry")
    return flat[np.flatnonzero(mask.reshape(-1))]
