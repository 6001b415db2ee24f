import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polca_jax.pipeline.tasks.arithmetic import (
    ANSWER_PLACES,
    OUTPUT_SIZE,
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
from polca_jax.pipeline.models import TransformerConfig, init_params, parameter_count


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
    assert encode(np.array([[718, 15]])).tolist() == [[7, 1, 8, 10, 0, 1, 5, 11, 0, 7, 3, 3]]
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
