"""The routing engine, rule by rule, on both queue cores ("py" and "c")."""

from __future__ import annotations

import copy
import json

import pytest

from router.config import load_sites, parse_site
from router.engine import Engine
from router.model import (
    AgentChanged,
    AgentView,
    AssignmentCancelled,
    AssignmentOffered,
    CallChanged,
    CallConnected,
    CallView,
    OfferResult,
    RoutingError,
)
from router.pqueue import PyIndexedPQ
from router.policy import AHT_ALPHA, UNBOUNDED_WAIT_S

try:
    from router.pqueue import IndexedPQ
except ImportError:  # pragma: no cover - the compiled core is not built
    IndexedPQ = None

FACTORIES = [pytest.param(PyIndexedPQ, id="py")]
if IndexedPQ is not None:
    FACTORIES.append(pytest.param(IndexedPQ, id="c"))

BASE = {
    "site": {"name": "test", "region": "emea"},
    "routing": {
        "head_start_s": {"standard": 0, "repeat": 30, "whitelist": 60, "vip": 120},
        "offer_timeout_s": 10,
        "repeat_window_h": 1,
        "screen_pop_history": 2,
        "ended_call_retention": 100,
        "service_level_window_s": 600,
    },
    "queues": [
        {"name": "billing-fr", "skill": "billing", "channel": "voice", "language": "fr",
         "wrap_up_s": 10, "aht_s": 100, "max_length": 3,
         "service_level": {"threshold_s": 20, "abandons": "count_against"}},
        {"name": "billing", "skill": "billing", "channel": "voice", "wrap_up_s": 10, "aht_s": 100},
        {"name": "support-chat", "skill": "support", "channel": "chat", "wrap_up_s": 0},
        {"name": "screening", "skill": "screening", "channel": "voice"},
    ],
    "lists": {"vip": ["+vip"], "whitelist": ["+white"], "blacklist": ["+black", "bad-cust"]},
    "agents": [
        {"id": "fr", "count": 2, "skills": {"billing": 5, "support": 3}, "languages": ["fr"],
         "capacity": {"voice": 1, "chat": 2}},
        {"id": "en", "skills": {"billing": 9}, "languages": ["en"], "capacity": {"voice": 1}},
        {"id": "scr", "skills": {"screening": 5}, "capacity": {"voice": 1}},
    ],
}  # fmt: skip


def site(**routing):
    doc = copy.deepcopy(BASE)
    doc["routing"].update(routing)
    return parse_site(doc)


@pytest.fixture(params=FACTORIES)
def qf(request):
    return request.param


@pytest.fixture
def eng(qf):
    return Engine(site(), queue_factory=qf)


def offer(e, cid, t, skill="billing", channel="voice", language="fr", **kw):
    cmd = {"op": "offer", "t": t, "call_id": cid, "channel": channel, "skill": skill,
           "language": language}  # fmt: skip
    cmd.update(kw)
    return e.apply(cmd)


def ready(e, aid, t):
    e.apply({"op": "sign_in", "t": t, "agent_id": aid})
    return e.apply({"op": "set_state", "t": t, "agent_id": aid, "state": "ready"})


def refused(e, cmd, code, reason):
    before = json.dumps(e.snapshot(), sort_keys=True)
    with pytest.raises(RoutingError) as ei:
        e.apply(cmd)
    assert (ei.value.code, ei.value.reason) == (code, reason), ei.value
    assert json.dumps(e.snapshot(), sort_keys=True) == before
    return ei.value


# -- offers -------------------------------------------------------------------------------


def test_offer_queues_with_position_and_wait(eng):
    out = offer(eng, "c1", 1)
    assert out.changed
    r = out.result
    assert isinstance(r, OfferResult)
    assert (r.call.state, r.call.queue, r.call.priority_class) == ("queued", "billing-fr", "standard")
    assert r.position == 1 and r.decision == "queued: billing-fr (standard)"
    # Nobody staffs the queue: no finite wait is announced (issue 9).
    assert r.expected_wait_s == UNBOUNDED_WAIT_S
    assert out.effects == [CallChanged("c1")]
    r2 = offer(eng, "c2", 2).result
    assert r2.position == 2 and r2.expected_wait_s == UNBOUNDED_WAIT_S
    assert eng.position("c2") == 2 and eng.expected_wait("c2") == UNBOUNDED_WAIT_S


def test_language_fallback_and_unknown_skill(eng):
    assert offer(eng, "c1", 1, language="de").result.call.queue == "billing"
    assert offer(eng, "c2", 1, language="").result.call.queue == "billing"
    refused(eng, {"op": "offer", "t": 2, "call_id": "x", "channel": "voice", "skill": "sales"},
            "NOT_FOUND", "UNKNOWN_SKILL")  # fmt: skip
    refused(eng, {"op": "offer", "t": 2, "call_id": "x", "channel": "email", "skill": "billing"},
            "NOT_FOUND", "UNKNOWN_SKILL")  # fmt: skip


def test_classes_from_lists_floor_and_priority_order(eng):
    offer(eng, "std", 0, language="en")
    assert offer(eng, "white", 1, language="en", caller="+white").result.call.priority_class == "whitelist"
    assert offer(eng, "vip", 2, language="en", customer_id="+vip").result.call.priority_class == "vip"
    r = offer(eng, "floor", 3, language="en", priority_class="whitelist").result
    assert r.call.priority_class == "whitelist"
    assert r.position == 3  # behind vip (key -118) and white (key -59), ahead of std
    assert [eng.position(c) for c in ("vip", "white", "floor", "std")] == [1, 2, 3, 4]


def test_offer_goes_to_free_agent_at_once(eng):
    ready(eng, "fr-001", 0)
    out = offer(eng, "c1", 5)
    r = out.result
    assert r.call.state == "assigned" and r.call.agent_id == "fr-001"
    assert r.position == 0 and r.expected_wait_s == 0.0
    assert r.decision == "assigned: fr-001 (billing-fr, standard)"
    assert AssignmentOffered("fr-001", "c1#1", "c1") in out.effects
    assert AgentChanged("fr-001") in out.effects
    assert eng.assignment("c1#1") == ("fr-001", "c1")
    assert eng.agent("fr-001").call_ids == ["c1"]
    assert eng.next_deadline() == 15.0


def test_offer_idempotent_and_conflict(eng):
    first = offer(eng, "c1", 1, caller="+1", context={"ivr_path": ["1", "2"]})
    again = offer(eng, "c1", 9, caller="+1", context={"ivr_path": ["1", "2"]})
    assert not again.changed and again.effects == []
    assert again.result.call == first.result.call and again.result.position == 1
    assert again.result.decision == first.result.decision
    e = refused(eng, {"op": "offer", "t": 9, "call_id": "c1", "channel": "voice",
                      "skill": "billing", "language": "fr", "caller": "+2"},
                "ALREADY_EXISTS", "CALL_ID_CONFLICT")  # fmt: skip
    assert e.metadata == {"call_id": "c1"}


def test_blacklist_rejected(eng):
    out = offer(eng, "b1", 1, caller="+black", priority_class="vip")
    c = out.result.call
    assert (c.state, c.reject_reason, c.queue, c.ended_at) == ("rejected", "blacklist", "", 1.0)
    assert out.result.decision == "rejected: blacklist" and out.result.position == 0
    assert offer(eng, "b2", 2, customer_id="bad-cust").result.call.state == "rejected"
    assert eng.counts_by_state()["rejected"] == 2


def test_blacklist_restricted_queue(qf):
    e = Engine(site(blacklist_action="restricted_queue", restricted_queue="screening"), queue_factory=qf)
    offer(e, "c1", 0)
    r = offer(e, "b1", 1, caller="+black").result
    assert (r.call.state, r.call.queue, r.call.priority_class) == ("queued", "screening", "blacklist")
    assert r.decision == "queued: screening (blacklist)"
    ready(e, "fr-001", 2)  # billing agent: not for the restricted queue
    assert e.call("b1").state == "queued"
    ready(e, "scr", 3)
    assert e.call("b1").agent_id == "scr"


def test_queue_full(eng):
    for i in range(3):
        offer(eng, f"c{i}", i)
    refused(eng, {"op": "offer", "t": 5, "call_id": "c9", "channel": "voice", "skill": "billing",
                  "language": "fr"}, "FAILED_PRECONDITION", "QUEUE_FULL")  # fmt: skip
    offer(eng, "c9", 5, language="en")  # another queue has room


# -- validation ---------------------------------------------------------------------------

GOOD = {"op": "offer", "t": 1, "call_id": "ok", "channel": "voice", "skill": "billing"}


@pytest.mark.parametrize(
    "patch, code, reason",
    [
        ({"call_id": ""}, "INVALID_ARGUMENT", "MISSING_FIELD"),
        ({"call_id": None}, "INVALID_ARGUMENT", "MISSING_FIELD"),
        ({"call_id": "a b"}, "INVALID_ARGUMENT", "INVALID_CALL_ID"),
        ({"call_id": "x" * 65}, "INVALID_ARGUMENT", "INVALID_CALL_ID"),
        ({"call_id": 12}, "INVALID_ARGUMENT", "INVALID_CALL_ID"),
        ({"channel": "fax"}, "INVALID_ARGUMENT", "INVALID_CHANNEL"),
        ({"channel": ""}, "INVALID_ARGUMENT", "MISSING_FIELD"),
        ({"channel": 1}, "INVALID_ARGUMENT", "INVALID_CHANNEL"),
        ({"skill": ""}, "INVALID_ARGUMENT", "MISSING_FIELD"),
        ({"skill": "s" * 65}, "INVALID_ARGUMENT", "FIELD_TOO_LONG"),
        ({"skill": ["billing"]}, "INVALID_ARGUMENT", "INVALID_FIELD"),
        ({"language": "fra"}, "INVALID_ARGUMENT", "FIELD_TOO_LONG"),
        ({"language": "FR"}, "INVALID_ARGUMENT", "INVALID_LANGUAGE"),
        ({"caller": "1" * 33}, "INVALID_ARGUMENT", "FIELD_TOO_LONG"),
        ({"customer_id": "1" * 65}, "INVALID_ARGUMENT", "FIELD_TOO_LONG"),
        ({"priority_class": "blacklist"}, "INVALID_ARGUMENT", "INVALID_PRIORITY_CLASS"),
        ({"priority_class": "gold"}, "INVALID_ARGUMENT", "INVALID_PRIORITY_CLASS"),
        ({"priority_class": 3}, "INVALID_ARGUMENT", "INVALID_PRIORITY_CLASS"),
        ({"context": []}, "INVALID_ARGUMENT", "INVALID_FIELD"),
        ({"context": {"foo": 1}}, "INVALID_ARGUMENT", "INVALID_FIELD"),
        ({"context": {"ivr_path": ["x"] * 33}}, "INVALID_ARGUMENT", "TOO_MANY_ENTRIES"),
        ({"context": {"ivr_path": ["x" * 65]}}, "INVALID_ARGUMENT", "FIELD_TOO_LONG"),
        ({"context": {"ivr_path": [1]}}, "INVALID_ARGUMENT", "INVALID_FIELD"),
        ({"context": {"bot_transcript": "é" * 8193}}, "INVALID_ARGUMENT", "FIELD_TOO_LONG"),
        ({"context": {"attributes": {str(i): "" for i in range(33)}}}, "INVALID_ARGUMENT",
         "TOO_MANY_ENTRIES"),
        ({"context": {"attributes": {"k": "v" * 257}}}, "INVALID_ARGUMENT", "FIELD_TOO_LONG"),
        ({"context": {"attributes": {"k" * 65: "v"}}}, "INVALID_ARGUMENT", "FIELD_TOO_LONG"),
        ({"context": {"attributes": {"k": 1}}}, "INVALID_ARGUMENT", "INVALID_FIELD"),
        ({"t": None}, "INVALID_ARGUMENT", "INVALID_COMMAND"),
        ({"t": "1"}, "INVALID_ARGUMENT", "INVALID_COMMAND"),
        ({"t": True}, "INVALID_ARGUMENT", "INVALID_COMMAND"),
        ({"t": float("nan")}, "INVALID_ARGUMENT", "INVALID_COMMAND"),
        ({"t": float("inf")}, "INVALID_ARGUMENT", "INVALID_COMMAND"),
        ({"t": -1}, "INVALID_ARGUMENT", "INVALID_COMMAND"),
        ({"t": 10**400}, "INVALID_ARGUMENT", "INVALID_COMMAND"),
        ({"op": "launch"}, "INVALID_ARGUMENT", "INVALID_COMMAND"),
        ({"op": None}, "INVALID_ARGUMENT", "INVALID_COMMAND"),
    ],
)
def test_offer_validation(eng, patch, code, reason):
    cmd = dict(GOOD, **patch)
    refused(eng, cmd, code, reason)


def test_context_limits_at_the_edge_are_accepted(eng):
    ctx = {
        "ivr_path": ["x" * 64] * 32,
        "bot_transcript": "é" * 8192,
        "attributes": {f"{i:064d}": "v" * 256 for i in range(32)},
    }
    assert offer(eng, "c1", 1, context=ctx).result.call.context == ctx


def test_non_dict_commands(eng):
    for cmd in (None, [], "offer", 3):
        with pytest.raises(RoutingError) as ei:
            eng.apply(cmd)
        assert ei.value.code == "INVALID_ARGUMENT"
    refused(eng, {"t": 1}, "INVALID_ARGUMENT", "INVALID_COMMAND")


# -- agents -------------------------------------------------------------------------------


def test_sign_in_out_errors(eng):
    out = eng.apply({"op": "sign_in", "t": 1, "agent_id": "fr-001"})
    assert isinstance(out.result, AgentView)
    assert (out.result.state, out.result.reason, out.result.state_since) == ("not_ready", "signed_in", 1.0)
    refused(eng, {"op": "sign_in", "t": 2, "agent_id": "fr-001"}, "ALREADY_EXISTS", "AGENT_ALREADY_SIGNED_IN")
    refused(eng, {"op": "sign_in", "t": 2, "agent_id": "nobody"}, "NOT_FOUND", "UNKNOWN_AGENT")
    refused(eng, {"op": "sign_in", "t": 2}, "INVALID_ARGUMENT", "MISSING_FIELD")
    refused(eng, {"op": "sign_in", "t": 2, "agent_id": "a" * 65}, "INVALID_ARGUMENT", "FIELD_TOO_LONG")
    refused(eng, {"op": "sign_out", "t": 2, "agent_id": "fr-002"}, "FAILED_PRECONDITION", "AGENT_NOT_SIGNED_IN")
    eng.apply({"op": "set_state", "t": 3, "agent_id": "fr-001", "state": "ready"})
    offer(eng, "c1", 4)
    refused(eng, {"op": "sign_out", "t": 5, "agent_id": "fr-001"}, "FAILED_PRECONDITION", "AGENT_BUSY")
    eng.apply({"op": "abandon", "t": 6, "call_id": "c1"})
    out = eng.apply({"op": "sign_out", "t": 7, "agent_id": "fr-001"})
    assert (out.result.state, out.result.state_since) == ("signed_out", 7.0)
    assert eng.agent("fr-002").state == "signed_out"
    assert eng.agents_by_state() == {"signed_out": 4, "not_ready": 0, "ready": 0, "wrap_up": 0}


@pytest.mark.parametrize(
    "patch, code, reason",
    [
        ({"state": "signed_out"}, "INVALID_ARGUMENT", "INVALID_STATE"),
        ({"state": ""}, "INVALID_ARGUMENT", "INVALID_STATE"),
        ({"state": None}, "INVALID_ARGUMENT", "INVALID_STATE"),
        ({"state": "not_ready"}, "INVALID_ARGUMENT", "MISSING_FIELD"),
        ({"state": "not_ready", "reason": "r" * 65}, "INVALID_ARGUMENT", "FIELD_TOO_LONG"),
        ({"state": "wrap_up"}, "INVALID_ARGUMENT", "INVALID_TIMEOUT"),
        ({"state": "wrap_up", "timeout_s": 0}, "INVALID_ARGUMENT", "INVALID_TIMEOUT"),
        ({"state": "wrap_up", "timeout_s": 3600.5}, "INVALID_ARGUMENT", "INVALID_TIMEOUT"),
        ({"state": "wrap_up", "timeout_s": "5"}, "INVALID_ARGUMENT", "INVALID_TIMEOUT"),
        ({"state": "wrap_up", "timeout_s": float("nan")}, "INVALID_ARGUMENT", "INVALID_TIMEOUT"),
        ({"state": "ready", "agent_id": "fr-002"}, "FAILED_PRECONDITION", "AGENT_NOT_SIGNED_IN"),
        ({"state": "ready", "agent_id": "zz"}, "NOT_FOUND", "UNKNOWN_AGENT"),
    ],
)
def test_set_state_validation(eng, patch, code, reason):
    eng.apply({"op": "sign_in", "t": 1, "agent_id": "fr-001"})
    refused(eng, dict({"op": "set_state", "t": 2, "agent_id": "fr-001"}, **patch), code, reason)


def test_set_state_same_state_is_a_no_op(eng):
    eng.apply({"op": "sign_in", "t": 1, "agent_id": "fr-001"})
    cmd = {"op": "set_state", "t": 2, "agent_id": "fr-001", "state": "not_ready", "reason": "break"}
    assert eng.apply(cmd).changed
    assert not eng.apply(dict(cmd, t=3)).changed
    out = eng.apply(dict(cmd, t=4, reason="lunch"))
    assert out.changed and out.result.reason == "lunch" and out.result.state_since == 4.0
    wrap = {"op": "set_state", "t": 5, "agent_id": "fr-001", "state": "wrap_up", "timeout_s": 30}
    assert eng.apply(wrap).result.wrap_up_until == 35.0
    assert not eng.apply(dict(wrap, t=6, timeout_s=100)).changed
    assert eng.next_deadline() == 35.0
    assert not eng.apply({"op": "tick", "t": 34.9}).changed
    out = eng.apply({"op": "tick", "t": 40})
    assert out.changed and out.result is None
    assert eng.agent("fr-001").state == "ready" and eng.agent("fr-001").state_since == 35.0
    assert eng.next_deadline() is None


def test_wrap_up_then_ready_takes_the_waiting_call(eng):
    eng.apply({"op": "sign_in", "t": 1, "agent_id": "fr-001"})
    eng.apply({"op": "set_state", "t": 1, "agent_id": "fr-001", "state": "wrap_up", "timeout_s": 5})
    offer(eng, "c1", 2)
    out = eng.apply({"op": "tick", "t": 6})
    assert AssignmentOffered("fr-001", "c1#1", "c1") in out.effects
    assert eng.call("c1").state == "assigned"


# -- the call lifecycle -------------------------------------------------------------------


def test_accept_complete_wrap_up(eng):
    ready(eng, "fr-001", 0)
    offer(eng, "c1", 1)
    out = eng.apply({"op": "accept", "t": 3, "agent_id": "fr-001", "assignment_id": "c1#1"})
    assert isinstance(out.result, CallView)
    assert (out.result.state, out.result.answered_at) == ("connected", 3.0)
    assert out.effects == [CallConnected("fr-001", "c1#1", "c1"), CallChanged("c1")]
    again = eng.apply({"op": "accept", "t": 4, "agent_id": "fr-001", "assignment_id": "c1#1"})
    assert not again.changed and again.result.state == "connected"
    assert eng.next_deadline() is None  # the offer timeout is gone
    refused(eng, {"op": "reject", "t": 4, "agent_id": "fr-001", "assignment_id": "c1#1"},
            "FAILED_PRECONDITION", "WRONG_STATE")  # fmt: skip
    out = eng.apply({"op": "complete", "t": 53, "call_id": "c1", "resolved": True, "csat": 4,
                     "wrap_up_code": "paid"})  # fmt: skip
    c = out.result
    assert (c.state, c.ended_at, c.resolved, c.csat, c.wrap_up_code) == ("completed", 53.0, True, 4, "paid")
    a = eng.agent("fr-001")
    assert (a.state, a.wrap_up_until, a.call_ids) == ("wrap_up", 63.0, [])
    again = eng.apply({"op": "complete", "t": 54, "call_id": "c1", "resolved": True, "csat": 4,
                       "wrap_up_code": "paid"})  # fmt: skip
    assert not again.changed and again.result.csat == 4
    # another disposition is refused; the first one stays
    with pytest.raises(RoutingError) as ei:
        eng.apply({"op": "complete", "t": 54, "call_id": "c1", "csat": 1})
    assert (ei.value.code, ei.value.reason) == ("FAILED_PRECONDITION", "DISPOSITION_CONFLICT")
    assert eng.call("c1").csat == 4
    q = eng.queue("billing-fr")
    assert (q.offered, q.answered, q.abandoned) == (1, 1, 0)
    # AHT: EWMA from 100 with one sample of talk 50 + wrap-up 10.
    assert q.expected_wait_s == 0.0 or q.length == 0
    assert eng._queues["billing-fr"].aht == pytest.approx(100 + AHT_ALPHA * (60 - 100))
    assert q.service_level == 1.0
    eng.apply({"op": "tick", "t": 63})
    assert eng.agent("fr-001").state == "ready"


def test_complete_rules_by_agent_state(eng):
    ready(eng, "fr-001", 0)
    offer(eng, "c1", 1, channel="chat", skill="support")
    offer(eng, "c2", 1, channel="chat", skill="support")
    offer(eng, "c3", 1)
    for a in ("c1#1", "c2#1", "c3#1"):
        eng.apply({"op": "accept", "t": 2, "agent_id": "fr-001", "assignment_id": a})
    # wrap_up_s 0 (support-chat): stays ready
    eng.apply({"op": "complete", "t": 5, "call_id": "c1"})
    assert eng.agent("fr-001").state == "ready"
    # voice, wrap_up_s 10: wrap-up while the other chat goes on
    eng.apply({"op": "complete", "t": 6, "call_id": "c3"})
    assert (eng.agent("fr-001").state, eng.agent("fr-001").wrap_up_until) == ("wrap_up", 16.0)
    eng.apply({"op": "set_state", "t": 7, "agent_id": "fr-001", "state": "not_ready", "reason": "x"})
    eng.apply({"op": "complete", "t": 8, "call_id": "c2"})
    assert (eng.agent("fr-001").state, eng.agent("fr-001").reason) == ("not_ready", "x")


def test_complete_and_abandon_wrong_state(eng):
    offer(eng, "c1", 1)
    refused(eng, {"op": "complete", "t": 2, "call_id": "c1"}, "FAILED_PRECONDITION", "WRONG_STATE")
    refused(eng, {"op": "complete", "t": 2, "call_id": "zz"}, "NOT_FOUND", "CALL_NOT_FOUND")
    refused(eng, {"op": "complete", "t": 2, "call_id": "c1", "csat": 6}, "INVALID_ARGUMENT", "INVALID_CSAT")
    refused(eng, {"op": "complete", "t": 2, "call_id": "c1", "csat": True}, "INVALID_ARGUMENT", "INVALID_CSAT")
    refused(eng, {"op": "complete", "t": 2, "call_id": "c1", "resolved": 1}, "INVALID_ARGUMENT", "INVALID_FIELD")
    refused(eng, {"op": "complete", "t": 2, "call_id": "c1", "wrap_up_code": "w" * 65},
            "INVALID_ARGUMENT", "FIELD_TOO_LONG")  # fmt: skip
    out = eng.apply({"op": "abandon", "t": 3, "call_id": "c1", "reason": "hangup"})
    assert (out.result.state, out.result.abandon_reason, out.result.ended_at) == ("abandoned", "hangup", 3.0)
    assert not eng.apply({"op": "abandon", "t": 4, "call_id": "c1"}).changed
    refused(eng, {"op": "complete", "t": 5, "call_id": "c1"}, "FAILED_PRECONDITION", "WRONG_STATE")
    refused(eng, {"op": "abandon", "t": 5, "call_id": "zz"}, "NOT_FOUND", "CALL_NOT_FOUND")
    ready(eng, "fr-001", 6)
    offer(eng, "c2", 7)
    eng.apply({"op": "accept", "t": 8, "agent_id": "fr-001", "assignment_id": "c2#1"})
    refused(eng, {"op": "abandon", "t": 9, "call_id": "c2"}, "FAILED_PRECONDITION", "WRONG_STATE")
    q = eng.queue("billing-fr")
    assert (q.offered, q.answered, q.abandoned) == (2, 1, 1)
    assert q.service_level == pytest.approx(0.5)  # count_against: 1 / (1 + 1)


def test_abandon_while_ringing_frees_the_agent(eng):
    ready(eng, "fr-001", 0)
    offer(eng, "c1", 1)
    offer(eng, "c2", 2)
    out = eng.apply({"op": "abandon", "t": 3, "call_id": "c1"})
    assert out.effects[0] == AssignmentCancelled("fr-001", "c1#1", "c1", "abandoned")
    assert AssignmentOffered("fr-001", "c2#1", "c2") in out.effects
    assert eng.agent("fr-001").state == "ready"
    assert eng.assignment("c1#1") is None


def test_reject_returns_call_to_its_place(eng):
    for i in range(3):
        offer(eng, f"c{i}", i)
    ready(eng, "fr-001", 5)
    assert eng.call("c0").agent_id == "fr-001"
    refused(eng, {"op": "reject", "t": 6, "agent_id": "fr-002", "assignment_id": "c0#1"},
            "FAILED_PRECONDITION", "AGENT_NOT_SIGNED_IN")  # fmt: skip
    ready(eng, "fr-002", 6)  # takes c1
    refused(eng, {"op": "reject", "t": 6, "agent_id": "fr-002", "assignment_id": "c0#1"},
            "NOT_FOUND", "UNKNOWN_ASSIGNMENT")  # fmt: skip
    refused(eng, {"op": "accept", "t": 6, "agent_id": "fr-002", "assignment_id": "c0#1"},
            "NOT_FOUND", "UNKNOWN_ASSIGNMENT")  # fmt: skip
    refused(eng, {"op": "accept", "t": 6, "agent_id": "fr-001"}, "INVALID_ARGUMENT", "MISSING_FIELD")
    out = eng.apply({"op": "reject", "t": 7, "agent_id": "fr-001", "assignment_id": "c0#1",
                     "reason": "busy"})  # fmt: skip
    assert out.effects[0] == AssignmentCancelled("fr-001", "c0#1", "c0", "rejected")
    assert (out.result.state, out.result.agent_id, out.result.assignment_id) == ("queued", "", "")
    assert eng.position("c0") == 1 and eng.position("c2") == 2
    a = eng.agent("fr-001")
    assert (a.state, a.reason, a.call_ids) == ("not_ready", "rejected", [])
    refused(eng, {"op": "reject", "t": 8, "agent_id": "fr-001", "assignment_id": "c0#1"},
            "NOT_FOUND", "UNKNOWN_ASSIGNMENT")  # fmt: skip
    ready_again = eng.apply({"op": "set_state", "t": 9, "agent_id": "fr-001", "state": "ready"})
    assert AssignmentOffered("fr-001", "c0#2", "c0") in ready_again.effects


def test_reject_hands_the_call_to_another_free_agent(eng):
    ready(eng, "fr-001", 0)
    ready(eng, "fr-002", 1)
    offer(eng, "c1", 2)  # longest idle: fr-001
    assert eng.call("c1").agent_id == "fr-001"
    out = eng.apply({"op": "reject", "t": 3, "agent_id": "fr-001", "assignment_id": "c1#1"})
    assert AssignmentOffered("fr-002", "c1#2", "c1") in out.effects
    assert out.result.state == "assigned"


def test_offer_timeout_by_tick(eng):
    ready(eng, "fr-001", 0)
    offer(eng, "c1", 1)
    assert eng.next_deadline() == 11.0
    assert not eng.apply({"op": "tick", "t": 10.5}).changed
    out = eng.apply({"op": "tick", "t": 12})
    assert AssignmentCancelled("fr-001", "c1#1", "c1", "no_answer") in out.effects
    a = eng.agent("fr-001")
    assert (a.state, a.reason, a.state_since) == ("not_ready", "no_answer", 11.0)
    assert eng.call("c1").state == "queued"
    assert eng.next_deadline() is None


def test_accept_before_the_tick_wins(eng):
    ready(eng, "fr-001", 0)
    offer(eng, "c1", 1)
    eng.apply({"op": "accept", "t": 30, "agent_id": "fr-001", "assignment_id": "c1#1"})
    assert not eng.apply({"op": "tick", "t": 31}).changed
    assert eng.call("c1").state == "connected"


def test_disconnect(eng):
    ready(eng, "fr-001", 0)
    offer(eng, "v1", 1)
    offer(eng, "ch1", 1, channel="chat", skill="support")
    offer(eng, "ch2", 1, channel="chat", skill="support")
    eng.apply({"op": "accept", "t": 2, "agent_id": "fr-001", "assignment_id": "v1#1"})
    out = eng.apply({"op": "disconnect", "t": 3, "agent_id": "fr-001"})
    assert isinstance(out.result, AgentView)
    cancelled = [e for e in out.effects if isinstance(e, AssignmentCancelled)]
    assert [(e.call_id, e.reason) for e in cancelled] == [("ch1", "disconnected"), ("ch2", "disconnected")]
    assert eng.call("v1").state == "connected"
    assert [eng.call(c).state for c in ("ch1", "ch2")] == ["queued", "queued"]
    assert (out.result.state, out.result.reason, out.result.call_ids) == ("not_ready", "disconnected", ["v1"])
    assert not eng.apply({"op": "disconnect", "t": 4, "agent_id": "fr-001"}).changed
    refused(eng, {"op": "disconnect", "t": 4, "agent_id": "fr-002"}, "FAILED_PRECONDITION", "AGENT_NOT_SIGNED_IN")


# -- fairness and selection ---------------------------------------------------------------


def test_fairness_across_all_skills(eng):
    eng.apply({"op": "sign_in", "t": 0, "agent_id": "fr-001"})
    offer(eng, "old", 0, language="")  # billing (no language), key 0
    offer(eng, "fr", 10)  # billing-fr, key 10
    offer(eng, "vip", 50, caller="+vip")  # billing-fr, key -70
    offer(eng, "chat", 0, channel="chat", skill="support")
    out = eng.apply({"op": "set_state", "t": 60, "agent_id": "fr-001", "state": "ready"})
    got = [e.call_id for e in out.effects if isinstance(e, AssignmentOffered)]
    assert got == ["vip", "chat"]  # best voice call, then the chat (own capacity)
    eng.apply({"op": "accept", "t": 61, "agent_id": "fr-001", "assignment_id": "vip#1"})
    eng.apply({"op": "accept", "t": 61, "agent_id": "fr-001", "assignment_id": "chat#1"})
    eng.apply({"op": "complete", "t": 62, "call_id": "vip"})
    eng.apply({"op": "tick", "t": 72})
    assert eng.call("old").agent_id == "fr-001"  # key 0 before key 10


def test_calls_returned_to_several_queues_go_best_first(qf):
    doc = copy.deepcopy(BASE)
    doc["agents"] = [
        {"id": "wide", "skills": {"billing": 5}, "languages": ["fr"], "capacity": {"voice": 2}},
        {"id": "narrow", "skills": {"billing": 5}, "languages": ["fr"], "capacity": {"voice": 1}},
    ]
    e = Engine(parse_site(doc), queue_factory=qf)
    ready(e, "wide", 0)
    offer(e, "plain", 1, language="")  # queue billing, key 1
    offer(e, "vip", 2, caller="+vip")  # queue billing-fr, key -118
    assert e.agent("wide").call_ids == ["plain", "vip"]
    ready(e, "narrow", 3)
    out = e.apply({"op": "disconnect", "t": 4, "agent_id": "wide"})
    got = [x.call_id for x in out.effects if isinstance(x, AssignmentOffered)]
    assert got == ["vip"] and e.call("plain").state == "queued"


def test_longest_idle_then_proficiency(eng):
    ready(eng, "fr-002", 0)
    ready(eng, "fr-001", 1)
    ready(eng, "en", 0)
    assert offer(eng, "c1", 2).result.call.agent_id == "fr-002"  # idle since 0
    assert offer(eng, "c2", 3, language="").result.call.agent_id == "en"  # tie at 0: prof 9
    assert offer(eng, "c3", 4, language="").result.call.agent_id == "fr-001"


def test_most_proficient(qf):
    e = Engine(site(agent_selection="most_proficient"), queue_factory=qf)
    ready(e, "en", 5)
    ready(e, "fr-001", 0)
    assert offer(e, "c1", 6, language="").result.call.agent_id == "en"
    assert offer(e, "c2", 7, language="").result.call.agent_id == "fr-001"


def test_multichannel_capacity(eng):
    for i in range(3):
        offer(eng, f"ch{i}", i, channel="chat", skill="support")
    offer(eng, "v", 0)
    out = ready(eng, "fr-001", 5)
    got = sorted(e.call_id for e in out.effects if isinstance(e, AssignmentOffered))
    assert got == ["ch0", "ch1", "v"]
    assert eng.call("ch2").state == "queued"
    q = eng.queue("support-chat")
    assert (q.agents_ready, q.agents_staffed, q.length) == (0, 1, 1)
    assert q.expected_wait_s == pytest.approx(2 * 180.0 / 2)


# -- repeat callers, screen pop, retention ------------------------------------------------


def test_repeat_caller_and_screen_pop(eng):
    offer(eng, "a1", 0, caller="+1", language="en")
    eng.apply({"op": "abandon", "t": 10, "call_id": "a1"})
    assert offer(eng, "a2", 100, caller="+1", language="en").result.call.priority_class == "repeat"
    assert offer(eng, "a3", 200, caller="+1", language="en", priority_class="whitelist").result.call.priority_class == "whitelist"
    assert offer(eng, "b1", 300, caller="+2", language="en").result.call.priority_class == "standard"
    pops = eng.screen_pop("a3")
    assert [(p.call_id, p.outcome) for p in pops] == [("a2", "queued"), ("a1", "abandoned")]
    assert eng.screen_pop("a1") == []
    # screen_pop_history is 2: the oldest falls off
    offer(eng, "a4", 400, caller="+1", language="en")
    assert [p.call_id for p in eng.screen_pop("a4")] == ["a3", "a2"]
    # repeat window is one hour
    assert offer(eng, "a5", 400 + 3601, caller="+1", language="en").result.call.priority_class == "standard"
    assert eng.screen_pop("a5") == []
    assert eng.snapshot()["memory"] == {"+1": [["a5", 4001.0, "billing", "", 0, 6]]}


def test_retention_drops_oldest_ended(eng):
    for i in range(105):
        offer(eng, f"c{i}", i, language="en")
        eng.apply({"op": "abandon", "t": i, "call_id": f"c{i}"})
    offer(eng, "live", 200)
    ids = [c.call_id for c in eng.calls()]
    assert len(ids) == 101 and ids[0] == "c5" and ids[-1] == "live"
    with pytest.raises(RoutingError):
        eng.call("c0")
    assert eng.counts_by_state()["abandoned"] == 100
    assert [c.call_id for c in eng.calls("queued")] == ["live"]
    # a dropped id may be offered again: it is a new call
    assert offer(eng, "c0", 300).changed


# -- reads --------------------------------------------------------------------------------


def test_reads(eng):
    with pytest.raises(RoutingError) as ei:
        eng.call("nope")
    assert ei.value.reason == "CALL_NOT_FOUND"
    with pytest.raises(RoutingError) as ei:
        eng.agent("nope")
    assert ei.value.reason == "UNKNOWN_AGENT"
    with pytest.raises(RoutingError) as ei:
        eng.estimate("sales", "voice", "")
    assert ei.value.reason == "UNKNOWN_SKILL"
    with pytest.raises(RoutingError) as ei:
        eng.estimate("billing", "fax", "")
    assert ei.value.reason == "INVALID_CHANNEL"
    with pytest.raises(RoutingError):
        eng.calls("lost")
    assert eng.estimate("billing", "voice", "de").name == "billing"
    offer(eng, "c1", 100)
    offer(eng, "c2", 130)
    q = eng.estimate("billing", "voice", "fr", now=150)
    assert (q.name, q.length, q.oldest_wait_s, q.service_level) == ("billing-fr", 2, 50.0, -1.0)
    assert q.expected_wait_s == UNBOUNDED_WAIT_S  # nobody staffs it (issue 9)
    assert [x.name for x in eng.queues()] == ["billing-fr", "billing", "support-chat", "screening"]
    assert [a.agent_id for a in eng.agents()] == ["fr-001", "fr-002", "en", "scr"]
    assert eng.counts_by_state()["queued"] == 2
    assert eng.position("c1") == 1 and eng.assignment("c1#1") is None
    assert eng.now == 130.0


def test_time_never_goes_backwards(eng):
    offer(eng, "c1", 100)
    r = offer(eng, "c2", 50).result
    assert r.call.offered_at == 100.0 and r.position == 2


def test_service_level_window(eng):
    offer(eng, "c1", 0)
    eng.apply({"op": "abandon", "t": 30, "call_id": "c1"})  # 30 s > 20 s: against
    assert eng.queue("billing-fr").service_level == 0.0
    assert eng.queue("billing-fr", now=700).service_level == -1.0  # left the 600 s window
    offer(eng, "c2", 1000)
    eng.apply({"op": "abandon", "t": 1005, "call_id": "c2"})
    assert eng.snapshot()["queues"]["billing-fr"]["window"] == [[1005.0, False, 5.0]]


# -- snapshots ----------------------------------------------------------------------------


def test_snapshot_restore_continues_identically(qf):
    s = site()
    a = Engine(s, queue_factory=qf)
    cmds = [
        {"op": "sign_in", "t": 0, "agent_id": "fr-001"},
        {"op": "offer", "t": 1, "call_id": "c1", "channel": "voice", "skill": "billing",
         "language": "fr", "caller": "+1", "context": {"attributes": {"k": "v"}}},
        {"op": "offer", "t": 2, "call_id": "c2", "channel": "chat", "skill": "support"},
        {"op": "set_state", "t": 3, "agent_id": "fr-001", "state": "ready"},
        {"op": "accept", "t": 4, "agent_id": "fr-001", "assignment_id": "c1#1"},
        {"op": "offer", "t": 5, "call_id": "c3", "channel": "voice", "skill": "billing",
         "language": "fr", "caller": "+vip"},
        {"op": "complete", "t": 6, "call_id": "c1"},
        {"op": "tick", "t": 20},
        {"op": "tick", "t": 30},
        {"op": "offer", "t": 31, "call_id": "c4", "channel": "voice", "skill": "billing",
         "language": "fr", "caller": "+1"},
    ]  # fmt: skip
    for k in range(len(cmds) + 1):
        a = Engine(s, queue_factory=qf)
        for c in cmds[:k]:
            a.apply(c)
        snap = json.loads(json.dumps(a.snapshot()))
        b = Engine.restore(s, snap, queue_factory=qf)
        assert b.snapshot() == snap
        for c in cmds[k:]:
            oa, ob = a.apply(c), b.apply(c)
            assert (oa.changed, oa.effects) == (ob.changed, ob.effects)
        assert json.loads(json.dumps(a.snapshot())) == json.loads(json.dumps(b.snapshot()))
        assert b.next_deadline() == a.next_deadline()


def test_restore_refuses_other_site(eng):
    other = parse_site(dict(copy.deepcopy(BASE), site={"name": "other", "region": "x"}))
    with pytest.raises(ValueError):
        Engine.restore(other, eng.snapshot())


def test_example_sites_load(qf):
    for s in load_sites("sites"):
        e = Engine(s, queue_factory=qf)
        assert len(e.agents()) == len(s.agent_profiles())
        Engine.restore(s, json.loads(json.dumps(e.snapshot())), queue_factory=qf)


def test_default_queue_factory_is_the_compiled_core():
    if IndexedPQ is None:
        pytest.skip("compiled core not built")
    e = Engine(site())
    assert isinstance(e._queues["billing"].pq, IndexedPQ)
