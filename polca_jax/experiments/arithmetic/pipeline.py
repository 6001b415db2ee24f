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

import numpy as np

import polca_jax as pj
from polca_jax import _tree as tree, analysis
from polca_jax.experiments import common, runs
from polca_jax.experiments.arithmetic import task
from polca_jax.experiments.arithmetic.config import ArithmeticConfig
from polca_jax.models import TransformerConfig, init_params

STAGES = ("train", "basis", "decompose", "cluster", "report")
HOST_STAGES = ("cluster", "report")  # read only the run directory: no experiment (data, model) is built
MAIN_BASIS = common.MAIN_BASIS
ABLATION_BASES = tuple(name for name in common.BASES if name != MAIN_BASIS)


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

    batches = task.training_batches(experiment.train_problems, config.batch_size)
    common.train_with_checkpoints(run, experiment, batches, evaluate, progress)
    return {"parameters": tree.num_params(experiment.initial_params)}


def _bases(config: ArithmeticConfig) -> tuple[str, ...]:
    return (MAIN_BASIS, *ABLATION_BASES) if config.ablations else (MAIN_BASIS,)


def basis_stage(run: RunDirectory, experiment: Experiment, progress: bool) -> dict:
    """Algorithm 1 on the Hessian sample at every basis step (+ the ablation bases)."""
    names = _bases(run.config)
    common.save_bases(run, experiment, names, progress)
    return {"bases": list(names)}


def decompose_stage(run: RunDirectory, experiment: Experiment, progress: bool) -> dict:
    """POLCA on every evaluation answer token at every POLCA checkpoint, along each basis."""
    names = _bases(run.config)
    common.decompose_bases(run, experiment, names, progress)
    return {"decompositions": list(names)}


def cluster_stage(run: RunDirectory, experiment: Experiment | None, progress: bool) -> dict:
    """HDBSCAN for every strategy; carry metrics and hidden breakthroughs to ``metrics.json``."""
    config = run.config
    labels = np.load(run / "labels.npz")
    options = common.cluster_options(config)
    (run / "clusters").mkdir(exist_ok=True)
    variants = {}
    for variant, (label, basis_name, kind) in VARIANTS.items():
        if not (run / "polca" / basis_name / "manifest.json").exists():
            continue
        trajectories, steps = common.variant_trajectories(pj.POLCAResult.load(run / "polca" / basis_name), kind)
        clusterings = common.cluster_variant(trajectories, kind, options)
        analysis.save_clusterings(run / "clusters" / f"{variant}.npz", clusterings)
        variants[variant] = _variant_metrics(label, basis_name, kind, clusterings, trajectories, steps, labels, config,
                                             qualifying_only=trajectories.ndim == 3)
    metrics = {"settings": {"window_steps": config.window_steps, "threshold_step": config.threshold_step},
               "variants": variants}
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {"variants": list(variants)}


def _variant_metrics(label, basis_name, kind, clusterings, trajectories, steps, labels, config, qualifying_only):
    """Table rows for one strategy. For per-sample signals (exact loss and its change) the maximum homogeneity is
    taken over all clusters, as in the paper; for decompositions only over clusters passing the 10s/100s rule."""
    scores = analysis.carry_cluster_scores(clusterings, labels["place"], labels["carry"])
    top = analysis.top_carry_clusters(scores, 3, qualifying_only=qualifying_only)
    breakthroughs = common.breakthrough_records(clusterings, trajectories, steps, config.window_steps)
    hidden = [b["mean_step"] > config.threshold_step for b in breakthroughs]
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
        "breakthroughs": breakthroughs,
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
    runs.run_stages(run, STAGE_FUNCTIONS, Experiment, stages, host_stages=HOST_STAGES, force=force,
                    progress=progress, log=log)
    return run / "report" / "report.md"
