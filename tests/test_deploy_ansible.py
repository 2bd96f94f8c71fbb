"""A real deploy of the example topology with the Ansible roles onto containers with
systemd (tests/deploy_harness.py, the same run as ``make deploy-test``): a first run, a
second run that changes nothing, a smoke test through ``tandem ctl``, a rolling upgrade
under traffic with every offered call reconciled (lost 0, duplicates 0)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_VENV = ROOT / ".venv-deploy"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_deploy_twice_smoke_and_rolling_upgrade_under_traffic():
    if not (DEPLOY_VENV / "bin" / "ansible-playbook").exists():
        pytest.fail(f"no {DEPLOY_VENV}: make deploy-deps (make test runs it)")
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "deploy_harness.py"), "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=1700)
    print(p.stderr[-6000:])
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON line; exit {p.returncode}\n{p.stderr[-6000:]}"
    r = json.loads(lines[-1])
    print(json.dumps(r))
    assert r["hosts"] == 4
    assert r["first_run_changed"] > 0
    assert r["second_run_changed"] == 0, r
    assert r["smoke_overflowed"] >= 1, r
    assert r["upgrade_calls"] > 0 and r["upgrade_lost"] == 0 and r["upgrade_duplicates"] == 0, r
    assert r["node_unit_failures"] == 0, r["node_unit_failures_by_host"]  # every node stop was clean
    assert p.returncode == 0, p.stderr[-6000:]
