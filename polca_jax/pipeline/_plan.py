"""``polca plan``: what a run will cost before it runs, on a ``data × model`` mesh of devices: the FLOPs and time of
every stage, the memory per device, the host memory and the disk.

**FLOPs.** Each device kernel is compiled (not run) on this machine for the work of one device and XLA reports its
FLOPs (``cost_analysis``) and temporaries (``memory_analysis``): the training step (AdamW, the whole training batch),
one Hessian-vector product (HVP) on one data shard of the Hessian batch (``⌈n / data⌉`` sequences), one projection
pass on one data shard of the evaluation batch, with curvatures where the run needs them
(:func:`polca_jax.projection_kernel_cost`; the losses come from the same pass), and one per-sample loss pass on the
whole evaluation batch. XLA's FLOP counts depend on the computation, not on the device, so FLOP-based figures are
compiled on a CPU and need no GPU.

**Time.** On ``cpu`` (a device like this machine's default JAX device) a sample of each stage's work is run and
timed as the stage runs it, host work included: training steps on the next training batches, one Lanczos run (as
:func:`polca_jax.hessian_basis` compiles it), :func:`polca_jax.polca` over ``2 + repeats`` in-memory checkpoints,
a one-direction causal check. On ``h100``/``h200`` nothing is run: a kernel takes ``FLOPs / (peak ×
GPU_EFFICIENCY)``, an estimate, not a measurement. Either is scaled by the run's work:

- train: ``num_steps`` steps, an evaluation loss pass every ``metrics_every`` steps, one save per checkpoint;
- basis: per basis built by Lanczos runs (``BasisKind.lanczos``: Algorithm 1 and its variants), basis checkpoints ×
  (one restore + one Lanczos run of ``lanczos_iters`` HVPs on the batch shard); other bases are not timed;
- decompose: per basis, POLCA checkpoints × the longer of one checkpoint's work and one restore (the next checkpoint
  is restored while the current one is decomposed);
- causal: per causal basis, (directions + 1) loss passes on the evaluation batch;
- cluster: per clustering, one HDBSCAN of random trajectories of the run's shape, on this machine's CPU.

The pipeline runs the train, basis, decompose and causal stages on the mesh (``MESH_STAGES``; training sharded like
the kernels: parameters and Adam's moments split over the model axis, each batch over the data axis), so their work
divides over the data shards; the other stages run on one device. The model axis splits memory, not time, and the mesh's communication is
not modelled. Checkpoint saves and restores are timed with orbax on this machine's disk, compilation on this machine
(once per process, 0 with a warm compile cache). The score and report stages (host work, seconds at these sizes,
growing with the null permutations) are left out.

**Memory per device** (in the parameters' dtype), the peak over the device stages: parameters, Adam's moments, bases
and Krylov vectors split over the model axis by :func:`polca_jax.param_spec` (a split leaf's bytes /
model, a replicated leaf whole); batches split by the data axis; XLA's temporaries of the kernel compiled for one
device (the projection pass' per-device chunk has the same size whatever the number of data shards, so its
temporaries do not shrink with them; with a model axis XLA also splits them, so the figure is an upper bound: see the
sharding section of benchmarks/README.md; training's, of one step on its batch shard, likewise); the Lanczos run's
temporaries beyond one HVP's (its Krylov vectors and their products), measured on one device, split like the
parameters.
:func:`measured_memory` compiles each stage's kernel on a real mesh instead, to check these figures
(``benchmarks/stage_memory.py``). The POLCA arrays ``[T, N, K]`` (float32) are streamed to
memory-mapped files: they take disk, and on the host one checkpoint's ``[N, K]`` rows at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

import polca_jax as pj
from polca_jax.analysis import cluster_trajectories
from polca_jax.errors import PolcaError
from polca_jax.pipeline._registry import (JOINT_KINDS, MESH_STAGES, PER_SAMPLE_SIGNALS, bases_of, basis_kind,
                                          variants_of)
from polca_jax.pipeline._stages import causal_bases, check_data_axis
from polca_jax.pipeline._task import Task
from polca_jax.pipeline._training import (_checkpoint_manager, _compiled_train_step, _save, _train_step,
                                          adamw_paper)

BYTES = 4  # the POLCA arrays' float32
GPU_EFFICIENCY = 0.41  # the fraction of peak assumed on a GPU: this project's decompose stage on a CPU reached 41%
# of the jax.jit(dot) matmul peak (benchmarks/README.md); an assumption for GPUs, not a measurement.
HOST_ROWS = 5  # [N, K] arrays one checkpoint holds on the host: g, the previous g, the second-order term and its two
# temporaries (plus the curvature and the previous one where the run computes curvatures)


@dataclasses.dataclass(frozen=True)
class Device:
    """A device to plan for (:func:`plan_run`'s ``device``): its memory and, for a GPU, its peak FLOP/s.

    Attributes:
      name: how the plan names it.
      memory_bytes: its memory, bytes.
      peak_flops: its peak FLOP/s, from which a GPU's times are estimated; None: times are measured on this machine.

    Example:
      >>> from polca_jax.pipeline import Device
      >>> device = Device("a 16 GB GPU", 16 * 10**9, 20e12)
      >>> device.memory_bytes // 10**9, device.peak_flops is None
      (16, False)
    """

    name: str
    memory_bytes: int
    peak_flops: float | None = None

    def seconds(self, kernel: "Kernel") -> float:
        """Seconds of one unit of ``kernel``: measured, or its FLOPs at ``GPU_EFFICIENCY`` of the peak."""
        return kernel.seconds if self.peak_flops is None else kernel.flops / (self.peak_flops * GPU_EFFICIENCY)


# NVIDIA's data sheets: H100 SXM 80 GB HBM3, H200 SXM 141 GB HBM3e, both 67 TFLOP/s FP32 without tensor cores (the
# same chip; TF32 tensor cores would be faster where XLA uses them, but the projections ask for full precision).
GPUS = {
    "h100": Device("H100 SXM (80 GB, 67 TFLOP/s FP32)", 80 * 10**9, 67e12),
    "h200": Device("H200 SXM (141 GB, 67 TFLOP/s FP32)", 141 * 10**9, 67e12),
}


def device_named(name: str) -> Device:
    """The :class:`Device` ``polca plan --device NAME`` plans for.

    Args:
      name: ``"cpu"`` (this machine's default JAX device: its measured speed; its memory, or the RAM for a CPU), or a
        GPU of ``GPUS`` (``"h100"``, ``"h200"``: memory and FP32 peak from the data sheets).

    Returns:
      The :class:`Device`.

    Raises:
      PolcaError: for any other name.

    Example:
      >>> from polca_jax.pipeline import device_named
      >>> device_named("h100").memory_bytes // 10**9, device_named("cpu").peak_flops is None
      (80, True)
    """
    if name in GPUS:
        return GPUS[name]
    if name != "cpu":
        raise PolcaError(f"unknown device {name!r}: choose cpu or one of {', '.join(GPUS)}")
    local = jax.devices()[0]
    limit = (local.memory_stats() or {}).get("bytes_limit")
    if limit:
        return Device(f"this machine's {local.device_kind}", int(limit))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Device(f"this machine's CPU ({os.cpu_count()} cores, {_size(ram)} RAM)", ram)


def parse_mesh(text: str, devices: int | None = None) -> tuple[int, int]:
    """``"2x4"`` -> ``(data, model) = (2, 4)``; without a mesh, ``devices`` data shards (default 1). Raises
    ``PolcaError`` for anything but two positive integers, or a mesh of another size than ``devices``."""
    if devices is not None and devices < 1:
        raise PolcaError(f"--devices must be a positive integer, got {devices}")
    if text is None:
        return (devices or 1, 1)
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip().lower())
    if match is None or 0 in (int(match[1]), int(match[2])):
        raise PolcaError(f"--mesh {text!r}: expected DATAxMODEL, two positive integers such as 1x1, 8x1 or 2x4")
    data, model = int(match[1]), int(match[2])
    if devices is not None and devices != data * model:
        raise PolcaError(f"--mesh {text} has {data * model} devices but --devices is {devices}")
    return data, model


def split_bytes(params, model: int) -> tuple[int, float]:
    """Bytes of one device's share of ``params`` split over a model axis of ``model`` devices by the rule
    (:func:`polca_jax.param_spec`, with the partition rules in force: a split leaf's bytes / model, a replicated
    leaf's whole), and the fraction of the parameters left whole on every device."""
    share, whole, total = 0, 0, 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        nbytes, split = _nbytes(leaf), pj.param_spec(np.shape(leaf), model, path=path) != PartitionSpec()
        share += nbytes // model if split else nbytes
        whole += 0 if split or model == 1 else nbytes
        total += nbytes
    return share, whole / max(total, 1)


def check_model_axis(params, model: int) -> None:
    """Raise ``PolcaError`` when a model axis of ``model`` devices > 1 splits no parameter (every dimension is
    smaller than it, or none is divisible by it)."""
    if model > 1 and split_bytes(params, model)[1] == 1.0:
        largest = max(max(np.shape(leaf), default=1) for leaf in jax.tree_util.tree_leaves(params))
        raise PolcaError(f"--mesh: a model axis of {model} devices divides no dimension of the task's parameters "
                         f"(the largest is {largest}), so it would split nothing: choose a model axis that divides the "
                         "large dimensions (e.g. a power of two)")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One unit of a stage's work on one device (a training step, a Lanczos run, a POLCA checkpoint, a loss pass):
    its kernel's FLOPs and XLA temporaries (bytes), its measured seconds (NaN when only compiled) and the seconds
    compiling it took on this machine."""

    flops: float
    temp_bytes: int
    seconds: float = math.nan
    compile_seconds: float = 0.0


def fits(peak_bytes: int, device: Device) -> bool:
    """Whether ``peak_bytes`` per device fit in the device's memory."""
    return peak_bytes <= device.memory_bytes


@dataclasses.dataclass(frozen=True)
class Plan:
    """A run's estimate, what :func:`plan_run` returns (its example shows one).

    Attributes:
      stages: seconds per device per stage.
      compile_seconds: seconds compiling the stages' kernels take (once per process).
      memory: bytes per device per stage and item (``memory[stage][item]``).
      work: per stage, what its time covers (text).
      flops: FLOPs per device per stage (stages on the host have none).
      host: host memory per item, bytes.
      disk: disk per item, bytes.
      device: the :class:`Device` planned for.
      mesh: ``(data, model)``.
      replicated: the fraction of the parameters that a model axis leaves whole on every device.
    """

    stages: dict[str, float]
    compile_seconds: float
    memory: dict[str, dict[str, int]]
    work: dict[str, str]
    flops: dict[str, float]
    host: dict[str, int]
    disk: dict[str, int]
    device: Device
    mesh: tuple[int, int]
    replicated: float

    @property
    def total_seconds(self) -> float:
        """Seconds of every stage plus compiling."""
        return sum(self.stages.values()) + self.compile_seconds

    @property
    def peak_bytes(self) -> int:
        """Memory per device of the stage that needs most."""
        return max(sum(items.values()) for items in self.memory.values())

    def table(self) -> str:
        """The plan as text: FLOPs, time and work per stage, how the times were made, memory per device per stage,
        host memory and disk, and a WILL NOT FIT line when the peak exceeds the device's memory."""
        data, model = self.mesh
        lines = [f"{'stage':<10} {'FLOPs/device':>13} {'time':>9}   work"]
        for name, seconds in self.stages.items():
            flops = self.flops.get(name)
            lines.append(f"{name:<10} {'host' if flops is None else _flops(flops):>13} {_duration(seconds):>9}   "
                         f"{self.work.get(name, '')}")
        lines.append(f"{'compiling':<10} {'':>13} {_duration(self.compile_seconds):>9}   once per process, 0 with a "
                     "warm cache (measured on this machine)")
        lines.append(f"{'total':<10} {'':>13} {_duration(self.total_seconds):>9}")
        if self.device.peak_flops is None:
            lines.append("time: measured on this machine, a sample of each stage's work on one device's share of the "
                         "samples")
        else:
            lines.append(f"time: ESTIMATED, not measured: kernel FLOPs / ({self.device.peak_flops / 1e12:.0f} TFLOP/s "
                         f"peak × {GPU_EFFICIENCY:.0%} assumed efficiency), no host overhead per call; checkpoint I/O "
                         "and clustering timed on this machine")
        lines.append(f"mesh: {data} x {model} (data x model): {', '.join(MESH_STAGES)} split over {data} data "
                     "shard(s), the other stages on one device; communication not modelled")
        lines.append(f"memory per device (parameters split {model} way(s), {_percent(self.replicated)} of them "
                     "replicated):")
        for stage, items in self.memory.items():
            lines.append(f"  {stage:<10} {_size(sum(items.values())):>8}   "
                         + ", ".join(f"{what} {_size(size)}" for what, size in items.items()))
        verdict = "fits" if fits(self.peak_bytes, self.device) else "DOES NOT FIT"
        lines.append(f"  {'peak':<10} {_size(self.peak_bytes):>8}   of {_size(self.device.memory_bytes)} "
                     f"({self.device.name}): {verdict}")
        lines.append("host: " + ", ".join(f"{what} {_size(size)}" for what, size in self.host.items()))
        lines.append("disk: " + ", ".join(f"{what} {_size(size)}" for what, size in self.disk.items()))
        if not fits(self.peak_bytes, self.device):
            stage = max(self.memory, key=lambda name: sum(self.memory[name].values()))
            lines.append(f"*** WILL NOT FIT: the {stage} stage needs {_size(self.peak_bytes)} per device > "
                         f"{_size(self.device.memory_bytes)} of {self.device.name}: split its batch over more data "
                         "shards, its parameters and bases over more model shards, or lower chunk_size ***")
        return "\n".join(lines)


def plan_run(config, task: Task, *, mesh: tuple[int, int] = (1, 1), device: Device | None = None,
             repeats: int = 2) -> Plan:
    """What a run of ``config`` on ``task`` will cost: time, FLOPs and memory per stage, host memory and disk.

    Plans it for a ``mesh`` of ``(data, model)`` devices like ``device`` (default: this machine's, on which a sample
    of each stage's work is then run and timed, ``repeats`` calls after one that compiles): what ``polca plan``
    prints (the module docstring says how each figure is made).

    Args:
      config: the run's :class:`RunConfig`.
      task: the run's :class:`Task` (:func:`build_task`).
      mesh: ``(data, model)``: the devices the train, basis, decompose and causal stages split their batches
        (data) and parameters (model) over.
      device: the :class:`Device` to plan for (``device_named("h100")``: a GPU, whose times are estimated from
        FLOPs, nothing run); None: this machine's default device, measured.
      repeats: timed calls per kernel, after the one that compiles (on a measured device).

    Returns:
      The :class:`Plan`: seconds, FLOPs and work per stage, compile seconds, memory per device per stage, host memory
      and disk; ``plan.table()`` is the text ``polca plan`` prints.

    Raises:
      PolcaError: a model axis that splits no parameter, or a data axis wider than the evaluation or Hessian
        batch's sequences.

    Example:
      ``out``: the run directory of :func:`polca_jax.pipeline.run`'s example.

      >>> from polca_jax.pipeline import RunDirectory, build_task, plan_run
      >>> run_dir = RunDirectory(out)
      >>> plan = plan_run(run_dir.config, build_task(run_dir), repeats=1)
      >>> list(plan.stages), plan.mesh
      (['train', 'basis', 'decompose', 'causal', 'cluster'], (1, 1))
      >>> "fits" in plan.table()
      True
    """
    device = device_named("cpu") if device is None else device
    data, model = mesh
    run = device.peak_flops is None
    params = task.init_params
    check_model_axis(params, model)
    check_data_axis(task, data)
    param_bytes, replicated = split_bytes(params, model)
    whole_bytes = _nbytes(params)
    num_samples, steps = task.num_samples, len(config.polca_steps)
    basis_size = len(config.basis_steps) * config.k_per_checkpoint
    bases = bases_of(config)
    sizes = {name: basis_kind(name).size_for(config) for name in bases}
    curvature = {name: config.second_order_for(name).needs_curvature for name in bases}
    eval_shard, eval_mask = _shard(task.eval_batch, data), _shard(task.eval_mask, data)
    hessian_shard = _shard(task.hessian_batch, data)
    optimizer = adamw_paper(config.learning_rate, config.weight_decay, config.b1, config.b2, config.warmup_steps)
    opt_state = optimizer.init(params)
    save_blocking, save_seconds, restore_seconds = _checkpoint_io(params, opt_state)
    stages, flops, work, memory, kernels = {}, {}, {}, {}, []

    loss = _loss_kernel(task, task.eval_batch, task.eval_mask, run, repeats)  # training's evaluations
    kernels.append(loss)
    if config.checkpoints is None and task.train_batches is not None:
        train_shard = _shard(task.train_batches(0), data)
        step = _train_kernel(task, optimizer, opt_state, data, run, repeats)
        kernels.append(step)
        saves, evaluations = len(config.checkpoint_steps), config.num_steps // config.metrics_every
        # orbax saves asynchronously: the loop waits for a save's start, the writes overlap the next steps
        loop = config.num_steps * device.seconds(step) + evaluations * device.seconds(loss) + saves * save_blocking
        stages["train"] = max(loop, saves * save_seconds)
        flops["train"] = config.num_steps * step.flops + evaluations * loss.flops
        work["train"] = (f"{config.num_steps} steps × {_duration(device.seconds(step))}, {evaluations} evaluations, "
                         f"{saves} checkpoints saved × {_duration(save_seconds)} "
                         f"({_duration(save_blocking)} of it before the next step)")
        # sharded like the kernels: parameters and moments split over the model axis, the batch over the data axis
        memory["train"] = {"parameters and Adam moments (before and after a step)": 2 * 3 * param_bytes,
                           "step temporaries (the batch shard)": step.temp_bytes,
                           "batch shard": _nbytes(train_shard)}

    hessian_bases = [name for name in bases if basis_kind(name).lanczos]
    lanczos, lanczos_rest = _lanczos_kernel(config, task, hessian_shard, basis_size, run, repeats)
    lanczos_rest = math.ceil(lanczos_rest * param_bytes / whole_bytes)
    kernels.append(lanczos)
    calls = len(hessian_bases) * len(config.basis_steps)
    stages["basis"] = calls * (device.seconds(lanczos) + restore_seconds)
    flops["basis"] = calls * lanczos.flops
    others = [name for name in bases if name not in hessian_bases]
    work["basis"] = (f"{calls} restores and Lanczos runs × {_duration(device.seconds(lanczos))} "
                     f"({config.lanczos_iters} HVPs on {_batch_size(hessian_shard)} sequences each; "
                     f"{', '.join(hessian_bases)})" + (f"; {', '.join(others)}: not timed" if others else ""))
    memory["basis"] = {"parameters": param_bytes, f"{basis_size} basis rows": basis_size * param_bytes,
                       "HVP temporaries": lanczos.temp_bytes,
                       f"the Lanczos run's other temporaries ({config.lanczos_iters + 1} Krylov vectors and their "
                       "products)": lanczos_rest, "batch shard": _nbytes(hessian_shard)}

    passes = {}
    for key in sorted(set(zip(sizes.values(), curvature.values()))):
        passes[key] = _polca_kernel(config, task, eval_shard, eval_mask, *key, run=run, repeats=repeats)
        kernels.append(passes[key][0])
    stages["decompose"] = sum(steps * max(device.seconds(passes[sizes[n], curvature[n]][0]), restore_seconds)
                              for n in bases)
    flops["decompose"] = sum(steps * passes[sizes[n], curvature[n]][0].flops for n in bases)
    work["decompose"] = (f"{_count(len(bases), 'basis', 'bases')} ({', '.join(bases)}) × {steps} checkpoints of "
                         + ", ".join(f"{_duration(device.seconds(unit))} (K={k}{', curvatures' if c else ''}, "
                                     f"{_count(cost.num_chunks, 'chunk')} of {cost.chunk_size})"
                                     for (k, c), (unit, cost) in passes.items()))
    largest = max(passes, key=lambda key: passes[key][0].temp_bytes)
    kernel, cost = passes[largest]
    memory["decompose"] = {
        "3 checkpoints (previous, current, read ahead)": 3 * param_bytes,
        f"{max(sizes.values())} basis rows": max(sizes.values()) * param_bytes,
        f"pass temporaries (one chunk of {cost.chunk_size} sequences: not split by data shards)": kernel.temp_bytes,
        "outputs": cost.output_bytes, "batch shard": _nbytes(eval_shard)}

    causal = _causal_kernel(task, eval_shard, eval_mask, run, repeats)
    kernels.append(causal)
    directions = sum(sizes[name] + 1 for name in causal_bases(config))
    stages["causal"] = directions * device.seconds(causal)
    memory["causal"] = {"final parameters and one edited copy": 2 * param_bytes,
                        "the edit's flat vectors θ_T, θ_0, b (whole on one device)": 3 * whole_bytes,
                        "loss temporaries (the evaluation batch shard)": causal.temp_bytes,
                        "batch shard": _nbytes(eval_shard)}
    flops["causal"] = directions * causal.flops
    work["causal"] = f"{directions} loss passes × {_duration(device.seconds(causal))}"

    per_direction = config.gradient_directions == "each"
    clusterings = sum(sizes[v.basis] if v.trajectory not in PER_SAMPLE_SIGNALS + JOINT_KINDS
                      or (v.trajectory == "gradients" and per_direction) else 1 for v in variants_of(config))
    stages["cluster"] = clusterings * _hdbscan_seconds(config, num_samples, steps)
    work["cluster"] = (f"at most {clusterings} HDBSCAN clusterings of about {max(2, num_samples // 2)} samples "
                       "(host; a direction the oscillation filter drops is not clustered)")

    rows = max(HOST_ROWS + 2 * curvature[name] for name in bases)
    host = {"one checkpoint's POLCA rows": rows * num_samples * max(sizes.values()) * BYTES,
            "causal check": (max(sizes.values()) + 1) * num_samples * BYTES}
    polca_arrays = sum(((2 * steps - 1) * sizes[name] + steps) * num_samples * BYTES for name in bases)
    disk = {f"POLCA arrays of {_count(len(bases), 'basis', 'bases')} (memory-mapped)": polca_arrays,
            "checkpoints (parameters and Adam moments)": 0 if config.checkpoints or task.checkpoints else
            len(config.checkpoint_steps) * 3 * _nbytes(params)}
    return Plan(stages, sum(k.compile_seconds for k in kernels), memory, work, flops, host, disk, device, mesh,
                replicated)


def measured_memory(config, task: Task, *, mesh: tuple[int, int] = (1, 1)) -> dict[str, int]:
    """Bytes per device of each mesh stage's kernel, compiled (not run) on a mesh of this machine's devices.

    The inputs are placed as the stage places them: this is what :func:`plan_run`'s memory per device estimates,
    measured (``benchmarks/stage_memory.py`` sets the two side by side). Each figure is XLA's ``memory_analysis``
    of the compiled program for one device (arguments + outputs + temporaries − aliased): the training step (AdamW;
    parameters, moments and the batch shard as the train stage splits them), one Lanczos run of the basis stage
    deflating the whole basis (:func:`polca_jax.lanczos_kernel_cost`), the projection pass of the decompose stage for
    its largest basis (:func:`polca_jax.projection_kernel_cost`), and the causal check's loss on the evaluation batch
    shard plus the final and initial parameters the stage keeps. Partition rules in force
    (:func:`polca_jax.partition_rules`) place the parameters.

    Args:
      config: the run's :class:`RunConfig`.
      task: the run's :class:`Task` (:func:`build_task`).
      mesh: ``(data, model)``; it needs ``data × model`` devices (on a CPU, simulate them with
        ``XLA_FLAGS=--xla_force_host_platform_device_count=N``).

    Returns:
      Bytes per device per stage: ``"train"`` (when the run trains), ``"basis"``, ``"decompose"`` and ``"causal"``.

    Raises:
      PolcaError: fewer devices than the mesh needs, a model axis that splits no parameter, or a data axis wider than
        the evaluation or Hessian batch's sequences.

    Example:
      ``out``: the run directory of :func:`polca_jax.pipeline.run`'s example.

      >>> from polca_jax.pipeline import RunDirectory, build_task, measured_memory
      >>> run_dir = RunDirectory(out)
      >>> memory = measured_memory(run_dir.config, build_task(run_dir))
      >>> sorted(memory), all(size > 0 for size in memory.values())
      (['basis', 'causal', 'decompose', 'train'], True)
    """
    data, model = mesh
    if data * model > jax.device_count():
        raise PolcaError(f"a {data} x {model} mesh needs {data * model} devices, this process has "
                         f"{jax.device_count()} (simulate CPU devices with "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={data * model})")
    check_model_axis(task.init_params, model)
    check_data_axis(task, data)
    devices = pj.device_mesh(model=model, data=data, devices=jax.devices()[: data * model])
    params = pj.shard_params(task.init_params, devices)
    measured = {}
    if config.checkpoints is None and task.train_batches is not None:
        optimizer = adamw_paper(config.learning_rate, config.weight_decay, config.b1, config.b2, config.warmup_steps)
        opt_state = pj.shard_params(optimizer.init(params), devices)
        step = _compiled_train_step(task.loss, optimizer, params, opt_state, devices)
        batch = pj.shard_batch(task.train_batches(0), devices)
        measured["train"] = _device_bytes(step.lower(params, opt_state, batch, 0, jnp.asarray(-1)).compile())
    basis_size = len(config.basis_steps) * config.k_per_checkpoint
    measured["basis"] = pj.lanczos_kernel_cost(task.loss, params, task.hessian_batch,
                                               k_per_checkpoint=config.k_per_checkpoint,
                                               num_iters=config.lanczos_iters, num_deflated=basis_size,
                                               mesh=devices).run_bytes
    passes = []  # one pass per distinct (basis size, curvatures), as plan_run compiles them
    for size, curvature in sorted({(basis_kind(name).size_for(config), config.second_order_for(name).needs_curvature)
                                   for name in bases_of(config)}):
        rows = jax.tree_util.tree_map(lambda p: jnp.zeros((size, *np.shape(p)), p.dtype), task.init_params)
        cost = pj.projection_kernel_cost(task.per_sample_loss, params, task.eval_batch, rows, curvature=curvature,
                                         method=config.projection_method, chunk_size=config.chunk_size,
                                         mesh=devices, with_flops=False)
        passes.append(cost.argument_bytes + cost.output_bytes + cost.temp_bytes)
    measured["decompose"] = max(passes)
    # padded to whole data shards, as per_sample_losses pads its batch
    eval_batch = pj.shard_batch(_padded(task.eval_batch, data), devices)
    loss = jax.jit(task.per_sample_loss).lower(params, eval_batch).compile()
    measured["causal"] = _device_bytes(loss) + 2 * pj.per_device_bytes(params)
    return measured


def _padded(batch, shards: int):
    """``batch`` with its last sequence repeated up to a multiple of ``shards`` sequences."""
    extra = -_batch_size(batch) % shards
    return jax.tree_util.tree_map(lambda x: np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]) if extra else x,
                                  batch)


def _device_bytes(compiled) -> int:
    """XLA's bytes of a compiled program on one device: arguments + outputs + temporaries − aliased."""
    memory = compiled.memory_analysis()
    return int(memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
               - memory.alias_size_in_bytes)


def _polca_kernel(config, task: Task, batch, mask, size: int, curvature: bool, *, run: bool, repeats: int):
    """One checkpoint of :func:`polca_jax.polca` along ``size`` directions on ``batch``: ``(Kernel, KernelCost)``,
    the FLOPs and memory of its projection pass from XLA; when ``run``, its seconds per checkpoint from a run of
    polca on ``2 + repeats`` in-memory checkpoints streamed to a temporary directory (after a run of 2 that
    compiles), so the host work of a checkpoint (its checks, the second-order term, writing its rows) counts too,
    and a share of the run's own set-up."""
    params = task.init_params
    options = dict(method=config.projection_method, chunk_size=config.chunk_size)
    seconds = compiling = math.nan
    if run:  # first, so that polca's first run pays the compilation (the cost below then reuses it)
        seconds, compiling = _polca_seconds(config, task, batch, mask, size, curvature, options, repeats)
    rows = jax.tree_util.tree_map(lambda p: jnp.zeros((size, *np.shape(p)), p.dtype), params)
    start = time.perf_counter()
    cost = pj.projection_kernel_cost(task.per_sample_loss, params, batch, rows, curvature=curvature, **options)
    if not run:  # it compiled the pass and a one-chunk pass: about twice the pass' compile time
        compiling = (time.perf_counter() - start) / 2
    return Kernel(cost.flops, cost.temp_bytes, seconds, compiling), cost


def _polca_seconds(config, task: Task, batch, mask, size: int, curvature: bool, options: dict,
                   repeats: int) -> tuple[float, float]:
    """(seconds per checkpoint, seconds compiling) of polca along a random basis of ``size`` directions (with unit
    eigenvalues unless the run computes curvatures along it), as :func:`_polca_kernel` describes."""
    params = task.init_params
    basis = pj.random_basis(params, size, jax.random.key(0))
    second_order, eigenvalues = config.second_order, "stored"
    if curvature and second_order == "paper":  # a basis without eigenvalues: the paper's term needs curvatures
        eigenvalues = "current"
    else:
        basis = pj.Basis(basis.vectors, np.ones(size), np.zeros(size, int), "hessian", np.zeros(size))
    with tempfile.TemporaryDirectory() as directory:
        def polca(count: int, name: str) -> float:
            began = time.perf_counter()
            pj.polca(task.per_sample_loss, [params] * count, batch, basis, second_order=second_order,
                     eigenvalues=eigenvalues, mask=mask, progress=False, out=Path(directory) / name, **options)
            return time.perf_counter() - began

        first, timed = polca(2, "first"), polca(2 + repeats, "timed")
    seconds = timed / (2 + repeats)
    return seconds, max(0.0, first - 2 * seconds)


def _train_kernel(task: Task, optimizer, opt_state, data: int, run: bool, repeats: int) -> Kernel:
    """One training step (AdamW) as the train stage compiles it, on one data shard of the batch; timed with the next
    training batches' shards."""
    params, count = task.init_params, itertools.count()
    batches = lambda step: _shard(task.train_batches(step), data)  # noqa: E731
    arguments = (params, opt_state, batches(0), 0, jnp.asarray(-1))
    compiled, flops, temp, compiling = _compile(jax.jit(functools.partial(_train_step, task.loss, optimizer)),
                                                *arguments)
    if not run:
        return Kernel(flops, temp, math.nan, compiling)
    seconds, _ = _timed(lambda: compiled(params, opt_state, batches(next(count)), 0, jnp.asarray(-1)), repeats)
    return Kernel(flops, temp, seconds, compiling)


def _lanczos_kernel(config, task: Task, batch, basis_size: int, run: bool, repeats: int) -> tuple[Kernel, int]:
    """One basis checkpoint of Algorithm 1: Lanczos with ``lanczos_iters`` HVPs on ``batch``, deflating
    ``basis_size`` rows, as :func:`polca_jax.hessian_basis` compiles it (:func:`polca_jax.lanczos_kernel_cost`), on
    one device: the kernel (its FLOPs and temporaries are those of its HVPs: XLA counts a loop's body once; the
    Gram-Schmidt steps add a few multiples of P per iteration) and the run's temporaries beyond one HVP's (the Krylov
    vectors and their products: parameter-shaped)."""
    cost = pj.lanczos_kernel_cost(task.loss, task.init_params, batch, k_per_checkpoint=config.k_per_checkpoint,
                                  num_iters=config.lanczos_iters, num_deflated=basis_size, timed=run)
    return (Kernel(cost.flops, cost.temp_bytes, cost.seconds, cost.compile_seconds),
            max(0, cost.run_temp_bytes - cost.temp_bytes))


def _loss_kernel(task: Task, batch, mask, run: bool, repeats: int) -> Kernel:
    """One per-sample loss pass on ``batch`` as :func:`polca_jax.per_sample_losses` runs it (the training's
    evaluations)."""
    _, flops, temp, compiling = _compile(jax.jit(task.per_sample_loss), task.init_params, batch)
    if not run:
        return Kernel(flops, temp, math.nan, compiling)
    seconds, compiling = _timed(lambda: pj.per_sample_losses(task.per_sample_loss, task.init_params, batch,
                                                             mask=mask), repeats)
    return Kernel(flops, temp, seconds, compiling)


def _causal_kernel(task: Task, batch, mask, run: bool, repeats: int) -> Kernel:
    """One direction of the causal check (a loss pass of ablated parameters) on one data shard of the evaluation
    batch: when ``run``, half of :func:`polca_jax.direction_ablation_losses` on one direction (its reference pass and
    that direction's)."""
    loss = _loss_kernel(task, batch, mask, False, repeats)
    if not run:
        return dataclasses.replace(loss, compile_seconds=0.0)
    params = task.init_params
    basis = pj.random_basis(params, 1, jax.random.key(0))
    seconds, compiling = _timed(lambda: pj.direction_ablation_losses(task.per_sample_loss, params, params, basis,
                                                                      batch, mask=mask), repeats)
    return dataclasses.replace(loss, seconds=seconds / 2, compile_seconds=compiling)


def _compile(jitted, *arguments) -> tuple[Callable, float, int, float]:
    """``jitted`` compiled for ``arguments`` (not run): the compiled function, XLA's FLOPs and temporary bytes, and
    the seconds compiling took."""
    start = time.perf_counter()
    compiled = jitted.lower(*arguments).compile()
    compiling = time.perf_counter() - start
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return compiled, float(analysis.get("flops", 0.0)), int(compiled.memory_analysis().temp_size_in_bytes), compiling


def _hdbscan_seconds(config, num_samples: int, steps: int) -> float:
    """Seconds of one HDBSCAN clustering of random trajectories like the run's, on this machine."""
    trajectories = np.random.default_rng(0).standard_normal((max(2, num_samples // 2), steps))
    start = time.perf_counter()
    cluster_trajectories(trajectories, min_cluster_size=max(2, min(config.min_cluster_size, len(trajectories) // 4)),
                         min_samples=max(1, len(trajectories) // int(config.min_samples_divisor)))
    return time.perf_counter() - start


def _shard(batch, data: int):
    """One data shard of a batch (or mask): its first ``⌈n / data⌉`` sequences (None stays None)."""
    if batch is None or data == 1:
        return batch
    size = -(-_batch_size(batch) // data)
    return jax.tree_util.tree_map(lambda x: x[:size], batch)


def _batch_size(batch) -> int:
    return int(np.shape(jax.tree_util.tree_leaves(batch)[0])[0])


def _nbytes(arrays) -> int:
    """Bytes of the arrays of a pytree (no copy)."""
    return sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(arrays))


def _checkpoint_io(params, opt_state) -> tuple[float, float, float]:
    """Seconds to save a training checkpoint (``params`` and ``opt_state``) until the training loop may go on, until
    it is written, and to restore its parameters, with orbax as the pipeline does (a temporary directory)."""
    with tempfile.TemporaryDirectory() as directory:
        with _checkpoint_manager(directory, create=True) as manager:
            _save(manager, 0, params, opt_state)  # the first save pays orbax's start-up
            manager.wait_until_finished()
            start = time.perf_counter()
            _save(manager, 1, params, opt_state)
            blocking = time.perf_counter() - start
            manager.wait_until_finished()
            save = time.perf_counter() - start
        with pj.OrbaxCheckpoints(directory, template=params) as store:
            jax.block_until_ready(store[0])
            start = time.perf_counter()
            jax.block_until_ready(store[1])
            restore = time.perf_counter() - start
    return blocking, save, restore


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
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms" if seconds >= 0.001 else f"{seconds * 1e6:.0f} µs"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _flops(flops: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.0f} FLOP"


def _count(number: int, one: str, many: str | None = None) -> str:
    return f"{number} {one if number == 1 else many or one + 's'}"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


def _size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} B"
