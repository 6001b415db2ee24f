"""The ``polca`` console script: ``polca --version`` with the core install alone, the rest from the pipeline.

The pipeline (``polca_jax.pipeline``: its stages, report and command line) needs the ``pipeline`` extra (flax,
optax, matplotlib). This entry point imports none of them before it knows that they are installed, so
``polca --version`` works after ``pip install polca_jax``, and every other command says which extra to install
instead of ending in a ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys

# what ``polca_jax.pipeline`` imports beyond the core dependencies (the ``pipeline`` extra of pyproject.toml)
PIPELINE_MODULES = ("flax", "optax", "matplotlib")


def missing_pipeline_modules() -> list[str]:
    """The modules of the ``pipeline`` extra that cannot be imported here (none when it is installed)."""
    return [name for name in PIPELINE_MODULES if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    """The ``polca`` command; returns its exit status (that of :func:`polca_jax.pipeline.cli.main`, or 2 when the
    pipeline extra is missing)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv == ["--version"]:
        from polca_jax import __version__

        print(f"polca_jax {__version__}")
        return 0
    missing = missing_pipeline_modules()
    if missing:
        print(f"polca: error: the polca command needs the pipeline extra, and {', '.join(missing)} "
              f"{'is' if len(missing) == 1 else 'are'} not installed: pip install \"polca_jax[pipeline]\". "
              "Without it, `polca --version` and the kernels (polca_jax, polca_jax.analysis) work.", file=sys.stderr)
        return 2
    if _multi_process(argv) and os.environ.get(SUPERVISED) is None:
        return _supervise(argv)
    from polca_jax.pipeline.cli import main as pipeline_main

    return pipeline_main(argv)


SUPERVISED = "POLCA_SUPERVISED"  # set in the child process that a multi-process ``polca`` command watches


def _multi_process(argv: list[str]) -> bool:
    """Whether the command joins a multi-process run (its flags, JAX's variables in the environment, or a launcher's
    of several tasks)."""
    from polca_jax._distributed import cluster_launcher

    flags = ("--coordinator", "--num-processes", "--process-id")
    return (any(arg.split("=")[0] in flags for arg in argv) or "JAX_COORDINATOR_ADDRESS" in os.environ
            or cluster_launcher() is not None)


def _supervise(argv: list[str]) -> int:
    """Run a multi-process command in a child process and report its end: JAX's runtime aborts a process
    (``SIGABRT``, a C++ stack) when a peer dies or never comes; this turns that into one paragraph and exit 2. The
    child's output passes through; an interrupt or a SIGTERM reaches it."""
    child = subprocess.Popen([sys.executable, "-m", "polca_jax._command", *argv],
                             env={**os.environ, SUPERVISED: "1"})
    signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signal.SIGTERM))  # a kill reaches it
    try:
        code = child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGINT)
        code = child.wait()
    if code in (-signal.SIGABRT, 128 + signal.SIGABRT):
        print("polca: error: this process of a multi-process run was stopped by JAX's runtime (SIGABRT): a peer "
              "process stopped or stayed unreachable for longer than --heartbeat-timeout seconds, or not every "
              "process joined within --init-timeout seconds (the native report above names which). What the finished stages and checkpoints wrote is kept "
              "in the run directory: start every process again with the same command to resume.", file=sys.stderr)
        return 2
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
