"""Orthonormal bases of the training subspace: Algorithm 1 (Hessian), random, parameter axes, user matrices."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from polca_jax import tree
from polca_jax.checks import (
    batch_size,
    check_finite_params,
    check_finite_tree,
    check_params,
    check_same_structure,
    checkpoint_steps,
    count_nonfinite,
    is_traced,
)
from polca_jax._distributed import is_writer, sync, to_host
from polca_jax.fingerprints import digests_differ, loss_digest, params_digest
from polca_jax.files import (
    file_digest,
    load_npy,
    load_npz,
    read_json,
    save_npy_atomic,
    save_npz_atomic,
    write_json_atomic,
)
from polca_jax._progress import progress_bar
from polca_jax._hvp import GradientCovarianceMatvec, HessianMatvec, ScaledHessianMatvec
from polca_jax._interrupt import stop_if_requested, stop_on_sigterm
from polca_jax._lanczos import check_orthonormal, tree_eigenpairs
from polca_jax._sharding import check_mesh, shard_batch, shard_params, shard_rows
from polca_jax.errors import CorruptRunDirectory, PolcaError, ResumeMismatch

PyTree = Any
FORMAT_VERSION = 1
MANIFEST = "basis.json"


class Basis:
    """K orthonormal directions in the flat parameter space (``ravel_pytree`` order).

    Attributes:
      vectors: ``[K, P]`` orthonormal rows.
      eigenvalues: ``[K]`` Hessian eigenvalue each direction was found with (NaN where it has none).
      steps: ``[K]`` training step of the checkpoint each direction came from (-1 where none).
      method: how the basis was made (``"hessian"``, ``"shuffled_hessian"``, ``"random"``, ...).
      residuals: ``[K]`` Ritz residual norms (NaN where none).

    Construction checks shapes and that the vectors are finite (not that they are orthonormal: see
    :func:`polca_jax.check_orthonormal` and :func:`basis_from_matrix`).

    One copy on the device: the basis holds either its ``[K, P]`` matrix or, once :meth:`as_tree` has been called
    (the kernels do), the same numbers as a params-shaped pytree of ``[K, ...]`` leaves — never both. ``vectors``
    then rebuilds the matrix on demand (a temporary copy that the caller owns); :meth:`coordinates`,
    :meth:`check_orthonormal` and :meth:`save` work from the pytree without it.

    Raises:
      PolcaError: for vectors that are not ``[K, P]`` or not finite, or eigenvalues, steps or residuals that are not
        ``[K]``.

    Example:
      >>> basis = pj.Basis(jnp.eye(3)[:2], eigenvalues=[2.0, 1.0], steps=[0, 0], method="user",
      ...                  residuals=[0.0, 0.0])
      >>> basis.size, basis.dim, basis.coordinates(jnp.array([3.0, 4.0, 5.0])).tolist()  # ⟨b, v⟩ for each row b
      (2, 3, [3.0, 4.0])
    """

    def __init__(self, vectors, eigenvalues, steps, method: str, residuals):
        vectors = jnp.asarray(vectors)
        if vectors.ndim != 2:
            raise PolcaError(f"basis vectors must be [K, P], got shape {vectors.shape}")
        check_finite_tree(vectors, "a Basis' vector matrix", "build the basis from finite vectors")
        self._flat: jax.Array | None = vectors
        self._tree: PyTree | None = None  # [K, *leaf.shape] leaves in the vectors' dtype, for ``_tree_signature``
        self._tree_signature: tuple | None = None
        self._shape, self._dtype = tuple(vectors.shape), vectors.dtype
        self.method = method
        k = vectors.shape[0]
        for name, value in (("eigenvalues", eigenvalues), ("steps", steps), ("residuals", residuals)):
            value = np.asarray(value)
            if value.shape != (k,):
                raise PolcaError(f"basis {name} must have shape [{k}], got {value.shape}")
            setattr(self, name, value)

    @classmethod
    def from_rows(cls, rows: PyTree, eigenvalues, steps, method: str, residuals) -> "Basis":
        """A basis held as a params-shaped pytree of ``[K, *leaf.shape]`` rows (of one dtype), as :meth:`as_tree`
        gives it; the rows stay where they are (e.g. split over a mesh), no ``[K, P]`` matrix is made."""
        leaves = jax.tree_util.tree_leaves(rows)
        if not leaves or len({leaf.shape[0] for leaf in leaves}) != 1 or len({leaf.dtype for leaf in leaves}) != 1:
            raise PolcaError("basis rows must be a pytree of [K, ...] leaves with one K and one dtype")
        check_finite_tree(rows, "a Basis' rows", "build the basis from finite vectors")
        k = leaves[0].shape[0]
        basis = cls(jnp.zeros((k, 0), leaves[0].dtype), eigenvalues, steps, method, residuals)
        basis._flat, basis._tree = None, rows
        basis._tree_signature = tree.structure_signature(
            jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype), rows))
        basis._shape = (k, sum(leaf.size // k for leaf in leaves))
        return basis

    def __repr__(self) -> str:
        return (f"Basis(size={self.size}, dim={self.dim}, dtype={self.dtype}, method={self.method!r}, "
                f"eigenvalues={self.eigenvalues!r}, steps={self.steps!r}, residuals={self.residuals!r})")

    @property
    def vectors(self) -> jax.Array:
        """``[K, P]`` orthonormal rows; rebuilt from the pytree (a new array) when the basis holds that instead."""
        if self._flat is not None:
            return self._flat
        return _join_rows(self._tree)

    @property
    def size(self) -> int:
        """K, the number of directions."""
        return self._shape[0]

    @property
    def dim(self) -> int:
        """P, the number of parameters."""
        return self._shape[1]

    @property
    def dtype(self):
        """The vectors' dtype."""
        return self._dtype

    @property
    def device_bytes(self) -> int:
        """Bytes of device memory the basis' vectors occupy: ``K · P · itemsize`` (one copy)."""
        held = self._flat if self._flat is not None else self._tree
        return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(held))

    def as_tree(self, like: PyTree, mesh: Mesh | None = None) -> PyTree:
        """The rows as a params-shaped pytree with leaves ``[K, *leaf.shape]`` in ``like``'s dtypes.

        The first call for a structure replaces the basis' ``[K, P]`` matrix by this pytree (in the basis' own dtype),
        so the device holds one copy; a ``like`` of another dtype gets a cast copy, made per call. With a ``mesh``
        the rows are split over its ``"model"`` axis like the parameters (the held copy is moved, not copied).
        """
        check_width(self, like)
        signature = tree.structure_signature(like)
        if self._flat is not None and is_traced(self._flat):
            return split_rows(self._flat, signature)
        native = _with_dtype(signature, self._dtype)
        if self._tree_signature != native:
            with jax.ensure_compile_time_eval():  # concrete even when ``like`` is traced: safe to keep
                rows = self.vectors
                self._flat = None
                self._tree = None  # release the old pytree before the new one is made
                self._tree = split_rows(rows, native)
                del rows
            self._tree_signature = native
        if mesh is not None:
            self._tree = shard_rows(self._tree, mesh)
        if native == signature:
            return self._tree
        return jax.tree_util.tree_map(lambda b, p: b.astype(p.dtype), self._tree, tree.from_signature(signature))

    def coordinates(self, vector: jax.Array | PyTree) -> jax.Array:
        """⟨b, v⟩ for every direction b: ``[K]``, for a flat ``[P]`` vector or a params pytree."""
        flat_given = isinstance(vector, jax.Array | np.ndarray) and np.ndim(vector) == 1
        if self._flat is not None:
            flat = vector if flat_given else tree.ravel(vector)
            return jnp.dot(self._flat, flat.astype(self._dtype), precision=jax.lax.Precision.HIGHEST)
        like = tree.from_signature(self._tree_signature)
        if flat_given:
            pieces = tree.unravel(jnp.asarray(vector), like)
        elif jax.tree_util.tree_structure(vector) == jax.tree_util.tree_structure(like):
            pieces = vector
        else:
            pieces = tree.unravel(tree.ravel(vector), like)
        return _tree_coordinates(self._tree, pieces)

    def check_orthonormal(self, atol: float | None = None) -> None:
        """Raise ``ValueError`` unless the rows are orthonormal (``max |B Bᵀ − I| <= atol``), as
        :func:`polca_jax.check_orthonormal` does, without rebuilding the ``[K, P]`` matrix."""
        if self._flat is not None:
            check_orthonormal(self._flat, atol=atol)
            return
        if atol is None:
            atol = 1e-8 if self._dtype == jnp.float64 else 1e-4
        gram = np.asarray(_tree_gram(self._tree), np.float64)
        error = float(np.max(np.abs(gram - np.eye(len(gram))))) if len(gram) else 0.0
        if error > atol:
            raise PolcaError(
                f"basis rows are not orthonormal: max |B Bᵀ − I| = {error:.3g} > {atol:g}; "
                "orthonormalise it (e.g. basis_from_matrix(..., orthonormalize=True))"
            )

    def select(self, index) -> "Basis":
        """A basis of the chosen rows (an index array, a boolean mask or a slice)."""
        index = np.arange(self.size)[index]
        if self._flat is not None:
            rows = self._flat[index]
        else:  # only the chosen rows, not the whole matrix
            rows = _join_rows(jax.tree_util.tree_map(lambda leaf: leaf[index], self._tree))
        return Basis(rows, self.eigenvalues[index], self.steps[index], self.method, self.residuals[index])

    def save(self, directory: str | Path) -> None:
        """Write ``vectors.npy``, ``info.npz`` (eigenvalues, steps, residuals), then ``basis.json`` to ``directory``.

        Every file is written atomically and ``basis.json`` last, after removing an old one: a directory with a
        ``basis.json`` holds a complete save, and saving over an earlier save replaces it cleanly. In a multi-process
        run every process calls it and process 0 writes.
        """
        vectors = self._host_vectors()  # every process takes part (the rows may be split across them)
        if is_writer():
            directory = Path(directory)
            directory.mkdir(parents=True, exist_ok=True)
            (directory / MANIFEST).unlink(missing_ok=True)
            save_npy_atomic(directory / "vectors.npy", vectors)
            info = {"eigenvalues": self.eigenvalues, "steps": self.steps, "residuals": self.residuals}
            save_npz_atomic(directory / "info.npz", **info)
            manifest = {"format": FORMAT_VERSION, "method": self.method, "size": self.size, "dim": self.dim}
            write_json_atomic(directory / MANIFEST, manifest)
        sync("polca_jax basis saved")

    @classmethod
    def load(cls, directory: str | Path) -> "Basis":
        """Read a basis written by :meth:`save`; a missing or inconsistent file raises ``ValueError`` naming it."""
        info = load_basis_info(directory)
        path = Path(directory) / "vectors.npy"
        try:
            vectors = load_npy(path)
        except ValueError as error:
            raise PolcaError(f"cannot read a basis from {directory}: {error}") from error
        if vectors.shape != (info.pop("size"), info.pop("dim")):
            raise PolcaError(f"corrupt basis in {directory}: {path} has shape {vectors.shape}, unlike {MANIFEST}")
        return cls(vectors, **info)

    def _host_vectors(self) -> np.ndarray:
        """The ``[K, P]`` matrix in host memory, assembled leaf by leaf (no second device copy)."""
        if self._flat is not None:
            return to_host(self._flat)
        rows = np.empty(self._shape, self._dtype)
        start = 0
        for leaf in jax.tree_util.tree_leaves(self._tree):
            width = leaf.size // self.size
            rows[:, start : start + width] = to_host(leaf).reshape(self.size, width)
            start += width
        return rows


def _with_dtype(signature: tuple, dtype) -> tuple:
    """A :func:`polca_jax.tree.structure_signature` with every leaf's dtype replaced by ``dtype``."""
    treedef, leaves = signature
    return treedef, tuple((shape, jnp.dtype(dtype)) for shape, _ in leaves)


@jax.jit
def _join_rows(rows_tree: PyTree) -> jax.Array:
    """A pytree of ``[K, ...]`` leaves as one ``[K, P]`` matrix (``ravel_pytree`` order)."""
    leaves = jax.tree_util.tree_leaves(rows_tree)
    return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)


@jax.jit
def _tree_coordinates(rows_tree: PyTree, vector_tree: PyTree) -> jax.Array:
    """Σ over leaves of ``[K, ...] · [...]``: the ``[K]`` coordinates of a params-shaped vector."""
    return sum(
        jnp.dot(b.reshape(b.shape[0], -1), v.reshape(-1).astype(b.dtype), precision=jax.lax.Precision.HIGHEST)
        for b, v in zip(jax.tree_util.tree_leaves(rows_tree), jax.tree_util.tree_leaves(vector_tree))
    )


@jax.jit
def _tree_gram(rows_tree: PyTree) -> jax.Array:
    """``B Bᵀ`` ``[K, K]`` summed over the leaves of a pytree of ``[K, ...]`` rows."""
    return sum(
        jnp.dot(b.reshape(b.shape[0], -1), b.reshape(b.shape[0], -1).T, precision=jax.lax.Precision.HIGHEST)
        for b in jax.tree_util.tree_leaves(rows_tree)
    )


def load_basis_info(directory: str | Path) -> dict:
    """What a saved basis holds besides its vectors: read without reading its ``[K, P]`` matrix.

    Args:
      directory: a directory that :meth:`Basis.save` wrote.

    Returns:
      A dict: ``method`` (the name it was made under), ``size`` (K), ``dim`` (P), and the ``[K]`` arrays
      ``eigenvalues``, ``steps`` and ``residuals`` (as :meth:`Basis.load` would give them).

    Raises:
      PolcaError: naming the file, when the directory's manifest or ``info.npz`` is missing or cannot be read.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     pj.basis_from_matrix(jnp.eye(3)[:2]).save(directory)
      ...     info = pj.load_basis_info(directory)
      >>> info["method"], info["size"], info["dim"], info["steps"].tolist()
      ('user', 2, 3, [-1, -1])
    """
    directory = Path(directory)
    info_path = directory / "info.npz"
    try:
        manifest = read_json(directory / MANIFEST, required=("method", "size", "dim"))
    except ValueError as error:
        raise PolcaError(f"cannot read a basis from {directory}: {error}") from error
    try:
        arrays = load_npz(info_path, ("eigenvalues", "steps", "residuals"))
    except PolcaError as error:
        raise PolcaError(f"cannot read a basis from {directory}: {error}") from error
    return {"method": manifest["method"], "size": manifest["size"], "dim": manifest["dim"], **arrays}


@functools.partial(jax.jit, static_argnums=1)
def split_rows(vectors: jax.Array, signature: tuple) -> PyTree:
    """``vectors [K, P]`` as a pytree of ``[K, *leaf.shape]`` leaves for params of ``tree.structure_signature``."""
    return tree.unravel_rows(vectors, tree.from_signature(signature))


def check_width(basis: Basis, params: PyTree) -> None:
    """Raise ``ValueError`` unless the basis has one column per parameter."""
    num = tree.num_params(params)
    if basis.dim != num:
        raise PolcaError(f"basis has width {basis.dim} but the parameters have {num} entries")


def _unknown(k: int) -> np.ndarray:
    return np.full(k, np.nan)


def basis_from_matrix(
    matrix: jax.Array | np.ndarray,
    *,
    orthonormalize: bool = False,
    eigenvalues: np.ndarray | None = None,
    steps: np.ndarray | None = None,
    method: str = "user",
) -> Basis:
    """A :class:`Basis` from a user's ``[K, P]`` rows.

    Args:
      matrix: ``[K, P]`` floating rows, in the parameters' flat order (``jax.flatten_util.ravel_pytree``).
      orthonormalize: replace the rows by their Gram–Schmidt (QR) orthonormalisation, which keeps each row's span
        and sign; without it, rows that are not orthonormal are refused.
      eigenvalues, steps: optional ``[K]`` values stored with the basis (default: unknown, NaN; steps -1).
      method: the name the basis is stored under.

    Returns:
      A :class:`Basis` of the K (orthonormalised) rows, without Ritz residuals.

    Raises:
      PolcaError: for a matrix that is not ``[K, P]`` with 1 <= K <= P, not floating point, not finite, not
        orthonormal (without ``orthonormalize``) or, with it, of linearly dependent rows.

    Example:
      >>> basis = pj.basis_from_matrix(jnp.array([[1.0, 1.0], [1.0, 0.0]]), orthonormalize=True)
      >>> np.asarray(basis.vectors, float).round(3).tolist(), basis.method
      ([[0.707, 0.707], [0.707, -0.707]], 'user')
      >>> pj.basis_from_matrix(jnp.array([[1.0, 1.0]]))  # not orthonormal, and not asked to orthonormalise
      Traceback (most recent call last):
        ...
      polca_jax.errors.PolcaError: basis rows are not orthonormal: ...
    """
    matrix = jnp.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[0] > matrix.shape[1]:
        raise PolcaError(f"a basis matrix must be [K, P] with 1 <= K <= P, got shape {matrix.shape}")
    if not jnp.issubdtype(matrix.dtype, jnp.floating):
        raise PolcaError(f"a basis matrix must be floating point, got dtype {matrix.dtype}")
    check_finite_tree(matrix, "the basis matrix")
    if orthonormalize:
        q, r = jnp.linalg.qr(matrix.T)
        if np.min(np.abs(np.diag(np.asarray(r)))) <= 1e-6 * np.max(np.abs(np.asarray(r))):
            raise PolcaError("basis matrix rows are linearly dependent; cannot orthonormalise")
        matrix = (q * jnp.sign(jnp.diag(r))).T
    else:
        check_orthonormal(matrix)
    k = matrix.shape[0]
    return Basis(
        matrix,
        _unknown(k) if eigenvalues is None else eigenvalues,
        np.full(k, -1) if steps is None else steps,
        method,
        _unknown(k),
    )


def random_basis(params: PyTree, k: int, key: jax.Array) -> Basis:
    """K random orthonormal directions (QR of a Gaussian matrix) in the parameter space of ``params``.

    Args:
      params: parameters pytree (only its shapes and dtype are used).
      k: the number of directions, 1 <= k <= the number of parameters.
      key: PRNG key.

    Returns:
      A :class:`Basis` (``method`` ``"random"``) of ``k`` rows in the parameters' dtype, without eigenvalues.

    Raises:
      PolcaError: for parameters that are not all of one floating dtype, or ``k`` out of range.

    Example:
      ``params``: the least squares of :func:`polca_jax.hvp`'s example (3 parameters).

      >>> basis = pj.random_basis(params, 2, jax.random.key(0))
      >>> basis.size, basis.dim, basis.method
      (2, 3, 'random')
      >>> basis.check_orthonormal()  # passes: returns None
    """
    check_params(params, "random_basis")
    dim = tree.num_params(params)
    if not 1 <= k <= dim:
        raise PolcaError(f"need 1 <= k <= {dim} random directions, got {k}")
    dtype = tree.ravel(params).dtype
    q, _ = jnp.linalg.qr(jax.random.normal(key, (dim, k), dtype))
    return Basis(q.T, _unknown(k), np.full(k, -1), "random", _unknown(k))


def parameter_axis_basis(params: PyTree, m: int, *, step: int = -1) -> Basis:
    """The m parameter axes whose values are largest in magnitude in ``params`` (the paper's LCA baseline).

    Args:
      params: the parameters whose largest entries choose the axes (the paper: the final ones).
      m: the number of axes, 1 <= m <= the number of parameters.
      step: the training step stored with each direction.

    Returns:
      A :class:`Basis` (``method`` ``"parameter_axes"``) of ``m`` one-hot rows, largest magnitude first, without
      eigenvalues.

    Raises:
      PolcaError: for parameters that are not all of one floating dtype or not finite, or ``m`` out of range.

    Example:
      >>> basis = pj.parameter_axis_basis({"w": jnp.array([0.1, -3.0, 2.0])}, 2)
      >>> basis.vectors.tolist(), basis.method
      ([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], 'parameter_axes')
    """
    check_params(params, "parameter_axis_basis")
    check_finite_params(params, "parameter_axis_basis")
    flat = tree.ravel(params)
    if not 1 <= m <= flat.size:
        raise PolcaError(f"need 1 <= m <= {flat.size} parameter axes, got {m}")
    axes = jnp.argsort(-jnp.abs(flat))[:m]
    vectors = jax.nn.one_hot(axes, flat.size, dtype=flat.dtype)
    return Basis(vectors, _unknown(m), np.full(m, step), "parameter_axes", _unknown(m))


def hessian_basis(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    checkpoints: Sequence[PyTree],
    batch: PyTree,
    *,
    k_per_checkpoint: int = 1,
    num_iters: int = 20,
    key: jax.Array,
    steps: Sequence[int] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
    method: str | None = None,
    partial_dir: str | Path | None = None,
    scale: Callable[[PyTree], PyTree] | Sequence[PyTree] | None = None,
) -> Basis:
    """Algorithm 1: at each checkpoint, the top-k eigenvectors of ``Π⊥ H Π⊥`` on the complement of those found before.

    With a ``scale``, those of ``Π⊥ S H S Π⊥``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the aggregate loss whose Hessian is used.
      checkpoints: T params pytrees of identical structure (e.g. :class:`polca_jax.OrbaxCheckpoints`).
      batch: the training sample the Hessian is taken on (leaves with a leading sample axis).
      k_per_checkpoint: k, new vectors per checkpoint (the paper: 1).
      num_iters: Lanczos steps per checkpoint.
      key: PRNG key; checkpoint t uses ``fold_in(key, t)``.
      steps: training step of each checkpoint (default: ``checkpoints.steps`` or 0..T-1).
      mesh: optional mesh; the batch is sharded over its ``"data"`` axis.
      progress: show a progress bar over the checkpoints.
      partial_dir: optional directory that keeps each checkpoint's vectors as soon as they are found; a call with
        the same arguments resumes after the last kept checkpoint, with the same result as an uninterrupted call. A
        directory kept by a call with other arguments, loss, batch or checkpoints raises
        :class:`polca_jax.ResumeMismatch`; the caller removes it once the basis is saved.
      scale: optional diagonal preconditioner: the basis is then that of the Hessian of the preconditioned loss,
        ``S H S`` with S = diag(s) (the loss' Hessian in coordinates u with θ = S u; for Adam, S² = 1/(√v̂ + ε), so
        that S H S has the eigenvalues of Adam's preconditioned Hessian). Either ``params -> s`` (a pytree like
        params), or one such pytree per checkpoint (e.g. :class:`polca_jax.pipeline.AdamScales`).
      method: the name the basis is stored under (default ``"hessian"``, ``"preconditioned_hessian"`` with a scale).

    Returns:
      A :class:`Basis` of ``T·k`` orthonormal vectors with their Ritz values, residuals and steps.

    Raises:
      PolcaError: for an empty batch, parameters that are not floating point (or mix dtypes), checkpoints that are
        not a sequence or differ in structure, more vectors than parameters or ``num_iters`` out of range, NaN
        parameters, a scale unlike the parameters, and a loss whose Hessian-vector product is not finite. With a
        ``partial_dir``: :class:`polca_jax.ResumeMismatch` for one of another computation,
        :class:`polca_jax.CorruptRunDirectory` for kept rows changed since, :class:`polca_jax.Interrupted` after a
        SIGTERM.

    Example:
      One checkpoint, two directions; 3 Lanczos steps are exact for 3 parameters (``params``, ``batch``, ``loss``:
      the least squares of :func:`polca_jax.hvp`'s example).

      >>> basis = pj.hessian_basis(loss, [params], batch, k_per_checkpoint=2, num_iters=3, key=jax.random.key(0),
      ...                          progress=False)
      >>> basis.eigenvalues.round(3).tolist()
      [1.416, 0.512]
      >>> x = np.asarray(batch["x"], float)
      >>> np.linalg.eigvalsh(x.T @ x / 4)[::-1][:2].round(3).tolist()  # the dense Hessian's
      [1.416, 0.512]
    """
    digests = {"loss": lambda first, batch: loss_digest(loss_fn, first, batch)}
    if scale is None:
        matvec, operator_args = HessianMatvec(loss_fn), lambda params, t: ()
    else:
        matvec = ScaledHessianMatvec(loss_fn)
        operator_args, digests["scale"] = _scale_args(scale, "preconditioned_hessian_basis", len(checkpoints), mesh)
    return _evolving_basis(matvec, operator_args, "the loss or its Hessian-vector product", digests, checkpoints,
                           batch, k_per_checkpoint=k_per_checkpoint, num_iters=num_iters, key=key, steps=steps,
                           mesh=mesh, progress=progress, partial_dir=partial_dir,
                           method=method or ("hessian" if scale is None else "preconditioned_hessian"))


def _scale_args(scale, what: str, num_checkpoints: int, mesh) -> tuple[Callable, Callable]:
    """For a preconditioner's scale (``params -> s``, or one ``s`` per checkpoint): ``(params, t) -> (s,)``, the scale
    at checkpoint t checked against the parameters and placed on the mesh like them, and the digest of the scale
    that joins a partial basis' fingerprint."""
    if callable(scale):
        def scale_at(params, t):
            return scale(params)

        def digest(first, batch):
            return loss_digest(lambda p, b: scale(p), first, batch)
    elif isinstance(scale, Sequence) and not isinstance(scale, str):
        if len(scale) != num_checkpoints:
            raise PolcaError(f"{what}: {len(scale)} scales given for {num_checkpoints} checkpoints")

        def scale_at(params, t):
            return scale[t]

        def digest(first, batch):
            return tree.digest(scale[0])
    else:
        raise PolcaError(f"{what}: a scale is a function params -> pytree like params or one such pytree per "
                         f"checkpoint, got {type(scale).__name__}")

    def operator_args(params: PyTree, t: int) -> tuple:
        s = scale_at(params, t)
        check_same_structure(params, s, f"{what}: the scale")
        return (shard_params(s, mesh),)

    return operator_args, digest


def gradient_covariance_basis(
    per_sample_loss_fn: Callable[[PyTree, PyTree], jax.Array],
    checkpoints: Sequence[PyTree],
    batch: PyTree,
    *,
    scale: str | Callable[[PyTree], PyTree] | Sequence[PyTree] | None = "rms",
    k_per_checkpoint: int = 1,
    num_iters: int = 20,
    key: jax.Array,
    steps: Sequence[int] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
    partial_dir: str | Path | None = None,
) -> Basis:
    """Algorithm 1 with the (preconditioned) covariance of per-sample gradients in place of the Hessian.

    At each checkpoint, the top-k eigenvectors of ``Π⊥ S C S Π⊥``, with C = (1/N) Σ_x (g(x) − ḡ)(g(x) − ḡ)ᵀ the
    covariance of the N per-sample gradients g(x) = ∇L(x; θ_t) and S = diag(s) a per-parameter scale, on the
    complement of the vectors found so far. A direction is then one along which samples' (scaled) gradients differ
    most, rather than one of high aggregate curvature, which a readout shared by all samples dominates.

    Args:
      per_sample_loss_fn: ``(params, batch) -> [n]`` (or ``[n_seq, n_tok]``, every entry a sample) per-sample losses.
      checkpoints, batch, k_per_checkpoint, num_iters, key, steps, mesh, progress, partial_dir: as in
        :func:`hessian_basis` (``batch``: the samples whose gradients are used).
      scale: ``"rms"`` (default): s = 1 / RMS over the samples of each parameter's per-sample gradient at that
        checkpoint (a diagonal preconditioner, like Adam's 1/√v; parameters whose gradient is 0 for every sample
        get s = 0); None: s = 1 (the plain covariance); a function ``params -> pytree like params`` giving s at a
        checkpoint; or one such pytree per checkpoint (e.g. 1 / (√v̂ + ε) from the optimiser state saved with it).

    Each product with S C S costs one forward-mode and one reverse-mode pass over the batch (about a Hessian-vector
    product); ``scale="rms"`` adds one pass of per-sample gradients per checkpoint.

    Returns:
      A :class:`Basis` (``method`` ``"gradient_covariance"``, or ``"scaled_gradient_covariance"`` with a scale) of
      ``T·k`` orthonormal vectors with the covariance's eigenvalues, Ritz residuals and steps.

    Raises:
      PolcaError: as :func:`hessian_basis`, and for a ``scale`` that is none of the accepted kinds, or per-sample
        losses or covariance products that are not finite.

    Example:
      At w = 0 the per-sample gradients are ``−y x``; their scaled covariance's top direction (``params``,
      ``batch``, ``per_sample_loss``: the least squares of :func:`polca_jax.hvp`'s example).

      >>> basis = pj.gradient_covariance_basis(per_sample_loss, [params], batch, num_iters=3, key=jax.random.key(0),
      ...                                      progress=False)
      >>> basis.method, basis.size
      ('scaled_gradient_covariance', 1)
    """
    digests = {"per_sample_loss": lambda first, batch: loss_digest(per_sample_loss_fn, first, batch)}
    if scale is None:
        method, digests["scale"] = "gradient_covariance", lambda first, batch: "none"

        def operator_args(params: PyTree, t: int) -> tuple:
            return (jax.tree_util.tree_map(jnp.ones_like, params),)
    else:
        method = "scaled_gradient_covariance"
        if isinstance(scale, str) and scale != "rms":
            raise PolcaError(f"scale must be 'rms', None, a function params -> pytree like params or one such pytree "
                             f"per checkpoint, got {scale!r}")
        given = functools.partial(rms_gradient_scale, per_sample_loss_fn, batch=batch) if scale == "rms" else scale
        operator_args, digests["scale"] = _scale_args(given, f"{method}_basis", len(checkpoints), mesh)
        if scale == "rms":
            digests["scale"] = lambda first, batch: "rms"
    return _evolving_basis(GradientCovarianceMatvec(per_sample_loss_fn), operator_args,
                           "the per-sample losses or their gradient covariance product", digests, checkpoints, batch,
                           k_per_checkpoint=k_per_checkpoint, num_iters=num_iters, key=key, steps=steps, mesh=mesh,
                           progress=progress, method=method, partial_dir=partial_dir)


def rms_gradient_scale(per_sample_loss_fn, params: PyTree, batch: PyTree) -> PyTree:
    """``1 / sqrt(mean over samples of g(x)²)`` per parameter: the scale :func:`gradient_covariance_basis` uses.

    The diagonal preconditioner of ``gradient_covariance_basis(..., scale="rms")``, computed by one compiled pass of
    per-sample gradients (16 sequences at a time).

    Args:
      per_sample_loss_fn: ``(params, batch) -> [n_seq]`` or ``[n_seq, n_tok]`` losses; a sequence's token losses are
        summed, so the mean is over sequences.
      params: the parameters at which the gradients are taken.
      batch: pytree of arrays with a leading ``n_seq`` axis.

    Returns:
      A pytree like ``params``: s per parameter, 0 where every per-sample gradient is 0.

    Example:
      At w = 0 the per-sample gradients are ``−y x`` (``params``, ``batch``, ``per_sample_loss``: the least squares
      of :func:`polca_jax.hvp`'s example).

      >>> np.asarray(pj.rms_gradient_scale(per_sample_loss, params, batch)["w"], float).round(3).tolist()
      [0.97, 1.789, 1.789]
    """
    return _rms_gradient_scale(per_sample_loss_fn, params, batch)


@functools.partial(jax.jit, static_argnums=0)
def _rms_gradient_scale(per_sample_loss_fn, params, batch):
    def squares(sample):
        single = jax.tree_util.tree_map(lambda leaf: leaf[None], sample)
        gradient = jax.grad(lambda p: jnp.sum(per_sample_loss_fn(p, single)))(params)
        return jax.tree_util.tree_map(jnp.square, gradient)

    # squared gradients of one sequence at a time, 16 sequences vectorised (a sequence's token samples are summed:
    # for token-level samples this is the RMS of per-sequence gradients)
    total = jax.tree_util.tree_map(lambda leaf: leaf.sum(axis=0), jax.lax.map(squares, batch, batch_size=16))
    count = jax.tree_util.tree_leaves(batch)[0].shape[0]
    return jax.tree_util.tree_map(
        lambda t: jnp.where(t > 0, 1.0 / jnp.sqrt(jnp.where(t > 0, t, 1.0) / count), 0.0).astype(t.dtype), total)


def _evolving_basis(matvec, operator_args: Callable[[PyTree, int], tuple], operator_name: str, digests: dict,
                    checkpoints: Sequence[PyTree], batch: PyTree, *, k_per_checkpoint: int, num_iters: int,
                    key: jax.Array, steps, mesh, progress: bool, method: str, partial_dir) -> Basis:
    """Algorithm 1 for any symmetric operator ``matvec(v, params, batch, *operator_args(params, t))`` of the
    parameters: the top-k eigenvectors at each checkpoint, deflated against those found before; ``digests``
    (name -> ``(first_params, batch) -> str``) join the partial directory's fingerprint."""
    what = f"{method}_basis"
    batch_size(batch, what)
    check_mesh(mesh, what)
    steps = checkpoint_steps(checkpoints, steps, what, increasing=False)
    if len(steps) == 0:
        raise PolcaError(f"{what} needs at least one checkpoint")
    first = checkpoints[0]
    check_params(first, f"{what}: checkpoint at step {steps[0]}")
    dim = tree.num_params(first)
    total = len(steps) * k_per_checkpoint
    if total > dim:
        raise PolcaError(f"{total} basis vectors requested but the model has only {dim} parameters")
    if not k_per_checkpoint <= num_iters <= dim - total + k_per_checkpoint:
        raise PolcaError(
            f"{what}: need k_per_checkpoint <= num_iters <= {dim - total + k_per_checkpoint} (the parameters left "
            f"after deflating the other vectors), got k_per_checkpoint={k_per_checkpoint}, num_iters={num_iters}"
        )
    like = tree.structure_signature(first)
    # Preallocated rows [total, *leaf.shape], split like the parameters: zero rows deflate nothing, so Lanczos
    # compiles once; the Krylov vectors are params-shaped too, so no [., P] array is ever whole on one device.
    found = shard_rows(jax.tree_util.tree_map(lambda leaf: jnp.zeros((total, *np.shape(leaf)), leaf.dtype), first), mesh)
    values, residuals = np.zeros(total), np.zeros(total)
    host_batch, batch = batch, shard_batch(batch, mesh)
    kept = None
    if partial_dir is not None:
        fingerprint = {"method": method, "steps": [int(s) for s in steps], "k_per_checkpoint": k_per_checkpoint,
                       "num_iters": num_iters, "key": np.asarray(jax.random.key_data(key)).tolist(),
                       "params": str(like), "batch": tree.digest(host_batch),
                       **{name: digest(first, host_batch) for name, digest in digests.items()}}
        kept = PartialBasis(partial_dir, fingerprint)
        found = kept.restore(found, values, residuals, like, checkpoints, mesh)
    start = 0 if kept is None else kept.num_done
    with stop_on_sigterm() if kept is not None else contextlib.nullcontext():  # kept per checkpoint: stops cleanly
        for t in progress_bar(range(start, len(steps)), progress, desc=f"{method} basis", initial=start,
                              total=len(steps)):
            params = first if t == 0 else checkpoints[t]
            check_same_structure(first, params, f"{what}: checkpoint at step {steps[t]}")
            check_finite_params(params, f"{what}: checkpoint at step {steps[t]}")
            placed = shard_params(params, mesh)
            pairs = tree_eigenpairs(
                matvec, like, k_per_checkpoint, num_iters, jax.random.fold_in(key, t), orthogonal_to=found,
                matvec_args=(placed, batch, *operator_args(placed, t)), mesh=mesh,
            )
            bad = count_nonfinite(pairs)
            if bad:
                raise PolcaError(
                    f"{what}: {operator_name} is not finite at the checkpoint at step {steps[t]} "
                    f"({bad} NaN or inf entries in the eigenpairs); check the loss on this batch at that checkpoint "
                    "(e.g. log or sqrt of 0, an overflow)"
                )
            rows = slice(t * k_per_checkpoint, (t + 1) * k_per_checkpoint)
            found = _set_rows(found, pairs.vectors, rows.start)
            values[rows], residuals[rows] = np.asarray(pairs.values), np.asarray(pairs.residuals)
            if kept is not None:
                kept.keep(t, pairs.vectors, values[rows], residuals[rows], params)
                if t + 1 < len(steps):
                    stop_if_requested(f"{t + 1} of {len(steps)} checkpoints of the {method} basis, kept in "
                                      f"{kept.directory}", "the same call resumes after them")
    return Basis.from_rows(found, values, np.repeat(np.asarray(steps), k_per_checkpoint), method, residuals)


@functools.partial(jax.jit, donate_argnums=0)
def _set_rows(rows: PyTree, new: PyTree, start: int) -> PyTree:
    """``rows`` with ``new``'s rows written from row ``start`` (in place: ``rows`` is donated)."""
    return jax.tree_util.tree_map(lambda r, n: jax.lax.dynamic_update_slice_in_dim(r, n, start, 0), rows, new)


class PartialBasis:
    """The vectors :func:`hessian_basis` has found so far, one file per checkpoint, in a directory.

    Layout: ``fingerprint.json`` (the call's arguments), then per finished checkpoint ``t`` the rows
    ``rows_{t}.npy [k, P]`` and, written last, ``done_{t}.json`` (eigenvalues, residuals, the rows' digest and the
    checkpoint parameters' digest). Only a checkpoint with its ``done`` record counts as kept.
    """

    def __init__(self, directory: str | Path, fingerprint: dict):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.num_done = 0
        path = self.directory / "fingerprint.json"
        if path.exists():
            stored = read_json(path)
            if stored != fingerprint:
                changed = sorted(key for key in {**stored, **fingerprint} if stored.get(key) != fingerprint.get(key))
                raise ResumeMismatch(
                    f"{self.directory} keeps a partial basis of another computation (differs in: "
                    f"{', '.join(changed)}); remove the directory to start the basis afresh"
                )
        elif is_writer():
            self.directory.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, fingerprint)
        sync("polca_jax partial basis opened")

    def _done(self, t: int) -> Path:
        return self.directory / f"done_{t:04d}.json"

    def _rows(self, t: int) -> Path:
        return self.directory / f"rows_{t:04d}.npy"

    def restore(self, found: PyTree, values: np.ndarray, residuals: np.ndarray, like: tuple, checkpoints,
                mesh: Mesh | None) -> PyTree:
        """``found`` with the kept rows written in (``values``, ``residuals`` filled in place); sets ``num_done``.

        A kept checkpoint whose parameters or rows file changed since raises :class:`polca_jax.ResumeMismatch` or
        :class:`polca_jax.CorruptRunDirectory`."""
        t = 0
        while t < len(checkpoints) and self._done(t).exists():
            record = read_json(self._done(t), required=("values", "residuals", "rows_digest", "params_digest"))
            if digests_differ(record["params_digest"], params_digest(checkpoints[t])):
                raise ResumeMismatch(
                    f"the checkpoint at position {t} is not the one {self.directory} found its vectors at (its "
                    "parameters changed); remove the directory to start the basis afresh"
                )
            if file_digest(self._rows(t)) != record["rows_digest"]:
                raise CorruptRunDirectory(f"{self._rows(t)} does not match its checksum in {self._done(t)}; remove "
                                          f"{self.directory} to start the basis afresh")
            rows = load_npy(self._rows(t))
            k = rows.shape[0]
            new = shard_rows(tree.unravel_rows(jnp.asarray(rows), tree.from_signature(like)), mesh)
            found = _set_rows(found, new, t * k)
            values[t * k:(t + 1) * k], residuals[t * k:(t + 1) * k] = record["values"], record["residuals"]
            t += 1
        self.num_done = t
        return found

    def keep(self, t: int, vectors: PyTree, values: np.ndarray, residuals: np.ndarray, params: PyTree) -> None:
        """Write checkpoint ``t``'s rows (a params-shaped ``[k, ...]`` pytree) and then its record."""
        leaves = [to_host(leaf) for leaf in jax.tree_util.tree_leaves(vectors)]
        digest = params_digest(params)
        if is_writer():
            rows = np.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)
            save_npy_atomic(self._rows(t), rows)
            write_json_atomic(self._done(t), {"values": [float(v) for v in values],
                                              "residuals": [float(r) for r in residuals],
                                              "rows_digest": file_digest(self._rows(t)), "params_digest": digest})
        sync("polca_jax partial basis kept")
        self.num_done = t + 1


def shuffled_hessian_basis(
    loss_fn, checkpoints: Sequence[PyTree], batch: PyTree, *, key: jax.Array, steps=None, **kwargs
) -> Basis:
    """Algorithm 1 over the checkpoints in a random order (the paper's "random shuffled Hessian" ablation).

    Args:
      loss_fn, checkpoints, batch, steps: as in :func:`hessian_basis`.
      key: PRNG key, split into the checkpoints' order and Algorithm 1's start vectors.
      **kwargs: :func:`hessian_basis`'s other options (``k_per_checkpoint``, ``num_iters``, ``mesh``, ...).

    Returns:
      A :class:`Basis` (``method`` ``"shuffled_hessian"``) whose steps follow the shuffled order.

    Raises:
      PolcaError: as :func:`hessian_basis`.

    Example:
      Two checkpoints, one direction each (``params``, ``batch``, ``loss``: the least squares of
      :func:`polca_jax.hvp`'s example).

      >>> checkpoints = [params, jax.tree.map(lambda w: w + 1.0, params)]
      >>> basis = pj.shuffled_hessian_basis(loss, checkpoints, batch, steps=[0, 10], key=jax.random.key(1),
      ...                                   k_per_checkpoint=1, num_iters=2, progress=False)
      >>> basis.method, basis.steps.tolist()  # the direction found first came from step 10's checkpoint
      ('shuffled_hessian', [10, 0])
    """
    steps = checkpoint_steps(checkpoints, steps, "shuffled_hessian_basis", increasing=False)
    order_key, key = jax.random.split(key)
    order = np.asarray(jax.random.permutation(order_key, len(steps)))
    return hessian_basis(
        loss_fn,
        _Permuted(checkpoints, order),
        batch,
        key=key,
        steps=[steps[i] for i in order],
        method="shuffled_hessian",
        **kwargs,
    )


class _Permuted(Sequence):
    """A lazy view of a sequence in another order."""

    def __init__(self, items: Sequence, order: np.ndarray):
        self._items, self._order = items, order

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, i):
        return self._items[int(self._order[i])]
