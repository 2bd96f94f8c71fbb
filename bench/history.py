"""History writer and KPI query against a real clickhouse-server.

1. Rows/s through :class:`router.history.writer.HistoryWriter` into the server at batch
   sizes 1k, 10k and 100k: the clock runs from the first ``submit()`` of ``--rows``
   prepared interaction rows until ``flush()`` says all of them are in the server. The
   anchor, measured in the same run on the same server, is the server's own
   ``INSERT INTO interactions SELECT … FROM numbers(N)`` (no client, no network) with the
   same N and block size; N = max(--rows, 10 batches). The writer runs both ways in the
   same run, alternating, ``--runs`` times each: columnar (``HistoryWriter(columnar=True)``:
   Native column bytes built with numpy, :mod:`router.history.inserter`) and row-wise (the
   driver's per-value encoding: the default). Every run
   measures the anchor again. One JSON line per batch size, medians over the runs:
   {"batch", "rows", "runs", "writer_rows_per_s" (the default, row-wise), "engine_rows_per_s",
   "ratio" (writer / engine), "columnar_rows_per_s", "columnar_ratio", "speedup"
   (columnar / row-wise), "cpu_us_per_row" {path: {"writer_process", "insert_processes",
   "server"}}} — CPU per row is the steadier figure on a loaded machine.
2. The KPI query (:func:`router.history.kpi.interactions_sql`, by site and queue, through
   FINAL) over ``--kpi-rows`` (10 M) rows made by the server itself; the FCR query is
   timed on its own. One line {"kpi_rows", "kpi_query_ms", "fcr_query_ms"} (medians).

Starts its own server (Debian's clickhouse-server) in a temp dir unless ``--clickhouse``
names one; uses a fresh database and drops it at the end. About 4 minutes on 2 quiet cores
(``--runs 1 --batches 10000`` for a quick look).

    .venv/bin/python bench/history.py --json [--rows 300000] [--runs 3] [--batches 1000,10000,100000]
                                             [--kpi-rows 10000000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid

from router.history import synth
from router.history.kpi import KpiQuery, fcr_sql, interactions_sql
from router.local.clickhouse import running_clickhouse
from router.history.store import ClickHouseServerStore
from router.history.writer import HistoryWriter

BATCHES = (1_000, 10_000, 100_000)

# The server's own rows, shaped like the writer's (same columns, similar values).
NUMBERS_SELECT = """
SELECT
    concat('{prefix}', toString(number)) AS interaction_id,
    toUInt64(1790000000000 + number) AS ver,
    arrayElement(['lyon', 'montreal', 'callpro'], number % 3 + 1) AS site,
    arrayElement(['emea', 'amer', 'apac'], number % 3 + 1) AS region,
    if(number % 3 = 2, 'callpro', '') AS partner,
    arrayElement(['lyon', 'montreal', 'lyon'], number % 3 + 1) AS origin_site,
    arrayElement(['emea', 'amer', 'emea'], number % 3 + 1) AS origin_region,
    arrayElement(['billing-fr-voice', 'billing-en-voice', 'support-chat', 'sales-voice'], intDiv(number, 3) % 4 + 1) AS queue,
    arrayElement(['billing', 'billing', 'support', 'sales'], intDiv(number, 3) % 4 + 1) AS skill,
    if(intDiv(number, 3) % 4 = 2, 'chat', 'voice') AS channel,
    arrayElement(['fr', 'en', '', ''], intDiv(number, 3) % 4 + 1) AS language,
    if(number % 17 = 0, 'vip', 'standard') AS priority_class,
    concat('+3361', toString(number % {callers})) AS caller,
    if(number % 5 = 0, concat('cust', toString(number % {callers})), '') AS customer_id,
    concat(site, '-', toString(number % 40)) AS agent_id,
    multiIf(number % 20 = 0, 'rejected', number % 7 = 0, 'abandoned', 'completed') AS outcome,
    if(outcome = 'abandoned', 'caller_hung_up', '') AS reason,
    toDateTime({start} + intDiv(number * {span}, {n}), 'UTC') AS offered_at,
    offered_at AS queued_at,
    toDateTime(0, 'UTC') AS transferred_at,
    if(outcome = 'completed', toDateTime(toUInt32(offered_at) + number % 60, 'UTC'), toDateTime(0, 'UTC')) AS answered_at,
    toDateTime(toUInt32(offered_at) + number % 60 + 180, 'UTC') AS ended_at,
    (number % 600) / 10.0 AS wait_s,
    if(outcome = 'completed', 180.0 + number % 300, 0.0) AS talk_s,
    if(outcome = 'completed', 15.0, 0.0) AS wrap_s,
    talk_s + wrap_s AS handle_s,
    toUInt8(if(outcome = 'completed', number % 6, 0)) AS csat,
    toUInt8(number % 3 != 0) AS resolved,
    '' AS wrap_up_code,
    toUInt16(0) AS transfer_count
FROM numbers({n})
"""


def engine_rows_per_s(store: ClickHouseServerStore, table: str, n: int, block: int) -> float:
    store.query(f"CREATE TABLE {{db}}.{table} AS {{db}}.interactions")
    sql = (f"INSERT INTO {{db}}.{table} "
           + NUMBERS_SELECT.format(prefix="e", callers=max(1, n // 3), start=1_790_000_000, span=86_400, n=n)
           + f" SETTINGS max_block_size = {block}, min_insert_block_size_rows = {block}")
    t = time.perf_counter()
    store.query(sql)
    return n / (time.perf_counter() - t)


def server_cpu_s(pid: int | None) -> float:
    """CPU seconds the server process has used (0 when it is not ours to look at)."""
    if pid is None:
        return 0.0
    try:
        fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def writer_rows_per_s(store: ClickHouseServerStore, rows: list[dict], batch: int, spool: str,
                      columnar: bool = False, server_pid: int | None = None) -> tuple[float, dict, dict]:
    """(rows/s, writer stats, CPU µs per row): the CPU of this process (submit, batcher,
    encoding), of the insert processes (counted when they exit, at close) and of the
    server (merges included) — less sensitive to a loaded machine than the rate."""
    w = HistoryWriter(store, spool, batch_rows=batch, flush_interval_s=0.2, migrate=False,
                      columnar=columnar).start()
    cpu0, kids0, srv0 = time.process_time(), children_cpu_s(), server_cpu_s(server_pid)
    try:
        submit = w.submit
        t = time.perf_counter()
        for r in rows:
            submit("interactions", r)
        if not w.flush(300):
            raise RuntimeError(f"writer did not finish: {w.stats()}")
        elapsed = time.perf_counter() - t
        cpu1, srv1 = time.process_time(), server_cpu_s(server_pid)
        stats = w.stats()
    finally:
        w.close(timeout=5)
    us = 1e6 / len(rows)
    cpu = {"writer_process": round((cpu1 - cpu0) * us, 2), "insert_processes": round((children_cpu_s() - kids0) * us, 2),
           "server": round((srv1 - srv0) * us, 2)}
    return len(rows) / elapsed, vars(stats), cpu


def prepared_rows(n: int, tag: str) -> list[dict]:
    """n distinct rows (new ids on a pool of synthetic ones), built before the clock starts."""
    pool = synth.interactions(2000, seed=5)
    return [dict(pool[i % 2000], interaction_id=f"{tag}{i}") for i in range(n)]


def wait_for_merges(store: ClickHouseServerStore, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        (n,), = store.query("SELECT count() FROM system.merges WHERE database = {d}", {"d": store.database})
        if n == 0:
            return
        time.sleep(0.5)


def kpi_latency(store: ClickHouseServerStore, n: int, repeats: int) -> dict:
    store.query("INSERT INTO {db}.interactions " + NUMBERS_SELECT.format(
        prefix="k", callers=max(1, n // 10), start=1_790_000_000, span=30 * 86_400, n=n))
    wait_for_merges(store)
    q = KpiQuery(by=("site", "queue"))
    main, fcr = [], []
    groups = 0
    for _ in range(repeats):
        t = time.perf_counter()
        groups = len(store.query(interactions_sql(q)))
        main.append(time.perf_counter() - t)
    t = time.perf_counter()
    store.query(fcr_sql(q))
    fcr.append(time.perf_counter() - t)
    return {"kpi_rows": n, "kpi_query_ms": round(1000 * statistics.median(main), 1),
            "fcr_query_ms": round(1000 * statistics.median(fcr), 1), "kpi_groups": groups}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="JSON lines only")
    ap.add_argument("--clickhouse", help="clickhouse://host:port of a running server (default: start one)")
    ap.add_argument("--rows", type=int, default=300_000, help="rows per batch size (at least 10 batches)")
    ap.add_argument("--kpi-rows", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=3, help="KPI query repeats")
    ap.add_argument("--runs", type=int, default=3, help="writer runs per batch size and path (medians)")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch sizes, comma-separated")
    args = ap.parse_args()

    with contextlib.ExitStack() as stack:
        server_pid = None
        if args.clickhouse:
            base = args.clickhouse.rstrip("/")
        else:
            srv = stack.enter_context(running_clickhouse())
            base = srv.url
            server_pid = srv.proc.pid
        store = ClickHouseServerStore(f"{base}/bench_{uuid.uuid4().hex[:8]}", send_receive_timeout=300)
        stack.callback(store.close)
        stack.callback(lambda: store.query("DROP DATABASE IF EXISTS {db}"))
        store.migrate()
        spool_root = stack.enter_context(tempfile.TemporaryDirectory(prefix="tandem-bench-"))
        out = []
        for batch in (int(b) for b in args.batches.split(",")):
            n = max(args.rows, 10 * batch)  # ten batches at least, so the pipeline fills
            rates: dict[str, list[float]] = {"columnar": [], "rowwise": [], "engine": []}
            cpus: dict[str, list[dict]] = {"columnar": [], "rowwise": []}
            for run in range(max(1, args.runs)):
                for path in ("rowwise", "columnar") if run % 2 == 0 else ("columnar", "rowwise"):
                    store.query("TRUNCATE TABLE {db}.interactions")
                    store.query("DROP TABLE IF EXISTS {db}.anchor_%d" % batch)
                    wait_for_merges(store)
                    rates["engine"].append(engine_rows_per_s(store, f"anchor_{batch}", n, batch))
                    wait_for_merges(store)
                    rows = prepared_rows(n, f"w{batch}-{run}-{path}-")
                    wr, stats, cpu = writer_rows_per_s(store, rows, batch, f"{spool_root}/{batch}-{run}-{path}",
                                                       columnar=path == "columnar", server_pid=server_pid)
                    del rows
                    rates[path].append(wr)
                    cpus[path].append(cpu)
                    (count,), = store.query("SELECT count() FROM {db}.interactions FINAL")
                    if count != n or stats["spooled"]:
                        print(f"warning: {path}: {count} rows stored, {stats['spooled']} spooled", file=sys.stderr)
            med = {k: statistics.median(v) for k, v in rates.items()}
            line = {"batch": batch, "rows": n, "runs": len(rates["columnar"]),
                    "writer_rows_per_s": round(med["rowwise"]),  # the writer's default path
                    "engine_rows_per_s": round(med["engine"]), "ratio": round(med["rowwise"] / med["engine"], 3),
                    "columnar_rows_per_s": round(med["columnar"]),
                    "columnar_ratio": round(med["columnar"] / med["engine"], 3),
                    "speedup": round(med["columnar"] / med["rowwise"], 2),
                    # CPU µs per row, medians: where the time goes, whatever else runs.
                    "cpu_us_per_row": {p: {k: round(statistics.median(c[k] for c in cs), 2) for k in cs[0]}
                                       for p, cs in cpus.items()}}
            if not args.json:
                line["all"] = {k: [round(x) for x in v] for k, v in rates.items()}
            out.append(line)
            print(json.dumps(line), flush=True)
        store.query("TRUNCATE TABLE {db}.interactions")
        line = kpi_latency(store, args.kpi_rows, args.repeats)
        print(json.dumps(line), flush=True)
        if not args.json:
            for o in out:
                if o["batch"] == 10_000:
                    print(f"writer at 10k/batch: {o['writer_rows_per_s']} rows/s (target >= 100000), "
                          f"{o['ratio']} of the server's own INSERT…SELECT (goal 0.5)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
