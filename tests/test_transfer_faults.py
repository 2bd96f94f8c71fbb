"""Crash tests of transfers between sites with real node processes (invariant 1).

For each step of the protocol, on the origin and on the target: two ``tandem node``
processes, the origin with several queued calls (and calls at the target that arrived
before and after them), transfers started concurrently (Interconnect.TransferCall); the
process started with ``TANDEM_FAULT=transfer:<step>`` SIGKILLs itself right after that
step; it is restarted without the fault; once recovery has resolved every transfer, a
reconciliation over both sites (Admin.ListCalls) finds every call owned by exactly one
site — none lost, none duplicated, none assigned twice, "transferred" at the origin iff
queued at the target — and every queued call in arrival order at its site (a moved call
keeps its arrival time and class; an aborted one is back in its place).
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from node_fixtures import Stubs
from router.v1 import agents_pb2, interconnect_pb2 as pb, routing_pb2, types_pb2
from transfer_fixtures import free_port, start_node_on, interconnect, list_calls, no_transferring, offer_req, reconcile, state, wait_for, write_named_site

ORIGIN_STEPS = [
    "after_begin", "after_propose_sent", "after_proposed", "after_committing",
    "after_commit_sent", "after_committed", "after_done",
]
TARGET_STEPS = ["after_reserve", "after_commit"]
N_CALLS = 4


async def _start(site_file, data_dir, port: int, fault: str | None):
    env = {"TANDEM_FAULT": f"transfer:{fault}" if fault else ""}
    return await asyncio.to_thread(start_node_on, site_file, data_dir, port, env=env)


async def _died(proc, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while proc.alive():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def _positions_in_arrival_order(stubs: Stubs, calls: dict) -> None:
    queued = [c for c in calls.values() if state(c) == "queued"]
    pos = {}
    for c in queued:
        pos[c.call_id] = (await stubs.routing.GetCall(routing_pb2.GetCallRequest(call_id=c.call_id))).position
    by_pos = sorted(queued, key=lambda c: pos[c.call_id])
    assert [c.offered_at for c in by_pos] == sorted(c.offered_at for c in queued), [
        (c.call_id, pos[c.call_id], c.offered_at) for c in by_pos
    ]


async def _scenario(tmp_path, origin_fault: str | None, target_fault: str | None, *, agents: bool = False,
                    restart_origin_first: bool = True) -> dict:
    o_site = write_named_site(tmp_path / "origin.yaml", "origin")
    t_site = write_named_site(tmp_path / "target.yaml", "target")
    procs = {}
    ports = {"o": free_port(), "t": free_port()}
    try:
        procs["o"], procs["t"] = await asyncio.gather(
            _start(o_site, tmp_path / "o", ports["o"], origin_fault),
            _start(t_site, tmp_path / "t", ports["t"], target_fault),
        )
        so, st = Stubs.connect(procs["o"].address), Stubs.connect(procs["t"].address)
        await st.routing.OfferCall(offer_req("t-before"))
        ids = [f"c{i}" for i in range(N_CALLS)]
        for cid in ids:
            await so.routing.OfferCall(offer_req(cid))
        await asyncio.sleep(0.01)
        await st.routing.OfferCall(offer_req("t-after"))
        if agents:
            await st.agents.SignIn(agents_pb2.SignInRequest(agent_id="fr-001"))

        async def move(cid: str):
            try:
                return await interconnect(so).TransferCall(
                    pb.TransferCallRequest(call_id=cid, target=procs["t"].address, timeout_s=20), timeout=30
                )
            except grpc.aio.AioRpcError as e:
                return e

        moving = asyncio.gather(*(move(cid) for cid in ids))
        # each faulted process dies at its step; restart it without the fault (in order:
        # with both faulted, the target's step happens only after the origin's restart)
        dead = [k for k in ("o", "t") if (origin_fault if k == "o" else target_fault)]
        if not restart_origin_first:
            dead.reverse()
        for k in dead:
            proc = procs[k]
            assert await _died(proc), f"{k} never reached its fault step:\n{proc.log()}"
            await (so if k == "o" else st).channel.close()
            procs[k] = await _start(o_site if k == "o" else t_site, tmp_path / k, ports[k], None)
            if k == "o":
                so = Stubs.connect(procs["o"].address)
            else:
                st = Stubs.connect(procs["t"].address)
        results = await moving
        if agents:
            await st.agents.SetState(agents_pb2.SetStateRequest(agent_id="fr-001", state=types_pb2.AGENT_STATE_READY))
        await wait_for(lambda: no_transferring(so), 30, what="recovery of every transfer at the origin")
        owner = await reconcile(so, st, ids)
        at_o, at_t = await list_calls(so), await list_calls(st)
        assert state(at_t["t-before"]) in ("queued", "assigned") and "t-before" not in at_o
        await _positions_in_arrival_order(so, at_o)
        await _positions_in_arrival_order(st, at_t)
        # the target holds exactly the calls the origin says it transferred
        moved = {cid for cid, who in owner.items() if who == "target"}
        assert moved == {cid for cid in ids if cid in at_t}
        for s in (so, st):
            await s.channel.close()
        return {"owner": owner, "results": results}
    finally:
        for p in procs.values():
            p.kill()


@pytest.mark.parametrize("step", ORIGIN_STEPS)
async def test_origin_killed_at_each_step(tmp_path, step):
    r = await _scenario(tmp_path, step, None)
    owner = r["owner"]
    if step in ("after_committed", "after_done"):
        # the first transfer reached the target's commit: it stays there
        assert "target" in owner.values(), owner
    if step in ("after_begin", "after_propose_sent", "after_proposed"):
        # no Commit was sent for the transfer in flight: it is aborted, the call stays
        assert "origin" in owner.values(), owner


@pytest.mark.parametrize("step", TARGET_STEPS)
async def test_target_killed_at_each_step(tmp_path, step):
    r = await _scenario(tmp_path, None, step)
    if step == "after_commit":
        assert "target" in r["owner"].values()


async def test_origin_killed_after_proposed_and_target_killed_after_abort(tmp_path):
    """Recovery at the restarted origin aborts at the target; the target dies right
    after recording the abort; both come back and agree."""
    r = await _scenario(tmp_path, "after_proposed", "after_abort", restart_origin_first=True)
    assert list(r["owner"].values()).count("origin") >= 1


async def test_target_with_a_ready_agent_killed_after_commit(tmp_path):
    """The committed call is offered to the target's agent: assigned once, at one site."""
    r = await _scenario(tmp_path, None, "after_commit", agents=True)
    assert "target" in r["owner"].values()
