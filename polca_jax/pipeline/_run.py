"""Starting or resuming a run: the config a command line (or a notebook) asks for, checked against the run
directory before anything is written."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import jax

from polca_jax.errors import PolcaError
from polca_jax.files import read_json, storage_path, write_json_atomic
from polca_jax.pipeline._config import apply_overrides, config_differences, make_config, parse_overrides
from polca_jax.pipeline._host_settings import HOST_SETTINGS, host_setting_changes, second_order_unavailable
from polca_jax.pipeline._rundir import RunDirectory
from polca_jax.pipeline._registry import HOST_STAGES, STAGES, bases_of
from polca_jax.pipeline._stages import run_stages
from polca_jax.pipeline._task import TaskDefinition, canonical_reference, load_task_definition


def open_run(task: str, out: str | Path, *, preset: str | None = None,
             settings: Mapping[str, Any] | list[str] | None = None,
             checkpoints: str | Path | None = None, stages=None) -> tuple[RunDirectory, TaskDefinition]:
    """The run directory ``out`` for ``task``, created or reopened, and the task's definition.

    A new run takes the preset (default: the task's) with the settings on top. An existing run keeps its config:
    settings apply to it, and any difference (or another ``preset``) is refused, naming each difference, before
    anything is written, except a change of the host-stage settings (``HOST_SETTINGS``: clustering and scoring,
    and ``second_order`` where the stored arrays can redo it) when ``stages`` are host stages only (cluster, score,
    report) and every earlier stage has finished: the run directory then carries the new config in ``config`` and
    the changes (``key -> (on disk, new)``) in ``host_changes``, and :func:`run` records them and redoes the host
    stages from the first one they change.

    Args:
      task: a built-in task (``BUILTIN_TASKS``), ``"path/to/file.py:factory"`` or ``"module:factory"``.
      out: the run directory.
      preset: a preset of the task (None: the task's default for a new run; an existing run keeps its own).
      settings: ``key -> value`` (or ``["key=value", ...]`` as ``--set`` gives them): pipeline settings and task
        options.
      checkpoints: an existing orbax checkpoint directory to read instead of training.
      stages: the stages about to run (None: all); only with host stages alone may host-stage settings change.

    Returns:
      ``(run_dir, definition)``: the :class:`RunDirectory` (``run_dir.created`` for a new one; a new directory's
      ``config.json`` is written) and the task's :class:`TaskDefinition`.

    Raises:
      PolcaError: the task cannot be loaded or the settings parsed; ``out`` holds a run of another task, or of
        another config that cannot change on it (as above); or ``out`` cannot be a run directory.

    Example:
      ``out``: the run directory of :func:`polca_jax.pipeline.run`'s example (learning rate 0.01).

      >>> from polca_jax import PolcaError
      >>> from polca_jax.pipeline import open_run
      >>> run_dir, definition = open_run("planted", out)  # reopened, with its own config
      >>> run_dir.created, run_dir.config.preset, definition.name
      (False, 'tiny', 'make_task')
      >>> try:
      ...     open_run("planted", out, settings=["learning_rate=0.1"])
      ... except PolcaError as error:
      ...     print(error)
      /.../run holds a run with another config (learning_rate: 0.01 on disk vs 0.1); learning_rate would change
      what the train, basis, decompose or causal stages computed: choose a new --out directory, ...
    """
    definition = load_task_definition(task)
    reference = canonical_reference(task)
    overrides = parse_overrides(definition, settings) if isinstance(settings, list) else dict(settings or {})
    if checkpoints is not None:
        overrides["checkpoints"] = str(storage_path(checkpoints))
    if (Path(out) / "config.json").is_file():
        saved = RunDirectory(out).config
        if saved.task != reference:
            raise PolcaError(f"{Path(out).absolute()} holds a run of task {saved.task}, not {reference}; choose "
                             "another --out directory (nothing was changed)")
        wanted = (make_config(definition, reference, preset, overrides) if preset is not None
                  else apply_overrides(definition, saved, overrides))
        changes, others = host_setting_changes(saved, wanted)
        if others:
            raise PolcaError(
                f"{Path(out).absolute()} holds a run with another config "
                f"({'; '.join(config_differences(saved, wanted))}); {', '.join(others)} would change what the "
                "train, basis, decompose or causal stages computed: choose a new --out directory, or leave out --preset/--set to resume it as it is "
                f"(only the host-stage settings {', '.join(HOST_SETTINGS)} can change on an existing run, with "
                "--stage cluster, score or report; nothing was changed)")
        if changes and wanted.preset == saved.preset:
            run_dir = RunDirectory(out)
            _check_host_changes(run_dir, wanted, changes, stages)
            run_dir.config, run_dir.host_changes = wanted, changes
            return run_dir, definition
        return RunDirectory(out, wanted), definition
    return RunDirectory(out, make_config(definition, reference, preset, overrides)), definition


def run(task: str, out: str | Path, *, preset: str | None = None,
        settings: Mapping[str, Any] | list[str] | None = None, checkpoints: str | Path | None = None,
        stages=None, force: bool = False, progress: bool = True, log: Callable[[str], None] = print,
        mesh=None) -> Path:
    """Run (or resume) POLCA on ``task`` in the run directory ``out``; returns the report's path.

    Opens the run (:func:`open_run`), holds its lock while it runs (a second run on the directory is refused) and
    runs the stages (:func:`run_stages`): train → basis → decompose → causal → cluster → score → report. A new run
    directory that fails before it trains or finishes a stage (e.g. its task cannot be built) is removed again, so
    a corrected command can use it.

    Args:
      task: a built-in task (``"planted"``, ``"arithmetic"``, ``"english"``, ...), ``"path/to/file.py:factory"``
        or ``"module:factory"``.
      out: the run directory: new, or a run to resume.
      preset: a preset of the task (see :func:`open_run`, as for ``settings`` and ``checkpoints``).
      settings: ``key -> value`` or ``["key=value", ...]``: pipeline settings and task options.
      checkpoints: an existing orbax checkpoint directory to read instead of training.
      stages: the stages to run (default all; earlier ones must have finished).
      force: redo them (and remove what later stages made).
      progress: show progress bars.
      log: called with each line of progress (``[stage] running``, ``[stage] done in ... s``).
      mesh: the train, basis, decompose and causal stages run on it (:func:`polca_jax.device_mesh`); in a
        multi-process run the basis and decompose stages, on a mesh across the processes, in a run directory that
        one process started (see :func:`run_stages`).

    Returns:
      The report's path, ``out/report/report.md``.

    Raises:
      PolcaError: as :func:`open_run` and :func:`run_stages` (its subclasses included: ``TaskError`` for an error in
        the task's code, ``ResumeMismatch``, ``Interrupted``); another process holds the run directory; or a
        multi-process run starts a new directory.

    Example:
      The planted benchmark (:mod:`polca_jax.pipeline.tasks.planted`: 160 samples in two groups) at its ``tiny``
      preset, shortened to 40 steps and one basis checkpoint, without baselines and ablations (seconds on a CPU).
      The other examples of :mod:`polca_jax.pipeline` read its run directory ``out``.

      >>> import tempfile
      >>> from pathlib import Path
      >>> from polca_jax.pipeline import run
      >>> out = Path(tempfile.mkdtemp()) / "run"
      >>> settings = {"num_steps": 40, "basis_every": 40, "lanczos_iters": 4, "window_steps": 10,
      ...             "metrics_every": 20, "baselines": False, "ablations": False, "null_permutations": 50,
      ...             "breakthrough_shuffles": 20}
      >>> report = run("planted", out, preset="tiny", settings=settings, progress=False)
      [train] running
      [train] done in ... s
      [basis] running
      ...
      [report] done in ... s
      >>> report == out / "report" / "report.md", sorted(path.stem for path in (out / "stages").iterdir())
      (True, ['basis', 'causal', 'cluster', 'decompose', 'report', 'score', 'train'])
    """
    if jax.process_count() > 1 and not (Path(out) / "config.json").is_file():
        raise PolcaError(f"a multi-process run continues a run directory: start {Path(out).absolute()} in one "
                         "process first (polca run TASK --out DIR --stage train)")
    run_dir, definition = open_run(task, out, preset=preset, settings=settings, checkpoints=checkpoints,
                                   stages=stages)
    try:
        run_dir.lock()  # a second run on the directory is refused while this one runs
    except BaseException:
        run_dir.discard()
        raise
    try:
        changes = getattr(run_dir, "host_changes", None)
        if changes:
            stages, force = _apply_host_changes(run_dir, changes, stages, log), True
        run_stages(run_dir, definition, stages, force=force, progress=progress, log=log, mesh=mesh)
    except BaseException:
        run_dir.discard()
        raise
    finally:
        run_dir.unlock()
    return run_dir / "report" / "report.md"


SETTINGS_HISTORY = "settings_history.jsonl"  # one line per change of host-stage settings on a run directory


def _check_host_changes(run_dir: RunDirectory, wanted, changes: dict[str, tuple], stages) -> None:
    """Raise ``PolcaError`` (nothing written) unless the host-stage settings ``changes`` can apply to ``run_dir``:
    only host stages are asked for, the stages before them have finished, and a new ``second_order`` can be redone
    from every stored decomposition."""
    keys = ", ".join(changes)
    if stages is None or not set(stages) <= set(HOST_STAGES):
        asked = "every stage" if stages is None else ", ".join(stages)
        raise PolcaError(f"{keys} can change on the existing run {run_dir.path} only when host stages alone run (not "
                         f"{asked}): add --stage cluster, which redoes cluster, score and report from the stored "
                         "decomposition (nothing was changed)")
    for stage in STAGES[: STAGES.index(HOST_STAGES[0])]:
        run_dir.require(stage)
    if "second_order" in changes:
        for basis in bases_of(wanted):
            manifest = run_dir / "polca" / basis / "manifest.json"
            stored = read_json(manifest).get("config", {}).get("second_order") if manifest.is_file() else None
            reason = second_order_unavailable(run_dir.path, basis, stored, wanted.second_order)
            if reason is not None:
                raise PolcaError(f"second_order cannot change to {wanted.second_order} on {run_dir.path} without "
                                 f"recomputing: {reason}. Redo the decomposition (--stage decompose --force) or "
                                 "choose a new --out directory (nothing was changed)")


def _apply_host_changes(run_dir: RunDirectory, changes: dict[str, tuple], stages, log) -> list[str]:
    """Record the new config (``config.json``) and the change (``settings_history.jsonl``) of a run directory whose
    host-stage settings changed; the host stages to redo: from the first of the asked ones or of those the changes
    touch, through the report."""
    first = min([HOST_STAGES.index(HOST_SETTINGS[key]) for key in changes]
                + [HOST_STAGES.index(stage) for stage in stages])
    redo = list(HOST_STAGES[first:])
    write_json_atomic(run_dir / "config.json", run_dir.config.to_dict())
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with open(run_dir / SETTINGS_HISTORY, "a") as history:
        history.write(json.dumps({"time": started, "changes": {key: list(pair) for key, pair in changes.items()},
                                  "stages": redo}) + "\n")
    log("settings changed on an existing run: " + ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new)
                                                             in changes.items())
        + f"; redoing {', '.join(redo)} from the stored decomposition")
    return redo
