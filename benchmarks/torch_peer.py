"""PyTorch peer for ``kernels.py``: the benchmark transformer written by hand, and per-sample projections in torch.

The model mirrors ``polca_jax.pipeline.models`` (TransformerLens layout: untied embeddings, learned positions,
pre-LayerNorm, attention with biases written out by hand, exact GELU MLP, final LayerNorm, unembedding with bias).
Parameters are a flat ``{name: tensor}`` dict whose names and order are those of the JAX params' leaves
(``ravel_pytree`` order) and whose dense kernels are ``[in, out]`` as in flax, so one ``[K, P]`` basis means the same
directions in both frameworks. torch is a benchmark peer only, never a dependency of ``polca_jax``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import grad, jacrev, jvp, vmap

LAYER_NORM_EPSILON = 1e-5
ANSWER_LOGITS = slice(7, 11)  # input positions whose logits predict the 4 answer digits
ANSWER_TOKENS = slice(8, 12)  # the 4 answer digits of a 12-token sequence


def parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, written out by hand, in JAX's leaf order (dict keys sorted at every level)."""
    d, m = config.d_model, config.d_mlp
    out = config.output_size or config.vocab_size
    shapes = {
        "token_embedding.embedding": (config.vocab_size, d),
        "position_embedding": (config.context_length, d),
        "final_norm.scale": (d,),
        "final_norm.bias": (d,),
        "unembedding.kernel": (d, out),
        "unembedding.bias": (out,),
    }
    for i in range(config.num_layers):
        block = f"blocks.{i}."
        for norm in ("attention_norm", "mlp_norm"):
            shapes[f"{block}{norm}.scale"] = (d,)
            shapes[f"{block}{norm}.bias"] = (d,)
        for projection in ("query", "key", "value", "output"):
            shapes[f"{block}attention.{projection}.kernel"] = (d, d)
            shapes[f"{block}attention.{projection}.bias"] = (d,)
        shapes[f"{block}mlp.hidden.kernel"] = (d, m)
        shapes[f"{block}mlp.hidden.bias"] = (m,)
        shapes[f"{block}mlp.output.kernel"] = (m, d)
        shapes[f"{block}mlp.output.bias"] = (d,)
    return {name: shapes[name] for name in sorted(shapes, key=lambda name: name.split("."))}


def num_params(config) -> int:
    """P of the peer model, from :func:`parameter_shapes`."""
    return sum(math.prod(shape) for shape in parameter_shapes(config).values())


def params_from_flat(flat: np.ndarray, config) -> dict[str, torch.Tensor]:
    """Split a flat ``[P]`` vector in JAX's ``ravel_pytree`` order into the peer's parameter dict."""
    shapes = parameter_shapes(config)
    if flat.shape != (num_params(config),):
        raise ValueError(f"expected {num_params(config)} parameters, got shape {flat.shape}")
    offsets = np.cumsum([0] + [math.prod(shape) for shape in shapes.values()])
    return {
        name: torch.from_numpy(np.array(flat[start:stop]).reshape(shape))
        for (name, shape), start, stop in zip(shapes.items(), offsets[:-1], offsets[1:])
    }


def _dense(params, prefix, x):
    return x @ params[prefix + "kernel"] + params[prefix + "bias"]


def _layer_norm(params, prefix, x):
    return F.layer_norm(x, x.shape[-1:], params[prefix + "scale"], params[prefix + "bias"], LAYER_NORM_EPSILON)


def _attention(params, prefix, x, num_heads, queries=None):
    """Causal attention; with ``queries`` (a slice of positions) only those rows: keys and values everywhere."""
    batch, length, d_model = x.shape
    head = d_model // num_heads
    x_query = x if queries is None else x[:, queries]
    q = _dense(params, prefix + "query.", x_query).reshape(batch, x_query.shape[1], num_heads, head)
    k = _dense(params, prefix + "key.", x).reshape(batch, length, num_heads, head)
    v = _dense(params, prefix + "value.", x).reshape(batch, length, num_heads, head)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head)
    query_positions = torch.arange(length)[queries if queries is not None else slice(None)]
    causal = torch.arange(length)[None, :] <= query_positions[:, None]
    weights = torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1)
    mixed = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x_query.shape)
    return _dense(params, prefix + "output.", mixed)


def logits(params: dict[str, torch.Tensor], tokens: torch.Tensor, num_heads: int, queries=None) -> torch.Tensor:
    """tokens int64[B, L] -> logits [B, L, output_size]; with ``queries`` (a slice), only those positions' logits,
    the last block's queries, attention output and MLP computed there alone (as ``polca_jax``'s ``positions=``)."""
    num_layers = len({name.split(".")[1] for name in params if name.startswith("blocks.")})
    x = params["token_embedding.embedding"][tokens] + params["position_embedding"][: tokens.shape[1]]
    for i in range(num_layers):
        block = f"blocks.{i}."
        last = queries if i == num_layers - 1 else None
        residual = x if last is None else x[:, last]
        x = residual + _attention(
            params, block + "attention.", _layer_norm(params, block + "attention_norm.", x), num_heads, last
        )
        hidden = F.gelu(_dense(params, block + "mlp.hidden.", _layer_norm(params, block + "mlp_norm.", x)))
        x = x + _dense(params, block + "mlp.output.", hidden)
    return _dense(params, "unembedding.", _layer_norm(params, "final_norm.", x))


def answer_losses(params: dict[str, torch.Tensor], tokens: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Cross-entropy of the 4 answer digits, read from ``tokens[:, :-1]``: int64[B, 12] -> [B, 4].

    Like the JAX task's loss, the last block runs only at the answer positions."""
    answer_logits = logits(params, tokens[:, :-1], num_heads, ANSWER_LOGITS)
    targets = tokens[:, ANSWER_TOKENS]
    return F.cross_entropy(answer_logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def mean_loss(params: dict[str, torch.Tensor], tokens: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The mean answer-token loss, a scalar (the aggregate loss of the gradient and HVP rows)."""
    return answer_losses(params, tokens, num_heads).mean()


def gradient(params, tokens, num_heads) -> dict[str, torch.Tensor]:
    """Batched gradient of :func:`mean_loss` (``torch.func.grad``)."""
    return grad(mean_loss)(params, tokens, num_heads)


def hvp(params, tangent, tokens, num_heads) -> dict[str, torch.Tensor]:
    """Hessian-vector product of :func:`mean_loss`, forward-over-reverse as in ``polca_jax._hvp``."""
    return jvp(lambda p: gradient(p, tokens, num_heads), (params,), (tangent,))[1]


def per_leaf_contraction(basis: torch.Tensor, params: dict[str, torch.Tensor]) -> Callable:
    """Per-sample gradients ``{name: [n, *shape]}`` -> ``[n, K]``, each parameter's gradient times its slice of the
    ``[K, P]`` basis (split once here), summed: no ``[n, P]`` concatenation."""
    slices = [piece.contiguous() for piece in torch.split(basis, [p.numel() for p in params.values()], dim=1)]
    return lambda grads: sum(g.flatten(1) @ b.T for g, b in zip(grads.values(), slices))


def flat_contraction(basis: torch.Tensor) -> Callable:
    """Per-sample gradients ``{name: [n, *shape]}`` -> ``[n, K]``: concatenated into ``[n, P]``, times the basisᵀ."""
    return lambda grads: torch.cat([g.flatten(1) for g in grads.values()], dim=1) @ basis.T


def func_projections(params, tokens, contract: Callable, num_heads, token_level: bool, chunk_size: int):
    """``torch.func`` per-sample projections ``[N, K]``, ``chunk_size`` sequences per ``vmap`` call.

    Sequence-level samples: ``vmap(grad)`` of each sequence's summed answer loss. Token-level: ``vmap`` over
    sequences of ``jacrev`` of the 4 answer losses (as fast as ``vmap(grad)`` over (sequence, token) pairs here).
    """

    def sequence_losses(p, sequence):
        losses = answer_losses(p, sequence[None], num_heads)[0]
        return losses if token_level else losses.sum()

    per_sequence = vmap(jacrev(sequence_losses) if token_level else grad(sequence_losses), in_dims=(None, 0))
    parts = []
    for start in range(0, tokens.shape[0], chunk_size):
        grads = per_sequence(params, tokens[start : start + chunk_size])  # leaves [c, (4,) *shape]
        if token_level:
            grads = {name: g.flatten(0, 1) for name, g in grads.items()}
        parts.append(contract(grads))
    return torch.cat(parts)


def loop_projections(params, tokens, basis, num_heads, token_level: bool) -> torch.Tensor:
    """The plain autograd way: one ``backward()`` per sample into a ``[N, P]`` gradient matrix, then one matmul.

    Token-level samples share their sequence's forward pass (``retain_graph``).
    """
    leaves = [p.detach().clone().requires_grad_() for p in params.values()]
    named = dict(zip(params, leaves))
    samples_per_sequence = 4 if token_level else 1
    gradients = torch.empty(tokens.shape[0] * samples_per_sequence, basis.shape[1])
    row = 0
    for sequence in tokens:
        losses = answer_losses(named, sequence[None], num_heads)[0]
        losses = losses if token_level else losses.sum()[None]
        for j, loss in enumerate(losses):
            for leaf in leaves:
                leaf.grad = None
            loss.backward(retain_graph=j + 1 < len(losses))
            torch.cat([leaf.grad.flatten() for leaf in leaves], out=gradients[row])
            row += 1
    return gradients @ basis.T


def token_projections_and_losses(params, tokens, contract: Callable, num_heads, chunk_size: int):
    """Token-level ``torch.func`` projections ``[N, K]`` and losses ``[N]`` from one pass: ``vmap`` over sequences of
    ``jacrev`` (with the losses as its auxiliary output), per-leaf contraction with the basis."""

    def sequence_losses(p, sequence):
        losses = answer_losses(p, sequence[None], num_heads)[0]
        return losses, losses.detach()

    per_sequence = vmap(jacrev(sequence_losses, has_aux=True), in_dims=(None, 0))
    projections, losses = [], []
    for start in range(0, tokens.shape[0], chunk_size):
        grads, values = per_sequence(params, tokens[start : start + chunk_size])  # leaves [c, 4, *shape]; [c, 4]
        projections.append(contract({name: g.flatten(0, 1) for name, g in grads.items()}))
        losses.append(values.flatten())
    return torch.cat(projections), torch.cat(losses)
