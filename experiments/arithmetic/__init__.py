"""The paper's 3-digit addition task (§2.1 of the paper digest), as a pipeline task: ``polca run arithmetic``.

Samples are the 4 answer tokens of each evaluation problem (1000s, 100s, 10s, 1s), labelled by whether a carry comes
into them (``carry``, scored for carry tokens with the paper's rule that a cluster counts only when more than 85% of
its carry tokens are in the 10s or 100s place, and tested against carry shuffled within each place, since the carry
rate differs by place), their place (``place``), both (``skill``) and the answer digit
(``digit``).

A variant (another operation, a constraint on the problem draw, another flag rule) is :func:`arithmetic_task` called
with its own arguments, from a short file of its own: ``experiments/arithmetic/subtraction.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from polca_jax.errors import PolcaError
from polca_jax.pipeline import LabelSet, Qualifier, Task, task_factory
from polca_jax.pipeline.models import TransformerConfig, init_params
from experiments.arithmetic.paper import paper_report_sections
from experiments.arithmetic.problems import (
    ADDITION,
    ANSWER_INPUT_POSITIONS,
    ANSWER_PLACES,
    EQUALS_TOKEN,
    OPERATOR_TOKEN,
    OUTPUT_SIZE,
    SEQUENCE_LENGTH,
    VOCAB_SIZE,
    Operation,
    answer_accuracy,
    answer_labels,
    carries,
    decode,
    digits,
    encode,
    make_loss_fns,
    make_problems,
    paper_model_config,
    token_texts,
    training_batches,
)

PAPER_QUALIFIER = Qualifier("place", (1, 2), 0.85)
"""The paper's rule for carry clusters: more than 85% of a cluster's carry tokens are in the 10s or 100s place."""

PAPER_SETTINGS = dict(polca_every=20, basis_every=200, window_steps=100, threshold_step=1000,
                      min_cluster_size=150, reference_num_samples=5000, ablations=True)
"""The paper's pipeline settings for arithmetic (Tables 2-3, Appendix D), under every preset's own."""

PAPER = dict(num_layers=3, d_model=512, num_heads=4, d_mlp=2048, num_train_problems=640_000, num_eval_problems=1250,
             num_hessian_problems=1250, learning_rate=1e-5, num_steps=10_000)
"""The paper's model, data and training (Tables 2-3, Appendix D): 9,475,594 parameters, 10k steps, 5000 tokens."""

PAPER_CPU_CUTS = dict(polca_every=80, polca_until=4000, ablation_bases="parameter_axes,random")
"""What the ``paper-cpu`` preset cuts from ``paper`` to fit about 10 hours of a 2-core CPU (over resumed sessions):
POLCA checkpoints every 80 steps through step 4000 (51, as in results.md item 9; the paper: every 20 through 10,000,
but its plots stop at 4000 and the carries are learned before), and of the ablations the shuffled-Hessian basis
(50 more Lanczos runs); LCA and the random basis stay. Model, optimiser, schedule, 10,000 training steps, evaluation set (5000 tokens), Hessian sample (1250
problems), basis (50 vectors, one every 200 steps), HDBSCAN settings, Δ and τ are the paper's."""

PRESETS = {name: {**PAPER_SETTINGS, **preset} for name, preset in {
    # The paper (Tables 2-3, Appendix D): 9,475,594 parameters, 10k steps, 50 basis vectors, 5000 tokens.
    "paper": PAPER,
    # The paper with only PAPER_CPU_CUTS: the long CPU run of experiments/arithmetic/results.md.
    "paper-cpu": {**PAPER, **PAPER_CPU_CUTS},
    # Sized for a 2-core CPU in about five minutes.
    "cpu": dict(
        num_layers=2, d_model=128, num_heads=4, d_mlp=512, num_train_problems=96_000, num_eval_problems=300,
        num_hessian_problems=256, learning_rate=3e-4, num_steps=1500, polca_every=10, basis_every=100,
        window_steps=50, threshold_step=300, ablations=False,
    ),
    # Seconds, for tests and the notebook.
    "tiny": dict(
        num_layers=1, d_model=32, num_heads=2, d_mlp=64, num_train_problems=2000, num_eval_problems=40,
        num_hessian_problems=32, learning_rate=1e-3, num_steps=60, batch_size=32, warmup_steps=10, polca_every=5,
        basis_every=20, lanczos_iters=8, min_cluster_size=8, reference_num_samples=None, window_steps=10,
        threshold_step=30, lca_axes=5, metrics_every=10,
    ),
}.items()}


def arithmetic_task(*, num_layers: int, d_model: int, num_heads: int, d_mlp: int, num_train_problems: int,
                    num_eval_problems: int, num_hessian_problems: int, batch_size: int, seed: int,
                    operation: Operation = ADDITION, accept: Callable | None = None, rule: Callable = carries,
                    flag: str = "carry", qualifier: Qualifier | None = PAPER_QUALIFIER,
                    description: str | None = None) -> Task:
    """A 3-digit arithmetic task: ``a OP b = result`` (``operation``) with the answer tokens as samples.

    Evaluation, Hessian and training problems are disjoint draws (:func:`make_problems`, keeping the pairs
    ``accept(a int[M], b int[M]) -> bool[M]`` accepts when given); all data and the initial parameters are determined
    by ``seed``. The label sets: ``flag`` (``rule`` of :func:`answer_labels`, scored for its True class, its clusters
    qualified by ``qualifier``, None for none, and tested against the flag shuffled within each place), ``place``,
    ``skill`` (place and flag, e.g. "10s carry" / "10s no carry") and ``digit``. ``description``: the report's one
    line (None: "3-digit a OP b: N evaluation problems, 4 answer tokens each.").
    """
    if not isinstance(flag, str) or not flag or flag in ("place", "skill", "digit"):
        raise PolcaError(f"flag (the name of the flag's label set) must be a non-empty string other than the other "
                         f"label sets' names place, skill and digit, got {flag!r}")
    total = num_train_problems + num_eval_problems + num_hessian_problems
    if total > 1000 * 1000:
        raise PolcaError(f"{total} problems requested but there are only 1,000,000 pairs of 3-digit operands")
    eval_problems = make_problems(num_eval_problems, seed, accept=accept)
    hessian_problems = make_problems(num_hessian_problems, seed + 1, eval_problems, accept=accept)
    train_problems = make_problems(num_train_problems, seed + 2, np.concatenate([eval_problems, hessian_problems]),
                                   accept=accept)
    model_config = TransformerConfig(vocab_size=VOCAB_SIZE, context_length=SEQUENCE_LENGTH, num_layers=num_layers,
                                     d_model=d_model, num_heads=num_heads, d_mlp=d_mlp, output_size=OUTPUT_SIZE)
    graphdef, params = init_params(model_config, seed)
    per_sample_loss, loss = make_loss_fns(graphdef)
    eval_tokens = encode(eval_problems, operation=operation)
    place, flagged = (labels.reshape(-1) for labels in answer_labels(eval_problems, rule=rule))
    digit = eval_tokens[:, -len(ANSWER_PLACES):].reshape(-1)
    if description is None:
        description = f"3-digit a {operation.symbol} b: {num_eval_problems} evaluation problems, 4 answer tokens each."

    def accuracy_per_place(params) -> dict:
        accuracy = np.asarray(answer_accuracy(graphdef, params, eval_tokens))
        return {f"accuracy_{name}": float(value) for name, value in zip(ANSWER_PLACES, accuracy)}

    return Task(
        init_params=params,
        per_sample_loss=per_sample_loss,
        loss=loss,
        eval_batch={"tokens": eval_tokens},
        hessian_batch={"tokens": encode(hessian_problems, operation=operation)},
        train_batches=training_batches(train_problems, batch_size, operation),
        labels={
            flag: LabelSet(flagged, positive=True, qualifier=qualifier, class_names={True: flag, False: f"no {flag}"},
                           stratify_by="place"),
            "place": LabelSet(place, class_names=dict(enumerate(ANSWER_PLACES))),
            "skill": LabelSet(np.array([f"{ANSWER_PLACES[p]} {flag if f else f'no {flag}'}"
                                        for p, f in zip(place, flagged)])),
            "digit": LabelSet(digit),
        },
        sample_texts=token_texts(eval_tokens, operation.symbol),
        training_metrics=accuracy_per_place,
        description=description,
    )


@task_factory(presets=PRESETS, default_preset="cpu", report_sections=paper_report_sections)
def make_task(num_layers: int = 3, d_model: int = 512, num_heads: int = 4, d_mlp: int = 2048,
              num_train_problems: int = 640_000, num_eval_problems: int = 1250, num_hessian_problems: int = 1250,
              batch_size: int = 64, seed: int = 0) -> Task:
    """3-digit addition with a TransformerLens-layout transformer (the paper's model by default).

    Evaluation, Hessian and training problems are disjoint draws from the 1,000,000 operand pairs; all data and the
    initial parameters are determined by ``seed``.
    """
    return arithmetic_task(
        num_layers=num_layers, d_model=d_model, num_heads=num_heads, d_mlp=d_mlp,
        num_train_problems=num_train_problems, num_eval_problems=num_eval_problems,
        num_hessian_problems=num_hessian_problems, batch_size=batch_size, seed=seed,
        description=f"3-digit addition: {num_eval_problems} evaluation problems, 4 answer tokens each.",
    )


__all__ = [
    "ADDITION",
    "ANSWER_INPUT_POSITIONS",
    "ANSWER_PLACES",
    "EQUALS_TOKEN",
    "OPERATOR_TOKEN",
    "OUTPUT_SIZE",
    "Operation",
    "PAPER",
    "PAPER_CPU_CUTS",
    "PAPER_QUALIFIER",
    "PAPER_SETTINGS",
    "PRESETS",
    "SEQUENCE_LENGTH",
    "VOCAB_SIZE",
    "answer_accuracy",
    "answer_labels",
    "arithmetic_task",
    "carries",
    "decode",
    "digits",
    "encode",
    "make_loss_fns",
    "make_problems",
    "make_task",
    "paper_model_config",
    "token_texts",
    "training_batches",
]
