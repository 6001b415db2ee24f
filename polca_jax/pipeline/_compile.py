"""Compile once per machine: JAX's persistent compilation cache, and how long each stage spent compiling.

The ``polca`` CLI turns the cache on by default (``--compile-cache DIR`` or ``POLCA_COMPILE_CACHE`` choose its
directory, ``--no-compile-cache`` turns it off), so a second process with the same shapes loads its kernels instead
of compiling them (30-66 s per large kernel on a 2-core CPU).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
from jax import monitoring

from polca_jax.errors import PolcaError

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HITS = "/jax/compilation_cache/cache_hits"
_CACHE_MISSES = "/jax/compilation_cache/cache_misses"


def default_cache_dir() -> Path:
    """``$POLCA_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/polca_jax/jax`` (``~/.cache/polca_jax/jax``)."""
    if os.environ.get("POLCA_COMPILE_CACHE"):
        return Path(os.environ["POLCA_COMPILE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "polca_jax" / "jax"


def enable_compile_cache(directory: str | Path | None = None) -> Path:
    """Turn on JAX's persistent compilation cache in ``directory`` (default :func:`default_cache_dir`) for every
    compilation, however short; returns the directory."""
    directory = Path(directory).expanduser().absolute() if directory is not None else default_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PolcaError(f"cannot use {directory} as the compilation cache ({error.strerror or error}); choose "
                         "another with --compile-cache DIR, or turn it off with --no-compile-cache") from error
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


@dataclasses.dataclass
class CompileClock:
    """What a block of work spent compiling: seconds in XLA's backend compile step (a kernel loaded from the persistent
    cache counts its loading time) and how many, and the persistent cache's hits and misses."""

    seconds: float = 0.0
    compiles: int = 0
    cache_hits: int = 0
    cache_misses: int = 0

    def as_record(self) -> dict:
        return {"compile_seconds": self.seconds, "compiles": self.compiles, "compile_cache_hits": self.cache_hits,
                "compile_cache_misses": self.cache_misses}


class measure_compilation:
    """Context manager: a :class:`CompileClock` of the compilations that run inside it (``with measure_compilation()
    as clock: ...``)."""

    def __enter__(self) -> CompileClock:
        self.clock = CompileClock()
        monitoring.register_event_duration_secs_listener(self._on_duration)
        monitoring.register_event_listener(self._on_event)
        return self.clock

    def __exit__(self, *exc) -> None:
        monitoring.unregister_event_duration_listener(self._on_duration)
        monitoring.unregister_event_listener(self._on_event)

    def _on_duration(self, event: str, duration: float, **kwargs) -> None:
        if event == _BACKEND_COMPILE:
            self.clock.seconds += duration
            self.clock.compiles += 1

    def _on_event(self, event: str, **kwargs) -> None:
        if event == _CACHE_HITS:
            self.clock.cache_hits += 1
        elif event == _CACHE_MISSES:
            self.clock.cache_misses += 1
