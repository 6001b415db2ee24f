"""The pipeline's stages over any task: train → basis → decompose → causal → cluster → score → report.

Run directory layout::

    config.json            the run's RunConfig (a run directory holds one config)
    task.json              the task's data fingerprint, sample count and label-set metadata
    labels.npz             the evaluation samples' label sets (``label:<name>``) and texts (``texts``)
    fingerprints.json      each checkpoint's parameter digest, and the loss functions' digests with the stage that
                           first used them: a later read or build that differs is refused (ResumeMismatch)
    run.lock               flock'ed by the process running stages (a second run is refused)
    checkpoints/           orbax: params (+ optimizer state) at every POLCA and basis step (absent when the run
                           reads an existing checkpoint directory, ``config.checkpoints``)
    metrics.jsonl          training log: loss, evaluation loss and the task's training metrics
    basis/<name>/          Basis: hessian (Algorithm 1) and the ablations' (any basis of _registry.BASES)
    basis/<name>.partial/  Algorithm 1's vectors so far, while its stage is unfinished (pj.hessian_basis partial_dir)
    polca/<name>/          POLCAResult per basis (memory-mapped .npy files; progress.json while partial)
    controls/              the label-free control's features: gradient_norms.npy, each sample's gradient norm per
                           parameter block [N, B] at the first POLCA checkpoint after step 0
    causal/<name>.npy      the causal check: per-sample loss increase [K, N] when a direction is removed
    clusters/<variant>.npz HDBSCAN clusterings of each strategy
    metrics.json           filters, cluster scores against every label set, breakthroughs (Eqs. 9-10)
    stages/<stage>.json    written when a stage finishes (wall time); a finished stage is skipped
    report/report.md       the report, with figures in report/figures/

The train, basis, decompose and causal stages build the task (its data and model); cluster, score and report read
only the run directory.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import polca_jax as pj
from polca_jax import analysis, is_writer, sync as pj_sync, to_host, tree
from polca_jax.checks import batch_size, check_same_structure
from polca_jax.errors import PolcaError
from polca_jax.files import load_npy, save_npy_atomic
from polca_jax.fingerprints import params_digest
from polca_jax.pipeline._compile import measure_compilation
from polca_jax.pipeline._config import RunConfig
from polca_jax.pipeline._host_settings import host_result, stage_settings
from polca_jax.pipeline._registry import (HOST_STAGES, MAIN_BASIS, PROCESS_STAGES, RANDOM_BASIS, STAGE_LOSSES,
                                          STAGE_OUTPUTS, STAGES, BasisInputs, bases_of, basis_kind,
                                          variant_trajectories, variants_of)
from polca_jax.pipeline._report import report_stage
from polca_jax.pipeline._rundir import RunDirectory, loss_digests
from polca_jax.pipeline._score import score_stage
from polca_jax.pipeline._task import Task, TaskDefinition, load_task_definition
from polca_jax.pipeline._training import AdamScales, adamw_paper, train
from polca_jax.pipeline._usercode import user_code_errors

CONTROL_NORMS = "controls/gradient_norms.npy"  # the label-free control's features, written by the decompose stage


# --- train ----------------------------------------------------------------------------------------------------------


def train_stage(run: RunDirectory, task: Task, progress: bool, mesh=None) -> dict:
    """Train with AdamW (on ``mesh``, sharded, when given), checkpointing at every POLCA and basis step; or check the
    run's existing checkpoints."""
    config = run.config
    if reads_checkpoints(config, task):
        _check_existing_checkpoints(run, task)
        return {"checkpoints": checkpoint_source(run, task), "trained": False}
    if task.train_batches is None:
        raise PolcaError("the task has no training batches (Task.train_batches is None): give the run its "
                         "checkpoints with --checkpoints DIR (or the setting checkpoints=DIR)")
    evaluation_loss = _mean_eval_loss(task)

    def metrics(params) -> dict:
        extra = dict(task.training_metrics(params)) if task.training_metrics is not None else {}
        return {"eval_loss": float(evaluation_loss(params, task.eval_batch)), **extra}

    optimizer = adamw_paper(config.learning_rate, config.weight_decay, config.b1, config.b2, config.warmup_steps)
    train(task.loss, task.init_params, optimizer, task.train_batches, config.num_steps, run.checkpoint_dir,
          config.checkpoint_steps, metrics_fn=metrics, metrics_every=config.metrics_every,
          metrics_path=run / "metrics.jsonl", progress=progress,
          checkpoint_fn=lambda step, params: run.check_checkpoint(step, params_digest(params)), mesh=mesh)
    return {"parameters": tree.num_params(task.init_params), "trained": True}


def _mean_eval_loss(task: Task) -> Callable:
    """jitted ``(params, batch) -> scalar``: the mean loss of the evaluation samples (those of ``eval_mask``)."""
    if task.eval_mask is None:
        return jax.jit(task.loss)
    mask = jnp.asarray(task.eval_mask)
    return jax.jit(lambda params, batch: jnp.sum(task.per_sample_loss(params, batch) * mask) / mask.sum())


def _check_existing_checkpoints(run: RunDirectory, task: Task) -> None:
    """Raise unless the run's checkpoint directory holds params like the task's at every step the run needs; record
    the digest of every one (read once here), which later stages and resumes compare with what they read."""
    steps, source = run.config.checkpoint_steps, checkpoint_source(run, task)
    with _open_checkpoints(run, task, steps) as store:
        try:
            first = store[0]
        except ValueError as error:
            raise PolcaError(f"the checkpoints in {source} do not hold parameters like the task's "
                             f"init_params (saved from another model than the task's?): {error}") from error
    try:
        check_same_structure(task.init_params, first, f"the checkpoint at step {steps[0]} in {source}")
    except ValueError as error:
        raise PolcaError(f"{error}; the checkpoints were saved from another model than the task's") from error
    with checkpoint_store(run, task, steps) as store:
        for params in store:  # each read compares or records its digest
            del params


def reads_checkpoints(config: RunConfig, task: Task) -> bool:
    """Whether the run reads existing checkpoints (``--checkpoints DIR``, or the task's own) instead of training."""
    return bool(config.checkpoints) or task.checkpoints is not None


def checkpoint_source(run: RunDirectory, task: Task) -> str:
    """Where the run's checkpoints are, for messages: the task's own store's source, else the orbax directory."""
    return "the task's own checkpoints" if task.checkpoints is not None else str(run.checkpoint_dir)


def _open_checkpoints(run: RunDirectory, task: Task, steps: list[int], mesh=None):
    """The parameters at ``steps``, restored like ``task.init_params``: from the task's own checkpoints when it
    brings them (``Task.checkpoints``), else from the run's orbax directory."""
    if task.checkpoints is not None:
        if run.config.checkpoints:
            raise PolcaError(f"the task brings its own checkpoints, so --checkpoints {run.config.checkpoints} has no "
                             "use: start the run without it")
        return task.checkpoints(steps, task.init_params, mesh)
    return pj.OrbaxCheckpoints(run.checkpoint_dir, steps, template=task.init_params, mesh=mesh)


def _record_losses(run: RunDirectory, task: Task, stage: str) -> None:
    """Record the digests of the task's loss functions ``stage``'s results depend on (``STAGE_LOSSES``), when it
    first writes them: before training, before the first basis is saved, at the end of the other stages (a
    partial decomposition holds its own fingerprint, with its loss)."""
    uses = () if stage == "train" and reads_checkpoints(run.config, task) else STAGE_LOSSES.get(stage, ())
    run.record_losses({kind: run.task_loss_digests[kind] for kind in uses}, stage)


def build_task(run: RunDirectory, definition: TaskDefinition | None = None, redone: tuple[str, ...] = ()) -> Task:
    """The run's task, built from its config and checked against the data fingerprint the run started with.

    The definition defaults to the one ``config.task`` names; the first build records the fingerprint.

    Args:
      run: the run directory.
      definition: the task's definition (None: loaded from ``run.config.task``).
      redone: the stages about to be redone (``force``): a loss function they alone used may have changed.

    Returns:
      The :class:`Task`, checked (:meth:`Task.check`); its loss digests are left on ``run`` for the stages.

    Raises:
      PolcaError: the task cannot be loaded or built, or fails its checks; the config asks for more basis directions
        than the model has parameters; its data differ from the run's fingerprint; ``ResumeMismatch``: a loss
        function differs from the one an earlier stage used.

    Example:
      ``out``: the run directory of :func:`polca_jax.pipeline.run`'s example.

      >>> from polca_jax.pipeline import RunDirectory, build_task
      >>> task = build_task(RunDirectory(out))  # the planted task, built from its config.json
      >>> task.num_samples, sorted(task.labels)
      (160, ['group'])
    """
    definition = definition or load_task_definition(run.config.task)
    task = definition.build(run.config.task_options, seed=run.config.seed, workdir=run.path)
    check_fits(run.config, task)
    run.bind_task(task)
    run.task_loss_digests = loss_digests(task)
    run.check_losses(run.task_loss_digests, redone)
    return task


def check_fits(config, task: Task) -> None:
    """Raise ``PolcaError`` when the config asks for more basis directions than the task's model has parameters."""
    num_params = tree.num_params(task.init_params)
    size = len(config.basis_steps) * config.k_per_checkpoint
    if size > num_params:
        raise PolcaError(f"the basis would have {size} directions (basis checkpoints × k_per_checkpoint) but the "
                         f"task's model has {num_params} parameters: raise basis_every or lower k_per_checkpoint")
    if "parameter_axes" in bases_of(config) and config.lca_axes > num_params:
        raise PolcaError(f"lca_axes={config.lca_axes} exceeds the task's {num_params} parameters: "
                         f"--set lca_axes={num_params} or fewer")
    for name in bases_of(config):
        if basis_kind(name).size_for(config) > num_params:
            raise PolcaError(f"the basis {name!r} would have {basis_kind(name).size_for(config)} directions but the "
                             f"task's model has {num_params} parameters")
    if config.lanczos_iters + size > num_params:
        raise PolcaError(f"lanczos_iters={config.lanczos_iters} plus the {size} basis directions exceed the task's "
                         f"{num_params} parameters: lower lanczos_iters")


def check_data_axis(task: Task, data: int) -> None:
    """Raise ``PolcaError`` when a data axis of ``data`` devices exceeds the sequences of the evaluation or the
    Hessian batch, which it splits: some devices would hold no sample (``polca run`` and ``polca plan``)."""
    sequences = min(batch_size(task.eval_batch), batch_size(task.hessian_batch))
    if data > sequences:
        raise PolcaError(f"--mesh: a data axis of {data} devices exceeds the task's {sequences} evaluation or Hessian "
                         f"sequences, which it splits: choose at most {sequences} data devices")


def checkpoint_store(run: RunDirectory, task: Task, steps: list[int], mesh=None) -> "CheckedCheckpoints":
    """The run's checkpoints at ``steps``, each read checked against the digest the run recorded for its step.

    They are restored into the task's parameter shapes and dtypes (split over ``mesh`` like the kernels place
    parameters); a step's digest is recorded when the run first reads or writes it.

    Args:
      run: the run directory (its checkpoints: ``run.checkpoint_dir``).
      task: the run's task (:func:`build_task`): its ``init_params`` are the template.
      steps: the steps to read, each saved.
      mesh: a ``data × model`` mesh to place the parameters on (None: the default device).

    Returns:
      A sequence of the parameters at ``steps``, restored lazily (one read per index) and a context manager that
      closes the store.

    Raises:
      PolcaError: the checkpoint directory is missing or lacks a step; ``CorruptRunDirectory``: a save never
        finished; ``ResumeMismatch`` (on a read): the parameters differ from those the run recorded.

    Example:
      ``out``: the run directory of :func:`polca_jax.pipeline.run`'s example (checkpoints every 5 steps to 40).

      >>> from polca_jax.pipeline import RunDirectory, build_task, checkpoint_store
      >>> run_dir = RunDirectory(out)
      >>> task = build_task(run_dir)
      >>> with checkpoint_store(run_dir, task, [0, 40]) as store:
      ...     final = store[1]
      >>> len(store), store.steps, sorted(final) == sorted(task.init_params)
      (2, [0, 40], True)
    """
    return CheckedCheckpoints(run, _open_checkpoints(run, task, steps, mesh), steps)


class CheckedCheckpoints(Sequence):
    """A checkpoint store (:class:`~polca_jax.OrbaxCheckpoints`, or the task's own) of the parameters at ``steps``
    whose every read is checked against (or recorded as) the run's digest of that step's parameters
    (:meth:`RunDirectory.check_checkpoint`)."""

    def __init__(self, run: RunDirectory, store, steps: list[int]):
        self.run, self.store, self.steps = run, store, list(steps)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int):
        params = self.store[index]
        self.run.check_checkpoint(self.steps[index], params_digest(params))
        return params

    def __enter__(self) -> "CheckedCheckpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.store.close()


# --- basis and decompose --------------------------------------------------------------------------------------------


def basis_stage(run: RunDirectory, task: Task, progress: bool, mesh=None) -> dict:
    """Each basis of the config (``bases_of``; the registry's :class:`BasisKind` builds it) to ``basis/<name>/``;
    one already on disk (an interrupted stage) is kept, and one whose builder keeps its work so far in
    ``basis/<name>.partial/`` (Algorithm 1 and its variants, per checkpoint) resumes there."""
    config = run.config
    key = jax.random.key(config.seed)

    def final_params():
        with checkpoint_store(run, task, [config.num_steps], mesh) as final:
            return final[0]

    def adam_scales():  # the optimiser state the train stage saved beside each checkpoint
        optimizer = adamw_paper(config.learning_rate, config.weight_decay, config.b1, config.b2, config.warmup_steps)
        return AdamScales(run.checkpoint_dir, config.basis_steps, task.init_params, optimizer, b2=config.b2)

    with checkpoint_store(run, task, config.basis_steps, mesh) as store:
        for name in _unfinished(bases_of(config), lambda name: run / "basis" / name / "basis.json"):
            partial = run / "basis" / f"{name}.partial"
            basis = basis_kind(name).build(BasisInputs(config, task, store, key, partial, mesh, progress,
                                                       final_params,
                                                       None if reads_checkpoints(config, task) else adam_scales))
            _check_built_basis(name, basis, task, basis_kind(name).size_for(config))
            _record_losses(run, task, "basis")  # the bases saved depend on the loss
            basis.save(run / "basis" / name)
            if is_writer():
                shutil.rmtree(partial, ignore_errors=True)
    return {"bases": list(bases_of(config))}


def _check_built_basis(name: str, basis, task: Task, size: int) -> None:
    """Raise ``PolcaError`` when a builder returned something other than an orthonormal basis of ``size``
    directions in the task's parameter space (a registered basis of one's own may)."""
    if not isinstance(basis, pj.Basis):
        raise PolcaError(f"the builder of the basis {name!r} returned a {type(basis).__name__}, not a "
                         "polca_jax.Basis (polca_jax.basis_from_matrix makes one from [K, P] rows)")
    if basis.dim != tree.num_params(task.init_params) or basis.size != size:
        raise PolcaError(f"the builder of the basis {name!r} returned {basis.size} directions of width {basis.dim}; "
                         f"the config expects {size} of the model's width {tree.num_params(task.init_params)} "
                         "(BasisKind.size gives the count)")


def decompose_stage(run: RunDirectory, task: Task, progress: bool, mesh=None) -> dict:
    """POLCA of every evaluation sample at every POLCA checkpoint along each basis, streamed to ``polca/<name>/``; a
    result already on disk is kept, and one a killed run left partial resumes at its first unfinished checkpoint.
    LCA's ``parameter_axes`` is first order (Eq. 1); a basis without eigenvalues uses the current curvature for the
    paper's second order."""
    config = run.config
    names = bases_of(config)
    with checkpoint_store(run, task, config.polca_steps, mesh) as store:
        for name in _unfinished(names, lambda name: run / "polca" / name / "manifest.json"):
            basis = pj.Basis.load(run / "basis" / name)
            pj.polca(
                task.per_sample_loss, store, task.eval_batch, basis, second_order=config.second_order_for(name),
                mask=task.eval_mask,
                method=config.projection_method, chunk_size=config.chunk_size, progress=progress,
                out=run / "polca" / name,
            )
    if not (run / CONTROL_NORMS).is_file():
        _control_norms(run, task, mesh)
    return {"decompositions": list(names), "method": _projection_method(run, task),
            "control_step": config.polca_steps[1]}



def _control_norms(run: RunDirectory, task: Task, mesh) -> None:
    """The label-free control's features to ``controls/gradient_norms.npy``: every evaluation sample's gradient norm
    per parameter block ``[N, B]`` (:func:`polca_jax.per_sample_gradient_norms`) at the first POLCA checkpoint after
    step 0, where the groups of samples a task has begin to be learned."""
    with checkpoint_store(run, task, [run.config.polca_steps[1]], mesh) as store:
        norms = pj.per_sample_gradient_norms(task.per_sample_loss, store[0], task.eval_batch, mask=task.eval_mask,
                                             mesh=mesh)
    norms = to_host(norms)
    if is_writer():
        (run / "controls").mkdir(exist_ok=True)
        save_npy_atomic(run / CONTROL_NORMS, norms)


def _unfinished(names: tuple[str, ...], marker: Callable[[str], Path]) -> list[str]:
    """The names whose ``marker`` file does not exist yet, as every process sees them before any writes."""
    unfinished = [name for name in names if not marker(name).exists()]
    pj_sync("polca_jax stage outputs listed")
    return unfinished


def _projection_method(run: RunDirectory, task: Task) -> str:
    if run.config.projection_method != "auto":
        return run.config.projection_method
    shape = jax.eval_shape(task.per_sample_loss, task.init_params, task.eval_batch).shape
    samples_per_sequence = 1 if len(shape) == 1 else shape[1]
    return pj.choose_method(samples_per_sequence, len(run.config.basis_steps) * run.config.k_per_checkpoint)


# --- causal ---------------------------------------------------------------------------------------------------------


def causal_bases(config) -> tuple[str, ...]:
    """The bases the causal check runs on: the Hessian basis, and the random one (when built) as its null."""
    return tuple(name for name in (MAIN_BASIS, RANDOM_BASIS) if name in bases_of(config))


def causal_stage(run: RunDirectory, task: Task, progress: bool, mesh=None) -> dict:
    """The causal check: for every direction b of each basis, the per-sample loss increase ``[K, N]`` when b's share
    of the training displacement is removed from the final parameters, θ_T − ⟨θ_T − θ_0, b⟩ b, to
    ``causal/<basis>.npy``; the loss passes on ``mesh`` when given (samples split over its data axis)."""
    config = run.config
    with checkpoint_store(run, task, [0, config.num_steps], mesh) as store:
        initial, final = store[0], store[1]
    names = causal_bases(config)
    (run / "causal").mkdir(exist_ok=True)
    for name in names:
        basis = pj.Basis.load(run / "basis" / name)
        increase = pj.direction_ablation_losses(task.per_sample_loss, final, initial, basis, task.eval_batch,
                                                mask=task.eval_mask, mesh=mesh)
        save_npy_atomic(run / "causal" / f"{name}.npy", np.asarray(increase))
    return {"bases": list(names)}


# --- cluster --------------------------------------------------------------------------------------------------------


def cluster_options(config) -> dict:
    """The HDBSCAN settings of a config, as keyword arguments of the ``analysis`` clustering functions."""
    return dict(min_cluster_size=config.min_cluster_size, min_samples_divisor=config.min_samples_divisor,
                reference_num_samples=config.reference_num_samples, normalize=config.normalize)


def cluster_variant(trajectories: np.ndarray, kind: str, options: dict) -> list[analysis.Clustering]:
    """HDBSCAN of one strategy's trajectories: one clustering of a per-sample signal ``[T, N]``; for the Fisher
    information one per direction of ``[T, N, K]``, without filters (it is no decomposition of the loss); otherwise
    one per direction kept by the oscillation filter, on the samples relying on it."""
    if trajectories.ndim == 2:
        return [analysis.cluster_signal(trajectories, **options)]
    if kind == "fisher":
        return analysis.cluster_directions(trajectories, directions=np.arange(trajectories.shape[2]),
                                           filter_samples=False, **options)
    return analysis.cluster_directions(trajectories, **options)


def cluster_profiles(projected_loss: np.ndarray, config) -> list[analysis.Clustering]:
    """One clustering of every sample's *allocation profile*: its final projected loss along each direction,
    divided by its norm over the directions (how its loss change was shared among the directions, whatever its
    size), with ``config.profile_clusterer`` (``analysis.strategy_clusterings``). An alternative to the paper's
    per-direction step: on the planted benchmark it recovers mechanisms the paper's step misses
    (experiments/planted/results.md)."""
    return analysis.strategy_clusterings(projected_loss, "profile", clusterer=config.profile_clusterer,
                                         min_cluster_size=_scaled_min_cluster_size(projected_loss.shape[1], config),
                                         min_samples_divisor=config.min_samples_divisor, seed=config.seed)


def cluster_gradient_trajectories(projections: np.ndarray, config) -> list[analysis.Clustering]:
    """The projected-gradient strategies' clustering of every sample's projected gradients over checkpoints.

    Each sample's projected gradients over the last ``config.gradient_window`` of the checkpoints (at least two;
    with ``config.gradient_increments`` their changes between successive ones, at least two), along the basis or
    along new directions in its span (``config.gradient_rotation``, :func:`polca_jax.analysis.rotate_within_span`); its
    trajectory there divided by its norm and reduced by PCA (:func:`polca_jax.analysis.joint_features`), over all
    directions at once (``config.gradient_directions="joint"``) or one direction at a time (``"each"``), or the
    directions it moves in together, whatever their signs (``"subspace"``:
    :func:`polca_jax.analysis.subspace_features`); clustered with ``config.profile_clusterer``.

    Where the projected loss multiplies each gradient by the shared step and sums over time, this keeps each sample's
    own gradients, late in training when the mechanisms have formed (experiments/planted/results.md).

    Args:
      projections: ``[T, N, K]`` each sample's gradient along each of K directions at T checkpoints (any K: a
        basis, a random sketch, or the whole gradient).
      config: the run's :class:`RunConfig` (``gradient_window``, ``gradient_increments``, ``gradient_rotation``,
        ``gradient_directions``, ``profile_clusterer``, ``min_cluster_size`` scaled as the paper's HDBSCAN step
        scales it, ``min_samples_divisor``, ``seed``).

    Returns:
      A list of :class:`polca_jax.analysis.Clustering` of the N samples: one (joint), or one per direction (each,
      its ``direction`` the direction's index).

    Raises:
      PolcaError: ``projections`` is not ``[T, N, K]`` with finite values (from the analysis functions).

    Example:
      >>> import numpy as np
      >>> from polca_jax.pipeline import RunConfig, cluster_gradient_trajectories
      >>> rng = np.random.default_rng(0)
      >>> directions = np.repeat(np.eye(2), 20, axis=0)  # 20 samples move along direction 0, 20 along 1
      >>> projections = directions[None] + 0.05 * rng.normal(size=(4, 40, 2))
      >>> config = RunConfig(task="t", preset=None, task_options={}, gradient_window=1.0, min_cluster_size=5,
      ...                    reference_num_samples=None, profile_clusterer="kmeans")
      >>> labels = cluster_gradient_trajectories(projections, config)[0].labels
      >>> len(set(labels[:20])), len(set(labels[20:])), bool(labels[0] != labels[20])
      (1, 1, True)
    """
    window = max(2 + config.gradient_increments, round(config.gradient_window * projections.shape[0]))
    trajectories = projections[-window:]
    if config.gradient_increments:
        trajectories = np.diff(trajectories, axis=0)
    trajectories = analysis.rotate_within_span(trajectories, config.gradient_rotation, seed=config.seed)
    if config.gradient_directions == "joint":
        return [_clustering(analysis.joint_features(trajectories, seed=config.seed), config)]
    if config.gradient_directions == "subspace":
        return [_clustering(analysis.subspace_features(trajectories, seed=config.seed), config)]
    return [_clustering(analysis.joint_features(trajectories, directions=[k], seed=config.seed), config, direction=k)
            for k in range(trajectories.shape[2])]


def cluster_gradient_norms(norms: np.ndarray, config) -> list[analysis.Clustering]:
    """The label-free control: one clustering, with ``config.profile_clusterer`` as the profiles, of every sample's
    gradient norm per parameter block ``[N, B]`` at one checkpoint, as shares of its sum reduced by PCA
    (:func:`polca_jax.analysis.gradient_norm_features`). It needs no basis and no training dynamics: a finding that
    does no better than its clusters does not show POLCA at work."""
    return [_clustering(analysis.gradient_norm_features(norms, seed=config.seed), config)]


def cluster_checkpoint_gradients(projections: np.ndarray, config) -> list[analysis.Clustering]:
    """The second label-free control: one clustering, with ``config.profile_clusterer``, of every sample's gradient
    along the random directions at one checkpoint (the first POLCA checkpoint after step 0, as the gradient-norm
    control reads), divided by its norm and reduced by PCA. A random sketch of one gradient: no basis from training
    and no training dynamics.

    Args:
      projections: ``[T, N, K]`` each sample's gradient along K random directions at T ≥ 2 checkpoints.
      config: the run's :class:`RunConfig` (``profile_clusterer``, ``min_cluster_size`` scaled as the paper's HDBSCAN
        step scales it, ``min_samples_divisor``, ``seed``).

    Returns:
      A list of one :class:`polca_jax.analysis.Clustering` of the N samples.
    """
    features = analysis.joint_features(projections[1:2], seed=config.seed)
    return [_clustering(features, config)]


def _clustering(features: np.ndarray, config, direction: int | None = None) -> analysis.Clustering:
    """One clustering of every sample's features ``[N, C]`` with ``config.profile_clusterer`` (min cluster size
    scaled to N), labelled with ``direction``."""
    return analysis.cluster_features(features, method=config.profile_clusterer,
                                     min_cluster_size=_scaled_min_cluster_size(features.shape[0], config),
                                     min_samples_divisor=config.min_samples_divisor, seed=config.seed,
                                     direction=direction)


def _scaled_min_cluster_size(num_samples: int, config) -> int:
    """The config's ``min_cluster_size`` scaled to ``num_samples`` as the paper's HDBSCAN step scales it."""
    return analysis.hdbscan_params(num_samples, min_cluster_size=config.min_cluster_size,
                                   min_samples_divisor=config.min_samples_divisor,
                                   reference_num_samples=config.reference_num_samples)[0]


def cluster_stage(run: RunDirectory, progress: bool) -> dict:
    """HDBSCAN (or the profile clusterer) of every strategy to ``clusters/<variant>.npz``; the projected loss
    under the config's ``second_order``, redone from the stored arrays when the decomposition used another rule
    (``host_result``). Its record holds the settings it ran with and any second order it redid."""
    options = cluster_options(run.config)
    (run / "clusters").mkdir(exist_ok=True)
    counts, results, skipped = {}, {}, {}
    for variant in variants_of(run.config):
        if variant.trajectory == "gradient_norms" and not (run / CONTROL_NORMS).is_file():
            skipped[variant.name] = f"no {CONTROL_NORMS} (decomposed before the control existed)"
            continue
        if variant.basis not in results:
            results[variant.basis] = host_result(run.path, variant.basis, run.config.second_order)
        result = results[variant.basis]
        if variant.trajectory == "profile":
            clusterings = cluster_profiles(result.projected_loss, run.config)
        elif variant.trajectory == "gradients":
            clusterings = cluster_gradient_trajectories(np.asarray(result.projections), run.config)
        elif variant.trajectory == "gradient_norms":
            clusterings = cluster_gradient_norms(load_npy(run / CONTROL_NORMS), run.config)
        elif variant.trajectory == "checkpoint_gradients":
            clusterings = cluster_checkpoint_gradients(np.asarray(result.projections), run.config)
        else:
            trajectories, _ = variant_trajectories(result, variant.trajectory)
            clusterings = cluster_variant(trajectories, variant.trajectory, options)
        analysis.save_clusterings(run / "clusters" / f"{variant.name}.npz", clusterings)
        counts[variant.name] = sum(c.num_clusters for c in clusterings)
    redone = {basis: f"{result.config['recomputed_from']} -> {result.config['second_order']}"
              for basis, result in results.items() if "recomputed_from" in result.config}
    return {"clusters": counts, "settings": stage_settings(run.config, "cluster"),
            **({"second_order_redone": redone} if redone else {}), **({"skipped": skipped} if skipped else {})}


# --- orchestration --------------------------------------------------------------------------------------------------


def run_stages(run: RunDirectory, definition: TaskDefinition, stages=None, *, force: bool = False,
               progress: bool = True, log: Callable[[str], None] = print, mesh=None) -> None:
    """Run ``stages`` (default: all, in order) on ``run``, skipping finished ones unless ``force``.

    ``STAGES`` lists them in order: train → basis → decompose → causal → cluster → score → report.

    In a multi-process run (:func:`polca_jax.initialize_distributed`) every process calls this with the same
    arguments; only the basis and decompose stages run (the default), on a mesh across the processes, and process 0
    writes the run directory (a file system they share) and speaks.

    Every stage before a requested one must have finished. An interrupted stage resumes, keeping the parts it
    finished (a basis, a decomposition, training up to its last checkpoint); redoing a stage (``force``) first
    removes its outputs and those of every later stage. The task is built once, by the first stage that needs it,
    and its data must match the fingerprint the run was started with. Each stage's info and wall time go to
    ``stages/<stage>.json``.

    Args:
      run: the run directory (:func:`open_run`).
      definition: the task's definition.
      stages: names among ``STAGES`` (None: all of them; in a multi-process run, basis and decompose).
      force: redo the stages even when finished, removing their outputs and those of every later stage first.
      progress: show progress bars.
      log: called with each line of progress (``[stage] running``, ``[stage] done in ... s``, skipped stages).
      mesh: the mesh the train, basis, decompose and causal stages run on (:func:`polca_jax.device_mesh`; None:
        one device).

    Raises:
      PolcaError: an unknown stage; an earlier stage has not finished; a multi-process run asked for a stage
        other than basis and decompose; ``TaskError``: the task's code failed (naming the stage and the line);
        ``ResumeMismatch``, ``Interrupted`` and the stages' own refusals.

    Example:
      ``out``: the run directory of :func:`polca_jax.pipeline.run`'s example, all its stages finished.

      >>> from polca_jax.pipeline import STAGES, open_run, run_stages
      >>> STAGES
      ('train', 'basis', 'decompose', 'causal', 'cluster', 'score', 'report')
      >>> run_dir, definition = open_run("planted", out)
      >>> run_stages(run_dir, definition, ["score", "report"])
      [score] already finished in /.../run, skipped
      [report] already finished in /.../run, skipped
    """
    bodies = {
        "train": lambda run, task, progress: train_stage(run, task, progress, mesh),
        "basis": lambda run, task, progress: basis_stage(run, task, progress, mesh),
        "decompose": lambda run, task, progress: decompose_stage(run, task, progress, mesh),
        "causal": lambda run, task, progress: causal_stage(run, task, progress, mesh),
        "cluster": lambda run, task, progress: cluster_stage(run, progress),
        "score": lambda run, task, progress: score_stage(run),
        "report": lambda run, task, progress: report_stage(run, definition),
    }
    distributed = jax.process_count() > 1
    stages = list(PROCESS_STAGES if distributed else STAGES) if stages is None else list(stages)
    for stage in stages:
        if stage not in STAGES:
            raise PolcaError(f"unknown stage {stage!r}; stages are {STAGES}")
    if distributed and set(stages) - set(PROCESS_STAGES):
        raise PolcaError(
            f"a multi-process run runs the stages {' and '.join(PROCESS_STAGES)} across the processes; run "
            f"{', '.join(s for s in STAGES if s in stages and s not in PROCESS_STAGES)} in one process (nothing was "
            "changed)")
    if not is_writer():  # process 0 speaks for a multi-process run
        log, progress = (lambda message: None), False
    task = None
    for stage in sorted(stages, key=STAGES.index):
        for previous in STAGES[: STAGES.index(stage)]:
            if previous not in stages:
                run.require(previous)
        if run.done(stage) and not force:
            log(f"[{stage}] already finished in {run.path}, skipped")
            continue
        if force:  # redo fully; without force, an interrupted stage keeps the parts it finished
            if stage not in HOST_STAGES and task is None:  # a task refused (e.g. a loss an earlier stage used
                with user_code_errors(f"the {stage} stage"):  # was edited) is refused before anything is removed
                    task = build_task(run, definition, redone=STAGES[STAGES.index(stage):])
                if mesh is not None:
                    check_data_axis(task, pj.num_data_shards(mesh))
            if is_writer():
                run.reset(list(STAGES[STAGES.index(stage):]), STAGE_OUTPUTS)
        pj_sync(f"polca_jax {stage} started")  # no process reads the run before process 0 has reset it
        log(f"[{stage}] running")
        start = time.perf_counter()
        with measure_compilation() as compiling, user_code_errors(f"the {stage} stage"):
            if stage not in HOST_STAGES and task is None:
                task = build_task(run, definition)
                if mesh is not None:
                    check_data_axis(task, pj.num_data_shards(mesh))
            if stage == "train" and task is not None:  # training writes from its first step on
                _record_losses(run, task, stage)
            info = bodies[stage](run, task, progress)
            if task is not None:
                _record_losses(run, task, stage)
        info["wall_seconds"] = time.perf_counter() - start
        info.update(compiling.as_record())
        if is_writer():
            run.mark_done(stage, info)
        pj_sync(f"polca_jax {stage} done")
        log(f"[{stage}] done in {info['wall_seconds']:.1f} s")
