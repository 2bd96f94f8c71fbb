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
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import threading
from typing import Any

from router.history.store import HistoryStore, StoreError, StoreUnavailable, open_store

log = logging.getLogger("tandem.history")


class ThreadInserter:
    def __init__(self, store: HistoryStore) -> None:
        self.store = store

    def start(self) -> None:
        pass

    def insert(self, table: str, columns: list[str], data: list[list[Any]]) -> None:
        self.store.insert(table, columns, data)

    def close(self) -> None:
        pass


def _child_main(conn, url: str, kwargs: dict) -> None:  # runs in the child process
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
                store.insert(table, columns, data)
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


class ProcessInserter:
    """Inserts through a child process holding its own connection to ``store``'s server.
    ``reply_timeout_s`` bounds one insert (the child's own socket timeouts come first)."""

    def __init__(self, store: HistoryStore, reply_timeout_s: float | None = None) -> None:
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
        proc = self._ctx.Process(target=_child_main, args=(child, self.url, self.kwargs),
                                 name="tandem-history-inserter", daemon=True)
        proc.start()
        child.close()
        self._proc, self._conn = proc, parent

    def insert(self, table: str, columns: list[str], data: list[list[Any]]) -> None:
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
