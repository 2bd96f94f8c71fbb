"""The what-if replay (router.whatif) and its history query (router.history.replay):
queueing theory, overflow, conservation, determinism, a real embedded history, bad input,
and the speed of 3 simulated hours of the example cluster."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from router import erlang
from router.config import load_sites, parse_site
from router.history.replay import recent_arrivals
from router.history.schema import TABLES
from router.overflow import OverflowPolicy, parse_policy
from router.whatif import (
    Arrival,
    Stream,
    WhatIfError,
    arrivals_from_rows,
    compare,
    poisson_arrivals,
    replay,
)

ROOT = Path(__file__).resolve().parent.parent
NO_OVERFLOW = OverflowPolicy()


def one_queue_site(name: str, agents: int, *, threshold_s: float = 20.0, abandons: str = "count_against",
                   blacklist: tuple[str, ...] = (), kind: str = "inhouse"):  # fmt: skip
    return parse_site({
        "site": {"name": name, "region": "emea", "kind": kind},
        "queues": [{"name": "billing-en-voice", "skill": "billing", "channel": "voice", "language": "en",
                    "wrap_up_s": 0, "aht_s": 100,
                    "service_level": {"threshold_s": threshold_s, "abandons": abandons}}],
        "lists": {"blacklist": list(blacklist)},
        "agents": [{"id": f"{name}-a", "count": agents, "skills": {"billing": 5}, "languages": ["en"]}],
    })  # fmt: skip


def stream(site: str, erlangs: float, handle_s: float = 100.0, patience_s: float | None = None) -> Stream:
    return Stream(site=site, skill="billing", language="en", rate_per_h=erlangs * 3600 / handle_s,
                  handle_s=handle_s, patience_s=patience_s)  # fmt: skip


# --- (a) theory -------------------------------------------------------------------------


def test_mmn_matches_erlang_c():
    """M/M/10 at 8 Erlangs, no abandonment: SL(20 s) and ASA as Erlang C says."""
    n, load, h, t = 10, 8.0, 100.0, 20.0
    arrivals = poisson_arrivals([stream("solo", load, h)], 150_000, seed=11)
    assert len(arrivals) > 11_000
    r = replay([one_queue_site("solo", n)], arrivals, NO_OVERFLOW).sites["solo"]
    assert r.offered == r.answered == len(arrivals) and r.abandoned == 0
    rate = load / h
    assert r.service_level == pytest.approx(erlang.service_level(n, rate, h, t), abs=0.03)
    assert r.asa_s == pytest.approx(erlang.asa(n, rate, h), rel=0.15)


def erlang_a(n: int, rate: float, handle_s: float, patience_s: float) -> tuple[float, float]:
    """M/M/n+M (Erlang A; router.erlang has only Erlang C) by its birth-death chain:
    (P(wait > 0), P(abandon)), with patience counted from arrival."""
    mu, theta = 1.0 / handle_s, 1.0 / patience_s
    p = [1.0]
    k = 0
    while True:
        k += 1
        p.append(p[-1] * rate / (min(k, n) * mu + max(0, k - n) * theta))
        if k > n and p[-1] < 1e-15 * sum(p):
            break
    z = sum(p)
    wait = sum(p[n:]) / z
    abandon = sum(pk * (k - n) * theta for k, pk in enumerate(p) if k > n) / z / rate
    return wait, abandon


def test_mmn_with_patience_matches_erlang_a():
    """M/M/10+M at 10 Erlangs (critically loaded) with 60 s mean patience."""
    n, load, h, patience = 10, 10.0, 100.0, 60.0
    arrivals = poisson_arrivals([stream("solo", load, h, patience)], 120_000, seed=5)
    r = replay([one_queue_site("solo", n)], arrivals, NO_OVERFLOW).sites["solo"]
    _, p_abandon = erlang_a(n, load / h, h, patience)
    assert r.offered == r.answered + r.abandoned
    assert r.abandoned / r.offered == pytest.approx(p_abandon, abs=0.02)


# --- (b) overflow, conservation ------------------------------------------------------------

OVERFLOW = parse_policy({"default": {"wait_threshold": {"factor": 0.5}}})


def two_sites():
    return [one_queue_site("busy", 5, blacklist=("+100",)), one_queue_site("idle", 12)]


def two_site_arrivals():
    arrivals = poisson_arrivals([stream("busy", 6.0, patience_s=120), stream("idle", 4.0, patience_s=120)],
                                4 * 3600, seed=3, start=1_790_000_000)  # fmt: skip
    # a blacklisted caller: rejected at the busy site, counted there
    return arrivals + [Arrival("bad-1", "busy", 1_790_000_500.0, "billing", language="en", caller="+100",
                               handle_s=50.0, patience_s=math.inf)]  # fmt: skip


def conserved(res, arrivals):
    by_origin = {}
    for a in arrivals:
        by_origin[a.site] = by_origin.get(a.site, 0) + 1
    for name, s in res.sites.items():
        assert s.offered == by_origin.get(name, 0), name  # each call once, at its origin
        assert s.offered == s.answered + s.abandoned + s.rejected + s.unfinished, name
        assert s.offered == sum(q.offered for q in s.queues.values())
    t = res.total
    assert t.offered == len(arrivals) == t.answered + t.abandoned + t.rejected
    assert t.unfinished == 0
    assert t.overflow_out == t.overflow_in


def test_overflow_to_an_idle_site_raises_the_busy_sites_service_level():
    sites, arrivals = two_sites(), two_site_arrivals()
    cmp = compare(sites, arrivals, NO_OVERFLOW, OVERFLOW)
    before, after = cmp["before"]["sites"], cmp["after"]["sites"]
    assert before["busy"]["overflow_out"] == 0
    assert after["busy"]["overflow_out"] > 100 and after["idle"]["overflow_in"] == after["busy"]["overflow_out"]
    assert after["busy"]["service_level"] > before["busy"]["service_level"] + 0.2
    assert after["busy"]["abandoned"] < before["busy"]["abandoned"]
    assert cmp["sites"]["busy"]["delta"]["service_level"] > 0.2
    assert before["busy"]["rejected"] == after["busy"]["rejected"] == 1
    for policy in (NO_OVERFLOW, OVERFLOW):
        conserved(replay(sites, arrivals, policy), arrivals)


def test_sweeps_move_calls_that_stayed_when_a_peer_frees_up():
    """The busy site's calls arrive while the other site has a longer queue (no better
    peer: they stay); once it drains, the timer (SWEEP_S) moves them there."""
    sites = [one_queue_site("busy", 1), one_queue_site("idle", 3)]
    busy_only = parse_policy({"sites": {"busy": {"billing-en-voice": {"wait_threshold": {"factor": 0.5}}}}})
    t0 = 1_790_000_000.0
    arrivals = [Arrival(f"i{k:02d}", "idle", t0 + k * 0.01, "billing", language="en", handle_s=30.0,
                        patience_s=math.inf) for k in range(12)]  # fmt: skip
    arrivals += [Arrival(f"b{k}", "busy", t0 + 1 + k, "billing", language="en", handle_s=600.0,
                         patience_s=math.inf) for k in range(4)]  # fmt: skip
    res = replay(sites, arrivals, busy_only)
    # idle's 9 queued calls have no rule; b1..b3 stayed when they arrived (b0 found the
    # agent free) and the sweeps moved them later (overflows are counted by their rule)
    assert res.decisions == {"no_rule": 9, "no_better_peer": 3, "wait_threshold": 3}
    assert res.sites["busy"].overflow_out == 3
    assert res.sites["busy"].asa_s < 200  # not the ~900 s they would have waited at home
    assert replay(sites, arrivals, NO_OVERFLOW).sites["busy"].asa_s > 800
    conserved(res, arrivals)


# --- (c) determinism ----------------------------------------------------------------------


def test_same_seed_same_result_and_draws_fill_unknown_figures():
    sites = two_sites()
    known = two_site_arrivals()[:600]
    # as from history: answered calls have no patience, abandoned ones no handle time
    hist = [
        Arrival(a.call_id, a.site, a.at, a.skill, language=a.language, caller=a.caller,
                handle_s=None if k % 3 == 0 else a.handle_s, patience_s=a.patience_s if k % 3 == 0 else None,
                waited_s=5.0, outcome="abandoned" if k % 3 == 0 else "completed")
        for k, a in enumerate(known)
    ]  # fmt: skip
    one = replay(sites, hist, OVERFLOW, seed=7).to_dict()
    assert replay(sites, hist, OVERFLOW, seed=7).to_dict() == one
    assert replay(sites, list(reversed(hist)), OVERFLOW, seed=7).to_dict() == one  # input order is irrelevant
    assert compare(sites, hist, NO_OVERFLOW, OVERFLOW, seed=7)["after"] == one
    assert replay(sites, hist, OVERFLOW, seed=8).to_dict() != one  # other draws
    # without overflow the busy site queues: answered callers of "inf" never hang up,
    # resampled ones may; recorded hang-ups abandon the same in both
    inf = replay(sites, hist, NO_OVERFLOW, seed=7, censored="inf").sites["busy"]
    resampled = replay(sites, hist, NO_OVERFLOW, seed=7).sites["busy"]
    assert 0 < inf.abandoned < resampled.abandoned


# --- (d) the history query against a real embedded store ------------------------------------

T0 = 1_790_000_000


def row(**kw):
    r = {c.name: c.default for c in TABLES["interactions"]}
    r.update(kw)
    return r


def history_rows():
    start = T0 + 100.25  # arrives a quarter second into its second
    done = row(interaction_id="c-done", site="lyon", origin_site="lyon", queue="billing-fr-voice",
               skill="billing", channel="voice", language="fr", caller="+33611", priority_class="standard",
               outcome="completed", offered_at=T0 + 100, queued_at=T0 + 100, answered_at=T0 + 112,
               ended_at=T0 + 212, wait_s=12.5, talk_s=100.0, wrap_s=15.0, handle_s=115.0,
               ver=round((start + 112.5) * 1000))  # fmt: skip
    gone = row(interaction_id="c-gone", site="lyon", origin_site="lyon", queue="support-fr-voice",
               skill="support", channel="voice", language="fr", outcome="abandoned", offered_at=T0 + 200,
               queued_at=T0 + 200, ended_at=T0 + 247, wait_s=47.0, ver=(T0 + 247) * 1000)  # fmt: skip
    # overflowed lyon -> montreal: an older row at lyon and the final one at montreal
    moved_old = row(interaction_id="c-moved", site="lyon", origin_site="lyon", queue="billing-en-voice",
                    skill="billing", channel="voice", language="en", outcome="abandoned",
                    offered_at=T0 + 300, queued_at=T0 + 300, ended_at=T0 + 301, wait_s=1.0,
                    ver=(T0 + 301) * 1000)  # fmt: skip
    moved = row(interaction_id="c-moved", site="montreal", origin_site="lyon", origin_region="emea",
                queue="billing-en-voice", skill="billing", channel="voice", language="en", outcome="completed",
                offered_at=T0 + 300, queued_at=T0 + 330, transferred_at=T0 + 330, answered_at=T0 + 340,
                ended_at=T0 + 500, wait_s=10.0, talk_s=160.0, wrap_s=15.0, handle_s=175.0, transfer_count=1,
                ver=(T0 + 500) * 1000)  # fmt: skip
    early = row(interaction_id="c-early", site="lyon", origin_site="lyon", skill="billing", channel="voice",
                language="fr", outcome="completed", offered_at=T0 - 50, answered_at=T0 - 40, ended_at=T0,
                wait_s=10.0, talk_s=40.0, handle_s=55.0, ver=T0 * 1000)  # fmt: skip
    return [done, gone, moved_old, moved, early]


def insert(store, rows):
    names = [c.name for c in TABLES["interactions"]]
    store.insert("interactions", names, [[r[n] for r in rows] for n in names])


def test_recent_arrivals_one_per_call_at_its_origin(chdb_store):
    rows = history_rows()
    insert(chdb_store, rows)
    insert(chdb_store, rows[::2])  # replayed rows change nothing
    got = recent_arrivals(chdb_store, T0, T0 + 3600)
    assert [a["call_id"] for a in got] == ["c-done", "c-gone", "c-moved"]  # c-early is before the range
    done, gone, moved = got
    assert done["at"] == pytest.approx(T0 + 100.25, abs=1e-3)  # the exact arrival, from ver
    assert done["waited_s"] == 12.5 and done["handle_s"] == 115.0 and done["patience_s"] is None
    assert gone["outcome"] == "abandoned" and gone["patience_s"] == 47.0 and gone["handle_s"] is None
    assert moved["site"] == "lyon" and moved["ended_site"] == "montreal" and moved["at"] == T0 + 300
    assert moved["outcome"] == "completed" and moved["waited_s"] == pytest.approx(40.0)
    assert moved["handle_s"] == 175.0 and moved["transfer_count"] == 1
    assert [a["call_id"] for a in recent_arrivals(chdb_store, T0 + 250)] == ["c-moved"]

    arrivals = arrivals_from_rows(got)
    assert [(a.site, a.call_id) for a in arrivals] == [("lyon", "c-done"), ("lyon", "c-gone"), ("lyon", "c-moved")]
    res = replay(load_sites(ROOT / "sites"), arrivals, NO_OVERFLOW)
    assert res.sites["lyon"].offered == 3 and res.sites["montreal"].offered == 0
    # staffing as configured: every Lyon agent is free, so even the call that hung up
    # after 47 s in reality is answered at once in the replay
    assert res.sites["lyon"].answered == 3 and res.sites["lyon"].asa_s == 0.0


# --- (e) bad input ------------------------------------------------------------------------


def test_bad_input_gets_a_clear_error():
    sites = two_sites()
    ok = Arrival("x1", "busy", 10.0, "billing", language="en", handle_s=10.0, patience_s=math.inf)
    with pytest.raises(WhatIfError, match=r"arrival 'x2': unknown site 'paris'.*\['busy', 'idle'\]"):
        replay(sites, [ok, Arrival("x2", "paris", 11.0, "billing", language="en")], NO_OVERFLOW)
    with pytest.raises(WhatIfError, match=r"arrival 'x3': site busy has no queue for skill 'sales' on voice.*billing-en-voice"):
        replay(sites, [Arrival("x3", "busy", 11.0, "sales")], NO_OVERFLOW)
    with pytest.raises(WhatIfError, match="no queue for skill 'billing' on chat"):
        replay(sites, [Arrival("x4", "busy", 11.0, "billing", channel="chat")], NO_OVERFLOW)
    with pytest.raises(WhatIfError, match="'x1' appears twice"):
        replay(sites, [ok, ok], NO_OVERFLOW)
    with pytest.raises(WhatIfError, match="handle_s must be"):
        replay(sites, [Arrival("x5", "busy", 1.0, "billing", language="en", handle_s=-1.0)], NO_OVERFLOW)
    with pytest.raises(WhatIfError, match="contingency for unknown site"):
        replay(sites, [ok], NO_OVERFLOW, contingency={"paris": None})  # type: ignore[dict-item]
    with pytest.raises(WhatIfError, match="policy must be an OverflowPolicy"):
        replay(sites, [ok], {"default": {}})  # type: ignore[arg-type]
    with pytest.raises(WhatIfError, match="history row 0: missing site, at"):
        arrivals_from_rows([{"call_id": "c", "skill": "billing"}])


# --- the live cadence, and speed ----------------------------------------------------------


def test_cadence_is_the_live_nodes():
    from router.coord.link import EtcdSettings
    from router.node import cluster
    from router import whatif

    s = EtcdSettings()
    assert whatif.PUBLISH_S == pytest.approx(1.0 / s.load_max_rate)
    assert whatif.HEARTBEAT_S == s.load_heartbeat_s
    assert (whatif.SWEEP_S, whatif.SWEEP_MAX) == (cluster.SWEEP_S, cluster.SWEEP_MAX)


# The demo's load on the example cluster (router.sim.demo.DEMO_LOAD: Erlangs per queue).
DEMO_LOAD = {
    ("lyon", "billing-fr-voice"): 8.5, ("lyon", "billing-en-voice"): 2.0, ("lyon", "support-fr-voice"): 5.5,
    ("lyon", "sales-voice"): 3.5, ("lyon", "support-chat"): 6.0, ("lyon", "billing-email"): 8.0,
    ("montreal", "billing-en-voice"): 14.0, ("montreal", "billing-fr-voice"): 3.5,
    ("montreal", "support-en-voice"): 14.0, ("montreal", "sales-voice"): 5.5, ("montreal", "support-chat"): 8.0,
    ("callpro", "billing-en-voice"): 4.0, ("callpro", "support-en-voice"): 6.0, ("callpro", "support-chat"): 5.0,
}  # fmt: skip
TALK_S = {"billing": 240.0, "support": 360.0, "sales": 300.0, "chat": 600.0, "email": 300.0}
PATIENCE_S = {"voice": 180.0, "chat": 420.0, "email": None}


def example_arrivals(sites, hours: float, scale: float = 1.0, seed: int = 7):
    streams = []
    for s in sites:
        for q in s.queues:
            erlangs = DEMO_LOAD.get((s.site.name, q.name), 0.0) * scale
            if erlangs > 0:
                handle = TALK_S.get(q.channel.value, TALK_S.get(q.skill, 300.0)) + q.wrap_up_s
                streams.append(Stream(
                    site=s.site.name, skill=q.skill, channel=q.channel.value, language=q.language or "",
                    rate_per_h=erlangs * 3600 / handle, handle_s=handle, handle_dist="lognormal",
                    handle_cv=0.7, patience_s=PATIENCE_S[q.channel.value],
                ))  # fmt: skip
    return poisson_arrivals(streams, hours * 3600, seed=seed, start=1_790_000_000)


def test_three_hours_of_the_example_cluster_are_quick():
    sites = load_sites(ROOT / "sites")
    policy = parse_policy((ROOT / "sites" / "overflow-policy.json").read_text())
    arrivals = example_arrivals(sites, 3)
    cpu = time.process_time()
    cmp = compare(sites, arrivals, NO_OVERFLOW, policy)
    cpu = time.process_time() - cpu
    print(f"\n{len(arrivals)} calls, before+after: {cpu:.2f} s CPU")
    assert cpu < 10.0
    # the demo's story: Montreal is overloaded, overflow lifts it, the total improves
    mtl = cmp["sites"]["montreal"]
    assert mtl["delta"]["service_level"] > 0.3 and mtl["after"]["overflow_out"] > 100
    assert cmp["total"]["delta"]["service_level"] > 0
    for side in ("before", "after"):
        assert cmp[side]["total"]["offered"] == len(arrivals)
