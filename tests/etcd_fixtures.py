"""etcd for tests: a real server (Debian's ``/usr/bin/etcd``) on free loopback ports.

* :class:`EtcdServer` — one etcd process: client and peer ports on 127.0.0.1, data dir
  in a temp dir on tmpfs when there is one (etcd 3.4 has no ``--unsafe-no-fsync``, and
  fsync is slow on these machines). ``kill()`` / ``stop()`` / ``start()`` restart it on
  the same ports and data dir; ``pause()`` / ``resume()`` freeze it (SIGSTOP/SIGCONT):
  connections stay open but nothing answers, like a partition.
* :func:`etcd_server` — context manager around it.
* Fixtures (registered in ``conftest.py``): ``etcd`` (session-scoped, shared; or the
  cluster named by ``TANDEM_TEST_ETCD_ENDPOINTS``, comma-separated), ``own_etcd``
  (a private server a test may stop, freeze and restart), ``etcd_prefix`` (a unique
  key prefix per test) and ``etcd_settings`` (EtcdSettings for both).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from router.local import etcd as etcdproc
from router.local.etcd import free_port  # noqa: F401 - re-exported for the tests

ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


class EtcdServer(etcdproc.EtcdServer):
    """router.local.etcd's server, plus what tests do to it: freeze it, run etcdctl."""

    def pause(self) -> None:
        """SIGSTOP: the ports stay open, nothing answers. Returns once every thread of
        etcd is stopped (a request sent right after the signal could still be served)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 2.0
        task_dir = Path(f"/proc/{self.proc.pid}/task")
        while time.monotonic() < deadline:
            try:
                states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in task_dir.iterdir()]
            except OSError:
                states = []
            if states and all(st in ("T", "t") for st in states):
                return
            time.sleep(0.005)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def etcdctl(self, *args: str, check: bool = True) -> str:
        """Run etcdctl against this server; returns stdout."""
        return etcdctl(self.endpoints, *args, check=check)


def etcdctl(endpoints: tuple[str, ...], *args: str, check: bool = True) -> str:
    env = dict(os.environ, ETCDCTL_API="3")
    out = subprocess.run(
        [ETCDCTL, "--endpoints", ",".join(endpoints), "--dial-timeout", "2s", "--command-timeout", "3s", *args],
        capture_output=True, text=True, env=env, timeout=10,
    )
    if check and out.returncode != 0:
        raise RuntimeError(f"etcdctl {' '.join(args)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


def _tmp_root() -> Path:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


def make_tls(directory: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate
    (openssl CLI, EC P-256, valid one day). Returns their paths."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed (Debian package openssl)")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=d)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=tandem-test-ca")
    for name, usage, san in (("server", "serverAuth", "IP:127.0.0.1,DNS:localhost"),
                             ("client", "clientAuth", "DNS:tandem-node")):
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")
    return {"ca": d / "ca.pem", "server_cert": d / "server.pem", "server_key": d / "server.key",
            "client_cert": d / "client.pem", "client_key": d / "client.key"}


@contextlib.contextmanager
def etcd_server(tls: bool = False) -> Iterator[EtcdServer]:
    """A running etcd in a fresh temp dir (TLS with client certificates if ``tls``),
    killed and removed on exit."""
    root = Path(tempfile.mkdtemp(prefix="tandem-etcd-", dir=_tmp_root()))
    server = EtcdServer(root / "data", tls=make_tls(root / "tls") if tls else None)
    try:
        server.start()
        yield server
    finally:
        server.kill()
        shutil.rmtree(root, ignore_errors=True)


class ExternalEtcd:
    """An etcd cluster the test run did not start (TANDEM_TEST_ETCD_ENDPOINTS)."""

    def __init__(self, endpoints: tuple[str, ...]) -> None:
        self.endpoints = endpoints
        self.endpoint = endpoints[0]

    def etcdctl(self, *args: str, check: bool = True) -> str:
        return etcdctl(self.endpoints, *args, check=check)


@pytest.fixture(scope="session")
def etcd():
    """The shared etcd of the test session (never stopped by a test)."""
    env = os.environ.get("TANDEM_TEST_ETCD_ENDPOINTS", "").strip()
    if env:
        yield ExternalEtcd(tuple(e.strip() for e in env.split(",") if e.strip()))
        return
    with etcd_server() as server:
        yield server


@pytest.fixture
def own_etcd():
    """A private etcd for tests that stop, freeze or restart it."""
    with etcd_server() as server:
        yield server


@pytest.fixture
def etcd_prefix(request) -> str:
    """A key prefix no other test uses."""
    return f"/tandem-test/{uuid.uuid4().hex[:12]}/"


@pytest.fixture
def etcd_settings(etcd, etcd_prefix):
    """EtcdSettings for the shared etcd under this test's prefix (short TTL: 2 s)."""
    from router.coord.link import EtcdSettings

    return EtcdSettings(endpoints=etcd.endpoints, prefix=etcd_prefix, ttl_s=2, op_timeout_s=1.0)


# --- a coordinator in its own process (for kill / freeze tests) ------------------------

_CHILD = r'''
import asyncio, json, sys
from router.coord.etcd import EtcdCoordinator, EtcdSettings, Member, NotLeader, CoordinationUnavailable
from router.overflow import LoadSnapshot

def say(**kw):
    print(json.dumps(kw), flush=True)

async def main():
    endpoints, prefix, site, ttl, elect = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
    coord = EtcdCoordinator(site, EtcdSettings(endpoints=tuple(endpoints.split(",")), prefix=prefix, ttl_s=ttl,
                                               op_timeout_s=1.0))
    await coord.start()
    await coord.wait_ready(10)
    await coord.register(Member(site, "127.0.0.1:1", "emea"))
    coord.publish_load(LoadSnapshot(site=site, region="emea"))
    lead = await coord.campaign("rebalancer", site, timeout=10) if elect else None
    say(event="ready", lease=coord.session.lease_id, token=lead.token if lead else 0)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        cmd = line.strip()
        if cmd in ("", "exit"):
            break
        if cmd == "targets":
            try:
                rev = await coord.put_targets(site, {"agents": 1}, lead)
                say(event="targets", ok=True, revision=rev)
            except NotLeader as e:
                say(event="targets", ok=False, error="NotLeader", message=str(e))
            except CoordinationUnavailable as e:
                say(event="targets", ok=False, error="CoordinationUnavailable", message=str(e))
        elif cmd == "status":
            say(event="status", connected=coord.connected, leader_active=bool(lead and lead.active))
    await coord.close()

asyncio.run(main())
'''


class CoordProcess:
    """A coordinator for ``site`` in a child process: registered, load published,
    optionally elected rebalancer leader. ``ready`` holds its first status line."""

    def __init__(self, endpoints: tuple[str, ...], prefix: str, site: str, ttl_s: int = 2, elect: bool = False) -> None:
        repo = Path(__file__).resolve().parent.parent
        env = dict(os.environ, PYTHONPATH=str(repo))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD,
             ",".join(endpoints), prefix, site, str(ttl_s), "1" if elect else "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=repo,
        )
        self.ready = self.read()
        if self.ready.get("event") != "ready":
            raise RuntimeError(f"coordinator child failed: {self.ready}")

    def read(self, timeout: float = 20.0) -> dict:
        import select

        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if r else ""
        if not line:
            self.proc.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            return {"event": "failed", "stderr": err[-2000:]}
        return json.loads(line)

    def send(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            try:
                self.proc.stdin.write("exit\n")
                self.proc.stdin.flush()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f:
                f.close()
