"""Alternatives to the paper's unsupervised step, and scores against a ground-truth partition (host code: numpy and
scikit-learn).

The paper clusters each basis direction separately with HDBSCAN on the raw projected-loss trajectories of the samples
that rely on it (:func:`polca_jax.analysis.cluster_directions`). Here are principled alternatives, each an option
that returns the same :class:`~polca_jax.analysis.Clustering` objects, so every score and null of the package applies
to them unchanged (:func:`strategy_clusterings` names them):

- ``paper``: the paper's step (the reference).
- ``unit``: the same, each trajectory divided by its norm (invariant to a sample's scale; ``normalize="unit"``).
- ``shape``: per kept direction, every sample (no per-sample filter), its trajectory divided by its norm and its
  sign flipped so that it ends at or below zero: invariant to a sample's scale *and* sign.
- ``profile``: one clustering across all directions jointly: a sample's feature is its *allocation profile*, the
  final projected loss along each of the K directions (how much of its loss change each direction carried),
  divided by its norm over the directions. Samples whose learning runs through different directions (different
  mechanisms) have different profiles whatever their overall scale.
- ``joint``: one clustering across all directions jointly of the whole trajectories, ``[N, T·K]`` per sample,
  divided by the sample's norm and reduced by PCA.

The joint features can go to HDBSCAN or to clusterers that need a cluster count, chosen without labels
(:func:`cluster_features`: k-means and Ward agglomerative by silhouette, a Gaussian mixture by BIC).

Ground-truth scores (for planted benchmarks): :func:`adjusted_rand` (scikit-learn's ARI over a clustering's
clustered, non-noise samples), :func:`ari_pvalue` (its label-permutation null) and :func:`group_recovery` (per
class, the best cluster's homogeneity, recall and F1, and whether any cluster recovers the class).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import warnings

import numpy as np
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.decomposition import PCA, FastICA
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score, silhouette_score
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

from polca_jax.analysis._arrays import checked_array, checked_directions
from polca_jax.analysis._clustering import (
    DEFAULT_MIN_SAMPLES_DIVISOR,
    Clustering,
    cluster_directions,
    cluster_trajectories,
    hdbscan_params,
)
from polca_jax.analysis._filters import kept_directions
from polca_jax.errors import PolcaError

STRATEGIES = ("paper", "unit", "shape", "profile", "joint")
ROTATIONS = ("none", "varimax", "ica")
Clusterer = Literal["hdbscan", "kmeans", "gmm", "agglomerative"]
CLUSTERERS = get_args(Clusterer)
_PER_DIRECTION = ("paper", "unit", "shape")


# --- features ------------------------------------------------------------------------------------------------------


def _unit_rows(features: np.ndarray) -> np.ndarray:
    """Each row of float[n, F] divided by its L2 norm; all-zero rows stay zero."""
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.where(norms > 0, norms, 1.0)


def shape_features(curves) -> np.ndarray:
    """Scale- and sign-invariant trajectories: curves float[n, T] -> float[n, T], each row of unit norm, ending <= 0.

    Each row is divided by its L2 norm and multiplied by −1 where its last value is positive (so every row ends at
    or below zero). Zero rows stay zero.

    Args:
      curves: float[n, T], one trajectory per sample.

    Returns:
      float[n, T], the normalised rows.

    Raises:
      PolcaError: for curves that are not a finite, non-empty float[n, T] array.

    Example:
      >>> analysis.shape_features(np.array([[1.0, 2.0, 2.0], [2.0, -1.0, -2.0]])).round(3).tolist()
      [[-0.333, -0.667, -0.667], [0.667, -0.333, -0.667]]
    """
    curves = checked_array(curves, "curves", 2)
    flip = np.where(curves[:, -1:] > 0, -1.0, 1.0)
    return _unit_rows(curves * flip)


def allocation_profiles(projected_loss, *, directions=None) -> np.ndarray:
    """Each sample's allocation profile: projected_loss float[T, N, K] -> float[N, K'], of unit norm per sample.

    The profile is the final projected loss (minus the first) along each of the K' = len(directions) directions,
    divided by its L2 norm over them (a zero profile stays zero). Scale-invariant; the sign of each entry (did the
    direction lower or raise the sample's loss) is kept.

    Args:
      projected_loss: float[T, N, K], the cumulative projected loss.
      directions: the K' directions to use (default all K).

    Returns:
      float[N, K'], one profile per sample.

    Raises:
      PolcaError: for a projected loss that is not a finite float[T, N, K] array, or directions that are empty or
        out of range.

    Example:
      ``projected_loss``: the setup of :class:`Clustering`'s example (direction 1 undoes half of direction 0; sample
      7's loss rises where the others' fall).

      >>> analysis.allocation_profiles(projected_loss)[[0, 7]].round(3).tolist()
      [[-0.894, 0.447], [0.894, -0.447]]
    """
    projected_loss = checked_array(projected_loss, "projected_loss", 3)
    final = projected_loss[-1] - projected_loss[0]  # [N, K]
    if directions is not None:
        final = final[:, _checked_directions(directions, projected_loss.shape[2])]
    return _unit_rows(final)


def gradient_norm_features(norms, *, max_components: int = 10, seed: int = 0) -> np.ndarray:
    """A label-free control that needs no POLCA: per-block gradient norms float[N, B] -> features float[N, C].

    Each row of the norms of a sample's gradient over B parameter blocks (:func:`polca_jax.per_sample_gradient_norms`)
    is taken as shares of its sum (where the sample's gradient lies, whatever its size), then reduced to its first
    C = min(max_components, N, B) principal components. Samples that use different parameters separate here
    without any training dynamics; a POLCA finding should do better than clusters of these rows.

    Args:
      norms: float[N, B], non-negative.
      max_components: the most principal components kept.
      seed: PCA's ``random_state``.

    Returns:
      float[N, C], the features (cluster them with :func:`cluster_features`).

    Raises:
      PolcaError: for norms that are not a finite float[N, B] array or are negative.

    Example:
      Samples 0 and 1 use the first block only, at different scales; sample 2 the second.

      >>> features = analysis.gradient_norm_features(np.array([[2.0, 0.0], [4.0, 0.0], [0.0, 1.0]]))
      >>> features.shape, bool(np.allclose(features[0], features[1]))
      ((3, 2), True)
    """
    norms = checked_array(norms, "norms", 2)
    if np.any(norms < 0):
        raise PolcaError("norms must be >= 0 (gradient norms per block)")
    totals = norms.sum(axis=1, keepdims=True)
    shares = norms / np.where(totals > 0, totals, 1.0)
    components = max(1, min(max_components, *shares.shape))
    return PCA(n_components=components, random_state=seed).fit_transform(shares)


def joint_features(projected_loss, *, directions=None, max_components: int = 10, seed: int = 0) -> np.ndarray:
    """Whole trajectories over all directions at once: projected_loss float[T, N, K] -> features float[N, C].

    Each sample's [T·K'] trajectories are divided by their norm, then reduced to the first
    C = min(max_components, N, T·K') principal components.

    Args:
      projected_loss: float[T, N, K], the cumulative projected loss.
      directions: the K' directions to use (default all K).
      max_components: the most principal components kept.
      seed: PCA's ``random_state``.

    Returns:
      float[N, C], the features (cluster them with :func:`cluster_features`).

    Raises:
      PolcaError: for a projected loss that is not a finite float[T, N, K] array, or directions that are empty or
        out of range.

    Example:
      ``projected_loss``: the setup of :class:`Clustering`'s example (samples 0 and 1 differ only in scale).

      >>> features = analysis.joint_features(projected_loss, max_components=2)
      >>> features.shape, bool(np.allclose(features[0], features[1])), bool(np.allclose(features[0], features[3]))
      ((8, 2), True, False)
    """
    projected_loss = checked_array(projected_loss, "projected_loss", 3)
    if directions is not None:
        projected_loss = projected_loss[:, :, _checked_directions(directions, projected_loss.shape[2])]
    _, n, _ = projected_loss.shape
    flat = _unit_rows(projected_loss.transpose(1, 0, 2).reshape(n, -1))
    components = max(1, min(max_components, n, flat.shape[1]))
    return PCA(n_components=components, random_state=seed).fit_transform(flat)


def subspace_features(projections, *, max_components: int = 10, seed: int = 0) -> np.ndarray:
    """Which directions each sample's gradient moves in: projections float[T, N, K] -> features float[N, C].

    Each sample's second-moment matrix ``M = Σ_t g_t g_tᵀ / Σ_t ‖g_t‖²`` of its coordinates g_t [K] over the T
    checkpoints (trace 1), its upper triangle (off-diagonal entries times √2, so that distances are Frobenius
    distances), reduced to the first C = min(max_components, N, K(K+1)/2) principal components. M keeps which
    directions move and which move together, with which relative sign; it drops the scale, the order in time and the
    sign of each g_t: samples of one mechanism whose gradients flip sign with their residuals share it, and so do
    samples whose coordinates agree up to a sign per checkpoint. (Trajectory features, :func:`joint_features`, keep
    the signs and split such a group into parts.)

    Args:
      projections: float[T, N, K], each sample's coordinate along each of K directions at T checkpoints (projected
        gradients or their increments).
      max_components: the most principal components kept.
      seed: PCA's ``random_state``.

    Returns:
      float[N, C], the features (cluster them with :func:`cluster_features`).

    Raises:
      PolcaError: for projections that are not a finite float[T, N, K] array.

    Example:
      Samples 0 and 1 move along direction 0 with opposite signs, sample 2 along directions 0 and 1 together:

      >>> import numpy as np
      >>> from polca_jax import analysis
      >>> g = np.array([[[1.0, 0.0], [-2.0, 0.0], [1.0, 1.0], [0.0, 1.0]],
      ...               [[0.5, 0.0], [-1.0, 0.0], [2.0, 2.0], [0.0, -3.0]]])  # [T=2, N=4, K=2]
      >>> features = analysis.subspace_features(g)
      >>> features.shape, bool(np.allclose(features[0], features[1])), bool(np.allclose(features[0], features[2]))
      ((4, 3), True, False)
    """
    projections = checked_array(projections, "projections", 3)
    _, n, k = projections.shape
    moments = np.einsum("tnk,tnl->nkl", projections, projections)
    moments /= np.maximum(np.trace(moments, axis1=1, axis2=2), np.finfo(np.float64).tiny)[:, None, None]
    rows, columns = np.triu_indices(k)
    flat = moments[:, rows, columns] * np.where(rows == columns, 1.0, np.sqrt(2.0))
    components = max(1, min(max_components, n, flat.shape[1]))
    return PCA(n_components=components, random_state=seed).fit_transform(flat)


def rotate_within_span(projections, method: str, *, seed: int = 0) -> np.ndarray:
    """New directions within the span of a basis: projections float[T, N, K] -> float[T, N, K] along K new ones.

    Fit on every sample's trajectory ``[T, K]`` divided by its norm (each sample weighs the same), as rows
    ``[T·N, K]``, then applied to ``projections``:

    - ``none``: unchanged.
    - ``varimax``: the orthogonal rotation R maximising Kaiser's varimax criterion (the variance of the squared
      coordinates within each new direction, summed): each sample's trajectory then lies along few directions.
      The new basis is ``B @ R``; distances between samples are unchanged, so only per-direction features change.
    - ``ica``: scikit-learn's FastICA (unit-variance whitening, K components): directions along which the samples'
      coordinates are statistically independent. Not orthogonal in the old coordinates: it rescales, so joint
      features change too.

    Args:
      projections: float[T, N, K], each sample's coordinate along each of K directions at T checkpoints (projected
        gradients, their increments, or projected losses).
      method: one of :data:`ROTATIONS`.
      seed: FastICA's ``random_state``.

    Returns:
      float[T, N, K], the coordinates along the new directions.

    Raises:
      PolcaError: for projections that are not a finite float[T, N, K] array or an unknown method.

    Example:
      Two sources mixed by a 30° rotation: varimax finds the axes again (up to order and sign).

      >>> import numpy as np
      >>> from polca_jax import analysis
      >>> rng = np.random.default_rng(0)
      >>> sources = rng.laplace(size=(1, 400, 2)) * (rng.random((1, 400, 2)) < 0.3)  # sparse, independent
      >>> angle = np.pi / 6
      >>> mixed = sources @ np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
      >>> found = analysis.rotate_within_span(mixed, "varimax")
      >>> correlation = np.abs(np.corrcoef(found[0].T, sources[0].T)[:2, 2:])
      >>> bool(correlation.max(axis=1).min() > 0.99)
      True
    """
    projections = checked_array(projections, "projections", 3)
    if method not in ROTATIONS:
        raise PolcaError(f"rotation must be one of {ROTATIONS}, got {method!r}")
    _, n, k = projections.shape
    if method == "none" or k < 2:
        return projections
    rows = _unit_rows(projections.transpose(1, 0, 2).reshape(n, -1)).reshape(-1, k)  # [N·T, K]
    if method == "varimax":
        return projections @ _varimax(rows)
    ica = FastICA(n_components=k, whiten="unit-variance", max_iter=1000, random_state=seed)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # a rotation that has not converged is still one
        ica.fit(rows)
    return (projections - ica.mean_) @ ica.components_.T


def _varimax(rows: np.ndarray, iterations: int = 500, tolerance: float = 1e-10) -> np.ndarray:
    """The orthogonal R float[K, K] maximising Kaiser's varimax criterion of ``rows @ R`` (the SVD iteration)."""
    m, k = rows.shape
    rotation, objective = np.eye(k), 0.0
    for _ in range(iterations):
        rotated = rows @ rotation
        target = rotated ** 3 - rotated * (rotated ** 2).sum(axis=0) / m
        u, singular, vt = np.linalg.svd(rows.T @ target)
        rotation = u @ vt
        if singular.sum() <= objective * (1 + tolerance):
            break
        objective = singular.sum()
    return rotation


def _checked_directions(directions, num_directions: int) -> np.ndarray:
    directions = checked_directions(directions, num_directions)
    if directions.size == 0:
        raise PolcaError("no directions to build features from (the selection is empty)")
    return directions


# --- clusterers ------------------------------------------------------------------------------------------------------


def cluster_features(
    features,
    *,
    method: Clusterer = "hdbscan",
    min_cluster_size: int,
    min_samples_divisor: float = DEFAULT_MIN_SAMPLES_DIVISOR,
    max_clusters: int = 8,
    seed: int = 0,
    sample_indices=None,
    num_samples: int | None = None,
    direction: int | None = None,
) -> Clustering:
    """Cluster feature rows float[n, F] with ``method``, without labels -> a :class:`Clustering`.

    The clustering covers ``num_samples`` samples (default n), in which row i is sample ``sample_indices[i]``
    (default i); the others get -1.

    Args:
      features: float[n, F], one row per clustered sample.
      method: one of :data:`CLUSTERERS`: ``hdbscan`` (the package's HDBSCAN, min_samples = n / min_samples_divisor
        as the paper's); ``kmeans`` and ``agglomerative`` (Ward) with the cluster count in [2, max_clusters] of
        highest silhouette; ``gmm`` (full-covariance Gaussian mixture) with the count in [1, max_clusters] of lowest
        BIC. The count-based methods have no noise label; a cluster smaller than ``min_cluster_size`` is marked
        noise (-1) for every method, so all report clusters of the same minimum size.
      min_cluster_size, min_samples_divisor: as in :func:`hdbscan_params` (no reference scaling).
      max_clusters: the largest cluster count the count-based methods try (>= 2).
      seed: ``random_state`` of k-means, the Gaussian mixture and the silhouette.
      sample_indices: int[n], the sample of each row (default ``arange(n)``).
      num_samples: N, the samples the labels cover (default n).
      direction: stored as the clustering's ``direction``.

    Returns:
      A :class:`Clustering` (its ``normalize`` field holds the method's name for the count-based methods).

    Raises:
      PolcaError: for features that are not a finite float[n, F] array, an unknown method, ``max_clusters`` that
        is not an integer >= 2, sample indices that do not match the rows or lie outside [0, N), or settings
        :func:`hdbscan_params` refuses.

    Example:
      ``projected_loss``: the setup of :class:`Clustering`'s example; k-means on samples 0–5 along direction 0.

      >>> found = analysis.cluster_features(projected_loss[:, :6, 0].T, method="kmeans", min_cluster_size=2)
      >>> found.labels.tolist(), found.num_clusters
      ([0, 0, 0, 1, 1, 1], 2)
    """
    features = checked_array(features, "features", 2)
    if method not in CLUSTERERS:
        raise PolcaError(f"method must be one of {CLUSTERERS}, got {method!r}")
    if isinstance(max_clusters, bool) or not isinstance(max_clusters, int) or max_clusters < 2:
        raise PolcaError(f"max_clusters must be an integer >= 2, got {max_clusters!r}")
    n = features.shape[0]
    sample_indices = np.arange(n) if sample_indices is None else np.asarray(sample_indices, dtype=np.int64)
    num_samples = n if num_samples is None else int(num_samples)
    if sample_indices.shape != (n,) or (n and (sample_indices.min() < 0 or sample_indices.max() >= num_samples)):
        raise PolcaError(f"sample_indices must be {n} indices in [0, {num_samples}), one per feature row")
    labels = np.full(num_samples, -1, dtype=np.int64)
    size, min_samples = hdbscan_params(n, min_cluster_size=min_cluster_size, min_samples_divisor=min_samples_divisor)
    if method == "hdbscan":
        found = cluster_trajectories(features, min_cluster_size=size, min_samples=min_samples)
    else:
        found = _count_based(features, method, max_clusters, seed)
    labels[sample_indices] = _drop_small(found, size)
    return Clustering(labels, direction, sample_indices, size, min_samples if method == "hdbscan" else None,
                      metric="euclidean", normalize=None if method == "hdbscan" else method)


def _count_based(features: np.ndarray, method: str, max_clusters: int, seed: int) -> np.ndarray:
    """Labels int[n] of k-means / Ward (k by silhouette, 2..max) or a Gaussian mixture (k by BIC, 1..max)."""
    n = features.shape[0]
    counts = range(1 if method == "gmm" else 2, min(max_clusters, n - 1) + 1)
    if features.shape[0] < 3 or np.allclose(features, features[0]):
        return np.zeros(n, dtype=np.int64)
    # one BLAS/OpenMP thread: on these small problems threads only contend (50x slower measured on a busy 2-core CPU)
    with threadpool_limits(1):
        return _best_count(features, method, counts, seed)


def _best_count(features: np.ndarray, method: str, counts: range, seed: int) -> np.ndarray:
    best, best_labels = None, np.zeros(features.shape[0], dtype=np.int64)
    for k in counts:
        if method == "gmm":
            model = GaussianMixture(k, covariance_type="full", reg_covar=1e-6, random_state=seed).fit(features)
            score, labels = -model.bic(features), model.predict(features)
        else:
            model = (KMeans(k, n_init=10, random_state=seed) if method == "kmeans"
                     else AgglomerativeClustering(k, linkage="ward"))
            labels = model.fit_predict(features)
            if np.unique(labels).size < 2:
                continue
            score = silhouette_score(features, labels, random_state=seed)
        if best is None or score > best:
            best, best_labels = score, labels
    return np.asarray(best_labels, dtype=np.int64)


def _drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Clusters smaller than min_size become noise; the others are renumbered 0.. in order of first appearance."""
    out = np.full(labels.shape, -1, dtype=np.int64)
    next_id = 0
    _, first = np.unique(labels, return_index=True)
    for cluster in labels[np.sort(first)]:
        members = labels == cluster
        if cluster >= 0 and np.count_nonzero(members) >= min_size:
            out[members] = next_id
            next_id += 1
    return out


# --- strategies ------------------------------------------------------------------------------------------------------


def strategy_clusterings(
    projected_loss,
    strategy: str,
    *,
    clusterer: Clusterer = "hdbscan",
    min_cluster_size: int,
    min_samples_divisor: float = DEFAULT_MIN_SAMPLES_DIVISOR,
    directions=None,
    max_clusters: int = 8,
    seed: int = 0,
) -> list[Clustering]:
    """The clusterings one unsupervised strategy (see the module docstring) makes of projected_loss float[T, N, K].

    Args:
      projected_loss: float[T, N, K], the cumulative projected loss.
      strategy: one of :data:`STRATEGIES`: ``paper``, ``unit``, ``shape`` (one clustering per direction),
        ``profile``, ``joint`` (one clustering of all directions jointly).
      clusterer: for ``profile`` and ``joint`` (and ``shape``), the method of :func:`cluster_features`; ``paper`` and
        ``unit`` are the paper's HDBSCAN (only ``"hdbscan"`` is accepted for them).
      min_cluster_size: used as given (no scaling by a reference sample count).
      min_samples_divisor: as in :func:`hdbscan_params`.
      directions: the directions to use; None: those kept by the oscillation filter for the per-direction strategies
        (as the paper) and all K for ``profile`` and ``joint`` (a sample's whole allocation; a direction the filter
        drops still carries part of it).
      max_clusters, seed: as in :func:`cluster_features`.

    Returns:
      A list of :class:`Clustering`: one per direction (``paper``, ``unit``, ``shape``) or one (``profile``,
      ``joint``).

    Raises:
      PolcaError: for an unknown strategy or clusterer, a clusterer other than ``"hdbscan"`` for ``paper`` or
        ``unit``, and the inputs the functions it calls refuse.

    Example:
      ``projected_loss``: the setup of :class:`Clustering`'s example. ``shape`` clusters every sample, scale and
      sign removed: sample 7, rising linearly, joins sample 6, falling linearly.

      >>> [c.labels.tolist() for c in analysis.strategy_clusterings(projected_loss, "paper", min_cluster_size=3)]
      [[0, 0, 0, 1, 1, 1, 0, -1]]
      >>> [c.labels.tolist() for c in analysis.strategy_clusterings(projected_loss, "shape", min_cluster_size=3)]
      [[0, 0, 0, 1, 1, 1, 0, 0]]
    """
    projected_loss = checked_array(projected_loss, "projected_loss", 3)
    if strategy not in STRATEGIES:
        raise PolcaError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if clusterer not in CLUSTERERS:
        raise PolcaError(f"clusterer must be one of {CLUSTERERS}, got {clusterer!r}")
    if strategy in ("paper", "unit") and clusterer != "hdbscan":
        raise PolcaError(f"strategy {strategy!r} is the paper's per-direction HDBSCAN; use strategy 'shape', "
                         "'profile' or 'joint' for other clusterers")
    _, num_samples, num_directions = projected_loss.shape
    if strategy in ("paper", "unit"):
        return cluster_directions(projected_loss, directions=directions, min_cluster_size=min_cluster_size,
                                  min_samples_divisor=min_samples_divisor, reference_num_samples=None,
                                  normalize=None if strategy == "paper" else "unit")
    options = dict(method=clusterer, min_cluster_size=min_cluster_size, min_samples_divisor=min_samples_divisor,
                   max_clusters=max_clusters, seed=seed)
    if strategy == "shape":
        if directions is None:
            directions = np.flatnonzero(kept_directions(projected_loss))
        return [cluster_features(shape_features(projected_loss[:, :, k].T), direction=int(k), **options)
                for k in _checked_directions(directions, num_directions)] if len(directions) else []
    if strategy == "profile":
        features = allocation_profiles(projected_loss, directions=directions)
    else:
        features = joint_features(projected_loss, directions=directions, seed=seed)
    return [cluster_features(features, **options)]


# --- ground-truth scores ---------------------------------------------------------------------------------------------


def adjusted_rand(clustering: Clustering, labels) -> float:
    """scikit-learn's adjusted Rand index between the clustering and true labels [N], over its clustered samples.

    The clustered samples are those the clustering put in a cluster (``labels >= 0``: kept by its filter and not
    HDBSCAN noise).

    Args:
      clustering: the :class:`Clustering`.
      labels: [N], the true class of each sample.

    Returns:
      The index (1 for a perfect match, about 0 for chance); NaN when fewer than 2 samples are clustered or they
      hold a single true class (the index is then 1 for any single cluster: no evidence).

    Raises:
      PolcaError: for labels that are not ``[N]``.

    Example:
      ``clustering``, ``labels``: the setup of :class:`Clustering`'s example (clusters 0 0 0 | 1 1 1 against
      a a a | b b a).

      >>> round(analysis.adjusted_rand(clustering, labels), 3)
      0.324
    """
    labels = _checked_truth(labels, clustering.num_samples)
    clustered = clustering.labels >= 0
    if np.count_nonzero(clustered) < 2 or np.unique(labels[clustered]).size < 2:
        return float("nan")
    return float(adjusted_rand_score(labels[clustered], clustering.labels[clustered]))


def _ari_of_codes(truth: np.ndarray, found: np.ndarray, num_found: int) -> np.ndarray:
    """The adjusted Rand index of codes truth int[B, n] (B labelings) against found int[n] -> float[B]; the
    formula of Hubert & Arabie (1985), as scikit-learn computes it, vectorised over B (one bincount)."""
    rows, n = truth.shape
    num_truth = int(truth.max()) + 1
    cells = num_truth * num_found
    table = np.bincount((truth * num_found + found + cells * np.arange(rows)[:, None]).ravel(),
                        minlength=rows * cells).reshape(rows, num_truth, num_found).astype(float)

    def pairs(x):
        return (x * (x - 1) / 2).sum(axis=-1)

    index = pairs(table.reshape(rows, -1))
    a, b = pairs(table.sum(axis=2)), pairs(table.sum(axis=1))
    expected = a * b / (n * (n - 1) / 2)
    maximum = (a + b) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(maximum == expected, 1.0, (index - expected) / (maximum - expected))


def ari_pvalue(clustering: Clustering, labels, *, num_permutations: int = 1000, seed: int | None = 0) -> float:
    """Permutation p-value of :func:`adjusted_rand`: (1 + #{null ARI ≥ observed}) / (1 + B).

    The null permutes the true labels among the clustered samples with the clusters fixed.

    Args:
      clustering, labels: as in :func:`adjusted_rand`.
      num_permutations: B.
      seed: for ``numpy.random.default_rng``.

    Returns:
      The p-value; NaN where the ARI is NaN.

    Raises:
      PolcaError: for ``num_permutations`` that is not a positive integer, or labels that are not ``[N]``.

    Example:
      ``clustering``, ``labels``: the setup of :class:`Clustering`'s example (6 clustered samples: weak evidence).

      >>> round(analysis.ari_pvalue(clustering, labels, num_permutations=200), 3)
      0.463
    """
    if isinstance(num_permutations, bool) or not isinstance(num_permutations, int | np.integer) or num_permutations < 1:
        raise PolcaError(f"num_permutations must be a positive integer, got {num_permutations!r}")
    if np.isnan(adjusted_rand(clustering, labels)):
        return float("nan")
    clustered = clustering.labels >= 0
    _, truth = np.unique(np.asarray(labels)[clustered], return_inverse=True)
    _, found = np.unique(clustering.labels[clustered], return_inverse=True)
    truth, found = truth.reshape(-1), found.reshape(-1)
    observed = _ari_of_codes(truth[None], found, int(found.max()) + 1)[0]  # same arithmetic as the null: ties count
    shuffled = np.random.default_rng(seed).permuted(np.broadcast_to(truth, (num_permutations, truth.size)), axis=1)
    null = _ari_of_codes(shuffled, found, int(found.max()) + 1)
    return float((1 + np.count_nonzero(null >= observed - 1e-12)) / (1 + num_permutations))


@dataclass(frozen=True)
class GroupRecovery:
    """How well one true class is recovered by the best of a strategy's clusters (see :func:`group_recovery`).

    Attributes:
      label: the class.
      size: its number of samples.
      best: (direction, cluster) of the cluster with the highest F1 for the class (recall over all members of the
        class), or None when no cluster holds any member.
      homogeneity, recall, f1: that cluster's; recall = its members of the class / all ``size`` members of the class
        (the paper's recall divides by the class members its clustering clustered: ``recall_clustered``).
      recall_clustered: that cluster's members of the class / the members of the class its clustering clustered.
      recovered: whether *some* cluster reaches homogeneity ≥ min_homogeneity at recall ≥ min_recall (recall over all
        members of the class).
    """

    label: object
    size: int
    best: tuple | None
    homogeneity: float
    recall: float
    recall_clustered: float
    f1: float
    recovered: bool


def group_recovery(clusterings: list[Clustering], labels, *, min_homogeneity: float = 0.9,
                   min_recall: float = 0.5) -> list[GroupRecovery]:
    """One :class:`GroupRecovery` per class of labels [N] (in sorted class order), over all clusters of ``clusterings``.

    Args:
      clusterings: :class:`Clustering` of the same N samples (e.g. those of one strategy).
      labels: [N], the true class of each sample.
      min_homogeneity, min_recall: what a cluster must reach, both in (0, 1], for the class to count as recovered.

    Returns:
      A list of :class:`GroupRecovery`, one per class.

    Raises:
      PolcaError: for thresholds outside (0, 1], clusterings of different sample counts, or labels that are not
        ``[N]``.

    Example:
      ``clustering``, ``labels``: the setup of :class:`Clustering`'s example.

      >>> [(g.label, g.size, g.best, round(g.homogeneity, 3), g.recall, g.recovered)
      ...  for g in analysis.group_recovery([clustering], labels)]
      [('a', 4, (0, 0), 1.0, 0.75, True), ('b', 4, (0, 1), 0.667, 0.5, False)]
    """
    if not (0 < min_homogeneity <= 1 and 0 < min_recall <= 1):
        raise PolcaError(f"min_homogeneity and min_recall must lie in (0, 1], got {min_homogeneity}, {min_recall}")
    num_samples = {c.num_samples for c in clusterings}
    if len(num_samples) > 1:
        raise PolcaError(f"clusterings cover different sample counts: {sorted(num_samples)}")
    labels = _checked_truth(labels, num_samples.pop() if num_samples else np.asarray(labels).shape[0])
    records = []
    for label in np.unique(labels):
        of_class = labels == label
        size = int(np.count_nonzero(of_class))
        best, best_f1, best_scores, recovered = None, -1.0, (0.0, 0.0, 0.0), False
        for clustering in clusterings:
            clustered_of_class = np.count_nonzero(of_class & (clustering.labels >= 0))
            for cluster in range(clustering.num_clusters):
                in_cluster = clustering.labels == cluster
                count = np.count_nonzero(of_class & in_cluster)
                if not count:
                    continue
                homogeneity, recall = count / np.count_nonzero(in_cluster), count / size
                f1 = 2 * homogeneity * recall / (homogeneity + recall)
                recovered |= homogeneity >= min_homogeneity and recall >= min_recall
                if f1 > best_f1:
                    best, best_f1 = (clustering.direction, cluster), f1
                    best_scores = (homogeneity, recall, count / clustered_of_class)
        records.append(GroupRecovery(_plain(label), size, best, float(best_scores[0]), float(best_scores[1]),
                                     float(best_scores[2]), float(max(best_f1, 0.0)), bool(recovered)))
    return records


def _checked_truth(labels, num_samples: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != num_samples:
        raise PolcaError(f"labels must have shape ({num_samples},), one class per sample, got {labels.shape}")
    return labels


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value
