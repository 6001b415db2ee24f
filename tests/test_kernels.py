"""Kernels against slow, obvious float64 references: dense Hessians, numpy.linalg.eigh, loops over jax.grad."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dense_hessian, sgd_checkpoints

import polca_jax as pj
from polca_jax import tree
from polca_jax.errors import PolcaError

pytestmark = pytest.mark.core  # needs only the core install: pytest -m core


@pytest.fixture(params=["mlp", "transformer"])
def problem(request):
    return request.getfixturevalue(request.param)


def random_rows(key, k, dim):
    return np.asarray(jax.random.normal(jax.random.key(key), (k, dim)))


def orthonormal_rows(key, k, dim):
    return np.linalg.qr(random_rows(key, k, dim).T)[0].T


def complement(rows):
    """Orthonormal rows spanning the orthogonal complement of ``rows [r, P]``."""
    return np.linalg.svd(rows)[2][rows.shape[0] :]


# --- HVP ------------------------------------------------------------------------------------------------------------


def test_hvp_matches_dense_hessian(problem):
    dim = tree.num_params(problem.params)
    v = random_rows(3, 1, dim)[0]
    hessian = dense_hessian(lambda p: problem.mean_loss(p, problem.batch), problem.params)
    got = jax.jit(pj.hvp, static_argnums=0)(problem.mean_loss, problem.params, tree.unravel(v, problem.params), problem.batch)
    np.testing.assert_allclose(tree.ravel(got), hessian @ v, rtol=1e-10, atol=1e-12)


# --- Lanczos --------------------------------------------------------------------------------------------------------


def symmetric_matvec(v, matrix):
    return matrix @ v


def assert_same_vectors(got, expected, atol):
    """Rows equal up to sign."""
    signs = np.sign(np.sum(got * expected, axis=1))[:, None]
    np.testing.assert_allclose(got * signs, expected, atol=atol)


def test_top_eigenpairs_match_eigh(mlp):
    hessian = dense_hessian(lambda p: mlp.mean_loss(p, mlp.batch), mlp.params)
    dim = len(hessian)
    values, vectors = np.linalg.eigh(hessian)
    pairs = pj.top_eigenpairs(symmetric_matvec, dim, 3, dim, jax.random.key(0), matvec_args=(jnp.asarray(hessian),))
    np.testing.assert_allclose(pairs.values, values[::-1][:3], rtol=1e-8)
    assert_same_vectors(np.asarray(pairs.vectors), vectors[:, ::-1][:, :3].T, atol=1e-6)
    true_residuals = [np.linalg.norm(hessian @ x - t * x) for t, x in zip(pairs.values, np.asarray(pairs.vectors))]
    np.testing.assert_allclose(pairs.residuals, true_residuals, atol=1e-8)


def test_top_eigenpairs_with_deflation_match_eigh_on_the_complement(mlp):
    hessian = dense_hessian(lambda p: mlp.mean_loss(p, mlp.batch), mlp.params)
    dim = len(hessian)
    deflate = orthonormal_rows(5, 4, dim)
    rest = complement(deflate)
    values, vectors = np.linalg.eigh(rest @ hessian @ rest.T)
    pairs = pj.top_eigenpairs(
        symmetric_matvec, dim, 3, dim - 4, jax.random.key(1),
        orthogonal_to=jnp.asarray(deflate), matvec_args=(jnp.asarray(hessian),),
    )
    np.testing.assert_allclose(pairs.values, values[::-1][:3], rtol=1e-8)
    assert_same_vectors(np.asarray(pairs.vectors), (vectors[:, ::-1][:, :3].T) @ rest, atol=1e-6)
    assert np.abs(np.asarray(pairs.vectors) @ deflate.T).max() < 1e-12


def test_top_eigenpairs_converge_with_fewer_iterations_than_the_dimension():
    rng = np.random.default_rng(0)
    spectrum = np.concatenate([[10.0, 8.0, 6.0], rng.uniform(-1, 1, 197)])
    basis = np.linalg.qr(rng.normal(size=(200, 200)))[0]
    matrix = jnp.asarray(basis @ np.diag(spectrum) @ basis.T)
    pairs = pj.top_eigenpairs(symmetric_matvec, 200, 3, 40, jax.random.key(2), matvec_args=(matrix,))
    np.testing.assert_allclose(pairs.values, [10.0, 8.0, 6.0], rtol=1e-8)
    assert np.all(pairs.residuals < 1e-6)


def test_top_eigenpairs_rejects_bad_arguments():
    matrix = jnp.eye(5)
    with pytest.raises(PolcaError, match="num_iters"):
        pj.top_eigenpairs(symmetric_matvec, 5, 1, 6, jax.random.key(0), matvec_args=(matrix,))
    with pytest.raises(PolcaError, match="orthonormal"):
        pj.top_eigenpairs(
            symmetric_matvec, 5, 1, 2, jax.random.key(0), orthogonal_to=2 * jnp.eye(5)[:2], matvec_args=(matrix,)
        )
    with pytest.raises(PolcaError, match="shape"):
        pj.top_eigenpairs(
            symmetric_matvec, 5, 1, 2, jax.random.key(0), orthogonal_to=jnp.eye(4)[:2], matvec_args=(matrix,)
        )


# --- bases ----------------------------------------------------------------------------------------------------------


def dense_algorithm_1(problem, checkpoints, k):
    """Algorithm 1 with dense Hessians and eigh: ``[T·k, P]`` vectors and their eigenvalues."""
    found, values = np.zeros((0, tree.num_params(problem.params))), []
    for params in checkpoints:
        hessian = dense_hessian(lambda p: problem.mean_loss(p, problem.batch), params)
        rest = complement(found)
        eigenvalues, eigenvectors = np.linalg.eigh(rest @ hessian @ rest.T)
        found = np.concatenate([found, (eigenvectors[:, ::-1][:, :k].T) @ rest])
        values.extend(eigenvalues[::-1][:k])
    return found, np.asarray(values)


def test_hessian_basis_is_algorithm_1(mlp):
    checkpoints = sgd_checkpoints(mlp, 3)
    basis = pj.hessian_basis(
        mlp.mean_loss, checkpoints, mlp.batch, k_per_checkpoint=2, num_iters=20, key=jax.random.key(0),
        steps=[0, 10, 20], progress=False,
    )
    vectors, values = dense_algorithm_1(mlp, checkpoints, 2)
    np.testing.assert_allclose(basis.eigenvalues, values, rtol=1e-8)
    assert_same_vectors(np.asarray(basis.vectors), vectors, atol=1e-6)
    np.testing.assert_allclose(basis.vectors @ basis.vectors.T, np.eye(6), atol=1e-12)
    np.testing.assert_array_equal(basis.steps, [0, 0, 10, 10, 20, 20])
    assert basis.method == "hessian"


def test_hessian_basis_resumes_from_its_partial_directory_bit_for_bit(tmp_path, mlp):
    checkpoints = sgd_checkpoints(mlp, 3)
    options = dict(k_per_checkpoint=2, num_iters=20, key=jax.random.key(0), steps=[0, 10, 20], progress=False)
    kept = tmp_path / "partial"
    whole = pj.hessian_basis(mlp.mean_loss, checkpoints, mlp.batch, partial_dir=kept, **options)
    # What a run killed during its second checkpoint leaves: the first checkpoint's record, a stray rows file.
    (kept / "done_0002.json").unlink()
    (kept / "rows_0002.npy").unlink()
    (kept / "done_0001.json").unlink()
    (kept / "rows_0001.npy").write_bytes(b"a rows file whose record was never written")
    resumed = pj.hessian_basis(mlp.mean_loss, checkpoints, mlp.batch, partial_dir=kept, **options)
    np.testing.assert_array_equal(np.asarray(resumed.vectors), np.asarray(whole.vectors))
    np.testing.assert_array_equal(resumed.eigenvalues, whole.eigenvalues)
    np.testing.assert_array_equal(resumed.residuals, whole.residuals)
    assert sorted(p.name for p in kept.glob("done_*.json")) == ["done_0000.json", "done_0001.json", "done_0002.json"]
    uninterrupted = pj.hessian_basis(mlp.mean_loss, checkpoints, mlp.batch, **options)
    np.testing.assert_array_equal(np.asarray(uninterrupted.vectors), np.asarray(whole.vectors))


def test_a_sigterm_stops_algorithm_1_after_the_checkpoint_in_progress_and_it_resumes_bit_for_bit(tmp_path, mlp):
    from test_decomposition import Checkpoints

    checkpoints = sgd_checkpoints(mlp, 3)
    options = dict(k_per_checkpoint=2, num_iters=20, key=jax.random.key(0), steps=[0, 10, 20], progress=False)
    whole = pj.hessian_basis(mlp.mean_loss, checkpoints, mlp.batch, **options)
    with pytest.raises(pj.Interrupted, match=r"after 2 of 3 checkpoints of the hessian basis, kept in .*partial"):
        pj.hessian_basis(mlp.mean_loss, Checkpoints(checkpoints, signal_at=1), mlp.batch,
                         partial_dir=tmp_path / "partial", **options)
    assert sorted(p.name for p in (tmp_path / "partial").glob("done_*.json")) == ["done_0000.json", "done_0001.json"]
    resumed = pj.hessian_basis(mlp.mean_loss, checkpoints, mlp.batch, partial_dir=tmp_path / "partial", **options)
    np.testing.assert_array_equal(np.asarray(resumed.vectors), np.asarray(whole.vectors))


def test_hessian_basis_refuses_a_partial_directory_of_other_inputs(tmp_path, mlp):
    checkpoints = sgd_checkpoints(mlp, 2)
    options = dict(num_iters=12, key=jax.random.key(0), steps=[0, 10], progress=False)
    kept = tmp_path / "partial"
    pj.hessian_basis(mlp.mean_loss, checkpoints, mlp.batch, partial_dir=kept, **options)
    before = {p.name: p.read_bytes() for p in kept.iterdir()}
    with pytest.raises(pj.ResumeMismatch, match=r"another computation \(differs in: num_iters\)"):
        pj.hessian_basis(mlp.mean_loss, checkpoints, mlp.batch, partial_dir=kept, **dict(options, num_iters=13))
    with pytest.raises(pj.ResumeMismatch, match=r"differs in: loss\)"):
        pj.hessian_basis(lambda p, b: 2 * mlp.mean_loss(p, b), checkpoints, mlp.batch, partial_dir=kept, **options)
    changed = [checkpoints[0], jax.tree_util.tree_map(lambda x: x + 1e-9, checkpoints[1])]
    with pytest.raises(pj.ResumeMismatch, match=r"position 1 .*\(its parameters changed\)"):
        pj.hessian_basis(mlp.mean_loss, changed, mlp.batch, partial_dir=kept, **options)
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before
    rows = np.load(kept / "rows_0000.npy")
    np.save(kept / "rows_0000.npy", rows + 1e-3)
    with pytest.raises(pj.CorruptRunDirectory, match="rows_0000.npy does not match its checksum"):
        pj.hessian_basis(mlp.mean_loss, checkpoints, mlp.batch, partial_dir=kept, **options)


def dense_gradient_covariance_algorithm_1(problem, checkpoints, k, scaled):
    """Algorithm 1 on the covariance of per-sample gradients (one jax.grad per sample), each parameter divided by
    its RMS per-sample gradient when ``scaled``: ``[T·k, P]`` vectors and their eigenvalues."""
    found, values = np.zeros((0, tree.num_params(problem.params))), []
    grad = jax.grad(lambda p, i: problem.sequence_losses(p, problem.batch)[i])
    for params in checkpoints:
        gradients = np.stack([np.asarray(tree.ravel(grad(params, i))) for i in range(len(problem.batch["x"]))])
        if scaled:
            gradients = gradients / np.sqrt(np.mean(gradients**2, axis=0))
        covariance = np.cov(gradients.T, bias=True)
        rest = complement(found)
        eigenvalues, eigenvectors = np.linalg.eigh(rest @ covariance @ rest.T)
        found = np.concatenate([found, (eigenvectors[:, ::-1][:, :k].T) @ rest])
        values.extend(eigenvalues[::-1][:k])
    return found, np.asarray(values)


@pytest.mark.parametrize("scale", [None, "rms"])
def test_gradient_covariance_basis_is_algorithm_1_on_the_per_sample_gradient_covariance(mlp, scale):
    checkpoints = sgd_checkpoints(mlp, 3)
    basis = pj.gradient_covariance_basis(
        mlp.sequence_losses, checkpoints, mlp.batch, scale=scale, k_per_checkpoint=2, num_iters=20,
        key=jax.random.key(0), steps=[0, 10, 20], progress=False,
    )
    vectors, values = dense_gradient_covariance_algorithm_1(mlp, checkpoints, 2, scaled=scale == "rms")
    np.testing.assert_allclose(basis.eigenvalues, values, rtol=1e-8)
    assert_same_vectors(np.asarray(basis.vectors), vectors, atol=1e-6)
    np.testing.assert_allclose(basis.vectors @ basis.vectors.T, np.eye(6), atol=1e-12)
    assert basis.method == ("gradient_covariance" if scale is None else "scaled_gradient_covariance")


def test_gradient_covariance_basis_takes_a_scale_function_and_refuses_a_bad_one(mlp):
    checkpoints = sgd_checkpoints(mlp, 2)
    options = dict(num_iters=12, key=jax.random.key(1), steps=[0, 10], progress=False)
    by_rms = pj.gradient_covariance_basis(mlp.sequence_losses, checkpoints, mlp.batch, **options)
    given = pj.gradient_covariance_basis(
        mlp.sequence_losses, checkpoints, mlp.batch,
        scale=lambda params: pj.rms_gradient_scale(mlp.sequence_losses, params, mlp.batch), **options)
    np.testing.assert_allclose(np.asarray(given.vectors), np.asarray(by_rms.vectors), atol=1e-12)
    per_checkpoint = pj.gradient_covariance_basis(  # one scale per checkpoint, as an optimiser's state gives them
        mlp.sequence_losses, checkpoints, mlp.batch,
        scale=[pj.rms_gradient_scale(mlp.sequence_losses, params, mlp.batch) for params in checkpoints], **options)
    np.testing.assert_allclose(np.asarray(per_checkpoint.vectors), np.asarray(by_rms.vectors), atol=1e-12)
    with pytest.raises(pj.PolcaError, match="scale must be 'rms', None, a function"):
        pj.gradient_covariance_basis(mlp.sequence_losses, checkpoints, mlp.batch, scale="adam", **options)
    with pytest.raises(pj.PolcaError, match="1 scales given for 2 checkpoints"):
        pj.hessian_basis(mlp.mean_loss, checkpoints, mlp.batch, scale=[checkpoints[0]], **options)


def test_a_scaled_hessian_basis_is_algorithm_1_on_the_hessian_of_the_preconditioned_loss(mlp):
    """With the RMS per-sample gradient as the scale s: the top eigenvectors of the deflated S H S, S = diag(s), from
    dense Hessians and per-sample gradients (one jax.grad per sample) in float64."""
    checkpoints = sgd_checkpoints(mlp, 3)
    scale = functools.partial(pj.rms_gradient_scale, mlp.sequence_losses, batch=mlp.batch)
    basis = pj.hessian_basis(mlp.mean_loss, checkpoints, mlp.batch, scale=scale, k_per_checkpoint=2, num_iters=20,
                             key=jax.random.key(0), steps=[0, 10, 20], progress=False)
    found, values = np.zeros((0, tree.num_params(mlp.params))), []
    grad = jax.grad(lambda p, i: mlp.sequence_losses(p, mlp.batch)[i])
    for params in checkpoints:
        gradients = np.stack([np.asarray(tree.ravel(grad(params, i))) for i in range(len(mlp.batch["x"]))])
        s = 1 / np.sqrt(np.mean(gradients**2, axis=0))
        hessian = dense_hessian(lambda p: mlp.mean_loss(p, mlp.batch), params)
        rest = complement(found)
        eigenvalues, eigenvectors = np.linalg.eigh(rest @ (s[:, None] * hessian * s[None, :]) @ rest.T)
        found = np.concatenate([found, (eigenvectors[:, ::-1][:, :2].T) @ rest])
        values.extend(eigenvalues[::-1][:2])
    np.testing.assert_allclose(basis.eigenvalues, values, rtol=1e-8)
    assert_same_vectors(np.asarray(basis.vectors), found, atol=1e-6)
    np.testing.assert_allclose(basis.vectors @ basis.vectors.T, np.eye(6), atol=1e-12)
    assert basis.method == "preconditioned_hessian"
    plain = pj.hessian_basis(mlp.mean_loss, checkpoints, mlp.batch, k_per_checkpoint=2, num_iters=20,
                             key=jax.random.key(0), steps=[0, 10, 20], progress=False)
    assert np.abs(np.asarray(plain.vectors) @ np.asarray(basis.vectors).T).max() < 0.99  # not the plain Hessian's


def test_shuffled_hessian_basis_is_algorithm_1_over_permuted_checkpoints(mlp):
    checkpoints = sgd_checkpoints(mlp, 4)
    basis = pj.shuffled_hessian_basis(
        mlp.mean_loss, checkpoints, mlp.batch, num_iters=21, key=jax.random.key(3), progress=False
    )
    order = [int(s) for s in basis.steps]
    assert sorted(order) == [0, 1, 2, 3] and order != [0, 1, 2, 3]
    _, values = dense_algorithm_1(mlp, [checkpoints[i] for i in order], 1)
    np.testing.assert_allclose(basis.eigenvalues, values, rtol=1e-8)
    assert basis.method == "shuffled_hessian"


def test_random_and_parameter_axis_bases(mlp):
    basis = pj.random_basis(mlp.params, 5, jax.random.key(0))
    np.testing.assert_allclose(basis.vectors @ basis.vectors.T, np.eye(5), atol=1e-12)
    axes = pj.parameter_axis_basis(mlp.params, 3)
    flat = np.asarray(tree.ravel(mlp.params))
    chosen = np.argmax(np.asarray(axes.vectors), axis=1)
    np.testing.assert_array_equal(chosen, np.argsort(-np.abs(flat))[:3])
    np.testing.assert_allclose(axes.coordinates(tree.ravel(mlp.params)), flat[chosen])


def test_basis_from_matrix_checks_or_orthonormalises(mlp):
    dim = tree.num_params(mlp.params)
    matrix = random_rows(7, 3, dim)
    with pytest.raises(PolcaError, match="not orthonormal"):
        pj.basis_from_matrix(matrix)
    basis = pj.basis_from_matrix(matrix, orthonormalize=True)
    np.testing.assert_allclose(basis.vectors @ basis.vectors.T, np.eye(3), atol=1e-12)
    assert np.dot(np.asarray(basis.vectors[0]), matrix[0]) > 0  # same span and sign as the first row
    with pytest.raises(PolcaError, match="linearly dependent"):
        pj.basis_from_matrix(np.stack([matrix[0], matrix[0]]), orthonormalize=True)


def test_basis_save_load_round_trip(tmp_path, mlp):
    basis = pj.hessian_basis(
        mlp.mean_loss, [mlp.params], mlp.batch, k_per_checkpoint=2, num_iters=8, key=jax.random.key(0), progress=False
    )
    basis.save(tmp_path / "basis")
    loaded = pj.Basis.load(tmp_path / "basis")
    np.testing.assert_array_equal(loaded.vectors, basis.vectors)
    np.testing.assert_array_equal(loaded.eigenvalues, basis.eigenvalues)
    np.testing.assert_array_equal(loaded.steps, basis.steps)
    np.testing.assert_array_equal(loaded.residuals, basis.residuals)
    assert loaded.method == basis.method
    (tmp_path / "basis" / "vectors.npy").write_bytes(b"not an array")
    with pytest.raises(PolcaError, match="cannot read a basis"):
        pj.Basis.load(tmp_path / "basis")


# --- per-sample projections and curvature ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def sample_gradient(losses_fn):
    """Compiled ∇ of the j-th sample loss of one sequence: ``(params, row, j) -> [P]``."""
    return jax.jit(jax.grad(lambda p, row, j: losses_fn(p, row).reshape(-1)[j]))


@functools.lru_cache(maxsize=None)
def sample_hessians(losses_fn):
    """Compiled dense Hessians of every sample loss of one sequence: ``(flat [P], like, row) -> [s, P, P]``."""
    return jax.jit(jax.hessian(lambda v, like, row: losses_fn(tree.unravel(v, like), row).reshape(-1)))


def looped_projections(problem, losses_fn, rows):
    """⟨b, ∇L(x)⟩ by one jax.grad per sample: ``[N, K]`` in row-major (sequence, token) order."""
    out = []
    for i in range(jax.tree_util.tree_leaves(problem.batch)[0].shape[0]):
        for j in range(losses_fn(problem.params, problem.single(i)).size):
            out.append(rows @ np.asarray(tree.ravel(sample_gradient(losses_fn)(problem.params, problem.single(i), j))))
    return np.asarray(out)


@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("method", ["reverse", "forward", "auto"])
def test_per_sample_projections_match_a_loop_of_grad(problem, level, method):
    losses_fn = problem.sequence_losses if level == "sequence" else problem.token_losses
    rows = random_rows(11, 5, tree.num_params(problem.params))
    expected = looped_projections(problem, losses_fn, rows)
    got = pj.per_sample_projections(
        losses_fn, problem.params, problem.batch, rows, method=method, chunk_size=2, chunks_per_call=2,
        basis_chunk_size=2,
    )
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-11)


def test_per_sample_projections_with_a_mask_keep_the_masked_tokens(transformer):
    rows = random_rows(12, 3, tree.num_params(transformer.params))
    mask = np.asarray(jax.random.bernoulli(jax.random.key(5), 0.5, (7, 5)))
    everything = looped_projections(transformer, transformer.token_losses, rows)
    got = pj.per_sample_projections(transformer.token_losses, transformer.params, transformer.batch, rows, mask=mask)
    np.testing.assert_allclose(got, everything[mask.reshape(-1)], rtol=1e-9, atol=1e-11)
    losses = pj.per_sample_losses(transformer.token_losses, transformer.params, transformer.batch, mask=mask)
    np.testing.assert_allclose(losses, transformer.token_losses(transformer.params, transformer.batch)[mask])


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_per_sample_gradient_norms_match_a_loop_of_grad_block_by_block(problem, level):
    losses_fn = problem.sequence_losses if level == "sequence" else problem.token_losses
    expected = []
    for i in range(jax.tree_util.tree_leaves(problem.batch)[0].shape[0]):
        for j in range(losses_fn(problem.params, problem.single(i)).size):
            gradient = jax.grad(lambda p: losses_fn(p, problem.single(i)).reshape(-1)[j])(problem.params)
            expected.append(np.concatenate([
                np.linalg.norm(np.asarray(leaf).reshape(leaf.shape[0], -1), axis=1) if np.ndim(leaf) >= 2 else
                [np.linalg.norm(np.asarray(leaf))] for leaf in jax.tree_util.tree_leaves(gradient)]))
    got = pj.per_sample_gradient_norms(losses_fn, problem.params, problem.batch, chunk_size=2)
    assert got.shape == (len(expected), len(pj.gradient_blocks(problem.params)))
    np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-9, atol=1e-12)


def test_auto_picks_forward_for_many_tokens_and_reverse_for_many_directions():
    assert pj.choose_method(samples_per_sequence=128, num_directions=32) == "forward"
    assert pj.choose_method(samples_per_sequence=1, num_directions=32) == "reverse"
    assert pj.choose_method(samples_per_sequence=4, num_directions=8) == "forward"
    assert pj.choose_method(samples_per_sequence=4, num_directions=32) == "reverse"


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_per_sample_curvature_matches_dense_per_sample_hessians(problem, level):
    losses_fn = problem.sequence_losses if level == "sequence" else problem.token_losses
    rows = random_rows(13, 3, tree.num_params(problem.params))
    flat = tree.ravel(problem.params)
    hessians = np.concatenate([sample_hessians(losses_fn)(flat, problem.params, problem.single(i)) for i in range(3)])
    expected = np.einsum("kp,npq,kq->nk", rows, hessians, rows)
    first_three = jax.tree_util.tree_map(lambda x: x[:3], problem.batch)
    got = pj.per_sample_curvature(losses_fn, problem.params, first_three, rows, chunk_size=2, basis_chunk_size=2)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-11)


def count_compilations(fn):
    """Number of XLA backend compilations while running ``fn()``."""
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(events)


def test_second_call_with_new_parameters_does_not_recompile(transformer):
    basis = pj.random_basis(transformer.params, 4, jax.random.key(0))
    other = sgd_checkpoints(transformer, 2)[1]
    for method in ("reverse", "forward"):
        def run(params):
            return np.asarray(
                pj.per_sample_projections(transformer.token_losses, params, transformer.batch, basis, method=method)
            )

        assert count_compilations(lambda: run(transformer.params)) > 0
        assert count_compilations(lambda: run(other)) == 0
