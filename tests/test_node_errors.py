"""Bad input gets the documented gRPC error with its ErrorInfo reason and changes nothing
(DESIGN.md invariant 8); random wrong requests and random bytes never hurt the node."""

from __future__ import annotations

import asyncio
import math
import random

import grpc
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from node_fixtures import AgentSession, error_reason
from router.v1 import admin_pb2, agents_pb2, diagnostics_pb2, routing_pb2, types_pb2 as t

pytestmark = pytest.mark.timeout(120)

C = grpc.StatusCode
A = t.AgentState

DOCUMENTED = {
    C.INVALID_ARGUMENT: {
        "MISSING_FIELD", "FIELD_TOO_LONG", "INVALID_FIELD", "INVALID_CALL_ID", "INVALID_CHANNEL",
        "INVALID_PRIORITY_CLASS", "INVALID_CSAT", "TOO_MANY_ENTRIES", "INVALID_STATE",
        "INVALID_TIMEOUT", "INVALID_PAGE_SIZE", "INVALID_PAGE_TOKEN",
        # as listed in the protos (routing.proto, agents.proto, admin.proto)
        "MALFORMED_REQUEST", "INVALID_LANGUAGE",
    },
    C.NOT_FOUND: {"UNKNOWN_SKILL", "CALL_NOT_FOUND", "UNKNOWN_AGENT", "UNKNOWN_ASSIGNMENT"},
    C.ALREADY_EXISTS: {"CALL_ID_CONFLICT", "AGENT_ALREADY_SIGNED_IN"},
    C.FAILED_PRECONDITION: {"WRONG_STATE", "AGENT_NOT_SIGNED_IN", "AGENT_BUSY", "QUEUE_FULL",
                            "DISPOSITION_CONFLICT", "CALL_ANSWERED"},
    C.RESOURCE_EXHAUSTED: {"MESSAGE_TOO_LARGE", "TOO_MANY_WATCHERS"},
}


def offer(call_id="e1", **kw):
    base = dict(call_id=call_id, skill="billing", channel=t.CHANNEL_VOICE, language="fr", caller="+33611111111")
    base.update(kw)
    return routing_pb2.OfferCallRequest(**base)


def set_state(agent_id="fr-002", state=A.AGENT_STATE_NOT_READY, reason="x", timeout_s=0.0):
    return agents_pb2.SetStateRequest(agent_id=agent_id, state=state, reason=reason, timeout_s=timeout_s)


async def setup_state(s):
    """bi-001 connected on c-conn (stream open); queued q1, q2; fr-002 signed in."""
    await s.agents.SignIn(agents_pb2.SignInRequest(agent_id="bi-001"))
    session = await AgentSession(s, "bi-001").hello()
    await s.agents.SetState(agents_pb2.SetStateRequest(agent_id="bi-001", state=A.AGENT_STATE_READY))
    await s.routing.OfferCall(offer("c-conn"))
    a = await session.next("assignment")
    await session.accept(a.assignment_id)
    await session.next("connected")
    await s.routing.OfferCall(offer("q1"))
    await s.routing.OfferCall(offer("q2"))
    await s.agents.SignIn(agents_pb2.SignInRequest(agent_id="fr-002"))
    return session, a.call.call_id


async def observe(s) -> tuple:
    """Everything a client can see of the node's state (time-dependent fields cleared)."""
    status = await s.admin.GetStatus(admin_pb2.GetStatusRequest())
    for q in status.queues:
        q.expected_wait_s = q.oldest_wait_s = q.service_level = 0
    calls = await s.admin.ListCalls(admin_pb2.ListCallsRequest(page_size=1000))
    agents = []
    for aid in ("fr-001", "fr-002", "fr-003", "bi-001", "bi-002"):
        agents.append((await s.agents.GetAgent(agents_pb2.GetAgentRequest(agent_id=aid))).agent)
    return status, calls, agents


def error_cases(connected: str) -> list:
    """(label, stub attr, method, request, code, reason)."""
    r, g = "routing", "agents"
    return [
        ("offer no call_id", r, "OfferCall", offer(""), C.INVALID_ARGUMENT, "MISSING_FIELD"),
        ("offer bad call_id", r, "OfferCall", offer("bad id!"), C.INVALID_ARGUMENT, "INVALID_CALL_ID"),
        ("offer no skill", r, "OfferCall", offer(skill=""), C.INVALID_ARGUMENT, "MISSING_FIELD"),
        ("offer long caller", r, "OfferCall", offer(caller="1" * 33), C.INVALID_ARGUMENT, "FIELD_TOO_LONG"),
        ("offer long customer", r, "OfferCall", offer(customer_id="c" * 65), C.INVALID_ARGUMENT, "FIELD_TOO_LONG"),
        ("offer no channel", r, "OfferCall", offer(channel=t.CHANNEL_UNSPECIFIED), C.INVALID_ARGUMENT, "MISSING_FIELD"),
        ("offer channel 99", r, "OfferCall", offer(channel=99), C.INVALID_ARGUMENT, "INVALID_CHANNEL"),
        ("offer blacklist class", r, "OfferCall", offer(priority_class=t.PRIORITY_CLASS_BLACKLIST),
         C.INVALID_ARGUMENT, "INVALID_PRIORITY_CLASS"),
        ("offer class 42", r, "OfferCall", offer(priority_class=42), C.INVALID_ARGUMENT, "INVALID_PRIORITY_CLASS"),
        ("offer ivr path", r, "OfferCall", offer(context=t.CallContext(ivr_path=["x"] * 33)),
         C.INVALID_ARGUMENT, "TOO_MANY_ENTRIES"),
        ("offer attributes", r, "OfferCall",
         offer(context=t.CallContext(attributes={f"k{i}": "v" for i in range(33)})), C.INVALID_ARGUMENT, "TOO_MANY_ENTRIES"),
        ("offer transcript", r, "OfferCall", offer(context=t.CallContext(bot_transcript="x" * (16 * 1024 + 1))),
         C.INVALID_ARGUMENT, "FIELD_TOO_LONG"),
        ("offer ivr entry", r, "OfferCall", offer(context=t.CallContext(ivr_path=["x" * 65])),
         C.INVALID_ARGUMENT, "FIELD_TOO_LONG"),
        ("offer unknown skill", r, "OfferCall", offer(skill="astrology"), C.NOT_FOUND, "UNKNOWN_SKILL"),
        ("offer no queue for language", r, "OfferCall", offer(language="de"), C.NOT_FOUND, "UNKNOWN_SKILL"),
        ("offer conflict", r, "OfferCall", offer("q1", language="en"), C.ALREADY_EXISTS, "CALL_ID_CONFLICT"),
        ("abandon unknown", r, "AbandonCall", routing_pb2.AbandonCallRequest(call_id="nope"), C.NOT_FOUND, "CALL_NOT_FOUND"),
        ("abandon no id", r, "AbandonCall", routing_pb2.AbandonCallRequest(), C.INVALID_ARGUMENT, "MISSING_FIELD"),
        ("abandon connected", r, "AbandonCall", routing_pb2.AbandonCallRequest(call_id=connected),
         C.FAILED_PRECONDITION, "WRONG_STATE"),
        ("abandon long reason", r, "AbandonCall", routing_pb2.AbandonCallRequest(call_id="q1", reason="r" * 65),
         C.INVALID_ARGUMENT, "FIELD_TOO_LONG"),
        ("complete queued", r, "CompleteCall", routing_pb2.CompleteCallRequest(call_id="q1"),
         C.FAILED_PRECONDITION, "WRONG_STATE"),
        ("complete csat 6", r, "CompleteCall",
         routing_pb2.CompleteCallRequest(call_id=connected, disposition=t.Disposition(csat=6)), C.INVALID_ARGUMENT, "INVALID_CSAT"),
        ("complete long code", r, "CompleteCall",
         routing_pb2.CompleteCallRequest(call_id=connected, disposition=t.Disposition(wrap_up_code="w" * 65)),
         C.INVALID_ARGUMENT, "FIELD_TOO_LONG"),
        ("complete unknown", r, "CompleteCall", routing_pb2.CompleteCallRequest(call_id="nope"), C.NOT_FOUND, "CALL_NOT_FOUND"),
        ("get unknown", r, "GetCall", routing_pb2.GetCallRequest(call_id="nope"), C.NOT_FOUND, "CALL_NOT_FOUND"),
        ("estimate unknown", r, "EstimateWait",
         routing_pb2.EstimateWaitRequest(skill="astrology", channel=t.CHANNEL_VOICE), C.NOT_FOUND, "UNKNOWN_SKILL"),
        ("sign in no id", g, "SignIn", agents_pb2.SignInRequest(), C.INVALID_ARGUMENT, "MISSING_FIELD"),
        ("sign in ghost", g, "SignIn", agents_pb2.SignInRequest(agent_id="ghost"), C.NOT_FOUND, "UNKNOWN_AGENT"),
        ("sign in twice", g, "SignIn", agents_pb2.SignInRequest(agent_id="fr-002"), C.ALREADY_EXISTS, "AGENT_ALREADY_SIGNED_IN"),
        ("sign out signed out", g, "SignOut", agents_pb2.SignOutRequest(agent_id="fr-003"),
         C.FAILED_PRECONDITION, "AGENT_NOT_SIGNED_IN"),
        ("sign out busy", g, "SignOut", agents_pb2.SignOutRequest(agent_id="bi-001"), C.FAILED_PRECONDITION, "AGENT_BUSY"),
        ("state unspecified", g, "SetState", set_state(state=A.AGENT_STATE_UNSPECIFIED), C.INVALID_ARGUMENT, "INVALID_STATE"),
        ("state signed out", g, "SetState", set_state(state=A.AGENT_STATE_SIGNED_OUT), C.INVALID_ARGUMENT, "INVALID_STATE"),
        ("state 9", g, "SetState", set_state(state=9), C.INVALID_ARGUMENT, "INVALID_STATE"),
        ("not ready no reason", g, "SetState", set_state(reason=""), C.INVALID_ARGUMENT, "MISSING_FIELD"),
        ("not ready long reason", g, "SetState", set_state(reason="r" * 65), C.INVALID_ARGUMENT, "FIELD_TOO_LONG"),
        ("wrap-up 0", g, "SetState", set_state(state=A.AGENT_STATE_WRAP_UP, timeout_s=0), C.INVALID_ARGUMENT, "INVALID_TIMEOUT"),
        ("wrap-up 3601", g, "SetState", set_state(state=A.AGENT_STATE_WRAP_UP, timeout_s=3601),
         C.INVALID_ARGUMENT, "INVALID_TIMEOUT"),
        ("wrap-up nan", g, "SetState", set_state(state=A.AGENT_STATE_WRAP_UP, timeout_s=math.nan),
         C.INVALID_ARGUMENT, "INVALID_FIELD"),
        ("state not signed in", g, "SetState", set_state("fr-003", A.AGENT_STATE_READY),
         C.FAILED_PRECONDITION, "AGENT_NOT_SIGNED_IN"),
        ("state ghost", g, "SetState", set_state("ghost", A.AGENT_STATE_READY), C.NOT_FOUND, "UNKNOWN_AGENT"),
        ("get ghost", g, "GetAgent", agents_pb2.GetAgentRequest(agent_id="ghost"), C.NOT_FOUND, "UNKNOWN_AGENT"),
        ("page size", "admin", "ListCalls", admin_pb2.ListCallsRequest(page_size=1001), C.INVALID_ARGUMENT, "INVALID_PAGE_SIZE"),
        ("page token", "admin", "ListCalls", admin_pb2.ListCallsRequest(page_token="garbage!"),
         C.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN"),
        ("page token b64", "admin", "ListCalls", admin_pb2.ListCallsRequest(page_token="MTpub3Q6YQ"),
         C.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN"),
        ("echo 64 KiB + 1", "diag", "Echo", diagnostics_pb2.EchoRequest(payload=b"x" * (64 * 1024 + 1)),
         C.INVALID_ARGUMENT, "FIELD_TOO_LONG"),
    ]


async def test_every_error_reason_changes_nothing(node):
    s = node.stubs
    session, connected = await setup_state(s)
    before = await observe(s)
    failures = []
    for label, stub, method, req, code, reason in error_cases(connected):
        try:
            await getattr(getattr(s, stub), method)(req, timeout=5)
            failures.append(f"{label}: succeeded, expected {code.name} {reason}")
        except grpc.aio.AioRpcError as e:
            got = (e.code(), error_reason(e))
            if got != (code, reason):
                failures.append(f"{label}: got {got[0].name} {got[1]} ({e.details()}), expected {code.name} {reason}")
    # stream-shaped errors
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for _ in s.routing.WatchCall(routing_pb2.WatchCallRequest(call_id="nope")):
            pass
    assert (e.value.code(), error_reason(e.value)) == (C.NOT_FOUND, "CALL_NOT_FOUND")
    for first, code, reason in [
        (agents_pb2.AgentMessage(accept=agents_pb2.Accept(assignment_id="a")), C.INVALID_ARGUMENT, "MISSING_FIELD"),
        (agents_pb2.AgentMessage(hello=agents_pb2.Hello()), C.INVALID_ARGUMENT, "MISSING_FIELD"),
        (agents_pb2.AgentMessage(hello=agents_pb2.Hello(agent_id="ghost")), C.NOT_FOUND, "UNKNOWN_AGENT"),
        (agents_pb2.AgentMessage(hello=agents_pb2.Hello(agent_id="fr-003")), C.FAILED_PRECONDITION, "AGENT_NOT_SIGNED_IN"),
    ]:
        call = s.agents.Connect()
        await call.write(first)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await asyncio.wait_for(call.read(), 5)
        assert (e.value.code(), error_reason(e.value)) == (code, reason), first
    # an unknown assignment on an open stream is answered (a CommandResult with the
    # error, tests/test_edges.py) and changes nothing; the stream stays up
    await session.accept("no-such-assignment")
    await session.reject("no-such-assignment")
    # bigger than the node's message limit
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.diag.Echo(diagnostics_pb2.EchoRequest(payload=b"x" * (200 * 1024)))
    assert (e.value.code(), error_reason(e.value)) == (C.RESOURCE_EXHAUSTED, "MESSAGE_TOO_LARGE")
    await asyncio.sleep(0.1)
    after = await observe(s)
    assert not failures, "\n".join(failures)
    assert after == before
    assert session.call.done() is False
    session.cancel()


async def test_non_finite_timeout_does_not_break_the_journal(node):
    s = node.stubs
    await s.agents.SignIn(agents_pb2.SignInRequest(agent_id="fr-003"))
    for value in (math.nan, math.inf, -math.inf):
        for state in (A.AGENT_STATE_READY, A.AGENT_STATE_NOT_READY):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await s.agents.SetState(set_state("fr-003", state, reason="x", timeout_s=value))
            assert (e.value.code(), error_reason(e.value)) == (C.INVALID_ARGUMENT, "INVALID_FIELD")
    assert node.node.failed is None
    assert await s.healthy()


async def test_watcher_limit(tmp_path):
    from node_fixtures import running_node

    async with running_node(data_dir=tmp_path / "n", max_watchers=2) as n:
        s = n.stubs
        await s.routing.OfferCall(offer("w1"))
        w1 = s.routing.WatchCall(routing_pb2.WatchCallRequest(call_id="w1"))
        w2 = s.routing.WatchCall(routing_pb2.WatchCallRequest(call_id="w1"))
        await w1.read()
        await w2.read()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in s.routing.WatchCall(routing_pb2.WatchCallRequest(call_id="w1")):
                pass
        assert e.value.code() == C.RESOURCE_EXHAUSTED and error_reason(e.value) == "TOO_MANY_WATCHERS"
        w1.cancel()
        for _ in range(50):
            if n.node.watcher_count < 2:
                break
            await asyncio.sleep(0.02)
        w3 = s.routing.WatchCall(routing_pb2.WatchCallRequest(call_id="w1"))
        assert (await w3.read()).call.call_id == "w1"
        w2.cancel()
        w3.cancel()


# --- random wrong requests -----------------------------------------------------------

CALL_IDS = st.sampled_from(["h1", "h2", "h3", "q1", "", "bad id", "x" * 70])
AGENT_IDS = st.sampled_from(["fr-001", "fr-002", "fr-003", "bi-002", "ghost", ""])
ENUM = st.integers(min_value=0, max_value=6)
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, 3600.0, -1.0]))
TEXT = st.sampled_from(["", "x", "lunch", "r" * 65])

REQUESTS = st.one_of(
    st.builds(lambda c, sk, ch, lang, pc: ("routing", "OfferCall", routing_pb2.OfferCallRequest(
        call_id=c, skill=sk, channel=ch, language=lang, priority_class=pc, caller="+331")),
        CALL_IDS, st.sampled_from(["billing", "support", "nope", ""]), ENUM,
        st.sampled_from(["", "fr", "en", "de"]), ENUM),
    st.builds(lambda c, r: ("routing", "AbandonCall", routing_pb2.AbandonCallRequest(call_id=c, reason=r)), CALL_IDS, TEXT),
    st.builds(lambda c, cs: ("routing", "CompleteCall", routing_pb2.CompleteCallRequest(
        call_id=c, disposition=t.Disposition(csat=cs))), CALL_IDS, st.integers(0, 9)),
    st.builds(lambda c: ("routing", "GetCall", routing_pb2.GetCallRequest(call_id=c)), CALL_IDS),
    st.builds(lambda sk, ch: ("routing", "EstimateWait", routing_pb2.EstimateWaitRequest(skill=sk, channel=ch)),
              st.sampled_from(["billing", "support", "nope", ""]), ENUM),
    st.builds(lambda a: ("agents", "SignIn", agents_pb2.SignInRequest(agent_id=a)), AGENT_IDS),
    st.builds(lambda a: ("agents", "SignOut", agents_pb2.SignOutRequest(agent_id=a)), AGENT_IDS),
    st.builds(lambda a, s, r, to: ("agents", "SetState", agents_pb2.SetStateRequest(
        agent_id=a, state=s, reason=r, timeout_s=to)), AGENT_IDS, ENUM, TEXT, FLOATS),
    st.builds(lambda a: ("agents", "GetAgent", agents_pb2.GetAgentRequest(agent_id=a)), AGENT_IDS),
    st.builds(lambda n, tok: ("admin", "ListCalls", admin_pb2.ListCallsRequest(page_size=n, page_token=tok)),
              st.integers(0, 2000), st.sampled_from(["", "zz", "MTox"])),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(REQUESTS, min_size=1, max_size=15))
async def test_random_requests_get_documented_errors(node, batch):
    s = node.stubs
    for stub, method, req in batch:
        try:
            await getattr(getattr(s, stub), method)(req, timeout=5)
        except grpc.aio.AioRpcError as e:
            reason = error_reason(e)
            assert e.code() in DOCUMENTED, (method, req, e.code(), e.details())
            assert reason in DOCUMENTED[e.code()], (method, req, e.code(), reason, e.details())
    assert await s.healthy()


# --- random bytes ----------------------------------------------------------------------

UNARY = [
    f"/router.v1.{svc}/{m}"
    for svc, ms in {
        "Routing": ["OfferCall", "AbandonCall", "CompleteCall", "GetCall", "EstimateWait"],
        "Agents": ["SignIn", "SignOut", "SetState", "GetAgent"],
        "Admin": ["GetStatus", "ListCalls"],
        "Diagnostics": ["Echo"],
    }.items()
    for m in ms
]


async def test_random_bytes_never_hurt_the_node(node):
    s = node.stubs
    rng = random.Random(1234)
    allowed = set(DOCUMENTED) | {C.OK}
    seen: dict[str, int] = {}
    for i in range(400):
        path = UNARY[i % len(UNARY)]
        n = rng.choice([0, 1, 2, 5, 20, 200, 3000])
        data = bytes(rng.getrandbits(8) for _ in range(n))
        if rng.random() < 0.3 and n > 1:
            data = bytes([0x0A, n - 2 if n - 2 < 128 else 127]) + data[2:]  # a plausible field 1
        method = s.channel.unary_unary(path)
        try:
            await method(data, timeout=5)
            code = C.OK
        except grpc.aio.AioRpcError as e:
            code = e.code()
            assert code in allowed, (path, data[:40], code, e.details())
            if code in DOCUMENTED:
                assert error_reason(e) in DOCUMENTED[code], (path, code, e.details())
        seen[code.name] = seen.get(code.name, 0) + 1
    for path in ("/router.v1.Routing/WatchCall",):
        for _ in range(20):
            data = bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 3, 30])))
            call = s.channel.unary_stream(path)(data, timeout=2)
            try:
                await call.read()
            except grpc.aio.AioRpcError as e:
                assert e.code() in allowed, (path, e.code(), e.details())
            call.cancel()
    assert seen.get("INVALID_ARGUMENT", 0) > 0
    assert await s.healthy()
    assert (await s.diag.Echo(diagnostics_pb2.EchoRequest(payload=b"still here"))).payload == b"still here"


async def test_queue_full(tmp_path):
    from node_fixtures import running_node, site_dict
    from router.config import parse_site

    d = site_dict()
    d["queues"][0]["max_length"] = 2
    async with running_node(parse_site(d), tmp_path / "n") as n:
        s = n.stubs
        await s.routing.OfferCall(offer("f1"))
        await s.routing.OfferCall(offer("f2"))
        before = await observe(s)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await s.routing.OfferCall(offer("f3"))
        assert (e.value.code(), error_reason(e.value)) == (C.FAILED_PRECONDITION, "QUEUE_FULL")
        assert await observe(s) == before


async def test_connect_without_hello_times_out(node, monkeypatch):
    import router.node.services as services

    monkeypatch.setattr(services, "HELLO_TIMEOUT_S", 0.2)
    call = node.stubs.agents.Connect()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await asyncio.wait_for(call.read(), 5)
    assert (e.value.code(), error_reason(e.value)) == (C.INVALID_ARGUMENT, "MISSING_FIELD")
    assert node.node.connected_agents == []
