"""A Ray session for the capacity jobs: a local Ray on loopback by default, or an
existing cluster.

``ray_session()`` is a context manager giving a :class:`RaySession`:

* **local** (no address, no ``RAY_ADDRESS``): a fresh Ray head in this process's
  machine with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray then binds 127.0.0.1 for
  every port), ``RAY_AUTH_MODE=disabled`` (nothing but this machine can reach it),
  ``RAY_worker_niceness=0`` (Ray's workers run at nice 15 by default: on a busy machine
  they would lose the CPU to anything else, and the job is the work asked for), no
  dashboard, ``num_cpus`` = ``os.cpu_count()`` unless given, and its temp dir inside the
  run: ``temp_dir`` if given (kept), else a fresh short directory under the system temp
  dir (removed at the end; Ray's unix sockets live there and their paths must stay short).
  The environment variables are put back as they were at the end;
* **cluster** (``address``, else ``RAY_ADDRESS``): ``ray.init(address=...)``: the cluster's
  own settings, CPUs and authentication (a cluster on 127.0.0.1, e.g. another local
  session, is reached on loopback: Ray would otherwise swap 127.0.0.1 for this machine's
  address). Its workers must be able to import ``router``
  (the same Tandem version installed, or a ``runtime_env``; not done here).

``warm`` (default on) runs one short task per CPU first, so the workers' imports of
``router`` count in the start time (``start_s``) and not in the first real tasks. Ray is
imported only here, when a session starts: ``tandem --help`` does not pay for it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Set for a local session (restored afterwards).
LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_worker_niceness": "0"}


@dataclass
class RaySession:
    """A started Ray: ``ray`` the module, ``local`` whether this process started it,
    ``address`` where it is, ``cpus`` the cluster's CPUs, ``start_s`` wall seconds to
    start (and warm) it, ``temp_dir`` a local session's temp dir."""

    ray: Any
    local: bool
    address: str
    cpus: int
    start_s: float
    temp_dir: str | None


def _warm(_: int) -> float:
    """A worker's first task: import what the capacity jobs run, then hold the CPU a
    moment so that every worker gets one of these tasks."""
    import router.capacity.whatif  # noqa: F401

    time.sleep(0.2)
    return 0.0


def _on_loopback(address: str) -> bool:
    """Whether a Ray address (``host:port``, ``ray://host:port``) is on this machine's loopback."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


@contextmanager
def ray_session(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    temp_dir: str | Path | None = None,
    warm: bool = True,
) -> Iterator[RaySession]:
    """A Ray session for the duration of the block (see the module docstring); Ray is
    shut down at the end (a cluster is only disconnected from). Inside another session of
    this process (Ray allows one connection per process) the block shares that one, whatever
    the arguments, and leaves it running (``start_s`` 0). Raises ``ValueError`` for
    ``num_cpus`` < 1."""
    if num_cpus is not None and num_cpus < 1:
        raise ValueError(f"num_cpus must be at least 1, got {num_cpus}")
    t0 = time.perf_counter()
    running = sys.modules.get("ray")
    if running is not None and running.is_initialized():
        # Ray allows one connection per process: share it, leave it to whoever made it
        yield RaySession(ray=running, local=False, address=running.get_runtime_context().gcs_address,
                         cpus=int(running.cluster_resources().get("CPU", 1)), start_s=0.0, temp_dir=None)
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    saved = {k: os.environ.get(k) for k in (*LOCAL_ENV, "RAY_ADDRESS")}
    loopback = address is None or _on_loopback(address)
    if address is None:
        os.environ.update(LOCAL_ENV)
        os.environ.pop("RAY_ADDRESS", None)
    elif loopback:
        # a driver Ray thinks is on a cluster swaps 127.0.0.1 for this machine's address
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray  # lazily: ~1 s of imports; it reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, then
    from ray._private import ray_constants

    made_dir: str | None = None
    cluster_flag = ray_constants.ENABLE_RAY_CLUSTER
    try:
        if loopback:
            # Ray imported earlier in this process kept the flag it read then: loopback anyway
            ray_constants.ENABLE_RAY_CLUSTER = False
        if address is None:
            if temp_dir is None:
                made_dir = tempfile.mkdtemp(prefix="tandem-ray-")
            tdir = str(temp_dir) if temp_dir is not None else made_dir
            ctx = ray.init(
                address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                _node_ip_address="127.0.0.1", _temp_dir=tdir, log_to_driver=False,
                logging_level="WARNING", configure_logging=False,
            )  # fmt: skip
        else:
            tdir = None
            ctx = ray.init(address=address, log_to_driver=False, logging_level="WARNING", configure_logging=False)
        try:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            if warm:
                task = ray.remote(num_cpus=1)(_warm)
                ray.get([task.remote(i) for i in range(cpus)])
            session = RaySession(
                ray=ray, local=address is None, address=str(getattr(ctx, "address_info", {}).get("address", address)),
                cpus=cpus, start_s=time.perf_counter() - t0, temp_dir=tdir,
            )  # fmt: skip
            yield session
        finally:
            ray.shutdown()
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_flag
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if made_dir is not None:
            shutil.rmtree(made_dir, ignore_errors=True)
