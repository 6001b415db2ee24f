"""Checkpoints on an object store: a Google Cloud Storage server on localhost (the pure-Python
``gcp-storage-emulator``, started here), written by ``CheckpointRecorder`` from a training loop, read back by
``OrbaxCheckpoints`` and decomposed by ``polca run ... --checkpoints gs://...``, through orbax, tensorstore's gcs
driver and gcsfs as on Google Cloud. No part of them is mocked: the bytes go over HTTP to the server."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import jax
import numpy as np
import pytest

import polca_jax as pj
from polca_jax.errors import PolcaError
from polca_jax.files import storage_path

BUCKET = "polca-tests"
PAGES = Path(__file__).parent.parent.parent / "docs"


@pytest.fixture(scope="module")
def bucket(monkeypatch_module):
    """``gs://polca-tests``, served by a GCS emulator on a free localhost port for this module's tests."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                               "--port", str(port), "--in-memory", "--default-bucket", BUCKET, "-q"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=1).read()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("the GCS emulator did not start")
            time.sleep(0.2)
    # gcsfs and google-cloud-storage read the server from STORAGE_EMULATOR_HOST, tensorstore (orbax's arrays) from
    # TENSORSTORE_GCS_HTTP_URL; a fixed test token and no bucket-type probe keep both from asking Google
    for name, value in {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}.items():
        monkeypatch_module.setenv(name, value)
    monkeypatch_module.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    yield f"gs://{BUCKET}"
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


# The emulator ignores GCS's write preconditions (ifGenerationMatch: no trace of them in gcp_storage_emulator), which
# tensorstore's OCDBT manifest relies on when orbax writes several arrays of a checkpoint at once; in two clean-clone
# runs of the suite out of four, one manifest write came back as "Malformed StorageGeneration". Google Cloud Storage
# honours the preconditions, so that error, and only it, gets a fresh directory and another try.
EMULATOR_ATTEMPTS = 3


def fresh(bucket: str) -> str:
    """A directory of its own under the bucket."""
    return f"{bucket}/{uuid.uuid4().hex[:12]}"


def test_the_recorder_writes_and_orbax_checkpoints_read_a_bucket(bucket):
    directory = fresh(bucket)
    params = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    with pj.CheckpointRecorder(directory, steps=[0, 5]) as recorder:
        for step in range(6):
            recorder.save(step, jax.tree.map(lambda leaf: leaf + step, params))
    assert str(recorder.directory) == directory
    assert storage_path(directory).is_dir() and sorted(p.name for p in storage_path(directory).iterdir()) == ["0", "5"]
    with pj.OrbaxCheckpoints(directory, template=params) as store:
        assert store.steps == [0, 5]
        np.testing.assert_array_equal(np.asarray(store[1]["w"]), params["w"] + 5)
    with pytest.raises(PolcaError, match=r"steps \[3\] have no checkpoint"):
        pj.OrbaxCheckpoints(directory, [3])
    with pytest.raises(PolcaError, match="does not exist"):
        pj.OrbaxCheckpoints(fresh(bucket))


def test_other_object_stores_are_refused_with_the_reason():
    with pytest.raises(PolcaError, match=r"s3://b/ckpt: checkpoints live on a local path or on gs://"):
        pj.OrbaxCheckpoints("s3://b/ckpt")


@pytest.mark.slow
def test_polca_run_decomposes_checkpoints_in_a_bucket(bucket, tmp_path, monkeypatch):
    """docs/your-own-task.md's task and training loop, recording into the bucket; the run reads them from there."""
    from polca_jax.pipeline.cli import main

    page = (PAGES / "your-own-task.md").read_text()
    blocks = [block.split("```")[0] for block in page.split("```python\n")[1:]]
    task_file = next(block for block in blocks if "# my_task.py" in block)
    loop = next(block for block in blocks if "CheckpointRecorder" in block)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    Path("my_task.py").write_text(task_file)
    for attempt in range(EMULATOR_ATTEMPTS):
        directory = fresh(bucket)
        try:
            exec(compile(loop.replace('"runs/my-checkpoints"', repr(directory)), "docs/your-own-task.md", "exec"), {})
            break
        except ValueError as error:  # the emulator's gap (EMULATOR_ATTEMPTS says which); anything else fails here
            if "Malformed StorageGeneration" not in str(error) or attempt == EMULATOR_ATTEMPTS - 1:
                raise
    assert main(["run", "my_task.py:make_task", "--preset", "tiny", "--checkpoints", directory, "--out", "run",
                 "--quiet", "--no-compile-cache"]) == 0
    config = json.loads(Path("run/config.json").read_text())
    assert config["checkpoints"] == directory  # kept as the URL, not made a local path
    assert json.loads(Path("run/stages/train.json").read_text())["trained"] is False
    result = pj.POLCAResult.load("run/polca/hessian")
    assert result.projected_loss.shape[0] == 41 and np.all(np.isfinite(result.projected_loss))
    assert Path("run/report/report.md").is_file()
    sys.modules.pop("my_task", None)
