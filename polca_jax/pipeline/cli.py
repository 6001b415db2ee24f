"""The ``polca`` command line: run POLCA on a task as resumable stages in a run directory.

    polca run TASK --out DIR [--preset NAME] [--set KEY=VALUE ...] [--checkpoints DIR] [--stage STAGE ...]
    polca run hf:PATH_OR_REPO --out DIR [--text SOURCE] ...
    polca arithmetic [STAGE] --out DIR ...        (= polca run arithmetic)
    polca english [STAGE] [--data DATA] --out DIR ...
    polca report DIR [--task path/file.py:factory]
    polca plan TASK [--preset NAME] [--set KEY=VALUE ...]
    polca --version

The ``polca`` console script (``polca_jax._command``, which needs no pipeline extra for ``--version``) runs
:func:`main`; ``main(argv)`` runs the same command in this process.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax

import polca_jax as pj
from polca_jax.errors import PolcaError
from polca_jax.files import storage_path
from polca_jax.pipeline._compile import enable_compile_cache
from polca_jax.pipeline._report import write_report
from polca_jax.pipeline._run import run
from polca_jax.pipeline._registry import STAGES
from polca_jax.pipeline._usercode import as_task_error, user_code_errors

SHORTHANDS = {
    "arithmetic": "the paper's 3-digit addition task (= polca run arithmetic)",
    "english": "the paper's English language model (= polca run english)",
}


def _version() -> str:
    from polca_jax import __version__

    return f"polca_jax {__version__}"


TENSOR_PARALLEL_HELP = ("split the shipped transformer's attention by heads and its MLP by hidden units over MODEL "
                        "(tensor parallelism, polca_jax.pipeline.models.TENSOR_PARALLEL_RULES) instead of each "
                        "parameter along its largest dimension")


def _add_run_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--out", required=True, help="run directory (created for a new run, resumed otherwise)")
    command.add_argument("--preset", help="preset of a new run (default: the task's); an existing run keeps its own")
    command.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                         help="a pipeline setting or task option, e.g. --set learning_rate=1e-4 (repeatable)")
    command.add_argument("--checkpoints", metavar="DIR",
                         help="an existing orbax checkpoint directory to decompose instead of training (see "
                         "polca_jax.CheckpointRecorder)")
    command.add_argument("--force", action="store_true", help="redo the stage(s), and remove what later ones made")
    command.add_argument("--quiet", action="store_true", help="no progress bars")
    cache = command.add_mutually_exclusive_group()
    cache.add_argument("--compile-cache", metavar="DIR",
                       help="JAX's persistent compilation cache (default $POLCA_COMPILE_CACHE or "
                       "~/.cache/polca_jax/jax): a second run with the same shapes loads its kernels")
    cache.add_argument("--no-compile-cache", action="store_true", help="compile every kernel afresh")
    command.add_argument("--stage", dest="stages", action="append", choices=STAGES,
                         help="run only this stage (repeatable; earlier ones must have finished)")
    command.add_argument("--mesh", metavar="DATAxMODEL",
                         help="run the train, basis, decompose and causal stages on DATA x MODEL devices: samples and "
                         "batches split over DATA, parameters (and Adam's moments) over MODEL (e.g. 8x1, 2x4; the "
                         "results equal one device's up to the order of floating-point sums)")
    command.add_argument("--tensor-parallel", action="store_true", help=TENSOR_PARALLEL_HELP)
    scale = command.add_argument_group(
        "multi-process run", "every process runs the same command (the basis and decompose stages of a run one "
        "process started); each option defaults to its JAX_* environment variable")
    scale.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (JAX_COORDINATOR_ADDRESS)")
    scale.add_argument("--num-processes", type=int, metavar="N", help="number of processes (JAX_NUM_PROCESSES)")
    scale.add_argument("--process-id", type=int, metavar="I", help="this process' index, 0..N-1 (JAX_PROCESS_ID)")
    scale.add_argument("--heartbeat-timeout", type=int, default=100, metavar="S",
                       help="seconds a peer may stay silent before the run stops with an error (default 100)")
    scale.add_argument("--init-timeout", type=int, default=300, metavar="S",
                       help="seconds to wait for every process to join before the run stops with an error "
                       "(default 300)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polca", description="POLCA: find hidden breakthroughs in training.")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true",
                        help="let any error end with its Python traceback (for a bug report)")
    commands = parser.add_subparsers(dest="command", required=True)
    run_command = commands.add_parser(
        "run", help="run POLCA on a task: train, basis, decompose, cluster, score, report",
        description="Run every stage (or those named with --stage) on a run directory. Finished stages are "
        "skipped, so a killed run resumes where it stopped.")
    run_command.add_argument("task", help="arithmetic, english, path/to/file.py:factory, module:factory, or "
                             "hf:PATH_OR_REPO (a Hugging Face model's training checkpoints, docs/huggingface.md)")
    run_command.add_argument("--text", metavar="lee|hf:NAME[:CONFIG]|PATH",
                             help="an hf: task's evaluation text: gensim's Lee corpus (default), a Hugging Face "
                             "dataset, or a .txt/.jsonl file or directory (the task option text_source)")
    _add_run_options(run_command)
    for name, summary in SHORTHANDS.items():
        command = commands.add_parser(name, help=summary, description=f"{summary}.")
        command.add_argument("stage", nargs="?", choices=STAGES, help="run only this stage (as --stage STAGE)")
        if name == "english":
            command.add_argument("--data", metavar="lee|hf:NAME[:CONFIG]|PATH",
                                 help="corpus: gensim's Lee corpus, a Hugging Face dataset, or a .txt/.jsonl file or "
                                 "directory (the task option data)")
        _add_run_options(command)
    plan = commands.add_parser(
        "plan", help="estimate a run's FLOPs, time and memory per device on a mesh, before it runs",
        description="Build the task, compile every stage's kernels for one device's work (and on cpu time them), and "
        "print the FLOPs and time per stage, the memory per device, host memory and disk, with a WILL NOT FIT line "
        "when the memory per device exceeds the device's (the exit code stays 0). Writes nothing.")
    plan.add_argument("task", help="arithmetic, english, path/to/file.py:factory, module:factory or hf:PATH_OR_REPO")
    plan.add_argument("--preset", help="preset (default: the task's)")
    plan.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument("--checkpoints", metavar="DIR", help="the run would read these checkpoints (no training)")
    plan.add_argument("--mesh", metavar="DATAxMODEL",
                      help="devices splitting the samples (data) and the parameters (model), e.g. 8x1 or 2x4 "
                      "(default: --devices x 1)")
    plan.add_argument("--devices", type=int, metavar="N", help="number of devices (default 1; must match --mesh)")
    plan.add_argument("--tensor-parallel", action="store_true", help=TENSOR_PARALLEL_HELP)
    plan.add_argument("--device", choices=("cpu", "h100", "h200"), default="cpu",
                      help="cpu: time the kernels on this machine (and its memory); h100/h200: time from XLA's FLOPs "
                      "at an assumed efficiency (an estimate), their 80/141 GB")
    report = commands.add_parser("report", help="write the report of a run directory again",
                                 description="Re-render report/report.md of a run from what its directory holds.")
    report.add_argument("run_dir")
    report.add_argument("--task", metavar="path/file.py:factory",
                        help="the run's task, for its own report sections: a task file is code, and polca report runs "
                        "none that the run directory names (built-in tasks excepted)")
    for command in commands.choices.values():  # polca --debug run ... or polca run ... --debug
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="let any error end with its Python traceback (for a bug report)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``polca`` command in this process, on ``argv`` (default ``sys.argv[1:]``), e.g.
    ``main(["plan", "arithmetic", "--preset", "tiny"])``; returns its exit status: 0 done, 2 an error in what it was
    given or in the machine's resources (printed as one paragraph ``polca: error: ...``), 1 a bug in polca_jax.
    ``--debug`` raises instead."""
    args = _parser().parse_args(argv)
    try:
        return _main(args)
    except Exception as error:
        if args.debug:
            raise
        status, message = _explained(as_task_error(error, f"polca {args.command}") or error)  # the task's code?
        print(message, file=sys.stderr)
        return status


def _explained(error: Exception) -> tuple[int, str]:
    """The exit status and one-paragraph message for an exception that ended the command."""
    if isinstance(error, ValueError):  # PolcaError and the other refusals of an input
        return 2, f"polca: error: {_one_paragraph(error)}"
    if isinstance(error, OSError):
        name = f" ({error.filename})" if getattr(error, "filename", None) else ""
        return 2, (f"polca: error: the system refused a file operation{name}: {error.strerror or error}; check the "
                   "disk's free space and the permissions of the run directory (polca run resumes where it stopped)")
    if isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in str(error):
        return 2, ("polca: error: out of memory (" + (_one_paragraph(error)[:300] or type(error).__name__) + "); "
                   "lower the chunk sizes or the model or batch size (polca plan estimates the memory a run needs), "
                   "or use a larger device")
    return 1, (f"polca: internal error: {type(error).__name__}: {_one_paragraph(error)[:500]}; this is a bug in "
               "polca_jax; rerun with --debug for the traceback and report it")


def _one_paragraph(error: BaseException) -> str:
    return " ".join(str(error).split())


def _main(args) -> int:
    try:
        if args.command == "report":
            if not (Path(args.run_dir) / "config.json").is_file():
                raise PolcaError(f"{Path(args.run_dir).absolute()} is not a run directory (no config.json)")
            definition = None
            if args.task is not None:
                from polca_jax.pipeline._task import load_task_definition
                definition = load_task_definition(args.task)
            print(f"report: {write_report(args.run_dir, definition)}")
            return 0
        if args.command == "plan":
            print(_plan(args))
            return 0
        task = args.task if args.command == "run" else args.command
        stages = (args.stages or []) + ([args.stage] if getattr(args, "stage", None) else []) or None
        mesh = _run_mesh(args)
        if not args.no_compile_cache:
            enable_compile_cache(args.compile_cache)
        settings = list(args.settings)
        if getattr(args, "data", None) is not None:
            settings.append(f"data={_data_reference(args.data)}")
        if getattr(args, "text", None) is not None:
            if not task.startswith("hf:"):
                raise PolcaError("--text is the evaluation text of an hf: task (polca run hf:PATH --text FILE); "
                                 "other tasks take their data as task options (--set NAME=VALUE)")
            settings.append(f"text_source={_data_reference(args.text)}")
        with pj.partition_rules(_rules(args)):
            report = run(task, args.out, preset=args.preset, settings=settings, checkpoints=args.checkpoints,
                         stages=stages, force=args.force, progress=not args.quiet, mesh=mesh)
    except ValueError as error:
        if args.debug:
            raise
        print(_explained(as_task_error(error, f"polca {args.command}") or error)[1], file=sys.stderr)
        return 2
    if report.exists() and pj.is_writer():
        print(f"report: {report}")
    return 0


def _run_mesh(args):
    """Join a multi-process run when one is asked for (flags, JAX_* variables, or a launcher of several tasks: SLURM,
    Open MPI), then the ``--mesh`` over every process' devices (None: one device)."""
    from polca_jax.pipeline._plan import parse_mesh

    shape = None if args.mesh is None else parse_mesh(args.mesh)
    given = (args.coordinator, args.num_processes, args.process_id)
    if any(value is not None for value in given) or os.environ.get("JAX_COORDINATOR_ADDRESS") or pj.cluster_launcher():
        try:
            for flag, value in (("--heartbeat-timeout", args.heartbeat_timeout),
                                ("--init-timeout", args.init_timeout)):
                if value < 1:
                    raise PolcaError(f"{flag} must be at least 1 second, got {value}")
            pj.initialize_distributed(*given, timeout_s=args.init_timeout,
                                      heartbeat_timeout_s=args.heartbeat_timeout)
        except ConnectionError as error:
            raise PolcaError(str(error)) from None
    if shape is None:
        if jax.process_count() > 1:
            raise PolcaError("a multi-process run needs --mesh DATAxMODEL over every process' devices")
        return None
    data, model = shape
    if data * model != jax.device_count():
        raise PolcaError(f"--mesh {args.mesh} needs {data * model} devices, but {jax.device_count()} are visible "
                         f"({jax.process_count()} process(es)); on CPU, XLA_FLAGS="
                         "--xla_force_host_platform_device_count=N simulates N devices")
    return pj.device_mesh(model=model, data=data)


def _plan(args) -> str:
    from polca_jax.pipeline._config import make_config, parse_overrides
    from polca_jax.pipeline._plan import device_named, parse_mesh, plan_run
    from polca_jax.pipeline._stages import check_fits
    from polca_jax.pipeline._task import canonical_reference, load_task_definition

    mesh = parse_mesh(args.mesh, args.devices)
    definition = load_task_definition(args.task)
    overrides = parse_overrides(definition, args.settings)
    if args.checkpoints is not None:
        overrides["checkpoints"] = str(storage_path(args.checkpoints))
    config = make_config(definition, canonical_reference(args.task), args.preset, overrides)
    if config.checkpoints is not None:  # refused as polca run's train stage refuses them
        with pj.OrbaxCheckpoints(config.checkpoints, config.checkpoint_steps):
            pass
    with user_code_errors("polca plan"):
        task = definition.build(config.task_options, seed=config.seed, workdir=None)
    check_fits(config, task)
    device = device_named(args.device)
    header = (f"plan for {config.task}, preset {config.preset}, on {mesh[0] * mesh[1]} device(s) like "
              f"{device.name} (compiled on {jax.devices()[0].platform}):")
    rules = _rules(args)
    if rules is not None:
        header += "\nparameters split by --tensor-parallel's rules (TENSOR_PARALLEL_RULES), the others by the default"
    with pj.partition_rules(rules):
        return header + "\n" + plan_run(config, task, mesh=mesh, device=device).table()


def _rules(args):
    """The partition rules ``--tensor-parallel`` asks for (None: the default rule)."""
    if not args.tensor_parallel:
        return None
    if args.mesh is None:
        raise PolcaError("--tensor-parallel splits parameters over the model axis of a --mesh DATAxMODEL (e.g. 2x4)")
    from polca_jax.pipeline.models import TENSOR_PARALLEL_RULES

    return TENSOR_PARALLEL_RULES


def _data_reference(data: str) -> str:
    """A local corpus path made absolute (so a resumed run reads the same files from any directory)."""
    if data == "lee" or data.startswith("hf:"):
        return data
    return str(Path(data).expanduser().absolute())


if __name__ == "__main__":
    sys.exit(main())
