"""The paper's experiments as tasks (experiments/arithmetic, experiments/english): found from a clone, and their
tiny and cpu presets build exactly the data, labels, sample texts, initial parameters and initial losses they built
when they lived inside the package (values recorded then, with the same digest as below)."""

import hashlib
import os

import jax
import numpy as np
import pytest

from polca_jax.errors import PolcaError
from polca_jax.pipeline import BUILTIN_TASKS, import_experiment, load_task_definition

PINNED = {
    "arithmetic/tiny": {
        "eval": "59a1ac2c9795e4db",
        "hessian": "8e28a193830791a9",
        "train": "72b1f8fac32af72b",
        "labels": {
            "carry": "e6e0cd8007b8d148",
            "digit": "4b2528a5ed5086b1",
            "place": "4a0633f343b13358",
            "skill": "991b92edd2a65a76"
        },
        "texts": "7888c35fb2003178",
        "params": "8ba02951c1cf5078",
        "loss_mean": 2.7007356606423856,
        "loss_first": [
            1.7979243993759155,
            3.0377113819122314,
            3.1074979305267334
        ]
    },
    "arithmetic/cpu": {
        "eval": "1d57463e224428de",
        "hessian": "4fcf74504eb5b257",
        "train": "2e46f84bf04dceda",
        "labels": {
            "carry": "7c4c19b865672734",
            "digit": "d2da578d00d8c9bc",
            "place": "5542c58767c38938",
            "skill": "4ade6cb0cca11312"
        },
        "texts": "8d10a66b87304505",
        "params": "6057b9260683f18b",
        "loss_mean": 2.4089922310908634,
        "loss_first": [
            2.674436569213867,
            1.6294238567352295,
            2.4602746963500977
        ]
    },
    "english/tiny": {
        "eval": "75924dccdd0ab536",
        "hessian": "eceb0f99029618ec",
        "train": "26fc8541075fe3b1",
        "labels": {
            "kind": "5e5edccdf38424bd",
            "token": "d3d4f169fcc96cc1"
        },
        "texts": "ffbeefc196edac75",
        "params": "952184d43ac13f5c",
        "loss_mean": 6.647121757268906,
        "loss_first": [
            6.236791610717773,
            5.140748500823975,
            7.617312431335449
        ]
    },
    "english/cpu": {
        "eval": "17613688b5ffe62f",
        "hessian": "2492cac24907d8ad",
        "train": "ad279d9539ddf99f",
        "labels": {
            "kind": "9cc5bfa1de485e4e",
            "token": "e1d5b8a2bd3f594d"
        },
        "texts": "6a06419945b24951",
        "params": "f1229fceb6e42010",
        "loss_mean": 7.264694998972118,
        "loss_first": [
            7.93922233581543,
            7.308108806610107,
            6.662921905517578
        ]
    }
}


def digest(*arrays) -> str:
    """sha256 of the arrays' dtypes, shapes and bytes, first 16 hex digits."""
    hasher = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(np.asarray(array))
        hasher.update(str(array.dtype).encode())
        hasher.update(str(array.shape).encode())
        hasher.update(array.tobytes())
    return hasher.hexdigest()[:16]


def fingerprint(name: str, preset: str, workdir) -> dict:
    definition = load_task_definition(name)
    options = {key: value for key, value in definition.presets[preset].items() if key in definition.options()}
    task = definition.build(options, seed=0, workdir=workdir)
    loss = np.asarray(task.per_sample_loss(task.init_params, task.eval_batch), np.float64)
    return {
        "eval": digest(*jax.tree.leaves(task.eval_batch)),
        "hessian": digest(*jax.tree.leaves(task.hessian_batch)),
        "train": digest(*(leaf for step in (0, 1, 7) for leaf in jax.tree.leaves(task.train_batches(step)))),
        "labels": {key: digest(value.values.astype(str)) for key, value in sorted(task.labels.items())},
        "texts": hashlib.sha256("\n".join(task.sample_texts).encode()).hexdigest()[:16],
        "params": digest(*jax.tree.leaves(task.init_params)),
        "loss_mean": float(loss.mean()),
        "loss_first": [float(value) for value in loss.reshape(-1)[:3]],
    }


@pytest.mark.parametrize("key", [
    "arithmetic/tiny", "english/tiny",
    pytest.param("arithmetic/cpu", marks=pytest.mark.slow), pytest.param("english/cpu", marks=pytest.mark.slow)])
def test_the_paper_tasks_build_what_they_built_inside_the_package(key, tmp_path):
    name, preset = key.split("/")
    found, pinned = fingerprint(name, preset, tmp_path), PINNED[key]
    assert {k: v for k, v in found.items() if not k.startswith("loss")} == {
        k: v for k, v in pinned.items() if not k.startswith("loss")}
    np.testing.assert_allclose(found["loss_first"], pinned["loss_first"], rtol=1e-5)
    np.testing.assert_allclose(found["loss_mean"], pinned["loss_mean"], rtol=1e-5)


def test_the_built_in_paper_tasks_are_the_experiments_of_the_clone():
    assert BUILTIN_TASKS["arithmetic"] == "experiments.arithmetic:make_task"
    definition = load_task_definition("arithmetic")
    assert definition.factory.__module__ == "experiments.arithmetic"
    assert import_experiment("english").__file__.endswith(os.path.join("experiments", "english", "__init__.py"))


def test_the_experiments_are_found_from_another_directory_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the clone: found in the clone polca_jax is installed from
    assert import_experiment("arithmetic").PRESETS["tiny"]["num_steps"] == 60


def test_an_experiment_the_clone_does_not_have_is_a_clear_error():
    with pytest.raises(PolcaError, match=r"experiments/no-such/ of a clone of the polca_jax repository"):
        import_experiment("no-such")
