"""Run ``tandem node`` processes for the demo, the load tests and the benchmark.

:func:`running_nodes` is a context manager: it starts one node per site file, each on a
free loopback port (``--listen 127.0.0.1:0``; the port is read back from the node's
``tandem node NAME listening on HOST:PORT`` line, so there is no bind race), waits until
every node has said it listens, yields ``{site name: NodeProcess}`` and, on exit, stops
them all: SIGTERM, then SIGKILL for any node still alive after ``stop_timeout`` seconds.
A node's stdout and stderr go to ``DATA_DIR/node.log``; a node that fails to start raises
:class:`NodeStartError` quoting the end of that log.

Nodes run in their own session (a Ctrl-C in the terminal reaches the demo, which stops
them in order) and, on Linux, get SIGTERM if the process that started them dies, so a
killed demo leaves no node behind (``spawn_node(..., detach=True)``, what ``tandem up``
uses, leaves that out: the node outlives the process that started it). That parent-death
signal is set by a wrapper the node is started through (:func:`pdeathsig_argv`:
util-linux ``setpriv --pdeathsig``, or a three-line Python ``prctl`` + ``execv`` where
setpriv is missing), never by a ``preexec_fn``: Python code between fork and exec can
crash the child (SIGSEGV) when the parent already runs gRPC's threads, as the demo and
the benchmarks do.

Note: Linux sends the parent-death signal when the *thread* that forked the child exits;
start nodes from a thread that lives as long as they should (the main thread does).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import yaml

_LISTEN_RE = re.compile(r"tandem node (\S+) listening on (\S+):(\d+)\s")
_METRICS_RE = re.compile(r"tandem node (\S+) metrics on (\S+):(\d+)\s")
_PR_SET_PDEATHSIG = 1


class NodeStartError(RuntimeError):
    """A node exited or stayed silent instead of announcing its address."""


@dataclass
class NodeProcess:
    """One running node: its site name, gRPC address and process."""

    name: str
    site_file: Path
    data_dir: Path
    proc: subprocess.Popen
    host: str = "127.0.0.1"
    port: int = 0
    log_path: Path = field(default_factory=Path)
    log_offset: int = 0  # where this run's output starts in a reused log
    metrics: str = ""  # host:port of its Prometheus endpoint, when wait_listening(metrics=True) read it

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL now (crash tests); waits for the process to be reaped."""
        if self.alive():
            self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; returns the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


# Sets PR_SET_PDEATHSIG, gives up if the parent is already gone, then becomes the command.
_PDEATHSIG_WRAPPER = (
    "import ctypes,os,signal,sys\n"
    "try: ctypes.CDLL(None, use_errno=True).prctl(%d, signal.SIGTERM)\n"
    "except (OSError, AttributeError): pass\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(0)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
) % _PR_SET_PDEATHSIG


def pdeathsig_argv(cmd: list[str]) -> list[str]:
    """``cmd`` wrapped so that the process gets SIGTERM when its parent dies (Linux;
    elsewhere ``cmd`` unchanged). ``cmd[0]`` must be an absolute path."""
    if not sys.platform.startswith("linux"):
        return list(cmd)
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        return [setpriv, "--pdeathsig", "TERM", "--", *cmd]
    return [sys.executable, "-c", _PDEATHSIG_WRAPPER, str(os.getpid()), *cmd]


def site_name(site_file: Path) -> str:
    """The ``site.name`` of a site file (without validating the rest)."""
    data = yaml.safe_load(Path(site_file).read_text())
    return str(data["site"]["name"])


def spawn_node(
    site_file: Path,
    data_dir: Path,
    *,
    listen: str = "127.0.0.1:0",
    extra_args: Iterable[str] = (),
    env: dict[str, str] | None = None,
    detach: bool = False,
) -> NodeProcess:
    """Start one node (does not wait for it); see :func:`wait_listening`. ``detach``: no
    parent-death signal, the node outlives the process that started it (``tandem up``)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "node.log"
    cmd = [
        sys.executable, "-m", "router.cli", "node",
        "--site", str(site_file), "--data-dir", str(data_dir), "--listen", listen,
        *extra_args,
    ]
    run_env = dict(os.environ if env is None else env)
    run_env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log_path, "ab") as log:
        offset = log.tell()
        # No preexec_fn (see the module docstring): the wrapper sets the death signal.
        proc = subprocess.Popen(
            cmd if detach else pdeathsig_argv(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=run_env,
            start_new_session=True,
        )
    return NodeProcess(
        site_name(site_file), Path(site_file), data_dir, proc, log_path=log_path, log_offset=offset
    )


def wait_listening(nodes: Iterable[NodeProcess], timeout: float = 30.0, *, metrics: bool = False) -> None:
    """Block until every node printed its listening line (sets host/port); with
    ``metrics``, also its ``tandem node NAME metrics on HOST:PORT`` line (sets metrics)."""
    # Keyed by position, not by name: several nodes may serve the same site file.
    pending = dict(enumerate(nodes))
    deadline = time.monotonic() + timeout
    while pending:
        for key, node in list(pending.items()):
            name = node.name
            try:
                with open(node.log_path, "rb") as f:
                    f.seek(node.log_offset)
                    text = f.read().decode(errors="replace")
            except OSError:
                text = ""
            m = _LISTEN_RE.search(text)
            mm = _METRICS_RE.search(text) if metrics else None
            if m and (mm or not metrics):
                node.host, node.port = m.group(2).strip("[]"), int(m.group(3))
                if mm:
                    node.metrics = f"{mm.group(2).strip('[]')}:{mm.group(3)}"
                del pending[key]
                continue
            if not node.alive():
                raise NodeStartError(
                    f"node {name} exited with code {node.proc.returncode} before listening; "
                    f"log {node.log_path}:\n{node.log_tail()}"
                )
        if not pending:
            break
        if time.monotonic() > deadline:
            names = ", ".join(sorted(n.name for n in pending.values()))
            tails = "\n".join(f"--- {n.log_path}\n{n.log_tail()}" for n in pending.values())
            raise NodeStartError(
                f"node(s) {names} did not print 'listening on' within {timeout:.0f} s "
                f"(raise startup_timeout if the machine is slow):\n{tails}"
            )
        time.sleep(0.05)


def stop_nodes(nodes: Iterable[NodeProcess], timeout: float = 10.0) -> dict[str, int]:
    """SIGTERM every node at once, then SIGKILL those still alive after ``timeout``."""
    nodes = list(nodes)
    for n in nodes:
        if n.alive():
            with contextlib.suppress(ProcessLookupError):
                n.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    codes: dict[str, int] = {}
    for n in nodes:
        try:
            codes[n.name] = n.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                n.proc.kill()
            codes[n.name] = n.proc.wait()
    return codes


@contextlib.contextmanager
def running_nodes(
    site_files: Iterable[Path],
    data_root: Path,
    *,
    extra_args: Iterable[str] = (),
    startup_timeout: float = 30.0,
    stop_timeout: float = 10.0,
) -> Iterator[dict[str, NodeProcess]]:
    """Start a node per site file (data in ``data_root/<site name>``), yield them by
    site name, stop them all on exit — also when the body raises or is interrupted."""
    started: list[NodeProcess] = []
    extra = list(extra_args)
    try:
        for f in site_files:
            name = site_name(Path(f))
            started.append(spawn_node(Path(f), Path(data_root) / name, extra_args=extra))
        wait_listening(started, startup_timeout)
        yield {n.name: n for n in started}
    finally:
        stop_nodes(started, stop_timeout)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
