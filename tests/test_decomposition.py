"""POLCA against Taylor expansions, on orbax checkpoints on disk, streamed to files and resumed, across devices, and
with bad input."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import sgd_checkpoints

import polca_jax as pj
from polca_jax import tree
from polca_jax.errors import PolcaError

pytestmark = pytest.mark.core  # needs only the core install: pytest -m core


def complete_basis(params, seed=0):
    """A random orthonormal basis of the whole parameter space (K = P)."""
    dim = tree.num_params(params)
    return pj.basis_from_matrix(np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))[0].T)


def moved(params, direction, scale):
    return tree.unravel(tree.ravel(params) + scale * direction, params)


def test_complete_basis_first_order_sums_to_the_directional_derivative(mlp):
    checkpoints = sgd_checkpoints(mlp, 3)
    result = pj.polca(mlp.token_losses, checkpoints, mlp.batch, complete_basis(mlp.params), second_order="none",
                      progress=False)
    per_sample_grads = jax.jacrev(lambda v: mlp.token_losses(tree.unravel(v, mlp.params), mlp.batch).reshape(-1))
    for t in range(2):
        delta = tree.ravel(checkpoints[t + 1]) - tree.ravel(checkpoints[t])
        expected = np.asarray(per_sample_grads(tree.ravel(checkpoints[t]))) @ np.asarray(delta)
        np.testing.assert_allclose(result.first_order[t].sum(-1), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(result.outside_fraction, 0, atol=1e-12)


@pytest.mark.parametrize("second_order, order", [("none", 2), ("exact", 3), ("trapezoid", 3)])
def test_prediction_error_falls_with_the_order_of_the_expansion(mlp, second_order, order):
    """A step along one basis direction: "exact" (and the trapezoid rule) leave an O(|Δθ|³) error, first order O(|Δθ|²)."""
    basis = complete_basis(mlp.params, seed=1)
    direction = np.asarray(basis.vectors[0])
    errors = []
    for scale in (0.2, 0.1, 0.05):
        result = pj.polca(mlp.token_losses, [mlp.params, moved(mlp.params, direction, scale)], mlp.batch, basis,
                          second_order=second_order, progress=False)
        errors.append(np.abs(result.decomposed_change - result.loss_change).max())
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    np.testing.assert_allclose(np.log2(ratios), order, atol=0.35)


def test_paper_second_order_terms_add_up_to_the_aggregate_curvature_term(mlp):
    checkpoints = sgd_checkpoints(mlp, 3)
    basis = pj.hessian_basis(mlp.mean_loss, checkpoints[:1], mlp.batch, k_per_checkpoint=3, num_iters=12,
                             key=jax.random.key(0), progress=False)
    result = pj.polca(mlp.token_losses, checkpoints, mlp.batch, basis, second_order="paper", progress=False)
    num_samples = result.loss.shape[1]
    expected = num_samples * 0.5 * basis.eigenvalues * result.step_projection**2  # Σ_x h̃(x) = N · ½ λ s²
    np.testing.assert_allclose(result.second_order.sum(axis=1), expected, rtol=1e-9)
    assert result.config["eigenvalues"] == "stored"


def test_result_arrays_are_consistent(mlp):
    checkpoints = sgd_checkpoints(mlp, 4)
    basis = pj.random_basis(mlp.params, 3, jax.random.key(1))
    result = pj.polca(mlp.token_losses, checkpoints, mlp.batch, basis, second_order="trapezoid", steps=[0, 5, 10, 15],
                      progress=False)
    assert result.projected_loss.shape == (4, 22, 3)
    np.testing.assert_array_equal(result.projected_loss[0], 0)
    np.testing.assert_allclose(result.projected_loss[-1], result.terms.sum(0))
    np.testing.assert_allclose(result.loss[2], mlp.token_losses(checkpoints[2], mlp.batch).reshape(-1))
    np.testing.assert_allclose(
        result.step_projection[1], basis.vectors @ (tree.ravel(checkpoints[2]) - tree.ravel(checkpoints[1]))
    )
    np.testing.assert_array_equal(result.steps, [0, 5, 10, 15])


def test_projected_loss_under_another_rule_matches_a_fresh_decomposition(mlp):
    checkpoints = sgd_checkpoints(mlp, 3)
    basis = pj.hessian_basis(mlp.mean_loss, checkpoints[:1], mlp.batch, k_per_checkpoint=2, num_iters=12,
                             key=jax.random.key(0), progress=False)
    results = {rule: pj.polca(mlp.token_losses, checkpoints, mlp.batch, basis, second_order=rule, progress=False)
               for rule in ("none", "trapezoid", "paper")}
    for stored in results.values():
        for rule, fresh in results.items():
            np.testing.assert_allclose(stored.projected_loss_with(rule, basis.eigenvalues), fresh.projected_loss,
                                       rtol=1e-10, atol=1e-14)
    with pytest.raises(PolcaError, match="needs eigenvalues"):
        results["none"].projected_loss_with("paper")
    with pytest.raises(PolcaError, match="stored arrays"):
        results["none"].projected_loss_with("exact")


def test_result_save_load_round_trip(tmp_path, mlp):
    basis = pj.random_basis(mlp.params, 2, jax.random.key(2))
    result = pj.polca(mlp.token_losses, sgd_checkpoints(mlp, 3), mlp.batch, basis, second_order="exact",
                      progress=False)
    result.save(tmp_path / "polca")
    loaded = pj.POLCAResult.load(tmp_path / "polca")
    for name in ("steps", "loss", "projections", "step_projection", "second_order", "outside_fraction",
                 "projected_loss"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(result, name))
    assert loaded.config == result.config
    np.save(tmp_path / "polca" / "loss.npy", np.zeros(3))
    with pytest.raises(PolcaError, match="corrupt"):
        pj.POLCAResult.load(tmp_path / "polca")
    (tmp_path / "polca" / "manifest.json").unlink()
    with pytest.raises(PolcaError, match="cannot read"):
        pj.POLCAResult.load(tmp_path / "polca")


# --- orbax checkpoints on disk --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, mlp):
    directory = tmp_path_factory.mktemp("orbax") / "checkpoints"
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=None)) as manager:
        for step, params in zip((0, 10, 20), sgd_checkpoints(mlp, 3)):
            manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
        manager.wait_until_finished()
    return directory


def test_polca_reads_orbax_checkpoints(checkpoint_dir, mlp):
    basis = pj.random_basis(mlp.params, 3, jax.random.key(3))
    from_disk = pj.polca(mlp.token_losses, checkpoint_dir, mlp.batch, basis, second_order="none", progress=False)
    in_memory = pj.polca(mlp.token_losses, sgd_checkpoints(mlp, 3), mlp.batch, basis, second_order="none",
                         progress=False)
    np.testing.assert_array_equal(from_disk.steps, [0, 10, 20])
    np.testing.assert_allclose(from_disk.projected_loss, in_memory.projected_loss, rtol=1e-12)
    subset = pj.polca(mlp.token_losses, checkpoint_dir, mlp.batch, basis, steps=[0, 20], progress=False,
                      second_order="none")
    np.testing.assert_array_equal(subset.steps, [0, 20])


def test_missing_and_corrupt_checkpoints_are_reported(checkpoint_dir, tmp_path, mlp):
    with pytest.raises(PolcaError, match="does not exist"):
        pj.OrbaxCheckpoints(tmp_path / "nowhere")
    with pytest.raises(PolcaError, match=r"steps \[5\] have no checkpoint"):
        pj.OrbaxCheckpoints(checkpoint_dir, steps=[0, 5])
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(checkpoint_dir), str(broken)], check=True)
    for data in (broken / "10" / "params").rglob("d/*"):
        data.write_bytes(b"garbage")
    with pj.OrbaxCheckpoints(broken) as store:
        store[0]  # intact
        with pytest.raises(PolcaError, match="step 10 .* cannot be read"):
            store[1]


# --- streamed to files, resumed -------------------------------------------------------------------------------------


class Checkpoints:
    """A list of checkpoints that records which it is asked for and raises ``RuntimeError`` when item ``fail_at``
    is read (an interrupted run), or sends this process SIGTERM when item ``signal_at`` is (a preempted one)."""

    def __init__(self, items, fail_at=None, signal_at=None):
        self.items, self.fail_at, self.signal_at, self.reads = items, fail_at, signal_at, []

    def __len__(self):
        return len(self.items)

    def __getitem__(self, t):
        self.reads.append(t)
        if t == self.fail_at:
            raise RuntimeError(f"interrupted at checkpoint {t}")
        if t == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.items[t]


def with_eigenvalues(basis, eigenvalues):
    return pj.Basis(basis.vectors, np.asarray(eigenvalues, float), basis.steps, basis.method, basis.residuals)


def assert_same_result(result, expected):
    for name in ("steps", "loss", "projections", "step_projection", "second_order", "outside_fraction"):
        np.testing.assert_array_equal(getattr(result, name), getattr(expected, name), err_msg=name)
        assert getattr(result, name).dtype == getattr(expected, name).dtype, name
    assert result.config == expected.config


def files_of(directory):
    """Every file's bytes and modification time: what "nothing was changed" compares."""
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(directory.iterdir())}


@pytest.mark.parametrize("second_order, eigenvalues", [
    ("none", "stored"), ("trapezoid", "stored"), ("exact", "stored"), ("paper", "stored"), ("paper", "current")])
def test_a_streamed_result_equals_the_in_memory_one(tmp_path, mlp, second_order, eigenvalues):
    checkpoints = sgd_checkpoints(mlp, 4)
    basis = with_eigenvalues(pj.random_basis(mlp.params, 3, jax.random.key(5)), [2.0, 0.5, -0.3])
    options = dict(second_order=second_order, eigenvalues=eigenvalues, steps=[0, 3, 6, 9], progress=False)
    in_memory = pj.polca(mlp.token_losses, checkpoints, mlp.batch, basis, **options)
    streamed = pj.polca(mlp.token_losses, checkpoints, mlp.batch, basis, out=tmp_path / "polca", **options)
    assert_same_result(streamed, in_memory)
    assert isinstance(streamed.projections, np.memmap)
    assert sorted(path.name for path in (tmp_path / "polca").iterdir()) == [
        "loss.npy", "manifest.json", "outside_fraction.npy", "projections.npy", "second_order.npy",
        "step_projection.npy", "steps.npy"]  # no progress record or curvature left
    # a complete result of the same computation is loaded, not recomputed (the last checkpoint is read for the basis'
    # fingerprint), and a per-interval second order is what the whole arrays give
    counting = Checkpoints(checkpoints)
    again = pj.polca(mlp.token_losses, counting, mlp.batch, basis, out=tmp_path / "polca", **options)
    assert_same_result(again, in_memory)
    assert counting.reads == [3]
    if second_order != "exact" and eigenvalues == "stored":
        np.testing.assert_array_equal(in_memory.projected_loss_with(second_order, basis.eigenvalues),
                                      in_memory.projected_loss)


KILLED_SCRIPT = """
import os, signal, sys
import numpy as np
import jax.numpy as jnp
from conftest import mlp_token_losses  # float64
import polca_jax as pj

class KilledAt:
    def __init__(self, items, kill_at):
        self.items, self.kill_at = items, kill_at
    def __len__(self):
        return len(self.items)
    def __getitem__(self, t):
        if t == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.items[t]

directory = sys.argv[1]
with np.load(f"{directory}/inputs.npz") as inputs:
    arrays = {key: inputs[key] for key in inputs.files}
checkpoints = [{name: jnp.asarray(arrays[f"{t}/{name}"]) for name in ("w1", "b1", "w2")} for t in range(6)]
batch = {"x": arrays["x"], "y": arrays["y"]}
basis = pj.Basis.load(f"{directory}/basis")
pj.polca(mlp_token_losses, KilledAt(checkpoints, 3), batch, basis, second_order="paper", eigenvalues="current",
         mask=arrays["mask"], progress=False, out=f"{directory}/polca")
print("NOT KILLED")
"""


def test_a_killed_decomposition_resumes_at_its_first_unfinished_checkpoint_with_the_same_result(tmp_path, mlp):
    checkpoints = sgd_checkpoints(mlp, 6)
    basis = pj.random_basis(mlp.params, 3, jax.random.key(6))
    mask = np.ones((11, 2), bool)
    mask[4, 1] = False
    arrays = {f"{t}/{name}": np.asarray(leaf) for t, params in enumerate(checkpoints) for name, leaf in params.items()}
    np.savez(tmp_path / "inputs.npz", x=mlp.batch["x"], y=mlp.batch["y"], mask=mask, **arrays)
    basis.save(tmp_path / "basis")
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_SCRIPT), str(tmp_path)],
                            cwd=Path(__file__).parent, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    out = tmp_path / "polca"
    assert not (out / "manifest.json").exists()
    # checkpoint 3 is read ahead while checkpoint 2 is decomposed: 2 (or, had 2 finished first, 3) are complete
    complete = json.loads((out / "progress.json").read_text())["complete"]
    assert complete in (2, 3)

    options = dict(second_order="paper", eigenvalues="current", mask=mask, progress=False)
    counting = Checkpoints(checkpoints)
    resumed = pj.polca(mlp.token_losses, counting, mlp.batch, pj.Basis.load(tmp_path / "basis"), out=out, **options)
    assert counting.reads == list(range(complete - 1, 6))  # the last finished checkpoint, then the unfinished ones
    assert_same_result(resumed, pj.polca(mlp.token_losses, checkpoints, mlp.batch, basis, **options))


def test_a_sigterm_stops_a_streamed_decomposition_after_the_checkpoint_in_progress_and_it_resumes(tmp_path, mlp):
    """SIGTERM while checkpoint 2 is read ahead (checkpoint 1 being decomposed): the rows of checkpoint 1 are
    written, then polca raises Interrupted; the same call resumes to the result of an uninterrupted one. Outside the
    loop SIGTERM is left as it was."""
    checkpoints = sgd_checkpoints(mlp, 5)
    basis = pj.random_basis(mlp.params, 3, jax.random.key(8))
    options = dict(second_order="exact", progress=False)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(pj.Interrupted, match=r"stopped by SIGTERM after 2 of 5 POLCA checkpoints .*is kept; the "
                                             r"same call resumes"):
        pj.polca(mlp.token_losses, Checkpoints(checkpoints, signal_at=2), mlp.batch, basis, out=tmp_path / "polca",
                 **options)
    assert signal.getsignal(signal.SIGTERM) is before
    assert json.loads((tmp_path / "polca" / "progress.json").read_text())["complete"] == 2
    counting = Checkpoints(checkpoints)
    resumed = pj.polca(mlp.token_losses, counting, mlp.batch, basis, out=tmp_path / "polca", **options)
    assert counting.reads == [1, 2, 3, 4]
    assert_same_result(resumed, pj.polca(mlp.token_losses, checkpoints, mlp.batch, basis, **options))


def interrupted(directory, mlp, checkpoints, basis, fail_at=3, **options):
    """``directory`` holding the partial result of a run interrupted when checkpoint ``fail_at`` is read."""
    with pytest.raises(RuntimeError, match="interrupted"):
        pj.polca(mlp.token_losses, Checkpoints(checkpoints, fail_at), mlp.batch, basis, progress=False,
                 out=directory, **options)
    assert json.loads((directory / "progress.json").read_text())["complete"] == fail_at
    return directory


def test_a_partial_result_of_another_computation_is_refused_and_left_unchanged(tmp_path, mlp):
    checkpoints = sgd_checkpoints(mlp, 5)
    basis = pj.random_basis(mlp.params, 3, jax.random.key(7))
    out = interrupted(tmp_path / "polca", mlp, checkpoints, basis, second_order="exact")
    before = files_of(out)
    other_basis = pj.random_basis(mlp.params, 3, jax.random.key(8))
    refusals = [
        (dict(basis=other_basis), r"partial POLCA result of another computation: the basis differs \(its vectors\)"),
        (dict(steps=[0, 1, 2, 3, 5]), "the steps differ"),
        (dict(second_order="trapezoid"), r"second_order differs \('exact' on disk, 'trapezoid' now\)"),
        (dict(batch=dict(mlp.batch, y=mlp.batch["y"] + 1)), "the batch differs"),
    ]
    for change, message in refusals:
        arguments = dict(basis=basis, batch=mlp.batch, second_order="exact") | change
        with pytest.raises(PolcaError, match=message) as error:
            pj.polca(mlp.token_losses, checkpoints, progress=False, out=out, **arguments)
        assert f"remove {out} to start over" in str(error.value) and "--force" in str(error.value)
        assert files_of(out) == before
    resumed = pj.polca(mlp.token_losses, checkpoints, mlp.batch, basis, second_order="exact", progress=False, out=out)
    assert_same_result(resumed, pj.polca(mlp.token_losses, checkpoints, mlp.batch, basis, second_order="exact",
                                         progress=False))
    with pytest.raises(PolcaError, match="complete POLCA result of another computation: the steps differ"):
        pj.polca(mlp.token_losses, checkpoints, mlp.batch, basis, second_order="exact", steps=[0, 1, 2, 3, 5],
                 progress=False, out=out)
    resumed.save(out)  # a save has no fingerprint: polca cannot tell what computed it
    with pytest.raises(PolcaError, match="saved without the fingerprint"):
        pj.polca(mlp.token_losses, checkpoints, mlp.batch, basis, second_order="exact", progress=False, out=out)


def test_a_corrupt_progress_record_gets_a_clear_error(tmp_path, mlp):
    checkpoints = sgd_checkpoints(mlp, 4)
    basis = pj.random_basis(mlp.params, 2, jax.random.key(9))
    out = interrupted(tmp_path / "polca", mlp, checkpoints, basis, fail_at=2, second_order="none")
    record = json.loads((out / "progress.json").read_text())

    def run():
        return pj.polca(mlp.token_losses, checkpoints, mlp.batch, basis, second_order="none", progress=False, out=out)

    for text, message in [
        ('{"complete": ', r"progress.json cannot be read as JSON"),
        (json.dumps({"complete": 2}), "progress.json is corrupt: it holds no fingerprint"),
        (json.dumps(dict(record, complete="2")), "'complete' must be a positive number of checkpoints, got '2'"),
        (json.dumps(dict(record, complete=7)), "counts 7 complete checkpoints of 4"),
    ]:
        (out / "progress.json").write_text(text)
        with pytest.raises(PolcaError, match=message) as error:
            run()
        assert f"remove {out} to start over" in str(error.value)
    (out / "progress.json").write_text(json.dumps(record))
    (out / "projections.npy").write_bytes(b"torn")
    with pytest.raises(PolcaError, match="projections.npy cannot be opened"):
        run()


def test_a_full_disk_is_refused_when_the_files_are_made(tmp_path, mlp, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    basis = pj.random_basis(mlp.params, 2, jax.random.key(4))
    with pytest.raises(PolcaError, match=r"no room on the disk for .*loss.npy \(\d+ bytes\)"):
        pj.polca(mlp.token_losses, sgd_checkpoints(mlp, 2), mlp.batch, basis, second_order="none", progress=False,
                 out=tmp_path / "polca")
    assert not (tmp_path / "polca" / "progress.json").exists()


# --- bad input ------------------------------------------------------------------------------------------------------


def test_bad_input_gets_a_clear_error(mlp):
    checkpoints = sgd_checkpoints(mlp, 2)
    basis = pj.random_basis(mlp.params, 2, jax.random.key(4))

    def run(checkpoints=checkpoints, batch=mlp.batch, basis=basis, second_order="none", **kwargs):
        return pj.polca(mlp.token_losses, checkpoints, batch, basis, second_order=second_order, progress=False,
                        **kwargs)

    with pytest.raises(PolcaError, match="at least two checkpoints"):
        run(checkpoints[:1])
    reshaped = dict(checkpoints[1], w1=jnp.zeros((4, 3)))
    with pytest.raises(PolcaError, match=r"\['w1'\] has shape \(4, 3\)"):
        run([checkpoints[0], reshaped])
    with pytest.raises(PolcaError, match="different parameter tree structure"):
        run([checkpoints[0], {"w1": checkpoints[1]["w1"]}])
    with pytest.raises(PolcaError, match=r"\['b1'\] contains NaN"):
        run([checkpoints[0], dict(checkpoints[1], b1=jnp.full(4, jnp.nan))])
    with pytest.raises(PolcaError, match="per-sample loss .* NaN"):
        run(batch=dict(mlp.batch, y=mlp.batch["y"].at[3, 0].set(jnp.inf)))
    with pytest.raises(PolcaError, match="empty"):
        run(batch=jax.tree_util.tree_map(lambda x: x[:0], mlp.batch))
    with pytest.raises(PolcaError, match="width"):
        run(basis=pj.basis_from_matrix(np.eye(30)[:2]))
    with pytest.raises(PolcaError, match="not orthonormal"):
        run(basis=pj.Basis(2 * basis.vectors, basis.eigenvalues, basis.steps, "user", basis.residuals))
    with pytest.raises(PolcaError, match="needs the basis' eigenvalues"):
        run(second_order="paper")
    with pytest.raises(PolcaError, match="second_order must be"):
        run(second_order="third")
    with pytest.raises(PolcaError, match="mask must have shape"):
        run(mask=np.ones((11, 3), bool))


# --- devices --------------------------------------------------------------------------------------------------------

SHARDED_SCRIPT = """
import jax, numpy as np
jax.config.update("jax_enable_x64", True)
assert jax.device_count() == 4, jax.devices()
import polca_jax as pj
from conftest import mlp_mean_loss, mlp_token_losses
keys = jax.random.split(jax.random.key(0), 4)
params = {"w1": jax.random.normal(keys[0], (3, 4)), "b1": jax.random.normal(keys[1], (4,)),
          "w2": jax.random.normal(keys[2], (4, 2))}
data = jax.random.normal(keys[3], (11, 5))
batch = {"x": data[:, :3], "y": data[:, 3:]}
grad = jax.grad(mlp_mean_loss)
checkpoints = [params]
for _ in range(3):
    checkpoints.append(jax.tree_util.tree_map(lambda p, g: p - 0.05 * g, checkpoints[-1], grad(checkpoints[-1], batch)))
mask = np.ones((11, 2), bool); mask[2, 1] = mask[7, 0] = False
mesh = pj.data_mesh()
hessian_sample = jax.tree_util.tree_map(lambda x: x[:8], batch)
results = {}
for name, on in (("one", None), ("four", mesh)):
    basis = pj.hessian_basis(mlp_mean_loss, checkpoints[:2], hessian_sample, k_per_checkpoint=2, num_iters=10,
                             key=jax.random.key(1), mesh=on, progress=False)
    results[name] = pj.polca(mlp_token_losses, checkpoints, batch, basis, second_order="exact", mask=mask,
                             chunk_size=2, mesh=on, progress=False)
    for method in ("reverse", "forward"):
        results[name, method] = pj.per_sample_projections(mlp_token_losses, checkpoints[1], batch, basis,
                                                          method=method, chunk_size=1, mesh=on)
np.testing.assert_allclose(results["four"].projected_loss, results["one"].projected_loss, rtol=1e-9, atol=1e-12)
np.testing.assert_allclose(results["four"].loss, results["one"].loss, rtol=1e-12)
for method in ("reverse", "forward"):
    np.testing.assert_allclose(results["four", method], results["one", method], rtol=1e-9, atol=1e-12)
print("SHARDED-OK", results["one"].projected_loss.shape)
"""


def test_same_result_on_one_and_four_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    tests_dir = Path(__file__).parent
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SHARDED_SCRIPT)], cwd=tests_dir, env=env, capture_output=True,
        text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "SHARDED-OK (4, 20, 4)" in completed.stdout
