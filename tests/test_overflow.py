"""Overflow policy (router.overflow): each rule, validation, and properties."""

from __future__ import annotations

import json
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import assume, given, settings, strategies as st

from router.overflow import (
    ContingencyState,
    LoadSnapshot,
    LocalQueue,
    OverflowPolicy,
    PartnerUsage,
    PeerLoad,
    PolicyError,
    QueueLoad,
    decide,
    hysteresis,
    parse_contingency,
    parse_policy,
    queue_ratio_d,
    split_bucket,
)

NOW = datetime(2026, 3, 4, 12, 0, tzinfo=ZoneInfo("UTC")).timestamp()  # a Wednesday


def qload(length=0, ew=0.0, staffed=10, skill="billing", language="en", channel="voice", **kw) -> QueueLoad:
    return QueueLoad(skill=skill, language=language, channel=channel, length=length,
                     expected_wait_s=ew, staffed=staffed, **kw)


def peer(site, ew=5.0, length=1, staffed=10, kind="inhouse", region="amer", age=0.2, accepting=True,
         queue="billing-en-voice", **qkw) -> PeerLoad:
    snap = LoadSnapshot(site=site, region=region, kind=kind, accepting=accepting,
                        queues={queue: qload(length, ew, staffed, **qkw)})
    return PeerLoad(snap, age)


def local(ew=60.0, length=30, staffed=10, value="standard", target=20.0, **kw) -> LocalQueue:
    return LocalQueue(site="lyon", region="emea", queue="billing-en-voice", skill="billing",
                      language="en", value=value, length=length, expected_wait_s=ew,
                      staffed=staffed, target_wait_s=target, **kw)


def policy(rules: dict | None = None, **kw) -> OverflowPolicy:
    return parse_policy({"queues": {"billing-en-voice": rules if rules is not None else {}}, **kw})


WAIT = {"wait_threshold": {"factor": 1.0}}


# --- rules -------------------------------------------------------------------------------


def test_no_rule_or_disabled_stays():
    peers = {"montreal": peer("montreal")}
    d = decide("c1", local(), OverflowPolicy(), peers, now=NOW)
    assert (d.target, d.rule) == (None, "no_rule")
    d = decide("c1", local(), policy({**WAIT, "enabled": False}), peers, now=NOW)
    assert (d.target, d.rule) == (None, "disabled")
    d = decide("c1", local(), policy({}), peers, now=NOW)
    assert (d.target, d.rule) == (None, "no_load_rule")


def test_wait_threshold_against_the_queue_target():
    peers = {"montreal": peer("montreal", ew=5)}
    stay = decide("c1", local(ew=20.0, target=20.0), policy(WAIT), peers, now=NOW)
    assert stay.target is None and stay.rule == "wait_threshold"
    assert stay.figures["wait_threshold_s"] == 20.0 and "within threshold" in stay.reason
    go = decide("c1", local(ew=20.5, target=20.0), policy(WAIT), peers, now=NOW)
    assert go.target == "montreal" and go.target_queue == "billing-en-voice"
    assert go.rule == "wait_threshold" and go.figures["local_expected_wait_s"] == 20.5
    # A region that tolerates longer waits (target 45 s) keeps the same call.
    assert decide("c1", local(ew=30, target=45), policy(WAIT), peers, now=NOW).target is None
    # factor 2: twice the target
    assert decide("c1", local(ew=30, target=20), policy({"wait_threshold": {"factor": 2}}), peers, now=NOW).target is None


def test_emergency_mode_scales_the_threshold():
    peers = {"montreal": peer("montreal", ew=1)}
    p = policy(WAIT)
    assert decide("c1", local(ew=15, target=20), p, peers, now=NOW, mode="normal").target is None
    d = decide("c1", local(ew=15, target=20), p, peers, now=NOW, mode="emergency")
    assert d.target == "montreal" and d.figures["wait_threshold_s"] == 10.0 and d.mode == "emergency"


def test_never_to_a_peer_with_a_longer_wait():
    d = decide("c1", local(ew=60), policy(WAIT), {"montreal": peer("montreal", ew=60)}, now=NOW)
    assert d.target is None and d.rule == "no_better_peer"


def test_margin_bsr_style():
    p = policy({**WAIT, "margin": {"seconds": 20}})
    assert decide("c1", local(ew=60), p, {"m": peer("m", ew=45)}, now=NOW).rule == "margin"
    d = decide("c1", local(ew=60), p, {"m": peer("m", ew=40)}, now=NOW)
    assert d.target == "m" and d.rule == "wait_threshold+margin" and d.figures["margin_bar_s"] == 40.0
    # margin alone (best-site routing, no threshold) and a relative margin
    p = policy({"margin": {"ratio": 0.5}})
    assert decide("c1", local(ew=10), p, {"m": peer("m", ew=6)}, now=NOW).target is None
    assert decide("c1", local(ew=10), p, {"m": peer("m", ew=5)}, now=NOW).target == "m"


def test_best_candidate_shortest_wait_then_inhouse():
    p = policy(WAIT, partners={"callpro": {"max_value": "standard"}})
    peers = {
        "montreal": peer("montreal", ew=10),
        "boston": peer("boston", ew=8),
        "callpro": peer("callpro", ew=8, kind="partner"),
    }
    d = decide("c1", local(ew=60), p, peers, now=NOW)
    assert d.target == "boston"
    assert [c.site for c in d.candidates] == ["boston", "callpro", "montreal"]
    assert all(c.eligible for c in d.candidates)


def test_queue_ratio_with_hysteresis():
    p = policy({"queue_ratio": {"r": 1.0, "on": 1.0, "off": 0.2}})

    def run(q1, q2, active=()):
        return decide("c", local(length=q1, staffed=10, ew=q1 * 6.0), p,
                      {"m": peer("m", length=q2, staffed=10, ew=q2 * 6.0)}, now=NOW, ratio_active=active)

    d = run(15, 0)  # D = 1.5 - 0 > on
    assert d.target == "m" and d.rule == "queue_ratio" and d.ratio_active == {"m"}
    assert d.candidates[0].ratio == 1.5
    d = run(8, 0, active={"m"})  # D = 0.8 in (off, on]: stays on
    assert d.target == "m" and d.ratio_active == {"m"}
    d = run(8, 0)  # same D, but it was off: stays off
    assert d.target is None and d.rule == "queue_ratio" and d.ratio_active == frozenset()
    d = run(2, 0, active={"m"})  # D = 0.2 <= off: switches off
    assert d.target is None and d.ratio_active == frozenset()


def test_split_is_deterministic_and_falls_through():
    p = policy({"split": {"percent": 30, "to": ["montreal"]}})
    peers = {"montreal": peer("montreal", ew=100), "boston": peer("boston", ew=1)}
    ids = [f"call-{i}" for i in range(2000)]
    first = [decide(i, local(ew=0), p, peers, now=NOW) for i in ids]
    again = [decide(i, local(ew=0), p, peers, now=NOW) for i in ids]
    assert [d.target for d in first] == [d.target for d in again]
    went = [d for d in first if d.target]
    assert all(d.target == "montreal" and d.rule == "split" for d in went)  # split ignores waits
    assert abs(len(went) / len(ids) - 0.30) < 0.04
    # Split target ineligible (stale): the call goes on to the load rules.
    p = policy({**WAIT, "split": {"percent": 100, "to": ["montreal"]}})
    peers = {"montreal": peer("montreal", age=60), "boston": peer("boston", ew=1)}
    d = decide("c1", local(ew=60), p, peers, now=NOW)
    assert d.target == "boston" and d.rule == "wait_threshold"
    d = decide("c1", local(ew=1), p, peers, now=NOW)
    assert d.target is None and "split target unavailable" in d.reason


def test_stale_missing_draining_or_mismatched_peers_are_never_candidates():
    p = policy(WAIT)
    peers = {
        "old": peer("old", age=3.5),
        "drain": peer("drain", accepting=False),
        "fr": peer("fr", language="fr", queue="billing-fr-voice"),
        "empty": peer("empty", staffed=0),
        "chat": peer("chat", channel="chat", queue="billing-chat"),
        "lyon": peer("lyon", ew=0),  # ourselves
    }
    d = decide("c1", local(ew=100), p, peers, now=NOW)
    assert d.target is None and d.rule == "no_candidate"
    why = {c.site: c.excluded for c in d.candidates}
    assert "lyon" not in why
    assert why["old"].startswith("stale load") and "draining" in why["drain"]
    assert why["fr"].startswith("no queue") and why["chat"].startswith("no queue")
    assert why["empty"] == "no staffed agent"
    # A language-less queue takes calls of any language.
    d = decide("c1", local(ew=100), p, {"m": peer("m", language="")}, now=NOW)
    assert d.target == "m"
    # Not a member any more: left out.
    d = decide("c1", local(ew=100), p, {"m": peer("m")}, now=NOW, members={"lyon"})
    assert d.target is None and d.candidates[0].excluded == "not a member"


def test_allowed_and_excluded_targets():
    peers = {"a": peer("a", ew=1), "b": peer("b", ew=2)}
    assert decide("c", local(), policy({**WAIT, "to": ["b"]}), peers, now=NOW).target == "b"
    assert decide("c", local(), policy({**WAIT, "exclude": ["a"]}), peers, now=NOW).target == "b"
    assert decide("c", local(), policy({**WAIT, "inhouse": False}), peers, now=NOW).target is None


def test_value_based_eligibility_for_partners():
    peers = {"callpro": peer("callpro", kind="partner", region="apac", ew=1)}
    p = policy(WAIT, partners={"callpro": {}})  # contract default: low-value only
    assert decide("c", local(value="low"), p, peers, now=NOW).target == "callpro"
    d = decide("c", local(value="standard"), p, peers, now=NOW)
    assert d.target is None and "standard-value work stays in-house" in d.candidates[0].excluded
    # Emergency mode lets standard-value work go to partners too, never high-value.
    assert decide("c", local(value="standard"), p, peers, now=NOW, mode="emergency").target == "callpro"
    assert decide("c", local(value="high"), p, peers, now=NOW, mode="emergency").target is None
    # The queue rules may override the queue's configured value.
    p2 = policy({**WAIT, "value": "low"}, partners={"callpro": {}})
    assert decide("c", local(value="standard"), p2, peers, now=NOW).target == "callpro"
    # No contract, or partner overflow switched off: nothing goes there.
    assert decide("c", local(value="low"), policy(WAIT), peers, now=NOW).candidates[0].excluded == "no partner contract"
    off = policy({**WAIT, "partners": False}, partners={"callpro": {}})
    assert decide("c", local(value="low"), off, peers, now=NOW).target is None
    modes = policy(WAIT, partners={"callpro": {}}, modes={"normal": {"partner_overflow": False}})
    d = decide("c", local(value="low"), modes, peers, now=NOW)
    assert d.target is None and d.candidates[0].excluded == "partner overflow off in normal mode"
    assert decide("c", local(value="low"), modes, peers, now=NOW, mode="surge").target == "callpro"


def test_partner_caps():
    peers = {"callpro": peer("callpro", kind="partner", ew=1)}
    p = policy(WAIT, partners={"callpro": {"max_concurrent": 5, "max_calls_per_s": 2}})
    ok = decide("c", local(value="low"), p, peers, now=NOW, partner_usage={"callpro": PartnerUsage(4, 1.0)})
    assert ok.target == "callpro"
    full = decide("c", local(value="low"), p, peers, now=NOW, partner_usage={"callpro": PartnerUsage(5, 0)})
    assert full.target is None and full.candidates[0].excluded.startswith("concurrency cap")
    fast = decide("c", local(value="low"), p, peers, now=NOW, partner_usage={"callpro": PartnerUsage(0, 2.0)})
    assert fast.target is None and fast.candidates[0].excluded.startswith("rate cap")


def _at(tz: str, *ymdhm: int) -> float:
    return datetime(*ymdhm, tzinfo=ZoneInfo(tz)).timestamp()


def test_partner_opening_hours_in_its_time_zone():
    hours = {"tz": "Asia/Manila", "open": "08:00", "close": "20:00", "days": [0, 1, 2, 3, 4]}
    p = policy(WAIT, partners={"callpro": {"hours": hours}})
    peers = {"callpro": peer("callpro", kind="partner", ew=1)}

    def target(now):
        return decide("c", local(value="low"), p, peers, now=now).target

    assert target(_at("Asia/Manila", 2026, 3, 4, 8, 0)) == "callpro"  # Wednesday 08:00 Manila
    assert target(_at("Asia/Manila", 2026, 3, 4, 7, 59)) is None
    assert target(_at("Asia/Manila", 2026, 3, 4, 20, 0)) is None
    assert target(_at("Asia/Manila", 2026, 3, 7, 12, 0)) is None  # Saturday
    # 12:00 UTC is 20:00 in Manila: closed, although it is midday in Lyon.
    assert target(_at("UTC", 2026, 3, 4, 12, 0)) is None
    night = parse_policy({"partners": {"x": {"hours": {"tz": "UTC", "open": "22:00", "close": "06:00", "days": [4]}}}})
    h = night.partners["x"].hours
    assert h.is_open(_at("UTC", 2026, 3, 6, 23, 0))  # Friday night
    assert h.is_open(_at("UTC", 2026, 3, 7, 5, 59))  # Saturday early: Friday's shift
    assert not h.is_open(_at("UTC", 2026, 3, 7, 23, 0))  # Saturday night
    assert not h.is_open(_at("UTC", 2026, 3, 6, 5, 0))  # Friday early: Thursday's shift


def test_decision_record_is_json():
    p = policy({**WAIT, "queue_ratio": {"on": 0.5, "off": 0.1}, "split": {"percent": 1, "to": ["m"]}})
    d = decide("c-42", local(), p, {"m": peer("m"), "old": peer("old", age=9)}, now=NOW)
    rec = json.loads(json.dumps(d.to_record()))
    assert rec["call_id"] == "c-42" and rec["target"] == "m" and rec["rule"] == "wait_threshold+queue_ratio"
    assert {c["site"] for c in rec["candidates"]} == {"m", "old"}
    assert rec["figures"]["ratio_on"] == 0.5 and "split_bucket" in rec["figures"]


# --- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "doc, fragment",
    [
        ({"queues": {"q": {"queue_ratio": {"on": 1, "off": 1}}}}, "queues.q.queue_ratio: Value error, off (1.0) must be below on"),
        ({"partners": {"p": {"max_value": "high"}}}, "partners.p.max_value"),
        ({"partners": {"p": {"hours": {"tz": "Mars/Olympus"}}}}, "unknown time zone"),
        ({"partners": {"p": {"hours": {"tz": "UTC", "open": "25:00"}}}}, "partners.p.hours.open"),
        ({"queues": {"q": {"split": {"percent": 0, "to": ["a"]}}}}, "queues.q.split.percent"),
        ({"queues": {"q": {"wait_treshold": {}}}}, "queues.q.wait_treshold: Extra inputs are not permitted"),
        ({"modes": {"panic": {}}}, "modes.panic"),
        ({"max_peer_age_s": -1}, "max_peer_age_s"),
        ("{not json", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        ([1, 2], "(top level)"),
    ],
)
def test_invalid_policies_are_refused_with_the_field(doc, fragment):
    with pytest.raises(PolicyError) as e:
        parse_policy(doc, "policy/overflow")
    assert fragment in str(e.value) and str(e.value).startswith("policy/overflow: invalid overflow policy")


def test_policy_round_trip_and_precedence():
    p = parse_policy({
        "default": {"wait_threshold": {"factor": 3}},
        "queues": {"sales": {"enabled": False}},
        "sites": {"lyon": {"sales": {"margin": {"seconds": 5}}}},
        "partners": {"callpro": {"max_concurrent": 3, "hours": {"tz": "Asia/Manila"}}},
        "modes": {"surge": {"backoffice_agents": True, "announcement": "busy"}},
    })
    assert parse_policy(p.to_json()) == p
    assert p.rules_for("lyon", "sales").margin.seconds == 5
    assert p.rules_for("montreal", "sales").enabled is False
    assert p.rules_for("montreal", "billing").wait_threshold.factor == 3
    assert OverflowPolicy().rules_for("lyon", "billing") is None
    assert set(p.modes) == {"normal", "surge", "emergency"}  # missing modes get defaults
    assert p.mode_settings("surge").announcement == "busy"
    assert p.mode_settings("emergency").backoffice_agents is True


def test_contingency_state():
    assert parse_contingency("surge").mode == "surge"
    st_ = parse_contingency('{"mode": "emergency", "announcement": "closed today"}')
    assert st_.settings(OverflowPolicy()).announcement == "closed today"
    assert ContingencyState().settings(OverflowPolicy()).backoffice_agents is False
    with pytest.raises(PolicyError, match="mode"):
        parse_contingency({"mode": "panic"})


# --- properties --------------------------------------------------------------------------

ages = st.one_of(st.floats(0, 10), st.just(float("inf")))
peer_st = st.builds(
    lambda kind, ew, length, staffed, age, accepting: (kind, ew, length, staffed, age, accepting),
    st.sampled_from(["inhouse", "partner"]), st.floats(0, 300), st.integers(0, 50),
    st.integers(0, 20), ages, st.booleans(),
)
rules_st = st.fixed_dictionaries({}, optional={
    "wait_threshold": st.builds(lambda f: {"factor": f}, st.floats(0.1, 3)),
    "margin": st.builds(lambda s, r: {"seconds": s, "ratio": r}, st.floats(0, 30), st.floats(0, 0.9)),
    "queue_ratio": st.builds(lambda off, gap: {"on": off + gap, "off": off}, st.floats(-2, 2), st.floats(0.01, 2)),
    "split": st.builds(lambda p: {"percent": p, "to": ["p0", "p1", "p2", "p3"]}, st.floats(1, 100)),
})


@st.composite
def scenario(draw):
    peers = {}
    for i, (kind, ew, length, staffed, age, accepting) in enumerate(draw(st.lists(peer_st, max_size=4))):
        peers[f"p{i}"] = peer(f"p{i}", ew=ew, length=length, staffed=staffed, kind=kind, age=age,
                              accepting=accepting)
    contracts = {s: {"max_value": draw(st.sampled_from(["low", "standard"]))} for s in peers}
    p = policy(draw(rules_st), partners=contracts, max_peer_age_s=draw(st.floats(0.5, 5)))
    lq = local(ew=draw(st.floats(0, 300)), length=draw(st.integers(0, 60)), staffed=draw(st.integers(0, 20)),
               value=draw(st.sampled_from(["low", "standard", "high"])))
    mode = draw(st.sampled_from(["normal", "surge", "emergency"]))
    active = draw(st.sets(st.sampled_from(sorted(peers) or ["none"])))
    return lq, p, peers, mode, active


@settings(max_examples=300, deadline=None)
@given(scenario(), st.text(min_size=1, max_size=12))
def test_property_never_to_a_stale_unknown_or_draining_peer(sc, call_id):
    lq, p, peers, mode, active = sc
    d = decide(call_id, lq, p, peers, now=NOW, mode=mode, ratio_active=active)
    if d.target is not None:
        assert d.target in peers
        pl = peers[d.target]
        assert pl.age_s <= p.max_peer_age_s and pl.snapshot.accepting
        q = pl.snapshot.queues["billing-en-voice"]
        assert q.staffed > 0
        if d.rule != "split":
            assert q.expected_wait_s < lq.expected_wait_s
    # ratio state only for eligible peers
    eligible = {c.site for c in d.candidates if c.eligible}
    assert d.ratio_active <= eligible
    assert decide(call_id, lq, p, peers, now=NOW, mode=mode, ratio_active=active) == d


@settings(max_examples=300, deadline=None)
@given(scenario(), st.text(min_size=1, max_size=12))
def test_property_high_value_never_goes_to_a_partner(sc, call_id):
    lq, p, peers, mode, active = sc
    lq = local(ew=lq.expected_wait_s, length=lq.length, staffed=lq.staffed, value="high")
    d = decide(call_id, lq, p, peers, now=NOW, mode=mode, ratio_active=active)
    if d.target is not None:
        assert peers[d.target].snapshot.kind == "inhouse"


@settings(max_examples=200, deadline=None)
@given(st.floats(-5, 5), st.floats(0.01, 5), st.lists(st.floats(0, 1, exclude_min=True, exclude_max=False), max_size=30),
       st.booleans())
def test_property_hysteresis_never_flaps_inside_the_band(off, gap, fractions, start):
    on = off + gap
    state = start
    for f in fractions:  # every D strictly inside (off, on]: the state never changes
        d = off + f * gap
        assume(off < d <= on)
        assert hysteresis(d, state, on, off) == start
    assert hysteresis(on + 1e-6, state, on, off) is True
    assert hysteresis(off, state, on, off) is False


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=40))
def test_property_queue_ratio_state_changes_only_on_crossing(seq):
    p = policy({"queue_ratio": {"r": 1.0, "on": 1.0, "off": 0.3}})
    active: frozenset[str] = frozenset()
    for q1, q2 in seq:
        d = decide("c", local(length=q1, staffed=10, ew=q1 * 6.0), p,
                   {"m": peer("m", length=q2, staffed=10, ew=q2 * 6.0)}, now=NOW, ratio_active=active)
        dval = queue_ratio_d(q1, 10, q2, 10, 1.0)
        now_on = "m" in d.ratio_active
        if now_on != ("m" in active):
            assert (now_on and dval > 1.0) or (not now_on and dval <= 0.3)
        active = d.ratio_active


@settings(max_examples=25, deadline=None)
@given(st.floats(2, 98), st.text(max_size=8))
def test_property_split_share_within_tolerance(percent, salt):
    n = 10_000
    hits = sum(split_bucket(f"call-{i}", salt) * 100 < percent for i in range(n))
    assert abs(hits / n - percent / 100) < 0.025
