"""Local write-ahead journal of a site node: append-only segments, group commit, snapshots.

The node is event-sourced: it applies a command (a JSON-able dict) to its in-memory engine,
appends the command here and acknowledges the client only once `append`'s future resolves,
i.e. once the record is on disk (DESIGN.md invariant 4). On start it calls `recover()` and
replays the records after the latest snapshot.

Files in data_dir:

    LOCK                          flock'ed while a Journal is open: one writer per directory
    journal-<first_seq:016d>.log  segments; each record is u32 length, u32 crc32(payload),
                                  payload (little-endian header)
    snapshot-<seq:016d>.json      {"seq": S, "state": ...}: the state after records 1..S
    snapshot-<seq:016d>.json.tmp  a snapshot being written; recovery removes it

A payload is compact UTF-8 JSON `{"seq": n, "b": b, "rec": {...}}` where b is the seq of the
first record of the write() that carried it. Only the last write can be damaged by a crash
(every earlier write was synced before it), so b lets recovery tell a hole left by a lost
power in the last, never-acknowledged write (tolerated) from damage to acknowledged data
(JournalCorrupt).
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import os
import queue
import re
import struct
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

__all__ = ["Journal", "JournalCorrupt", "JournalError", "JournalStats", "MAX_RECORD"]

HEADER = struct.Struct("<II")
MIN_PAYLOAD = 2            # '{}'; also rejects zero-filled space, as crc32(b"") == 0
MAX_RECORD = 16 << 20      # bytes of payload; larger lengths are treated as damage
_SEGMENT = re.compile(r"journal-(\d{16})\.log")
_SNAPSHOT = re.compile(r"snapshot-(\d{16})\.json")
_SYNC_MODES = {"fsync": os.fsync, "fdatasync": os.fdatasync, "none": None}
_ROTATE = object()         # queue item: records from this seq on go to a new segment
_BARRIER = object()        # queue item: resolves once everything queued before it is durable


class JournalError(Exception):
    """The journal cannot take or make durable a record: disk error, closed, or in use."""


class JournalCorrupt(JournalError):
    """Recovery found damage that is not a crash tail (acknowledged data would be lost).
    Raised by `Journal.open` before it modifies any file."""


@dataclass
class JournalStats:
    """Counters since open: records made durable, write rounds, data syncs, bytes written."""
    records: int = 0
    batches: int = 0
    syncs: int = 0
    bytes: int = 0


def _segment_name(first_seq: int) -> str:
    return f"journal-{first_seq:016d}.log"


def _snapshot_name(seq: int) -> str:
    return f"snapshot-{seq:016d}.json"


def _make_dumps() -> Callable[[Any], bytes]:
    """Compact strict JSON (no NaN/inf) as UTF-8: json.dumps with those options, but one
    encoder made once (json.dumps builds a JSONEncoder per call with non-default options:
    half the cost of a journal record). Raises ValueError / TypeError like json.dumps."""
    encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is None:  # pragma: no cover - CPython always has the C encoder
        return lambda obj: encoder.encode(obj).encode()
    # markers None: no cycle check (records are trees; a cycle raises RecursionError)
    iterencode = c_make_encoder(
        None, encoder.default, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )
    return lambda obj: "".join(iterencode(obj, 0)).encode()


_dumps = _make_dumps()


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ---------------------------------------------------------------- recovery (pure reads)

def _read_at(data: bytes, off: int) -> tuple[int, int, dict, int] | None:
    """The intact record at `off` as (seq, b, rec, end offset), or None."""
    if off + HEADER.size > len(data):
        return None
    length, crc = HEADER.unpack_from(data, off)
    end = off + HEADER.size + length
    if not MIN_PAYLOAD <= length <= MAX_RECORD or end > len(data):
        return None
    payload = data[off + HEADER.size:end]
    if zlib.crc32(payload) != crc:
        return None
    try:
        obj = json.loads(payload)
        seq, batch, rec = obj["seq"], obj["b"], obj["rec"]
    except (ValueError, KeyError, TypeError):
        return None
    if type(seq) is not int or type(batch) is not int or not isinstance(rec, dict):
        return None
    return seq, batch, rec, end


@dataclass
class _Segment:
    path: Path
    first_seq: int
    records: list[dict]
    good_end: int          # offset after the last record kept
    size: int

    @property
    def end_seq(self) -> int:       # seq of the record that would come next
        return self.first_seq + len(self.records)


def _scan_segment(path: Path, first_seq: int) -> _Segment:
    """Parse a segment; find where its crash tail starts (if any). Raises JournalCorrupt."""
    data = path.read_bytes()
    records: list[dict] = []
    off, expect = 0, first_seq
    while (r := _read_at(data, off)) is not None:
        seq, _, rec, end = r
        if seq != expect:
            raise JournalCorrupt(f"{path}: record at offset {off} has seq {seq}, expected {expect}")
        records.append(rec)
        off, expect = end, expect + 1
    if off < len(data):
        _check_tail(path, data, off, expect)
    return _Segment(path, first_seq, records, off, len(data))


def _check_tail(path: Path, data: bytes, bad: int, expect: int) -> None:
    """Bytes from `bad` on are no intact record: accept them as a crash tail, or raise.

    A tail is what a crash leaves: a torn record or garbage with no intact record after it,
    or a hole inside the last write (its sync never finished, so none of it was
    acknowledged), recognised by every later intact record carrying that write's `b`.
    """
    later: list[tuple[int, int, int]] = []          # (offset, seq, b)
    pos = bad + 1
    while pos + HEADER.size + MIN_PAYLOAD <= len(data):
        r = _read_at(data, pos)
        if r is None:
            pos += 1
            continue
        later.append((pos, r[0], r[1]))
        pos = r[3]
    if not later:
        return
    last_write = later[-1][2]
    if last_write <= expect and all(b == last_write and seq >= expect for _, seq, b in later):
        return
    raise JournalCorrupt(
        f"{path}: damaged record at offset {bad} (seq {expect}) is followed by intact "
        f"records (first at offset {later[0][0]}, seq {later[0][1]}): not a crash tail")


# ---------------------------------------------------------------- the journal

class Journal:
    """Append-only journal of one site node; see the module docstring for the format.

    Not thread-safe: every method is called from the thread of the event loop that made
    the first `append`/`compact` call. `open` and `recover` are plain calls.
    """

    def __init__(self, data_dir: Path, sync: str, lock_fd: int) -> None:
        self._dir = data_dir
        self._sync_file: Callable[[int], None] | None = _SYNC_MODES[sync]
        self._lock_fd = lock_fd
        self.stats = JournalStats()
        # test hook, called in the I/O threads after each step that changes files
        self._probe: Callable[[str], None] | None = None
        snap_seq, snap_state, replay, fd, seg_first = self._recover_files()
        self._snap_seq = snap_seq
        self._recovered: tuple[Any, list[dict]] | None = (snap_state, replay)
        self._next_seq = snap_seq + len(replay) + 1
        self._durable_seq = self._next_seq - 1
        self._fd, self._seg_first = fd, seg_first            # owned by the writer thread
        # (seq, payload or _ROTATE/_BARRIER, future or None inside an append_many)
        self._pending: list[tuple[int, Any, asyncio.Future | None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        # The writer thread takes whole batches from _handoff; _busy: a batch is handed
        # over (or about to be) and not yet reported back by _written.
        self._thread: threading.Thread | None = None
        self._handoff: queue.SimpleQueue = queue.SimpleQueue()
        self._busy = False
        self._compactor = ThreadPoolExecutor(1, thread_name_prefix="journal-compact")
        self._compact_lock = asyncio.Lock()
        # loop time of the last compact() before it first yielded (encoding its snapshot)
        self.last_compact_loop_s = 0.0
        self._failure: BaseException | None = None
        self._closing = self._closed = False

    @classmethod
    def open(cls, data_dir: str | os.PathLike, *, sync: str = "fdatasync") -> "Journal":
        """Open/create the journal in data_dir (created if missing), taking its LOCK.

        Recovers the files: removes leftover tmp files and files made obsolete by the
        latest snapshot, truncates a torn or garbage tail left by a crash, and makes what
        it recovered durable. Starts no I/O task or thread work; call `recover()` next.
        sync: "fsync" | "fdatasync" | "none" ("none" only for tests that don't check
        durability). Raises JournalCorrupt (having changed nothing) if acknowledged data
        is damaged or missing, JournalError if another Journal holds the directory.
        """
        if sync not in _SYNC_MODES:
            raise ValueError(f"sync must be one of {sorted(_SYNC_MODES)}, not {sync!r}")
        path = Path(data_dir)
        lock_fd = lock_directory(path, sync)
        if lock_fd is None:
            raise JournalError(f"{path} is in use by another Journal (LOCK is held)")
        try:
            return cls(path, sync, lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    def _recover_files(self) -> tuple[int, Any, list[dict], int, int]:
        """Validate everything first, then repair: (snap seq, snap state, replay, fd, first)."""
        d = self._dir
        names = os.listdir(d)
        snaps = sorted(int(m[1]) for n in names if (m := _SNAPSHOT.fullmatch(n)))
        segs = sorted(int(m[1]) for n in names if (m := _SEGMENT.fullmatch(n)))
        snap_seq, state, has_snap = 0, None, bool(snaps)
        if snaps:
            snap_seq = snaps[-1]
            path = d / _snapshot_name(snap_seq)
            try:
                doc = json.loads(path.read_bytes())
                ok = isinstance(doc, dict) and doc.get("seq") == snap_seq and "state" in doc
            except ValueError:
                ok = False
            if not ok:
                raise JournalCorrupt(f"{path}: unreadable snapshot")
            state = doc["state"]
        # A segment is obsolete once the next one starts within the snapshot.
        live = [f for i, f in enumerate(segs) if i == len(segs) - 1 or segs[i + 1] - 1 > snap_seq]
        scans = [_scan_segment(d / _segment_name(f), f) for f in live]
        if scans and scans[0].first_seq > snap_seq + 1:
            raise JournalCorrupt(f"{scans[0].path}: records {snap_seq + 1}.."
                                 f"{scans[0].first_seq - 1} are missing")
        for prev, seg in zip(scans, scans[1:]):
            if prev.end_seq != seg.first_seq:
                raise JournalCorrupt(f"{prev.path}: ends at offset {prev.good_end} before seq "
                                     f"{prev.end_seq}, but the next segment starts at "
                                     f"{seg.first_seq}: records are missing")
        replay = [rec for seg in scans for i, rec in enumerate(seg.records)
                  if seg.first_seq + i > snap_seq]
        next_seq = snap_seq + len(replay) + 1
        # Repair. From here on everything is redone identically if we crash part-way.
        sync = self._sync_file is not None
        active = scans[-1] if scans and scans[-1].end_seq == next_seq else None
        if has_snap and sync:
            _fsync_path(d / _snapshot_name(snap_seq))
        if sync:
            fsync_dir(d)          # the snapshot's rename is durable before we delete
        for seg in scans:
            truncated = seg is active and seg.good_end < seg.size
            if truncated:
                os.truncate(seg.path, seg.good_end)
            if sync and (truncated or seg.end_seq > snap_seq + 1):
                _fsync_path(seg.path)   # what we replay may have been written, never synced
        for n in names:
            if (n.endswith(".tmp")
                    or ((m := _SNAPSHOT.fullmatch(n)) and int(m[1]) < snap_seq)
                    or ((m := _SEGMENT.fullmatch(n)) and int(m[1]) not in live)):
                os.unlink(d / n)
        for seg in scans:
            if seg is not active and seg.end_seq <= snap_seq + 1:
                os.unlink(seg.path)       # its records all precede the snapshot
        if active is not None:
            fd = os.open(active.path, os.O_WRONLY | os.O_APPEND)
            return snap_seq, state, replay, fd, active.first_seq
        fd = os.open(d / _segment_name(next_seq), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if sync:
            fsync_dir(d)
        return snap_seq, state, replay, fd, next_seq

    def recover(self) -> tuple[dict | None, list[dict]]:
        """(latest snapshot or None, records appended after that snapshot, in append order).

        This is what was on disk at `open()`; it is only available until the first
        `append`/`compact` (raises JournalError afterwards, as it would be stale).
        """
        if self._recovered is None:
            raise JournalError("recover() is only available before the first append/compact")
        return self._recovered

    @property
    def records_since_snapshot(self) -> int:
        """Records appended (durable or not) after the latest completed snapshot."""
        return self._next_seq - 1 - self._snap_seq

    @property
    def last_seq(self) -> int:
        """Seq of the last record appended (0 if none ever was)."""
        return self._next_seq - 1

    # ------------------------------------------------------------ appends

    def append(self, record: dict) -> "asyncio.Future[int]":
        """Queue a record; returns a future resolving to its sequence number once it is
        durable (written and synced). Records become durable in append order.

        Must be called from the event loop thread. Never blocks the loop: the record is
        serialized here (so the caller may mutate it afterwards), the write+sync happens in
        a worker thread, and all records queued while a sync is in flight go together in the
        next write+sync (group commit). Cancelling the future does not withdraw the record.
        If a write or sync fails (disk error), its futures and all queued ones fail with
        JournalError and the journal refuses further appends (raises JournalError): the
        node must restart and recover. Raises TypeError/ValueError, changing nothing, for a
        record that is not a dict, not strict JSON, or larger than MAX_RECORD.
        """
        self._check_usable()
        if not isinstance(record, dict):
            raise TypeError(f"a journal record is a dict, not {type(record).__name__}")
        data = _dumps(record)
        if len(data) > MAX_RECORD - 64:
            raise ValueError(f"journal record of {len(data)} bytes exceeds MAX_RECORD")
        fut = self._start().create_future()
        seq = self._next_seq
        self._next_seq += 1
        self._enqueue(seq, data, fut)
        return fut

    def append_many(self, records: list[dict]) -> "asyncio.Future[int]":
        """Like `append` for several records that belong together (one step of the node):
        they get consecutive seqs, go to disk in the same write, and one future resolves
        to the seq of the last once all of them are durable. All or none are queued:
        TypeError/ValueError for any bad record leaves the journal unchanged."""
        self._check_usable()
        datas = []
        for record in records:
            if not isinstance(record, dict):
                raise TypeError(f"a journal record is a dict, not {type(record).__name__}")
            data = _dumps(record)
            if len(data) > MAX_RECORD - 64:
                raise ValueError(f"journal record of {len(data)} bytes exceeds MAX_RECORD")
            datas.append(data)
        if not datas:
            raise ValueError("append_many needs at least one record")
        fut = self._start().create_future()
        seq = self._next_seq
        self._next_seq += len(datas)
        pending = self._pending
        for i, data in enumerate(datas[:-1]):
            pending.append((seq + i, data, None))
        self._enqueue(seq + len(datas) - 1, datas[-1], fut)
        return fut

    async def flush(self) -> None:
        """Wait until everything appended so far is durable (JournalError if it cannot be)."""
        if self._durable_seq >= self._next_seq - 1 or self._closed:
            self._raise_if_failed()
            return
        self._check_usable(closing_ok=True)
        barrier = self._start().create_future()
        self._enqueue(self._next_seq - 1, _BARRIER, barrier)
        await barrier

    def compact(self, snapshot: dict, *, handed_over: dict[str, Any] | None = None) -> Awaitable[None]:
        """Make `snapshot` the new recovery base and drop what it covers; await the result.

        snapshot must reflect every record appended (not necessarily durable) before this
        call. It is serialized, and the sequence number it covers taken, in the call
        itself, before the awaitable is returned: the caller may go on changing its state
        and appending at once, and ``asyncio.ensure_future(journal.compact(s))`` is as
        safe as ``await`` (a coroutine body would only read the sequence number once
        scheduled, after appends the snapshot lacks). `handed_over`: more top-level entries of the
        state that the caller will never change again (nor anything in them): lists,
        tuples, dicts with str keys, or objects whose ``json_slices()`` yields lists
        whose items together form a JSON array (read in the compaction thread: the
        producer guarantees what it reads there does not change). They are serialized
        in the compaction thread a slice at a time, releasing the GIL between slices, so
        a large state holds the event loop for well under a millisecond at a time, not
        for its whole encoding. Waits until those records are durable and a new
        segment has started, then writes the snapshot atomically (tmp file, fsync, rename,
        fsync dir) in a separate thread, so appends go on meanwhile, and deletes segments
        and snapshots made obsolete. Safe against SIGKILL at any point: recovery afterwards
        yields a state equal to snapshot + later records (or to the previous base + all
        records, if the rename did not happen). Concurrent calls run one after the other.
        Raises JournalError if the records could not be made durable (the journal has
        failed) or the snapshot could not be written (the journal remains usable).
        """
        self._check_usable()
        started = time.perf_counter()
        seq = self._next_seq - 1
        data: Any = _dumps({"seq": seq, "state": snapshot})
        if handed_over:
            if any(k in snapshot or not isinstance(k, str) for k in handed_over):
                raise ValueError("handed_over keys must be strings not in snapshot")
            data = (data, bool(snapshot), dict(handed_over))
        rotated = self._start().create_future()
        self._enqueue(seq + 1, _ROTATE, rotated)
        self.last_compact_loop_s = time.perf_counter() - started
        return self._install_snapshot(seq, data, rotated)

    async def _install_snapshot(self, seq: int, data: Any, rotated: asyncio.Future) -> None:
        async with self._compact_lock:
            await rotated
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self._compactor, self._write_snapshot, seq, data)
            except OSError as exc:     # the segments still hold everything: appends go on
                raise JournalError(f"snapshot {seq} not written: {exc!r}") from exc
            self._snap_seq = max(self._snap_seq, seq)

    async def close(self) -> None:
        """Flush, wait for a running compaction, stop the worker, close files, release LOCK.

        Idempotent. Does not raise for an earlier write failure (the futures reported it).
        """
        if self._closed:
            return
        self._closing = True
        try:
            if self._failure is None:
                try:
                    await self.flush()
                except JournalError:
                    pass
            async with self._compact_lock:
                pass
        finally:
            if self._thread is not None:
                self._handoff.put(None)         # the writer thread ends after its batch
                await asyncio.get_running_loop().run_in_executor(self._compactor, self._thread.join)
            self._compactor.shutdown(wait=True)
            os.close(self._fd)
            os.close(self._lock_fd)
            self._closed = True

    async def __aenter__(self) -> "Journal":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ loop side

    def _check_usable(self, closing_ok: bool = False) -> None:
        self._raise_if_failed()
        if self._closed or (self._closing and not closing_ok):
            raise JournalError("journal is closed")

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise JournalError(f"journal failed earlier: {self._failure}") from self._failure

    def _start(self) -> asyncio.AbstractEventLoop:
        """The journal's loop; the first call (on the loop) binds it and starts the
        writer thread. Later calls trust the caller to be on that loop's thread (the
        documented contract): no get_running_loop() (a getpid() each) per append."""
        loop = self._loop
        if loop is not None:
            return loop
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._thread = threading.Thread(target=self._writer_main, name="journal-writer", daemon=True)
        self._thread.start()
        self._recovered = None
        return loop

    def _enqueue(self, seq: int, data: Any, fut: asyncio.Future | None) -> None:
        self._pending.append((seq, data, fut))
        if not self._busy:
            # Hand over at the end of this loop iteration: everything appended until
            # then goes in the same write (group commit), as does everything appended
            # while that write+sync is in flight (handed over when it is done).
            self._busy = True
            self._loop.call_soon(self._hand_over)

    def _hand_over(self) -> None:
        """Loop thread: give the pending records to the writer thread (one wake-up)."""
        items, self._pending = self._pending, []
        if items and self._failure is None:
            self._handoff.put(items)
            return
        self._busy = False
        if items:  # appends are refused once failed; be safe all the same
            self._fail(items, self._failure)

    def _written(self, items: list, exc: BaseException | None) -> None:
        """Loop thread: the writer thread finished ``items`` (``exc``: it failed)."""
        if exc is not None:
            self._busy = False
            self._fail(items, exc)
            return
        for seq, data, fut in items:
            if data is not _BARRIER and data is not _ROTATE:
                self._durable_seq = seq
            if fut is not None and not fut.done():
                fut.set_result(seq)
        if self._pending:
            self._hand_over()
        else:
            self._busy = False

    def _writer_main(self) -> None:
        """Writer thread: write+sync each batch handed over, report to the loop."""
        while True:
            items = self._handoff.get()
            if items is None:
                return
            exc = None
            try:
                self._write_batch(items)
            except BaseException as e:  # noqa: BLE001 - reported to the loop thread
                exc = e
            try:
                self._loop.call_soon_threadsafe(self._written, items, exc)
            except RuntimeError:  # the loop is closed: nobody waits for these any more
                return

    def _fail(self, items: list, exc: BaseException) -> None:
        if not isinstance(exc, Exception):      # cancelled with the loop: not a disk error
            exc = JournalError("journal writer stopped")
        self._failure = exc
        err = JournalError(f"journal write failed: {exc!r}")
        for _, _, fut in items + self._pending:
            if fut is not None and not fut.done():
                fut.set_exception(err)
        self._pending = []

    # ------------------------------------------------------------ I/O threads

    def _write_batch(self, items: list[tuple[int, Any, asyncio.Future]]) -> None:
        """Writer thread: frame records, one write+sync per segment touched."""
        buf, first, count = bytearray(), 0, 0
        for seq, data, _ in items:
            if data is _ROTATE:
                self._write_sync(buf, count)
                buf, count = bytearray(), 0
                self._rotate(seq)
            elif data is not _BARRIER:
                if not buf:
                    first = seq
                payload = b'{"seq":%d,"b":%d,"rec":%b}' % (seq, first, data)
                buf += HEADER.pack(len(payload), zlib.crc32(payload))
                buf += payload
                count += 1
        self._write_sync(buf, count)

    def _write_sync(self, buf: bytearray, count: int) -> None:
        if not buf:
            return
        _write_all(self._fd, buf)
        if self._sync_file is not None:
            self._sync_file(self._fd)
            self.stats.syncs += 1
        self.stats.batches += 1
        self.stats.records += count
        self.stats.bytes += len(buf)

    def _rotate(self, first_seq: int) -> None:
        if first_seq == self._seg_first:        # current segment is still empty
            return
        path = self._dir / _segment_name(first_seq)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        os.close(self._fd)
        self._fd, self._seg_first = fd, first_seq
        if self._sync_file is not None:
            fsync_dir(self._dir)    # the file must exist after a crash before we ack into it
        self._step("rotated")

    def _write_snapshot(self, seq: int, data: Any) -> None:
        """Compaction thread: atomic snapshot write, then delete what it made obsolete."""
        if isinstance(data, tuple):
            before = sys.getswitchinterval()
            sys.setswitchinterval(min(before, _SWITCH_INTERVAL_S))
            try:
                data = _join_handed_over(*data)
            finally:
                sys.setswitchinterval(before)
        final = self._dir / _snapshot_name(seq)
        tmp = final.with_name(final.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            self._step("tmp-written")
            if self._sync_file is not None:
                self._sync_file(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        self._step("renamed")
        if self._sync_file is not None:
            fsync_dir(self._dir)
        self._step("dir-synced")
        # Segments are contiguous and one starts at seq + 1, so any starting at or before
        # seq ends at or before it.
        for name in sorted(os.listdir(self._dir)):
            m = _SEGMENT.fullmatch(name) or _SNAPSHOT.fullmatch(name)
            if m and (int(m[1]) <= seq if m.re is _SEGMENT else int(m[1]) < seq):
                os.unlink(self._dir / name)
                self._step(f"deleted {name}")

    def _step(self, name: str) -> None:
        if self._probe is not None:
            self._probe(name)


# Items of a handed-over list (or dict) encoded per slice: ≈ 0.1 ms of work, after which
# the compaction thread lets the loop thread have the GIL (_pause). Every GIL release of
# the loop thread (a socket write, a gRPC core call, the epoll wait) may hand the GIL to
# the compaction thread until its next pause: that wait is added to the loop's work, many
# times per request (a convoy), so slices are small.
_SLICE = 32
# The interpreter's switch interval while a snapshot is encoded: bounds that wait when a
# slice runs long (a loaded machine); restored afterwards.
_SWITCH_INTERVAL_S = 0.0005


def _pause() -> None:
    """Compaction thread, between slices: release the GIL so that the event loop, if it
    is waiting for it, runs now rather than after the interpreter's switch interval
    (5 ms by default): the snapshot's encoding must not add that to every loop wake-up."""
    time.sleep(0.00005)


def _encode_into(out: bytearray, value: Any) -> None:
    """Append the JSON of a handed-over value (compaction thread), a slice at a time:
    a list or tuple is encoded ``_SLICE`` items per step, a dict ``_SLICE`` entries per
    step (values recursively by the same rules), an object with ``json_slices()`` as the
    JSON array of all the items of the lists it yields; anything else in one step."""
    if isinstance(value, (list, tuple)):
        out += b"["
        for i in range(0, len(value), _SLICE):
            if i:
                out += b","
            out += _dumps(value[i:i + _SLICE])[1:-1]
            _pause()
        out += b"]"
    elif isinstance(value, dict):
        out += b"{"
        items = list(value.items())
        for i in range(0, len(items), _SLICE):
            for j, (k, v) in enumerate(items[i:i + _SLICE]):
                if not isinstance(k, str):
                    raise TypeError(f"handed-over dict keys must be str, not {type(k).__name__}")
                if i or j:
                    out += b","
                out += _dumps(k) + b":"
                if (isinstance(v, dict) or hasattr(v, "json_slices")
                        or isinstance(v, (list, tuple)) and len(v) > _SLICE):
                    _encode_into(out, v)
                else:
                    out += _dumps(v)
            _pause()
        out += b"}"
    elif hasattr(value, "json_slices"):
        out += b"["
        first = True
        for part in value.json_slices():
            if not part:
                continue
            if not first:
                out += b","
            out += _dumps(part)[1:-1]
            first = False
            _pause()
        out += b"]"
    else:
        out += _dumps(value)


def _join_handed_over(head: bytes, nonempty: bool, lists: dict[str, Any]) -> bytes:
    """The snapshot document: `head` ({"seq":S,"state":{...}}) with the handed-over
    values added to "state", each encoded a slice at a time (compaction thread)."""
    out = bytearray(head[:-2])  # without the closing "}}"
    sep = b"," if nonempty else b""
    for key, value in lists.items():
        out += sep + _dumps(key) + b":"
        sep = b","
        _encode_into(out, value)
    out += b"}}"
    return bytes(out)


def lock_directory(path: Path, sync: str) -> int | None:
    """Create ``path`` if needed (each new directory entry made durable, top down, unless
    ``sync`` is "none") and take its exclusive ``LOCK``: the lock's fd, or None when
    another process (or log) holds it."""
    if not path.is_dir():
        created = [p for p in (path, *path.parents) if not p.exists()]
        path.mkdir(parents=True)
        if sync != "none":
            for new_dir in reversed(created):
                fsync_dir(new_dir.parent)
    lock_fd = os.open(path / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        return None
    return lock_fd


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a created, renamed or removed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
