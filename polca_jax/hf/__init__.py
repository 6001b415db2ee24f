"""Hugging Face causal language models for POLCA's kernels: GPT-2, GPT-NeoX (Pythia) and Llama ported to pure JAX,
and their training checkpoints read by step.

The ports are functions of a flat parameter dict keyed by the models' own state-dict names, so every kernel of
polca_jax (per-sample projections, HVPs, Lanczos) runs on a checkpoint that ``transformers`` saved, and a basis
vector's leaves carry the names a PyTorch user knows. Needs ``pip install 'polca_jax[hf]'`` (safetensors; torch only
for ``.bin``/``.pt`` files, transformers only for the model's tokenizer). docs/huggingface.md shows a whole run.
"""

from polca_jax.hf._checkpoints import HFCheckpoints, checkpoint_steps, read_state_dict
from polca_jax.hf._models import (
    SUPPORTED_MODEL_TYPES,
    HFModelConfig,
    logits,
    params_from_state_dict,
    read_config,
    state_dict_from_params,
    token_losses,
)

__all__ = [
    "HFCheckpoints",
    "HFModelConfig",
    "SUPPORTED_MODEL_TYPES",
    "checkpoint_steps",
    "logits",
    "params_from_state_dict",
    "read_config",
    "read_state_dict",
    "state_dict_from_params",
    "token_losses",
]
