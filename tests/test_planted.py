"""The planted-mechanism benchmark (polca_jax/pipeline/tasks/planted) and the unsupervised-step alternatives with
their ground-truth scores (polca_jax/analysis/_unsupervised.py): the construction's guarantees (private mechanisms,
exact-loss curves equal sample by sample when mirrored, the late group absent from early batches), the features'
invariances, the clusterers and scores on constructed data, clear errors, and the tiny preset end to end."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from sklearn.metrics import adjusted_rand_score

from polca_jax import analysis
from polca_jax import analysis as unsup
from polca_jax.pipeline import load_task_definition, read_metrics, run
from polca_jax.pipeline.tasks.planted import make_spec
from polca_jax.pipeline.tasks.planted._model import parameter_roles
from polca_jax.pipeline.tasks.planted._scores import matched_loss_gap, strategy_summary

TASK = f"{Path(__file__).parents[1] / 'polca_jax' / 'pipeline' / 'tasks' / 'planted' / '__init__.py'}:make_task"
TRIVIAL_CONTROLS = Path(__file__).parents[1] / "experiments" / "planted" / "trivial_controls.py"
SMALL = dict(num_eval_samples=40, num_hessian_samples=20, batch_size=16, width=4, private_dims=3)


@pytest.fixture(scope="module")
def definition():
    return load_task_definition(TASK)


def build(definition, **options):
    return definition.build({**SMALL, **options}, seed=0, workdir=None)


def flat_grad(task, params, batch):
    """[n, P] per-sample gradients, flattened in ravel_pytree order."""
    flat, unravel = ravel_pytree(params)
    one = lambda f, b: task.per_sample_loss(unravel(f), jax.tree_util.tree_map(lambda x: x[None], b))[0]
    return np.asarray(jax.vmap(jax.grad(one), in_axes=(None, 0))(flat, batch))


# --- the entangled task --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def entangled():
    return load_task_definition("planted-entangled")


@pytest.mark.parametrize("rule", ["parity", "carry"])
def test_entangled_groups_follow_their_gate_and_each_group_s_target_its_own_teacher(entangled, rule):
    from polca_jax.pipeline.tasks.planted._entangled import EntangledSpec, make_samples, make_teachers
    from polca_jax.pipeline.tasks.planted._model import teacher_output

    spec = EntangledSpec(rule, gate_bits=4, block_dims=3, amplitude_b=0.5)
    teachers = make_teachers(spec, np.random.default_rng(0))
    samples = make_samples(spec, teachers, 500, np.random.default_rng(1))
    gate, x_a, x_b = np.split(samples["x"].astype(float), [spec.gate_dims, spec.gate_dims + 3], axis=1)
    if rule == "parity":
        expected = gate[:, 0] * gate[:, 1] > 0
    else:
        expected = gate[:, :10].argmax(1) + gate[:, 10:].argmax(1) >= 10
    np.testing.assert_array_equal(samples["group"], expected)
    target = np.where(expected, 0.5 * teacher_output(teachers[1], x_b), teacher_output(teachers[0], x_a))
    np.testing.assert_allclose(samples["y"], target, rtol=1e-5, atol=1e-6)
    assert 0.35 < expected.mean() < 0.6  # both groups, from one input distribution
    early = make_samples(spec, teachers, 200, np.random.default_rng(2), group_a_only=True)  # before late_step
    assert early["x"].shape[0] == 200 and not early["group"].any()
    null = EntangledSpec(rule, gate_bits=4, block_dims=3, amplitude_b=1.0, same_mechanism=True)
    samples = make_samples(null, teachers, 500, np.random.default_rng(1))  # the negative control: one mechanism
    np.testing.assert_allclose(samples["y"], teacher_output(teachers[0], x_a), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["parity", "carry"])
def test_entangled_groups_defeat_the_trivial_controls_by_construction(entangled, rule):
    """Every sample fills every input: where its gradient lies among the parameters does not tell its group."""
    import polca_jax as pj
    from sklearn.cluster import KMeans

    task = entangled.build({"rule": rule, "width": 8, "num_eval_samples": 300}, seed=0, workdir=None)
    groups = task.eval_batch["group"]
    norms = np.asarray(pj.per_sample_gradient_norms(task.per_sample_loss, task.init_params, task.eval_batch))
    shares = norms / norms.sum(axis=1, keepdims=True)
    assert adjusted_rand_score(groups, KMeans(2, n_init=10, random_state=0).fit_predict(shares)) <= 0.3
    [control] = [analysis.cluster_features(analysis.gradient_norm_features(norms), method="gmm",
                                           min_cluster_size=30)]
    assert not analysis.adjusted_rand(control, groups) > 0.3


def test_mirrored_entangled_groups_share_every_loss_trajectory_but_not_their_gradients(entangled):
    """The mirror map S flips the gate and swaps the teachers' blocks; the student starts S-symmetric and trains on
    mirrored pairs, so sample i and its mirror image i + n/2 (the other group) keep equal losses while training."""
    task = entangled.build({"mirror": True, "amplitude_b": 1.0, "width": 8, "num_eval_samples": 40}, seed=0,
                           workdir=None)
    x, groups = np.asarray(task.eval_batch["x"]), np.asarray(task.eval_batch["group"])
    np.testing.assert_array_equal(groups[20:], 1 - groups[:20])
    np.testing.assert_array_equal(x[20:, 0], -x[:20, 0])
    np.testing.assert_array_equal(x[20:, 4:10], x[:20, 10:16])  # x_A of the mirror image is x_B of the sample
    np.testing.assert_array_equal(task.eval_batch["y"][20:], task.eval_batch["y"][:20])
    params, optimizer = task.init_params, optax.adam(1e-2)
    state, losses = optimizer.init(params), []
    for step in range(60):
        batch = task.train_batches(step)
        np.testing.assert_array_equal(batch["group"][32:], 1 - batch["group"][:32])
        grads = jax.grad(lambda p: task.per_sample_loss(p, batch).mean())(params)
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        losses.append(np.asarray(task.per_sample_loss(params, task.eval_batch)))
    losses = np.array(losses)
    np.testing.assert_allclose(losses[:, 20:], losses[:, :20], rtol=1e-4, atol=1e-6)
    assert losses[-1].mean() < 0.8 * losses[0].mean()  # it learns
    grads = flat_grad(task, params, task.eval_batch)
    assert np.abs(grads[20:] - grads[:20]).max() > 0.1 * np.abs(grads).max()  # the gradients differ
    plain = entangled.build({"amplitude_b": 1.0, "width": 8, "num_eval_samples": 40}, seed=0, workdir=None)
    assert not np.allclose(plain.eval_batch["y"][20:], plain.eval_batch["y"][:20])  # the check can fail


def test_the_late_entangled_group_enters_training_at_its_step(entangled):
    task = entangled.build({"late_step": 50, "width": 4, "num_eval_samples": 40}, seed=0, workdir=None)
    assert not any(task.train_batches(step)["group"].any() for step in (0, 25, 49))
    assert task.train_batches(50)["group"].any() and task.eval_batch["group"].any()


@pytest.mark.parametrize("options, message", [
    (dict(rule="xor"), "rule must be one of"), (dict(gate_bits=1), "gate_bits must be an integer >= 2"),
    (dict(amplitude_b=0.0), "amplitude_b must be a finite number > 0"), (dict(width=1), "width must be an integer"),
    (dict(same_mechanism="yes"), "same_mechanism must be true or false"),
    (dict(late_step=-1), "late_step must be an integer >= 0"), (dict(mirror=1), "mirror must be true or false"),
    (dict(mirror=True), "mirror=true needs rule=parity, amplitude_b=1.0"),
    (dict(mirror=True, amplitude_b=1.0, rule="carry"), "mirror=true needs rule=parity"),
    (dict(mirror=True, amplitude_b=1.0, late_step=5), "late_step must be 0"),
    (dict(mirror=True, amplitude_b=1.0, width=7), "width must be even"),
    (dict(mirror=True, amplitude_b=1.0, num_eval_samples=41), "n must be even"),
])
def test_entangled_bad_options_raise_clear_errors(entangled, options, message):
    with pytest.raises(ValueError, match=message):
        entangled.build(options, seed=0, workdir=None)


# --- the task ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared_readout", [False, True])
def test_a_group_s_loss_depends_only_on_its_own_mechanism(definition, shared_readout):
    task = build(definition, shared_readout=shared_readout, shared_dims=2)
    spec = make_spec(shared_readout=shared_readout, shared_dims=2, width=4, private_dims=3)
    roles = parameter_roles(spec)
    assert np.array_equal(sum(m.astype(int) for m in roles.values()), np.ones(ravel_pytree(task.init_params)[0].size))
    grads = flat_grad(task, task.init_params, task.eval_batch)
    groups = np.asarray(task.eval_batch["group"])
    for g in (0, 1):
        other = roles[f"group {1 - g}"]
        assert np.all(grads[groups == g][:, other] == 0), "a sample moved another group's private parameters"
        assert np.any(grads[groups == g][:, roles[f"group {g}"]] != 0)
        assert np.any(grads[groups == g][:, roles["shared input"]] != 0)  # the overlap is used by both groups
    if shared_readout:
        assert np.any(grads[:, roles["readout"]] != 0)


def train_losses(task, steps: int = 15) -> np.ndarray:
    """[steps + 1, N] evaluation losses along a few Adam steps on the task's own batches."""
    optimizer = optax.adam(1e-2)
    params, state = task.init_params, optimizer.init(task.init_params)
    grad = jax.jit(jax.grad(task.loss))
    losses = [task.per_sample_loss(params, task.eval_batch)]
    for step in range(steps):
        updates, state = optimizer.update(grad(params, task.train_batches(step)), state)
        params = optax.apply_updates(params, updates)
        losses.append(task.per_sample_loss(params, task.eval_batch))
    return np.asarray(losses)


def test_mirrored_groups_have_equal_exact_losses_sample_by_sample(definition):
    task = build(definition, mirror="full")
    losses = train_losses(task)
    groups = np.asarray(task.eval_batch["group"])
    a, b = losses[:, groups == 0], losses[:, groups == 1]  # the i-th sample of each group is a mirror image
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert losses[-1].mean() < losses[0].mean()  # it learns
    assert matched_loss_gap(losses, groups)["relative"] < 1e-4
    independent = train_losses(build(definition, mirror="none"))
    assert matched_loss_gap(independent, groups)["relative"] > 1e-3  # the check can fail


def test_the_late_group_enters_training_at_its_step(definition):
    task = build(definition, group_weights="1,1,1", late_step=10)
    assert set(np.asarray(task.train_batches(9)["group"]).tolist()) == {0, 1}
    assert set(np.asarray(task.train_batches(10)["group"]).tolist()) == {0, 1, 2}
    assert set(np.asarray(task.eval_batch["group"]).tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(task.train_batches(3)["x"], task.train_batches(3)["x"])  # a pure function
    assert task.labels["group"].values.tolist().count("C") == SMALL["num_eval_samples"] // 3


@pytest.mark.parametrize("options, message", [
    (dict(group_weights="1"), "group_weights"),
    (dict(group_weights="1,x"), "group_weights"),
    (dict(group_weights="1,-1"), "group_weights"),
    (dict(mirror="half"), "mirror"),
    (dict(late_step=-1), "late_step"),
    (dict(loss="hinge"), "loss"),
    (dict(width=0), "width"),
    (dict(noise=-0.1), "noise"),
    (dict(num_eval_samples=1), "num_eval_samples"),
])
def test_bad_task_options_raise_clear_errors(definition, options, message):
    with pytest.raises(ValueError, match=message):
        build(definition, **options)


# --- features, clusterers and scores ---------------------------------------------------------------------------


def planted_trajectories(rng, n_per_group: int = 60, t: int = 12, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """[T, N, K] projected losses where group 0 learns only along directions 0-1 and group 1 along 2-3, each sample
    with its own amplitude (a continuum, as in the benchmark) and a little noise; and the groups [N]."""
    n = 2 * n_per_group
    groups = np.repeat([0, 1], n_per_group)
    shape = -np.linspace(0, 1, t) ** 2  # [T]
    weights = np.zeros((n, k))
    weights[groups == 0, :2] = [1.0, 0.5]
    weights[groups == 1, 2:] = [0.7, 1.0]
    amplitude = rng.uniform(0.1, 2.0, n)
    projected = shape[:, None, None] * (amplitude[:, None] * weights)[None] + 1e-3 * rng.normal(size=(t, n, k))
    return projected - projected[:1], groups


def test_shape_features_ignore_scale_and_sign():
    curves = np.random.default_rng(0).normal(size=(5, 7))
    features = unsup.shape_features(curves)
    np.testing.assert_allclose(unsup.shape_features(-3.0 * curves), features)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0)
    assert np.all(features[:, -1] <= 0)


def test_allocation_profiles_ignore_scale_but_keep_signs():
    projected, _ = planted_trajectories(np.random.default_rng(0))
    profiles = unsup.allocation_profiles(projected)
    np.testing.assert_allclose(unsup.allocation_profiles(5.0 * projected), profiles, atol=1e-12)
    np.testing.assert_allclose(unsup.allocation_profiles(-projected), -profiles, atol=1e-12)
    assert profiles.shape == (120, 4)


@pytest.mark.parametrize("clusterer", unsup.CLUSTERERS)
def test_profiles_recover_groups_that_learn_along_different_directions(clusterer):
    projected, groups = planted_trajectories(np.random.default_rng(1))
    [clustering] = unsup.strategy_clusterings(projected, "profile", clusterer=clusterer, min_cluster_size=10)
    assert unsup.adjusted_rand(clustering, groups) == pytest.approx(1.0)
    assert all(r.recovered for r in unsup.group_recovery([clustering], groups))
    assert unsup.ari_pvalue(clustering, groups, num_permutations=200) == pytest.approx(1 / 201)


def test_gradient_trajectories_read_the_late_window_where_the_groups_part():
    from polca_jax.pipeline import RunConfig
    from polca_jax.pipeline._stages import cluster_gradient_trajectories

    rng = np.random.default_rng(0)
    groups = np.repeat([0, 1], 60)
    projections = rng.normal(size=(40, 120, 4))  # [T, N, K]: large noise alike for both groups ...
    projections[:-8] *= 10.0
    projections[-8:, :, 0] += np.where(groups == 1, 2.0, -2.0)  # ... until the last fifth of the checkpoints
    config = RunConfig(task="t", preset=None, task_options={}, min_cluster_size=20, reference_num_samples=None)
    [late] = cluster_gradient_trajectories(projections, dataclasses.replace(config, gradient_window=0.2))
    [whole] = cluster_gradient_trajectories(projections, dataclasses.replace(config, gradient_window=1.0))
    assert adjusted_rand_score(groups, late.labels) > 0.9 and not analysis.adjusted_rand(whole, groups) > 0.5
    with pytest.raises(ValueError, match=r"gradient_window must be a fraction in \(0, 1\]"):
        dataclasses.replace(config, gradient_window=0)


def test_gradient_increments_see_groups_that_each_sample_s_constant_gradient_hides():
    from polca_jax.pipeline import RunConfig, cluster_gradient_trajectories

    rng = np.random.default_rng(0)
    groups = np.repeat([0, 1], 60)
    offsets = 20.0 * rng.normal(size=(1, 120, 3))  # [T, N, K]: each sample's own constant gradient, far larger ...
    drift = np.zeros((1, 120, 3))
    drift[0, :, 0] = np.where(groups == 1, 0.3, -0.3)  # ... than its group's drift per checkpoint
    projections = offsets + np.arange(10)[:, None, None] * drift + 0.05 * rng.normal(size=(10, 120, 3))
    config = RunConfig(task="t", preset=None, task_options={}, min_cluster_size=20, reference_num_samples=None,
                       gradient_window=1.0)
    [values] = cluster_gradient_trajectories(projections, config)
    [increments] = cluster_gradient_trajectories(projections, dataclasses.replace(config, gradient_increments=True))
    assert adjusted_rand_score(groups, increments.labels) > 0.9 and not analysis.adjusted_rand(values, groups) > 0.5


def test_subspace_features_join_a_mechanism_whose_gradients_flip_sign_that_trajectories_split():
    """Each group's gradients move along its own direction of three, with a random sign per sample and checkpoint
    (the residual's): the subspace each sample moves in tells the groups apart, its signed trajectory does not."""
    from polca_jax.pipeline import RunConfig, cluster_gradient_trajectories

    rng = np.random.default_rng(2)
    groups = np.repeat([0, 1], 80)
    axes = np.array([[1.0, 1.0, 0.0], [1.0, -1.0, 0.0]]) / np.sqrt(2)  # the groups share every coordinate's scale
    signs = rng.choice([-1.0, 1.0], size=(8, 160, 1))
    projections = signs * (axes[groups][None] + 0.1 * rng.normal(size=(8, 160, 3)))
    config = RunConfig(task="t", preset=None, task_options={}, min_cluster_size=20, reference_num_samples=None,
                       gradient_window=1.0, profile_clusterer="kmeans")
    [joint] = cluster_gradient_trajectories(projections, config)
    [subspace] = cluster_gradient_trajectories(projections, dataclasses.replace(config, gradient_directions="subspace"))
    assert adjusted_rand_score(groups, subspace.labels) > 0.9 and not analysis.adjusted_rand(joint, groups) > 0.5
    np.testing.assert_allclose(analysis.subspace_features(projections), analysis.subspace_features(-projections))


def test_gradient_trajectories_per_direction_cluster_each_direction_along_the_rotation_asked_for():
    from polca_jax.pipeline import RunConfig, cluster_gradient_trajectories

    rng = np.random.default_rng(1)
    groups = np.repeat([0, 1], 60)
    projections = 0.1 * rng.normal(size=(12, 120, 3))
    projections[:, :, 1] += np.where(groups == 1, 1.0, -1.0) * np.linspace(0, 1, 12)[:, None]  # the groups part on 1
    config = RunConfig(task="t", preset=None, task_options={}, min_cluster_size=20, reference_num_samples=None,
                       gradient_window=0.5, gradient_directions="each")
    each = cluster_gradient_trajectories(projections, config)
    assert [clustering.direction for clustering in each] == [0, 1, 2]
    assert adjusted_rand_score(groups, each[1].labels) > 0.9
    for rotation in ("varimax", "ica"):  # the same clusterings as of the directions the rotation finds
        rotated = cluster_gradient_trajectories(projections, dataclasses.replace(config, gradient_rotation=rotation))
        by_hand = cluster_gradient_trajectories(analysis.rotate_within_span(projections[-6:], rotation),
                                                dataclasses.replace(config, gradient_window=1.0))
        assert [c.labels.tolist() for c in rotated] == [c.labels.tolist() for c in by_hand]
        assert max(adjusted_rand_score(groups, c.labels) for c in rotated) > 0.9
    for setting, value, message in [("gradient_rotation", "pca", "gradient_rotation must be one of"),
                                    ("gradient_directions", "all", "gradient_directions must be one of"),
                                    ("gradient_increments", "yes", "gradient_increments must be true or false")]:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(config, **{setting: value})


def test_the_snapshot_control_reads_the_first_checkpoint_after_step_0_only():
    from polca_jax.pipeline import RunConfig
    from polca_jax.pipeline._stages import cluster_checkpoint_gradients

    rng = np.random.default_rng(0)
    groups = np.repeat([0, 1], 60)
    projections = rng.normal(size=(6, 120, 4))  # [T, N, K]
    config = RunConfig(task="t", preset=None, task_options={}, min_cluster_size=20, reference_num_samples=None)
    parted = projections.copy()
    parted[1, :, 0] += np.where(groups == 1, 8.0, -8.0)  # the groups part at the control's checkpoint ...
    [snapshot] = cluster_checkpoint_gradients(parted, config)
    assert adjusted_rand_score(groups, snapshot.labels) > 0.9
    later = projections.copy()
    later[2:, :, 0] += np.where(groups == 1, 8.0, -8.0)  # ... or only later, which it does not read
    [snapshot] = cluster_checkpoint_gradients(later, config)
    assert not adjusted_rand_score(groups, snapshot.labels) > 0.3


def test_per_direction_clustering_of_a_continuum_finds_no_group():
    """The paper's step on the same data: within a direction, its own group's amplitudes form a continuum and the
    other group sits at zero, so no cluster recovers a group with recall >= 0.5 at homogeneity >= 0.9 here."""
    projected, groups = planted_trajectories(np.random.default_rng(1))
    clusterings = unsup.strategy_clusterings(projected, "paper", min_cluster_size=10)
    assert len(clusterings) == 4 and all(isinstance(c, analysis.Clustering) for c in clusterings)
    summary = strategy_summary(clusterings, groups)
    assert summary["clusterings_with_ari"] == 0 or summary["best_ari"] < 0.8


def test_count_based_clusterers_mark_small_clusters_as_noise():
    rng = np.random.default_rng(2)
    features = np.concatenate([rng.normal(0, 0.1, (40, 2)), rng.normal(5, 0.1, (40, 2)), rng.normal(-5, 0.1, (3, 2))])
    clustering = unsup.cluster_features(features, method="kmeans", min_cluster_size=10, max_clusters=4)
    assert clustering.num_clusters == 2 and np.all(clustering.labels[-3:] == -1)
    placed = unsup.cluster_features(features[:80], method="gmm", min_cluster_size=5, sample_indices=np.arange(80) + 3,
                                    num_samples=90)
    assert placed.num_samples == 90 and np.all(placed.labels[:3] == -1) and placed.num_clusters == 2


def test_adjusted_rand_is_scikit_learn_s_over_clustered_samples_and_nan_without_evidence():
    truth = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    labels = np.array([0, 0, 1, 1, -1, 1, -1, 0])
    clustering = analysis.Clustering(labels, None, np.arange(8), 2, 2, "euclidean", None)
    kept = labels >= 0
    assert unsup.adjusted_rand(clustering, truth) == pytest.approx(adjusted_rand_score(truth[kept], labels[kept]))
    one_class = analysis.Clustering(np.where(truth == 0, 0, -1), 3, np.arange(8), 2, 2, "euclidean", None)
    assert np.isnan(unsup.adjusted_rand(one_class, truth))
    random_labels = np.random.default_rng(3).integers(0, 2, 200)
    chance = analysis.Clustering(random_labels, None, np.arange(200), 2, 2, "euclidean", None)
    assert unsup.ari_pvalue(chance, np.random.default_rng(4).integers(0, 2, 200), num_permutations=200) > 0.05


def test_group_recovery_counts_recall_over_every_member_of_the_group():
    truth = np.array(["A"] * 10 + ["B"] * 10)
    labels = np.full(20, -1)
    labels[:4] = 0  # 4 of 10 A: homogeneous, recall 0.4
    labels[10:16] = 1  # 6 of 10 B
    clustering = analysis.Clustering(labels, 0, np.arange(20), 2, 2, "euclidean", None)
    a, b = unsup.group_recovery([clustering], truth)
    assert (a.label, a.homogeneity, a.recall, a.recall_clustered, a.recovered) == ("A", 1.0, 0.4, 1.0, False)
    assert (b.recall, b.recovered, b.best) == (0.6, True, (0, 1))


@pytest.mark.parametrize("call, message", [
    (lambda p: unsup.strategy_clusterings(p, "kmeans", min_cluster_size=5), "strategy"),
    (lambda p: unsup.strategy_clusterings(p, "profile", clusterer="dbscan", min_cluster_size=5), "clusterer"),
    (lambda p: unsup.strategy_clusterings(p, "paper", clusterer="kmeans", min_cluster_size=5), "paper"),
    (lambda p: unsup.strategy_clusterings(p, "profile", directions=[7], min_cluster_size=5), "directions"),
    (lambda p: unsup.strategy_clusterings(p, "profile", max_clusters=1, min_cluster_size=5), "max_clusters"),
    (lambda p: unsup.allocation_profiles(p[0]), "3 axes"),
    (lambda p: unsup.cluster_features(p[-1], min_cluster_size=5, sample_indices=[0]), "sample_indices"),
    (lambda p: unsup.group_recovery([], np.zeros(3), min_recall=0), "min_recall"),
])
def test_bad_options_raise_clear_errors(call, message):
    projected, _ = planted_trajectories(np.random.default_rng(0), n_per_group=10)
    with pytest.raises(ValueError, match=message):
        call(projected)


# --- end to end ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_gradient_covariance_and_preconditioned_hessian_bases_run_as_ablation_bases(tmp_path):
    settings = ["ablation_bases=random,scaled_gradient_covariance,gradient_covariance,preconditioned_hessian",
                "baselines=false"]
    report = run(TASK, tmp_path / "run", preset="tiny", settings=settings, progress=False, log=lambda _: None)
    import polca_jax as pj
    basis = pj.Basis.load(tmp_path / "run" / "basis" / "scaled_gradient_covariance")
    hessian = pj.Basis.load(tmp_path / "run" / "basis" / "hessian")
    assert basis.method == "scaled_gradient_covariance" and basis.size == hessian.size
    assert not (tmp_path / "run" / "basis" / "scaled_gradient_covariance.partial").exists()
    result = pj.POLCAResult.load(tmp_path / "run" / "polca" / "scaled_gradient_covariance")
    assert result.config["eigenvalues"] == "current"  # its eigenvalues are no Hessian's: the paper's term measures
    unscaled = pj.Basis.load(tmp_path / "run" / "basis" / "gradient_covariance")
    assert unscaled.method == "gradient_covariance" and unscaled.size == hessian.size
    preconditioned = pj.Basis.load(tmp_path / "run" / "basis" / "preconditioned_hessian")
    assert preconditioned.method == "preconditioned_hessian" and preconditioned.size == hessian.size
    assert pj.POLCAResult.load(tmp_path / "run" / "polca" / "preconditioned_hessian").config["eigenvalues"] == "current"
    variants = read_metrics(tmp_path / "run" / "metrics.json").variants
    assert {"covariance_basis", "covariance_profile", "covariance_gradients", "unscaled_covariance_basis",
            "unscaled_covariance_gradients", "preconditioned_basis", "preconditioned_profile",
            "preconditioned_gradients"} <= set(variants)
    nulls = report.read_text().split("## Against the nulls")[1]
    assert "Scaled gradient covariance basis" in nulls and "Scaled gradient covariance, allocation profiles" in nulls
    assert "Preconditioned Hessian, allocation profiles" in nulls


@pytest.mark.slow
def test_the_entangled_tiny_preset_runs_end_to_end_with_its_strategies_and_controls(tmp_path):
    report = run("planted-entangled", tmp_path / "run", preset="tiny", settings=["late_step=100"], progress=False,
                 log=lambda _: None)
    text = report.read_text()
    assert "## Planted ground truth" in text and "POLCA, projected-gradient trajectories" in text
    assert "Planted late breakthrough: group B enters training at step 100" in text
    metrics = read_metrics(tmp_path / "run" / "metrics.json")
    assert {"polca_gradients", "random_gradients", "gradient_norms", "random_snapshot"} <= set(metrics.variants)
    verdict = metrics.verdicts["group"]
    assert verdict.control is None or verdict.control.homogeneity < 0.9  # the control is blind here


@pytest.mark.slow
def test_the_tiny_preset_runs_end_to_end_with_its_ground_truth(tmp_path):
    report = run(TASK, tmp_path / "run", preset="tiny", progress=False, log=lambda _: None)
    text = report.read_text()
    assert "## Planted ground truth" in text and "Random orthonormal basis" in text
    metrics = read_metrics(tmp_path / "run" / "metrics.json")
    assert "group" in metrics.variants["polca"].label_sets
    import polca_jax as pj
    result = pj.POLCAResult.load(tmp_path / "run" / "polca" / "hessian")
    groups = np.load(tmp_path / "run" / "labels.npz")["label:group"]
    assert matched_loss_gap(result.loss, groups)["relative"] < 1e-4  # mirrored: the exact loss cannot tell them
    exact = analysis.load_clusterings(tmp_path / "run" / "clusters" / "exact_loss.npz")
    assert not strategy_summary(exact, groups)["best_ari"] > 0.2
    # with one head per group and no shared input, every basis vector lies on the groups' private parameters
    basis = np.asarray(pj.Basis.load(tmp_path / "run" / "basis" / "hessian").vectors, dtype=float)
    roles = parameter_roles(make_spec(width=8))
    share = np.stack([(basis[:, roles[f"group {g}"]] ** 2).sum(axis=1) for g in (0, 1)])
    np.testing.assert_allclose(share.sum(axis=0), 1.0, atol=1e-4)
    [profile] = unsup.strategy_clusterings(result.projected_loss, "profile", min_cluster_size=12)
    assert profile.num_samples == groups.size
    # the pipeline's own label-free control: with a private input block per group, where a sample's gradient lies
    # gives the groups away without POLCA, and the verdict weighs every finding against it
    [control] = analysis.load_clusterings(tmp_path / "run" / "clusters" / "gradient_norms.npz")
    assert strategy_summary([control], groups)["best_ari"] >= 0.9
    verdict = metrics.verdicts["group"]
    assert verdict.control.homogeneity >= 0.9 and verdict.control.beats_null
    assert verdict.beyond_controls is (False if verdict.found else None)
    line = next(line for line in text.splitlines() if line.startswith("- **group: "))
    assert "a label-free control does as well" in line or "a label-free control finds it" in line
    # the trivial label-free control: with a private input block per group, where a sample's gradient lies in the
    # first layer gives the groups away without POLCA
    controls = subprocess.run([sys.executable, str(TRIVIAL_CONTROLS), str(tmp_path / "run")], capture_output=True,
                              text=True, check=True).stdout
    aris = [float(ari) for ari in re.findall(r"k-means: ARI (\S+)", controls)]
    assert len(aris) == 2 and min(aris) == 1.0, controls
    assert "logistic probe on the exact-loss trajectories: ROC AUC" in controls
    table = subprocess.run([sys.executable, str(TRIVIAL_CONTROLS.with_name("covariance_basis.py")),
                            str(tmp_path / "run")], capture_output=True, text=True, check=True).stdout
    rows = re.findall(r"^\| (Hessian \(the run's\)|scaled gradient covariance|gradient covariance, unscaled|random) \| "
                      r"(-?\d\.\d\d) \| (-?\d\.\d\d|nan) \|$", table, flags=re.M)
    assert len(rows) == 4, table
