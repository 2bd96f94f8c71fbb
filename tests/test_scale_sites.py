"""bench/scale_sites.py on a small cluster: the figures are there and make sense.

Four sites (origin, two peers, the probe site) and the 3-site anchor, a few seconds
each, on a real etcd and real node processes. Timings are not checked (the machine is
shared); structure and sanity are: etcd saw load writes, every peer saw every
propagation probe, the origin overflowed its calls, nothing is left behind.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _load_bench():
    spec = importlib.util.spec_from_file_location("scale_sites", ROOT / "bench" / "scale_sites.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _children() -> list[int]:
    """Live child processes of this process (the bench's nodes and etcd are)."""
    me, out = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def test_measure_small_cluster(tmp_path):
    bench = _load_bench()
    before = set(_children())
    res = bench.measure(seconds=4.0, sites=4, rate=8.0, probe_every=1.0, warmup=1.0, anchor_seconds=2.0,
                        tmp_dir=tmp_path)
    json.dumps(res)  # one JSON line: everything is JSON-able

    for key in ("sites", "etcd_writes_per_s", "etcd_writes_per_s_per_site", "decision_p99_ms",
                "decision_p99_ms_3_sites", "load_propagation_p99_s", "raw_watch_p99_s"):
        assert key in res, key
    assert res["sites"] == 4
    assert res["anchor"]["sites"] == 3
    # etcd's own counters saw the nodes' load publishing (heartbeats alone: >= 1/s a site)
    assert res["etcd_writes_per_s"] > 0
    assert res["load_puts_per_s"] > 0
    assert res["etcd_writes_per_s_per_site"] == pytest.approx(res["etcd_writes_per_s"] / 4, rel=0.01)
    assert set(res["load_puts_per_s_by_role"]) == {"origin", "peer", "probe"}
    # every propagation probe reached every other node
    assert res["probes"] >= 1
    assert res["all_peers_saw"] is True
    assert 0 < res["load_propagation_p99_s"] < 5.0
    assert 0 < res["raw_watch_p99_s"] < 5.0
    # the origin has no agent: its calls overflowed, decided inside their OfferCall
    assert res["overflowed"] > 0 and res["overflowed"] <= res["offered"]
    assert res["decision_p99_ms"] is not None and res["decision_p99_ms"] > 0
    assert res["decision_p99_ms_3_sites"] is not None and res["decision_p99_ms_3_sites"] > 0
    assert res["decide_us"]["peers"] == 3 and res["anchor"]["decide_us"]["peers"] == 2
    assert all(math.isfinite(v) for v in res["cpu_cores"].values())
    # everything it started is stopped and removed
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())
    assert not set(_children()) - before, "bench processes left running"


def test_main_prints_one_json_line(tmp_path):
    """The command line's --json output is one parseable line (a tiny run)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scale_sites.py"), "--json", "--sites", "3", "--seconds", "2",
         "--probe-every", "1"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert res["sites"] == 3 and res["etcd_writes_per_s"] > 0
