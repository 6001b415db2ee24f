"""The README and the guide pages under docs/ run as written: the kernel examples (the README's ten lines, the
complete one in docs/kernels.md), and docs/your-own-task.md (the task file, the run on it, the recorder in a
training loop and the run on its checkpoints); the README's quick start is the command .ci/run tests; every
relative link resolves and no page names a machine's absolute path or a file the repository does not hold."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import polca_jax as pj

ROOT = Path(__file__).parent.parent
PAGES = {path.relative_to(ROOT).as_posix(): path.read_text()
         for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md",
            *sorted((ROOT / "experiments").glob("**/*.md"))]


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGES[page], re.S)


def block(page: str, marker: str) -> str:
    """The one Python code block of ``page`` that contains ``marker``."""
    (found,) = [code for code in python_blocks(page) if marker in code]
    return found


def command(page: str, prefix: str) -> list[str]:
    """The ``polca ...`` command line of ``page``'s bash blocks starting with ``prefix``, as arguments of ``main``."""
    lines = [line for code in re.findall(r"```bash\n(.*?)```", PAGES[page], re.S) for line in code.splitlines()]
    (line,) = [line for line in lines if line.startswith(prefix)]
    return line.split()[1:]


@pytest.mark.core
def test_the_kernel_examples_run():
    namespace = {}
    exec(compile(block("docs/kernels.md", "pj.hessian_basis(mean_loss"), "docs/kernels.md", "exec"), namespace)
    result = namespace["result"]
    assert result.projected_loss.shape == (21, 400, 12)
    assert all(c.direction in namespace["kept"].nonzero()[0] for c in namespace["clusterings"])

    exec(compile(block("README.md", "pj.hessian_basis(mean_loss"), "README.md", "exec"), namespace)  # same inputs
    np.testing.assert_allclose(namespace["result"].projected_loss, result.projected_loss, rtol=1e-6, atol=1e-6)
    assert [c.direction for c in namespace["clusters"]] == [c.direction for c in namespace["clusterings"]]


@pytest.mark.core
def test_the_quick_start_tests_as_ci_does():
    ci = (ROOT / ".ci" / "run").read_text()
    tests = 'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e ".[test]" && pytest'
    assert tests in ci.splitlines()[-1]
    readme_commands = [line for code in re.findall(r"```bash\n(.*?)```", PAGES["README.md"], re.S)
                       for line in code.splitlines()]
    assert tests in readme_commands
    assert ('python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[pipeline]" && '
            "polca run planted --preset demo --out runs/planted-demo") in readme_commands


@pytest.mark.core
def test_links_resolve_and_no_page_names_a_machine_path():
    for path in MARKDOWN:
        text = path.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not re.match(r"[a-z]+:", target):
                assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links to {target}, which is missing"
        machine = re.findall(r"(?<![\w.~$])/(?:work|root|tmp|home|Users|mnt)/\S*", text)
        assert not machine, f"{path.relative_to(ROOT)} names a machine's path: {machine}"
        assert "DESIGN.md" not in text, f"{path.relative_to(ROOT)} cites DESIGN.md, which the repository does not hold"


@pytest.mark.slow
def test_polca_on_your_own_model_runs_as_written(tmp_path, monkeypatch):
    from polca_jax.pipeline.cli import main

    page = "docs/your-own-task.md"
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    Path("my_task.py").write_text(block(page, "# my_task.py"))
    assert main([*command(page, "polca run my_task.py:make_task --preset tiny --out"), "--quiet"]) == 0
    assert "x1 > 0" in json.loads(Path("runs/my-task/metrics.json").read_text())["variants"]["polca"]["label_sets"]

    exec(compile(block(page, "CheckpointRecorder"), page, "exec"), {})
    assert pj.OrbaxCheckpoints("runs/my-checkpoints").steps == list(range(0, 201, 5))
    assert main([*command(page, "polca run my_task.py:make_task --preset tiny --checkpoints"), "--quiet"]) == 0
    own = pj.POLCAResult.load("runs/my-task-own/polca/hessian")
    assert json.loads(Path("runs/my-task-own/stages/train.json").read_text())["trained"] is False
    assert own.projected_loss.shape[0] == 41 and np.all(np.isfinite(own.projected_loss))
    assert Path("runs/my-task-own/report/report.md").is_file()
    sys.modules.pop("my_task", None)
