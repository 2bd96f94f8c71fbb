"""Scale benchmark (issue 14): a real node with 2,000 agents and 200,000 retained calls
under open-loop Poisson traffic, and recovery of 100,000 queued calls after SIGKILL.

Part (a), per arrival rate (``--rates``, default 100, 300 and 1,000 calls/s, each for
``--seconds``, default 60):

* Setup: one ``tandem node`` process (``router.local.nodes.spawn_node``, Prometheus
  metrics on a free loopback port) on a site made in code: four voice queues (skills
  s0..s3, wrap-up 0), four groups of ``--agents``/4 agents, each with its primary skill
  and the next one; group i talks ``HANDLE_S[i]`` seconds per call (0.4–1.6 s: several
  handle times, ≈ 50 % occupancy at 1,000 calls/s). Before the node starts, its data
  directory gets a snapshot holding ``--retained`` finished calls (the default retention
  is 200,000), made by the same engine in this process (offer, accept, complete per
  call, callers all distinct), so every compaction during the run snapshots 200,000
  retained calls. ``TANDEM_COMPACT_EVERY`` (``--compact-every``, default 10,000
  records, i.e. every ≈ 17 s at 100 calls/s, 6 s at 300) makes compactions happen in
  every phase.
* A separate process (multiprocessing, spawn) plays the agents with the load
  generator's ``SimAgent`` over one agent-gateway stream (``protocol="gateway"``), and
  records when each Assignment arrived (``time.time()``).
* Open loop: arrival times are drawn from a Poisson process at the rate (seeded); a
  scheduler starts each ``OfferCall`` at its time whatever the earlier ones are doing
  (a task each); the phase is bounded by count (1.2 × rate × seconds) and time (offers
  still open ``--grace`` s after the last arrival count as lost).
* Figures per rate (one JSON line each): OfferCall latency p50/p99/max (ms, from the
  send), offer→assignment p99 (ms: the agent's receipt minus the offer's send; same
  machine clock), the node's event-loop stall — the largest lag of the node's own loop
  probe (``tandem_node_loop_stall_max_seconds{kind="recent"}``, scraped every second;
  probe period 5 ms, so it under-reads a stall by at most 5 ms) — and
  ``tandem_node_compaction_loop_seconds`` (the loop time of the last compaction's
  capture), compactions seen in the node's log, node CPU ms per call. The anchor, in the
  same run: ``Diagnostics.Echo`` open-loop at the same rate for a third of the time,
  12 s after the routing phase (no routing, nothing journaled, no compaction):
  ``echo_p50_ms``, ``echo_p99_ms``, ``p99_ratio`` = OfferCall p99 / Echo p99, and
  ``echo_max_stall_ms``, the loop probe's largest lag meanwhile (what the machine's load
  alone does to the node's loop). ``client_late_max_ms``: how late this process started
  an arrival (over a few ms, the client itself was starved and the latencies are not
  the node's).

Part (b), 100,000 queued calls (``--queued``): a fresh node whose data directory holds a
snapshot with ``--queued`` calls queued (no agent signed in) and a journal tail of
``--tail`` more offers made over RPC; RSS per queued call = (RSS with the calls − RSS of
the same node with none, the anchor, measured first) / calls. Then SIGKILL, restart:
``recovery_s`` = from the spawn until the node answers ``Admin.GetStatus``;
``first_assignment_s`` = from the spawn until an agent that signs in as soon as the node
listens receives its first Assignment. The recovered node must list exactly the calls
queued before the kill.

Final line: {"p99_ms_at_300", "max_stall_ms", "rss_bytes_per_queued_call",
"recovery_s_100k", "decision_p99_ms_20_sites", "route_echo_ratio_c16"} — the last two
from ``bench/scale_sites.measure()`` if that module exists and ``--route-ratio`` (else
null). Targets: p99 ≤ 10 ms at 300/s, stall ≤ 50 ms, ≤ 1,536 B per queued call,
recovery ≤ 5 s. Exit code 1 when an invariant broke: a call offered to two agents
(the agents' ledger) or a queued call missing after the SIGKILL restart. Offers that
failed on the client side (``errors``: deadline or cancelled at the end of an overloaded
phase) are reported, not failures.

    .venv/bin/python bench/scale.py --json                         # ≈ 8 min
    .venv/bin/python bench/scale.py --json --seconds 10 --rates 300 --queued 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml  # noqa: E402

from router.local.nodes import cpu_seconds, spawn_node, stop_nodes, wait_listening  # noqa: E402
from router.sim.rpc import NodeClient  # noqa: E402
from router.v1 import admin_pb2, diagnostics_pb2, routing_pb2, types_pb2  # noqa: E402

SKILLS = ("s0", "s1", "s2", "s3")
HANDLE_S = (0.4, 0.8, 1.2, 1.6)
T0_OFFSET_S = 3600.0  # the pre-filled calls happened in the hour before the run


def scale_site(agents: int, max_length: int, retention: int) -> dict:
    per = max(1, agents // len(SKILLS))
    return {
        "site": {"name": "scale", "region": "bench", "kind": "inhouse"},
        "routing": {"offer_timeout_s": 30, "ended_call_retention": retention},
        "queues": [
            {"name": f"q-{s}", "skill": s, "channel": "voice", "wrap_up_s": 0,
             "max_length": max_length, "aht_s": HANDLE_S[i]}
            for i, s in enumerate(SKILLS)
        ],
        "agents": [
            {"id": f"g{i}", "count": per, "skills": {s: 5, SKILLS[(i + 1) % len(SKILLS)]: 1},
             "capacity": {"voice": 1}}
            for i, s in enumerate(SKILLS)
        ],
    }


# --- pre-filling a data directory with the real engine and journal ---------------------------


def prefill(site_file: Path, data_dir: Path, *, finished: int = 0, queued: int = 0,
            cache: Path | None = None) -> float:
    """Write a snapshot into ``data_dir`` holding ``finished`` completed calls (retained)
    and ``queued`` queued calls, made by the engine itself; returns seconds spent. With
    ``cache``, the data directory made for the same site and counts within the last 6
    hours is copied instead (making 200,000 calls takes minutes on a loaded machine)."""
    import hashlib
    import shutil

    t_start = time.perf_counter()
    if cache is not None:
        tag = hashlib.sha256(site_file.read_bytes() + f"{finished}/{queued}".encode()).hexdigest()[:16]
        hit = cache / tag
        if hit.is_dir() and time.time() - hit.stat().st_mtime < 6 * 3600:
            shutil.copytree(hit, data_dir, dirs_exist_ok=True)
            return time.perf_counter() - t_start
        _prefill(site_file, data_dir, finished, queued)
        tmp = cache / f"{tag}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(data_dir, tmp, ignore=shutil.ignore_patterns("LOCK", "*.log"))
        shutil.rmtree(hit, ignore_errors=True)
        os.replace(tmp, hit)
        return time.perf_counter() - t_start
    _prefill(site_file, data_dir, finished, queued)
    return time.perf_counter() - t_start


def _prefill(site_file: Path, data_dir: Path, finished: int, queued: int) -> None:
    from router.config import load_site
    from router.engine import Engine
    from router.journal import Journal

    site = load_site(site_file)
    eng = Engine(site)
    agents = sorted(site.agent_profiles())
    t = time.time() - T0_OFFSET_S
    if finished:
        for aid in agents:
            eng.apply({"op": "sign_in", "agent_id": aid, "t": t})
            eng.apply({"op": "set_state", "agent_id": aid, "state": "ready", "t": t})
        step = T0_OFFSET_S / 2 / finished
        for n in range(finished):
            t += step
            cid = f"pre-{n:07d}"
            eng.apply({"op": "offer", "call_id": cid, "skill": SKILLS[n % 4], "channel": "voice",
                       "caller": f"+1999{n:07d}", "t": t})
            view = eng.call(cid)
            eng.apply({"op": "accept", "agent_id": view.agent_id, "assignment_id": view.assignment_id, "t": t})
            eng.apply({"op": "complete", "call_id": cid, "resolved": True, "t": t})
        for aid in agents:
            eng.apply({"op": "sign_out", "agent_id": aid, "t": t})
    for n in range(queued):
        t += 1e-4
        eng.apply({"op": "offer", "call_id": f"q-{n:07d}", "skill": SKILLS[n % 4], "channel": "voice",
                   "caller": f"+1888{n:07d}", "t": t,
                   "context": {"ivr_path": ["1", "2"], "attributes": {"account": f"{n:08d}"}}})
    eng.apply({"op": "tick", "t": t + 40})  # drop stale deadlines

    async def write() -> None:
        j = Journal.open(data_dir, sync="none")
        j.recover()
        await j.append({"op": "tick", "t": t + 40})  # the snapshot's seq must cover a record
        head, shared = eng.snapshot_parts()
        shared["queues"] = head.pop("queues")
        await j.compact(head, handed_over=shared)
        await j.close()

    asyncio.run(write())


# --- the agents' process ------------------------------------------------------------------


def agents_main(address: str, groups: list[tuple[list[str], float]], stop, ready, results) -> None:
    import uvloop

    uvloop.run(_agents(address, groups, stop, ready, results))


async def _agents(address, groups, stop, ready, results) -> None:
    from router.sim.agents import AgentBehaviour, AgentGatewayLink, SimAgent
    from router.sim.ledger import Ledger

    class TimedLedger(Ledger):
        def assigned(self, agent_id: str, call_id: str, channel: int = 0) -> None:
            self.first_seen.setdefault(call_id, time.time())
            super().assigned(agent_id, call_id, channel)

    client = NodeClient("scale", address, None)
    ledger = TimedLedger()
    ledger.first_seen = {}
    force = asyncio.Event()
    await client.wait_ready(30.0)
    link = AgentGatewayLink(client, stream_timeout=7200.0)
    await link.open()
    agents = []
    for i, (ids, talk) in enumerate(groups):
        behaviour = AgentBehaviour(resolved_p=1.0, csat_p=0.0, protocol="gateway", default_talk_s=talk)
        agents += [SimAgent(client, aid, ledger, behaviour, time_scale=1.0, rng=random.Random(i * 10_000 + k),
                            rpc_timeout=20.0, stream_timeout=7200.0, force=force, gateway=link)
                   for k, aid in enumerate(ids)]
    for k in range(0, len(agents), 100):  # bounded bursts of sign-ins
        await asyncio.gather(*(a.start() for a in agents[k:k + 100]))
    ready.set()
    while not stop.is_set():
        await asyncio.sleep(0.05)
    force.set()
    await asyncio.gather(*(a.stop(10.0) for a in agents), return_exceptions=True)
    await link.close()
    await client.close()
    results.put({"first_seen": ledger.first_seen, "duplicates": len(ledger.duplicates),
                 "errors": sum(a.errors for a in agents)})


# --- helpers ------------------------------------------------------------------------------



def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


_SAMPLE = re.compile(r'^(\w+)\{([^}]*)\} (\S+)$')


def scrape(metrics_addr: str) -> dict[tuple[str, str], float]:
    """name, labels text -> value, from the node's Prometheus endpoint."""
    with urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[(m[1], m[2])] = float(m[3])
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    for (n, lab), v in samples.items():
        if n == name and all(f'{k}="{val}"' in lab for k, val in labels.items()):
            return v
    return 0.0


def compactions(log_path: Path, offset: int) -> list[float]:
    """Loop milliseconds of each compaction logged after ``offset``."""
    text = log_path.read_text(errors="replace")[offset:]
    return [float(m) for m in re.findall(r"journal compacted in [\d.]+ s \(([\d.]+) ms on the loop\)", text)]


async def open_loop(rate: float, seconds: float, call, seed: int, grace: float) -> dict:
    """Start ``call(i)`` at Poisson arrival times (rate/s) for ``seconds`` (at most
    1.2 × rate × seconds calls); returns latencies (s), send times and losses."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    limit = int(rate * seconds * 1.2) + 1
    lat: dict[int, float] = {}
    sent: dict[int, float] = {}
    errors: list[str] = []
    tasks = set()
    late_max = 0.0

    async def one(i: int) -> None:
        sent[i] = time.time()
        t = time.perf_counter()
        try:
            await call(i)
            lat[i] = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 - counted
            errors.append(f"{type(e).__name__}: {e}"[:200])

    start = loop.time()
    at, i = start, 0
    end = start + seconds
    while i < limit:
        at += rng.expovariate(rate)
        if at >= end:
            break
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        late_max = max(late_max, loop.time() - at)
        task = loop.create_task(one(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    if tasks:
        await asyncio.wait(list(tasks), timeout=grace)
    return {"lat": lat, "sent": sent, "n": i, "errors": errors, "client_late_max_s": late_max,
            "open": len(tasks)}


# --- part (a) -----------------------------------------------------------------------------


async def run_rates(node, args, pids: dict, first_seen_box: list) -> list[dict]:
    client = NodeClient("scale", node.address, None)
    await client.wait_ready(30.0)
    rows = []
    try:
        for rate in args.rates:
            prefix = f"r{int(rate)}"
            reqs = {}

            async def offer(i: int) -> None:
                req = routing_pb2.OfferCallRequest(
                    call_id=f"{prefix}-{i:07d}", channel=types_pb2.CHANNEL_VOICE,
                    skill=SKILLS[i % 4], caller=f"+1{int(rate):04d}{i:07d}")
                reqs[i] = req.call_id
                await client.routing.OfferCall(req, timeout=30.0)

            async def echo(i: int) -> None:
                await client.diagnostics.Echo(diagnostics_pb2.EchoRequest(payload=b"x" * 64), timeout=30.0)

            await asyncio.sleep(args.settle)
            log_off = len(node.log_path.read_text(errors="replace"))
            stall = 0.0
            stop_scrape = asyncio.Event()

            async def scraper() -> None:
                nonlocal stall
                while not stop_scrape.is_set():
                    try:
                        s = await asyncio.to_thread(scrape, node.metrics)
                        stall = max(stall, metric(s, "tandem_node_loop_stall_max_seconds", kind="recent"))
                    except Exception:  # noqa: BLE001 - a missed scrape only
                        pass
                    try:
                        await asyncio.wait_for(stop_scrape.wait(), 1.0)
                    except asyncio.TimeoutError:
                        pass

            sc = asyncio.create_task(scraper())
            c0 = cpu_seconds(pids["node"])
            res = await open_loop(rate, args.seconds, offer, seed=int(rate), grace=args.grace)
            cpu = cpu_seconds(pids["node"]) - c0
            await asyncio.sleep(2.0)  # the recent window still covers the phase's end
            stop_scrape.set()
            await sc
            route_stall, stall = stall, 0.0
            comp = compactions(node.log_path, log_off)
            # The anchor: echo at the same rate, no routing and no compaction (the node is
            # quiet: nothing to journal); its stall is what the machine's load alone does.
            await asyncio.sleep(12.0)  # the recent window (10 s) forgets the routing phase
            stop_scrape.clear()
            sc = asyncio.create_task(scraper())
            ech = await open_loop(rate, max(2.0, args.seconds / 3), echo, seed=int(rate) + 1, grace=args.grace)
            stop_scrape.set()
            await sc
            echo_stall, stall = stall, route_stall
            lat = [x * 1e3 for x in res["lat"].values()]
            elat = [x * 1e3 for x in ech["lat"].values()]
            rows.append({
                "rate": rate, "seconds": args.seconds, "offered": res["n"], "answered": len(lat),
                "errors": len(res["errors"]), "first_error": res["errors"][0] if res["errors"] else None,
                "p50_ms": round(pct(lat, 0.5), 2), "p99_ms": round(pct(lat, 0.99), 2),
                "max_ms": round(max(lat, default=float("nan")), 2),
                "echo_p50_ms": round(pct(elat, 0.5), 2), "echo_p99_ms": round(pct(elat, 0.99), 2),
                "p99_ratio": round(pct(lat, 0.99) / pct(elat, 0.99), 2) if elat else None,
                "max_stall_ms": round(stall * 1e3, 1), "echo_max_stall_ms": round(echo_stall * 1e3, 1),
                "compactions": len(comp), "compaction_loop_ms_max": max(comp, default=None),
                "node_cpu_ms_per_call": round(cpu * 1e3 / max(1, res["n"]), 3),
                "node_cpu_share": round(cpu / args.seconds, 3),
                "client_late_max_ms": round(res["client_late_max_s"] * 1e3, 1),
                "_sent": {reqs[i]: t for i, t in res["sent"].items() if i in reqs},
            })
    finally:
        await client.close()
    return rows


def part_a(args, tmp: Path) -> tuple[list[dict], int]:
    import uvloop

    site_file = tmp / "scale.yaml"
    cfg = scale_site(args.agents, 1_000_000, max(100, args.retained))
    site_file.write_text(yaml.safe_dump(cfg))
    data = tmp / "a"
    took = prefill(site_file, data, finished=args.retained, cache=args.cache)
    print(f"# pre-filled {args.retained} retained calls in {took:.1f} s", file=sys.stderr)
    env = dict(os.environ, TANDEM_COMPACT_EVERY=str(args.compact_every))
    node = spawn_node(site_file, data, extra_args=["--sync", args.sync, "--metrics-listen", "127.0.0.1:0"], env=env)
    problems = 0
    try:
        wait_listening([node], 120.0, metrics=True)
        from router.config import load_site

        site = load_site(site_file)
        groups: dict[str, list[str]] = {}
        for aid, g in site.agent_profiles().items():
            groups.setdefault(g.id, []).append(aid)
        spec = [(ids, HANDLE_S[int(gid[1:])]) for gid, ids in sorted(groups.items())]
        ctx = mp.get_context("spawn")
        stop, ready, results = ctx.Event(), ctx.Event(), ctx.Queue()
        child = ctx.Process(target=agents_main, args=(node.address, spec, stop, ready, results), daemon=True)
        child.start()
        try:
            if not ready.wait(180):
                print("the agents did not get ready in 180 s", file=sys.stderr)
                return [], 1
            pids = {"node": node.pid, "agents": child.pid}
            rows = uvloop.run(run_rates(node, args, pids, []))
        finally:
            stop.set()
        try:
            res = results.get(timeout=120)
        except Exception:  # noqa: BLE001
            res = {"first_seen": {}, "duplicates": -1, "errors": -1}
        child.join(30)
        seen = res["first_seen"]
        for row in rows:
            sent = row.pop("_sent")
            waits = [(seen[c] - t) * 1e3 for c, t in sent.items() if c in seen]
            row["assigned"] = len(waits)
            row["offer_to_assignment_p99_ms"] = round(pct(waits, 0.99), 2)
        if res["duplicates"]:
            print(f"INVARIANT: {res['duplicates']} calls offered to two agents", file=sys.stderr)
            problems += 1
    finally:
        stop_nodes([node], 20.0)
    return rows, problems


# --- part (b) -----------------------------------------------------------------------------


async def _serving(address: str, timeout: float) -> float:
    """Seconds until Admin.GetStatus answers (polled)."""
    t0 = time.monotonic()
    client = NodeClient("scale", address, None)
    try:
        while time.monotonic() - t0 < timeout:
            try:
                await client.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=2.0)
                return time.monotonic() - t0
            except Exception:  # noqa: BLE001 - not yet
                await asyncio.sleep(0.01)
    finally:
        await client.close()
    return float("nan")


async def _offers(address: str, n: int, prefix: str) -> int:
    client = NodeClient("scale", address, None)
    await client.wait_ready(30.0)
    ok = 0
    sem = asyncio.Semaphore(32)

    async def one(i: int) -> None:
        nonlocal ok
        async with sem:
            await client.routing.OfferCall(routing_pb2.OfferCallRequest(
                call_id=f"{prefix}-{i:07d}", channel=types_pb2.CHANNEL_VOICE, skill=SKILLS[i % 4],
                caller=f"+1777{i:07d}"), timeout=30.0)
            ok += 1

    await asyncio.gather(*(one(i) for i in range(n)))
    await client.close()
    return ok


async def _queued(address: str) -> int:
    client = NodeClient("scale", address, None)
    await client.wait_ready(30.0)
    st = await client.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10.0)
    await client.close()
    return sum(q.length for q in st.queues)


async def _first_assignment(address: str, agent_id: str, timeout: float) -> float:
    """An agent signs in, connects, goes READY; time.time() of its first Assignment."""
    from router.sim.agents import AgentBehaviour, SimAgent
    from router.sim.ledger import Ledger

    got = asyncio.get_running_loop().create_future()

    class FirstLedger(Ledger):
        def assigned(self, aid: str, call_id: str, channel: int = 0) -> None:
            if not got.done():
                got.set_result(time.time())
            super().assigned(aid, call_id, channel)

    client = NodeClient("scale", address, None)
    await client.wait_ready(timeout)
    agent = SimAgent(client, agent_id, FirstLedger(), AgentBehaviour(protocol="auto", default_talk_s=60.0),
                     time_scale=1.0, rng=random.Random(1), rpc_timeout=10.0, stream_timeout=600.0,
                     force=asyncio.Event())
    await agent.start()
    try:
        return await asyncio.wait_for(got, timeout)
    finally:
        agent.force.set()
        await agent.stop(2.0)
        await client.close()


def part_b(args, tmp: Path) -> dict:
    import uvloop

    site_file = tmp / "scale.yaml"
    site_file.write_text(yaml.safe_dump(scale_site(args.agents, 1_000_000, 200_000)))
    extra = ["--sync", args.sync]
    # Anchor: the same node with no call.
    empty = spawn_node(site_file, tmp / "b-empty", extra_args=extra)
    try:
        wait_listening([empty], 60.0)
        uvloop.run(_serving(empty.address, 30.0))
        time.sleep(2.0)
        rss_empty = rss_bytes(empty.pid)
    finally:
        stop_nodes([empty], 20.0)
    data = tmp / "b"
    took = prefill(site_file, data, queued=args.queued, cache=args.cache)
    print(f"# pre-filled {args.queued} queued calls in {took:.1f} s", file=sys.stderr)
    node = spawn_node(site_file, data, extra_args=extra, env=dict(os.environ, TANDEM_COMPACT_EVERY="1000000"))
    try:
        t0 = time.monotonic()
        wait_listening([node], 120.0)
        start_s = uvloop.run(_serving(node.address, 120.0)) + (time.monotonic() - t0)
        tail = uvloop.run(_offers(node.address, args.tail, "tail"))
        time.sleep(2.0)
        rss_full = rss_bytes(node.pid)
        queued_before = uvloop.run(_queued(node.address))
        node.kill()
        t_spawn = time.monotonic()
        w_spawn = time.time()
        node = spawn_node(site_file, data, extra_args=extra)
        wait_listening([node], 120.0)
        recovery_s = uvloop.run(_serving(node.address, 120.0)) + (time.monotonic() - t_spawn)
        queued_after = uvloop.run(_queued(node.address))
        agent = sorted(site_ids(site_file))[0]
        first = uvloop.run(_first_assignment(node.address, agent, 60.0))
    finally:
        stop_nodes([node], 20.0)
    n = queued_before
    return {
        "queued": n, "tail_offers": tail, "rss_empty_mb": round(rss_empty / 2**20, 1),
        "rss_full_mb": round(rss_full / 2**20, 1),
        "rss_bytes_per_queued_call": round((rss_full - rss_empty) / max(1, n)),
        "start_from_snapshot_s": round(start_s, 2),
        "recovery_s": round(recovery_s, 2), "first_assignment_s": round(first - w_spawn, 2),
        "queued_after_restart": queued_after, "lost": n - queued_after,
    }


def site_ids(site_file: Path) -> list[str]:
    from router.config import load_site

    return list(load_site(site_file).agent_profiles())


# --- main -----------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON line per figure set")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each rate's phase")
    ap.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[100.0, 300.0, 1000.0])
    ap.add_argument("--agents", type=int, default=2000)
    ap.add_argument("--retained", type=int, default=200_000)
    ap.add_argument("--queued", type=int, default=100_000, help="part (b); 0 skips it")
    ap.add_argument("--tail", type=int, default=5000, help="part (b): offers journaled after the snapshot")
    ap.add_argument("--compact-every", type=int, default=10_000)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--grace", type=float, default=30.0)
    ap.add_argument("--sync", default="fdatasync", choices=["fsync", "fdatasync", "none"])
    ap.add_argument("--route-ratio", type=float, default=None, help="route/echo ratio at c16 from bench/route.py")
    ap.add_argument("--skip-rates", action="store_true", help="part (b) only")
    ap.add_argument("--cache", type=lambda x: Path(x) if x else None, default=Path(tempfile.gettempdir()) / "tandem-scale-cache",
                    help="pre-filled data directories kept for 6 h ('' = none)")
    ap.add_argument("--skip-sites", action="store_true", help="do not run bench/scale_sites.measure()")
    ap.add_argument("--sites-seconds", type=float, default=None, help="seconds= for scale_sites.measure()")
    args = ap.parse_args()

    def out(row: dict) -> None:
        print(json.dumps(row) if args.json else "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    problems = 0
    rows: list[dict] = []
    b: dict = {}
    with tempfile.TemporaryDirectory(prefix="tandem-scale-") as tmp:
        if not args.skip_rates and args.rates:
            rows, problems = part_a(args, Path(tmp))
            for row in rows:
                out(row)
        if args.queued > 0:
            b = part_b(args, Path(tmp))
            out(b)
            if b.get("lost"):
                print(f"INVARIANT: {b['lost']} queued calls lost by the restart", file=sys.stderr)
                problems += 1
    decision = None
    if not args.skip_sites:
        try:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from scale_sites import measure as sites_measure  # type: ignore[import-not-found]
        except ImportError:
            sites_measure = None
        if sites_measure is not None:
            try:
                kw = {} if args.sites_seconds is None else {"seconds": args.sites_seconds}
                decision = sites_measure(**kw).get("decision_p99_ms")
            except Exception as e:  # noqa: BLE001 - another bench's failure: its figure is null
                print(f"# bench/scale_sites.measure() failed: {type(e).__name__}: {e}", file=sys.stderr)
    at300 = [r for r in rows if r["rate"] == 300.0]
    out({
        "p99_ms_at_300": at300[0]["p99_ms"] if at300 else None,
        "max_stall_ms": max((r["max_stall_ms"] for r in rows), default=None),
        "rss_bytes_per_queued_call": b.get("rss_bytes_per_queued_call"),
        "recovery_s_100k": b.get("recovery_s") if b.get("queued", 0) >= 100_000 else None,
        "decision_p99_ms_20_sites": decision,
        "route_echo_ratio_c16": args.route_ratio,
    })
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
