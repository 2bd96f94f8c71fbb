"""Where the writer's inserts run: in a thread of this process, or in a child process.

clickhouse-driver serialises a block in Python (~5 µs a row) and makes a dozen socket
calls per insert, each taking the GIL back. In the node's process that CPU competes with
the routing event loop, and a busy producer makes every socket call wait for the GIL
(the "convoy": 1k-row inserts ran 2-3x slower). :class:`ProcessInserter` moves the driver
into a child process (``spawn``: safe with threads): the writer hands it a batch as one
pickled message and waits for one reply, so this process pays a pickle per batch and one
GIL hand-off. :class:`ThreadInserter` calls the store directly (chdb, whose engine lives in
this process, and tests).

Both raise what the store raises: :class:`StoreUnavailable` (retry later; a dead or hung
child counts as that, and is restarted on the next insert) or :class:`StoreError`.

**Columnar inserts** (``columnar=True``; off by default, see below): the driver's
own encoding walks every value in Python (a loop per DateTime column, ``struct.pack(*items)``
per number column, a C call per string). Instead the insert process makes the batch a
:class:`router.history.encode.ColumnarBatch` (numpy arrays and one UTF-8 buffer per
string column: C-speed passes), turns it into Native column bytes with numpy and writes
the Data block itself (:func:`insert_columnar`) on the store's own connection, so the
server gets byte for byte what the driver would have sent. The writer's process still
pickles the column lists: building the batch there cost it more than the pickle saved.
A batch outside what the columnar encoding covers (a type or value it does not handle,
compression on, a server whose columns differ from the schema) goes the driver's way,
with the same result and the same errors as before.

Measured (bench/history.py, 10k-row batches, same run): the insert process spends about
what the driver spent (converting 30 columns of Python objects to binary costs numpy's
``np.array``/``fromiter`` about what the driver's Cython ``write_strings`` and C
``struct.pack`` cost), and the end-to-end rate did not improve (0.86-1.0x on a quiet
machine), so the writer keeps the driver's path unless asked.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import threading
from typing import Any

from router.history.encode import ColumnarBatch, columnar
from router.history.store import (
    ClickHouseServerStore, HistoryStore, StoreError, StoreUnavailable, open_store,
)

log = logging.getLogger("tandem.history")


def _native_type_ok(server_type: str, ours: str) -> bool:
    """The server's column type is the one the batch was encoded for. DateTime with any
    time zone is the same UInt32 on the wire."""
    if server_type == ours:
        return True
    dt = ("DateTime", "DateTime(")
    return (server_type.startswith(dt) and ours.startswith(dt)
            and not server_type.startswith("DateTime64") and not ours.startswith("DateTime64"))


def insert_columnar(store: ClickHouseServerStore, batch: ColumnarBatch) -> None:
    """Insert ``batch`` into ``store`` with Native column bytes built by numpy.

    Same contract as ``store.insert(batch.table, batch.columns, batch.to_lists())``
    (and the same rows land): :class:`StoreUnavailable` / :class:`StoreError` as the
    store maps the driver's errors. The INSERT runs on the store's own connection and
    under its lock; when the server's sample block does not match the batch's columns
    and types, or the connection compresses, the block is sent by the driver from the
    batch's lists instead (the old path), so the server still decides.

    Uses clickhouse-driver internals (``Client.connection``, ``receive_sample_block``,
    the Data packet layout of ``Connection.send_data`` / ``BlockOutputStream.write``);
    pinned driver 0.2.x. The store lends its connection, lock and error mapping through
    :meth:`ClickHouseServerStore.insert_on_connection`.
    """
    from clickhouse_driver import defines
    from clickhouse_driver.block import BlockInfo, ColumnOrientedBlock
    from clickhouse_driver.protocol import ClientPacketTypes, Compression
    from clickhouse_driver.varint import write_varint
    from clickhouse_driver.writer import write_binary_str, write_binary_uint8

    if batch.rows == 0:
        return
    sql = f"INSERT INTO {store.database}.{batch.table} ({', '.join(batch.columns)}) VALUES"

    def run(client: Any) -> None:
        with client.disconnect_on_error(sql, None):
            conn = client.connection
            conn.send_query(sql)
            conn.send_external_tables(None)
            sample = client.receive_sample_block()
            if not sample:
                return
            server_cols = sample.columns_with_types
            raw = (conn.compression == Compression.DISABLED
                   and [n for n, _ in server_cols] == batch.columns
                   and all(_native_type_ok(t, ours) for (_, t), ours in zip(server_cols, batch.types)))
            if not raw:
                client.send_data(sample, batch.to_lists(), types_check=False, columnar=True)
            else:
                payloads = batch.native()
                fout = conn.fout
                revision = conn.server_info.used_revision
                # One Data packet, laid out as Connection.send_data + BlockOutputStream.write.
                write_varint(ClientPacketTypes.DATA, fout)
                if revision >= defines.DBMS_MIN_REVISION_WITH_TEMPORARY_TABLES:
                    write_binary_str("", fout)
                if revision >= defines.DBMS_MIN_REVISION_WITH_BLOCK_INFO:
                    BlockInfo().write(fout)
                write_varint(len(server_cols), fout)
                write_varint(batch.rows, fout)
                for (name, type_), payload in zip(server_cols, payloads):
                    write_binary_str(name, fout)
                    write_binary_str(type_, fout)
                    if revision >= defines.DBMS_MIN_REVISION_WITH_CUSTOM_SERIALIZATION:
                        write_binary_uint8(0, fout)
                    fout.write(payload)
                fout.flush()
                client.receive_profile_events()
                conn.send_data(ColumnOrientedBlock())  # the empty block: end of data
                client.receive_profile_events()
            client.receive_end_of_insert_query()

    store.insert_on_connection(batch.table, run)


def _insert_any(store: HistoryStore, table: str, columns: list[str], data: Any) -> None:
    if isinstance(data, ColumnarBatch):
        if isinstance(store, ClickHouseServerStore):
            insert_columnar(store, data)
        else:
            store.insert(table, columns, data.to_lists())
    else:
        store.insert(table, columns, data)


def _prepare(columnar_on: bool, table: str, columns: list[str], data: list[list[Any]]) -> Any:
    """What to hand the store: a ColumnarBatch when asked for and possible, else the lists."""
    if columnar_on:
        try:
            batch = columnar(table, columns, data)
        except Exception:  # a bug here must not lose the batch: the lists still work
            log.exception("history: columnar encoding of %s failed; inserting row-wise", table)
            batch = None
        if batch is not None:
            return batch
    return data


class ThreadInserter:
    """Inserts in the calling thread. ``columnar``: use :func:`insert_columnar` when the
    store is a server store (chdb always takes the lists)."""

    def __init__(self, store: HistoryStore, columnar: bool = False) -> None:
        self.store = store
        self.columnar = columnar and isinstance(store, ClickHouseServerStore)

    def start(self) -> None:
        pass

    def insert(self, table: str, columns: list[str], data: list[list[Any]]) -> None:
        _insert_any(self.store, table, columns, _prepare(self.columnar, table, columns, data))

    def close(self) -> None:
        pass


def _child_main(conn, url: str, kwargs: dict, columnar_on: bool = True) -> None:  # runs in the child
    store = open_store(url, **kwargs)
    try:
        while True:
            try:
                msg = conn.recv_bytes()
            except EOFError:
                return
            if not msg:
                return
            table, columns, data = pickle.loads(msg)
            try:
                _insert_any(store, table, columns, _prepare(columnar_on, table, columns, data))
                reply: tuple = ("ok",)
            except StoreUnavailable as e:
                reply = ("unavailable", str(e), e.code)
            except StoreError as e:
                reply = ("error", str(e), e.code)
            except Exception as e:  # never die on one batch: report it as refused
                reply = ("error", f"{type(e).__name__}: {e}", None)
            conn.send_bytes(pickle.dumps(reply))
    finally:
        store.close()


def stop_resource_tracker() -> bool:
    """Stop multiprocessing's resource tracker when this process has no multiprocessing
    child left; True when none runs afterwards. Spawning an insert process starts the
    tracker (a helper holding nothing of ours: pipes register no resource), and the
    next spawn starts it again.

    Why: left running, the tracker outlives the node by the moment it takes to see its
    pipe close. systemd's stop (``KillMode=mixed``) then SIGKILLs it, and inside a
    container (cgroup v1) waits out the whole stop timeout and marks the unit failed:
    every restart of a deployed node took the timeout plus the drain. Skipped while any
    multiprocessing child lives: they hold the tracker's pipe, and stopping waits for
    the tracker to exit."""
    from multiprocessing import resource_tracker

    if multiprocessing.active_children():
        return False
    tracker = resource_tracker._resource_tracker  # the module's own instance; no public stop
    stop = getattr(tracker, "_stop", None)
    if stop is None:
        return False
    stop()
    return True


class ProcessInserter:
    """Inserts through a child process holding its own connection to ``store``'s server.
    ``reply_timeout_s`` bounds one insert (the child's own socket timeouts come first)."""

    def __init__(self, store: HistoryStore, reply_timeout_s: float | None = None,
                 columnar: bool = False) -> None:
        """``columnar``: the child inserts through :class:`ColumnarBatch` (see the
        module docstring) rather than the driver's per-value encoding."""
        self.columnar = columnar
        spec = getattr(store, "spec", None)
        if spec is None:
            raise ValueError(f"{type(store).__name__} cannot be opened in another process")
        self.url, self.kwargs = spec()
        timeout = getattr(store, "send_receive_timeout", 30.0)
        self.reply_timeout_s = reply_timeout_s or (timeout + 10.0)
        self._ctx = multiprocessing.get_context("spawn")
        self._proc = None
        self._conn = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Spawn the child now (it takes a moment to import), not at the first insert."""
        with self._lock:
            self._ensure()

    def _ensure(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        self._stop_child()
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_child_main, args=(child, self.url, self.kwargs, self.columnar),
                                 name="tandem-history-inserter", daemon=True)
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent

    def insert(self, table: str, columns: list[str], data: list[list[Any]]) -> None:
        # The lists go as they are: the child makes the ColumnarBatch. Made here, it cost
        # this process more than the pickle it saved (bench: 8.0 vs 5.1 µs a row), and
        # this process — routing, submit, the batcher — is the one that bounds the rate.
        with self._lock:
            try:
                self._ensure()
                self._conn.send_bytes(pickle.dumps((table, columns, data), protocol=pickle.HIGHEST_PROTOCOL))
                if not self._conn.poll(self.reply_timeout_s):
                    self._stop_child()
                    raise StoreUnavailable(f"{self.url}: no answer from the insert process "
                                           f"within {self.reply_timeout_s:.0f} s")
                reply = pickle.loads(self._conn.recv_bytes())
            except (EOFError, OSError) as e:
                self._stop_child()
                raise StoreUnavailable(f"{self.url}: insert process lost: {e!r}") from None
        if reply[0] == "ok":
            return
        exc = StoreUnavailable if reply[0] == "unavailable" else StoreError
        raise exc(reply[1], reply[2])

    def _stop_child(self) -> None:
        conn, proc = self._conn, self._proc
        self._conn = self._proc = None
        if conn is not None:
            try:
                conn.send_bytes(b"")
            except OSError:
                pass
            conn.close()
        if proc is not None:
            proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)

    def close(self) -> None:
        with self._lock:
            self._stop_child()
