"""Stage bodies every experiment shares: training with checkpoints, the bases (Algorithm 1 and the ablations), POLCA
along each basis, the trajectories each clustering strategy reads, HDBSCAN per strategy and cluster breakthroughs.

They take the run directory (its ``config`` is a :class:`polca_jax.experiments.runs.CheckpointedConfig`) and an
experiment object with ``initial_params``, ``loss_fn(params, batch) -> scalar``,
``per_sample_loss_fn(params, batch) -> [n_seq(, n_tok)]``, ``hessian_batch`` and ``eval_batch``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np

import polca_jax as pj
from polca_jax import analysis
from polca_jax.experiments.runs import RunDirectory
from polca_jax.training import adamw_paper, train

MAIN_BASIS = "hessian"
BASES = (MAIN_BASIS, "shuffled_hessian", "random", "parameter_axes")
TRAJECTORY_KINDS = ("loss", "loss_change", "fisher", "first_order", "projected_loss")


def checkpoint_store(run: RunDirectory, experiment, steps: list[int]) -> pj.OrbaxCheckpoints:
    """The run's checkpoints at ``steps``, restored into the experiment's parameter shapes and dtypes."""
    return pj.OrbaxCheckpoints(run / "checkpoints", steps, template=experiment.initial_params)


def train_with_checkpoints(run: RunDirectory, experiment, batches: Callable[[int], Any],
                           metrics_fn: Callable[[Any], Mapping[str, Any]], progress: bool) -> None:
    """AdamW with the paper's warm-up on ``batches(step)``; params saved at every POLCA and basis step, and
    ``{"step", "loss", **metrics_fn(params)}`` appended to ``metrics.jsonl`` every ``metrics_every`` steps."""
    config = run.config
    optimizer = adamw_paper(config.learning_rate, config.weight_decay, config.b1, config.b2, config.warmup_steps)
    train(
        experiment.loss_fn, experiment.initial_params, optimizer, batches, config.num_steps, run / "checkpoints",
        config.checkpoint_steps, metrics_fn=metrics_fn, metrics_every=config.metrics_every,
        metrics_path=run / "metrics.jsonl", progress=progress,
    )


def save_bases(run: RunDirectory, experiment, names: tuple[str, ...], progress: bool) -> None:
    """Each basis in ``names`` (of :data:`BASES`) to ``basis/<name>/``; one already on disk (an interrupted stage)
    is kept. ``hessian`` is Algorithm 1 on the Hessian sample at every basis step; ``shuffled_hessian`` the same with
    the checkpoints in random order; ``random`` orthonormal vectors as many as Algorithm 1's; ``parameter_axes`` the
    ``lca_axes`` largest-magnitude parameters at the end of training (LCA)."""
    unknown = sorted(set(names) - set(BASES))
    if unknown:
        raise ValueError(f"unknown bases {unknown}; choose from {BASES}")
    config = run.config
    key = jax.random.key(config.seed)
    options = dict(k_per_checkpoint=config.k_per_checkpoint, num_iters=config.lanczos_iters, progress=progress)
    size = len(config.basis_steps) * config.k_per_checkpoint

    def final_params():
        with checkpoint_store(run, experiment, [config.num_steps]) as final:
            return final[0]

    with checkpoint_store(run, experiment, config.basis_steps) as store:
        makers = {
            "hessian": lambda: pj.hessian_basis(experiment.loss_fn, store, experiment.hessian_batch, key=key,
                                                **options),
            "shuffled_hessian": lambda: pj.shuffled_hessian_basis(
                experiment.loss_fn, store, experiment.hessian_batch, key=jax.random.fold_in(key, 1), **options),
            "random": lambda: pj.random_basis(experiment.initial_params, size, jax.random.fold_in(key, 2)),
            "parameter_axes": lambda: pj.parameter_axis_basis(final_params(), config.lca_axes, step=config.num_steps),
        }
        for name in names:
            if not (run / "basis" / name / "basis.json").exists():
                makers[name]().save(run / "basis" / name)


def decompose_bases(run: RunDirectory, experiment, names: tuple[str, ...], progress: bool) -> None:
    """POLCA of every evaluation sample at every POLCA checkpoint along each basis in ``names``, to
    ``polca/<name>/``; a result already on disk (an interrupted stage) is kept. LCA's ``parameter_axes`` is first
    order (Eq. 1); a basis without eigenvalues uses the current curvature for the paper's second order."""
    config = run.config
    with checkpoint_store(run, experiment, config.polca_steps) as store:
        for name in names:
            if (run / "polca" / name / "manifest.json").exists():
                continue
            basis = pj.Basis.load(run / "basis" / name)
            second_order = "none" if name == "parameter_axes" else config.second_order
            has_eigenvalues = bool(np.all(np.isfinite(basis.eigenvalues)))
            result = pj.polca(
                experiment.per_sample_loss_fn, store, experiment.eval_batch, basis, second_order=second_order,
                eigenvalues="stored" if has_eigenvalues else "current", method=config.projection_method,
                progress=progress,
            )
            result.save(run / "polca" / name)


def variant_trajectories(result: pj.POLCAResult, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The trajectories a strategy clusters, ``[T, N, K]`` or ``[T, N]``, and their steps ``[T]``.

    kind: ``loss`` (exact loss), ``loss_change`` (its change per interval), ``fisher`` (⟨b, ∇L(x)⟩²),
    ``first_order`` (cumulative first-order POLCA) or ``projected_loss`` (POLCA, Eq. 8).
    """
    if kind == "loss":
        return np.asarray(result.loss), result.steps
    if kind == "loss_change":
        return result.loss_change, result.steps[1:]
    if kind == "fisher":
        return np.asarray(result.projections) ** 2, result.steps
    if kind == "first_order":
        return result.projected_loss_with("none"), result.steps
    if kind == "projected_loss":
        return result.projected_loss, result.steps
    raise ValueError(f"unknown trajectory kind {kind!r}; choose from {TRAJECTORY_KINDS}")


def cluster_options(config) -> dict:
    """The HDBSCAN settings of a config, as keyword arguments of the ``analysis`` clustering functions."""
    return dict(min_cluster_size=config.min_cluster_size, min_samples_divisor=config.min_samples_divisor,
                reference_num_samples=config.reference_num_samples, normalize=config.normalize)


def cluster_variant(trajectories: np.ndarray, kind: str, options: dict) -> list[analysis.Clustering]:
    """HDBSCAN of one strategy's trajectories: one clustering of a per-sample signal ``[T, N]``; for the Fisher
    information one per direction of ``[T, N, K]``, without filters (it is no decomposition of the loss); otherwise
    one per direction kept by the oscillation filter, on the samples relying on it."""
    if trajectories.ndim == 2:
        return [analysis.cluster_signal(trajectories, **options)]
    if kind == "fisher":
        return analysis.cluster_directions(trajectories, directions=np.arange(trajectories.shape[2]),
                                           filter_samples=False, **options)
    return analysis.cluster_directions(trajectories, **options)


def breakthrough_records(clusterings: list[analysis.Clustering], trajectories: np.ndarray, steps: np.ndarray,
                         window_steps: int) -> list[dict]:
    """``{"direction", "cluster", "size", "mean_step"}`` for every cluster: its mean Eq. 9 breakthrough step on the
    clustered trajectories ``[T, N(, K)]`` at ``steps [T]``."""
    clustered = [c for c in clusterings if c.num_clusters]
    found = analysis.cluster_breakthroughs(clustered, trajectories, steps, window_steps) if clustered else []
    return [{"direction": b.direction, "cluster": b.cluster, "size": b.size, "mean_step": b.mean_step} for b in found]
