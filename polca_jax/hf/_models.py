"""Pure-JAX ports of three Hugging Face causal language models: GPT-2, GPT-NeoX (Pythia) and Llama.

A model is a static :class:`HFModelConfig` (:func:`read_config` reads it from a ``config.json``) and a flat dict of
parameters keyed by the state-dict names transformers uses, each in transformers' own layout (GPT-2's ``Conv1D``
weights ``[in, out]``, GPT-NeoX's and Llama's ``nn.Linear`` weights ``[out, in]``): a checkpoint converts by a cast
(:func:`params_from_state_dict`) and back (:func:`state_dict_from_params`). :func:`logits` and :func:`token_losses`
are pure functions of that dict, their attention written out (einsum, causal mask, softmax; no fused kernel), so that
reverse mode, forward mode (``jax.jvp``) and forward-over-reverse (Hessian-vector products) all apply to them.
tests/torch/test_hf_models.py checks them against transformers' PyTorch models: logits, per-token gradients and
Hessian-vector products.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from polca_jax.errors import PolcaError

SUPPORTED_MODEL_TYPES = ("gpt2", "gpt_neox", "llama")
_HEAD = "lm_head.weight"
_HEAD_ALIASES = ("embed_out.weight",)  # the head's name in Pythia's checkpoints and save_pretrained's files
_HIGHEST = lax.Precision.HIGHEST
_CONV1D = "...i,io->...o"  # GPT-2's Conv1D: weight [in, out]
_LINEAR = "...i,oi->...o"  # nn.Linear: weight [out, in]
_NAMES_SHOWN = 5  # names listed in an error message, before the count of the others


def _gelu_fast(x):
    return 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names that the port implements (each checked against ACT2FN by the tests)
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": _gelu_exact,
    "gelu_python": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_fast": _gelu_fast,
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class HFModelConfig:
    """The architecture of a ported model: what :func:`logits` needs besides the parameters (hashable, so static).

    Attributes:
      model_type: ``"gpt2"``, ``"gpt_neox"`` or ``"llama"`` (:data:`SUPPORTED_MODEL_TYPES`).
      vocab_size: V, the rows of the token embedding and of the head.
      hidden_size: D, the width of the residual stream.
      num_layers: the transformer blocks.
      num_heads: attention (query) heads; they divide ``hidden_size``.
      intermediate_size: the MLP's hidden width.
      max_positions: the longest input the model reads (GPT-2's learned positions; GPT-NeoX's and Llama's
        ``max_position_embeddings``).
      layer_norm_eps: the epsilon of every layer norm (Llama's RMSNorm: ``rms_norm_eps``).
      activation: the MLP's activation by its transformers name: ``"gelu"`` (exact, erf), ``"gelu_new"``,
        ``"gelu_pytorch_tanh"`` (tanh approximation), ``"gelu_fast"``, ``"quick_gelu"``, ``"relu"``, ``"silu"``
        and their aliases ``"gelu_python"``, ``"gelu_python_tanh"``, ``"swish"``.
      tie_word_embeddings: the head is the token embedding (no ``lm_head.weight`` parameter).
      rotary_dims: GPT-NeoX and Llama: rotary dimensions per head, even; GPT-NeoX's
        ``int(head_dim · partial_rotary_factor)``, Llama's ``head_dim`` (the whole head).
      rotary_base: GPT-NeoX and Llama: the rotary base (``rope_theta``).
      use_parallel_residual: GPT-NeoX: ``x + attn(ln1(x)) + mlp(ln2(x))`` when True, else the sequential
        ``y = x + attn(ln1(x)); y + mlp(ln2(y))``.
      attention_bias: GPT-NeoX and Llama: the attention's projections have biases.
      mlp_bias: Llama: the MLP's three projections have biases (GPT-2's and GPT-NeoX's MLPs always do).
      num_kv_heads: Llama: key/value heads where fewer than ``num_heads`` (grouped-query attention: each serves
        ``num_heads // num_kv_heads`` consecutive query heads, which it divides); None: as many as ``num_heads``.
      explicit_head_dim: Llama: the width of one head where the config's ``head_dim`` differs from
        ``hidden_size // num_heads``; None: that quotient (:attr:`head_dim`).

    GPT-2 ignores the GPT-NeoX and Llama fields (its blocks are sequential, with biases everywhere, and its positions
    learned); Llama ignores ``use_parallel_residual`` (its blocks are sequential).

    Raises:
      PolcaError: for a model type or activation the port does not implement, sizes below 1, heads that do not
        divide ``hidden_size``, rotary dimensions that are odd, negative or wider than a head, key/value heads that
        do not divide ``num_heads``, or ``num_kv_heads`` or ``explicit_head_dim`` set for a family other than Llama.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    layer_norm_eps: float
    activation: str
    tie_word_embeddings: bool
    rotary_dims: int = 0
    rotary_base: float = 10000.0
    use_parallel_residual: bool = True
    attention_bias: bool = True
    mlp_bias: bool = True
    num_kv_heads: int | None = None
    explicit_head_dim: int | None = None

    def __post_init__(self):
        _check_model_type(self.model_type)
        if self.activation not in _ACTIVATIONS:
            raise PolcaError(
                f"activation {self.activation!r} is not implemented; the port has {', '.join(sorted(_ACTIVATIONS))}"
            )
        sizes = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions")
        small = [f"{name}={getattr(self, name)}" for name in sizes if getattr(self, name) < 1]
        if small:
            raise PolcaError(f"model sizes must be at least 1, got {', '.join(small)}")
        if self.hidden_size % self.num_heads:
            raise PolcaError(f"num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}")
        llama_only = [f"{name}={getattr(self, name)}" for name in ("num_kv_heads", "explicit_head_dim")
                      if getattr(self, name) is not None]
        if llama_only and self.model_type != "llama":
            raise PolcaError(f"{', '.join(llama_only)}: only the llama port has grouped-query attention and a head "
                             f"width apart from hidden_size // num_heads, not the {self.model_type} port")
        if self.kv_heads < 1 or self.num_heads % self.kv_heads:
            raise PolcaError(f"num_kv_heads={self.num_kv_heads} does not divide num_heads={self.num_heads}")
        if self.head_dim < 1:
            raise PolcaError(f"explicit_head_dim must be at least 1, got {self.explicit_head_dim}")
        if not (0 <= self.rotary_dims <= self.head_dim and self.rotary_dims % 2 == 0):
            raise PolcaError(
                f"rotary_dims must be even and between 0 and the head dimension {self.head_dim}, got {self.rotary_dims}"
            )

    @property
    def head_dim(self) -> int:
        """The width of one attention head: ``explicit_head_dim`` if set, else ``hidden_size // num_heads``."""
        return self.hidden_size // self.num_heads if self.explicit_head_dim is None else self.explicit_head_dim

    @property
    def kv_heads(self) -> int:
        """The key/value heads: ``num_kv_heads`` if set, else ``num_heads``."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads


@dataclasses.dataclass(frozen=True)
class _Family:
    """What differs between the ported families: names, a config reader, parameter shapes and the blocks."""

    prefix: str  # of the base model's parameters in the causal LM's state dict
    embedding: str  # the token embedding's name (the head, when tied)
    buffers: tuple[str, ...]  # name endings of non-parameter buffers that old checkpoints carry
    read: Callable[[Mapping[str, Any]], HFModelConfig]
    shapes: Callable[[HFModelConfig], dict[str, tuple[int, ...]]]
    hidden_states: Callable[[HFModelConfig, Mapping[str, jax.Array], jax.Array], jax.Array]

    def canonical_name(self, name: str) -> str | None:
        """A state-dict key under the name transformers 5 uses; None for a buffer."""
        if name in _HEAD_ALIASES:
            return _HEAD
        if ("." + name).endswith(self.buffers):  # also a base model's own: rotary_emb.inv_freq
            return None
        return name if name == _HEAD or name.startswith(self.prefix) else self.prefix + name


# ----------------------------------------------------------------------------------------------------- configuration


def read_config(source: str | os.PathLike | Mapping[str, Any]) -> HFModelConfig:
    """The :class:`HFModelConfig` of a GPT-2, GPT-NeoX or Llama checkpoint, from its transformers configuration.

    GPT-2 reads ``vocab_size``, ``n_embd``, ``n_layer``, ``n_head``, ``n_inner`` (None: 4·``n_embd``),
    ``n_positions``, ``layer_norm_epsilon``, ``activation_function`` and ``tie_word_embeddings`` (default True).
    GPT-NeoX reads ``vocab_size``, ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``intermediate_size``, ``max_position_embeddings``, ``layer_norm_eps``, ``hidden_act``,
    ``tie_word_embeddings`` (default False), ``use_parallel_residual`` (default True), ``attention_bias`` (default
    True) and the rotary embedding in either spelling: transformers 5's ``rope_parameters`` (``rope_theta``,
    ``partial_rotary_factor``) or the legacy ``rotary_emb_base``, ``rotary_pct`` of Pythia's hub configs (defaults
    10000 and 0.25, as in transformers). Llama reads ``vocab_size``, ``hidden_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads`` (default: ``num_attention_heads``), ``head_dim`` (default:
    ``hidden_size // num_attention_heads``), ``intermediate_size``, ``max_position_embeddings``, ``rms_norm_eps``
    (default 1e-6), ``hidden_act`` (default ``"silu"``), ``tie_word_embeddings`` (default False), ``attention_bias``
    and ``mlp_bias`` (default False) and the rotary base, rotary on the whole head: ``rope_parameters``'
    ``rope_theta`` or the legacy top-level ``rope_theta`` (default 10000). The sizes have no defaults; the other
    fields default as in transformers.

    Args:
      source: a directory written by ``save_pretrained`` (its ``config.json`` is read), the path of a
        ``config.json``, its contents as a dict, or a transformers config object (its ``to_dict()`` is read).

    Returns:
      The config.

    Raises:
      PolcaError: for a missing or unreadable file, a ``model_type`` other than those of
        :data:`SUPPORTED_MODEL_TYPES`, a missing size, or an option the port does not implement (GPT-2's
        ``scale_attn_weights`` False, ``scale_attn_by_inverse_layer_idx``, ``reorder_and_upcast_attn`` or
        ``add_cross_attention`` True; GPT-NeoX or Llama rotary scaling other than ``"default"``, such as
        ``"linear"``, ``"dynamic"``, ``"yarn"`` or ``"llama3"``; an activation outside :class:`HFModelConfig`'s
        list), naming it; for Llama key/value heads that do not divide the attention heads.

    Example:
      A small GPT-2 built with transformers (the other examples of :mod:`polca_jax.hf` use ``model``, ``config``,
      ``params`` and ``tokens``):

      >>> import numpy as np
      >>> import torch
      >>> import transformers
      >>> from polca_jax.hf import params_from_state_dict, read_config
      >>> _ = torch.manual_seed(0)
      >>> model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      ...     vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)).eval()
      >>> config = read_config(model.config.to_dict())
      >>> config.model_type, config.num_layers, config.intermediate_size, config.tie_word_embeddings
      ('gpt2', 2, 64, True)
      >>> params = params_from_state_dict(model.state_dict(), config)
      >>> tokens = np.array([[3, 14, 15, 9, 2, 6]])
    """
    values = _config_values(source)
    model_type = values.get("model_type")
    _check_model_type(model_type)
    return _FAMILIES[model_type].read(values)


def _check_model_type(model_type) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(SUPPORTED_MODEL_TYPES)
        raise PolcaError(f"model_type {model_type!r} is not supported: polca_jax.hf ports {supported}")


def _config_values(source) -> dict[str, Any]:
    """The configuration's fields from a dict, a config object, a ``config.json`` or the directory holding one."""
    if isinstance(source, Mapping):
        return dict(source)
    if hasattr(source, "to_dict"):
        return source.to_dict()
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise PolcaError(f"cannot read the model configuration {path}: {error}") from error


def _required(values: Mapping[str, Any], key: str) -> Any:
    if values.get(key) is None:
        raise PolcaError(f"the model configuration has no {key!r}")
    return values[key]


def _refuse_unsupported(values: Mapping[str, Any], supported: Mapping[str, Any], model_type: str) -> None:
    """Raise, naming each option whose value (or transformers' default) is not the one the port implements."""
    found = [f"{key}={values[key]!r} (the port implements {value!r})"
             for key, value in supported.items() if values.get(key, value) != value]
    if found:
        raise PolcaError(f"the {model_type} port does not implement {'; '.join(found)}")


def _read_gpt2(values: Mapping[str, Any]) -> HFModelConfig:
    _refuse_unsupported(values, {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                                 "reorder_and_upcast_attn": False, "add_cross_attention": False}, "gpt2")
    hidden = _required(values, "n_embd")
    inner = values.get("n_inner")
    return HFModelConfig(
        model_type="gpt2",
        vocab_size=_required(values, "vocab_size"),
        hidden_size=hidden,
        num_layers=_required(values, "n_layer"),
        num_heads=_required(values, "n_head"),
        intermediate_size=4 * hidden if inner is None else inner,
        max_positions=_required(values, "n_positions"),
        layer_norm_eps=values.get("layer_norm_epsilon", 1e-5),
        activation=values.get("activation_function", "gelu_new"),
        tie_word_embeddings=values.get("tie_word_embeddings", True),
    )


def _rope_parameters(values: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """The rotary embedding's parameters: transformers' ``rope_scaling`` (legacy) or ``rope_parameters``, which the
    caller completes from legacy top-level fields; raises unless its type is the default (unscaled) one."""
    rope = dict(values.get("rope_scaling") or values.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise PolcaError(
            f"the {model_type} port implements only the default rotary embedding, not rope_type {rope_type!r}")
    return rope


def _decoder_sizes(values: Mapping[str, Any]) -> dict[str, int]:
    """The sizes GPT-NeoX's and Llama's configs spell alike (transformers' names), as HFModelConfig fields."""
    return dict(vocab_size=_required(values, "vocab_size"), hidden_size=_required(values, "hidden_size"),
                num_layers=_required(values, "num_hidden_layers"), num_heads=_required(values, "num_attention_heads"),
                intermediate_size=_required(values, "intermediate_size"),
                max_positions=_required(values, "max_position_embeddings"))


def _read_gpt_neox(values: Mapping[str, Any]) -> HFModelConfig:
    rope = _rope_parameters(values, "gpt_neox")  # completed by the legacy rotary_emb_base / rotary_pct
    hidden, heads = _required(values, "hidden_size"), _required(values, "num_attention_heads")
    rotary_fraction = rope.get("partial_rotary_factor", values.get("rotary_pct", 0.25))
    return HFModelConfig(
        model_type="gpt_neox",
        **_decoder_sizes(values),
        layer_norm_eps=values.get("layer_norm_eps", 1e-5),
        activation=values.get("hidden_act", "gelu"),
        tie_word_embeddings=values.get("tie_word_embeddings", False),
        rotary_dims=int(hidden // heads * rotary_fraction),
        rotary_base=float(rope.get("rope_theta", values.get("rotary_emb_base", 10000.0))),
        use_parallel_residual=values.get("use_parallel_residual", True),
        attention_bias=values.get("attention_bias", True),
    )


def _read_llama(values: Mapping[str, Any]) -> HFModelConfig:
    rope = _rope_parameters(values, "llama")  # completed by the legacy top-level rope_theta
    hidden, heads = _required(values, "hidden_size"), _required(values, "num_attention_heads")
    kv_heads, head_dim = values.get("num_key_value_heads") or heads, values.get("head_dim") or hidden // heads
    return HFModelConfig(
        model_type="llama",
        **_decoder_sizes(values),
        layer_norm_eps=values.get("rms_norm_eps", 1e-6),
        activation=values.get("hidden_act", "silu"),
        tie_word_embeddings=values.get("tie_word_embeddings", False),
        rotary_dims=head_dim,
        rotary_base=float(rope.get("rope_theta", values.get("rope_theta", 10000.0))),
        use_parallel_residual=False,
        attention_bias=values.get("attention_bias", False),
        mlp_bias=values.get("mlp_bias", False),
        num_kv_heads=None if kv_heads == heads else kv_heads,  # None where they equal, so equal models compare equal
        explicit_head_dim=None if head_dim == hidden // heads else head_dim,
    )


# -------------------------------------------------------------------------------------------------------- parameters


def _dense_shapes(name: str, fan_in: int, fan_out: int, layout: str, bias: bool = True) -> dict[str, tuple]:
    weight = (fan_in, fan_out) if layout == _CONV1D else (fan_out, fan_in)
    return {f"{name}.weight": weight, **({f"{name}.bias": (fan_out,)} if bias else {})}


def _norm_shapes(name: str, width: int, bias: bool = True) -> dict[str, tuple]:
    return {f"{name}.weight": (width,), **({f"{name}.bias": (width,)} if bias else {})}


def _gpt2_shapes(config: HFModelConfig) -> dict[str, tuple[int, ...]]:
    d, m = config.hidden_size, config.intermediate_size
    shapes = {"transformer.wte.weight": (config.vocab_size, d), "transformer.wpe.weight": (config.max_positions, d)}
    for i in range(config.num_layers):
        block = f"transformer.h.{i}."
        shapes |= _norm_shapes(block + "ln_1", d)
        shapes |= _dense_shapes(block + "attn.c_attn", d, 3 * d, _CONV1D)
        shapes |= _dense_shapes(block + "attn.c_proj", d, d, _CONV1D)
        shapes |= _norm_shapes(block + "ln_2", d)
        shapes |= _dense_shapes(block + "mlp.c_fc", d, m, _CONV1D)
        shapes |= _dense_shapes(block + "mlp.c_proj", m, d, _CONV1D)
    return shapes | _norm_shapes("transformer.ln_f", d)


def _gpt_neox_shapes(config: HFModelConfig) -> dict[str, tuple[int, ...]]:
    d, m, bias = config.hidden_size, config.intermediate_size, config.attention_bias
    shapes = {"gpt_neox.embed_in.weight": (config.vocab_size, d)}
    for i in range(config.num_layers):
        layer = f"gpt_neox.layers.{i}."
        shapes |= _norm_shapes(layer + "input_layernorm", d)
        shapes |= _norm_shapes(layer + "post_attention_layernorm", d)
        shapes |= _dense_shapes(layer + "attention.query_key_value", d, 3 * d, _LINEAR, bias)
        shapes |= _dense_shapes(layer + "attention.dense", d, d, _LINEAR, bias)
        shapes |= _dense_shapes(layer + "mlp.dense_h_to_4h", d, m, _LINEAR)
        shapes |= _dense_shapes(layer + "mlp.dense_4h_to_h", m, d, _LINEAR)
    return shapes | _norm_shapes("gpt_neox.final_layer_norm", d)


def _llama_shapes(config: HFModelConfig) -> dict[str, tuple[int, ...]]:
    d, m = config.hidden_size, config.intermediate_size
    attention_bias, mlp_bias = config.attention_bias, config.mlp_bias
    queries, keys = config.num_heads * config.head_dim, config.kv_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, d)}
    for i in range(config.num_layers):
        layer = f"model.layers.{i}."
        shapes |= _dense_shapes(layer + "self_attn.q_proj", d, queries, _LINEAR, attention_bias)
        shapes |= _dense_shapes(layer + "self_attn.k_proj", d, keys, _LINEAR, attention_bias)
        shapes |= _dense_shapes(layer + "self_attn.v_proj", d, keys, _LINEAR, attention_bias)
        shapes |= _dense_shapes(layer + "self_attn.o_proj", queries, d, _LINEAR, attention_bias)
        shapes |= _dense_shapes(layer + "mlp.gate_proj", d, m, _LINEAR, mlp_bias)
        shapes |= _dense_shapes(layer + "mlp.up_proj", d, m, _LINEAR, mlp_bias)
        shapes |= _dense_shapes(layer + "mlp.down_proj", m, d, _LINEAR, mlp_bias)
        shapes |= _norm_shapes(layer + "input_layernorm", d, bias=False)
        shapes |= _norm_shapes(layer + "post_attention_layernorm", d, bias=False)
    return shapes | _norm_shapes("model.norm", d, bias=False)


def _parameter_shapes(config: HFModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in transformers' state-dict order; the head only when untied."""
    family = _FAMILIES[config.model_type]
    head = {} if config.tie_word_embeddings else {_HEAD: (config.vocab_size, config.hidden_size)}
    return family.shapes(config) | head


def num_params(config: HFModelConfig) -> int:
    """The number of parameters of the ported model (a tied head counted once, with the embedding).

    Args:
      config: the model's configuration.

    Returns:
      The total size of the leaves of :func:`params_from_state_dict`'s dict.
    """
    return sum(math.prod(shape) for shape in _parameter_shapes(config).values())


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "") + f" ({len(names)})"


def _check_shapes(config: HFModelConfig, shapes: Mapping[str, tuple], what: str, labels=None) -> None:
    """Raise unless ``shapes`` (name -> shape) has exactly the model's parameters with their shapes.

    ``labels`` maps a name to the one the caller gave (before aliases), for the message."""
    labels = labels or {}
    expected = _parameter_shapes(config)
    problems = []
    missing = [name for name in expected if name not in shapes]
    unexpected = [labels.get(name, name) for name in shapes if name not in expected]
    wrong = [f"{labels.get(name, name)} {tuple(shape)} (expected {expected[name]})"
             for name, shape in shapes.items() if name in expected and tuple(shape) != expected[name]]
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_listed(wrong)}")
    if problems:
        raise PolcaError(f"{what} does not fit the {config.model_type} config: {'; '.join(problems)}")


def _to_numpy(value) -> np.ndarray:
    """A numpy array of an array-like or a torch tensor (bfloat16 tensors, which numpy cannot hold, as float32)."""
    if hasattr(value, "detach"):  # a torch tensor; torch is not a dependency of polca_jax
        value = value.detach().cpu()
        return (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()
    return np.asarray(value)


def params_from_state_dict(
    state: Mapping[str, Any], config: HFModelConfig, dtype: jnp.dtype = jnp.float32
) -> dict[str, jax.Array]:
    """The parameter dict of a transformers state dict: the same names and layouts, cast to ``dtype``.

    Keys are renamed to transformers 5's names: Pythia's ``embed_out.weight`` is ``lm_head.weight``, and a base
    model's keys (``h.0.attn.c_attn.weight``, ``layers.0.attention.dense.weight``, ``layers.0.mlp.up_proj.weight``)
    get the causal LM's prefix (``transformer.``, ``gpt_neox.``, ``model.``). Buffers that old checkpoints carry
    (GPT-2's ``attn.bias``, ``attn.masked_bias``; GPT-NeoX's ``attention.bias``, ``attention.masked_bias``,
    ``rotary_emb.inv_freq``; Llama's ``rotary_emb.inv_freq``) are dropped. With tied embeddings the head is the
    token embedding: a ``lm_head.weight`` in ``state`` is dropped (it must equal the embedding), so a gradient
    reaches the one leaf.

    Args:
      state: name -> array: numpy arrays (``safetensors.numpy.load_file``), torch tensors (``model.state_dict()``)
        or anything ``np.asarray`` reads; float16 and bfloat16 are fine.
      config: the model's configuration (:func:`read_config`).
      dtype: the parameters' dtype.

    Returns:
      A flat dict, name -> array, in transformers' layouts: GPT-2's ``Conv1D`` weights ``[in, out]`` (e.g.
      ``transformer.h.0.attn.c_attn.weight [D, 3D]``), GPT-NeoX's and Llama's ``nn.Linear`` weights ``[out, in]``
      (e.g. ``gpt_neox.layers.0.attention.query_key_value.weight [3D, D]``,
      ``model.layers.0.self_attn.k_proj.weight [num_kv_heads · head_dim, D]``), embeddings ``[V, D]``, the untied
      head ``lm_head.weight [V, D]``.

    Raises:
      PolcaError: for missing keys, unexpected keys, wrong shapes (each listed: the first few names and the count),
        two keys that are one parameter (``lm_head.weight`` and ``embed_out.weight``), or a tied head that differs
        from the embedding.

    Example:
      ``model`` and ``config``: :func:`read_config`'s example (a GPT-2 with tied embeddings).

      >>> params = params_from_state_dict(model.state_dict(), config)
      >>> len(params), "lm_head.weight" in params, params["transformer.h.0.attn.c_attn.weight"].shape
      (28, False, (16, 48))
    """
    family = _FAMILIES[config.model_type]
    arrays, labels = {}, {}
    for key, value in state.items():
        name = family.canonical_name(key)
        if name is None:
            continue
        if name in arrays:
            raise PolcaError(f"the state dict has both {labels[name]!r} and {key!r}, which are the one {name!r}")
        arrays[name], labels[name] = _to_numpy(value), key
    if config.tie_word_embeddings and _HEAD in arrays:
        head = arrays.pop(_HEAD)
        embedding = arrays.get(family.embedding)
        if embedding is not None and not np.array_equal(head, embedding):
            raise PolcaError(
                f"the config ties the head to {family.embedding!r}, but the state dict's {labels[_HEAD]!r} differs "
                "from it; set tie_word_embeddings=False to keep both"
            )
    _check_shapes(config, {name: array.shape for name, array in arrays.items()}, "the state dict", labels)
    return {name: jnp.asarray(arrays[name], dtype) for name in _parameter_shapes(config)}


def state_dict_from_params(params: Mapping[str, Any], config: HFModelConfig) -> dict[str, np.ndarray]:
    """The transformers state dict of a parameter dict: the inverse of :func:`params_from_state_dict`.

    With tied embeddings the dict also holds ``lm_head.weight``, a copy of the token embedding, as
    ``model.state_dict()`` does: so ``model.load_state_dict(state_dict_from_params(params, config))`` loads into a
    transformers model strictly, ``safetensors.numpy.save_file`` writes a file that ``from_pretrained`` reads, and
    :func:`params_from_state_dict` of it gives ``params`` back.

    Args:
      params: the parameter dict (:func:`params_from_state_dict`'s names and shapes).
      config: the model's configuration.

    Returns:
      name -> numpy array (writable copies, in the parameters' dtype), in transformers' state-dict order.

    Raises:
      PolcaError: when ``params`` has missing or unexpected keys or wrong shapes.

    Example:
      ``model``, ``config`` and ``params``: :func:`read_config`'s example.

      >>> state = state_dict_from_params(params, config)
      >>> _ = model.load_state_dict({name: torch.from_numpy(array) for name, array in state.items()}, strict=True)
      >>> sorted(state) == sorted(model.state_dict())
      True
    """
    _check_params(config, params)
    state = {name: np.array(params[name]) for name in _parameter_shapes(config)}
    if config.tie_word_embeddings:
        state[_HEAD] = state[_FAMILIES[config.model_type].embedding].copy()
    return state


def _check_params(config: HFModelConfig, params: Mapping[str, Any]) -> None:
    if not isinstance(params, Mapping):
        raise PolcaError(f"params must be a dict of arrays (params_from_state_dict), got {type(params).__name__}")
    _check_shapes(config, {name: jnp.shape(leaf) for name, leaf in params.items()}, "params")


# ------------------------------------------------------------------------------------------------------------ layers


def _dense(params: Mapping[str, jax.Array], name: str, x: jax.Array, layout: str) -> jax.Array:
    """``x @ weight + bias`` with the weight in ``layout`` (:data:`_CONV1D` or :data:`_LINEAR`); no bias if absent."""
    y = jnp.einsum(layout, x, params[f"{name}.weight"], precision=_HIGHEST)
    bias = params.get(f"{name}.bias")
    return y if bias is None else y + bias


def _layer_norm(params: Mapping[str, jax.Array], name: str, x: jax.Array, eps: float) -> jax.Array:
    mean = x.mean(axis=-1, keepdims=True)
    variance = jnp.square(x - mean).mean(axis=-1, keepdims=True)
    return (x - mean) * lax.rsqrt(variance + eps) * params[f"{name}.weight"] + params[f"{name}.bias"]


def _rms_norm(params: Mapping[str, jax.Array], name: str, x: jax.Array, eps: float) -> jax.Array:
    """Llama's RMSNorm: normalised in float32 (or wider: a float64 model stays float64), cast back, then scaled."""
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    normalised = wide * lax.rsqrt(jnp.square(wide).mean(axis=-1, keepdims=True) + eps)
    return params[f"{name}.weight"] * normalised.astype(x.dtype)


def _mlp(params, config: HFModelConfig, names: tuple[str, ...], x: jax.Array, layout: str) -> jax.Array:
    """``out(act(fc(x)))`` for ``names`` (fc, out); the gated ``out(act(gate(x)) * up(x))`` for (gate, up, out)."""
    *inputs, output = names
    hidden = _ACTIVATIONS[config.activation](_dense(params, inputs[0], x, layout))
    for name in inputs[1:]:
        hidden = hidden * _dense(params, name, x, layout)
    return _dense(params, output, hidden, layout)


def _causal_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
    """Causal softmax attention (each position to itself and earlier ones): ``[B, T, H, hd]`` -> ``[B, T, H·hd]``.

    ``key`` and ``value`` are ``[B, T, H_kv, hd]``, H_kv dividing H: each key/value head serves H / H_kv consecutive
    query heads (transformers' ``repeat_kv``; H_kv = H without grouped-query attention)."""
    groups = query.shape[2] // key.shape[2]
    key, value = jnp.repeat(key, groups, axis=2), jnp.repeat(value, groups, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, precision=_HIGHEST) * query.shape[-1] ** -0.5
    length = query.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    weights = jax.nn.softmax(jnp.where(causal, scores, jnp.finfo(scores.dtype).min), axis=-1)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, value, precision=_HIGHEST)
    return mixed.reshape(*mixed.shape[:2], -1)


def _rotary_tables(config: HFModelConfig, length: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin ``[T, rotary_dims]`` of GPT-NeoX's and Llama's rotary embedding, in float32 as transformers does."""
    dims = config.rotary_dims
    inverse_frequencies = 1.0 / (np.float32(config.rotary_base) ** (np.arange(0, dims, 2, dtype=np.float32) / dims))
    angles = np.arange(length, dtype=np.float32)[:, None] * inverse_frequencies
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def _rotate(x: jax.Array, cos: np.ndarray, sin: np.ndarray) -> jax.Array:
    """The rotary embedding of ``x [B, T, H, hd]`` on its first ``rotary_dims`` (the rotate-half convention)."""
    dims = cos.shape[-1]
    rotary, rest = x[..., :dims], x[..., dims:]
    halves = jnp.concatenate([-rotary[..., dims // 2:], rotary[..., : dims // 2]], axis=-1)
    return jnp.concatenate([rotary * cos[:, None] + halves * sin[:, None], rest], axis=-1)


def _gpt2_hidden_states(config: HFModelConfig, params, tokens: jax.Array) -> jax.Array:
    """GPT-2's final hidden states ``[B, T, D]``: learned positions, pre-LN blocks, final layer norm."""
    eps, heads = config.layer_norm_eps, (config.num_heads, config.head_dim)
    x = params["transformer.wte.weight"][tokens] + params["transformer.wpe.weight"][: tokens.shape[1]]
    for i in range(config.num_layers):
        block = f"transformer.h.{i}."
        qkv = _dense(params, block + "attn.c_attn", _layer_norm(params, block + "ln_1", x, eps), _CONV1D)
        query, key, value = (part.reshape(*part.shape[:2], *heads) for part in jnp.split(qkv, 3, axis=-1))
        x = x + _dense(params, block + "attn.c_proj", _causal_attention(query, key, value), _CONV1D)
        x = x + _mlp(params, config, (block + "mlp.c_fc", block + "mlp.c_proj"),
                     _layer_norm(params, block + "ln_2", x, eps), _CONV1D)
    return _layer_norm(params, "transformer.ln_f", x, eps)


def _gpt_neox_hidden_states(config: HFModelConfig, params, tokens: jax.Array) -> jax.Array:
    """GPT-NeoX's final hidden states ``[B, T, D]``: rotary attention, parallel or sequential residual."""
    eps = config.layer_norm_eps
    x = params["gpt_neox.embed_in.weight"][tokens]
    cos, sin = _rotary_tables(config, tokens.shape[1], x.dtype)
    for i in range(config.num_layers):
        layer = f"gpt_neox.layers.{i}."
        qkv = _dense(params, layer + "attention.query_key_value",
                     _layer_norm(params, layer + "input_layernorm", x, eps), _LINEAR)
        qkv = qkv.reshape(*qkv.shape[:2], config.num_heads, 3, config.head_dim)  # per head: query, key, value
        query, key, value = _rotate(qkv[..., 0, :], cos, sin), _rotate(qkv[..., 1, :], cos, sin), qkv[..., 2, :]
        attention = _dense(params, layer + "attention.dense", _causal_attention(query, key, value), _LINEAR)
        mlp_names = (layer + "mlp.dense_h_to_4h", layer + "mlp.dense_4h_to_h")
        mlp_input = x if config.use_parallel_residual else x + attention
        mlp = _mlp(params, config, mlp_names, _layer_norm(params, layer + "post_attention_layernorm", mlp_input, eps),
                   _LINEAR)
        x = x + attention + mlp
    return _layer_norm(params, "gpt_neox.final_layer_norm", x, eps)


def _llama_hidden_states(config: HFModelConfig, params, tokens: jax.Array) -> jax.Array:
    """Llama's final hidden states ``[B, T, D]``: RMSNorm, rotary grouped-query attention, gated MLP, sequential."""
    eps = config.layer_norm_eps
    x = params["model.embed_tokens.weight"][tokens]
    cos, sin = _rotary_tables(config, tokens.shape[1], x.dtype)
    for i in range(config.num_layers):
        layer = f"model.layers.{i}."
        normalised = _rms_norm(params, layer + "input_layernorm", x, eps)
        query, key, value = (_dense(params, f"{layer}self_attn.{part}_proj", normalised, _LINEAR)
                             .reshape(*x.shape[:2], -1, config.head_dim) for part in "qkv")
        attention = _causal_attention(_rotate(query, cos, sin), _rotate(key, cos, sin), value)
        x = x + _dense(params, layer + "self_attn.o_proj", attention, _LINEAR)
        mlp_names = (layer + "mlp.gate_proj", layer + "mlp.up_proj", layer + "mlp.down_proj")
        x = x + _mlp(params, config, mlp_names, _rms_norm(params, layer + "post_attention_layernorm", x, eps), _LINEAR)
    return _rms_norm(params, "model.norm", x, eps)


_FAMILIES = {
    "gpt2": _Family("transformer.", "transformer.wte.weight", (".attn.bias", ".attn.masked_bias"),
                    _read_gpt2, _gpt2_shapes, _gpt2_hidden_states),
    "gpt_neox": _Family("gpt_neox.", "gpt_neox.embed_in.weight",
                        (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq"),
                        _read_gpt_neox, _gpt_neox_shapes, _gpt_neox_hidden_states),
    "llama": _Family("model.", "model.embed_tokens.weight", (".rotary_emb.inv_freq",),
                     _read_llama, _llama_shapes, _llama_hidden_states),
}


# ---------------------------------------------------------------------------------------------------------- forwards


def _logits(config: HFModelConfig, params, tokens: jax.Array) -> jax.Array:
    family = _FAMILIES[config.model_type]
    hidden = family.hidden_states(config, params, tokens)
    head = params[family.embedding if config.tie_word_embeddings else _HEAD]
    return jnp.einsum("btd,vd->btv", hidden, head, precision=_HIGHEST)


def _token_losses(config: HFModelConfig, params, tokens: jax.Array) -> jax.Array:
    scores = _logits(config, params, tokens[:, :-1])
    targets = tokens[:, 1:]
    return jax.nn.logsumexp(scores, axis=-1) - jnp.take_along_axis(scores, targets[..., None], axis=-1)[..., 0]


_logits_jit = jax.jit(_logits, static_argnums=0)
_token_losses_jit = jax.jit(_token_losses, static_argnums=0)


def _checked_tokens(config: HFModelConfig, tokens, extra: int) -> jax.Array:
    """``tokens`` as an array, after checking its shape, dtype and (when concrete) its values."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise PolcaError(f"tokens must be integers [batch, length], got {tokens.dtype} {tokens.shape}")
    if not 1 <= tokens.shape[1] - extra <= config.max_positions:
        raise PolcaError(
            f"tokens of length {tokens.shape[1]} give {tokens.shape[1] - extra} inputs; the model reads 1 to "
            f"max_positions={config.max_positions}"
        )
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= config.vocab_size:
            raise PolcaError(f"token ids must lie in [0, {config.vocab_size}), got ids from {low} to {high}")
    return tokens


def logits(config: HFModelConfig, params: Mapping[str, jax.Array], tokens) -> jax.Array:
    """The causal language model's logits: every position attends to itself and all earlier ones; no dropout.

    A pure function of ``params`` (compiled once per config and shapes), usable under a caller's ``jit``, ``vmap``,
    ``grad`` and ``jvp``; computed in the parameters' dtype.

    Args:
      config: the model's configuration (static).
      params: the parameter dict (:func:`params_from_state_dict`).
      tokens: int ``[B, T]`` token ids, 1 ≤ T ≤ ``config.max_positions``; no padding mask.

    Returns:
      ``[B, T, vocab_size]`` logits: at position t, the scores of the token after ``tokens[:, t]``.

    Raises:
      PolcaError: for tokens that are not an integer ``[B, T]`` array, too long, or (when concrete, not traced)
        outside ``[0, vocab_size)``, and for params with missing or unexpected keys or wrong shapes.

    Example:
      ``model``, ``config``, ``params`` and ``tokens``: :func:`read_config`'s example; PyTorch's logits agree.

      >>> ours = logits(config, params, tokens)
      >>> with torch.no_grad():
      ...     theirs = model(input_ids=torch.from_numpy(tokens)).logits.numpy()
      >>> ours.shape, bool(np.abs(np.asarray(ours) - theirs).max() < 1e-5 * np.abs(theirs).max())
      ((1, 6, 50), True)
    """
    tokens = _checked_tokens(config, tokens, extra=0)
    _check_params(config, params)
    return _logits_jit(config, params, tokens)


def token_losses(config: HFModelConfig, params: Mapping[str, jax.Array], tokens) -> jax.Array:
    """Next-token cross-entropies: each token of ``tokens[:, 1:]`` given the ones before it (one POLCA sample each).

    Usable as a per-sample loss of :func:`polca_jax.per_sample_projections`:
    ``lambda params, batch: token_losses(config, params, batch["tokens"])``.

    Args:
      config: the model's configuration (static).
      params: the parameter dict (:func:`params_from_state_dict`).
      tokens: int ``[B, T + 1]`` token ids, 1 ≤ T ≤ ``config.max_positions``.

    Returns:
      ``[B, T]`` losses (natural log), ``[b, t]`` that of ``tokens[b, t + 1]`` read from ``tokens[b, :t + 1]``.

    Raises:
      PolcaError: as :func:`logits`.

    Example:
      ``config``, ``params`` and ``tokens``: :func:`read_config`'s example (6 tokens: 5 predictions).

      >>> token_losses(config, params, tokens).shape
      (1, 5)
    """
    tokens = _checked_tokens(config, tokens, extra=1)
    _check_params(config, params)
    return _token_losses_jit(config, params, tokens)
