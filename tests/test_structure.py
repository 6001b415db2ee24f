"""The package's structure: its modules import each other without a circle, and no code reaches into another
package's private names (imports inside functions included).

The privacy rule: a name (a module, or a name in one) that starts with an underscore may be used only inside its own
package, the directory that holds it: ``polca_jax`` (the kernels, ``polca_jax/_*.py``), ``polca_jax.analysis``,
``polca_jax.pipeline``, ``polca_jax.pipeline.models``, each ``polca_jax.pipeline.tasks.<name>`` and each of the
paper's experiments, ``experiments.<name>``. Other code (benchmarks, the experiments' scripts, examples, notebooks)
uses only public names; tests may reach into private modules to test them.
"""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.core

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "polca_jax"
PACKAGES = ("polca_jax", "experiments")  # whose private names stay inside their own (sub)package


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def package_of(path: Path) -> str:
    """The package ``path`` belongs to: the module name of the directory that holds it (its own for an
    ``__init__.py``)."""
    return module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]


def imports(path: Path, source: str | None = None):
    """``(import node, bound name, full name)`` of everything a file imports, anywhere in it (relative imports
    resolved): ``import a.b`` binds ``a`` to ``a``, ``import a.b as c`` binds ``c`` to ``a.b``, ``from a import b``
    binds ``b`` to ``a.b``."""
    package = package_of(path)
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.asname or alias.name.split(".")[0], alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                yield node, alias.asname or alias.name, f"{base}.{alias.name}"


def imported_modules(path: Path) -> set[str]:
    """The polca_jax modules a file imports, anywhere in it: ``from a.b import c`` names ``a.b.c`` when that is a
    module, else ``a.b``."""
    found = set()
    for node, _, name in imports(path):
        found.add(name if isinstance(node, ast.Import) or is_module(name) else name.rpartition(".")[0])
    return {name for name in found if name.split(".")[0] == "polca_jax" and is_module(name)}


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imported_modules(path) - {module_name(path)} for path in PACKAGE.rglob("*.py")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_circle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_imports_inside_functions_and_relative_ones():
    graph = import_graph()
    assert "polca_jax.pipeline._stages" in graph["polca_jax.pipeline.cli"]  # inside a function
    assert "polca_jax.pipeline._registry" in graph["polca_jax.pipeline._stages"]
    assert "polca_jax._basis" in graph["polca_jax"]


def test_polca_jax_has_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def private_owner(name: str) -> str | None:
    """The package whose private name ``name`` (dotted) reaches: the part before its first private part; None when
    every part is public."""
    parts = name.split(".")
    private = [index for index, part in enumerate(parts) if is_private(part)]
    return ".".join(parts[: private[0]]) if private else None


def private_uses(path: Path, source: str | None = None) -> list[str]:
    """``"line: name"`` for each private name of another package that a file uses: one it imports (anywhere in the
    file), or one it reads off an imported polca_jax module (``pj._tree``), named up to its first private part."""
    home = package_of(path) if path.relative_to(ROOT).parts[0] in PACKAGES else None
    found, modules = [], {}  # modules: a name the file binds to a polca_jax module -> the module's full name
    for node, bound, name in imports(path, source):
        if name.split(".")[0] in PACKAGES:
            module = bound if bound == name.split(".")[0] else name
            if is_module(module):
                modules[bound] = module
            if private_owner(name) not in (None, home):
                found.append(f"{node.lineno}: {name}")
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain, base = [base.attr, *chain], base.value
            if isinstance(base, ast.Name) and base.id in modules and not any(map(is_private, chain[:-1])):
                name = ".".join([modules[base.id], *chain])
                if private_owner(name) not in (None, home):
                    found.append(f"{node.lineno}: {name}")
    return found


def test_the_privacy_rule_tells_a_package_s_own_private_names_from_another_s():
    stages, scores = ROOT / "polca_jax/pipeline/_stages.py", ROOT / "polca_jax/pipeline/tasks/planted/_scores.py"
    assert private_uses(stages, "from polca_jax.pipeline._registry import STAGES\nfrom . import _task") == []
    assert private_uses(stages, "def f():\n    from polca_jax.pipeline.tasks.planted._scores import summary") == [
        "2: polca_jax.pipeline.tasks.planted._scores.summary"]  # a task package is a package of its own
    assert private_uses(scores, "from polca_jax.pipeline import _registry") == ["1: polca_jax.pipeline._registry"]
    assert private_uses(scores, "from polca_jax.pipeline.tasks.planted._model import roles") == []
    assert private_uses(ROOT / "notebooks/x.py", "import polca_jax as pj\npj._tree.num_params(1)\npj.__version__") == [
        "2: polca_jax._tree"]
    assert private_uses(ROOT / "polca_jax/_basis.py", "from polca_jax._files import x") == []
    english = ROOT / "experiments/english/paper.py"
    assert private_uses(english, "from experiments.english._x import y") == []  # an experiment is a package
    assert private_uses(ROOT / "benchmarks/x.py", "from experiments.english._x import y") == [
        "1: experiments.english._x.y"]
    assert private_uses(english, "from experiments.arithmetic._x import y") == ["1: experiments.arithmetic._x.y"]


def test_no_code_uses_another_package_s_private_names():
    """Every .py file of the library, the benchmarks, the experiments, the examples and the notebooks' scripts, by
    the rule in this module's docstring: what a package shares is public (its ``__init__``'s exports or a public
    module such as ``polca_jax.files``)."""
    offenders = [f"{path.relative_to(ROOT)}:{use}"
                 for folder in ("polca_jax", "benchmarks", "experiments", "examples", "notebooks")
                 for path in sorted((ROOT / folder).rglob("*.py")) if ".ipynb_checkpoints" not in path.parts
                 for use in private_uses(path)]
    assert not offenders, "private names used across a package boundary:\n" + "\n".join(offenders)
