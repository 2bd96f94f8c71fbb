"""The reference partner gateway (router.partner) against real nodes: real etcd, two real
in-house node processes, the simulated partner ACD over real gRPC.

``alpha`` and ``beta`` have no agent signed in: every call they queue would wait for
ever, and the policy sends 100 % of their queues to the partner ``blueline`` (a split),
whose contract in etcd caps it at ``CAP`` calls at once for the whole cluster and lets
it see the caller as a token only. One :class:`PartnerSim` connects to both nodes.

Checked: every call offered at either node ends handled by the partner exactly once
(origin TRANSFERRED, the outcome reported: the origin's view carries the partner's
answer time); the partner never held more than CAP calls at once, across both nodes,
and never received a field outside its contract; a gateway that crashes holding calls
is told them again by Assigns on its successor's new streams, which serves them — calls
it was never offered on those streams — once each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import yaml

from node_fixtures import Stubs, node_process, site_dict
from test_cluster import node_env, observer, offer
from router.contracts import contract_json, parse_contract
from router.coord.keys import Keys
from router.partner import PartnerSim
from router.v1 import routing_pb2
from router.v1 import types_pb2 as t

PARTNER = "blueline"
CAP = 3
CONTRACT = {
    "partner": PARTNER,
    "skills": ["billing", "support"],
    "caps": {"concurrent": CAP, "per_second": 50},
    "value_tiers": ["low", "standard"],
    "offer_timeout_s": 2.0,
    "scopes": {"caller": "token", "profile": "none"},
}
POLICY = {"max_peer_age_s": 3.0, "default": {"split": {"percent": 100, "to": [PARTNER]}}}


def contract():
    return parse_contract(json.dumps(CONTRACT))


@contextlib.asynccontextmanager
async def two_nodes(tmp_path: Path, etcd, prefix: str):
    async with observer(etcd.endpoints, prefix) as obs:
        await obs.put_policy(POLICY)
        await obs.put_document(Keys(prefix).partner_contract(PARTNER), contract_json(contract()))
        env = node_env(etcd.endpoints, prefix)
        files = {}
        for name in ("alpha", "beta"):
            d = site_dict()
            d["site"]["name"] = name
            files[name] = tmp_path / f"{name}.yaml"
            files[name].write_text(yaml.safe_dump(d))
        with node_process(files["alpha"], tmp_path / "alpha", sync="none", env=env) as a, \
                node_process(files["beta"], tmp_path / "beta", sync="none", env=env) as b:
            sa, sb = Stubs.connect(a.address), Stubs.connect(b.address)
            try:
                yield {"alpha": (a, sa), "beta": (b, sb)}
                assert a.alive() and b.alive()
            finally:
                await sa.channel.close()
                await sb.channel.close()


async def connected(sim: PartnerSim, timeout: float = 15.0) -> None:
    """Until both nodes welcomed the gateway (they refuse it until they read the contract)."""
    deadline = time.monotonic() + timeout
    while not all(s.connected.is_set() for s in sim.sessions):
        assert time.monotonic() < deadline, [s.last_error for s in sim.sessions]
        await asyncio.sleep(0.05)


async def call_of(stubs: Stubs, cid: str) -> t.Call:
    return (await stubs.routing.GetCall(routing_pb2.GetCallRequest(call_id=cid), timeout=5)).call


async def until_reported(sim: PartnerSim, ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        missing = [c for c in ids if not (c in sim.records and sim.records[c].reported)]
        if not missing:
            return
        if time.monotonic() > deadline:
            states = {c: (sim.records[c].state if c in sim.records else None) for c in missing}
            raise AssertionError(f"not reported after {timeout} s: {states}; {sim.summary()}")
        await asyncio.sleep(0.1)


async def check_owned_by_partner(nodes: dict, sim: PartnerSim, ids: dict[str, str]) -> None:
    """Each call: TRANSFERRED to the partner at its origin with the partner's answer time,
    handled by the sim exactly once, reported by the sim once (no conflicting report)."""
    for cid, site in ids.items():
        rec = sim.records[cid]
        assert (rec.handled, rec.reported, rec.errors) == (1, True, []), rec
        assert rec.site == site, rec
        call = await call_of(nodes[site][1], cid)
        assert call.state == t.CALL_STATE_TRANSFERRED, (cid, call)
        assert rec.answered_at > 0 and call.answered_at == rec.answered_at, (cid, call.answered_at, rec)


async def test_sim_takes_both_nodes_calls_within_the_cap_and_scopes(etcd, etcd_prefix, tmp_path):
    async with two_nodes(tmp_path, etcd, etcd_prefix) as nodes:
        sim = PartnerSim(PARTNER, [nodes["alpha"][0].address, f"beta={nodes['beta'][0].address}"], contract(),
                         {"billing": 4, "support": 2}, aht_s=0.8, wrap_s=0.1, answer_delay_s=0.2, seed=7)
        await sim.start()
        try:
            await connected(sim)
            assert {s.site for s in sim.sessions} == {"alpha", "beta"}
            ids = {f"ps-{site[0]}-{i}": site for i in range(10) for site in ("alpha", "beta")}
            for cid, site in ids.items():
                await nodes[site][1].routing.OfferCall(offer(cid), timeout=5)
            await until_reported(sim, list(ids), 45)
            await check_owned_by_partner(nodes, sim, ids)
            s = sim.summary()
            assert s["cap_exceeded"] == 0 and s["fields_outside_contract"] == 0, s
            assert s["max_concurrent"] == CAP, s  # the cap (shared by both nodes) bounded it
            assert s["handled"] + s["abandoned"] == len(ids) and s["report_errors"] == 0, s
            assert s["accepted"] >= len(ids) and s["offered"] == s["accepted"] + s["declined"], s
            # what it saw: the base fields and a caller token, never the number
            for cid in ids:
                got = sim.records[cid].fields
                assert got["caller_token"].startswith("t_") and "caller" not in got, got
                assert set(got) <= {"call_id", "offer_no", "skill", "channel", "language", "value_tier",
                                    "wait_s", "timeout_s", "caller_token"}, got
        finally:
            await sim.stop()
        assert all(not s.connected.is_set() for s in sim.sessions)


async def test_a_crashed_gateways_calls_are_served_by_its_successor(etcd, etcd_prefix, tmp_path):
    async with two_nodes(tmp_path, etcd, etcd_prefix) as nodes:
        addrs = [nodes["alpha"][0].address, nodes["beta"][0].address]
        first = PartnerSim(PARTNER, addrs, contract(), {"billing": 2}, aht_s=600.0, answer_delay_s=0.0, seed=1)
        await first.start()
        ids = {"cr-a-0": "alpha", "cr-b-0": "beta"}
        try:
            await connected(first)
            for cid, site in ids.items():
                await nodes[site][1].routing.OfferCall(offer(cid), timeout=5)
            deadline = time.monotonic() + 15
            while not all(first.records.get(c) and first.records[c].state == "talking" for c in ids):
                assert time.monotonic() < deadline, {c: first.records.get(c) for c in ids}
                await asyncio.sleep(0.05)
        finally:
            await first.abort()  # holding both calls, nothing reported
        for cid, site in ids.items():
            assert (await call_of(nodes[site][1], cid)).state == t.CALL_STATE_TRANSFERRED
        second = PartnerSim(PARTNER, addrs, contract(), {"billing": 2}, aht_s=0.5, wrap_s=0.1,
                            answer_delay_s=0.1, seed=2)
        await second.start()
        try:
            await until_reported(second, list(ids), 20)
            for cid in ids:
                rec = second.records[cid]
                assert rec.offers == 0 and rec.assigns >= 1, rec  # never offered to this gateway
            await check_owned_by_partner(nodes, second, ids)
            assert second.summary()["cap_exceeded"] == 0
        finally:
            await second.stop()


def test_reconciliation_counts_each_partner_call_once():
    """The demo's reconciliation (router.sim.report) with the partner's records: a call the
    partner owns is served there exactly once and agrees with the caller's account; aborted
    or handed-back partner attempts leave a call that stayed home consistent."""
    from router.sim.ledger import CallRecord, Ledger
    from router.sim.report import PartnerCall, overflow_counts, ownership, queue_kpis, reconcile

    X, C = t.CALL_STATE_TRANSFERRED, t.CALL_STATE_COMPLETED

    def rec(cid: str, outcome: str, answered_at: float = 0.0) -> CallRecord:
        r = CallRecord(call_id=cid, site="a", stream="q", caller="+1", talk_s=1.0, patience_s=None,
                       wake=None, acked_at=1.0, outcome=outcome)  # type: ignore[arg-type]
        r.answered_at = answered_at
        return r

    def call(cid: str, state: int, site: str, n: int, answered_at: float = 0.0) -> t.Call:
        return t.Call(call_id=cid, state=state, site=site, transfer_count=n, queue="q", offered_at=1.0,
                      queued_at=1.0, answered_at=answered_at, ended_at=3.0)

    def p(site: str = "a", **kw) -> PartnerCall:
        return PartnerCall(PARTNER, site, **{"offers": 1, "reported": True, "ended_at": 3.0, **kw})

    records = [
        rec("p-1", "completed", 2.0),  # served by the partner: fine
        rec("p-2", "abandoned"),  # the caller hung up before the partner answered: fine
        rec("p-3", "completed", 2.0),  # declined by the partner, answered at home: fine
        rec("p-4", "completed", 2.0),  # TRANSFERRED to the partner, which never heard of it: lost
        rec("p-5", "completed", 2.0),  # served twice by the partner: duplicate
        rec("p-6", "completed", 2.0),  # the partner says nobody answered: lost
        rec("p-7", "completed", 2.0),  # handed back, answered at home: fine
        rec("p-8", "completed", 2.0),  # served by the partner and live at b: duplicate
    ]
    nodes = {
        "a": [call("p-1", X, "a", 1, 2.0), call("p-2", X, "a", 1), call("p-3", C, "a", 1, 2.0), call("p-4", X, "a", 1),
              call("p-5", X, "a", 1, 2.0), call("p-6", X, "a", 1), call("p-7", C, "a", 1, 2.0),
              call("p-8", X, "a", 1, 2.0)],
        "b": [call("p-8", C, "b", 1, 2.0)],
    }
    partners = {
        "p-1": p(handled=1, answered_at=2.0), "p-2": p(handled=1), "p-3": p(), "p-5": p(handled=2, answered_at=2.0),
        "p-6": p(handled=1), "p-7": p(handed_back=1), "p-8": p(handled=1, answered_at=2.0),
    }
    own = ownership(nodes, partners, {r.call_id: "a" for r in records})
    assert (own["p-1"].site, own["p-1"].partner, own["p-1"].problem) == (f"partner:{PARTNER}", PARTNER, "")
    assert own["p-3"].problem == "" and own["p-3"].site == "a"
    assert own["p-4"].problem == "lost" and own["p-5"].problem == "duplicate" and own["p-8"].problem == "duplicate"
    r = reconcile(records, nodes, Ledger(), "p", partners)
    assert (r.lost, r.duplicates, r.unfinished) == (2, 2, 0), r.examples
    assert any("p-6" in e for e in r.examples) and any("p-4" in e for e in r.examples)
    flows = overflow_counts(nodes, partners, {r.call_id: "a" for r in records})
    assert (flows["a"].to_partners, flows["a"].out, flows["b"].in_) == (3, 0, 0)  # p-1, p-2, p-6
    k = queue_kpis(nodes, {}, 1.0, partners=partners)["a"]["q"]
    assert k.offered == 8 and k.abandoned == 2 and k.active == 1  # p-2, p-6 abandoned; p-4 unknown
