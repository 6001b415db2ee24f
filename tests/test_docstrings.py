"""The examples in the public docstrings run and print what they show (doctest), for every exported name of
polca_jax and polca_jax.analysis; the kernels' examples are small enough to check by hand (least squares, whose
Hessian is xᵀx / n). ``pj.hvp``'s example defines that problem; the others use its names, as their text says."""

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
SHARED = ("jax", "jnp", "np", "pj", "params", "batch", "per_sample_loss", "loss")  # defined by pj.hvp's example


@pytest.fixture(scope="module")
def shared_names():
    """The names pj.hvp's example defines, after running it."""
    (setup,) = doctest.DocTestFinder().find(pj.hvp, "polca_jax.hvp")
    doctest.DocTestRunner().run(setup, clear_globs=False, out=lambda _: None)
    return {name: setup.globs[name] for name in SHARED}


def test_the_kernels_show_runnable_examples():
    names = {test.name.rsplit(".", 1)[-1] for test in TESTS}
    assert {"hvp", "hessian_basis", "per_sample_projections", "polca", "gradient_covariance_basis"} <= names, names


@pytest.mark.parametrize("test", TESTS, ids=[test.name for test in TESTS])
def test_a_docstring_example_prints_what_it_shows(test, shared_names):
    test.globs.update({name: value for name, value in shared_names.items() if name not in test.globs})
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    output = []
    runner.run(test, out=output.append)
    assert runner.failures == 0, "".join(output)
