"""Side-by-side timings of polca_jax's kernels on a small transformer, against PyTorch peers when torch is installed.

Run ``python benchmarks/kernels.py`` (7 timed rounds, about 5 minutes on 2 quiet CPU cores) or ``--quick`` (one
round, about 1.5 minutes). Every case is called once to warm up (compile), then all cases are timed in interleaved
rounds so that the machine's load hits them alike; the report gives medians and ratios of medians, the load average
before and after, and a warning if any timed call compiled. The model is the arithmetic task's transformer at a small
size (2 layers, d_model 128, 4 heads, d_mlp 512, 10 output digits; 401,162 parameters) reading ``tokens[:, :-1]`` and
scored on the 4 answer digits, on 256 sequences. Samples are sequences (the sum of their 4 answer-token losses) or the
4 answer tokens separately.

Peers (``torch_peer.py``, the identical model in torch, same parameter values, ``torch.set_num_threads(2)``):
``torch.func`` is ``vmap(grad)`` (token level: ``vmap`` of ``jacrev``) with each parameter's per-sample gradient
contracted with its slice of the basis; ``torch.func flat`` concatenates the per-sample gradients to ``[n, P]`` and
multiplies by the ``[K, P]`` basis; ``loop`` calls ``backward()`` once per sample. All results are cross-checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import polca_jax as pj
from polca_jax.pipeline import import_experiment
from polca_jax.pipeline import models as transformer

task = import_experiment("arithmetic")  # experiments/arithmetic of this clone

try:
    import torch
except ImportError:  # the peer is optional: the JAX rows are measured without it
    torch = None

CONFIG = transformer.TransformerConfig(
    vocab_size=task.VOCAB_SIZE,
    context_length=task.SEQUENCE_LENGTH,
    num_layers=2,
    d_model=128,
    num_heads=4,
    d_mlp=512,
    output_size=task.OUTPUT_SIZE,
)
NUM_SEQUENCES = 256
NUM_DIRECTIONS = (8, 32)
LEVELS = {"sequence": 1, "token": 4}  # samples per sequence
METHODS = ("reverse", "forward")
LANCZOS_ITERS = 20
THREADS = 2
TORCH_FUNC_CHUNK = {"sequence": 64, "token": 16}  # sequences per torch.func vmap call, the fastest we measured
GOALS = {"hvp": 2.5, "lanczos": 1.2, "torch_func": 0.6, "loop": 5.0}
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass(frozen=True)
class Problem:
    """The model, its losses and the batch that every case uses."""

    params: dict
    loss_fn: Callable  # (params, batch) -> scalar, the mean answer-token loss
    sample_loss_fns: dict  # level -> (params, batch) -> [n_seq] or [n_seq, 4]
    batch: dict  # {"tokens": int32[n_seq, 12]}

    @property
    def num_params(self) -> int:
        return sum(leaf.size for leaf in jax.tree_util.tree_leaves(self.params))


def make_problem(num_sequences: int = NUM_SEQUENCES) -> Problem:
    """The benchmark transformer at its initialisation and ``num_sequences`` distinct addition problems."""
    graphdef, params = transformer.init_params(CONFIG, seed=0)
    token_losses, loss_fn = task.make_loss_fns(graphdef)

    def sequence_losses(p, batch):
        return token_losses(p, batch).sum(axis=-1)

    tokens = task.encode(task.make_problems(num_sequences, seed=0))
    levels = {"sequence": sequence_losses, "token": token_losses}
    return Problem(params, loss_fn, levels, {"tokens": jnp.asarray(tokens)})


def machine_description() -> str:
    """CPU model and core count, Python, jax and torch versions and thread counts."""
    with open("/proc/cpuinfo") as cpuinfo:
        models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    cpu = models[0] if models else platform.processor()
    peer = f"torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else "torch not installed"
    return (
        f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}; "
        f"jax {jax.__version__} ({jax.default_backend()}); {peer}"
    )


class CompileCounter:
    """Counts XLA backend compilations, to prove that timed calls reuse their compiled kernels."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name: str, duration: float, **kwargs) -> None:
        if name == COMPILE_EVENT:
            self.count += 1


def time_interleaved(cases: dict, repeats: int, compiles: CompileCounter) -> tuple[dict, dict, set]:
    """Median seconds per case over ``repeats`` interleaved rounds, after one warm-up call each.

    Returns ``(medians, outputs, recompiled)``: the warm-up outputs (for cross-checks) and the cases that compiled
    during their timed calls.
    """
    outputs = {name: jax.block_until_ready(case()) for name, case in cases.items()}
    times = {name: [] for name in cases}
    recompiled = set()
    for round_index in range(repeats):
        print(f"  round {round_index + 1}/{repeats}", flush=True)
        for name, case in cases.items():
            before = compiles.count
            start = time.perf_counter()
            jax.block_until_ready(case())  # torch results are ready when returned
            times[name].append(time.perf_counter() - start)
            if compiles.count > before:
                recompiled.add(name)
    medians = {name: float(np.median(values)) for name, values in times.items()}
    return medians, outputs, recompiled


def jax_cases(problem: Problem, bases: dict) -> dict:
    """Gradient, HVP, Lanczos and every (level, K, method) of the public ``per_sample_projections``."""
    gradient = jax.jit(jax.grad(problem.loss_fn))
    hvp = jax.jit(lambda params, v, batch: pj.hvp(problem.loss_fn, params, v, batch))
    tangent = _random_like(problem.params, jax.random.key(1))
    lanczos = functools.partial(
        pj.top_eigenpairs,
        pj.FlatHessianMatvec(problem.loss_fn),
        problem.num_params,
        1,
        LANCZOS_ITERS,
        jax.random.key(2),
        matvec_args=(problem.params, problem.batch),
    )
    cases = {
        ("jax", "gradient"): lambda: gradient(problem.params, problem.batch),
        ("jax", "hvp"): lambda: hvp(problem.params, tangent, problem.batch),
        ("jax", "lanczos"): lanczos,
    }
    for level, loss_fn in problem.sample_loss_fns.items():
        for k, basis in bases.items():
            for method in METHODS:
                cases[(method, level, k)] = functools.partial(
                    pj.per_sample_projections, loss_fn, problem.params, problem.batch, basis, method=method
                )
    return cases


def torch_cases(problem: Problem, bases: dict) -> dict:
    """The same model in torch: gradient, HVP, torch.func per-sample projections (two ways of contracting with the
    basis) and the per-sample ``backward()`` loop."""
    import torch_peer  # beside this file; imports torch

    if torch_peer.num_params(CONFIG) != problem.num_params:
        raise AssertionError(f"torch peer has {torch_peer.num_params(CONFIG)} parameters, ours {problem.num_params}")
    params, tangent = (
        torch_peer.params_from_flat(np.asarray(ravel_pytree(tree)[0]), CONFIG)
        for tree in (problem.params, _random_like(problem.params, jax.random.key(1)))
    )
    tokens = torch.from_numpy(np.asarray(problem.batch["tokens"], np.int64))
    heads = CONFIG.num_heads
    cases = {
        ("torch", "gradient"): functools.partial(torch_peer.gradient, params, tokens, heads),
        ("torch", "hvp"): functools.partial(torch_peer.hvp, params, tangent, tokens, heads),
    }
    for level in LEVELS:
        token_level = level == "token"
        for k, basis in bases.items():
            matrix = torch.from_numpy(np.array(basis.vectors))
            contractions = {
                "torch.func": torch_peer.per_leaf_contraction(matrix, params),
                "torch.func flat": torch_peer.flat_contraction(matrix),
            }
            for name, contract in contractions.items():
                cases[(name, level, k)] = functools.partial(
                    torch_peer.func_projections, params, tokens, contract, heads, token_level, TORCH_FUNC_CHUNK[level]
                )
            cases[("loop", level, k)] = functools.partial(
                torch_peer.loop_projections, params, tokens, matrix, heads, token_level
            )
    return cases


def _random_like(params, key):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    )


def check_agreement(outputs: dict) -> float:
    """Largest difference of any per-sample projections from JAX's reverse mode, relative to their scale."""
    worst = 0.0
    for (implementation, level, *k), value in outputs.items():
        if not k or implementation == "reverse":
            continue
        reference = np.asarray(outputs[("reverse", level, k[0])])
        value = value.numpy() if torch is not None and isinstance(value, torch.Tensor) else np.asarray(value)
        error = float(np.max(np.abs(value - reference)) / np.max(np.abs(reference)))
        if not error < 1e-3:
            raise AssertionError(f"{implementation} {level} K={k[0]} disagrees with JAX reverse mode: {error:.2e}")
        worst = max(worst, error)
    return worst


def verdict(value: float, goal: float, at_most: bool = True) -> str:
    """'met' or 'MISSED', with the goal."""
    met = value <= goal if at_most else value >= goal
    return f"{'met' if met else 'MISSED'} (goal {'≤' if at_most else '≥'} {goal:g})"


def _markdown_row(cells) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def report_aggregate(ms: dict, has_torch: bool) -> None:
    """Gradient, HVP and Lanczos lines with the HVP and Lanczos goals."""
    hvp_ratio = ms[("jax", "hvp")] / ms[("jax", "gradient")]
    lanczos_ratio = ms[("jax", "lanczos")] / (LANCZOS_ITERS * ms[("jax", "hvp")])
    print(
        f"\njax:   gradient {ms[('jax', 'gradient')]:.1f} ms; HVP {ms[('jax', 'hvp')]:.1f} ms = "
        f"{hvp_ratio:.2f}× gradient: {verdict(hvp_ratio, GOALS['hvp'])}"
    )
    if has_torch:
        torch_ratio = ms[("torch", "hvp")] / ms[("torch", "gradient")]
        print(
            f"torch: gradient {ms[('torch', 'gradient')]:.1f} ms; HVP {ms[('torch', 'hvp')]:.1f} ms = "
            f"{torch_ratio:.2f}× gradient"
        )
    print(
        f"Lanczos (m={LANCZOS_ITERS}, k=1) {ms[('jax', 'lanczos')]:.0f} ms = {lanczos_ratio:.2f}× m·HVP: "
        f"{verdict(lanczos_ratio, GOALS['lanczos'])}"
    )


def report_projections(ms: dict, has_torch: bool) -> dict:
    """The per-sample table; returns ``{(level, k): time of auto's choice}``."""
    gradient = ms[("jax", "gradient")]
    header = ["samples", "K", "N", "reverse ms (×grad)", "forward ms (×grad)", "auto", "auto fastest"]
    if has_torch:
        header += [
            "torch.func ms",
            "torch.func flat ms",
            "loop ms",
            "auto / torch.func",
            "auto / t.func flat",
            "loop / auto",
        ]
    print("\nper-sample projections: medians in ms; ×grad = / JAX batched gradient")
    print(_markdown_row(header))
    print(_markdown_row(["---"] * len(header)))
    ours = {}
    for level, samples in LEVELS.items():
        for k in NUM_DIRECTIONS:
            mode = {method: ms[(method, level, k)] for method in METHODS}
            auto = pj.choose_method(samples, k)
            ours[level, k] = mode[auto]
            fastest = min(mode.values())
            row = [level, k, NUM_SEQUENCES * samples]
            row += [f"{mode[m]:.0f} ({mode[m] / gradient:.1f})" for m in METHODS]
            row += [auto, "yes" if mode[auto] <= fastest else f"no, {mode[auto] / fastest:.2f}× the other"]
            if has_torch:
                func, flat, loop = (ms[(name, level, k)] for name in ("torch.func", "torch.func flat", "loop"))
                row += [f"{func:.0f}", f"{flat:.0f}", f"{loop:.0f}"]
                row += [f"{mode[auto] / func:.2f}", f"{mode[auto] / flat:.2f}", f"{loop / mode[auto]:.1f}"]
            print(_markdown_row(row))
    return ours


def report_peer_goals(ms: dict, ours: dict) -> None:
    """Verdicts of the two peer goals over the per-sample cases, with ``auto``'s choice as ours."""
    for peer in ("torch.func", "torch.func flat"):
        ratios = [ours[case] / ms[(peer, *case)] for case in ours]
        print(
            f"ours/{peer}: worst {max(ratios):.2f}, best {min(ratios):.2f}: {verdict(max(ratios), GOALS['torch_func'])}"
        )
    speedups = [ms[("loop", *case)] / ours[case] for case in ours]
    print(
        f"loop/ours: worst {min(speedups):.1f}, best {max(speedups):.1f}: "
        f"{verdict(min(speedups), GOALS['loop'], at_most=False)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one timed round (about 2 minutes)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 1 quick, 7 full)")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 7)
    if torch is not None:
        torch.set_num_threads(THREADS)
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}; {machine_description()}")
    problem = make_problem()
    print(f"model: {CONFIG}; P = {problem.num_params:,}; {NUM_SEQUENCES} sequences; {repeats} interleaved rounds")
    bases = {k: pj.random_basis(problem.params, k, jax.random.key(k)) for k in NUM_DIRECTIONS}
    cases = jax_cases(problem, bases)
    if torch is not None:
        cases.update(torch_cases(problem, bases))
    print(f"load average before: {_load()}; warming up (compiling), then timing", flush=True)
    times, outputs, recompiled = time_interleaved(cases, repeats, CompileCounter())
    print(f"load average after: {_load()}")
    print(f"all per-sample implementations agree: max relative difference {check_agreement(outputs):.1e}")
    ms = {name: 1e3 * seconds for name, seconds in times.items()}
    report_aggregate(ms, torch is not None)
    ours = report_projections(ms, torch is not None)
    if recompiled:
        print(f"WARNING: compiled during timed calls (kernel cache misses): {sorted(map(str, recompiled))}")
    if torch is not None:
        report_peer_goals(ms, ours)


def _load() -> str:
    return " ".join(f"{load:.2f}" for load in os.getloadavg()) + f" (1, 5, 15 min; {os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
