"""``tandem capacity forecast``: the staffing table (router.capacity.plan, pure), the query
that feeds it (router.capacity.history, on clickhouse-server 18.16 and chdb) and the
command, on a multi-week ``tandem history synth`` history.

That history spreads its calls evenly over the days (no daily or weekly seasonality;
queues differ in volume: each callpro queue gets 1/6 of the calls, the others 1/9), so the
forecast of a day should be about the history's average day."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest
from history_fixtures import unique_database
from typer.testing import CliRunner

from router.capacity import plan as pl
from router.capacity.history import arrival_rows
from router.cli import app
from router.history import synth
from router.history.schema import TABLES

DAY = 86_400
START = 1_793_577_600  # 2026-11-02 00:00 UTC, a Monday
DAYS = 14
CALLS = 6000
runner = CliRunner()


def run(*args):
    r = runner.invoke(app, list(args), env={"NO_COLOR": "1", "COLUMNS": "200"})
    return r.exit_code, r.output


def insert(store, table, rows):
    names = [c.name for c in TABLES[table]]
    store.insert(table, names, [[r[n] for r in rows] for n in names])


# --- pure: patience, one day's staffing, the plan ------------------------------------------------


def test_patience_is_the_censored_exponential_mle():
    rows = [{"outcome": "completed", "wait_s": 10.0}, {"outcome": "abandoned", "wait_s": 50.0},
            {"outcome": "completed", "wait_s": 40.0}, {"outcome": "abandoned", "wait_s": 20.0}]
    assert pl.estimate_patience(rows) == pytest.approx(120.0 / 2)
    assert pl.estimate_patience([{"outcome": "completed", "wait_s": 30.0}]) is None
    assert pl.estimate_patience([]) is None


def test_staff_day_more_calls_more_agents():
    calls = [0.0, 2.0, 10.0, 40.0, 10.0]
    out = pl.staff_day(calls, [300.0] * 5, START, 900, 20, 0.8, patience_s=120, shrinkage=0.25)
    assert [i.start - START for i in out] == [0, 900, 1800, 2700, 3600]
    assert (out[0].agents, out[0].scheduled, out[0].service_level) == (0, 0, None)
    agents = [i.agents for i in out]
    assert agents[1] < agents[2] < agents[3] and agents[2] == agents[4]
    for i in out[1:]:
        assert i.scheduled >= i.agents > 0 and i.service_level >= 0.8
        assert i.scheduled == -(-i.agents * 4 // 3)  # ceil(agents / 0.75)
    # A queue that never completed a call has no handle time: no staffing, but its calls count.
    odd = pl.staff_day([3.0], [0.0], START, 900, 20, 0.8)
    assert (odd[0].calls, odd[0].agents, odd[0].aht_s) == (3.0, None, None)


def _rows(n=CALLS, days=DAYS, seed=2):
    return [r for r in synth.interactions(n, seed=seed, start=START, span_s=days * DAY)
            if r["queue"] and r["outcome"] != "rejected"]


def test_plan_of_the_day_after_the_history():
    rows = _rows()
    p = pl.build_plan(rows, sl_threshold_s=20, sl_goal=0.8, max_occupancy=0.9, shrinkage=0.3)
    assert p.day == START + DAYS * DAY and p.method == "decomposition" and p.history_days == DAYS
    assert len(p.queues) == 8 and {(q.site, q.queue) for q in p.queues} == {
        (s, q[0]) for s, _, _, qs in synth.SITES for q in qs}
    assert sum(q.calls for q in p.queues) == pytest.approx(len(rows) / DAYS, rel=0.3)
    for q in p.queues:
        mine = [r for r in rows if (r["site"], r["queue"]) == (q.site, q.queue)]
        assert len(q.intervals) == 96
        # ~40 calls a day each: Poisson noise and a two-week trend fit stray up to ~40%.
        assert q.calls == pytest.approx(len(mine) / DAYS, rel=0.5)
        assert q.patience_s == pytest.approx(pl.estimate_patience(mine))
        assert q.agent_hours == sum(i.agents for i in q.intervals) / 4
        assert q.scheduled_hours >= q.agent_hours / 0.7 - 1e-9
        for i in q.intervals:
            assert i.agents >= 1 and i.scheduled >= i.agents and i.service_level >= 0.8


def test_short_history_falls_back_to_the_mean_profile_and_days_inside_are_backtests():
    rows = _rows(1500, 3)
    p = pl.build_plan(rows, method="seasonal_naive")
    assert p.method == pl.MEAN_PROFILE and p.history_days == 3
    q = p.queues[0]
    mine = [r for r in rows if (r["site"], r["queue"]) == (q.site, q.queue)]
    assert q.calls == pytest.approx(len(mine) / 3)
    # A day inside the history: learned from the days before it only.
    inside = pl.build_plan(rows, START + DAY + 5000)
    assert inside.day == START + DAY and inside.history_days == 1
    later = pl.build_plan(_rows(), START + (DAYS + 3) * DAY, method="weekday_average")
    assert later.method == "weekday_average" and later.day == START + (DAYS + 3) * DAY
    with pytest.raises(ValueError, match="no history before"):
        pl.build_plan(rows, START)
    with pytest.raises(ValueError, match="unknown method"):
        pl.build_plan(rows, method="crystal_ball")
    with pytest.raises(ValueError, match="no calls"):
        pl.build_plan([])


# --- the query, on 18.16 (chdb: test_forecast_on_a_chdb_data_dir, in a child process) -------------
# The session's embedded chdb store is not used here: chdb holds one path per process, and
# tests that run later open other paths in-process (tests/test_edges.py).


def test_arrival_rows_read_each_call_once(server_store):
    history_store = server_store
    rows = synth.interactions(300, seed=5, start=START, span_s=2 * DAY)
    insert(history_store, "interactions", rows)
    # A replayed copy and a correction (higher ver: abandoned after all) change nothing
    # but that call's outcome.
    fixed = dict(rows[0], ver=rows[0]["ver"] + 1, outcome="abandoned", handle_s=0.0, wait_s=99.0)
    insert(history_store, "interactions", rows[:50] + [fixed])
    got = arrival_rows(history_store)
    want = [r for r in [fixed] + rows[1:] if r["queue"] and r["outcome"] != "rejected"]
    assert len(got) == len(want)
    assert [g["offered_at"] for g in got] == sorted(g["offered_at"] for g in got)
    first = [g for g in got if g["offered_at"] == rows[0]["offered_at"] and g["wait_s"] == 99.0]
    assert len(first) == 1 and first[0]["outcome"] == "abandoned"
    assert set(got[0]) == {"site", "origin_site", "queue", "offered_at", "outcome", "handle_s", "wait_s"}
    lyon = arrival_rows(history_store, site="lyon", queue="support-chat")
    assert lyon and all((g["site"], g["queue"]) == ("lyon", "support-chat") for g in lyon)
    assert len(lyon) == sum((r["site"], r["queue"]) == ("lyon", "support-chat") for r in want)
    assert len(arrival_rows(history_store, start=START, end=START + DAY)) == sum(
        r["offered_at"] < START + DAY for r in want)


# --- the command -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_url(clickhouse_server):
    from router.history.store import open_store

    url = clickhouse_server.store_url(unique_database("capacity"))
    code, out = run("history", "synth", "--clickhouse", url, "--calls", str(CALLS), "--from", "2026-11-02",
                    "--days", str(DAYS))
    assert code == 0, out
    yield url
    s = open_store(url)
    s.query("DROP DATABASE IF EXISTS {db}")
    s.close()


def test_forecast_json_csv_and_table(server_url):
    code, out = run("capacity", "forecast", "--clickhouse", server_url, "--sl", "30:0.9", "--shrinkage", "0.3",
                    "-o", "json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["day"] == "2026-11-16" and doc["method"] == "decomposition"
    assert len(doc["queues"]) == 8
    per_day = CALLS * 0.95 / DAYS  # rejected calls never queue
    assert sum(q["calls"] for q in doc["queues"]) == pytest.approx(per_day, rel=0.3)
    for q in doc["queues"]:
        assert set(q) == {"site", "queue", "patience_s", "intervals", "calls", "agent_hours", "scheduled_hours"}
        assert 60 < q["patience_s"] < 400  # synth: waits ~Exp(25 s), 15% abandon
        assert len(q["intervals"]) == 96 and q["intervals"][0]["start"] == "2026-11-16T00:00:00Z"
        for i in q["intervals"]:
            assert set(i) == {"start", "calls", "aht_s", "agents", "scheduled", "service_level"}
            assert i["agents"] >= 1 and i["scheduled"] >= i["agents"] and i["service_level"] >= 0.9
        assert q["agent_hours"] == sum(i["agents"] for i in q["intervals"]) * 0.25
    busiest = max(doc["queues"], key=lambda q: q["calls"])
    quietest = min(doc["queues"], key=lambda q: q["calls"])
    assert busiest["site"] == "callpro" and busiest["agent_hours"] > quietest["agent_hours"]

    code, out = run("capacity", "forecast", "--clickhouse", server_url, "--site", "lyon", "--queue", "sales-voice",
                    "--day", "2026-11-09", "--method", "seasonal_naive", "--interval", "1h", "-o", "csv")
    assert code == 0, out
    lines = list(csv.DictReader(io.StringIO(out)))
    assert list(lines[0]) == ["site", "queue", "start", "calls", "aht_s", "agents", "scheduled", "service_level"]
    assert len(lines) == 24 and {(ln["site"], ln["queue"]) for ln in lines} == {("lyon", "sales-voice")}
    assert lines[1]["start"] == "2026-11-09T01:00:00Z"

    code, out = run("capacity", "forecast", "--clickhouse", server_url, "--queue", "support-chat",
                    "--day", "2026-11-05")
    assert code == 0, out
    assert "mean_profile (decomposition needs 7 days of history), from 3 day(s)" in out
    assert "lyon/support-chat" in out and "callpro/support-chat" in out and "agent-hours" in out

    code, out = run("capacity", "forecast", "--clickhouse", server_url, "--day", "2026-11-01")
    assert code == 2 and "no history before 2026-11-01" in out
    code, out = run("capacity", "forecast", "--clickhouse", server_url, "--site", "nowhere")
    assert code == 1 and "no calls in the history for site nowhere" in out


def test_forecast_on_a_chdb_data_dir(tmp_path):
    tandem = [sys.executable, "-m", "router.cli"]
    d = str(tmp_path / "node")
    r = subprocess.run([*tandem, "history", "synth", "--data-dir", d, "--calls", "2000", "--from", "2026-11-02",
                        "--days", "8"], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*tandem, "capacity", "forecast", "--data-dir", d, "--site", "montreal", "-o", "json"],
                       check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["day"] == "2026-11-10" and doc["history_days"] == 8
    assert {q["site"] for q in doc["queues"]} == {"montreal"} and len(doc["queues"]) == 3


@pytest.mark.parametrize("args,msg", [
    ([], "exactly one of"),
    (["--clickhouse", "clickhouse://127.0.0.1:9/x", "--sl", "20"], "T:GOAL"),
    (["--clickhouse", "clickhouse://127.0.0.1:9/x", "--sl", "20:1.5"], "GOAL"),
    (["--clickhouse", "clickhouse://127.0.0.1:9/x", "--method", "crystal_ball"], "--method"),
    (["--clickhouse", "clickhouse://127.0.0.1:9/x", "-o", "yaml"], "-o must be"),
    (["--clickhouse", "clickhouse://127.0.0.1:9/x", "--interval", "7m"], "--interval"),
    (["--clickhouse", "clickhouse://127.0.0.1:9/x", "--interval", "fortnight"], "15m"),
    (["--clickhouse", "clickhouse://127.0.0.1:9/x", "--max-occupancy", "1.2"], "--max-occupancy"),
    (["--clickhouse", "clickhouse://127.0.0.1:9/x", "--shrinkage", "1"], "--shrinkage"),
    (["--clickhouse", "clickhouse://127.0.0.1:9/x", "--day", "tomorrow"], "ISO date"),
    (["--clickhouse", "clickhouse://127.0.0.1:9/x", "--time-scale", "0"], "--time-scale"),
    (["--clickhouse", "clickhouse://127.0.0.1:9/x", "--time-scale", "60"], "compressed x60"),
])
def test_bad_options_exit_2(args, msg):
    code, out = run("capacity", "forecast", *args)
    assert code == 2 and msg in out, out


def test_a_compressed_demo_history_is_refused(tmp_path):
    (tmp_path / "time_scale").write_text("60\n")
    code, out = run("capacity", "forecast", "--data-dir", str(tmp_path))
    assert code == 2 and "compressed x60" in out and "real-time history" in out
    assert not (tmp_path / "history").exists()
