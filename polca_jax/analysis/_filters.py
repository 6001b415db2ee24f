"""The paper's two filters (§4.1/§5.1): drop oscillating directions, then, per kept direction, the samples that
do not rely on it.

Both read ``projected_loss`` float[T, N, K]: the cumulative projected loss L_b(x, θ_t) (Eq. 8) of N samples along K
basis directions at T checkpoints, with ``projected_loss[0] == 0``.
"""

from __future__ import annotations

import numpy as np

from polca_jax.analysis._arrays import checked_array


def kept_directions(projected_loss) -> np.ndarray:
    """Oscillation filter: bool[K], True where the sample-mean projected loss is lower at the last checkpoint.

    Direction k is kept when its mean falls from the first checkpoint to the last,
    ``mean_n projected_loss[-1, n, k] < mean_n projected_loss[0, n, k]``.

    Args:
      projected_loss: float[T, N, K], the cumulative projected loss (``POLCAResult.projected_loss``).

    Returns:
      bool[K], True for the kept directions.

    Raises:
      PolcaError: for a projected loss that is not a finite, non-empty float[T, N, K] array.

    Example:
      ``projected_loss``: the setup of :class:`Clustering`'s example (direction 1 raises the mean loss).

      >>> analysis.kept_directions(projected_loss).tolist()
      [True, False]
    """
    projected_loss = checked_array(projected_loss, "projected_loss", 3)
    mean_curve = projected_loss.mean(axis=1)  # [T, K]
    return mean_curve[-1] < mean_curve[0]


def relying_samples(projected_loss) -> np.ndarray:
    """Per-direction sample filter: bool[N, K], True where sample n "relies on" direction k.

    Sample n relies on direction k when its projected loss falls overall,
    ``projected_loss[-1, n, k] < projected_loss[0, n, k]``.

    Args:
      projected_loss: float[T, N, K], the cumulative projected loss (``POLCAResult.projected_loss``).

    Returns:
      bool[N, K], True where the sample relies on the direction.

    Raises:
      PolcaError: for a projected loss that is not a finite, non-empty float[T, N, K] array.

    Example:
      ``projected_loss``: the setup of :class:`Clustering`'s example (sample 7's loss rises along direction 0).

      >>> analysis.relying_samples(projected_loss)[:, 0].tolist()
      [True, True, True, True, True, True, True, False]
    """
    projected_loss = checked_array(projected_loss, "projected_loss", 3)
    return projected_loss[-1] < projected_loss[0]
