"""The closed capacity loop on simulated time (issue 12, part 6; router.capacity.closedloop):
the surge scenario's calls, the pooled bound, the forecast and the auto-mode controller in
the replay. Quick: small horizons."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_capacity_whatif import two_group_site

from router.capacity.closedloop import (
    POOLED,
    Controller,
    Surge,
    forecast_streams,
    gap_closed,
    pooled_arrivals,
    pooled_bound,
    pooled_sites_sl,
    scenario_arrivals,
    surge_stream,
)
from router.capacity.planner import load_streams
from router.capacity.whatif import START
from router.config import load_sites
from router.overflow import parse_policy
from router.plans import check_targets
from router.whatif import Stream, replay

ROOT = Path(__file__).resolve().parent.parent
SITES = load_sites(ROOT / "sites")
POLICY = parse_policy((ROOT / "sites" / "overflow-policy.json").read_text())
STREAMS = load_streams(None, SITES)


def test_surge_calls_come_on_top_of_the_same_base_calls():
    surge = Surge("lyon", "billing-fr-voice", 8.0, start_s=300.0)
    a = scenario_arrivals(SITES, STREAMS, surge, 900.0, seed=3)
    assert a == scenario_arrivals(SITES, STREAMS, surge, 900.0, seed=3)  # a function of the seed
    base = scenario_arrivals(SITES, STREAMS, None, 900.0, seed=3)
    extra = [x for x in a if x.call_id.startswith("surge-")]
    assert [x for x in a if not x.call_id.startswith("surge-")] == base
    assert extra and all(x.site == "lyon" and x.skill == "billing" and x.language == "fr" for x in extra)
    assert all(START + 300.0 <= x.at < START + 900.0 for x in extra)
    assert len({x.call_id for x in a}) == len(a) and a == sorted(a, key=lambda x: (x.at, x.call_id))
    st = surge_stream(SITES, STREAMS, surge)
    assert math.isclose(st.rate_per_h * st.handle_s / 3600.0, 8.0)
    with pytest.raises(ValueError, match="no queue"):
        surge_stream(SITES, STREAMS, Surge("lyon", "nope", 1.0))


def test_the_pooled_bound_gives_movable_agents_every_reachable_skill():
    pooled = pooled_bound(SITES)
    groups = {g.id: g for g in pooled.agents}
    assert sum(len(g.agent_ids()) for g in pooled.agents) == sum(len(s.agent_profiles()) for s in SITES)
    assert len(pooled.queues) == sum(len(s.queues) for s in SITES)
    # a Lyon sales agent may be moved into lyon-fr or lyon-bi: billing, support, French too
    sales = groups["lyon--lyon-sales"]
    assert {"billing--lyon", "billing--montreal", "support--lyon", "sales--montreal"} <= set(sales.skills)
    assert set(sales.languages) == {"en", "fr"}
    assert not groups["lyon--lyon-backoffice"].backoffice  # a move or surge un-gates them
    # a partner's agents are not ours: their own skills only (on every origin's queues)
    cp = groups["callpro--cp-t1"]
    assert {k.split("--")[0] for k in cp.skills} == {"billing", "support"} and cp.languages == ["en"]
    # each call is judged by its origin queue's own definition
    q = {x.name: x for x in pooled.queues}
    lyon = next(s for s in SITES if s.site.name == "lyon")
    assert q["lyon--billing-fr-voice"].service_level == next(x for x in lyon.queues
                                                              if x.name == "billing-fr-voice").service_level


def test_pooled_replay_counts_every_call_for_its_origin_and_bounds_the_static_one():
    surge = Surge("lyon", "billing-fr-voice", 8.0, start_s=0.0)
    arrivals = scenario_arrivals(SITES, STREAMS, surge, 1200.0, seed=1)
    static = replay(SITES, arrivals, POLICY, seed=1)
    pooled = replay([pooled_bound(SITES)], pooled_arrivals(arrivals), POLICY, seed=1)
    per = pooled_sites_sl(pooled)
    assert set(per) == {"lyon", "montreal", "callpro"}
    for name, t in per.items():
        assert t.offered == static.sites[name].offered
    assert sum(t.offered for t in per.values()) == pooled.sites[POOLED].offered == len(arrivals)
    assert pooled.total.service_level > static.total.service_level
    assert per["lyon"].service_level > static.sites["lyon"].service_level


def test_forecast_is_the_rate_of_the_window_with_the_base_handle_times():
    base = [Stream(site="solo", skill="billing", rate_per_h=10.0, handle_s=200.0, patience_s=90.0),
            Stream(site="solo", skill="sales", rate_per_h=5.0, handle_s=100.0)]
    cfg = two_group_site()
    got = forecast_streams({("solo", "billing-voice"): 30}, 1800.0, base, [cfg])
    assert len(got) == 1 and math.isclose(got[0].rate_per_h, 60.0)  # sales had no call: left out
    assert got[0].handle_s == 200.0 and got[0].patience_s == 90.0
    assert forecast_streams({}, 0.0, base, [cfg]) == base


def test_the_controller_moves_idle_agents_to_the_surge_and_beats_static():
    """One site: 1 billing agent for a ~2 Erlang billing surge, 4 idle sales agents. The
    controller (auto mode) moves sales agents into billing; the replay with it answers
    more calls in time than without."""
    cfg = two_group_site(billing=1, other=4)
    policy = parse_policy({"default": {"wait_threshold": {"factor": 0.5}}})
    base = [Stream(site="solo", skill="billing", rate_per_h=0.5 * 3600 / 180, handle_s=180.0, patience_s=120.0),
            Stream(site="solo", skill="sales", rate_per_h=0.5 * 3600 / 180, handle_s=180.0, patience_s=120.0)]
    surge = Surge("solo", "billing-voice", 2.0, start_s=300.0)
    arrivals = scenario_arrivals([cfg], base, surge, 3600.0, seed=2)
    static = replay([cfg], arrivals, policy, seed=2)
    ctl = Controller([cfg], policy, base, plan_horizon_s=600.0, seeds=(1,), window_s=600.0)
    rb = replay([cfg], arrivals, policy, seed=2, controller=ctl, control_every_s=300.0, apply_delay_s=1.0)
    assert ctl.applied and rb.targets_applied == len(ctl.applied)
    assert len(ctl.steps) >= 10 and all(s.applied == (s.targets is not None) for s in ctl.steps)
    last = ctl.applied[-1]["solo"]
    check_targets(cfg, last)
    assert "solo-bill" in set(last.groups.values())  # sales agents serve billing now
    assert rb.total.service_level > static.total.service_level + 0.1
    assert ctl.current == ctl.applied[-1]
    # greedy rounds: one call may chain several searches; the replay takes the result
    greedy = Controller([cfg], policy, base, plan_horizon_s=600.0, seeds=(1,), window_s=600.0, rounds=3)
    rg = replay([cfg], arrivals, policy, seed=2, controller=greedy, control_every_s=300.0, apply_delay_s=1.0)
    assert greedy.applied and rg.total.service_level > static.total.service_level + 0.1
    assert all(s.applied == (s.targets is not None) for s in greedy.steps)
    # no gain worth it: nothing returned
    lazy = Controller([cfg], policy, base, plan_horizon_s=600.0, seeds=(1,), min_gain=2.0)
    replay([cfg], arrivals, policy, seed=2, controller=lazy, control_every_s=600.0)
    assert not lazy.applied and lazy.current == {}


def test_gap_closed():
    assert gap_closed(0.8, 0.9, 1.0) == pytest.approx(0.5)
    assert gap_closed(0.8, 0.9, 0.8) is None and gap_closed(None, 0.9, 1.0) is None
