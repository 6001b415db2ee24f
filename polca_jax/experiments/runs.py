"""What every experiment shares: a run directory bound to one config, resumable stages, presets with overrides.

An experiment supplies a frozen config dataclass, its presets, and an ordered mapping stage name → function
``(run, experiment, progress) -> info``; :func:`run_stages` runs them, skipping finished ones.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping


class RunDirectory:
    """A run directory bound to one config: creating it writes ``config.json``, reopening it checks the config.

    Subclasses set ``config_type`` (the config dataclass) and ``command`` (the CLI command, for error messages).
    """

    config_type: type
    command: str

    def __init__(self, path: str | Path, config=None):
        self.path = Path(path)
        config_file = self.path / "config.json"
        if config_file.exists():
            try:
                saved = json.loads(config_file.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"{config_file} is not valid JSON: {error}") from error
            if config is not None and saved != config.to_dict():
                new = config.to_dict()
                changed = sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k))
                details = ", ".join(f"{k}: {saved.get(k)!r} on disk vs {new.get(k)!r}" for k in changed)
                raise ValueError(
                    f"{self.path} holds a run with another config ({details}); choose a new --out directory "
                    "(nothing was changed)"
                )
            try:
                config = self.config_type(**saved)
            except TypeError as error:
                raise ValueError(f"{config_file} is not a {self.command!r} config: {error}") from error
        elif config is None:
            raise ValueError(f"{self.path} is not a run directory (no config.json); start one with --preset")
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            config_file.write_text(json.dumps(config.to_dict(), indent=2))
        self.config = config

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def done(self, stage: str) -> bool:
        return (self.path / "stages" / f"{stage}.json").exists()

    def mark_done(self, stage: str, info: dict) -> None:
        (self.path / "stages").mkdir(exist_ok=True)
        (self.path / "stages" / f"{stage}.json").write_text(json.dumps(info, indent=2))

    def require(self, stage: str) -> None:
        if not self.done(stage):
            raise ValueError(f"stage {stage!r} has not finished in {self.path}; run `{self.command} {stage}` first")


StageFunction = Callable[[RunDirectory, Any, bool], dict]


def run_stages(run: RunDirectory, stage_functions: Mapping[str, StageFunction], make_experiment: Callable[[Any], Any],
               stages=None, *, force: bool = False, progress: bool = True,
               log: Callable[[str], None] = print) -> None:
    """Run ``stages`` (default: all, in order) on ``run``, skipping finished ones unless ``force``.

    Every stage before a requested one must have finished. ``make_experiment(config)`` is built once, on the first
    stage that runs; each stage's info and wall time go to ``stages/<stage>.json``.
    """
    order = list(stage_functions)
    stages = order if stages is None else list(stages)
    experiment = None
    for stage in stages:
        if stage not in stage_functions:
            raise ValueError(f"unknown stage {stage!r}; stages are {tuple(order)}")
        for previous in order[: order.index(stage)]:
            if previous not in stages:
                run.require(previous)
        if run.done(stage) and not force:
            log(f"[{stage}] already finished in {run.path}, skipped")
            continue
        experiment = experiment or make_experiment(run.config)
        log(f"[{stage}] running")
        start = time.perf_counter()
        info = stage_functions[stage](run, experiment, progress)
        info["wall_seconds"] = time.perf_counter() - start
        run.mark_done(stage, info)
        log(f"[{stage}] done in {info['wall_seconds']:.1f} s")


def make_config(config_type: type, presets: Mapping[str, dict], preset: str, overrides: dict | None = None):
    """``config_type`` built from ``presets[preset]`` with ``overrides`` (field → value); unknown names raise."""
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
    fields = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(overrides or {}) - fields)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; valid keys: {sorted(fields - {'preset'})}")
    return config_type(preset=preset, **{**presets[preset], **(overrides or {})})


def parse_overrides(config_type: type, assignments: list[str]) -> dict[str, Any]:
    """``["lr=1e-3", ...]`` → typed values, coerced to each field's type (``none`` → None, ``true``/``false``)."""
    types = {f.name: f.type for f in dataclasses.fields(config_type)}
    overrides = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or key not in types:
            raise ValueError(f"bad --set {assignment!r}: expected KEY=VALUE with KEY one of {sorted(types)}")
        overrides[key] = _coerce(key, text, str(types[key]))
    return overrides


def _coerce(key: str, text: str, type_name: str) -> Any:
    if text.lower() == "none" and "None" in type_name:
        return None
    try:
        if type_name.startswith("bool"):
            if text.lower() not in ("true", "false"):
                raise ValueError(text)
            return text.lower() == "true"
        if type_name.startswith("int"):
            return int(text)
        if type_name.startswith("float"):
            return float(text)
    except ValueError:
        raise ValueError(f"--set {key}={text}: expected {type_name.split(' |')[0]}") from None
    return text
