"""A planted-mechanism benchmark: groups of samples solved by different parameters, with matched exact-loss curves.

    polca run polca_jax/pipeline/tasks/planted/__init__.py:make_task --preset cpu --out runs/planted

Every evaluation sample belongs to one of G groups (label set ``group``: ``A``, ``B``, ...). Group g's samples use
only group g's block of the input, so only the rows of the first layer on that block (and, with separate readouts,
group g's output head) can lower their loss: the group's *mechanism*, known by construction. Every group's target is
the same teacher on its own block, so the groups are equally hard and their mean exact-loss curves coincide up to
sampling spread: exact-loss clustering has nothing to separate them by. ``late_step > 0`` plants a late
breakthrough: the last group's samples enter the training batches only at that step (they are in the evaluation and
Hessian samples from the start), so that group is learned after the others have plateaued, at a known step.

Options that set how strong the planted signal is (the detection-limit sweep of ``experiments/planted``):
``shared_dims`` (input dimensions, and so first-layer rows, every group uses: mechanism overlap),
``shared_readout`` (one output head for all groups instead of one per group), ``group_weights`` (asymmetry between
the groups' frequencies), ``noise`` (target noise), ``width`` (hidden units) and ``loss`` (``mse`` regression or
``logistic`` classification). The model and data are in :mod:`._model`; the run's ground-truth scores (ARI,
per-group recovery, the matched-loss tolerance, the planted breakthrough) in :mod:`._scores`.
"""

from __future__ import annotations

import jax
import numpy as np

from polca_jax.errors import PolcaError
from polca_jax.pipeline import LabelSet, Task, task_factory
from polca_jax.pipeline.tasks.planted._entangled import make_entangled_task
from polca_jax.pipeline.tasks.planted._model import (
    BENCHMARK_SETTINGS,
    TINY_SETTINGS,
    PerSampleLoss,
    PlantedSpec,
    group_counts,
    init_params,
    make_samples,
    make_teacher,
    parameter_roles,
    sample_groups,
)
from polca_jax.pipeline.tasks.planted._scores import (
    late_breakthrough,
    matched_loss_gap,
    planted_report_sections,
    strategy_summary,
)

GROUP_NAMES = "ABCDEFGH"

PRESETS = {
    "tiny": dict(TINY_SETTINGS, width=8),  # seconds: the CI end-to-end test
    # the benchmark at CPU scale (about 2 minutes on a 2-core CPU)
    "cpu": dict(BENCHMARK_SETTINGS, num_eval_samples=400, width=16, num_steps=600, polca_every=10, basis_every=60,
                lanczos_iters=20, min_cluster_size=30, lca_axes=10, metrics_every=50),
}
PRESETS["tiny-late"] = dict(PRESETS["tiny"], group_weights="2,2,1", late_step=100, threshold_step=80, window_steps=20)
PRESETS["cpu-late"] = dict(PRESETS["cpu"], group_weights="2,2,1", late_step=300, threshold_step=250, window_steps=50)
PRESETS["cpu-shared"] = dict(PRESETS["cpu"], shared_readout=True)  # the first probe: one shared head
# the README's first run: two groups of unequal weight, so the Hessian basis separates their mechanisms (about a
# minute on a 2-core CPU; experiments/planted/results.md)
PRESETS["demo"] = dict(PRESETS["cpu"], group_weights="2,1")


def parse_group_weights(text: str) -> tuple[float, ...]:
    """``"2,2,1"`` -> (2.0, 2.0, 1.0); a clear error for anything else."""
    try:
        weights = tuple(float(part) for part in str(text).split(","))
    except ValueError:
        raise PolcaError(f"group_weights must be comma-separated positive numbers such as '1,1', "
                         f"got {text!r}") from None
    if not 2 <= len(weights) <= len(GROUP_NAMES) or not all(np.isfinite(w) and w > 0 for w in weights):
        raise PolcaError(f"group_weights must give 2 to {len(GROUP_NAMES)} positive weights, got {text!r}")
    return weights


def make_spec(group_weights: str = "1,1", private_dims: int = 8, shared_dims: int = 0, width: int = 16,
              shared_readout: bool = False, loss: str = "mse", noise: float = 0.0) -> PlantedSpec:
    """The :class:`PlantedSpec` of the task options of the same names."""
    return PlantedSpec(parse_group_weights(group_weights), private_dims, shared_dims, width, shared_readout, loss,
                       float(noise))


MIRRORS = ("full", "init", "none")


@task_factory(presets=PRESETS, default_preset="cpu", report_sections=planted_report_sections)
def make_task(group_weights: str = "1,1", private_dims: int = 8, shared_dims: int = 0, width: int = 16,
              shared_readout: bool = False, loss: str = "mse", noise: float = 0.0, late_step: int = 0,
              mirror: str = "full", num_eval_samples: int = 400, num_hessian_samples: int = 256,
              batch_size: int = 64, seed: int = 0) -> Task:
    """The planted-mechanism task (see the module docstring); ``late_step = 0``: no late group.

    mirror: how exactly the groups mirror each other. ``"full"``: every group's private first-layer rows and output
      head start as copies of group A's, and the evaluation, Hessian and training samples are mirror images (the
      i-th sample of every group has the same draw, each on its own block): with equal group weights the groups'
      exact losses are then equal sample by sample at every step, up to float rounding. ``"init"``: the same
      start and evaluation/Hessian samples, but independent training draws per group (the groups drift apart
      through their batches). ``"none"``: independent initialisation and draws throughout.
    Training batches are fresh draws at every step (a pure function of the seed and step): group g gets its share
    of ``batch_size`` by ``group_weights``; before ``late_step`` the late group gets none.
    """
    if mirror not in MIRRORS:
        raise PolcaError(f"mirror must be one of {MIRRORS}, got {mirror!r}")
    spec = make_spec(group_weights, private_dims, shared_dims, width, shared_readout, loss, noise)
    for name, value in (("num_eval_samples", num_eval_samples), ("num_hessian_samples", num_hessian_samples),
                        ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < spec.num_groups:
            raise PolcaError(f"{name} must be an integer >= the number of groups ({spec.num_groups}), got {value!r}")
    if isinstance(late_step, bool) or not isinstance(late_step, int) or late_step < 0:
        raise PolcaError(f"late_step must be an integer >= 0 (0: no late group), got {late_step!r}")
    rng = np.random.default_rng([seed, 7])
    teacher = make_teacher(spec, rng)
    evaluation, hessian = (make_samples(spec, teacher, sample_groups(spec, n, rng), rng, mirror=mirror != "none")
                           for n in (num_eval_samples, num_hessian_samples))
    late_group = spec.num_groups - 1 if late_step else None
    counts = group_counts(spec.group_weights, batch_size)
    early_counts = group_counts(spec.group_weights[:-1], batch_size) if late_step else counts

    def train_batches(step: int) -> dict:  # a pure function of the step, so a resumed run sees the same data
        batch_counts = early_counts if late_group is not None and step < late_step else counts
        groups = np.repeat(np.arange(batch_counts.size), batch_counts)
        return make_samples(spec, teacher, groups, np.random.default_rng([seed, step]), mirror=mirror == "full")

    names = np.array([GROUP_NAMES[g] for g in evaluation["group"]])
    late = "" if late_group is None else f"; group {GROUP_NAMES[late_group]} enters training at step {late_step}"
    roles = parameter_roles(spec)
    readout = "one shared head" if shared_readout else "one head per group"
    return Task(
        init_params=init_params(spec, jax.random.key(seed), mirror=mirror != "none"),
        per_sample_loss=PerSampleLoss(spec.shared_readout, spec.loss),
        eval_batch=evaluation,
        hessian_batch=hessian,
        train_batches=train_batches,
        labels={"group": LabelSet(names)},
        sample_texts=[f"group {name}, |x| = {np.linalg.norm(x):.2f}, y = {y:+.2f}"
                      for name, x, y in zip(names, evaluation["x"], evaluation["y"])],
        description=(f"Planted mechanisms: {spec.num_groups} groups (weights {group_weights}) on private input "
                     f"blocks of {private_dims} (+{shared_dims} shared), tanh MLP of width {width}, {readout}, "
                     f"{loss} loss, noise {noise}, mirror {mirror}{late}; {int(roles['group 0'].sum())} parameters "
                     "private to group A."),
    )


__all__ = ["GROUP_NAMES", "PRESETS", "late_breakthrough", "make_entangled_task", "make_spec", "make_task",
           "matched_loss_gap", "parameter_roles", "planted_report_sections", "strategy_summary"]
