"""The decompose stage as a whole, timed side by side with the machine's matmul peak and a PyTorch peer, in one run.

Run ``python benchmarks/decompose.py`` (3 interleaved rounds, about 6 minutes on 2 CPU cores), ``--quick`` (one
round) or ``--checkpoints T``. The stage is what ``polca run arithmetic`` does at its ``cpu`` preset, on T (default 16)
of its checkpoints: ``pj.polca`` over an orbax checkpoint store (restores included) of the preset's model (2 layers,
d_model 128, P = 401,162), 300 evaluation problems (N = 1200 answer-token samples), K = 15 directions with stored
eigenvalues, the paper's second order. The checkpoints are random perturbations of the initialisation written to a
temporary orbax directory: the cost does not depend on the values.

Reported, all from the same run:

* the matmul peak: ``jax.jit(jnp.dot)`` (and numpy's ``@``) of two 2048 × 2048 float32 matrices, timed in every round
  beside the stage, as GFLOP/s;
* the first stage call of the process (compilation included) and the compile time alone (JAX's compile events);
* the warm stage: wall time, and GFLOP/s = the FLOPs XLA counts in the compiled projection pass (×T) / wall time,
  against the peak; the kernel alone on in-memory checkpoints, and the checkpoint restores alone;
* the same stage with the loss computing all 11 positions (the task's loss before ``positions=``);
* the PyTorch peer (``torch_peer.py``): the same T checkpoints restored from the same store, per-leaf ``torch.func``
  token-level projections and losses (``vmap(jacrev)``, 16 sequences per call) and the projected step; the peer's
  model also computes its last block only at the answer positions.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import polca_jax as pj
from polca_jax import tree
from polca_jax.pipeline import import_experiment, models

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import CompileCounter, THREADS, _load, machine_description, verdict  # noqa: E402

task = import_experiment("arithmetic")  # experiments/arithmetic of this clone

try:
    import torch
except ImportError:  # the peer is optional
    torch = None

CONFIG = models.TransformerConfig(
    vocab_size=task.VOCAB_SIZE, context_length=task.SEQUENCE_LENGTH, num_layers=2, d_model=128, num_heads=4,
    d_mlp=512, output_size=task.OUTPUT_SIZE,
)
NUM_SEQUENCES = 300
NUM_DIRECTIONS = 15
PEAK_SIZE = 2048
TORCH_CHUNK = 16
GOALS = {"peak_fraction": 0.5, "torch_func": 0.6}
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling (its monitoring events), and how many backend compiles."""

    def __init__(self):
        self.seconds, self.count = 0.0, 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name: str, duration: float, **kwargs) -> None:
        if name in COMPILE_EVENTS:
            self.seconds += duration
            self.count += name == COMPILE_EVENTS[-1]


def make_setup(num_checkpoints: int, directory: str):
    """Model, losses, evaluation batch, basis and an orbax store of ``num_checkpoints`` checkpoints."""
    graphdef, params = models.init_params(CONFIG, seed=0)
    per_sample_loss, _ = task.make_loss_fns(graphdef)
    answers = slice(task.ANSWER_INPUT_POSITIONS[0], task.ANSWER_INPUT_POSITIONS[-1] + 1)

    def all_positions_loss(p, batch):  # the task's loss before positions=: the last block at all 11 positions
        tokens = batch["tokens"]
        logits = models.apply(graphdef, p, tokens[:, :-1])
        return models.token_cross_entropy(logits[:, answers], tokens[:, answers.start + 1 :])

    batch = {"tokens": task.encode(task.make_problems(NUM_SEQUENCES, seed=0))}
    random = pj.random_basis(params, NUM_DIRECTIONS, jax.random.key(0))
    basis_rows = np.asarray(random.vectors)
    eigenvalues = np.linspace(2.0, 0.1, NUM_DIRECTIONS)
    steps = [10 * t for t in range(num_checkpoints)]
    with pj.CheckpointRecorder(directory, steps) as recorder:
        for t, step in enumerate(steps):
            noise = jax.tree_util.tree_map(
                lambda x, key=jax.random.fold_in(jax.random.key(1), t): 1e-3 * t * jax.random.normal(key, x.shape),
                params,
            )
            recorder.save(step, jax.tree_util.tree_map(jnp.add, params, noise))

    def new_basis():
        return pj.Basis(basis_rows, eigenvalues, np.zeros(NUM_DIRECTIONS, int), "random", np.zeros(NUM_DIRECTIONS))

    return params, per_sample_loss, all_positions_loss, batch, new_basis, basis_rows


def jax_cases(params, loss, all_positions_loss, batch, basis, store, checkpoints) -> dict:
    dot = jax.jit(jnp.dot)
    a = jax.random.normal(jax.random.key(3), (PEAK_SIZE, PEAK_SIZE))
    b = jax.random.normal(jax.random.key(4), (PEAK_SIZE, PEAK_SIZE))
    a_host, b_host = np.asarray(a), np.asarray(b)

    def stage(loss_fn):
        return pj.polca(loss_fn, store, batch, basis, second_order="paper", progress=False)

    def kernel(method):
        return [pj.per_sample_projections(loss, p, batch, basis, method=method) for p in checkpoints]

    return {
        "peak jax.jit(dot)": lambda: dot(a, b),
        "peak numpy": lambda: a_host @ b_host,
        "stage": functools.partial(stage, loss),
        "stage, all positions": functools.partial(stage, all_positions_loss),
        "kernel (auto)": functools.partial(kernel, "auto"),
        "kernel (reverse)": functools.partial(kernel, "reverse"),
        "restores": lambda: [store[t] for t in range(len(store))],
    }


def torch_cases(store, batch, basis_rows) -> dict:
    import torch_peer  # beside this file; imports torch

    tokens = torch.from_numpy(np.asarray(batch["tokens"], np.int64))
    first = torch_peer.params_from_flat(np.asarray(tree.ravel(store[0])), CONFIG)
    contract = torch_peer.per_leaf_contraction(torch.from_numpy(basis_rows), first)
    matrix = torch.from_numpy(basis_rows)
    in_memory = [torch_peer.params_from_flat(np.asarray(tree.ravel(store[t])), CONFIG) for t in range(len(store))]

    def stage():
        projections, losses, step_projection, previous = [], [], [], None
        for t in range(len(store)):
            flat = torch.from_numpy(np.asarray(tree.ravel(store[t])))
            params = torch_peer.params_from_flat(flat.numpy(), CONFIG)
            g, loss = torch_peer.token_projections_and_losses(params, tokens, contract, CONFIG.num_heads, TORCH_CHUNK)
            projections.append(g.numpy())
            losses.append(loss.numpy())
            if previous is not None:
                step_projection.append((matrix @ (flat - previous)).numpy())
            previous = flat
        return np.stack(projections)

    def kernel():
        return [torch_peer.token_projections_and_losses(p, tokens, contract, CONFIG.num_heads, TORCH_CHUNK)[0]
                for p in in_memory]

    return {"torch stage": stage, "torch kernel": kernel}


def time_rounds(cases: dict, repeats: int) -> dict:
    """Median seconds of each case over ``repeats`` interleaved rounds (the peaks: best of 5 calls per round)."""
    times = {name: [] for name in cases}
    for round_index in range(repeats):
        print(f"  round {round_index + 1}/{repeats}", flush=True)
        for name, case in cases.items():
            calls = 5 if name.startswith("peak") else 1
            best = np.inf
            for _ in range(calls):
                start = time.perf_counter()
                jax.block_until_ready(case())
                best = min(best, time.perf_counter() - start)
            times[name].append(best)
    return {name: float(np.median(values)) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one timed round")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 1 quick, 3 full)")
    parser.add_argument("--checkpoints", type=int, default=16, help="checkpoints T (the cpu preset has 151)")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    if torch is not None:
        torch.set_num_threads(THREADS)
    clock, compiles = CompileClock(), CompileCounter()
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}; {machine_description()}")
    with tempfile.TemporaryDirectory() as directory:
        params, loss, all_positions_loss, batch, new_basis, rows = make_setup(args.checkpoints, directory)
        basis = new_basis()
        with pj.OrbaxCheckpoints(directory, template=params) as store:
            checkpoints = [store[t] for t in range(len(store))]
            num = tree.num_params(params)
            print(f"model: P = {num:,}; N = {4 * NUM_SEQUENCES} token samples ({NUM_SEQUENCES} sequences); "
                  f"K = {NUM_DIRECTIONS}; T = {len(store)} checkpoints; {repeats} rounds")
            print(f"load average before: {_load()}", flush=True)
            before = (clock.seconds, clock.count)
            start = time.perf_counter()
            reference = pj.polca(loss, store, batch, basis, second_order="paper", progress=False)
            cold = time.perf_counter() - start
            cold_compile, cold_count = clock.seconds - before[0], clock.count - before[1]
            cost = pj.projection_kernel_cost(loss, params, batch, basis)
            old_cost = pj.projection_kernel_cost(all_positions_loss, params, batch, basis)
            reverse_cost = pj.projection_kernel_cost(loss, params, batch, basis, method="reverse")
            cases = jax_cases(params, loss, all_positions_loss, batch, basis, store, checkpoints)
            if torch is not None:
                cases.update(torch_cases(store, batch, rows))
            outputs = {name: jax.block_until_ready(case()) for name, case in cases.items()}  # warm-up
            check = _agreement(reference, outputs)
            warm_compiles = compiles.count
            seconds = time_rounds(cases, repeats)
            recompiled = compiles.count - warm_compiles
            print(f"load average after: {_load()}")
    report(seconds, cost, old_cost, reverse_cost, cold, cold_compile, cold_count, len(checkpoints), check, recompiled)


def _agreement(reference, outputs) -> str:
    """Largest relative difference of the stage's projections against the other JAX stage and the torch peer."""
    scale = np.max(np.abs(reference.projections))
    lines = []
    for name in ("stage, all positions", "torch stage"):
        if name in outputs:
            other = outputs[name] if name == "torch stage" else outputs[name].projections
            error = float(np.max(np.abs(np.asarray(other) - reference.projections)) / scale)
            if not error < 1e-3:
                raise AssertionError(f"{name} disagrees with the stage: {error:.2e}")
            lines.append(f"{name} {error:.1e}")
    return ", ".join(lines)


def report(s, cost, old_cost, reverse_cost, cold, cold_compile, cold_count, t, check, recompiled) -> None:
    peak = 2 * PEAK_SIZE**3 / s["peak jax.jit(dot)"] / 1e9
    numpy_peak = 2 * PEAK_SIZE**3 / s["peak numpy"] / 1e9
    flops = t * cost.flops
    rate = flops / s["stage"] / 1e9
    print(f"\nagreement with the stage's projections (max relative difference): {check}")
    print(f"matmul peak ({PEAK_SIZE}² float32): jax.jit(dot) {peak:.0f} GFLOP/s, numpy {numpy_peak:.0f} GFLOP/s")
    print(f"projection pass per checkpoint: {cost.kind}, {cost.num_chunks} chunks of {cost.chunk_size} sequences, "
          f"{cost.flops / 1e9:.2f} GFLOP (all positions: {old_cost.flops / 1e9:.2f}; reverse: "
          f"{reverse_cost.flops / 1e9:.2f}), temporaries {cost.temp_bytes / 1e6:.0f} MB")
    print(f"first stage call of the process: {cold:.1f} s, of which tracing + compiling {cold_compile:.1f} s "
          f"({cold_count} compiles)")
    rows = [
        ("stage (warm)", s["stage"], flops),
        ("stage, all positions", s["stage, all positions"], t * old_cost.flops),
        ("kernel (auto), in-memory checkpoints", s["kernel (auto)"], flops),
        ("kernel (reverse), in-memory checkpoints", s["kernel (reverse)"], t * reverse_cost.flops),
        ("checkpoint restores", s["restores"], 0.0),
    ]
    if "torch stage" in s:
        rows += [("torch.func stage", s["torch stage"], 0.0), ("torch.func kernel", s["torch kernel"], 0.0)]
    print("\n| case | s | s per checkpoint | GFLOP/s (XLA count) | / jax.jit(dot) peak |")
    print("| --- | --- | --- | --- | --- |")
    for name, seconds, work in rows:
        cells = [name, f"{seconds:.2f}", f"{seconds / t:.3f}"]
        cells += [f"{work / seconds / 1e9:.0f}", f"{work / seconds / 1e9 / peak:.0%}"] if work else ["", ""]
        print("| " + " | ".join(cells) + " |")
    print(f"\nstage at {rate / peak:.0%} of the jax.jit(dot) peak: {verdict(rate / peak, GOALS['peak_fraction'], False)}")
    print(f"stage with positions= / with all positions: {s['stage'] / s['stage, all positions']:.2f}")
    if "torch stage" in s:
        print(f"stage / torch.func stage: {s['stage'] / s['torch stage']:.2f}: "
              f"{verdict(s['stage'] / s['torch stage'], GOALS['torch_func'])}")
        print(f"kernel (auto) / torch.func kernel: {s['kernel (auto)'] / s['torch kernel']:.2f}")
    if recompiled:
        print(f"WARNING: {recompiled} compilations during timed calls")


if __name__ == "__main__":
    main()
