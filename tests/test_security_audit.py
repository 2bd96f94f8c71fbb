"""The audit trail (invariant 7: every mutation and every denial leaves a record): durable
on the node's disk before record() returns, also across SIGKILL; re-submitted from the
log when a sink is attached; in the ``audit`` table of a real clickhouse-server exactly
once across an outage and a re-submission; shown by ``tandem report audit``."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from history_fixtures import unique_database
from router.cli import app
from router.history.schema import AUDIT
from router.history.store import ClickHouseServerStore
from router.history.writer import HistoryWriter
from router.journal import Journal
from router.security.audit import AuditError, AuditLog, AuditRecord, row

ROOT = Path(__file__).resolve().parent.parent
START = 1_790_000_000.0


def make(i: int, *, site: str = "lyon", at: float | None = None) -> AuditRecord:
    """Record i: every third one a denial."""
    deny = i % 3 == 0
    return AuditRecord.new(
        site=site, identity=f"spiffe://tandem/operator/op{i % 5}", peer=f"ipv4:127.0.0.1:{40000 + i}",
        method="/router.v1.Routing/OfferCall" if i % 2 else "/router.v1.Agents/SetState",
        role="" if deny else "operator", objects={"call_id": f"c{i}", "queue": "billing"},
        decision="deny" if deny else "allow", reason="ROLE_FORBIDS" if deny else "",
        code="PERMISSION_DENIED" if deny else "OK", at=START + i * 0.001 if at is None else at)


async def record_waves(log: AuditLog, recs: list[AuditRecord], wave: int) -> None:
    """Record ``recs``, ``wave`` of them concurrently at a time."""
    for k in range(0, len(recs), wave):
        await asyncio.gather(*(log.record(r) for r in recs[k:k + wave]))


def test_row_has_the_table_columns():
    rec = make(1, at=START + 0.25)
    r = row(rec)
    assert list(r) == [c.name for c in AUDIT]
    assert (r["at"], r["at_us"]) == (int(START), 250_000)
    assert dict(zip(r["object_keys"], r["object_values"])) == rec.objects
    assert AuditLog.row(rec) == r


# --- (1) durable before record() returns, across SIGKILL --------------------------------------

CHILD = textwrap.dedent("""
    import asyncio, sys
    import uvloop
    from router.security.audit import AuditLog, AuditRecord

    async def main(path, per_wave, waves):
        log = AuditLog.open(path, "lyon", retain=2000)  # a new generation every 200 records
        ids = []
        for w in range(waves):
            recs = [AuditRecord.new(site="lyon", identity="spiffe://tandem/operator/x",
                                    peer="ipv4:127.0.0.1:1", method="/router.v1.Routing/OfferCall",
                                    decision="allow", role="operator", objects={"call_id": f"c{w}-{i}"})
                    for i in range(per_wave)]
            await asyncio.gather(*(log.record(r) for r in recs))
            ids += [r.id for r in recs]
        st = log.stats()
        print("done", st.records, st.syncs, " ".join(ids), flush=True)
        await asyncio.sleep(60)  # killed here

    uvloop.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
""")


async def test_records_are_on_disk_when_record_returns_even_after_sigkill(tmp_path):
    path = tmp_path / "audit"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), "250", "4"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        proc.send_signal(signal.SIGKILL)  # right after the last record() returned
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
    word, records, syncs, *ids = line.split()
    assert word == "done" and int(records) == len(ids) == 1000
    assert int(syncs) <= 100, syncs  # group commit: concurrent records share syncs
    log = AuditLog.open(path, "lyon", retain=2000)
    try:
        got = log.records()
        assert [r.id for r in got] == ids  # all of them, once, in order
        assert len([p for p in path.iterdir() if p.name.startswith("gen-")]) >= 2  # it rotated
    finally:
        await log.aclose()


# --- (2) the sink, re-submission, retention ---------------------------------------------------

async def test_set_sink_resubmits_what_the_log_retains(tmp_path):
    log = AuditLog.open(tmp_path / "a", "lyon")
    recs = [make(i, site="") for i in range(40)]  # the log fills in its site
    await record_waves(log, recs, 10)
    expect = [row(dataclasses.replace(r, site="lyon")) for r in recs]
    got: list[dict] = []
    log.set_sink(got.append)
    assert got == expect  # the retained records, oldest first
    extra = make(99)
    await log.record(extra)
    assert got[40:] == [row(extra)]  # a new record reaches the sink before record() returns
    with pytest.raises(AuditError):
        AuditLog.open(tmp_path / "a", "lyon")  # one log per directory
    await log.aclose()
    with pytest.raises(AuditError):
        await log.record(make(100))

    log = AuditLog.open(tmp_path / "a", "lyon")  # a restart: everything is handed over again
    again: list[dict] = []
    log.set_sink(again.append)
    assert again == got
    await log.aclose()


async def test_a_cancelled_caller_does_not_withdraw_its_record(tmp_path):
    log = AuditLog.open(tmp_path / "a", "lyon")
    got: list[dict] = []
    log.set_sink(got.append)
    first, second = make(1), make(2)
    task = asyncio.ensure_future(log.record(first))
    await asyncio.sleep(0)  # appended, not durable yet
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await log.record(second)
    assert [r["id"] for r in got] == [first.id, second.id]
    assert [r.id for r in log.records()] == [first.id, second.id]
    await log.aclose()


async def test_malformed_records_write_nothing_and_long_ones_are_cut(tmp_path):
    log = AuditLog.open(tmp_path / "a", "lyon")
    with pytest.raises(ValueError):
        await log.record(dataclasses.replace(make(3), decision="maybe"))
    with pytest.raises(TypeError):
        await log.record(dataclasses.replace(make(4), objects={"call_id": 7}))
    with pytest.raises(ValueError):
        await log.record(dataclasses.replace(make(5), at=float("nan")))
    assert log.records() == []
    long = dataclasses.replace(make(6), objects={f"k{i}": "x" * 5000 for i in range(40)})
    await log.record(long)
    (kept,) = log.records()
    assert len(kept.objects) == 33 and all(len(v) < 1100 for v in kept.objects.values())
    assert long.objects["k0"] == "x" * 5000  # the caller's record is left alone
    await log.aclose()


async def test_retention_keeps_the_newest_records(tmp_path):
    d = tmp_path / "a"
    log = AuditLog.open(d, "lyon", retain=100)  # generations of 10, 11 kept
    recs = [make(i) for i in range(350)]
    await record_waves(log, recs, 10)
    await log.aclose()
    log = AuditLog.open(d, "lyon", retain=100)
    kept = log.records()
    assert 100 <= len(kept) <= 110
    assert [r.id for r in kept] == [r.id for r in recs[-len(kept):]]
    assert len(list(d.glob("gen-*"))) <= 11
    assert [r.id for r in log.records(since=recs[-5].at)] == [r.id for r in recs[-5:]]
    sunk: list[dict] = []
    log.set_sink(sunk.append)
    assert sunk == [row(r) for r in kept]
    await log.aclose()


async def pages(log: AuditLog, size: int, **kw) -> list[list[str]]:
    out, after = [], None
    while True:
        got, after = await log.page(size, after, **kw)
        out.append([r.id for r in got])
        if after is None:
            return out


async def test_pages_read_the_log_in_order_and_survive_retention(tmp_path):
    """ListAudit's pages: the same records as records() in the same order, every filter
    applied, each page at most ``size``; a reader resuming while the retention deletes
    the generations it was in goes on with the oldest retained, without repeats."""
    d = tmp_path / "a"
    log = AuditLog.open(d, "lyon", retain=50)  # generations of 5
    recs = [make(i) for i in range(137)]
    await record_waves(log, recs, 4)
    try:
        want = [r.id for r in log.records()]
        for size in (1, 4, 5, 7, 60, 1000):
            got = await pages(log, size)
            assert all(len(p) <= size for p in got) and all(got[:-1])
            assert sum(got, []) == want, size
        denied = [r.id for r in log.records() if r.decision == "deny"]
        assert sum(await pages(log, 3, keep=lambda r: r.decision == "deny"), []) == denied
        since = recs[-20].at
        assert sum(await pages(log, 6, since=since), []) == [r.id for r in recs[-20:]]
        # one page, then 60 more records (the retention deletes the generations read)
        first, after = await log.page(10)
        assert first and after is not None
        more = [make(1000 + i) for i in range(60)]
        await record_waves(log, more, 4)
        seen, rest = [r.id for r in first], []
        while after is not None:
            got, after = await log.page(10, after)
            rest += [r.id for r in got]
        assert len(set(seen + rest)) == len(seen + rest)  # nothing twice
        retained = [r.id for r in log.records()]
        assert rest == retained[len(retained) - len(rest):] and rest[-1] == more[-1].id
        with pytest.raises(ValueError):
            await log.page(0)
    finally:
        await log.aclose()


async def stored(gen: Path) -> int:
    """Records in one generation's journal (the log being closed)."""
    j = Journal.open(gen)
    try:
        return len(j.recover()[1])
    finally:
        await j.close()


async def test_a_restart_goes_on_filling_the_generation_it_left(tmp_path):
    d = tmp_path / "a"
    log = AuditLog.open(d, "lyon", retain=100)  # generations of 10
    recs = [make(i) for i in range(17)]
    await record_waves(log, recs[:7], 1)  # half full: the next one is opened ahead
    await log.aclose()
    log = AuditLog.open(d, "lyon", retain=100)
    await record_waves(log, recs[7:], 1)
    await log.aclose()
    sizes = [await stored(g) for g in sorted(d.glob("gen-*"))]
    assert sizes[:2] == [10, 7] and sizes[2:] in ([], [0])  # (+ the one opened ahead)
    log = AuditLog.open(d, "lyon", retain=100)
    assert [r.id for r in log.records()] == [r.id for r in recs]
    await log.aclose()


# --- (3) exactly once in ClickHouse across an outage; (4) the report ---------------------------

def count(store) -> tuple[int, int, int]:
    (final, ids), = store.query("SELECT count(), uniqExact(id) FROM {db}.audit FINAL")
    (raw,), = store.query("SELECT count() FROM {db}.audit")
    return int(final), int(ids), int(raw)


def writer_for(store, spool: Path) -> HistoryWriter:
    return HistoryWriter(store, spool, batch_rows=100, flush_interval_s=0.05,
                         retry_initial_s=0.1, retry_max_s=0.5).start()


async def eventually(cond, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.05)
    return cond()


async def test_exactly_once_in_clickhouse_across_an_outage(clickhouse_outage_server, tmp_path):
    srv = clickhouse_outage_server
    srv.start()
    store = ClickHouseServerStore(srv.store_url(unique_database("audit")), connect_timeout=0.5,
                                  send_receive_timeout=5)
    recs = [make(i, at=time.time()) for i in range(1100)]
    w = writer_for(store, tmp_path / "spool")
    log = AuditLog.open(tmp_path / "audit", "lyon")
    try:
        log.set_sink(lambda r: w.submit("audit", r))
        await record_waves(log, recs[:300], 50)
        assert await eventually(lambda: w.stats().inserted >= 300), w.stats()
        srv.kill()
        t0 = time.monotonic()
        await record_waves(log, recs[300:800], 50)  # the audit path never waits on ClickHouse
        recorded_while_down_s = time.monotonic() - t0
        assert await eventually(lambda: w.stats().spool_files > 0), w.stats()
        srv.start()
        await record_waves(log, recs[800:], 50)
        assert await w.aflush(60), w.stats()
        assert w.stats().insert_errors > 0 and w.stats().replayed > 0
        assert count(store)[:2] == (1100, 1100)
    finally:
        await log.aclose()
        await w.aclose(5)
    assert recorded_while_down_s < 10, recorded_while_down_s

    # A restart hands everything over again: twice in the table, once for readers.
    w = writer_for(store, tmp_path / "spool")
    log = AuditLog.open(tmp_path / "audit", "lyon")
    try:
        log.set_sink(lambda r: w.submit("audit", r))
        assert await w.aflush(60), w.stats()
        assert w.stats().inserted == 1100  # every record written a second time …
        final, ids, _raw = count(store)  # (_raw: what background merges have left so far)
        assert (final, ids) == (1100, 1100)  # … and read once
        got = {r[0]: r[1:] for r in store.query(
            "SELECT id, decision, code, object_values[indexOf(object_keys, 'call_id')] FROM {db}.audit FINAL")}
        assert got == {r.id: (r.decision, r.code, r.objects["call_id"]) for r in recs}
    finally:
        await log.aclose()
        await w.aclose(5)
        store.query("DROP DATABASE IF EXISTS {db}")
        store.close()


async def test_report_audit(clickhouse_outage_server, tmp_path):
    srv = clickhouse_outage_server
    srv.start()
    url = srv.store_url(unique_database("auditcli"))
    store = ClickHouseServerStore(url)
    now = time.time()
    recs = [make(i, site="lyon" if i % 4 else "paris", at=now - 7200 if i == 0 else now - 60 + i)
            for i in range(30)]
    w = writer_for(store, tmp_path / "spool")
    try:
        for _ in range(2):  # twice: a restart's re-submission
            log = AuditLog.open(tmp_path / "audit", "lyon")
            log.set_sink(lambda r: w.submit("audit", r))
            if not log.records():
                await record_waves(log, recs, 10)
            await log.aclose()
        assert await w.aflush(60), w.stats()
    finally:
        await w.aclose(5)

    runner = CliRunner()

    def report(*args: str) -> dict:
        r = runner.invoke(app, ["report", "audit", "--history", url, "-o", "json", *args])
        assert r.exit_code == 0, r.output
        return json.loads(r.output)

    try:
        doc = report()
        assert [r["id"] for r in doc["records"]] == [r.id for r in sorted(recs, key=lambda r: r.at)]
        first = next(r for r in doc["records"] if r["id"] == recs[3].id)
        assert first["decision"] == "deny" and first["code"] == "PERMISSION_DENIED"
        assert first["reason"] == "ROLE_FORBIDS" and first["objects"] == recs[3].objects
        assert first["identity"] == recs[3].identity and first["at"] == pytest.approx(recs[3].at, abs=1e-6)
        assert {r["id"] for r in report("--decision", "deny")["records"]} == {
            r.id for r in recs if r.decision == "deny"}
        assert {r["id"] for r in report("--site", "paris")["records"]} == {r.id for r in recs if r.site == "paris"}
        assert recs[0].id not in {r["id"] for r in report("--since", "1h")["records"]}
        assert len(report("--since", "1h")["records"]) == 29
        assert len(report("--limit", "5")["records"]) == 5
        r = runner.invoke(app, ["report", "audit", "--clickhouse", url, "--decision", "deny"])
        assert r.exit_code == 0 and "PERMISSION_DENIED" in r.output and "ROLE_FORBIDS" in r.output
        r = runner.invoke(app, ["report", "audit", "--clickhouse", url, "--decision", "maybe"])
        assert r.exit_code == 2
    finally:
        store.query("DROP DATABASE IF EXISTS {db}")
        store.close()
