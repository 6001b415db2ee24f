"""Peak temporaries of the projection pass against N, K and P: XLA's compiled memory analysis, nothing is run.

Run ``python benchmarks/memory.py`` (about 3 minutes of compiling on 2 CPU cores). For the arithmetic task's
transformer at two sizes (P = 0.4M: 2 layers, d_model 128; P = 2.4M: 3 layers, d_model 256, d_mlp 1024), token-level
samples (4 answer tokens per sequence), K = 8 and 64 random directions, and N = 1, 8 and 32 chunks of sequences (the
default chunks: 16 sequences = 64 samples for reverse mode, 32 sequences for forward mode), it prints
``memory_analysis().temp_size_in_bytes`` of the compiled kernel that ``per_sample_projections`` runs. Bounded memory
means the column does not grow with N.
"""

from __future__ import annotations

import datetime

import jax
import numpy as np

import polca_jax as pj
from polca_jax.pipeline import import_experiment, models

task = import_experiment("arithmetic")  # experiments/arithmetic of this clone

SIZES = {
    "0.4M": dict(num_layers=2, d_model=128, num_heads=4, d_mlp=512),
    "2.4M": dict(num_layers=3, d_model=256, num_heads=4, d_mlp=1024),
}
NUM_DIRECTIONS = (8, 64)
NUM_CHUNKS = (1, 8, 32)
METHODS = ("reverse", "forward")


def main() -> None:
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}; jax {jax.__version__}")
    print("| P | method | K | chunk (sequences) | " + " | ".join(f"N = {c} chunks" for c in NUM_CHUNKS) + " |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in NUM_CHUNKS) + " |")
    for size, shape in SIZES.items():
        config = models.TransformerConfig(vocab_size=task.VOCAB_SIZE, context_length=task.SEQUENCE_LENGTH,
                                          output_size=task.OUTPUT_SIZE, **shape)
        graphdef, params = models.init_params(config, seed=0)
        loss, _ = task.make_loss_fns(graphdef)
        tokens = task.encode(task.make_problems(32 * 32, seed=0))
        probe = pj.random_basis(params, 1, jax.random.key(0))
        for method in METHODS:  # its default chunk: the one the kernel picks for these sequences (4 samples each)
            chunk = pj.projection_kernel_cost(loss, params, {"tokens": tokens}, probe, method=method,
                                              with_flops=False).chunk_size
            for k in NUM_DIRECTIONS:
                basis = pj.random_basis(params, k, jax.random.key(k))
                cells = []
                for chunks in NUM_CHUNKS:
                    n = chunk * chunks
                    cost = pj.projection_kernel_cost(loss, params, {"tokens": tokens[np.arange(n) % len(tokens)]},
                                                     basis, method=method, with_flops=False)
                    cells.append(f"{cost.temp_bytes / 1e6:.1f} MB (N={4 * n})")
                print(f"| {size} | {method} | {k} | {chunk} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
