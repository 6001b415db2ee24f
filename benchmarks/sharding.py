"""Memory per device and results of the kernels on a data × model mesh of 8 simulated CPU devices vs one device.

Run ``XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/sharding.py`` (about 7 CPU-minutes, mostly
compiling: 10 minutes on 2 cores at load 5–6). The model is the arithmetic task's transformer (2 layers, d_model 128,
4 heads, d_mlp 512, 10 output digits; P = 401,162 float32 parameters), token-level samples (4 answer digits of 64
sequences, N = 256), a random orthonormal basis of K = 16 and a Hessian basis (Algorithm 1 over 2 checkpoints, 2
vectors each, 8 Lanczos steps, on the same 64 sequences). For the meshes 8×1, 4×2, 2×4 and 1×8 (data × model) and
for one device (no mesh) it measures:

- bytes per device of the parameters, of the random basis' rows and of the Hessian basis' rows (the first device's
  shards), and the fraction of parameters the sharding rule leaves whole on every device;
- XLA's temporaries of the compiled projection pass (``memory_analysis().temp_size_in_bytes``, reverse and forward
  mode, 8 sequences per chunk per device whatever the mesh). Under a mesh the compiled program is the per-device
  one: the script asserts that XLA's argument bytes equal the per-device bytes of parameters, basis and batch shard;
- the largest difference of ``per_sample_projections`` (reverse and forward) and of the Hessian basis' eigenvalues
  from the one-device run, relative to the largest magnitude, and fails if it exceeds ``TOLERANCE``;
- the wall time of one projection pass after compiling: simulated devices share the same 2 cores, so it says
  nothing about the speed of real devices.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import jax
import numpy as np

import polca_jax as pj
from polca_jax.pipeline import import_experiment, models

task = import_experiment("arithmetic")  # experiments/arithmetic of this clone

CONFIG = models.TransformerConfig(vocab_size=task.VOCAB_SIZE, context_length=task.SEQUENCE_LENGTH, num_layers=2,
                                  d_model=128, num_heads=4, d_mlp=512, output_size=task.OUTPUT_SIZE)
MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))  # data × model
NUM_SEQUENCES = 64
CHUNK = 8  # sequences per chunk per device, the same on every mesh so that the temporaries compare
K = 16
METHODS = ("reverse", "forward")
TOLERANCE = 1e-5  # float32 (eps 1.2e-7): the meshes change only the order of the sums; measured ~1e-6


def relative_difference(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def measure(mesh, problem) -> dict:
    """Bytes per device, projection-pass temporaries, results and times on ``mesh`` (None: one device)."""
    per_sample, loss, checkpoints, batch, basis = problem
    params = checkpoints[0]
    data = 1 if mesh is None else mesh.shape["data"]
    out = {
        "params": pj.per_device_bytes(pj.shard_params(params, mesh)),
        "basis": pj.per_device_bytes(basis.as_tree(params, mesh)),
        "replicated": pj.replicated_fraction(params, mesh)[0],
    }
    hessian = pj.hessian_basis(loss, checkpoints, batch, k_per_checkpoint=2, num_iters=8, key=jax.random.key(1),
                               mesh=mesh, progress=False)
    out["hessian basis"] = pj.per_device_bytes(hessian.as_tree(params, mesh))
    out["eigenvalues"] = hessian.eigenvalues
    for method in METHODS:
        cost = pj.projection_kernel_cost(per_sample, params, batch, basis, method=method, chunk_size=CHUNK, mesh=mesh,
                                         with_flops=False)
        per_device_arguments = out["params"] + out["basis"] + batch["tokens"].nbytes // data
        assert cost.argument_bytes == per_device_arguments, (cost.argument_bytes, per_device_arguments)
        out[f"{method} temp"] = cost.temp_bytes
        run = lambda: pj.per_sample_projections(per_sample, params, batch, basis, method=method, chunk_size=CHUNK,
                                                mesh=mesh).block_until_ready()
        run()  # warm up
        start = time.perf_counter()
        out[method] = np.asarray(run())
        out[f"{method} ms"] = 1e3 * (time.perf_counter() - start)
    return out


def main() -> None:
    if jax.device_count() < 8:
        sys.exit(f"benchmarks/sharding.py needs 8 devices, {jax.device_count()} visible: run it as\n"
                 "XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/sharding.py")
    load = lambda: " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}; jax {jax.__version__}; "
          f"{os.cpu_count()} cores; load average {load()}")
    graphdef, params = models.init_params(CONFIG, seed=0)
    per_sample, loss = task.make_loss_fns(graphdef)
    batch = {"tokens": task.encode(task.make_problems(NUM_SEQUENCES, seed=0))}
    step = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, jax.grad(loss)(params, batch))
    basis = pj.random_basis(params, K, jax.random.key(0))
    problem = (per_sample, loss, [params, step], batch, basis)

    one = measure(None, problem)
    hessian_k = len(one["eigenvalues"])
    print(f"P = {basis.dim:,}, N = {4 * NUM_SEQUENCES}; XLA's temporaries with {CHUNK} sequences per chunk per "
          "device\n")
    print(f"| mesh (data × model) | params / device | random basis (K = {K}) / device "
          f"| Hessian basis (K = {hessian_k}) / device "
          "| params left whole | temporaries reverse | temporaries forward | max rel. diff reverse "
          "| max rel. diff forward | max rel. diff eigenvalues | ms reverse | ms forward |")
    print("| --- " * 12 + "|")
    mb = lambda name, row: f"{row[name] / 1e6:.2f} MB ({row[name] / one[name]:.3f})"
    for shape in (None, *MESHES):
        mesh = None if shape is None else pj.device_mesh(model=shape[1], data=shape[0])
        row = one if mesh is None else measure(mesh, problem)
        diffs = [relative_difference(row[name], one[name]) for name in (*METHODS, "eigenvalues")]
        cells = [mb(name, row) for name in ("params", "basis", "hessian basis")]
        cells += [f"{row['replicated']:.1e}"] + [mb(f"{method} temp", row) for method in METHODS]
        cells += [f"{d:.1e}" for d in diffs] + [f"{row[f'{method} ms']:.0f}" for method in METHODS]
        name = "1 device" if mesh is None else "{} × {}".format(*shape)
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        assert max(diffs) <= TOLERANCE, f"mesh {shape}: results differ from one device's by {max(diffs):.2e}"
    print(f"\nall results within {TOLERANCE:g} of the one-device run; load average {load()}")


if __name__ == "__main__":
    main()
