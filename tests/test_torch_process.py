"""The tests that load PyTorch (``tests/torch/``: the Hugging Face ports checked against transformers, runs on
checkpoints trained in PyTorch, and ``polca_jax.hf``'s docstring examples), in a pytest process of their own.

With PyTorch and XLA in one process, XLA crashed (SIGSEGV) while loading an executable from JAX's persistent
compilation cache, in two runs of the whole suite, in tests that do not use PyTorch themselves. Those tests and
``polca run`` keep the cache; the PyTorch tests run apart, with the cache off (every ``polca`` call there passes
``--no-compile-cache``). The same marker selection as this run's (``-m "not slow"``) is passed on."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_the_pytorch_tests_pass_in_a_process_of_their_own(request):
    marks = request.config.option.markexpr
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/torch",
               "tests/test_docstrings.py", "-k", "hf", *(["-m", marks] if marks else [])]
    completed = subprocess.run(command, cwd=ROOT, env=dict(os.environ, POLCA_TORCH_TESTS="1"), capture_output=True,
                               text=True, timeout=3000)
    print(completed.stdout[-3000:])
    assert completed.returncode == 0, completed.stdout[-6000:] + completed.stderr[-3000:]
    assert " passed" in completed.stdout.splitlines()[-1]
