import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from polca_jax.pipeline.models import Transformer, TransformerConfig, apply, init_params, parameter_count, token_cross_entropy

TINY = TransformerConfig(vocab_size=12, context_length=12, num_layers=1, d_model=16, num_heads=2, d_mlp=32,
                         output_size=10)
jit_apply = jax.jit(apply, static_argnums=0)


def test_paper_parameter_counts():
    arithmetic = TransformerConfig(vocab_size=12, context_length=12, num_layers=3, d_model=512, num_heads=4,
                                   d_mlp=2048, output_size=10)
    english = TransformerConfig(vocab_size=30001, context_length=128, num_layers=3, d_model=512, num_heads=4,
                                d_mlp=2048)
    assert parameter_count(arithmetic) == 9_475_594
    assert parameter_count(english) == 40_274_737


def test_parameter_count_matches_initialised_params():
    _, params = init_params(TINY, seed=0)
    assert parameter_count(TINY) == sum(leaf.size for leaf in jax.tree.leaves(params))


def test_params_are_a_string_keyed_dict_and_logits_have_output_size():
    graphdef, params = init_params(TINY, seed=0)
    keys = [key.key for path, _ in jax.tree_util.tree_leaves_with_path(params) for key in path]
    assert all(isinstance(key, str) for key in keys)
    logits = jit_apply(graphdef, params, jnp.zeros((3, 11), jnp.int32))
    assert logits.shape == (3, 11, 10)


def test_causal():
    graphdef, params = init_params(TINY, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 12)
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 12)
    logits, changed_logits = jit_apply(graphdef, params, tokens), jit_apply(graphdef, params, changed)
    np.testing.assert_array_equal(logits[:, :7], changed_logits[:, :7])
    assert not np.allclose(logits[:, 7:], changed_logits[:, 7:])


@pytest.fixture
def x64():
    """Set ``jax_enable_x64`` for one test and restore the session's setting (conftest turns it on) afterwards."""
    previous = jax.config.jax_enable_x64

    def set_x64(value: bool):
        jax.config.update("jax_enable_x64", value)

    yield set_x64
    jax.config.update("jax_enable_x64", previous)


def test_float64(x64):
    x64(True)
    config = dataclasses.replace(TINY, param_dtype="float64")
    graphdef, params = init_params(config, seed=0)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype("float64")}
    assert apply(graphdef, params, jnp.zeros((1, 5), jnp.int32)).dtype == jnp.float64


def test_float64_without_x64_is_an_error(x64):
    x64(False)
    with pytest.raises(ValueError, match="jax_enable_x64"):
        init_params(dataclasses.replace(TINY, param_dtype="float64"), seed=0)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"d_model": 15}, "num_heads"),
        ({"num_layers": 0}, "num_layers"),
        ({"vocab_size": 2.0}, "vocab_size"),
        ({"output_size": -1}, "output_size"),
        ({"param_dtype": "int32"}, "param_dtype"),
    ],
)
def test_bad_config(change, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **change)


def test_too_long_input():
    model = nnx.eval_shape(lambda: Transformer(TINY, rngs=nnx.Rngs(0)))  # the check happens before any compute
    with pytest.raises(ValueError, match="context_length"):
        model(jnp.zeros((1, 13), jnp.int32))


def test_jvp_through_apply_matches_finite_difference():
    graphdef, params = init_params(TINY, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, 12)
    direction = jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape, x.dtype), params)

    def logits_of(p):
        return jit_apply(graphdef, p, tokens)

    _, tangent = jax.jit(lambda p, v: jax.jvp(logits_of, (p,), (v,)))(params, direction)
    eps = 1e-3
    plus = logits_of(jax.tree.map(lambda p, v: p + eps * v, params, direction))
    minus = logits_of(jax.tree.map(lambda p, v: p - eps * v, params, direction))
    np.testing.assert_allclose(tangent, (plus - minus) / (2 * eps), rtol=2e-2, atol=2e-2)


def test_token_cross_entropy():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    losses = token_cross_entropy(logits, jnp.array([[0, 2]]))
    np.testing.assert_allclose(losses, -np.log([[0.5, 0.8]]), rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        token_cross_entropy(logits, jnp.array([0, 2]))


TWO_LAYERS = dataclasses.replace(TINY, num_layers=2)


@pytest.mark.parametrize("positions", [(7, 8, 9, 10), slice(7, 11), (2, 5, 9), (0,), (3, 4), range(11)])
def test_logits_at_positions_equal_the_full_logits_there(positions):
    graphdef, params = init_params(TWO_LAYERS, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (5, 11), 0, 12)
    full = jit_apply(graphdef, params, tokens)
    index = positions if isinstance(positions, slice) else list(positions)
    part = jax.jit(lambda p, t: apply(graphdef, p, t, positions))(params, tokens)
    assert part.shape == full[:, index].shape
    np.testing.assert_allclose(part, full[:, index], rtol=1e-5, atol=1e-5)


def test_gradients_through_positions_equal_those_of_the_full_logits():
    graphdef, params = init_params(TWO_LAYERS, seed=0)
    tokens = jax.random.randint(jax.random.key(1), (3, 11), 0, 12)

    def loss(p, positions):
        logits = apply(graphdef, p, tokens, positions)
        return jnp.sum(jnp.sin(logits if positions is not None else logits[:, 7:11]))

    fast, full = (jax.jit(jax.grad(loss), static_argnums=1)(params, positions) for positions in ((7, 8, 9, 10), None))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), fast, full)


@pytest.mark.parametrize("positions, message", [
    ((3, 11), r"lie in \[0, 11\)"), ((5, 2), "increasing"), ((), "no position"), (slice(20, 30), "no position"),
    ("ab", "sequence of ints"),
])
def test_bad_positions(positions, message):
    graphdef, params = init_params(TINY, seed=0)
    with pytest.raises(ValueError, match=message):
        apply(graphdef, params, jnp.zeros((1, 11), jnp.int32), positions)
