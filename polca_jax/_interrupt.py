"""Stopping a resumable loop on SIGTERM at a point it resumes from.

A cluster that preempts a job sends SIGTERM, then kills it a little later. Inside :func:`stop_on_sigterm` (the
streamed decomposition's loop over checkpoints, Algorithm 1's when it keeps its work) a SIGTERM only records the
request; :func:`stop_if_requested`, called once a checkpoint's work is on disk, then raises :class:`Interrupted`.
In a multi-process run every process asks all the others, so they stop after the same checkpoint. Outside these
loops SIGTERM keeps its default meaning (the process ends at once).
"""

from __future__ import annotations

import contextlib
import signal
import threading

import numpy as np

from polca_jax.errors import Interrupted

_requested = False


@contextlib.contextmanager
def stop_on_sigterm():
    """Within it, SIGTERM sets a flag that :func:`stop_if_requested` reads (main thread only; elsewhere a no-op)."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request(signum, frame):
        global _requested
        _requested = True

    previous, _requested = signal.signal(signal.SIGTERM, request), False
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _requested = False


def stop_if_requested(done: str, resume: str) -> None:
    """Raise :class:`Interrupted` if this process (or, in a multi-process run, any process) received SIGTERM;
    ``done``: what is kept on disk; ``resume``: how to go on."""
    import jax

    requested = _requested
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        requested = bool(np.asarray(multihost_utils.process_allgather(np.array([int(requested)], np.int32))).any())
    if requested:
        raise Interrupted(f"stopped by SIGTERM after {done}, which is kept; {resume}")
