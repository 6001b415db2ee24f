"""The paper's 3-digit addition experiment (§2.1 of the paper digest)."""

from polca_jax.experiments.arithmetic.task import (
    ANSWER_INPUT_POSITIONS,
    ANSWER_PLACES,
    EQUALS_TOKEN,
    OUTPUT_SIZE,
    PLUS_TOKEN,
    SEQUENCE_LENGTH,
    VOCAB_SIZE,
    answer_accuracy,
    answer_labels,
    decode,
    encode,
    make_loss_fns,
    make_problems,
    paper_model_config,
    training_batches,
)

__all__ = [
    "ANSWER_INPUT_POSITIONS",
    "ANSWER_PLACES",
    "EQUALS_TOKEN",
    "OUTPUT_SIZE",
    "PLUS_TOKEN",
    "SEQUENCE_LENGTH",
    "VOCAB_SIZE",
    "answer_accuracy",
    "answer_labels",
    "decode",
    "encode",
    "make_loss_fns",
    "make_problems",
    "paper_model_config",
    "training_batches",
]
