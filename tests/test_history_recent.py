"""Recent contacts (repeat caller, screen pop): cache, and degradation without blocking."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest

from history_fixtures import unique_database
from router.history import synth
from router.history.recent import RecentContacts, is_repeat
from router.history.schema import TABLES
from router.history.store import ClickHouseServerStore, HistoryStore, StoreUnavailable
from router.model import PastContact

NOW = 1_790_100_000


def insert(store, rows_):
    names = [c.name for c in TABLES["interactions"]]
    store.insert("interactions", names, [[r[n] for r in rows_] for n in names])


def contacts_of(caller, n):
    base = synth.interactions(1, seed=1)[0]
    return [dict(base, interaction_id=f"{caller}-{i}", caller=caller, offered_at=NOW - 3600 * (i + 1),
                 skill="billing" if i % 2 else "support", outcome="completed", csat=i % 5 + 1)
            for i in range(n)]


async def test_lookup_newest_first_with_cache(history_store):
    rows_ = contacts_of("+3361000001", 8) + contacts_of("+3361000002", 2)
    insert(history_store, rows_)
    insert(history_store, rows_[:3])  # replayed rows count once
    clock = [float(NOW)]
    rc = RecentContacts(history_store, limit=5, window_s=7 * 3600, ttl_s=60, timeout_s=5,
                        clock=lambda: clock[0])
    got = await rc.lookup("+3361000001")
    assert [c.call_id for c in got] == [f"+3361000001-{i}" for i in range(5)]
    assert got[0] == PastContact("+3361000001-0", NOW - 3600, "support", "completed", 1)
    assert [c.call_id for c in await rc.lookup("+3361000002")] == ["+3361000002-0", "+3361000002-1"]
    assert await rc.lookup("+33699999999") == []
    assert await rc.lookup("") == []
    assert rc.misses == 3
    await rc.lookup("+3361000001")
    assert rc.hits == 1
    # A contact that just ended here is seen at once; the window limits what is fetched.
    rc.record("+3361000001", PastContact("new", NOW - 1, "billing", "completed", 5))
    assert (await rc.lookup("+3361000001"))[0].call_id == "new"
    clock[0] += 61  # stale: fetched again
    again = await rc.lookup("+3361000001")
    assert rc.misses == 4 and len(again) == 5
    assert is_repeat(again, clock[0], 24) and not is_repeat(again, clock[0], 0.5)
    assert rc.peek("+3361000001") is not None


class HungStore(HistoryStore):
    """A store whose queries hang (like a SIGSTOPped server) or fail."""

    url = "hung://"

    def __init__(self, mode="hang"):
        super().__init__("tandem")
        self.mode = mode
        self.calls = 0
        self.release = threading.Event()

    def _query(self, sql):
        self.calls += 1
        if self.mode == "fail":
            raise StoreUnavailable("down")
        self.release.wait(10)
        return []

    def _insert(self, table, columns, data):
        raise StoreUnavailable("down")


async def test_a_hung_store_degrades_to_no_history_quickly():
    store = HungStore()
    rc = RecentContacts(store, timeout_s=0.1, cooldown_s=30)
    t = time.perf_counter()
    assert await rc.lookup("+1") == []
    assert time.perf_counter() - t < 0.5
    # While the store is deemed down, look-ups do not even ask it.
    t = time.perf_counter()
    for i in range(100):
        assert await rc.lookup(f"+2{i}") == []
    assert time.perf_counter() - t < 0.1
    assert store.calls == 1 and rc.degraded >= 100
    store.release.set()


async def test_a_failing_store_degrades_and_recovers():
    store = HungStore("fail")
    clock = [1000.0]
    rc = RecentContacts(store, timeout_s=1, cooldown_s=5, clock=lambda: clock[0])
    assert await rc.lookup("+1") == []
    assert await rc.lookup("+1") == []
    assert store.calls == 1
    clock[0] += 6
    store.mode = "hang"
    store.release.set()
    assert await rc.lookup("+1") == []  # asked again after the cool-down (answers: nothing)
    assert store.calls == 2


async def test_stopped_server_does_not_block_lookups(clickhouse_outage_server):
    srv = clickhouse_outage_server
    srv.start()
    store = ClickHouseServerStore(srv.store_url(unique_database("recent")), connect_timeout=0.5,
                                  send_receive_timeout=3)
    store.migrate()
    insert(store, contacts_of("+3361000003", 2))
    rc = RecentContacts(store, timeout_s=5, cooldown_s=1, ttl_s=0.0, window_s=10 * 365 * 86400)
    assert len(await rc.lookup("+3361000003")) == 2  # connected, warm
    rc.timeout_s = 0.2
    os.kill(srv.proc.pid, signal.SIGSTOP)
    try:
        t = time.perf_counter()
        results = await asyncio.gather(*(rc.lookup("+3361000003") for _ in range(20)))
        assert time.perf_counter() - t < 1.0
        assert all(r == [] for r in results)
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)
    await asyncio.sleep(1.2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if len(await rc.lookup("+3361000003")) == 2:
            break
        await asyncio.sleep(0.3)
    assert len(await rc.lookup("+3361000003")) == 2
    store.query("DROP DATABASE IF EXISTS {db}")
    store.close()


@pytest.mark.parametrize("window_h,expect", [(0, False), (0.5, False), (2, True)])
def test_is_repeat(window_h, expect):
    assert is_repeat([PastContact("a", NOW - 3600, "s", "completed", 0)], NOW, window_h) is expect
