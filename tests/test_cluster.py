"""Site nodes as one cluster (router.node.cluster): real etcd, real node processes.

Two in-house sites, ``alpha`` and ``beta``, serve the same queues. Alpha signs in no
agent (every call it queues would wait for ever: overloaded); beta has agents who answer
whatever they are offered. With an overflow policy in etcd, alpha's queued calls move to
beta and are answered there; a reconciliation over both sites (Admin.ListCalls) finds
each call owned by exactly one site.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
import yaml

from node_fixtures import Stubs, all_calls, answering_agent, node_process, site_dict
from router.coord import EtcdCoordinator, EtcdSettings, PolicyRejected
from router.v1 import agents_pb2, routing_pb2
from router.v1 import types_pb2 as t

S = t
A = agents_pb2
TTL_S = 2
OBSERVER_TTL_S = 10
POLICY = {"default": {"wait_threshold": {"factor": 1.0}}, "max_peer_age_s": 3.0}
LIVE = {S.CALL_STATE_QUEUED, S.CALL_STATE_ASSIGNED, S.CALL_STATE_CONNECTED, S.CALL_STATE_TRANSFERRING,
        S.CALL_STATE_COMPLETED, S.CALL_STATE_ABANDONED}


def write_site(directory: Path, name: str) -> Path:
    d = site_dict()
    d["site"]["name"] = name
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def node_env(endpoints, prefix: str) -> dict:
    return {"TANDEM_ETCD_ENDPOINTS": ",".join(endpoints), "TANDEM_ETCD_PREFIX": prefix,
            "TANDEM_ETCD_TTL": str(TTL_S), "TANDEM_DRAIN_S": "0.2"}


@contextlib.asynccontextmanager
async def observer(endpoints, prefix: str, ttl_s: int = OBSERVER_TTL_S):
    """A coordinator in the test process (never registers): sees members and loads,
    writes policies, and campaigns where a test plays the rebalancer.

    Its lease holds only the leaderships it campaigns for, so its TTL is long: with the
    nodes' 2 s, one stall of a loaded CI machine expired the test's own leader
    mid-test (NotLeader), which is not what any of these tests examines."""
    c = EtcdCoordinator("observer", EtcdSettings(endpoints=tuple(endpoints), prefix=prefix, ttl_s=ttl_s,
                                                 op_timeout_s=1.0))
    await c.start()
    await c.wait_ready(10)
    try:
        yield c
    finally:
        await c.close()


async def until(pred, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(step)


def offer(call_id: str) -> routing_pb2.OfferCallRequest:
    return routing_pb2.OfferCallRequest(call_id=call_id, skill="billing", channel=t.CHANNEL_VOICE, language="fr",
                                        caller="+3361" + str(abs(hash(call_id)) % 10**7).zfill(7))


async def reconcile(sites: dict[str, Stubs], ids: list[str]) -> dict[str, dict[str, int]]:
    """Every call is live or final at exactly one site (TRANSFERRED rows are the origin's
    record that it moved); returns {call_id: {site: state}}."""
    seen: dict[str, dict[str, int]] = {}
    for name, stubs in sites.items():
        for cid, state in (await all_calls(stubs)).items():
            seen.setdefault(cid, {})[name] = state
    for cid in ids:
        owners = [s for s, st in seen.get(cid, {}).items() if st in LIVE]
        assert len(owners) == 1, f"call {cid} owned by {owners}: {seen.get(cid)}"
    return seen


@pytest.fixture
def two_sites(tmp_path):
    return write_site(tmp_path, "alpha"), write_site(tmp_path, "beta")


def start(site_file: Path, tmp_path: Path, endpoints, prefix: str):
    return node_process(site_file, tmp_path / site_file.stem, sync="none", env=node_env(endpoints, prefix))


async def test_membership_load_and_expiry_after_sigkill(etcd, etcd_prefix, two_sites, tmp_path):
    alpha_f, beta_f = two_sites
    async with observer(etcd.endpoints, etcd_prefix) as obs:
        with start(alpha_f, tmp_path, etcd.endpoints, etcd_prefix) as alpha, \
                start(beta_f, tmp_path, etcd.endpoints, etcd_prefix) as beta:
            members = await until(lambda: len(obs.members()) == 2 and obs.members(), 10, "both members")
            assert members["alpha"].address == alpha.address
            assert members["beta"].address == beta.address
            assert members["beta"].region == "emea" and members["beta"].kind == "inhouse"
            loads = await until(lambda: len(obs.peer_loads()) == 2 and obs.peer_loads(), 10, "both loads")
            q = loads["alpha"].snapshot.queues["billing-fr-voice"]
            assert q.skill == "billing" and q.language == "fr" and q.target_wait_s == 20.0

            # A queued call shows in alpha's published load (on change, rate-limited).
            s = Stubs.connect(alpha.address)
            try:
                await s.routing.OfferCall(offer("load-1"), timeout=5)
                await until(
                    lambda: obs.peer_loads()["alpha"].snapshot.queues["billing-fr-voice"].length == 1,
                    3, "alpha's load to show the queued call",
                )
            finally:
                await s.channel.close()

            beta.kill()
            killed = time.monotonic()
            await until(lambda: "beta" not in obs.members(), TTL_S + 3, "beta to vanish at its TTL")
            gone_after = time.monotonic() - killed
            assert gone_after <= TTL_S + 1.5, gone_after
            assert "beta" not in obs.peer_loads()
            assert alpha.alive()


async def _cluster_with_agents(stack, tmp_path, two_sites, endpoints, prefix, n_agents=3):
    alpha_f, beta_f = two_sites
    alpha = stack.enter_context(start(alpha_f, tmp_path, endpoints, prefix))
    beta = stack.enter_context(start(beta_f, tmp_path, endpoints, prefix))
    sa, sb = Stubs.connect(alpha.address), Stubs.connect(beta.address)
    answered: list[str] = []
    agents = [asyncio.create_task(answering_agent(sb, f"fr-00{i}", answered)) for i in range(1, n_agents + 1)]
    return alpha, beta, sa, sb, agents, answered


async def _close(sa, sb, agents):
    for a in agents:
        a.cancel()
    await asyncio.gather(*agents, return_exceptions=True)
    await sa.channel.close()
    await sb.channel.close()


async def _beta_ready(obs, n=1):
    def ok():
        p = obs.peer_loads().get("beta")
        return p is not None and p.snapshot.queues["billing-fr-voice"].free_agents >= n
    await until(ok, 10, "beta's load to show free agents")


async def test_overloaded_site_overflows_to_site_with_free_agents(etcd, etcd_prefix, two_sites, tmp_path):
    async with observer(etcd.endpoints, etcd_prefix) as obs:
        await obs.put_policy(POLICY)
        with contextlib.ExitStack() as stack:
            alpha, beta, sa, sb, agents, answered = await _cluster_with_agents(
                stack, tmp_path, two_sites, etcd.endpoints, etcd_prefix)
            try:
                await _beta_ready(obs, 3)
                # alpha must see beta too (its own watch), then a burst of calls
                await asyncio.sleep(0.5)
                ids = [f"ovf-{i}" for i in range(8)]
                for cid in ids:
                    r = await sa.routing.OfferCall(offer(cid), timeout=5)
                    assert r.call.state == S.CALL_STATE_QUEUED
                await until(lambda: set(answered) >= set(ids), 30, "every call answered at beta")
                seen = await reconcile({"alpha": sa, "beta": sb}, ids)
                for cid in ids:
                    assert seen[cid] == {"alpha": S.CALL_STATE_TRANSFERRED, "beta": S.CALL_STATE_COMPLETED}, seen[cid]
                assert sorted(answered) == sorted(ids)  # each answered once
            finally:
                await _close(sa, sb, agents)
            assert alpha.alive() and beta.alive()


async def test_invalid_policy_refused_previous_stays(etcd, etcd_prefix, two_sites, tmp_path):
    async with observer(etcd.endpoints, etcd_prefix) as obs:
        rev = await obs.put_policy(POLICY)
        await until(lambda: obs.policy.default is not None, 5, "the observer to see the policy")
        with contextlib.ExitStack() as stack:
            alpha, beta, sa, sb, agents, answered = await _cluster_with_agents(
                stack, tmp_path, two_sites, etcd.endpoints, etcd_prefix, n_agents=1)
            try:
                await _beta_ready(obs)
                await until(lambda: "overflow policy in force" in alpha.log(), 5, "alpha to read the policy")
                with pytest.raises(PolicyRejected) as e:
                    await obs.put_policy({"default": {"queue_ratio": {"on": 1, "off": 2}}})
                assert "queue_ratio" in str(e.value) and "off" in str(e.value)
                # Written behind the API's back (etcdctl): refused by every watcher.
                etcd.etcdctl("put", obs.keys.policy_overflow, '{"default": {"wait_threshold": {"factor": -1}}}')
                await until(lambda: obs.policy_error is not None, 5, "the observer to refuse the stored policy")
                assert obs.policy.default is not None and obs.policy.default.wait_threshold.factor == 1.0
                assert obs.stats()["policy_revision"] == rev
                await until(lambda: "ignoring the stored overflow policy" in alpha.log(), 5, "alpha to refuse it")
                await asyncio.sleep(0.3)
                await sa.routing.OfferCall(offer("pol-1"), timeout=5)
                await until(lambda: "pol-1" in answered, 15, "the call to overflow under the previous policy")
            finally:
                await _close(sa, sb, agents)


async def test_etcd_down_sites_route_locally_and_overflow_resumes(own_etcd, etcd_prefix, two_sites, tmp_path):
    eps = own_etcd.endpoints
    async with observer(eps, etcd_prefix) as obs:
        await obs.put_policy(POLICY)
        with contextlib.ExitStack() as stack:
            alpha, beta, sa, sb, agents, answered = await _cluster_with_agents(
                stack, tmp_path, two_sites, eps, etcd_prefix, n_agents=2)
            try:
                await _beta_ready(obs, 2)
                await asyncio.sleep(0.5)
                await sa.routing.OfferCall(offer("before-1"), timeout=5)
                await until(lambda: "before-1" in answered, 15, "overflow before the outage")

                own_etcd.kill()
                # Peers' loads go stale after max_peer_age_s (3 s); sessions are lost after a TTL.
                await asyncio.sleep(POLICY["max_peer_age_s"] + 0.5)
                for i in range(3):
                    r = await sa.routing.OfferCall(offer(f"down-a{i}"), timeout=5)
                    assert r.call.state == S.CALL_STATE_QUEUED
                    r = await sb.routing.OfferCall(offer(f"down-b{i}"), timeout=5)
                    assert r.call.state in (S.CALL_STATE_QUEUED, S.CALL_STATE_ASSIGNED)
                await until(lambda: {f"down-b{i}" for i in range(3)} <= set(answered), 15,
                            "beta to answer its own calls without etcd")
                await asyncio.sleep(1.0)
                calls_a = await all_calls(sa)
                assert all(calls_a[f"down-a{i}"] == S.CALL_STATE_QUEUED for i in range(3)), calls_a
                assert not {f"down-a{i}" for i in range(3)} & set(answered)

                own_etcd.start()
                await until(lambda: len(obs.members()) == 2, 15, "both nodes to register again")
                await _beta_ready(obs)
                await asyncio.sleep(0.5)
                await sa.routing.OfferCall(offer("after-1"), timeout=5)
                # The calls that stayed during the outage overflow too (alpha's sweep).
                want = {"after-1", *(f"down-a{i}" for i in range(3))}
                await until(lambda: want <= set(answered), 15, "overflow to resume after etcd restarts")
                ids = ["before-1", "after-1", *(f"down-a{i}" for i in range(3)), *(f"down-b{i}" for i in range(3))]
                seen = await reconcile({"alpha": sa, "beta": sb}, ids)
                assert all(seen[c]["alpha"] == S.CALL_STATE_TRANSFERRED for c in want), seen
                assert sorted(answered) == sorted(ids)
            finally:
                await _close(sa, sb, agents)
            assert alpha.alive() and beta.alive()
