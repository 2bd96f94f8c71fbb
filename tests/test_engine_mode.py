"""The engine's contingency mode (``set_mode``): back-office eligibility, announcement,
validation, journal replay and snapshot round-trip."""

from __future__ import annotations

import json

import pytest

from router.config import load_sites, parse_site
from router.engine import Engine
from router.model import AssignmentOffered, RoutingError
from router.pqueue import PyIndexedPQ

try:
    from router.pqueue import IndexedPQ
except ImportError:  # pragma: no cover
    IndexedPQ = None

FACTORIES = [pytest.param(PyIndexedPQ, id="py")]
if IndexedPQ is not None:
    FACTORIES.append(pytest.param(IndexedPQ, id="c"))

DOC = {
    "site": {"name": "bo", "region": "emea"},
    "routing": {"offer_timeout_s": 10},
    "queues": [
        {"name": "billing-voice", "skill": "billing", "channel": "voice", "wrap_up_s": 0},
        {"name": "billing-chat", "skill": "billing", "channel": "chat", "wrap_up_s": 0},
        {"name": "billing-email", "skill": "billing", "channel": "email", "wrap_up_s": 0},
    ],
    "agents": [
        {"id": "front", "skills": {"billing": 5}, "capacity": {"voice": 1}},
        {"id": "bo", "count": 2, "skills": {"billing": 5}, "backoffice": True,
         "capacity": {"voice": 1, "chat": 1, "email": 2}},
    ],
}  # fmt: skip
SURGE = {"op": "set_mode", "mode": "surge", "backoffice": True, "announcement": "Busy, sorry."}
NORMAL = {"op": "set_mode", "mode": "normal", "backoffice": False, "announcement": ""}


def ready(e: Engine, aid: str, t: float) -> None:
    e.apply({"op": "sign_in", "t": t, "agent_id": aid})
    e.apply({"op": "set_state", "t": t, "agent_id": aid, "state": "ready"})


def offer(e: Engine, cid: str, t: float, channel: str = "voice"):
    return e.apply({"op": "offer", "t": t, "call_id": cid, "channel": channel, "skill": "billing"})


@pytest.fixture(params=FACTORIES)
def engine(request) -> Engine:
    return Engine(parse_site(DOC), queue_factory=request.param)


def test_backoffice_agents_only_do_email_in_normal_mode(engine):
    e = engine
    ready(e, "bo-001", 1.0)
    ready(e, "bo-002", 1.0)
    assert offer(e, "v1", 2.0).result.call.state == "queued"
    assert offer(e, "c1", 2.5, "chat").result.call.state == "queued"
    assert offer(e, "m1", 3.0, "email").result.call.state == "assigned"
    assert e.mode() == {"mode": "normal", "backoffice": False, "announcement": ""}
    qs = {q.name: q for q in e.queues()}
    assert qs["billing-voice"].agents_ready == 0 and qs["billing-voice"].agents_staffed == 0
    assert qs["billing-email"].agents_ready == 2
    e.apply({**SURGE, "t": 4.0})
    qs = {q.name: q for q in e.queues()}
    assert qs["billing-voice"].agents_staffed == 2
    assert e.mode() == {"mode": "surge", "backoffice": True, "announcement": "Busy, sorry."}


def test_surge_dispatches_queued_calls_then_normal_stops_new_ones(engine):
    e = engine
    ready(e, "bo-001", 1.0)
    ready(e, "bo-002", 1.0)
    offer(e, "v1", 2.0)
    offer(e, "v2", 3.0)
    offer(e, "v3", 4.0)
    out = e.apply({**SURGE, "t": 5.0})
    assert out.changed and out.result["mode"] == "surge"
    offered = [x for x in out.effects if isinstance(x, AssignmentOffered)]
    # the two oldest calls, in arrival order, one per back-office agent (longest idle)
    assert [x.call_id for x in offered] == ["v1", "v2"]
    assert {x.agent_id for x in offered} == {"bo-001", "bo-002"}
    assert e.announcement == "Busy, sorry."
    e.apply({"op": "accept", "t": 6.0, "agent_id": offered[0].agent_id,
             "assignment_id": offered[0].assignment_id})  # fmt: skip
    # back to normal: calls in hand stay, no new voice/chat calls for back-office agents
    out = e.apply({**NORMAL, "t": 7.0})
    assert out.changed and not [x for x in out.effects if isinstance(x, AssignmentOffered)]
    assert e.call("v1").state == "connected" and e.call("v1").agent_id == offered[0].agent_id
    assert e.announcement == ""
    e.apply({"op": "complete", "t": 8.0, "call_id": "v1"})
    assert e.call("v3").state == "queued"  # the freed agent takes nothing of voice
    assert offer(e, "v4", 9.0).result.call.state == "queued"
    # a front-office agent still serves in arrival order
    ready(e, "front", 10.0)
    assert e.call("v3").state == "assigned" and e.call("v3").agent_id == "front"


def test_set_mode_is_idempotent_and_validated(engine):
    e = engine
    assert e.apply({**SURGE, "t": 1.0}).changed
    before = json.dumps(e.snapshot(), sort_keys=True)
    out = e.apply({**SURGE, "t": 2.0})
    assert not out.changed and out.effects == []
    for bad in (
        {"mode": "panic"}, {"mode": None}, {"mode": "surge", "backoffice": "yes"},
        {"mode": "surge", "announcement": "x" * 257}, {"mode": "surge", "announcement": 3},
    ):  # fmt: skip
        with pytest.raises(RoutingError) as err:
            e.apply({"op": "set_mode", "t": 3.0, **bad})
        assert err.value.code == "INVALID_ARGUMENT"
    assert json.dumps(e.snapshot(), sort_keys=True) == before
    # an announcement alone is a change, without any dispatch
    out = e.apply({**SURGE, "t": 4.0, "announcement": "x" * 256})
    assert out.changed and e.announcement == "x" * 256


@pytest.mark.parametrize("qf", FACTORIES)
def test_snapshot_round_trip_and_replay(qf):
    site = parse_site(DOC)
    cmds = [
        {"op": "sign_in", "t": 1.0, "agent_id": "bo-001"},
        {"op": "set_state", "t": 1.0, "agent_id": "bo-001", "state": "ready"},
        {"op": "sign_in", "t": 1.0, "agent_id": "bo-002"},
        {"op": "offer", "t": 2.0, "call_id": "v1", "channel": "voice", "skill": "billing"},
        {"op": "offer", "t": 2.5, "call_id": "v2", "channel": "voice", "skill": "billing"},
        {**SURGE, "t": 3.0},
        {"op": "set_state", "t": 4.0, "agent_id": "bo-002", "state": "ready"},
        {"op": "offer", "t": 5.0, "call_id": "v3", "channel": "voice", "skill": "billing"},
        {**NORMAL, "t": 6.0},
        {"op": "offer", "t": 7.0, "call_id": "c1", "channel": "chat", "skill": "billing"},
        {**SURGE, "t": 8.0, "mode": "emergency", "announcement": "Longer waits."},
    ]
    e = Engine(site, queue_factory=qf)
    snaps = []
    for cmd in cmds:
        assert e.apply(cmd).changed
        snaps.append(json.dumps(e.snapshot(), sort_keys=True))
    for k, snap in enumerate(snaps):
        r = Engine.restore(site, json.loads(snap), queue_factory=qf)
        assert json.dumps(r.snapshot(), sort_keys=True) == snap
        for cmd in cmds[k + 1:]:
            r.apply(cmd)
        assert json.dumps(r.snapshot(), sort_keys=True) == snaps[-1], f"restore at {k} diverged"
    assert e.mode()["mode"] == "emergency"
    assert e.call("c1").state == "assigned"  # back-office on again: the chat call is taken


def test_old_snapshot_without_mode_restores_as_normal():
    site = parse_site(DOC)
    e = Engine(site)
    ready(e, "bo-001", 1.0)
    offer(e, "v1", 2.0)
    snap = e.snapshot()
    del snap["mode"]
    r = Engine.restore(site, json.loads(json.dumps(snap)))
    assert r.mode() == {"mode": "normal", "backoffice": False, "announcement": ""}
    assert r.call("v1").state == "queued"
    r.apply({**SURGE, "t": 3.0})
    assert r.call("v1").state == "assigned" and r.call("v1").agent_id == "bo-001"


def test_lyon_backoffice_group_is_marked():
    sites = {s.site.name: s for s in load_sites("sites")}
    groups = {g.id: g for g in sites["lyon"].agents}
    assert groups["lyon-backoffice"].backoffice and not groups["lyon-fr"].backoffice
