"""A real network partition for cluster tests: Linux network namespaces and veth pairs.

Topology (one per test, every name and subnet unique to the run)::

    root namespace (the test, etcd, site A)            namespace NS (site B)
      vc-r 10.77.N.1/30  <------- cluster link ------->  vc-b 10.77.N.2/30
      va-r 10.77.N.5/30  <------- access link -------->  va-b 10.77.N.6/30
                                                          lo (up)

* The **cluster link** carries everything between B and the rest of the cluster: etcd
  (listening on 10.77.N.1), site A (listening on 10.77.N.1) and B's advertised address
  (10.77.N.2). :meth:`NetnsTopology.cut` sets B's end of it down; :meth:`heal` brings
  it back up.
* The **access link** stands for B's own callers and agent desktops: the test reaches
  B's gRPC port at 10.77.N.6 through it, also while B is cut off from the cluster.
  Nothing routes between the two links (no default route in NS; the root namespace
  does not forward), so a cut link really isolates B from etcd and A.
* A guard route ``unreachable 10.77.N.0/24`` in the root namespace keeps any packet for
  the test subnet off the host's default route when a link is down.

Only private addresses on interfaces created here are used; :meth:`close` kills every
process left in the namespace (by pid, ``ip netns pids``), deletes the namespace (and
with it both veth pairs) and the guard route. Leftovers of a run that was SIGKILLed
(namespace named after a pid that no longer exists) are removed by the next run.

* :func:`netns_topology` — context manager; skips the test (``pytest.skip``) with the
  reason when the machine cannot create namespaces (not root, no ``ip``, no netns).
* :class:`HostEtcd` — :class:`etcd_fixtures.EtcdServer` whose client URL is on a given
  address instead of 127.0.0.1.
* :func:`start_node` — a ``tandem node`` process, in the root namespace or in NS
  (``ip netns exec``), with its listen and advertise addresses; returns a
  :class:`node_fixtures.NodeProc` whose ``address`` is the one given as ``reach``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from etcd_fixtures import EtcdServer
from node_fixtures import REPO, NodeProc

IP = shutil.which("ip") or "/usr/sbin/ip"
NS_PREFIX = "tandem-b-"
GUARD_PROTO = "177"  # routing protocol number that marks our guard routes
_NS_RE = re.compile(rf"^{re.escape(NS_PREFIX)}(\d+)-[0-9a-f]+$")
_LISTEN = re.compile(rb"tandem node (\S+) listening on (\S+):(\d+)\s")


def ip(*args: str, check: bool = True, netns: str | None = None) -> subprocess.CompletedProcess:
    cmd = [IP, *(("-n", netns) if netns else ()), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_ns_pids(ns: str, timeout: float = 5.0) -> None:
    """SIGKILL every process still in namespace ``ns`` (by pid) and wait until none is."""
    deadline = time.monotonic() + timeout
    while True:
        out = ip("netns", "pids", ns, check=False)
        pids = [int(p) for p in out.stdout.split() if p.isdigit()] if out.returncode == 0 else []
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _cleanup_stale() -> None:
    """Remove namespaces of earlier runs whose process is gone, and guard routes whose
    subnet no interface holds any more."""
    out = ip("netns", "list", check=False)
    for line in out.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NS_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _kill_ns_pids(name)
            ip("netns", "del", name, check=False)
    addrs = ip("-4", "-o", "addr", "show", check=False).stdout
    for line in ip("-4", "route", "show", "proto", GUARD_PROTO, check=False).stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "unreachable":
            net = ipaddress.ip_network(parts[1], strict=False)
            held = any(ipaddress.ip_address(a.split("/")[0]) in net
                       for a in re.findall(r"inet (\S+)", addrs))
            if not held:
                ip("route", "del", "unreachable", parts[1], "proto", GUARD_PROTO, check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.77.N.0/24 that nothing in the root namespace uses (no address, no route)."""
    used = ip("-4", "-o", "addr", "show", check=False).stdout + ip("-4", "route", "show", "table", "all",
                                                                     check=False).stdout
    candidates = list(range(1, 255))
    random.shuffle(candidates)
    for n in candidates:
        if f"10.77.{n}." not in used:
            return ipaddress.ip_network(f"10.77.{n}.0/24")
    raise RuntimeError("no free 10.77.N.0/24 subnet for the partition test")


@dataclass
class NetnsTopology:
    ns: str
    subnet: ipaddress.IPv4Network
    core_ip: str  # root end of the cluster link: etcd and site A listen here
    b_ip: str  # B's end of the cluster link: B's advertised address
    host_ip: str  # root end of the access link
    b_access_ip: str  # B's end of the access link: the test reaches B here
    vc_root: str
    vc_b: str
    va_root: str
    va_b: str
    cut_at: float | None = None

    def exec_argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace (``ip netns exec`` execs it: same pid)."""
        return [IP, "netns", "exec", self.ns, *argv]

    def cut(self) -> None:
        """B loses the cluster link (its end goes down): etcd and A become unreachable
        for B (no route), B's advertised address a black hole for A."""
        ip("link", "set", self.vc_b, "down", netns=self.ns)
        self.cut_at = time.monotonic()

    def heal(self, timeout: float = 5.0) -> None:
        ip("link", "set", self.vc_b, "up", netns=self.ns)
        self.cut_at = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # carrier and the connected route back
            route = ip("-4", "route", "show", "dev", self.vc_b, netns=self.ns, check=False).stdout
            state = ip("-o", "link", "show", self.vc_root, check=False).stdout
            if route.strip() and "LOWER_UP" in state and "NO-CARRIER" not in state:
                return
            time.sleep(0.05)
        raise AssertionError(f"cluster link {self.vc_root}<->{self.vc_b} did not come back within {timeout} s")

    def close(self) -> None:
        _kill_ns_pids(self.ns)
        ip("netns", "del", self.ns, check=False)  # takes both veth pairs with it
        for dev in (self.vc_root, self.va_root):  # in case the namespace never got them
            if ip("link", "show", dev, check=False).returncode == 0:
                ip("link", "del", dev, check=False)
        ip("route", "del", "unreachable", str(self.subnet), "proto", GUARD_PROTO, check=False)


def _probe_netns() -> str | None:
    """Why namespaces cannot be used here (None: they can)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if not (os.path.exists(IP) and os.access(IP, os.X_OK)):
        return "iproute2 (ip) not installed"
    if os.geteuid() != 0:
        return "creating network namespaces and veth pairs needs root"
    return None


@contextlib.contextmanager
def netns_topology() -> Iterator[NetnsTopology]:
    """See the module docstring. Skips the test when namespaces are unavailable."""
    why = _probe_netns()
    if why:
        pytest.skip(why)
    _cleanup_stale()
    tok = f"{os.getpid()}-{random.getrandbits(24):06x}"
    short = f"{os.getpid() % 4096:03x}{random.getrandbits(16):04x}"  # interface names: <= 15 chars
    ns = f"{NS_PREFIX}{tok}"
    probe = ip("netns", "add", ns, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace ({probe.stderr.strip()})")
    subnet = _free_subnet()
    base = subnet.network_address
    topo = NetnsTopology(
        ns=ns, subnet=subnet,
        core_ip=str(base + 1), b_ip=str(base + 2), host_ip=str(base + 5), b_access_ip=str(base + 6),
        vc_root=f"vc{short}r", vc_b=f"vc{short}b", va_root=f"va{short}r", va_b=f"va{short}b",
    )  # fmt: skip
    try:
        ip("link", "set", "lo", "up", netns=ns)
        for r, b, rip, bip in ((topo.vc_root, topo.vc_b, topo.core_ip, topo.b_ip),
                               (topo.va_root, topo.va_b, topo.host_ip, topo.b_access_ip)):
            try:
                ip("link", "add", r, "type", "veth", "peer", "name", b, "netns", ns)
            except RuntimeError as e:
                pytest.skip(f"cannot create a veth pair: {e}")
            ip("addr", "add", f"{rip}/30", "dev", r)
            ip("link", "set", r, "up")
            ip("addr", "add", f"{bip}/30", "dev", b, netns=ns)
            ip("link", "set", b, "up", netns=ns)
        ip("route", "add", "unreachable", str(subnet), "metric", "4242", "proto", GUARD_PROTO)
        # Both links carry traffic before anything starts.
        deadline = time.monotonic() + 5
        while True:
            states = [ip("-o", "link", "show", d, check=False).stdout for d in (topo.vc_root, topo.va_root)]
            if all("LOWER_UP" in s and "NO-CARRIER" not in s for s in states):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"veth links did not come up: {states}")
            time.sleep(0.05)
        yield topo
    finally:
        topo.close()


# --- etcd and nodes on those addresses -------------------------------------------------


class HostEtcd(EtcdServer):
    """A single-member etcd whose client URL is on ``host`` (peer URL stays on loopback)."""

    def __init__(self, data_dir: Path, host: str) -> None:
        super().__init__(data_dir)
        self.host = host

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def _args(self) -> list[str]:
        old = f"//127.0.0.1:{self.client_port}"
        return [a.replace(old, f"//{self.host}:{self.client_port}") for a in super()._args()]


# A node dies with the test process (PR_SET_PDEATHSIG through util-linux setpriv: a
# preexec_fn in a process with gRPC threads can crash the child between fork and exec).
SETPRIV = shutil.which("setpriv")


def start_node(
    site_file: Path, data_dir: Path, *, listen: str, reach: str | None = None, advertise: str | None = None,
    env: dict | None = None, topo: NetnsTopology | None = None, timeout: float = 30.0,
) -> NodeProc:
    """Start ``tandem node`` (in ``topo``'s namespace if given) and wait for its
    "listening on" line. ``reach``: the host the test dials (default: the listening
    host); the returned NodeProc's ``address`` is ``reach:port``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"{data_dir.name}.log"
    run_env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}  # no proxy for 10.77.x.y
    run_env.update(PYTHONUNBUFFERED="1", TANDEM_DRAIN_S="0.2")
    run_env.update(env or {})
    argv = [sys.executable, "-m", "router.cli", "node", "--site", str(site_file), "--data-dir", str(data_dir),
            "--listen", listen, "--sync", "none", "--insecure",  # a netns of the test's own
            *(("--advertise", advertise) if advertise else ())]
    if SETPRIV:
        argv = [SETPRIV, "--pdeathsig", "KILL", "--", *argv]
    if topo is not None:
        argv = topo.exec_argv(argv)
    with open(log_path, "ab") as log:
        offset = log.tell()
        proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=run_env)
    np = NodeProc(proc, log_path)
    deadline = time.monotonic() + timeout
    while True:
        with open(log_path, "rb") as f:
            f.seek(offset)
            m = _LISTEN.search(f.read())
        if m:
            np.host, np.port = reach or m.group(2).decode(), int(m.group(3))
            return np
        if not np.alive():
            raise AssertionError(f"node exited with {proc.returncode} before listening:\n{np.log()}")
        if time.monotonic() > deadline:
            np.kill()
            raise AssertionError(f"node did not listen within {timeout} s:\n{np.log()}")
        time.sleep(0.02)
