"""A local cluster made by ``tandem up`` for the operator tools' tests.

:func:`tandem_up` is a context manager: it runs ``tandem up --data-dir DIR ARGS…`` as a
subprocess from a directory that is not the repository's root (the example sites ship
with the package), yields a :class:`TandemCluster` read back from the context file the
command wrote, and runs ``tandem down`` on exit — then SIGKILLs whatever the run-state
still names (so a failing test or a broken ``down`` leaves no process behind) and fails
if it had to.

The module fixture ``tandem_cluster`` (registered in ``conftest.py``) is one such cluster
with ``--traffic``: the example sites (lyon, montreal, callpro) over mTLS, etcd, embedded
history, the demo's callers and agents playing at x60, so queues, overflow and metrics
move. Use it read-only (``ctx = load(c.context).current()``, ``c.channel(site)`` as
``operator-admin``, ``c.channel(site, "agents-lyon")``…); a test that needs to change
the cluster or stop it starts its own with :func:`tandem_up`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from router.ctl import context, runstate
from router.local.etcd import etcd_binary

UP_TIMEOUT_S = 120.0
DOWN_TIMEOUT_S = 90.0
# The nodes inherit the environment of `tandem up`: a short drain on SIGTERM keeps the
# tests' `tandem down` quick (a node drains 2 s by default).
ENV = {"TANDEM_DRAIN_S": "0.5"}


def tandem_argv() -> list[str]:
    """The ``tandem`` command of this interpreter (its console script, else ``-m router.cli``)."""
    script = Path(sys.executable).parent / "tandem"
    return [str(script)] if script.exists() else [sys.executable, "-m", "router.cli"]


def tandem(*args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``tandem ARGS…`` from ``cwd`` (environment plus :data:`ENV`); its output
    captured as text."""
    return subprocess.run([*tandem_argv(), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=dict(os.environ, **ENV))


@dataclass
class TandemCluster:
    """What ``tandem up`` made: ``sites`` {site: gRPC address}, ``metrics`` {site:
    host:port}, the context file and its TLS dir and identity."""

    data_dir: Path
    context: Path
    cwd: Path
    sites: dict[str, str]
    metrics: dict[str, str]
    tls_dir: Path
    identity: str
    output: str = ""  # what `tandem up` printed (stdout + stderr)
    _factories: dict = field(default_factory=dict)

    def pids(self) -> dict[str, int]:
        """{label: pid} of the run-state ("etcd", "node lyon", "traffic")."""
        return {label: pid for label, pid, _ in runstate.processes(runstate.load(self.data_dir) or {})}

    def channel(self, site: str, identity: str | None = None):
        """An mTLS channel to ``site``'s node as ``identity`` (a file stem of the TLS dir;
        default the context's operator), checking the server is that site. Closed by
        :meth:`close_channels`."""
        from router.security.tls import ChannelFactory, TlsFiles

        stem = identity or self.identity
        f = self._factories.get(stem)
        if f is None:
            f = self._factories[stem] = ChannelFactory(TlsFiles(self.tls_dir, stem))
        return f.channel(self.sites[site], f.expect("site", site))

    async def close_channels(self) -> None:
        for f in self._factories.values():
            await f.close_all()
        self._factories.clear()


def _kill_leftovers(data_dir: Path) -> list[str]:
    """SIGKILL every process the run-state still names (alive and ours), remove etcd's
    data and the run-state; the labels killed."""
    from router.ctl.up import _remove_etcd_data

    doc = runstate.load(data_dir)
    if doc is None:
        return []
    left = runstate.running(doc)
    for _, pid, _ in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    runstate._wait_gone(left, 5.0)
    _remove_etcd_data(doc)
    runstate.remove(data_dir)
    return [f"{label} (pid {pid})" for label, pid, _ in left]


@contextlib.contextmanager
def tandem_up(data_dir: Path, *args: str, cwd: Path | None = None) -> Iterator[TandemCluster]:
    """``tandem up --data-dir DATA_DIR ARGS…`` from ``cwd`` (default: a fresh directory
    beside DATA_DIR), ``tandem down`` on exit (see the module docstring)."""
    data_dir = Path(data_dir)
    if cwd is None:
        cwd = data_dir.parent / f"{data_dir.name}-cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    try:
        r = tandem("up", "--data-dir", str(data_dir), *args, cwd=cwd, timeout=UP_TIMEOUT_S)
        out = r.stdout + r.stderr
        if r.returncode != 0:
            raise RuntimeError(f"tandem up --data-dir {data_dir} {' '.join(args)} exited {r.returncode}:\n{out}")
        path = data_dir / "tandem.yaml"
        ctx = context.load(path).current()
        cluster = TandemCluster(data_dir=data_dir, context=path, cwd=cwd, sites=dict(ctx.sites),
                                metrics=dict(ctx.metrics), tls_dir=ctx.tls_dir, identity=ctx.identity, output=out)
        yield cluster
    finally:
        down = None
        if runstate.load(data_dir) is not None:  # not stopped by the test itself
            with contextlib.suppress(subprocess.TimeoutExpired):
                down = tandem("down", "--data-dir", str(data_dir), cwd=cwd, timeout=DOWN_TIMEOUT_S)
        killed = _kill_leftovers(data_dir)
        if killed:
            said = "" if down is None else down.stdout + down.stderr
            raise AssertionError(f"tandem down left {', '.join(killed)} running (killed now):\n{said}")


@pytest.fixture(scope="module")
def tandem_cluster(tmp_path_factory) -> Iterator[TandemCluster]:
    """The example cluster with traffic, made by ``tandem up --traffic``, for one test
    module: its nodes and traffic take most of this 2-core machine, so it must not run
    beside the rest of the suite."""
    if not os.access(etcd_binary(), os.X_OK):
        pytest.skip("etcd is not installed (Debian etcd-server)")
    root = tmp_path_factory.mktemp("tandem-up")
    with tandem_up(root / "cluster", "--traffic", cwd=root / "elsewhere") as c:
        yield c
