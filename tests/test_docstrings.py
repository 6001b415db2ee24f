"""The public docstrings, for every exported name of polca_jax, polca_jax.analysis and polca_jax.pipeline: each is
Google-style with the sections its signature calls for, and the examples in them run and print what they show
(doctest).

The kernels' examples are small enough to check by hand (least squares, whose Hessian is xᵀx / n): ``pj.hvp``'s
example defines that problem. The analysis examples use the projected-loss trajectories and the clustering that
``analysis.Clustering``'s example defines. The others use those names, as their text says. The pipeline's examples
that need a run read the run directory ``out`` of ``polca_jax.pipeline.run``'s example (a shortened run of the
planted benchmark's tiny preset, run once, in a temporary directory removed afterwards).

The tests of polca_jax and polca_jax.analysis need only the core install (marked ``core``); those of the pipeline
are collected only where its extra is installed."""

import doctest
import functools
import importlib
import os
import inspect
import re
import shutil

import pytest

import polca_jax as pj
from polca_jax import analysis
from polca_jax._command import missing_pipeline_modules

pipeline = None if missing_pipeline_modules() else importlib.import_module("polca_jax.pipeline")
# polca_jax.hf's examples build their model with transformers and PyTorch: checked only in the process of their own
# that tests/test_separate_processes.py starts (conftest.py says why)
hf = importlib.import_module("polca_jax.hf") if os.environ.get("POLCA_TORCH_TESTS") else None
MODULES = (pj, analysis) + ((pipeline,) if pipeline is not None else ()) + ((hf,) if hf is not None else ())
core = pytest.mark.core  # needs only the core install: pytest -m core

# Module constants (tuples of choices, a number) cannot carry a docstring of their own (an int's or a tuple's is its
# type's); each is named instead in the docstring of an exported function that takes it (checked below).
CONSTANTS = {"ADJUST_METHODS", "CLUSTERERS", "DEFAULT_MIN_SAMPLES_DIVISOR", "NORMALIZATIONS", "PARAMS_ITEM",
             "SUPPORTED_MODEL_TYPES",  # polca_jax.hf's
             "ROTATIONS", "STRATEGIES", "TENSOR_PARALLEL_RULES",
             # the pipeline's: its registries (bases, stages, strategies, built-in tasks) and the strategies' names
             "BASES", "BUILTIN_TASKS", "STAGES", "VARIANTS", "EXACT_LOSS", "FIRST_ORDER_POLCA", "GRADIENT_NORMS",
             "POLCA", "POLCA_GRADIENTS", "POLCA_PROFILE", "RANDOM_GRADIENTS", "RANDOM_POLCA", "RANDOM_PROFILE",
             "RANDOM_SNAPSHOT",
             "SECTIONS"}
# Exception classes take only a message, like any ValueError: they have no Args to document (and, as for every
# class, no Example is required; PolcaError's docstring shows one).
EXCEPTIONS = {"CorruptRunDirectory", "Interrupted", "PolcaError", "ResumeMismatch", "TaskError"}
SETUPS = {  # the examples that define the names the others use: the object, and those names
    "polca_jax.hvp": (pj.hvp, ("jax", "jnp", "np", "pj", "params", "batch", "per_sample_loss", "loss")),
    "polca_jax.analysis.Clustering": (analysis.Clustering, ("analysis", "steps", "projected_loss", "labels",
                                                            "clustering")),
}
# polca_jax.hf's setup (a GPT-2 built with transformers), whose names its other examples use
HF_SETUP = {"polca_jax.hf.read_config": (hf.read_config, ("np", "torch", "model", "config", "params", "tokens"))
            } if hf is not None else {}
# the pipeline's: a run (seconds), run once by the fixture rather than again as a test of its own
PIPELINE_RUN = "polca_jax.pipeline.run"
SECTIONS = ("Args", "Attributes", "Returns", "Raises", "Example", "Examples", "Note")


def exported():
    """(qualified name, module, name, object) of every name in the ``__all__`` of ``MODULES``."""
    return [(f"{module.__name__}.{name}", module, name, getattr(module, name))
            for module in MODULES for name in module.__all__]


def in_pipeline(qualified: str) -> bool:
    """Whether ``qualified`` needs an extra: the pipeline's (its examples read a run) or the hf one's."""
    return qualified.startswith(("polca_jax.pipeline.", "polca_jax.hf."))


def marked(rows, name_of):
    """``rows`` as pytest params, those outside the pipeline marked ``core``, each with its qualified name as id."""
    return [pytest.param(*(row if isinstance(row, tuple) else (row,)), id=name_of(row),
                         marks=() if in_pipeline(name_of(row)) else core) for row in rows]


def public_doctests():
    finder, seen, found = doctest.DocTestFinder(), set(), []
    for qualified, _, name, obj in exported():
        if name in CONSTANTS:  # its docstring would be its type's (int's has examples of its own)
            continue
        for test in finder.find(obj, qualified):
            if test.examples and test.name not in seen:
                seen.add(test.name)
                found.append(test)
    return found


TESTS = public_doctests()
EXPORTED = exported()


def run_setups(setups: dict) -> dict:
    """The names the setup examples ``setups`` define, after running them in order."""
    names = {}
    for qualified, (obj, defined) in setups.items():
        (setup,) = [test for test in doctest.DocTestFinder().find(obj, qualified) if test.name == qualified]
        setup.globs.update(names)
        runner = doctest.DocTestRunner()
        runner.run(setup, clear_globs=False, out=lambda _: None)
        assert runner.failures == 0, f"the setup example of {qualified} fails"
        names.update({name: setup.globs[name] for name in defined})
    return names


@pytest.fixture(scope="module")
def shared_names():
    """The names the kernels' setup examples define (pj.hvp's least squares, analysis.Clustering's trajectories)."""
    return run_setups(SETUPS)


@pytest.fixture(scope="module")
def hf_names():
    """The names polca_jax.hf's setup example defines (a small GPT-2: ``model``, ``config``, ``params``, ...)."""
    return run_setups(HF_SETUP)


@pytest.fixture(scope="module")
def pipeline_names():
    """``out``: the run directory of ``polca_jax.pipeline.run``'s example, after running it (and checking what it
    prints); its temporary directory is removed after the module's tests."""
    (setup,) = [test for test in doctest.DocTestFinder().find(pipeline.run, PIPELINE_RUN) if test.name == PIPELINE_RUN]
    output = []
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    runner.run(setup, clear_globs=False, out=output.append)
    out = setup.globs.get("out")
    try:
        assert runner.failures == 0, f"the setup example of {PIPELINE_RUN} fails:\n" + "".join(output)
        yield {"out": out}
    finally:
        if out is not None:
            shutil.rmtree(out.parent, ignore_errors=True)


@core
def test_the_kernels_show_runnable_examples():
    names = {test.name.rsplit(".", 1)[-1] for test in TESTS}
    assert {"hvp", "hessian_basis", "per_sample_projections", "polca", "gradient_covariance_basis"} <= names, names


@pytest.mark.parametrize("test", marked(TESTS, lambda test: test.name))
def test_a_docstring_example_prints_what_it_shows(test, request):
    if test.name.startswith("polca_jax.hf."):
        shared = request.getfixturevalue("hf_names")
    elif test.name.startswith("polca_jax.pipeline."):
        shared = request.getfixturevalue("pipeline_names")
        if test.name == PIPELINE_RUN:  # the fixture ran it, and checked what it prints
            return
    else:
        shared = request.getfixturevalue("shared_names")
    test.globs.update({name: value for name, value in shared.items() if name not in test.globs})
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    output = []
    runner.run(test, out=output.append)
    assert runner.failures == 0, "".join(output)


def sections(doc: str) -> dict[str, str]:
    """The Google-style sections of a cleaned docstring: header (a known name and a colon, alone on an unindented
    line) -> the indented text under it."""
    found, current = {}, None
    for line in doc.splitlines():
        header = re.fullmatch(r"(\w+):", line)
        if header and header[1] in SECTIONS:
            current = found.setdefault(header[1], [])
        elif line.strip() and not line[0].isspace():
            current = None
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines).strip() for name, lines in found.items()}


def own_docstring(obj) -> str | None:
    """``obj``'s own docstring: not one inherited, nor the signature a dataclass writes when a class has none."""
    doc = vars(obj).get("__doc__") if inspect.isclass(obj) else obj.__doc__
    if doc is None or (inspect.isclass(obj) and doc.startswith(f"{obj.__name__}(")):
        return None
    return inspect.cleandoc(doc)


def parameter_names(obj) -> list[str]:
    return [name for name in inspect.signature(obj).parameters if name != "self"]


def documents(text: str, name: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(name)}\b", text) is not None


def public_members(cls):
    """(name, object) of the public methods and properties a class defines itself."""
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, staticmethod | classmethod):
            value = value.__func__
        if isinstance(value, property | functools.cached_property) or inspect.isfunction(value):
            yield name, value


@pytest.mark.parametrize("qualified, module, name, obj", marked(EXPORTED, lambda row: row[0]))
def test_an_exported_name_has_the_docstring_sections_its_signature_calls_for(qualified, module, name, obj):
    if name in CONSTANTS:
        assert not callable(obj), f"{qualified} is callable: it needs a docstring of its own"
        named_in = [other for other in module.__all__ if other not in CONSTANTS
                    and documents(own_docstring(getattr(module, other)) or "", name)]
        assert named_in, f"{qualified} is named in no exported docstring of {module.__name__}"
        return
    doc = own_docstring(obj)
    assert doc, f"{qualified} has no docstring of its own"
    lines = doc.splitlines()
    assert len(lines) == 1 or not lines[1].strip(), f"{qualified}: the summary is not one line (then a blank line)"
    found = sections(doc)
    if name in EXCEPTIONS:
        assert issubclass(obj, pj.PolcaError), f"{qualified} is not a PolcaError"
        return
    parameters = parameter_names(obj)
    if inspect.isclass(obj):
        documented = found.get("Args", "") + "\n" + found.get("Attributes", "")
        assert not parameters or documented.strip(), f"{qualified} takes {parameters} but has no Args or Attributes"
        for member, value in public_members(obj):
            assert value.__doc__, f"{qualified}.{member} has no docstring"
    else:
        documented = found.get("Args", "")
        assert not parameters or documented, f"{qualified} takes {parameters} but has no Args section"
        returns = inspect.signature(obj).return_annotation
        if returns not in (None, "None"):
            assert found.get("Returns"), f"{qualified} returns something ({returns}) but has no Returns section"
        example = found.get("Example", "") + found.get("Examples", "")
        assert ">>>" in example, f"{qualified} has no Example section with a doctest"
    missing = [parameter for parameter in parameters if not documents(documented, parameter)]
    assert not missing, f"{qualified}: parameters {missing} are not described under Args (or Attributes)"
