"""Twenty sites on one etcd: load-publishing writes, overflow decision latency, load propagation.

One throw-away etcd (Debian's etcd 3.4 through :func:`router.local.etcd.etcd_server`,
data on tmpfs) and ``sites`` ``tandem node --etcd`` processes (``--sync none``: the
journal's fsync is not what is measured here), sites made in code. Overflow is on for
the whole cluster (``wait_threshold`` × 1.0 and a 33 % ``margin``, as the demo's policy):

* ``s00`` — the *origin*: no agent signed in, so every call offered there queues with an
  unbounded expected wait and is decided for overflow against its 19 peers;
* ``s01`` … ``s(N-2)`` — *peers*: ``agents`` agents each (played by this process:
  they accept every offer and complete each call ``talk_s`` seconds after it connected),
  so transferred calls queue there while the agents talk, each peer's expected wait
  rises with its queue, and the origin spreads its calls over all its peers — every
  peer's load keeps changing, as in a busy cluster;
* ``s(N-1)`` — the *probe* site: no agent, no traffic except the propagation probes.

Calls are offered at the origin at ``rate``/s (open loop; default 10/s against 19 peers
answering 1/3 call/s each: the peers' queues grow) for ``seconds`` after a warm-up.
Measured in that window, all in the same run:

* ``etcd_writes_per_s`` — from etcd's own ``/metrics``: the increase of
  ``etcd_debugging_mvcc_put_total + etcd_debugging_mvcc_delete_total`` (keys written)
  over the window, per second; ``etcd_revisions_per_s`` the increase of
  ``etcd_debugging_mvcc_current_revision`` (write transactions). ``load_puts_per_s``:
  the puts under ``load/`` seen by this process's own watch (the share of the writes
  that is load publishing), ``load_puts_per_s_by_role`` per origin / peer / probe site.
* ``node_decision_p99_le_ms`` (and ``_p50_le_ms``, ``node_decision_over_5ms``) — the
  origin's own ``tandem_overflow_decision_seconds{kind="offer"}`` over the window: the
  time one decision holds the event loop (peer loads, policy, ``decide``, the record and
  its log line, the transfer task started), as the bucket bound of the quantile
  (buckets 0.1, 0.2, 0.5, 1, 2, 5, 10 … ms). It has no RPC, journal or queueing in it.
* ``decision_p99_ms`` — measured from the outside: ``Routing.OfferCall`` latency of
  the calls the origin overflowed *while answering that OfferCall* (the decision runs
  synchronously in the handler, after the offer is durable: ``router.node.services``
  → ``ClusterLink.offered`` → ``_decide`` → ``router.overflow.decide``), identified by
  the origin's ``tandem.overflow: overflow {...}`` log line stamped within the RPC.
  It is an upper bound of the decision time: the RPC, the journal step and the
  scheduling of 20+ processes on 2 cores are in it. ``decision_p99_ms_3_sites`` is the
  same with 3 sites (origin, one peer, the probe site), run just before (anchor).
  ``decide_us`` (p50, p99) is the in-process cost of what the node runs for one
  decision — ``decide`` on the cluster's real published loads, ``to_record`` and the
  JSON of the log line — on the loads this process's watch held at the end of the
  window, timed here after the cluster stopped (the work's own CPU cost, no contention).
* ``load_propagation_p99_s`` — every ``probe_every`` seconds one probe call is queued at
  the probe site (a queue nobody staffs, overflow disabled for it: it stays); from
  just before that OfferCall is sent until each of the other ``sites - 1`` nodes'
  ``Admin.ListMembers`` shows the probe site with that many calls waiting (each node
  polled every ``poll_s``). Per probe, the time the *last* peer saw it; p99 over the
  probes (with a few dozen probes p99 is about the maximum). ``load_propagation_p50_s``
  likewise; ``peer_view_p50_s`` over every (probe, peer) pair. ``all_peers_saw``: every
  probe reached every peer within ``probe_timeout`` s.
* ``raw_watch_p99_s`` — the etcd floor in the same window: this process puts a key and
  times until its own watch on that key delivers the event (every ``probe_every`` s,
  offset from the load probes).
* ``echo_p99_ms`` — ``Diagnostics.Echo`` at the origin at the same rate, between the
  offers: the same node's RPC latency without any routing work (the machine's floor);
  ``server_offer_p99_le_ms`` / ``server_offer_over_5ms`` — the origin's own
  ``grpc_server_handling_seconds`` for OfferCall (bucket bound of the p99, share over
  5 ms); ``loop_lag_p99_le_ms`` / ``loop_lag_over_5ms`` — its
  ``tandem_node_loop_lag_seconds`` (how late its event loop ran a timer: the process
  waiting for a CPU, or its loop busy); ``durable_p99_le_ms`` / ``durable_over_5ms`` —
  its ``tandem_node_durable_seconds`` (a command applied → its journal record written:
  the wait every OfferCall has before its decision).
* ``cpu_cores`` — CPU used in the window by all nodes, the origin alone, etcd and this
  process (agents and clients), the whole machine, and ``other`` (the machine minus this
  run: other work on a shared machine); 1.0 = one core, the machine has 2.

Output (``--json``): one JSON line, :func:`measure`'s dict. Target: a decision's p99 <= 5 ms
at 20 sites: ``node_decision_p99_le_ms`` is the decision itself, ``decision_p99_ms`` the
OfferCall that carried it.

"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import yaml  # noqa: E402

from router.coord import EtcdCoordinator, EtcdSettings  # noqa: E402
from router.local.etcd import etcd_server, tmp_root  # noqa: E402
from router.local.nodes import NodeProcess, cpu_seconds, spawn_node, stop_nodes, wait_listening  # noqa: E402
from router.v1 import admin_pb2, admin_pb2_grpc, agents_pb2, agents_pb2_grpc, routing_pb2, routing_pb2_grpc  # noqa: E402
from router.v1 import diagnostics_pb2, diagnostics_pb2_grpc  # noqa: E402
from router.v1 import types_pb2 as t  # noqa: E402

PREFIX = "/tandem-scale/"
POLICY = {
    "max_peer_age_s": 3.0,
    "default": {"wait_threshold": {"factor": 1.0}, "margin": {"ratio": 0.33}},
    "queues": {"probe-voice": {"enabled": False}},  # probe calls stay where they are queued
}
_DECISION = re.compile(r"tandem\.overflow: overflow (\{.*\})$")


def site_doc(name: str, agents: int) -> dict:
    """A bench site: a billing voice queue (the overflow traffic) and a probe queue that
    no agent staffs anywhere (the propagation probes)."""
    return {
        "site": {"name": name, "region": "emea", "kind": "inhouse"},
        "routing": {"head_start_s": {"standard": 0, "repeat": 0, "whitelist": 0, "vip": 0},
                    "offer_timeout_s": 10, "repeat_window_h": 0},
        "queues": [
            {"name": "billing-voice", "skill": "billing", "channel": "voice", "wrap_up_s": 0, "aht_s": 60,
             "max_length": 10000, "service_level": {"threshold_s": 20, "target": 0.8}},
            {"name": "probe-voice", "skill": "probe", "channel": "voice", "wrap_up_s": 0, "aht_s": 60,
             "max_length": 10000, "service_level": {"threshold_s": 20, "target": 0.8}},
        ],
        "agents": [{"id": "ag", "count": max(1, agents), "skills": {"billing": 5}}],
    }


def pct(xs: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank, upper) of xs; None when empty."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)



def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat: the
    share of the machine that other work took during a window (it is shared)."""
    f = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0.0)
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(f) - idle) / tick, sum(f) / tick


def etcd_counters(endpoint: str) -> dict[str, float]:
    """Write counters from etcd's own /metrics (etcd 3.4 names)."""
    wanted = ("etcd_debugging_mvcc_put_total", "etcd_debugging_mvcc_delete_total",
              "etcd_debugging_mvcc_current_revision", "etcd_server_proposals_committed_total")
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            out[name] = float(value)
    return out


def scrape_histogram(metrics: str, name: str, match: str = "") -> dict[float, float]:
    """Cumulative bucket counts by upper bound (+Inf as inf) of the histogram ``name``
    on a node's Prometheus endpoint, lines containing ``match`` only."""
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket") and match in line:
            le = re.search(r'le="([^"]+)"', line).group(1)
            key = float("inf") if le == "+Inf" else float(le)
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def origin_histograms(metrics: str) -> dict[str, dict[float, float]]:
    """The origin's server-side Routing.OfferCall time (overflow decision included) and
    its event-loop lag (how late a 0.1 s timer ran: CPU starvation or a busy loop)."""
    return {"offer": scrape_histogram(metrics, "grpc_server_handling_seconds", 'grpc_method="OfferCall"'),
            "lag": scrape_histogram(metrics, "tandem_node_loop_lag_seconds"),
            "durable": scrape_histogram(metrics, "tandem_node_durable_seconds"),
            "decision": scrape_histogram(metrics, "tandem_overflow_decision_seconds", 'kind="offer"')}


def over_fraction(before: dict[float, float], after: dict[float, float], bound: float) -> float | None:
    """Share of the observations between two scrapes above the bucket bound ``bound``."""
    if bound not in after or float("inf") not in after:
        return None
    total = after[float("inf")] - before.get(float("inf"), 0.0)
    if total <= 0:
        return None
    return 1.0 - (after[bound] - before.get(bound, 0.0)) / total


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The upper bound of the bucket holding the q-quantile of what was observed between
    two scrapes (as Prometheus's histogram_quantile, without the interpolation)."""
    delta = sorted((le, after.get(le, 0.0) - before.get(le, 0.0)) for le in after)
    total = delta[-1][1] if delta else 0.0
    if total <= 0:
        return None
    for le, n in delta:
        if n >= q * total:
            return le
    return None


class Cluster:
    """``n`` nodes on one etcd: the origin, the peers and the probe site."""

    def __init__(self, n: int, root: Path, endpoint: str, agents: int) -> None:
        if n < 3:
            raise ValueError("sites must be at least 3 (origin, a peer, the probe site)")
        self.names = [f"s{i:02d}" for i in range(n)]
        self.origin, self.probe = self.names[0], self.names[-1]
        self.peers = self.names[1:-1]
        self.root, self.endpoint, self.agents = root, endpoint, agents
        self.nodes: dict[str, NodeProcess] = {}
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.agent_tasks: list[asyncio.Task] = []

    async def start(self, timeout: float) -> None:
        """Spawn every node from this (the main) thread — a node gets SIGTERM when the
        thread that forked it exits (router.local.nodes) — then wait for them off-loop."""
        env = dict(os.environ, TANDEM_ETCD_ENDPOINTS=self.endpoint, TANDEM_ETCD_PREFIX=PREFIX,
                   TANDEM_ETCD_TTL="3", TANDEM_DRAIN_S="0.2", PYTHONPATH=str(ROOT))
        for name in self.names:
            f = self.root / f"{name}.yaml"
            f.write_text(yaml.safe_dump(site_doc(name, self.agents)))
            extra = ["--sync", "none"]
            if name == self.origin:  # its Prometheus endpoint: the server-side OfferCall time
                extra += ["--metrics-listen", "127.0.0.1:0"]
            self.nodes[name] = spawn_node(f, self.root / name, extra_args=extra, env=env)
        await asyncio.to_thread(wait_listening, list(self.nodes.values()), timeout)
        await asyncio.to_thread(wait_listening, [self.nodes[self.origin]], timeout, metrics=True)
        self.channels = {n: grpc.aio.insecure_channel(p.address) for n, p in self.nodes.items()}

    async def start_agents(self, talk_s: float) -> None:
        """Sign in the peers' agents and play them (see :func:`agent`); returns once
        every agent is ready."""
        ready: list[asyncio.Event] = []
        for site in self.peers:
            for i in range(1, self.agents + 1):
                ev = asyncio.Event()
                ready.append(ev)
                task = asyncio.create_task(agent(self.channels[site], f"ag-{i:03d}", talk_s, ev))
                self.agent_tasks.append(task)
        waiting = asyncio.gather(*(e.wait() for e in ready))
        try:
            await asyncio.wait_for(waiting, 30)
        except asyncio.TimeoutError:
            raise RuntimeError("the peers' agents did not all become ready") from None

    async def close(self) -> None:
        for task in self.agent_tasks:
            task.cancel()
        await asyncio.gather(*self.agent_tasks, return_exceptions=True)
        for ch in self.channels.values():
            with contextlib.suppress(Exception):
                await ch.close()
        stop_nodes(self.nodes.values(), timeout=10)


async def agent(channel: grpc.aio.Channel, agent_id: str, talk_s: float, ready: asyncio.Event) -> None:
    """One agent of a peer: signs in, gets ready, accepts every offer and completes each
    call ``talk_s`` seconds after it connected (so a peer's queue grows while its agents
    talk, its expected wait with it, and the origin spreads its calls over the peers)."""
    agents = agents_pb2_grpc.AgentsStub(channel)
    routing = routing_pb2_grpc.RoutingStub(channel)
    await agents.SignIn(agents_pb2.SignInRequest(agent_id=agent_id), timeout=10)
    stream = agents.Connect()
    await stream.write(agents_pb2.AgentMessage(hello=agents_pb2.Hello(agent_id=agent_id)))
    await agents.SetState(agents_pb2.SetStateRequest(agent_id=agent_id, state=t.AGENT_STATE_READY), timeout=10)
    ready.set()
    talks: set[asyncio.Task] = set()

    async def talk(call_id: str) -> None:
        await asyncio.sleep(talk_s)
        with contextlib.suppress(grpc.RpcError):
            await routing.CompleteCall(routing_pb2.CompleteCallRequest(call_id=call_id), timeout=10)

    try:
        with contextlib.suppress(grpc.RpcError):
            while True:
                msg = await stream.read()
                if msg is grpc.aio.EOF:
                    return
                kind = msg.WhichOneof("kind")
                if kind == "assignment":
                    await stream.write(agents_pb2.AgentMessage(accept=agents_pb2.Accept(
                        assignment_id=msg.assignment.assignment_id)))
                elif kind == "connected":
                    task = asyncio.create_task(talk(msg.connected.call_id))
                    talks.add(task)
                    task.add_done_callback(talks.discard)
    finally:
        for task in list(talks):
            task.cancel()
        stream.cancel()


async def offer_loop(stub: Any, rate: float, stop: asyncio.Event, out: list[tuple[str, float, float]],
                     prefix: str) -> None:
    """Offer calls open-loop at ``rate``/s; each as its own task so a slow answer does not
    delay the next arrival. ``out``: (call id, wall time sent, latency s)."""
    pending: set[asyncio.Task] = set()

    async def one(cid: str, n: int) -> None:
        wall, t0 = time.time(), time.perf_counter()
        with contextlib.suppress(grpc.RpcError):
            await stub.OfferCall(routing_pb2.OfferCallRequest(
                call_id=cid, skill="billing", channel=t.CHANNEL_VOICE, caller=f"+1555{n:07d}"), timeout=10)
            out.append((cid, wall, time.perf_counter() - t0))

    n, start = 0, time.monotonic()
    while not stop.is_set():
        n += 1
        task = asyncio.create_task(one(f"{prefix}-{n:06d}", n))
        pending.add(task)
        task.add_done_callback(pending.discard)
        await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
    await asyncio.gather(*pending, return_exceptions=True)


async def echo_loop(stub: Any, rate: float, stop: asyncio.Event, out: list[float]) -> None:
    """Diagnostics.Echo (64 bytes) at the origin at ``rate``/s, half a period after each
    offer: the same node's RPC latency with no routing work, in the same window."""
    payload = diagnostics_pb2.EchoRequest(payload=b"x" * 64)
    await asyncio.sleep(0.5 / rate)
    n, start = 0, time.monotonic()
    while not stop.is_set():
        n += 1
        t0 = time.perf_counter()
        with contextlib.suppress(grpc.RpcError):
            await stub.Echo(payload, timeout=10)
            out.append(time.perf_counter() - t0)
        await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))


async def propagation_probe(cluster: Cluster, k: int, poll_s: float, timeout: float) -> dict[str, float | None]:
    """Queue the k-th probe call at the probe site; seconds until each other node's
    ListMembers shows the probe site with k calls waiting (None: not within timeout)."""
    routing = routing_pb2_grpc.RoutingStub(cluster.channels[cluster.probe])
    t0 = time.perf_counter()
    await routing.OfferCall(routing_pb2.OfferCallRequest(
        call_id=f"probe-{k:05d}", skill="probe", channel=t.CHANNEL_VOICE, caller=f"+1666{k:07d}"), timeout=10)

    async def watch_peer(site: str) -> float | None:
        admin = admin_pb2_grpc.AdminStub(cluster.channels[site])
        while time.perf_counter() - t0 < timeout:
            with contextlib.suppress(grpc.RpcError):
                r = await admin.ListMembers(admin_pb2.ListMembersRequest(), timeout=2)
                if any(m.site == cluster.probe and m.waiting >= k for m in r.members):
                    return time.perf_counter() - t0
            await asyncio.sleep(poll_s)
        return None

    others = [s for s in cluster.names if s != cluster.probe]
    seen = await asyncio.gather(*(watch_peer(s) for s in others))
    return dict(zip(others, seen))


async def raw_watch_probe(link: Any, key: bytes, events: asyncio.Queue, k: int) -> float:
    """Put ``key`` = k; seconds until this process's watch on it delivers that value."""
    value = str(k).encode()
    t0 = time.perf_counter()
    await link.run("raw put", lambda c: c.put(key, value))
    while True:
        v = await asyncio.wait_for(events.get(), 10)
        if v == value:
            return time.perf_counter() - t0


def decide_cost(loads: dict[str, Any], policy: Any, origin: str, reps: int = 2000) -> dict[str, float | None]:
    """Microseconds the node's decision work takes (decide, to_record, the log line's
    JSON) on ``loads`` (the cluster's loads as published), for a call at the origin;
    timed in this process once the cluster is stopped (a quiet CPU: the work's own cost)."""
    from router.overflow import LocalQueue, decide

    members = set(loads) | {origin}
    local = LocalQueue(site=origin, region="emea", queue="billing-voice", skill="billing", channel="voice",
                       language="", value="standard", length=50, expected_wait_s=1e9, staffed=0,
                       target_wait_s=20.0)
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        d = decide(f"c{i}", local, policy, loads, now=time.time(), members=members)
        json.dumps(d.to_record(), sort_keys=True)
        times.append(time.perf_counter() - t0)
    return {"p50": _r(pct(times, 0.5) * 1e6, 1), "p99": _r(pct(times, 0.99) * 1e6, 1),
            "peers": len(set(loads) - {origin})}


async def run_cluster(n: int, seconds: float, *, rate: float, agents: int, probe_every: float,
                      poll_s: float, probe_timeout: float, warmup: float, startup_timeout: float,
                      talk_s: float, probes: bool = True, tmp_dir: Path | None = None,
                      origin_nice: int | None = None) -> dict[str, Any]:
    """One cluster of ``n`` sites: start, warm up, measure ``seconds``, stop; see the
    module docstring. Everything it starts is stopped and removed, also on error. Its
    files (etcd's data, the nodes' journals and logs) go in a temp dir under ``tmp_dir``
    (default tmpfs when there is one)."""
    root = Path(tempfile.mkdtemp(prefix=f"tandem-scale-{n}-", dir=tmp_dir or tmp_root()))
    try:
        with etcd_server(root=root) as etcd:
            settings = EtcdSettings(endpoints=etcd.endpoints, prefix=PREFIX, ttl_s=3, op_timeout_s=5.0)
            coord = EtcdCoordinator("scale-bench", settings)
            cluster = Cluster(n, root, etcd.endpoint, agents)
            tasks: list[asyncio.Task] = []
            try:
                await coord.start()
                await coord.wait_ready(15)
                await coord.put_policy(POLICY)
                t_spawn = time.monotonic()
                await cluster.start(startup_timeout)
                started_s = time.monotonic() - t_spawn
                if origin_nice is not None:
                    # The experiment behind "what bounds the p99": the origin's CPU weight
                    # against the other nodes (and the machine's other work).
                    # Linux nice is per thread: every thread of the node (loop, gRPC, journal).
                    for task_dir in Path(f"/proc/{cluster.nodes[cluster.origin].pid}/task").iterdir():
                        with contextlib.suppress(OSError):
                            os.setpriority(os.PRIO_PROCESS, int(task_dir.name), origin_nice)
                await cluster.start_agents(talk_s)
                deadline = time.monotonic() + 60
                while not (set(cluster.names) <= set(coord.peer_loads()) and
                           set(cluster.names) <= set(coord.members())):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the nodes did not all register and publish their loads")
                    await asyncio.sleep(0.1)
                # This process's own view of the writes: every put under load/ and the raw key.
                load_puts: dict[str, int] = {}
                raw_key = f"{PREFIX}bench/raw".encode()
                raw_events: asyncio.Queue = asyncio.Queue()
                load_prefix = f"{PREFIX}load/".encode()
                lw = await coord.link.watch("bench loads", load_prefix, load_prefix[:-1] + b"0")
                rw = await coord.link.watch("bench raw", raw_key)

                async def count_loads() -> None:
                    async for ev in lw:
                        site = ev.kv.key.decode().rsplit("/", 1)[-1]
                        load_puts[site] = load_puts.get(site, 0) + 1

                async def raw_values() -> None:
                    async for ev in rw:
                        raw_events.put_nowait(ev.kv.value)

                tasks += [asyncio.create_task(count_loads()), asyncio.create_task(raw_values())]
                stop = asyncio.Event()
                offers: list[tuple[str, float, float]] = []
                origin = routing_pb2_grpc.RoutingStub(cluster.channels[cluster.origin])
                offering = asyncio.create_task(offer_loop(origin, rate, stop, offers, f"sc{n}"))
                tasks.append(offering)
                await asyncio.sleep(warmup)
                echo_stop, echo_all = asyncio.Event(), []
                diag = diagnostics_pb2_grpc.DiagnosticsStub(cluster.channels[cluster.origin])
                echoing = asyncio.create_task(echo_loop(diag, rate, echo_stop, echo_all))
                tasks.append(echoing)

                pids = {"nodes": [p.pid for p in cluster.nodes.values()], "etcd": [etcd.proc.pid],
                        "bench": [os.getpid()]}
                cpu0 = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
                metrics = cluster.nodes[cluster.origin].metrics
                h0 = origin_histograms(metrics)
                origin_pid = cluster.nodes[cluster.origin].pid
                ocpu0, m0 = cpu_seconds(origin_pid), machine_busy()
                c0, puts0 = etcd_counters(etcd.endpoint), dict(load_puts)
                w0, t0 = time.time(), time.monotonic()
                prop: list[dict[str, float | None]] = []
                raw: list[float] = []

                async def probe_loop() -> None:
                    k = 0
                    while time.monotonic() - t0 < seconds - probe_timeout / 2:
                        k += 1
                        tick = time.monotonic()
                        if probes:
                            prop.append(await propagation_probe(cluster, k, poll_s, probe_timeout))
                        await asyncio.sleep(max(0.0, tick + probe_every / 2 - time.monotonic()))
                        raw.append(await raw_watch_probe(coord.link, raw_key, raw_events, k))
                        await asyncio.sleep(max(0.0, tick + probe_every - time.monotonic()))

                await asyncio.gather(probe_loop(), asyncio.sleep(seconds))
                elapsed = time.monotonic() - t0
                c1, puts1, w1 = etcd_counters(etcd.endpoint), dict(load_puts), time.time()
                h1 = origin_histograms(metrics)
                echo_stop.set()
                await echoing
                echoes = list(echo_all)
                cpu = {k: round((sum(cpu_seconds(p) for p in v) - cpu0[k]) / elapsed, 3) for k, v in pids.items()}
                cpu["origin"] = round((cpu_seconds(origin_pid) - ocpu0) / elapsed, 3)
                m1 = machine_busy()
                # the whole machine's busy cores; "other" = what this run's processes did not use
                cpu["machine"] = round((m1[0] - m0[0]) / elapsed, 3)
                cpu["other"] = round(cpu["machine"] - cpu["nodes"] - cpu["etcd"] - cpu["bench"], 3)
                stop.set()
                await offering
                loads_seen, policy_seen = coord.peer_loads(), coord.policy
                sent = {cid: (wall, lat) for cid, wall, lat in offers}
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await cluster.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(coord.close(), 5)
        cost = decide_cost(loads_seen, policy_seen, cluster.origin)
        # Calls decided "overflow" inside their own OfferCall, offered in the window.
        log = cluster.nodes[cluster.origin].log_path.read_text(errors="replace")
        lat, overflowed_in_window, offered_in_window = [], 0, 0
        first: dict[str, float] = {}
        for line in log.splitlines():
            m = _DECISION.search(line)
            if m:
                d = json.loads(m.group(1))
                first.setdefault(d["call_id"], d["t"])
        for cid, (wall, l) in sent.items():
            if not w0 <= wall <= w1:
                continue
            offered_in_window += 1
            dt = first.get(cid)
            if dt is not None and wall <= dt <= wall + l + 0.002:
                overflowed_in_window += 1
                lat.append(l)
        all_lat = [l for wall, l in sent.values() if w0 <= wall <= w1]
        worst = [max(v for v in p.values() if v is not None) if all(v is not None for v in p.values()) else None
                 for p in prop]
        pairs = [v for p in prop for v in p.values() if v is not None]
        writes = (c1["etcd_debugging_mvcc_put_total"] - c0["etcd_debugging_mvcc_put_total"]
                  + c1["etcd_debugging_mvcc_delete_total"] - c0["etcd_debugging_mvcc_delete_total"])
        role = {cluster.origin: "origin", cluster.probe: "probe"}
        by_role: dict[str, list[float]] = {}
        for s in cluster.names:
            by_role.setdefault(role.get(s, "peer"), []).append((puts1.get(s, 0) - puts0.get(s, 0)) / elapsed)
        load_puts_s = sum(puts1.values()) - sum(puts0.values())
        return {
            "sites": n,
            "window_s": round(elapsed, 2),
            "startup_s": round(started_s, 1),
            "etcd_writes_per_s": round(writes / elapsed, 2),
            "etcd_writes_per_s_per_site": round(writes / elapsed / n, 3),
            "etcd_revisions_per_s": round((c1["etcd_debugging_mvcc_current_revision"]
                                           - c0["etcd_debugging_mvcc_current_revision"]) / elapsed, 2),
            "load_puts_per_s": round(load_puts_s / elapsed, 2),
            "load_puts_per_s_by_role": {k: round(statistics.mean(v), 3) for k, v in by_role.items()},
            "decision_p50_ms": _r((pct(lat, 0.5) or 0) * 1e3 if lat else None, 2),
            "decision_p99_ms": _r((pct(lat, 0.99) or 0) * 1e3 if lat else None, 2),
            "node_decision_p50_le_ms": _r((histogram_quantile(h0["decision"], h1["decision"], 0.5) or 0) * 1e3, 2),
            "node_decision_p99_le_ms": _r((histogram_quantile(h0["decision"], h1["decision"], 0.99) or 0) * 1e3, 2),
            "node_decision_over_5ms": _r(over_fraction(h0["decision"], h1["decision"], 0.005), 4),
            "server_offer_p99_le_ms": _r((histogram_quantile(h0["offer"], h1["offer"], 0.99) or 0) * 1e3, 1),
            "server_offer_over_5ms": _r(over_fraction(h0["offer"], h1["offer"], 0.005), 4),
            "echo_p50_ms": _r(pct(echoes, 0.5) * 1e3 if echoes else None, 2),
            "echo_p99_ms": _r(pct(echoes, 0.99) * 1e3 if echoes else None, 2),
            "loop_lag_p99_le_ms": _r((histogram_quantile(h0["lag"], h1["lag"], 0.99) or 0) * 1e3, 1),
            "loop_lag_over_5ms": _r(over_fraction(h0["lag"], h1["lag"], 0.005), 4),
            "durable_p99_le_ms": _r((histogram_quantile(h0["durable"], h1["durable"], 0.99) or 0) * 1e3, 1),
            "durable_over_5ms": _r(over_fraction(h0["durable"], h1["durable"], 0.005), 4),
            "offer_p99_ms_all": _r((pct(all_lat, 0.99) or 0) * 1e3 if all_lat else None, 2),
            "overflowed": overflowed_in_window,
            "offered": offered_in_window,
            "decide_us": cost,
            "probes": len(prop),
            "all_peers_saw": bool(prop) and all(w is not None for w in worst),
            "load_propagation_p50_s": _r(pct([w for w in worst if w is not None], 0.5)),
            "load_propagation_p99_s": _r(pct([w for w in worst if w is not None], 0.99)),
            "peer_view_p50_s": _r(pct(pairs, 0.5)),
            "raw_watch_p50_s": _r(pct(raw, 0.5), 4),
            "raw_watch_p99_s": _r(pct(raw, 0.99), 4),
            "cpu_cores": cpu,
        }
    finally:
        if not os.environ.get("TANDEM_BENCH_KEEP"):  # keep the nodes' logs when debugging
            shutil.rmtree(root, ignore_errors=True)


def measure(seconds: float = 30.0, sites: int = 20, *, rate: float = 10.0, agents: int = 1, talk_s: float = 3.0,
            probe_every: float = 1.5, poll_s: float = 0.01, probe_timeout: float = 5.0,
            warmup: float = 3.0, anchor_seconds: float | None = None,
            startup_timeout: float = 180.0, tmp_dir: Path | None = None,
            origin_nice: int | None = None) -> dict[str, Any]:
    """Run the 3-site anchor, then ``sites`` sites, each for ``seconds`` (the anchor for
    ``anchor_seconds``, default half as long); returns the ``sites``-site figures with the
    anchor's decision p99 (``decision_p99_ms_3_sites``) and its full dict (``anchor``).
    ``origin_nice``: run the origin node at this nice value (an experiment: negative
    values need privileges). Runs its own event loop (call it from synchronous code)."""
    import uvloop

    opts = dict(rate=rate, agents=agents, talk_s=talk_s, probe_every=probe_every, poll_s=poll_s,
                probe_timeout=probe_timeout, warmup=warmup, startup_timeout=startup_timeout,
                tmp_dir=tmp_dir, origin_nice=origin_nice)
    anchor = uvloop.run(run_cluster(3, anchor_seconds or max(2.0, seconds / 2), probes=False, **opts))
    res = uvloop.run(run_cluster(sites, seconds, **opts))
    res["decision_p99_ms_3_sites"] = anchor["decision_p99_ms"]
    res["origin_nice"] = origin_nice
    res["anchor"] = {k: anchor[k] for k in (
        "sites", "decision_p50_ms", "decision_p99_ms", "node_decision_p50_le_ms", "node_decision_p99_le_ms",
        "node_decision_over_5ms", "server_offer_p99_le_ms", "server_offer_over_5ms",
        "echo_p99_ms", "loop_lag_p99_le_ms", "loop_lag_over_5ms", "durable_p99_le_ms", "durable_over_5ms",
        "overflowed", "decide_us",
        "etcd_writes_per_s", "etcd_writes_per_s_per_site", "raw_watch_p99_s", "cpu_cores")}
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--seconds", type=float, default=30.0, help="measured window per cluster (default 30)")
    p.add_argument("--sites", type=int, default=20, help="sites in the big cluster (default 20)")
    p.add_argument("--rate", type=float, default=10.0, help="calls per second offered at the origin (default 10)")
    p.add_argument("--agents", type=int, default=1, help="agents at each peer (default 1)")
    p.add_argument("--talk", type=float, default=3.0, help="seconds a peer's agent talks per call (default 3)")
    p.add_argument("--probe-every", type=float, default=1.5, help="seconds between propagation probes")
    p.add_argument("--origin-nice", type=int, default=None,
                   help="experiment: the origin node's nice value (e.g. -10, as root): is its p99 CPU-bound?")
    args = p.parse_args()
    res = measure(args.seconds, args.sites, rate=args.rate, agents=args.agents, talk_s=args.talk,
                  probe_every=args.probe_every, origin_nice=args.origin_nice)
    if args.json:
        print(json.dumps(res), flush=True)
    else:
        for k, v in res.items():
            print(f"{k:32s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
