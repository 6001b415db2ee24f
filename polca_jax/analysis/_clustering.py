"""HDBSCAN clustering of per-sample trajectories (§4.1/§5.1 of the paper).

POLCA clusters each kept basis direction separately, on the samples that rely on it; the baselines cluster one signal
per sample (exact loss, change in exact loss). Either way the result is a :class:`Clustering` whose labels cover all N
samples, with -1 for HDBSCAN noise and for samples that were filtered out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from sklearn.cluster import HDBSCAN

from polca_jax.analysis._arrays import checked_array, checked_directions
from polca_jax.analysis._filters import kept_directions, relying_samples
from polca_jax.errors import PolcaError
from polca_jax.files import load_npz, save_npz_atomic

DEFAULT_MIN_SAMPLES_DIVISOR = 15  # the paper's min_samples = number of tokens / 15, in both of its experiments
Normalization = Literal["unit", "standardize"]
NORMALIZATIONS = (None, *get_args(Normalization))


@dataclass(frozen=True, eq=False)
class Clustering:
    """One HDBSCAN clustering of N samples.

    Attributes:
      labels: int[N], cluster ids 0..num_clusters-1; -1 for HDBSCAN noise and for samples not clustered.
      direction: the basis direction k whose projected loss was clustered, or None for a per-sample signal
        (baselines).
      sample_indices: int[n], the samples (indices into N) that were clustered, i.e. those left after filtering.
      min_cluster_size, min_samples: the HDBSCAN settings used; None when fewer than 2 samples were left to cluster.
      metric, normalize: the distance and trajectory normalisation used (see :func:`cluster_trajectories`; a
        clustering of :func:`cluster_features` by another method than HDBSCAN stores that method's name here).

    Example:
      The setup the other examples of :mod:`polca_jax.analysis` use: ``steps``, ``projected_loss`` ``[T, N, K]``
      (samples 0–2 learn early along direction 0, samples 3–5 late; direction 1 undoes half of direction 0),
      ``labels`` (a class per sample) and ``clustering`` (of direction 0, written out: sample 6 is noise, sample 7
      filtered out).

      >>> import numpy as np
      >>> from polca_jax import analysis
      >>> steps = np.arange(0, 700, 100)                              # T = 7 checkpoints
      >>> early = np.maximum(-steps / 200, -1)                        # a drop over steps 0–200
      >>> late = np.clip((300 - steps) / 200, -1, 0)                  # a drop over steps 300–500
      >>> curves = np.stack([early, 1.2 * early, 0.8 * early, late, 1.2 * late, 0.8 * late, -steps / 600,
      ...                    steps / 600], axis=1)                    # [T, N = 8]
      >>> projected_loss = np.stack([curves, -0.5 * curves], axis=-1)  # [T, N, K = 2]
      >>> labels = np.array(["a", "a", "a", "b", "b", "a", "b", "b"])
      >>> clustering = analysis.Clustering(
      ...     labels=np.array([0, 0, 0, 1, 1, 1, -1, -1]), direction=0, sample_indices=np.arange(7),
      ...     min_cluster_size=3, min_samples=2, metric="euclidean", normalize=None)
      >>> clustering.num_samples, clustering.num_clusters, clustering.members(1).tolist()
      (8, 2, [3, 4, 5])
    """

    labels: np.ndarray
    direction: int | None
    sample_indices: np.ndarray
    min_cluster_size: int | None
    min_samples: int | None
    metric: str
    normalize: Normalization | None

    @property
    def num_samples(self) -> int:
        """N, the number of samples the labels cover."""
        return int(self.labels.shape[0])

    @property
    def num_clusters(self) -> int:
        """Number of clusters (noise excluded)."""
        return int(self.labels.max()) + 1 if self.labels.size else 0

    def members(self, cluster: int) -> np.ndarray:
        """int[m]: indices into N of the samples in ``cluster``; :class:`polca_jax.PolcaError` for no such cluster."""
        if not 0 <= cluster < self.num_clusters:
            raise PolcaError(f"cluster {cluster} out of range: this clustering has {self.num_clusters} clusters")
        return np.flatnonzero(self.labels == cluster)


def hdbscan_params(
    num_samples: int,
    *,
    min_cluster_size: int,
    min_samples_divisor: float = DEFAULT_MIN_SAMPLES_DIVISOR,
    reference_num_samples: int | None = None,
    dataset_size: int | None = None,
) -> tuple[int, int]:
    """The paper's HDBSCAN settings for clustering ``num_samples`` trajectories -> (min_cluster_size, min_samples).

    - min_samples = floor(num_samples / min_samples_divisor): "number of tokens / 15", where we take the number of
      tokens to be the count actually clustered, i.e. after the per-direction filter (the paper does not say).
    - min_cluster_size is used as given (150 arithmetic, 300 English), unless ``reference_num_samples`` is set: then it
      is scaled by ``dataset_size / reference_num_samples`` (rounded), as the paper tuned 150 on 5000 tokens and
      scaled it for English.
    - Both are clipped to [2, num_samples] (HDBSCAN's limits).

    Args:
      num_samples: how many trajectories are clustered (at least 2).
      min_cluster_size: HDBSCAN's smallest cluster, as tuned (for ``reference_num_samples`` samples when given).
      min_samples_divisor: min_samples = num_samples / this (default :data:`DEFAULT_MIN_SAMPLES_DIVISOR`, 15).
      reference_num_samples: optional sample count ``min_cluster_size`` was tuned on; it is then scaled.
      dataset_size: the size of the whole sample set, before filtering (default ``num_samples``).

    Returns:
      ``(min_cluster_size, min_samples)``, ints in [2, num_samples].

    Raises:
      PolcaError: for fewer than 2 samples, ``min_cluster_size < 1``, ``min_samples_divisor <= 0`` or
        ``reference_num_samples < 1``.

    Example:
      >>> analysis.hdbscan_params(5000, min_cluster_size=150)
      (150, 333)
      >>> analysis.hdbscan_params(2000, min_cluster_size=150, reference_num_samples=5000, dataset_size=10000)
      (300, 133)
    """
    if num_samples < 2:
        raise PolcaError(f"HDBSCAN needs at least 2 samples, got {num_samples}")
    if min_cluster_size < 1 or min_samples_divisor <= 0:
        raise PolcaError(
            f"min_cluster_size must be >= 1 and min_samples_divisor > 0, got {min_cluster_size}, {min_samples_divisor}"
        )
    if reference_num_samples is not None:
        if reference_num_samples < 1:
            raise PolcaError(f"reference_num_samples must be >= 1, got {reference_num_samples}")
        scale = (num_samples if dataset_size is None else dataset_size) / reference_num_samples
        min_cluster_size = round(min_cluster_size * scale)
    min_samples = int(num_samples // min_samples_divisor)
    return int(np.clip(min_cluster_size, 2, num_samples)), int(np.clip(min_samples, 2, num_samples))


def _normalized(trajectories: np.ndarray, normalize: Normalization | None) -> np.ndarray:
    """[n, T] trajectories normalised as :func:`cluster_trajectories` describes; zero norms / spreads are left as is."""
    if normalize is None:
        return trajectories
    if normalize == "unit":
        norms = np.linalg.norm(trajectories, axis=1, keepdims=True)
        return trajectories / np.where(norms > 0, norms, 1.0)
    if normalize == "standardize":
        spread = trajectories.std(axis=0)
        return (trajectories - trajectories.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    raise PolcaError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")


def cluster_trajectories(
    trajectories,
    *,
    min_cluster_size: int,
    min_samples: int,
    metric: str = "euclidean",
    normalize: Normalization | None = None,
) -> np.ndarray:
    """HDBSCAN (scikit-learn, deterministic) on trajectories float[n, T] -> labels int[n], -1 for noise.

    Args:
      trajectories: float[n, T], one trajectory per sample.
      min_cluster_size: HDBSCAN's smallest cluster, in [2, n].
      min_samples: HDBSCAN's neighbourhood size, in [1, n] (see :func:`hdbscan_params`).
      metric: the distance, any scikit-learn metric name.
      normalize: one of :data:`NORMALIZATIONS`: None (the paper: raw trajectories), "unit" (each trajectory divided
        by its L2 norm, so only the shape counts) or "standardize" (z-score each time step across samples).

    Returns:
      int[n] cluster ids 0, 1, ...; -1 for noise.

    Raises:
      PolcaError: for trajectories that are not a finite, non-empty float[n, T] array, an unknown ``normalize``, or
        settings out of range.

    Example:
      ``projected_loss``: the setup of :class:`Clustering`'s example (samples 0–6 along direction 0).

      >>> analysis.cluster_trajectories(projected_loss[:, :7, 0].T, min_cluster_size=3, min_samples=2).tolist()
      [0, 0, 0, 1, 1, 1, 0]
    """
    trajectories = checked_array(trajectories, "trajectories", 2)
    if normalize not in NORMALIZATIONS:
        raise PolcaError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    num_samples = trajectories.shape[0]
    if not (2 <= min_cluster_size <= num_samples and 1 <= min_samples <= num_samples):
        raise PolcaError(
            f"need 2 <= min_cluster_size <= n and 1 <= min_samples <= n for n={num_samples} trajectories, "
            f"got min_cluster_size={min_cluster_size}, min_samples={min_samples}"
        )
    model = HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples, metric=metric, copy=True)
    labels = model.fit_predict(_normalized(trajectories, normalize))
    return np.where(labels < 0, -1, labels).astype(np.int64)


def _cluster_samples(
    trajectories: np.ndarray,
    sample_indices: np.ndarray,
    direction: int | None,
    *,
    min_cluster_size: int,
    min_samples_divisor: float = DEFAULT_MIN_SAMPLES_DIVISOR,
    reference_num_samples: int | None = None,
    metric: str = "euclidean",
    normalize: Normalization | None = None,
) -> Clustering:
    """Cluster rows ``sample_indices`` of trajectories float[N, T]; labels mapped back to all N (-1 elsewhere)."""
    if normalize not in NORMALIZATIONS:
        raise PolcaError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    labels = np.full(trajectories.shape[0], -1, dtype=np.int64)
    params = (None, None)
    if sample_indices.size >= 2:
        params = hdbscan_params(
            sample_indices.size,
            min_cluster_size=min_cluster_size,
            min_samples_divisor=min_samples_divisor,
            reference_num_samples=reference_num_samples,
            dataset_size=trajectories.shape[0],
        )
        labels[sample_indices] = cluster_trajectories(
            trajectories[sample_indices],
            min_cluster_size=params[0],
            min_samples=params[1],
            metric=metric,
            normalize=normalize,
        )
    return Clustering(labels, direction, sample_indices, *params, metric=metric, normalize=normalize)


def cluster_directions(projected_loss, *, directions=None, filter_samples: bool = True, **options) -> list[Clustering]:
    """One clustering per basis direction of projected_loss float[T, N, K] (the POLCA pipeline).

    Args:
      projected_loss: float[T, N, K], the cumulative projected loss (``POLCAResult.projected_loss``).
      directions: the directions to cluster; None keeps those passing the oscillation filter
        (:func:`kept_directions`).
      filter_samples: cluster only the samples relying on the direction (:func:`relying_samples`); the others get -1.
      **options: ``min_cluster_size`` (required), ``min_samples_divisor``, ``reference_num_samples`` (see
        :func:`hdbscan_params`; min_samples is computed from each direction's own sample count, scaling from N),
        ``metric``, ``normalize`` (see :func:`cluster_trajectories`).

    Returns:
      A list of :class:`Clustering`, one per chosen direction, in order; labels cover all N samples.

    Raises:
      PolcaError: for a projected loss that is not a finite float[T, N, K] array, directions out of range, or
        settings :func:`hdbscan_params` or :func:`cluster_trajectories` refuse.

    Example:
      ``projected_loss``: the setup of :class:`Clustering`'s example; direction 1 fails the oscillation filter and
      sample 7 does not rely on direction 0.

      >>> [(c.direction, c.labels.tolist()) for c in analysis.cluster_directions(projected_loss, min_cluster_size=3)]
      [(0, [0, 0, 0, 1, 1, 1, 0, -1])]
    """
    projected_loss = checked_array(projected_loss, "projected_loss", 3)
    _, num_samples, num_directions = projected_loss.shape
    if directions is None:
        directions = np.flatnonzero(kept_directions(projected_loss))
    directions = checked_directions(directions, num_directions)
    relying = relying_samples(projected_loss) if filter_samples else np.ones((num_samples, num_directions), bool)
    return [
        _cluster_samples(projected_loss[:, :, k].T, np.flatnonzero(relying[:, k]), int(k), **options)
        for k in directions
    ]


def cluster_signal(signal, *, sample_mask=None, **options) -> Clustering:
    """Cluster one trajectory per sample, signal float[T, N] (the baselines); ``direction`` is None.

    The baselines cluster the exact loss ``loss`` or its change ``np.diff(loss, axis=0)`` (``POLCAResult.loss``).

    Args:
      signal: float[T, N], one trajectory per sample.
      sample_mask: bool[N], the samples to cluster (default all); the others get label -1.
      **options: as for :func:`cluster_directions` (``min_cluster_size`` required).

    Returns:
      A :class:`Clustering` of the N samples with ``direction`` None.

    Raises:
      PolcaError: for a signal that is not a finite float[T, N] array, a ``sample_mask`` that is not bool[N], or
        settings :func:`hdbscan_params` refuses.

    Example:
      ``projected_loss``: the setup of :class:`Clustering`'s example; its direction 0 as the signal, samples 0–5.

      >>> mask = np.arange(8) < 6
      >>> analysis.cluster_signal(projected_loss[:, :, 0], sample_mask=mask, min_cluster_size=3).labels.tolist()
      [0, 0, 0, 1, 1, 1, -1, -1]
    """
    signal = checked_array(signal, "signal", 2)
    num_samples = signal.shape[1]
    if sample_mask is None:
        sample_mask = np.ones(num_samples, bool)
    sample_mask = checked_array(sample_mask, "sample_mask", 1, dtype=bool)
    if sample_mask.shape != (num_samples,):
        raise PolcaError(f"sample_mask must have shape ({num_samples},), got {sample_mask.shape}")
    return _cluster_samples(signal.T, np.flatnonzero(sample_mask), None, **options)


def medoid(trajectories, *, chunk_size: int = 512) -> int:
    """Index of the medoid of trajectories float[n, T]: the row with the least sum of Euclidean distances to all rows.

    Args:
      trajectories: float[n, T], one trajectory per row.
      chunk_size: distances are computed this many rows at a time (memory chunk_size × n).

    Returns:
      The row index of the medoid (the first of equals).

    Raises:
      PolcaError: for trajectories that are not a finite, non-empty float[n, T] array.

    Example:
      ``projected_loss``: the setup of :class:`Clustering`'s example; samples 0–2 drop alike, at scales 1, 1.2, 0.8.

      >>> analysis.medoid(projected_loss[:, :3, 0].T)
      0
    """
    trajectories = checked_array(trajectories, "trajectories", 2)
    centred = trajectories - trajectories.mean(axis=0)  # distances are unchanged; less cancellation below
    squared_norms = np.einsum("it,it->i", centred, centred)
    distance_sums = np.empty(centred.shape[0])
    for start in range(0, centred.shape[0], chunk_size):
        block = slice(start, start + chunk_size)
        squared = squared_norms[block, None] + squared_norms[None, :] - 2.0 * centred[block] @ centred.T
        distance_sums[block] = np.sqrt(np.maximum(squared, 0.0)).sum(axis=1)
    return int(np.argmin(distance_sums))


def quartile_curves(trajectories) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q25, median, q75), each float[T]: the per-time-step quartiles of trajectories float[n, T].

    Args:
      trajectories: float[n, T], e.g. the projected loss of a cluster's members.

    Returns:
      ``(q25, median, q75)``, each float[T] (``np.percentile``'s linear interpolation).

    Raises:
      PolcaError: for trajectories that are not a finite, non-empty float[n, T] array.

    Example:
      ``projected_loss``: the setup of :class:`Clustering`'s example.

      >>> q25, median, q75 = analysis.quartile_curves(projected_loss[:, :3, 0].T)
      >>> median.tolist()
      [0.0, -0.5, -1.0, -1.0, -1.0, -1.0, -1.0]
    """
    trajectories = checked_array(trajectories, "trajectories", 2)
    q25, median, q75 = np.percentile(trajectories, [25, 50, 75], axis=0)
    return q25, median, q75


def save_clusterings(path, clusterings: list[Clustering]) -> None:
    """Write clusterings of the same N samples to one ``.npz`` at ``path``, atomically (see :func:`load_clusterings`).

    The file holds labels ``[C, N]``, the clustered samples, directions and settings; it is written to a temporary
    file, then renamed (a kill leaves the old file or none).

    Args:
      path: the file, named as given (end it in ``.npz``).
      clusterings: C :class:`Clustering` of the same N samples.

    Raises:
      PolcaError: for clusterings of different sample counts.

    Example:
      ``clustering``: the setup of :class:`Clustering`'s example.

      >>> import os, tempfile
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     path = os.path.join(directory, "clusterings.npz")
      ...     analysis.save_clusterings(path, [clustering])
      ...     (loaded,) = analysis.load_clusterings(path)
      >>> loaded.labels.tolist(), loaded.direction, loaded.sample_indices.tolist()
      ([0, 0, 0, 1, 1, 1, -1, -1], 0, [0, 1, 2, 3, 4, 5, 6])
    """
    num_samples = {c.num_samples for c in clusterings}
    if len(num_samples) > 1:
        raise PolcaError(f"clusterings cover different sample counts: {sorted(num_samples)}")
    n = num_samples.pop() if num_samples else 0
    clustered = np.zeros((len(clusterings), n), bool)
    for row, c in zip(clustered, clusterings):
        row[c.sample_indices] = True

    def missing_as(value, fill):
        return fill if value is None else value

    save_npz_atomic(
        path,
        labels=np.array([c.labels for c in clusterings], np.int64).reshape(len(clusterings), n),
        clustered=clustered,
        directions=np.array([missing_as(c.direction, -1) for c in clusterings], np.int64),
        min_cluster_size=np.array([missing_as(c.min_cluster_size, -1) for c in clusterings], np.int64),
        min_samples=np.array([missing_as(c.min_samples, -1) for c in clusterings], np.int64),
        metric=np.array([c.metric for c in clusterings], str),
        normalize=np.array([missing_as(c.normalize, "") for c in clusterings], str),
    )


def load_clusterings(path) -> list[Clustering]:
    """Read clusterings written by :func:`save_clusterings`.

    Args:
      path: the ``.npz`` file.

    Returns:
      The list of :class:`Clustering`, in the order saved.

    Raises:
      PolcaError: for a file that is missing, unreadable or lacks an array.

    Example:
      ``clustering``: the setup of :class:`Clustering`'s example.

      >>> import os, tempfile
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     analysis.save_clusterings(os.path.join(directory, "c.npz"), [clustering, clustering])
      ...     loaded = analysis.load_clusterings(os.path.join(directory, "c.npz"))
      >>> [(c.direction, c.num_clusters, c.min_cluster_size, c.normalize) for c in loaded]
      [(0, 2, 3, None), (0, 2, 3, None)]
    """
    names = ("labels", "clustered", "directions", "min_cluster_size", "min_samples", "metric", "normalize")
    try:
        data = load_npz(path, names)
    except PolcaError as error:
        raise PolcaError(f"cannot read clusterings from {path}: {error}") from error
    fields = [data[name] for name in names]

    def present(value):
        return None if value < 0 else int(value)

    return [
        Clustering(labels, present(direction), np.flatnonzero(clustered), present(size), present(samples), str(metric),
                   str(normalize) or None)
        for labels, clustered, direction, size, samples, metric, normalize in zip(*fields)
    ]
