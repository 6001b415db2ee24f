"""The ``polca`` command line: run the paper's experiments as resumable stages on a run directory."""

from __future__ import annotations

import argparse
import sys

DEFAULT_PRESET = "cpu"


def _parser() -> argparse.ArgumentParser:
    from polca_jax.experiments.arithmetic.config import PRESETS
    from polca_jax.experiments.arithmetic.pipeline import STAGES

    parser = argparse.ArgumentParser(prog="polca", description=__doc__)
    commands = parser.add_subparsers(dest="experiment", required=True)
    arithmetic = commands.add_parser(
        "arithmetic",
        help="3-digit addition: train, basis, decompose, cluster, report",
        description="Run the arithmetic experiment. Without STAGE every stage runs; finished stages are skipped, so "
        "a killed run resumes where it stopped.",
    )
    arithmetic.add_argument("stage", nargs="?", choices=STAGES, help="run only this stage (earlier ones must be done)")
    arithmetic.add_argument("--preset", choices=sorted(PRESETS),
                            help=f"config preset for a new run (default {DEFAULT_PRESET}; an existing run keeps its own)")
    arithmetic.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override a config value, e.g. --set learning_rate=1e-4 (repeatable)")
    arithmetic.add_argument("--out", required=True, help="run directory")
    arithmetic.add_argument("--force", action="store_true", help="rerun the stage(s) even if finished")
    arithmetic.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from pathlib import Path

    from polca_jax.experiments.arithmetic.config import make_config, parse_overrides
    from polca_jax.experiments.arithmetic.pipeline import STAGES, RunDirectory, run_stages

    try:
        has_run = (Path(args.out) / "config.json").exists()
        config = None
        if args.preset or args.overrides or not has_run:
            config = make_config(args.preset or DEFAULT_PRESET, parse_overrides(args.overrides))
        run = RunDirectory(args.out, config)
        stages = STAGES if args.stage is None else (args.stage,)
        report = run_stages(run, stages, force=args.force, progress=not args.quiet)
    except ValueError as error:
        print(f"polca: error: {error}", file=sys.stderr)
        return 2
    if report.exists():
        print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
