"""Hostile input to the kernels: every case ends in a clear PolcaError naming the problem, or in a correct result.

``CASES`` is the table of (case, call, message regex); each call takes the :class:`Inputs` of the tiny MLP. The
tests after it pin the cases whose fix is a correct result (dtype casts, kernels under a caller's jit, iteration of a
checkpoint store, crash-safe saves).
"""

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import mlp_mean_loss, mlp_token_losses, sgd_checkpoints

import polca_jax as pj
from polca_jax import files, tree
from polca_jax.errors import PolcaError

pytestmark = pytest.mark.core  # needs only the core install: pytest -m core


def sqrt_at_zero_losses(params, batch):
    """Finite per-sample losses with a NaN gradient: sqrt(0 · b1[0]) adds 0 but has an infinite derivative."""
    return mlp_token_losses(params, batch) + jnp.sqrt(0.0 * params["b1"][0])


def power_at_zero_losses(params, batch):
    """Finite losses and gradients with a NaN curvature: (0 · b1[0])^1.5 has an infinite second derivative."""
    return mlp_token_losses(params, batch) + (0.0 * params["b1"][0]) ** 1.5


def symmetric_matvec(v, matrix):
    return matrix @ v


class Inputs:
    """The MLP problem, two SGD checkpoints, a random basis and orbax directories (one with checkpoints 0, 10, 20
    and one without any)."""

    def __init__(self, mlp, directory: Path):
        self.mlp, self.params, self.batch = mlp, mlp.params, mlp.batch
        self.empty_batch = jax.tree_util.tree_map(lambda x: x[:0], mlp.batch)
        self.checkpoints = sgd_checkpoints(mlp, 2)
        self.basis = pj.random_basis(mlp.params, 2, jax.random.key(4))
        self.rows = np.asarray(self.basis.vectors)
        self.dim = tree.num_params(mlp.params)
        self.nan_params = dict(mlp.params, b1=jnp.full(4, jnp.nan))
        self.int_params = dict(mlp.params, b1=jnp.arange(4))
        self.mixed_params = dict(mlp.params, b1=mlp.params["b1"].astype(jnp.float32))
        self.orbax_dir = directory / "checkpoints"
        with ocp.CheckpointManager(self.orbax_dir, options=ocp.CheckpointManagerOptions(max_to_keep=None)) as manager:
            for step, params in zip((0, 10, 20), sgd_checkpoints(mlp, 3)):
                manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
            manager.wait_until_finished()
        self.empty_dir = directory / "no_checkpoints"
        self.empty_dir.mkdir()

    def polca(self, checkpoints=None, batch=None, basis=None, *, loss=mlp_token_losses, second_order="none",
              **kwargs):
        return pj.polca(
            loss, self.checkpoints if checkpoints is None else checkpoints, self.batch if batch is None else batch,
            self.basis if basis is None else basis, second_order=second_order, progress=False, **kwargs,
        )

    def hessian_basis(self, checkpoints=None, batch=None, *, loss=mlp_mean_loss, **kwargs):
        kwargs = {"num_iters": 4, **kwargs}
        return pj.hessian_basis(
            loss, self.checkpoints if checkpoints is None else checkpoints, self.batch if batch is None else batch,
            key=jax.random.key(0), progress=False, **kwargs,
        )

    def projections(self, params=None, batch=None, basis=None, *, loss=mlp_token_losses, **kwargs):
        return pj.per_sample_projections(
            loss, self.params if params is None else params, self.batch if batch is None else batch,
            self.rows if basis is None else basis, **kwargs,
        )

    def hvp(self, params=None, batch=None):
        params = self.params if params is None else params
        return pj.hvp(mlp_mean_loss, params, params, self.batch if batch is None else batch)


@pytest.fixture(scope="module")
def inputs(mlp, tmp_path_factory):
    return Inputs(mlp, tmp_path_factory.mktemp("hostile"))


EMPTY = r"the batch is empty \(0 samples\); pass at least one sample"
NAN_B1 = r"parameter \['b1'\] contains NaN or inf"

CASES = [
    # --- empty or malformed batches (item 2) ---
    ("hvp, empty batch", lambda c: c.hvp(batch=c.empty_batch), "^hvp: " + EMPTY),
    ("hvp, batch without arrays", lambda c: c.hvp(batch={}), "^hvp: the batch has no arrays"),
    ("hvp under jit, empty batch",
     lambda c: jax.jit(pj.hvp, static_argnums=0)(mlp_mean_loss, c.params, c.params, c.empty_batch), "^hvp: " + EMPTY),
    ("hessian_basis, empty batch", lambda c: c.hessian_basis(batch=c.empty_batch), "^hessian_basis: " + EMPTY),
    ("shuffled_hessian_basis, empty batch",
     lambda c: pj.shuffled_hessian_basis(mlp_mean_loss, c.checkpoints, c.empty_batch, key=jax.random.key(0),
                                         num_iters=4, progress=False),
     "^shuffled_hessian_basis: " + EMPTY),
    ("per_sample_projections, empty batch", lambda c: c.projections(batch=c.empty_batch),
     "^per_sample_projections: " + EMPTY),
    ("per_sample_curvature, empty batch",
     lambda c: pj.per_sample_curvature(mlp_token_losses, c.params, c.empty_batch, c.rows),
     "^per_sample_curvature: " + EMPTY),
    ("per_sample_projections_and_curvature, empty batch",
     lambda c: pj.per_sample_projections_and_curvature(mlp_token_losses, c.params, c.empty_batch, c.rows),
     "^per_sample_projections_and_curvature: " + EMPTY),
    ("per_sample_losses, empty batch", lambda c: pj.per_sample_losses(mlp_token_losses, c.params, c.empty_batch),
     "^per_sample_losses: " + EMPTY),
    ("polca, empty batch", lambda c: c.polca(batch=c.empty_batch), "^polca: " + EMPTY),
    ("batch arrays of different lengths", lambda c: c.projections(batch=dict(c.batch, y=c.batch["y"][:5])),
     r"same leading sample axis, got \['x'\]: 11, \['y'\]: 5"),
    ("scalar batch leaf", lambda c: c.projections(batch=dict(c.batch, y=jnp.float64(1.0))),
     r"batch leaf \['y'\] is a scalar"),
    # --- NaN derivatives of a finite loss, NaN losses (items 1, 6) ---
    ("polca, finite loss with a NaN gradient", lambda c: c.polca(loss=sqrt_at_zero_losses),
     r"^polca: the per-sample projected gradients .* at checkpoint at step 0 contains 44 NaN or inf value\(s\) of "
     r"44; .*not differentiable"),
    ("polca, finite gradient with a NaN curvature", lambda c: c.polca(loss=power_at_zero_losses, second_order="exact"),
     r"^polca: the per-sample curvatures .* at checkpoint at step 0 contains 44 NaN"),
    ("polca, NaN per-sample loss", lambda c: c.polca(batch=dict(c.batch, y=c.batch["y"].at[3, 0].set(jnp.inf))),
     r"^polca: the per-sample loss at checkpoint at step 0 contains 1 NaN or inf value\(s\) of 22"),
    ("hessian_basis, NaN loss (not 'orthogonal_to contains NaN')",
     lambda c: c.hessian_basis(batch=dict(c.batch, y=c.batch["y"].at[0, 0].set(jnp.nan)), steps=[5, 6]),
     r"^hessian_basis: the loss or its Hessian-vector product is not finite at the checkpoint at step 5 "),
    ("hessian_basis, loss overflows at a later checkpoint",
     lambda c: c.hessian_basis([c.params, dict(c.params, w2=1e200 * c.params["w2"]), c.params], steps=[0, 10, 20]),
     r"^hessian_basis: the loss or its Hessian-vector product is not finite at the checkpoint at step 10 "),
    # --- non-finite matrices, bases and parameters (items 3, 6) ---
    ("basis_from_matrix, NaN matrix, orthonormalize",
     lambda c: pj.basis_from_matrix(np.full((2, c.dim), np.nan), orthonormalize=True),
     r"^the basis matrix contains NaN or inf \(48 entries\)"),
    ("basis_from_matrix, inf matrix, orthonormalize (not 'linearly dependent')",
     lambda c: pj.basis_from_matrix(np.where(np.eye(2, c.dim) > 0, np.inf, 0.0), orthonormalize=True),
     r"^the basis matrix contains NaN or inf \(2 entries\)"),
    ("basis_from_matrix, NaN matrix",
     lambda c: pj.basis_from_matrix(np.where(np.eye(2, c.dim) > 0, np.nan, c.rows)),
     r"^the basis matrix contains NaN or inf \(2 entries\)"),
    ("Basis with NaN vectors",
     lambda c: pj.Basis(np.full((2, c.dim), np.nan), np.zeros(2), np.zeros(2), "user", np.zeros(2)),
     r"^a Basis' vector matrix contains NaN or inf \(48 entries\)"),
    ("check_orthonormal, NaN rows", lambda c: pj.check_orthonormal(np.full((2, c.dim), np.nan)),
     r"^basis contains NaN or inf"),
    ("per_sample_projections, NaN params", lambda c: c.projections(params=c.nan_params),
     "^per_sample_projections: " + NAN_B1),
    ("per_sample_losses, NaN params", lambda c: pj.per_sample_losses(mlp_token_losses, c.nan_params, c.batch),
     "^per_sample_losses: " + NAN_B1),
    ("per_sample_curvature, NaN params", lambda c: pj.per_sample_curvature(mlp_token_losses, c.nan_params, c.batch,
                                                                           c.rows),
     "^per_sample_curvature: " + NAN_B1),
    ("per_sample_projections, NaN basis matrix", lambda c: c.projections(basis=np.full((2, c.dim), np.nan)),
     r"^per_sample_projections: the basis matrix contains NaN or inf \(48 entries\)"),
    ("per_sample_projections, NaN basis pytree",
     lambda c: c.projections(basis=jax.tree_util.tree_map(lambda p: jnp.full((2, *p.shape), jnp.nan), c.params)),
     r"^per_sample_projections: the basis pytree contains NaN or inf \(48 entries\)"),
    ("polca, NaN params in a checkpoint", lambda c: c.polca([c.checkpoints[0], c.nan_params], steps=[0, 7]),
     r"^polca: checkpoint at step 7: " + NAN_B1),
    ("hessian_basis, NaN params in a checkpoint", lambda c: c.hessian_basis([c.params, c.nan_params]),
     r"^hessian_basis: checkpoint at step 1: " + NAN_B1),
    # --- checkpoint stores and steps (item 4) ---
    ("OrbaxCheckpoints, unsorted steps", lambda c: pj.OrbaxCheckpoints(c.orbax_dir, steps=[10, 0]),
     r"steps must be strictly increasing .* step 0 at position 1 follows step 10"),
    ("OrbaxCheckpoints, duplicate steps", lambda c: pj.OrbaxCheckpoints(c.orbax_dir, steps=[0, 10, 10]),
     r"steps must be strictly increasing .* step 10 at position 2 follows step 10; sort them and drop duplicates"),
    ("OrbaxCheckpoints, directory without checkpoints", lambda c: pj.OrbaxCheckpoints(c.empty_dir),
     r"^no orbax checkpoints in .*no_checkpoints"),
    ("OrbaxCheckpoints, missing directory", lambda c: pj.OrbaxCheckpoints(c.empty_dir / "nowhere"),
     r"nowhere does not exist"),
    ("OrbaxCheckpoints, steps not on disk", lambda c: pj.OrbaxCheckpoints(c.orbax_dir, steps=[0, 5]),
     r"steps \[5\] have no checkpoint"),
    ("polca, directory without checkpoints", lambda c: c.polca(c.empty_dir), r"^no orbax checkpoints in"),
    ("polca, decreasing steps", lambda c: c.polca(steps=[10, 0]),
     r"^polca: steps must be strictly increasing .* step 0 at position 1 follows step 10"),
    ("polca, repeated steps", lambda c: c.polca(steps=[3, 3]), r"^polca: steps must be strictly increasing"),
    ("polca, directory and unsorted steps", lambda c: c.polca(c.orbax_dir, steps=[20, 10]),
     r"steps must be strictly increasing"),
    # --- wrong types and dtypes (item 5) ---
    ("polca, generator of checkpoints", lambda c: c.polca(p for p in c.checkpoints),
     r"^polca: checkpoints must be a sequence \(list, tuple or OrbaxCheckpoints\), got generator; wrap it in "
     r"list\(\.\.\.\)"),
    ("hessian_basis, generator of checkpoints", lambda c: c.hessian_basis(p for p in c.checkpoints),
     r"^hessian_basis: checkpoints must be a sequence .* got generator; wrap it in list"),
    ("shuffled_hessian_basis, generator of checkpoints",
     lambda c: pj.shuffled_hessian_basis(mlp_mean_loss, iter(c.checkpoints), c.batch, key=jax.random.key(0)),
     r"^shuffled_hessian_basis: checkpoints must be a sequence .* got list_iterator"),
    ("polca, one params pytree as checkpoints", lambda c: c.polca(c.params),
     r"^polca: checkpoints must be a sequence of params pytrees, got a dict \(one params pytree\?\)"),
    ("hessian_basis, a path as checkpoints", lambda c: c.hessian_basis(str(c.orbax_dir)),
     r"got the path .*; open a checkpoint directory with OrbaxCheckpoints\(path\)"),
    ("per_sample_projections, integer params", lambda c: c.projections(params=c.int_params),
     r"^per_sample_projections: parameters must be floating point; leaf \['b1'\] has dtype int"),
    ("hvp, integer params", lambda c: c.hvp(params={"w": jnp.arange(3)}),
     r"^hvp: parameters must be floating point; leaf \['w'\] has dtype int"),
    ("hessian_basis, integer params", lambda c: c.hessian_basis([c.int_params]),
     r"^hessian_basis: checkpoint at step 0: parameters must be floating point; leaf \['b1'\]"),
    ("polca, integer params", lambda c: c.polca([c.int_params, c.int_params]),
     r"^polca: checkpoint at step 0: parameters must be floating point"),
    ("random_basis, integer params", lambda c: pj.random_basis(c.int_params, 2, jax.random.key(0)),
     r"^random_basis: parameters must be floating point"),
    ("per_sample_projections, mixed float32/float64 params", lambda c: c.projections(params=c.mixed_params),
     r"^per_sample_projections: the parameters mix floating-point dtypes: float32 \(e\.g\. leaf \['b1'\]\), "
     r"float64 \(e\.g\. leaf \['w1'\]\); cast every leaf to one dtype"),
    ("polca, mixed float32/float64 params", lambda c: c.polca([c.mixed_params, c.mixed_params]),
     r"^polca: checkpoint at step 0: the parameters mix floating-point dtypes"),
    ("hvp, params without arrays", lambda c: pj.hvp(mlp_mean_loss, {}, {}, c.batch),
     r"^hvp: the parameters have no arrays"),
    ("top_eigenpairs, dim larger than the matvec's", lambda c: pj.top_eigenpairs(
        symmetric_matvec, 6, 1, 3, jax.random.key(0), matvec_args=(jnp.eye(5),)),
     r"^top_eigenpairs: matvec fails on a \[6\] vector \(.*\); is dim=6 the operator's dimension"),
    ("top_eigenpairs, FlatHessianMatvec with the wrong dim", lambda c: pj.top_eigenpairs(
        pj.FlatHessianMatvec(mlp_mean_loss), c.dim + 2, 1, 3, jax.random.key(0), matvec_args=(c.params, c.batch)),
     r"^top_eigenpairs: matvec maps a \[26\] vector to shape \[24\], expected \[26\]"),
    # --- cases that already failed cleanly (kept so) ---
    ("polca, basis of the wrong width", lambda c: c.polca(basis=pj.basis_from_matrix(np.eye(c.dim + 6)[:2])),
     r"basis has width 30 but the parameters have 24 entries"),
    ("polca, non-orthonormal basis",
     lambda c: c.polca(basis=pj.Basis(2 * c.basis.vectors, c.basis.eigenvalues, c.basis.steps, "user",
                                      c.basis.residuals)),
     r"basis rows are not orthonormal"),
    ("polca, basis is a matrix", lambda c: c.polca(basis=c.rows), r"basis must be a polca_jax.Basis"),
    ("basis_from_matrix, non-orthonormal rows", lambda c: pj.basis_from_matrix(2 * c.rows), r"not orthonormal"),
    ("basis_from_matrix, dependent rows", lambda c: pj.basis_from_matrix(np.stack([c.rows[0], c.rows[0]]),
                                                                         orthonormalize=True),
     r"linearly dependent"),
    ("basis_from_matrix, more rows than columns", lambda c: pj.basis_from_matrix(np.eye(3)[:, :2]),
     r"1 <= K <= P"),
    ("polca, unknown second_order", lambda c: c.polca(second_order="third"), r"second_order must be one of"),
    ("polca, unknown eigenvalues", lambda c: c.polca(second_order="paper", eigenvalues="latest"),
     r"eigenvalues must be 'stored' or 'current'"),
    ("polca, 'paper' without stored eigenvalues", lambda c: c.polca(second_order="paper"),
     r"needs the basis' eigenvalues"),
    ("per_sample_projections, unknown method", lambda c: c.projections(method="sideways"),
     r"method must be 'auto', 'reverse' or 'forward'"),
    ("projection_kernel_cost, unknown method",
     lambda c: pj.projection_kernel_cost(mlp_token_losses, c.params, c.batch, c.rows, method="sideways",
                                         with_flops=False),
     r"method must be 'auto', 'reverse' or 'forward'"),
    ("per_sample_projections, chunk_size 0", lambda c: c.projections(chunk_size=0, method="reverse"),
     r"chunk_size and chunks_per_call must be >= 1"),
    ("per_sample_projections, chunks_per_call 0",
     lambda c: pj.per_sample_projections(mlp_token_losses, c.params, c.batch, c.rows, chunks_per_call=0),
     r"chunk_size and chunks_per_call must be >= 1, got 32, 0"),
    ("polca, one checkpoint", lambda c: c.polca(c.checkpoints[:1]), r"at least two checkpoints"),
    ("polca, more steps than checkpoints", lambda c: c.polca(steps=[0, 1, 2]),
     r"^polca: got 3 steps for 2 checkpoints"),
    ("hessian_basis, fewer steps than checkpoints", lambda c: c.hessian_basis(steps=[0]),
     r"^hessian_basis: got 1 steps for 2 checkpoints"),
    ("hessian_basis, no checkpoints", lambda c: c.hessian_basis([]), r"needs at least one checkpoint"),
    ("hessian_basis, more vectors than parameters", lambda c: c.hessian_basis(k_per_checkpoint=13),
     r"26 basis vectors requested but the model has only 24 parameters"),
    ("random_basis, k larger than P", lambda c: pj.random_basis(c.params, 25, jax.random.key(0)),
     r"need 1 <= k <= 24"),
    ("polca, mask of the wrong shape", lambda c: c.polca(mask=np.ones((11, 3), bool)), r"mask must have shape"),
    ("per_sample_projections, mask selecting nothing", lambda c: c.projections(mask=np.zeros((11, 2), bool)),
     r"the mask selects no samples"),
    ("top_eigenpairs, k > num_iters", lambda c: pj.top_eigenpairs(
        symmetric_matvec, 5, 3, 2, jax.random.key(0), matvec_args=(jnp.eye(5),)), r"need 1 <= k <= num_iters"),
    ("top_eigenpairs, num_iters too large", lambda c: pj.top_eigenpairs(
        symmetric_matvec, 5, 1, 6, jax.random.key(0), matvec_args=(jnp.eye(5),)),
     r"num_iters=6 exceeds the dimension of the search space"),
    ("top_eigenpairs, orthogonal_to of the wrong width", lambda c: pj.top_eigenpairs(
        symmetric_matvec, 5, 1, 2, jax.random.key(0), orthogonal_to=jnp.eye(4)[:2], matvec_args=(jnp.eye(5),)),
     r"orthogonal_to must have shape \[r, 5\]"),
    ("polca, checkpoints of different tree structures",
     lambda c: c.polca([c.checkpoints[0], {"w1": c.checkpoints[1]["w1"]}]), r"different parameter tree structure"),
    ("polca, checkpoints of different shapes",
     lambda c: c.polca([c.checkpoints[0], dict(c.checkpoints[1], w1=jnp.zeros((4, 3)))]),
     r"\['w1'\] has shape \(4, 3\) float64, expected \(3, 4\) float64"),
    ("hessian_basis, checkpoints of different shapes",
     lambda c: c.hessian_basis([c.params, dict(c.params, b1=jnp.zeros(5))]), r"\['b1'\] has shape \(5,\)"),
    ("per_sample_projections, a mean loss instead of per-sample losses", lambda c: c.projections(loss=mlp_mean_loss),
     r"per_sample_loss_fn must return \[n_seq\] or \[n_seq, n_tok\] losses with n_seq=11, got shape \(\)"),
    ("polca, per-sample losses of rank 3", lambda c: c.polca(loss=lambda p, b: mlp_token_losses(p, b)[:, :, None]),
     r"per_sample_loss_fn must return .* got shape \(11, 2, 1\)"),
    ("per_sample_projections, basis matrix of the wrong width", lambda c: c.projections(basis=np.eye(c.dim + 1)[:2]),
     r"basis matrix must be \[K, 24\], got shape \(2, 25\)"),
    ("per_sample_projections, basis pytree of another structure",
     lambda c: c.projections(basis={"w1": jnp.zeros((2, 3, 4))}), r"must have the structure of params"),
    ("Basis.load, missing directory", lambda c: pj.Basis.load(c.empty_dir / "nothing"),
     r"cannot read a basis from .*: .*basis\.json is missing"),
    ("POLCAResult.load, missing directory", lambda c: pj.POLCAResult.load(c.empty_dir / "nothing"),
     r"cannot read a POLCA result from .*: .*manifest\.json is missing"),
]


@pytest.mark.parametrize("call, pattern", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_hostile_input_raises_a_clear_value_error(inputs, call, pattern):
    with pytest.raises(PolcaError, match=pattern):
        call(inputs)


def test_the_table_covers_at_least_forty_cases():
    names = [case[0] for case in CASES]
    assert len(names) == len(set(names)) >= 40


# --- fixes that are correct results --------------------------------------------------------------------------------


def test_a_basis_of_another_precision_is_cast_to_the_parameters(inputs):
    """A float64 basis on float32 parameters (and a float32 basis on float64 ones) works in every kernel."""
    params32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), inputs.params)
    batch32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), inputs.batch)
    expected = np.asarray(inputs.projections())
    basis_tree = tree.unravel_rows(jnp.asarray(inputs.rows), inputs.params)
    for basis in (inputs.basis, inputs.rows, basis_tree):
        for method in ("reverse", "forward"):
            got = inputs.projections(params=params32, batch=batch32, basis=basis, method=method)
            assert got.dtype == jnp.float32
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    curvature = pj.per_sample_curvature(mlp_token_losses, params32, batch32, inputs.rows)
    np.testing.assert_allclose(curvature, pj.per_sample_curvature(mlp_token_losses, inputs.params, inputs.batch,
                                                                  inputs.rows), rtol=1e-3, atol=1e-4)
    basis32 = pj.basis_from_matrix(inputs.rows.astype(np.float32))
    np.testing.assert_allclose(inputs.projections(basis=basis32), expected, rtol=1e-5, atol=1e-6)
    checkpoints32 = [jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), p) for p in inputs.checkpoints]
    result = pj.polca(mlp_token_losses, checkpoints32, batch32, inputs.basis, second_order="trapezoid",
                      progress=False)
    assert np.all(np.isfinite(result.projected_loss))


def test_kernels_still_run_under_a_callers_jit(inputs):
    """The value checks skip traced arrays, and a Basis split under jit is not cached as a tracer."""
    basis = pj.random_basis(inputs.params, 2, jax.random.key(9))  # fresh: nothing cached yet

    @jax.jit
    def kernels(params):
        return (
            pj.per_sample_projections(mlp_token_losses, params, inputs.batch, basis),
            pj.per_sample_curvature(mlp_token_losses, params, inputs.batch, basis),
            pj.per_sample_losses(mlp_token_losses, params, inputs.batch),
        )

    traced = kernels(inputs.params)
    eager = (
        pj.per_sample_projections(mlp_token_losses, inputs.params, inputs.batch, basis),
        pj.per_sample_curvature(mlp_token_losses, inputs.params, inputs.batch, basis),
        pj.per_sample_losses(mlp_token_losses, inputs.params, inputs.batch),
    )
    for got, expected in zip(traced, eager):
        np.testing.assert_allclose(got, expected, rtol=1e-12)
    with_matrix = jax.jit(lambda p, rows: pj.per_sample_projections(mlp_token_losses, p, inputs.batch, rows))
    np.testing.assert_allclose(with_matrix(inputs.params, basis.vectors), eager[0], rtol=1e-12)


def test_orbax_store_iterates_and_reports_an_index_out_of_range(inputs):
    with pj.OrbaxCheckpoints(inputs.orbax_dir) as store:
        assert store.steps == [0, 10, 20]
        restored = list(store)  # Sequence iteration stops at the IndexError
        assert len(restored) == 3
        np.testing.assert_array_equal(store[-1]["w1"], restored[2]["w1"])
        with pytest.raises(IndexError, match=r"checkpoint index 3 is out of range for the 3 selected steps"):
            store[3]
        with pytest.raises(IndexError, match="out of range"):
            store[-4]


def test_hessian_basis_accepts_checkpoints_in_any_order(inputs):
    """Only polca needs training order: Algorithm 1 over shuffled steps is the paper's ablation."""
    basis = inputs.hessian_basis(steps=[10, 0])
    np.testing.assert_array_equal(basis.steps, [10, 0])


# --- crash-safe files (item 7) --------------------------------------------------------------------------------------


def leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.endswith(".tmp"))


def test_json_helpers_write_atomically_and_name_the_file_on_read(tmp_path):
    path = tmp_path / "record.json"
    files.write_json_atomic(path, {"a": 1, "path": tmp_path})
    assert files.read_json(path, required=("a",)) == {"a": 1, "path": str(tmp_path)}
    (tmp_path / "plain").write_text("")
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode  # the permissions of a plain write
    with pytest.raises(PolcaError, match=r"record\.json lacks the field\(s\) \['b'\]"):
        files.read_json(path, required=("a", "b"))
    path.write_text("")  # what a torn in-place write leaves
    with pytest.raises(PolcaError, match=r"record\.json cannot be read as JSON .*interrupted write"):
        files.read_json(path)
    with pytest.raises(PolcaError, match=r"missing\.json is missing"):
        files.read_json(tmp_path / "missing.json")

    def crash(file):
        file.write(b'{"half": ')
        raise KeyboardInterrupt

    files.write_json_atomic(path, {"a": 2})
    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(path, crash)
    assert files.read_json(path) == {"a": 2} and leftovers(tmp_path) == []


def test_basis_save_overwrites_a_complete_save_and_names_a_torn_file(tmp_path, inputs):
    directory = tmp_path / "basis"
    inputs.basis.save(directory)
    other = pj.random_basis(inputs.params, 3, jax.random.key(5))
    other.save(directory)
    loaded = pj.Basis.load(directory)
    np.testing.assert_array_equal(loaded.vectors, other.vectors)
    assert leftovers(directory) == []
    (directory / "basis.json").write_text('{"method": "ran')
    with pytest.raises(PolcaError, match=r"cannot read a basis from .*basis\.json cannot be read as JSON"):
        pj.Basis.load(directory)
    other.save(directory)
    (directory / "vectors.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(PolcaError, match=r"vectors\.npy is not a readable \.npy array"):
        pj.Basis.load(directory)
    other.save(directory)
    (directory / "info.npz").write_bytes(b"")
    with pytest.raises(PolcaError, match=r"info\.npz is not a readable \.npz archive"):
        pj.Basis.load(directory)


def test_result_save_is_complete_or_has_no_manifest(tmp_path, inputs, monkeypatch):
    first = inputs.polca()
    second = inputs.polca(second_order="trapezoid")
    directory = tmp_path / "polca"
    first.save(directory)
    mapped = pj.POLCAResult.load(directory)  # memory-mapped from the files save replaces
    mapped.save(directory)
    np.testing.assert_array_equal(pj.POLCAResult.load(directory).projected_loss, first.projected_loss)
    second.save(directory)
    np.testing.assert_array_equal(pj.POLCAResult.load(directory).second_order, second.second_order)
    assert leftovers(directory) == []

    real_save, calls = np.save, []

    def dies_on_the_third_array(file, array, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process killed mid-save
        return real_save(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", dies_on_the_third_array)
    with pytest.raises(KeyboardInterrupt):
        first.save(directory)
    monkeypatch.undo()
    assert not (directory / "manifest.json").exists()
    assert leftovers(directory) == []
    for name in ("steps", "loss", "projections", "step_projection"):
        np.load(directory / f"{name}.npy")  # every array under its final name is whole (old or new)
    with pytest.raises(PolcaError, match=r"cannot read a POLCA result from .*manifest\.json is missing"):
        pj.POLCAResult.load(directory)


# --- no swallowed exceptions ----------------------------------------------------------------------------------------


def test_no_broad_except_swallows_an_error():
    """Every ``except Exception`` (or bare / BaseException) handler in the package raises again."""
    package = Path(pj.__file__).parent
    swallowing = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.ExceptHandler):
                continue
            names = [] if node.type is None else [
                n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)
            ]
            broad = node.type is None or {"Exception", "BaseException"} & set(names)
            if broad and not any(isinstance(n, ast.Raise) for n in ast.walk(node)):
                swallowing.append(f"{path.relative_to(package)}:{node.lineno}")
    assert swallowing == [], f"broad except without raise at {swallowing}"
