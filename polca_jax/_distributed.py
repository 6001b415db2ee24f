"""Runs over several processes (hosts) on JAX's own multi-process runtime.

Every process calls :func:`initialize_distributed` first, then runs the same program: ``jax.devices()`` then lists
every process' devices, a mesh over them (:func:`polca_jax.device_mesh`) spans the hosts, and the kernels run on it
unchanged. Data every process holds in full (a batch, parameters) is placed with ``jax.device_put`` onto the global
mesh; results come back to every host with :func:`to_host`; files are written by one process
(:func:`is_writer`). On CPU the collectives run over gloo.
"""

from __future__ import annotations

import os
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from polca_jax.errors import PolcaError

ADDRESS_VARIABLE = "JAX_COORDINATOR_ADDRESS"
COUNT_VARIABLE = "JAX_NUM_PROCESSES"
ID_VARIABLE = "JAX_PROCESS_ID"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 300,
    heartbeat_timeout_s: int = 100,
) -> None:
    """Join a run of ``num_processes`` processes (``jax.distributed.initialize``); call it before any other JAX call.

    Each argument left out is read from the environment (``JAX_COORDINATOR_ADDRESS`` as ``host:port``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``); process 0 runs the coordinator at that address. With none of them
    given, a launcher of more than one task that JAX recognises (:func:`cluster_launcher`: SLURM's ``srun``, Open
    MPI's ``mpirun``) is joined as JAX's own ``jax.distributed.initialize()`` detects it (the address, the count,
    the id and, on GPUs, each process' device from the launcher's variables). The coordinator waits up to
    ``timeout_s`` for the others. A peer silent for ``heartbeat_timeout_s`` seconds (it died, or its host is
    unreachable) makes JAX's runtime abort every other process (``SIGABRT``; the ``polca`` command reports that as a
    clear error). On CPUs the collectives run over gloo.

    Args:
      coordinator_address: ``host:port`` of process 0's coordinator (default ``JAX_COORDINATOR_ADDRESS``).
      num_processes: how many processes take part (default ``JAX_NUM_PROCESSES``).
      process_id: this process' index, 0 to ``num_processes - 1`` (default ``JAX_PROCESS_ID``).
      timeout_s: seconds to wait for the coordinator (or, in it, for the others).
      heartbeat_timeout_s: seconds of silence after which a peer counts as dead.

    Raises:
      PolcaError: for missing or inconsistent settings (a count below 1, an id out of range, an address that is not
        ``host:port``, a variable that is not an integer).
      ConnectionError: when a process cannot reach the coordinator within ``timeout_s`` (JAX itself would abort the
        process).

    Example:
      A run of two processes on one host runs ``pj.initialize_distributed("localhost:8476", 2, i)`` in process i;
      here a setting is refused before anything is started:

      >>> pj.initialize_distributed("localhost", num_processes=2, process_id=0)
      Traceback (most recent call last):
        ...
      polca_jax.errors.PolcaError: coordinator address 'localhost' must be host:port (e.g. 10.0.0.1:8476)
    """
    address = coordinator_address or os.environ.get(ADDRESS_VARIABLE)
    count = _setting(num_processes, COUNT_VARIABLE)
    index = _setting(process_id, ID_VARIABLE)
    if address is None and count is None and index is None and cluster_launcher() is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s)
        return
    if count is not None and count < 1:
        raise PolcaError(f"the number of processes must be at least 1, got {count} (--num-processes or "
                         f"{COUNT_VARIABLE})")
    if index is not None and index < 0:
        raise PolcaError(f"the process id must be 0 or more, got {index} (--process-id or {ID_VARIABLE})")
    if address is not None:
        _host_and_port(address)  # its syntax, before anything else is asked for
    missing = [name for name, value in (("coordinator address", address), ("process count", count),
                                        ("process id", index)) if value is None]
    if missing:
        raise PolcaError(
            f"a multi-process run needs the {', '.join(missing)}: pass them, or set {ADDRESS_VARIABLE} (host:port), "
            f"{COUNT_VARIABLE} and {ID_VARIABLE} in every process' environment"
        )
    if count < 1 or not 0 <= index < count:
        raise PolcaError(f"process id {index} is not one of the {count} processes (0 to {count - 1})")
    host, port = _host_and_port(address)
    if index != 0:
        _wait_for_coordinator(host, port, timeout_s)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices' collectives (GPUs use NCCL)
    jax.distributed.initialize(address, num_processes=count, process_id=index, initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)


_LAUNCHERS = {  # the variables JAX's cluster detection reads, and the one that counts the tasks
    "SLURM": (("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"),
              "SLURM_NTASKS"),
    "Open MPI": (("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"), "OMPI_COMM_WORLD_SIZE"),
}


def cluster_launcher() -> str | None:
    """The launcher that started this process as one of several tasks: ``"SLURM"``, ``"Open MPI"`` or None.

    Read from the variables the launcher sets and JAX's cluster detection reads.

    Returns:
      ``"SLURM"`` or ``"Open MPI"``; None outside one, or for a single task.

    Raises:
      PolcaError: when the launcher's task count variable is not an integer.

    Example:
      >>> import os
      >>> from unittest import mock
      >>> srun = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node1", "SLURM_NTASKS": "4", "SLURM_PROCID": "0",
      ...         "SLURM_LOCALID": "0"}  # what ``srun -n 4`` sets
      >>> with mock.patch.dict(os.environ, srun):
      ...     print(pj.cluster_launcher())
      SLURM
    """
    for name, (variables, count) in _LAUNCHERS.items():
        if all(variable in os.environ for variable in variables):
            try:
                if int(os.environ[count]) > 1:
                    return name
            except ValueError:
                raise PolcaError(f"{count}={os.environ[count]!r} ({name}) is not an integer") from None
    return None


def _setting(value: int | None, variable: str) -> int | None:
    if value is not None:
        return int(value)
    text = os.environ.get(variable)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise PolcaError(f"{variable}={text!r} is not an integer") from None


def _host_and_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or any(character.isspace() for character in address):
        raise PolcaError(f"coordinator address {address!r} must be host:port (e.g. 10.0.0.1:8476)")
    if not 1 <= int(port) <= 65535:
        raise PolcaError(f"coordinator address {address!r}: port {int(port)} is not in 1..65535")
    return host, int(port)


def _wait_for_coordinator(host: str, port: int, timeout_s: float) -> None:
    """Return once ``host:port`` accepts a TCP connection; ``ConnectionError`` after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(0.1, deadline - time.monotonic()))):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"no coordinator at {host}:{port} after {timeout_s:g} s ({error}); start process 0 there first, "
                    "or check the address and that the port is reachable"
                ) from None
            time.sleep(0.2)


def is_writer() -> bool:
    """Whether this process writes shared files (process 0; always True in a single-process run).

    Returns:
      True in process 0, False in the others.

    Example:
      >>> pj.is_writer()  # a single-process run
      True
    """
    return jax.process_index() == 0


def to_host(values: jax.Array | np.ndarray) -> np.ndarray:
    """``values`` as a numpy array on this host, gathered from every process when it is split across them.

    Args:
      values: a ``jax.Array`` (possibly split across processes) or a numpy array.

    Returns:
      A numpy array of the whole of ``values``.

    Example:
      >>> host = pj.to_host(jnp.arange(3.0))
      >>> type(host).__name__, host.tolist()
      ('ndarray', [0.0, 1.0, 2.0])
    """
    if isinstance(values, jax.Array) and not values.is_fully_addressable and not values.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(values, tiled=True))
    return np.asarray(values)


def sync(name: str) -> None:
    """Wait until every process of a multi-process run reaches this point (a no-op in a single-process run).

    With :func:`is_writer`: process 0 writes a file that every process reads, all call ``sync``, then all read it.

    Args:
      name: the barrier's name, the same in every process.

    Example:
      >>> pj.sync("results written")  # a single-process run: returns at once
    """
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
