"""Node views -> history rows (pure), and those rows through the writer into a store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.config import load_site
from router.history import rows
from router.history.encode import TableEncoder
from router.history.schema import TABLES
from router.model import AgentView, CallView, OfferResult

SITES = Path(__file__).resolve().parent.parent / "sites"
LYON = load_site(SITES / "lyon.yaml")
CALLPRO = load_site(SITES / "callpro.yaml")
T = 1_790_000_000.25


def call(**kw) -> CallView:
    base = dict(call_id="c1", state="completed", channel="voice", skill="billing", language="fr",
                queue="billing-fr-voice", site="lyon", priority_class="standard",
                caller="+33611111111", customer_id="cust-9", offered_at=T, queued_at=T + 0.5,
                answered_at=T + 12.75, ended_at=T + 200.5, agent_id="lyon-fr-001", csat=4,
                resolved=True, wrap_up_code="paid")
    base.update(kw)
    return CallView(**base)


def test_completed_call():
    r = rows.interaction_row(call(), LYON)
    assert set(r) == {c.name for c in TABLES["interactions"]}
    assert r["wait_s"] == pytest.approx(12.25) and r["talk_s"] == pytest.approx(187.75)
    assert r["wrap_s"] == 15.0 and r["handle_s"] == pytest.approx(202.75)  # lyon billing wrap-up
    assert (r["offered_at"], r["answered_at"], r["ended_at"]) == (1_790_000_000, 1_790_000_013, 1_790_000_200)
    assert r["partner"] == "" and r["region"] == "emea"
    assert (r["origin_site"], r["origin_region"]) == ("lyon", "emea")
    assert r["outcome"] == "completed" and r["resolved"] == 1 and r["csat"] == 4
    assert r["ver"] == round((T + 200.5) * 1000)
    data, rejected = TableEncoder("interactions").encode([r])
    assert not rejected


def test_abandoned_and_rejected_calls():
    a = rows.interaction_row(call(state="abandoned", answered_at=0.0, ended_at=T + 40.5, agent_id="",
                                  csat=0, resolved=False, abandon_reason="caller_hung_up"), LYON)
    assert a["wait_s"] == pytest.approx(40.0) and a["handle_s"] == 0.0 and a["answered_at"] == 0
    assert a["reason"] == "caller_hung_up" and a["agent_id"] == ""
    j = rows.interaction_row(call(state="rejected", queue="", queued_at=0.0, answered_at=0.0,
                                  ended_at=T, reject_reason="blacklist"), LYON)
    assert j["wait_s"] == 0.0 and j["queued_at"] == 0 and j["reason"] == "blacklist"
    with pytest.raises(ValueError):
        rows.interaction_row(call(state="queued"), LYON)


def test_partner_rows_carry_the_origin():
    c = call(site="callpro", queue="billing-en-voice", language="en",
             context={"attributes": {"origin_site": "montreal", "origin_region": "amer"}})
    r = rows.interaction_row(c, CALLPRO, transferred_at=T + 2)
    assert r["partner"] == "callpro" and r["region"] == "apac"
    assert (r["origin_site"], r["origin_region"]) == ("montreal", "amer")
    assert r["transferred_at"] == 1_790_000_002
    unknown = rows.interaction_row(call(site="callpro", queue="billing-en-voice"), CALLPRO)
    assert unknown["origin_region"] == ""  # a partner's own region is not its customers'
    moved = call(site="callpro", queue="billing-en-voice")
    if hasattr(moved, "transfer_origin"):  # the engine's transfer fields
        moved.transfer_origin = "lyon"
        r = rows.interaction_row(moved, CALLPRO, regions={"lyon": "emea", "montreal": "amer"})
        assert (r["origin_site"], r["origin_region"]) == ("lyon", "emea")
        with pytest.raises(ValueError):
            rows.interaction_row(call(state="transferred"), LYON)


def test_decision_from_offer():
    res = OfferResult(call=call(state="queued", answered_at=0.0, ended_at=0.0), position=3,
                      expected_wait_s=42.0, decision="queued: billing-fr-voice (vip)")
    d = rows.decision_from_offer(LYON, res, seq=0, at=T)
    assert set(d) == {c.name for c in TABLES["routing_decisions"]}
    assert (d["rule"], d["target_kind"], d["target"]) == ("queue_here", "queue", "lyon/billing-fr-voice")
    assert d["candidates"] == ["lyon/billing-fr-voice"] and d["candidate_waits_s"] == [42.0]
    assert json.loads(d["details"]) == {"position": 3, "priority_class": "standard"}
    d2 = rows.routing_decision_row(LYON, call_id="c1", seq=1, at=T, rule="overflow_expected_wait",
                                   target_kind="site", target="montreal",
                                   candidates={"lyon": 95.0, "montreal": 20.0, "callpro": float("inf")},
                                   expected_wait_s=20.0)
    assert d2["candidate_waits_s"] == [95.0, 20.0, -1.0]
    assert not TableEncoder("routing_decisions").encode([d, d2])[1]


def agent(state="ready", calls=(), reason="", since=T):
    return AgentView(agent_id="lyon-fr-001", state=state, reason=reason, skills={"billing": 8},
                     languages=["fr"], capacity={"voice": 1}, call_ids=list(calls), state_since=since)


def test_agent_state_tracker():
    tr = rows.AgentStateTracker(LYON)
    r1 = tr.observe(agent("not_ready", reason="signed_in"), seq=1, at=T)
    assert (r1["state"], r1["prev_state"], r1["prev_at"]) == ("not_ready", "", 0)
    assert tr.observe(agent("not_ready", reason="signed_in"), seq=2, at=T + 1) is None  # no change
    r2 = tr.observe(agent("ready"), seq=3, at=T + 10)
    r3 = tr.observe(agent("ready", calls=["c1"]), seq=4, at=T + 20)  # a call: busy
    r4 = tr.observe(agent("wrap_up"), seq=5, at=T + 200)
    assert [r["state"] for r in (r2, r3, r4)] == ["ready", "busy", "wrap_up"]
    assert (r4["prev_state"], r4["prev_at"], r4["at"]) == ("busy", int(T + 20), int(T + 200))
    cps = tr.checkpoint(seq=6, at=T + 300)
    assert len(cps) == 1 and (cps[0]["state"], cps[0]["prev_state"], cps[0]["prev_at"]) == (
        "wrap_up", "wrap_up", int(T + 200))
    assert not TableEncoder("agent_state_changes").encode([r1, r2, r3, r4, *cps])[1]
    with pytest.raises(ValueError):
        rows.agent_state_row(LYON, agent_id="x", seq=1, at=T, state="dancing")


def test_rows_round_trip_through_the_writer(history_store, tmp_path):
    from router.history.writer import HistoryWriter

    tr = rows.AgentStateTracker(LYON)
    with HistoryWriter(history_store, tmp_path / "spool") as w:
        w.submit("interactions", rows.interaction_row(call(), LYON))
        w.submit("interactions", rows.interaction_row(call(), LYON))  # a replay
        w.submit("routing_decisions", rows.decision_from_offer(
            LYON, OfferResult(call(), 0, 0.0, "assigned: lyon-fr-001"), seq=0, at=T))
        for i, v in enumerate([agent("not_ready"), agent("ready"), agent("ready", ["c1"]), agent("wrap_up")]):
            r = tr.observe(v, seq=i, at=T + 10 * i)
            w.submit("agent_state_changes", r)
        assert w.flush(30)
        assert w.stats().rejected_rows == 0
    assert history_store.query(
        "SELECT interaction_id, wait_s, handle_s FROM {db}.interactions FINAL") == [("c1", 12.25, 202.75)]
    assert history_store.query(
        "SELECT rule, target FROM {db}.routing_decisions FINAL") == [("assign", "lyon-fr-001")]
    assert [r[0] for r in history_store.query(
        "SELECT state FROM {db}.agent_state_changes FINAL ORDER BY seq")] == ["not_ready", "ready", "busy", "wrap_up"]
