"""Settings that only the host stages (cluster, score, report) read, which an existing run directory may change.

``polca run TASK --out DIR --stage cluster --set min_cluster_size=50`` on a finished run redoes cluster → score →
report from the stored decomposition, in seconds: ``config.json`` records the new values, and each host stage's
record (``stages/<stage>.json``) the settings it ran with. Any other setting (training, checkpoints, basis,
decomposition, task options) changes what the earlier stages computed, and stays refused.

``second_order`` is a decomposition setting that the stored arrays can often redo: the cluster stage (and the score
stage and the report after it) then use :meth:`polca_jax.POLCAResult.projected_loss_with` on the stored projections,
when the rule needs no per-sample curvature (``none``, ``trapezoid``; ``paper`` along a basis with stored
eigenvalues); otherwise the change is refused before anything is written, saying why.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

import polca_jax as pj
from polca_jax import load_basis_info
from polca_jax.errors import PolcaError
from polca_jax.pipeline._registry import basis_kind

CLUSTER_SETTINGS = ("second_order", "normalize", "profile_clusterer", "gradient_window", "gradient_increments",
                    "gradient_rotation", "gradient_directions", "min_cluster_size", "min_samples_divisor",
                    "reference_num_samples")
SCORE_SETTINGS = ("null_permutations", "significance", "breakthrough_shuffles", "window_steps", "threshold_step")
HOST_SETTINGS = {**{key: "cluster" for key in CLUSTER_SETTINGS}, **{key: "score" for key in SCORE_SETTINGS}}
FROM_STORED_ARRAYS = ("none", "trapezoid", "paper")  # second-order rules projected_loss_with can redo


def stage_settings(config, stage: str) -> dict:
    """The settings a host stage ran with, for its record ``stages/<stage>.json``."""
    keys = CLUSTER_SETTINGS if stage == "cluster" else SCORE_SETTINGS
    return {key: getattr(config, key) for key in keys}


def host_setting_changes(saved, wanted) -> tuple[dict[str, tuple], list[str]]:
    """The settings that differ between two configs: ``key -> (on disk, wanted)`` of the host-stage settings, and
    the names of the others (the task and its options included)."""
    a, b = {**saved.settings(), "task": saved.task}, {**wanted.settings(), "task": wanted.task}
    differing = sorted(key for key in set(a) | set(b) if a.get(key) != b.get(key))
    host = {key: (a.get(key), b.get(key)) for key in differing if key in HOST_SETTINGS}
    return host, [key for key in differing if key not in HOST_SETTINGS]


def second_order_unavailable(run_dir: Path, basis: str, stored: str | None, wanted: str) -> str | None:
    """Why the projected loss along ``basis`` (decomposed with ``stored``) cannot be redone with ``wanted`` from the
    stored arrays, or None when it can (or needs no redoing)."""
    if basis_kind(basis).curvature == "none" or stored is None or stored == wanted:
        return None
    if wanted not in FROM_STORED_ARRAYS:
        return (f"second_order={wanted} needs the per-sample curvature at every checkpoint, which polca/{basis}/ "
                f"(decomposed with second_order={stored}) does not store")
    if wanted == "paper" and (basis_kind(basis).curvature != "stored" or not np.all(
            np.isfinite(load_basis_info(run_dir / "basis" / basis)["eigenvalues"]))):
        return (f"second_order=paper along the {basis} basis needs its Hessian eigenvalues, which it has none of "
                "(its decomposition used the current curvature, which is not stored)")
    return None


def host_result(run_dir: Path, basis: str, second_order: str | None) -> pj.POLCAResult:
    """The POLCA result along ``basis`` as the host stages read it: ``polca/<basis>/``, with its second-order terms
    redone under ``second_order`` from the stored arrays when that differs from the decomposition's (config
    ``recomputed_from`` then names the decomposition's rule). Raise ``PolcaError`` when that is impossible."""
    result = pj.POLCAResult.load(run_dir / "polca" / basis)
    stored = result.config.get("second_order")
    if second_order is None or basis_kind(basis).curvature == "none" or stored is None or stored == second_order:
        return result
    reason = second_order_unavailable(run_dir, basis, stored, second_order)
    if reason is not None:
        raise PolcaError(f"{reason}; redo the decomposition (polca run ... --stage decompose --force) or keep "
                         f"second_order={stored}")
    eigenvalues = (load_basis_info(run_dir / "basis" / basis)["eigenvalues"] if second_order == "paper" else None)
    projected = result.projected_loss_with(second_order, eigenvalues)  # [T, N, K]
    terms = np.diff(projected, axis=0) - result.first_order  # the second-order terms [T-1, N, K]
    return dataclasses.replace(result, second_order=terms.astype(np.asarray(result.second_order).dtype),
                               config={**result.config, "second_order": second_order, "recomputed_from": stored})
