"""Site-node fixtures and helpers, reusable by any test module.

* :func:`make_site` — a small test site built in code (three queues, five agents).
* :func:`running_node` — async context manager: an in-process node (``build_node`` on
  127.0.0.1:0, journal in a temp dir) with a channel and stubs, stopped on exit.
* :func:`node_process` — context manager: a real ``tandem node`` process on a free port
  (the port is read from its "listening on" line); yields a :class:`NodeProc` with
  ``address``, ``kill()`` (SIGKILL) and ``terminate()`` (SIGTERM + wait).
* :func:`error_reason` — the google.rpc.ErrorInfo reason of a failed call.

The pytest fixtures (``node``, ``site``) are registered in ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterator

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router.config import SiteConfig, parse_site
from router.status import DOMAIN, error_info
from router.v1 import admin_pb2, agents_pb2, routing_pb2
from router.v1 import types_pb2 as t
from router.v1 import (
    admin_pb2_grpc,
    agents_pb2_grpc,
    diagnostics_pb2_grpc,
    routing_pb2_grpc,
)

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

TEST_SITE = {
    "site": {"name": "testsite", "region": "emea", "kind": "inhouse"},
    "routing": {
        "head_start_s": {"standard": 0, "repeat": 30, "whitelist": 60, "vip": 120},
        "agent_selection": "longest_idle",
        "offer_timeout_s": 10,
        "repeat_window_h": 24,
        "blacklist_action": "reject",
    },
    "queues": [
        {"name": "billing-fr-voice", "skill": "billing", "channel": "voice", "language": "fr", "wrap_up_s": 0.5},
        {"name": "billing-en-voice", "skill": "billing", "channel": "voice", "language": "en", "wrap_up_s": 5},
        {"name": "support-chat", "skill": "support", "channel": "chat", "wrap_up_s": 1},
    ],
    "lists": {"vip": ["+33600000001"], "whitelist": ["+33600000002"], "blacklist": ["+33600000666"]},
    "agents": [
        {"id": "fr", "count": 3, "skills": {"billing": 8, "support": 5}, "languages": ["fr"],
         "capacity": {"voice": 1, "chat": 2}},
        {"id": "bi", "count": 2, "skills": {"billing": 6, "support": 6}, "languages": ["fr", "en"],
         "capacity": {"voice": 1, "chat": 3}},
    ],
}


def site_dict(**routing: object) -> dict:
    """The test site as a dict; ``routing`` keys override its routing section."""
    d = yaml.safe_load(yaml.safe_dump(TEST_SITE))
    d["routing"].update(routing)
    return d


def make_site(**routing: object) -> SiteConfig:
    return parse_site(site_dict(**routing), "<test site>")


def write_site(path: Path, **routing: object) -> Path:
    path.write_text(yaml.safe_dump(site_dict(**routing)))
    return path


def error_reason(err: grpc.RpcError) -> str | None:
    """ErrorInfo.reason of a failed call (None if the status carries none)."""
    info = error_info(err)
    if info is None:
        return None
    assert info.domain == DOMAIN, info
    return info.reason


@dataclass
class Stubs:
    channel: grpc.aio.Channel
    routing: routing_pb2_grpc.RoutingStub
    agents: agents_pb2_grpc.AgentsStub
    admin: admin_pb2_grpc.AdminStub
    diag: diagnostics_pb2_grpc.DiagnosticsStub
    health: health_pb2_grpc.HealthStub

    @classmethod
    def connect(cls, address: str) -> "Stubs":
        ch = grpc.aio.insecure_channel(address)
        return cls(
            ch,
            routing_pb2_grpc.RoutingStub(ch),
            agents_pb2_grpc.AgentsStub(ch),
            admin_pb2_grpc.AdminStub(ch),
            diagnostics_pb2_grpc.DiagnosticsStub(ch),
            health_pb2_grpc.HealthStub(ch),
        )

    async def healthy(self, service: str = "") -> bool:
        r = await self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return r.status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class InProcessNode:
    node: object  # router.node.node.Node
    port: int
    data_dir: Path
    stubs: Stubs

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def running_node(
    site: SiteConfig | None = None, data_dir: Path | None = None, **kw: object
) -> AsyncIterator[InProcessNode]:
    """An in-process node on 127.0.0.1:0 (``sync="none"`` unless given); stopped on exit.
    Extra keywords go to ``build_node`` (drain_s, max_watchers, compact_every, sync…)."""
    from router.node.server import build_node

    kw.setdefault("sync", "none")
    kw.setdefault("drain_s", 0.2)
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tandem-node-")))
        node, port = await build_node(site or make_site(), data_dir, "127.0.0.1:0", **kw)
        await node.start()
        stubs = Stubs.connect(f"127.0.0.1:{port}")
        try:
            yield InProcessNode(node, port, Path(data_dir), stubs)
        finally:
            await stubs.channel.close()
            await node.stop(grace=0.2)


# --- real processes ----------------------------------------------------------------------

_LISTEN = re.compile(rb"tandem node (\S+) listening on (\S+):(\d+)\s")


@dataclass
class NodeProc:
    proc: subprocess.Popen
    log_path: Path
    host: str = "127.0.0.1"
    port: int = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.alive():
            self.proc.kill()
        self.proc.wait()

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; SIGKILL if it is still alive after ``timeout``."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"node did not exit within {timeout} s of SIGTERM:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


def start_node_process(
    site_file: Path, data_dir: Path, *, sync: str = "fdatasync", env: dict | None = None,
    timeout: float = 30.0,
) -> NodeProc:
    """Start ``tandem node`` (as ``python -m router.cli node``) on 127.0.0.1:0 and wait
    for its "listening on" line."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"{data_dir.name}.log"
    run_env = dict(os.environ)
    run_env["PYTHONUNBUFFERED"] = "1"
    run_env.setdefault("TANDEM_DRAIN_S", "1.0")
    run_env.update(env or {})
    log = open(log_path, "ab")
    offset = log.tell()
    proc = subprocess.Popen(
        [PYTHON, "-m", "router.cli", "node", "--site", str(site_file), "--data-dir", str(data_dir),
         "--listen", "127.0.0.1:0", "--sync", sync],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=run_env,
    )
    log.close()
    np = NodeProc(proc, log_path)
    deadline = time.monotonic() + timeout
    while True:
        with open(log_path, "rb") as f:
            f.seek(offset)
            m = _LISTEN.search(f.read())
        if m:
            np.host, np.port = m.group(2).decode(), int(m.group(3))
            return np
        if not np.alive():
            raise AssertionError(f"node exited with {proc.returncode} before listening:\n{np.log()}")
        if time.monotonic() > deadline:
            np.kill()
            raise AssertionError(f"node did not listen within {timeout} s (slow machine? raise timeout):\n{np.log()}")
        time.sleep(0.02)


@contextlib.contextmanager
def node_process(site_file: Path, data_dir: Path, **kw: object) -> Iterator[NodeProc]:
    """A real node process for the body of the ``with``; SIGKILLed at exit if still alive
    (tests that want a clean stop call ``terminate()`` themselves)."""
    np = start_node_process(site_file, data_dir, **kw)
    try:
        yield np
    finally:
        np.kill()


# --- agent desktop -----------------------------------------------------------------------


class AgentSession:
    """An agent's Connect stream, as a desktop would hold it (test helper)."""

    def __init__(self, stubs: Stubs, agent_id: str) -> None:
        from router.v1 import agents_pb2

        self._pb = agents_pb2
        self.agent_id = agent_id
        self.call = stubs.agents.Connect()
        self.seen: list = []

    async def hello(self) -> "AgentSession":
        await self.call.write(self._pb.AgentMessage(hello=self._pb.Hello(agent_id=self.agent_id)))
        return self

    async def next(self, kind: str | None = None, pred=None, timeout: float = 5.0):
        """The next NodeMessage (of ``kind``, matching ``pred``), skipping others;
        returns the inner message (Assignment, Agent, …)."""
        import asyncio

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind} message within {timeout} s; seen {self.seen}")
            try:
                msg = await asyncio.wait_for(self.call.read(), left)
            except asyncio.TimeoutError:
                raise AssertionError(f"no {kind} message within {timeout} s; seen {self.seen}") from None
            if msg is grpc.aio.EOF:
                raise AssertionError(f"stream ended while waiting for {kind}; seen {self.seen}")
            k = msg.WhichOneof("kind")
            inner = getattr(msg, k)
            self.seen.append((k, inner))
            if (kind is None or k == kind) and (pred is None or pred(inner)):
                return inner

    async def accept(self, assignment_id: str) -> None:
        await self.call.write(self._pb.AgentMessage(accept=self._pb.Accept(assignment_id=assignment_id)))

    async def reject(self, assignment_id: str, reason: str = "busy") -> None:
        await self.call.write(
            self._pb.AgentMessage(reject=self._pb.Reject(assignment_id=assignment_id, reason=reason))
        )

    def cancel(self) -> None:
        self.call.cancel()


async def answering_agent(stubs: Stubs, agent_id: str, answered: list[str]) -> None:
    """Sign in, go READY, then accept every offer and complete the call at once."""
    await stubs.agents.SignIn(agents_pb2.SignInRequest(agent_id=agent_id), timeout=5)
    session = await AgentSession(stubs, agent_id).hello()
    await stubs.agents.SetState(agents_pb2.SetStateRequest(agent_id=agent_id, state=t.AGENT_STATE_READY), timeout=5)
    try:
        while True:
            a = await session.next("assignment", timeout=3600)
            await session.accept(a.assignment_id)
            await session.next("connected", lambda c: c.assignment_id == a.assignment_id, timeout=10)
            answered.append(a.call.call_id)
            await stubs.routing.CompleteCall(routing_pb2.CompleteCallRequest(call_id=a.call.call_id), timeout=5)
    finally:
        session.cancel()


async def all_calls(stubs: Stubs) -> dict[str, int]:
    out, token = {}, ""
    while True:
        r = await stubs.admin.ListCalls(admin_pb2.ListCallsRequest(page_size=1000, page_token=token), timeout=5)
        out.update({c.call_id: c.state for c in r.calls})
        token = r.next_page_token
        if not token:
            return out


async def until(pred, timeout: float, what: str, step: float = 0.05):
    """Await ``pred()`` until it is truthy (returned) or ``timeout`` seconds pass
    (AssertionError naming ``what``)."""
    deadline = time.monotonic() + timeout
    while True:
        v = await pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(step)
