"""Happy paths of every site-node RPC, against an in-process node on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import zlib

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from node_fixtures import AgentSession, error_reason, make_site, running_node
from router.v1 import admin_pb2, agents_pb2, diagnostics_pb2, routing_pb2, types_pb2 as t

pytestmark = pytest.mark.timeout(60)

A = t.AgentState
S = t.CallState


def offer(call_id: str, *, skill="billing", channel=t.CHANNEL_VOICE, language="fr", caller=None, **kw):
    """A standard call; each call_id its own caller (a caller seen before is a repeat)."""
    if caller is None:
        caller = "+336" + str(zlib.crc32(call_id.encode()) % 10**8).zfill(8)
    return routing_pb2.OfferCallRequest(
        call_id=call_id, skill=skill, channel=channel, language=language, caller=caller, **kw
    )


async def ready_agent(stubs, agent_id: str) -> AgentSession:
    """Sign in, connect and set READY; returns the open session."""
    await stubs.agents.SignIn(agents_pb2.SignInRequest(agent_id=agent_id))
    session = await AgentSession(stubs, agent_id).hello()
    first = await session.next("agent")
    assert first.agent_id == agent_id and first.state == A.AGENT_STATE_NOT_READY
    await stubs.agents.SetState(agents_pb2.SetStateRequest(agent_id=agent_id, state=A.AGENT_STATE_READY))
    await session.next("agent", lambda a: a.state == A.AGENT_STATE_READY)
    return session


async def queued_ids(stubs) -> list[str]:
    r = await stubs.admin.ListCalls(admin_pb2.ListCallsRequest(state=S.CALL_STATE_QUEUED))
    return [c.call_id for c in r.calls]


async def test_health_reflection_echo(node):
    s = node.stubs
    for service in ("", "router.v1.Routing", "router.v1.Agents", "router.v1.Admin", "router.v1.Diagnostics"):
        assert await s.healthy(service), service
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.health.Check(health_pb2.HealthCheckRequest(service="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    refl = reflection_pb2_grpc.ServerReflectionStub(s.channel)
    names = set()
    async for resp in refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
        names |= {x.name for x in resp.list_services_response.service}
    assert {"router.v1.Routing", "router.v1.Agents", "router.v1.Admin", "router.v1.Diagnostics",
            "grpc.health.v1.Health"} <= names
    async for resp in refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="router.v1.Routing")])
    ):
        assert resp.file_descriptor_response.file_descriptor_proto  # grpcurl can describe it

    # reflection v1 (what grpcurl asks for first): the same protocol under its new name
    v1 = s.channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    names_v1 = set()
    async for resp in v1(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
        names_v1 |= {x.name for x in resp.list_services_response.service}
    assert {"router.v1.Routing", "grpc.reflection.v1.ServerReflection"} <= names_v1
    async for resp in v1(iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="router.v1.Agents")])):
        assert resp.file_descriptor_response.file_descriptor_proto

    payload = bytes(range(256)) * 256  # 64 KiB exactly
    r = await s.diag.Echo(diagnostics_pb2.EchoRequest(payload=payload))
    assert r.payload == payload
    assert (await s.diag.Echo(diagnostics_pb2.EchoRequest())).payload == b""


async def test_offer_get_estimate_abandon(node):
    s = node.stubs
    ctx = t.CallContext(ivr_path=["menu", "billing"], bot_transcript="hello", attributes={"order": "42"})
    r = await s.routing.OfferCall(offer("c1", context=ctx, customer_id="cust-1"))
    assert r.call.state == S.CALL_STATE_QUEUED
    assert r.call.queue == "billing-fr-voice" and r.call.site == "testsite"
    assert r.position == 1 and r.expected_wait_s >= 0 and r.decision
    assert r.call.context == ctx and r.call.customer_id == "cust-1"
    assert r.call.priority_class == t.PRIORITY_CLASS_STANDARD

    again = await s.routing.OfferCall(offer("c1", context=ctx, customer_id="cust-1"))
    assert again.call.call_id == "c1" and again.call.state == S.CALL_STATE_QUEUED
    assert again.call.offered_at == r.call.offered_at

    r2 = await s.routing.OfferCall(offer("c2", caller="+33600000001"))  # VIP list
    assert r2.call.priority_class == t.PRIORITY_CLASS_VIP
    assert r2.position == 1  # VIP head start puts it first
    got = await s.routing.GetCall(routing_pb2.GetCallRequest(call_id="c1"))
    assert got.call.state == S.CALL_STATE_QUEUED and got.position == 2

    bl = await s.routing.OfferCall(offer("c3", caller="+33600000666"))
    assert bl.call.state == S.CALL_STATE_REJECTED and bl.position == 0

    est = await s.routing.EstimateWait(
        routing_pb2.EstimateWaitRequest(skill="billing", channel=t.CHANNEL_VOICE, language="fr")
    )
    assert est.queue == "billing-fr-voice" and est.queue_length == 2 and est.agents_ready == 0

    ab = await s.routing.AbandonCall(routing_pb2.AbandonCallRequest(call_id="c1", reason="hangup"))
    assert ab.call.state == S.CALL_STATE_ABANDONED and ab.call.abandon_reason == "hangup"
    ab2 = await s.routing.AbandonCall(routing_pb2.AbandonCallRequest(call_id="c1", reason="hangup"))
    assert ab2.call == ab.call
    assert await queued_ids(s) == ["c2"]

    status = await s.admin.GetStatus(admin_pb2.GetStatusRequest())
    assert status.site == "testsite" and status.region == "emea" and status.kind == "inhouse"
    assert status.serving and status.journal_seq >= 3
    assert status.calls_by_state["queued"] == 1 and status.calls_by_state["abandoned"] == 1
    q = {x.name: x for x in status.queues}
    assert q["billing-fr-voice"].length == 1 and q["billing-fr-voice"].offered >= 2


async def test_agent_flow_end_to_end(node):
    s = node.stubs
    session = await ready_agent(s, "fr-001")
    # a past contact of the same caller, for the screen pop
    await s.routing.OfferCall(offer("old-1", skill="support", channel=t.CHANNEL_CHAT, language="", caller="+33622222222"))
    await s.routing.AbandonCall(routing_pb2.AbandonCallRequest(call_id="old-1", reason="hangup"))
    # the chat call went to the ready agent first: drain it
    first = await session.next("assignment", timeout=5)
    if first.call.call_id == "old-1":
        await session.next("cancelled", lambda c: c.call_id == "old-1")

    ctx = t.CallContext(ivr_path=["1", "3"], attributes={"reason": "invoice"})
    r = await s.routing.OfferCall(offer("call-1", caller="+33622222222", customer_id="K9", context=ctx))
    a = await session.next("assignment", lambda x: x.call.call_id == "call-1")
    assert r.call.state in (S.CALL_STATE_ASSIGNED, S.CALL_STATE_QUEUED)
    assert a.assignment_id and a.offer_timeout_s == 10
    assert a.call.state == S.CALL_STATE_ASSIGNED and a.call.agent_id == "fr-001"
    assert a.call.context == ctx
    assert a.screen_pop.caller == "+33622222222" and a.screen_pop.customer_id == "K9"
    assert [h.call_id for h in a.screen_pop.history][:1] == ["old-1"]

    await session.accept(a.assignment_id)
    c = await session.next("connected")
    assert (c.assignment_id, c.call_id) == (a.assignment_id, "call-1")
    got = await s.routing.GetCall(routing_pb2.GetCallRequest(call_id="call-1"))
    assert got.call.state == S.CALL_STATE_CONNECTED and got.call.answered_at > 0
    agent = (await s.agents.GetAgent(agents_pb2.GetAgentRequest(agent_id="fr-001"))).agent
    assert list(agent.call_ids) == ["call-1"]

    done = await s.routing.CompleteCall(routing_pb2.CompleteCallRequest(
        call_id="call-1", disposition=t.Disposition(resolved=True, csat=5, wrap_up_code="paid")))
    assert done.call.state == S.CALL_STATE_COMPLETED and done.call.disposition.csat == 5
    wrap = await session.next("agent", lambda x: x.state == A.AGENT_STATE_WRAP_UP)
    assert wrap.wrap_up_until > 0
    # billing-fr-voice wrap_up_s is 0.5 in the test site: the node's timer makes it READY
    await session.next("agent", lambda x: x.state == A.AGENT_STATE_READY, timeout=5)
    again = await s.routing.CompleteCall(routing_pb2.CompleteCallRequest(
        call_id="call-1", disposition=t.Disposition(resolved=True, csat=5, wrap_up_code="paid")))
    assert again.call == done.call  # idempotent (another disposition: DISPOSITION_CONFLICT)
    session.cancel()


async def test_reject_puts_call_back_at_its_place(node):
    s = node.stubs
    for cid in ("r1", "r2", "r3"):
        await s.routing.OfferCall(offer(cid))
    session = await ready_agent(s, "fr-002")
    a = await session.next("assignment")
    assert a.call.call_id == "r1"
    await session.reject(a.assignment_id, "busy")
    cancelled = await session.next("cancelled")
    assert cancelled.call_id == "r1"
    agent = await session.next("agent", lambda x: x.state == A.AGENT_STATE_NOT_READY)
    assert agent.reason == "rejected"
    got = await s.routing.GetCall(routing_pb2.GetCallRequest(call_id="r1"))
    assert got.call.state == S.CALL_STATE_QUEUED and got.position == 1
    assert await queued_ids(s) == ["r1", "r2", "r3"]
    session.cancel()


async def test_no_answer_and_abandon_while_ringing(tmp_path):
    async with running_node(make_site(offer_timeout_s=0.5), tmp_path / "n") as n:
        s = n.stubs
        await s.routing.OfferCall(offer("n1"))
        await s.routing.OfferCall(offer("n2"))
        session = await ready_agent(s, "fr-001")
        a = await session.next("assignment")
        assert a.call.call_id == "n1" and a.offer_timeout_s == 0.5
        c = await session.next("cancelled", timeout=5)
        assert (c.assignment_id, c.reason) == (a.assignment_id, "no_answer")
        agent = await session.next("agent", lambda x: x.state == A.AGENT_STATE_NOT_READY)
        assert agent.reason == "no_answer"
        got = await s.routing.GetCall(routing_pb2.GetCallRequest(call_id="n1"))
        assert got.call.state == S.CALL_STATE_QUEUED and got.position == 1
        assert await queued_ids(s) == ["n1", "n2"]

        # ready again: n1 rings again; the caller hangs up while it rings
        await s.agents.SetState(agents_pb2.SetStateRequest(agent_id="fr-001", state=A.AGENT_STATE_READY))
        a2 = await session.next("assignment")
        assert a2.call.call_id == "n1"
        await s.routing.AbandonCall(routing_pb2.AbandonCallRequest(call_id="n1", reason="hangup"))
        c2 = await session.next("cancelled", lambda x: x.call_id == "n1")
        assert c2.reason == "abandoned"
        # the agent is free again and gets the next call
        a3 = await session.next("assignment")
        assert a3.call.call_id == "n2"
        session.cancel()


async def test_watch_call_sees_every_state(node):
    s = node.stubs
    await s.routing.OfferCall(offer("w1"))
    watch = s.routing.WatchCall(routing_pb2.WatchCallRequest(call_id="w1", interval_s=0.1))
    states: list[int] = []

    async def collect():
        async for upd in watch:
            if not states or states[-1] != upd.call.state:
                states.append(upd.call.state)

    task = asyncio.create_task(collect())
    await asyncio.sleep(0.2)
    session = await ready_agent(s, "bi-001")
    a = await session.next("assignment")
    await session.accept(a.assignment_id)
    await session.next("connected")
    await s.routing.CompleteCall(routing_pb2.CompleteCallRequest(call_id="w1"))
    await asyncio.wait_for(task, 5)  # the stream ends after the final state
    assert states == [S.CALL_STATE_QUEUED, S.CALL_STATE_ASSIGNED, S.CALL_STATE_CONNECTED, S.CALL_STATE_COMPLETED]
    session.cancel()


async def test_watch_call_position_updates(node):
    s = node.stubs
    for cid in ("p1", "p2", "p3"):
        await s.routing.OfferCall(offer(cid))
    watch = s.routing.WatchCall(routing_pb2.WatchCallRequest(call_id="p3", interval_s=0.1))
    first = await asyncio.wait_for(watch.read(), 5)
    assert first.position == 3
    await s.routing.AbandonCall(routing_pb2.AbandonCallRequest(call_id="p1"))
    upd = await asyncio.wait_for(watch.read(), 5)
    assert upd.position == 2 and upd.call.state == S.CALL_STATE_QUEUED
    watch.cancel()
    await asyncio.sleep(0.1)
    assert node.node.watcher_count == 0


async def test_connect_replaces_stream_and_resends_ringing_offer(node):
    s = node.stubs
    old = await ready_agent(s, "fr-003")
    await s.routing.OfferCall(offer("x1"))
    a = await old.next("assignment")
    new = await AgentSession(s, "fr-003").hello()
    ag = await new.next("agent")
    assert ag.agent_id == "fr-003" and list(ag.call_ids) == ["x1"]
    again = await new.next("assignment")
    assert again.assignment_id == a.assignment_id and again.call.call_id == "x1"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        while True:
            m = await asyncio.wait_for(old.call.read(), 5)
            if m is grpc.aio.EOF:
                break
    assert e.value.code() == grpc.StatusCode.ABORTED
    # the old stream ending did not disconnect the agent: the offer still rings
    got = await s.routing.GetCall(routing_pb2.GetCallRequest(call_id="x1"))
    assert got.call.state == S.CALL_STATE_ASSIGNED
    await new.accept(a.assignment_id)
    await new.next("connected")
    new.cancel()


async def test_stream_end_disconnects_agent(node):
    s = node.stubs
    session = await ready_agent(s, "bi-002")
    await s.routing.OfferCall(offer("d1"))
    await session.next("assignment")
    session.cancel()
    for _ in range(100):
        agent = (await s.agents.GetAgent(agents_pb2.GetAgentRequest(agent_id="bi-002"))).agent
        if agent.state == A.AGENT_STATE_NOT_READY:
            break
        await asyncio.sleep(0.02)
    assert agent.state == A.AGENT_STATE_NOT_READY and agent.reason == "disconnected"
    got = await s.routing.GetCall(routing_pb2.GetCallRequest(call_id="d1"))
    assert got.call.state == S.CALL_STATE_QUEUED and got.position == 1
    assert node.node.connected_agents == []


async def test_sign_in_out_get_agent(node):
    s = node.stubs
    r = await s.agents.SignIn(agents_pb2.SignInRequest(agent_id="bi-001"))
    assert r.agent.state == A.AGENT_STATE_NOT_READY and r.agent.reason == "signed_in"
    assert {x.skill: x.proficiency for x in r.agent.skills} == {"billing": 6, "support": 6}
    assert list(r.agent.languages) == ["fr", "en"]
    assert {c.channel: c.capacity for c in r.agent.capacity} == {t.CHANNEL_VOICE: 1, t.CHANNEL_CHAT: 3}
    nr = await s.agents.SetState(agents_pb2.SetStateRequest(agent_id="bi-001", state=A.AGENT_STATE_NOT_READY, reason="lunch"))
    assert nr.agent.state == A.AGENT_STATE_NOT_READY and nr.agent.reason == "lunch"
    wu = await s.agents.SetState(agents_pb2.SetStateRequest(agent_id="bi-001", state=A.AGENT_STATE_WRAP_UP, timeout_s=60))
    assert wu.agent.state == A.AGENT_STATE_WRAP_UP and wu.agent.wrap_up_until > wu.agent.state_since
    g = await s.agents.GetAgent(agents_pb2.GetAgentRequest(agent_id="bi-001"))
    assert g.agent == wu.agent
    out = await s.agents.SignOut(agents_pb2.SignOutRequest(agent_id="bi-001"))
    assert out.agent.state == A.AGENT_STATE_SIGNED_OUT
    status = await s.admin.GetStatus(admin_pb2.GetStatusRequest())
    assert status.agents_by_state["signed_out"] == 5


async def test_list_calls_paging(node):
    s = node.stubs
    ids = [f"L{i:03d}" for i in range(25)]
    for cid in ids:
        await s.routing.OfferCall(offer(cid, language="en"))
    seen, token, pages = [], "", 0
    while True:
        r = await s.admin.ListCalls(admin_pb2.ListCallsRequest(page_size=10, page_token=token))
        seen += [c.call_id for c in r.calls]
        pages += 1
        token = r.next_page_token
        if not token:
            break
    assert seen == ids and pages == 3
    assert [c.call_id for c in (await s.admin.ListCalls(admin_pb2.ListCallsRequest())).calls] == ids
    r = await s.admin.ListCalls(admin_pb2.ListCallsRequest(state=S.CALL_STATE_COMPLETED))
    assert list(r.calls) == [] and r.next_page_token == ""
    # a page token survives calls leaving the list in between
    r1 = await s.admin.ListCalls(admin_pb2.ListCallsRequest(page_size=5, state=S.CALL_STATE_QUEUED))
    await s.routing.AbandonCall(routing_pb2.AbandonCallRequest(call_id="L001"))
    r2 = await s.admin.ListCalls(admin_pb2.ListCallsRequest(page_size=5, page_token=r1.next_page_token,
                                                            state=S.CALL_STATE_QUEUED))
    assert [c.call_id for c in r2.calls] == ids[5:10]


async def test_restart_in_process_keeps_state(tmp_path):
    data = tmp_path / "n"
    async with running_node(make_site(), data, sync="fdatasync") as n:
        s = n.stubs
        for cid in ("k1", "k2", "k3"):
            await s.routing.OfferCall(offer(cid))
        await s.agents.SignIn(agents_pb2.SignInRequest(agent_id="fr-001"))
        await s.agents.SetState(agents_pb2.SetStateRequest(agent_id="fr-001", state=A.AGENT_STATE_NOT_READY, reason="meeting"))
        before = await s.admin.ListCalls(admin_pb2.ListCallsRequest())
    async with running_node(make_site(), data, sync="fdatasync") as n:
        after = await n.stubs.admin.ListCalls(admin_pb2.ListCallsRequest())
        assert after == before
        agent = (await n.stubs.agents.GetAgent(agents_pb2.GetAgentRequest(agent_id="fr-001"))).agent
        assert agent.state == A.AGENT_STATE_NOT_READY and agent.reason == "meeting"


async def test_offer_during_drain_is_refused(tmp_path):
    async with running_node(make_site(), tmp_path / "n", drain_s=1.0) as n:
        s = n.stubs
        await s.routing.OfferCall(offer("z1"))
        shutdown = asyncio.create_task(n.node.shutdown())
        await asyncio.sleep(0.2)
        assert not await s.healthy()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await s.routing.OfferCall(offer("z2"))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and error_reason(e.value) == "NODE_DRAINING"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await s.agents.SignIn(agents_pb2.SignInRequest(agent_id="fr-001"))
        assert error_reason(e.value) == "NODE_DRAINING"
        # work already there can still finish during the grace
        r = await s.routing.AbandonCall(routing_pb2.AbandonCallRequest(call_id="z1"))
        assert r.call.state == S.CALL_STATE_ABANDONED
        status = await s.admin.GetStatus(admin_pb2.GetStatusRequest())
        assert not status.serving
        await shutdown


async def test_compaction_then_restart(tmp_path):
    data = tmp_path / "n"
    async with running_node(make_site(), data, sync="fdatasync", compact_every=10) as n:
        s = n.stubs
        for i in range(35):
            await s.routing.OfferCall(offer(f"cp{i:02d}", language="en" if i % 2 else "fr"))
        await s.agents.SignIn(agents_pb2.SignInRequest(agent_id="bi-002"))
        for _ in range(100):  # compaction runs in the background
            if n.node.journal.records_since_snapshot < 10:
                break
            await asyncio.sleep(0.02)
        assert n.node.journal.records_since_snapshot < 10
        before = await s.admin.ListCalls(admin_pb2.ListCallsRequest())
        seq = (await s.admin.GetStatus(admin_pb2.GetStatusRequest())).journal_seq
    assert any(p.name.startswith("snapshot-") for p in data.iterdir())
    async with running_node(make_site(), data, sync="fdatasync") as n:
        after = await n.stubs.admin.ListCalls(admin_pb2.ListCallsRequest())
        assert after == before
        assert (await n.stubs.admin.GetStatus(admin_pb2.GetStatusRequest())).journal_seq == seq
        agent = (await n.stubs.agents.GetAgent(agents_pb2.GetAgentRequest(agent_id="bi-002"))).agent
        assert agent.state == A.AGENT_STATE_NOT_READY


async def test_journal_failure_stops_the_node(tmp_path):
    async with running_node(make_site(), tmp_path / "n") as n:
        s = n.stubs
        await s.routing.OfferCall(offer("ok-1"))

        def broken(record):
            raise OSError(5, "Input/output error")

        n.node.journal.append = broken
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await s.routing.OfferCall(offer("lost-1"))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        await asyncio.wait_for(n.node.wait_stopped(), 5)
        assert n.node.failed is not None


async def test_clean_stop_compacts(tmp_path, monkeypatch):
    import router.node.node as node_mod

    monkeypatch.setattr(node_mod, "COMPACT_AT_STOP", 5)
    data = tmp_path / "n"
    async with running_node(make_site(), data, sync="fdatasync") as n:
        for i in range(8):
            await n.stubs.routing.OfferCall(offer(f"s{i}"))
        before = await n.stubs.admin.ListCalls(admin_pb2.ListCallsRequest())
    assert [p.name for p in data.iterdir() if p.name.startswith("snapshot-")] == ["snapshot-0000000000000008.json"]
    async with running_node(make_site(), data) as n:
        assert n.node.journal.records_since_snapshot == 0
        assert await n.stubs.admin.ListCalls(admin_pb2.ListCallsRequest()) == before


async def test_metrics(node):
    from prometheus_client import REGISTRY, generate_latest

    s = node.stubs
    await s.routing.OfferCall(offer("m1"))
    with pytest.raises(grpc.aio.AioRpcError):
        await s.routing.OfferCall(offer("m2", skill="astrology"))
    node.node.publish_metrics()
    text = generate_latest(REGISTRY).decode()
    assert 'tandem_node_commands_total{op="offer",result="changed",site="testsite"}' in text
    assert 'tandem_node_commands_total{op="offer",result="UNKNOWN_SKILL",site="testsite"}' in text
    assert 'tandem_node_rpc_errors_total{method="OfferCall",reason="UNKNOWN_SKILL"}' in text
    assert 'tandem_queue_contacts{queue="billing-fr-voice",site="testsite"} 1.0' in text
    assert "tandem_node_durable_seconds_bucket" in text
