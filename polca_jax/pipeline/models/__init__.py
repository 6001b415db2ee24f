"""Models analysed by POLCA."""

from polca_jax.pipeline.models._transformer import (
    Transformer,
    TransformerConfig,
    apply,
    init_params,
    parameter_count,
    token_cross_entropy,
)

__all__ = [
    "Transformer",
    "TransformerConfig",
    "apply",
    "init_params",
    "parameter_count",
    "token_cross_entropy",
]
