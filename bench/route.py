"""Benchmark routing throughput and latency against the node's own echo RPC.

One ``tandem node`` process serves a bench site made in code (one voice queue, wrap-up
0, ``--agents`` agents, a queue long enough for every bounded offer). A separate process
plays the agents (:class:`router.sim.agents.SimAgent`, talk time 0), draining the
queue while this process runs closed-loop clients: ``c`` coroutines
that each offer a call (``Routing.OfferCall``, a fresh call id and caller each time) as
soon as the previous one returned. Then, on the same server at the same concurrency,
the same clients call ``Diagnostics.Echo`` (a 64-byte payload): the transport's ceiling
with no routing work.

The agents speak the cheapest protocol the node offers (``--protocol auto``, the
default): auto answer declared in their hello — the node connects each call in the
same journaled step that assigns it and pushes one Assignment marked connected — and
``Complete`` on their Connect stream, answered there by a ``CommandResult`` once
durable. Per routed call the node then handles one unary RPC (OfferCall) and three
stream messages (Assignment out, Complete in, CommandResult out) and journals two
steps (offer + accept, complete). ``--protocol classic`` measures the older path:
Assignment, Accept, Connected on the stream and a unary ``CompleteCall``.
``--protocol gateway``: the same agents (auto answer, Complete on the stream) speak
through one multiplexed ``Agents.Gateway`` stream, as a site's agent gateway would
(:class:`router.sim.agents.AgentGatewayLink`): the three stream messages of a call
travel in frames shared with other calls' — the node batches what one journal group
commit made durable into one frame, the gateway what its agents wrote in one loop turn.

Without ``--protocol`` the run measures ``auto`` at every concurrency and ``gateway``
at concurrency 16 (a second node and agents' process, same settings); each row names
its protocol.

For each concurrency (1, 16, 64) and each of ``--runs`` runs: a warm-up, a routing
phase and an echo phase, each bounded by ``--calls`` calls and ``--seconds`` seconds;
between phases the agents drain the queue (bounded) and the node gets ``--settle``
seconds of quiet (its journal compaction runs in quiet moments and would otherwise
stall the next phase — usually an echo phase). Printed per concurrency (``--json``:
one JSON line each) — medians over the runs:

    {"protocol", "concurrency", "route_calls_per_s", "echo_calls_per_s", "ratio", "p50_ms",
     "p99_ms", "drained_calls_per_s", "node_cpu_route", "node_cpu_echo",
     "node_cpu_ms_per_call", "node_cpu_ms_per_echo"}

``ratio`` = route / echo throughput (median of the per-run ratios); p50/p99 are OfferCall
latencies; ``drained_calls_per_s`` is how fast the agents completed calls during the
routing phase; ``node_cpu_ms_per_call`` / ``_per_echo`` the node's CPU time per routed
call / per echo (steadier than the rates on a shared machine: a node that does not get
its core shows it in the rates, much less in these); ``node_cpu_*`` the node process's
CPU use in each phase (1.0 = one core: on a 2-core machine the node, the clients and
the agents share two cores while routing, only the node and the clients while
echoing). At the end every call offered must be
COMPLETED on the node exactly once (checked with Admin.ListCalls and the agents'
ledger); otherwise the exit code is 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import queue
import random
import shutil
import signal
import subprocess
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml  # noqa: E402

from router.sim.rpc import NodeClient  # noqa: E402
from router.local.nodes import cpu_seconds, running_nodes  # noqa: E402
from router.v1 import admin_pb2, diagnostics_pb2, routing_pb2, types_pb2  # noqa: E402

CONCURRENCIES = (1, 16, 64)
# Without --protocol: auto at every concurrency, and the gateway at these.
GATEWAY_CONCURRENCIES = (16,)


def bench_site(agents: int, max_length: int) -> dict:
    return {
        "site": {"name": "bench", "region": "bench", "kind": "inhouse"},
        "routing": {"offer_timeout_s": 30, "repeat_window_h": 0},
        "queues": [
            {"name": "bench-voice", "skill": "bench", "channel": "voice", "wrap_up_s": 0,
             "max_length": max_length, "aht_s": 1},
        ],
        "agents": [{"id": "bench", "count": agents, "skills": {"bench": 5}, "capacity": {"voice": 1}}],
    }


# --- the agents' process ------------------------------------------------------------------


def agents_main(address: str, agent_ids: list[str], stop, ready, results, protocol: str = "auto",
                tls_dir: str | None = None) -> None:
    """Child process: play the agents until ``stop`` is set; report counts."""
    import uvloop

    uvloop.run(_agents(address, agent_ids, stop, ready, results, protocol, tls_dir))


async def _agents(address, agent_ids, stop, ready, results, protocol, tls_dir=None) -> None:
    from router.sim.agents import AgentBehaviour, AgentGatewayLink, SimAgent
    from router.sim.ledger import Ledger

    client = NodeClient("bench", address, Path(tls_dir) if tls_dir else None)
    ledger = Ledger()
    force = asyncio.Event()
    behaviour = AgentBehaviour(resolved_p=1.0, csat_p=0.0, protocol=protocol)
    await client.wait_ready(15.0)
    link = None
    if protocol == "gateway":  # one stream for every agent, as a site's gateway holds it
        link = AgentGatewayLink(client, stream_timeout=3600.0)
        await link.open()
    agents = [
        SimAgent(client, aid, ledger, behaviour, time_scale=1.0, rng=random.Random(i),
                 rpc_timeout=10.0, stream_timeout=3600.0, force=force, gateway=link)
        for i, aid in enumerate(agent_ids)
    ]
    await asyncio.gather(*(a.start() for a in agents))
    ready.set()
    while not stop.is_set():
        await asyncio.sleep(0.05)
    await asyncio.gather(*(a.stop(5.0) for a in agents), return_exceptions=True)
    if link is not None:
        await link.close()
    await client.close()
    results.put({
        "connected": sum(ledger.connects.values()),
        "duplicates": len(ledger.duplicates),
        "anomalies": ledger.anomalies[:5],
        "errors": sum(a.errors for a in agents),
        "gateway": None if link is None else {
            "frames_in": link.frames_in, "messages_in": link.messages_in, "frames_out": link.frames_out},
    })


# --- the clients ----------------------------------------------------------------------------


class Offers:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.seq = 0

    def next(self) -> routing_pb2.OfferCallRequest:
        self.seq += 1
        return routing_pb2.OfferCallRequest(
            call_id=f"{self.prefix}-{self.seq:08d}", channel=types_pb2.CHANNEL_VOICE,
            skill="bench", caller=f"+1555{self.seq % 10_000_000:07d}",
        )


async def closed_loop(concurrency: int, make_call, calls: int, seconds: float) -> tuple[float, list[float]]:
    """``concurrency`` workers call ``make_call()`` back to back until ``calls`` calls
    were started or ``seconds`` passed. Returns (calls per second, latencies in s)."""
    latencies: list[float] = []
    started = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal started
        while started < calls and time.perf_counter() < deadline:
            started += 1
            t = time.perf_counter()
            await make_call()
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return len(latencies) / elapsed, latencies



class CpuMeter:
    """CPU share (1.0 = one core) of some processes over a phase."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.c0 = {k: cpu_seconds(p) for k, p in self.pids.items()}

    def stop(self) -> dict[str, float]:
        dt = time.perf_counter() - self.t0
        return {k: (cpu_seconds(p) - self.c0[k]) / dt for k, p in self.pids.items()}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def queue_length(client: NodeClient) -> int:
    st = await client.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=5.0)
    return sum(q.length for q in st.queues) + st.calls_by_state.get("assigned", 0) + st.calls_by_state.get("connected", 0)


async def wait_drained(client: NodeClient, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await queue_length(client) == 0:
            return True
        await asyncio.sleep(0.05)
    return False


async def completed_count(client: NodeClient) -> int:
    st = await client.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=5.0)
    return sum(q.answered for q in st.queues)


async def bench(address: str, args, pids: dict[str, int], tls_dir: Path | None = None) -> tuple[list[dict], int]:
    client = NodeClient("bench", address, tls_dir)
    await client.wait_ready(15.0)
    offers = Offers(f"b{int(time.time()) % 100000}")
    payload = diagnostics_pb2.EchoRequest(payload=b"x" * 64)

    async def offer() -> None:
        await client.routing.OfferCall(offers.next(), timeout=10.0)

    async def echo() -> None:
        await client.diagnostics.Echo(payload, timeout=10.0)

    rows = []
    meter = CpuMeter(pids)
    for c in args.concurrency:
        runs = []
        await closed_loop(c, offer, max(50, c * 20), 0.5)  # warm-up
        await closed_loop(c, echo, max(50, c * 20), 0.5)
        for _ in range(args.runs):
            await wait_drained(client, args.drain_timeout)
            await asyncio.sleep(args.settle)
            done0 = await completed_count(client)
            t0 = time.perf_counter()
            meter.start()
            route_rate, lat = await closed_loop(c, offer, args.calls, args.seconds)
            cpu_route = meter.stop()
            done1 = await completed_count(client)
            drained = (done1 - done0) / (time.perf_counter() - t0)
            await wait_drained(client, args.drain_timeout)
            await asyncio.sleep(args.settle)
            meter.start()
            echo_rate, _ = await closed_loop(c, echo, args.calls, args.seconds)
            cpu_echo = meter.stop()
            runs.append({
                "route": route_rate, "echo": echo_rate, "ratio": route_rate / echo_rate,
                "p50": pct(lat, 0.50) * 1000, "p99": pct(lat, 0.99) * 1000, "drained": drained,
                "node_cpu_route": cpu_route["node"], "node_cpu_echo": cpu_echo["node"],
                "node_ms_route": cpu_route["node"] / route_rate * 1000,
                "node_ms_echo": cpu_echo["node"] / echo_rate * 1000,
                "cpu_route": cpu_route, "cpu_echo": cpu_echo,
            })
        med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
        rows.append({
            "protocol": args.protocol,
            "concurrency": c,
            "route_calls_per_s": round(med("route"), 1),
            "echo_calls_per_s": round(med("echo"), 1),
            "ratio": round(med("ratio"), 3),
            "p50_ms": round(med("p50"), 3),
            "p99_ms": round(med("p99"), 3),
            "drained_calls_per_s": round(med("drained"), 1),
            "node_cpu_route": round(med("node_cpu_route"), 2),
            "node_cpu_echo": round(med("node_cpu_echo"), 2),
            "node_cpu_ms_per_call": round(med("node_ms_route"), 3),
            "node_cpu_ms_per_echo": round(med("node_ms_echo"), 3),
        })
        for r in runs:
            cpu = lambda d: " ".join(f"{k} {v:.2f}" for k, v in d.items())  # noqa: E731
            print(f"c={c}: route {r['route']:.0f}/s p50 {r['p50']:.2f} ms p99 {r['p99']:.2f} ms "
                  f"[cpu {cpu(r['cpu_route'])}]; echo {r['echo']:.0f}/s [cpu {cpu(r['cpu_echo'])}]",
                  file=sys.stderr, flush=True)
    await wait_drained(client, args.drain_timeout)
    calls = [x for x in await client.list_calls() if x.call_id.startswith(offers.prefix + "-")]
    await client.close()
    bad = sum(1 for x in calls if x.state != types_pb2.CALL_STATE_COMPLETED)
    ids = [x.call_id for x in calls]
    problems = 0
    if len(ids) != offers.seq or len(set(ids)) != len(ids) or bad:
        print(f"INVARIANT: offered {offers.seq}, node lists {len(ids)} ({len(set(ids))} distinct), "
              f"{bad} not completed", file=sys.stderr)
        problems += 1
    return rows, problems


def start_profiler(out: str, pid: int) -> subprocess.Popen:
    """py-spy (pip install py-spy) on the node: raw collapsed stacks, GIL holder only, with
    native frames so time inside grpc's Cython core shows up as such."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen(
        [exe, "record", "-p", str(pid), "-f", "raw", "-r", "100", "--gil", "--native", "-o", out],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def measure(args, tls: bool) -> tuple[list[dict], int]:
    """One node (plaintext, or mTLS with certificates made in its temp dir), its agents'
    process and the clients; returns the rows per concurrency and the invariant problems."""
    import uvloop

    # Every offer is bounded, so this queue length can never be reached.
    n_offers = len(args.concurrency) * (args.runs * args.calls + 64 * 20) + 1000
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as tmp:
        tls_dir: Path | None = None
        extra = ["--sync", args.sync]
        if tls:
            from router.security import pki

            tls_dir = Path(tmp) / "tls"
            pki.init(tls_dir, [("bench", "in_house")])
            extra += ["--tls-dir", str(tls_dir)]
        site_file = Path(tmp) / "bench.yaml"
        site_file.write_text(yaml.safe_dump(bench_site(args.agents, min(1_000_000, n_offers))))
        with running_nodes([site_file], Path(tmp) / "nodes", extra_args=extra) as nodes:
            address = nodes["bench"].address
            ctx = mp.get_context("spawn")
            stop, ready, results = ctx.Event(), ctx.Event(), ctx.Queue()
            ids = [f"bench-{n:03d}" for n in range(1, args.agents + 1)]
            child = ctx.Process(
                target=agents_main, args=(address, ids, stop, ready, results, args.protocol,
                      str(tls_dir) if tls_dir else None), daemon=True
            )
            child.start()
            try:
                if not ready.wait(30):
                    print("the agents' process did not get ready in 30 s", file=sys.stderr)
                    return [], 1
                pids = {"node": nodes["bench"].pid, "agents": child.pid, "clients": os.getpid()}
                spy = start_profiler(args.profile, nodes["bench"].pid) if args.profile else None
                try:
                    rows, problems = uvloop.run(bench(address, args, pids, tls_dir))
                finally:
                    if spy is not None:
                        spy.send_signal(signal.SIGINT)
                        spy.wait(30)
            finally:
                stop.set()
                try:
                    agent_stats = results.get(timeout=30)
                except queue.Empty:
                    agent_stats = {}
                child.join(10)
                if child.is_alive():
                    child.kill()
    if agent_stats.get("duplicates"):
        print(f"INVARIANT: agents saw duplicates: {agent_stats}", file=sys.stderr)
        problems += 1
    gw = agent_stats.get("gateway")
    if gw:
        print(f"gateway: {gw['frames_in']} frames in ({gw['messages_in'] / max(1, gw['frames_in']):.1f} "
              f"messages each), {gw['frames_out']} frames out", file=sys.stderr)
    if agent_stats.get("errors"):
        print(f"agents' errors: {agent_stats['errors']} {agent_stats.get('anomalies')}", file=sys.stderr)
    return rows, problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="one JSON line per concurrency")
    p.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCIES))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--profile", metavar="FILE", help="py-spy the node during the run (raw stacks)")
    p.add_argument("--calls", type=int, default=3000, help="max calls per phase")
    p.add_argument("--seconds", type=float, default=3.0, help="max seconds per phase")
    p.add_argument("--agents", type=int, default=100)
    p.add_argument("--drain-timeout", type=float, default=20.0)
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds of quiet before each phase: the node compacts its journal "
                        "in quiet moments (a snapshot holds its loop ~13 ms per 1000 retained "
                        "calls), which must not land in the next phase")
    p.add_argument("--sync", default="fdatasync", help="the node's journal sync mode")
    p.add_argument("--protocol", choices=("auto", "classic", "gateway"), default=None,
                   help="the agents' protocol: auto answer + Complete on their own streams, "
                        "classic (Accept on the stream, unary CompleteCall), or gateway (auto "
                        "through one multiplexed Agents.Gateway stream). Default: auto at every "
                        "concurrency and gateway at 16")
    p.add_argument("--tls", action="store_true",
                   help="measure twice in this run, plaintext then mTLS, and print the cost of mTLS")
    args = p.parse_args()

    if args.tls:
        args.protocol = args.protocol or "auto"
        # The same measurement twice in one run: plaintext, then mTLS (certificates made
        # here; the node audits every mutation then, as a TLS node always does).
        plain, p1 = measure(args, tls=False)
        tls, p2 = measure(args, tls=True)
        for a, b in zip(plain, tls):
            row = {
                "concurrency": a["concurrency"],
                "plain_route_calls_per_s": a["route_calls_per_s"], "tls_route_calls_per_s": b["route_calls_per_s"],
                "tls_ratio": round(b["route_calls_per_s"] / a["route_calls_per_s"], 3),
                "tls_cost": round(1 - b["route_calls_per_s"] / a["route_calls_per_s"], 3),
                "plain_echo_calls_per_s": a["echo_calls_per_s"], "tls_echo_calls_per_s": b["echo_calls_per_s"],
                "plain_p99_ms": a["p99_ms"], "tls_p99_ms": b["p99_ms"],
                "plain_node_cpu_ms_per_call": a["node_cpu_ms_per_call"],
                "tls_node_cpu_ms_per_call": b["node_cpu_ms_per_call"],
            }
            print(json.dumps(row) if args.json else
                  f"c={row['concurrency']:>3}  plain {row['plain_route_calls_per_s']:>8.1f}/s  mTLS "
                  f"{row['tls_route_calls_per_s']:>8.1f}/s  cost {row['tls_cost']:.1%}  p99 "
                  f"{row['plain_p99_ms']:.1f} / {row['tls_p99_ms']:.1f} ms")
        return 1 if p1 or p2 else 0
    if args.protocol is not None:
        plan = [(args.protocol, args.concurrency)]
    else:
        plan = [("auto", args.concurrency)]
        gateway_at = [c for c in args.concurrency if c in GATEWAY_CONCURRENCIES]
        if gateway_at:
            plan.append(("gateway", gateway_at))
    rows, problems = [], 0
    for protocol, concurrencies in plan:
        part = argparse.Namespace(**{**vars(args), "protocol": protocol, "concurrency": concurrencies})
        got, bad = measure(part, tls=False)
        rows += got
        problems += bad
    for r in rows:
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{r['protocol']:<8} c={r['concurrency']:>3}  route {r['route_calls_per_s']:>8.1f}/s  echo "
                  f"{r['echo_calls_per_s']:>8.1f}/s  ratio {r['ratio']:.2f}  p50 {r['p50_ms']:.2f} ms"
                  f"  p99 {r['p99_ms']:.2f} ms  drained {r['drained_calls_per_s']:.0f}/s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
