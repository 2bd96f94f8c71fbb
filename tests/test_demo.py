"""`tandem demo` end to end: three real node processes, simulated callers and agents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_scaled_site_divides_every_duration():
    from router.config import load_site, parse_site
    from router.sim.demo import MIN_OFFER_TIMEOUT_S, scaled_site

    lyon = load_site(REPO / "sites" / "lyon.yaml")
    scaled = parse_site(scaled_site(lyon, 60.0), "<scaled>")  # still a valid site file
    q0, s0 = lyon.queues[0], scaled.queues[0]
    assert s0.service_level.threshold_s == pytest.approx(q0.service_level.threshold_s / 60)
    assert s0.wrap_up_s == pytest.approx(q0.wrap_up_s / 60)
    assert s0.aht_s == pytest.approx(q0.aht_s / 60)
    assert s0.service_level.target == q0.service_level.target
    r0, r1 = lyon.routing, scaled.routing
    assert r1.head_start_s["vip"] == pytest.approx(r0.head_start_s["vip"] / 60)
    assert r1.repeat_window_h == pytest.approx(r0.repeat_window_h / 60)
    assert r1.service_level_window_s == pytest.approx(r0.service_level_window_s / 60)
    assert r1.offer_timeout_s == max(MIN_OFFER_TIMEOUT_S, r0.offer_timeout_s / 60)
    assert scaled.agent_profiles().keys() == lyon.agent_profiles().keys()
    assert scaled.lists == lyon.lists


def test_demo_traffic_loads_the_sites():
    from router.config import load_sites
    from router.sim.demo import demo_streams

    sites = load_sites(REPO / "sites")
    streams = demo_streams(sites)
    # Offered voice Erlangs per voice agent: unbalanced on purpose — Montréal overloaded,
    # Lyon moderately busy, the partner with agents to spare; the cluster as a whole can
    # carry it (below one Erlang per agent).
    total_e = total_agents = 0.0
    for site, low, high in (("lyon", 0.6, 0.8), ("montreal", 1.25, 1.6), ("callpro", 0.45, 0.7)):
        cfg = next(s for s in sites if s.site.name == site)
        wrap = {q.name: q.wrap_up_s for q in cfg.queues}
        erlangs = sum(st.rate_per_h / 3600 * (st.talk_s + wrap[st.name])
                      for st in streams if st.site == site and st.channel == "voice")
        agents = sum(1 for g in cfg.agent_profiles().values() if g.capacity.get("voice", 0))
        assert low <= erlangs / agents <= high, (site, erlangs, agents)
        total_e += erlangs
        total_agents += agents
    assert 0.85 <= total_e / total_agents <= 0.97


def test_pooled_site_merges_the_cluster():
    from router.config import load_sites, parse_site
    from router.sim.demo import pooled_site

    sites = load_sites(REPO / "sites")
    pooled = parse_site(pooled_site(sites), "<pooled>")
    assert set(pooled.agent_profiles()) == {a for s in sites for a in s.agent_profiles()}
    assert {q.name for q in pooled.queues} == {q.name for s in sites for q in s.queues}


def test_demo_policy_is_valid_and_keeps_high_value_in_house():
    from router.sim.demo import DEMO_POLICY
    from router.overflow import parse_policy

    p = parse_policy(DEMO_POLICY)
    assert p.partners["callpro"].max_value == "standard"
    assert p.rules_for("montreal", "billing-en-voice").wait_threshold is not None


def _rec(call_id: str, site: str, outcome: str, answered: bool = True):
    from router.sim.ledger import CallRecord

    r = CallRecord(call_id=call_id, site=site, stream="q", caller="+1", talk_s=1.0, patience_s=None,
                   wake=None, acked_at=1.0, outcome=outcome)  # type: ignore[arg-type]
    if answered:
        r.answered_at, r.agent_id = 2.0, "a-1"
    return r


def _c(call_id, state, site, n=0, queue="q", answered=True):
    from router.v1 import types_pb2

    return types_pb2.Call(call_id=call_id, state=state, site=site, transfer_count=n, queue=queue,
                          offered_at=1.0, queued_at=1.0 + 0.5 * n, answered_at=2.0 if answered else 0.0,
                          agent_id="a-1" if answered else "", ended_at=3.0)


def test_reconcile_follows_transfers():
    """After an overflow the offer site holds a TRANSFERRED record; the call counts
    where it is owned, exactly once, and for its origin queue in the KPIs."""
    from router.config import load_sites
    from router.sim.ledger import Ledger
    from router.sim.report import overflow_counts, ownership, queue_kpis, reconcile
    from router.v1 import types_pb2 as t

    X, C, _, A = t.CALL_STATE_TRANSFERRED, t.CALL_STATE_COMPLETED, t.CALL_STATE_QUEUED, t.CALL_STATE_ABANDONED
    records = [
        _rec("r-a-1", "a", "completed"),  # a -> b, answered at b: fine
        _rec("r-a-2", "a", "completed"),  # a -> b -> c: fine
        _rec("r-a-3", "a", "completed"),  # TRANSFERRED at a, nowhere else: lost
        _rec("r-a-4", "a", "completed"),  # TRANSFERRED at a, but a live copy at a and b: duplicate
        _rec("r-a-5", "a", "abandoned", answered=False),  # a -> b, abandoned at b: fine
        _rec("r-a-6", "a", "completed"),  # a -> b: fine
        _rec("r-a-7", "a", "completed"),  # b's live copy older than a's hand-over: duplicate
    ]
    nodes = {
        "a": [_c("r-a-1", X, "a", 1, answered=False), _c("r-a-2", X, "a", 1, answered=False),
              _c("r-a-3", X, "a", 1, answered=False), _c("r-a-4", C, "a"),
              _c("r-a-5", X, "a", 1, answered=False), _c("r-a-6", X, "a", 1, answered=False),
              _c("r-a-7", X, "a", 2, answered=False)],
        "b": [_c("r-a-1", C, "b", 1, queue="qb"), _c("r-a-2", X, "b", 2, queue="qb", answered=False),
              _c("r-a-4", C, "b", 1), _c("r-a-5", A, "b", 1, queue="qb", answered=False),
              _c("r-a-6", C, "b", 1), _c("r-a-7", C, "b", 1)],
        "c": [_c("r-a-2", C, "c", 2, queue="qc")],
    }
    own = ownership(nodes)
    assert own["r-a-1"].site == "b" and own["r-a-1"].origin_site == "a" and own["r-a-1"].origin_queue == "q"
    assert own["r-a-2"].site == "c" and own["r-a-2"].problem == ""
    assert own["r-a-3"].problem == "lost" and own["r-a-4"].problem == "duplicate"
    assert own["r-a-7"].problem == "duplicate"
    rec = reconcile(records, nodes, Ledger(), "r")
    assert rec.lost == 1, rec.examples
    assert rec.duplicates == 2, rec.examples
    assert rec.transferred == 6 and rec.offered == 7
    flows = overflow_counts(nodes)
    # Consistent calls only (r-a-3, r-a-4, r-a-7 are counted by reconcile()).
    assert (flows["a"].out, flows["a"].in_) == (4, 0)
    assert (flows["b"].out, flows["b"].in_) == (1, 4)
    assert (flows["c"].out, flows["c"].in_) == (0, 1)
    # KPIs: every call once, under its origin site and queue.
    kpis = queue_kpis({"a": nodes["a"], "b": nodes["b"][:2], "c": nodes["c"]}, {}, 1.0)
    assert set(kpis["a"]) == {"q"} and kpis["a"]["q"].offered == 7
    assert kpis["a"]["q"].answered == 3  # r-a-1, r-a-2 from their owners; r-a-4 at a
    assert not kpis.get("b") and not kpis.get("c")
    sites = load_sites(REPO / "sites")
    assert sites  # the example sites parse (the pooled reference merges them)


def _node_pids_under(root: Path) -> list[int]:
    """Processes still running a node on a data dir under ``root`` (should be none)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"node" in cmd and any(str(root).encode() in part for part in cmd):
            pids.append(int(d.name))
    return pids


@pytest.mark.slow
def test_demo_json(tmp_path):
    """The cluster demo: etcd, three nodes, overflow, and both reference runs."""
    data = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "router.cli", "demo", "--duration", "12", "--json",
         "--data-dir", str(data), "--sites", str(REPO / "sites")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"stdout must hold only the JSON line, got:\n{proc.stdout}"
    s = json.loads(lines[0])

    assert s["lost"] == 0 and s["duplicates"] == 0, proc.stderr[-4000:]
    assert s["offered"] > 0 and s["answered"] > 0
    assert s["offered"] == s["answered"] + s["abandoned"] + s["rejected"]
    assert 0 <= s["service_level"] <= 1 and s["asa_s"] >= 0
    assert s["duration_s"] == pytest.approx(12 * s["time_scale"])
    assert set(s["sites"]) == {"lyon", "montreal", "callpro"}
    for key in ("offered", "answered", "abandoned", "rejected"):
        assert sum(site[key] for site in s["sites"].values()) == s[key], key
    # Overflow happened, and every hand-over out of one site is one into another.
    outs = {n: site["overflow_out"] for n, site in s["sites"].items()}
    ins = {n: site["overflow_in"] for n, site in s["sites"].items()}
    assert sum(outs.values()) > 0, proc.stderr[-4000:]
    assert sum(outs.values()) == sum(ins.values()) == s["overflow"]
    assert outs["montreal"] > 0, outs  # the overloaded center hands work on
    # The BPO partner on the partner API (blueline: a simulated ACD in the demo's process)
    # took some of the overflow, within its contract as it saw it; the calls it served
    # are the ones the origins handed to it for good.
    assert set(s["partners"]) == {"blueline"}, s["partners"]
    bl = s["partners"]["blueline"]
    assert bl["cap_exceeded"] == 0 and bl["fields_outside_contract"] == 0, bl
    assert bl["accepted"] > 0 and bl["offered"] == bl["accepted"] + bl["declined"], bl
    assert bl["handled"] + bl["abandoned"] + bl["handed_back"] <= bl["accepted"] and 1 <= bl["max_concurrent"] <= 6, bl
    assert sum(site["partner_out"] for site in s["sites"].values()) == bl["handled"] + bl["abandoned"], (bl, s["sites"])
    # The reference figures on the same traffic.
    for key in ("isolated_service_level", "pooled_service_level"):
        assert 0 <= s[key] <= 1, key
    assert s["pooled_service_level"] >= s["isolated_service_level"]
    for name, site in s["sites"].items():
        assert site["offered"] == site["answered"] + site["abandoned"] + site["rejected"], name
        assert site["answered"] > 0, name
        assert 0 <= site["service_level"] <= 1, name
        assert site["aht_s"] > 0, name
        assert 0 <= site["abandon_rate"] <= 1, name
        assert site["csat"] is None or 1 <= site["csat"] <= 5, name
    # The KPI tables went to stderr, with every site in them.
    for name in s["sites"]:
        assert name in proc.stderr
    assert _node_pids_under(data) == [], "the demo left node or etcd processes behind"
    assert not list((data / "etcd").glob("etcd-*")), "the demo left etcd's data behind"
