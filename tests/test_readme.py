"""The README's code runs as written: the kernel example, and the "POLCA on your own model" section (the task file,
the run on it, the recorder in a training loop and the run on its checkpoints)."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import polca_jax as pj
from polca_jax.pipeline._cli import main

README = (Path(__file__).parent.parent / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
BASH_LINES = [line for block in re.findall(r"```bash\n(.*?)```", README, re.S) for line in block.splitlines()]


def block(marker: str) -> str:
    (found,) = [code for code in PYTHON_BLOCKS if marker in code]
    return found


def command(prefix: str) -> list[str]:
    """The README's ``polca ...`` command line starting with ``prefix``, as arguments of ``main``."""
    (line,) = [line for line in BASH_LINES if line.startswith(prefix)]
    return line.split()[1:]


def test_readme_kernel_example_runs():
    namespace = {}
    exec(compile(block("pj.hessian_basis(mean_loss"), "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.projected_loss.shape == (21, 400, 12)
    assert all(c.direction in namespace["kept"].nonzero()[0] for c in namespace["clusterings"])


@pytest.mark.slow
def test_polca_on_your_own_model_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    Path("my_task.py").write_text(block("# my_task.py"))
    assert main([*command("polca run my_task.py:make_task --preset tiny --out"), "--quiet"]) == 0
    assert "x1 > 0" in json.loads(Path("runs/my-task/metrics.json").read_text())["variants"]["polca"]["label_sets"]

    exec(compile(block("CheckpointRecorder"), "README.md", "exec"), {})
    assert pj.OrbaxCheckpoints("runs/my-checkpoints").steps == list(range(0, 201, 5))
    assert main([*command("polca run my_task.py:make_task --preset tiny --checkpoints"), "--quiet"]) == 0
    own = pj.POLCAResult.load("runs/my-task-own/polca/hessian")
    assert json.loads(Path("runs/my-task-own/stages/train.json").read_text())["trained"] is False
    assert own.projected_loss.shape[0] == 41 and np.all(np.isfinite(own.projected_loss))
    assert Path("runs/my-task-own/report/report.md").is_file()
    sys.modules.pop("my_task", None)
