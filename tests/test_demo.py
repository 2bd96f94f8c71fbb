"""`tandem demo` end to end: three real node processes, simulated callers and agents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _node_pids_under(root: Path) -> list[int]:
    """Processes still running a node on a data dir under ``root`` (should be none)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"node" in cmd and any(str(root).encode() in part for part in cmd):
            pids.append(int(d.name))
    return pids


def test_demo_json(tmp_path):
    data = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "router.cli", "demo", "--duration", "15", "--json",
         "--data-dir", str(data), "--sites", str(REPO / "sites")],
        cwd=REPO, capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"stdout must hold only the JSON line, got:\n{proc.stdout}"
    s = json.loads(lines[0])

    assert s["lost"] == 0 and s["duplicates"] == 0, proc.stderr[-4000:]
    assert s["offered"] > 0 and s["answered"] > 0
    assert s["offered"] == s["answered"] + s["abandoned"] + s["rejected"]
    assert 0 <= s["service_level"] <= 1 and s["asa_s"] >= 0
    assert s["duration_s"] == pytest.approx(15 * s["time_scale"])
    assert set(s["sites"]) == {"lyon", "montreal", "callpro"}
    for key in ("offered", "answered", "abandoned", "rejected"):
        assert sum(site[key] for site in s["sites"].values()) == s[key], key
    for name, site in s["sites"].items():
        assert site["offered"] == site["answered"] + site["abandoned"] + site["rejected"], name
        assert site["answered"] > 0, name
        assert 0 <= site["service_level"] <= 1, name
        assert site["aht_s"] > 0, name
        assert 0 <= site["abandon_rate"] <= 1, name
        assert site["csat"] is None or 1 <= site["csat"] <= 5, name
    # The KPI tables went to stderr, with every site in them.
    for name in s["sites"]:
        assert name in proc.stderr
    assert _node_pids_under(data) == [], "the demo left node processes behind"
