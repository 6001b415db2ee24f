"""The ``polca`` command line: run the paper's experiments as resumable stages on a run directory."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

DEFAULT_PRESET = "cpu"
EXPERIMENTS = {
    "arithmetic": "3-digit addition: train, basis, decompose, cluster, report",
    "english": "English language model: train, basis, decompose, cluster, label, report",
}


def _modules(experiment: str):
    """The experiment's (config, pipeline) modules."""
    package = f"polca_jax.experiments.{experiment}"
    return importlib.import_module(f"{package}.config"), importlib.import_module(f"{package}.pipeline")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polca", description=__doc__)
    commands = parser.add_subparsers(dest="experiment", required=True)
    for name, summary in EXPERIMENTS.items():
        config, pipeline = _modules(name)
        command = commands.add_parser(
            name, help=summary,
            description=f"Run the {name} experiment. Without STAGE every stage runs; finished stages are skipped, so "
            "a killed run resumes where it stopped.",
        )
        command.add_argument("stage", nargs="?", choices=pipeline.STAGES,
                             help="run only this stage (earlier ones must be done)")
        command.add_argument("--preset", choices=sorted(config.PRESETS),
                             help=f"config preset for a new run (default {DEFAULT_PRESET}; an existing run keeps its "
                             "own)")
        if name == "english":
            command.add_argument("--data", metavar="lee|hf:NAME[:CONFIG]|PATH",
                                 help="corpus: gensim's Lee corpus, a Hugging Face dataset, or a .txt/.jsonl file or "
                                 "directory (sets the config's data; default: the preset's)")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                             help="override a config value, e.g. --set learning_rate=1e-4 (repeatable)")
        command.add_argument("--out", required=True, help="run directory")
        command.add_argument("--force", action="store_true", help="rerun the stage(s) even if finished")
        command.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config_module, pipeline = _modules(args.experiment)
    try:
        overrides = config_module.parse_overrides(args.overrides)
        if getattr(args, "data", None) is not None:
            overrides["data"] = args.data
        has_run = (Path(args.out) / "config.json").exists()
        config = None
        if args.preset or overrides or not has_run:
            config = config_module.make_config(args.preset or DEFAULT_PRESET, overrides)
        run = pipeline.RunDirectory(args.out, config)
        stages = pipeline.STAGES if args.stage is None else (args.stage,)
        report = pipeline.run_stages(run, stages, force=args.force, progress=not args.quiet)
    except ValueError as error:
        print(f"polca: error: {error}", file=sys.stderr)
        return 2
    if report.exists():
        print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
