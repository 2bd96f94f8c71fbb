"""Invariant 7 on the wire: over random contracts and random calls, nothing outside the
contract's data scopes reaches a partner identity on any message of the partner API —
Welcome, Offer, Assign (with its offer and screen-pop summary), Withdraw, the errors of
ReportOutcome / HandBack (details and trailing metadata) — from a real node process.

Each example stores a random contract in etcd (the node hot-reloads it), offers a call
whose caller number, customer id, bot transcript, IVR path and attributes carry unique
sentinels (and, for the screen pop, an earlier contact of the same caller), lets a gateway
accept it, and provokes errors. Every message the gateway received is checked with
:func:`router.contracts.fields_outside` and searched for the sentinels the scopes forbid.
(The pure builder is covered in depth by tests/test_partner_scopes.py; this proves the node
sends nothing else.)"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf.json_format import MessageToDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node_fixtures import error_reason, node_process, site_dict
from test_cluster import node_env
from test_partner_api import PARTNER, Gateway
from router.contracts import contract_json, fields_outside, parse_contract
from router.coord.keys import Keys
from router.v1 import partner_pb2 as pb
from router.v1 import routing_pb2, routing_pb2_grpc, types_pb2 as t

POLICY = {"max_peer_age_s": 3.0, "default": {"split": {"percent": 100, "to": [PARTNER]}}}

scopes = st.fixed_dictionaries({
    "caller": st.sampled_from(["none", "token", "last_digits", "full"]),
    "profile": st.sampled_from(["none", "basic", "full"]),
    "transcript": st.booleans(),
    "ivr_path": st.booleans(),
    "recording": st.sampled_from(["allowed", "paused"]),
})


@pytest.fixture(scope="module")
def scope_node(etcd, tmp_path_factory):
    prefix = f"/tandem-test/{uuid.uuid4().hex[:12]}/"
    keys = Keys(prefix)
    etcd.etcdctl("put", keys.policy_overflow, json.dumps(POLICY))
    directory: Path = tmp_path_factory.mktemp("minimization")
    d = site_dict(repeat_window_h=24)
    d["site"]["name"] = "alpha"
    f = directory / "alpha.yaml"
    f.write_text(yaml.safe_dump(d))
    with node_process(f, directory / "alpha", sync="none", env=node_env(etcd.endpoints, prefix)) as node:
        yield etcd, keys, node


def _strings(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


async def _example(etcd, keys: Keys, address: str, n: int, sc: dict) -> None:
    timeout = round(1.5 + n * 0.01, 2)  # a unique value: tells when the node has reloaded
    raw = contract_json(parse_contract(json.dumps({
        "partner": PARTNER, "value_tiers": ["low", "standard"], "offer_timeout_s": timeout,
        "caps": {"concurrent": 50}, "scopes": sc,
    })))
    etcd.etcdctl("put", keys.partner_contract(PARTNER), raw)
    contract = parse_contract(raw)
    gw = None
    for _ in range(100):
        gw = Gateway(address)
        try:
            w = await gw.open()
        except AssertionError:
            w = None
        if w is not None and w.offer_timeout_s == timeout:
            break
        await gw.close()
        await asyncio.sleep(0.1)
    tag = uuid.uuid4().hex[:10]
    digits = str(uuid.uuid4().int)[:9]
    caller = f"+1{digits}"
    secrets = {
        "caller": caller, "customer": f"CUST{tag}", "transcript": f"TRANSCRIPT{tag}",
        "ivr": f"IVR{tag}", "attr": f"ATTR{tag}",
    }
    ch = grpc.aio.insecure_channel(address)
    routing = routing_pb2_grpc.RoutingStub(ch)
    try:
        ctx = t.CallContext(ivr_path=["main", secrets["ivr"]], bot_transcript=secrets["transcript"],
                            attributes={"note": secrets["attr"]})
        for i in range(2):  # an earlier contact: the screen pop has something to show
            cid = f"m{n}-{tag}-{i}"
            await routing.OfferCall(routing_pb2.OfferCallRequest(
                call_id=cid, skill="billing", channel=t.CHANNEL_VOICE, language="fr", caller=caller,
                customer_id=secrets["customer"], context=ctx), timeout=5)
            m = await gw.next("offer", timeout=10)
            gw.accept(m.offer)
            await gw.next("assign", timeout=10)
            await gw.report(cid, answered_at=1.0)
        # errors a partner can provoke
        errors = []
        for req in (pb.ReportOutcomeRequest(call_id=cid, partner=PARTNER, csat=9),
                    pb.ReportOutcomeRequest(call_id=cid, partner=PARTNER, answered_at=2.0),
                    pb.HandBackRequest(call_id=cid, partner=PARTNER),
                    pb.HandBackRequest(call_id=f"m{n}-{tag}-0x", partner=PARTNER)):
            try:
                await (gw.stub.ReportOutcome(req, timeout=5) if isinstance(req, pb.ReportOutcomeRequest)
                       else gw.stub.HandBack(req, timeout=5))
            except grpc.RpcError as e:
                errors.append((e.code().name, e.details(), error_reason(e), list(e.trailing_metadata() or ())))
        assert len(errors) == 4
        await asyncio.sleep(0.2)
        received = [MessageToDict(m, preserving_proto_field_name=True) for m in gw.received]
    finally:
        await gw.close()
        await ch.close()
    offers = [r["offer"] for r in received if "offer" in r] + [r["assign"]["offer"] for r in received if "assign" in r]
    assert offers
    for o in offers:
        assert fields_outside(o, contract.scopes) == [], (sc, o)
    text = _strings(received) + _strings(errors)
    allowed = {
        "caller": sc["caller"] == "full",
        "customer": sc["profile"] == "full",
        "transcript": sc["transcript"],
        "ivr": sc["ivr_path"],
        "attr": False,
    }
    for name, ok in allowed.items():
        if not ok:
            assert secrets[name] not in text, (name, sc)
    if sc["caller"] != "full":
        assert digits not in text
    if sc["caller"] == "token":
        assert all(o.get("caller_token", "").startswith("t_") for o in offers)
    if sc["profile"] != "none":
        assert any(o.get("contacts_90d") for o in offers)  # the earlier contact, counted


_counter = iter(range(1, 10_000))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sc=scopes)
def test_nothing_outside_the_scopes_reaches_the_partner(scope_node, sc):
    etcd, keys, node = scope_node
    asyncio.run(_example(etcd, keys, node.address, next(_counter), sc))
