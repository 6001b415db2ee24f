"""A run directory bound to one config, with resumable stages and a fingerprint of the task's data.

Guarantees:

- ``config.json`` is written once, atomically, after the config has been validated; reopening the directory with
  another config is refused, naming every difference, and changes nothing.
- A stage is finished when its marker ``stages/<stage>.json`` exists; markers and every JSON file are written
  atomically (temp file + rename), so a killed run never leaves a torn marker, and a finished stage is skipped.
- ``task.json`` holds a fingerprint of the task's data (parameters at step 0, evaluation, Hessian and first
  training batch, labels) taken when the task was first built; a later build that differs is refused, so a run
  never mixes two datasets (e.g. a relative data path resumed from another directory).
- Redoing a stage (``force``) first removes its outputs and those of every later stage, and their markers.
- ``fingerprints.json`` holds the digest of each checkpoint's parameters (recorded as training writes them or a
  stage first reads them) and of the task's loss functions (recorded by the stages whose results use them); a
  read or a task build that differs is refused with ``ResumeMismatch`` before anything is written.
- ``run.lock`` is ``flock``'ed by the process running stages (:meth:`RunDirectory.lock`): a second run is refused,
  naming the holder; the operating system releases the lock when the holder dies, so it is never stale.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
import threading
from pathlib import Path

import numpy as np

from polca_jax import is_writer, tree
from polca_jax.errors import PolcaError, ResumeMismatch
from polca_jax.files import load_npz, read_json, save_npz_atomic, storage_path, write_json_atomic
from polca_jax.fingerprints import PARAMS_DIGEST, digests_differ, loss_digest
from polca_jax.pipeline._config import RunConfig, config_differences
from polca_jax.pipeline._task import LabelSet, Qualifier, Task


class RunDirectory:
    """A directory holding one run: opened with ``config=None`` (it must exist) or created with a config.

    ``run_dir / "name"`` is the path of a file in it; :func:`run_stages` fills it, stage by stage.

    Args:
      path: the directory (made absolute).
      config: the run's :class:`RunConfig`: a new directory is created with it (``config.json``, written once); an
        existing one must hold the same config. None: open an existing run with its own config.

    Attributes:
      path: the directory, absolute.
      config: the run's :class:`RunConfig`, as ``config.json`` holds it.
      created: True when this object created the directory's ``config.json`` (a new run).

    Raises:
      PolcaError: ``path`` is a file, lies below one or cannot be written; it holds another config (naming every
        difference), or files but no ``config.json``; or ``config`` is None and it holds no run.

    Example:
      ``out``: the run directory of :func:`polca_jax.pipeline.run`'s example.

      >>> from polca_jax.pipeline import RunDirectory
      >>> run_dir = RunDirectory(out)  # an existing run, with its own config
      >>> run_dir.created, run_dir.config.task, run_dir.config.num_steps, run_dir.done("score")
      (False, 'planted', 40, True)
      >>> (run_dir / "metrics.json").is_file(), run_dir.checkpoint_dir == out / "checkpoints"
      (True, True)
    """

    def __init__(self, path: str | Path, config: RunConfig | None = None):
        self.path = Path(path).absolute()
        _check_usable(self.path)
        config_file = self.path / "config.json"
        self.created = False
        if config_file.exists():
            saved = RunConfig.from_dict(read_json(config_file), str(config_file))
            if config is not None and saved != config:
                differences = "; ".join(config_differences(saved, config))
                raise PolcaError(f"{self.path} holds a run with another config ({differences}); choose a new --out "
                                 "directory, or leave out --preset/--set to resume it as it is (nothing was changed)")
            config = saved
        elif config is None:
            raise PolcaError(f"{self.path} is not a run directory (no config.json); start a run with "
                             "polca run TASK --out DIR")
        else:
            if self.path.exists() and any(self.path.iterdir()):
                raise PolcaError(f"{self.path} holds files but no config.json, so it is not a run directory; choose "
                                 "a new or empty --out directory")
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                write_json_atomic(config_file, config.to_dict())
                (self.path / LOCK).touch()  # made with the directory: a refused run later changes no file
            except OSError as error:
                raise PolcaError(f"cannot create the run directory {self.path}: {error.strerror or error}; "
                                 "choose another --out") from error
            self.created = True
        self.config: RunConfig = config
        self._fingerprints_lock = threading.Lock()  # a stage's checkpoint reads may come from a read-ahead thread

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoint_dir(self) -> Path:
        """The orbax checkpoints the run reads: its own, or the directory named by ``config.checkpoints`` (a local
        path or a ``gs://`` URL, :func:`polca_jax.files.storage_path`)."""
        return storage_path(self.config.checkpoints) if self.config.checkpoints else self.path / "checkpoints"

    # --- stages ----------------------------------------------------------------------------------------------------

    def done(self, stage: str) -> bool:
        """Whether ``stage`` has finished: its marker ``stages/<stage>.json`` exists."""
        return (self.path / "stages" / f"{stage}.json").exists()

    def stage_record(self, stage: str) -> dict:
        """What a finished ``stage`` recorded (its marker's contents: its info, wall time and compile time)."""
        return read_json(self.path / "stages" / f"{stage}.json")

    def mark_done(self, stage: str, info: dict) -> None:
        """Mark ``stage`` finished, with ``info`` as its record (written atomically)."""
        (self.path / "stages").mkdir(exist_ok=True)
        write_json_atomic(self.path / "stages" / f"{stage}.json", info)

    def require(self, stage: str) -> None:
        """Raise ``PolcaError``, saying how to run it, unless ``stage`` has finished."""
        if not self.done(stage):
            raise PolcaError(f"stage {stage!r} has not finished in {self.path}; run it first "
                             f"(polca run {self.config.task} --out {self.path} --stage {stage})")

    def reset(self, stages: list[str], outputs: dict[str, tuple[str, ...]]) -> None:
        """Remove the markers of ``stages`` and the outputs ``outputs[stage]`` (paths relative to the run), and the
        fingerprints those stages recorded (the checkpoints' with ``train``)."""
        fingerprints = self._fingerprints()
        if fingerprints != _NO_FINGERPRINTS:
            kept = {"checkpoints": {} if "train" in stages else fingerprints["checkpoints"],
                    "losses": {kind: record for kind, record in fingerprints["losses"].items()
                               if record["stage"] not in stages}}
            write_json_atomic(self.path / FINGERPRINTS, kept)
        for stage in stages:
            (self.path / "stages" / f"{stage}.json").unlink(missing_ok=True)
            for name in outputs.get(stage, ()):
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)

    def lock(self) -> None:
        """Hold the run directory until :meth:`unlock` or the process' end: an exclusive ``flock`` on ``LOCK`` in it,
        which the operating system releases when the process dies, so a lock is never stale; the file names the
        holder (pid, host, start time) for the refusal. Raise ``PolcaError`` when another process holds it. In a
        multi-process run only process 0 (the writer) takes it."""
        if not is_writer() or getattr(self, "_lock", None) is not None:
            return
        handle = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            try:
                holder = "pid {pid} on {host}, started {started}".format(**json.loads(holder))
            except (ValueError, KeyError, TypeError):
                holder = "holder unknown"
            raise PolcaError(f"{self.path} is in use by another polca run ({holder}); wait for it to finish, or "
                             "choose another --out (nothing was changed)") from None
        handle.seek(0)
        handle.truncate()  # a holder that died left its record: this process takes over
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}))
        handle.flush()
        self._lock = handle

    def unlock(self) -> None:
        """Release the lock :meth:`lock` took; the file stays, emptied (a process that dies leaves its record)."""
        handle, self._lock = getattr(self, "_lock", None), None
        if handle is not None:
            handle.truncate(0)
            handle.close()  # closing the file releases the flock

    def discard(self) -> None:
        """Delete a directory this object created, after the run failed before it trained or finished a stage."""
        if self.created and not (self.path / "checkpoints").exists() and not any((self.path / "stages").glob("*")):
            shutil.rmtree(self.path, ignore_errors=True)

    # --- fingerprints of the checkpoints and the loss functions ------------------------------------------------------

    def _fingerprints(self) -> dict:
        """``fingerprints.json``: ``{"checkpoints": {step: digest}, "losses": {kind: {"digest", "stage"}}}``."""
        path = self.path / FINGERPRINTS
        if not path.exists():
            return _NO_FINGERPRINTS
        saved = read_json(path)
        if not isinstance(saved.get("checkpoints"), dict) or not isinstance(saved.get("losses"), dict):
            raise PolcaError(f"{path} is corrupt (no checkpoints or losses object); remove it to record the "
                             "fingerprints again from the data on disk")
        return saved

    def _start_afresh(self, stage: str) -> str:
        return (f"redo it with polca run {self.config.task} --out {self.path} --stage {stage} --force, or start a "
                "new --out directory (nothing was changed)")

    def check_checkpoint(self, step: int, digest: str) -> None:
        """Compare the digest of the parameters read (or written) at ``step`` with the one recorded when a stage
        first read or wrote them; record it if none was (or one in an earlier format). Raise ``ResumeMismatch`` when
        they differ: the checkpoints were re-recorded or replaced, and a later stage would mix them with results of
        the old ones."""
        with self._fingerprints_lock:
            fingerprints = self._fingerprints()
            saved = fingerprints["checkpoints"].get(str(int(step)))
            if not isinstance(saved, str) or not saved.startswith(PARAMS_DIGEST):
                if is_writer():
                    fingerprints = {**fingerprints, "checkpoints": {**fingerprints["checkpoints"],
                                                                    str(int(step)): digest}}
                    write_json_atomic(self.path / FINGERPRINTS, fingerprints)
                return
        if digests_differ(saved, digest):
            raise ResumeMismatch(
                f"the checkpoint at step {step} in {self.checkpoint_dir} differs from the one this run "
                f"{'read' if self.config.checkpoints else 'trained'} before (digests in {self.path / FINGERPRINTS}): "
                "the checkpoints were re-recorded or replaced since the run began, and its later stages would mix "
                f"results of both; to decompose the checkpoints there now, {self._start_afresh('train')}")

    def check_losses(self, digests: dict[str, str], redone: tuple[str, ...] = ()) -> None:
        """Raise ``ResumeMismatch`` when a loss function (``loss``, ``per_sample_loss``) differs from the one an
        earlier stage of this run used (an edited task file); the stages ``redone`` (forced) are not asked."""
        for kind, record in sorted(self._fingerprints()["losses"].items()):
            if kind in digests and record["digest"] != digests[kind] and record["stage"] not in redone:
                raise ResumeMismatch(
                    f"the task's {kind} differs from the one the {record['stage']} stage of this run used "
                    f"(its code or the arrays it captures changed; digests in {self.path / FINGERPRINTS}): the "
                    "task file was edited since, and the results would mix both; "
                    f"{self._start_afresh(record['stage'])}")

    def record_losses(self, digests: dict[str, str], stage: str) -> None:
        """Record the digests of the loss functions ``stage`` uses (those no earlier stage recorded)."""
        fingerprints = self._fingerprints()
        new = {kind: {"digest": digest, "stage": stage} for kind, digest in digests.items()
               if kind not in fingerprints["losses"]}
        if new and is_writer():
            write_json_atomic(self.path / FINGERPRINTS, {**fingerprints, "losses": {**fingerprints["losses"], **new}})

    # --- the task's data -------------------------------------------------------------------------------------------

    def bind_task(self, task: Task) -> None:
        """On the first build: save the task's labels and texts and its data fingerprint; later: refuse a task
        whose data differ from the fingerprint."""
        fingerprint = task_fingerprint(task)
        task_file = self.path / "task.json"
        if task_file.exists():
            saved = read_json(task_file)["fingerprint"]
            changed = sorted(part for part in set(saved) | set(fingerprint) if saved.get(part) != fingerprint.get(part))
            if changed:
                raise PolcaError(
                    f"the task built now differs from the one this run started with in: {', '.join(changed)} "
                    f"(fingerprints in {task_file}). Changed data files, a relative data path resumed from another "
                    "working directory or an edited task file can cause this; resume from the original setting or "
                    "start a new --out directory (nothing was changed)")
            return
        arrays = {f"label:{name}": label_set.values for name, label_set in task.labels.items()}
        if task.sample_texts is not None:
            arrays["texts"] = np.asarray(task.sample_texts, dtype=str)
        save_npz_atomic(self.path / "labels.npz", **arrays)
        write_json_atomic(task_file, {
            "fingerprint": fingerprint,
            "num_samples": task.num_samples,
            "description": task.description,
            "label_sets": {name: label_set.metadata() for name, label_set in task.labels.items()},
            "has_texts": task.sample_texts is not None,
        })


FINGERPRINTS = "fingerprints.json"
LOCK = "run.lock"  # held by the process running stages in the directory
_NO_FINGERPRINTS = {"checkpoints": {}, "losses": {}}


def loss_digests(task: Task) -> dict[str, str]:
    """The digests of the task's loss functions: ``loss`` on the Hessian batch, ``per_sample_loss`` on the
    evaluation batch (:func:`polca_jax.fingerprints.loss_digest`: traced on shapes, nothing computed)."""
    return {"loss": loss_digest(task.loss, task.init_params, task.hessian_batch),
            "per_sample_loss": loss_digest(task.per_sample_loss, task.init_params, task.eval_batch)}


def task_fingerprint(task: Task) -> dict[str, str]:
    """SHA-256 of each part of the task's data: init_params, eval_batch, eval_mask, hessian_batch, the first training
    batch, the labels and the sample texts."""
    parts = {
        "init_params": task.init_params,
        "eval_batch": task.eval_batch,
        "eval_mask": task.eval_mask,
        "hessian_batch": task.hessian_batch,
        "first_train_batch": None if task.train_batches is None else task.train_batches(0),
        "labels": {name: label_set.values for name, label_set in task.labels.items()},
        "sample_texts": None if task.sample_texts is None else np.asarray(task.sample_texts, dtype=str),
    }
    return {name: tree.digest(value) for name, value in parts.items()}


def _check_usable(path: Path) -> None:
    """Raise ``PolcaError`` if ``path`` cannot be a run directory: it is a file, lies below a file, or cannot be
    written."""
    if path.exists() and not path.is_dir():
        raise PolcaError(f"--out {path} is a file, not a directory; choose another --out")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise PolcaError(f"--out {path} lies below {parent}, which is a file; choose another --out")
            break
    existing = path if path.exists() else next(p for p in path.parents if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PolcaError(f"cannot write to {existing} (permission denied); choose another --out")


def load_labels(run_dir: str | Path) -> tuple[dict[str, LabelSet], np.ndarray | None]:
    """The label sets and sample texts a run stored (``labels.npz``, ``task.json``), without building its task.

    Args:
      run_dir: the run directory whose task was built (by its first stage that builds it).

    Returns:
      ``(label_sets, texts)``: ``name -> LabelSet`` with ``[N]`` values, and the ``[N]`` sample texts (None when
      the task has none).

    Raises:
      PolcaError: ``task.json`` or ``labels.npz`` is missing, unreadable or torn.

    Example:
      ``out``: the run directory of :func:`polca_jax.pipeline.run`'s example (160 samples, one label set).

      >>> from polca_jax.pipeline import load_labels
      >>> label_sets, texts = load_labels(out)
      >>> sorted(label_sets), label_sets["group"].values.shape, texts.shape
      (['group'], (160,), (160,))
    """
    run_dir = Path(run_dir) if isinstance(run_dir, str) else run_dir  # a Path or a RunDirectory
    info = read_json(run_dir / "task.json")
    arrays = load_npz(run_dir / "labels.npz")
    label_sets = {}
    for name, metadata in info["label_sets"].items():
        qualifier = metadata["qualifier"]
        label_sets[name] = LabelSet(
            arrays[f"label:{name}"], positive=metadata["positive"],
            qualifier=None if qualifier is None else Qualifier(qualifier["label_set"], tuple(qualifier["classes"]),
                                                               qualifier["min_fraction"]),
            class_names=metadata["class_names"], stratify_by=metadata.get("stratify_by"))
    return label_sets, arrays.get("texts")
