"""Invariant 6 for coordination: etcd down, frozen or not there yet — every operation
raises CoordinationUnavailable, nothing crashes, overflow pauses (peer loads go stale),
and everything resumes by itself when etcd is back."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from router.coord.etcd import CoordinationUnavailable, EtcdCoordinator, EtcdSettings, Member
from router.overflow import LoadSnapshot, LocalQueue, QueueLoad, decide

pytestmark = pytest.mark.timeout(90)
log = logging.getLogger("tandem.test")

POLICY = {"queues": {"billing-en-voice": {"wait_threshold": {"factor": 1.0}}}, "max_peer_age_s": 3.0}


async def until(cond, timeout: float, step: float = 0.02) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(step)
    return time.monotonic() - t0


def load(site: str, length: int) -> LoadSnapshot:
    return LoadSnapshot(site=site, region="emea", queues={
        "billing-en-voice": QueueLoad(skill="billing", language="en", length=length,
                                      expected_wait_s=length * 10.0, staffed=5)})


def lyon_queue(ew: float) -> LocalQueue:
    return LocalQueue(site="lyon", region="emea", queue="billing-en-voice", skill="billing", language="en",
                      length=20, expected_wait_s=ew, staffed=5, target_wait_s=20)


@pytest.fixture
async def pair(own_etcd, etcd_prefix):
    """lyon and montreal, registered, loads published, a policy in force."""
    settings = EtcdSettings(endpoints=own_etcd.endpoints, prefix=etcd_prefix, ttl_s=2, op_timeout_s=1.0)
    lyon, mtl = EtcdCoordinator("lyon", settings), EtcdCoordinator("montreal", settings)
    for c in (lyon, mtl):
        await c.start()
        await c.wait_ready(5)
    await lyon.register(Member("lyon", "127.0.0.1:7101", "emea"))
    await mtl.register(Member("montreal", "127.0.0.1:7102", "amer"))
    lyon.publish_load(load("lyon", 20))
    mtl.publish_load(load("montreal", 1))
    await lyon.put_policy(POLICY)
    await until(lambda: "montreal" in lyon.peer_loads() and lyon.policy.queues and len(mtl.members()) == 2, 2)
    yield lyon, mtl
    for c in (lyon, mtl):
        await c.close()
        assert not c._tasks


async def unavailable_everywhere(c: EtcdCoordinator, limit: float) -> None:
    """Every async operation raises CoordinationUnavailable within ``limit`` seconds."""
    ops = {
        "put_policy": lambda: c.put_policy(POLICY),
        "get_policy": lambda: c.get_policy(),
        "list_members": lambda: c.list_members(),
        "set_contingency": lambda: c.set_contingency("lyon", "surge"),
        "get_contingency": lambda: c.get_contingency("lyon"),
        "register": lambda: c.register(Member(c.site, "127.0.0.1:7101", "emea")),
        "try_lead": lambda: c.try_lead("rebalancer", c.site),
        "campaign": lambda: c.campaign("rebalancer", c.site, timeout=limit - 0.2),
        "leader": lambda: c.leader("rebalancer"),
        "get_targets": lambda: c.get_targets("lyon"),
    }
    for name, op in ops.items():
        t0 = time.monotonic()
        with pytest.raises(CoordinationUnavailable):
            await op()
        assert time.monotonic() - t0 <= limit, f"{name} took {time.monotonic() - t0:.2f} s"


def overflow_target(lyon: EtcdCoordinator) -> str | None:
    return decide("c1", lyon_queue(ew=200), lyon.policy, lyon.peer_loads(), now=time.time()).target


def alive(c: EtcdCoordinator) -> bool:
    return all(not t.done() for t in c._tasks) and len(c._tasks) >= 6


async def check_outage_and_recovery(lyon, mtl, caplog, resume) -> float:
    assert overflow_target(lyon) == "montreal"
    policy_before = lyon.policy
    await unavailable_everywhere(lyon, limit=1.6)
    lyon.publish_load(load("lyon", 25))  # never blocks or raises
    await until(lambda: not lyon.connected and not mtl.connected, 4)
    await until(lambda: overflow_target(lyon) is None, 4)  # montreal's load went stale: overflow pauses
    d = decide("c1", lyon_queue(ew=200), lyon.policy, lyon.peer_loads(), now=time.time())
    assert d.candidates[0].excluded.startswith("stale load")
    assert lyon.policy == policy_before and alive(lyon) and alive(mtl)
    t0 = time.monotonic()
    resume()
    await until(lambda: lyon.connected and mtl.connected, 6)
    await until(lambda: overflow_target(lyon) == "montreal", 6)
    await until(lambda: set(mtl.members()) == {"lyon", "montreal"} and
                mtl.peer_loads().get("lyon") is not None and
                mtl.peer_loads()["lyon"].snapshot.queues["billing-en-voice"].length == 25, 6)
    took = time.monotonic() - t0
    # the watches work again
    await mtl.put_policy({**POLICY, "max_peer_age_s": 2.5})
    await until(lambda: lyon.policy.max_peer_age_s == 2.5, 2)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    return took


async def test_etcd_killed_then_restarted(own_etcd, pair, caplog):
    lyon, mtl = pair
    own_etcd.kill()
    took = await check_outage_and_recovery(lyon, mtl, caplog, own_etcd.start)
    log.warning("etcd restarted: cluster view back %.2f s after the restart", took)
    assert took < 6


async def test_etcd_frozen_then_resumed(own_etcd, pair, caplog):
    lyon, mtl = pair
    own_etcd.pause()
    took = await check_outage_and_recovery(lyon, mtl, caplog, own_etcd.resume)
    log.warning("etcd resumed: cluster view back %.2f s after SIGCONT", took)
    assert took < 6


async def test_start_while_etcd_is_down(own_etcd, etcd_prefix):
    own_etcd.kill()
    settings = EtcdSettings(endpoints=own_etcd.endpoints, prefix=etcd_prefix, ttl_s=2, op_timeout_s=1.0)
    lyon = EtcdCoordinator("lyon", settings)
    try:
        await lyon.start()  # does not raise: the node must route its own traffic regardless
        with pytest.raises(CoordinationUnavailable, match="no etcd session"):
            await lyon.wait_ready(1.0)
        with pytest.raises(CoordinationUnavailable):
            await lyon.register(Member("lyon", "127.0.0.1:7101", "emea"))
        lyon.publish_load(load("lyon", 3))
        assert lyon.peer_loads() == {} and not lyon.connected
        own_etcd.start()
        await lyon.wait_ready(5)
        # the registration wanted before is done by itself, and the load published
        await until(lambda: "lyon" in lyon.members(), 3)
        await until(lambda: lyon.stats()["load_puts"] >= 1, 2)
        assert "lyon" in own_etcd.etcdctl("get", "--prefix", "--keys-only", etcd_prefix + "load/")
    finally:
        await lyon.close()
    assert not lyon._tasks


async def test_a_dead_endpoint_is_skipped(own_etcd, etcd_prefix):
    from etcd_fixtures import free_port

    settings = EtcdSettings(endpoints=(f"127.0.0.1:{free_port()}", *own_etcd.endpoints), prefix=etcd_prefix,
                            ttl_s=2, op_timeout_s=1.0)
    lyon = EtcdCoordinator("lyon", settings)
    try:
        await lyon.start()
        await lyon.wait_ready(5)
        assert await lyon.register(Member("lyon", "127.0.0.1:7101", "emea"))
        assert lyon.link.endpoint == own_etcd.endpoint
    finally:
        await lyon.close()
