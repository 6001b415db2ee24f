"""Null models for clusters: label-homogeneity permutation test, p-value adjustment, shuffled breakthroughs."""

import itertools

import numpy as np
import pytest

from polca_jax.analysis._clustering import Clustering
from polca_jax.analysis import (ablation_effects, ablation_pvalues, adjust_pvalues, breakthrough_null,
                                homogeneity_pvalues)
from polca_jax.errors import PolcaError

pytestmark = pytest.mark.core  # needs only the core install: pytest -m core


def clustering(labels, sample_indices=None):
    labels = np.asarray(labels)
    kept = np.arange(labels.size) if sample_indices is None else np.asarray(sample_indices)
    return Clustering(labels, 0, kept, 2, 2, "euclidean", None)


# --- homogeneity_pvalues ----------------------------------------------------------------------------------------------


def test_planted_homogeneous_cluster_is_significant_and_a_random_one_is_not():
    # 200 samples, 100 of class 1. Cluster 0: 50 samples all of class 1; cluster 1: 50 samples at the base rate.
    classes = np.array([1] * 50 + [1] * 25 + [0] * 25 + [1] * 25 + [0] * 75)
    labels = np.array([0] * 50 + [1] * 50 + [-1] * 100)
    test = homogeneity_pvalues(clustering(labels), classes, positive=1, num_permutations=199)
    np.testing.assert_allclose(test.observed, [1.0, 0.5])
    assert test.pvalues[0] == pytest.approx(1 / 200)  # no permutation puts 50 of the 100 ones in one 50-cluster
    assert test.pvalues[1] > 0.3
    np.testing.assert_allclose(test.null_mean, 0.5, atol=0.02)  # E = 100/200
    assert np.all(test.null_q95 < 1.0) and test.num_permutations == 199
    np.testing.assert_array_equal(test.classes, [1, 1])


def test_majority_statistic_scores_the_majority_class_and_positive_the_given_one():
    classes = np.array(["b"] * 8 + ["a"] * 2 + ["a"] * 10 + ["c"] * 10)
    labels = np.array([0] * 10 + [1] * 10 + [-1] * 10)
    majority = homogeneity_pvalues(clustering(labels), classes, num_permutations=99)
    np.testing.assert_array_equal(majority.classes, ["b", "a"])
    np.testing.assert_allclose(majority.observed, [0.8, 1.0])
    assert majority.pvalues[1] == pytest.approx(1 / 100)

    positive = homogeneity_pvalues(clustering(labels), classes, positive="a", num_permutations=99)
    np.testing.assert_array_equal(positive.classes, ["a", "a"])
    np.testing.assert_allclose(positive.observed, [0.2, 1.0])
    assert positive.pvalues[0] > 0.5  # 2 of 10 "a" against a base rate of 12/30
    # a class absent from the clustered samples scores 0 everywhere, which nothing beats
    absent = homogeneity_pvalues(clustering(labels), classes, positive="z", num_permutations=9)
    np.testing.assert_array_equal(absent.observed, [0.0, 0.0])
    np.testing.assert_array_equal(absent.pvalues, [1.0, 1.0])


@pytest.mark.parametrize("positive, num_classes", [(1, 2), (None, 2), (None, 3)])
def test_pvalues_are_roughly_uniform_under_the_null(positive, num_classes):
    """Random labels and random clusters, 200 times: 600 p-values with 99 permutations each.

    Tolerance: a permutation p-value is valid, P(p ≤ 0.1) ≤ 0.1, and the binomial sd of the fraction of 600 is
    sqrt(0.1·0.9/600) ≈ 0.012, so the fraction exceeds 0.1 + 3 sd ≈ 0.137 with probability < 0.2% for a correct test
    (a null scored at the observed majority class instead of the max over classes gives about 0.2). It is
    conservative by the probability of a tie between null and observed counts (counted as ≥), about
    1/(σ·sqrt(2π)) ≈ 0.06 for clusters of ~250 with σ ≈ 6.8, so the lower bound is 0.1 − 0.06 − 0.012 ≈ 0.03.
    """
    rng = np.random.default_rng(1)
    pvalues = []
    for repeat in range(200):
        labels = rng.integers(-1, 3, 1000)
        classes = rng.integers(0, num_classes, 1000)
        test = homogeneity_pvalues(clustering(labels), classes, positive=positive, num_permutations=99, seed=repeat)
        pvalues.append(test.pvalues)
    pvalues = np.concatenate(pvalues)
    assert 0.03 < np.mean(pvalues <= 0.1) < 0.137
    assert 0.4 < np.mean(pvalues <= 0.5) < 0.55  # the bulk is not piled up at either end
    assert pvalues.min() >= 1 / 100 and pvalues.max() <= 1.0


def test_null_permutes_only_the_clustered_samples_noise_included():
    # 40 clustered samples (sample_indices) all of class 1; 200 filtered-out samples of class 0.
    classes = np.array([1] * 40 + [0] * 200)
    labels = np.array([0] * 20 + [-1] * 220)
    kept = np.arange(40)
    test = homogeneity_pvalues(clustering(labels, kept), classes, positive=1, num_permutations=99)
    # every permutation of the clustered labels is all ones: nothing to beat. Had the 200 zeros entered the null,
    # the cluster (20 of 20 ones) would get p = 1/100.
    assert test.observed[0] == 1.0 and test.pvalues[0] == 1.0
    relabelled = classes.copy()
    relabelled[40:] = 1 - relabelled[40:]
    again = homogeneity_pvalues(clustering(labels, kept), relabelled, positive=1, num_permutations=99)
    np.testing.assert_array_equal(again.pvalues, test.pvalues)
    np.testing.assert_array_equal(again.null_mean, test.null_mean)

    # HDBSCAN noise inside sample_indices does enter: 20 noise samples of class 0 make the all-ones cluster special
    classes[20:40] = 0
    noisy = homogeneity_pvalues(clustering(labels, kept), classes, positive=1, num_permutations=99)
    assert noisy.pvalues[0] == pytest.approx(1 / 100)


def confounded_labels(rng):
    """800 samples in 4 places; the label lives only in places 1 and 2 (half of their samples)."""
    place = np.repeat(np.arange(4), 200)
    label = np.isin(place, (1, 2)) & (rng.random(place.size) < 0.5)
    return place, label


def test_a_cluster_of_strata_beats_the_plain_null_but_not_the_stratified_one():
    place, label = confounded_labels(np.random.default_rng(0))
    by_place = np.where(np.isin(place, (1, 2)), 0, 1)  # separates the places, knows nothing of the label
    plain = homogeneity_pvalues(clustering(by_place), label, positive=True, num_permutations=199)
    stratified = homogeneity_pvalues(clustering(by_place), label, positive=True, num_permutations=199, strata=place)
    assert plain.observed[0] == pytest.approx(label[place == 1].tolist().count(True) / 400
                                              + label[place == 2].tolist().count(True) / 400)
    assert plain.pvalues[0] == pytest.approx(1 / 200)
    assert stratified.pvalues[0] == 1.0  # within each place the label's count in the cluster cannot change
    np.testing.assert_allclose(stratified.null_mean[0], stratified.observed[0])


def test_a_cluster_of_the_label_within_its_strata_beats_the_stratified_null():
    place, label = confounded_labels(np.random.default_rng(1))
    found = np.where(label, 0, np.where(np.isin(place, (1, 2)) & (np.arange(place.size) % 3 == 0), 0, 1))
    test = homogeneity_pvalues(clustering(found), label, positive=True, num_permutations=199, strata=place)
    assert test.observed[0] > 0.7 and test.pvalues[0] == pytest.approx(1 / 200)


def test_one_stratum_is_the_plain_null_and_strata_are_checked():
    rng = np.random.default_rng(2)
    labels, classes = rng.integers(-1, 3, 300), rng.integers(0, 2, 300)
    plain = homogeneity_pvalues(clustering(labels), classes, positive=1, num_permutations=99, seed=5)
    one = homogeneity_pvalues(clustering(labels), classes, positive=1, num_permutations=99, seed=5,
                              strata=np.full(300, "all"))
    np.testing.assert_array_equal(plain.pvalues, one.pvalues)
    with pytest.raises(PolcaError, match=r"strata must have shape \(300,\)"):
        homogeneity_pvalues(clustering(labels), classes, strata=np.zeros(299))


def test_clustering_without_clusters_gives_empty_arrays():
    test = homogeneity_pvalues(clustering(np.full(10, -1)), np.arange(10) % 2, num_permutations=9)
    assert test.num_clusters == 0
    for array in (test.observed, test.classes, test.pvalues, test.null_mean, test.null_q95):
        assert array.shape == (0,)


def test_permutation_test_is_seeded():
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 10, 5000)
    classes = rng.integers(0, 2, 5000).astype(bool)
    first = homogeneity_pvalues(clustering(labels), classes, positive=True, num_permutations=1000, seed=3)
    second = homogeneity_pvalues(clustering(labels), classes, positive=True, num_permutations=1000, seed=3)
    np.testing.assert_array_equal(first.pvalues, second.pvalues)


def test_homogeneity_pvalues_rejects_bad_inputs():
    c = clustering(np.array([0, 0, 1, 1, -1]))
    with pytest.raises(PolcaError, match=r"labels must have shape \(5,\)"):
        homogeneity_pvalues(c, np.zeros(4))
    with pytest.raises(PolcaError, match="num_permutations must be a positive integer"):
        homogeneity_pvalues(c, np.zeros(5), num_permutations=0)
    with pytest.raises(PolcaError, match="NaN"):
        homogeneity_pvalues(c, np.array([0.0, 1.0, np.nan, 0.0, 1.0]))
    inconsistent = clustering(np.array([0, 0, 1, 1, -1]), sample_indices=[0, 1, 2])
    with pytest.raises(PolcaError, match="outside its sample_indices"):
        homogeneity_pvalues(inconsistent, np.zeros(5))


# --- adjust_pvalues ---------------------------------------------------------------------------------------------------


def test_adjust_pvalues_against_hand_computed_holm_and_bh():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5])
    # sorted: 0.005, 0.01, 0.03, 0.04, 0.5 (m = 5)
    # Holm: 5·0.005 = 0.025, 4·0.01 = 0.04, 3·0.03 = 0.09, 2·0.04 = 0.08 → max so far 0.09, 1·0.5 = 0.5
    np.testing.assert_allclose(adjust_pvalues(p, "holm"), [0.04, 0.09, 0.09, 0.025, 0.5])
    # BH: 5·p/rank = 0.025, 0.025, 0.05, 0.05, 0.5; running min from the top leaves them unchanged
    np.testing.assert_allclose(adjust_pvalues(p, "bh"), [0.025, 0.05, 0.05, 0.025, 0.5])
    # BH step-up monotonicity: sorted 0.01, 0.02, 0.021 (m = 3) → 0.03, 0.03, 0.021 → min from the top: 0.021 each
    np.testing.assert_allclose(adjust_pvalues([0.02, 0.01, 0.021], "bh"), [0.021, 0.021, 0.021])
    # clipped to 1
    np.testing.assert_allclose(adjust_pvalues([0.6, 0.9], "holm"), [1.0, 1.0])
    assert adjust_pvalues([], "bh").shape == (0,)


def test_adjust_pvalues_rejects_bad_inputs():
    with pytest.raises(PolcaError, match="method must be one of"):
        adjust_pvalues([0.1], "bonferroni-ish")
    with pytest.raises(PolcaError, match=r"lie in \[0, 1\]"):
        adjust_pvalues([0.1, 1.5])
    with pytest.raises(PolcaError, match="1 axis"):
        adjust_pvalues(np.zeros((2, 2)))


# --- breakthrough_null ------------------------------------------------------------------------------------------------


def sigmoid_drops(steps, centre, num_members, seed=0):
    """float[T, n]: every member drops by 1 around ``centre`` (width 10 steps), plus small independent noise."""
    noise = 0.002 * np.random.default_rng(seed).normal(size=(steps.size, num_members))
    return (-1.0 / (1.0 + np.exp(-(steps - centre) / 10.0)))[:, None] + noise


def test_a_sharp_late_drop_in_every_member_is_hidden_and_significant():
    steps = np.arange(0, 2001, 20)
    late = breakthrough_null(sigmoid_drops(steps, 1800, 30), steps, 100, 1000, num_shuffles=199)
    assert late.observed_hidden and late.observed_mean_step > 1800
    assert late.pvalue < 0.1
    assert late.null_q05 < late.null_median < late.null_q95 < late.observed_mean_step
    assert 0.2 < late.null_hidden_rate < 0.8  # shuffled jumps land anywhere: often after τ, often before
    assert late.num_shuffles == 199

    early = breakthrough_null(sigmoid_drops(steps, 300, 30), steps, 100, 1000, num_shuffles=199)
    assert not early.observed_hidden and early.pvalue > 0.5


def naive_breakthrough(curve):
    """Eq. 9, sign "paper", on an even grid with Δ = one interval: the earliest argmax of f[i+1] − 2f[i] + f[i−1]."""
    scores = [curve[i + 1] - 2 * curve[i] + curve[i - 1] for i in range(1, len(curve) - 1)]
    return 1 + int(np.argmax(scores))


def test_null_hidden_rate_matches_enumerating_every_permutation():
    steps = np.arange(6) * 100.0  # candidates 100..400
    curves = np.cumsum(np.random.default_rng(5).normal(size=(6, 2)), axis=0)
    increments = np.diff(curves, axis=0)
    threshold = 250.0
    exact_means = []
    for order in itertools.permutations(range(5)):  # the same permutation for both members
        shuffled = np.vstack([curves[:1], curves[0] + np.cumsum(increments[list(order)], axis=0)])
        exact_means.append(np.mean([100.0 * naive_breakthrough(shuffled[:, j]) for j in range(2)]))
    exact_means = np.array(exact_means)
    exact_rate = np.mean(exact_means > threshold)

    result = breakthrough_null(curves, steps, 100, threshold, num_shuffles=4000, seed=1)
    observed = np.mean([100.0 * naive_breakthrough(curves[:, j]) for j in range(2)])
    assert result.observed_mean_step == observed
    sd = np.sqrt(exact_rate * (1 - exact_rate) / 4000)
    assert abs(result.null_hidden_rate - exact_rate) < 4 * sd + 1e-9
    exact_p = np.mean(exact_means >= observed)
    assert abs(result.pvalue - exact_p) < 4 * np.sqrt(exact_p * (1 - exact_p) / 4000) + 1e-3
    assert set(np.unique(result.null_mean_steps)) <= set(np.unique(exact_means))


def test_breakthrough_null_keeps_an_uneven_step_grid_and_is_seeded():
    steps = np.array([0, 10, 20, 50, 100, 200, 300, 500, 800, 1000], float)
    curves = sigmoid_drops(steps, 600, 4)
    first = breakthrough_null(curves, steps, 50, 400, num_shuffles=50, seed=7)
    second = breakthrough_null(curves, steps, 50, 400, num_shuffles=50, seed=7)
    np.testing.assert_array_equal(first.null_mean_steps, second.null_mean_steps)
    candidates = steps[(steps - 50 >= 0) & (steps + 50 <= 1000)]
    assert candidates.min() <= first.null_mean_steps.min() and first.null_mean_steps.max() <= candidates.max()


def test_breakthrough_null_rejects_bad_inputs():
    steps = np.arange(0, 1001, 100)
    curves = sigmoid_drops(steps, 500, 3)
    with pytest.raises(PolcaError, match=r"steps must have shape \(11,\)"):
        breakthrough_null(curves, steps[:-1], 100, 500)
    with pytest.raises(PolcaError, match="num_shuffles must be a positive integer"):
        breakthrough_null(curves, steps, 100, 500, num_shuffles=0)
    with pytest.raises(PolcaError, match="sign must be one of"):
        breakthrough_null(curves, steps, 100, 500, sign="up")
    with pytest.raises(PolcaError, match="trajectories must have 2 axes"):
        breakthrough_null(curves[:, 0], steps, 100, 500)
    with pytest.raises(PolcaError, match="at least 3 checkpoints"):
        breakthrough_null(curves[:2], steps[:2], 100, 500)


# --- ablation_pvalues (the causal check beyond its noise) ------------------------------------------------------------


def test_a_planted_causal_effect_beats_the_null_and_a_difference_of_1e_7_in_noise_does_not():
    rng = np.random.default_rng(3)
    labels = np.array([0] * 30 + [1] * 30 + [-1] * 140)
    noise = 0.01 * rng.standard_normal(labels.size)
    planted = noise + np.where(labels == 0, 0.05, 0.0)  # cluster 0 hurt by 5 noise widths
    test = ablation_pvalues(planted, clustering(labels), num_permutations=199, seed=0)
    effects = ablation_effects(planted, clustering(labels))
    np.testing.assert_allclose(test.difference, [e.difference for e in effects])
    assert test.pvalues[0] == pytest.approx(1 / 200) and test.pvalues[1] > 0.05
    tiny = noise + np.where(labels == 0, noise[labels != 0].mean() - noise[labels == 0].mean() + 1e-7, 0.0)
    test = ablation_pvalues(tiny, clustering(labels), num_permutations=199, seed=0)
    assert 0 < test.difference[0] < 1e-6 and test.pvalues[0] > 0.3  # positive, but inside its noise
    assert test.null_std[0] > 100 * test.difference[0]


def test_ablation_pvalues_permute_only_the_clustered_samples_and_are_seeded():
    labels = np.array([0] * 10 + [1] * 10 + [-1] * 20)
    increase = np.where(np.arange(40) < 10, 1.0, 0.0)
    increase[20:] = 5.0  # filtered out: never in the comparison
    kept = clustering(labels, np.arange(20))
    test = ablation_pvalues(increase, kept, num_permutations=99, seed=1)
    assert test.difference[0] == pytest.approx(1.0) and test.pvalues[0] == pytest.approx(1 / 100)
    again = ablation_pvalues(increase, kept, num_permutations=99, seed=1)
    np.testing.assert_array_equal(test.pvalues, again.pvalues)
    empty = ablation_pvalues(increase, clustering(np.full(40, -1)), num_permutations=9)
    assert empty.pvalues.shape == (0,)
    with pytest.raises(PolcaError, match="shape"):
        ablation_pvalues(increase[:5], kept)
    with pytest.raises(PolcaError, match="num_permutations"):
        ablation_pvalues(increase, kept, num_permutations=0)
