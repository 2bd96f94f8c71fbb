"""Chargeback per region and per partner against a plain-Python computation, both backends."""

from __future__ import annotations

import calendar
from collections import defaultdict

import pytest

from router.history import synth
from router.history.chargeback import (
    Rates,
    RatesError,
    chargeback,
    example_rates_path,
    load_rates,
    period_bounds,
)
from router.history.schema import TABLES

NOV = calendar.timegm((2026, 11, 1, 0, 0, 0))


def insert(store, rows):
    names = [c.name for c in TABLES["interactions"]]
    store.insert("interactions", names, [[r[n] for r in rows] for n in names])


def reference(rows, rates: Rates, lo, hi):
    best = {}
    for r in rows:
        if r["interaction_id"] not in best or r["ver"] > best[r["interaction_id"]]["ver"]:
            best[r["interaction_id"]] = r
    region = defaultdict(lambda: [0, 0.0])
    partner = defaultdict(lambda: [0, 0.0])
    for r in best.values():
        if not lo <= r["offered_at"] < hi:
            continue
        if r["outcome"] in rates.billable_outcomes:
            a = region[(r["origin_region"], r["channel"])]
            a[0] += 1
            a[1] += r["handle_s"]
        if r["partner"] and r["outcome"] == "completed":
            a = partner[(r["partner"], r["origin_region"], r["channel"])]
            a[0] += 1
            a[1] += r["handle_s"]

    def amount(rate, ch, n, secs):
        pc = {c.value: v for c, v in rate.per_contact.items()}
        pm = {c.value: v for c, v in rate.per_minute.items()}
        return n * pc.get(ch, 0.0) + secs / 60 * pm.get(ch, 0.0)

    out = {}
    for (reg, ch), (n, secs) in region.items():
        rate = rates.regions.get(reg)
        out[("region", reg, reg, ch)] = (n, amount(rate, ch, n, secs) if rate else 0.0)
    for (p, reg, ch), (n, secs) in partner.items():
        rate = rates.partners.get(p)
        out[("partner", p, reg, ch)] = (n, amount(rate, ch, n, secs) if rate else 0.0)
    return out


@pytest.mark.parametrize("outcomes", [["completed"], ["completed", "abandoned"]])
def test_chargeback_matches_reference(history_store, outcomes):
    # Late October to early December: the November period cuts both ends.
    rows = synth.interactions(4000, seed=21, start=NOV - 3 * 86400, span_s=36 * 86400)
    insert(history_store, rows)
    insert(history_store, rows[::4])  # replays
    rates = load_rates(example_rates_path()).model_copy(update={"billable_outcomes": outcomes})
    lo, hi = period_bounds("2026-11")
    cb = chargeback(history_store, rates, lo, hi)
    want = reference(rows, rates, lo, hi)
    got = {(ln.kind, ln.name, ln.origin_region, ln.channel): (ln.contacts, ln.amount) for ln in cb.lines}
    assert got.keys() == want.keys()
    for k, (n, amount) in want.items():
        assert got[k][0] == n, k
        assert got[k][1] == pytest.approx(amount, rel=1e-9), k
    totals = cb.totals()
    assert set(totals["region"]) == {"emea", "amer"} and set(totals["partner"]) == {"callpro"}
    assert cb.unrated == []
    doc = cb.to_dict()
    assert doc["from"] == "2026-11-01T00:00:00Z" and doc["to"] == "2026-12-01T00:00:00Z"


def test_unrated_regions_are_reported(history_store):
    rows = synth.interactions(300, seed=22, start=NOV, span_s=86400)
    insert(history_store, rows)
    rates = Rates.model_validate({"regions": {"emea": {"per_contact": {"voice": 1}}}})
    cb = chargeback(history_store, rates, NOV, NOV + 86400)
    assert "region:amer:voice" in cb.unrated and "partner:callpro:chat" in cb.unrated
    assert "region:emea:voice" not in cb.unrated
    assert all(ln.amount == 0 for ln in cb.lines if ln.name == "amer")


def test_rates_validation(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("regions:\n  emea:\n    per_contact: {pigeon: 1}\n")
    with pytest.raises(RatesError, match="regions.emea.per_contact.pigeon"):
        load_rates(p)
    p.write_text("regions:\n  emea:\n    per_contact: {voice: -1}\n")
    with pytest.raises(RatesError, match="must be 0"):
        load_rates(p)
    p.write_text("currency: euro\n")
    with pytest.raises(RatesError, match="currency"):
        load_rates(p)
    with pytest.raises(RatesError, match="cannot read"):
        load_rates(tmp_path / "missing.yaml")
    assert load_rates(example_rates_path()).currency == "EUR"


def test_period_bounds():
    assert period_bounds("2026-12") == (calendar.timegm((2026, 12, 1, 0, 0, 0)), calendar.timegm((2027, 1, 1, 0, 0, 0)))
    for bad in ("2026-13", "2026-1", "nov"):
        with pytest.raises(ValueError):
            period_bounds(bad)
