"""The rebalancer end to end (issue 12, part 5): real etcd, the example cluster's three
node processes, a rebalancer (router.capacity.rebalancer + its gRPC service, plaintext on
loopback) with the real what-if planner, and `tandem ctl plan / apply / get rebalancer`
as an operator runs them (subprocesses).

* plan -> apply: every node reports the generation; the moved agents are in their groups;
* the same plan applied again is stale (STALE_PLAN, exit 1) and changes nothing;
* a plan naming an agent the site does not have is INVALID_PLAN and changes nothing;
* a second rebalancer does not lead (NOT_LEADER) until the first resigns; then it
  applies under a higher epoch, which the nodes take;
* auto mode applies a plan on its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import grpc
import pytest

from router.capacity.planner import WhatIfPlanner, load_streams
from router.capacity.rebalancer import Rebalancer
from router.capacity.service import serve_rebalancer
from router.config import load_sites
from router.coord import EtcdCoordinator, EtcdSettings
from router.ctl import context
from router.overflow import parse_policy
from router.plans import parse_plan
from router.status import error_info
from router.v1 import admin_pb2, admin_pb2_grpc, rebalancer_pb2, rebalancer_pb2_grpc
from test_cluster import OBSERVER_TTL_S, observer, start, until

ROOT = Path(__file__).resolve().parent.parent
SITES = ROOT / "sites"
NAMES = ("lyon", "montreal", "callpro")


async def ctl(ctx_file: Path, *args: str, timeout: float = 120.0) -> tuple[int, str, str]:
    """``tandem ctl --context FILE ARGS…`` as a subprocess (the test's event loop keeps
    serving the rebalancer meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router.cli", "ctl", "--context", str(ctx_file), "--timeout", "10", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=ROOT, env=dict(os.environ, NO_COLOR="1", COLUMNS="200"))
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


class Rb:
    """One in-process rebalancer with its coordinator and gRPC service."""

    def __init__(self, endpoints, prefix: str, name: str, **kw) -> None:
        # a long TTL: these rebalancers hand over by resigning, never by expiry
        settings = EtcdSettings(endpoints=tuple(endpoints), prefix=prefix, ttl_s=OBSERVER_TTL_S)
        self.coord = EtcdCoordinator("rebalancer", settings)
        sites = load_sites(SITES)
        self.planner = WhatIfPlanner(load_streams(None, sites), serial=True, partners_dir=SITES / "partners")
        self.rb = Rebalancer(self.coord, name, sites, self.planner, horizon_s=600, replications=1, **kw)
        self.served = None
        self.port = 0

    async def __aenter__(self) -> "Rb":
        self.served = await serve_rebalancer(self.rb, "127.0.0.1:0", None, "rebalancer")
        self.port = self.served.port
        await self.coord.start()
        await self.coord.wait_ready(10)
        self.rb.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.rb.stop()
        await self.served.stop(0.5)
        await self.coord.close()
        self.planner.close()

    def stub(self) -> rebalancer_pb2_grpc.RebalancerStub:
        return rebalancer_pb2_grpc.RebalancerStub(grpc.aio.insecure_channel(f"127.0.0.1:{self.port}"))


async def groups(address: str) -> dict[str, str]:
    async with grpc.aio.insecure_channel(address) as ch:
        r = await admin_pb2_grpc.AdminStub(ch).ListAgents(admin_pb2.ListAgentsRequest(), timeout=5)
    return {a.agent_id: a.group for a in r.agents}


@pytest.fixture
async def cluster(etcd, etcd_prefix, tmp_path):
    """The example cluster's nodes joined to etcd with the example policy: {site: address}."""
    async with observer(etcd.endpoints, etcd_prefix) as obs:
        await obs.put_policy(parse_policy((SITES / "overflow-policy.json").read_text()))
        procs = [start(SITES / f"{n}.yaml", tmp_path, etcd.endpoints, etcd_prefix) for n in NAMES]
        nodes = [p.__enter__() for p in procs]
        try:
            await until(lambda: set(obs.members()) >= set(NAMES), 20, "the three members")
            yield obs, {n: p.address for n, p in zip(NAMES, nodes)}
        finally:
            for p in procs:
                p.__exit__(None, None, None)


async def test_plan_apply_stale_invalid_and_takeover_through_ctl(etcd, etcd_prefix, tmp_path, cluster):
    obs, addresses = cluster
    async with Rb(etcd.endpoints, etcd_prefix, "rb-one") as one:
        await until(lambda: one.rb.leading, 10, "rb-one to lead")
        ctx_file = tmp_path / "ctx.yaml"
        context.save(ctx_file, context.single("t", context.Context(sites=addresses, rebalancer=f"127.0.0.1:{one.port}")))

        # plan: shows the changes and the expected SL, saves the plan
        plan_file = tmp_path / "plan.json"
        code, out, err = await ctl(ctx_file, "plan", "--save", str(plan_file), "-o", "json")
        assert code == 0, err
        shown = json.loads(out)
        plan = parse_plan(plan_file.read_text())
        assert shown["plan_id"] == plan.id and plan.base_revision > 0 and plan.sites, shown
        assert {e["site"] for e in shown["expected"]} >= {"lyon", "montreal"}
        moved = {a: g for t in plan.sites.values() for a, g in t.groups.items()}
        assert moved, "the example traffic's best plan moves agents"  # (see the planner's choice below)

        # apply: one transaction; every node reports the generation; the agents moved
        code, out, err = await ctl(ctx_file, "apply", str(plan_file), "--yes")
        assert code == 0, err + out
        assert "applied as generation 1" in err and "every site reported it" in err, err
        site_of = {a: s for s, t in plan.sites.items() for a in t.groups}
        for agent, group in moved.items():
            assert (await groups(addresses[site_of[agent]]))[agent] == group
        code, out, err = await ctl(ctx_file, "get", "sites", "-o", "json")
        rows = {r["name"]: r for r in json.loads(out)}
        assert {n: (r["targets_generation"], r["targets_pending_moves"]) for n, r in rows.items()} == {
            n: (1, 0) for n in NAMES}, rows
        code, out, err = await ctl(ctx_file, "get", "rebalancer", "-o", "json")
        st = json.loads(out)
        assert st["leader"] and st["leader_name"] == "rb-one" and st["generation"] == "1", st
        assert {s["site"] for s in st["sites"] if s["applied"]} == set(NAMES), st

        # the same plan again: stale, exit 1, nothing written
        code, out, err = await ctl(ctx_file, "apply", str(plan_file), "--yes")
        assert code == 1 and "STALE_PLAN" in err, (code, out, err)
        assert (await obs.rebalance_state())["generation"]["generation"] == 1

        # a plan naming an agent lyon does not have: INVALID_PLAN, nothing written
        fresh = json.loads(plan_file.read_text())
        fresh["base_revision"] = (await obs.rebalance_state())["revision"]
        fresh["sites"] = {"lyon": {"groups": {"lyon-nobody-001": "lyon-sales"}}}
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(fresh))
        code, out, err = await ctl(ctx_file, "apply", str(bad), "--yes")
        assert code == 1 and "INVALID_PLAN" in err and "lyon-nobody-001" in err, (code, err)
        assert (await obs.rebalance_state())["generation"]["generation"] == 1

        # a second rebalancer follows: NOT_LEADER, until the first resigns
        async with Rb(etcd.endpoints, etcd_prefix, "rb-two") as two:
            await asyncio.sleep(0.5)
            assert not two.rb.leading
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await two.stub().PlanCapacity(rebalancer_pb2.PlanCapacityRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and error_info(e.value).reason == "NOT_LEADER"
            old_epoch = one.rb.leadership.token
            await one.rb.stop()
            await until(lambda: two.rb.leading, 15, "rb-two to take over")
            assert two.rb.leadership.token > old_epoch
            p2 = await two.rb.plan()
            done = await two.rb.apply(p2.model_copy(update={"sites": {"lyon": p2.sites.get("lyon") or plan.sites.get("lyon")}}),
                                      wait=True, timeout_s=10)
            assert done.generation == 2 and done.fencing == two.rb.leadership.token
            assert done.seconds is not None and all(r["applied"] for r in done.sites.values()), done
            assert {r["fencing"] for r in done.sites.values()} == {two.rb.leadership.token}


async def test_auto_mode_applies_a_better_plan_on_its_own(etcd, etcd_prefix, cluster):
    obs, _ = cluster
    async with Rb(etcd.endpoints, etcd_prefix, "rb-auto", auto_every_s=1.0, min_gain=-1.0) as rb:
        await until(lambda: rb.rb.plans_applied >= 1, 60, "an automatic apply")
        state = await obs.rebalance_state()
        assert state["generation"]["leader"] == "rb-auto" and state["generation"]["generation"] >= 1
        reports = await rb.rb.wait_applied(state["generation"]["generation"], 10)
        assert reports and all(r["applied"] for r in reports.values()), reports
