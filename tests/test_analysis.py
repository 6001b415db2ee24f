"""Host-side analysis: filters, HDBSCAN clustering, breakthroughs (Eq. 9-10) and cluster scores against label sets,
on synthetic data."""

import numpy as np
import pytest

from polca_jax.analysis import (
    Clustering,
    breakthrough_scores,
    breakthrough_step,
    cluster_label_scores,
    cluster_breakthroughs,
    cluster_directions,
    cluster_signal,
    cluster_trajectories,
    hdbscan_params,
    hidden_breakthrough,
    hidden_breakthrough_fraction,
    kept_directions,
    max_homogeneity,
    medoid,
    quartile_curves,
    relying_samples,
    top_clusters,
)
from polca_jax.errors import PolcaError

pytestmark = pytest.mark.core  # needs only the core install: pytest -m core

STEPS = np.array([0, 30, 120, 250, 410, 600, 640, 777, 900, 950, 1130, 1300, 1500, 1720, 2000])


def falling_sigmoids(onsets, steps=STEPS, width=40.0, amplitude=1.0, noise=0.0, seed=0):
    """float[n, T]: curves starting at 0 that fall by `amplitude` around each onset step."""
    rng = np.random.default_rng(seed)
    steps = np.asarray(steps, float)
    onsets = np.asarray(onsets, float)[:, None]
    sigmoid = 1.0 / (1.0 + np.exp(-(steps[None, :] - onsets) / width))
    curves = -amplitude * (sigmoid - sigmoid[:, :1])
    return curves + noise * rng.standard_normal(curves.shape) * (steps > 0)


def ramp(start, stop, steps=STEPS):
    """float[T]: 1 before `start`, falling linearly to 0 at `stop`, 0 after."""
    return np.interp(steps, [start, stop], [1.0, 0.0])


# ---------------------------------------------------------------- filters


def test_filters_on_hand_made_array():
    # T=3, N=3, K=2. Direction 0: samples 0, 1 fall, sample 2 rises a little; direction 1: mean rises.
    projected_loss = np.zeros((3, 3, 2))
    projected_loss[:, :, 0] = [[0, 0, 0], [-1, -0.5, 0.2], [-2, -1, 0.5]]
    projected_loss[:, :, 1] = [[0, 0, 0], [1, -0.1, 2], [3, -0.1, 1]]
    np.testing.assert_array_equal(kept_directions(projected_loss), [True, False])
    np.testing.assert_array_equal(relying_samples(projected_loss), [[True, False], [True, True], [False, False]])


def test_filters_reject_bad_input():
    with pytest.raises(PolcaError, match="3 axes"):
        kept_directions(np.zeros((3, 4)))
    with pytest.raises(PolcaError, match="NaN"):
        relying_samples(np.full((2, 2, 2), np.nan))
    with pytest.raises(PolcaError, match="empty"):
        kept_directions(np.zeros((2, 0, 3)))


# ---------------------------------------------------------------- clustering


def two_groups_and_outlier():
    """float[61, T]: 30 curves falling at step 250, 30 at step 1300 (slight noise), one falling 3x as far at 700."""
    early = falling_sigmoids(np.full(30, 250.0), noise=0.02, seed=1)
    late = falling_sigmoids(np.full(30, 1300.0), noise=0.02, seed=2)
    outlier = 3.0 * falling_sigmoids([700.0])
    return np.concatenate([early, late, outlier])


def test_hdbscan_finds_two_groups_and_an_outlier():
    labels = cluster_trajectories(two_groups_and_outlier(), min_cluster_size=10, min_samples=3)
    assert len(set(labels[:30])) == 1 and len(set(labels[30:60])) == 1
    assert labels[0] >= 0 and labels[30] >= 0 and labels[0] != labels[30]
    assert labels[60] == -1
    assert set(labels) == {-1, 0, 1}


def test_cluster_trajectories_normalize_options():
    trajectories = two_groups_and_outlier() * np.linspace(1, 3, 61)[:, None]
    settings = dict(min_cluster_size=10, min_samples=3)
    unit = trajectories / np.linalg.norm(trajectories, axis=1, keepdims=True)
    np.testing.assert_array_equal(
        cluster_trajectories(trajectories, normalize="unit", **settings), cluster_trajectories(unit, **settings)
    )
    spread = trajectories.std(axis=0)
    standard = (trajectories - trajectories.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    np.testing.assert_array_equal(
        cluster_trajectories(trajectories, normalize="standardize", **settings),
        cluster_trajectories(standard, **settings),
    )
    with pytest.raises(PolcaError, match="normalize"):
        cluster_trajectories(trajectories, normalize="minmax", **settings)
    with pytest.raises(PolcaError, match="min_cluster_size"):
        cluster_trajectories(trajectories, min_cluster_size=100, min_samples=3)


def test_hdbscan_params_follow_the_paper():
    assert hdbscan_params(5000, min_cluster_size=150) == (150, 333)  # 5000 / 15 = 333.3
    assert hdbscan_params(2640, min_cluster_size=300) == (300, 176)
    # Scaled like the paper's 150 on 5000 tokens to 12600 tokens, min_samples from the filtered count.
    assert hdbscan_params(6000, min_cluster_size=150, reference_num_samples=5000, dataset_size=12600) == (378, 400)
    assert hdbscan_params(10, min_cluster_size=150) == (10, 2)  # clipped to [2, num_samples]
    with pytest.raises(PolcaError, match="at least 2"):
        hdbscan_params(1, min_cluster_size=150)


def test_cluster_directions_maps_labels_back_and_filters():
    groups = two_groups_and_outlier()  # [61, T]
    rising = -falling_sigmoids(np.full(5, 900.0), noise=0.01, seed=3)  # 5 samples not relying on direction 0
    projected_loss = np.zeros((STEPS.size, 66, 2))
    projected_loss[:, :, 0] = np.concatenate([groups, rising]).T
    projected_loss[:, :, 1] = 0.1 * projected_loss[:, :, 0] + 1.0 * (STEPS > 0)[:, None]  # mean rises: dropped

    (clustering,) = cluster_directions(projected_loss, min_cluster_size=10)
    assert clustering.direction == 0
    np.testing.assert_array_equal(clustering.sample_indices, np.arange(61))
    assert (clustering.min_cluster_size, clustering.min_samples) == (10, 61 // 15)
    assert clustering.labels.shape == (66,)
    assert clustering.num_clusters == 2
    np.testing.assert_array_equal(clustering.labels[60:], -1)  # the outlier and the 5 filtered samples
    assert {tuple(clustering.members(c)) for c in range(2)} == {tuple(range(30)), tuple(range(30, 60))}
    with pytest.raises(PolcaError, match="out of range"):
        clustering.members(2)

    # Explicit directions skip the oscillation filter; no sample filter clusters all 66 samples.
    unfiltered = cluster_directions(projected_loss, directions=[1, 0], filter_samples=False, min_cluster_size=10)
    assert [c.direction for c in unfiltered] == [1, 0]
    assert all(c.sample_indices.size == 66 for c in unfiltered)
    for bad, message in [([0.7], "must be integer indices"), ([2], r"must lie in \[0, 2\)"), ([True], "integer")]:
        with pytest.raises(PolcaError, match=message):  # never silently truncated to direction 0
            cluster_directions(projected_loss, directions=bad, min_cluster_size=10)


def test_cluster_signal_for_baselines():
    loss = 2.0 + two_groups_and_outlier().T  # [T, 61] exact loss
    clustering = cluster_signal(loss, min_cluster_size=10)
    assert clustering.direction is None and clustering.num_clusters == 2 and clustering.labels[60] == -1
    mask = np.ones(61, bool)
    mask[:3] = False
    masked = cluster_signal(loss, sample_mask=mask, min_cluster_size=10)
    np.testing.assert_array_equal(masked.labels[:3], -1)
    np.testing.assert_array_equal(masked.sample_indices, np.arange(3, 61))
    with pytest.raises(PolcaError, match="sample_mask"):
        cluster_signal(loss, sample_mask=mask[:10])


def test_medoid_matches_brute_force():
    trajectories = np.random.default_rng(4).standard_normal((37, 5)) + 100.0
    brute = np.linalg.norm(trajectories[:, None] - trajectories[None], axis=-1).sum(axis=1).argmin()
    assert medoid(trajectories, chunk_size=8) == brute


def test_quartiles_match_percentile():
    trajectories = np.random.default_rng(5).standard_normal((21, 6))
    for curve, q in zip(quartile_curves(trajectories), (25, 50, 75)):
        np.testing.assert_allclose(curve, np.percentile(trajectories, q, axis=0))


# ---------------------------------------------------------------- breakthroughs


def test_breakthrough_sign_conventions_on_a_ramp_with_uneven_steps():
    # Falls linearly from step 600 to 900; t ± 100 never lands on a checkpoint, so interpolation matters.
    curves = np.stack([ramp(600, 900), 0.5 * ramp(600, 900) + 3])
    np.testing.assert_array_equal(breakthrough_step(curves, STEPS, 100, sign="drop"), [600, 600])
    np.testing.assert_array_equal(breakthrough_step(curves, STEPS, 100, sign="paper"), [900, 900])


def test_breakthrough_scores_interpolate_like_np_interp():
    curves = np.random.default_rng(6).standard_normal((3, STEPS.size))
    candidates, scores = breakthrough_scores(curves, STEPS, 100, sign="paper")
    assert candidates[0] == 120 and candidates[-1] == 1720  # t - 100 >= 0 and t + 100 <= 2000
    for curve, row in zip(curves, scores):
        f = lambda t: np.interp(t, STEPS, curve)  # noqa: E731
        expected = (f(candidates + 100) - f(candidates)) - (f(candidates) - f(candidates - 100))
        np.testing.assert_allclose(row, expected)
    _, drop_scores = breakthrough_scores(curves, STEPS, 100, sign="drop")
    np.testing.assert_allclose(drop_scores, -scores)


def test_breakthrough_step_brackets_sigmoid_centres():
    steps = np.unique(np.concatenate([np.arange(0, 3001, 50), [1234, 2222]]))
    centres = np.array([500.0, 1200.0, 2000.0])
    curves = falling_sigmoids(centres, steps=steps, width=60.0)
    drop = breakthrough_step(curves, steps, 100, sign="drop")
    paper = breakthrough_step(curves, steps, 100, sign="paper")
    assert np.all((drop >= centres - 200) & (drop < centres))  # the fall starts before the midpoint
    assert np.all((paper > centres) & (paper <= centres + 200))  # ... and ends after it


def test_breakthrough_step_rejects_bad_input():
    curves = np.zeros((2, STEPS.size))
    with pytest.raises(PolcaError, match="inside the step range"):
        breakthrough_step(curves, STEPS, 1500)
    with pytest.raises(PolcaError, match="increasing"):
        breakthrough_step(curves, STEPS[::-1], 100)
    with pytest.raises(PolcaError, match="shape"):
        breakthrough_step(curves, STEPS[:-1], 100)
    with pytest.raises(PolcaError, match="sign"):
        breakthrough_step(curves, STEPS, 100, sign="up")


def test_hidden_breakthrough_threshold():
    steps = np.arange(0, 3001, 50)
    curves = np.stack([ramp(600, 800, steps), ramp(1600, 1800, steps)])  # drops end at 800 and 1800: mean 1300
    assert hidden_breakthrough(curves, steps, 100, 1200)
    assert not hidden_breakthrough(curves, steps, 100, 1300)  # strictly later than τ
    assert not hidden_breakthrough(curves[:1], steps, 100, 1000)
    assert hidden_breakthrough(curves, steps, 100, 1000, sign="drop")  # drops start at 600 and 1600: mean 1100
    assert not hidden_breakthrough(curves, steps, 100, 1100, sign="drop")


def test_hidden_breakthrough_fraction_on_hand_made_clusters():
    steps = np.arange(0, 3001, 50)
    onsets = np.array([400, 400, 1400, 1400, 1200, 1200])  # per sample, in direction 0 and (shifted) direction 1
    projected_loss = np.zeros((steps.size, 6, 2))
    projected_loss[:, :, 0] = np.stack([ramp(t, t + 100, steps) for t in onsets]).T
    projected_loss[:, :, 1] = np.stack([ramp(t + 300, t + 400, steps) for t in onsets]).T
    by_direction = [
        Clustering(np.array([0, 0, 1, 1, -1, -1]), 0, np.arange(6), 2, 2, "euclidean", None),  # ends 500 | 1500
        Clustering(np.array([-1, -1, -1, -1, 0, 0]), 1, np.arange(4, 6), 2, 2, "euclidean", None),  # ends 1600
    ]
    records = cluster_breakthroughs(by_direction, projected_loss, steps, 100)
    assert [(r.direction, r.cluster, r.size, r.mean_step) for r in records] == [
        (0, 0, 2, 500.0),
        (0, 1, 2, 1500.0),
        (1, 0, 2, 1600.0),
    ]
    assert hidden_breakthrough_fraction(by_direction, projected_loss, steps, 100, 1000) == pytest.approx(2 / 3)
    assert hidden_breakthrough_fraction(by_direction, projected_loss, steps, 100, 1550) == pytest.approx(1 / 3)

    # A baseline clustering reads a [T, N] signal; it cannot be matched to a direction of [T, N, K] trajectories.
    baseline = Clustering(np.array([0, 0, 0, 0, 1, 1]), None, np.arange(6), 2, 2, "euclidean", None)  # 1000 | 1300
    assert hidden_breakthrough_fraction([baseline], projected_loss[:, :, 0], steps, 100, 1000) == 0.5
    with pytest.raises(PolcaError, match="without a direction"):
        hidden_breakthrough_fraction([baseline], projected_loss, steps, 100, 1000)
    empty = Clustering(np.full(6, -1), 0, np.arange(6), 2, 2, "euclidean", None)
    assert np.isnan(hidden_breakthrough_fraction([empty], projected_loss, steps, 100, 1000))


# ---------------------------------------------------------------- cluster scores against label sets


def test_positive_class_scores_with_the_papers_qualifying_rule_worked_by_hand():
    # place: 0=1000s 1=100s 2=10s 3=1s.
    #  cluster 0 (5): carry at 10s, 100s, 10s, 100s + one non-carry    -> homogeneity 4/5
    #  cluster 1 (4): carry at 1000s x3 and 10s                        -> homogeneity 1, only 1/4 of carries in 10s/100s
    #  noise (3): one carry (left out of recall)
    place = np.array([2, 1, 2, 1, 3, 0, 0, 0, 2, 1, 2, 3])
    carry = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0], bool)
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1, -1])
    clustering = Clustering(labels, 7, np.arange(12), 2, 2, "euclidean", None)
    qualifying = np.isin(place, (1, 2))
    first, second = cluster_label_scores([clustering], carry, positive=True, qualifying=qualifying)
    # Recall denominator: carry tokens in some cluster = 4 + 4 = 8. Base rate: 9 carry of 12 kept samples.
    assert (first.direction, first.cluster, first.size, first.label, first.qualifies) == (7, 0, 5, True, True)
    assert first.homogeneity == pytest.approx(0.8)
    assert first.recall == pytest.approx(0.5)
    assert first.f1 == pytest.approx(2 * 0.8 * 0.5 / 1.3)
    assert first.base_rate == pytest.approx(9 / 12)
    assert (second.homogeneity, second.recall, second.qualifies) == (1.0, 0.5, False)
    assert second.f1 == pytest.approx(2 / 3)

    assert top_clusters([first, second]) == [first]
    assert max_homogeneity([first, second]) == pytest.approx(0.8)
    assert max_homogeneity([first, second], qualifying_only=False) == 1.0
    assert np.isnan(max_homogeneity([second]))  # nothing qualifies
    relaxed = cluster_label_scores([clustering], carry, positive=True, qualifying=qualifying,
                                   min_qualifying_fraction=0.2)
    assert [r.qualifies for r in relaxed] == [True, True]
    at_threshold = cluster_label_scores([clustering], carry, positive=True, qualifying=qualifying,
                                        min_qualifying_fraction=0.25)
    assert [r.qualifies for r in at_threshold] == [True, False]  # "more than": exactly 1/4 does not qualify
    unruled = cluster_label_scores([clustering], carry, positive=True)
    assert [r.qualifies for r in unruled] == [True, True]  # without a rule: every cluster holding the class


def test_majority_class_scores_of_string_labels_and_filtered_samples():
    # samples 6-7 were filtered out of this direction: they count for no base rate and no recall
    kinds = np.array(["word", "word", "word", "punct", "punct", "word", "punct", "punct"])
    labels = np.array([0, 0, 0, 1, 1, -1, -1, -1])
    clustering = Clustering(labels, 2, np.arange(6), 2, 2, "euclidean", None)
    word, punct = cluster_label_scores([clustering], kinds)
    assert (word.label, word.homogeneity, word.recall, word.base_rate) == ("word", 1.0, 1.0, pytest.approx(4 / 6))
    assert (punct.label, punct.homogeneity, punct.recall, punct.base_rate) == ("punct", 1.0, 1.0,
                                                                               pytest.approx(2 / 6))
    none_of_class = cluster_label_scores([clustering], kinds, positive="digit")
    assert [(r.homogeneity, r.qualifies) for r in none_of_class] == [(0.0, False), (0.0, False)]


def test_top_clusters_ordering():
    clusterings = [
        Clustering(np.array([0, 0, 1, 1, 1, 1]), 0, np.arange(6), 2, 2, "euclidean", None),
        Clustering(np.array([0, 0, 0, -1, -1, -1]), 1, np.arange(6), 2, 2, "euclidean", None),
    ]
    carry = np.array([1, 1, 1, 0, 0, 1], bool)
    records = cluster_label_scores(clusterings, carry, positive=True)
    assert [(r.direction, r.cluster, r.homogeneity) for r in records] == [(0, 0, 1.0), (0, 1, 0.5), (1, 0, 1.0)]
    assert [(r.direction, r.cluster) for r in top_clusters(records, n=2)] == [(0, 0), (1, 0)]
    assert [(r.direction, r.cluster) for r in top_clusters(records, n=3)] == [(0, 0), (1, 0), (0, 1)]
    one_each = top_clusters(records, n=3, one_per_direction=True)
    assert [(r.direction, r.cluster) for r in one_each] == [(0, 0), (1, 0)]
    with pytest.raises(PolcaError, match="clustering labels cover 6 samples, labels has 5"):
        cluster_label_scores(clusterings, carry[:5], positive=True)
    with pytest.raises(PolcaError, match="qualifying must have shape"):
        cluster_label_scores(clusterings, carry, qualifying=np.ones(5, bool))


def test_clusterings_save_load_round_trip(tmp_path):
    from polca_jax.analysis import Clustering, load_clusterings, save_clusterings

    clusterings = [
        Clustering(np.array([0, 1, -1, 0]), 3, np.array([0, 1, 3]), 2, 1, "euclidean", None),
        Clustering(np.array([-1, 0, 0, -1]), None, np.arange(4), None, None, "euclidean", "unit"),
    ]
    save_clusterings(tmp_path / "c.npz", clusterings)
    loaded = load_clusterings(tmp_path / "c.npz")
    for a, b in zip(loaded, clusterings):
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.sample_indices, b.sample_indices)
        assert (a.direction, a.min_cluster_size, a.min_samples, a.metric, a.normalize) == (
            b.direction, b.min_cluster_size, b.min_samples, b.metric, b.normalize)
    with pytest.raises(PolcaError, match="cannot read"):
        load_clusterings(tmp_path / "missing.npz")


def test_gradient_norm_features_are_shares_of_each_sample_s_gradient_reduced_by_pca():
    from polca_jax.analysis import gradient_norm_features

    rng = np.random.default_rng(0)
    norms = np.abs(rng.normal(size=(30, 6)))
    norms[3] = 0.0  # a sample with no gradient keeps a zero share
    features = gradient_norm_features(norms, max_components=4)
    assert features.shape == (30, 4)
    np.testing.assert_allclose(gradient_norm_features(7.0 * norms, max_components=4), features, atol=1e-12)
    shares = norms / np.where(norms.sum(1, keepdims=True) > 0, norms.sum(1, keepdims=True), 1.0)
    full = gradient_norm_features(norms, max_components=6)  # all components: the centred shares, rotated
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), np.linalg.norm(shares - shares.mean(0), axis=1))
    with pytest.raises(PolcaError, match="norms must be >= 0"):
        gradient_norm_features(-norms)


def test_every_permutation_count_takes_a_numpy_integer():
    from polca_jax.analysis import ari_pvalue, homogeneity_pvalues
    clustering = Clustering(np.repeat([0, 1], 20), None, np.arange(40), 5, None, metric="euclidean", normalize=None)
    labels = np.repeat(["a", "b"], 20)
    assert ari_pvalue(clustering, labels, num_permutations=np.int64(50)) == pytest.approx(1 / 51)
    assert homogeneity_pvalues(clustering, labels, num_permutations=np.int64(50)).num_permutations == 50
    with pytest.raises(PolcaError, match="positive integer"):
        ari_pvalue(clustering, labels, num_permutations=np.float64(50))


def _varimax_criterion(rows: np.ndarray) -> float:
    """Kaiser's varimax criterion: the variance of the squared coordinates within each column, summed."""
    return float(np.sum(np.var(rows ** 2, axis=0)))


def test_varimax_finds_the_rotation_a_search_over_every_angle_finds():
    from polca_jax.analysis import rotate_within_span

    rng = np.random.default_rng(3)
    sources = rng.laplace(size=(2, 150, 2)) * (rng.random((2, 150, 2)) < 0.4) + 0.01 * rng.normal(size=(2, 150, 2))
    mixed = sources @ np.linalg.qr(rng.normal(size=(2, 2)))[0]  # [T, N, K] float64
    rotated = rotate_within_span(mixed, "varimax")

    def rows(x):  # each sample's trajectory divided by its norm, as rows [T·N, K]
        per_sample = x.transpose(1, 0, 2)
        return (per_sample / np.linalg.norm(per_sample, axis=(1, 2), keepdims=True)).reshape(-1, 2)

    transform = np.linalg.lstsq(mixed.reshape(-1, 2), rotated.reshape(-1, 2), rcond=None)[0]
    np.testing.assert_allclose(transform.T @ transform, np.eye(2), atol=1e-10)  # an orthogonal rotation ...
    angles = np.linspace(0, np.pi / 2, 20001)  # ... as good as the best of every angle (the criterion's period)
    best = max(_varimax_criterion(rows(mixed) @ np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]))
               for a in angles)
    assert _varimax_criterion(rows(mixed) @ transform) == pytest.approx(best, rel=1e-6)
    assert _varimax_criterion(rows(mixed) @ transform) > _varimax_criterion(rows(mixed)) * 1.01


def test_rotations_within_the_span_recover_mixed_sources_and_refuse_bad_input():
    from polca_jax.analysis import ROTATIONS, rotate_within_span

    rng = np.random.default_rng(4)
    sources = rng.laplace(size=(3, 200, 3)) * (rng.random((3, 200, 3)) < 0.3)
    skewed = sources @ np.array([[1.0, 0.6, 0.0], [0.0, 1.0, 0.5], [0.3, 0.0, 1.0]])  # not orthogonal: ICA's case
    found = rotate_within_span(skewed, "ica")
    correlation = np.abs(np.corrcoef(found.reshape(-1, 3).T, sources.reshape(-1, 3).T)[:3, 3:])
    assert correlation.max(axis=1).min() > 0.98
    assert rotate_within_span(skewed, "none") is not None and np.array_equal(rotate_within_span(skewed, "none"), skewed)
    assert ROTATIONS == ("none", "varimax", "ica")
    with pytest.raises(PolcaError, match="rotation must be one of"):
        rotate_within_span(skewed, "promax")
    with pytest.raises(PolcaError, match="projections"):
        rotate_within_span(skewed[0], "varimax")
