"""The paper's two filters (§4.1/§5.1): drop oscillating directions, then, per kept direction, the samples that
do not rely on it.

Both read ``projected_loss`` float[T, N, K]: the cumulative projected loss L_b(x, θ_t) (Eq. 8) of N samples along K
basis directions at T checkpoints, with ``projected_loss[0] == 0``.
"""

from __future__ import annotations

import numpy as np

from polca_jax.analysis._arrays import checked_array


def kept_directions(projected_loss) -> np.ndarray:
    """Oscillation filter: bool[K], True where the sample-mean projected loss falls from the first to the last
    checkpoint, ``mean_n projected_loss[-1, n, k] < mean_n projected_loss[0, n, k]``.

    projected_loss: float[T, N, K].
    """
    projected_loss = checked_array(projected_loss, "projected_loss", 3)
    mean_curve = projected_loss.mean(axis=1)  # [T, K]
    return mean_curve[-1] < mean_curve[0]


def relying_samples(projected_loss) -> np.ndarray:
    """Per-direction sample filter: bool[N, K], True where sample n "relies on" direction k, i.e. its projected loss
    falls overall, ``projected_loss[-1, n, k] < projected_loss[0, n, k]``.

    projected_loss: float[T, N, K].
    """
    projected_loss = checked_array(projected_loss, "projected_loss", 3)
    return projected_loss[-1] < projected_loss[0]
