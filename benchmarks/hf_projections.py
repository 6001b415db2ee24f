"""Per-token projections on a Hugging Face GPT-NeoX ported by polca_jax.hf, against torch.func on the same model.

Run ``python benchmarks/hf_projections.py`` (3 timed rounds, about a minute on 2 CPU cores) or ``--quick`` (one).
The model is a small Pythia-like ``GPTNeoXForCausalLM`` built with transformers at its random initialisation
(hidden 128, 2 layers, 4 heads with a quarter of each rotary, parallel residual, MLP 512, vocabulary 1024, untied
head; P = 658,944), converted by ``polca_jax.hf.params_from_state_dict``. Samples are the next-token losses of 8
sequences of 32 inputs (N = 256), along K = 8 random orthonormal directions.

Cases: ``pj.per_sample_projections`` with ``method="forward"`` (one ``jvp`` per direction) and ``"reverse"``
(per-token gradients, contracted leaf by leaf), ``"auto"`` being the one :func:`polca_jax.choose_method` picks; and
``torch.func`` on the transformers model itself (eager attention; sdpa has no batching rule on the CPU): ``vmap``
over sequences of ``jacrev`` of the 32 token losses of ``functional_call``, each parameter's per-token gradients
contracted with its slice of the same basis (as ``torch_peer.py`` does), all 8 sequences in one ``vmap`` call (the
fastest of 1, 2, 4 and 8 sequences per call that we measured).
Each case runs once to warm up (compile), then all are timed in interleaved rounds; the report gives medians, ratios
and the largest difference between the implementations' projections. torch runs with 2 threads.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

# benchmarks/kernels.py would shadow the `kernels` package that transformers imports when it is installed; this
# script imports nothing from beside it, so its directory leaves the import path
sys.path = [path for path in sys.path if os.path.abspath(path or ".") != os.path.dirname(os.path.abspath(__file__))]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch.func import functional_call, jacrev, vmap  # noqa: E402

import polca_jax as pj  # noqa: E402
from polca_jax.hf import params_from_state_dict, read_config, token_losses  # noqa: E402

MODEL = {
    "vocab_size": 1024, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 512, "max_position_embeddings": 64, "bos_token_id": 0, "eos_token_id": 0,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
}
NUM_SEQUENCES, LENGTH, NUM_DIRECTIONS = 8, 32, 8
TORCH_SEQUENCES_PER_CALL = 8
THREADS = 2


def torch_projections(model, tokens: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[N, K]`` per-token projections by torch.func: vmap over sequences of jacrev of the token losses, each
    parameter's ``[n, *shape]`` gradients contracted with its ``[K, *shape]`` rows of the basis."""
    params = {name: parameter.detach() for name, parameter in model.named_parameters()}

    def sequence_losses(values, sequence):
        scores = functional_call(model, values, (sequence[None, :-1],)).logits[0]
        return torch.nn.functional.cross_entropy(scores, sequence[1:], reduction="none")

    per_sequence = vmap(jacrev(sequence_losses), in_dims=(None, 0))
    parts = []
    for start in range(0, tokens.shape[0], TORCH_SEQUENCES_PER_CALL):
        grads = per_sequence(params, tokens[start: start + TORCH_SEQUENCES_PER_CALL])  # [c, LENGTH, *shape]
        parts.append(sum(grads[name].flatten(0, 1).flatten(1) @ rows[name].flatten(1).T for name in rows))
    return torch.cat(parts)


def time_interleaved(cases: dict, repeats: int) -> tuple[dict, dict]:
    """Median seconds of each case over ``repeats`` interleaved rounds after one warm-up call, and its output."""
    outputs = {name: jax.block_until_ready(case()) for name, case in cases.items()}
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, case in cases.items():
            start = time.perf_counter()
            jax.block_until_ready(case())
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one timed round")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 1 quick, 3 full)")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**MODEL, attn_implementation="eager")).eval()
    config = read_config(model.config)
    params = params_from_state_dict(model.state_dict(), config)
    tokens = torch.randint(0, MODEL["vocab_size"], (NUM_SEQUENCES, LENGTH + 1))
    batch = {"tokens": jnp.asarray(tokens.numpy())}
    basis = pj.random_basis(params, NUM_DIRECTIONS, jax.random.key(0))
    rows = {name: torch.from_numpy(np.array(leaf)) for name, leaf in basis.as_tree(params).items()}
    auto = pj.choose_method(LENGTH, NUM_DIRECTIONS)
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} ({THREADS} threads), "
          f"transformers {transformers.__version__}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"model: {config}\nP = {sum(leaf.size for leaf in params.values()):,}; N = {NUM_SEQUENCES} × {LENGTH} "
          f"tokens; K = {NUM_DIRECTIONS}; auto picks {auto}; {repeats} timed rounds after a warm-up", flush=True)

    def per_token(p, batch):
        return token_losses(config, p, batch["tokens"])

    cases = {method: functools.partial(pj.per_sample_projections, per_token, params, batch, basis, method=method)
             for method in ("forward", "reverse")}
    cases["torch.func"] = functools.partial(torch_projections, model, tokens, rows)
    seconds, outputs = time_interleaved(cases, repeats)
    reference = np.asarray(outputs["torch.func"].numpy(), np.float64)
    print("\n| case | ms | / torch.func | max rel. difference to torch.func |")
    print("| --- | --- | --- | --- |")
    for name, value in seconds.items():
        difference = np.max(np.abs(np.asarray(outputs[name], np.float64) - reference)) / np.max(np.abs(reference))
        label = f"{name} (auto)" if name == auto else name
        print(f"| {label} | {1e3 * value:.0f} | {value / seconds['torch.func']:.2f} | {difference:.1e} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
