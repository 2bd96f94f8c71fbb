"""Invariant 4 against real ``tandem node`` processes: SIGKILL at any moment loses no
acknowledged change; SIGTERM drains and exits 0; the restart has the same state."""

from __future__ import annotations

import asyncio
import random
import signal
import time

import grpc
import pytest

from node_fixtures import AgentSession, Stubs, error_reason, node_process, start_node_process, write_site
from router.v1 import admin_pb2, agents_pb2, routing_pb2, types_pb2 as t

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

A = t.AgentState
S = t.CallState
AGENTS = ["fr-001", "fr-002", "fr-003", "bi-001", "bi-002"]


def offer(call_id: str, i: int = 0) -> routing_pb2.OfferCallRequest:
    """Calls of various classes, channels and languages, chosen by i."""
    callers = ["+33611111111", "+33600000001", "+33600000002", "+33622222222", ""]
    kinds = [("billing", t.CHANNEL_VOICE, "fr"), ("billing", t.CHANNEL_VOICE, "en"), ("support", t.CHANNEL_CHAT, "")]
    skill, channel, lang = kinds[i % len(kinds)]
    pcs = [t.PRIORITY_CLASS_UNSPECIFIED, t.PRIORITY_CLASS_REPEAT, t.PRIORITY_CLASS_STANDARD]
    return routing_pb2.OfferCallRequest(
        call_id=call_id, skill=skill, channel=channel, language=lang,
        caller=callers[i % len(callers)], customer_id=f"cust-{i % 7}", priority_class=pcs[i % len(pcs)],
        context=t.CallContext(ivr_path=["menu", str(i)], attributes={"i": str(i)}),
    )


async def observe(s: Stubs) -> dict:
    calls = list((await s.admin.ListCalls(admin_pb2.ListCallsRequest(page_size=1000))).calls)
    positions = {}
    for c in calls:
        if c.state == S.CALL_STATE_QUEUED:
            positions[c.call_id] = (await s.routing.GetCall(routing_pb2.GetCallRequest(call_id=c.call_id))).position
    agents = [(await s.agents.GetAgent(agents_pb2.GetAgentRequest(agent_id=a))).agent for a in AGENTS]
    status = await s.admin.GetStatus(admin_pb2.GetStatusRequest())
    return {
        "calls": calls, "positions": positions, "agents": agents,
        "calls_by_state": dict(status.calls_by_state), "agents_by_state": dict(status.agents_by_state),
        "journal_seq": status.journal_seq,
    }


async def test_sigkill_restart_keeps_calls_order_and_agents(tmp_path):
    site_file = write_site(tmp_path / "site.yaml", offer_timeout_s=300)
    data = tmp_path / "data"
    with node_process(site_file, data) as proc:
        s = Stubs.connect(proc.address)
        # an agent on a call, one ringing, two in other states, one signed out
        for a in ("fr-001", "bi-001", "fr-002", "bi-002"):
            await s.agents.SignIn(agents_pb2.SignInRequest(agent_id=a))
        talk = await AgentSession(s, "fr-001").hello()
        ring = await AgentSession(s, "bi-001").hello()
        await s.agents.SetState(agents_pb2.SetStateRequest(agent_id="fr-001", state=A.AGENT_STATE_READY))
        await s.routing.OfferCall(offer("talk-1", 0))
        a = await talk.next("assignment")
        await talk.accept(a.assignment_id)
        await talk.next("connected")
        await s.agents.SetState(agents_pb2.SetStateRequest(agent_id="bi-001", state=A.AGENT_STATE_READY))
        await s.routing.OfferCall(offer("ring-1", 1))
        await ring.next("assignment")
        await s.agents.SetState(agents_pb2.SetStateRequest(agent_id="fr-002", state=A.AGENT_STATE_NOT_READY, reason="training"))
        await s.agents.SetState(agents_pb2.SetStateRequest(agent_id="bi-002", state=A.AGENT_STATE_WRAP_UP, timeout_s=3600))
        for i in range(40):
            await s.routing.OfferCall(offer(f"call-{i:03d}", i))
        await s.routing.AbandonCall(routing_pb2.AbandonCallRequest(call_id="call-005", reason="hangup"))
        before = await observe(s)
        proc.kill()
        await s.channel.close()
    assert before["calls_by_state"]["queued"] >= 30
    assert before["calls_by_state"]["connected"] >= 1 and before["calls_by_state"]["assigned"] >= 1

    started = time.monotonic()
    with node_process(site_file, data) as proc:
        restart_s = time.monotonic() - started
        s = Stubs.connect(proc.address)
        after = await observe(s)
        # the recovered node accepts new work and re-offers are idempotent
        again = await s.routing.OfferCall(offer("call-010", 10))
        assert again.call == next(c for c in before["calls"] if c.call_id == "call-010")
        await s.channel.close()
    assert after == before, "state after SIGKILL + restart differs"
    assert restart_s < 15


async def _offer_stream(address: str, prefix: str, acked: list[str], stop: asyncio.Event, workers: int = 8) -> None:
    s = Stubs.connect(address)

    async def worker(w: int) -> None:
        i = 0
        while not stop.is_set():
            cid = f"{prefix}-{w}-{i}"
            try:
                await s.routing.OfferCall(offer(cid, i + w), timeout=5)
            except grpc.aio.AioRpcError:
                return  # the node died under us: this one may or may not be there
            acked.append(cid)
            i += 1

    try:
        await asyncio.gather(*(worker(w) for w in range(workers)))
    finally:
        await s.channel.close()


async def test_sigkill_during_offers_loses_no_acknowledged_call(tmp_path):
    site_file = write_site(tmp_path / "site.yaml")
    data = tmp_path / "data"
    rng = random.Random(7)
    all_acked: list[str] = []
    for round_ in range(4):
        proc = start_node_process(site_file, data)
        try:
            acked: list[str] = []
            stop = asyncio.Event()
            task = asyncio.create_task(_offer_stream(proc.address, f"r{round_}", acked, stop))
            await asyncio.sleep(rng.uniform(0.2, 0.8))
            proc.proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(task, 10)
        finally:
            proc.kill()
        assert acked, "no offer was acknowledged before the kill; raise the sleep"
        all_acked += acked

    with node_process(site_file, data) as proc:
        s = Stubs.connect(proc.address)
        calls = []
        token = ""
        while True:
            r = await s.admin.ListCalls(admin_pb2.ListCallsRequest(page_size=1000, page_token=token))
            calls += r.calls
            token = r.next_page_token
            if not token:
                break
        ids = [c.call_id for c in calls]
        assert len(ids) == len(set(ids)), "a call is listed twice"
        missing = set(all_acked) - set(ids)
        assert not missing, f"{len(missing)} acknowledged offers lost, e.g. {sorted(missing)[:5]}"
        # queue positions are a permutation 1..n per queue, in offer-order-consistent form
        by_queue: dict[str, list[int]] = {}
        for c in calls:
            if c.state == S.CALL_STATE_QUEUED:
                p = (await s.routing.GetCall(routing_pb2.GetCallRequest(call_id=c.call_id))).position
                by_queue.setdefault(c.queue, []).append(p)
        for q, ps in by_queue.items():
            assert sorted(ps) == list(range(1, len(ps) + 1)), q
        await s.channel.close()
    print(f"{len(all_acked)} acknowledged offers over 4 SIGKILLs, {len(ids)} calls recovered")


async def _agent_desk(s: Stubs, agent_id: str, connected: asyncio.Queue) -> None:
    """Accept every offer; hand connected calls to the completer."""
    session = await AgentSession(s, agent_id).hello()
    try:
        while True:
            msg = await session.call.read()
            if msg is grpc.aio.EOF:
                return
            kind = msg.WhichOneof("kind")
            if kind == "assignment":
                await session.accept(msg.assignment.assignment_id)
            elif kind == "connected":
                connected.put_nowait(msg.connected.call_id)
    except (grpc.aio.AioRpcError, asyncio.CancelledError):
        return
    finally:
        session.cancel()


async def test_sigkill_during_mixed_traffic_keeps_calls_and_agents_consistent(tmp_path):
    site_file = write_site(tmp_path / "site.yaml")
    data = tmp_path / "data"
    rng = random.Random(11)
    acked_offers: list[str] = []
    acked_completes: list[str] = []
    for round_ in range(3):
        proc = start_node_process(site_file, data)
        s = Stubs.connect(proc.address)
        try:
            for a in AGENTS:
                try:
                    await s.agents.SignIn(agents_pb2.SignInRequest(agent_id=a))
                except grpc.aio.AioRpcError as e:
                    assert error_reason(e) == "AGENT_ALREADY_SIGNED_IN"
            connected: asyncio.Queue = asyncio.Queue()
            desks = [asyncio.create_task(_agent_desk(s, a, connected)) for a in AGENTS]
            await asyncio.sleep(0.1)
            for a in AGENTS:
                await s.agents.SetState(agents_pb2.SetStateRequest(agent_id=a, state=A.AGENT_STATE_READY))
            stop = asyncio.Event()

            async def completer() -> None:
                while True:
                    cid = await connected.get()
                    try:
                        await s.routing.CompleteCall(routing_pb2.CompleteCallRequest(
                            call_id=cid, disposition=t.Disposition(resolved=True, csat=4)), timeout=5)
                    except grpc.aio.AioRpcError:
                        return
                    acked_completes.append(cid)

            comp = asyncio.create_task(completer())
            offers = asyncio.create_task(_offer_stream(proc.address, f"m{round_}", acked_offers, stop, workers=4))
            await asyncio.sleep(rng.uniform(0.3, 1.0))
            proc.proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(offers, 10)
            await asyncio.wait_for(asyncio.gather(*desks, return_exceptions=True), 10)
            comp.cancel()  # waiting for a connected call that will not come
            await asyncio.gather(comp, return_exceptions=True)
        finally:
            proc.kill()
            await s.channel.close()
    assert acked_completes, "no call was completed before the kills; raise the sleep"

    with node_process(site_file, data) as proc:
        s = Stubs.connect(proc.address)
        calls, token = [], ""
        while True:
            r = await s.admin.ListCalls(admin_pb2.ListCallsRequest(page_size=1000, page_token=token))
            calls += r.calls
            token = r.next_page_token
            if not token:
                break
        agents = {a: (await s.agents.GetAgent(agents_pb2.GetAgentRequest(agent_id=a))).agent for a in AGENTS}
        await s.channel.close()
    by_id = {c.call_id: c for c in calls}
    assert len(by_id) == len(calls)
    assert not set(acked_offers) - set(by_id)
    assert all(by_id[c].state == S.CALL_STATE_COMPLETED for c in acked_completes)
    capacity = {"fr": {t.CHANNEL_VOICE: 1, t.CHANNEL_CHAT: 2}, "bi": {t.CHANNEL_VOICE: 1, t.CHANNEL_CHAT: 3}}
    for aid, agent in agents.items():
        holding = {c.call_id for c in calls
                   if c.agent_id == aid and c.state in (S.CALL_STATE_ASSIGNED, S.CALL_STATE_CONNECTED)}
        assert set(agent.call_ids) == holding, aid
        for ch, cap in capacity[aid[:2]].items():
            assert sum(1 for cid in holding if by_id[cid].channel == ch) <= cap, (aid, ch)
    print(f"{len(acked_offers)} offers and {len(acked_completes)} completes acknowledged over 3 SIGKILLs")


async def test_sigterm_drains_and_keeps_queued_calls(tmp_path):
    site_file = write_site(tmp_path / "site.yaml")
    data = tmp_path / "data"
    proc = start_node_process(site_file, data, env={"TANDEM_DRAIN_S": "1.5"})
    try:
        s = Stubs.connect(proc.address)
        for i in range(5):
            await s.routing.OfferCall(offer(f"t-{i}", i))
        before = list((await s.admin.ListCalls(admin_pb2.ListCallsRequest())).calls)
        sent = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        for _ in range(100):
            if not await s.healthy():
                break
            await asyncio.sleep(0.01)
        assert not await s.healthy()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await s.routing.OfferCall(offer("late", 0))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and error_reason(e.value) == "NODE_DRAINING"
        # existing work may still finish during the grace
        r = await s.routing.AbandonCall(routing_pb2.AbandonCallRequest(call_id="t-0", reason="hangup"))
        assert r.call.state == S.CALL_STATE_ABANDONED
        assert time.monotonic() - sent < 1.5
        await s.channel.close()
        code = await asyncio.to_thread(proc.terminate, 15)
        assert code == 0, proc.log()
    finally:
        proc.kill()

    with node_process(site_file, data) as proc:
        s = Stubs.connect(proc.address)
        after = list((await s.admin.ListCalls(admin_pb2.ListCallsRequest())).calls)
        await s.channel.close()
    assert [c.call_id for c in after] == [c.call_id for c in before]
    assert after[0].state == S.CALL_STATE_ABANDONED
    assert after[1:] == before[1:]


def test_bad_site_file_exits_2(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("site: {name: x}\nqueues: []\n")
    r = subprocess.run(
        [sys.executable, "-m", "router.cli", "node", "--site", str(bad), "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=30,
    )
    assert r.returncode == 2
    assert "invalid site configuration" in r.stderr


async def test_metrics_endpoint(tmp_path):
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    site_file = write_site(tmp_path / "site.yaml")
    with node_process(site_file, tmp_path / "data", env={"TANDEM_METRICS_PORT": str(port)}) as proc:
        s = Stubs.connect(proc.address)
        await s.routing.OfferCall(offer("m-1", 0))
        await s.channel.close()
        text = ""
        for _ in range(40):  # gauges refresh once a second
            text = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            )
            if 'tandem_queue_contacts{queue="billing-fr-voice",site="testsite"} 1.0' in text:
                break
            await asyncio.sleep(0.1)
        assert 'tandem_queue_contacts{queue="billing-fr-voice",site="testsite"} 1.0' in text
        assert 'tandem_node_commands_total{op="offer",result="changed",site="testsite"} 1.0' in text


def test_second_node_on_same_data_dir_exits_1(tmp_path):
    import subprocess
    import sys

    site_file = write_site(tmp_path / "site.yaml")
    with node_process(site_file, tmp_path / "data"):
        r = subprocess.run(
            [sys.executable, "-m", "router.cli", "node", "--site", str(site_file),
             "--data-dir", str(tmp_path / "data"), "--listen", "127.0.0.1:0"],
            capture_output=True, text=True, timeout=30,
        )
    assert r.returncode == 1
    assert "in use" in r.stderr
