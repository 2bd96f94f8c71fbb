"""Journal group commit: durable appends/s at 1, 16 and 64 concurrent callers.

Each caller loops `await journal.append(command)` (acknowledged = written and synced).
The anchor, "naive_appends_per_s", is a plain loop of one write + one sync per record,
which is what the journal would do without group commit. Prints one JSON line per
concurrency: {"concurrency", "appends_per_s", "syncs_per_s", "p99_ms",
"naive_appends_per_s"}. About 4 x --seconds in total.

    .venv/bin/python bench/journal.py [--seconds 3] [--sync fdatasync] [--dir DIR]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
import zlib

import uvloop

from router.journal import HEADER, Journal

COMMAND = {"op": "offer", "call": "c-00000000", "site": "lisbon", "queue": "billing",
           "skill": "billing", "lang": "pt", "class": "vip", "boost_s": 30, "t": 0.0}


def naive(directory: str, seconds: float, sync: str) -> float:
    """Appends/s with one write + one sync per record, no batching, no event loop."""
    sync_fn = {"fsync": os.fsync, "fdatasync": os.fdatasync, "none": lambda fd: None}[sync]
    fd = os.open(os.path.join(directory, "naive.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    n, start = 0, time.perf_counter()
    try:
        while time.perf_counter() - start < seconds:
            payload = json.dumps({"seq": n, "rec": COMMAND}, separators=(",", ":")).encode()
            os.write(fd, HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
            sync_fn(fd)
            n += 1
    finally:
        os.close(fd)
    return n / (time.perf_counter() - start)


async def grouped(directory: str, concurrency: int, seconds: float, sync: str) -> dict:
    journal = Journal.open(directory, sync=sync)
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def caller(c: int) -> None:
        command = dict(COMMAND, call=f"c-{c:08d}")
        while time.perf_counter() < stop:
            command["t"] = t0 = time.perf_counter()
            await journal.append(command)
            latencies.append(time.perf_counter() - t0)

    start, syncs0 = time.perf_counter(), journal.stats.syncs
    await asyncio.gather(*(caller(c) for c in range(concurrency)))
    elapsed = time.perf_counter() - start
    syncs = journal.stats.syncs - syncs0
    await journal.close()
    return {"concurrency": concurrency,
            "appends_per_s": round(len(latencies) / elapsed),
            "syncs_per_s": round(syncs / elapsed),
            "p99_ms": round(statistics.quantiles(latencies, n=100)[98] * 1000, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--sync", default="fdatasync", choices=["fsync", "fdatasync", "none"])
    parser.add_argument("--dir", default=None, help="parent of the temp data dirs "
                        "(default: the system temp dir; must be on the disk to measure)")
    parser.add_argument("--json", action="store_true", help="accepted for `make bench`; "
                        "output is always JSON lines")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="tandem-journal-bench-", dir=args.dir)
    try:
        anchor = round(naive(root, args.seconds, args.sync))
        for concurrency in (1, 16, 64):
            directory = os.path.join(root, f"c{concurrency}")
            result = uvloop.run(grouped(directory, concurrency, args.seconds, args.sync))
            result["naive_appends_per_s"] = anchor
            result["sync"] = args.sync
            print(json.dumps(result), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
