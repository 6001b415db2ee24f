"""The tests that run in a pytest process of their own, each group with the variable that lets conftest.py collect
it there (and nowhere else). The same marker selection as this run's (``-m "not slow"``) is passed on.

- ``tests/torch/`` and ``polca_jax.hf``'s docstring examples (``POLCA_TORCH_TESTS``): the Hugging Face ports checked
  against transformers and runs on checkpoints trained in PyTorch. With PyTorch and XLA in one process, XLA crashed
  (SIGSEGV) while loading an executable from JAX's persistent compilation cache, in two runs of the whole suite, in
  tests that do not use PyTorch themselves. Those tests and ``polca run`` keep the cache; the PyTorch tests run apart,
  with the cache off (every ``polca`` call there passes ``--no-compile-cache``).
- ``tests/object_store/`` (``POLCA_OBJECT_STORE_TESTS``): checkpoints on a Google Cloud Storage server on localhost.
  They set the variables that point gcsfs and tensorstore at that server and leave gcsfs' event-loop thread and
  orbax's background writers behind, none of which the other tests should share.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SEPARATE = {  # group -> (the variable that lets conftest.py collect it, pytest's arguments)
    "pytorch": ("POLCA_TORCH_TESTS", ["tests/torch", "tests/test_docstrings.py", "-k", "hf"]),
    "object store": ("POLCA_OBJECT_STORE_TESTS", ["tests/object_store"]),
}


@pytest.mark.parametrize("group", SEPARATE)
def test_a_group_of_tests_passes_in_a_process_of_its_own(group, request):
    variable, arguments = SEPARATE[group]
    marks = request.config.option.markexpr
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *arguments,
               *(["-m", marks] if marks else [])]
    completed = subprocess.run(command, cwd=ROOT, env=dict(os.environ, **{variable: "1"}), capture_output=True,
                               text=True, timeout=3000)
    print(completed.stdout[-3000:])
    assert completed.returncode == 0, completed.stdout[-6000:] + completed.stderr[-3000:]
    assert " passed" in completed.stdout.splitlines()[-1]
