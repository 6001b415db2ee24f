"""The English language-model experiment as resumable stages on a run directory:
train → basis → decompose → cluster → label → report.

Run directory layout::

    config.json            the run's EnglishConfig (a run directory holds one config)
    tokenizer.json         byte-level BPE trained on the training documents when the run starts, reused after
    checkpoints/           orbax: params (+ optimizer state) at every POLCA and basis step
    metrics.jsonl          training log: loss of the step's batch, validation loss of the evaluation contexts
    tokens.npz             ids int32[n_eval, L+1] and texts str[n_eval, L+1] of the evaluation contexts
    basis/hessian/         Basis: Algorithm 1 on the Hessian contexts
    polca/hessian/         POLCAResult over the N = n_eval · L evaluation tokens
    clusters/<variant>.npz HDBSCAN clusterings: polca (per kept direction) and the exact_loss baseline
    metrics.json           the filters (kept directions, tokens relying on each) and every cluster's breakthrough
    labels.json            per cluster: POS label (Appendix E.2), top target tokens, contexts nearest the medoid
    stages/<stage>.json    written when a stage finishes (wall time); a finished stage is skipped
    report/report.md       the report, with figures in report/figures/

Samples are the next-token predictions of the evaluation contexts, in row-major (context, position) order: sample
``i`` reads ``ids[i // L, : i % L + 1]`` and is scored on the target token ``ids[i // L, i % L + 1]``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import polca_jax as pj
from polca_jax import _tree as tree, analysis
from polca_jax.experiments import common, runs
from polca_jax.experiments.english import labels, text, tokenizer
from polca_jax.experiments.english.config import EnglishConfig
from polca_jax.models import TransformerConfig, apply, init_params, token_cross_entropy

STAGES = ("train", "basis", "decompose", "cluster", "label", "report")
HOST_STAGES = ("cluster", "label", "report")  # read only the run directory: no documents, tokenizer or model
MAIN_BASIS = common.MAIN_BASIS
TOP_TOKENS = 10

# variant: (label, trajectory clustered); both read polca/hessian/
VARIANTS: dict[str, tuple[str, str]] = {
    "polca": ("POLCA", "projected_loss"),
    "exact_loss": ("Exact loss", "loss"),
}


class RunDirectory(runs.RunDirectory):
    """A run directory holding one :class:`EnglishConfig`."""

    config_type = EnglishConfig
    command = "polca english"


def language_model_loss_fns(graphdef: nnx.GraphDef) -> tuple[Callable, Callable]:
    """Pure next-token losses of ``(params, batch)`` with ``batch = {"tokens": int[n_ctx, L + 1]}``.

    Returns ``(per_sample_loss_fn, loss_fn)``: ``per_sample_loss_fn(params, batch) -> [n_ctx, L]`` is the
    cross-entropy of every next token (each token is a POLCA sample); ``loss_fn`` is its mean, a scalar.
    """

    def per_sample_loss_fn(params: dict, batch: dict) -> jax.Array:
        tokens = batch["tokens"]
        return token_cross_entropy(apply(graphdef, params, tokens[:, :-1]), tokens[:, 1:])

    def loss_fn(params: dict, batch: dict) -> jax.Array:
        return jnp.mean(per_sample_loss_fn(params, batch))

    return per_sample_loss_fn, loss_fn


def training_batches(contexts: np.ndarray, batch_size: int, seed: int) -> Callable[[int], dict]:
    """Batches for ``polca_jax.training.train``: step -> ``{"tokens": int32[batch_size, L + 1]}``.

    Each epoch reads the contexts int32[n, L + 1] in its own seeded order, ``n // batch_size`` batches per epoch, so
    a batch is a pure function of the step (a resumed run sees the same data).
    """
    if batch_size > len(contexts):
        raise ValueError(f"batch_size {batch_size} exceeds the {len(contexts)} training contexts")
    batches_per_epoch = len(contexts) // batch_size

    @functools.lru_cache(maxsize=1)
    def epoch_order(epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(len(contexts))

    def batch(step: int) -> dict:
        epoch, index = divmod(step, batches_per_epoch)
        rows = epoch_order(epoch)[index * batch_size : (index + 1) * batch_size]
        return {"tokens": contexts[rows]}

    return batch


class Experiment:
    """The documents, tokenizer, contexts, model and loss functions a config determines.

    The tokenizer is trained on the training documents and saved at ``tokenizer_path`` the first time, then read
    back, so every stage of a run sees the same token ids. Evaluation contexts come from the validation documents;
    the training documents' contexts are shuffled (seeded), the first ``num_hessian_contexts`` are the Hessian sample
    and the rest the training set, so the three are disjoint.
    """

    def __init__(self, config: EnglishConfig, tokenizer_path: str | Path):
        self.config = config
        documents = text.load_documents(config.data, max_documents=config.max_documents)
        train_documents, validation_documents = text.split_documents(documents, config.validation_fraction,
                                                                     config.seed)
        self.num_documents = {"train": len(train_documents), "validation": len(validation_documents)}
        self.tokenizer = tokenizer.load_or_train_tokenizer(Path(tokenizer_path), train_documents, config.vocab_size)
        self.eval_contexts = tokenizer.make_contexts(self.tokenizer, validation_documents, config.context_length,
                                                     max_contexts=config.num_eval_contexts)
        if len(self.eval_contexts) < config.num_eval_contexts:
            raise ValueError(
                f"the {len(validation_documents)} validation documents give only {len(self.eval_contexts)} contexts "
                f"of {config.context_length + 1} tokens, fewer than num_eval_contexts={config.num_eval_contexts}; "
                "raise validation_fraction or lower num_eval_contexts"
            )
        contexts = tokenizer.make_contexts(self.tokenizer, train_documents, config.context_length)
        contexts = contexts[np.random.default_rng(config.seed).permutation(len(contexts))]
        self.hessian_contexts = contexts[: config.num_hessian_contexts]
        self.train_contexts = contexts[config.num_hessian_contexts :]
        if len(self.train_contexts) < config.batch_size:
            raise ValueError(
                f"the training documents give {len(contexts)} contexts; after the {config.num_hessian_contexts} "
                f"Hessian contexts fewer than batch_size={config.batch_size} are left for training"
            )
        self.model_config = TransformerConfig(
            vocab_size=config.vocab_size, context_length=config.model_length, num_layers=config.num_layers,
            d_model=config.d_model, num_heads=config.num_heads, d_mlp=config.d_mlp,
        )
        self.graphdef, self.initial_params = init_params(self.model_config, config.seed)
        self.per_sample_loss_fn, self.loss_fn = language_model_loss_fns(self.graphdef)
        self.eval_batch = {"tokens": self.eval_contexts}
        self.hessian_batch = {"tokens": self.hessian_contexts}


# --- stages ---------------------------------------------------------------------------------------------------------


def train_stage(run: RunDirectory, experiment: Experiment, progress: bool) -> dict:
    """Train with AdamW, checkpointing at every POLCA and basis step; save the evaluation tokens' ids and texts."""
    config = run.config
    ids = experiment.eval_contexts
    np.savez(run / "tokens.npz", ids=ids, texts=tokenizer.token_texts(experiment.tokenizer, ids).astype(str))
    validation_loss = jax.jit(experiment.loss_fn)

    def evaluate(params) -> dict:
        return {"validation_loss": float(validation_loss(params, experiment.eval_batch))}

    batches = training_batches(experiment.train_contexts, config.batch_size, config.seed)
    common.train_with_checkpoints(run, experiment, batches, evaluate, progress)
    return {
        "parameters": tree.num_params(experiment.initial_params),
        "tokenizer_vocab_size": experiment.tokenizer.get_vocab_size(),
        "documents": experiment.num_documents,
        "contexts": {"train": len(experiment.train_contexts), "hessian": len(experiment.hessian_contexts),
                     "evaluation": len(experiment.eval_contexts)},
        "epochs": config.num_steps * config.batch_size / len(experiment.train_contexts),
    }


def basis_stage(run: RunDirectory, experiment: Experiment, progress: bool) -> dict:
    """Algorithm 1 on the Hessian contexts at every basis step."""
    common.save_bases(run, experiment, (MAIN_BASIS,), progress)
    return {"bases": [MAIN_BASIS]}


def decompose_stage(run: RunDirectory, experiment: Experiment, progress: bool) -> dict:
    """POLCA on every evaluation token at every POLCA checkpoint (``method="auto"`` takes forward mode here)."""
    config = run.config
    common.decompose_bases(run, experiment, (MAIN_BASIS,), progress)
    method = config.projection_method
    if method == "auto":
        method = pj.choose_method(config.context_length, len(config.basis_steps) * config.k_per_checkpoint)
    return {"decompositions": [MAIN_BASIS], "method": method}


def cluster_stage(run: RunDirectory, experiment: Experiment | None, progress: bool) -> dict:
    """HDBSCAN of POLCA (per kept direction) and of the exact loss; filters and breakthroughs to ``metrics.json``."""
    config = run.config
    result = pj.POLCAResult.load(run / "polca" / MAIN_BASIS)
    projected_loss = result.projected_loss
    kept = analysis.kept_directions(projected_loss)
    relying = analysis.relying_samples(projected_loss)
    (run / "clusters").mkdir(exist_ok=True)
    variants = {}
    for variant, (label, kind) in VARIANTS.items():
        trajectories, steps = common.variant_trajectories(result, kind)
        clusterings = common.cluster_variant(trajectories, kind, common.cluster_options(config))
        analysis.save_clusterings(run / "clusters" / f"{variant}.npz", clusterings)
        breakthroughs = common.breakthrough_records(clusterings, trajectories, steps, config.window_steps)
        for record in breakthroughs:
            record["hidden"] = record["mean_step"] > config.threshold_step
        variants[variant] = {
            "label": label,
            "trajectory": kind,
            "num_clusterings": len(clusterings),
            "num_clusters": sum(c.num_clusters for c in clusterings),
            "hidden_breakthrough_fraction": (
                float(np.mean([r["hidden"] for r in breakthroughs])) if breakthroughs else None),
            "breakthroughs": breakthroughs,
        }
    metrics = {
        "settings": {"window_steps": config.window_steps, "threshold_step": config.threshold_step},
        "num_samples": int(result.loss.shape[1]),
        "filters": {
            "num_directions": int(kept.size),
            "kept_directions": np.flatnonzero(kept).tolist(),
            "dropped_directions": np.flatnonzero(~kept).tolist(),
            "relying_samples": relying.sum(axis=0).tolist(),  # per direction, tokens whose projected loss falls
        },
        "variants": variants,
    }
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {"variants": list(variants), "kept_directions": int(kept.sum())}


def label_stage(run: RunDirectory, experiment: Experiment | None, progress: bool) -> dict:
    """Every cluster's POS label, its most frequent target tokens and the contexts nearest its medoid, to
    ``labels.json``."""
    config = run.config
    texts = np.load(run / "tokens.npz")["texts"]
    result = pj.POLCAResult.load(run / "polca" / MAIN_BASIS)
    targets = target_positions(texts.shape[0], texts.shape[1] - 1)
    tagger = labels.default_tagger()
    tags = labels.tag_tokens(texts, targets, tagger=tagger)
    metrics = json.loads((run / "metrics.json").read_text())
    variants = {}
    for variant, (_, kind) in VARIANTS.items():
        trajectories, _ = common.variant_trajectories(result, kind)
        breakthroughs = {(r["direction"], r["cluster"]): r for r in metrics["variants"][variant]["breakthroughs"]}
        variants[variant] = [
            _cluster_record(clustering, cluster, trajectories, texts, targets, tags, breakthroughs, config)
            for clustering in analysis.load_clusterings(run / "clusters" / f"{variant}.npz")
            for cluster in range(clustering.num_clusters)
        ]
    document = {
        "tagger": "spacy" if labels.spacy_pipeline() is not None else "builtin",
        "coverage": config.label_coverage,
        "max_simple_tags": config.max_simple_tags,
        "variants": variants,
    }
    (run / "labels.json").write_text(json.dumps(document, indent=2, ensure_ascii=False))
    return {"tagger": document["tagger"], "clusters_labelled": {v: len(records) for v, records in variants.items()}}


def target_positions(num_contexts: int, context_length: int) -> np.ndarray:
    """int[N, 2]: (context, column of the target token in the ``[n, L + 1]`` token arrays) of each sample."""
    samples = np.arange(num_contexts * context_length)
    return np.stack([samples // context_length, samples % context_length + 1], axis=1)


def _cluster_record(clustering, cluster, trajectories, texts, targets, tags, breakthroughs, config) -> dict:
    """One cluster's label, top target tokens and the ``num_medoid_contexts`` contexts nearest its medoid (in
    trajectory space, the medoid first)."""
    members = clustering.members(cluster)
    direction = clustering.direction
    curves = (trajectories[:, members] if direction is None else trajectories[:, members, direction]).T
    centre = curves[analysis.medoid(curves)]
    nearest = members[np.argsort(np.linalg.norm(curves - centre, axis=1), kind="stable")[: config.num_medoid_contexts]]
    label = labels.label_cluster([tags[i] for i in members], coverage=config.label_coverage,
                                 max_simple_tags=config.max_simple_tags)
    breakthrough = breakthroughs.get((direction, cluster), {})
    return {
        "direction": direction,
        "cluster": cluster,
        "size": int(members.size),
        "label": label.to_dict(),
        "top_tokens": labels.top_tokens(texts[targets[members, 0], targets[members, 1]].tolist(), k=TOP_TOKENS),
        "breakthrough_step": breakthrough.get("mean_step"),
        "hidden": breakthrough.get("hidden"),
        "nearest_samples": nearest.tolist(),
        "nearest_contexts": [labels.format_context(texts[c], p) for c, p in targets[nearest].tolist()],
    }


def report_stage(run: RunDirectory, experiment: Experiment | None, progress: bool) -> dict:
    """Markdown report with figures."""
    from polca_jax.experiments.english.report import write_report

    return {"report": str(write_report(run.path))}


STAGE_FUNCTIONS: dict[str, Callable[[RunDirectory, Experiment, bool], dict]] = {
    "train": train_stage,
    "basis": basis_stage,
    "decompose": decompose_stage,
    "cluster": cluster_stage,
    "label": label_stage,
    "report": report_stage,
}


def run_stages(run: RunDirectory, stages=STAGES, *, force: bool = False, progress: bool = True,
               log: Callable[[str], None] = print) -> Path:
    """Run ``stages`` in order on ``run``, skipping finished ones (unless ``force``); returns the report path."""
    runs.run_stages(run, STAGE_FUNCTIONS, functools.partial(Experiment, tokenizer_path=run / "tokenizer.json"),
                    stages, host_stages=HOST_STAGES, force=force, progress=progress, log=log)
    return run / "report" / "report.md"
