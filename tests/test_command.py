"""The ``polca`` console script with the core install alone: ``--version`` imports no module of the pipeline extra,
and every other command names the extra to install instead of ending in a ModuleNotFoundError."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import polca_jax
from polca_jax._command import PIPELINE_MODULES, main, missing_pipeline_modules

pytestmark = pytest.mark.core  # needs only the core install: pytest -m core


def test_the_console_script_is_the_core_entry_point():
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["polca"] == "polca_jax._command:main"
    extra = " ".join(pyproject["project"]["optional-dependencies"]["pipeline"])
    assert all(name in extra for name in PIPELINE_MODULES)


def test_version_imports_nothing_of_the_pipeline_extra():
    script = ("import sys\nfrom polca_jax._command import main\nstatus = main(['--version'])\n"
              "loaded = sorted({name.split('.')[0] for name in sys.modules} & {'flax', 'optax', 'matplotlib'})\n"
              "assert status == 0 and not loaded and 'polca_jax.pipeline' not in sys.modules, loaded\n")
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == f"polca_jax {polca_jax.__version__}\n"


def test_without_the_pipeline_extra_a_command_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name in PIPELINE_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    assert missing_pipeline_modules() == list(PIPELINE_MODULES)
    assert main(["run", "planted", "--out", "runs/never-written"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("polca: error: the polca command needs the pipeline extra, and flax, optax, matplotlib are")
    assert 'pip install "polca_jax[pipeline]"' in error
    assert not Path("runs/never-written").exists()
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"polca_jax {polca_jax.__version__}\n"
