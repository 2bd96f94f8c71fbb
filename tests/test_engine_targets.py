"""The engine's record of the rebalancer's targets (``targets_applied``,
router.engine.staffing): fencing refused below the highest applied, idempotent repeats,
kept by snapshot/restore and by a journal replay."""

from __future__ import annotations

import json

import pytest
from node_fixtures import make_site, site_dict

from router.config import parse_site
from router.engine import Engine
from router.model import RoutingError


def applied(fencing: int, generation: int, plan: str = "p", moved=(), t: float = 100.0, doc: str = "") -> dict:
    return {"op": "targets_applied", "t": t, "fencing": fencing, "generation": generation, "plan": plan,
            "moved": list(moved), "doc": doc}


def dump(e: Engine) -> str:
    return json.dumps(e.snapshot(), sort_keys=True)


def test_new_engine_has_none_applied():
    e = Engine(make_site())
    assert e.targets_applied() == {"fencing": 0, "generation": 0, "plan": "", "moved": [], "doc": ""}
    assert e.targets_fencing == 0
    assert e.snapshot()["targets"] == e.targets_applied()


def test_applied_stored_and_repeat_is_a_no_op():
    e = Engine(make_site())
    out = e.apply(applied(7, 3, "abc", ["fr-002", "fr-001", "fr-001"]))
    assert out.changed and out.effects == []
    assert out.result == {"fencing": 7, "generation": 3, "plan": "abc", "moved": ["fr-001", "fr-002"], "doc": ""}
    assert e.targets_applied() == out.result
    again = e.apply(applied(7, 3, "abc", ["fr-001", "fr-002"], t=200.0))
    assert not again.changed and again.result == out.result
    # a newer generation under the same leader, and a newer leader, are applied
    assert e.apply(applied(7, 4, "def", ["fr-001"])).changed
    assert e.apply(applied(9, 5, "ghi")).changed
    assert e.targets_applied() == {"fencing": 9, "generation": 5, "plan": "ghi", "moved": [], "doc": ""}


def test_lower_fencing_refused_and_nothing_changes():
    e = Engine(make_site())
    e.apply(applied(9, 5, "new", ["fr-001"]))
    before = dump(e)
    with pytest.raises(RoutingError) as ei:
        e.apply(applied(8, 6, "old", ["fr-002"]))
    assert (ei.value.code, ei.value.reason) == ("FAILED_PRECONDITION", "STALE_FENCING")
    assert ei.value.metadata == {"fencing": "8", "applied": "9"}
    assert dump(e) == before
    assert e.targets_applied()["plan"] == "new"


@pytest.mark.parametrize("patch, reason", [
    ({"fencing": -1}, "INVALID_FIELD"),
    ({"fencing": True}, "INVALID_FIELD"),
    ({"generation": 1.5}, "INVALID_FIELD"),
    ({"plan": 3}, "INVALID_FIELD"),
    ({"plan": "x" * 65}, "FIELD_TOO_LONG"),
    ({"moved": "fr-001"}, "INVALID_FIELD"),
    ({"moved": [1]}, "INVALID_FIELD"),
    ({"moved": ["nobody"]}, "UNKNOWN_AGENT"),
    ({"doc": {"fencing": 1}}, "INVALID_FIELD"),
    ({"doc": "x" * ((1 << 20) + 1)}, "FIELD_TOO_LONG"),
])
def test_invalid_fields_refused(patch, reason):
    e = Engine(make_site())
    before = dump(e)
    with pytest.raises(RoutingError) as ei:
        e.apply({**applied(1, 1), **patch})
    assert ei.value.reason == reason
    assert dump(e) == before


def test_snapshot_restore_keeps_it_and_still_refuses_the_lower_epoch():
    site = make_site()
    e = Engine(site)
    doc = json.dumps({"fencing": 12, "generation": 2, "targets": {"groups": {"bi-001": "fr"}}})
    e.apply(applied(12, 2, "p2", ["bi-001"], doc=doc))
    r = Engine.restore(site, json.loads(dump(e)))
    assert r.targets_applied() == {"fencing": 12, "generation": 2, "plan": "p2", "moved": ["bi-001"], "doc": doc}
    assert dump(r) == dump(e)
    with pytest.raises(RoutingError) as ei:
        r.apply(applied(11, 3))
    assert ei.value.reason == "STALE_FENCING"


def test_old_snapshot_without_targets_restores_with_none_applied():
    site = make_site()
    snap = Engine(site).snapshot()
    del snap["targets"]
    r = Engine.restore(site, snap)
    assert r.targets_applied() == {"fencing": 0, "generation": 0, "plan": "", "moved": [], "doc": ""}
    assert r.apply(applied(1, 1)).changed


def test_replay_gives_the_same_state():
    site = make_site()
    e = Engine(site)
    cmds = [applied(3, 1, "a", ["fr-001"]), {"op": "move_agent", "t": 101.0, "agent_id": "fr-001", "group": "bi"},
            applied(5, 2, "b", [], t=102.0)]
    for c in cmds:
        assert e.apply(c).changed
    fresh = Engine(site)
    for c in cmds:
        fresh.apply(c)
    assert dump(fresh) == dump(e)
    assert fresh.home_groups()["fr-001"] == "fr" and fresh.current_groups()["fr-001"] == "bi"


# --- moves that wait for the agent (move_agent when_free) ----------------------------------


def three_groups():
    """The test site with no wrap-up in billing-fr-voice and a third group, English only."""
    d = site_dict()
    d["queues"][0]["wrap_up_s"] = 0
    d["agents"].append({"id": "en", "count": 1, "skills": {"billing": 5}, "languages": ["en"],
                        "capacity": {"voice": 1}})
    return parse_site(d, "<three groups>")


def busy_fr_001(e: Engine) -> None:
    """fr-001 connected to c1; c2 (billing fr voice) queued behind it."""
    e.apply({"op": "sign_in", "t": 1.0, "agent_id": "fr-001"})
    e.apply({"op": "set_state", "t": 1.0, "agent_id": "fr-001", "state": "ready"})
    for cid in ("c1", "c2"):
        e.apply({"op": "offer", "t": 2.0, "call_id": cid, "channel": "voice", "skill": "billing", "language": "fr",
                 "caller": "+1" + cid})
    asg = e.call("c1").assignment_id
    e.apply({"op": "accept", "t": 3.0, "agent_id": "fr-001", "assignment_id": asg})
    assert e.call("c2").state == "queued"


def test_busy_agent_move_waits_and_is_made_before_the_next_dispatch():
    e = Engine(three_groups())
    busy_fr_001(e)
    with pytest.raises(RoutingError) as ei:  # a plain move of a busy agent: refused as before
        e.apply({"op": "move_agent", "t": 4.0, "agent_id": "fr-001", "group": "en"})
    assert ei.value.reason == "AGENT_BUSY"
    out = e.apply({"op": "move_agent", "t": 4.0, "agent_id": "fr-001", "group": "en", "when_free": True})
    assert out.changed and out.effects == []
    assert e.pending_groups() == {"fr-001": "en"} and e.agent_group("fr-001") == "fr"
    again = e.apply({"op": "move_agent", "t": 4.5, "agent_id": "fr-001", "group": "en", "when_free": True})
    assert not again.changed
    # the call ends: the agent moves in that very command, so c2 (French) is not handed to it
    e.apply({"op": "complete", "t": 5.0, "call_id": "c1"})
    assert e.agent_group("fr-001") == "en" and e.pending_groups() == {}
    assert e.agent("fr-001").state == "ready" and e.agent("fr-001").call_ids == []
    assert e.call("c2").state == "queued"
    assert e.agent_queues("fr-001") == ["billing-en-voice"]


def test_pending_move_cancelled_by_a_move_to_where_it_is_and_kept_by_snapshots():
    site = three_groups()
    e = Engine(site)
    busy_fr_001(e)
    e.apply({"op": "move_agent", "t": 4.0, "agent_id": "fr-001", "group": "en", "when_free": True})
    r = Engine.restore(site, json.loads(dump(e)))
    assert r.pending_groups() == {"fr-001": "en"} and dump(r) == dump(e)
    plain = r.apply({"op": "move_agent", "t": 5.0, "agent_id": "fr-001", "group": "fr"})
    assert not plain.changed  # a plain move to where it is changes nothing, the pending move stays
    out = r.apply({"op": "move_agent", "t": 5.0, "agent_id": "fr-001", "group": "fr", "when_free": True})
    assert out.changed and r.pending_groups() == {}
    r.apply({"op": "complete", "t": 6.0, "call_id": "c1"})
    assert r.agent_group("fr-001") == "fr"
    assert r.call("c2").state == "assigned" and r.call("c2").agent_id == "fr-001"  # stayed: takes c2
    snap = e.snapshot()
    del snap["pending_groups"]  # an older snapshot: none pending
    assert Engine.restore(site, snap).pending_groups() == {}
