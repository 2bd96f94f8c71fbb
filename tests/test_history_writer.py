"""The history writer: batching, the spool, replays after an outage of the REAL server
(SIGKILL / SIGTERM mid-stream), a hung server (SIGSTOP), restarts — invariant 5: no row
lost, none counted twice."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import pytest

from history_fixtures import unique_database
from router.history import synth
from router.history.spool import Spool
from router.history.store import ClickHouseServerStore, StoreError, StoreUnavailable
from router.history.writer import HistoryWriter

START = 1_790_000_000


@pytest.fixture(autouse=True)
def no_leaked_inserters():
    """Every writer closed by a test leaves no insert process or writer thread behind."""
    yield
    import multiprocessing

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        procs = [p for p in multiprocessing.active_children() if p.name == "tandem-history-inserter"]
        threads = [t for t in threading.enumerate() if t.name.startswith("history-")]
        if not procs and not threads:
            return
        time.sleep(0.05)
    assert not procs and not threads, (procs, threads)


def totals(store):
    """What the queries see (FINAL: each key once) and what is physically stored."""
    (n, ids, wait, csat), = store.query(
        "SELECT count(), uniqExact(interaction_id), sum(wait_s), sum(csat) FROM {db}.interactions FINAL")
    (raw,), = store.query("SELECT count() FROM {db}.interactions")
    return int(n), int(ids), float(wait), int(csat), int(raw)


def expected(rows):
    return len(rows), len(rows), sum(r["wait_s"] for r in rows), sum(r["csat"] for r in rows)


def wait_until(cond, timeout=30.0, step=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def test_batches_reach_the_store(history_store, tmp_path):
    rows = synth.interactions(25_000, seed=3, start=START)
    with HistoryWriter(history_store, tmp_path / "spool", batch_rows=4000, flush_interval_s=0.2) as w:
        for r in rows:
            w.submit("interactions", r)
        for r in synth.routing_decisions(rows[:500]):
            w.submit("routing_decisions", r)
        assert w.flush(60)
        st = w.stats()
    assert st.submitted == st.inserted == 25_500
    assert st.spooled == 0 and st.spool_files == 0 and st.rejected_rows == 0
    n, ids, wait, csat, raw = totals(history_store)
    assert (n, ids, csat) == expected(rows)[:2] + (expected(rows)[3],)
    assert wait == pytest.approx(expected(rows)[2], rel=1e-12)
    (cands,), = history_store.query(
        "SELECT sum(length(candidates)) FROM {db}.routing_decisions FINAL WHERE call_id = 'c7'")
    assert cands == 2


def test_bad_rows_are_set_aside_not_the_batch(history_store, tmp_path):
    rows = synth.interactions(100, seed=4, start=START)
    bad = [dict(rows[0], interaction_id="bad1", csat=9000),  # out of UInt8 range
           dict(rows[1], interaction_id="bad2", wait_s="slow"),
           dict(rows[2], interaction_id="bad3", nonsense=1) | {"csat": None}]
    partial = {k: v for k, v in rows[3].items() if k not in ("csat", "reason")}
    with HistoryWriter(history_store, tmp_path / "spool", batch_rows=1000, flush_interval_s=0.1) as w:
        for r in rows[4:] + bad + [dict(partial, interaction_id="partial")]:
            w.submit("interactions", r)
        assert w.flush(30)
        st = w.stats()
        with pytest.raises(ValueError):
            w.submit("no_such_table", {})
    assert st.rejected_rows == 3 and st.inserted == 97
    ids = {r[0] for r in history_store.query("SELECT interaction_id FROM {db}.interactions FINAL")}
    assert "partial" in ids and not ids & {"bad1", "bad2", "bad3"}
    lines = (tmp_path / "spool" / "rejected" / "rows.interactions.jsonl").read_text().splitlines()
    assert len(lines) == 3 and "csat" in json.loads(lines[0])["reason"]


def test_spool_survives_a_restart_of_the_writer(history_store, tmp_path):
    """Store unreachable: rows go to the spool; the writer stops; a new writer on the same
    spool and a reachable store replays them once."""
    dead = ClickHouseServerStore("clickhouse://127.0.0.1:9/nowhere", connect_timeout=0.5)
    rows = synth.interactions(12_000, seed=5, start=START)
    w = HistoryWriter(dead, tmp_path / "spool", batch_rows=3000, flush_interval_s=0.1, retry_max_s=0.5).start()
    for r in rows:
        w.submit("interactions", r)
    assert not w.flush(1.0)
    assert w.close(timeout=1.0) is False  # could not deliver: all of it is on disk
    files = sorted(os.listdir(tmp_path / "spool"))
    assert files and all(f.endswith(".interactions.json") for f in files)
    with HistoryWriter(history_store, tmp_path / "spool", batch_rows=3000) as w2:
        assert w2.flush(60)
        st = w2.stats()
    assert st.replayed == 12_000 and st.spool_files == 0
    n, ids, wait, csat, raw = totals(history_store)
    assert (n, ids, csat) == (12_000, 12_000, sum(r["csat"] for r in rows))
    assert raw == 12_000


def test_replay_after_a_crash_between_insert_and_delete(history_store, tmp_path):
    """A spool file whose rows already reached the store (the writer died before deleting
    it) is replayed; the keys make the copy invisible."""
    rows = synth.interactions(2000, seed=6, start=START)
    with HistoryWriter(history_store, tmp_path / "a") as w:
        for r in rows:
            w.submit("interactions", r)
        assert w.flush(30)
    spool = Spool(tmp_path / "b")
    names = [c for c in rows[0]]
    spool.write(spool.reserve_seq(), "interactions", names, [[r[n] for r in rows[:700]] for n in names])
    (tmp_path / "b" / "0000000000000099.interactions.json.tmp").write_text("{torn")
    with HistoryWriter(history_store, tmp_path / "b") as w:
        assert w.flush(30)
    assert not (tmp_path / "b" / "0000000000000099.interactions.json.tmp").exists()
    n, ids, wait, csat, raw = totals(history_store)
    assert (n, ids) == (2000, 2000) and raw == 2700


async def test_submit_from_asyncio(history_store, tmp_path):
    w = HistoryWriter(history_store, tmp_path / "spool", flush_interval_s=0.05).start()
    rows = synth.interactions(3000, seed=8, start=START)
    for i, r in enumerate(rows):
        w.submit("interactions", r)
        if i % 500 == 0:
            await asyncio.sleep(0)
    assert await w.aflush(30)
    assert await w.aclose()
    assert totals(history_store)[0] == 3000
    with pytest.raises(RuntimeError):
        w.submit("interactions", rows[0])


# --- the real server going away --------------------------------------------------------------


class Traffic:
    """A generator thread submitting interactions at a steady rate, keeping its own record."""

    def __init__(self, writer, rate_per_s=4000, seed=11):
        self.writer = writer
        self.rate = rate_per_s
        self.sent: list[dict] = []
        self.max_submit_s = 0.0
        self.slow_submits = 0  # submits over 50 ms: a GIL hiccup on a loaded box, or blocking
        self._stop = threading.Event()
        self._rows = iter(synth.interactions(400_000, seed=seed, start=START, span_s=5 * 86400, prefix="o"))
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        t0 = time.monotonic()
        while not self._stop.is_set():
            due = int((time.monotonic() - t0) * self.rate) - len(self.sent)
            for _ in range(max(0, min(due, 2000))):
                r = next(self._rows)
                s = time.perf_counter()
                self.writer.submit("interactions", r)
                took = time.perf_counter() - s
                self.max_submit_s = max(self.max_submit_s, took)
                self.slow_submits += took > 0.05
                self.sent.append(r)
            time.sleep(0.005)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(10)


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_server_outage_loses_nothing_and_duplicates_nothing(clickhouse_outage_server, tmp_path, how):
    srv = clickhouse_outage_server
    srv.start()
    store = ClickHouseServerStore(srv.store_url(unique_database("outage")), connect_timeout=0.5,
                                  send_receive_timeout=5)
    w = HistoryWriter(store, tmp_path / "spool", batch_rows=2000, flush_interval_s=0.1,
                      retry_initial_s=0.1, retry_max_s=0.5).start()
    try:
        with Traffic(w) as traffic:
            assert wait_until(lambda: w.stats().inserted >= 6000, 30), w.stats()
            srv.kill() if how == "sigkill" else srv.stop()
            # Traffic goes on: the spool grows while the server is away.
            assert wait_until(lambda: w.stats().spool_files >= 3, 30), w.stats()
            spooled_while_down = w.stats().spooled
            time.sleep(0.5)
            srv.start()
            # ... and drains after it is back, while traffic still flows.
            assert wait_until(lambda: w.stats().replayed > 0, 60), w.stats()
            time.sleep(0.5)
        assert w.flush(60), w.stats()
        st = w.stats()
    finally:
        w.close(timeout=5)
    sent = traffic.sent
    assert spooled_while_down > 0 and st.insert_errors > 0
    assert st.submitted == len(sent) and st.rejected_rows == 0 and st.rejected_batches == 0
    n, ids, wait, csat, raw = totals(store)
    assert n == ids == len(sent), (n, ids, len(sent), raw)
    assert csat == sum(r["csat"] for r in sent)
    assert wait == pytest.approx(sum(r["wait_s"] for r in sent), rel=1e-12)
    assert {r[0] for r in store.query("SELECT interaction_id FROM {db}.interactions")} == {
        r["interaction_id"] for r in sent}
    # The routing side never waited on the outage.
    # (A submit that waited on ClickHouse would take an insert, a connect timeout (2 s) or
    # more, once per batch; a rare scheduler/GIL hiccup on this 2-core box can reach
    # ~0.15 s, so one bound on the worst case alone is flaky.)
    assert traffic.slow_submits <= 2 and traffic.max_submit_s < 1.0, (traffic.slow_submits, traffic.max_submit_s)
    store.query("DROP DATABASE IF EXISTS {db}")
    store.close()


def test_hung_server_never_blocks_submit_and_memory_stays_bounded(clickhouse_outage_server, tmp_path):
    """SIGSTOP: connections hang instead of failing. submit() stays O(1), the batcher
    spools instead of waiting, the backlog stays small; after SIGCONT all rows arrive."""
    srv = clickhouse_outage_server
    srv.start()
    store = ClickHouseServerStore(srv.store_url(unique_database("hung")), connect_timeout=0.5,
                                  send_receive_timeout=2)
    w = HistoryWriter(store, tmp_path / "spool", batch_rows=1000, flush_interval_s=0.05,
                      handoff_wait_s=0.2, retry_initial_s=0.1, retry_max_s=0.5).start()
    assert w.flush(30)
    max_backlog = 0
    try:
        with Traffic(w, rate_per_s=5000, seed=12) as traffic:
            time.sleep(0.5)
            os.kill(srv.proc.pid, signal.SIGSTOP)
            try:
                t_end = time.monotonic() + 4
                while time.monotonic() < t_end:
                    max_backlog = max(max_backlog, w.stats().backlog)
                    time.sleep(0.02)
                assert w.stats().spool_files > 0
            finally:
                os.kill(srv.proc.pid, signal.SIGCONT)
            time.sleep(0.5)
        assert w.flush(60), w.stats()
    finally:
        w.close(timeout=5)
    # (A submit that waited on ClickHouse would take an insert, a connect timeout (2 s) or
    # more, once per batch; a rare scheduler/GIL hiccup on this 2-core box can reach
    # ~0.15 s, so one bound on the worst case alone is flaky.)
    assert traffic.slow_submits <= 2 and traffic.max_submit_s < 1.0, (traffic.slow_submits, traffic.max_submit_s)
    # 5000 rows/s: the backlog never held much more than a second's worth of rows.
    assert max_backlog < 10_000, max_backlog
    n, ids, *_ = totals(store)
    assert n == ids == len(traffic.sent)
    store.query("DROP DATABASE IF EXISTS {db}")
    store.close()


def test_unreachable_server_raises_store_unavailable(tmp_path):
    store = ClickHouseServerStore("clickhouse://127.0.0.1:9/x", connect_timeout=0.5)
    with pytest.raises(StoreUnavailable):
        store.query("SELECT 1")
    assert not store.ping()
    assert issubclass(StoreUnavailable, StoreError)


def _children() -> dict[int, str]:
    """This process's live children: pid -> command line (from /proc)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(ppid) == os.getpid() and state != "Z":
            out[int(d)] = cmd
    return out


def test_close_leaves_no_child_process_behind(server_store, tmp_path):
    """Closing a writer with insert processes leaves this process no child at all: not
    the inserts, not multiprocessing's resource tracker that spawning them started. A
    node's helper still alive at its exit is SIGKILLed by systemd's stop, which in a
    container then waits out the stop timeout and marks the unit failed."""
    rows = synth.interactions(50, seed=5, start=START)
    with HistoryWriter(server_store, tmp_path / "spool", batch_rows=10, flush_interval_s=0.05,
                       insert_process=True) as w:
        for r in rows:
            w.submit("interactions", r)
        assert w.flush(30)
        during = _children()
        assert any("resource_tracker" in c for c in during.values()), during
        assert sum("spawn_main" in c for c in during.values()) == 2, during
    left = {pid: c for pid, c in _children().items() if "multiprocessing" in c}
    assert left == {}  # (the test's own ClickHouse server is a child too)
    assert totals(server_store)[:2] == (50, 50)
