"""POLCA on a Hugging Face causal language model's own training checkpoints: ``polca run hf:PATH_OR_REPO``.

``PATH_OR_REPO`` is a directory of one training run's checkpoints (``save_pretrained`` directories named
``step1000`` or ``checkpoint-1000``, or state-dict files beside a ``config.json``) or a Hub repository whose
revisions are named ``step<N>`` like Pythia's (:mod:`polca_jax.hf` reads them; the Hub needs the network). The model
is GPT-2, GPT-NeoX or Llama, ported to JAX (:func:`polca_jax.hf.token_losses`), so the run never trains: it
decomposes the checkpoints that are there. Its POLCA steps are 0, e, 2e, ... up to the last checkpoint, for the
smallest interval e whose every multiple has a checkpoint (Pythia: every 1000 steps), with about 8 basis checkpoints
(preset ``default``, computed from the checkpoints found; ``--set polca_every=...`` and the other settings change
it).

Every next-token prediction of the evaluation contexts is a sample, as in the English experiment: the text (``text``:
``lee``, gensim's news corpus, a ``.txt``/``.jsonl`` file or directory, or ``hf:DATASET``) is tokenised with the
model's own tokenizer (``tokenizer``: default the checkpoints' directory or the first checkpoint, read with
``transformers.AutoTokenizer``) and cut into contexts of ``context_length`` + 1 tokens; one part of the documents
gives the evaluation contexts, another the Hessian sample. Label sets and the report's automatic cluster labels are
the English experiment's (token kinds, the target token, tags of the target and the tokens before it), computed on
the token texts of whatever tokenizer the model has, and the quarter of the context each sample sits in
(``position``).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

from polca_jax.errors import PolcaError
from polca_jax.files import save_npz_atomic
from polca_jax.hf import HFCheckpoints, checkpoint_steps, token_losses
from polca_jax.pipeline import LabelSet, Task, TaskDefinition
from experiments.english import text, token_samples, tokenizer
from experiments.english.paper import cluster_label_sections, cluster_labels

BASIS_CHECKPOINTS = 8
"""About this many basis checkpoints in the computed preset (one basis vector each)."""
TINY_SETTINGS = dict(context_length=12, num_eval_contexts=6, num_hessian_contexts=4, max_documents=40,
                     lanczos_iters=6, min_cluster_size=6, reference_num_samples=None, null_permutations=200,
                     breakthrough_shuffles=50, lca_axes=8)
"""The ``tiny`` preset's sizes (seconds on a CPU), beside the steps computed from the checkpoints."""


def task_definition(model: str) -> TaskDefinition:
    """The task of ``polca run hf:MODEL``: :func:`make_task` on ``model``'s checkpoints, with presets whose POLCA and
    basis steps are computed from the steps found (``default``, and ``tiny`` for tests and a first look)."""
    steps = step_settings(sorted(checkpoint_steps(model)), model)
    return TaskDefinition(functools.partial(make_task, model=model),
                          presets={"default": steps, "tiny": {**steps, **TINY_SETTINGS}}, default_preset="default",
                          report_sections=lambda view: cluster_label_sections(view, cluster_labels(view)))


def step_settings(steps: list[int], source: str) -> dict:
    """The pipeline settings that read ``steps``: POLCA checkpoints 0, e, ..., last (the smallest interval e with
    every multiple present), about :data:`BASIS_CHECKPOINTS` basis checkpoints on that grid, and a breakthrough
    window of at most 5 intervals that fits them."""
    if 0 not in steps:
        raise PolcaError(f"the checkpoints in {source} start at step {steps[0]}: POLCA decomposes the training from "
                         "step 0, so save the model before its first update too (model.save_pretrained(dir / "
                         "'step0'))")
    last = steps[-1]
    if last == 0:
        raise PolcaError(f"{source} holds only the checkpoint at step 0: POLCA needs checkpoints during training")
    present = set(steps)
    every = next(e for e in steps[1:] if all(s in present for s in range(0, last + 1, e)))
    intervals = last // every
    if intervals < 3:
        raise PolcaError(f"the checkpoints in {source} give only {intervals + 1} evenly spaced steps (0..{last} every "
                         f"{every}): POLCA needs at least 4; save checkpoints at evenly spaced steps")
    basis_every = every * max(1, math.ceil(intervals / BASIS_CHECKPOINTS))
    return dict(num_steps=last, polca_every=every, basis_every=basis_every,
                window_steps=every * max(1, min(5, (intervals - 1) // 2)))


def make_task(model: str, text_source: str = "lee", tokenizer_path: str | None = None, context_length: int = 64,
              num_eval_contexts: int = 64, num_hessian_contexts: int = 32, max_documents: int | None = None,
              validation_fraction: float = 0.5, label_coverage: float = 0.7, max_simple_tags: int = 2,
              seed: int = 0, workdir: Path | None = None) -> Task:
    """The next-token losses of ``model``'s checkpoints (a directory or a Hub repository id) on a text.

    text_source: the corpus (``lee``, a ``.txt``/``.jsonl`` file or directory, or ``hf:DATASET``); its documents are
    split (seeded) into evaluation documents (``validation_fraction``) and Hessian documents. tokenizer_path: where
    ``transformers.AutoTokenizer`` finds the model's tokenizer (default: the checkpoints' directory, else the first
    checkpoint's). The parameters at step 0 are read from the first checkpoint; every later one is read when a stage
    needs it (``Task.checkpoints``).
    """
    store = HFCheckpoints(model)
    config = store.config
    if context_length > config.max_positions:
        raise PolcaError(f"context_length ({context_length}) exceeds the model's {config.max_positions} positions")
    hf_tokenizer = _load_tokenizer(tokenizer_path, model, store)
    backend = hf_tokenizer.backend_tokenizer
    separator = hf_tokenizer.eos_token
    if separator is None:
        raise PolcaError(f"the tokenizer of {model} has no end-of-text token (eos_token) to join documents with")
    documents = text.load_documents(text_source, max_documents=max_documents)
    hessian_documents, eval_documents = text.split_documents(documents, validation_fraction, seed)
    eval_contexts = _contexts(backend, eval_documents, context_length, num_eval_contexts, separator, "evaluation")
    hessian_contexts = _contexts(backend, hessian_documents, context_length, num_hessian_contexts, separator,
                                 "Hessian")
    if max(eval_contexts.max(), hessian_contexts.max()) >= config.vocab_size:
        raise PolcaError(f"the tokenizer gives token ids up to {max(eval_contexts.max(), hessian_contexts.max())}, "
                         f"beyond the model's vocabulary of {config.vocab_size}: is it the model's own tokenizer?")
    texts = tokenizer.token_texts(backend, eval_contexts).astype(str)
    if workdir is not None and not (Path(workdir) / "tokens.npz").exists():
        save_npz_atomic(Path(workdir) / "tokens.npz", ids=eval_contexts, texts=texts)
    label_sets, sample_texts = token_samples(texts)
    label_sets["position"] = LabelSet(position_quarters(context_length, len(eval_contexts)))
    return Task(
        init_params=store[0],
        per_sample_loss=lambda params, batch: token_losses(config, params, batch["tokens"]),
        eval_batch={"tokens": eval_contexts},
        hessian_batch={"tokens": hessian_contexts},
        checkpoints=lambda steps, template, mesh: HFCheckpoints(model, steps, template, mesh, config=config),
        labels=label_sets,
        sample_texts=sample_texts,
        description=f"{config.model_type} checkpoints of {model} on {text_source!r}: {len(eval_contexts)} evaluation "
                    f"contexts of {context_length} next-token predictions.",
    )


def position_quarters(context_length: int, num_contexts: int) -> np.ndarray:
    """``[N]`` the quarter of its context each next-token sample sits in (``"1st quarter"`` ... ``"4th quarter"``),
    samples in row-major (context, position) order: whether a cluster gathers early or late positions."""
    quarter = np.arange(context_length) * 4 // context_length
    return np.tile(np.array(["1st quarter", "2nd quarter", "3rd quarter", "4th quarter"])[quarter], num_contexts)


def _load_tokenizer(path: str | None, model: str, store: HFCheckpoints):
    """The model's fast tokenizer (``transformers.AutoTokenizer``): from ``path``, else the checkpoints' directory,
    else the first checkpoint's."""
    try:
        from transformers import AutoTokenizer
    except ImportError as error:
        raise PolcaError("the Hugging Face task needs transformers for the model's tokenizer: "
                         "pip install 'polca_jax[hf]'") from error
    candidates = [path] if path is not None else [model, str(store.local_path(store.steps[0]))]
    errors = []
    for candidate in candidates:
        try:
            found = AutoTokenizer.from_pretrained(candidate)
        except (OSError, ValueError) as error:
            errors.append(f"{candidate}: {str(error).splitlines()[0]}")
            continue
        if not getattr(found, "is_fast", False):
            raise PolcaError(f"the tokenizer in {candidate} is a slow (Python) tokenizer; save a fast one "
                             "(tokenizer.json) beside the checkpoints")
        return found
    raise PolcaError("no tokenizer for the checkpoints (" + "; ".join(errors) + "): save the model's tokenizer "
                     "beside them (tokenizer.save_pretrained(dir)) or --set tokenizer_path=DIR")


def _contexts(backend, documents: list[str], context_length: int, count: int, separator: str,
              what: str) -> np.ndarray:
    contexts = tokenizer.make_contexts(backend, documents, context_length, max_contexts=count, separator=separator)
    if len(contexts) < count:
        raise PolcaError(f"the {what} documents give only {len(contexts)} contexts of {context_length + 1} tokens, "
                         f"fewer than the {count} asked for: lower num_{what.lower()}_contexts or give more text")
    return contexts


__all__ = ["BASIS_CHECKPOINTS", "TINY_SETTINGS", "make_task", "position_quarters", "step_settings",
           "task_definition"]
