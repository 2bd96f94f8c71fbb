"""The run-state of a local cluster made by ``tandem up``: ``DATA_DIR/run.json``.

It names every process ``tandem up`` started in the background (etcd, one node per site,
the traffic player) with its pid, and where they serve. It is written as soon as each
process starts (a ``tandem up`` that dies half-way still leaves what ``tandem down``
needs) and removed by ``tandem down``. A pid counts as ours only while the process's
command line still contains its ``marker`` (the data dir; etcd's own data dir for etcd),
so a recycled pid is never signalled.

JSON::

    {"version": 1, "data_dir": "/abs/D", "state": "starting" | "running",
     "started_at": 1700000000.0, "time_scale": 60.0, "history": "embedded",
     "sites_dir": "/abs/sites",
     "etcd": {"pid": 123, "marker": "/dev/shm/…/data", "url": "https://127.0.0.1:2379",
              "data_dir": "/dev/shm/…/data"},
     "nodes": {"lyon": {"pid": 124, "marker": "/abs/D", "address": "127.0.0.1:40111",
                        "metrics": "127.0.0.1:40211"}},
     "traffic": {"pid": 125, "marker": "/abs/D"} | null,
     "rebalancer": {"pid": 126, "marker": "/abs/D", "address": "127.0.0.1:…"} | null}
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

FILE = "run.json"
VERSION = 1


def path(data_dir: Path) -> Path:
    return Path(data_dir) / FILE


def load(data_dir: Path) -> dict | None:
    """The run-state of ``data_dir``, or None when there is none (or it is unreadable:
    a half-written file cannot happen, see :func:`save`)."""
    try:
        doc = json.loads(path(data_dir).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def save(data_dir: Path, doc: dict) -> None:
    """Write atomically."""
    p = path(data_dir)
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, p)


def remove(data_dir: Path) -> None:
    try:
        path(data_dir).unlink()
    except FileNotFoundError:
        pass


Proc = tuple[str, int, str]  # (label, pid, marker)


def processes(doc: dict) -> list[Proc]:
    """Every process of the run-state: traffic, rebalancer, nodes, etcd (the stop order)."""
    out: list[Proc] = []
    default = str(doc.get("data_dir", ""))
    entries = [("traffic", doc.get("traffic")), ("rebalancer", doc.get("rebalancer"))]
    entries += [(f"node {name}", n) for name, n in (doc.get("nodes") or {}).items()]
    entries.append(("etcd", doc.get("etcd")))
    for label, e in entries:
        if e and e.get("pid"):
            out.append((label, int(e["pid"]), str(e.get("marker") or default)))
    return out


def alive(pid: int, marker: str) -> bool:
    """The process ``pid`` runs and its command line contains ``marker`` (the data dir);
    a zombie counts as gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    state = stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3]
    # the marker as a whole path (/tmp/a is not /tmp/ab), inside the data dir or alone
    return state not in (b"Z", b"X") and re.search(re.escape(marker) + r"(/|\s|$)", cmdline) is not None


def running(doc: dict | None) -> list[Proc]:
    """The processes of ``doc`` still alive."""
    return [p for p in processes(doc or {}) if alive(p[1], p[2])]


def terminate(procs: list[Proc], timeout: float, kill_after: float = 3.0) -> dict[str, str]:
    """SIGTERM every process at once, wait up to ``timeout`` s for all to end, SIGKILL
    those left and wait ``kill_after`` s more. Returns {label: "stopped" | "killed" |
    "still running"} for the processes that were alive."""
    procs = [p for p in procs if alive(p[1], p[2])]
    for _, pid, _ in procs:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    out = {label: "stopped" for label, _, _ in procs}
    left = _wait_gone(procs, timeout)
    for label, pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out[label] = "killed"
    for label, _, _ in _wait_gone(left, kill_after):
        out[label] = "still running"
    return out


def _wait_gone(procs: list[Proc], timeout: float) -> list[Proc]:
    deadline = time.monotonic() + timeout
    left = [p for p in procs if alive(p[1], p[2])]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if alive(p[1], p[2])]
    return left
