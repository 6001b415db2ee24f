"""The causal check per direction: removing a direction's share of the training displacement (float64)."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from conftest import sgd_checkpoints  # noqa: E402
from polca_jax import direction_ablation_losses, remove_direction  # noqa: E402
from polca_jax.analysis import ablation_effects  # noqa: E402
from polca_jax import basis_from_matrix, random_basis  # noqa: E402
from polca_jax.analysis._clustering import Clustering  # noqa: E402

pytestmark = pytest.mark.core  # needs only the core install: pytest -m core


def flat(params):
    return np.asarray(ravel_pytree(params)[0])


def test_remove_direction_matches_numpy(mlp):
    initial, _, final = sgd_checkpoints(mlp, 3)
    direction = np.random.default_rng(0).normal(size=flat(final).size)
    direction /= np.linalg.norm(direction)
    ablated = remove_direction(final, initial, direction)
    displacement = flat(final) - flat(initial)
    np.testing.assert_allclose(flat(ablated), flat(final) - (displacement @ direction) * direction, rtol=1e-12)
    assert jax.tree_util.tree_structure(ablated) == jax.tree_util.tree_structure(final)
    for new, old in zip(jax.tree_util.tree_leaves(ablated), jax.tree_util.tree_leaves(final)):
        assert new.shape == old.shape and new.dtype == old.dtype


def test_removed_components_of_a_complete_basis_sum_to_the_displacement(mlp):
    initial, _, final = sgd_checkpoints(mlp, 3)
    size = flat(final).size
    basis = random_basis(final, size, jax.random.key(3))  # complete: P orthonormal directions
    removed = sum(flat(final) - flat(remove_direction(final, initial, b)) for b in basis.vectors)
    np.testing.assert_allclose(removed, flat(final) - flat(initial), atol=1e-12)


def hand_ablation_losses(loss_fn, final, initial, vectors, batch, mask):
    """Python loop: ablated params built with ravel_pytree, losses by calling the loss function directly."""
    final_flat, unravel = ravel_pytree(final)
    displacement = final_flat - ravel_pytree(initial)[0]
    select = (lambda losses: losses) if mask is None else (lambda losses: losses[mask])
    reference = np.asarray(select(loss_fn(final, batch))).reshape(-1)
    rows = []
    for b in np.asarray(vectors):
        ablated = unravel(final_flat - jnp.dot(displacement, b) * b)
        rows.append(np.asarray(select(loss_fn(ablated, batch))).reshape(-1) - reference)
    return np.stack(rows)


@pytest.mark.parametrize("use_mask", [False, True])
def test_direction_ablation_losses_match_a_python_loop(mlp, use_mask):
    initial, _, final = sgd_checkpoints(mlp, 3)
    basis = random_basis(final, 4, jax.random.key(1))
    mask = np.arange(22).reshape(11, 2) % 3 != 0 if use_mask else None
    got = direction_ablation_losses(mlp.token_losses, final, initial, basis, mlp.batch, directions=[2, 0], mask=mask)
    expected = hand_ablation_losses(mlp.token_losses, final, initial, basis.vectors[np.array([2, 0])], mlp.batch, mask)
    assert got.shape == expected.shape == (2, 22 if mask is None else int(mask.sum()))
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_direction_ablation_losses_compile_once(mlp):
    """New parameters of the same shapes and every further direction reuse the compiled kernels."""
    checkpoints = sgd_checkpoints(mlp, 4)
    basis = random_basis(checkpoints[0], 5, jax.random.key(2))
    direction_ablation_losses(mlp.token_losses, checkpoints[1], checkpoints[0], basis, mlp.batch)  # warm up
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        result = direction_ablation_losses(mlp.token_losses, checkpoints[3], checkpoints[0], basis, mlp.batch)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert result.shape == (5, 22)
    assert compiles == []


def planted_problem():
    """Two groups of 6 samples; group A's loss reads only parameter block "a", group B's only block "b".

    The final parameters fit both groups exactly from zero, so the training displacement is (a*, 0) + (0, b*).
    """
    rng = np.random.default_rng(4)
    a_true, b_true = rng.normal(size=3), rng.normal(size=3)
    x = np.zeros((12, 6))
    x[:6, :3] = rng.normal(size=(6, 3))
    x[6:, 3:] = rng.normal(size=(6, 3))
    y = x[:, :3] @ a_true + x[:, 3:] @ b_true
    initial = {"a": jnp.zeros(3), "b": jnp.zeros(3)}
    final = {"a": jnp.asarray(a_true), "b": jnp.asarray(b_true)}
    direction_a = np.concatenate([a_true / np.linalg.norm(a_true), np.zeros(3)])
    direction_b = np.concatenate([np.zeros(3), b_true / np.linalg.norm(b_true)])
    spare = np.concatenate([np.zeros(3), np.cross(b_true, rng.normal(size=3))])  # orthogonal to both, unused
    basis = basis_from_matrix(np.stack([direction_b, direction_a, spare / np.linalg.norm(spare)]))
    return initial, final, basis, {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def linear_losses(params, batch):
    return (batch["x"][:, :3] @ params["a"] + batch["x"][:, 3:] @ params["b"] - batch["y"]) ** 2


def test_planted_mechanism_hurts_its_own_cluster_most():
    initial, final, basis, batch = planted_problem()
    increase = np.asarray(direction_ablation_losses(linear_losses, final, initial, basis, batch))  # rows: B, A, spare
    group_a, group_b = slice(0, 6), slice(6, 12)
    assert np.all(increase[1, group_a] > 0) and np.all(increase[0, group_b] > 0)
    np.testing.assert_allclose(increase[1, group_b], 0.0, atol=1e-12)  # removing A leaves group B untouched
    np.testing.assert_allclose(increase[0, group_a], 0.0, atol=1e-12)
    np.testing.assert_allclose(increase[2], 0.0, atol=1e-12)  # no displacement along the spare direction

    # direction A's clustering: cluster 0 = group A (samples 0-4), cluster 1 = group B (6-10), 5 and 11 noise
    labels = np.array([0] * 5 + [-1] + [1] * 5 + [-1])
    clustering = Clustering(labels, 1, np.arange(12), 2, 2, "euclidean", None)
    effects = ablation_effects(increase[1], clustering)
    assert [e.cluster for e in effects] == [0, 1] and [e.rank for e in effects] == [1, 2]
    assert effects[0].hurt_most and not effects[1].hurt_most
    assert effects[0].difference > 0 > effects[1].difference
    assert effects[0].direction == 1 and effects[0].size == 5 and effects[0].num_others == 7
    assert effects[1].member_mean == pytest.approx(0.0, abs=1e-12)


def test_ablation_effects_means_and_comparison_set():
    increase = np.array([3.0, 5.0, 1.0, 1.0, 0.0, 100.0])
    labels = np.array([0, 0, 1, 1, -1, -1])
    clustering = Clustering(labels, None, np.arange(5), 2, 2, "euclidean", None)  # sample 5 was filtered out
    first, second = ablation_effects(increase, clustering)
    assert (first.member_mean, first.others_mean, first.difference) == (4.0, 2.0 / 3.0, 4.0 - 2.0 / 3.0)
    assert (second.member_mean, second.others_mean, second.num_others) == (1.0, 8.0 / 3.0, 3)
    assert (first.rank, second.rank) == (1, 2)
    # an explicit comparison set, as indices or a mask; the cluster's own members never count as "others"
    for kept in (np.array([0, 1, 2, 5]), np.array([True, True, True, False, False, True])):
        first, second = ablation_effects(increase, clustering, kept=kept)
        assert (first.others_mean, second.others_mean) == (50.5, 36.0)
    assert ablation_effects(increase, Clustering(np.full(6, -1), 0, np.arange(6), 2, 2, "euclidean", None)) == []


def test_ablation_rejects_bad_inputs(mlp):
    initial, _, final = sgd_checkpoints(mlp, 3)
    basis = random_basis(final, 2, jax.random.key(0))
    size = flat(final).size
    with pytest.raises(ValueError, match=f"direction must be a flat \\[{size}\\] vector"):
        remove_direction(final, initial, np.ones(size + 1) / np.sqrt(size + 1))
    with pytest.raises(ValueError, match="direction must have unit norm"):
        remove_direction(final, initial, np.ones(size))
    with pytest.raises(ValueError, match="initial_params has a different parameter tree structure"):
        remove_direction(final, {"w1": final["w1"]}, basis.vectors[0])
    broken = dict(final, b1=final["b1"].at[0].set(jnp.nan))
    with pytest.raises(ValueError, match=r"final_params: parameter \['b1'\] contains NaN"):
        direction_ablation_losses(mlp.token_losses, broken, initial, basis, mlp.batch)
    with pytest.raises(ValueError, match=r"directions must lie in \[0, 2\)"):
        direction_ablation_losses(mlp.token_losses, final, initial, basis, mlp.batch, directions=[0, 2])
    with pytest.raises(ValueError, match="non-empty 1-D array of basis indices"):
        direction_ablation_losses(mlp.token_losses, final, initial, basis, mlp.batch, directions=[])
    narrow = basis_from_matrix(np.eye(3, 5))
    with pytest.raises(ValueError, match=f"basis has width 5 but the parameters have {size} entries"):
        direction_ablation_losses(mlp.token_losses, final, initial, narrow, mlp.batch)
    clustering = Clustering(np.array([0, 0, -1]), 0, np.arange(3), 2, 2, "euclidean", None)
    with pytest.raises(ValueError, match=r"loss_increase must have shape \(3,\)"):
        ablation_effects(np.zeros(4), clustering)
    with pytest.raises(ValueError, match="kept must be a bool"):
        ablation_effects(np.zeros(3), clustering, kept=[0, 7])
