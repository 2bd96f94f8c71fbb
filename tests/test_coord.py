"""Coordination on a real etcd: membership, load, policy, contingency, election."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time

import aetcd
import pytest

from etcd_fixtures import CoordProcess
from router.coord.etcd import (
    CoordinationUnavailable,
    EtcdCoordinator,
    EtcdSettings,
    Member,
    NotLeader,
    PolicyRejected,
)
from router.coord.keys import Keys
from router.overflow import LoadSnapshot, OverflowPolicy, QueueLoad

pytestmark = pytest.mark.timeout(60)

VALID = {
    "queues": {"billing-en-voice": {"wait_threshold": {"factor": 1.5}, "margin": {"seconds": 10}}},
    "partners": {"callpro": {"max_concurrent": 10, "hours": {"tz": "Asia/Manila", "open": "08:00", "close": "22:00"}}},
}


async def until(cond, timeout: float, step: float = 0.02) -> float:
    """Wait until cond() is true; returns the seconds it took (fails after timeout)."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(step)
    return time.monotonic() - t0


@pytest.fixture
async def coords(etcd_settings):
    """Factory of started coordinators (closed at teardown, with a leak check)."""
    made: list[EtcdCoordinator] = []

    async def make(site: str, settings: EtcdSettings | None = None, ready: bool = True) -> EtcdCoordinator:
        c = EtcdCoordinator(site, settings or etcd_settings)
        made.append(c)
        await c.start()
        if ready:
            await c.wait_ready(5)
        return c

    yield make
    for c in made:
        await c.close()
        assert not c._tasks, f"leaked tasks: {c._tasks}"


def member(site: str, port: int = 7000, region: str = "emea") -> Member:
    return Member(site=site, address=f"127.0.0.1:{port}", region=region)


def load(site: str, length: int = 0, region: str = "emea") -> LoadSnapshot:
    return LoadSnapshot(site=site, region=region, active_calls=length,
                        queues={"billing-en-voice": QueueLoad(skill="billing", language="en", length=length,
                                                              expected_wait_s=length * 10.0, staffed=5)})


# --- keys and settings (no etcd) -----------------------------------------------------------


def test_key_layout():
    k = Keys()
    assert k.member("lyon") == "/tandem/members/lyon"
    assert k.load("lyon") == "/tandem/load/lyon"
    assert k.policy_overflow == "/tandem/policy/overflow"
    assert k.contingency("lyon") == "/tandem/contingency/lyon"
    assert k.leader() == "/tandem/rebalancer/leader"
    assert k.targets("lyon") == "/tandem/targets/lyon"
    assert Keys("/x/y/").member("a") == "/x/y/members/a"
    assert Keys.site_of(b"/tandem/load/lyon", k.load_prefix) == "lyon"
    assert Keys.site_of("/tandem/load/lyon/extra", k.load_prefix) is None
    for bad in ("tandem/", "/tandem", "//"):
        with pytest.raises(ValueError):
            Keys(bad)
    with pytest.raises(ValueError):
        k.member("../etc")


def test_settings_from_env_and_validation(tmp_path):
    s = EtcdSettings.from_env({"TANDEM_ETCD_ENDPOINTS": "10.0.0.1:2379, https://etcd-b:2379",
                               "TANDEM_ETCD_PREFIX": "/prod/", "TANDEM_ETCD_TTL": "5"})
    assert s.endpoints == ("10.0.0.1:2379", "https://etcd-b:2379") and s.ttl_s == 5 and s.tls
    assert not EtcdSettings().tls and EtcdSettings().ttl_s == 3
    for bad in ({"endpoints": ("nohost",)}, {"endpoints": ()}, {"cert_file": "c.pem"}, {"prefix": "x"}):
        with pytest.raises(ValueError):
            EtcdSettings(**bad)


# --- membership ------------------------------------------------------------------------


async def test_members_see_each_other_and_a_closed_node_leaves_at_once(coords):
    lyon, mtl = await coords("lyon"), await coords("montreal")
    seen: list[set] = []
    mtl.on_members(lambda ms: seen.append(set(ms)))
    assert await lyon.register(member("lyon", 7101)) is True
    assert await mtl.register(member("montreal", 7102, "amer")) is True
    await until(lambda: set(lyon.members()) == {"lyon", "montreal"} == set(mtl.members()), 2)
    assert mtl.members()["lyon"].address == "127.0.0.1:7101"
    assert (await lyon.list_members())["montreal"].region == "amer"
    await lyon.close()  # revokes the lease
    took = await until(lambda: "lyon" not in mtl.members(), 1.0)
    assert took < 0.5 and {"lyon", "montreal"} in seen and seen[-1] == {"montreal"}


async def test_killed_node_vanishes_after_its_ttl(etcd, etcd_prefix, coords):
    mtl = await coords("montreal")
    child = CoordProcess(etcd.endpoints, etcd_prefix, "ghost", ttl_s=2)
    try:
        await until(lambda: "ghost" in mtl.members() and "ghost" in mtl.peer_loads(), 3)
        child.kill()
        t_kill = time.monotonic()
        await until(lambda: "ghost" not in mtl.members(), 2 + 1.0)
        gone = time.monotonic() - t_kill
        await until(lambda: "ghost" not in mtl.peer_loads(), 0.5)
    finally:
        child.close()
    logging.getLogger("tandem.test").warning("killed member vanished %.2f s after SIGKILL (TTL 2 s)", gone)
    assert gone <= 2 + 1.0


async def test_duplicate_site_waits_until_the_holder_leaves(coords, etcd_settings):
    first = await coords("lyon")
    second = await coords("lyon")
    assert await first.register(member("lyon", 1)) is True
    assert await second.register(member("lyon", 2)) is False
    await until(lambda: "lyon" in first.members(), 1)
    assert first.members()["lyon"].address == "127.0.0.1:1"
    await first.close()
    await until(lambda: second.stats()["registered"], 2)
    await until(lambda: "lyon" in second.members() and second.members()["lyon"].address == "127.0.0.1:2", 1)


async def test_a_deleted_member_key_is_registered_again(coords, etcd):
    lyon = await coords("lyon")
    await lyon.register(member("lyon"))
    await until(lambda: "lyon" in lyon.members(), 1)
    history: list[set] = []
    lyon.on_members(lambda ms: history.append(set(ms)))
    etcd.etcdctl("del", lyon.keys.member("lyon"))
    await until(lambda: set() in history and "lyon" in lyon.members(), 2)


# --- load ------------------------------------------------------------------------------


async def test_load_is_rate_limited_and_the_latest_wins(coords, etcd_settings):
    settings = etcd_settings.model_copy(update={"load_max_rate": 4.0, "load_heartbeat_s": 10.0})
    lyon, mtl = await coords("lyon", settings), await coords("montreal")
    key = lyon.keys.load("lyon").encode()
    events: list[float] = []
    async with aetcd.Client(*etcd_settings.endpoints[0].split(":")) as raw:
        watch = await raw.watch(key)

        async def count():
            async for _ in watch:
                events.append(time.monotonic())

        counter = asyncio.create_task(count())
        t0 = time.monotonic()
        for i in range(1, 201):  # 200 changes in ~1 s
            lyon.publish_load(load("lyon", i))
            await asyncio.sleep(0.005)
        await until(lambda: mtl.peer_loads().get("lyon") and mtl.peer_loads()["lyon"].snapshot.active_calls == 200, 1.0)
        spent = time.monotonic() - t0
        await asyncio.sleep(0.6)
        counter.cancel()
        await watch.cancel()
    # at most 4/s (plus the first one), never two puts closer than 1/4 s
    assert 2 <= len(events) <= 4 * spent + 2, (len(events), spent)
    gaps = [b - a for a, b in zip(events, events[1:])]
    assert min(gaps) >= 0.2, gaps
    snap = mtl.peer_loads()["lyon"].snapshot
    assert snap.seq == lyon.stats()["load_puts"] and snap.queues["billing-en-voice"].length == 200
    # an unchanged load is not re-published before the heartbeat
    before = lyon.stats()["load_puts"]
    for _ in range(20):
        lyon.publish_load(load("lyon", 200))
    await asyncio.sleep(0.5)
    assert lyon.stats()["load_puts"] == before


async def test_heartbeat_keeps_a_quiet_peer_fresh(coords, etcd_settings):
    lyon, mtl = await coords("lyon"), await coords("montreal")
    lyon.publish_load(load("lyon", 3))
    await until(lambda: "lyon" in mtl.peer_loads(), 1)
    ages = []
    for _ in range(15):
        await asyncio.sleep(0.2)
        ages.append(mtl.peer_loads()["lyon"].age_s)
    assert max(ages) < etcd_settings.load_heartbeat_s + 0.5, ages
    assert "montreal" not in mtl.peer_loads()  # only peers
    lyon.publish_load(load("lyon", 3))  # same load, not another site's
    with pytest.raises(ValueError):
        lyon.publish_load(load("montreal"))


async def test_garbage_load_is_ignored(coords, etcd):
    mtl = await coords("montreal")
    etcd.etcdctl("put", mtl.keys.load("bogus"), "{not json")
    etcd.etcdctl("put", mtl.keys.load("liar"), json.dumps({"site": "other", "region": "x"}))
    await asyncio.sleep(0.3)
    assert mtl.peer_loads() == {}


# --- policy and contingency --------------------------------------------------------------


async def test_invalid_policy_is_refused_and_nothing_is_written(coords):
    lyon = await coords("lyon")
    with pytest.raises(PolicyRejected) as e:
        await lyon.put_policy({"queues": {"billing-en-voice": {"queue_ratio": {"on": 0.1, "off": 0.5}}}})
    assert "queues.billing-en-voice.queue_ratio" in str(e.value) and "off (0.5) must be below on" in str(e.value)
    with pytest.raises(PolicyRejected, match="not valid JSON"):
        await lyon.put_policy("{oops")
    policy, rev = await lyon.get_policy()
    assert rev == 0 and policy == OverflowPolicy()


async def test_policy_watch_applies_valid_and_keeps_previous_on_garbage(coords, etcd):
    lyon, mtl = await coords("lyon"), await coords("montreal")
    applied = []
    mtl.on_policy(applied.append)
    rev = await lyon.put_policy(VALID)
    await until(lambda: mtl.stats()["policy_revision"] == rev, 1)
    good = mtl.policy
    assert good.queues["billing-en-voice"].margin.seconds == 10 and applied == [good]
    assert (await mtl.get_policy()) == (good, rev)
    # readable with etcdctl
    assert json.loads(etcd.etcdctl("get", "--print-value-only", lyon.keys.policy_overflow))["partners"]["callpro"]
    # garbage written behind our back: previous policy stays, the error is visible
    etcd.etcdctl("put", lyon.keys.policy_overflow, '{"queues": {"billing-en-voice": {"split": {"percent": 300}}}}')
    await until(lambda: mtl.policy_error is not None, 1)
    assert mtl.policy == good and "split.percent" in mtl.policy_error and len(applied) == 1
    with pytest.raises(PolicyRejected):
        await mtl.get_policy()
    # optimistic concurrency
    with pytest.raises(PolicyRejected, match="changed meanwhile"):
        await lyon.put_policy(VALID, expected_revision=rev)
    rev2 = await lyon.put_policy({"default": {"wait_threshold": {}}})
    await until(lambda: mtl.policy_error is None and mtl.policy.default is not None, 1)
    rev3 = await lyon.put_policy(VALID, expected_revision=rev2)
    assert rev3 > rev2
    # deleted: back to the default, overflow-free policy
    etcd.etcdctl("del", lyon.keys.policy_overflow)
    await until(lambda: mtl.policy == OverflowPolicy(), 1)


async def test_contingency_modes(coords, etcd):
    lyon, mtl = await coords("lyon"), await coords("montreal")
    changes = []
    mtl.on_contingency(lambda site, state: changes.append((site, state.mode)))
    assert mtl.contingency("lyon").mode == "normal"
    await lyon.set_contingency("lyon", "surge")
    await until(lambda: mtl.contingency("lyon").mode == "surge", 1)
    assert (await mtl.get_contingency("lyon")).mode == "surge"
    assert mtl.contingency("lyon").settings(mtl.policy).backoffice_agents is True
    with pytest.raises(PolicyRejected, match="mode"):
        await lyon.set_contingency("lyon", {"mode": "panic"})
    etcd.etcdctl("put", lyon.keys.contingency("lyon"), '{"mode": "meltdown"}')
    await asyncio.sleep(0.3)
    assert mtl.contingency("lyon").mode == "surge"
    await lyon.set_contingency("lyon", {"mode": "emergency", "announcement": "closed", "set_by": "ops"})
    await until(lambda: mtl.contingency("lyon").mode == "emergency", 1)
    assert mtl.contingency("lyon").announcement == "closed"
    etcd.etcdctl("del", lyon.keys.contingency("lyon"))
    await until(lambda: mtl.contingency("lyon").mode == "normal", 1)
    assert changes == [("lyon", "surge"), ("lyon", "emergency"), ("lyon", "normal")]


# --- election and fencing --------------------------------------------------------------


async def test_one_leader_and_resign_hands_over(coords):
    a, b = await coords("lyon"), await coords("montreal")
    lead = await a.try_lead("rebalancer", "lyon")
    assert lead is not None and lead.active and lead.token > 0
    assert await b.try_lead("rebalancer", "montreal") is None
    assert await a.try_lead("rebalancer", "lyon") is lead  # idempotent
    assert await a.leader("rebalancer") == ("lyon", lead.token)
    waiting = asyncio.create_task(b.campaign("rebalancer", "montreal", timeout=10))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    t0 = time.monotonic()
    await a.resign(lead)
    b_lead = await waiting
    assert time.monotonic() - t0 < 1.0 and b_lead.token > lead.token and not lead.active
    with pytest.raises(NotLeader, match="stale"):
        await a.put_targets("lyon", {"agents": 3}, lead)
    await b.put_targets("lyon", {"agents": 3}, b_lead)
    t = await a.get_targets("lyon")
    assert (t.fencing, t.leader, t.targets) == (b_lead.token, "montreal", {"agents": 3})


async def test_frozen_leader_is_replaced_and_its_stale_token_refused(etcd, etcd_prefix, coords):
    b = await coords("montreal")
    old = CoordProcess(etcd.endpoints, etcd_prefix, "lyon", ttl_s=2, elect=True)
    try:
        old_token = old.ready["token"]
        assert old.send("targets")["ok"] is True
        old.signal(signal.SIGSTOP)  # a long GC pause, a frozen VM...
        t0 = time.monotonic()
        lead = await b.campaign("rebalancer", "montreal", timeout=10)
        took = time.monotonic() - t0
        assert lead.token > old_token and took <= 2 + 1.5
        await b.put_targets("lyon", {"agents": 5}, lead)
        old.signal(signal.SIGCONT)  # it wakes up believing it still leads
        for _ in range(5):  # right after SIGCONT its overdue timers may reset the channel once
            reply = old.send("targets")
            if reply.get("error") != "CoordinationUnavailable":
                break
        assert reply["ok"] is False and reply["error"] == "NotLeader", reply
        assert (await b.get_targets("lyon")).fencing == lead.token
        assert old.send("status")["leader_active"] is False
    finally:
        old.close()
    logging.getLogger("tandem.test").warning("frozen leader replaced after %.2f s (TTL 2 s)", took)


# --- TLS -------------------------------------------------------------------------------


async def test_tls_with_a_client_certificate(etcd_prefix):
    from etcd_fixtures import etcd_server

    with etcd_server(tls=True) as srv:
        t = srv.tls
        base = dict(endpoints=(f"https://{srv.endpoint}",), prefix=etcd_prefix, ttl_s=2, op_timeout_s=1.0,
                    ca_file=str(t["ca"]))
        lyon = EtcdCoordinator("lyon", EtcdSettings(**base, cert_file=str(t["client_cert"]), key_file=str(t["client_key"])))
        try:
            await lyon.start()
            await lyon.wait_ready(5)
            assert await lyon.register(member("lyon"))
            assert await lyon.put_policy(VALID) > 0
            await until(lambda: "lyon" in lyon.members() and lyon.policy.queues, 2)
        finally:
            await lyon.close()
        # Without a client certificate etcd refuses the connection: unavailable, nothing else.
        anon = EtcdCoordinator("lyon", EtcdSettings(**base))
        try:
            await anon.start()
            with pytest.raises(CoordinationUnavailable):
                await anon.wait_ready(1.5)
            with pytest.raises(CoordinationUnavailable):
                await anon.get_policy()
        finally:
            await anon.close()
        assert not lyon._tasks and not anon._tasks
