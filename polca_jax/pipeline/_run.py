"""Starting or resuming a run: the config a command line (or a notebook) asks for, checked against the run
directory before anything is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import jax

from polca_jax.pipeline._config import apply_overrides, make_config, parse_overrides
from polca_jax.pipeline._rundir import RunDirectory
from polca_jax.pipeline._stages import run_stages
from polca_jax.pipeline._task import TaskDefinition, canonical_reference, load_task_definition


def open_run(task: str, out: str | Path, *, preset: str | None = None,
             settings: Mapping[str, Any] | list[str] | None = None,
             checkpoints: str | Path | None = None) -> tuple[RunDirectory, TaskDefinition]:
    """The run directory ``out`` for ``task``, created or reopened, and the task's definition.

    settings: ``key -> value`` (or ``["key=value", ...]`` as ``--set`` gives them). A new run takes the preset
    (default: the task's) with the settings on top. An existing run keeps its config: settings apply to it, and
    any difference (or another ``preset``) is refused, naming each difference, before anything is written.
    checkpoints: an existing orbax checkpoint directory to read instead of training.
    """
    definition = load_task_definition(task)
    reference = canonical_reference(task)
    overrides = parse_overrides(definition, settings) if isinstance(settings, list) else dict(settings or {})
    if checkpoints is not None:
        overrides["checkpoints"] = str(Path(checkpoints).expanduser().absolute())
    if (Path(out) / "config.json").is_file():
        saved = RunDirectory(out).config
        if saved.task != reference:
            raise ValueError(f"{Path(out).absolute()} holds a run of task {saved.task}, not {reference}; choose "
                             "another --out directory (nothing was changed)")
        wanted = (make_config(definition, reference, preset, overrides) if preset is not None
                  else apply_overrides(definition, saved, overrides))
        return RunDirectory(out, wanted), definition
    return RunDirectory(out, make_config(definition, reference, preset, overrides)), definition


def run(task: str, out: str | Path, *, preset: str | None = None,
        settings: Mapping[str, Any] | list[str] | None = None, checkpoints: str | Path | None = None,
        stages=None, force: bool = False, progress: bool = True, log: Callable[[str], None] = print,
        mesh=None) -> Path:
    """Run (or resume) POLCA on ``task`` in the run directory ``out``; returns the report's path.

    task: a built-in task (``"arithmetic"``, ``"english"``), ``"path/to/file.py:factory"`` or
    ``"module:factory"``. stages: the stages to run (default all; earlier ones must have finished). force: redo them
    (and remove what later stages made). A new run directory that fails before it trains or finishes a stage
    (e.g. its task cannot be built) is removed again, so a corrected command can use it. mesh: the basis and
    decompose stages run on it (:func:`polca_jax.device_mesh`); in a multi-process run, on a mesh across the
    processes, in a run directory that one process started (see :func:`polca_jax.pipeline.run_stages`).
    See :func:`open_run` for ``preset``, ``settings`` and ``checkpoints``.
    """
    if jax.process_count() > 1 and not (Path(out) / "config.json").is_file():
        raise ValueError(f"a multi-process run continues a run directory: start {Path(out).absolute()} in one "
                         "process first (polca run TASK --out DIR --stage train)")
    run_dir, definition = open_run(task, out, preset=preset, settings=settings, checkpoints=checkpoints)
    try:
        run_dir.lock()  # a second run on the directory is refused while this one runs
    except BaseException:
        run_dir.discard()
        raise
    try:
        run_stages(run_dir, definition, stages, force=force, progress=progress, log=log, mesh=mesh)
    except BaseException:
        run_dir.discard()
        raise
    finally:
        run_dir.unlock()
    return run_dir / "report" / "report.md"
