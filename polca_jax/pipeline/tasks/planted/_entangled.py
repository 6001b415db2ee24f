"""Entangled planted groups: every sample draws its input from one distribution, its group is a nonlinear function of
that input, and each group's target is computed by a mechanism of its own.

    polca run planted-entangled --preset cpu --out runs/entangled

Every input has three parts: a *gate* that decides the group, and two Gaussian blocks ``x_A`` and ``x_B``
(``block_dims`` each), both filled for every sample. Group A's target is a teacher on ``x_A``, group B's a teacher on
``x_B`` scaled by ``amplitude_b``:

    y = t_A(x_A)                     for group A (gate closed)
    y = amplitude_b · t_B(x_B)       for group B (gate open)

so a sample's loss can only fall through its own group's teacher (and the gate). The gate (``rule``):

- ``"parity"``: ``gate_bits`` inputs of ±1; the gate is open when the product of the first two is +1 (XOR of their
  signs: no linear function of the input, and no norm of it, tells the groups apart);
- ``"carry"``: two digits a, b in 0..9, one-hot (20 inputs); the gate is open when a + b ≥ 10 (a carry: 45% of
  the digit pairs, a nonlinear function of which inputs are hot).

Since every sample fills every input, each first-layer row gets a gradient from both groups at the start: where a
sample's gradient lies among the parameters does not give its group away there (the pipeline's label-free control,
and the trivial controls of ``experiments/planted``). ``amplitude_b < 1`` makes group B's teacher weaker, so the
student learns it after group A's. The student is the benchmark's tanh MLP with one shared head (nothing tells it
the group but the gate).

``mirror=True`` (parity only, ``amplitude_b = 1``) makes the groups exact mirror images, so that the exact loss
cannot tell them apart while each group still has its own mechanism. The mirror map ``S`` negates the first gate
bit (which flips the gate) and swaps ``x_A`` with ``x_B``; group B's teacher is group A's, so ``y(S x) = y(x)``.
Every evaluation, Hessian and training batch is a set of samples followed by their mirror images, and the student
starts symmetric (the second half of its hidden units are mirror copies of the first: ``w_in[:, H/2 + j] = S
w_in[:, j]``, equal readout weights), so ``f(S x) = f(x)`` at every step up to float rounding, which training can amplify in
float32 (``JAX_ENABLE_X64=1`` keeps the symmetry): a sample and its mirror image have the same loss trajectory, and
only where their gradients lie among the parameters differs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from polca_jax.errors import PolcaError
from polca_jax.pipeline import LabelSet, Task, task_factory
from polca_jax.pipeline.tasks.planted._model import BENCHMARK_SETTINGS, TINY_SETTINGS, PerSampleLoss, teacher_output
from polca_jax.pipeline.tasks.planted._scores import planted_report_sections

RULES = ("parity", "carry")
PRESETS = {
    "tiny": dict(TINY_SETTINGS, width=16),
    "cpu": dict(BENCHMARK_SETTINGS, num_eval_samples=400, width=32, num_steps=1200, polca_every=20, basis_every=120,
                lanczos_iters=20, min_cluster_size=30, lca_axes=10, metrics_every=50),
}
PRESETS["cpu-carry"] = dict(PRESETS["cpu"], rule="carry")
PRESETS["cpu-null"] = dict(PRESETS["cpu"], same_mechanism=True, amplitude_b=1.0)  # the negative control
PRESETS["cpu-late"] = dict(PRESETS["cpu"], late_step=600, threshold_step=500, window_steps=100)  # B learned late
PRESETS["cpu-mirror"] = dict(PRESETS["cpu"], mirror=True, amplitude_b=1.0)  # the exact loss cannot tell the groups


@dataclasses.dataclass(frozen=True)
class EntangledSpec:
    """The shape of one entangled benchmark (see the module docstring)."""

    rule: str
    gate_bits: int
    block_dims: int
    amplitude_b: float
    same_mechanism: bool = False
    mirror: bool = False

    def __post_init__(self):
        if self.rule not in RULES:
            raise PolcaError(f"rule must be one of {RULES}, got {self.rule!r}")
        if isinstance(self.gate_bits, bool) or not isinstance(self.gate_bits, int) or self.gate_bits < 2:
            raise PolcaError(f"gate_bits must be an integer >= 2, got {self.gate_bits!r}")
        if isinstance(self.block_dims, bool) or not isinstance(self.block_dims, int) or self.block_dims < 1:
            raise PolcaError(f"block_dims must be an integer >= 1, got {self.block_dims!r}")
        if not (np.isfinite(self.amplitude_b) and self.amplitude_b > 0):
            raise PolcaError(f"amplitude_b must be a finite number > 0, got {self.amplitude_b!r}")
        if self.mirror and (self.rule != "parity" or self.amplitude_b != 1.0 or self.same_mechanism):
            raise PolcaError("mirror=true needs rule=parity, amplitude_b=1.0 and same_mechanism=false (the mirror map "
                             f"flips a parity gate and swaps two equal teachers), got rule={self.rule!r}, "
                             f"amplitude_b={self.amplitude_b!r}, same_mechanism={self.same_mechanism!r}")

    @property
    def gate_dims(self) -> int:
        return self.gate_bits if self.rule == "parity" else 20

    @property
    def input_dim(self) -> int:
        """D = gate inputs + x_A + x_B."""
        return self.gate_dims + 2 * self.block_dims

    def mirror_image(self, x: np.ndarray) -> np.ndarray:
        """``S x`` for inputs ``[..., D]``: the first gate bit negated, ``x_A`` and ``x_B`` swapped (``S S = 1``)."""
        gates, x_a, x_b = np.split(x, [self.gate_dims, self.gate_dims + self.block_dims], axis=-1)
        return np.concatenate([gates * np.where(np.arange(self.gate_dims) == 0, -1, 1).astype(x.dtype), x_b, x_a], axis=-1)


def draw_gates(spec: EntangledSpec, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(gate inputs [n, gate_dims], group int[n])``: 1 (group B) where the gate is open."""
    if spec.rule == "parity":
        bits = rng.choice([-1.0, 1.0], size=(n, spec.gate_bits))
        return bits, (bits[:, 0] * bits[:, 1] > 0).astype(np.int32)
    a, b = rng.integers(0, 10, size=n), rng.integers(0, 10, size=n)
    one_hot = np.zeros((n, 20))
    one_hot[np.arange(n), a] = 1.0
    one_hot[np.arange(n), 10 + b] = 1.0
    return one_hot, (a + b >= 10).astype(np.int32)


def make_teachers(spec: EntangledSpec, rng: np.random.Generator) -> tuple[dict, dict]:
    """Two independent teachers ``t(z) = Σ_j a_j tanh(2 u_j · z)`` on ``block_dims`` inputs (unit-norm u_j); with
    ``spec.mirror`` the second is the first."""
    teachers = []
    for _ in range(2):
        u = rng.normal(size=(spec.block_dims, 2))
        teachers.append({"u": u / np.linalg.norm(u, axis=0, keepdims=True), "a": np.array([1.0, 0.5])})
    return teachers[0], teachers[0 if spec.mirror else 1]


def make_samples(spec: EntangledSpec, teachers: tuple[dict, dict], n: int, rng: np.random.Generator, *,
                 group_a_only: bool = False) -> dict:
    """``{"x": [n, D], "y": [n], "group": int[n]}`` (float32 inputs and targets); ``group_a_only``: gates drawn
    from their distribution given a closed gate (the first n closed ones of repeated draws). With ``spec.mirror``
    (n even) the last n/2 samples are the mirror images of the first n/2."""
    if spec.mirror:
        if n % 2 or group_a_only:
            raise PolcaError(f"mirrored samples come in pairs of both groups: n must be even and no group late "
                             f"(got n={n}, group_a_only={group_a_only})")
        half = make_samples(dataclasses.replace(spec, mirror=False), teachers, n // 2, rng)
        return {"x": np.concatenate([half["x"], spec.mirror_image(half["x"])]),
                "y": np.concatenate([half["y"], half["y"]]), "group": np.concatenate([half["group"], 1 - half["group"]])}
    gates, groups = draw_gates(spec, n, rng)
    while group_a_only and np.count_nonzero(groups == 0) < n:
        more_gates, more_groups = draw_gates(spec, n, rng)
        gates, groups = np.concatenate([gates, more_gates]), np.concatenate([groups, more_groups])
    if group_a_only:
        keep = np.flatnonzero(groups == 0)[:n]
        gates, groups = gates[keep], groups[keep]
    x_a, x_b = rng.normal(size=(n, spec.block_dims)), rng.normal(size=(n, spec.block_dims))
    own_b = teacher_output(teachers[0], x_a) if spec.same_mechanism else teacher_output(teachers[1], x_b)
    y = np.where(groups == 1, spec.amplitude_b * own_b, teacher_output(teachers[0], x_a))
    x = np.concatenate([gates, x_a, x_b], axis=1)
    return {"x": x.astype(np.float32), "y": y.astype(np.float32), "group": groups}


def init_params(spec: EntangledSpec, width: int, key: jax.Array) -> dict:
    """``w_in [D, H]`` ~ N(0, 1/D), ``w_out [H, 1]`` ~ N(0, 1/H), ``b_out [1]`` = 0: one shared head. With
    ``spec.mirror`` (H even) unit ``H/2 + j`` is the mirror copy of unit j: ``w_in[:, H/2 + j] = S w_in[:, j]``,
    ``w_out[H/2 + j] = w_out[j]``."""
    k_in, k_out = jax.random.split(key)
    w_in = jax.random.normal(k_in, (spec.input_dim, width)) / np.sqrt(spec.input_dim)
    w_out = jax.random.normal(k_out, (width, 1)) / np.sqrt(width)
    if spec.mirror:
        if width % 2:
            raise PolcaError(f"mirror=true pairs each hidden unit with its mirror copy: width must be even, got {width}")
        half = np.asarray(w_in[:, : width // 2])
        w_in = jnp.concatenate([half, spec.mirror_image(half.T).T], axis=1)
        w_out = jnp.concatenate([w_out[: width // 2], w_out[: width // 2]])
    return {"w_in": w_in, "w_out": w_out, "b_out": jnp.zeros(1)}


@task_factory(presets=PRESETS, default_preset="cpu", report_sections=planted_report_sections)
def make_entangled_task(rule: str = "parity", gate_bits: int = 4, block_dims: int = 6, amplitude_b: float = 0.5,
                        same_mechanism: bool = False, mirror: bool = False, late_step: int = 0, width: int = 32,
                        num_eval_samples: int = 400, num_hessian_samples: int = 256, batch_size: int = 64,
                        seed: int = 0) -> Task:
    """The entangled planted task (see the module docstring). same_mechanism: the negative control, in which group
    B's target is group A's teacher too (on x_A, scaled by ``amplitude_b``): the gate then decides nothing a
    mechanism could tell apart but the scale, and with ``amplitude_b=1`` nothing at all. late_step: group B's
    samples enter the training batches only at this step (0: from the start), so that its mechanism is learned late,
    after group A's has formed (the evaluation and Hessian samples hold both groups throughout). mirror: the groups
    as exact mirror images (see the module docstring)."""
    for name, value in (("same_mechanism", same_mechanism), ("mirror", mirror)):
        if not isinstance(value, bool):
            raise PolcaError(f"{name} must be true or false, got {value!r}")
    if isinstance(late_step, bool) or not isinstance(late_step, int) or late_step < 0:
        raise PolcaError(f"late_step must be an integer >= 0 (0: no late group), got {late_step!r}")
    spec = EntangledSpec(rule, gate_bits, block_dims, float(amplitude_b), same_mechanism, mirror)
    if mirror and late_step:
        raise PolcaError(f"mirror=true trains on mirrored pairs of both groups: late_step must be 0, got {late_step}")
    for name, value in (("width", width), ("num_eval_samples", num_eval_samples),
                        ("num_hessian_samples", num_hessian_samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise PolcaError(f"{name} must be an integer >= 2, got {value!r}")
    rng = np.random.default_rng([seed, 11])
    teachers = make_teachers(spec, rng)
    evaluation = make_samples(spec, teachers, num_eval_samples, rng)
    hessian = make_samples(spec, teachers, num_hessian_samples, rng)
    names = np.array(["AB"[g] for g in evaluation["group"]])
    if np.unique(names).size < 2:
        raise PolcaError(f"the {num_eval_samples} evaluation samples hold one group only: draw more")
    return Task(
        init_params=init_params(spec, width, jax.random.key(seed)),
        per_sample_loss=PerSampleLoss(shared_readout=True, loss="mse"),
        eval_batch=evaluation,
        hessian_batch=hessian,
        train_batches=lambda step: make_samples(spec, teachers, batch_size, np.random.default_rng([seed, 1, step]),
                                                group_a_only=step < late_step),
        labels={"group": LabelSet(names)},
        sample_texts=[f"group {name}, gate {gate.tolist()}, y = {y:+.2f}" for name, gate, y in
                      zip(names, evaluation["x"][:, : spec.gate_dims].astype(int), evaluation["y"])],
        description=(f"Entangled planted groups: gate rule {rule} ({spec.gate_dims} inputs), two teacher blocks of "
                     f"{block_dims}, group B's teacher scaled by {amplitude_b}, tanh MLP of width {width} with one "
                     "shared head" + ("; the groups exact mirror images." if mirror else ".")),
    )
