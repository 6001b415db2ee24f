"""Parameter sharding over a ("data", "model") mesh: the rule, partition rules, and every kernel on 8 simulated devices
against one."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

import polca_jax as pj
from polca_jax._sharding import param_spec, replicated_fraction, warn_if_replicated

pytestmark = pytest.mark.core  # needs only the core install: pytest -m core


@pytest.mark.parametrize(
    "shape, shards, expected",
    [
        ((16, 3), 4, PartitionSpec("model")),
        ((3, 16), 4, PartitionSpec(None, "model")),
        ((8, 16), 4, PartitionSpec(None, "model")),  # the largest divisible dimension
        ((16, 16), 4, PartitionSpec("model")),  # the first of equals
        ((12, 6), 4, PartitionSpec("model")),
        ((3, 5), 4, PartitionSpec()),  # none divisible: replicated
        ((), 4, PartitionSpec()),
        ((16, 3), 1, PartitionSpec()),
    ],
)
def test_the_rule_splits_the_largest_dimension_the_model_axis_divides(shape, shards, expected):
    assert param_spec(shape, shards) == expected


def test_replicated_fraction_names_the_leaves_no_dimension_of_which_is_divisible():
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    assert replicated_fraction({"w": np.zeros((4, 4))}, mesh) == (0.0, [])

    class FourWay:  # the fraction depends on the mesh only through the model axis' size
        shape = {"data": 1, "model": 4}

    share, paths = replicated_fraction({"w": np.zeros((8, 4)), "b": np.zeros((3,))}, FourWay)
    assert share == pytest.approx(3 / 35) and paths == ["['b']"]


def test_partition_rules_decide_the_leaves_they_name_and_the_default_rule_the_rest():
    with pj.partition_rules([(r"w2$", None), (r"query/kernel$", 1)]):
        assert param_spec((16, 2), 4, path="w2") == PartitionSpec()  # kept whole although 4 divides 16
        assert param_spec((16, 16), 4, path="attention/query/kernel") == PartitionSpec(None, "model")
        # a search, not a match: the optimiser's moments of a parameter follow its rule
        assert param_spec((16, 16), 4, path="0/mu/attention/query/kernel") == PartitionSpec(None, "model")
        assert param_spec((16, 16), 4, path="attention/key/kernel") == PartitionSpec("model")  # the default rule
        assert param_spec((16, 16), 4) == PartitionSpec("model")  # no path: the default rule
        tree = {"w2": np.zeros((16, 2)), "w1": np.zeros((3, 16))}
        assert replicated_fraction(tree, jax.sharding.AbstractMesh((1, 4), ("data", "model")))[1] == ["['w2']"]
    assert param_spec((16, 2), 4, path="w2") == PartitionSpec("model")  # the rules end with the block


def test_rules_that_name_no_parameter_or_keep_leaves_whole_are_said_in_the_warning():
    four_way = jax.sharding.AbstractMesh((1, 4), ("data", "model"))
    params = {"w1": np.zeros((3, 16)), "w2": np.zeros((16, 2))}
    with pj.partition_rules([("attention/query", 1)]), pytest.warns(UserWarning, match="no partition rule in force "
                                                                       "names any of the parameters"):
        warn_if_replicated(params, four_way, "test")
    with pj.partition_rules([("w2", None)]), pytest.warns(UserWarning, match="or the partition rules keep whole, "
                                                                             r"\['w2'\]"):
        warn_if_replicated(params, four_way, "test")


@pytest.mark.parametrize(
    "rules, message",
    [
        ([("w", 1)], "does not divide dimension 1 of 'w'"),
        ([("w", 2)], "splits dimension 2 of 'w', whose shape"),
        ([("w",)], "a .pattern, dimension or None. pair"),
        ([("w", 1.5)], "a .pattern, dimension or None. pair"),
        ([("(w", 0)], "is not a regular expression"),
    ],
)
def test_a_partition_rule_that_cannot_apply_is_a_clear_error(rules, message):
    with pytest.raises(ValueError, match=message):
        with pj.partition_rules(rules):
            param_spec((16, 3), 4, path="w")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Mesh(np.asarray(jax.devices()[:1]), ("model",)), "has only the axis 'model'"),
        (lambda: "data", "must be a jax.sharding.Mesh"),
    ],
)
def test_a_mesh_without_the_expected_axes_is_refused_by_every_kernel(mlp, make, message):
    basis = pj.random_basis(mlp.params, 2, jax.random.key(0))
    calls = [
        lambda mesh: pj.per_sample_projections(mlp.token_losses, mlp.params, mlp.batch, basis, mesh=mesh),
        lambda mesh: pj.hessian_basis(mlp.mean_loss, [mlp.params], mlp.batch, key=jax.random.key(0), mesh=mesh,
                                      progress=False),
        lambda mesh: pj.polca(mlp.token_losses, [mlp.params, mlp.params], mlp.batch, basis, second_order="none",
                              mesh=mesh, progress=False),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call(make())


def test_device_mesh_checks_the_device_count():
    with pytest.raises(ValueError, match="does not divide"):
        pj.device_mesh(model=len(jax.devices()) + 1)
    with pytest.raises(ValueError, match="needs"):
        pj.device_mesh(model=1, data=len(jax.devices()) + 1)


EIGHT_DEVICES_SCRIPT = """
import functools
import warnings
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
assert jax.device_count() == 8, jax.devices()
import polca_jax as pj

from wide_mlp import mean_loss, problem, token_losses

checkpoints, batch, hessian_batch, mask = problem()
params = checkpoints[0]

def run(mesh):
    basis = pj.hessian_basis(mean_loss, checkpoints[:3], hessian_batch, k_per_checkpoint=2, num_iters=12,
                             key=jax.random.key(1), mesh=mesh, progress=False)
    out = {"basis": np.asarray(basis.vectors), "eigenvalues": basis.eigenvalues, "basis_bytes": basis.device_bytes}
    if mesh is not None:
        out["basis_bytes"] = pj.per_device_bytes(basis.as_tree(params))
        out["params_bytes"] = pj.per_device_bytes(pj.shard_params(params, mesh))
    for second_order in ("exact", "paper"):
        result = pj.polca(token_losses, checkpoints, batch, basis, second_order=second_order, mask=mask,
                          chunk_size=2, mesh=mesh, progress=False)
        out[second_order] = result.projected_loss
        out["loss"] = result.loss
    for method in ("reverse", "forward"):
        out[method] = pj.per_sample_projections(token_losses, checkpoints[2], batch, basis, method=method,
                                                chunk_size=2, mesh=mesh)
    out["curvature"] = pj.per_sample_curvature(token_losses, checkpoints[2], batch, basis, chunk_size=3, mesh=mesh)
    options = dict(num_iters=12, key=jax.random.key(2), mesh=mesh, progress=False)
    scale = functools.partial(pj.rms_gradient_scale, token_losses, batch=hessian_batch)
    out["preconditioned"] = np.asarray(pj.hessian_basis(mean_loss, checkpoints[:2], hessian_batch, scale=scale,
                                                        **options).vectors)
    out["covariance"] = np.asarray(pj.gradient_covariance_basis(token_losses, checkpoints[:2], hessian_batch,
                                                                **options).vectors)
    return out

one = run(None)
for data_shards, model_shards in ((1, 8), (2, 4)):
    mesh = pj.device_mesh(model=model_shards)
    assert dict(mesh.shape) == {"data": data_shards, "model": model_shards}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every leaf but b2 (2 of 99 parameters) is split: no warning
        many = run(mesh)
    for name in ("basis", "exact", "paper", "reverse", "forward", "curvature", "loss", "preconditioned", "covariance"):
        np.testing.assert_allclose(many[name], one[name], rtol=1e-9, atol=1e-11, err_msg=name)
    np.testing.assert_allclose(many["eigenvalues"], one["eigenvalues"], rtol=1e-9)
    split, whole = 96 * 6 * 8, 2 * 6 * 8  # [K=6, ...] rows in float64: w1, b1, w2 split, b2 whole
    assert many["basis_bytes"] == split // model_shards + whole, (many["basis_bytes"], model_shards)
    assert many["params_bytes"] == 96 * 8 // model_shards + 2 * 8, many["params_bytes"]
    print("MESH-OK", data_shards, model_shards, many["basis_bytes"], one["basis_bytes"])

# A mesh of one's own with two data axes (a "replica" axis, as across slices or hosts): samples split over both.
from jax.sharding import Mesh
mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), ("replica", "data", "model"))
assert pj.num_data_shards(mesh) == 4
assert pj.shard_batch(hessian_batch, mesh)["x"].sharding.shard_shape((12, 3)) == (3, 3)
many = run(mesh)
for name in ("basis", "exact", "paper", "reverse", "forward", "curvature", "loss", "preconditioned", "covariance"):
    np.testing.assert_allclose(many[name], one[name], rtol=1e-9, atol=1e-11, err_msg=name)
print("MESH-OK replica 2 data 2 model 2")

# Partition rules of one's own on a 2 x 4 mesh: b1 and w2 kept whole (the default rule splits them), w1 split.
mesh = pj.device_mesh(model=4)
with pj.partition_rules([("b1", None), ("w2", None)]), warnings.catch_warnings():
    warnings.simplefilter("ignore")  # half of the parameters whole: shard_params warns, as it should
    many = run(mesh)
for name in ("basis", "exact", "paper", "reverse", "forward", "curvature", "loss", "preconditioned", "covariance"):
    np.testing.assert_allclose(many[name], one[name], rtol=1e-9, atol=1e-11, err_msg=name)
assert many["params_bytes"] == (48 // 4 + 16 + 32 + 2) * 8, many["params_bytes"]
assert many["basis_bytes"] == (48 // 4 + 16 + 32 + 2) * 6 * 8, many["basis_bytes"]
print("MESH-OK rules")

# Lanczos contracts each leaf shard by shard: on a 1 x 8 mesh nothing is gathered but the flat start vector
# ([1, P], only when Lanczos starts or restarts), never a leaf of the Krylov or deflated rows.
import re
from polca_jax import tree
from polca_jax._hvp import HessianMatvec
from polca_jax._lanczos import _lanczos
from polca_jax._sharding import shard_rows
mesh = pj.device_mesh(model=8)
rows = shard_rows(jax.tree_util.tree_map(lambda leaf: jnp.zeros((2, *leaf.shape), leaf.dtype), params), mesh)
compiled = _lanczos.lower(HessianMatvec(mean_loss), tree.structure_signature(params), 2, 12, mesh, jax.random.key(0),
                          rows, (pj.shard_params(params, mesh), hessian_batch)).compile().as_text()
gathered = re.findall(r"= (\\S+) all-gather\\(", compiled)
assert all(shape.startswith("f64[1,") for shape in gathered), gathered
print("LANCZOS-GATHERS-OK", len(gathered))

narrow = {"w": jnp.ones((3, 5))}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    placed = pj.shard_params(narrow, pj.device_mesh(model=8))
assert any("divides no dimension of ['w']" in str(w.message) for w in caught), [str(w.message) for w in caught]
assert placed["w"].sharding.is_fully_replicated
print("WARN-OK")
"""


@pytest.mark.slow
def test_every_kernel_gives_the_one_device_result_on_a_model_sharded_and_a_data_by_model_mesh():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(EIGHT_DEVICES_SCRIPT)], cwd=Path(__file__).parent, env=env,
        capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "MESH-OK 1 8" in completed.stdout and "MESH-OK 2 4" in completed.stdout
    assert "MESH-OK replica 2 data 2 model 2" in completed.stdout
    assert "MESH-OK rules" in completed.stdout
    assert "WARN-OK" in completed.stdout
    assert "LANCZOS-GATHERS-OK" in completed.stdout

