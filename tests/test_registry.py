"""The pipeline's registries: a basis of one's own registered in one file (examples/training_step_basis.py) is built,
decomposed, clustered, scored against the nulls, reported and planned like the built-in ones; registering refuses
what would break the built-in ones, and a config naming an unregistered basis says what to do."""

import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import polca_jax as pj
from polca_jax.pipeline import BASES, VARIANTS, BasisKind, RunConfig, Variant, read_metrics, register_basis
from polca_jax.pipeline._registry import basis_kind
from polca_jax.pipeline._stages import _check_built_basis

ROOT = Path(__file__).parents[1]
EXAMPLE = f"{ROOT / 'examples' / 'training_step_basis.py'}:make_task"


@pytest.fixture
def registry():
    """The registries as they were, restored after the test."""
    bases, variants = dict(BASES), list(VARIANTS)
    yield
    BASES.clear(), BASES.update(bases)
    VARIANTS[:] = variants


def a_kind(name="mine", curvature="current"):
    return BasisKind(name, "My basis", lambda inputs: None, curvature=curvature, size=lambda config: 3)


def test_a_registered_basis_becomes_a_config_choice_with_its_strategies(registry):
    with pytest.raises(ValueError, match="register_basis"):
        RunConfig(task="t", preset=None, task_options={}, ablation_bases="mine")
    register_basis(a_kind(curvature="none"), Variant("mine", "Mine", "mine", "projected_loss", "ablation"))
    config = RunConfig(task="t", preset=None, task_options={}, ablation_bases="random,mine")
    assert config.second_order_for("mine") == pj.SecondOrder("none") and basis_kind("mine").size_for(config) == 3
    assert [v.name for v in VARIANTS if v.basis == "mine"] == ["mine"]
    register_basis(a_kind(), Variant("mine_profile", "Mine, profiles", "mine", "profile", "ablation"))  # re-import
    assert [v.name for v in VARIANTS if v.basis == "mine"] == ["mine_profile"]
    assert config.second_order_for("mine") == pj.SecondOrder("paper", "current")


def test_registering_refuses_what_would_clash_with_the_built_in_ones(registry):
    with pytest.raises(ValueError, match="built-in basis"):
        register_basis(a_kind("random"))
    with pytest.raises(ValueError, match="built-in strategy"):
        register_basis(a_kind(), Variant("polca", "POLCA", "mine", "projected_loss", "ablation"))
    with pytest.raises(ValueError, match="must cluster along the basis it is registered with"):
        register_basis(a_kind(), Variant("other", "Other", "hessian", "projected_loss", "ablation"))
    with pytest.raises(ValueError, match="curvature must be one of"):
        a_kind(curvature="eigen")
    with pytest.raises(ValueError, match="trajectory must be one of"):
        Variant("v", "V", "mine", "curvatures", "ablation")
    assert "mine" not in BASES


def test_a_builder_that_returns_the_wrong_thing_is_refused_by_name():
    class FakeTask:
        init_params = {"w": jnp.zeros(4)}

    good = pj.basis_from_matrix(np.eye(4)[:3])
    _check_built_basis("mine", good, FakeTask, 3)
    with pytest.raises(ValueError, match="returned a ndarray, not a polca_jax.Basis"):
        _check_built_basis("mine", np.eye(4)[:3], FakeTask, 3)
    with pytest.raises(ValueError, match="returned 3 directions of width 4; the config expects 2"):
        _check_built_basis("mine", good, FakeTask, 2)


def polca(*args) -> subprocess.CompletedProcess:
    """The CLI in a process of its own (the example registers its basis in the process that imports it)."""
    return subprocess.run([sys.executable, "-m", "polca_jax._command", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)


@pytest.mark.slow
def test_the_one_file_basis_example_runs_and_appears_in_the_report_the_nulls_and_the_plan(tmp_path):
    settings = ["--preset", "tiny", "--set", "ablation_bases=random,training_steps"]
    documented = (ROOT / "docs" / "your-own-task.md").read_text()  # the commands docs/your-own-task.md gives
    assert f"polca run examples/training_step_basis.py:make_task {' '.join(settings)} --out" in documented
    assert f"polca plan examples/training_step_basis.py:make_task {' '.join(settings)}\n" in documented
    done = polca("run", EXAMPLE, *settings, "--out", str(tmp_path / "run"), "--quiet")
    assert done.returncode == 0, done.stderr
    basis = pj.Basis.load(tmp_path / "run" / "basis" / "training_steps")
    assert basis.method == "training_steps" and basis.size == 5  # the tiny preset's 5 basis checkpoints
    basis.check_orthonormal()
    assert {"training_steps", "training_steps_profile"} <= set(read_metrics(tmp_path / "run" / "metrics.json").variants)
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    nulls = report[report.index("## Against the nulls"):]
    assert "| Training-step basis |" in nulls and "| Training-step basis, allocation profiles |" in nulls

    plan = polca("plan", EXAMPLE, *settings)
    assert plan.returncode == 0, plan.stderr
    assert "3 bases (hessian, random, training_steps)" in plan.stdout and "training_steps: not timed" in plan.stdout


def test_the_preconditioned_hessian_of_read_checkpoints_is_scaled_by_the_rms_gradient(tmp_path):
    """Checkpoints the run did not train hold no optimiser state: the preconditioned Hessian basis then takes
    S² = 1/RMS of the per-sample gradients (the same basis as the kernel with that scale)."""
    import jax
    from test_hostile_resume import USER_TASK, quiet, record_checkpoints

    from polca_jax.pipeline import build_task, open_run, run

    (tmp_path / "user_task.py").write_text(USER_TASK)
    task = f"{tmp_path / 'user_task.py'}:make_task"
    record_checkpoints(tmp_path / "recorded")
    run(task, tmp_path / "run", checkpoints=tmp_path / "recorded", stages=["train", "basis"], progress=False,
        log=quiet, settings=["ablations=true", "ablation_bases=preconditioned_hessian", "lanczos_iters=3"])
    built = pj.Basis.load(tmp_path / "run" / "basis" / "preconditioned_hessian")
    assert built.method == "preconditioned_hessian"

    directory, definition = open_run(task, tmp_path / "run")
    config, task_value = directory.config, build_task(directory, definition)
    with pj.OrbaxCheckpoints(tmp_path / "recorded", config.basis_steps, template=task_value.init_params) as store:
        checkpoints = [store[i] for i in range(len(store))]

    def scale(params):
        rms = pj.rms_gradient_scale(task_value.per_sample_loss, params, task_value.hessian_batch)
        return jax.tree_util.tree_map(jnp.sqrt, rms)

    expected = pj.hessian_basis(task_value.loss, checkpoints, task_value.hessian_batch, scale=scale,
                                k_per_checkpoint=config.k_per_checkpoint, num_iters=config.lanczos_iters,
                                key=jax.random.fold_in(jax.random.key(config.seed), 5), progress=False)
    np.testing.assert_allclose(np.asarray(built.vectors), np.asarray(expected.vectors), atol=1e-6)
