"""The operators' Admin RPCs at the node (the CLI on top: tests/test_ctl.py).

In-process nodes for the journaled actions (drain, agent moves: they survive a restart;
refused requests change nothing), real ``tandem node`` processes with a real etcd for the
cluster ones (members, policy diff/apply with compare-and-set, the mode stored in etcd).
"""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from node_fixtures import Stubs, error_reason, make_site, node_process, running_node
from router.v1 import admin_pb2, agents_pb2, routing_pb2
from router.v1 import types_pb2 as t
from test_cluster import node_env, observer, offer, until, write_site


async def sign_in_ready(s: Stubs, aid: str) -> None:
    await s.agents.SignIn(agents_pb2.SignInRequest(agent_id=aid), timeout=5)
    await s.agents.SetState(agents_pb2.SetStateRequest(agent_id=aid, state=t.AGENT_STATE_READY), timeout=5)


async def expect_error(coro, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await coro
    assert (e.value.code(), error_reason(e.value)) == (code, reason)


# --------------------------------------------------------------------------- drain


async def test_drain_refuses_offers_is_journaled_and_undrains(tmp_path):
    async with running_node(make_site(), tmp_path) as n:
        s = n.stubs
        await s.routing.OfferCall(offer("d1"), timeout=5)
        r = await s.admin.SetDrain(admin_pb2.SetDrainRequest(draining=True), timeout=5)
        assert (r.draining, r.changed, r.queued) == (True, True, 1)
        again = await s.admin.SetDrain(admin_pb2.SetDrainRequest(draining=True), timeout=5)
        assert (again.draining, again.changed) == (True, False)
        await expect_error(s.routing.OfferCall(offer("d2"), timeout=5), grpc.StatusCode.UNAVAILABLE, "NODE_DRAINING")
        st = await s.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
        assert st.draining and not st.serving
        # agents still sign in and take the queued call: calls in hand are finished here
        await sign_in_ready(s, "fr-001")
        call = await s.routing.GetCall(routing_pb2.GetCallRequest(call_id="d1"), timeout=5)
        assert call.call.state == t.CALL_STATE_ASSIGNED
    # the drain survives a restart (journal)
    async with running_node(make_site(), tmp_path) as n:
        s = n.stubs
        st = await s.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
        assert st.draining
        await expect_error(s.routing.OfferCall(offer("d3"), timeout=5), grpc.StatusCode.UNAVAILABLE, "NODE_DRAINING")
        r = await s.admin.SetDrain(admin_pb2.SetDrainRequest(draining=False), timeout=5)
        assert (r.draining, r.changed) == (False, True)
        assert (await s.routing.OfferCall(offer("d3"), timeout=5)).call.state == t.CALL_STATE_QUEUED
    async with running_node(make_site(), tmp_path) as n:
        assert not (await n.stubs.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)).draining


# --------------------------------------------------------------------------- agent moves


async def test_move_agent_changes_its_queues_live_and_survives_a_restart(tmp_path):
    # fr-* agents speak French only; bi-* also English: moving fr-001 into "bi" opens the
    # English queue to it, without a sign-out
    async with running_node(make_site(), tmp_path) as n:
        s = n.stubs
        await sign_in_ready(s, "fr-001")
        en = routing_pb2.OfferCallRequest(call_id="en1", skill="billing", channel=t.CHANNEL_VOICE, language="en")
        assert (await s.routing.OfferCall(en, timeout=5)).call.state == t.CALL_STATE_QUEUED
        agents = {a.agent_id: a for a in (await s.admin.ListAgents(admin_pb2.ListAgentsRequest(), timeout=5)).agents}
        assert agents["fr-001"].group == "fr" and "billing-en-voice" not in agents["fr-001"].queues
        r = await s.admin.MoveAgent(admin_pb2.MoveAgentRequest(agent_id="fr-001", group="bi"), timeout=5)
        assert (r.previous_group, r.agent.group, r.changed) == ("fr", "bi", True)
        assert "billing-en-voice" in r.agent.queues
        # it was ready: it takes the English call at once, still signed in
        call = await s.routing.GetCall(routing_pb2.GetCallRequest(call_id="en1"), timeout=5)
        assert call.call.state == t.CALL_STATE_ASSIGNED and call.call.agent_id == "fr-001"
        # busy: refused, nothing changed
        await expect_error(s.admin.MoveAgent(admin_pb2.MoveAgentRequest(agent_id="fr-001", group="fr"), timeout=5),
                           grpc.StatusCode.FAILED_PRECONDITION, "AGENT_BUSY")
        await expect_error(s.admin.MoveAgent(admin_pb2.MoveAgentRequest(agent_id="fr-002", group="nope"), timeout=5),
                           grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_GROUP")
        await expect_error(s.admin.MoveAgent(admin_pb2.MoveAgentRequest(agent_id="ghost", group="bi"), timeout=5),
                           grpc.StatusCode.NOT_FOUND, "UNKNOWN_AGENT")
        same = await s.admin.MoveAgent(admin_pb2.MoveAgentRequest(agent_id="fr-002", group="fr"), timeout=5)
        assert not same.changed
    async with running_node(make_site(), tmp_path) as n:
        agents = {a.agent_id: a for a in (await n.stubs.admin.ListAgents(admin_pb2.ListAgentsRequest(),
                                                                         timeout=5)).agents}
        assert agents["fr-001"].group == "bi" and "billing-en-voice" in agents["fr-001"].queues
        assert agents["fr-001"].state == t.AGENT_STATE_READY or agents["fr-001"].call_ids


async def test_status_carries_targets_agents_per_queue_and_mode(tmp_path):
    async with running_node(make_site(), tmp_path) as n:
        s = n.stubs
        await sign_in_ready(s, "fr-001")
        await s.agents.SignIn(agents_pb2.SignInRequest(agent_id="fr-002"), timeout=5)  # not ready
        await s.routing.OfferCall(offer("q1"), timeout=5)  # rings at fr-001
        r = await s.admin.SetMode(admin_pb2.SetModeRequest(mode="surge", announcement="Busy."), timeout=5)
        assert (r.mode, r.announcement, r.changed) == ("surge", "Busy.", True)
        await expect_error(s.admin.SetMode(admin_pb2.SetModeRequest(mode="panic"), timeout=5),
                           grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MODE")
        st = await s.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
        q = {x.name: x for x in st.queues}["billing-fr-voice"]
        assert q.service_level_threshold_s > 0 and 0 < q.service_level_target <= 1
        assert (q.agents_on_contact, q.agents_not_ready) == (1, 1)
        assert (st.mode, st.announcement, st.draining) == ("surge", "Busy.", False)
        # no etcd: no cluster reads
        await expect_error(s.admin.ListMembers(admin_pb2.ListMembersRequest(), timeout=5),
                           grpc.StatusCode.FAILED_PRECONDITION, "NOT_IN_CLUSTER")
        await expect_error(s.admin.GetReplayInput(admin_pb2.GetReplayInputRequest(since_s=1.0), timeout=5),
                           grpc.StatusCode.UNAVAILABLE, "HISTORY_OFF")
        await expect_error(s.admin.GetReplayInput(admin_pb2.GetReplayInputRequest(since_s=-1.0), timeout=5),
                           grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SINCE")
        await expect_error(s.admin.ListAudit(admin_pb2.ListAuditRequest(page_size=5000), timeout=5),
                           grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_SIZE")


async def test_describe_call_tells_its_path(tmp_path):
    async with running_node(make_site(), tmp_path) as n:
        s = n.stubs
        await s.routing.OfferCall(offer("p1"), timeout=5)
        await sign_in_ready(s, "fr-001")
        d = await s.admin.DescribeCall(admin_pb2.DescribeCallRequest(call_id="p1"), timeout=5)
        kinds = [e.kind for e in d.events]
        assert kinds[:2] == ["offered", "queued"] and "assigned" in kinds
        assert d.call.call_id == "p1" and not d.history
        assert json.loads(d.events[0].detail_json)["priority_class"] == "standard"
        await expect_error(s.admin.DescribeCall(admin_pb2.DescribeCallRequest(call_id="nope"), timeout=5),
                           grpc.StatusCode.NOT_FOUND, "UNKNOWN_CALL")
        await expect_error(s.admin.DescribeCall(admin_pb2.DescribeCallRequest(), timeout=5),
                           grpc.StatusCode.INVALID_ARGUMENT, "MISSING_FIELD")


# --------------------------------------------------------------------------- cluster


async def test_members_policy_diff_apply_and_mode_through_the_node(etcd, etcd_prefix, tmp_path):
    a = write_site(tmp_path, "alpha")
    async with observer(etcd.endpoints, etcd_prefix) as obs:
        with node_process(a, tmp_path / "alpha", sync="none", env=node_env(etcd.endpoints, etcd_prefix)) as node:
            s = Stubs.connect(node.address)
            try:
                await until(lambda: "alpha" in obs.members(), 10, "alpha to register")
                # the node's own members watch may see its registration a moment after ours
                deadline = asyncio.get_running_loop().time() + 10
                while True:
                    m = await s.admin.ListMembers(admin_pb2.ListMembersRequest(), timeout=5)
                    if m.members or asyncio.get_running_loop().time() > deadline:
                        break
                    await asyncio.sleep(0.1)
                assert [x.site for x in m.members] == ["alpha"] and m.etcd_connected
                pol = await s.admin.GetPolicy(admin_pb2.GetPolicyRequest(), timeout=5)
                new = json.loads(pol.policy_json)
                new["max_peer_age_s"] = 7.0
                d = await s.admin.DiffPolicy(admin_pb2.DiffPolicyRequest(policy=json.dumps(new)), timeout=5)
                assert list(d.changes) == [f"max_peer_age_s: {json.loads(pol.policy_json)['max_peer_age_s']} -> 7.0"]
                same = await s.admin.DiffPolicy(admin_pb2.DiffPolicyRequest(policy=pol.policy_json), timeout=5)
                assert list(same.changes) == []
                await expect_error(s.admin.DiffPolicy(admin_pb2.DiffPolicyRequest(policy="{max_peer_age_s: -1}"),
                                                      timeout=5), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_POLICY")
                # compare-and-set: a stale revision changes nothing
                await expect_error(s.admin.ApplyPolicy(admin_pb2.ApplyPolicyRequest(
                    policy=json.dumps(new), expected_revision=pol.revision + 1000), timeout=5),
                    grpc.StatusCode.FAILED_PRECONDITION, "POLICY_CHANGED")
                assert obs.policy.max_peer_age_s != 7.0
                r = await s.admin.ApplyPolicy(admin_pb2.ApplyPolicyRequest(policy=json.dumps(new)), timeout=5)
                assert r.revision > pol.revision and list(r.changes) == list(d.changes)
                await until(lambda: obs.policy.max_peer_age_s == 7.0, 5, "the observer to see the policy")
                # the mode goes through etcd: the observer sees it, the node applies it
                mr = await s.admin.SetMode(admin_pb2.SetModeRequest(mode="emergency"), timeout=5)
                assert mr.mode == "emergency" and mr.changed
                assert (await obs.get_contingency("alpha")).mode == "emergency"
                st = await s.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
                assert st.mode == "emergency"
            finally:
                await s.channel.close()
