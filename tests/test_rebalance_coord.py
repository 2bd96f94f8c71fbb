"""The fenced plan apply on a real etcd (router.coord.election.apply_plan and
rebalance_state): one transaction, refused for a replaced leader (NotLeader) and for a
plan whose base moved (StalePlan), with nothing written in either case."""

from __future__ import annotations

import asyncio
import json

import pytest

from router.coord import NotLeader, StalePlan
from router.plans import SiteTargets, parse_target_doc
from test_coord import coords  # noqa: F401,F811 - fixture


def T(**kw) -> dict:
    return SiteTargets(**kw).to_dict()


async def test_apply_writes_every_site_and_the_generation_in_one_revision(coords):  # noqa: F811
    a = await coords("rebalancer")
    lead = await a.campaign("rebalancer", "rb-1", timeout=5)
    state = await a.rebalance_state()
    assert state["generation"] is None and state["targets"] == {}
    gen, rev = await a.apply_plan({"lyon": T(groups={"lyon-fr-001": "lyon-bi"}), "montreal": T()}, lead,
                                  base_revision=state["revision"], plan="p1")
    assert gen == 1
    after = await a.rebalance_state()
    assert after["generation"]["generation"] == 1 and after["generation"]["fencing"] == lead.token
    docs = {s: parse_target_doc(d) for s, d in after["targets"].items()}
    assert set(docs) == {"lyon", "montreal"}
    assert {d.generation for d in docs.values()} == {1} and {d.fencing for d in docs.values()} == {lead.token}
    assert {after["mod_revisions"][f"targets/{s}"] for s in docs} == {rev}  # one transaction
    assert docs["lyon"].targets.groups == {"lyon-fr-001": "lyon-bi"} and docs["lyon"].base_revision == state["revision"]
    # the next plan, computed from the new state, is generation 2
    gen2, _ = await a.apply_plan({"lyon": T()}, lead, base_revision=after["revision"], plan="p2", sites=["lyon", "montreal"])
    assert gen2 == 2


async def test_a_stale_base_is_refused_and_nothing_is_written(etcd, coords):  # noqa: F811
    a = await coords("rebalancer")
    lead = await a.campaign("rebalancer", "rb-1", timeout=5)
    base = (await a.rebalance_state())["revision"]
    await a.apply_plan({"lyon": T(wait_factor={"sales-voice": 2.0})}, lead, base_revision=base, plan="first")
    # a second plan computed from the same base (before the first was applied) is stale
    with pytest.raises(StalePlan, match="revision"):
        await a.apply_plan({"lyon": T(wait_factor={"sales-voice": 0.5})}, lead, base_revision=base, plan="second")
    state = await a.rebalance_state()
    assert state["generation"]["plan"] == "first"
    assert parse_target_doc(state["targets"]["lyon"]).targets.wait_factor == {"sales-voice": 2.0}
    # a contingency mode or the policy moving past the base makes it stale too
    base = state["revision"]
    etcd.etcdctl("put", a.keys.contingency("montreal"), json.dumps({"mode": "surge"}))
    with pytest.raises(StalePlan):
        await a.apply_plan({"lyon": T()}, lead, base_revision=base, plan="x", sites=["lyon", "montreal"])
    base = (await a.rebalance_state())["revision"]
    etcd.etcdctl("put", a.keys.policy_overflow, a.policy.to_json())
    with pytest.raises(StalePlan):
        await a.apply_plan({"lyon": T()}, lead, base_revision=base, plan="y")
    assert (await a.rebalance_state())["generation"]["plan"] == "first"
    assert lead.active  # a stale plan does not cost the leadership


async def test_a_replaced_leader_cannot_apply_even_with_a_fresh_base(coords):  # noqa: F811
    a, b = await coords("rebalancer"), await coords("rebalancer")
    old = await a.campaign("rebalancer", "rb-a", timeout=5)
    await a.resign(old)
    new = await b.campaign("rebalancer", "rb-b", timeout=5)
    assert new.token > old.token
    fresh = (await a.rebalance_state())["revision"]
    for _ in range(20):
        with pytest.raises(NotLeader, match="stale"):
            await a.apply_plan({"lyon": T(groups={"lyon-fr-001": "lyon-bi"})}, old, base_revision=fresh, plan="old")
    assert "lyon" not in (await a.rebalance_state())["targets"]
    gen, _ = await b.apply_plan({"lyon": T()}, new, base_revision=fresh, plan="new")
    assert gen == 1
    await asyncio.sleep(0)
