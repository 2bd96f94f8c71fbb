"""Each alert of router/alerts caused for real (issue 10 §4): real nodes, a real etcd,
a ClickHouse that is down; the rules are the packaged ones with ``for: 1`` s (and a 1 s
oldest-contact threshold) through ``TANDEM_ALERT_RULES``, read by the node. The node's
metrics loop publishes its figures and evaluates the rules once a second; the tests wait
(bounded) for ``node.alerts.active()`` to show the alert *firing*.

* ServiceLevelBelowTarget and OldestContactTooOld: calls nobody answers (the only agent
  signed in is not ready), two of them abandoned after the queue's threshold;
* PartnerCapReached, then SiteMemberLost, then EtcdUnreachable, on one small cluster with
  a private etcd: alpha (in-process) overflows everything to the partner gamma (a node
  process) under a cap of 2; gamma is SIGKILLed; then the etcd is killed;
* HistorySpoolGrowing: the history points at a ClickHouse port nobody listens on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
import yaml

from node_fixtures import Stubs, node_process, site_dict
from router.alerts.spec import default_text
from router.config import parse_site
from router.local.etcd import free_port
from router.node.server import build_node
from router.v1 import agents_pb2, routing_pb2
from router.v1 import types_pb2 as t

pytestmark = pytest.mark.timeout(60)

FR = "billing-fr-voice"


@pytest.fixture
def fast_rules(tmp_path, monkeypatch) -> Path:
    text = default_text().replace("for: 300", "for: 1").replace("for: 60", "for: 1")
    text = text.replace("right: 120", "right: 1")
    path = tmp_path / "fast-rules.yaml"
    path.write_text(text)
    monkeypatch.setenv("TANDEM_ALERT_RULES", str(path))
    return path


def site(name: str, kind: str = "inhouse", threshold_s: float | None = None):
    d = site_dict()
    d["site"]["name"] = name
    d["site"]["kind"] = kind
    if threshold_s is not None:
        d["queues"][0]["service_level"] = {"threshold_s": threshold_s, "target": 0.8, "abandons": "short_excluded"}
    return d


@contextlib.asynccontextmanager
async def live_node(d: dict, data_dir: Path):
    node, port = await build_node(parse_site(d, "<alerts site>"), data_dir, "127.0.0.1:0", sync="none", drain_s=0.1)
    await node.start(publish_metrics=True)  # the loop: publish, then evaluate the rules
    stubs = Stubs.connect(f"127.0.0.1:{port}")
    try:
        yield node, stubs
    finally:
        await stubs.channel.close()
        await node.stop(grace=0.1)


async def firing(node, name: str, timeout: float, **labels: str):
    """The firing alert ``name`` (with these labels) of ``node``, waited for up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        for a in node.alerts.active():
            if a.name == name and a.state == "firing" and all(a.labels.get(k) == v for k, v in labels.items()):
                return a
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} {labels} not firing within {timeout} s: {node.alerts.active()}")
        await asyncio.sleep(0.1)


def offer(call_id: str) -> routing_pb2.OfferCallRequest:
    return routing_pb2.OfferCallRequest(call_id=call_id, skill="billing", channel=t.CHANNEL_VOICE, language="fr",
                                        caller="+3362" + str(abs(hash(call_id)) % 10**7).zfill(7))


async def test_service_level_below_target_and_oldest_contact(fast_rules, tmp_path):
    async with live_node(site("slsite", threshold_s=0.2), tmp_path / "sl") as (node, s):
        assert node.alerts.spec.rule("ServiceLevelBelowTarget").for_s == 1  # the override is in force
        await s.agents.SignIn(agents_pb2.SignInRequest(agent_id="fr-001"), timeout=5)  # signed in, not ready
        for cid in ("a1", "a2", "a3"):
            assert (await s.routing.OfferCall(offer(cid), timeout=5)).call.state == t.CALL_STATE_QUEUED
        await asyncio.sleep(0.3)  # past the 0.2 s threshold: these abandons count against SL
        for cid in ("a1", "a2"):
            await s.routing.AbandonCall(routing_pb2.AbandonCallRequest(call_id=cid), timeout=5)
        sl = await firing(node, "ServiceLevelBelowTarget", 6, queue=FR)
        assert sl.site == "slsite" and sl.value == 0.0 and sl.severity == "warning"
        assert sl.since <= time.time() - 1
        old = await firing(node, "OldestContactTooOld", 6, queue=FR)  # a3 still waits
        assert old.value > 1
        # none of the cluster or history alerts: this node has neither
        assert {a.name for a in node.alerts.active()} == {"ServiceLevelBelowTarget", "OldestContactTooOld"}
        # answered: the oldest-contact alert resolves
        await s.routing.AbandonCall(routing_pb2.AbandonCallRequest(call_id="a3"), timeout=5)
        deadline = time.monotonic() + 5
        while any(a.name == "OldestContactTooOld" for a in node.alerts.active()):
            assert time.monotonic() < deadline, node.alerts.active()
            await asyncio.sleep(0.1)


async def test_partner_cap_then_member_lost_then_etcd_unreachable(fast_rules, own_etcd, etcd_prefix, tmp_path):
    from router.coord import EtcdSettings
    from router.node.cluster import ClusterLink
    from test_cluster import node_env, observer, until

    gamma_file = tmp_path / "gamma.yaml"
    gamma_file.write_text(yaml.safe_dump(site("gamma", kind="partner")))
    policy = {"max_peer_age_s": 3.0, "default": {"split": {"percent": 100, "to": ["gamma"]}},
              "partners": {"gamma": {"max_value": "standard", "max_concurrent": 2}}}
    async with observer(own_etcd.endpoints, etcd_prefix) as obs:
        await obs.put_policy(policy)
        with node_process(gamma_file, tmp_path / "gamma", sync="none", env=node_env(own_etcd.endpoints, etcd_prefix)) \
                as gamma:
            sg = Stubs.connect(gamma.address)
            try:
                for aid in ("fr-001", "fr-002", "fr-003"):  # staffed, never ready: calls stay there
                    await sg.agents.SignIn(agents_pb2.SignInRequest(agent_id=aid), timeout=5)
            finally:
                await sg.channel.close()
            async with live_node(site("alpha"), tmp_path / "alpha") as (node, s):
                cluster = ClusterLink(node, EtcdSettings(endpoints=own_etcd.endpoints, prefix=etcd_prefix, ttl_s=2,
                                                         op_timeout_s=1.0))
                await cluster.start()
                node.cluster = cluster
                try:
                    def gamma_ready():
                        p = cluster.coord.peer_loads().get("gamma")
                        return (cluster.coord.connected and p is not None and p.snapshot.kind == "partner"
                                and p.snapshot.queues[FR].staffed >= 3
                                and cluster.coord.policy.partners.get("gamma") is not None)

                    await until(gamma_ready, 10, "alpha to see gamma's staffed load and the policy")
                    for i in range(3):
                        await s.routing.OfferCall(offer(f"c{i}"), timeout=5)
                    # every offer was decided, and each decision timed (a sweep re-decides the third)
                    from prometheus_client import REGISTRY
                    decided = REGISTRY.get_sample_value("tandem_overflow_decision_seconds_count",
                                                        {"site": "alpha", "kind": "offer"})
                    took = REGISTRY.get_sample_value("tandem_overflow_decision_seconds_sum",
                                                     {"site": "alpha", "kind": "offer"})
                    assert decided == 3 and 0 < took < 3
                    cap = await firing(node, "PartnerCapReached", 10, partner="gamma")
                    assert cap.value == 2 and cap.site == "alpha"
                    assert not any(a.name == "SiteMemberLost" for a in node.alerts.active())

                    gamma.kill()  # SIGKILL: its lease (2 s) expires, the member key goes
                    lost = await firing(node, "SiteMemberLost", 12, member="gamma")
                    assert lost.severity == "critical" and lost.value == 0

                    own_etcd.kill()  # this test's own etcd; the shared one is untouched
                    down = await firing(node, "EtcdUnreachable", 15)
                    assert down.site == "alpha" and down.labels == {}
                finally:
                    await cluster.close()


async def test_history_spool_growing(fast_rules, tmp_path):
    from router.node.history_link import HistoryLink

    async with live_node(site("spoolsite"), tmp_path / "spool") as (node, s):
        url = f"clickhouse://127.0.0.1:{free_port()}/tandem_alerts"  # nobody listens there
        link = HistoryLink.open(node, url, tmp_path / "spool", flush_interval_s=0.1)
        try:
            for cid in ("h1", "h2"):
                await s.routing.OfferCall(offer(cid), timeout=5)
                await s.routing.AbandonCall(routing_pb2.AbandonCallRequest(call_id=cid), timeout=5)
            spool = await firing(node, "HistorySpoolGrowing", 20)
            assert spool.site == "spoolsite" and spool.value >= 1
            assert link.spool_rows() >= 1
        finally:
            await link.aclose(timeout=1.0)
