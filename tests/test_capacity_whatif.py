"""Plan what-ifs (issue 12, part 4): targets and a controller in the replay
(router.whatif.simulator), candidate plans, common random numbers, batching, the search
(router.capacity.whatif), serial == Ray on a real local Ray (router.capacity.whatif_run,
router.capacity.raykit), and `tandem capacity whatif` end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from router.capacity.traffic import TrafficError, streams_from_profile
from router.capacity.whatif import (
    Candidate,
    Scenario,
    all_units,
    arrivals_for,
    generate_candidates,
    plan_batches,
    run_unit,
    search,
    unit_cost_s,
)
from router.capacity.whatif_run import evaluate, scenario_from_files
from router.cli import app
from router.config import parse_site
from router.overflow import OverflowPolicy, parse_policy
from router.plans import SiteTargets, check_targets
from router.whatif import Arrival, Stream, replay

ROOT = Path(__file__).resolve().parent.parent
NO_OVERFLOW = OverflowPolicy()


def two_group_site(name: str = "solo", *, billing: int = 1, other: int = 2, backoffice: bool = False) -> object:
    """One site: a billing voice queue (no wrap-up) served by group ``<name>-bill``, and a
    group ``<name>-other`` that serves sales only (or, with ``backoffice``, back-office
    agents with the billing skill: on calls only in surge)."""
    other_group = ({"id": f"{name}-other", "count": other, "skills": {"billing": 5}, "languages": ["en"],
                    "capacity": {"voice": 1}, "backoffice": True} if backoffice else
                   {"id": f"{name}-other", "count": other, "skills": {"sales": 5}, "languages": ["en"]})
    return parse_site({
        "site": {"name": name, "region": "emea", "kind": "inhouse"},
        "queues": [
            {"name": "billing-voice", "skill": "billing", "channel": "voice", "wrap_up_s": 0,
             "service_level": {"threshold_s": 20}},
            {"name": "sales-voice", "skill": "sales", "channel": "voice", "wrap_up_s": 0,
             "service_level": {"threshold_s": 20}},
        ],
        "agents": [{"id": f"{name}-bill", "count": billing, "skills": {"billing": 5}, "languages": ["en"]},
                   other_group],
    })  # fmt: skip


def call(cid: str, at: float, handle: float, skill: str = "billing", site: str = "solo") -> Arrival:
    return Arrival(call_id=cid, site=site, at=at, skill=skill, handle_s=handle, patience_s=float("inf"))


# --- targets and the controller in the replay -------------------------------------------


def test_targets_move_agents_before_the_first_call():
    """Two sales agents moved into the billing group at the start answer billing calls."""
    site = two_group_site(billing=1, other=2)
    calls = [call(f"c{i}", 10.0 + i, 300.0) for i in range(3)]  # three at once, one billing agent
    plain = replay([site], calls, NO_OVERFLOW)
    assert plain.sites["solo"].service_level == pytest.approx(1 / 3)
    moved = SiteTargets(groups={"solo-other-001": "solo-bill", "solo-other-002": "solo-bill"})
    seen = []
    r = replay([site], calls, NO_OVERFLOW, targets={"solo": moved}, controller=lambda t, o: seen.append(o),
               control_every_s=1.0)  # fmt: skip
    assert r.sites["solo"].service_level == 1.0 and r.targets_applied == 1
    first = seen[0].sites["solo"]
    assert first.queues["billing-voice"].staffed == 3 and first.queues["sales-voice"].staffed == 0
    assert dict(first.moved) == {"solo-other-001": "solo-bill", "solo-other-002": "solo-bill"}


def test_without_targets_or_with_an_idle_controller_nothing_changes():
    site = two_group_site(billing=2, other=1)
    calls = [call(f"c{i}", 5.0 + 7 * i, 40.0 + i) for i in range(20)]
    plain = replay([site], calls, NO_OVERFLOW, seed=3).to_dict()
    idle = replay([site], calls, NO_OVERFLOW, seed=3, controller=lambda t, o: None, control_every_s=2.5).to_dict()
    assert idle == plain and plain["targets_applied"] == 0


def test_a_busy_agents_move_waits_until_its_call_ends():
    """The only billing agent holds a 100 s call when targets move it to the sales group:
    the move is pending until the call completes, then done; a newer target set without
    the agent sends it home."""
    site = two_group_site(billing=1, other=1)
    calls = [call("c1", 10.0, 100.0), call("s1", 300.0, 5.0, skill="sales")]
    seen: dict[float, dict] = {}

    def controller(t, obs):
        seen[t] = dict(obs.sites["solo"].moved)
        if t == 20.0:
            return {"solo": SiteTargets(groups={"solo-bill-001": "solo-other"})}
        if t == 200.0:
            return {"solo": SiteTargets()}  # the agent is no longer named: home
        return None

    r = replay([site], calls, NO_OVERFLOW, controller=controller, control_every_s=10.0)
    assert sorted(seen) == [10.0 * k for k in range(1, 31)]  # every 10 s from the first call to the last
    assert seen[30.0] == {} and seen[100.0] == {}  # pending: still on its call (answered at 10, ends at 110)
    assert seen[120.0] == {"solo-bill-001": "solo-other"}  # moved once the call completed
    assert seen[210.0] == {}  # home again
    assert r.targets_applied == 2 and r.sites["solo"].answered == 2


def test_targets_apply_after_the_delay_and_set_policy_and_mode():
    """A controller's wait factor and surge mode take effect apply_delay_s later: surge
    puts the back-office agents (billing skill) on calls."""
    site = two_group_site(billing=1, other=3, backoffice=True)
    calls = [call(f"c{i}", 10.0 * i + 1, 500.0) for i in range(1, 12)]
    staffed: dict[float, int] = {}

    def controller(t, obs):
        staffed[t] = obs.sites["solo"].queues["billing-voice"].staffed
        if t == 31.0:
            return {"solo": SiteTargets(mode="surge", wait_factor={"billing-voice": 2.0})}
        return None

    policy = parse_policy({"default": {"wait_threshold": {"factor": 0.5}}})
    r = replay([site], calls, policy, controller=controller, control_every_s=10.0, apply_delay_s=15.0)
    assert staffed[31.0] == 1 and staffed[41.0] == 1  # applied at 46
    assert staffed[51.0] == 4 and r.targets_applied == 1
    with pytest.raises(ValueError, match="no agent"):
        replay([site], calls, policy, targets={"solo": SiteTargets(groups={"nobody": "solo-bill"})})
    with pytest.raises(ValueError, match="control_every_s"):
        replay([site], calls, policy, controller=lambda t, o: None)


def test_targets_close_a_partner_and_raise_wait_factors_in_the_policy():
    """On the example cluster: CallPro closed to both in-house sites gets no overflow;
    higher wait factors at Montréal send fewer calls away."""
    sc = example_scenario(horizon_s=1800.0)
    calls = arrivals_for(sc, 1)
    sites, policy = list(sc.sites), sc.policy
    base = replay(sites, calls, policy)
    assert base.sites["callpro"].overflow_in > 0
    closed = {s: SiteTargets(partners={"callpro": False}) for s in ("lyon", "montreal")}
    r = replay(sites, calls, policy, targets=closed)
    assert r.sites["callpro"].overflow_in == 0 and r.targets_applied == 1
    patient = {"montreal": SiteTargets(wait_factor={q.name: 5.0 for q in sc.site("montreal").queues})}
    r = replay(sites, calls, policy, targets=patient)
    assert r.sites["montreal"].overflow_out < base.sites["montreal"].overflow_out


# --- candidates, CRN, batches ------------------------------------------------------------


def example_scenario(horizon_s: float = 600.0, seeds=(1, 2)) -> Scenario:
    return scenario_from_files(ROOT / "sites", ROOT / "sites" / "overflow-policy.json", None, horizon_s=horizon_s,
                               seeds=seeds, partners_dir=ROOT / "sites" / "partners")


def test_candidates_are_deterministic_and_valid_for_the_site_files():
    sc = example_scenario()
    a, b = generate_candidates(sc), generate_candidates(example_scenario())
    assert [(c.name, {s: t.to_dict() for s, t in c.targets.items()}) for c in a] == \
           [(c.name, {s: t.to_dict() for s, t in c.targets.items()}) for c in b]  # fmt: skip
    assert a[0].name == "no change" and a[0].kind == "none" and not a[0].targets
    assert {c.kind for c in a} == {"none", "move", "wait_factor", "partner", "mode"}
    assert len({c.name for c in a}) == len(a)
    partners = set(sc.policy.partners)
    cfgs = {s.site.name: s for s in sc.sites}
    for c in a:
        for site, t in c.targets.items():
            check_targets(cfgs[site], t, partners)
        if c.kind == "move":
            cfg = cfgs[c.site]
            groups = {aid: g.id for aid, g in cfg.agent_profiles().items()}
            (target,) = set(c.targets[c.site].groups.values())
            assert len(c.targets[c.site].groups) == c.moves
            assert all(groups[aid] != target for aid in c.targets[c.site].groups)  # moved out of another group
        assert c.site != "callpro"  # the partner's agents are not ours


def test_common_random_numbers_every_candidate_plays_the_same_calls():
    sc = example_scenario(horizon_s=300.0, seeds=(5, 6))
    assert arrivals_for(sc, 5) == arrivals_for(sc, 5) and arrivals_for(sc, 5) != arrivals_for(sc, 6)
    cands = generate_candidates(sc)
    picks = [cands[0]] + [next(c for c in cands if c.kind == k) for k in ("move", "partner", "mode")]
    for seed in sc.seeds:
        offered = {tuple(v[2] for v in run_unit(sc, c, seed)["sites"].values()) for c in picks}
        assert len(offered) == 1 and sum(next(iter(offered))) == len(arrivals_for(sc, seed))


@pytest.mark.parametrize("costs,min_s", [([0.03] * 10, 0.1), ([0.5] * 5, 0.1), ([0.01, 0.2, 0.05, 0.05, 0.01], 0.1),
                                         ([0.02] * 3, 0.1), ([0.3] * 7, 1.0)])
def test_every_batch_has_at_least_the_work_bound(costs, min_s):
    units = [(i, 0) for i in range(len(costs))]
    batches = plan_batches(units, costs, min_s)
    assert [u for b in batches for u in b] == units  # all, in order
    work = [sum(costs[u[0]] for u in b) for b in batches]
    if sum(costs) >= min_s:
        assert all(w >= min_s - 1e-12 for w in work), work
    else:
        assert len(batches) == 1
    assert plan_batches([], [], min_s) == []


def test_batches_of_the_example_scenario_by_the_estimate():
    sc = example_scenario(horizon_s=120.0)  # ~35 calls: ~0.01 s a unit, several units a batch
    cands = generate_candidates(sc)
    units = all_units(sc, cands)
    cost = unit_cost_s(sc)
    batches = plan_batches(units, [cost] * len(units))
    assert len(batches) < len(units)
    assert all(len(b) * cost >= 0.1 for b in batches)


# --- the search ---------------------------------------------------------------------------


def surge_scenario(seeds=(1, 2), horizon_s: float = 1800.0) -> Scenario:
    """Paris gets a billing surge it cannot carry (3 agents, ~5 Erlangs); Nice has 2
    billing agents and 6 idle back-office agents with the billing skill (on calls only
    in surge, or moved into Nice's billing group). Overflow: wait threshold 0.5."""
    paris = two_group_site("paris", billing=3, other=1)
    nice = two_group_site("nice", billing=2, other=6, backoffice=True)
    policy = parse_policy({"default": {"wait_threshold": {"factor": 0.5}}})
    streams = (Stream(site="paris", skill="billing", rate_per_h=5 * 3600 / 180, handle_s=180.0, patience_s=120.0),
               Stream(site="nice", skill="billing", rate_per_h=1 * 3600 / 180, handle_s=180.0, patience_s=120.0))
    return Scenario(sites=(paris, nice), policy=policy, streams=streams, horizon_s=horizon_s, seeds=seeds)


def test_the_search_picks_the_known_better_plan():
    sc = surge_scenario()
    cands = generate_candidates(sc)
    kinds = {(c.kind, c.site) for c in cands}
    assert ("move", "nice") in kinds and ("mode", "nice") in kinds
    results, stats = evaluate(sc, cands)
    assert stats.runner == "serial" and stats.units == len(cands) * 2
    found = search(sc, cands, results)
    before = found.evaluations[0]
    assert found.best.site == "nice" and found.best.kind in ("move", "mode"), found.best.name
    assert found.best.service_level > before.service_level + 0.05
    # Plan: the targets of the site it changes, per-site expectations before/after
    assert set(found.plan.sites) == {"nice"} and found.plan.candidate == found.best.name
    assert found.plan.expected["paris"]["after"] > found.plan.expected["paris"]["before"]
    assert found.plan.id and found.plan.cost["moves"] == found.best.moves


def test_ties_go_to_the_cheaper_candidate():
    sc = surge_scenario(seeds=(1,), horizon_s=300.0)
    same = Candidate("no change", {})
    dear = Candidate("the same, with a move", {}, moves=3, kind="move", site="nice")
    summary = run_unit(sc, same, 1)
    found = search(sc, [same, dear], {(0, 0): summary, (1, 0): summary})
    assert found.best.index == 0
    found = search(sc, [dear, same], {(0, 0): summary, (1, 0): summary})
    assert found.best.index == 1


# --- serial == Ray, and the CLI -----------------------------------------------------------


def test_serial_and_ray_give_bit_identical_results(ray_local):
    sc = surge_scenario(seeds=(1, 2), horizon_s=600.0)
    cands = generate_candidates(sc)
    serial, _ = evaluate(sc, cands)
    on_ray, stats = evaluate(sc, cands, session=ray_local, seconds_per_call=1e-3, min_task_s=0.1)
    units = all_units(sc, cands)
    assert stats.runner == "ray" and stats.tasks == len(plan_batches(units, [unit_cost_s(sc, 1e-3)] * len(units)))
    assert 1 < stats.tasks < len(units)  # batched: several units a task
    a = json.dumps(search(sc, cands, serial).to_dict(), sort_keys=True)
    b = json.dumps(search(sc, cands, on_ray).to_dict(), sort_keys=True)
    assert a == b
    assert ray_local.address.startswith("127.0.0.1:")


def write_cluster(tmp_path: Path) -> tuple[Path, Path]:
    sites = tmp_path / "sites"
    sites.mkdir()
    for name, billing, other, bo in (("paris", 3, 1, False), ("nice", 2, 6, True)):
        cfg = two_group_site(name, billing=billing, other=other, backoffice=bo)
        (sites / f"{name}.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    (sites / "overflow-policy.json").write_text(json.dumps({"default": {"wait_threshold": {"factor": 0.5}}}))
    traffic = tmp_path / "traffic.yaml"
    traffic.write_text(yaml.safe_dump({"version": 1, "sites": {
        "paris": {"streams": [{"queue": "billing-voice", "erlangs": 5, "handle": {"dist": "exponential", "mean_s": 180},
                               "patience": {"dist": "exponential", "mean_s": 120}}]},
        "nice": {"streams": [{"queue": "billing-voice", "erlangs": 1, "handle": {"dist": "exponential", "mean_s": 180},
                              "patience": {"dist": "exponential", "mean_s": 120}}]},
    }}))  # fmt: skip
    return sites, traffic


def test_cli_whatif_serial(tmp_path):
    sites, traffic = write_cluster(tmp_path)
    args = ["capacity", "whatif", "--sites", str(sites), "--traffic", str(traffic), "--horizon-s", "1800",
            "--replications", "2", "--serial"]
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["run"]["runner"] == "serial" and doc["candidates"] == len(doc["evaluations"])
    assert doc["best"]["site"] == "nice" and doc["plan"]["sites"].keys() == {"nice"}
    r = CliRunner().invoke(app, args, env={"NO_COLOR": "1", "COLUMNS": "160"})
    assert r.exit_code == 0 and "best:" in r.output and "nice" in r.output, r.output
    r = CliRunner().invoke(app, ["capacity", "whatif", "--sites", str(sites), "--traffic", str(tmp_path / "none.yaml"),
                                 "--serial"])  # fmt: skip
    assert r.exit_code == 2


def test_cli_whatif_on_ray(tmp_path, ray_local):
    """A second driver on the session's local Ray (--ray-address): the same answer."""
    sites, traffic = write_cluster(tmp_path)
    args = ["capacity", "whatif", "--sites", str(sites), "--traffic", str(traffic), "--horizon-s", "600",
            "--replications", "2", "--json"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    r = subprocess.run([sys.executable, "-m", "router.cli", *args, "--ray-address", ray_local.address],
                       check=False, capture_output=True, text=True, timeout=90, env=env, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert doc["run"]["runner"] == "ray"
    serial = CliRunner().invoke(app, [*args, "--serial"])
    assert serial.exit_code == 0, serial.output
    ser = json.loads(serial.output)
    assert {k: doc[k] for k in ("best", "plan", "evaluations")} == {k: ser[k] for k in ("best", "plan", "evaluations")}


def test_bad_scenarios_and_profiles_are_refused_naming_the_field():
    sc = surge_scenario()
    with pytest.raises(ValueError, match="ghost"):
        generate_candidates(dataclasses.replace(sc, current={"nice": SiteTargets(groups={"ghost": "nice-bill"})}))
    with pytest.raises(ValueError, match="seeds"):
        generate_candidates(dataclasses.replace(sc, seeds=(1, 1)))
    with pytest.raises(TrafficError, match=r"sites.nice.streams\[0\].queue"):
        streams_from_profile({"sites": {"nice": {"streams": [{"queue": "nope", "rate_per_h": 1,
                                                               "handle": {"dist": "exponential", "mean_s": 60}}]}}},
                             list(sc.sites))  # fmt: skip


def test_a_session_inside_the_session_shares_it(ray_local):
    from router.capacity.raykit import ray_session

    with ray_session() as inner:
        assert inner.start_s == 0.0 and inner.address == ray_local.address
    assert ray_local.ray.is_initialized()  # the outer one is still up


# --- cluster-aware candidates (issue 12, part 6) -------------------------------------------


def peer_scenario(policy: OverflowPolicy | None = None, seeds=(1, 2)) -> Scenario:
    """Paris surges in billing (3 agents, ~5 Erlangs); Nice's own short queue is sales
    (6 sales-only agents, 3 Erlangs), its billing queue has 2 agents and little work.
    Nice's sales agents could take Paris's overflow only from Nice's billing group."""
    paris = two_group_site("paris", billing=3, other=1)
    nice = two_group_site("nice", billing=2, other=6)
    policy = policy or parse_policy({"default": {"wait_threshold": {"factor": 0.5}}})
    streams = (Stream(site="paris", skill="billing", rate_per_h=5 * 3600 / 180, handle_s=180.0, patience_s=120.0),
               Stream(site="nice", skill="billing", rate_per_h=0.5 * 3600 / 180, handle_s=180.0, patience_s=120.0),
               Stream(site="nice", skill="sales", rate_per_h=2 * 3600 / 180, handle_s=180.0, patience_s=120.0))
    return Scenario(sites=(paris, nice), policy=policy, streams=streams, horizon_s=1800.0, seeds=seeds)


def test_cluster_aware_candidates_move_a_peers_agents_where_overflow_reaches_them():
    sc = peer_scenario()
    cands = generate_candidates(sc, short_queues=1)
    peer = [c for c in cands if "overflow of paris/billing-voice" in c.name]
    assert peer, [c.name for c in cands]
    for c in peer:  # Nice's sales agents into Nice's billing group, nothing at Paris
        assert c.kind == "move" and c.site == "nice" and set(c.targets) == {"nice"}
        assert set(c.targets["nice"].groups.values()) == {"nice-bill"}
        assert all(a.startswith("nice-other-") for a in c.targets["nice"].groups)
        check_targets(sc.site("nice"), c.targets["nice"])
    # Nice's own short queue (sales) gives other moves; no duplicate target sets
    keys = [json.dumps({s: t.to_dict() for s, t in c.targets.items()}, sort_keys=True) for c in cands]
    assert len(keys) == len(set(keys))
    assert not [c for c in generate_candidates(sc, short_queues=1, peer_moves=False) if "overflow of" in c.name]
    # no overflow from Paris's billing queue, or Nice excluded from it: no such candidate
    off = parse_policy({"default": {"wait_threshold": {"factor": 0.5}},
                        "sites": {"paris": {"billing-voice": {"enabled": False}}}})
    assert not [c for c in generate_candidates(peer_scenario(off), short_queues=1) if "overflow of paris/" in c.name]
    excl = parse_policy({"default": {"wait_threshold": {"factor": 0.5}, "exclude": ["nice"]}})
    assert not [c for c in generate_candidates(peer_scenario(excl), short_queues=1) if "overflow of paris/" in c.name]
    # and the search finds it worth it: Paris's calls reach the moved agents by overflow
    results, _ = evaluate(sc, cands)
    found = search(sc, cands, results)
    assert found.best.site == "nice" and found.best.kind == "move", found.best.name
    assert found.plan.expected["paris"]["after"] > found.plan.expected["paris"]["before"] + 0.05
