"""Configuration of the arithmetic experiment: presets (``paper``, ``cpu``, ``tiny``) and ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
from typing import Any

from polca_jax.experiments import runs


@dataclasses.dataclass(frozen=True)
class ArithmeticConfig(runs.CheckpointedConfig):
    """Everything that determines a run; a run directory holds exactly one config (``config.json``)."""

    preset: str
    # model (TransformerLens layout; see polca_jax.models.transformer)
    num_layers: int
    d_model: int
    num_heads: int
    d_mlp: int
    # data: problems are disjoint between evaluation, Hessian sample and training
    num_train_problems: int
    num_eval_problems: int  # N = 4 answer tokens per problem
    num_hessian_problems: int
    # training (AdamW, lr · min(i / warmup, 1))
    learning_rate: float
    num_steps: int
    batch_size: int = 64
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    warmup_steps: int = 100
    # checkpoints
    polca_every: int = 20  # POLCA checkpoint interval (steps)
    basis_every: int = 200  # Algorithm 1 checkpoint interval: steps basis_every, 2·basis_every, ... <= basis_until
    basis_until: int | None = None  # last basis step (default num_steps)
    k_per_checkpoint: int = 1
    lanczos_iters: int = 20
    # decomposition
    second_order: str = "paper"
    projection_method: str = "auto"
    # clustering (HDBSCAN per direction; min_samples = tokens / divisor)
    min_cluster_size: int = 150
    min_samples_divisor: float = 15.0
    reference_num_samples: int | None = 5000  # scale min_cluster_size by N / this (None: use it as is)
    normalize: str | None = None  # None (the paper), "unit" or "standardize"
    # breakthroughs (Eqs. 9-10)
    window_steps: int = 100
    threshold_step: int = 1000
    # baselines and ablations
    ablations: bool = True  # LCA, random and shuffled-Hessian bases (each one more decomposition)
    lca_axes: int = 50
    seed: int = 0
    metrics_every: int = 50

    def __post_init__(self):
        self.check_fields(["num_layers", "d_model", "num_heads", "d_mlp", "num_train_problems", "num_eval_problems",
                           "num_hessian_problems", "lca_axes"])
        total = self.num_train_problems + self.num_eval_problems + self.num_hessian_problems
        if total > 1000 * 1000:
            raise ValueError(f"{total} problems requested but there are only 1,000,000 pairs of 3-digit operands")


PRESETS: dict[str, dict[str, Any]] = {
    # The paper (Tables 2-3, Appendix D): 9,475,594 parameters, 10k steps, 50 basis vectors, 5000 tokens.
    "paper": dict(
        num_layers=3, d_model=512, num_heads=4, d_mlp=2048, num_train_problems=640_000, num_eval_problems=1250,
        num_hessian_problems=1250, learning_rate=1e-5, num_steps=10_000, polca_every=20, basis_every=200,
    ),
    # Sized for a 2-core CPU in about a quarter of an hour.
    "cpu": dict(
        num_layers=2, d_model=128, num_heads=4, d_mlp=512, num_train_problems=96_000, num_eval_problems=300,
        num_hessian_problems=256, learning_rate=3e-4, num_steps=1500, polca_every=10, basis_every=100,
        window_steps=50, threshold_step=300, ablations=False,
    ),
    # Seconds, for tests and the notebook.
    "tiny": dict(
        num_layers=1, d_model=32, num_heads=2, d_mlp=64, num_train_problems=2000, num_eval_problems=40,
        num_hessian_problems=32, learning_rate=1e-3, num_steps=60, batch_size=32, warmup_steps=10, polca_every=5,
        basis_every=20, lanczos_iters=8, min_cluster_size=8, reference_num_samples=None, window_steps=10,
        threshold_step=30, lca_axes=5, metrics_every=10,
    ),
}


def make_config(preset: str, overrides: dict[str, Any] | None = None) -> ArithmeticConfig:
    """The ``preset`` config with ``overrides`` (field → value) applied; unknown names raise ``ValueError``."""
    return runs.make_config(ArithmeticConfig, PRESETS, preset, overrides)


def parse_overrides(assignments: list[str]) -> dict[str, Any]:
    """``["learning_rate=1e-3", ...]`` → typed values for :func:`make_config`."""
    return runs.parse_overrides(ArithmeticConfig, assignments)
