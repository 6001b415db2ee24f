"""Tensor parallelism of the pipeline's transformer (``TENSOR_PARALLEL_RULES``) on 4 simulated devices: the kernels'
results equal one device's, the rules place every attention and MLP weight as they say, and ``polca plan`` stays
within 2× of what XLA allocates for every stage."""

import os
import subprocess
import sys

import pytest

FOUR_DEVICES_SCRIPT = """
import tempfile
from pathlib import Path

import jax
import numpy as np

import polca_jax as pj
from polca_jax.pipeline import build_task, device_named, measured_memory, open_run, plan_run
from polca_jax.pipeline.models import TENSOR_PARALLEL_RULES

run, definition = open_run("arithmetic", Path(tempfile.mkdtemp()) / "run", preset="tiny")
task = build_task(run, definition)
params = task.init_params
basis = pj.random_basis(params, 3, jax.random.key(0))
project = lambda mesh: pj.per_sample_projections(task.per_sample_loss, params, task.eval_batch, basis,
                                                  method="reverse", mask=task.eval_mask, mesh=mesh)
one = project(None)
mesh = pj.device_mesh(model=4)
with pj.partition_rules(TENSOR_PARALLEL_RULES):
    placed = pj.shard_params(params, mesh)
    many = project(mesh)
    eigen = pj.hessian_basis(task.loss, [params], task.hessian_batch, k_per_checkpoint=2, num_iters=8,
                             key=jax.random.key(1), mesh=mesh, progress=False).eigenvalues
np.testing.assert_allclose(many, one, rtol=1e-4, atol=1e-6)
alone = pj.hessian_basis(task.loss, [params], task.hessian_batch, k_per_checkpoint=2, num_iters=8,
                         key=jax.random.key(1), progress=False).eigenvalues
np.testing.assert_allclose(eigen, alone, rtol=1e-3)
block = next(iter(placed["blocks"].values()))
attention, mlp = block["attention"], block["mlp"]
specs = {name: tuple(leaf.sharding.spec) for name, leaf in
         (("query", attention["query"]["kernel"]), ("output", attention["output"]["kernel"]),
          ("hidden", mlp["hidden"]["kernel"]), ("mlp_output", mlp["output"]["kernel"]),
          ("output_bias", mlp["output"]["bias"]))}
assert specs == {"query": (None, "model"), "output": ("model",), "hidden": (None, "model"),
                 "mlp_output": ("model",), "output_bias": ()}, specs
print("TP-RESULTS-OK")

# The pipeline's mesh stages under the rules (training with the weights and Adam's moments split by them included)
# against one device: the same decomposition.
from polca_jax.pipeline import run as run_pipeline
settings = {"baselines": False, "ablations": False}
stages = ["train", "basis", "decompose", "causal"]
outs = {}
for label, rules, mesh in (("one", None, None), ("tensor", TENSOR_PARALLEL_RULES, pj.device_mesh(model=4))):
    outs[label] = Path(tempfile.mkdtemp()) / "run"
    with pj.partition_rules(rules):
        run_pipeline("arithmetic", outs[label], preset="tiny", settings=settings, stages=stages, progress=False,
                     log=lambda line: None, mesh=mesh)
alone, split = (np.load(outs[label] / "polca" / "hessian" / "projections.npy") for label in ("one", "tensor"))
np.testing.assert_allclose(split, alone, rtol=1e-4, atol=1e-5 * np.abs(alone).max())
print("TP-PIPELINE-OK")
for label, rules in (("default", None), ("tensor", TENSOR_PARALLEL_RULES)):
    with pj.partition_rules(rules):
        measured = measured_memory(run.config, task, mesh=(1, 4))
        planned = plan_run(run.config, task, mesh=(1, 4), device=device_named("h100")).memory
    for stage, size in measured.items():
        print("STAGE", label, stage, size, sum(planned[stage].values()))
"""


@pytest.mark.slow
def test_tensor_parallel_rules_give_one_devices_results_split_the_activations_and_are_planned_from_above():
    """On a 1 x 4 mesh: the rules' results equal one device's (the kernels, and the pipeline's train, basis,
    decompose and causal stages); the decompose and causal stages' bytes per device fall
    below the default rule's (XLA splits the attention and MLP activations by heads and hidden units); ``polca plan``
    never under-counts a stage and is within 2× for the basis and decompose stages (it keeps the activations of
    training and of the causal loss pass whole, so those it over-counts: up to 2.3× here)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    completed = subprocess.run([sys.executable, "-c", FOUR_DEVICES_SCRIPT], env=env, capture_output=True, text=True,
                               timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "TP-RESULTS-OK" in completed.stdout and "TP-PIPELINE-OK" in completed.stdout
    rows = [line.split()[1:] for line in completed.stdout.splitlines() if line.startswith("STAGE")]
    measured = {(label, stage): (int(size), int(planned)) for label, stage, size, planned in rows}
    assert {stage for _, stage in measured} == {"train", "basis", "decompose", "causal"} and len(measured) == 8
    for (label, stage), (size, planned) in measured.items():
        assert planned >= 0.99 * size, (label, stage, size, planned)
        if stage in ("basis", "decompose"):
            assert planned <= 2.0 * size, (label, stage, size, planned)
    for stage in ("decompose", "causal"):
        assert measured["tensor", stage][0] < 0.8 * measured["default", stage][0], stage
