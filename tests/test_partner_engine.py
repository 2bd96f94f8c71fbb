"""The engine's half of partner offers (router.engine.partner): assign after a begun
transfer to ``partner:<name>``, idempotent outcomes (DISPOSITION_CONFLICT), hand-back to
the call's old place, refusals that change nothing, and snapshot/restore in every phase."""

from __future__ import annotations

import json

import pytest

from router.engine import Engine
from router.model import RoutingError
from test_transfer_engine import offer, queue_order, site


def begun(e: Engine, cid: str, t: float, partner: str = "blueline") -> int:
    no = e.call(cid).transfer_count + 1
    e.apply({"op": "transfer_begin", "t": t, "call_id": cid, "transfer_no": no, "target": f"partner:{partner}"})
    return no


def assigned(e: Engine, cid: str, t: float, partner: str = "blueline") -> int:
    no = begun(e, cid, t, partner)
    e.apply({"op": "partner_assign", "t": t + 0.5, "call_id": cid, "transfer_no": no, "partner": partner,
             "agent": "bl-7"})
    return no


OUTCOME = {"answered_at": 1010.0, "talk_s": 180.0, "wrap_s": 20.0, "disposition": "PAID", "resolved": True,
           "csat": 5, "transferred_back": False}


def outcome(e: Engine, cid: str, t: float, partner: str = "blueline", **kw):
    return e.apply({"op": "partner_outcome", "t": t, "call_id": cid, "partner": partner, **{**OUTCOME, **kw}})


def busy_engine() -> Engine:
    e = Engine(site("origin"))
    for i in range(3):
        offer(e, f"c{i}", 1000.0 + i)
    return e


def test_assign_makes_the_partner_the_owner_and_is_idempotent():
    e = busy_engine()
    no = assigned(e, "c1", 1005.0)
    v = e.call("c1")
    assert (v.state, v.transfer_target, v.transfer_count) == ("transferred", "partner:blueline", no)
    assert e.partner_owned("blueline") == ["c1"] and e.partner_owned("other") == []
    assert "c1" not in queue_order(e)
    again = e.apply({"op": "partner_assign", "t": 1007.0, "call_id": "c1", "transfer_no": no,
                     "partner": "blueline", "agent": "bl-7"})
    assert not again.changed
    assert e.transfers_pending() == []


def test_assign_needs_a_begun_transfer_to_that_partner():
    e = busy_engine()
    with pytest.raises(RoutingError) as ei:  # queued, never begun
        e.apply({"op": "partner_assign", "t": 1005.0, "call_id": "c0", "transfer_no": 1, "partner": "blueline"})
    assert ei.value.reason == "WRONG_STATE"
    begun(e, "c0", 1005.0, "other")
    before = json.dumps(e.snapshot(), sort_keys=True)
    with pytest.raises(RoutingError):
        e.apply({"op": "partner_assign", "t": 1006.0, "call_id": "c0", "transfer_no": 1, "partner": "blueline"})
    with pytest.raises(RoutingError) as ei:
        e.apply({"op": "partner_assign", "t": 1006.0, "call_id": "c0", "transfer_no": 2, "partner": "other"})
    assert ei.value.reason == "TRANSFER_NO_MISMATCH"
    assert json.dumps(e.snapshot(), sort_keys=True) == before


def test_decline_puts_the_call_back_in_its_place():
    e = busy_engine()
    order = queue_order(e)
    no = begun(e, "c0", 1005.0)
    assert queue_order(e) == order[1:]
    e.apply({"op": "transfer_abort", "t": 1006.0, "call_id": "c0", "transfer_no": no, "reason": "partner declined"})
    assert queue_order(e) == order
    assert e.call("c0").offered_at == 1000.0 and e.call("c0").priority_class == "standard"


def test_outcome_is_idempotent_and_a_different_one_conflicts():
    e = busy_engine()
    assigned(e, "c1", 1005.0)
    first = outcome(e, "c1", 1300.0)
    assert first.changed
    v = e.call("c1")
    assert (v.answered_at, v.csat, v.resolved, v.wrap_up_code) == (1010.0, 5, True, "PAID")
    assert e.partner_owned("blueline") == []
    assert not outcome(e, "c1", 1301.0).changed
    before = json.dumps(e.snapshot(), sort_keys=True)
    with pytest.raises(RoutingError) as ei:
        outcome(e, "c1", 1302.0, csat=1)
    assert (ei.value.code, ei.value.reason) == ("ALREADY_EXISTS", "DISPOSITION_CONFLICT")
    with pytest.raises(RoutingError) as ei:
        e.apply({"op": "partner_handback", "t": 1303.0, "call_id": "c1", "partner": "blueline"})
    assert ei.value.reason == "WRONG_STATE"
    assert json.dumps(e.snapshot(), sort_keys=True) == before


@pytest.mark.parametrize("bad", [
    {"csat": 6}, {"csat": -1}, {"talk_s": -1.0}, {"talk_s": float("nan")}, {"wrap_s": float("inf")},
    {"answered_at": "soon"}, {"resolved": "yes"}, {"disposition": "x" * 65}, {"talk_s": 10 * 86400.0},
])
def test_bad_outcomes_are_refused_and_change_nothing(bad):
    e = busy_engine()
    assigned(e, "c1", 1005.0)
    before = json.dumps(e.snapshot(), sort_keys=True)
    with pytest.raises(RoutingError) as ei:
        outcome(e, "c1", 1300.0, **bad)
    assert ei.value.code == "INVALID_ARGUMENT"
    assert json.dumps(e.snapshot(), sort_keys=True) == before


def test_another_partner_or_an_unknown_call_is_not_found():
    e = busy_engine()
    assigned(e, "c1", 1005.0)
    for cid, partner in (("c1", "other"), ("c0", "blueline"), ("nope", "blueline")):
        with pytest.raises(RoutingError) as ei:
            outcome(e, cid, 1300.0, partner=partner)
        assert (ei.value.code, ei.value.reason) == ("NOT_FOUND", "CALL_NOT_FOUND")
        assert "+c" not in ei.value.message  # never the caller's number


def test_hand_back_returns_the_call_to_its_old_place_with_its_arrival_and_class():
    e = busy_engine()
    order = queue_order(e)
    no = assigned(e, "c1", 1005.0)
    r = e.apply({"op": "partner_handback", "t": 1100.0, "call_id": "c1", "partner": "blueline",
                 "reason": "needs French"})
    assert r.changed and r.result.state == "queued"
    assert queue_order(e) == order
    v = e.call("c1")
    assert (v.offered_at, v.priority_class, v.transfer_count) == (1001.0, "standard", no)
    assert not e.apply({"op": "partner_handback", "t": 1101.0, "call_id": "c1", "partner": "blueline"}).changed
    with pytest.raises(RoutingError) as ei:
        outcome(e, "c1", 1102.0)
    assert ei.value.reason == "WRONG_STATE"
    # it may go to the partner again, as a new attempt
    no2 = assigned(e, "c1", 1200.0)
    assert no2 == no + 1 and e.partner_owned("blueline") == ["c1"]


def test_abandon_while_the_partner_has_it_is_pending_and_a_hand_back_ends_it():
    e = busy_engine()
    assigned(e, "c1", 1005.0)
    e.apply({"op": "abandon", "t": 1050.0, "call_id": "c1", "reason": "hangup"})
    assert e.call("c1").abandon_pending == 1 and e.transfers_pending() == ["c1"]
    e.apply({"op": "partner_handback", "t": 1060.0, "call_id": "c1", "partner": "blueline"})
    assert e.call("c1").state == "abandoned"
    assert e.transfers_pending() == []


def test_partner_calls_are_kept_past_the_ended_call_retention():
    e = Engine(site("origin"))
    offer(e, "keep", 1.0)
    assigned(e, "keep", 2.0)
    for i in range(150):  # retention is 100 ended calls
        offer(e, f"x{i}", 10.0 + i)
        e.apply({"op": "abandon", "t": 10.5 + i, "call_id": f"x{i}"})
    assert e.call("keep").state == "transferred"
    assert outcome(e, "keep", 500.0).changed


@pytest.mark.parametrize("phase", ["begun", "assigned", "reported", "handed_back"])
def test_snapshot_restore_in_every_phase(phase):
    e = busy_engine()
    if phase == "begun":
        begun(e, "c1", 1005.0)
    else:
        assigned(e, "c1", 1005.0)
    if phase == "reported":
        outcome(e, "c1", 1300.0)
    if phase == "handed_back":
        e.apply({"op": "partner_handback", "t": 1100.0, "call_id": "c1", "partner": "blueline"})
    snap = json.loads(json.dumps(e.snapshot()))
    r = Engine.restore(site("origin"), snap)
    assert json.dumps(r.snapshot(), sort_keys=True) == json.dumps(e.snapshot(), sort_keys=True)
    assert r.partner_owned("blueline") == e.partner_owned("blueline")
    assert r.partner_record("c1") == e.partner_record("c1")


def test_abandon_after_the_partners_outcome_ends_nothing():
    e = busy_engine()
    assigned(e, "c1", 1005.0)
    outcome(e, "c1", 1300.0)
    before = json.dumps(e.snapshot(), sort_keys=True)
    with pytest.raises(RoutingError) as ei:
        e.apply({"op": "abandon", "t": 1301.0, "call_id": "c1", "reason": "hangup"})
    assert ei.value.reason == "CALL_ANSWERED"
    assigned(e, "c2", 1005.0)
    outcome(e, "c2", 1300.0, answered_at=0.0)
    before = json.dumps(e.snapshot(), sort_keys=True)
    assert not e.apply({"op": "abandon", "t": 1302.0, "call_id": "c2"}).changed
    assert json.dumps(e.snapshot(), sort_keys=True) == before
    assert e.transfers_pending() == []


def test_assign_keeps_the_offers_value_and_wait():
    e = busy_engine()
    no = begun(e, "c0", 1005.0)
    e.apply({"op": "partner_assign", "t": 1006.0, "call_id": "c0", "transfer_no": no, "partner": "blueline",
             "agent": "a", "value": "low", "wait_s": 6.0})
    rec = e.partner_record("c0")
    assert (rec["value"], rec["wait_s"]) == ("low", 6.0)
    no = begun(e, "c1", 1007.0)
    for bad in ({"value": "high"}, {"wait_s": -1.0}, {"wait_s": float("nan")}):
        with pytest.raises(RoutingError):
            e.apply({"op": "partner_assign", "t": 1008.0, "call_id": "c1", "transfer_no": no,
                     "partner": "blueline", **bad})
