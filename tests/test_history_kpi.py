"""KPI queries against an independent plain-Python computation over the same rows, on
both backends (clickhouse-server 18.16 and chdb), with replayed and corrected rows."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import pytest

from router.config import ServiceLevelDefinition
from router.history import synth
from router.history.kpi import KpiQuery, kpis, sl_definitions
from router.history.schema import TABLES

START = 1_790_000_000
SLS = {
    ("lyon", "billing-fr-voice"): ServiceLevelDefinition(threshold_s=20, abandons="short_excluded"),
    ("lyon", "support-chat"): ServiceLevelDefinition(threshold_s=60, abandons="count_against"),
    ("montreal", "billing-en-voice"): ServiceLevelDefinition(threshold_s=30, abandons="exclude"),
    ("callpro", "billing-en-voice"): ServiceLevelDefinition(threshold_s=45, abandons="count_against"),
}
DEFAULT_SL = ServiceLevelDefinition(threshold_s=25, abandons="short_excluded")


def insert(store, table, rows):
    names = [c.name for c in TABLES[table]]
    data = [[r[n] for r in rows] for n in names]
    store.insert(table, names, data)


# --- the reference: plain Python, written from the definitions, not from kpi.py ----------


def dedup(rows):
    best = {}
    for r in rows:
        cur = best.get(r["interaction_id"])
        if cur is None or r["ver"] > cur["ver"]:
            best[r["interaction_id"]] = r
    return list(best.values())


def reference(calls, states, q: KpiQuery):
    calls = dedup(calls)
    states = list({(s["site"], s["agent_id"], s["at"], s["seq"]): s for s in states}.values())

    def bucket(t):
        return (t // q.interval_s) * q.interval_s if q.interval_s else None

    def key(r, t):
        return tuple(r[d] for d in q.by) + (bucket(t),)

    out = defaultdict(lambda: defaultdict(float))
    for r in calls:
        if not q.start <= r["offered_at"] < q.end:
            continue
        k = out[key(r, r["offered_at"])]
        sl = q.service_levels.get((r["site"], r["queue"]), q.default_sl)
        answered = r["answered_at"] > 0
        abandoned = r["outcome"] == "abandoned"
        k["offered"] += 1
        k["answered"] += answered
        k["abandoned"] += abandoned
        k["rejected"] += r["outcome"] == "rejected"
        if answered:
            k["sl_num"] += r["wait_s"] <= sl.threshold_s
            k["sl_den"] += 1
            k["wait_sum_s"] += r["wait_s"]
        if abandoned:
            if sl.abandons == "count_against" or (sl.abandons == "short_excluded" and r["wait_s"] > sl.threshold_s):
                k["sl_den"] += 1
        if r["outcome"] == "completed" and answered:
            k["handled"] += 1
            k["handle_sum_s"] += r["handle_s"]
        if r["csat"] > 0:
            k["csat_sum"] += r["csat"]
            k["csat_n"] += 1
    # FCR
    window = q.fcr_days * 86400
    by_cust = defaultdict(list)
    for r in calls:
        if r["outcome"] == "rejected" or not (q.start <= r["offered_at"] < min(q.end + window, 4_102_444_800)):
            continue
        cust = ("id:" + r["customer_id"]) if r["customer_id"] else ("tel:" + r["caller"])
        if cust in ("id:", "tel:"):
            continue
        by_cust[(cust, r["skill"])].append(r)
    for contacts in by_cust.values():
        for r in contacts:
            if r["outcome"] != "completed" or not q.start <= r["offered_at"] < q.end:
                continue
            t = r["offered_at"]
            repeated = any(o is not r and t <= o["offered_at"] <= t + window for o in contacts)
            k = out[key(r, t)]
            k["fcr_den"] += 1
            k["fcr_num"] += not repeated
    # occupancy
    if set(q.by) <= {"site", "region", "partner"}:
        for s in states:
            if s["prev_at"] <= 0:
                continue
            lo, hi = max(s["prev_at"], q.start), min(s["at"], q.end)
            if hi <= lo:
                continue
            pieces = []
            if q.interval_s:
                b = (lo // q.interval_s) * q.interval_s
                while b < hi:
                    pieces.append((b, min(hi, b + q.interval_s) - max(lo, b)))
                    b += q.interval_s
            else:
                pieces.append((None, hi - lo))
            for b, secs in pieces:
                k = out[tuple(s[d] for d in q.by) + (b,)]
                if s["prev_state"] in ("busy", "wrap_up"):
                    k["handling_time_s"] += secs
                if s["prev_state"] in ("ready", "busy", "wrap_up", "not_ready"):
                    k["staffed_time_s"] += secs
    return {k: dict(v) for k, v in out.items()}


FIELDS = ("offered", "answered", "abandoned", "rejected", "sl_num", "sl_den", "handled",
          "csat_sum", "csat_n", "fcr_num", "fcr_den")
FLOATS = ("wait_sum_s", "handle_sum_s", "handling_time_s", "staffed_time_s")


def check(store, calls, states, q: KpiQuery):
    got = kpis(store, q)
    want = reference(calls, states, q)
    got_map = {tuple(r.group[d] for d in q.by) + (r.bucket,): r for r in got}
    # Groups with nothing at all may be absent on one side only when all-zero.
    for k in set(want) | set(got_map):
        w = want.get(k, {})
        r = got_map.get(k)
        assert r is not None, f"group {k} missing from the query's result: {w}"
        for f in FIELDS:
            assert getattr(r, f) == int(w.get(f, 0)), (k, f, getattr(r, f), w.get(f, 0))
        for f in FLOATS:
            assert math.isclose(getattr(r, f), w.get(f, 0.0), rel_tol=1e-9, abs_tol=1e-6), (k, f)
    return got


@pytest.fixture
def loaded(history_store):
    calls = synth.interactions(3000, seed=7, start=START, span_s=2 * 86400, callers=700)
    states = synth.agent_state_changes(4, seed=7, start=START, span_s=6 * 3600)
    insert(history_store, "interactions", calls)
    insert(history_store, "agent_state_changes", states)
    # At-least-once: a replay of a third of the rows (a part of its own) ...
    insert(history_store, "interactions", calls[::3])
    insert(history_store, "agent_state_changes", states[::2])
    # ... and corrections: a later version of 50 calls wins.
    fixed = []
    for r in calls[1::60]:
        r2 = dict(r, ver=r["ver"] + 1, csat=5 if r["outcome"] == "completed" else 0,
                  handle_s=r["handle_s"] + 1.0 if r["outcome"] == "completed" else 0.0)
        fixed.append(r2)
    insert(history_store, "interactions", fixed)
    return history_store, calls + calls[::3] + fixed, states + states[::2]


@pytest.mark.parametrize("by,interval", [
    (("site", "queue"), None),
    (("region",), 900),
    (("partner",), None),
    ((), 3600),
    (("site",), 900),
    (("skill", "channel"), None),
])
def test_kpis_match_reference(loaded, by, interval):
    store, calls, states = loaded
    q = KpiQuery(by=by, interval_s=interval, service_levels=SLS, default_sl=DEFAULT_SL, fcr_days=1)
    rows = check(store, calls, states, q)
    assert sum(r.offered for r in rows) == 3000  # each call once, replays and corrections included


def test_kpis_time_range_and_fcr_horizon(loaded):
    store, calls, states = loaded
    # A range that cuts through the data: FCR looks past the end for repeats; occupancy
    # intervals are clipped to the range.
    q = KpiQuery(by=("site",), interval_s=1800, start=START + 3 * 3600 + 17, end=START + 9 * 3600,
                 service_levels=SLS, default_sl=DEFAULT_SL, fcr_days=0.5)
    rows = check(store, calls, states, q)
    assert any(r.fcr_den for r in rows)
    assert any(r.occupancy is not None and 0 < r.occupancy < 1 for r in rows)


def test_kpi_values(loaded):
    store, calls, states = loaded
    (total,) = kpis(store, KpiQuery(by=(), service_levels=SLS, default_sl=DEFAULT_SL))
    assert total.offered == 3000
    assert 0 < total.service_level < 1
    assert total.asa_s > 0 and total.aht_s > 30
    assert 0 < total.abandon_rate < 0.5
    assert 1 <= total.csat <= 5
    assert 0 < total.fcr < 1
    assert 0 < total.occupancy < 1
    by_queue = kpis(store, KpiQuery(by=("queue",)))
    assert all(r.occupancy is None for r in by_queue)  # agents serve several queues
    d = total.to_dict()
    assert d["offered"] == 3000 and "occupancy" in d and "occupancy_known" not in d


def test_empty_history(history_store):
    assert kpis(history_store, KpiQuery(by=("site",), interval_s=900)) == []


def test_sl_definitions_from_site_files():
    from router.config import load_sites

    defs = sl_definitions(load_sites(Path(__file__).resolve().parent.parent / "sites"))
    assert defs[("lyon", "billing-email")].abandons == "exclude"
    assert defs[("montreal", "support-en-voice")].threshold_s == 45


def test_bad_queries():
    with pytest.raises(ValueError):
        KpiQuery(by=("nonsense",))
    with pytest.raises(ValueError):
        KpiQuery(interval_s=1)
    with pytest.raises(ValueError):
        KpiQuery(start=10, end=5)
