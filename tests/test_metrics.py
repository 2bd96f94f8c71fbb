"""The node's Prometheus metrics (issue 10 §4): names follow Prometheus's rules, the
figures are right after real traffic on a real in-process node, and the gRPC server
metrics count a call the security interceptor refuses, with its code."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from node_fixtures import AgentSession, Stubs, site_dict, until
from router.config import parse_site
from router.node import metrics
from router.node.server import build_node
from router.v1 import admin_pb2, agents_pb2, routing_pb2
from router.v1 import types_pb2 as t

pytestmark = pytest.mark.timeout(60)

FORBIDDEN_LABELS = {"call", "call_id", "caller", "customer", "customer_id", "agent", "agent_id", "assignment_id",
                    "id", "peer_address", "address"}
FR = "billing-fr-voice"


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def metrics_node(name: str, **kw):
    """An in-process node of site ``name`` whose metrics loop runs (gauges and alerts)."""
    d = site_dict()
    d["site"]["name"] = name
    with tempfile.TemporaryDirectory(prefix="tandem-metrics-") as data:
        node, port = await build_node(parse_site(d, "<metrics site>"), Path(data), "127.0.0.1:0", sync="none",
                                      drain_s=0.1, **kw)
        await node.start(publish_metrics=True)
        stubs = Stubs.connect(f"127.0.0.1:{port}")
        try:
            yield node, stubs
        finally:
            await stubs.channel.close()
            await node.stop(grace=0.1)


def offer(call_id: str) -> routing_pb2.OfferCallRequest:
    return routing_pb2.OfferCallRequest(call_id=call_id, skill="billing", channel=t.CHANNEL_VOICE, language="fr",
                                        caller="+33611111111")


async def test_figures_after_real_traffic():
    site = "metricsite"
    async with metrics_node(site) as (node, s):
        await s.agents.SignIn(agents_pb2.SignInRequest(agent_id="fr-001"), timeout=5)
        agent = await AgentSession(s, "fr-001").hello()
        await s.agents.SetState(agents_pb2.SetStateRequest(agent_id="fr-001", state=t.AGENT_STATE_READY), timeout=5)
        try:
            r = await s.routing.OfferCall(offer("m1"), timeout=5)  # rings fr-001 at once
            assert r.call.state == t.CALL_STATE_ASSIGNED
            node.publish_metrics()
            assert value("tandem_agents", site=site, state="on_contact") == 1
            a = await agent.next("assignment")
            await agent.accept(a.assignment_id)
            await agent.next("connected")
            await s.routing.CompleteCall(routing_pb2.CompleteCallRequest(call_id="m1"), timeout=5)
            await s.agents.SetState(agents_pb2.SetStateRequest(agent_id="fr-001", state=t.AGENT_STATE_NOT_READY,
                                                                     reason="break"),
                                    timeout=5)
            for cid in ("m2", "m3"):
                assert (await s.routing.OfferCall(offer(cid), timeout=5)).call.state == t.CALL_STATE_QUEUED
            await s.routing.AbandonCall(routing_pb2.AbandonCallRequest(call_id="m3"), timeout=5)
            await asyncio.sleep(0.3)
        finally:
            agent.cancel()
        node.publish_metrics()
        q = {"site": site, "queue": FR}
        assert value("tandem_queue_contacts", **q) == 1
        assert 0.2 <= value("tandem_queue_oldest_contact_age_seconds", **q) < 10
        assert value("tandem_queue_expected_wait_seconds", **q) > 0  # nobody ready: a long wait
        assert value("tandem_contacts_handled_total", **q) == 1
        assert value("tandem_contacts_abandoned_total", **q) == 1
        assert value("tandem_queue_wait_seconds_count", **q) == 1  # answered contacts
        assert value("tandem_queue_wait_seconds_bucket", **q, le="20.0") == 1  # answered within T
        # the engine's figure (a short abandon is excluded) and the bucket ratio agree
        assert value("tandem_queue_service_level", **q) == 1.0
        assert value("tandem_queue_service_level_target", **q) == 0.8
        assert value("tandem_queue_service_level_threshold_seconds", **q) == 20
        assert value("tandem_agents", site=site, state="not_ready") == 1
        assert value("tandem_agents", site=site, state="signed_out") == 4
        assert value("tandem_agents", site=site, state="on_contact") == 0
        # a queue with no finished contact has no service-level figure (no alert on it)
        assert REGISTRY.get_sample_value("tandem_queue_service_level", {"site": site, "queue": "support-chat"}) is None
        assert value("tandem_node_calls", site=site, state="queued") == 1
        # the metrics loop itself refreshes the gauges once a second
        await s.routing.OfferCall(offer("m4"), timeout=5)

        async def two_waiting():
            return value("tandem_queue_contacts", **q) == 2

        await until(two_waiting, 3, "the metrics loop to publish the second queued call")
        # and the gRPC server metrics saw the calls
        assert value("grpc_server_handled_total", grpc_type="unary", grpc_service="router.v1.Routing",
                     grpc_method="OfferCall", grpc_code="OK") >= 4
        assert value("grpc_server_handling_seconds_count", grpc_type="bidi_stream", grpc_service="router.v1.Agents",
                     grpc_method="Connect") >= 1


async def test_names_follow_the_rules():
    async with metrics_node("namesite") as (node, s):
        with pytest.raises(grpc.aio.AioRpcError):
            await s.routing.OfferCall(routing_pb2.OfferCallRequest(call_id="x", skill="astrology",
                                                                   channel=t.CHANNEL_VOICE), timeout=5)
        node.publish_metrics()
    seen = set()
    for fam in REGISTRY.collect():
        if not fam.name.startswith(("tandem_", "grpc_server_")):
            continue
        seen.add(fam.name)
        for smp in fam.samples:
            bad = FORBIDDEN_LABELS & set(smp.labels)
            assert not bad, f"{smp.name} has per-call or per-caller labels {bad}"
            if fam.type == "counter":
                assert smp.name.endswith(("_total", "_created")), smp.name
            elif fam.type == "gauge":
                assert not smp.name.endswith("_total"), smp.name
        for unit in ("_ms", "_milliseconds", "_minutes", "_hours", "_percent"):
            assert not fam.name.endswith(unit), f"{fam.name}: use base units (seconds, ratios)"
        if fam.type == "histogram":
            assert fam.name.endswith("_seconds"), fam.name
    for name in ("tandem_queue_contacts", "tandem_queue_oldest_contact_age_seconds", "tandem_agents",
                 "tandem_queue_wait_seconds", "tandem_contacts_handled", "tandem_contacts_abandoned",
                 "tandem_overflow_out", "tandem_overflow_in", "tandem_queue_service_level",
                 "tandem_queue_service_level_target", "grpc_server_handled", "grpc_server_handling_seconds"):
        assert name in seen, name


def test_wait_buckets_hold_every_threshold():
    assert metrics.wait_buckets([20, 25.5, 7]) == tuple(sorted({*metrics.WAIT_BUCKETS, 25.5, 7.0}))


async def test_refused_call_is_counted_with_its_code(tmp_path):
    from router.security.site import NodeSecurity
    from test_security_node import LYON_FILE, files_channel, make_tls

    from router.config import load_site

    tls = make_tls(tmp_path / "tls")
    security = NodeSecurity.open("lyon", tmp_path / "lyon", tls)
    node, port = await build_node(load_site(LYON_FILE), tmp_path / "lyon", "127.0.0.1:0", sync="none",
                                  drain_s=0.1, security=security)
    await node.start()
    address = f"127.0.0.1:{port}"
    labels = {"grpc_type": "unary", "grpc_service": "router.v1.Admin", "grpc_method": "GetStatus"}
    denied0 = value("grpc_server_handled_total", **labels, grpc_code="PERMISSION_DENIED")
    ok0 = value("grpc_server_handled_total", **labels, grpc_code="OK")
    nobody = files_channel(address, tls, "operator-nobody")  # a valid certificate, bound to no role
    admin = files_channel(address, tls, "operator-admin")
    try:
        from router.v1 import admin_pb2_grpc

        with pytest.raises(grpc.aio.AioRpcError) as e:
            await admin_pb2_grpc.AdminStub(nobody).GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await admin_pb2_grpc.AdminStub(admin).GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
        assert value("grpc_server_handled_total", **labels, grpc_code="PERMISSION_DENIED") == denied0 + 1
        assert value("grpc_server_handled_total", **labels, grpc_code="OK") == ok0 + 1
        # a method the server does not serve: counted, under "unknown" (no label from the caller)
        before = value("grpc_server_handled_total", grpc_type="bidi_stream", grpc_service="unknown",
                       grpc_method="unknown", grpc_code="PERMISSION_DENIED")
        with pytest.raises(grpc.aio.AioRpcError):
            await nobody.unary_unary("/router.v1.Nope/Whatever")(b"", timeout=5)
        assert value("grpc_server_handled_total", grpc_type="bidi_stream", grpc_service="unknown",
                     grpc_method="unknown", grpc_code="PERMISSION_DENIED") == before + 1
    finally:
        await nobody.close()
        await admin.close()
        await node.stop(grace=0.1)
        await security.aclose()
