"""Decoder-only transformer with TransformerLens' ``HookedTransformer`` layout.

The layout (untied embeddings, learned positions, biases on every projection, pre-LayerNorm blocks, a final
LayerNorm and an unembedding with bias) reproduces the paper's parameter counts exactly: 9,475,594 for the arithmetic
model and 40,274,737 for the English model. Initialisation follows TransformerLens' "gpt2" mode: every weight matrix
and embedding ~ N(0, (0.8 / sqrt(d_model))²), biases 0, LayerNorm scales 1. Attention is written out by hand
(einsum, causal mask, softmax) so forward-mode AD (``jax.jvp``) works through the whole model, and there is no dropout,
so the model is a deterministic function of its parameters.

Besides the NNX module, this file offers a pure functional view for kernels that take a params pytree:
``init_params`` gives ``(graphdef, params)`` with ``params`` a plain nested dict of arrays (string keys only, so an
orbax restore without a template gives back the same tree), and ``apply(graphdef, params, tokens)`` computes logits.
"""

import dataclasses
import math
import operator

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import polca_jax as pj
from polca_jax.errors import PolcaError

_LAYER_NORM_EPSILON = 1e-5  # TransformerLens' default.


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes of a :class:`Transformer`.

    Attributes:
      vocab_size: number of input tokens (rows of the token embedding).
      context_length: longest input sequence (rows of the positional embedding).
      num_layers: number of transformer blocks.
      d_model: width of the residual stream.
      num_heads: attention heads per block; must divide ``d_model``.
      d_mlp: hidden width of each block's MLP.
      output_size: number of logits per position; ``None`` means ``vocab_size``.
      param_dtype: dtype of parameters and activations, e.g. ``"float32"`` or ``"float64"`` (needs
        ``jax.config.update("jax_enable_x64", True)``).
    """

    vocab_size: int
    context_length: int
    num_layers: int
    d_model: int
    num_heads: int
    d_mlp: int
    output_size: int | None = None
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "num_layers", "d_model", "num_heads", "d_mlp"):
            _check_positive_int(name, getattr(self, name))
        if self.output_size is not None:
            _check_positive_int("output_size", self.output_size)
        if self.d_model % self.num_heads:
            raise PolcaError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
            )
        try:
            dtype = jnp.dtype(self.param_dtype)
        except TypeError as error:
            raise PolcaError(f"param_dtype {self.param_dtype!r} is not a dtype name") from error
        if not jnp.issubdtype(dtype, jnp.floating):
            raise PolcaError(f"param_dtype must be a floating dtype, got {self.param_dtype!r}")

    @property
    def output_vocab_size(self) -> int:
        """Number of logits per position: ``output_size``, or ``vocab_size`` when that is None."""
        return self.vocab_size if self.output_size is None else self.output_size

    @property
    def d_head(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.num_heads


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PolcaError(f"{name} must be a positive int, got {value!r}")


class _Attention(nnx.Module):
    """Causal multi-head self-attention with biased Q, K, V and output projections."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.num_heads = config.num_heads
        dense = _dense_factory(config, rngs)
        self.query = dense(config.d_model, config.d_model)
        self.key = dense(config.d_model, config.d_model)
        self.value = dense(config.d_model, config.d_model)
        self.output = dense(config.d_model, config.d_model)

    def __call__(self, x: jax.Array, queries: "Positions | None" = None) -> jax.Array:
        """x: [B, L, d_model] -> [B, L, d_model]; with ``queries`` (positions), only those rows: [B, Q, d_model].

        Keys and values are always computed at all L positions; the queries, the attention pattern and the output
        projection only at ``queries``, each attending causally to the positions up to its own.
        """
        batch, length, d_model = x.shape
        head = d_model // self.num_heads
        query_positions = jnp.arange(length) if queries is None else jnp.asarray(queries.indices)
        x_query = x if queries is None else queries.take(x)
        q = self.query(x_query).reshape(batch, x_query.shape[1], self.num_heads, head)
        k = self.key(x).reshape(batch, length, self.num_heads, head)
        v = self.value(x).reshape(batch, length, self.num_heads, head)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(head, x.dtype))
        causal = jnp.arange(length)[None, :] <= query_positions[:, None]
        weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x_query.shape)
        return self.output(mixed)


class _MLP(nnx.Module):
    """d_model -> d_mlp -> GELU (exact, erf form: TransformerLens' "gelu") -> d_model, with biases."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        dense = _dense_factory(config, rngs)
        self.hidden = dense(config.d_model, config.d_mlp)
        self.output = dense(config.d_mlp, config.d_model)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, L, d_model] -> [B, L, d_model]."""
        return self.output(jax.nn.gelu(self.hidden(x), approximate=False))


class _Block(nnx.Module):
    """Pre-LayerNorm block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.attention_norm = _layer_norm(config, rngs)
        self.attention = _Attention(config, rngs=rngs)
        self.mlp_norm = _layer_norm(config, rngs)
        self.mlp = _MLP(config, rngs=rngs)

    def __call__(self, x: jax.Array, queries: "Positions | None" = None) -> jax.Array:
        """x: [B, L, d_model] -> [B, L, d_model]; with ``queries`` (positions), only those rows: [B, Q, d_model]."""
        residual = x if queries is None else queries.take(x)
        x = residual + self.attention(self.attention_norm(x), queries)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nnx.Module):
    """Decoder-only transformer: tokens int[B, L] -> logits [B, L, config.output_vocab_size].

    On a mesh with a ``"model"`` axis, :data:`TENSOR_PARALLEL_RULES` split its attention by heads and its MLP by hidden
    units (tensor parallelism) instead of each parameter along its largest dimension.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.param_dtype)
        if dtype == jnp.float64 and not jax.config.jax_enable_x64:
            raise PolcaError(
                'param_dtype="float64" needs jax.config.update("jax_enable_x64", True) before building the model'
            )
        self.config = config
        init = _weight_init(config)
        self.token_embedding = nnx.Embed(
            config.vocab_size, config.d_model, dtype=dtype, param_dtype=dtype, embedding_init=init, rngs=rngs
        )
        self.position_embedding = nnx.Param(init(rngs.params(), (config.context_length, config.d_model), dtype))
        self.blocks = nnx.Dict({str(i): _Block(config, rngs=rngs) for i in range(config.num_layers)})
        self.final_norm = _layer_norm(config, rngs)
        self.unembedding = _dense_factory(config, rngs)(config.d_model, config.output_vocab_size)

    def __call__(self, tokens: jax.Array, positions=None) -> jax.Array:
        """tokens: int[B, L] with L <= context_length -> logits [B, L, output_vocab_size].

        ``positions`` (optional, static: a sequence of ints or a slice) asks for the logits at those positions only:
        ``[B, len(positions), output_vocab_size]``, equal (up to float rounding) to ``logits[:, positions]``, at less
        cost: positions after the last one asked for are not computed at all (attention is causal), and the last
        block runs its queries, attention output, MLP, final LayerNorm and unembedding only at ``positions`` (its
        keys and values still at every position). Use it when a loss reads only some positions.

        Token ids must lie in [0, vocab_size); out-of-range ids are not checked (they cannot be inside jit).
        """
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise PolcaError(f"tokens must have shape [batch, length], got shape {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise PolcaError(f"tokens must be integers, got dtype {tokens.dtype}")
        length = tokens.shape[1]
        if length > self.config.context_length:
            raise PolcaError(
                f"sequence length {length} exceeds the model's context_length {self.config.context_length}"
            )
        queries = None if positions is None else Positions.of(positions, length)
        if queries is not None:
            tokens = tokens[:, : queries.stop]  # causal: nothing after the last position asked for matters
            length = queries.stop
        x = self.token_embedding(tokens) + self.position_embedding[:length]
        last = self.config.num_layers - 1
        for i in range(self.config.num_layers):
            x = self.blocks[str(i)](x, queries if i == last else None)
        return self.unembedding(self.final_norm(x))


@dataclasses.dataclass(frozen=True)
class Positions:
    """Static positions of a sequence (sorted, distinct), read as a slice when they are contiguous."""

    indices: tuple[int, ...]

    @classmethod
    def of(cls, positions, length: int) -> "Positions":
        """Check ``positions`` (a sequence of ints or a slice) against a sequence of ``length`` tokens."""
        if isinstance(positions, slice):
            indices = tuple(range(length))[positions]
        else:
            try:
                indices = tuple(operator.index(p) for p in positions)
            except TypeError as error:
                raise PolcaError(
                    f"positions must be a slice or a sequence of ints (static, not traced), got {positions!r}"
                ) from error
        if not indices:
            raise PolcaError("positions selects no position")
        if any(not 0 <= p < length for p in indices):
            raise PolcaError(f"positions must lie in [0, {length}) for {length} input tokens, got {list(indices)}")
        if list(indices) != sorted(set(indices)):
            raise PolcaError(f"positions must be increasing and distinct, got {list(indices)}")
        return cls(indices)

    @property
    def stop(self) -> int:
        """One past the last position."""
        return self.indices[-1] + 1

    def take(self, x: jax.Array) -> jax.Array:
        """The rows at these positions of ``x [B, L, ...]``: ``[B, Q, ...]`` (a slice when contiguous)."""
        first = self.indices[0]
        if self.indices == tuple(range(first, self.stop)):
            return x[:, first : self.stop]
        return x[:, jnp.asarray(self.indices)]


def _weight_init(config: TransformerConfig):
    return jax.nn.initializers.normal(stddev=0.8 / math.sqrt(config.d_model))


def _dense_factory(config: TransformerConfig, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.param_dtype)
    init = _weight_init(config)

    def dense(in_features: int, out_features: int) -> nnx.Linear:
        return nnx.Linear(
            in_features, out_features, dtype=dtype, param_dtype=dtype, kernel_init=init, rngs=rngs
        )

    return dense


def _layer_norm(config: TransformerConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    dtype = jnp.dtype(config.param_dtype)
    return nnx.LayerNorm(
        config.d_model,
        epsilon=_LAYER_NORM_EPSILON,
        dtype=dtype,
        param_dtype=dtype,
        use_fast_variance=False,
        rngs=rngs,
    )


TENSOR_PARALLEL_RULES = pj.PartitionRules((
    (r"attention/(query|key|value)/kernel$", 1),  # [d_model, heads × d_head]: split by heads (column-parallel)
    (r"attention/(query|key|value)/bias$", 0),
    (r"attention/output/kernel$", 0),  # [heads × d_head, d_model]: row-parallel, the heads summed over "model"
    (r"mlp/hidden/kernel$", 1),  # [d_model, d_mlp]: split by hidden units
    (r"mlp/hidden/bias$", 0),
    (r"mlp/output/kernel$", 0),  # [d_mlp, d_model]
    (r"(attention|mlp)/output/bias$", None),
))
"""Megatron-style tensor parallelism for :class:`Transformer` (``with pj.partition_rules(TENSOR_PARALLEL_RULES)``, or
``polca run ... --mesh DxM --tensor-parallel``): attention split by heads and the MLP by hidden units over the mesh's
``"model"`` axis, so that XLA splits those activations too; embeddings and layer norms by the default rule."""


def parameter_count(config: TransformerConfig) -> int:
    """Number of scalar parameters of ``Transformer(config)``, from shapes only (nothing is allocated)."""
    counting_config = dataclasses.replace(config, param_dtype="float32")  # the count does not depend on dtype
    abstract_model = nnx.eval_shape(lambda: Transformer(counting_config, rngs=nnx.Rngs(0)))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(abstract_model, nnx.Param)))


def init_params(config: TransformerConfig, seed: int) -> tuple[nnx.GraphDef, dict]:
    """Initialise a model; returns ``(graphdef, params)``, params a nested dict of arrays with string keys."""
    model = Transformer(config, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def apply(graphdef: nnx.GraphDef, params: dict, tokens: jax.Array, positions=None) -> jax.Array:
    """Pure forward pass: tokens int[B, L] -> logits [B, L, output_vocab_size]. Jittable, differentiable in params.

    ``positions`` (static ints or a slice) returns only those positions' logits ``[B, Q, output_vocab_size]`` and
    skips the work no other position needs (see :meth:`Transformer.__call__`): a loss that reads a few positions
    should pass them.
    """
    return nnx.merge(graphdef, params)(tokens, positions)


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-position cross-entropy: logits [B, L, V], targets int[B, L] in [0, V) -> [B, L]."""
    if logits.shape[:-1] != targets.shape:
        raise PolcaError(
            f"logits shape {logits.shape} must be targets shape {targets.shape} plus a vocabulary axis"
        )
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)
