"""Contingency modes applied by a running node (real etcd, real node process).

Site ``gamma`` has queued voice calls and only back-office agents signed in and ready.
In normal mode nobody answers; ``set_contingency(gamma, "surge")`` in etcd turns the
back-office agents on without restart (they stay signed in) and they get the calls
within a couple of seconds, while EstimateWait and WatchCall carry the surge
announcement; back to normal, they get no new calls and the announcement is gone.
"""

from __future__ import annotations

import asyncio
import contextlib

import yaml

from node_fixtures import AgentSession, Stubs, node_process, site_dict
from router.coord import CoordinationUnavailable
from router.overflow import OverflowPolicy
from router.v1 import agents_pb2, routing_pb2
from router.v1 import types_pb2 as t
from test_cluster import node_env, observer, offer, until

SURGE_TEXT = OverflowPolicy().mode_settings("surge").announcement


def write_gamma(directory) -> object:
    d = site_dict()
    d["site"]["name"] = "gamma"
    d["agents"].append({"id": "bo", "count": 2, "skills": {"billing": 5}, "languages": ["fr", "en"],
                        "capacity": {"voice": 1}, "backoffice": True})  # fmt: skip
    path = directory / "gamma.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


async def estimate(s: Stubs) -> routing_pb2.EstimateWaitResponse:
    return await s.routing.EstimateWait(
        routing_pb2.EstimateWaitRequest(skill="billing", channel=t.CHANNEL_VOICE, language="fr"), timeout=5
    )


async def test_surge_turns_backoffice_agents_on_and_back_off(etcd, etcd_prefix, tmp_path):
    site = write_gamma(tmp_path)
    async with observer(etcd.endpoints, etcd_prefix) as obs:
        with node_process(site, tmp_path / "gamma", sync="none", env=node_env(etcd.endpoints, etcd_prefix)) as node:
            s = Stubs.connect(node.address)
            sessions: list[AgentSession] = []
            try:
                for aid in ("bo-001", "bo-002"):
                    await s.agents.SignIn(agents_pb2.SignInRequest(agent_id=aid), timeout=5)
                    sessions.append(await AgentSession(s, aid).hello())
                    await s.agents.SetState(
                        agents_pb2.SetStateRequest(agent_id=aid, state=t.AGENT_STATE_READY), timeout=5
                    )
                await until(lambda: "gamma" in obs.members(), 10, "gamma to register")
                ids = ["g1", "g2", "g3"]
                for cid in ids:
                    r = await s.routing.OfferCall(offer(cid), timeout=5)
                    assert r.call.state == t.CALL_STATE_QUEUED
                # normal mode: back-office agents take no voice call
                await asyncio.sleep(1.0)
                est = await estimate(s)
                assert est.queue_length == 3 and est.agents_staffed == 0 and est.announcement == ""
                watch = s.routing.WatchCall(routing_pb2.WatchCallRequest(call_id="g3", interval_s=0.1))
                first = await asyncio.wait_for(watch.read(), 5)
                assert first.announcement == ""

                await set_mode(obs, "gamma", "surge")
                got = await asyncio.gather(*(x.next("assignment", timeout=3) for x in sessions))
                assert sorted(a.call.call_id for a in got) == ["g1", "g2"]  # oldest first
                for x, a in zip(sessions, got):
                    await x.accept(a.assignment_id)
                est = await estimate(s)
                assert est.announcement == SURGE_TEXT and est.queue_length == 1 and est.agents_staffed == 2

                async def surge_update():
                    while True:
                        upd = await watch.read()
                        if upd.announcement:
                            return upd
                upd = await asyncio.wait_for(surge_update(), 5)
                assert upd.announcement == SURGE_TEXT and upd.call.call_id == "g3"
                assert "contingency mode surge" in node.log()

                # back to normal: calls in hand stay, no new assignments to back-office agents
                await set_mode(obs, "gamma", "normal")
                await until(lambda: "contingency mode normal" in node.log(), 5, "gamma to apply normal mode")
                est = await estimate(s)
                assert est.announcement == "" and est.agents_staffed == 0

                async def normal_update():
                    while True:
                        upd = await watch.read()
                        if not upd.announcement:
                            return upd
                upd = await asyncio.wait_for(normal_update(), 3)  # g3's position did not change
                assert upd.call.call_id == "g3" and upd.position == 1
                for a in got:
                    await s.routing.CompleteCall(routing_pb2.CompleteCallRequest(call_id=a.call.call_id), timeout=5)
                await asyncio.sleep(1.5)  # past the 0.5 s wrap-up: the agents are ready again
                for aid in ("bo-001", "bo-002"):
                    st = await s.agents.GetAgent(agents_pb2.GetAgentRequest(agent_id=aid), timeout=5)
                    assert st.agent.state == t.AGENT_STATE_READY  # signed in all along
                call = await s.routing.GetCall(routing_pb2.GetCallRequest(call_id="g3"), timeout=5)
                assert call.call.state == t.CALL_STATE_QUEUED
                for x in sessions:
                    assert not [m for k, m in x.seen if k == "assignment" and m.call.call_id == "g3"]
                watch.cancel()
            finally:
                for x in sessions:
                    x.cancel()
                with contextlib.suppress(Exception):
                    await s.channel.close()
            assert node.alive()


async def test_restarted_node_follows_the_mode_stored_meanwhile(etcd, etcd_prefix, tmp_path):
    """The engine's mode is journaled; at start the node makes it agree with etcd, also
    when the stored mode went back to normal while the node was down (no watch event)."""
    site = write_gamma(tmp_path)
    env = node_env(etcd.endpoints, etcd_prefix)
    async with observer(etcd.endpoints, etcd_prefix) as obs:
        await set_mode(obs, "gamma", {"mode": "emergency", "announcement": "Closed today."})
        with node_process(site, tmp_path / "gamma", sync="none", env=env) as node:
            s = Stubs.connect(node.address)
            try:
                await until_announcement(s, "Closed today.")
            finally:
                await s.channel.close()
            node.terminate()
        await set_mode(obs, "gamma", "normal")
        with node_process(site, tmp_path / "gamma", sync="none", env=env) as node:
            s = Stubs.connect(node.address)
            try:
                await until_announcement(s, "")
            finally:
                await s.channel.close()


async def set_mode(obs, site: str, mode) -> None:
    """``set_contingency`` as an operator tool does it: a put is idempotent, so retry it
    while etcd is briefly unavailable (on a loaded machine the observer's 1 s operations
    can time out and reset its connection, failing the put in flight)."""
    for attempt in range(10):
        try:
            await obs.set_contingency(site, mode)
            return
        except CoordinationUnavailable:
            if attempt == 9:
                raise
            await asyncio.sleep(0.3)


async def until_announcement(s: Stubs, text: str, timeout: float = 8.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    last = None
    while asyncio.get_running_loop().time() < deadline:
        with contextlib.suppress(Exception):
            last = (await estimate(s)).announcement
            if last == text:
                return
        await asyncio.sleep(0.1)
    raise AssertionError(f"announcement {last!r}, wanted {text!r}")
