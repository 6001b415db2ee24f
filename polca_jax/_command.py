"""The ``polca`` console script: ``polca --version`` with the core install alone, the rest from the pipeline.

The pipeline (``polca_jax.pipeline``: its stages, report and command line) needs the ``pipeline`` extra (flax,
optax, matplotlib). This entry point imports none of them before it knows that they are installed, so
``polca --version`` works after ``pip install polca_jax``, and every other command says which extra to install
instead of ending in a ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib.util
import sys

# what ``polca_jax.pipeline`` imports beyond the core dependencies (the ``pipeline`` extra of pyproject.toml)
PIPELINE_MODULES = ("flax", "optax", "matplotlib")


def missing_pipeline_modules() -> list[str]:
    """The modules of the ``pipeline`` extra that cannot be imported here (none when it is installed)."""
    return [name for name in PIPELINE_MODULES if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    """The ``polca`` command; returns its exit status (that of ``polca_jax.pipeline._cli.main``, or 2 when the
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
    from polca_jax.pipeline._cli import main as pipeline_main

    return pipeline_main(argv)


if __name__ == "__main__":
    sys.exit(main())
