"""`tandem ctl plan / apply / get rebalancer` on a cluster made by `tandem up` (issue 12):
the rebalancer `tandem up` starts over mTLS with its own identity (`rebalancer-rebalancer`,
also its etcd user), the what-if search on a local Ray inside it, the operator's context
naming it. A plan is computed and saved, applied (every node reports the generation), and
the same file applied again is refused as stale with nothing changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctl_fixtures import ENV, tandem_up
from router.local.etcd import etcd_binary

pytestmark = pytest.mark.timeout(400)


def ctl(context: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "router.cli", "ctl", "--context", str(context), "--timeout", "10",
                           *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, **ENV, NO_COLOR="1", COLUMNS="200"))


def test_plan_apply_and_stale_through_the_rebalancer_of_tandem_up(tmp_path):
    if not os.access(etcd_binary(), os.X_OK):
        pytest.skip("etcd is not installed (Debian etcd-server)")
    with tandem_up(tmp_path / "cluster", "--history", "off") as c:
        r = ctl(c.context, "get", "rebalancer", "-o", "json")
        assert r.returncode == 0, r.stderr
        st = json.loads(r.stdout)
        assert st["leader"] and st["leader_name"] == "rebalancer", st

        plan = tmp_path / "plan.json"
        r = ctl(c.context, "plan", "--horizon-s", "1800", "--replications", "2", "--save", str(plan))
        assert r.returncode == 0, r.stderr
        assert "SL NOW" in r.stdout and "SL WITH PLAN" in r.stdout and "cluster" in r.stdout, r.stdout
        doc = json.loads(plan.read_text())
        assert doc["id"] and doc["base_revision"] > 0

        r = ctl(c.context, "apply", str(plan), "--yes")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "applied as generation 1" in r.stderr and "every site reported it" in r.stderr, r.stderr
        for site in c.sites:
            assert site in r.stdout

        r = ctl(c.context, "apply", str(plan), "--yes")
        assert r.returncode == 1 and "STALE_PLAN" in r.stderr and "plan again" in r.stderr, r.stderr
        r = ctl(c.context, "get", "rebalancer", "-o", "json")
        st = json.loads(r.stdout)
        assert str(st["generation"]) == "1" and int(st["plans_applied"]) == 1 and int(st["stale_refused"]) == 1, st
        assert {s["site"] for s in st["sites"] if s["applied"]} == set(c.sites), st
