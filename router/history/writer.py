"""The history writer: batched, off the routing path, spooling to disk while the store is
down (DESIGN.md invariant 5: written at least once, read exactly once).

The routing hot path calls :meth:`HistoryWriter.submit` — an O(1) ``deque.append`` that
never blocks and never does I/O. Threads do the rest:

* the **batcher** wakes when ``batch_rows`` rows are waiting or every
  ``flush_interval_s``, takes the waiting rows, encodes them per table
  (:mod:`router.history.encode`), reserves a sequence number for each batch and either
  hands it to an inserter (when the store is healthy and the spool is empty; it waits
  at most ``handoff_wait_s`` for a free one) or writes it to the spool. It never waits on
  the network longer than that, so memory holds the rows submitted during about
  ``handoff_wait_s`` plus a few batches, whatever the store does (a hung server
  included), as long as the disk keeps up.
* ``insert_concurrency`` **inserters** (2 for a server store, 1 for chdb) insert handed
  batches — for a server store through child processes holding their own connections
  (:mod:`router.history.inserter`), so the driver's CPU is not the routing process's.
  Inserter 0 also applies the migrations first and, while the spool is not empty,
  replays it oldest first (several files of one table per insert, up to
  ``replay_rows``), deleting each file once its rows are in the store. New batches go
  straight to the store meanwhile when it is healthy; they only join the spool while it
  is down, or when every inserter stayed busy for ``handoff_wait_s`` (overload: the spool
  then absorbs the excess and is replayed in large inserts). A batch that fails with
  :class:`StoreUnavailable` goes to the spool under its own sequence number; retries
  back off from ``retry_initial_s`` to ``retry_max_s``. A batch the store refuses for
  good (:class:`StoreError`) is moved to ``spool/rejected/`` and counted, never retried,
  never blocking the others. Batches may land in the store in any order; nothing
  depends on it (a correction carries a higher ``ver``).

A batch is only removed from the spool after its insert returned. An insert that timed out
may still have been applied; it is replayed anyway, and the tables' keys make the copy
invisible to every query (see :mod:`router.history.schema`). The spool survives a restart:
a new writer on the same directory replays what the old one left.

Rows submitted but not yet in a batch live only in memory (about ``flush_interval_s`` of
them): :meth:`close` spools them, but a SIGKILL loses them. The node's journal is the
source of truth: on start, after recovery, the node re-submits the ``interactions`` row of
every ended call its engine still retains, which covers whatever was in memory at the
crash (the keys absorb the copies); see :mod:`router.history.rows`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.history.encode import TableEncoder
from router.history.inserter import ProcessInserter, ThreadInserter, stop_resource_tracker
from router.history.schema import TABLES
from router.history.spool import Spool, SpooledBatch
from router.history.store import HistoryStore, StoreError, StoreUnavailable, open_store

log = logging.getLogger("tandem.history")


@dataclass
class WriterStats:
    submitted: int = 0  # rows given to submit()
    inserted: int = 0  # rows that reached the store (replays included)
    spooled: int = 0  # rows written to the spool
    replayed: int = 0  # rows inserted from the spool
    rejected_rows: int = 0  # rows set aside by the encoder (bad values)
    rejected_batches: int = 0  # batches the store refused for good
    insert_errors: int = 0  # StoreUnavailable seen
    backlog: int = 0  # rows submitted, not yet batched
    spool_files: int = 0  # batches waiting in the spool
    healthy: bool = False  # last store contact succeeded
    last_error: str = ""


@dataclass
class _Batch:
    seq: int
    table: str
    columns: list[str]
    data: list[list[Any]]

    @property
    def rows(self) -> int:
        return len(self.data[0]) if self.data else 0


class HistoryWriter:
    """See the module docstring. Use as a context manager, or ``start()`` / ``close()``
    (``await aclose()`` from asyncio)."""

    def __init__(
        self,
        store: HistoryStore,
        spool_dir: str | Path,
        *,
        batch_rows: int = 10_000,
        flush_interval_s: float = 1.0,
        replay_rows: int = 100_000,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 5.0,
        handoff_wait_s: float = 1.0,
        fsync: bool = True,
        migrate: bool = True,
        insert_process: bool | None = None,
        insert_concurrency: int | None = None,
        columnar: bool = False,
    ) -> None:
        """``columnar``: server stores get Native column bytes built with numpy rather
        than the driver's per-value encoding (:mod:`router.history.inserter`; same rows,
        same errors). Off by default: it measured no faster end to end (bench/history.py
        runs both)."""
        if batch_rows < 1 or flush_interval_s <= 0:
            raise ValueError("batch_rows must be >= 1 and flush_interval_s > 0")
        self.store = store
        spawnable = hasattr(store, "spec")  # a server store; not chdb (its engine is in here)
        if insert_process is None:
            insert_process = spawnable
        if insert_concurrency is None:
            # Two inserts in flight: 18.16 spends tens of ms per insert writing a part's
            # files, time a second connection can use.
            insert_concurrency = 2 if spawnable else 1
        if insert_concurrency < 1 or (insert_concurrency > 1 and not spawnable):
            raise ValueError("insert_concurrency > 1 needs a server store")
        if insert_process:
            self._inserters = [ProcessInserter(store, columnar=columnar) for _ in range(insert_concurrency)]
        else:
            url, kwargs = store.spec() if spawnable else ("", {})  # type: ignore[attr-defined]
            self._inserters = [ThreadInserter(store, columnar)] + [
                ThreadInserter(open_store(url, **kwargs), columnar) for _ in range(insert_concurrency - 1)]
        self.spool = Spool(spool_dir, fsync=fsync)
        self.batch_rows = batch_rows
        self.flush_interval_s = flush_interval_s
        self.replay_rows = max(replay_rows, batch_rows)
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.handoff_wait_s = handoff_wait_s
        self._need_migrate = migrate
        self._encoders = {t: TableEncoder(t) for t in TABLES}
        self._pending: deque[tuple[str, Mapping[str, Any]]] = deque()
        self._wake = threading.Event()
        self._handoff: queue.Queue[_Batch] = queue.Queue(maxsize=len(self._inserters))
        self._inflight = 0  # batches handed over and not yet inserted, spooled or rejected
        self._inflight_lock = threading.Lock()
        self._closing = False
        self._stop_inserter = False
        self._stats = WriterStats()
        self._stats_lock = threading.Lock()
        self._healthy = True  # optimistic until an insert fails
        self._retry_at = 0.0
        self._backoff = retry_initial_s
        self._batcher_thread = threading.Thread(target=self._batcher_loop, name="history-batcher", daemon=True)
        self._inserter_threads = [
            threading.Thread(target=self._inserter_loop, args=(i,), name=f"history-inserter-{i}", daemon=True)
            for i in range(len(self._inserters))]
        self._started = False

    # --- the caller's side ------------------------------------------------------------

    def submit(self, table: str, row: Mapping[str, Any]) -> None:
        """Queue one row for ``table``; O(1), thread-safe, never blocks. Rows are checked
        later: a row with a bad value is set aside (counted in ``rejected_rows``)."""
        if table not in self._encoders:
            raise ValueError(f"unknown history table {table!r}")
        if self._closing:
            raise RuntimeError("history writer is closed")
        self._pending.append((table, row))
        if len(self._pending) >= self.batch_rows:
            self._wake.set()

    def stats(self) -> WriterStats:
        with self._stats_lock:
            s = WriterStats(**vars(self._stats))
        s.backlog = len(self._pending)
        s.submitted += s.backlog
        s.spool_files = len(self.spool)
        s.healthy = self._healthy
        return s

    def start(self) -> "HistoryWriter":
        if not self._started:
            self._started = True
            for ins in self._inserters:
                ins.start()
            self._batcher_thread.start()
            for t in self._inserter_threads:
                t.start()
        return self

    def idle(self) -> bool:
        """Everything submitted so far is in the store (nothing waiting or spooled)."""
        return (
            not self._pending
            and self._inflight == 0
            and self.spool.empty()
            and not self._batching
        )

    def flush(self, timeout: float = 30.0) -> bool:
        """Push what is waiting now and wait until everything is in the store; False when
        that did not happen within ``timeout`` (e.g. the store is down)."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while time.monotonic() < deadline:
            if self.idle():
                return True
            time.sleep(0.005)
            self._wake.set()
        return self.idle()

    async def aflush(self, timeout: float = 30.0) -> bool:
        return await asyncio.to_thread(self.flush, timeout)

    def close(self, timeout: float = 10.0) -> bool:
        """Stop taking rows; batch what is waiting; try for ``timeout`` seconds to get
        everything into the store; spool whatever is left. True when nothing was left
        in the spool."""
        if not self._started:
            self.start()
        deadline = time.monotonic() + timeout
        self.flush(max(0.0, timeout))
        self._closing = True
        self._wake.set()
        self._batcher_thread.join(max(0.1, deadline - time.monotonic()))
        self._stop_inserter = True
        for t in self._inserter_threads:
            t.join(max(0.1, deadline - time.monotonic() + 5.0))
        # Anything still handed over but not inserted goes to the spool.
        while True:
            try:
                b = self._handoff.get_nowait()
            except queue.Empty:
                break
            self._to_spool(b)
            self._done_with_batch()
        for ins in self._inserters:
            ins.close()
        if any(isinstance(ins, ProcessInserter) for ins in self._inserters):
            stop_resource_tracker()  # the node's last child process (see there)
        return self.spool.empty()

    async def aclose(self, timeout: float = 10.0) -> bool:
        return await asyncio.to_thread(self.close, timeout)

    def __enter__(self) -> "HistoryWriter":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the batcher ---------------------------------------------------------------------

    _batching = False

    def _batcher_loop(self) -> None:
        while True:
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            closing = self._closing
            self._batching = True
            try:
                while self._pending:
                    self._take_and_route()
            except Exception:  # never let the thread die: rows would pile up unseen
                log.exception("history batcher failed")
            finally:
                self._batching = False
            if closing and not self._pending:
                return

    def _take_and_route(self) -> None:
        by_table: dict[str, list] = {}
        pop = self._pending.popleft
        for _ in range(min(len(self._pending), self.batch_rows)):
            table, row = pop()
            by_table.setdefault(table, []).append(row)
        for table, rows in by_table.items():
            enc = self._encoders[table]
            data, rejected = enc.encode(rows)
            with self._stats_lock:
                self._stats.submitted += len(rows)
                self._stats.rejected_rows += len(rejected)
            if rejected:
                self._write_rejected_rows(table, rejected)
            if not data or not data[0]:
                continue
            batch = _Batch(self.spool.reserve_seq(), table, enc.names, data)
            if self._healthy and not self._closing:
                # Wait a little for a busy inserter (pipelining), never longer than
                # handoff_wait_s: a hung store must not stall the batcher.
                with self._inflight_lock:
                    self._inflight += 1
                try:
                    self._handoff.put(batch, timeout=self.handoff_wait_s)
                    continue
                except queue.Full:
                    self._done_with_batch()
            self._to_spool(batch)

    def _write_rejected_rows(self, table: str, rejected: list[tuple[Any, str]]) -> None:
        import json

        self.spool.rejected_dir.mkdir(exist_ok=True)
        path = self.spool.rejected_dir / f"rows.{table}.jsonl"
        with open(path, "a", encoding="utf-8") as f:
            for row, reason in rejected:
                f.write(json.dumps({"reason": reason, "row": row}, default=repr) + "\n")
        log.warning("history: %d %s row(s) set aside: %s", len(rejected), table, rejected[0][1])

    def _to_spool(self, batch: _Batch) -> None:
        while True:
            try:
                self.spool.write(batch.seq, batch.table, batch.columns, batch.data)
                break
            except OSError:
                # Disk trouble: keep the batch in memory and try again rather than lose it.
                log.exception("history spool write failed; keeping %d rows in memory", batch.rows)
                time.sleep(0.5)
        with self._stats_lock:
            self._stats.spooled += batch.rows

    # --- the inserter --------------------------------------------------------------------

    def _inserter_loop(self, i: int) -> None:
        """Thread i inserts handed batches; thread 0 also migrates and replays the spool
        (one replayer keeps the spool in order)."""
        while True:
            try:
                if i == 0:
                    self._housekeeping()
                batch = None
                if i > 0 and self._need_migrate and not self._stop_inserter:
                    time.sleep(0.05)  # let thread 0 migrate before anyone inserts
                else:
                    try:
                        batch = self._handoff.get(timeout=0.05)
                    except queue.Empty:
                        pass
                if batch is not None:
                    try:
                        self._insert_handed(i, batch)
                    finally:
                        self._done_with_batch()
            except Exception:
                log.exception("history inserter failed")
                time.sleep(0.1)
            if self._stop_inserter and self._handoff.empty():
                return

    def _done_with_batch(self) -> None:
        with self._inflight_lock:
            self._inflight -= 1

    def _store_down(self) -> bool:
        return time.monotonic() < self._retry_at or (self._stop_inserter and not self._healthy)

    def _housekeeping(self) -> None:
        """Migrations, then the spool, oldest first (thread 0 only)."""
        if self._store_down():
            return
        if self._need_migrate:
            try:
                self.store.migrate()
                self._need_migrate = False
                self._succeeded(0, replayed=False)
            except StoreError as e:
                self._failed(e)
                return
        # One chunk per pass, so this thread also takes handed batches in between.
        if not self.spool.empty() and not self._store_down():
            self._replay_some()

    def _insert_handed(self, i: int, batch: _Batch) -> None:
        # Store down or not migrated yet: the batch joins the spool. A healthy store takes
        # new batches directly even while older ones are being replayed: the spool is
        # replayed in its own order, and nothing depends on the order between the two.
        if self._need_migrate or self._store_down():
            self._to_spool(batch)
            return
        try:
            self._inserters[i].insert(batch.table, batch.columns, batch.data)
        except StoreUnavailable as e:
            self._failed(e)
            self._to_spool(batch)
            return
        except StoreError as e:
            path = self.spool.write(batch.seq, batch.table, batch.columns, batch.data)
            self._reject(SpooledBatch(batch.seq, batch.table, path), e)
            return
        self._succeeded(batch.rows, replayed=False)

    def _replay_some(self) -> bool:
        """Insert the oldest spooled batches (one table, up to replay_rows); False when
        the store is unavailable."""
        files = self.spool.oldest(limit=64)
        if not files:
            return True
        table = files[0].table
        group: list[SpooledBatch] = []
        merged: list[list[Any]] | None = None
        columns: list[str] | None = None
        for f in files:
            if f.table != table:
                break
            try:
                cols, data = self.spool.read(f)
            except (OSError, ValueError) as e:
                self._reject(f, StoreError(f"unreadable spool file: {e}"))
                return True
            if columns is not None and cols != columns:
                break
            if merged is not None and len(merged[0]) + len(data[0]) > self.replay_rows:
                break
            if merged is None:
                columns, merged = cols, [list(c) for c in data]
            else:
                for acc, col in zip(merged, data):
                    acc.extend(col)
            group.append(f)
        if not group or merged is None or columns is None:
            return True
        try:
            self._inserters[0].insert(table, columns, merged)
        except StoreUnavailable as e:
            self._failed(e)
            return False
        except StoreError as e:
            if len(group) == 1:
                self._reject(group[0], e)
            else:
                # Find the bad file by replaying them one at a time.
                for f in group:
                    cols, data = self.spool.read(f)
                    try:
                        self._inserters[0].insert(table, cols, data)
                    except StoreUnavailable as e2:
                        self._failed(e2)
                        return False
                    except StoreError as e2:
                        self._reject(f, e2)
                        continue
                    self.spool.remove([f])
                    self._succeeded(len(data[0]) if data else 0, replayed=True)
            return True
        self.spool.remove(group)
        self._succeeded(len(merged[0]), replayed=True)
        return True

    def _reject(self, batch: SpooledBatch, error: StoreError) -> None:
        log.error("history: %s refused for good, moved to %s: %s", batch.name, self.spool.rejected_dir, error)
        self.spool.reject(batch, str(error))
        with self._stats_lock:
            self._stats.rejected_batches += 1
            self._stats.last_error = str(error)

    def _failed(self, error: StoreError) -> None:
        if self._healthy or self._stats.insert_errors == 0:
            log.warning("history store unavailable, spooling: %s", error)
        self._healthy = True  # optimistic until an insert fails
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self.retry_max_s, self._backoff * 2)
        with self._stats_lock:
            self._stats.insert_errors += 1
            self._stats.last_error = str(error)

    def _succeeded(self, rows: int, *, replayed: bool) -> None:
        if not self._healthy:
            log.info("history store reachable")
        self._healthy = True
        self._backoff = self.retry_initial_s
        with self._stats_lock:
            self._stats.inserted += rows
            if replayed:
                self._stats.replayed += rows
