"""The rough edges an integrator hit (issue 9, part 3), one test (or more) each:

* Accept / Reject of an unknown or stale assignment on Connect is answered;
* an agent READY without an open Connect stream is taken out of routing;
* AbandonCall at the origin of a transferred call answers with the target's state;
* a caller whose first call is still waiting is not a REPEAT caller because of it;
* a second CompleteCall with another disposition is refused;
* empty ids, bad durations, oversized messages get one documented error each;
* proto/README.md and the shipped health.proto (stub generation in other languages);
* the history of a compressed demo run reads in the run's time;
* ``tandem demo --traffic FILE``: a traffic profile.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from node_fixtures import REPO, AgentSession, error_reason, make_site, running_node
from router.engine import Engine
from router.status import error_info
from router.v1 import agents_pb2, diagnostics_pb2, interconnect_pb2, routing_pb2, types_pb2 as t
from transfer_fixtures import interconnect, list_calls, named_site, offer_req, state, wait_for

pytestmark = pytest.mark.timeout(120)

C = grpc.StatusCode
A = t.AgentState


def offer(call_id: str, **kw) -> routing_pb2.OfferCallRequest:
    base = dict(call_id=call_id, skill="billing", channel=t.CHANNEL_VOICE, language="fr", caller="+33611111111")
    base.update(kw)
    return routing_pb2.OfferCallRequest(**base)


async def ready_session(s, agent_id: str) -> AgentSession:
    await s.agents.SignIn(agents_pb2.SignInRequest(agent_id=agent_id))
    session = await AgentSession(s, agent_id).hello()
    await session.next("agent")
    await s.agents.SetState(agents_pb2.SetStateRequest(agent_id=agent_id, state=A.AGENT_STATE_READY))
    await session.next("agent", lambda a: a.state == A.AGENT_STATE_READY)
    return session


async def agent_state(s, agent_id: str) -> tuple[int, str]:
    a = (await s.agents.GetAgent(agents_pb2.GetAgentRequest(agent_id=agent_id))).agent
    return a.state, a.reason


# -- Connect: Accept / Reject of an unknown or stale assignment ------------------------


async def test_stream_answers_unknown_and_stale_assignments(node):
    s = node.stubs
    session = await ready_session(s, "fr-001")
    journaled = node.node.journal.last_seq
    await session.accept("ghost#1")
    r = await session.next("result")
    assert (r.op, r.assignment_id, r.call_id) == ("accept", "ghost#1", "ghost")
    assert (r.code, r.reason) == (C.NOT_FOUND.value[0], "UNKNOWN_ASSIGNMENT")
    await session.reject("ghost#1")
    r = await session.next("result")
    assert (r.op, r.code, r.reason) == ("reject", C.NOT_FOUND.value[0], "UNKNOWN_ASSIGNMENT")
    await session.accept("")
    r = await session.next("result")
    assert (r.code, r.reason) == (C.INVALID_ARGUMENT.value[0], "MISSING_FIELD")
    assert node.node.journal.last_seq == journaled  # nothing changed
    # stale: an offer the agent rejected, then accepts
    await s.routing.OfferCall(offer("c1"))
    a = await session.next("assignment")
    await session.reject(a.assignment_id)
    await session.next("cancelled")
    await session.accept(a.assignment_id)
    r = await session.next("result")
    assert (r.op, r.assignment_id, r.call_id, r.reason) == ("accept", a.assignment_id, "c1", "UNKNOWN_ASSIGNMENT")
    assert await agent_state(s, "fr-001") == (A.AGENT_STATE_NOT_READY, "rejected")
    # a reject of an accepted assignment: WRONG_STATE, the call stays connected
    await s.agents.SetState(agents_pb2.SetStateRequest(agent_id="fr-001", state=A.AGENT_STATE_READY))
    a = await session.next("assignment", lambda x: x.call.call_id == "c1")
    await session.accept(a.assignment_id)
    await session.next("connected")
    await session.reject(a.assignment_id)
    r = await session.next("result")
    assert (r.op, r.code, r.reason) == ("reject", C.FAILED_PRECONDITION.value[0], "WRONG_STATE")
    c = (await s.routing.GetCall(routing_pb2.GetCallRequest(call_id="c1"))).call
    assert c.state == t.CALL_STATE_CONNECTED
    assert session.call.done() is False
    session.cancel()


# -- READY needs an open Connect stream ------------------------------------------------


async def test_ready_without_a_stream_is_taken_out_of_routing(node):
    s, n = node.stubs, node.node
    n.stream_grace_s = 0.5
    await s.agents.SignIn(agents_pb2.SignInRequest(agent_id="fr-001"))
    await s.agents.SetState(agents_pb2.SetStateRequest(agent_id="fr-001", state=A.AGENT_STATE_READY))
    r = await s.routing.OfferCall(offer("c1"))
    assert r.call.state == t.CALL_STATE_ASSIGNED  # rings for nobody, for the grace only

    async def disconnected():
        return await agent_state(s, "fr-001") == (A.AGENT_STATE_NOT_READY, "disconnected")

    await wait_for(disconnected, 5, what="READY agent without a stream disconnected")
    c = (await s.routing.GetCall(routing_pb2.GetCallRequest(call_id="c1")))
    assert c.call.state == t.CALL_STATE_QUEUED and c.position == 1  # back at its place
    # wrap-up without a stream ends the same way (no auto-ready for nobody)
    await s.agents.SignIn(agents_pb2.SignInRequest(agent_id="fr-002"))
    await s.agents.SetState(agents_pb2.SetStateRequest(
        agent_id="fr-002", state=A.AGENT_STATE_WRAP_UP, timeout_s=0.2))

    async def fr2_disconnected():
        return await agent_state(s, "fr-002") == (A.AGENT_STATE_NOT_READY, "disconnected")

    await wait_for(fr2_disconnected, 5, what="wrap-up without a stream disconnected")
    assert (await s.routing.GetCall(routing_pb2.GetCallRequest(call_id="c1"))).call.state == t.CALL_STATE_QUEUED


async def test_ready_before_the_hello_is_read_keeps_the_agent(node):
    """The usual desktop order races (hello written, READY at once): within the grace a
    stream that opens keeps the agent READY, and the offers made meanwhile reach it."""
    s, n = node.stubs, node.node
    n.stream_grace_s = 0.5
    await s.agents.SignIn(agents_pb2.SignInRequest(agent_id="fr-001"))
    await s.agents.SetState(agents_pb2.SetStateRequest(agent_id="fr-001", state=A.AGENT_STATE_READY))
    await s.routing.OfferCall(offer("c1"))
    session = await AgentSession(s, "fr-001").hello()
    a = await session.next("assignment")
    assert a.call.call_id == "c1"
    await asyncio.sleep(1.0)
    assert (await agent_state(s, "fr-001"))[0] == A.AGENT_STATE_READY
    assert not n._unstreamed
    session.cancel()


# -- AbandonCall at the origin of a transferred call ------------------------------------


@contextlib.asynccontextmanager
async def pair(tmp_path):
    async with running_node(named_site("origin"), tmp_path / "o") as o:
        async with running_node(named_site("target"), tmp_path / "t") as tg:
            o.node.transfers.ttl_s, o.node.transfers.margin_s = 2.0, 0.5
            yield o, tg


async def test_abandon_at_origin_answers_with_the_target_state(tmp_path):
    async with pair(tmp_path) as (o, tg):
        await o.stubs.routing.OfferCall(offer_req("c1"))
        await o.stubs.routing.OfferCall(offer_req("c2"))
        assert (await o.node.transfer("c1", tg.address)).state == "committed"
        assert (await o.node.transfer("c2", tg.address)).state == "committed"
        # c1 still queued at the target: abandoned there, and the answer says so
        r = await o.stubs.routing.AbandonCall(routing_pb2.AbandonCallRequest(call_id="c1", reason="hangup"))
        assert (state(r.call), r.call.site, r.call.abandon_reason) == ("abandoned", "target", "hangup")
        assert state((await list_calls(tg.stubs))["c1"]) == "abandoned"
        assert o.node.engine.call("c1").abandon_pending == 2  # forwarded, nothing left to do
        # retried: the same answer
        r = await o.stubs.routing.AbandonCall(routing_pb2.AbandonCallRequest(call_id="c1", reason="hangup"))
        assert state(r.call) == "abandoned"
        # c2 answered at the target first: the hang-up cannot undo that
        await tg.stubs.agents.SignIn(agents_pb2.SignInRequest(agent_id="fr-001"))
        session = await AgentSession(tg.stubs, "fr-001").hello()
        await session.next("agent")
        await tg.stubs.agents.SetState(agents_pb2.SetStateRequest(agent_id="fr-001", state=A.AGENT_STATE_READY))
        a = await session.next("assignment", lambda x: x.call.call_id == "c2")
        await session.accept(a.assignment_id)
        await session.next("connected")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await o.stubs.routing.AbandonCall(routing_pb2.AbandonCallRequest(call_id="c2", reason="hangup"))
        assert (e.value.code(), error_reason(e.value)) == (C.FAILED_PRECONDITION, "CALL_ANSWERED")
        info = error_info(e.value)
        assert (info.metadata["target"], info.metadata["state"]) == (tg.address, "connected")
        assert state((await list_calls(tg.stubs))["c2"]) == "connected"
        await wait_for(lambda: asyncio.sleep(0, o.node.engine.transfers_pending() == []), 5)
        session.cancel()


# -- repeat callers: a call still waiting is not a previous contact ----------------------


def test_second_line_of_a_waiting_caller_is_not_a_repeat():
    eng = Engine(make_site())
    base = {"op": "offer", "channel": "voice", "skill": "billing", "language": "fr", "caller": "+33612345678"}
    first = eng.apply({**base, "t": 1, "call_id": "c1"}).result
    second = eng.apply({**base, "t": 2, "call_id": "c2"}).result
    assert first.call.priority_class == second.call.priority_class == "standard"
    assert (first.position, second.position) == (1, 2)  # the second line stays behind
    assert [c.call_id for c in eng.calls("queued")] == ["c1", "c2"]
    # once the first contact ended, the caller is a repeat caller
    eng.apply({"op": "abandon", "t": 3, "call_id": "c1"})
    third = eng.apply({**base, "t": 4, "call_id": "c3"}).result
    assert third.call.priority_class == "repeat"
    assert eng.position("c3") == 1  # 30 s of head start put it ahead of c2


# -- CompleteCall with another disposition ------------------------------------------------


async def test_second_complete_with_another_disposition_is_refused(node):
    s = node.stubs
    session = await ready_session(s, "fr-001")
    await s.routing.OfferCall(offer("c1"))
    a = await session.next("assignment")
    await session.accept(a.assignment_id)
    await session.next("connected")
    d = t.Disposition(resolved=True, csat=4, wrap_up_code="paid")
    req = routing_pb2.CompleteCallRequest(call_id="c1", disposition=d)
    first = await s.routing.CompleteCall(req)
    again = await s.routing.CompleteCall(req)
    assert again.call == first.call  # same disposition: idempotent
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.routing.CompleteCall(routing_pb2.CompleteCallRequest(
            call_id="c1", disposition=t.Disposition(resolved=False, csat=1)))
    assert (e.value.code(), error_reason(e.value)) == (C.FAILED_PRECONDITION, "DISPOSITION_CONFLICT")
    c = (await s.routing.GetCall(routing_pb2.GetCallRequest(call_id="c1"))).call
    assert (c.disposition.csat, c.disposition.wrap_up_code) == (4, "paid")
    session.cancel()


# -- empty ids, durations, oversized messages -------------------------------------------


async def _code(coro) -> tuple:
    try:
        r = await coro
    except grpc.aio.AioRpcError as e:
        return e.code(), error_reason(e)
    return C.OK, r


async def _stream_code(call) -> tuple:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as e:
        return e.code(), error_reason(e)
    return C.OK, None


async def test_empty_ids_are_missing_fields_everywhere(node):
    s = node.stubs
    ic = interconnect(s)
    cases = {
        "GetCall": s.routing.GetCall(routing_pb2.GetCallRequest()),
        "AbandonCall": s.routing.AbandonCall(routing_pb2.AbandonCallRequest()),
        "CompleteCall": s.routing.CompleteCall(routing_pb2.CompleteCallRequest()),
        "SignIn": s.agents.SignIn(agents_pb2.SignInRequest()),
        "SignOut": s.agents.SignOut(agents_pb2.SignOutRequest()),
        "SetState": s.agents.SetState(agents_pb2.SetStateRequest(state=A.AGENT_STATE_READY)),
        "GetAgent": s.agents.GetAgent(agents_pb2.GetAgentRequest()),
        "TransferCall": ic.TransferCall(interconnect_pb2.TransferCallRequest(target="127.0.0.1:1")),
    }
    for name, coro in cases.items():
        assert await _code(coro) == (C.INVALID_ARGUMENT, "MISSING_FIELD"), name
    got = await _stream_code(s.routing.WatchCall(routing_pb2.WatchCallRequest()))
    assert got == (C.INVALID_ARGUMENT, "MISSING_FIELD")


async def test_bad_durations_are_invalid_fields(node):
    s = node.stubs
    await s.routing.OfferCall(offer("w1"))
    await s.agents.SignIn(agents_pb2.SignInRequest(agent_id="fr-003"))
    before = node.node.journal.last_seq
    for bad in (-1.0, math.nan, math.inf, -math.inf):
        got = await _stream_code(s.routing.WatchCall(routing_pb2.WatchCallRequest(call_id="w1", interval_s=bad)))
        assert got == (C.INVALID_ARGUMENT, "INVALID_FIELD"), bad
        for st in (A.AGENT_STATE_READY, A.AGENT_STATE_NOT_READY, A.AGENT_STATE_WRAP_UP):
            req = agents_pb2.SetStateRequest(agent_id="fr-003", state=st, reason="x", timeout_s=bad)
            assert await _code(s.agents.SetState(req)) == (C.INVALID_ARGUMENT, "INVALID_FIELD"), (bad, st)
    assert node.node.journal.last_seq == before
    assert (await agent_state(s, "fr-003"))[0] == A.AGENT_STATE_NOT_READY


async def test_oversized_messages_carry_an_error_info(node):
    s = node.stubs
    big = b"x" * (200 * 1024)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.diag.Echo(diagnostics_pb2.EchoRequest(payload=big))
    assert (e.value.code(), error_reason(e.value)) == (C.RESOURCE_EXHAUSTED, "MESSAGE_TOO_LARGE")
    info = error_info(e.value)
    assert int(info.metadata["limit_bytes"]) == 64 * 1024 + 1024 < int(info.metadata["size_bytes"])
    ctx = t.CallContext(attributes={f"k{i}": "v" * 250 for i in range(300)})
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.routing.OfferCall(offer("big", context=ctx))
    assert (e.value.code(), error_reason(e.value)) == (C.RESOURCE_EXHAUSTED, "MESSAGE_TOO_LARGE")
    # on the Connect stream: answered, the stream stays up
    session = await ready_session(s, "fr-001")
    await session.call.write(agents_pb2.AgentMessage(reject=agents_pb2.Reject(assignment_id="a", reason="r" * 70_000)))
    r = await session.next("result")
    assert (r.code, r.reason) == (C.RESOURCE_EXHAUSTED.value[0], "MESSAGE_TOO_LARGE")
    # over gRPC's own limit: refused before any handler, without an ErrorInfo
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await s.diag.Echo(diagnostics_pb2.EchoRequest(payload=b"x" * (5 * 1024 * 1024)))
    assert e.value.code() == C.RESOURCE_EXHAUSTED
    # the limit is in every service's proto header
    for name in ("routing", "agents", "admin", "diagnostics", "interconnect"):
        text = (REPO / "proto" / "router" / "v1" / f"{name}.proto").read_text()
        assert "MESSAGE_TOO_LARGE" in text.split("syntax =")[0], name
    assert await s.healthy()
    session.cancel()


# -- stub generation in other languages ----------------------------------------------------


def test_proto_readme_and_health_proto_compile(tmp_path):
    from grpc_tools import protoc
    import grpc_tools

    readme = (REPO / "proto" / "README.md").read_text()
    for word in ("grpc_tools.protoc", "--go_out", "--java_out", "grpc_tools_node_protoc", "-I proto",
                 "googleapis-common-protos", "grpc/health/v1/health.proto"):
        assert word in readme, word
    health = REPO / "proto" / "grpc" / "health" / "v1" / "health.proto"
    assert "package grpc.health.v1;" in health.read_text()
    well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    protos = sorted(str(p.relative_to(REPO / "proto")) for p in (REPO / "proto").rglob("*.proto"))
    assert "grpc/health/v1/health.proto" in protos
    # every file, health included, compiles with the include path the README gives
    rc = protoc.main(["protoc", f"-I{REPO / 'proto'}", f"-I{well_known}", f"--python_out={tmp_path}",
                      f"--grpc_python_out={tmp_path}", *protos])
    assert rc == 0
    # the shipped file is the one the installed grpc_health module was generated from
    from google.protobuf import descriptor_pb2
    from grpc_health.v1 import health_pb2

    out = tmp_path / "health.pb"
    assert protoc.main(["protoc", f"-I{REPO / 'proto'}", f"--descriptor_set_out={out}",
                        "grpc/health/v1/health.proto"]) == 0
    mine = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for m in mine.message_type:
        for f in [*m.field, *(f for n in m.nested_type for f in n.field)]:
            f.ClearField("json_name")
    theirs = descriptor_pb2.FileDescriptorProto()
    health_pb2.DESCRIPTOR.CopyToProto(theirs)
    theirs.name = mine.name
    assert mine == theirs
    # the build compiles proto/router/v1 only: no second grpc.health.v1 module in router/
    assert not list((REPO / "router").rglob("health_pb2*.py"))
    setup = (REPO / "setup.py").read_text()
    assert '"proto", "router", "v1", "*.proto"' in setup


# -- the history of a compressed run reads in the run's time ------------------------------


def test_report_kpi_reads_a_compressed_run_in_its_time(tmp_path):
    import json

    from typer.testing import CliRunner

    from router.cli import app
    from router.sim.demo import write_time_scale

    run = CliRunner()
    d = tmp_path / "demo"
    node_dir = d / "cluster" / "nodes" / "lyon"  # a node's history inside a demo's data dir
    r = run.invoke(app, ["history", "synth", "--data-dir", str(node_dir), "--calls", "300", "--days", "1"])
    assert r.exit_code == 0, r.output

    def kpi(*extra: str) -> dict:
        r = run.invoke(app, ["report", "kpi", "--data-dir", str(node_dir), "--by", "site", "--json", *extra])
        assert r.exit_code == 0, r.output
        doc = json.loads(r.stdout)
        return doc

    raw = kpi()
    assert raw["time_scale"] == 1.0
    write_time_scale(d, 60.0)  # what `tandem demo` does in its data dir
    assert (d / "time_scale").read_text().strip() == "60.0"
    scaled = kpi()
    assert scaled["time_scale"] == 60.0
    assert sum(row["offered"] for row in scaled["rows"]) == 300
    for a, b in zip(raw["rows"], scaled["rows"], strict=True):
        assert (b["group"], b["offered"]) == (a["group"], a["offered"])
        assert b["aht_s"] == pytest.approx(60 * a["aht_s"]) and b["asa_s"] == pytest.approx(60 * a["asa_s"])
        assert b["occupancy"] == pytest.approx(a["occupancy"]) and b["service_level"] == a["service_level"]
    assert kpi("--time-scale", "1")["rows"] == raw["rows"]  # an explicit scale wins
    r = run.invoke(app, ["report", "kpi", "--data-dir", str(node_dir), "--by", "site"])
    assert r.exit_code == 0 and "simulated time" in r.stdout and "x60" in r.stdout, r.stdout


# -- tandem demo --traffic FILE ------------------------------------------------------------


def _profile(**site) -> dict:
    return {"version": 1, "sites": {"testsite": {"streams": [], **site}}}


def test_traffic_profiles_validate_and_default_to_the_demo_load():
    from router.config import load_sites
    from router.sim.demo import demo_streams, example_sites_dir
    from router.sim.traffic import ProfileError, example_profile_path, load_profile, parse_profile

    sites = load_sites(example_sites_dir())
    example = load_profile(example_profile_path())
    assert example.call_streams(sites) == demo_streams(sites)  # the shipped file is the default
    site = [make_site()]
    stream = {"queue": "billing-fr-voice", "rate_per_h": 100, "handle": {"dist": "fixed", "mean_s": 60}}
    p = parse_profile(_profile(streams=[stream], callers={"size": 7, "vip_p": 0.5},
                               head_start_s={"vip": 5}))
    (st,) = p.call_streams(site)
    assert (st.skill, st.channel, st.language, st.rate_per_h, st.talk_dist, st.patience_s) == (
        "billing", "voice", "fr", 100, "fixed", None)
    pool = p.caller_pools(site, [st], 3600)["testsite"]
    assert (pool.size, pool.vip_p, pool.vip) == (7, 0.5, ("+33600000001",))
    assert p.apply_to_sites(site)[0].routing.head_start_s["vip"] == 5
    erl = parse_profile(_profile(streams=[{**stream, "rate_per_h": None, "erlangs": 2}]))
    assert erl.call_streams(site)[0].rate_per_h == pytest.approx(2 * 3600 / (60 + 0.5))  # + wrap-up
    bad = [
        ({"sites": {"nowhere": {}}}, "unknown site"),
        (_profile(streams=[{**stream, "queue": "nope"}]), "no queue 'nope'"),
        (_profile(streams=[{**stream, "queue": None, "skill": "cooking"}]), "no queue of site testsite serves"),
        (_profile(streams=[{**stream, "erlangs": 3}]), "exactly one of rate_per_h and erlangs"),
        (_profile(streams=[{**stream, "rate_per_h": -1}]), "rate_per_h"),
        (_profile(streams=[{**stream, "handle": {"dist": "lognormal", "mean_s": float("nan")}}]), "mean_s"),
        (_profile(streams=[{**stream, "patience": {"dist": "gamma", "mean_s": 3}}]), "patience"),
        (_profile(callers={"vip_p": 0.7, "whitelist_p": 0.5}), "<= 1"),
    ]
    for doc, words in bad:
        with pytest.raises(ProfileError) as e:
            parse_profile(doc).check(site)
        assert words in str(e.value), (doc, str(e.value))


def test_demo_refuses_a_bad_traffic_file_at_once(tmp_path):
    f = tmp_path / "traffic.yaml"
    f.write_text("version: 1\nsites:\n  atlantis: {}\n")
    r = subprocess.run([sys.executable, "-m", "router.cli", "demo", "--traffic", str(f), "--sites",
                        str(REPO / "sites"), "--data-dir", str(tmp_path / "d")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown site(s) atlantis" in r.stderr, r.stderr
    assert not (tmp_path / "d").exists()  # nothing started


async def test_a_one_stream_profile_offers_its_rate(tmp_path):
    """One Poisson stream at 1800 calls per simulated hour, x100, for 4 real seconds:
    about 1800 / 3600 * 100 * 4 = 200 calls offered (Poisson: sd ~14)."""
    from router.sim.agents import AgentBehaviour
    from router.sim.loadgen import LoadGen, LoadGenConfig
    from router.sim.traffic import parse_profile

    site = make_site()
    profile = parse_profile({"version": 1, "time_scale": 100, "sites": {"testsite": {
        "callers": {"size": 5000},
        "streams": [{"queue": "billing-fr-voice", "rate_per_h": 1800,
                     "handle": {"dist": "fixed", "mean_s": 2}, "patience": {"dist": "none"}}]}}})
    streams = profile.call_streams([site])
    async with running_node(site, tmp_path / "node") as n:
        gen = LoadGen(LoadGenConfig(
            addresses={"testsite": n.address}, streams=streams,
            agents={"testsite": list(site.agent_profiles())}, time_scale=profile.time_scale,
            behaviour=AgentBehaviour(csat_p=0.0), callers=profile.caller_pools([site], streams, 400),
            seed=3, drain_s=5.0,
        ))
        await gen.run(4.0)
    c = gen.counters["testsite"]
    assert 150 <= c.offered <= 250, c
    # every call ended (the few agents cannot take them all: many wait till the end)
    assert c.offer_failed == 0 and c.answered + c.abandoned + c.rejected == c.offered, c
