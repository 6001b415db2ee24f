import itertools
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.arithmetic import (
    ANSWER_PLACES,
    OPERATOR_TOKEN,
    OUTPUT_SIZE,
    SEQUENCE_LENGTH,
    VOCAB_SIZE,
    Operation,
    answer_accuracy,
    answer_labels,
    decode,
    encode,
    make_loss_fns,
    make_problems,
    paper_model_config,
    token_texts,
    training_batches,
)
from experiments.arithmetic.subtraction import SUBTRACTION, borrows, not_negative
from polca_jax.errors import PolcaError
from polca_jax.pipeline import load_task_definition
from polca_jax.pipeline.models import TransformerConfig, init_params, parameter_count

ROOT = Path(__file__).parents[1]
SUBTRACTION_TASK = "experiments/arithmetic/subtraction.py:make_task"


def grade_school_carries(a: int, b: int, num_digits: int) -> list[bool]:
    """Carry into each answer place, most-significant first, by adding digit by digit from the 1s place."""
    carry_into = [False]  # nothing is carried into the 1s place
    carry = 0
    for place in range(num_digits):
        digit_sum = (a // 10**place) % 10 + (b // 10**place) % 10 + carry
        carry = int(digit_sum >= 10)
        carry_into.append(bool(carry))
    return carry_into[::-1]


@pytest.mark.parametrize("num_digits", [1, 2])
def test_labels_match_grade_school_addition_on_all_pairs(num_digits):
    problems = np.array(list(itertools.product(range(10**num_digits), repeat=2)))
    place, carry = answer_labels(problems, num_digits=num_digits)
    expected = np.array([grade_school_carries(int(a), int(b), num_digits) for a, b in problems])
    np.testing.assert_array_equal(carry, expected)
    np.testing.assert_array_equal(place, np.tile(np.arange(num_digits + 1), (len(problems), 1)))


def test_labels_of_the_papers_figure_2_example():
    # 718 + 715 = 1433: 1000s carry, 100s no carry, 10s carry, 1s no carry.
    place, carry = answer_labels(np.array([[718, 715]]))
    assert len(ANSWER_PLACES) == place.shape[1] == 4
    assert carry.tolist() == [[True, False, True, False]]


@pytest.mark.parametrize("num_digits", [1, 2, 3])
def test_encode_decode_round_trip(num_digits):
    problems = make_problems(100, seed=0, num_digits=num_digits)
    tokens = encode(problems, num_digits=num_digits)
    assert tokens.shape == (100, 3 * num_digits + 3)
    assert tokens.min() >= 0 and tokens.max() < VOCAB_SIZE
    decoded, sums = decode(tokens, num_digits=num_digits)
    np.testing.assert_array_equal(decoded, problems)
    np.testing.assert_array_equal(sums, problems.sum(axis=1))


def test_encode_format():
    assert encode(np.array([[718, 15]])).tolist() == [[7, 1, 8, OPERATOR_TOKEN, 0, 1, 5, 11, 0, 7, 3, 3]]
    assert encode(np.array([[718, 15]]), operation=SUBTRACTION).tolist() == [[7, 1, 8, 10, 0, 1, 5, 11, 0, 7, 0, 3]]
    assert SEQUENCE_LENGTH == 12


def test_make_problems_is_deterministic_and_distinct():
    problems = make_problems(1000, seed=3)
    np.testing.assert_array_equal(problems, make_problems(1000, seed=3))
    assert not np.array_equal(problems, make_problems(1000, seed=4))
    assert len({tuple(p) for p in problems}) == 1000
    assert problems.min() >= 0 and problems.max() <= 999


def test_exclude_makes_sets_disjoint():
    evaluation = make_problems(50, seed=0, num_digits=1)
    training = make_problems(50, seed=1, exclude=evaluation, num_digits=1)  # all 100 pairs are used
    assert not {tuple(p) for p in evaluation} & {tuple(p) for p in training}
    with pytest.raises(ValueError, match="available"):
        make_problems(51, seed=1, exclude=evaluation, num_digits=1)


def grade_school_borrows(a: int, b: int, num_digits: int) -> list[bool]:
    """Borrow into each answer place, most-significant first, by subtracting digit by digit from the 1s place."""
    borrow_into = [False]  # nothing is borrowed into the 1s place
    borrow = 0
    for place in range(num_digits):
        difference = (a // 10**place) % 10 - (b // 10**place) % 10 - borrow
        borrow = int(difference < 0)
        borrow_into.append(bool(borrow))
    return borrow_into[::-1]


def test_the_borrow_rule_matches_grade_school_subtraction():
    pairs = np.random.default_rng(0).integers(0, 1000, size=(400, 2))
    place, borrow = answer_labels(pairs, rule=borrows)
    expected = np.array([grade_school_borrows(int(a), int(b), 3) for a, b in pairs])
    np.testing.assert_array_equal(borrow, expected)
    assert borrow[:, 1:3].any(axis=0).all() and not borrow[:, 3].any()  # borrows into the 100s and 10s, never 1s
    np.testing.assert_array_equal(borrow[:, 0], pairs[:, 0] < pairs[:, 1])  # into the 1000s only when negative
    np.testing.assert_array_equal(place, np.tile(np.arange(4), (len(pairs), 1)))


@pytest.mark.parametrize("rule", [lambda a, b, powers: (a % powers < b % powers).astype(int),
                                  lambda a, b, powers: a % powers[1:] < b % powers[1:]])
def test_a_label_rule_of_the_wrong_dtype_or_shape_is_refused(rule):
    with pytest.raises(PolcaError, match=r"label rule <lambda> must map .* to bool\[2, 4\]"):
        answer_labels(np.array([[718, 15], [1, 2]]), rule=rule)


def test_accept_keeps_the_accepted_pairs_of_the_same_draw_in_order():
    everything = make_problems(20_000, seed=5)
    accepted = make_problems(5000, seed=5, accept=not_negative)
    np.testing.assert_array_equal(accepted, everything[everything[:, 0] >= everything[:, 1]][:5000])
    evaluation = make_problems(100, seed=0, accept=not_negative)
    training = make_problems(5000, seed=5, exclude=evaluation, accept=not_negative)
    assert not {tuple(p) for p in evaluation} & {tuple(p) for p in training}
    assert np.all(training[:, 0] >= training[:, 1])
    make_problems(5050, seed=1, num_digits=2, accept=not_negative)  # 5050 two-digit pairs have a >= b
    with pytest.raises(PolcaError, match="only 5050 distinct 2-digit pairs that accept allows are available"):
        make_problems(5051, seed=1, num_digits=2, accept=not_negative)


@pytest.mark.parametrize("accept", [lambda a, b: (a >= b).astype(int), lambda a, b: a[:5] >= b[:5],
                                    lambda a, b: True])
def test_an_accept_that_is_not_one_bool_per_pair_is_refused(accept):
    with pytest.raises(PolcaError, match=r"accept must map operands a int\[M\], b int\[M\] to bool\[M\]"):
        make_problems(10, seed=0, accept=accept)


def test_subtraction_encode_decode_round_trip():
    problems = make_problems(500, seed=0, accept=not_negative)
    tokens = encode(problems, operation=SUBTRACTION)
    assert np.all(tokens[:, 3] == OPERATOR_TOKEN)
    decoded, results = decode(tokens)
    np.testing.assert_array_equal(decoded, problems)
    np.testing.assert_array_equal(results, problems[:, 0] - problems[:, 1])


def test_a_result_that_four_digits_cannot_write_is_refused():
    with pytest.raises(PolcaError, match=r"15 - 718 = -703 .*constrain the draw .* make_problems\(accept=\.\.\.\)"):
        encode(np.array([[718, 15], [15, 718]]), operation=SUBTRACTION)
    with pytest.raises(PolcaError, match=r"problem\(s\) have a result"):
        encode(make_problems(100, seed=0), operation=SUBTRACTION)  # an unconstrained draw has negative differences
    with pytest.raises(PolcaError, match=r"999 \* 999 = 998001"):
        encode(np.array([[999, 999]]), operation=Operation("*", np.multiply))
    with pytest.raises(PolcaError, match=r"operation '/' must map a int\[1\], b int\[1\] to int\[1\], got float64"):
        encode(np.array([[718, 15]]), operation=Operation("/", np.divide))


def test_token_texts_show_the_operator_symbol():
    problem = np.array([[718, 15]])
    assert token_texts(encode(problem)) == ["718+015=⟦0⟧733", "718+015=0⟦7⟧33", "718+015=07⟦3⟧3", "718+015=073⟦3⟧"]
    assert token_texts(encode(problem, operation=SUBTRACTION), SUBTRACTION.symbol) == [
        "718-015=⟦0⟧703", "718-015=0⟦7⟧03", "718-015=07⟦0⟧3", "718-015=070⟦3⟧"]


def test_the_subtraction_variant_builds_its_tiny_preset(tmp_path):
    definition = load_task_definition(SUBTRACTION_TASK)
    assert definition.default_preset == "cpu" and set(definition.presets) == {"tiny", "cpu"}
    assert definition.report_sections is None
    options = {k: v for k, v in definition.presets["tiny"].items() if k in definition.options()}
    task = definition.build(options, seed=0, workdir=tmp_path)
    assert set(task.labels) == {"borrow", "place", "skill", "digit"}
    assert task.labels["borrow"].qualifier is None and task.labels["borrow"].stratify_by == "place"
    for tokens in (task.eval_batch["tokens"], task.hessian_batch["tokens"], task.train_batches(3)["tokens"]):
        problems, results = decode(tokens)
        assert np.all(problems[:, 0] >= problems[:, 1])
        np.testing.assert_array_equal(results, problems[:, 0] - problems[:, 1])
    problems, _ = decode(task.eval_batch["tokens"])
    assert len(problems) == options["num_eval_problems"]
    np.testing.assert_array_equal(task.labels["borrow"].values, answer_labels(problems, rule=borrows)[1].reshape(-1))
    assert task.labels["borrow"].values.any()
    assert set(task.labels["skill"].values) <= {f"{place} {flag}" for place in ANSWER_PLACES
                                                for flag in ("borrow", "no borrow")}
    assert "10s borrow" in task.labels["skill"].values
    assert task.sample_texts == token_texts(task.eval_batch["tokens"], "-")


@pytest.mark.slow
def test_polca_runs_the_subtraction_variant_by_its_path(tmp_path):
    """From another directory, so that the file finds the arithmetic package without the clone on sys.path."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "polca_jax._command", "run", str(ROOT / SUBTRACTION_TASK),
                           "--preset", "tiny", "--out", str(out), "--quiet"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=1800)
    assert done.returncode == 0, done.stderr
    report = (out / "report" / "report.md").read_text()
    assert "3-digit subtraction (a >= b)" in report and "## Label set `borrow`" in report
    assert "carry" not in report  # neither the addition task's labels nor its paper sections


@pytest.mark.parametrize("problems", [np.array([1, 2]), np.array([[1000, 2]]), np.array([[1.5, 2.0]])])
def test_bad_problems(problems):
    with pytest.raises(ValueError, match="problems"):
        encode(problems)


def test_paper_model_config():
    assert parameter_count(paper_model_config()) == 9_475_594


def test_loss_fns_and_accuracy():
    config = TransformerConfig(vocab_size=VOCAB_SIZE, context_length=SEQUENCE_LENGTH, num_layers=1, d_model=16,
                               num_heads=2, d_mlp=32, output_size=OUTPUT_SIZE)
    graphdef, params = init_params(config, seed=0)
    per_sample_loss_fn, loss_fn = make_loss_fns(graphdef)
    batch = training_batches(make_problems(8, seed=0), batch_size=5)(1)
    per_sample = jax.jit(per_sample_loss_fn)(params, batch)
    assert per_sample.shape == (5, 4)
    assert np.all(np.isfinite(per_sample))
    np.testing.assert_allclose(jax.jit(loss_fn)(params, batch), jnp.mean(per_sample), rtol=1e-6)
    accuracy = answer_accuracy(graphdef, params, batch["tokens"])
    assert accuracy.shape == (4,) and np.all((accuracy >= 0) & (accuracy <= 1))
    with pytest.raises(ValueError, match="tokens"):
        per_sample_loss_fn(params, {"tokens": batch["tokens"][:, :-1]})


def test_training_batches_are_pure_and_cycle():
    problems = make_problems(10, seed=0)
    batches = training_batches(problems, batch_size=4)
    np.testing.assert_array_equal(batches(2)["tokens"], batches(2)["tokens"])
    np.testing.assert_array_equal(batches(2)["tokens"], encode(problems[[8, 9, 0, 1]]))
