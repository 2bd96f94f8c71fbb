"""The multiplexed agent gateway (Agents.Gateway): many agents' sessions on one stream,
in batches, with the semantics of the per-agent Connect stream — on a real node.

Calls routed over one gateway are assigned and completed exactly once; a gateway that
goes away disconnects its agents as their own streams' ends would (ringing offers back
to the queue); per-message errors are answered for that agent and change nothing; the
RPC is the agent-gateway role's only (mTLS)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from node_fixtures import AgentSession, error_reason, running_node
from router.v1 import admin_pb2, agents_pb2, agents_pb2_grpc, routing_pb2, types_pb2 as t
from test_node_api import offer

pytestmark = pytest.mark.timeout(120)

A = t.AgentState
S = t.CallState
OK, INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, ABORTED, RESOURCE_EXHAUSTED = 0, 3, 5, 6, 9, 10, 8
AGENTS = ["fr-001", "fr-002", "fr-003", "bi-001", "bi-002"]


class Gateway:
    """One Agents.Gateway stream, as a site's agent gateway holds it (test helper)."""

    def __init__(self, agents_stub) -> None:
        self.call = agents_stub.Gateway()
        self.frames: list[agents_pb2.GatewayNodeFrame] = []
        self.seen: list[tuple[str, str, object]] = []  # (agent_id, kind, inner)
        self._cursor = 0

    async def send(self, *messages: agents_pb2.GatewayMessage) -> None:
        await self.call.write(agents_pb2.GatewayFrame(messages=list(messages)))

    async def hello(self, *agent_ids: str, auto_answer: bool = True) -> None:
        await self.send(*(hello(a, auto_answer) for a in agent_ids))

    async def next(self, agent_id: str | None = None, kind: str | None = None, pred=None,
                   timeout: float = 5.0):
        """The next message (for ``agent_id``, of ``kind`` — a NodeMessage kind or
        "ended" —, matching ``pred``) after the last one returned; the inner message."""
        deadline = time.monotonic() + timeout
        while True:
            while self._cursor < len(self.seen):
                aid, k, inner = self.seen[self._cursor]
                self._cursor += 1
                if ((agent_id is None or aid == agent_id) and (kind is None or k == kind)
                        and (pred is None or pred(inner))):
                    return inner
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind} for {agent_id!r} within {timeout} s; seen {self.seen}")
            try:
                frame = await asyncio.wait_for(self.call.read(), left)
            except asyncio.TimeoutError:
                raise AssertionError(f"no {kind} for {agent_id!r} within {timeout} s; seen {self.seen}") from None
            if frame is grpc.aio.EOF:
                raise AssertionError(f"gateway stream ended while waiting for {kind}; seen {self.seen}")
            self.frames.append(frame)
            for m in frame.messages:
                if m.WhichOneof("kind") == "ended":
                    self.seen.append((m.agent_id, "ended", m.ended))
                else:
                    k = m.message.WhichOneof("kind")
                    self.seen.append((m.agent_id, k, getattr(m.message, k)))

    def rewind(self) -> None:
        """Look at every message seen again (from the first)."""
        self._cursor = 0


def hello(agent_id: str, auto_answer: bool = True) -> agents_pb2.GatewayMessage:
    return agents_pb2.GatewayMessage(agent_id=agent_id, hello=agents_pb2.GatewayHello(auto_answer=auto_answer))


def set_state(agent_id: str, state: int, reason: str = "", timeout_s: float = 0.0) -> agents_pb2.GatewayMessage:
    return agents_pb2.GatewayMessage(agent_id=agent_id, set_state=agents_pb2.GatewaySetState(
        state=state, reason=reason, timeout_s=timeout_s))


def sign_in(agent_id: str) -> agents_pb2.GatewayMessage:
    return agents_pb2.GatewayMessage(agent_id=agent_id, sign_in=agents_pb2.GatewaySignIn())


def sign_out(agent_id: str) -> agents_pb2.GatewayMessage:
    return agents_pb2.GatewayMessage(agent_id=agent_id, sign_out=agents_pb2.GatewaySignOut())


def complete(agent_id: str, call_id: str) -> agents_pb2.GatewayMessage:
    return agents_pb2.GatewayMessage(agent_id=agent_id, complete=agents_pb2.Complete(
        call_id=call_id, disposition=t.Disposition(resolved=True, wrap_up_code="gw")))


async def ready(stubs, gw: Gateway, agent_ids: list[str], auto_answer: bool = True) -> None:
    """Sign in, hello on the gateway (all in one frame), set READY."""
    for a in agent_ids:
        await stubs.agents.SignIn(agents_pb2.SignInRequest(agent_id=a))
    await gw.hello(*agent_ids, auto_answer=auto_answer)
    for a in agent_ids:
        first = await gw.next(a, "agent")
        assert first.agent_id == a and first.state == A.AGENT_STATE_NOT_READY
    for a in agent_ids:
        await stubs.agents.SetState(agents_pb2.SetStateRequest(agent_id=a, state=A.AGENT_STATE_READY))
    gw.rewind()
    for a in agent_ids:
        await gw.next(a, "agent", lambda x: x.state == A.AGENT_STATE_READY)


async def agent_state(stubs, agent_id: str):
    return (await stubs.agents.GetAgent(agents_pb2.GetAgentRequest(agent_id=agent_id))).agent


async def eventually(check, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- routing


async def test_many_agents_on_one_gateway_calls_routed_once_and_completed(node):
    s = node.stubs
    gw = Gateway(s.agents)
    await ready(s, gw, AGENTS)
    assert sorted(node.node.connected_agents) == sorted(AGENTS)

    # More calls than agents: each agent takes one, completes it, takes the next.
    n = 30
    ids = [f"gw-{i:03d}" for i in range(n)]
    answers = await asyncio.gather(*(s.routing.OfferCall(offer(c)) for c in ids[:10]))
    assert all(r.call.call_id == c for r, c in zip(answers, ids[:10]))
    offered = 10
    assigned: dict[str, str] = {}
    results: dict[str, agents_pb2.CommandResult] = {}
    deadline = time.monotonic() + 30
    while len(results) < n:
        assert time.monotonic() < deadline, (len(results), gw.seen[-10:])
        frame_before = len(gw.seen)
        await gw.next()
        for aid, kind, inner in gw.seen[frame_before:]:
            if kind == "assignment":
                assert inner.connected and inner.call.agent_id == aid
                cid = inner.call.call_id
                assert cid not in assigned, f"{cid} assigned twice: {assigned[cid]}, {aid}"
                assigned[cid] = aid
                await gw.send(complete(aid, cid))
            elif kind == "result":
                assert (inner.op, inner.code) == ("complete", OK), inner
                assert inner.call.state == S.CALL_STATE_COMPLETED and inner.call.agent_id == aid
                assert inner.call_id not in results
                results[inner.call_id] = inner
                if offered < n:
                    await s.routing.OfferCall(offer(ids[offered]))
                    offered += 1
        gw._cursor = len(gw.seen)
    assert sorted(results) == ids and sorted(assigned) == ids
    listed = (await s.admin.ListCalls(admin_pb2.ListCallsRequest(page_size=1000))).calls
    mine = {c.call_id: c for c in listed if c.call_id.startswith("gw-")}
    assert sorted(mine) == ids and all(c.state == S.CALL_STATE_COMPLETED for c in mine.values())
    # One stream carried every agent: some frame from the node spoke for several agents.
    assert any(len({m.agent_id for m in f.messages}) > 1 for f in gw.frames)
    gw.call.cancel()


async def test_accept_path_on_the_gateway(node):
    """Without auto answer: Assignment, Accept, Connected; Reject puts the call back."""
    s = node.stubs
    gw = Gateway(s.agents)
    await ready(s, gw, ["fr-001"], auto_answer=False)
    await s.routing.OfferCall(offer("acc-1"))
    a = await gw.next("fr-001", "assignment")
    assert not a.connected and a.call.call_id == "acc-1"
    await gw.send(agents_pb2.GatewayMessage(agent_id="fr-001", accept=agents_pb2.Accept(assignment_id=a.assignment_id)))
    c = await gw.next("fr-001", "connected")
    assert c.call_id == "acc-1"
    await gw.send(complete("fr-001", "acc-1"))
    res = await gw.next("fr-001", "result")
    assert res.code == OK and res.call.state == S.CALL_STATE_COMPLETED
    # a stale accept: answered for that agent, the stream stays up
    await gw.send(agents_pb2.GatewayMessage(agent_id="fr-001", accept=agents_pb2.Accept(assignment_id=a.assignment_id)))
    stale = await gw.next("fr-001", "result")
    assert (stale.op, stale.code) == ("accept", NOT_FOUND) or stale.code == FAILED_PRECONDITION, stale
    gw.call.cancel()


# --------------------------------------------------------------------------- disconnects


async def test_gateway_end_disconnects_its_agents_and_requeues_ringing_offers(node):
    s = node.stubs
    gw = Gateway(s.agents)
    await ready(s, gw, ["fr-001", "fr-002"], auto_answer=False)
    await s.routing.OfferCall(offer("dc-1"))
    a = await gw.next(kind="assignment")
    assert a.call.call_id == "dc-1"
    gw.call.cancel()  # the gateway goes away with the offer ringing

    async def requeued():
        call = (await s.routing.GetCall(routing_pb2.GetCallRequest(call_id="dc-1"))).call
        states = [await agent_state(s, x) for x in ("fr-001", "fr-002")]
        return call.state == S.CALL_STATE_QUEUED and all(
            x.state == A.AGENT_STATE_NOT_READY and x.reason == "disconnected" for x in states)

    await eventually(requeued)
    assert node.node.connected_agents == []
    # Another desktop (its own Connect stream) gets the call.
    session = AgentSession(s, "fr-003")
    await s.agents.SignIn(agents_pb2.SignInRequest(agent_id="fr-003"))
    await session.hello()
    await session.next("agent")
    await s.agents.SetState(agents_pb2.SetStateRequest(agent_id="fr-003", state=A.AGENT_STATE_READY))
    again = await session.next("assignment")
    assert again.call.call_id == "dc-1" and again.assignment_id != a.assignment_id
    session.call.cancel()


async def test_leave_ends_one_session_the_others_stay(node):
    s = node.stubs
    gw = Gateway(s.agents)
    await ready(s, gw, ["fr-001", "fr-002"])
    await gw.send(agents_pb2.GatewayMessage(agent_id="fr-001", leave=agents_pb2.Leave()))
    ended = await gw.next("fr-001", "ended")
    assert ended.code == OK
    st = await eventually(lambda: _state_is(s, "fr-001", A.AGENT_STATE_NOT_READY))
    assert st.reason == "disconnected"
    assert node.node.connected_agents == ["fr-002"]
    # fr-002 still routes over the same stream
    await s.routing.OfferCall(offer("lv-1"))
    a = await gw.next("fr-002", "assignment")
    assert a.connected and a.call.call_id == "lv-1"
    # a message for the agent that left: refused, nothing changes
    await gw.send(complete("fr-001", "lv-1"))
    res = await gw.next("fr-001", "result")
    assert (res.op, res.code, res.reason, res.call_id) == ("complete", FAILED_PRECONDITION, "AGENT_NOT_CONNECTED", "lv-1")
    got = (await s.routing.GetCall(routing_pb2.GetCallRequest(call_id="lv-1"))).call
    assert got.state == S.CALL_STATE_CONNECTED and got.agent_id == "fr-002"
    gw.call.cancel()


async def test_set_state_in_a_frame_as_the_unary_rpc(node):
    """GatewaySetState: for an agent in session here (its state change, then the offer it
    rings with, then the OK result) and for one without a session (the result only)."""
    s = node.stubs
    gw = Gateway(s.agents)
    for a in ("fr-001", "fr-002"):
        await s.agents.SignIn(agents_pb2.SignInRequest(agent_id=a))
    await gw.hello("fr-001")
    await gw.next("fr-001", "agent")
    await s.routing.OfferCall(offer("ss-1"))  # queued: nobody is ready
    await gw.send(set_state("fr-001", A.AGENT_STATE_READY), set_state("fr-002", A.AGENT_STATE_NOT_READY, "lunch"))
    res1 = await gw.next("fr-001", "result")
    assert (res1.op, res1.code) == ("set_state", OK)
    gw.rewind()
    mine = [k for aid, k, _ in gw.seen if aid == "fr-001"]
    assert mine.index("assignment") < len(mine) - 1 and mine[-1] == "result", mine  # the ring came first
    res2 = await gw.next("fr-002", "result")
    assert (res2.op, res2.code) == ("set_state", OK)
    assert (await agent_state(s, "fr-002")).reason == "lunch"
    got = (await s.routing.GetCall(routing_pb2.GetCallRequest(call_id="ss-1"))).call
    assert got.agent_id == "fr-001"
    gw.call.cancel()


async def test_an_agents_day_on_the_gateway_alone(node):
    """Sign in, hello, READY, a call, leave, sign out — every step a gateway message, no
    unary call: each answered by its OK result once durable, the agent's state changes
    on the stream while in session."""
    s = node.stubs
    gw = Gateway(s.agents)
    await gw.send(sign_in("fr-003"), hello("fr-003"), set_state("fr-003", A.AGENT_STATE_READY))
    res = await gw.next("fr-003", "result")
    assert (res.op, res.code) == ("sign_in", OK)
    assert (await gw.next("fr-003", "agent")).state == A.AGENT_STATE_NOT_READY
    assert (await gw.next("fr-003", "agent")).state == A.AGENT_STATE_READY
    res = await gw.next("fr-003", "result")
    assert (res.op, res.code) == ("set_state", OK)
    await s.routing.OfferCall(offer("day-1"))
    assert (await gw.next("fr-003", "assignment")).connected  # auto answer
    await gw.send(complete("fr-003", "day-1"))
    await gw.next("fr-003", "result", lambda r: r.op == "complete" and r.code == OK)
    await gw.send(agents_pb2.GatewayMessage(agent_id="fr-003", leave=agents_pb2.Leave()), sign_out("fr-003"))
    assert (await gw.next("fr-003", "ended")).code == OK
    res = await gw.next("fr-003", "result")
    assert (res.op, res.code) == ("sign_out", OK)
    assert (await agent_state(s, "fr-003")).state == A.AGENT_STATE_SIGNED_OUT
    got = (await s.routing.GetCall(routing_pb2.GetCallRequest(call_id="day-1"))).call
    assert got.state == S.CALL_STATE_COMPLETED and got.agent_id == "fr-003"
    gw.call.cancel()


async def test_leave_is_answered_once_the_disconnect_is_durable(node):
    """The SessionEnded of a Leave reports the agent disconnected: it must not reach the
    gateway before that disconnect's journal record is durable (a crash in between
    would bring the agent back signed in). The journal is held here to see the order."""
    s, n = node.stubs, node.node
    gw = Gateway(s.agents)
    await ready(s, gw, ["fr-001"])
    real, gate, loop = n.journal.append, asyncio.Event(), asyncio.get_running_loop()
    held: list[dict] = []

    def append_held(rec):
        inner, out = real(rec), loop.create_future()
        held.append(rec)

        async def release():
            seq = await asyncio.shield(inner)
            await gate.wait()
            out.set_result(seq)

        asyncio.ensure_future(release())
        return out

    n.journal.append = append_held
    try:
        await gw.send(agents_pb2.GatewayMessage(agent_id="fr-001", leave=agents_pb2.Leave()))
        waiting = asyncio.ensure_future(gw.next("fr-001", "ended"))  # a read is never cancelled:
        await asyncio.sleep(0.5)  # that would cancel the RPC
        assert not waiting.done(), "SessionEnded came before the disconnect was durable"
        assert [r["op"] for r in held] == ["disconnect"]
        gate.set()
        ended = await waiting
        assert ended.code == OK and n.durable_seq >= 1
    finally:
        n.journal.append = real
    gw.call.cancel()


async def _state_is(stubs, agent_id, state):
    a = await agent_state(stubs, agent_id)
    return a if a.state == state else None


async def test_a_connect_stream_takes_an_agent_over_from_the_gateway(node):
    s = node.stubs
    gw = Gateway(s.agents)
    await ready(s, gw, ["fr-001", "fr-002"])
    session = await AgentSession(s, "fr-001").hello()
    await session.next("agent")
    ended = await gw.next("fr-001", "ended")
    assert (ended.code, ended.reason) == (ABORTED, "STREAM_REPLACED")
    assert sorted(node.node.connected_agents) == ["fr-001", "fr-002"]
    # and back: a hello on the gateway takes it over from the Connect stream
    await gw.hello("fr-001")
    await gw.next("fr-001", "agent")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await session.next("agent", timeout=5)
    assert e.value.code() == grpc.StatusCode.ABORTED and error_reason(e.value) == "STREAM_REPLACED"
    # two gateways: the newer one takes the agent
    gw2 = Gateway(s.agents)
    await gw2.hello("fr-002")
    await gw2.next("fr-002", "agent")
    ended = await gw.next("fr-002", "ended")
    assert ended.reason == "STREAM_REPLACED"
    gw.call.cancel()
    # the old gateway's end disconnects its own agent (fr-001), not the one taken over
    await eventually(lambda: _state_is(s, "fr-001", A.AGENT_STATE_NOT_READY))
    assert node.node.connected_agents == ["fr-002"]
    assert (await agent_state(s, "fr-002")).state == A.AGENT_STATE_READY
    gw2.call.cancel()


async def test_node_stop_ends_the_gateway_stream(tmp_path):
    async with running_node(data_dir=tmp_path / "n") as n:
        gw = Gateway(n.stubs.agents)
        await ready(n.stubs, gw, ["fr-001"])
        await n.node.stop(grace=0.5)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await gw.next(timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and error_reason(e.value) == "NODE_DRAINING"


# --------------------------------------------------------------------------- bad input


async def _snapshot(node) -> dict:
    await node.node.barrier()
    return node.node.engine.snapshot()


async def test_bad_messages_get_clear_errors_and_change_nothing(node):
    s = node.stubs
    gw = Gateway(s.agents)
    await ready(s, gw, ["fr-001"])
    await s.routing.OfferCall(offer("bad-1"))
    a = await gw.next("fr-001", "assignment")
    await s.agents.SignIn(agents_pb2.SignInRequest(agent_id="fr-002"))  # signed in, no session
    before = await _snapshot(node)
    seq = node.node.durable_seq

    await gw.send(
        hello("nobody"),                                             # unknown agent
        hello("bi-001"),                                             # not signed in
        hello("fr-001", auto_answer=False),                          # duplicate hello
        hello(""),                                                   # no agent id
        agents_pb2.GatewayMessage(agent_id="fr-001"),                # no kind
        complete("fr-002", "bad-1"),                                 # no session here
        agents_pb2.GatewayMessage(agent_id="fr-002", leave=agents_pb2.Leave()),
        complete("fr-001", ""),                                      # empty call id
        complete("fr-001", "nope"),                                  # unknown call
        agents_pb2.GatewayMessage(agent_id="fr-001", accept=agents_pb2.Accept(assignment_id="x#9")),
        set_state("nobody", A.AGENT_STATE_READY),                    # unknown agent
        set_state("bi-001", A.AGENT_STATE_READY),                    # not signed in
        set_state("fr-002", A.AGENT_STATE_SIGNED_OUT),               # not a state to set
        set_state("fr-002", A.AGENT_STATE_WRAP_UP, timeout_s=-1.0),  # bad duration
        sign_in("nobody"),                                           # unknown agent
        sign_in("fr-002"),                                           # already signed in
        sign_out("bi-001"),                                          # not signed in
        sign_out("fr-001"),                                          # on a call
    )
    got = []
    for _ in range(18):
        aid_res = await gw.next(kind="result")
        got.append((aid_res.op, aid_res.code, aid_res.reason))
    owners = [aid for aid, k, _ in gw.seen if k == "result"][-18:]
    assert owners == ["nobody", "bi-001", "fr-001", "", "fr-001", "fr-002", "fr-002", "fr-001", "fr-001", "fr-001",
                      "nobody", "bi-001", "fr-002", "fr-002", "nobody", "fr-002", "bi-001", "fr-001"]
    assert got == [
        ("hello", NOT_FOUND, "UNKNOWN_AGENT"),
        ("hello", FAILED_PRECONDITION, "AGENT_NOT_SIGNED_IN"),
        ("hello", ALREADY_EXISTS, "AGENT_ALREADY_CONNECTED"),
        ("hello", INVALID_ARGUMENT, "MISSING_FIELD"),
        ("", INVALID_ARGUMENT, "MISSING_FIELD"),
        ("complete", FAILED_PRECONDITION, "AGENT_NOT_CONNECTED"),
        ("leave", FAILED_PRECONDITION, "AGENT_NOT_CONNECTED"),
        ("complete", INVALID_ARGUMENT, "MISSING_FIELD"),
        ("complete", NOT_FOUND, "CALL_NOT_FOUND"),
        ("accept", NOT_FOUND, "UNKNOWN_ASSIGNMENT"),
        ("set_state", NOT_FOUND, "UNKNOWN_AGENT"),
        ("set_state", FAILED_PRECONDITION, "AGENT_NOT_SIGNED_IN"),
        ("set_state", INVALID_ARGUMENT, "INVALID_STATE"),
        ("set_state", INVALID_ARGUMENT, "INVALID_FIELD"),
        ("sign_in", NOT_FOUND, "UNKNOWN_AGENT"),
        ("sign_in", ALREADY_EXISTS, "AGENT_ALREADY_SIGNED_IN"),
        ("sign_out", FAILED_PRECONDITION, "AGENT_NOT_SIGNED_IN"),
        ("sign_out", FAILED_PRECONDITION, "AGENT_BUSY"),
    ], got
    # (an oversized frame: over the node's request limit, nothing of it applied — not
    # even its first, valid message)
    big = agents_pb2.GatewayFrame(messages=[complete("fr-001", "bad-1")])
    big.messages.add(agent_id="fr-001", complete=agents_pb2.Complete(
        call_id="bad-1", disposition=t.Disposition(wrap_up_code="x" * 70_000)))
    await gw.call.write(big)
    too_large = await gw.next(kind="result")
    assert (too_large.op, too_large.code, too_large.reason) == ("", RESOURCE_EXHAUSTED, "MESSAGE_TOO_LARGE")
    assert [aid for aid, k, _ in gw.seen if k == "result"][-1] == ""

    assert node.node.durable_seq == seq
    assert await _snapshot(node) == before
    # the first session is as it was (auto answer kept): the call is still connected to
    # it and completes on the stream
    call = (await s.routing.GetCall(routing_pb2.GetCallRequest(call_id="bad-1"))).call
    assert call.state == S.CALL_STATE_CONNECTED and call.agent_id == "fr-001" and a.connected
    await gw.send(complete("fr-001", "bad-1"))
    res = await gw.next("fr-001", "result", lambda r: r.call_id == "bad-1")
    assert res.code == OK
    gw.call.cancel()


async def test_malformed_frame_is_answered_and_the_stream_stays(node):
    s = node.stubs
    method = "/router.v1.Agents/Gateway"
    call = s.channel.stream_stream(method, request_serializer=lambda b: b,
                                   response_deserializer=agents_pb2.GatewayNodeFrame.FromString)()
    await call.write(b"\x0a\x05\xff\xff")  # a truncated repeated field
    frame = await asyncio.wait_for(call.read(), 5)
    (m,) = frame.messages
    assert m.agent_id == "" and (m.message.result.code, m.message.result.reason) == (INVALID_ARGUMENT, "MALFORMED_REQUEST")
    await s.agents.SignIn(agents_pb2.SignInRequest(agent_id="bi-002"))
    await call.write(agents_pb2.GatewayFrame(messages=[hello("bi-002")]).SerializeToString())
    frame = await asyncio.wait_for(call.read(), 5)
    assert frame.messages[0].agent_id == "bi-002" and frame.messages[0].message.agent.agent_id == "bi-002"
    call.cancel()


# --------------------------------------------------------------------------- permission


async def test_only_the_agent_gateway_role_may_open_a_gateway(tmp_path):
    """Over mTLS: the site's gateway identity (agents/lyon, agent-gateway) is served; an
    operator (allowed on Connect), a site, another site's gateway are refused."""
    from test_security_node import make_tls, secure_node

    tls = make_tls(tmp_path / "tls")
    async with secure_node(tls, tmp_path / "lyon") as sn:
        method = "/router.v1.Agents/Gateway"
        for stem_, reason in (("operator-admin", "ROLE_FORBIDS"), ("operator-supervisor-in", "ROLE_FORBIDS"),
                              ("site-montreal", "ROLE_FORBIDS"), ("agents-montreal", "OUT_OF_SCOPE")):
            gw = Gateway(agents_pb2_grpc.AgentsStub(sn.channel(stem_)))
            await gw.hello("lyon-fr-001")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await gw.next(timeout=5)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and error_reason(e.value) == reason, stem_
            assert sn.audit()[-1].decision == "deny" and sn.audit()[-1].method == method
        assert sn.node.connected_agents == []

        stub = agents_pb2_grpc.AgentsStub(sn.channel("agents-lyon"))
        await stub.SignIn(agents_pb2.SignInRequest(agent_id="lyon-fr-001"))
        gw = Gateway(stub)
        await gw.hello("lyon-fr-001")
        first = await gw.next("lyon-fr-001", "agent")
        assert first.state == A.AGENT_STATE_NOT_READY
        assert sn.node.connected_agents == ["lyon-fr-001"]
        rec = [r for r in sn.audit() if r.method == method][-1]
        assert (rec.decision, rec.role) == ("allow", "agent-gateway")
        # the operator may still hold an agent's own Connect stream
        op = agents_pb2_grpc.AgentsStub(sn.channel("operator-admin"))
        session = op.Connect()
        await session.write(agents_pb2.AgentMessage(hello=agents_pb2.Hello(agent_id="lyon-fr-001")))
        msg = await asyncio.wait_for(session.read(), 5)
        assert msg.agent.agent_id == "lyon-fr-001"
        ended = await gw.next("lyon-fr-001", "ended")
        assert ended.reason == "STREAM_REPLACED"
        session.cancel()
        gw.call.cancel()
