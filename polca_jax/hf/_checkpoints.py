"""Hugging Face checkpoints of one training run, found by step and converted to the ported model's parameters.

A run's checkpoints live in one of three shapes:

- a directory of ``save_pretrained`` directories, one per step, named like Pythia's revisions (``step1000``) or the
  ``transformers.Trainer``'s (``checkpoint-1000``); each holds ``config.json`` and its weights (``model.safetensors``,
  sharded safetensors with their ``.index.json``, or PyTorch's ``pytorch_model.bin``);
- a directory of plain state-dict files, one per step (``step1000.pt``, ``step_1000.bin``, ``1000.safetensors``),
  beside one ``config.json``;
- a Hugging Face Hub repository whose branches are the steps (``EleutherAI/pythia-70m``: ``step0`` ... ``step143000``),
  downloaded one revision at a time through ``huggingface_hub`` into its cache (needs the network).

Safetensors are read without PyTorch; ``.bin`` and ``.pt`` files need it (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import polca_jax as pj
from polca_jax.checks import check_increasing, check_same_structure
from polca_jax.errors import PolcaError
from polca_jax.hf._models import HFModelConfig, params_from_state_dict, read_config

PyTree = Any
_STEP_NAME = re.compile(r"^(?:step|checkpoint)?[-_]?(\d+)$")
_STATE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def checkpoint_steps(source: str | Path) -> dict[int, str]:
    """The steps a run's checkpoints cover: step -> the directory, file or Hub revision that holds it.

    Args:
      source: a local directory (of ``save_pretrained`` directories or state-dict files, named by step) or a Hub
        repository id whose branches are named ``step<N>``.

    Returns:
      The steps found, in increasing order, each with its directory or file path (local) or revision name (Hub).

    Raises:
      PolcaError: a local directory with no checkpoint named by a step, or a name that is neither a local directory
        nor a Hub repository that can be listed.

    Example:
      ``model``: the GPT-2 of :func:`polca_jax.hf.read_config`'s example, saved under three names (and a directory
      without weights, which is no checkpoint).

      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as root:
      ...     for name in ("step0", "step1000", "checkpoint-500"):
      ...         model.save_pretrained(Path(root) / name)
      ...     (Path(root) / "logs").mkdir()
      ...     sorted(checkpoint_steps(root))
      [0, 500, 1000]
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _local_steps(path)
    if path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise PolcaError(f"{source} is neither a directory of checkpoints nor a Hugging Face Hub repository id "
                         "(owner/name)")
    return _hub_steps(str(source))


def _local_steps(directory: Path) -> dict[int, str]:
    found: dict[int, str] = {}
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if entry.is_file():
            if entry.suffix not in _STATE_SUFFIXES:
                continue
            name = entry.stem
        elif not any((entry / weights).is_file() for weights in _WEIGHT_FILES):
            continue
        match = _STEP_NAME.match(name)
        if match is None:
            continue
        step = int(match.group(1))
        if step in found:
            raise PolcaError(f"two checkpoints in {directory} are named by step {step}: {Path(found[step]).name} and "
                             f"{entry.name}; keep one")
        found[step] = str(entry)
    if not found:
        raise PolcaError(f"no checkpoint named by a step in {directory}: expected save_pretrained directories "
                         "(step1000/, checkpoint-1000/) or state-dict files (step1000.pt, 1000.safetensors)")
    return dict(sorted(found.items()))


def _hub_steps(repo: str) -> dict[int, str]:
    hub = _huggingface_hub()
    try:
        branches = hub.list_repo_refs(repo).branches
    except Exception as error:  # the hub client raises its own HTTP and offline errors
        raise PolcaError(f"cannot list the revisions of the Hub repository {repo!r} ({type(error).__name__}: "
                         f"{error}); a local directory of checkpoints needs no network") from error
    found = {int(match.group(1)): branch.name for branch in branches
             if (match := re.fullmatch(r"step(\d+)", branch.name))}
    if not found:
        raise PolcaError(f"the Hub repository {repo!r} has no revisions named step<N>")
    return dict(sorted(found.items()))


def _huggingface_hub():
    try:
        import huggingface_hub
    except ImportError as error:
        raise PolcaError("reading checkpoints from the Hugging Face Hub needs huggingface_hub: "
                         "pip install 'polca_jax[hf]'") from error
    return huggingface_hub


def read_state_dict(location: str | Path) -> dict[str, Any]:
    """The tensors of one checkpoint, by name: a ``save_pretrained`` directory or one state-dict file.

    Args:
      location: a directory holding ``model.safetensors`` (or its shards and ``model.safetensors.index.json``) or
        ``pytorch_model.bin`` (or its shards), or a ``.safetensors``, ``.bin``, ``.pt`` or ``.pth`` file.

    Returns:
      name -> array (JAX arrays from safetensors, any dtype, bfloat16 included; numpy arrays from PyTorch files).

    Raises:
      PolcaError: no weights there, a file that cannot be read (truncated, not a state dict), or a PyTorch file
        without torch installed.

    Example:
      ``model``: the GPT-2 of :func:`polca_jax.hf.read_config`'s example, saved and read back.

      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as directory:
      ...     model.save_pretrained(directory)
      ...     state = read_state_dict(directory)
      >>> state["transformer.wte.weight"].shape
      (50, 16)
    """
    path = Path(location)
    if path.is_file():
        return _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    for index_name, reader in (("model.safetensors.index.json", _read_safetensors),
                               ("pytorch_model.bin.index.json", _read_torch)):
        if (path / index_name).is_file():
            shards = sorted(set(_read_json(path / index_name).get("weight_map", {}).values()))
            if not shards:
                raise PolcaError(f"{path / index_name} names no weight files (no 'weight_map')")
            state: dict[str, Any] = {}
            for shard in shards:
                state.update(reader(path / shard))
            return state
    if (path / "model.safetensors").is_file():
        return _read_safetensors(path / "model.safetensors")
    if (path / "pytorch_model.bin").is_file():
        return _read_torch(path / "pytorch_model.bin")
    raise PolcaError(f"no weights in {path}: expected model.safetensors, pytorch_model.bin or their sharded forms")


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="flax") as file:
            return {name: file.get_tensor(name) for name in file.keys()}
    except (SafetensorError, OSError) as error:
        raise PolcaError(f"checkpoint file {path} cannot be read ({error}); is it truncated? save it again") from error


def _read_torch(path: Path) -> dict[str, Any]:
    try:
        import torch
    except ImportError as error:
        raise PolcaError(f"{path} is a PyTorch file: reading it needs torch (pip install torch), or save the "
                         "checkpoints as safetensors") from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError ... for a bad file
        raise PolcaError(f"checkpoint file {path} cannot be read by torch.load ({type(error).__name__}: "
                         f"{error}); is it truncated? save it again") from error
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise PolcaError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return {name: _torch_to_numpy(tensor) for name, tensor in state.items()}


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return np.asarray(jnp.asarray(tensor.float().numpy(), jnp.bfloat16))
    return tensor.numpy()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PolcaError(f"{path} cannot be read as JSON ({error})") from error


class HFCheckpoints(Sequence):
    """The parameters at ``steps`` of a run's Hugging Face checkpoints, read and converted lazily one at a time.

    Each read converts the step's state dict to the ported model's parameters (:func:`params_from_state_dict`), cast
    to the template's dtypes and, with a ``mesh``, split over it as :func:`polca_jax.shard_params` places parameters.
    It is what the pipeline's Hugging Face task gives as ``Task.checkpoints``; like
    :class:`polca_jax.OrbaxCheckpoints` it is a context manager.

    Args:
      source: where the checkpoints are (:func:`checkpoint_steps`): a local directory or a Hub repository id.
      steps: the steps to read, strictly increasing (default: every step found).
      template: optional params pytree (or ``ShapeDtypeStruct``s) each checkpoint must match in structure and shape;
        its dtypes are kept.
      mesh: optional mesh to place each checkpoint's parameters on.
      config: the model's configuration (default: read from the first step's ``config.json``, or the source's).
      dtype: the parameters' dtype without a template (default float32; a checkpoint in float16 or bfloat16 is cast).

    Raises:
      PolcaError: steps missing from the source (the message lists those found), a config that cannot be read, and
        (when indexed) a checkpoint that cannot be read or whose tensors do not match the model.

    Example:
      ``model``: the GPT-2 of :func:`polca_jax.hf.read_config`'s example, saved as the checkpoints of steps 0 and
      10 (the same weights twice here; a training run's differ).

      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as root:
      ...     for step in (0, 10):
      ...         model.save_pretrained(Path(root) / f"step{step}")
      ...     with HFCheckpoints(root) as store:
      ...         print(store.steps, store.config.model_type, store[1]["transformer.wte.weight"].dtype)
      [0, 10] gpt2 float32
    """

    def __init__(self, source: str | Path, steps: Sequence[int] | None = None, template: PyTree | None = None,
                 mesh=None, config: HFModelConfig | None = None, dtype=jnp.float32):
        self.source = str(source)
        self._found = checkpoint_steps(source)
        if steps is None:
            self.steps = list(self._found)
        else:
            self.steps = [int(step) for step in steps]
            check_increasing(self.steps, f"HFCheckpoints({self.source})")
            missing = sorted(set(self.steps) - set(self._found))
            if missing:
                raise PolcaError(f"steps {missing} have no checkpoint in {self.source} (found: "
                                 f"{_short_list(list(self._found))})")
        self.config = config if config is not None else read_config(self._config_location())
        self.template, self.mesh, self.dtype = template, mesh, dtype

    def _config_location(self) -> Path:
        """The ``config.json`` that describes the model: the first step's, else the source directory's."""
        first = self.local_path(self.steps[0] if self.steps else next(iter(self._found)), files=("config.json",))
        candidates = [first / "config.json"] if first.is_dir() else []
        candidates.append(Path(self.source).expanduser() / "config.json")
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise PolcaError(f"no config.json for the checkpoints in {self.source}: save_pretrained writes one beside "
                         "each checkpoint's weights; for plain state-dict files, put the model's config.json beside "
                         "them")

    def local_path(self, step: int, files: Sequence[str] | None = None) -> Path:
        """The local path of ``step``'s checkpoint: its directory or file, or a Hub revision's download (only
        ``files``, default its config and weights) in the hub's cache.

        Args:
          step: one of the steps found.
          files: the file patterns a Hub revision's download is limited to.

        Returns:
          The path.

        Raises:
          PolcaError: a Hub revision that cannot be downloaded.
        """
        location = self._found[step]
        if Path(location).exists():
            return Path(location)
        patterns = list(files) if files is not None else ["config.json", "*.safetensors", "*.safetensors.index.json",
                                                           "pytorch_model*.bin", "pytorch_model.bin.index.json"]
        try:
            return Path(_huggingface_hub().snapshot_download(self.source, revision=location,
                                                              allow_patterns=patterns))
        except Exception as error:  # the hub client raises its own HTTP and offline errors
            raise PolcaError(f"cannot download revision {location} of {self.source!r} ({type(error).__name__}: "
                             f"{error})") from error

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, index: int) -> PyTree:
        if isinstance(index, slice):
            raise TypeError("HFCheckpoints does not support slicing; index one checkpoint at a time")
        if not -len(self.steps) <= index < len(self.steps):
            raise IndexError(f"checkpoint index {index} is out of range for the {len(self.steps)} selected steps of "
                             f"{self.source}")
        step = self.steps[index]
        location = self.local_path(step)
        try:
            params = params_from_state_dict(read_state_dict(location), self.config, dtype=self.dtype)
        except PolcaError as error:
            raise PolcaError(f"checkpoint step {step} ({location}): {error}") from error
        if self.template is not None:
            check_same_structure(self.template, params, f"the checkpoint at step {step} ({location})")
            params = jax.tree.map(lambda like, leaf: jnp.asarray(leaf, like.dtype), self.template, params)
        return pj.shard_params(params, self.mesh) if self.mesh is not None else params

    def close(self) -> None:
        """Nothing to release (each read opens and closes its files); here so the pipeline closes any store alike."""

    def __enter__(self) -> "HFCheckpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _short_list(steps: list[int], limit: int = 12) -> str:
    shown = ", ".join(map(str, steps[:limit]))
    return f"{shown}, ... ({len(steps)} in all)" if len(steps) > limit else shown
