"""Site nodes apply the rebalancer's fenced targets live (router.node.targets): real etcd,
a real node process (SIGKILLed and restarted), and an in-process node for the overflow
decisions.

The leader is an EtcdCoordinator in the test that wins the ``rebalancer`` election and
writes plans with ``apply_plan`` (one fenced transaction); a deposed leader's late write
is a plain put of a document with a lower fencing epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import yaml
from node_fixtures import AgentSession, Stubs, running_node, site_dict
from node_fixtures import until as until_async
from test_cluster import observer, offer, start, until, write_site

from router.config import parse_site
from router.coord import EtcdCoordinator, EtcdSettings
from router.coord.base import Member
from router.overflow import LoadSnapshot, QueueLoad
from router.v1 import admin_pb2, agents_pb2, routing_pb2
from router.v1 import types_pb2 as t

FR = "billing-fr-voice"


async def groups(stubs: Stubs) -> dict[str, str]:
    r = await stubs.admin.ListAgents(admin_pb2.ListAgentsRequest(), timeout=5)
    return {a.agent_id: a.group for a in r.agents}


async def report(obs: EtcdCoordinator, site: str) -> dict | None:
    raw = await obs.get_document(obs.keys.applied(site))
    return json.loads(raw) if raw is not None else None


async def apply(obs: EtcdCoordinator, lead, targets: dict, plan: str) -> int:
    base = (await obs.rebalance_state())["revision"]
    generation, _ = await obs.apply_plan(targets, lead, base_revision=base, plan=plan)
    return generation


async def reported(obs, site: str, what: str, timeout: float = 5.0, **want) -> dict:
    async def check():
        r = await report(obs, site)
        return r if r is not None and all(r.get(k) == v for k, v in want.items()) else None

    return await until_async(check, timeout, what)


async def in_groups(stubs: Stubs, want: dict[str, str], what: str, timeout: float = 5.0) -> dict[str, str]:
    async def check():
        g = await groups(stubs)
        return g if all(g[a] == w for a, w in want.items()) else None

    return await until_async(check, timeout, what)


async def test_targets_applied_fenced_persisted_and_busy_agent_moves_later(etcd, etcd_prefix, tmp_path):
    site_file = write_site(tmp_path, "alpha")
    async with observer(etcd.endpoints, etcd_prefix) as obs:
        lead = await obs.campaign("rebalancer", "test-leader", timeout=10)
        with start(site_file, tmp_path, etcd.endpoints, etcd_prefix) as alpha:
            s = Stubs.connect(alpha.address)
            try:
                home = await groups(s)
                assert home["fr-001"] == home["fr-002"] == home["fr-003"] == "fr"
                await until(lambda: "alpha" in obs.members(), 10, "alpha to register")

                # 1. two agents moved, a wait factor set: applied and reported within seconds
                t0 = time.monotonic()
                g1 = await apply(obs, lead, {"alpha": {"groups": {"fr-001": "bi", "fr-002": "bi"},
                                                       "wait_factor": {FR: 2.0}}}, "plan-1")
                r = await reported(obs, "alpha", "generation 1 reported", generation=g1)
                assert time.monotonic() - t0 < 5
                assert r["fencing"] == lead.token and r["plan"] == "plan-1"
                assert r["pending_moves"] == 0 and r["refused"] == 0
                g = await groups(s)
                assert (g["fr-001"], g["fr-002"], g["fr-003"]) == ("bi", "bi", "fr")

                # 2. the next plan names only one of them: the other goes home
                g2 = await apply(obs, lead, {"alpha": {"groups": {"fr-001": "bi"}}}, "plan-2")
                await reported(obs, "alpha", "generation 2 reported", generation=g2)
                await in_groups(s, {"fr-001": "bi", "fr-002": "fr"}, "fr-002 back home")

                # 3. a busy agent (on a call) moves once its call is over
                await s.agents.SignIn(agents_pb2.SignInRequest(agent_id="fr-003"), timeout=5)
                desk = await AgentSession(s, "fr-003").hello()
                await s.agents.SetState(agents_pb2.SetStateRequest(agent_id="fr-003", state=t.AGENT_STATE_READY),
                                        timeout=5)
                await s.routing.OfferCall(offer("busy-1"), timeout=5)
                asg = await desk.next("assignment")
                await desk.accept(asg.assignment_id)
                await desk.next("connected")
                placed = {"alpha": {"groups": {"fr-001": "bi", "fr-003": "bi"}}}
                g3 = await apply(obs, lead, placed, "plan-3")
                r = await reported(obs, "alpha", "generation 3 reported at once", generation=g3)
                assert r["pending_moves"] == 1, r
                await asyncio.sleep(0.3)
                assert (await groups(s))["fr-003"] == "fr"  # still on its call: not moved
                # newer targets that no longer name it drop its pending move; the next ones set it again
                g3 = await apply(obs, lead, {"alpha": {"groups": {"fr-001": "bi"}}}, "plan-3b")
                await reported(obs, "alpha", "the pending move dropped", generation=g3, pending_moves=0)
                g3 = await apply(obs, lead, placed, "plan-3")
                await reported(obs, "alpha", "the move pending again", generation=g3, pending_moves=1)
                assert (await groups(s))["fr-003"] == "fr"
                await s.routing.CompleteCall(routing_pb2.CompleteCallRequest(call_id="busy-1"), timeout=5)
                await in_groups(s, {"fr-003": "bi"}, "fr-003 moved after its call", timeout=2)
                await reported(obs, "alpha", "pending moves 0 reported", generation=g3, pending_moves=0)
                desk.cancel()

                # 4. a deposed leader's late write (lower epoch, plain put): refused, nothing moves
                stale = {"fencing": lead.token - 1, "generation": g3 + 1, "plan": "stale", "leader": "old",
                         "targets": {"groups": {"fr-002": "bi"}, "wait_factor": {FR: 9.0}}}
                await obs.put_document(obs.keys.targets("alpha"), json.dumps(stale))
                r = await reported(obs, "alpha", "the refusal reported", refused=1)
                assert (r["generation"], r["fencing"], r["plan"]) == (g3, lead.token, "plan-3")
                g = await groups(s)
                assert (g["fr-001"], g["fr-002"], g["fr-003"]) == ("bi", "fr", "bi")
            finally:
                await s.channel.close()
            alpha.kill()  # SIGKILL

        # 5. restarted on the same data: the stored (stale) document is refused again — the
        # epoch applied was journaled — and the agents are still where the targets put them
        killed_at = time.time()
        with start(site_file, tmp_path, etcd.endpoints, etcd_prefix) as alpha:
            s = Stubs.connect(alpha.address)
            try:
                async def refused_again():
                    r = await report(obs, "alpha")
                    return r if r is not None and r["ts"] > killed_at and r["refused"] == 1 else None

                r = await until_async(refused_again, 10, "the restarted node to refuse the stale document")
                assert (r["generation"], r["fencing"]) == (g3, lead.token)
                g = await groups(s)
                assert (g["fr-001"], g["fr-002"], g["fr-003"]) == ("bi", "fr", "bi")
                assert f"fencing epoch {lead.token - 1}, lower than the applied epoch {lead.token}" in \
                    alpha.log_path.read_text()

                # 6. the leader's next plan applies: both placed agents go home
                g4 = await apply(obs, lead, {"alpha": {}}, "plan-4")
                await reported(obs, "alpha", "generation 4 reported", generation=g4)
                await in_groups(s, {"fr-001": "fr", "fr-003": "fr"}, "placed agents home")
            finally:
                await s.channel.close()


@contextlib.asynccontextmanager
async def peer(endpoints, prefix: str, site: str, kind: str, expected_wait_s: float):
    """A member publishing a load with free agents in billing-fr-voice (no node behind it)."""
    c = EtcdCoordinator(site, EtcdSettings(endpoints=tuple(endpoints), prefix=prefix, ttl_s=5, op_timeout_s=1.0))
    await c.start()
    await c.wait_ready(10)
    await c.register(Member(site, "127.0.0.1:1", "emea", kind=kind))
    q = QueueLoad(skill="billing", channel="voice", language="fr", expected_wait_s=expected_wait_s, staffed=5,
                  free_agents=5)
    c.publish_load(LoadSnapshot(site=site, region="emea", kind=kind, queues={FR: q}))
    try:
        yield c
    finally:
        await c.close()


async def test_targets_close_a_partner_and_change_the_wait_factor(etcd, etcd_prefix, tmp_path):
    from router.node.cluster import ClusterLink

    doc = site_dict()
    doc["site"]["name"] = "alpha"
    site = parse_site(yaml.safe_load(yaml.safe_dump(doc)), "<alpha>")
    policy = {"default": {"wait_threshold": {"factor": 1.0}}, "max_peer_age_s": 10.0,
              "partners": {"gamma": {"max_value": "standard"}}}
    async with observer(etcd.endpoints, etcd_prefix) as obs:
        await obs.put_policy(policy)
        lead = await obs.campaign("rebalancer", "test-leader", timeout=10)
        async with peer(etcd.endpoints, etcd_prefix, "gamma", "partner", 0.0), \
                peer(etcd.endpoints, etcd_prefix, "beta", "inhouse", 5.0), \
                running_node(site, tmp_path / "alpha") as n:
            cluster = ClusterLink(n.node, EtcdSettings(endpoints=etcd.endpoints, prefix=etcd_prefix, ttl_s=2,
                                                       op_timeout_s=1.0))
            await cluster.start()
            n.node.cluster = cluster
            try:
                def ready():
                    loads = cluster.coord.peer_loads()
                    return ({"beta", "gamma"} <= set(loads) and {"beta", "gamma"} <= set(cluster.coord.members())
                            and "gamma" in cluster.coord.policy.partners)

                await until(ready, 10, "alpha to see both peers and the policy")
                assert cluster.policy is cluster.coord.policy  # no targets: the policy as it is
                # Before: 30 s expected wait > 1.0 x 20 s target; the partner has the shortest wait
                d = cluster._decide("probe-1", FR, 30.0)
                assert d.overflow and d.target == "gamma", d.to_record()

                g = await apply(obs, lead, {"alpha": {"wait_factor": {FR: 2.0}, "partners": {"gamma": False}}},
                                "plan-p")
                await until(lambda: n.node.engine.targets_applied()["generation"] == g, 5, "targets applied")
                assert cluster.policy is cluster.policy  # cached per (policy, application)
                d = cluster._decide("probe-2", FR, 30.0)  # within 2.0 x 20 s now: stays
                assert not d.overflow and d.rule == "wait_threshold", d.to_record()
                d = cluster._decide("probe-3", FR, 50.0)  # beyond it: in-house beta, never the closed partner
                assert d.overflow and d.target == "beta", d.to_record()
                gamma = next(c for c in d.candidates if c.site == "gamma")
                assert gamma.excluded == "excluded"
                st = cluster.stats_dict()["targets"]
                assert st["generation"] == g and st["in_force"]["partners"] == {"gamma": False}

                # an invalid document: counted, the targets in force stay
                await obs.put_document(obs.keys.targets("alpha"), json.dumps(
                    {"fencing": lead.token, "generation": g + 1, "targets": {"groups": {"nobody": "fr"}}}))
                await until(lambda: cluster.targets.refused_by_reason.get("invalid") == 1, 5, "invalid refused")
                assert not cluster._decide("probe-4", FR, 30.0).overflow

                # the targets' mode applies while the operator's is normal; the operator's wins
                g = await apply(obs, lead, {"alpha": {"wait_factor": {FR: 2.0}, "mode": "surge"}}, "plan-m")
                await until(lambda: n.node.engine.mode()["mode"] == "surge", 5, "the targets' surge mode")
                assert cluster.mode.mode == "surge" and cluster.snapshot().mode == "surge"
                await obs.set_contingency("alpha", {"mode": "emergency"})
                await until(lambda: n.node.engine.mode()["mode"] == "emergency", 5, "the operator's emergency")
                await obs.set_contingency("alpha", {"mode": "normal"})
                await until(lambda: n.node.engine.mode()["mode"] == "surge", 5, "the targets' surge again")
            finally:
                await cluster.close()
