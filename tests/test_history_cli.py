"""``tandem history …`` and ``tandem report …`` on the server (in-process) and on chdb (in a
subprocess: this process already holds chdb on another path)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from history_fixtures import unique_database
from router.cli import app
from router.history.cli import parse_interval, parse_time

runner = CliRunner()


def run(*args):
    r = runner.invoke(app, list(args))
    return r.exit_code, r.output


@pytest.fixture
def url(clickhouse_server):
    u = clickhouse_server.store_url(unique_database("cli"))
    yield u
    from router.history.store import open_store

    s = open_store(u)
    s.query("DROP DATABASE IF EXISTS {db}")
    s.close()


def test_migrate_status_synth_and_reports_on_the_server(url):
    code, out = run("history", "migrate", "--clickhouse", url)
    assert code == 0 and "applied migration(s) 1, 2, 3" in out
    code, out = run("history", "migrate", "--clickhouse", url)
    assert code == 0 and "up to date (version 3)" in out
    code, out = run("history", "synth", "--clickhouse", url, "--calls", "3000", "--from", "2026-11-02", "--days", "2")
    assert code == 0, out
    code, out = run("history", "synth", "--clickhouse", url, "--calls", "3000", "--from", "2026-11-02", "--days", "2")
    assert code == 0, out  # again: keyed rows, nothing added
    code, out = run("history", "status", "--clickhouse", url, "--json")
    doc = json.loads(out)
    assert doc["schema_version"] == 3 and doc["rows"]["interactions"] == 3000

    code, out = run("report", "kpi", "--clickhouse", url, "--by", "region,partner", "--interval", "6h", "--json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["interval_s"] == 21600 and doc["by"] == ["region", "partner"]
    assert sum(r["offered"] for r in doc["rows"]) == 3000
    assert all(r["bucket"] % 21600 == 0 for r in doc["rows"])
    assert any(r["occupancy"] is not None for r in doc["rows"])

    code, out = run("report", "kpi", "--clickhouse", url, "--by", "site")
    assert code == 0 and "lyon" in out and "callpro" in out and "SL" in out

    code, out = run("report", "chargeback", "--clickhouse", url, "--period", "2026-11", "--json")
    assert code == 0, out
    doc = json.loads(out)
    assert set(doc["totals"]["region"]) == {"emea", "amer"} and doc["currency"] == "EUR"
    code, out = run("report", "chargeback", "--clickhouse", url, "--from", "2026-11-01", "--to", "2026-12-01", "--csv")
    assert code == 0, out
    lines = list(csv.DictReader(io.StringIO(out)))
    assert sum(int(ln["contacts"]) for ln in lines if ln["kind"] == "region") == sum(
        ln["contacts"] for ln in doc["lines"] if ln["kind"] == "region")
    code, out = run("report", "chargeback", "--clickhouse", url, "--period", "2026-11")
    assert code == 0 and "total partner callpro" in out


@pytest.mark.parametrize("args,msg", [
    (["report", "kpi"], "exactly one of"),
    (["report", "kpi", "--clickhouse", "clickhouse://127.0.0.1:9/x", "--data-dir", "/tmp"], "exactly one of"),
    (["report", "kpi", "--clickhouse", "clickhouse://127.0.0.1:9/x", "--by", "weather"], "cannot group by"),
    (["report", "chargeback", "--clickhouse", "clickhouse://127.0.0.1:9/x"], "--period"),
    (["report", "chargeback", "--clickhouse", "clickhouse://127.0.0.1:9/x", "--period", "2026-13"], "YYYY-MM"),
    (["report", "chargeback", "--clickhouse", "clickhouse://127.0.0.1:9/x", "--period", "2026-11", "--csv", "--json"], "one of"),
])
def test_bad_arguments(args, msg):
    code, out = run(*args)
    assert code == 2 and msg in out


def test_data_dir_without_history(tmp_path):
    code, out = run("report", "kpi", "--data-dir", str(tmp_path))
    assert code == 2 and "no history in" in out and not (tmp_path / "history").exists()


def test_clickhouse_option_refuses_a_path_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = run("history", "migrate", "--clickhouse", "x")
    assert code == 2 and "wants a URL" in out
    assert list(tmp_path.iterdir()) == []  # no embedded store opened at ./x


def test_unreachable_server_exits_1():
    code, out = run("report", "kpi", "--clickhouse", "clickhouse://127.0.0.1:9/x")
    assert code == 1 and "error:" in out


def test_parsers():
    assert parse_interval("15m") == 900 and parse_interval("1h") == 3600 and parse_interval("900") == 900
    assert parse_time("2026-11-01") == 1_793_491_200 and parse_time("1793491200") == 1_793_491_200
    assert parse_time("2026-11-01T01:00:00+01:00") == 1_793_491_200


def test_reports_on_chdb_data_dir(tmp_path):
    tandem = [sys.executable, "-m", "router.cli"]
    d = str(tmp_path / "node")
    r = subprocess.run([*tandem, "history", "synth", "--data-dir", d, "--calls", "2000", "--days", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*tandem, "report", "kpi", "--data-dir", d, "--by", "site", "--interval", "15m", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert sum(row["offered"] for row in doc["rows"]) == 2000
    assert (tmp_path / "node" / "history").is_dir()
