"""The writer's on-disk spool: batches that could not reach the store yet.

A spool is a directory of files named ``<seq:016d>.<table>.json``, one per batch, each
written to a ``.tmp`` name, fsynced and renamed, so a file either exists whole or not at
all (a crash mid-write leaves only a ``.tmp``, removed at the next open). ``seq`` is
reserved when the batch is formed, so replaying in file-name order replays the spooled
batches in the order their rows were submitted, whichever thread spooled them. A file is deleted only after
its rows are in the store; a crash between the two replays it again, which the tables'
idempotent keys absorb (invariant 5).

A file holds ``{"table", "columns", "data"}`` with the rows column-wise, exactly as
:meth:`router.history.store.HistoryStore.insert` takes them. Files the store refused for
good (bad data) move to ``rejected/`` for a person to look at; they are never retried.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^(\d{16})\.([a-z_]+)\.json$")


@dataclass
class SpooledBatch:
    seq: int
    table: str
    path: Path

    @property
    def name(self) -> str:
        return self.path.name


class Spool:
    """Thread-safe; one process at a time per directory (the node's data dir lock)."""

    def __init__(self, directory: str | Path, *, fsync: bool = True) -> None:
        self.dir = Path(directory)
        self.rejected_dir = self.dir / "rejected"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._lock = threading.Lock()
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        self._files: dict[int, SpooledBatch] = {}
        for p in self.dir.iterdir():
            m = _NAME.match(p.name)
            if m:
                seq = int(m.group(1))
                self._files[seq] = SpooledBatch(seq, m.group(2), p)
        self._next_seq = max(self._files, default=0) + 1

    def reserve_seq(self) -> int:
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            return seq

    def __len__(self) -> int:
        with self._lock:
            return len(self._files)

    def empty(self) -> bool:
        return len(self) == 0

    def write(self, seq: int, table: str, columns: list[str], data: list[list[Any]]) -> Path:
        path = self.dir / f"{seq:016d}.{table}.json"
        tmp = path.with_name(path.name + ".tmp")
        body = json.dumps({"table": table, "columns": columns, "data": data}, separators=(",", ":"))
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(body)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if self.fsync:
            self._fsync_dir()
        with self._lock:
            self._files[seq] = SpooledBatch(seq, table, path)
        return path

    def oldest(self, limit: int | None = None) -> list[SpooledBatch]:
        with self._lock:
            seqs = sorted(self._files)
            if limit is not None:
                seqs = seqs[:limit]
            return [self._files[s] for s in seqs]

    @staticmethod
    def read(batch: SpooledBatch) -> tuple[list[str], list[list[Any]]]:
        doc = json.loads(batch.path.read_text(encoding="utf-8"))
        return doc["columns"], doc["data"]

    def remove(self, batches: list[SpooledBatch]) -> None:
        for b in batches:
            b.path.unlink(missing_ok=True)
            with self._lock:
                self._files.pop(b.seq, None)

    def reject(self, batch: SpooledBatch, error: str) -> Path:
        """Move a batch the store refused for good to ``rejected/`` with the error beside it."""
        self.rejected_dir.mkdir(exist_ok=True)
        dest = self.rejected_dir / batch.name
        os.replace(batch.path, dest)
        dest.with_suffix(".error.txt").write_text(error + "\n", encoding="utf-8")
        with self._lock:
            self._files.pop(batch.seq, None)
        return dest

    def rejected_count(self) -> int:
        if not self.rejected_dir.exists():
            return 0
        return sum(1 for p in self.rejected_dir.glob("*.json"))

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
