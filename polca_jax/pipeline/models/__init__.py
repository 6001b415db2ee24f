"""Models analysed by POLCA."""

from polca_jax.pipeline.models._transformer import (
    TENSOR_PARALLEL_RULES,
    Transformer,
    TransformerConfig,
    apply,
    init_params,
    parameter_count,
    token_cross_entropy,
)

__all__ = [
    "TENSOR_PARALLEL_RULES",
    "Transformer",
    "TransformerConfig",
    "apply",
    "init_params",
    "parameter_count",
    "token_cross_entropy",
]
