"""Training with optax, checkpointed by orbax at exactly the steps POLCA needs; resumable and bit-reproducible.

Step numbering: "step s" means the parameters after s optimizer updates, so step 0 is the initial parameters, and
update s (from step s to step s + 1) uses ``batches(s)``.

A checkpoint directory holds one orbax step directory per saved step, each with two items: ``"params"`` (the params
pytree, read back by :func:`restore_params`) and ``"opt_state"`` (so :func:`train` can resume).
"""

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

import polca_jax as pj
from polca_jax import PARAMS_ITEM, OrbaxCheckpoints
from polca_jax.errors import PolcaError
from polca_jax.files import write_atomic

_OPT_STATE = "opt_state"


def adamw_paper(
    learning_rate: float = 1e-5,
    weight_decay: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.95,
    warmup_steps: int = 100,
) -> optax.GradientTransformation:
    """AdamW with the paper's schedule ``learning_rate * min(i / warmup_steps, 1)`` at update i (0-based).

    As with PyTorch's ``LambdaLR`` in the paper, update 0 has learning rate 0. ``warmup_steps=0`` means a constant rate.

    Args:
      learning_rate: the peak learning rate, reached at update ``warmup_steps``.
      weight_decay: AdamW's decoupled weight decay.
      b1: Adam's first-moment decay.
      b2: Adam's second-moment decay.
      warmup_steps: the linear warm-up's length in updates (0: a constant rate).

    Returns:
      The optax transformation.

    Raises:
      PolcaError: ``warmup_steps`` is not a non-negative int.

    Example:
      >>> import jax.numpy as jnp
      >>> from polca_jax.pipeline import adamw_paper
      >>> optimizer = adamw_paper(learning_rate=0.1, warmup_steps=10)
      >>> params = grads = {"w": jnp.ones(2)}
      >>> updates, state = optimizer.update(grads, optimizer.init(params), params)
      >>> bool((updates["w"] == 0).all())  # update 0: learning rate 0
      True
      >>> updates, state = optimizer.update(grads, state, params)  # update 1: 0.1 / 10 × (Adam's 1 + decay 0.1)
      >>> [round(float(update), 4) for update in updates["w"]]
      [-0.011, -0.011]
    """
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise PolcaError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
    if warmup_steps == 0:
        schedule = learning_rate
    else:

        def schedule(count: jax.Array) -> jax.Array:
            return learning_rate * jnp.minimum(count / warmup_steps, 1.0)

    return optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay)


def train(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    optimizer: optax.GradientTransformation,
    batches: Callable[[int], Any],
    num_steps: int,
    checkpoint_dir: str | Path,
    checkpoint_steps: Sequence[int],
    *,
    metrics_fn: Callable[[Any], Mapping[str, Any]] | None = None,
    metrics_every: int = 100,
    metrics_path: str | Path | None = None,
    progress: bool = True,
    checkpoint_fn: Callable[[int, Any], None] | None = None,
    mesh: Mesh | None = None,
) -> Any:
    """Train ``params`` for ``num_steps`` updates of ``optimizer`` on ``loss_fn(params, batches(step))``.

    Saves params and optimizer state at every step in ``checkpoint_steps`` (step 0 included when listed; steps beyond
    ``num_steps`` are skipped, so an interrupted run can be called with the same list). If ``checkpoint_dir`` already
    holds checkpoints, training resumes from the latest one (``params`` then only serves as the restore template, and
    the optimizer state is restored too); because ``batches`` must be a pure function of the step, a resumed run ends
    with bit-identical parameters to an uninterrupted one. A directory whose latest step exceeds ``num_steps`` is an
    error; one whose latest step equals ``num_steps`` returns those parameters without training.

    Every ``metrics_every`` steps (step % metrics_every == 0, before that step's update) a JSON line
    ``{"step", "loss", **metrics_fn(params)}`` is appended to ``metrics_path``, "loss" being the training loss of
    ``batches(step)``. On resume, records from the resumed step on are dropped first, so each step appears once.

    On a ``mesh`` (:func:`polca_jax.device_mesh`) training is sharded like the kernels (FSDP): the parameters and
    every params-shaped leaf of the optimizer state (Adam's moments) are split over ``"model"`` by
    :func:`polca_jax.param_spec`, each batch over ``"data"``, and they stay so from step to step, in the checkpoints
    and on resume; each device holds its share of the training state, not the whole. The updates are those of one
    device up to the order of floating-point sums.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``; jitted once here.
      params: initial parameters (any pytree).
      optimizer: an optax transformation, e.g. :func:`adamw_paper`.
      batches: ``batches(step) -> batch``, a pure function of the step.
      num_steps: number of updates; the returned parameters are step ``num_steps``.
      checkpoint_dir: orbax checkpoint directory (created if missing).
      checkpoint_steps: steps to save; all are kept.
      metrics_fn: ``metrics_fn(params) -> {name: float or array}``; needs ``metrics_path``.
      metrics_every: interval of metric records and progress-bar updates.
      metrics_path: JSON-lines file for the metric records.
      progress: show a tqdm progress bar.
      checkpoint_fn: ``checkpoint_fn(step, params)`` after each checkpoint is saved, and with the restored
        parameters when training resumes (the pipeline records and checks their digests).
      mesh: a ``data × model`` mesh to train on (None: the default device); the batch size must be divisible by
        its ``"data"`` axis.

    Returns:
      The parameters after ``num_steps`` updates.

    Raises:
      PolcaError: ``num_steps``, ``metrics_every`` or a checkpoint step is not an int in range; ``metrics_fn``
        without ``metrics_path``, returning no dict, or returning the reserved names ``step`` or ``loss``;
        ``checkpoint_dir`` holds a step beyond ``num_steps``, or one that cannot be resumed from; the training loss
        is not finite (the checkpoints before that step are kept).

    Example:
      >>> import tempfile
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import polca_jax as pj
      >>> from polca_jax.pipeline import train
      >>> def loss(params, batch):  # least squares: w -> 2
      ...     return jnp.mean((batch["x"] * params["w"] - batch["y"]) ** 2)
      >>> x = jnp.linspace(-1.0, 1.0, 8)
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     final = train(loss, {"w": jnp.zeros(())}, optax.sgd(0.5), lambda step: {"x": x, "y": 2 * x}, 30,
      ...                   directory, [0, 10, 30], progress=False)
      ...     with pj.OrbaxCheckpoints(directory) as store:
      ...         print(store.steps, round(float(final["w"]), 3))
      [0, 10, 30] 2.0
    """
    _check_int("num_steps", num_steps, minimum=0)
    _check_int("metrics_every", metrics_every, minimum=1)
    for step in checkpoint_steps:
        _check_int("each of checkpoint_steps", step, minimum=0)
    save_steps = {int(step) for step in checkpoint_steps}
    if metrics_fn is not None and metrics_path is None:
        raise PolcaError("metrics_fn was given without metrics_path to write its values to")

    params = pj.shard_params(params, mesh)
    opt_state = pj.shard_params(optimizer.init(params), mesh)  # Adam's moments split like the parameters
    train_step = _compiled_train_step(loss_fn, optimizer, params, opt_state, mesh)
    with _checkpoint_manager(checkpoint_dir, create=True) as manager:
        start = manager.latest_step()
        if start is None:
            start = 0
            if 0 in save_steps:
                _save(manager, 0, params, opt_state)
                if checkpoint_fn is not None:
                    checkpoint_fn(0, params)
        elif start > num_steps:
            raise PolcaError(
                f"{checkpoint_dir} already holds step {start}, beyond num_steps={num_steps}; use restore_params "
                "to read an earlier step, or a fresh checkpoint_dir"
            )
        else:
            params, opt_state = _restore_training_state(manager, start, params, opt_state)
            if checkpoint_fn is not None:
                checkpoint_fn(start, params)

        metrics_file = _open_metrics_log(metrics_path, start) if metrics_path is not None else None
        try:
            bar = tqdm(range(start, num_steps), initial=start, total=num_steps, disable=not progress, desc="train")
            first_bad = jnp.asarray(-1)  # the first step whose loss is not finite, tracked on the device
            for step in bar:
                if step % metrics_every == 0 and metrics_file is not None and metrics_fn is not None:
                    metrics = _jsonable_metrics(metrics_fn(params))  # of the params before this step's update
                batch = pj.shard_batch(batches(step), mesh)
                params, opt_state, loss, first_bad = train_step(params, opt_state, batch, step, first_bad)
                if step % metrics_every == 0:
                    _check_finite_loss(first_bad)
                    bar.set_postfix(loss=f"{float(loss):.4g}")
                    if metrics_file is not None:
                        record = {"step": step, "loss": float(loss), **(metrics if metrics_fn is not None else {})}
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                if step + 1 in save_steps:
                    _check_finite_loss(first_bad)  # never save parameters that a non-finite loss produced
                    _save(manager, step + 1, params, opt_state)
                    if checkpoint_fn is not None:
                        checkpoint_fn(step + 1, params)
            _check_finite_loss(first_bad)
        finally:
            if metrics_file is not None:
                metrics_file.close()
        manager.wait_until_finished()
    return params


def restore_params(checkpoint_dir: str | Path, step: int, template: Any = None) -> Any:
    """The params saved at ``step`` in ``checkpoint_dir``.

    ``template`` (a params pytree of arrays or ``jax.ShapeDtypeStruct``) fixes the tree structure and dtypes;
    without it the saved tree comes back as nested dicts with string keys.
    """
    with OrbaxCheckpoints(checkpoint_dir, [step], template) as store:
        return store[0]


def checkpoint_steps(checkpoint_dir: str | Path) -> list[int]:
    """Sorted steps saved in ``checkpoint_dir``."""
    with OrbaxCheckpoints(checkpoint_dir) as store:
        return store.steps


def _compiled_train_step(loss_fn, optimizer, params, opt_state, mesh: Mesh | None) -> Callable:
    """``_train_step`` jitted; on a mesh with its outputs placed as its inputs are, so the state keeps its split."""
    step = functools.partial(_train_step, loss_fn, optimizer)
    if mesh is None:
        return jax.jit(step)
    placed = lambda tree: jax.tree.map(lambda leaf: leaf.sharding, tree)  # noqa: E731
    scalar = NamedSharding(mesh, PartitionSpec())
    return jax.jit(step, out_shardings=(placed(params), placed(opt_state), scalar, scalar))


def _train_step(loss_fn, optimizer, params, opt_state, batch, step, first_bad):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    first_bad = jnp.where((first_bad < 0) & ~jnp.isfinite(loss), step, first_bad)
    return optax.apply_updates(params, updates), opt_state, loss, first_bad


def _check_finite_loss(first_bad: jax.Array) -> None:
    step = int(first_bad)
    if step >= 0:
        raise PolcaError(f"the training loss is not finite at step {step} (NaN or inf): the learning rate may be too "
                         "high or the loss may overflow; checkpoints before that step are kept, none after it")


def _checkpoint_manager(directory: str | Path, *, create: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=create)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def _save(manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any) -> None:
    saved = manager.save(
        step,
        args=ocp.args.Composite(
            **{PARAMS_ITEM: ocp.args.StandardSave(params), _OPT_STATE: ocp.args.StandardSave(opt_state)}
        ),
    )
    if not saved:
        raise RuntimeError(f"orbax declined to save step {step} in {manager.directory}")


def _restore_training_state(manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any):
    args = ocp.args.Composite(
        **{
            PARAMS_ITEM: ocp.args.StandardRestore(_abstract(params)),
            _OPT_STATE: ocp.args.StandardRestore(_abstract(opt_state)),
        }
    )
    try:
        restored = manager.restore(step, args=args)
    except Exception as error:
        raise PolcaError(
            f"could not resume from step {step} in {manager.directory}: the checkpoint is unreadable or does not "
            f"match the given params and optimizer ({error})"
        ) from error
    return restored[PARAMS_ITEM], restored[_OPT_STATE]


class AdamScales(Sequence):
    """Adam's preconditioner at saved steps, as the scale of the Hessian of the preconditioned loss.

    For ``pj.hessian_basis(..., scale=...)``: per step a params-like pytree ``s = (√v̂ + ε)^(-1/2)``, so that
    ``S² = 1/(√v̂ + ε)`` is the diagonal Adam divides its step by, with ``v̂ = ν / (1 − b2^count)`` from the optimiser
    state :func:`train` saved with the parameters (``ν = 0`` before the first update: s = ε^(-1/2) everywhere).
    Restored lazily, one step at a time.

    Args:
      checkpoint_dir: a directory :func:`train` wrote.
      steps: the saved steps to read.
      template: the parameters (or their shapes).
      optimizer: the optax optimizer that trained them (its state's layout; the first ``ScaleByAdamState`` in it
        is read).
      b2: that Adam's second-moment decay.
      eps: that Adam's ε.

    Raises:
      PolcaError: (on indexing) the optimiser state saved at the step cannot be read or holds no Adam state.

    Example:
      ``out``: the run directory of :func:`polca_jax.pipeline.run`'s example (trained with
      :func:`adamw_paper`, basis step 40).

      >>> import jax
      >>> from polca_jax.pipeline import AdamScales, RunDirectory, adamw_paper, build_task
      >>> run_dir = RunDirectory(out)
      >>> config, template = run_dir.config, build_task(run_dir).init_params
      >>> optimizer = adamw_paper(config.learning_rate, config.weight_decay, config.b1, config.b2,
      ...                         config.warmup_steps)
      >>> scales = AdamScales(run_dir.checkpoint_dir, [0, 40], template, optimizer, b2=config.b2)
      >>> len(scales), jax.tree.structure(scales[1]) == jax.tree.structure(template)
      (2, True)
      >>> {round(float(leaf.max())) for leaf in jax.tree.leaves(scales[0])}  # before the first update: ε^(-1/2)
      {10000}
    """

    def __init__(self, checkpoint_dir: str | Path, steps: Sequence[int], template: Any,
                 optimizer: optax.GradientTransformation, *, b2: float, eps: float = 1e-8):
        self.directory, self.steps, self.b2, self.eps = Path(checkpoint_dir), [int(s) for s in steps], b2, eps
        self._abstract_state = jax.eval_shape(optimizer.init, _abstract(template))

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, index: int) -> Any:
        step = self.steps[index]
        with _checkpoint_manager(self.directory, create=False) as manager:
            try:
                restored = manager.restore(step, args=ocp.args.Composite(
                    **{_OPT_STATE: ocp.args.StandardRestore(self._abstract_state)}))
            except Exception as error:
                raise PolcaError(f"cannot read the optimiser state saved at step {step} in {self.directory}: "
                                 f"{type(error).__name__}: {error}") from error
        adam = next((state for state in jax.tree_util.tree_leaves(
            restored[_OPT_STATE], is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(state, optax.ScaleByAdamState)), None)
        if adam is None:
            raise PolcaError(f"the optimiser state saved at step {step} in {self.directory} holds no Adam state")
        correction = 1.0 - self.b2 ** int(adam.count)
        return jax.tree_util.tree_map(
            lambda nu: (jnp.sqrt(nu / correction if correction > 0 else jnp.zeros_like(nu)) + self.eps) ** -0.5,
            adam.nu)


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _open_metrics_log(metrics_path: str | Path, start_step: int):
    """Open the JSON-lines log for appending, first dropping records of steps >= start_step (and torn lines)."""
    path = Path(metrics_path)
    kept = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", start_step) < start_step:
                kept.append(line + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(kept)
    write_atomic(path, lambda file: file.write(text.encode()))
    return path.open("a")


def _jsonable_metrics(metrics: Mapping[str, Any]) -> dict:
    if not isinstance(metrics, Mapping):
        raise PolcaError(f"metrics_fn must return a dict of name -> value, got {type(metrics).__name__}")
    reserved = {"step", "loss"} & set(metrics)
    if reserved:
        raise PolcaError(f"metrics_fn must not return the reserved names {sorted(reserved)}")
    return {name: np.asarray(value).tolist() for name, value in metrics.items()}


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise PolcaError(f"{name} must be an int >= {minimum}, got {value!r}")
