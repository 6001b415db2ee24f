"""What every experiment shares: a run directory bound to one config, resumable stages, presets with overrides.

An experiment supplies a frozen config dataclass (a :class:`CheckpointedConfig`), its presets, and an ordered mapping
stage name → function ``(run, experiment, progress) -> info``; :func:`run_stages` runs them, skipping finished ones.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from polca_jax._decomposition import SECOND_ORDER_CHOICES

PROJECTION_METHODS = ("auto", "reverse", "forward")
NORMALIZATIONS = (None, "unit", "standardize")


class CheckpointedConfig:
    """Base of the experiments' frozen config dataclasses: the checkpoint schedules and the checks of the fields
    every experiment has (training, checkpoints, Algorithm 1, decomposition, clustering, breakthroughs).

    A subclass declares those fields (``learning_rate``, ``num_steps``, ``batch_size``, ``warmup_steps``,
    ``polca_every``, ``basis_every``, ``basis_until``, ``k_per_checkpoint``, ``lanczos_iters``, ``second_order``,
    ``projection_method``, ``min_cluster_size``, ``min_samples_divisor``, ``reference_num_samples``, ``normalize``,
    ``window_steps``, ``threshold_step``, ``seed``, ``metrics_every``) and calls :meth:`check_fields` from
    ``__post_init__`` with its own positive-integer fields.
    """

    SHARED_POSITIVE_INTS = (
        "num_steps", "batch_size", "polca_every", "basis_every", "k_per_checkpoint", "lanczos_iters",
        "min_cluster_size", "window_steps", "metrics_every",
    )

    def check_fields(self, positive_ints=()) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in (*self.SHARED_POSITIVE_INTS, *positive_ints):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        if not self.min_samples_divisor > 0:
            raise ValueError(f"min_samples_divisor must be > 0, got {self.min_samples_divisor}")
        if self.reference_num_samples is not None and not (
            isinstance(self.reference_num_samples, int) and self.reference_num_samples >= 1
        ):
            raise ValueError(
                f"reference_num_samples must be None or a positive integer, got {self.reference_num_samples!r}")
        if self.second_order not in SECOND_ORDER_CHOICES:
            raise ValueError(f"second_order must be one of {SECOND_ORDER_CHOICES}, got {self.second_order!r}")
        if self.projection_method not in PROJECTION_METHODS:
            raise ValueError(f"projection_method must be auto, reverse or forward, got {self.projection_method!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be None, 'unit' or 'standardize', got {self.normalize!r}")
        if self.num_steps % self.polca_every:
            raise ValueError(f"num_steps ({self.num_steps}) must be a multiple of polca_every ({self.polca_every})")
        if self.basis_until is not None and not 1 <= self.basis_until <= self.num_steps:
            raise ValueError(f"basis_until must lie in [1, num_steps], got {self.basis_until}")
        if not self.basis_steps:
            raise ValueError(f"no basis checkpoint: basis_every={self.basis_every} > basis_until={self.basis_until}")

    @property
    def polca_steps(self) -> list[int]:
        """Steps of the POLCA checkpoints: 0, polca_every, ..., num_steps."""
        return list(range(0, self.num_steps + 1, self.polca_every))

    @property
    def basis_steps(self) -> list[int]:
        """Steps of the Algorithm 1 checkpoints: basis_every, 2·basis_every, ... <= basis_until (default num_steps)."""
        until = self.num_steps if self.basis_until is None else self.basis_until
        return list(range(self.basis_every, until + 1, self.basis_every))

    @property
    def checkpoint_steps(self) -> list[int]:
        """Every step the train stage saves: the POLCA and the basis steps."""
        return sorted(set(self.polca_steps) | set(self.basis_steps))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
               stages=None, *, host_stages=(), force: bool = False, progress: bool = True,
               log: Callable[[str], None] = print) -> None:
    """Run ``stages`` (default: all, in order) on ``run``, skipping finished ones unless ``force``.

    Every stage before a requested one must have finished. ``make_experiment(config)`` is built once, on the first
    stage that runs and is not in ``host_stages`` (those read only the run directory and get None); each stage's info
    and wall time go to ``stages/<stage>.json``.
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
        log(f"[{stage}] running")
        start = time.perf_counter()
        if stage not in host_stages:
            experiment = experiment or make_experiment(run.config)
        info = stage_functions[stage](run, None if stage in host_stages else experiment, progress)
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
