"""The JAX ports of GPT-2, GPT-NeoX and Llama (polca_jax.hf) against transformers' PyTorch models.

Tiny models (vocabulary 64, width 32, 2 layers, 2 or 4 heads) are built with transformers, trained a few Adam steps on
random tokens (so that no weight is at its special initial value: norms away from 1 and 0, biases away from 0),
saved with ``save_pretrained`` and read back by the port. In float32 on both sides, the port's logits match
PyTorch's to 1e-5 relative (max abs difference / max abs logit), each single token's loss gradient matches
``torch.func.grad`` leaf by leaf to 1e-4 relative, and a Hessian-vector product (``jax.jvp`` over ``jax.grad``)
matches PyTorch's double backward to 1e-4 relative. Variants: GPT-2 tied (gelu_new) and untied (exact gelu, its own
MLP width); GPT-NeoX with a quarter of each head rotary and a parallel residual (Pythia's layout), and fully rotary
with a sequential residual, no attention biases and another rotary base; Llama with grouped-query attention (4 query
heads, 2 key/value heads), an untied head, no biases, another rotary base and RMSNorm epsilon, and Llama with tied
embeddings, attention and MLP biases, heads of 16 (``head_dim`` apart from width / heads) and gelu_new.

The public names are imported from ``polca_jax.hf._models`` until ``polca_jax/hf/__init__.py`` exports them.
"""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import polca_jax as pj
from polca_jax.hf._models import (
    _ACTIVATIONS,
    SUPPORTED_MODEL_TYPES,
    HFModelConfig,
    logits,
    num_params,
    params_from_state_dict,
    read_config,
    state_dict_from_params,
    token_losses,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
functional_call = torch.func.functional_call

VOCAB, LENGTH = 64, 12  # LENGTH inputs, LENGTH + 1 tokens per sequence
SIZES = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 0}
NEOX = {**SIZES, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48,
        "max_position_embeddings": 16}
VARIANTS = {
    "gpt2_tied": ("GPT2", {**SIZES, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 16}),
    "gpt2_untied": ("GPT2", {**SIZES, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 16, "n_inner": 48,
                             "activation_function": "gelu", "tie_word_embeddings": False}),
    "neox_quarter_rotary_parallel": ("GPTNeoX", {  # 2 heads of 16: 4 rotary dimensions each
        **NEOX, "num_attention_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}}),
    "neox_full_rotary_sequential": ("GPTNeoX", {
        **NEOX, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 1.0},
        "use_parallel_residual": False, "attention_bias": False, "hidden_act": "gelu_new"}),
    "llama_gqa_untied": ("Llama", {  # 4 query heads of 8 sharing 2 key/value heads
        **NEOX, "num_key_value_heads": 2, "rms_norm_eps": 1e-3,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}),
    "llama_tied_biases": ("Llama", {  # 4 heads of 16 in a width of 32: queries [64], the output projection [32, 64]
        **NEOX, "head_dim": 16, "tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True,
        "hidden_act": "gelu_new"}),
}
SAMPLES = ((0, 0), (1, 5), (2, LENGTH - 1))  # (sequence, token) of the per-token gradients
LOGIT_TOLERANCE, GRADIENT_TOLERANCE = 1e-5, 1e-4


@dataclasses.dataclass
class Trained:
    """A trained transformers model, where it was saved, and the port's config and float32 params read from it."""

    model: "torch.nn.Module"
    directory: Path
    config: HFModelConfig
    params: dict
    tokens: np.ndarray  # int64 [3, LENGTH + 1]


def build(name: str, directory) -> Trained:
    family, options = VARIANTS[name]
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model_config = getattr(transformers, f"{family}Config")(**options, attn_implementation="eager")
    model = getattr(transformers, f"{family}LMHeadModel" if family == "GPT2" else f"{family}ForCausalLM")(
        model_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        batch = torch.randint(0, VOCAB, (8, LENGTH + 1))
        optimizer.zero_grad()
        model(batch, labels=batch).loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(directory)
    config = read_config(directory)
    params = params_from_state_dict(safetensors_numpy.load_file(directory / "model.safetensors"), config)
    tokens = torch.randint(0, VOCAB, (3, LENGTH + 1)).numpy()
    return Trained(model, directory, config, params, tokens)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each variant, built and trained on first use, once per module."""
    cache = {}

    def get(name: str) -> Trained:
        if name not in cache:
            cache[name] = build(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(params=list(VARIANTS))
def trained(request, models) -> Trained:
    return models(request.param)


@pytest.fixture
def gpt2(models) -> Trained:
    return models("gpt2_tied")


@pytest.fixture
def neox(models) -> Trained:
    return models("neox_quarter_rotary_parallel")


@pytest.fixture
def llama(models) -> Trained:
    return models("llama_gqa_untied")


def torch_params(model) -> dict:
    """The model's parameters by name (a tied head appears once, as the embedding), detached."""
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def assert_close(ours, reference, tolerance: float, what: str) -> None:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    error = np.max(np.abs(ours - reference))
    scale = np.max(np.abs(reference))
    assert error <= tolerance * scale, f"{what}: max abs difference {error:.3g} = {error / scale:.3g} × {scale:.3g}"


def test_the_config_is_read_as_transformers_builds_the_model(trained):
    hf_config, config = trained.model.config, trained.config
    assert config.num_layers == 2 and config.num_heads == hf_config.num_attention_heads and config.hidden_size == 32
    assert num_params(config) == sum(parameter.numel() for parameter in trained.model.parameters())
    assert set(trained.params) == set(torch_params(trained.model))
    if config.model_type == "gpt_neox":
        attention = trained.model.gpt_neox.layers[0].attention
        assert config.rotary_dims == attention.rotary_ndims
        assert config.use_parallel_residual == hf_config.use_parallel_residual
        assert config.attention_bias == hf_config.attention_bias
    elif config.model_type == "llama":
        attention = trained.model.model.layers[0].self_attn
        assert config.kv_heads == hf_config.num_key_value_heads and config.head_dim == attention.head_dim
        assert config.rotary_dims == trained.model.model.rotary_emb.inv_freq.numel() * 2 == attention.head_dim
        assert config.rotary_base == hf_config.rope_parameters["rope_theta"]
        assert config.layer_norm_eps == trained.model.model.norm.variance_epsilon == hf_config.rms_norm_eps
        assert (config.attention_bias, config.mlp_bias) == (hf_config.attention_bias, hf_config.mlp_bias)
    else:
        assert config.intermediate_size == trained.model.transformer.h[0].mlp.c_fc.nf
    assert config.tie_word_embeddings == hf_config.tie_word_embeddings


def test_logits_match_transformers(trained):
    """Against both of transformers' attentions on the CPU: eager (the fixtures' models, as the gradient and HVP
    references, since sdpa has no double backward) and sdpa (the default)."""
    inputs = trained.tokens[:, :-1]
    ours = logits(trained.config, trained.params, inputs)
    assert ours.shape == (3, LENGTH, VOCAB) and ours.dtype == jnp.float32
    for implementation in ("sdpa", "eager"):  # eager last: the fixtures' models stay eager
        trained.model.set_attn_implementation(implementation)
        with torch.no_grad():
            reference = trained.model(torch.from_numpy(inputs)).logits.numpy()
        assert_close(ours, reference, LOGIT_TOLERANCE, f"logits against {implementation}")


def test_each_token_s_gradient_matches_torch_func(trained):
    """jax.grad of one token's loss against torch.func.grad over functional_call, for each leaf; a tied head's
    gradient is part of the embedding's in both."""
    config, params, tokens = trained.config, trained.params, trained.tokens
    jacobian = jax.jit(jax.jacrev(lambda p: token_losses(config, p, tokens)))(params)  # leaves [3, LENGTH, ...]

    def token_loss(values, sequence, position):
        scores = functional_call(trained.model, values, (sequence[None, :-1],)).logits[0, position]
        return torch.nn.functional.cross_entropy(scores, sequence[position + 1])

    sequences = torch.from_numpy(tokens)
    for i, j in SAMPLES:
        reference = torch.func.grad(token_loss)(torch_params(trained.model), sequences[i], j)
        assert set(reference) == set(params)
        for name, gradient in reference.items():
            assert_close(jacobian[name][i, j], gradient.numpy(), GRADIENT_TOLERANCE, f"sample {i, j}: {name}")


def test_a_hessian_vector_product_matches_torch_double_backward(trained):
    config, params, tokens = trained.config, trained.params, trained.tokens
    rng = np.random.default_rng(0)
    direction = {name: rng.standard_normal(leaf.shape).astype(np.float32) for name, leaf in params.items()}

    def mean_loss(p):
        return token_losses(config, p, tokens).mean()

    _, ours = jax.jit(lambda p, v: jax.jvp(jax.grad(mean_loss), (p,), (v,)))(params, direction)

    leaves = {name: value.requires_grad_() for name, value in torch_params(trained.model).items()}
    sequences = torch.from_numpy(tokens)
    scores = functional_call(trained.model, leaves, (sequences[:, :-1],)).logits
    loss = torch.nn.functional.cross_entropy(scores.flatten(0, 1), sequences[:, 1:].flatten())
    gradients = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
    reference = torch.autograd.grad(gradients, list(leaves.values()), [torch.from_numpy(direction[n]) for n in leaves])
    for name, value in zip(leaves, reference):
        assert_close(ours[name], value.numpy(), GRADIENT_TOLERANCE, f"HVP: {name}")


@pytest.mark.parametrize("name", ["neox_quarter_rotary_parallel", "llama_gqa_untied"])
def test_forward_and_reverse_projections_agree_on_the_port(models, name):
    """POLCA's kernels run on the port in both modes (forward: jax.jvp through the attention, rotary, RMSNorm)."""
    trained = models(name)
    config = trained.config
    batch = {"tokens": jnp.asarray(trained.tokens)}
    basis = pj.random_basis(trained.params, 3, jax.random.key(0))

    def per_token(params, batch):
        return token_losses(config, params, batch["tokens"])

    forward, reverse = (pj.per_sample_projections(per_token, trained.params, batch, basis, method=method)
                        for method in ("forward", "reverse"))
    assert forward.shape == (3 * LENGTH, 3)
    assert_close(forward, reverse, 1e-5, "forward against reverse projections")


@pytest.mark.parametrize("name", sorted(_ACTIVATIONS))
def test_each_activation_is_transformers(name):
    x = np.linspace(-6.0, 6.0, 241)
    reference = transformers.activations.ACT2FN[name](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(_ACTIVATIONS[name](jnp.asarray(x))), reference, rtol=0, atol=1e-12)


def test_the_legacy_spellings_give_the_same_model(gpt2, neox, llama):
    """Pythia's hub config (rotary_pct, rotary_emb_base, rope_scaling null) and head name (embed_out), a Llama hub
    config of transformers 4 (a top-level rope_theta, rope_scaling null, no head_dim), base-model state dicts without
    the causal LM's prefix, and the buffers old checkpoints carry."""
    values = neox.model.config.to_dict()
    rope = values.pop("rope_parameters")
    legacy = {**values, "rotary_pct": rope["partial_rotary_factor"], "rotary_emb_base": rope["rope_theta"],
              "rope_scaling": None}
    assert read_config(legacy) == neox.config == read_config(neox.model.config)
    neox_state = {name.removeprefix("gpt_neox.").replace("lm_head.", "embed_out."): value
                  for name, value in neox.model.state_dict().items()}
    neox_state |= {"layers.0.attention.bias": torch.ones(16, 16).tril(), "layers.0.attention.masked_bias":
                   torch.tensor(-1e9), "layers.1.attention.rotary_emb.inv_freq": torch.ones(1)}
    gpt2_state = dict(gpt2.model.transformer.state_dict())  # a base model's keys: no "transformer." prefix
    gpt2_state |= {"h.0.attn.bias": torch.ones(1, 1, 16, 16), "h.1.attn.masked_bias": torch.tensor(-1e4)}
    values = llama.model.config.to_dict()
    rope = values.pop("rope_parameters")
    del values["head_dim"]
    assert read_config({**values, "rope_theta": rope["rope_theta"], "rope_scaling": None}) == llama.config
    llama_state = {name.removeprefix("model."): value for name, value in llama.model.state_dict().items()}
    llama_state |= {"layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4), "rotary_emb.inv_freq": torch.ones(4)}
    for trained, state in ((neox, neox_state), (gpt2, gpt2_state), (llama, llama_state)):
        params = params_from_state_dict(state, trained.config)
        assert list(params) == list(trained.params)
        for name, leaf in params.items():
            np.testing.assert_array_equal(leaf, trained.params[name], err_msg=name)


def test_half_precision_state_dicts_are_cast(neox):
    """bfloat16 torch tensors (which numpy cannot hold) and float16 numpy arrays, to the dtype asked for."""
    bfloat16 = {name: value.to(torch.bfloat16) for name, value in neox.model.state_dict().items()}
    float16 = {name: value.numpy().astype(np.float16) for name, value in neox.model.state_dict().items()}
    cases = ((bfloat16, jnp.float64, lambda value: value.double().numpy()), (float16, jnp.float32, np.asarray))
    for state, dtype, exact in cases:
        params = params_from_state_dict(state, neox.config, dtype=dtype)
        for name, leaf in params.items():
            assert leaf.dtype == dtype
            np.testing.assert_array_equal(leaf, exact(state[name]).astype(dtype), err_msg=name)


def test_the_state_dict_round_trips_and_loads_back_into_transformers(trained):
    state = {name: value.numpy() for name, value in trained.model.state_dict().items()}
    back = state_dict_from_params(params_from_state_dict(state, trained.config), trained.config)
    assert list(back) == list(state)  # the tied head included, as in model.state_dict()
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    fresh = type(trained.model)(trained.model.config).eval()
    fresh.load_state_dict({name: torch.from_numpy(value) for name, value in back.items()})  # strict
    inputs = torch.from_numpy(trained.tokens[:, :-1])
    with torch.no_grad():
        np.testing.assert_array_equal(fresh(inputs).logits.numpy(), trained.model(inputs).logits.numpy())


def test_an_unsupported_model_type_is_refused_naming_the_supported_ones(gpt2):
    with pytest.raises(pj.PolcaError, match="'mistral' is not supported: polca_jax.hf ports gpt2, gpt_neox, llama"):
        read_config({**gpt2.model.config.to_dict(), "model_type": "mistral"})
    assert SUPPORTED_MODEL_TYPES == ("gpt2", "gpt_neox", "llama")
    with pytest.raises(pj.PolcaError, match="cannot read the model configuration"):
        read_config(gpt2.directory / "missing")


@pytest.mark.parametrize("option, value", [("scale_attn_by_inverse_layer_idx", True), ("reorder_and_upcast_attn", True),
                                           ("scale_attn_weights", False), ("add_cross_attention", True),
                                           ("activation_function", "mish")])
def test_gpt2_options_the_port_lacks_are_refused_by_name(gpt2, option, value):
    with pytest.raises(pj.PolcaError, match=f"{option}={value!r}|{value!r} is not implemented"):
        read_config({**gpt2.model.config.to_dict(), option: value})


@pytest.mark.parametrize("name", ["neox_quarter_rotary_parallel", "llama_gqa_untied"])
def test_rope_scaling_is_refused(models, name):
    """In transformers 5's rope_parameters and in the legacy rope_scaling (with "type" in older configs)."""
    values = models(name).model.config.to_dict()
    model_type = values["model_type"]
    ropes = ({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, {"type": "dynamic", "factor": 2.0},
             {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
             {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8})
    for rope in ropes:
        named = (f"the {model_type} port implements only the default rotary embedding, not rope_type "
                 f"'{rope.get('rope_type', rope.get('type'))}'")
        for spelling in ({"rope_parameters": rope}, {"rope_parameters": None, "rope_scaling": rope}):
            with pytest.raises(pj.PolcaError, match=named):
                read_config({**values, **spelling})
    with pytest.raises(pj.PolcaError, match="no 'hidden_size'"):
        read_config({key: value for key, value in values.items() if key != "hidden_size"})


def test_llama_key_value_heads_that_do_not_divide_the_heads_are_refused(llama):
    with pytest.raises(pj.PolcaError, match="num_kv_heads=3 does not divide num_heads=4"):
        read_config({**llama.model.config.to_dict(), "num_key_value_heads": 3})


@pytest.mark.parametrize("change, named", [
    ("missing", "missing keys: model.layers.1.mlp.gate_proj.weight"),
    ("bias", "unexpected keys: model.layers.0.mlp.up_proj.bias"),
    ("ungrouped", r"wrong shapes: model.layers.0.self_attn.k_proj.weight \(32, 32\) \(expected \(16, 32\)\)"),
])
def test_a_llama_state_dict_that_does_not_fit_is_refused_naming_the_key(llama, change, named):
    """As GPT-2's below; a key projection of all 4 heads where the config groups them in 2."""
    state = {name: value.numpy() for name, value in llama.model.state_dict().items()}
    if change == "missing":
        del state["model.layers.1.mlp.gate_proj.weight"]
    elif change == "bias":
        state["model.layers.0.mlp.up_proj.bias"] = np.zeros(48, np.float32)
    else:
        state["model.layers.0.self_attn.k_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"]
    with pytest.raises(pj.PolcaError, match=named):
        params_from_state_dict(state, llama.config)


@pytest.mark.parametrize("change, named", [
    ("missing", "missing keys: transformer.h.1.mlp.c_fc.bias"),
    ("extra", "unexpected keys: transformer.h.0.attn.c_extra.weight"),
    ("extra_bare", "unexpected keys: h.0.attn.c_extra.weight"),
    ("shape", r"wrong shapes: transformer.wpe.weight \(8, 32\) \(expected \(16, 32\)\)"),
    ("untied_head", "state dict's 'lm_head.weight' differs"),
])
def test_a_state_dict_that_does_not_fit_is_refused_naming_the_key(gpt2, change, named):
    state = {name: value.numpy() for name, value in gpt2.model.state_dict().items()}
    if change == "missing":
        del state["transformer.h.1.mlp.c_fc.bias"]
    elif change == "extra":
        state["transformer.h.0.attn.c_extra.weight"] = np.zeros(3)
    elif change == "extra_bare":
        state["h.0.attn.c_extra.weight"] = np.zeros(3)
    elif change == "shape":
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:8]
    else:
        state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    with pytest.raises(pj.PolcaError, match=named):
        params_from_state_dict(state, gpt2.config)


def test_many_missing_keys_are_counted(gpt2):
    count = len(gpt2.params)
    listed = rf"missing keys: transformer.wte.weight, .* and {count - 5} more \({count}\)"
    with pytest.raises(pj.PolcaError, match=listed):
        params_from_state_dict({}, gpt2.config)


def test_bad_tokens_and_params_are_refused(gpt2):
    config, params = gpt2.config, gpt2.params
    with pytest.raises(pj.PolcaError, match="max_positions=16"):
        logits(config, params, np.zeros((1, 17), np.int32))
    with pytest.raises(pj.PolcaError, match="max_positions=16"):
        token_losses(config, params, np.zeros((1, 1), np.int32))
    with pytest.raises(pj.PolcaError, match=r"token ids must lie in \[0, 64\), got ids from 0 to 64"):
        logits(config, params, np.array([[0, 64]]))
    with pytest.raises(pj.PolcaError, match="integers"):
        logits(config, params, np.zeros((1, 4), np.float32))
    with pytest.raises(pj.PolcaError, match="params does not fit the gpt2 config: missing keys: transformer.ln_f.bias"):
        logits(config, {name: leaf for name, leaf in params.items() if name != "transformer.ln_f.bias"},
               np.zeros((1, 4), np.int32))


@pytest.mark.parametrize("fields, message", [
    ({"model_type": "mistral"}, "'mistral' is not supported"),
    ({"num_heads": 5}, "num_heads=5 does not divide hidden_size=32"),
    ({"rotary_dims": 3}, "rotary_dims must be even"),
    ({"rotary_dims": 18}, "rotary_dims must be even and between 0 and the head dimension 16, got 18"),
    ({"num_layers": 0}, "num_layers=0"),
    ({"num_kv_heads": 2}, "num_kv_heads=2: only the llama port has grouped-query attention"),
    ({"explicit_head_dim": 8}, "explicit_head_dim=8: only the llama port"),
    ({"model_type": "llama", "num_kv_heads": 3}, "num_kv_heads=3 does not divide num_heads=2"),
    ({"model_type": "llama", "explicit_head_dim": 0, "rotary_dims": 0}, "explicit_head_dim must be at least 1"),
])
def test_a_config_the_port_cannot_run_is_refused(neox, fields, message):
    with pytest.raises(pj.PolcaError, match=message):
        dataclasses.replace(neox.config, **fields)
