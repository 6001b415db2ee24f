"""``polca plan``: what a run will cost before it runs — time per stage from a short timed warm-up of the real
kernels on the task's real shapes, and the memory its arrays need.

Each device stage is timed on a sample of its work and scaled by how much of that work the run does:

- train: ``num_steps`` × one training step;
- basis: per Hessian basis, basis checkpoints × ``lanczos_iters`` × one Hessian-vector product;
- decompose: per basis, POLCA checkpoints × one pass of per-sample projections (and losses) over the evaluation
  samples, with as many directions as the basis has (timed with a random basis of that size);
- causal: per basis, its directions × one per-sample loss pass;
- cluster: per clustering, one HDBSCAN on random trajectories of the expected shape.

plus one orbax save (train) or restore (basis, decompose) per checkpoint, timed on the task's parameters. Compilation
is timed apart (it is paid once per process, and not at all with a warm compile cache). The estimate leaves out the
host work of the score and report stages (seconds) and Python overheads between calls.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time

import jax
import numpy as np

import polca_jax as pj
from polca_jax import _tree as tree
from polca_jax.analysis import cluster_trajectories
from polca_jax.pipeline._stages import bases_of, variants_of
from polca_jax.pipeline._task import Task

BYTES = 4  # float32


@dataclasses.dataclass(frozen=True)
class Plan:
    """Estimated seconds per stage (``stages``), one-off compile seconds, and bytes of the largest arrays."""

    stages: dict[str, float]
    compile_seconds: float
    memory: dict[str, int]
    work: dict[str, str]

    @property
    def total_seconds(self) -> float:
        return sum(self.stages.values()) + self.compile_seconds

    def table(self) -> str:
        """The plan as text: a line per stage, the compile time, the total, and the memory."""
        lines = [f"{'stage':<10} {'estimate':>10}   work"]
        lines += [f"{name:<10} {_duration(seconds):>10}   {self.work.get(name, '')}"
                  for name, seconds in self.stages.items()]
        lines.append(f"{'compiling':<10} {_duration(self.compile_seconds):>10}   once per process (0 with a warm cache)")
        lines.append(f"{'total':<10} {_duration(self.total_seconds):>10}")
        lines.append("memory: " + ", ".join(f"{name} {_size(size)}" for name, size in self.memory.items()))
        return "\n".join(lines)


def plan_run(config, task: Task, *, repeats: int = 2) -> Plan:
    """Time a sample of every device stage of ``config`` on ``task`` (``repeats`` timed calls after a warm-up call
    that compiles) and scale it to the whole run."""
    params = task.init_params
    num_params = tree.num_params(params)
    bases = bases_of(config)
    basis_size = len(config.basis_steps) * config.k_per_checkpoint
    sizes = {name: config.lca_axes if name == "parameter_axes" else basis_size for name in bases}
    compile_seconds, stages, work = 0.0, {}, {}

    save_seconds, restore_seconds = _checkpoint_io(params)
    if config.checkpoints is None and task.train_batches is not None:
        grad = jax.jit(jax.value_and_grad(task.loss))
        seconds, compiling = _timed(lambda: grad(params, task.train_batches(0)), repeats)
        saves = len(config.checkpoint_steps)
        stages["train"] = config.num_steps * seconds + saves * 3 * save_seconds  # params and Adam's two moments
        compile_seconds += compiling
        work["train"] = f"{config.num_steps} steps × {_duration(seconds)}, {saves} checkpoints saved"

    matvec = pj.FlatHessianMatvec(task.loss)
    vector = jax.numpy.ones(num_params, tree.ravel(params).dtype) / math.sqrt(num_params)
    hvp = jax.jit(matvec)
    seconds, compiling = _timed(lambda: hvp(vector, params, task.hessian_batch), repeats)
    hessian_bases = [name for name in bases if name in ("hessian", "shuffled_hessian")]
    count = len(hessian_bases) * len(config.basis_steps) * config.lanczos_iters
    restores = len(hessian_bases) * len(config.basis_steps)
    stages["basis"], compile_seconds = count * seconds + restores * restore_seconds, compile_seconds + compiling
    work["basis"] = f"{count} Hessian-vector products × {_duration(seconds)}, {restores} restores"

    decompose, causal = 0.0, 0.0
    loss_seconds, compiling = _timed(lambda: pj.per_sample_losses(task.per_sample_loss, params, task.eval_batch,
                                                                  mask=task.eval_mask), repeats)
    compile_seconds += compiling
    for size in sorted(set(sizes.values())):
        basis = pj.random_basis(params, size, jax.random.key(0))
        seconds, compiling = _timed(lambda: pj.per_sample_projections(
            task.per_sample_loss, params, task.eval_batch, basis, mask=task.eval_mask,
            method=config.projection_method, chunk_size=config.chunk_size), repeats)
        compile_seconds += compiling
        for name in bases:
            if sizes[name] == size:
                decompose += len(config.polca_steps) * (seconds + loss_seconds + restore_seconds)
    for name in bases:
        if name in ("hessian", "random"):
            causal += sizes[name] * loss_seconds
    stages["decompose"] = decompose
    work["decompose"] = f"{len(bases)} bases × {len(config.polca_steps)} checkpoints"
    stages["causal"] = causal
    work["causal"] = f"{sum(sizes[n] for n in bases if n in ('hessian', 'random'))} directions × " \
                     f"{_duration(loss_seconds)}"

    num_samples = task.num_samples
    clusterings = sum(1 if v.trajectory in ("loss", "loss_change") else sizes[v.basis] for v in variants_of(config))
    trajectories = np.random.default_rng(0).standard_normal((max(2, num_samples // 2), len(config.polca_steps)))
    start = time.perf_counter()
    cluster_trajectories(trajectories, min_cluster_size=max(2, min(config.min_cluster_size, len(trajectories) // 4)),
                         min_samples=max(1, len(trajectories) // int(config.min_samples_divisor)))
    stages["cluster"] = clusterings * (time.perf_counter() - start)
    work["cluster"] = f"{clusterings} HDBSCAN clusterings of about {len(trajectories)} samples"

    steps = len(config.polca_steps)
    memory = {
        "parameters and optimizer": 3 * num_params * BYTES,
        "one basis": basis_size * num_params * BYTES,
        "Lanczos vectors": config.lanczos_iters * num_params * BYTES,
        "POLCA arrays per basis (host)": 3 * steps * num_samples * basis_size * BYTES,
        "checkpoints (disk)": len(config.checkpoint_steps) * 3 * num_params * BYTES,
    }
    return Plan(stages, compile_seconds, memory, work)


def _checkpoint_io(params) -> tuple[float, float]:
    """Seconds to save and to restore ``params`` with orbax, as the pipeline does (a temporary directory)."""
    with tempfile.TemporaryDirectory() as directory:
        with pj.CheckpointRecorder(directory, steps=[0, 1]) as recorder:
            recorder.save(0, params)  # the first save pays orbax's start-up
            recorder.wait()
            start = time.perf_counter()
            recorder.save(1, params)
            recorder.wait()
            save = time.perf_counter() - start
        with pj.OrbaxCheckpoints(directory, template=params) as store:
            jax.block_until_ready(store[0])
            start = time.perf_counter()
            jax.block_until_ready(store[1])
            restore = time.perf_counter() - start
    return save, restore


def _timed(call, repeats: int) -> tuple[float, float]:
    """(seconds per call after the first, seconds of the first call beyond that): the second is compilation."""
    start = time.perf_counter()
    jax.block_until_ready(call())
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(call())
    seconds = (time.perf_counter() - start) / repeats
    return seconds, max(0.0, first - seconds)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
