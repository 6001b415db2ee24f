"""The paper's addition task and its variants: an operation on two 3-digit numbers, with digit-place labels and a
flag (addition: carry) per answer token.

Token format. The vocabulary has 12 input tokens: the digits 0-9, ``OPERATOR_TOKEN`` (10) and ``EQUALS_TOKEN`` (11).
A problem ``a OP b`` (0 <= a, b <= 999) is the 12-token sequence::

    a2 a1 a0 OP b2 b1 b0 = s3 s2 s1 s0        positions 0 .. 11

with each operand written as 3 digits, most-significant first (leading zeros kept), and the result ``s = a OP b``
(an :class:`Operation`; the paper's is ``ADDITION``) written as 4 digits, most-significant first (so for addition
``s3``, the 1000s digit, is always 0 or 1). A variant whose results can leave [0, 9999] restricts the draw to the pairs
whose result stays in it (``make_problems(accept=...)``).

Training is next-token prediction on that sequence: the model reads ``tokens[:, :-1]`` (11 tokens) and is scored
against ``tokens[:, 1:]``, but the loss counts only the 4 answer digits, i.e. the logits at input positions
``ANSWER_INPUT_POSITIONS`` = (7, 8, 9, 10) against targets ``s3, s2, s1, s0``. The model's outputs are the 10 digits
(``OUTPUT_SIZE``), which with ``context_length = 12`` gives the paper's 9,475,594 parameters.

Each answer token is a "sample" for POLCA: ``per_sample_loss_fn`` returns ``[n_seq, 4]``, places ordered as
``ANSWER_PLACES`` (1000s, 100s, 10s, 1s), the order of ``answer_labels``.
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from polca_jax.errors import PolcaError
from polca_jax.pipeline.models import TransformerConfig, apply, token_cross_entropy

ANSWER_PLACES = ("1000s", "100s", "10s", "1s")
SEQUENCE_LENGTH = 12
VOCAB_SIZE = 12
OUTPUT_SIZE = 10
OPERATOR_TOKEN = 10
EQUALS_TOKEN = 11
ANSWER_INPUT_POSITIONS = (7, 8, 9, 10)
"""Positions in the model input ``tokens[:, :-1]`` whose logits predict the answer digits s3, s2, s1, s0."""

_ANSWER_LOGITS = slice(ANSWER_INPUT_POSITIONS[0], ANSWER_INPUT_POSITIONS[-1] + 1)
_ANSWER_TOKENS = slice(ANSWER_INPUT_POSITIONS[0] + 1, SEQUENCE_LENGTH)


@dataclasses.dataclass(frozen=True)
class Operation:
    """The operation of a task: ``symbol`` is written at the operator position of sample texts, ``apply`` computes
    the written result, ``(a int[N], b int[N]) -> int[N]``."""

    symbol: str
    apply: Callable[[np.ndarray, np.ndarray], np.ndarray]


ADDITION = Operation("+", np.add)
"""The paper's operation: ``a + b``."""


def paper_model_config(param_dtype: str = "float32") -> TransformerConfig:
    """The paper's arithmetic model: 3 layers, d_model 512, 4 heads, MLP 2048; 9,475,594 parameters."""
    return TransformerConfig(
        vocab_size=VOCAB_SIZE,
        context_length=SEQUENCE_LENGTH,
        num_layers=3,
        d_model=512,
        num_heads=4,
        d_mlp=2048,
        output_size=OUTPUT_SIZE,
        param_dtype=param_dtype,
    )


def make_problems(
    num_problems: int,
    seed: int,
    exclude: np.ndarray | None = None,
    *,
    num_digits: int = 3,
    accept: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Distinct operand pairs drawn without replacement: int[num_problems, 2], columns (a, b).

    The draw is a seeded permutation of all (10**num_digits)**2 pairs, read in order, skipping the pairs in
    ``exclude`` (int[M, 2]) and, when ``accept`` is given, those it rejects: ``accept(a int[M], b int[M]) -> bool[M]``
    (e.g. ``lambda a, b: a >= b`` for a subtraction without negative results). So the same seed gives the same
    problems (with ``accept`` the accepted subsequence of the same order), and excluding an evaluation set makes
    training problems disjoint from it. The permutation costs O((10**num_digits)**2) memory: meant for
    num_digits <= 3.
    """
    _check_positive_int("num_digits", num_digits)
    if isinstance(num_problems, bool) or not isinstance(num_problems, int) or num_problems < 0:
        raise PolcaError(f"num_problems must be a non-negative int, got {num_problems!r}")
    base = 10**num_digits
    order = np.random.default_rng(seed).permutation(base * base)
    if exclude is not None:
        excluded = _checked_problems(exclude, num_digits, name="exclude")
        order = order[~np.isin(order, excluded[:, 0] * base + excluded[:, 1])]
    if accept is not None:
        kept = np.asarray(accept(order // base, order % base))
        if kept.dtype != bool or kept.shape != order.shape:
            raise PolcaError(f"accept must map operands a int[M], b int[M] to bool[M] (here M = {order.size}), got "
                             f"{kept.dtype}{list(kept.shape)}")
        order = order[kept]
    if num_problems > order.size:
        constraint = " that accept allows" if accept is not None else ""
        raise PolcaError(
            f"asked for {num_problems} problems but only {order.size} distinct {num_digits}-digit pairs{constraint} "
            "are available"
        )
    chosen = order[:num_problems]
    return np.stack([chosen // base, chosen % base], axis=1)


def encode(problems: np.ndarray, num_digits: int = 3, operation: Operation = ADDITION) -> np.ndarray:
    """Token sequences of problems int[N, 2]: int32[N, 3 * num_digits + 3] (``a OP b = result``, see module docstring).

    Raises PolcaError when a result lies outside [0, 10**(num_digits + 1)), which num_digits + 1 digits cannot write.
    """
    problems = _checked_problems(problems, num_digits)
    a, b = problems[:, 0], problems[:, 1]
    n = len(problems)
    result = np.asarray(operation.apply(a, b))
    if result.shape != (n,) or (n and not np.issubdtype(result.dtype, np.integer)):
        raise PolcaError(f"operation {operation.symbol!r} must map a int[{n}], b int[{n}] to int[{n}], got "
                         f"{result.dtype}{list(result.shape)}")
    outside = np.flatnonzero((result < 0) | (result >= 10 ** (num_digits + 1)))
    if outside.size:
        i = outside[0]
        raise PolcaError(
            f"{outside.size} problem(s) have a result that {num_digits + 1} digits cannot write, e.g. "
            f"{a[i]} {operation.symbol} {b[i]} = {result[i]} (results must lie in [0, {10 ** (num_digits + 1) - 1}]); "
            "constrain the draw to pairs whose result does with make_problems(accept=...)"
        )
    return np.concatenate(
        [
            digits(a, num_digits),
            np.full((n, 1), OPERATOR_TOKEN),
            digits(b, num_digits),
            np.full((n, 1), EQUALS_TOKEN),
            digits(result, num_digits + 1),
        ],
        axis=1,
    ).astype(np.int32)


def decode(tokens: np.ndarray, num_digits: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``encode``, whatever the operation: tokens int[N, 3 * num_digits + 3] -> (problems int[N, 2],
    written results int[N])."""
    _check_positive_int("num_digits", num_digits)
    tokens = np.asarray(tokens)
    length = 3 * num_digits + 3
    if tokens.ndim != 2 or tokens.shape[1] != length:
        raise PolcaError(f"tokens must have shape [N, {length}], got {tokens.shape}")
    if np.any(tokens[:, num_digits] != OPERATOR_TOKEN) or np.any(tokens[:, 2 * num_digits + 1] != EQUALS_TOKEN):
        raise PolcaError(
            f"tokens must have {OPERATOR_TOKEN} (the operator) and {EQUALS_TOKEN} ('=') at the separator positions"
        )
    a_digits = tokens[:, :num_digits]
    b_digits = tokens[:, num_digits + 1 : 2 * num_digits + 1]
    result_digits = tokens[:, 2 * num_digits + 2 :]
    if any(np.any((d < 0) | (d > 9)) for d in (a_digits, b_digits, result_digits)):
        raise PolcaError("operand and answer positions must hold digit tokens 0-9")
    return np.stack([_number(a_digits), _number(b_digits)], axis=1), _number(result_digits)


def carries(a: np.ndarray, b: np.ndarray, powers: np.ndarray) -> np.ndarray:
    """The paper's carry rule: a int[N, 1], b int[N, 1], powers int[P] -> bool[N, P].

    The answer digit at place 10**p is "carry" iff a carry comes into place p from the places below it, i.e. iff
    ``(a mod 10**p) + (b mod 10**p) >= 10**p``. Equivalently, by grade-school addition, the operand digits at place
    p-1 plus the carry into place p-1 sum to 10 or more. So the 1s digit is never carry, and the leading digit (1000s
    for 3 digits) is carry iff ``a + b >= 10**num_digits``.
    """
    return (a % powers + b % powers) >= powers


def answer_labels(
    problems: np.ndarray,
    num_digits: int = 3,
    rule: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] = carries,
) -> tuple[np.ndarray, np.ndarray]:
    """Digit-place and flag labels of each answer token: (place int[N, num_digits + 1], flag bool[N, num_digits + 1]).

    Answer tokens are ordered most-significant first, as in the sequence; for 3 digits place 0..3 = 1000s..1s
    (``ANSWER_PLACES``). The flag is ``rule(a int[N, 1], b int[N, 1], powers int[num_digits + 1]) -> bool[N,
    num_digits + 1]`` with ``powers`` = 10**num_digits, ..., 10, 1: by default :func:`carries`, the paper's carry.
    """
    problems = _checked_problems(problems, num_digits)
    powers = 10 ** np.arange(num_digits, -1, -1)  # [num_digits + 1]: 10**num_digits, ..., 10, 1
    a, b = problems[:, :1], problems[:, 1:]
    flag = np.asarray(rule(a, b, powers))
    expected = (len(problems), num_digits + 1)
    if flag.dtype != bool or flag.shape != expected:
        name = getattr(rule, "__name__", repr(rule))
        raise PolcaError(f"the label rule {name} must map a int[N, 1], b int[N, 1], powers int[{num_digits + 1}] to "
                         f"bool{list(expected)}, got {flag.dtype}{list(flag.shape)}")
    place = np.broadcast_to(np.arange(num_digits + 1), flag.shape).copy()
    return place, flag


def training_batches(
    problems: np.ndarray, batch_size: int, operation: Operation = ADDITION
) -> Callable[[int], dict]:
    """Batches for ``polca_jax.training.train``: step i -> ``{"tokens": int[batch_size, 12]}`` (``a OP b = result``).

    Step i takes problems ``i * batch_size ... (i + 1) * batch_size - 1`` (cyclically), so a batch is a pure function
    of the step and one pass over the problems is one epoch (the paper: 10000 steps x 64 = 640,000 problems).
    """
    _check_positive_int("batch_size", batch_size)
    tokens = encode(problems, operation=operation)
    if batch_size > len(tokens):
        raise PolcaError(f"batch_size {batch_size} exceeds the number of problems {len(tokens)}")

    def batch(step: int) -> dict:
        if step < 0:
            raise PolcaError(f"step must be non-negative, got {step}")
        rows = (step * batch_size + np.arange(batch_size)) % len(tokens)
        return {"tokens": tokens[rows]}

    return batch


def make_loss_fns(graphdef: nnx.GraphDef) -> tuple[Callable, Callable]:
    """Pure loss functions of ``(params, batch)`` for the kernels, with ``batch = {"tokens": int[n_seq, 12]}``.

    Returns ``(per_sample_loss_fn, loss_fn)``: ``per_sample_loss_fn(params, batch) -> [n_seq, 4]`` is the
    cross-entropy of each answer digit (places 1000s..1s) predicted from the true prefix; ``loss_fn(params, batch)``
    is its mean, a scalar.
    """

    def per_sample_loss_fn(params: dict, batch: Mapping) -> jax.Array:
        tokens = _batch_tokens(batch)
        # Only the answer positions' logits: the last block runs its queries and MLP there alone (27% fewer FLOPs).
        logits = apply(graphdef, params, tokens[:, :-1], positions=ANSWER_INPUT_POSITIONS)
        return token_cross_entropy(logits, tokens[:, _ANSWER_TOKENS])

    def loss_fn(params: dict, batch: Mapping) -> jax.Array:
        return jnp.mean(per_sample_loss_fn(params, batch))

    return per_sample_loss_fn, loss_fn


@functools.partial(jax.jit, static_argnums=0)
def answer_accuracy(graphdef: nnx.GraphDef, params: dict, tokens: jax.Array) -> jax.Array:
    """Teacher-forced accuracy per answer place: tokens int[n_seq, 12] -> float[4] (1000s, 100s, 10s, 1s).

    Each answer digit is predicted greedily (argmax) from the true prefix, not from the model's own earlier digits.
    """
    tokens = _batch_tokens({"tokens": tokens})
    logits = apply(graphdef, params, tokens[:, :-1])
    predicted = jnp.argmax(logits[:, _ANSWER_LOGITS], axis=-1)
    return jnp.mean(predicted == tokens[:, _ANSWER_TOKENS], axis=0)


def token_texts(tokens: np.ndarray, symbol: str = "+") -> list[str]:
    """``"123+456=0⟦5⟧79"`` for every answer token of tokens int[N, 12], in sample order (N * 4 strings), with
    ``symbol`` (an :class:`Operation`'s) written at the operator position."""
    symbols = np.array([*map(str, range(10)), symbol, "="])
    texts = []
    for row in symbols[tokens]:
        for position in range(SEQUENCE_LENGTH - len(ANSWER_PLACES), SEQUENCE_LENGTH):
            texts.append("".join(row[:position]) + f"⟦{row[position]}⟧" + "".join(row[position + 1:]))
    return texts


def _batch_tokens(batch: Mapping) -> jax.Array:
    if not isinstance(batch, Mapping) or "tokens" not in batch:
        raise PolcaError('batch must be a dict with key "tokens" holding int[n_seq, 12]')
    tokens = jnp.asarray(batch["tokens"])
    if tokens.ndim != 2 or tokens.shape[1] != SEQUENCE_LENGTH:
        raise PolcaError(f"batch tokens must have shape [n_seq, {SEQUENCE_LENGTH}], got {tokens.shape}")
    return tokens


def _checked_problems(problems: np.ndarray, num_digits: int, name: str = "problems") -> np.ndarray:
    _check_positive_int("num_digits", num_digits)
    problems = np.asarray(problems)
    if problems.ndim != 2 or problems.shape[1] != 2:
        raise PolcaError(f"{name} must have shape [N, 2] (operand pairs), got {problems.shape}")
    if problems.size and not np.issubdtype(problems.dtype, np.integer):
        raise PolcaError(f"{name} must be integers, got dtype {problems.dtype}")
    problems = problems.astype(np.int64)
    if np.any((problems < 0) | (problems >= 10**num_digits)):
        raise PolcaError(f"{name} operands must lie in [0, {10**num_digits - 1}] for num_digits={num_digits}")
    return problems


def digits(numbers: np.ndarray, width: int) -> np.ndarray:
    """numbers int[N] -> int[N, width] decimal digits, most-significant first."""
    return (numbers[:, None] // 10 ** np.arange(width - 1, -1, -1)) % 10


def _number(digits: np.ndarray) -> np.ndarray:
    """int[N, width] decimal digits, most-significant first -> int[N]."""
    return digits.astype(np.int64) @ 10 ** np.arange(digits.shape[1] - 1, -1, -1)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PolcaError(f"{name} must be a positive int, got {value!r}")
