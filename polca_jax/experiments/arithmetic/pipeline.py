"""The arithmetic experiment as resumable stages on a run directory: train → basis → decompose → cluster → report.

Run directory layout::

    config.json            the run's ArithmeticConfig (a run directory holds one config)
    checkpoints/           orbax: params (+ optimizer state) at every POLCA and basis step
    metrics.jsonl          training log (loss, per-place accuracy, evaluation loss)
    labels.npz             place int[N], carry bool[N] of the evaluation answer tokens
    basis/<name>/          Basis: hessian (Algorithm 1) [, shuffled_hessian, random, parameter_axes]
    polca/<name>/          POLCAResult per basis
    clusters/<variant>.npz HDBSCAN clusterings per strategy (POLCA, baselines, ablations)
    metrics.json           carry homogeneity / recall / F1, hidden-breakthrough fractions
    stages/<stage>.json    written when a stage finishes (wall time); a finished stage is skipped
    report/report.md       the report, with figures in report/figures/

Every stage is built from the public kernels (``polca_jax``) and host analysis (``polca_jax.analysis``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import jax
import numpy as np

import polca_jax as pj
from polca_jax import analysis, tree
from polca_jax.experiments import runs
from polca_jax.experiments.arithmetic import task
from polca_jax.experiments.arithmetic.config import ArithmeticConfig
from polca_jax.models import TransformerConfig, init_params
from polca_jax.training import adamw_paper, train

STAGES = ("train", "basis", "decompose", "cluster", "report")
MAIN_BASIS = "hessian"
ABLATION_BASES = ("shuffled_hessian", "random", "parameter_axes")


# label, basis it decomposes along, trajectory clustered
VARIANTS: dict[str, tuple[str, str, str]] = {
    "exact_loss": ("Exact loss", MAIN_BASIS, "loss"),
    "loss_change": ("Change in exact loss", MAIN_BASIS, "loss_change"),
    "fisher": ("Fisher information", MAIN_BASIS, "fisher"),
    "lca": ("LCA", "parameter_axes", "first_order"),
    "first_order_polca": ("First-order POLCA", MAIN_BASIS, "first_order"),
    "polca": ("POLCA", MAIN_BASIS, "projected_loss"),
    "random_basis": ("Random orthonormal", "random", "projected_loss"),
    "shuffled_hessian": ("Random shuffled Hessian", "shuffled_hessian", "projected_loss"),
}


class RunDirectory(runs.RunDirectory):
    """A run directory holding one :class:`ArithmeticConfig`."""

    config_type = ArithmeticConfig
    command = "polca arithmetic"


class Experiment:
    """The data, model and loss functions a config determines (deterministic from the seed)."""

    def __init__(self, config: ArithmeticConfig):
        self.config = config
        self.eval_problems = task.make_problems(config.num_eval_problems, config.seed)
        self.hessian_problems = task.make_problems(config.num_hessian_problems, config.seed + 1, self.eval_problems)
        held_out = np.concatenate([self.eval_problems, self.hessian_problems])
        self.train_problems = task.make_problems(config.num_train_problems, config.seed + 2, held_out)
        self.model_config = TransformerConfig(
            vocab_size=task.VOCAB_SIZE, context_length=task.SEQUENCE_LENGTH, num_layers=config.num_layers,
            d_model=config.d_model, num_heads=config.num_heads, d_mlp=config.d_mlp, output_size=task.OUTPUT_SIZE,
        )
        self.graphdef, self.initial_params = init_params(self.model_config, config.seed)
        self.per_sample_loss_fn, self.loss_fn = task.make_loss_fns(self.graphdef)
        self.eval_batch = {"tokens": task.encode(self.eval_problems)}
        self.hessian_batch = {"tokens": task.encode(self.hessian_problems)}

    def checkpoints(self, run: RunDirectory, steps: list[int]) -> pj.OrbaxCheckpoints:
        return pj.OrbaxCheckpoints(run / "checkpoints", steps, template=self.initial_params)


# --- stages ---------------------------------------------------------------------------------------------------------


def train_stage(run: RunDirectory, experiment: Experiment, progress: bool) -> dict:
    """Train with AdamW, checkpointing at every POLCA and basis step; save the evaluation tokens' labels."""
    config = run.config
    place, carry = task.answer_labels(experiment.eval_problems)
    np.savez(run / "labels.npz", place=place.reshape(-1), carry=carry.reshape(-1))

    def evaluate(params) -> dict:
        accuracy = task.answer_accuracy(experiment.graphdef, params, experiment.eval_batch["tokens"])
        return {"answer_accuracy": np.asarray(accuracy).tolist(),
                "eval_loss": float(experiment.loss_fn(params, experiment.eval_batch))}

    optimizer = adamw_paper(config.learning_rate, config.weight_decay, config.b1, config.b2, config.warmup_steps)
    train(
        experiment.loss_fn, experiment.initial_params, optimizer,
        task.training_batches(experiment.train_problems, config.batch_size), config.num_steps, run / "checkpoints",
        sorted(set(config.polca_steps) | set(config.basis_steps)), metrics_fn=evaluate,
        metrics_every=config.metrics_every, metrics_path=run / "metrics.jsonl", progress=progress,
    )
    return {"parameters": tree.num_params(experiment.initial_params)}


def basis_stage(run: RunDirectory, experiment: Experiment, progress: bool) -> dict:
    """Algorithm 1 on the Hessian sample at every basis step (+ the ablation bases)."""
    config = run.config
    key = jax.random.key(config.seed)
    options = dict(k_per_checkpoint=config.k_per_checkpoint, num_iters=config.lanczos_iters, progress=progress)
    size = len(config.basis_steps) * config.k_per_checkpoint

    def final_params():
        with experiment.checkpoints(run, [config.num_steps]) as final:
            return final[0]

    with experiment.checkpoints(run, config.basis_steps) as store:
        bases = {MAIN_BASIS: lambda: pj.hessian_basis(
            experiment.loss_fn, store, experiment.hessian_batch, key=key, **options)}
        if config.ablations:
            bases["shuffled_hessian"] = lambda: pj.shuffled_hessian_basis(
                experiment.loss_fn, store, experiment.hessian_batch, key=jax.random.fold_in(key, 1), **options)
            bases["random"] = lambda: pj.random_basis(experiment.initial_params, size, jax.random.fold_in(key, 2))
            bases["parameter_axes"] = lambda: pj.parameter_axis_basis(
                final_params(), config.lca_axes, step=config.num_steps)
        for name, make in bases.items():  # a basis already on disk (an interrupted stage) is kept
            if not (run / "basis" / name / "basis.json").exists():
                make().save(run / "basis" / name)
    return {"bases": list(bases)}


def decompose_stage(run: RunDirectory, experiment: Experiment, progress: bool) -> dict:
    """POLCA on every evaluation answer token at every POLCA checkpoint, along each basis."""
    config = run.config
    names = [MAIN_BASIS, *ABLATION_BASES] if config.ablations else [MAIN_BASIS]
    with experiment.checkpoints(run, config.polca_steps) as store:
        for name in names:
            if (run / "polca" / name / "manifest.json").exists():  # finished before an interruption
                continue
            basis = pj.Basis.load(run / "basis" / name)
            second_order = "none" if name == "parameter_axes" else config.second_order  # LCA is first order (Eq. 1)
            has_eigenvalues = bool(np.all(np.isfinite(basis.eigenvalues)))
            result = pj.polca(
                experiment.per_sample_loss_fn, store, experiment.eval_batch, basis, second_order=second_order,
                eigenvalues="stored" if has_eigenvalues else "current", method=config.projection_method,
                progress=progress,
            )
            result.save(run / "polca" / name)
    return {"decompositions": names}


def variant_trajectories(result: pj.POLCAResult, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The trajectories a strategy clusters, ``[T, N, K]`` or ``[T, N]``, and their steps ``[T]``."""
    if kind == "loss":
        return np.asarray(result.loss), result.steps
    if kind == "loss_change":
        return result.loss_change, result.steps[1:]
    if kind == "fisher":
        return np.asarray(result.projections) ** 2, result.steps
    if kind == "first_order":
        first = result.first_order
        return np.concatenate([np.zeros_like(first[:1]), np.cumsum(first, axis=0)]), result.steps
    if kind == "projected_loss":
        return result.projected_loss, result.steps
    raise ValueError(f"unknown trajectory kind {kind!r}")


def cluster_stage(run: RunDirectory, experiment: Experiment, progress: bool) -> dict:
    """HDBSCAN for every strategy; carry metrics and hidden breakthroughs to ``metrics.json``."""
    config = run.config
    labels = np.load(run / "labels.npz")
    options = dict(min_cluster_size=config.min_cluster_size, min_samples_divisor=config.min_samples_divisor,
                   reference_num_samples=config.reference_num_samples, normalize=config.normalize)
    (run / "clusters").mkdir(exist_ok=True)
    variants = {}
    for variant, (label, basis_name, kind) in VARIANTS.items():
        if not (run / "polca" / basis_name / "manifest.json").exists():
            continue
        trajectories, steps = variant_trajectories(pj.POLCAResult.load(run / "polca" / basis_name), kind)
        per_sample_signal = trajectories.ndim == 2
        if per_sample_signal:
            clusterings = [analysis.cluster_signal(trajectories, **options)]
        elif kind == "fisher":  # not a decomposition of the loss: every direction, no filters
            clusterings = analysis.cluster_directions(
                trajectories, directions=np.arange(trajectories.shape[2]), filter_samples=False, **options)
        else:
            clusterings = analysis.cluster_directions(trajectories, **options)
        analysis.save_clusterings(run / "clusters" / f"{variant}.npz", clusterings)
        variants[variant] = _variant_metrics(label, basis_name, kind, clusterings, trajectories, steps, labels, config,
                                             qualifying_only=not per_sample_signal)
    metrics = {"settings": {"window_steps": config.window_steps, "threshold_step": config.threshold_step},
               "variants": variants}
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {"variants": list(variants)}


def _variant_metrics(label, basis_name, kind, clusterings, trajectories, steps, labels, config, qualifying_only):
    """Table rows for one strategy. For per-sample signals (exact loss and its change) the maximum homogeneity is
    taken over all clusters, as in the paper; for decompositions only over clusters passing the 10s/100s rule."""
    scores = analysis.carry_cluster_scores(clusterings, labels["place"], labels["carry"])
    top = analysis.top_carry_clusters(scores, 3, qualifying_only=qualifying_only)
    clustered = [c for c in clusterings if c.num_clusters]
    breakthroughs = (
        analysis.cluster_breakthroughs(clustered, trajectories, steps, config.window_steps) if clustered else []
    )
    hidden = [b.mean_step > config.threshold_step for b in breakthroughs]
    max_homogeneity = analysis.max_carry_homogeneity(scores, qualifying_only=qualifying_only)
    return {
        "label": label,
        "basis": basis_name,
        "trajectory": kind,
        "num_directions": len(clusterings),
        "num_clusters": sum(c.num_clusters for c in clusterings),
        "max_carry_homogeneity": None if np.isnan(max_homogeneity) else max_homogeneity,
        "top_clusters": [
            {"direction": r.direction, "cluster": r.cluster, "size": r.size, "homogeneity": r.homogeneity,
             "recall": r.recall, "f1": r.f1}
            for r in top
        ],
        "hidden_breakthrough_fraction": float(np.mean(hidden)) if hidden else None,
        "breakthroughs": [
            {"direction": b.direction, "cluster": b.cluster, "size": b.size, "mean_step": b.mean_step}
            for b in breakthroughs
        ],
    }


def report_stage(run: RunDirectory, experiment: Experiment | None, progress: bool) -> dict:
    """Markdown report with figures."""
    from polca_jax.experiments.arithmetic.report import write_report

    return {"report": str(write_report(run.path))}


STAGE_FUNCTIONS: dict[str, Callable[[RunDirectory, Experiment, bool], dict]] = {
    "train": train_stage,
    "basis": basis_stage,
    "decompose": decompose_stage,
    "cluster": cluster_stage,
    "report": report_stage,
}


def run_stages(run: RunDirectory, stages=STAGES, *, force: bool = False, progress: bool = True,
               log: Callable[[str], None] = print) -> Path:
    """Run ``stages`` in order on ``run``, skipping finished ones (unless ``force``); returns the report path."""
    runs.run_stages(run, STAGE_FUNCTIONS, Experiment, stages, force=force, progress=progress, log=log)
    return run / "report" / "report.md"
