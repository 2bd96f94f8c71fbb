"""The cheap agent protocol (auto answer, Complete on the Connect stream), the agent
state push only on a change, and ListCalls paging that stays cheap with many calls."""

from __future__ import annotations

import asyncio
import time

import pytest

from node_fixtures import AgentSession, make_site, running_node
from router.engine import views as views_mod
from router.v1 import admin_pb2, agents_pb2, diagnostics_pb2, routing_pb2, types_pb2 as t
from test_node_api import offer, ready_agent

pytestmark = pytest.mark.timeout(120)

A = t.AgentState
S = t.CallState
OK, NOT_FOUND, FAILED_PRECONDITION = 0, 5, 9


async def auto_agent(stubs, agent_id: str) -> AgentSession:
    """Sign in, connect with auto answer and set READY."""
    await stubs.agents.SignIn(agents_pb2.SignInRequest(agent_id=agent_id))
    session = AgentSession(stubs, agent_id)
    await session.call.write(agents_pb2.AgentMessage(hello=agents_pb2.Hello(agent_id=agent_id, auto_answer=True)))
    await session.next("agent")
    await stubs.agents.SetState(agents_pb2.SetStateRequest(agent_id=agent_id, state=A.AGENT_STATE_READY))
    await session.next("agent", lambda a: a.state == A.AGENT_STATE_READY)
    return session


async def complete_on_stream(session: AgentSession, call_id: str, **disposition) -> agents_pb2.CommandResult:
    await session.call.write(agents_pb2.AgentMessage(
        complete=agents_pb2.Complete(call_id=call_id, disposition=t.Disposition(**disposition))
    ))
    return await session.next("result", lambda r: r.call_id == call_id)


async def test_auto_answer_connects_in_one_step_and_complete_on_stream(node):
    s = node.stubs
    session = await auto_agent(s, "fr-001")
    r = await s.routing.OfferCall(offer("aa-1"))
    assert r.call.state == S.CALL_STATE_CONNECTED and r.call.agent_id == "fr-001"
    a = await session.next("assignment")
    assert a.connected and a.call.call_id == "aa-1" and a.call.state == S.CALL_STATE_CONNECTED
    assert a.call.answered_at > 0 and a.screen_pop.caller == r.call.caller
    got = await s.routing.GetCall(routing_pb2.GetCallRequest(call_id="aa-1"))
    assert got.call.state == S.CALL_STATE_CONNECTED

    res = await complete_on_stream(session, "aa-1", resolved=True, csat=4, wrap_up_code="ok")
    assert (res.op, res.code, res.reason) == ("complete", OK, "")
    assert res.call.state == S.CALL_STATE_COMPLETED and res.call.disposition.csat == 4
    # billing-fr-voice has a 0.5 s wrap-up: a state change, so an Agent push
    await session.next("agent", lambda x: x.state == A.AGENT_STATE_WRAP_UP)
    again = await complete_on_stream(session, "aa-1", resolved=True, csat=4, wrap_up_code="ok")
    assert again.code == OK and again.call == res.call  # idempotent, like CompleteCall
    # neither an Accept round trip nor a Connected message, and no Agent push for the
    # assignment or the completion while the state did not change
    kinds = [k for k, _ in session.seen]
    assert "connected" not in kinds
    assert kinds[kinds.index("assignment"):kinds.index("result")] == ["assignment"]
    session.cancel()


async def test_stream_complete_refusals_are_reported_and_keep_the_stream(node):
    s = node.stubs
    session = await auto_agent(s, "fr-002")
    other = await auto_agent(s, "bi-001")
    await s.routing.OfferCall(offer("sc-1"))
    a = await session.next("assignment")
    holder, idle = (session, other) if a.call.agent_id == "fr-002" else (other, session)
    assert a.call.call_id == "sc-1"

    missing = await complete_on_stream(holder, "nope")
    assert (missing.code, missing.reason) == (NOT_FOUND, "CALL_NOT_FOUND") and missing.message
    wrong = await complete_on_stream(idle, "sc-1")
    assert (wrong.code, wrong.reason) == (FAILED_PRECONDITION, "WRONG_AGENT")
    bad = await complete_on_stream(holder, "sc-1", csat=9)
    assert (bad.code, bad.reason) == (3, "INVALID_CSAT")
    got = await s.routing.GetCall(routing_pb2.GetCallRequest(call_id="sc-1"))
    assert got.call.state == S.CALL_STATE_CONNECTED  # nothing changed
    done = await complete_on_stream(holder, "sc-1", csat=5)
    assert done.code == OK and done.call.state == S.CALL_STATE_COMPLETED
    # the unary CompleteCall still works and agrees
    unary = await s.routing.CompleteCall(routing_pb2.CompleteCallRequest(
        call_id="sc-1", disposition=t.Disposition(csat=5)))  # the same disposition: idempotent
    assert unary.call == done.call
    session.cancel()
    other.cancel()


async def test_auto_answer_hello_answers_ringing_offers(node):
    s = node.stubs
    classic = await ready_agent(s, "fr-003")
    await s.routing.OfferCall(offer("ring-1"))
    ringing = await classic.next("assignment")
    assert not ringing.connected
    session = AgentSession(s, "fr-003")
    await session.call.write(agents_pb2.AgentMessage(hello=agents_pb2.Hello(agent_id="fr-003", auto_answer=True)))
    ag = await session.next("agent")
    assert list(ag.call_ids) == ["ring-1"]
    a = await session.next("assignment")
    assert a.connected and a.assignment_id == ringing.assignment_id
    got = await s.routing.GetCall(routing_pb2.GetCallRequest(call_id="ring-1"))
    assert got.call.state == S.CALL_STATE_CONNECTED
    classic.cancel()
    session.cancel()


async def test_classic_flow_has_no_agent_push_without_a_state_change(node):
    s = node.stubs
    session = await ready_agent(s, "bi-002")
    await s.routing.OfferCall(offer("cl-1", skill="support", channel=t.CHANNEL_CHAT, language=""))
    a = await session.next("assignment")
    await session.accept(a.assignment_id)
    await session.next("connected")
    await s.routing.OfferCall(offer("cl-2", skill="support", channel=t.CHANNEL_CHAT, language=""))
    await session.next("assignment", lambda x: x.call.call_id == "cl-2")
    kinds = [k for k, _ in session.seen]
    start = kinds.index("assignment")
    assert "agent" not in kinds[start:], session.seen  # only call_ids changed
    session.cancel()


async def test_auto_answer_survives_a_restart(tmp_path):
    data = tmp_path / "n"
    async with running_node(make_site(), data, sync="fdatasync") as n:
        session = await auto_agent(n.stubs, "fr-001")
        await n.stubs.routing.OfferCall(offer("rs-1"))
        await session.next("assignment")
        session.cancel()
        await asyncio.sleep(0.1)
    async with running_node(make_site(), data) as n:
        got = await n.stubs.routing.GetCall(routing_pb2.GetCallRequest(call_id="rs-1"))
        # connected before the agent's stream ended: a disconnect leaves connected calls
        assert got.call.state == S.CALL_STATE_CONNECTED and got.call.agent_id == "fr-001"


def _bulk_offer(i: int, t_: float) -> dict:
    return {
        "op": "offer", "t": t_, "call_id": f"bulk-{i:06d}", "channel": "voice", "skill": "billing",
        "language": "fr", "caller": "+33600000666", "customer_id": "", "priority_class": "",
        "context": {"ivr_path": [], "bot_transcript": "", "attributes": {}},
    }


async def test_list_calls_paging_with_many_calls_keeps_the_node_responsive(tmp_path, monkeypatch):
    """25k retained calls, read in pages of 1000 while an Echo loop runs: every call
    listed once, in offer order, and no Echo waits behind a page."""
    n_calls = 25_000
    async with running_node(make_site(), tmp_path / "n", compact_every=0) as n:
        node = n.node
        for i in range(n_calls):  # blacklisted caller: rejected at once, retained
            node.submit(_bulk_offer(i, node.now()))
        await node.barrier()
        s = n.stubs
        await s.diag.Echo(diagnostics_pb2.EchoRequest(payload=b"x"))
        latencies: list[float] = []
        done = asyncio.Event()

        async def echo_loop() -> None:
            while not done.is_set():
                t0 = time.perf_counter()
                await s.diag.Echo(diagnostics_pb2.EchoRequest(payload=b"x" * 64))
                latencies.append(time.perf_counter() - t0)
                await asyncio.sleep(0.002)

        # The old bug rebuilt every retained call per page (~4.5 s, Echo held 367 ms):
        # count index builds instead of timing the loop, which CI's noise makes flaky.
        builds = 0
        real_index = views_mod._CallIndex

        def counting_index(*a, **kw):
            nonlocal builds
            builds += 1
            return real_index(*a, **kw)

        monkeypatch.setattr(views_mod, "_CallIndex", counting_index)
        echo = asyncio.create_task(echo_loop())
        ids: list[str] = []
        token, pages = "", 0
        t0 = time.perf_counter()
        while True:
            r = await s.admin.ListCalls(admin_pb2.ListCallsRequest(page_size=1000, page_token=token))
            ids += [c.call_id for c in r.calls]
            pages += 1
            token = r.next_page_token
            if not token:
                break
        took = time.perf_counter() - t0
        done.set()
        await echo
        assert builds == 1, builds  # built once, then extended: O(page) per page
        assert ids == [f"bulk-{i:06d}" for i in range(n_calls)] and pages == n_calls // 1000
        # a state filter that matches nothing scans in bounded steps, then ends
        empty, token = 0, ""
        while True:
            r = await s.admin.ListCalls(admin_pb2.ListCallsRequest(
                page_size=1000, page_token=token, state=S.CALL_STATE_QUEUED))
            assert not r.calls
            empty += 1
            token = r.next_page_token
            if not token:
                break
        assert empty == 2  # 20k calls examined per page at most
        worst = max(latencies)
        print(f"{pages} pages in {took:.2f} s; echo p50 {sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms, "
              f"max {worst * 1000:.1f} ms over {len(latencies)} echoes")
        # Coarse sanity bounds only (a loaded CI box once held one Echo 306 ms); the
        # structural check above is what catches a per-page rebuild.
        assert took < 30.0
        assert worst < 2.0, worst
