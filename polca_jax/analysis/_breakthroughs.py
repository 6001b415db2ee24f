"""Breakthroughs (Eq. 9) and hidden breakthroughs (Eq. 10) of the paper, §3.

Eq. 9:  break(f, x, Δ) = argmax_t [f(x, t+Δ) − f(x, t)] − [f(x, t) − f(x, t−Δ)]   (maximum acceleration)
Eq. 10: hidden(f, X', Δ) = 1{ mean_{x ∈ X'} break(f, x, Δ) > τ }

Sign convention (the paper does not give one). ``sign="paper"`` (the default) applies Eq. 9 to f as written: for a
falling loss the argmax is where the fall *decelerates most*, i.e. where a drop ends. ``sign="drop"`` applies it to −f:
the argmax is where the fall *accelerates most*, i.e. where a drop starts. For a loss that starts falling linearly at
step 600 and stops at step 900, "paper" gives 900 and "drop" gives 600. We keep the literal form as the default because
it reproduces the paper's Table 1 baseline: on our arithmetic runs it gives exact-loss clusters no hidden breakthrough
(the paper: 0.0), while "drop" called half of them hidden. A drop that begins at step 0 has its start outside the
candidate range (t − Δ must be a step), so "drop" lands on noise in the flat tail, whereas "paper" finds its end.

Δ is in training steps. The argmax runs over the checkpoints t with t−Δ and t+Δ both inside [steps[0], steps[-1]];
f(t±Δ) is interpolated linearly between checkpoints (as ``np.interp``), so uneven checkpoint spacing is fine.
The paper's arithmetic settings: Δ = 100 steps, τ = 1000 steps (the step after which its mean exact loss is flat).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from polca_jax.analysis._clustering import Clustering
from polca_jax.analysis._arrays import checked_array
from polca_jax.errors import PolcaError

SIGNS = ("drop", "paper")


def _checked_steps(steps, num_checkpoints: int) -> np.ndarray:
    """steps as float[T], strictly increasing and matching the curves' T axis."""
    steps = checked_array(steps, "steps", 1)
    if steps.shape != (num_checkpoints,):
        raise PolcaError(f"steps must have shape ({num_checkpoints},) to match the curves, got {steps.shape}")
    if np.any(np.diff(steps) <= 0):
        raise PolcaError("steps must be strictly increasing")
    return steps


def _interpolate_rows(curves: np.ndarray, steps: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Linear interpolation of every row of curves float[n, T] at query float[m] inside [steps[0], steps[-1]]
    -> float[n, m]; equal to ``np.interp(query, steps, row)`` for each row."""
    right = np.clip(np.searchsorted(steps, query, side="right"), 1, steps.size - 1)
    left = right - 1
    weight = (query - steps[left]) / (steps[right] - steps[left])
    return curves[:, left] * (1.0 - weight) + curves[:, right] * weight


def breakthrough_scores(
    curves, steps, window_steps: float, *, sign: str = "paper"
) -> tuple[np.ndarray, np.ndarray]:
    """The quantity Eq. 9 maximises -> (candidate_steps float[m], scores float[n, m]).

    scores[i, j] = [g(t+Δ) − g(t)] − [g(t) − g(t−Δ)] at t = candidate_steps[j], with g = −f for sign="drop" and
    g = f for sign="paper" (see the module docstring); f(t±Δ) is interpolated linearly between checkpoints.

    Args:
      curves: float[n, T], one curve per sample.
      steps: [T], the training step of each checkpoint, strictly increasing.
      window_steps: Δ, in training steps (> 0).
      sign: ``"paper"`` (Eq. 9 on f as written) or ``"drop"`` (on −f).

    Returns:
      ``(candidate_steps, scores)``: float[m], the checkpoints t with t ± Δ inside the step range, and float[n, m].

    Raises:
      PolcaError: for curves that are not a finite float[n, T] array, steps that do not match or do not strictly
        increase, an unknown sign, Δ <= 0, or no checkpoint with t ± Δ inside the range.

    Example:
      ``projected_loss``, ``steps``: the setup of :class:`Clustering`'s example; sample 0 drops over steps 0–200.

      >>> candidates, scores = analysis.breakthrough_scores(projected_loss[:, :1, 0].T, steps, 100)
      >>> candidates.tolist(), scores.tolist()
      ([100.0, 200.0, 300.0, 400.0, 500.0], [[0.0, 0.5, 0.0, 0.0, 0.0]])
    """
    curves = checked_array(curves, "curves", 2)
    steps = _checked_steps(steps, curves.shape[1])
    if sign not in SIGNS:
        raise PolcaError(f"sign must be one of {SIGNS}, got {sign!r}")
    if not window_steps > 0:
        raise PolcaError(f"window_steps must be positive, got {window_steps}")
    inside = (steps - window_steps >= steps[0]) & (steps + window_steps <= steps[-1])
    if not inside.any():
        raise PolcaError(
            f"no checkpoint t has t ± {window_steps} inside the step range [{steps[0]:g}, {steps[-1]:g}]"
        )
    candidates = steps[inside]
    before = _interpolate_rows(curves, steps, candidates - window_steps)
    after = _interpolate_rows(curves, steps, candidates + window_steps)
    at = curves[:, inside]
    second_difference = (after - at) - (at - before)
    return candidates, (-second_difference if sign == "drop" else second_difference)


def breakthrough_step(
    curves, steps, window_steps: float, *, sign: str = "paper"
) -> np.ndarray:
    """Eq. 9 for each curve: float[n], the training step of the breakthrough of each row of curves float[n, T].

    Ties go to the earliest step (a flat curve gives the first candidate).

    Args:
      curves, steps, window_steps: as in :func:`breakthrough_scores`.
      sign: ``"paper"``: Eq. 9 on f literally (for a falling curve, where the fall ends); ``"drop"``: where the fall
        accelerates most (a breakthrough's start).

    Returns:
      float[n], the step of each curve's breakthrough.

    Raises:
      PolcaError: as :func:`breakthrough_scores`.

    Example:
      ``projected_loss``, ``steps``: the setup of :class:`Clustering`'s example; samples 0–2 drop over steps 0–200,
      samples 3–5 over steps 300–500 (a drop that starts at step 0 has no start inside the candidates).

      >>> analysis.breakthrough_step(projected_loss[:, :6, 0].T, steps, 100).tolist()
      [200.0, 200.0, 200.0, 500.0, 500.0, 500.0]
      >>> analysis.breakthrough_step(projected_loss[:, 3:6, 0].T, steps, 100, sign="drop").tolist()
      [300.0, 300.0, 300.0]
    """
    candidates, scores = breakthrough_scores(curves, steps, window_steps, sign=sign)
    return candidates[np.argmax(scores, axis=1)]


def hidden_breakthrough(
    curves,
    steps,
    window_steps: float,
    threshold_step: float,
    *,
    sign: str = "paper",
) -> bool:
    """Eq. 10: True iff the mean breakthrough step of the set of curves float[n, T] is later than ``threshold_step``.

    Args:
      curves, steps, window_steps, sign: as in :func:`breakthrough_step`.
      threshold_step: τ, in training steps.

    Returns:
      Whether the set's mean Eq. 9 breakthrough step exceeds τ.

    Raises:
      PolcaError: as :func:`breakthrough_scores`.

    Example:
      ``projected_loss``, ``steps``: the setup of :class:`Clustering`'s example.

      >>> analysis.hidden_breakthrough(projected_loss[:, 3:6, 0].T, steps, 100, threshold_step=400)  # mean step 500
      True
    """
    return bool(breakthrough_step(curves, steps, window_steps, sign=sign).mean() > threshold_step)


@dataclass(frozen=True)
class ClusterBreakthrough:
    """The mean Eq. 9 breakthrough step over the ``size`` members of one cluster of one clustering.

    Attributes:
      direction: the clustering's basis direction (None for a per-sample signal).
      cluster: the cluster id.
      size: its number of members.
      mean_step: the mean of their breakthrough steps.
    """

    direction: int | None
    cluster: int
    size: int
    mean_step: float


def _member_curves(trajectories: np.ndarray, clustering: Clustering, cluster: int) -> np.ndarray:
    """float[m, T]: the curves of a cluster's members, from trajectories float[T, N, K] (at the clustering's
    direction) or float[T, N] (the same signal for every clustering)."""
    members = clustering.members(cluster)
    if trajectories.ndim == 2:
        return trajectories[:, members].T
    if clustering.direction is None:
        raise PolcaError("a clustering without a direction needs a [T, N] signal, not [T, N, K] trajectories")
    return trajectories[:, members, clustering.direction].T


def cluster_breakthroughs(
    clusterings: list[Clustering],
    trajectories,
    steps,
    window_steps: float,
    *,
    sign: str = "paper",
) -> list[ClusterBreakthrough]:
    """Mean breakthrough step of every cluster of every clustering.

    Args:
      clusterings: :class:`Clustering` of the same N samples.
      trajectories: float[T, N, K] projected loss, read at each clustering's direction; or float[T, N], one signal
        used for all clusterings (the clustered baseline signal, or the exact loss to compare with).
      steps, window_steps, sign: as in :func:`breakthrough_step`.

    Returns:
      One :class:`ClusterBreakthrough` per cluster, clustering by clustering, in cluster order.

    Raises:
      PolcaError: for no clusterings, trajectories that are not a finite [T, N, K] or [T, N] array, clusterings of
        another N, a clustering without a direction given [T, N, K] trajectories, and the inputs of
        :func:`breakthrough_scores`.

    Example:
      ``clustering``, ``projected_loss``, ``steps``: the setup of :class:`Clustering`'s example.

      >>> records = analysis.cluster_breakthroughs([clustering], projected_loss, steps, 100)
      >>> [(r.cluster, r.size, r.mean_step) for r in records]
      [(0, 3, 200.0), (1, 3, 500.0)]
    """
    if len(clusterings) == 0:
        raise PolcaError("no clusterings given")
    trajectories = np.asarray(trajectories)
    if trajectories.ndim not in (2, 3):
        raise PolcaError(f"trajectories must be [T, N, K] or [T, N], got shape {trajectories.shape}")
    trajectories = checked_array(trajectories, "trajectories", trajectories.ndim)
    records = []
    for clustering in clusterings:
        if clustering.num_samples != trajectories.shape[1]:
            raise PolcaError(
                f"clustering labels cover {clustering.num_samples} samples, trajectories have {trajectories.shape[1]}"
            )
        for cluster in range(clustering.num_clusters):
            curves = _member_curves(trajectories, clustering, cluster)
            mean_step = float(breakthrough_step(curves, steps, window_steps, sign=sign).mean())
            records.append(ClusterBreakthrough(clustering.direction, cluster, curves.shape[0], mean_step))
    return records


def hidden_breakthrough_fraction(
    clusterings: list[Clustering],
    trajectories,
    steps,
    window_steps: float,
    threshold_step: float,
    *,
    sign: str = "paper",
) -> float:
    """Fraction of all clusters, over all clusterings, with a hidden breakthrough (Eq. 10; Tables 1, 9, 11).

    Args:
      clusterings, trajectories, steps, window_steps, sign: as in :func:`cluster_breakthroughs`.
      threshold_step: τ: a cluster's breakthrough is hidden when its mean step is later.

    Returns:
      The fraction, in [0, 1]; NaN when the clusterings hold no cluster at all.

    Raises:
      PolcaError: as :func:`cluster_breakthroughs`.

    Example:
      ``clustering``, ``projected_loss``, ``steps``: the setup of :class:`Clustering`'s example (mean steps 200
      and 500).

      >>> analysis.hidden_breakthrough_fraction([clustering], projected_loss, steps, 100, threshold_step=400)
      0.5
    """
    records = cluster_breakthroughs(clusterings, trajectories, steps, window_steps, sign=sign)
    if not records:
        return float("nan")
    return float(np.mean([record.mean_step > threshold_step for record in records]))
