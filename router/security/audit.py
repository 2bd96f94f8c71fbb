"""The audit trail of a node (DESIGN.md invariant 7): every mutation and every denial
leaves a record, durable on the node's disk before the answer leaves (like invariant 4),
and reaching the history exactly once (like invariant 5).

The authorization layer builds an :class:`AuditRecord` per mutating RPC and per denial and
``await``s :meth:`AuditLog.record`, which returns once the record is on disk. The node
attaches the history writer with :meth:`AuditLog.set_sink` (``lambda row:
writer.submit("audit", row)``): from then on every durable record is handed to the sink as
its ClickHouse row (:func:`row`), and on attaching, the records retained on disk are
handed over again first — a restart re-submits what may not have reached ClickHouse; the
``audit`` table's key ``(site, id)`` makes the copies invisible to readers (``FROM audit
FINAL``, see :mod:`router.history.schema`).

**On disk.** The log is a series of *generations*, each a :class:`router.journal.Journal`
(group commit: the records of every caller waiting while one ``fdatasync`` runs share the
next one; the write and the sync run in the journal's writer thread, never on the event
loop)::

    DIR/LOCK                  flock'ed while an AuditLog is open: one per directory
    DIR/gen-<n:08d>/          a journal; records are AuditRecord.to_dict() documents
    DIR/gen-<n:08d>.old/      a generation being deleted (removed at the next open)

New records go to the newest generation. When it is half full the next one is opened
ahead (so switching costs no disk wait); once it holds ``retain // 10`` records new ones
go to the next, the full one is closed and the oldest are deleted, keeping the newest
``retain`` to ``retain * 1.1`` records (a little less after crashes: the generation a
crash interrupts stays as it was). A journal can only be read when it is opened, so the
newest generation's records are also kept in memory (at most ``retain // 10``); older ones
are read from disk when asked for (:meth:`records`, :meth:`set_sink`) in a worker thread
of the log's own, which is also where generations are opened ahead and deleted.

**Threads.** :meth:`record` and :meth:`aclose` are called on one event loop (asyncio or
uvloop; the one of the first ``record``). :meth:`set_sink` and :meth:`records` are plain
calls from that loop's thread (or before the first ``record``); they read the older
generations from disk, so they take a second or two with a full log (100,000 records). The
sink is called on the loop thread and must not block (``HistoryWriter.submit`` is O(1)).

**Failure.** If the disk refuses a write or a sync, that ``record`` and every later one
raises :class:`AuditError` (the journal refuses further appends): the caller must refuse
the RPC, as it cannot leave the record invariant 7 asks for, and the node must restart.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.journal import Journal, JournalError, JournalStats, lock_directory

__all__ = ["DECISIONS", "MAX_FIELD", "MAX_OBJECTS", "AuditError", "AuditLog", "AuditRecord", "row"]

log = logging.getLogger("tandem.audit")

DECISIONS = ("allow", "deny")
#: characters kept of each string (longer ones are cut, marked "...[+N]"): a refused
#: request may name anything, and its audit record must still be small
MAX_FIELD = 1024
#: entries kept of ``objects``
MAX_OBJECTS = 32
#: the newest records kept on disk by default
DEFAULT_RETAIN = 100_000
_GENERATIONS = 10  # a generation holds retain // _GENERATIONS records
_GEN = re.compile(r"gen-(\d{8})")
_OLD = re.compile(r"gen-(\d{8})\.old")
_DATETIME_MAX = 2**32 - 1  # ClickHouse DateTime
_RECORD_KEYS = frozenset(("id", "at", "site", "identity", "role", "peer", "method", "objects",
                          "decision", "reason", "code"))


class AuditError(Exception):
    """The record could not be made durable (disk error) or the log is closed."""


@dataclass(slots=True)
class AuditRecord:
    """One audited request: who (identity, role, peer), what (method, objects), the
    decision and its result (reason, code)."""

    id: str  # unique: uuid4 hex
    at: float  # Unix seconds
    site: str  # the node's site
    identity: str  # SPIFFE URI of the caller, or "insecure:" + peer (plaintext loopback)
    role: str  # the role that allowed it; "" when denied or unbound
    peer: str  # grpc context.peer(), e.g. "ipv4:127.0.0.1:5555"
    method: str  # "/router.v1.Routing/OfferCall"
    objects: dict[str, str]  # what the request names: call_id, agent_id, target…
    decision: str  # "allow" | "deny"
    reason: str  # ErrorInfo reason of a denial or an error ("" when fine)
    code: str  # gRPC status code name of the result: "OK", "PERMISSION_DENIED"…

    @classmethod
    def new(cls, *, site: str, identity: str, peer: str, method: str, decision: str,
            role: str = "", objects: dict[str, str] | None = None, reason: str = "",
            code: str = "OK", at: float | None = None) -> "AuditRecord":
        """A record with a fresh id, at now (unless given)."""
        return cls(uuid.uuid4().hex, time.time() if at is None else at, site, identity, role,
                   peer, method, dict(objects or {}), decision, reason, code)

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-able dict (what the log stores)."""
        return {"id": self.id, "at": self.at, "site": self.site, "identity": self.identity,
                "role": self.role, "peer": self.peer, "method": self.method,
                "objects": dict(self.objects), "decision": self.decision,
                "reason": self.reason, "code": self.code}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AuditRecord":
        return cls(d["id"], float(d["at"]), d["site"], d["identity"], d["role"], d["peer"],
                   d["method"], dict(d["objects"]), d["decision"], d["reason"], d["code"])


def row(rec: AuditRecord) -> dict[str, Any]:
    """The ``audit`` row of a record (:data:`router.history.schema.AUDIT`): ``at`` as whole
    seconds plus ``at_us`` (microseconds within that second); ``objects`` as two parallel
    arrays, keys and values, in the record's order."""
    sec, us = divmod(round(rec.at * 1_000_000), 1_000_000)
    return {"site": rec.site, "id": rec.id, "at": int(sec), "at_us": int(us),
            "identity": rec.identity, "role": rec.role, "peer": rec.peer, "method": rec.method,
            "object_keys": list(rec.objects), "object_values": list(rec.objects.values()),
            "decision": rec.decision, "reason": rec.reason, "code": rec.code}


def _dict_row(d: dict[str, Any]) -> dict[str, Any]:
    """:func:`row` of a record as the log stores it (to_dict), without the record."""
    sec, us = divmod(round(d["at"] * 1_000_000), 1_000_000)
    objects = d["objects"]
    return {"site": d["site"], "id": d["id"], "at": int(sec), "at_us": int(us),
            "identity": d["identity"], "role": d["role"], "peer": d["peer"], "method": d["method"],
            "object_keys": list(objects), "object_values": list(objects.values()),
            "decision": d["decision"], "reason": d["reason"], "code": d["code"]}


def _cut(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"audit record {name} must be a str, not {type(v).__name__}")
    if len(v) <= MAX_FIELD:
        return v
    return v[:MAX_FIELD] + f"...[+{len(v) - MAX_FIELD}]"


def _checked(rec: AuditRecord) -> AuditRecord:
    """A copy of ``rec`` that the log can keep: types checked, long strings cut.
    TypeError / ValueError for a record that cannot be one."""
    if not isinstance(rec, AuditRecord):
        raise TypeError(f"expected an AuditRecord, not {type(rec).__name__}")
    if rec.decision not in DECISIONS:
        raise ValueError(f"audit decision must be one of {DECISIONS}, not {rec.decision!r}")
    if not isinstance(rec.id, str) or not rec.id or len(rec.id) > 128:
        raise ValueError(f"bad audit record id {rec.id!r}")
    at = rec.at
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at) \
            or not 0 <= at < _DATETIME_MAX:
        raise ValueError(f"bad audit record time {at!r}")
    if not isinstance(rec.objects, dict):
        raise TypeError(f"audit record objects must be a dict, not {type(rec.objects).__name__}")
    objects = {}
    for i, (k, v) in enumerate(rec.objects.items()):
        if i == MAX_OBJECTS:
            objects["..."] = f"+{len(rec.objects) - MAX_OBJECTS} more"
            break
        objects[_cut("object name", k)] = _cut(f"object {k!r}", v)
    return AuditRecord(rec.id, float(at), _cut("site", rec.site), _cut("identity", rec.identity),
                       _cut("role", rec.role), _cut("peer", rec.peer), _cut("method", rec.method),
                       objects, rec.decision, _cut("reason", rec.reason), _cut("code", rec.code))


@dataclass
class _Gen:
    """A generation held open: its journal and, in memory, its durable records."""

    number: int
    journal: Journal
    records: list[AuditRecord]
    appended: int  # records appended (durable or not)


def _gen_name(n: int) -> str:
    return f"gen-{n:08d}"


def _close_unused(journal: Journal) -> None:
    """Close a journal that never appended, from sync code (its own loop, own thread)."""
    with ThreadPoolExecutor(1) as ex:
        ex.submit(asyncio.run, journal.close()).result()


def _read_generation(path: Path, sync: str) -> list[dict]:
    """The records of a closed generation (its journal is opened, read and closed; a
    crash tail is repaired as the journal does)."""

    async def read() -> list[dict]:
        j = Journal.open(path, sync=sync)
        try:
            return j.recover()[1]
        finally:
            await j.close()

    return asyncio.run(read())  # in the log's worker thread: no loop runs there


class AuditLog:
    """The node's audit log; see the module docstring. Open with :meth:`open`."""

    def __init__(self, directory: Path, site: str, *, retain: int, sync: str, lock_fd: int) -> None:
        self.directory = directory
        self.site = site
        self.retain = retain
        self._gen_size = max(1, retain // _GENERATIONS)
        # generations kept: enough full ones to hold `retain`, plus the one being filled
        self._keep = -(-retain // self._gen_size) + 1
        self._sync = sync
        self._lock_fd = lock_fd
        self._sink: Callable[[dict], None] | None = None
        self._open: dict[int, _Gen] = {}  # the newest generation, and any being closed
        self._current: _Gen | None = None
        self._next: _Gen | None = None  # the next generation, opened ahead of need
        self._preparing: asyncio.Task | None = None
        self._prepare_after = 0.0  # after a failure to open the next one: not before
        self._retiring: set[asyncio.Task] = set()  # full generations being closed
        self._closed_stats = JournalStats()
        self._closing = False
        # Reads of closed generations, starting and deleting generations: one thread,
        # so none of these ever overlap.
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="audit-disk")

    @classmethod
    def open(cls, directory: str | os.PathLike, site: str, *, retain: int = DEFAULT_RETAIN,
             sync: str = "fdatasync") -> "AuditLog":
        """Open (creating if needed) the log in ``directory``, taking its LOCK: recovers
        the newest generation (a crash tail is dropped, as the journal does) and deletes
        generations beyond the retention. AuditError when another log holds it;
        JournalCorrupt when acknowledged records are damaged. ``sync="none"`` only for
        tests that do not check durability."""
        if retain < 1:
            raise ValueError("retain must be >= 1")
        path = Path(directory)
        lock_fd = lock_directory(path, sync)
        if lock_fd is None:
            raise AuditError(f"{path} is in use by another audit log (LOCK is held)")
        try:
            self = cls(path, site, retain=retain, sync=sync, lock_fd=lock_fd)
            for name in os.listdir(path):
                if _OLD.fullmatch(name):
                    shutil.rmtree(path / name)
            gens = self._generations() or [1]
            journal = Journal.open(path / _gen_name(gens[-1]), sync=sync)
        except BaseException:
            os.close(lock_fd)
            raise
        try:
            recs = journal.recover()[1]
            if not recs and len(gens) > 1:
                # The next generation opened ahead (by a log closed or killed before it
                # was used): go on filling the one before it.
                _close_unused(journal)
                self._remove(gens.pop())
                journal = Journal.open(path / _gen_name(gens[-1]), sync=sync)
                recs = journal.recover()[1]
            number = gens[-1]
            self._current = self._open[number] = _Gen(
                number, journal, [AuditRecord.from_dict(d) for d in recs], len(recs))
            self._prune(number, number)
            return self
        except BaseException:
            _close_unused(journal)
            os.close(lock_fd)
            raise

    # --- writing ---------------------------------------------------------------------------

    async def record(self, rec: AuditRecord) -> None:
        """Append ``rec`` (an empty ``site`` is the log's) and return once it is durable
        (fdatasync'ed): concurrent callers
        share syncs (group commit); the loop never waits on the disk. Then (before this
        returns) the sink, if any, gets its row. TypeError / ValueError for a malformed
        record (nothing written); AuditError when it cannot be made durable. A caller
        cancelled while waiting does not withdraw the record."""
        if self._closing:
            raise AuditError("audit log is closed")
        rec = _checked(rec)
        if not rec.site:
            rec.site = self.site
        while True:
            gen = self._current
            assert gen is not None
            if gen.appended < self._gen_size:
                break
            if self._next is not None:
                gen = self._switch()
                break
            if self._preparing is None and not self._prepare(gen.number + 1):
                break  # cannot open one now: go on in this one
            # Full, and the next one (asked for when this one was half full) is still
            # being opened: wait for it, so that every generation holds gen_size records.
            await asyncio.shield(self._preparing)
            if self._closing:
                raise AuditError("audit log is closed")
        try:
            fut = gen.journal.append(rec.to_dict())
        except JournalError as e:
            raise AuditError(f"audit record not written: {e}") from e
        gen.appended += 1
        # Registered before shield()'s own callback: bookkeeping and the sink run before
        # the caller resumes, and also when the caller was cancelled meanwhile.
        fut.add_done_callback(lambda f: self._durable(gen, rec, f))
        if gen.appended >= self._gen_size // 2 and self._next is None and self._preparing is None:
            self._prepare(gen.number + 1)
        try:
            await asyncio.shield(fut)
        except JournalError as e:
            raise AuditError(f"audit record not durable: {e}") from e

    def _durable(self, gen: _Gen, rec: AuditRecord, fut: asyncio.Future) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        gen.records.append(rec)
        sink = self._sink
        if sink is not None:
            try:
                sink(row(rec))
            except Exception:  # the record is safe on disk; the next open re-submits it
                log.exception("audit sink failed for record %s", rec.id)

    def _prepare(self, number: int) -> bool:
        """Start opening the next generation while the current one fills, so that
        switching to it costs no disk wait; False when a failure to open one was too
        recent to try again."""
        if time.monotonic() < self._prepare_after:
            return False
        self._preparing = asyncio.get_running_loop().create_task(self._open_next(number))
        return True

    async def _open_next(self, number: int) -> None:
        try:
            journal = await asyncio.get_running_loop().run_in_executor(
                self._worker, lambda: Journal.open(self.directory / _gen_name(number), sync=self._sync))
            self._next = _Gen(number, journal, [], 0)
        except Exception:
            log.exception("audit log: cannot open generation %d; retrying in 5 s", number)
            self._prepare_after = time.monotonic() + 5.0
        finally:
            self._preparing = None

    def _switch(self) -> _Gen:
        """New records go to the next generation from now on; the full one is closed and
        the retention applied in the background."""
        old, new = self._current, self._next
        assert old is not None and new is not None
        self._next = None
        self._open[new.number] = new
        self._current = new
        task = asyncio.get_running_loop().create_task(self._retire(old))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return new

    async def _retire(self, old: _Gen) -> None:
        try:
            await old.journal.close()  # waits for its records in flight
        finally:
            self._add_stats(old.journal.stats)
            del self._open[old.number]  # read from disk from now on
        try:
            assert self._current is not None
            await asyncio.get_running_loop().run_in_executor(
                self._worker, self._prune, self._current.number, min(self._open))
        except Exception:
            log.exception("audit log: deleting old generations failed")

    # --- the sink ------------------------------------------------------------------------

    def set_sink(self, sink: Callable[[dict], None] | None) -> None:
        """From now on hand every durable record's :func:`row` to ``sink`` (None: to
        nobody). A sink is first given the rows of every record retained in the log,
        oldest first (the store removes the copies by key): with a full log (100,000
        records) that takes a second or two, so a node attaches its sink as it starts."""
        self._sink = None
        if sink is not None:
            for docs in self._closed_generations():
                for d in docs:
                    sink(_dict_row(d))
            for rec in self._in_memory():
                sink(row(rec))
        self._sink = sink

    # --- reading -------------------------------------------------------------------------

    def records(self, since: float | None = None) -> list[AuditRecord]:
        """The records retained in the local log, oldest first; ``since``: only those at
        or after that Unix time."""
        out = [AuditRecord.from_dict(d) for docs in self._closed_generations() for d in docs
               if since is None or d["at"] >= since]
        out += [r for r in self._in_memory() if since is None or r.at >= since]
        return out

    async def page(self, size: int, after: tuple[int, int] | None = None, since: float | None = None,
                   keep: Callable[[AuditRecord], bool] | None = None,
                   ) -> tuple[list[AuditRecord], tuple[int, int] | None]:
        """One page of :meth:`records`: up to ``size`` records that come after position
        ``after`` — (generation, index in it) of the previous page's last record; None:
        from the oldest — at or after ``since`` and for which ``keep`` is true. Returns them
        and the position to resume after, or None when nothing is left.

        Unlike :meth:`records`, the event loop never waits on the disk (closed
        generations are read in the log's worker thread) and a page reads only the
        generations from ``after`` on, one at a time until it is full, not the whole log.
        A page that resumes after records the retention has deleted meanwhile goes on
        with the oldest retained ones."""
        if size < 1:
            raise ValueError("size must be >= 1")
        if not self._open:
            raise AuditError("audit log is closed")
        loop = asyncio.get_running_loop()
        gen0, idx0 = after if after is not None else (-1, -1)
        on_disk = await loop.run_in_executor(self._worker, self._generations)
        numbers = sorted({n for n in on_disk if n >= gen0} | {n for n in self._open if n >= gen0})
        out: list[AuditRecord] = []
        last: tuple[int, int] | None = None
        for n in numbers:
            gen = self._open.get(n)
            if gen is not None:
                recs: list[AuditRecord] = list(gen.records)
            else:
                docs = await loop.run_in_executor(self._worker, self._read_if_there, n)
                recs = [AuditRecord.from_dict(d) for d in docs]
            first = idx0 + 1 if n == gen0 else 0
            for i in range(first, len(recs)):
                r = recs[i]
                if (since is not None and r.at < since) or (keep is not None and not keep(r)):
                    continue
                if len(out) == size:
                    return out, last  # one more is there: the next page starts after `last`
                out.append(r)
                last = (n, i)
        return out, None

    def _read_if_there(self, n: int) -> list[dict]:
        """(Worker thread.) Closed generation n's records; [] when the retention has
        deleted it (the check and the read cannot race the deletion: same thread)."""
        if not (self.directory / _gen_name(n)).is_dir():
            return []
        return self._read_closed(n)

    def _in_memory(self) -> list[AuditRecord]:
        return [r for n in sorted(self._open) for r in self._open[n].records]

    def _closed_generations(self) -> Iterator[list[dict]]:
        """The records (as stored) of each closed generation, oldest first, read one
        generation at a time in the worker thread."""
        if not self._open:
            raise AuditError("audit log is closed")
        below = min(self._open)  # that one and the newer ones are in memory
        for n in self._worker.submit(self._generations).result():
            if n >= below:
                break
            docs = self._worker.submit(self._read_closed, n).result()
            if docs:
                yield docs

    def _read_closed(self, n: int) -> list[dict]:
        """(Worker thread.) The records of closed generation n ([] when unreadable:
        logged, and the files are left as they are for inspection)."""
        path = self.directory / _gen_name(n)
        try:
            docs = _read_generation(path, self._sync)
            for d in docs:
                if not _RECORD_KEYS <= d.keys() or not isinstance(d["objects"], dict):
                    raise ValueError(f"not an audit record: {d!r:.200}")
            return docs
        except (JournalError, OSError, ValueError) as e:
            log.error("audit log: cannot read %s, skipped: %s", path, e)
            return []

    def _generations(self) -> list[int]:
        return sorted(int(m[1]) for n in os.listdir(self.directory) if (m := _GEN.fullmatch(n)))

    def _prune(self, current: int, low: int) -> None:
        """(Worker thread, or open.) Delete the oldest generations beyond the retention,
        counted up to ``current`` (not the one opened ahead), none from ``low`` on (they
        are open)."""
        gens = [g for g in self._generations() if g <= current]
        for n in gens[:-self._keep]:
            if n >= low:
                break
            self._remove(n)

    def _remove(self, n: int) -> None:
        """Delete generation n: renamed first (atomic), then removed."""
        old = self.directory / (_gen_name(n) + ".old")
        os.rename(self.directory / _gen_name(n), old)
        shutil.rmtree(old)

    # --- the rest ------------------------------------------------------------------------

    def stats(self) -> JournalStats:
        """Records made durable, write rounds and syncs by this process since open."""
        s = JournalStats(**vars(self._closed_stats))
        for g in self._open.values():
            for k, v in vars(g.journal.stats).items():
                setattr(s, k, getattr(s, k) + v)
        return s

    def _add_stats(self, st: JournalStats) -> None:
        for k, v in vars(st).items():
            setattr(self._closed_stats, k, getattr(self._closed_stats, k) + v)

    async def aclose(self) -> None:
        """Wait for the records in flight to be durable (and handed to the sink), close
        the journals, release LOCK. Idempotent; record() raises AuditError afterwards."""
        if self._closing:
            return
        self._closing = True
        try:
            if self._preparing is not None:
                await asyncio.shield(self._preparing)
            while self._retiring:
                await asyncio.gather(*self._retiring, return_exceptions=True)
            if self._next is not None:
                await self._next.journal.close()  # left empty: the next open starts there
                self._next = None
            for gen in list(self._open.values()):
                await gen.journal.close()
                self._add_stats(gen.journal.stats)
        finally:
            self._open.clear()
            self._sink = None
            await asyncio.get_running_loop().run_in_executor(None, self._worker.shutdown)
            os.close(self._lock_fd)

    async def __aenter__(self) -> "AuditLog":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    row = staticmethod(row)
