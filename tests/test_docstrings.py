"""The examples in the public docstrings run and print what they show (doctest), for every exported name of
polca_jax and polca_jax.analysis; the kernels' examples are small enough to check by hand (least squares, whose
Hessian is xᵀx / n)."""

import doctest

import pytest

import polca_jax as pj
from polca_jax import analysis

pytestmark = pytest.mark.core  # needs only the core install: pytest -m core


def public_doctests():
    finder, seen, found = doctest.DocTestFinder(), set(), []
    for module in (pj, analysis):
        for name in module.__all__:
            for test in finder.find(getattr(module, name), f"{module.__name__}.{name}"):
                if test.examples and test.name not in seen:
                    seen.add(test.name)
                    found.append(test)
    return found


TESTS = public_doctests()


def test_the_kernels_show_runnable_examples():
    names = {test.name.rsplit(".", 1)[-1] for test in TESTS}
    assert {"hvp", "hessian_basis", "per_sample_projections", "polca", "gradient_covariance_basis"} <= names, names


@pytest.mark.parametrize("test", TESTS, ids=[test.name for test in TESTS])
def test_a_docstring_example_prints_what_it_shows(test):
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    output = []
    runner.run(test, out=output.append)
    assert runner.failures == 0, "".join(output)
