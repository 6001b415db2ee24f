"""Memory bounds of the projection kernels (XLA's compiled memory analysis, no timing) and the basis' single copy."""

import gc

import jax
import numpy as np
import pytest

import polca_jax as pj
from polca_jax._projections import projection_kernel_cost

pytestmark = pytest.mark.core  # needs only the core install: pytest -m core

CHUNK = 2


def sequences(problem, n):
    """n sequences: the fixture's, repeated."""
    return jax.tree_util.tree_map(lambda x: x[np.arange(n) % x.shape[0]], problem.batch)


@pytest.mark.parametrize("method, curvature", [("reverse", False), ("forward", False), (None, True)])
def test_temporaries_do_not_grow_from_one_chunk_to_eight(transformer, method, curvature):
    basis = pj.random_basis(transformer.params, 5, jax.random.key(0))
    costs = [
        projection_kernel_cost(
            transformer.token_losses, transformer.params, sequences(transformer, CHUNK * chunks), basis,
            method=method or "auto", curvature=curvature, chunk_size=CHUNK, basis_chunk_size=2,
        )
        for chunks in (1, 8)
    ]
    assert [cost.num_chunks for cost in costs] == [1, 8]
    # One chunk's temporaries whatever N: at 8 chunks they grow by at most the loop's stacked outputs and its
    # bookkeeping (the unrolled kernel this replaced grew by about one chunk's temporaries per chunk per call).
    assert costs[1].temp_bytes - costs[0].temp_bytes <= costs[1].output_bytes + 0.1 * costs[0].temp_bytes
    np.testing.assert_allclose(costs[1].flops, 8 * costs[0].flops)


def test_chunks_and_direction_groups_divide_the_work_without_padding():
    from polca_jax._projections import chunk_plan, direction_groups

    assert chunk_plan(300, 32) == (30, 10)
    assert chunk_plan(300, 16) == (16, 19)  # 304: less than one sequence per chunk padded
    assert chunk_plan(7, 32) == (7, 1)
    assert chunk_plan(10, 2, shards=4) == (2, 2)  # 3 per device → 2 chunks of 2: 16 sequences
    for k, group in [(15, 8), (12, 8), (1, 8), (64, 8), (17, 8), (5, 2)]:
        groups = direction_groups(k, group)
        assert sum(size * count for size, count in groups) == k
        assert max(size for size, _ in groups) <= group
        assert sum(count for _, count in groups) == -(-k // group)
    assert direction_groups(15, 8) == ((8, 1), (7, 1))


def test_an_uneven_split_gives_the_same_projections(transformer):
    basis = pj.random_basis(transformer.params, 7, jax.random.key(1))
    batch = sequences(transformer, 7)
    reference = pj.per_sample_projections(transformer.token_losses, transformer.params, batch, basis,
                                          method="reverse", chunk_size=7)
    for method in ("reverse", "forward"):
        got = pj.per_sample_projections(transformer.token_losses, transformer.params, batch, basis, method=method,
                                        chunk_size=3, basis_chunk_size=3)  # 3 chunks of 3 (2 padded); groups 3, 2, 2
        np.testing.assert_allclose(got, reference, rtol=1e-10, atol=1e-12)


def _live_bytes() -> int:
    gc.collect()
    return sum(array.nbytes for array in jax.live_arrays())


def test_the_basis_is_held_once_on_the_device(transformer):
    dim = sum(leaf.size for leaf in jax.tree_util.tree_leaves(transformer.params))
    rows = np.linalg.qr(np.random.default_rng(0).normal(size=(dim, 6)))[0].T
    before = _live_bytes()
    basis = pj.basis_from_matrix(rows)
    one_copy = 6 * dim * 8
    assert basis.device_bytes == one_copy
    projections = pj.per_sample_projections(transformer.token_losses, transformer.params, transformer.batch, basis)
    assert basis.device_bytes == one_copy
    del projections
    assert _live_bytes() - before == one_copy  # the pytree the kernels use replaced the [K, P] matrix
    np.testing.assert_allclose(basis.vectors, rows, rtol=0, atol=0)  # rebuilt on demand, the same numbers
    step = jax.tree_util.tree_map(lambda p: 0.5 * p, transformer.params)
    flat_step = np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(step)])
    np.testing.assert_allclose(basis.coordinates(step), rows @ flat_step, rtol=1e-12)
    np.testing.assert_allclose(basis.coordinates(flat_step), rows @ flat_step, rtol=1e-12)
    basis.check_orthonormal()
    np.testing.assert_allclose(basis.select([4, 1]).vectors, rows[[4, 1]], rtol=0, atol=0)
