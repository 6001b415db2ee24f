"""Multi-process runs on JAX's runtime: two processes on localhost (2 CPU devices each, gloo collectives) give the
single-process result; bad settings and an absent coordinator are clear errors, not a hang or an abort."""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import polca_jax as pj
from polca_jax.fingerprints import params_digest
from wide_mlp import mean_loss, problem, token_losses

BASIS_OPTIONS = dict(k_per_checkpoint=2, num_iters=12, key=jax.random.key(1), progress=False)

PROCESS_SCRIPT = """
import sys
from pathlib import Path
import jax
import polca_jax as pj
pj.initialize_distributed(timeout_s=120)  # the address, count and id come from the environment
jax.config.update("jax_enable_x64", True)
from test_distributed import BASIS_OPTIONS
from wide_mlp import mean_loss, problem, token_losses

assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
checkpoints, batch, hessian_batch, mask = problem()
out = Path(sys.argv[1])
mesh = pj.device_mesh(model=2)  # 2 x 2: samples split across the processes, parameters within each
with pj.OrbaxCheckpoints(out / "checkpoints", template=checkpoints[0], mesh=mesh) as store:
    assert not store[0]["w1"].is_fully_addressable  # each process restored its own shards
    basis = pj.hessian_basis(mean_loss, [store[0], store[1]], hessian_batch, mesh=mesh, **BASIS_OPTIONS)
    basis.save(out / "basis")
    projections = pj.to_host(pj.per_sample_projections(token_losses, store[2], batch, basis, mask=mask, mesh=mesh))
    if pj.is_writer():
        import numpy as np
        np.save(out / "projections.npy", projections)
    result = pj.polca(token_losses, store, batch, basis, second_order="exact", mask=mask, chunk_size=2, mesh=mesh,
                      out=out / "polca", progress=False)
    assert result.projections.shape == (4, 24, 4)  # every process gets the whole result
    from polca_jax.fingerprints import params_digest
    with pj.OrbaxCheckpoints(out / "checkpoints", template=checkpoints[0], mesh=pj.device_mesh(model=4)) as split:
        assert not split[1]["w1"].is_fully_addressable  # half of each leaf on each process
        print("DIGESTS", params_digest(store[1]), params_digest(split[1]))
print("PROCESS-OK", jax.process_index())
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def trained_tiny_run(out: Path) -> tuple[list[str], dict]:
    """The command ``polca run planted`` on ``out`` (as a list) and its environment, once one process has trained
    the tiny preset there."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    polca = [sys.executable, "-m", "polca_jax._command", "run", "planted", "--quiet", "--no-compile-cache",
             "--out", str(out)]
    subprocess.run(polca + ["--preset", "tiny", "--stage", "train"], env=env, check=True, capture_output=True,
                   timeout=600)
    return polca, env


def _single_process_reference(checkpoints, batch, hessian_batch, mask):
    basis = pj.hessian_basis(mean_loss, checkpoints[:2], hessian_batch, **BASIS_OPTIONS)
    projections = pj.per_sample_projections(token_losses, checkpoints[2], batch, basis, mask=mask)
    result = pj.polca(token_losses, checkpoints, batch, basis, second_order="exact", mask=mask, chunk_size=2,
                      progress=False)
    return np.asarray(basis.vectors), basis.eigenvalues, np.asarray(projections), result


@pytest.mark.core
@pytest.mark.slow
def test_two_processes_give_the_single_process_result(tmp_path):
    checkpoints, batch, hessian_batch, mask = problem()
    with pj.CheckpointRecorder(tmp_path / "checkpoints", steps=range(len(checkpoints))) as recorder:
        for step, params in enumerate(checkpoints):
            recorder.save(step, params)
    vectors, eigenvalues, projections, result = _single_process_reference(checkpoints, batch, hessian_batch, mask)

    port = _free_port()
    processes = []
    for index in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(index))
        processes.append(subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(PROCESS_SCRIPT), str(tmp_path)], cwd=Path(__file__).parent,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    outputs = [process.communicate(timeout=600) for process in processes]
    logs = "\n".join(f"process {i} (exit {p.returncode}):\n{err[-3000:]}" for i, (p, (_, err)) in
                     enumerate(zip(processes, outputs)))
    for index, (process, (stdout, _)) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0 and f"PROCESS-OK {index}" in stdout, logs
        # each process digests the shards it holds, on either mesh, and all agree with one process' digest
        assert f"DIGESTS {params_digest(checkpoints[1])} {params_digest(checkpoints[1])}" in stdout, stdout

    saved = pj.Basis.load(tmp_path / "basis")
    np.testing.assert_allclose(np.asarray(saved.vectors), vectors, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(saved.eigenvalues, eigenvalues, rtol=1e-9)
    np.testing.assert_allclose(np.load(tmp_path / "projections.npy"), projections, rtol=1e-9, atol=1e-11)
    streamed = pj.POLCAResult.load(tmp_path / "polca")  # written once, by process 0
    for name in ("loss", "projections", "step_projection", "second_order", "outside_fraction"):
        np.testing.assert_allclose(getattr(streamed, name), getattr(result, name), rtol=1e-9, atol=1e-11,
                                   err_msg=name)


@pytest.mark.core
def test_an_absent_coordinator_is_a_clear_error_within_the_timeout():
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=r"no coordinator at 127\.0\.0\.1:\d+ after 1\.5 s"):
        pj.initialize_distributed(f"127.0.0.1:{_free_port()}", 2, 1, timeout_s=1.5)
    assert time.monotonic() - start < 10


@pytest.mark.core
@pytest.mark.parametrize(
    "arguments, environment, message",
    [
        ((None, None, None), {}, "needs the coordinator address, process count, process id"),
        (("127.0.0.1:1234", 2, None), {}, "needs the process id"),
        (("127.0.0.1:1234", 2, 2), {}, "process id 2 is not one of the 2 processes"),
        (("127.0.0.1", 2, 1), {}, "must be host:port"),
        ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "two",
                              "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES='two' is not an integer"),
    ],
)
def test_bad_multi_process_settings_are_refused_before_anything_starts(monkeypatch, arguments, environment, message):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        pj.initialize_distributed(*arguments, timeout_s=1)


@pytest.mark.slow
def test_two_processes_of_the_cli_run_the_basis_and_decompose_stages_as_one_process_does(tmp_path):
    """One process trains; the basis and decompose stages then run once in one process and once in two processes
    on a 2 x 2 mesh (`polca run --mesh --coordinator --num-processes --process-id`): the same bases and POLCA."""
    import shutil

    command = [sys.executable, "-c", "from polca_jax.pipeline.cli import main; raise SystemExit(main())", "run",
               "planted", "--quiet", "--no-compile-cache"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run(command + ["--preset", "tiny", "--out", str(tmp_path / "one"), "--stage", "train"], env=env,
                   check=True, capture_output=True, timeout=600)
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    subprocess.run(command + ["--out", str(tmp_path / "one"), "--stage", "basis", "--stage", "decompose"], env=env,
                   check=True, capture_output=True, timeout=600)

    port = _free_port()
    env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    processes = [
        subprocess.Popen(command + ["--out", str(tmp_path / "two"), "--mesh", "2x2", "--coordinator",
                                    f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(index)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for index in range(2)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    logs = "\n".join(f"process {i} (exit {p.returncode}):\n{err[-3000:]}" for i, (p, (_, err)) in
                     enumerate(zip(processes, outputs)))
    assert all(process.returncode == 0 for process in processes), logs
    assert "[decompose] done" in outputs[0][0] and "[decompose]" not in outputs[1][0], logs  # process 0 speaks

    names = sorted(path.name for path in (tmp_path / "one" / "polca").iterdir())
    assert "hessian" in names
    for name in names:
        one, two = pj.POLCAResult.load(tmp_path / "one" / "polca" / name), pj.POLCAResult.load(
            tmp_path / "two" / "polca" / name)
        # float32: the shuffled Hessian basis ends its Lanczos runs (10 steps) less converged, so its vectors, and
        # the projections on them, follow the order of the sums more (1e-3 against 1e-6 for the others)
        atol = 5e-3 if name == "shuffled_hessian" else 2e-5
        for array in ("loss", "projections", "step_projection", "second_order"):
            np.testing.assert_allclose(getattr(two, array), getattr(one, array), rtol=2e-4, atol=atol,
                                       err_msg=f"{name} {array}")
    assert (tmp_path / "two" / "stages" / "decompose.json").exists()
    assert not (tmp_path / "two" / "stages" / "cluster.json").exists()


@pytest.mark.slow
def test_a_peer_that_dies_stops_the_survivor_with_a_clear_error_and_the_run_resumes(tmp_path):
    """Two processes of `polca run` on a 2 x 2 mesh; one is killed mid-stage. The survivor's JAX runtime aborts it
    after --heartbeat-timeout seconds; the `polca` command reports that in one paragraph (exit 2), and the same
    command in two processes then finishes the run."""
    import signal

    polca, env = trained_tiny_run(tmp_path / "run")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

    def start(port: int) -> list[subprocess.Popen]:
        return [subprocess.Popen(polca + ["--mesh", "2x2", "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                          "2", "--process-id", str(index), "--heartbeat-timeout", "10"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)  # its own group: a kill reaches the supervised child
                for index in range(2)]

    processes = start(_free_port())
    deadline = time.monotonic() + 300
    while not any((tmp_path / "run" / "basis").glob("*.partial/*")) and time.monotonic() < deadline:
        time.sleep(0.5)  # until both have joined and Algorithm 1 has begun
    os.killpg(processes[1].pid, signal.SIGKILL)
    killed = time.monotonic()
    _, err = processes[0].communicate(timeout=300)
    assert processes[0].returncode == 2, err[-3000:]
    assert time.monotonic() - killed < 120
    assert "polca: error: this process of a multi-process run was stopped by JAX's runtime" in err
    assert "start every process again with the same command to resume" in err
    assert not (tmp_path / "run" / "stages" / "decompose.json").exists()

    processes = start(_free_port())
    outputs = [process.communicate(timeout=600) for process in processes]
    assert all(process.returncode == 0 for process in processes), [err[-2000:] for _, err in outputs]
    assert (tmp_path / "run" / "stages" / "decompose.json").exists()


@pytest.mark.slow
def test_a_peer_that_never_comes_stops_the_started_process_with_a_clear_error(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    polca = [sys.executable, "-m", "polca_jax._command", "run", "planted", "--quiet", "--out", str(tmp_path / "run")]
    subprocess.run(polca + ["--preset", "tiny", "--stage", "train"], env=env, check=True, capture_output=True,
                   timeout=600)
    started = time.monotonic()
    alone = subprocess.run(polca + ["--mesh", "1x1", "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes",
                                    "2", "--process-id", "0", "--init-timeout", "5"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert alone.returncode == 2 and time.monotonic() - started < 120, alone.stderr[-3000:]
    assert "not every process joined within --init-timeout seconds" in alone.stderr
    assert not (tmp_path / "run" / "stages" / "basis.json").exists()


@pytest.mark.slow
def test_a_terminated_multi_process_command_takes_its_supervised_child_with_it(tmp_path):
    import signal

    out = tmp_path / "terminated-run"  # a unique name to find the child by
    command = subprocess.Popen([sys.executable, "-m", "polca_jax._command", "run", "planted", "--out", str(out),
                                "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2",
                                "--process-id", "1", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(8)  # the child waits for a coordinator that never comes
    command.send_signal(signal.SIGTERM)
    command.communicate(timeout=60)
    assert command.returncode == 128 + signal.SIGTERM
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left behind: {left}"


@pytest.mark.slow
def test_a_multi_process_stage_refuses_a_checkpoint_replaced_since_training(tmp_path):
    """One process trains; its checkpoints are then replaced (every parameter scaled by 1.001). The basis stage in two
    processes, each digesting only the shards it restores, refuses them in both (exit 2, naming a step) and writes no
    basis."""
    import shutil

    out = tmp_path / "run"
    polca, env = trained_tiny_run(out)
    with pj.OrbaxCheckpoints(out / "checkpoints") as store:
        saved = [(step, store[index]) for index, step in enumerate(store.steps)]
    shutil.rmtree(out / "checkpoints")
    with pj.CheckpointRecorder(out / "checkpoints", steps=[step for step, _ in saved]) as recorder:
        for step, params in saved:
            recorder.save(step, jax.tree_util.tree_map(lambda x: x * 1.001, params))

    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    port = _free_port()
    processes = [subprocess.Popen(polca + ["--stage", "basis", "--mesh", "1x4", "--coordinator",
                                           f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(index)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for index in range(2)]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 2, err[-3000:]
        assert re.search(r"the checkpoint at step \d+ in .*checkpoints differs from the one this run trained before",
                         err), err[-3000:]
    assert not (out / "stages" / "basis.json").exists() and not list((out / "basis").glob("*/*"))


@pytest.mark.core
@pytest.mark.parametrize("variables, launcher", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
      "SLURM_LOCALID": "0"}, None),  # one task: nothing to join
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "8", "SLURM_PROCID": "3",
      "SLURM_LOCALID": "3"}, "SLURM"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}, None),  # an allocation, not a task srun started
    ({"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911", "OMPI_COMM_WORLD_SIZE": "4",
      "OMPI_COMM_WORLD_RANK": "1"}, "Open MPI"),
])
def test_a_launcher_of_several_tasks_is_recognised_from_its_variables(monkeypatch, variables, launcher):
    for name in [name for name in os.environ if name.startswith(("SLURM_", "OMPI_"))]:
        monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert pj.cluster_launcher() == launcher


def _slurm_job_id() -> int:
    """A SLURM job id whose coordinator port (JAX: 61440 + id mod 4096) is free on this machine."""
    for job_id in np.random.default_rng().permutation(4096):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", 61440 + int(job_id)))
            except OSError:
                continue
        return 4096 * 7 + int(job_id)
    raise RuntimeError("no free port in 61440..65535")


@pytest.mark.slow
def test_polca_run_joins_a_slurm_launch_from_its_variables_alone(tmp_path):
    """Two processes with only the variables `srun -n 2` sets (no --coordinator, --num-processes, --process-id, no
    JAX_* variables) run the basis and decompose stages as one multi-process run on a 2 x 2 mesh."""
    out = tmp_path / "run"
    polca, env = trained_tiny_run(out)
    slurm = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2", SLURM_JOB_ID=str(_slurm_job_id()),
                 SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2")
    processes = [subprocess.Popen(polca + ["--stage", "basis", "--stage", "decompose", "--mesh", "2x2"],
                                  env=dict(slurm, SLURM_PROCID=str(index), SLURM_LOCALID=str(index)),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for index in range(2)]
    outputs = [process.communicate(timeout=600) for process in processes]
    assert all(process.returncode == 0 for process in processes), [err[-3000:] for _, err in outputs]
    assert "[decompose] done" in outputs[0][0] and "[decompose]" not in outputs[1][0]  # process 0 speaks
    assert (out / "stages" / "decompose.json").exists()


@pytest.mark.slow
def test_a_sigterm_to_one_process_stops_every_process_after_the_same_checkpoint_and_the_run_resumes(tmp_path):
    """Two processes of `polca run` decompose on a 2 x 2 mesh; one receives SIGTERM (a preemption). Both finish the
    checkpoint in progress and exit 2 naming what is kept; the same command in two processes then finishes."""
    import signal

    out = tmp_path / "run"
    polca, env = trained_tiny_run(out)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

    def start(port: int) -> list[subprocess.Popen]:
        return [subprocess.Popen(polca + ["--mesh", "2x2", "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                          "2", "--process-id", str(index)],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)
                for index in range(2)]

    processes = start(_free_port())
    progress, deadline = out / "polca" / "hessian" / "progress.json", time.monotonic() + 300
    while time.monotonic() < deadline:  # until the first POLCA checkpoint of 41 is written
        try:
            if json.loads(progress.read_text())["complete"] >= 1:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    os.killpg(processes[1].pid, signal.SIGTERM)
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 2, err[-3000:]
        assert re.search(r"polca: error: stopped by SIGTERM after \d+ of 41 POLCA checkpoints", err), err[-3000:]
    assert not (out / "stages" / "decompose.json").exists()

    processes = start(_free_port())
    outputs = [process.communicate(timeout=600) for process in processes]
    assert all(process.returncode == 0 for process in processes), [err[-2000:] for _, err in outputs]
    assert (out / "stages" / "decompose.json").exists()
