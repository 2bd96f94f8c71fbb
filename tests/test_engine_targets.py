"""The engine's record of the rebalancer's targets (``targets_applied``,
router.engine.staffing): fencing refused below the highest applied, idempotent repeats,
kept by snapshot/restore and by a journal replay."""

from __future__ import annotations

import json

import pytest

from node_fixtures import make_site
from router.engine import Engine
from router.model import RoutingError


def applied(fencing: int, generation: int, plan: str = "p", moved=(), t: float = 100.0) -> dict:
    return {"op": "targets_applied", "t": t, "fencing": fencing, "generation": generation, "plan": plan,
            "moved": list(moved)}


def dump(e: Engine) -> str:
    return json.dumps(e.snapshot(), sort_keys=True)


def test_new_engine_has_none_applied():
    e = Engine(make_site())
    assert e.targets_applied() == {"fencing": 0, "generation": 0, "plan": "", "moved": []}
    assert e.targets_fencing == 0
    assert e.snapshot()["targets"] == e.targets_applied()


def test_applied_stored_and_repeat_is_a_no_op():
    e = Engine(make_site())
    out = e.apply(applied(7, 3, "abc", ["fr-002", "fr-001", "fr-001"]))
    assert out.changed and out.effects == []
    assert out.result == {"fencing": 7, "generation": 3, "plan": "abc", "moved": ["fr-001", "fr-002"]}
    assert e.targets_applied() == out.result
    again = e.apply(applied(7, 3, "abc", ["fr-001", "fr-002"], t=200.0))
    assert not again.changed and again.result == out.result
    # a newer generation under the same leader, and a newer leader, are applied
    assert e.apply(applied(7, 4, "def", ["fr-001"])).changed
    assert e.apply(applied(9, 5, "ghi")).changed
    assert e.targets_applied() == {"fencing": 9, "generation": 5, "plan": "ghi", "moved": []}


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
    e.apply(applied(12, 2, "p2", ["bi-001"]))
    r = Engine.restore(site, json.loads(dump(e)))
    assert r.targets_applied() == {"fencing": 12, "generation": 2, "plan": "p2", "moved": ["bi-001"]}
    assert dump(r) == dump(e)
    with pytest.raises(RoutingError) as ei:
        r.apply(applied(11, 3))
    assert ei.value.reason == "STALE_FENCING"


def test_old_snapshot_without_targets_restores_with_none_applied():
    site = make_site()
    snap = Engine(site).snapshot()
    del snap["targets"]
    r = Engine.restore(site, snap)
    assert r.targets_applied() == {"fencing": 0, "generation": 0, "plan": "", "moved": []}
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
