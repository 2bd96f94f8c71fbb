"""The cluster simulator against the live demo (issue 12, router.capacity.validate): the
demo's offered calls (``run_demo(calls_out=...)``), their conversion into arrivals, the
live figures and sampling errors, and one live demo replayed call for call — service
level per in-house site within sampling error."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from router.capacity.validate import (
    Z_LIMIT,
    LiveRun,
    ValidateError,
    binomial_se,
    combined,
    drain_s,
    figure,
    jittered,
    live_tallies,
    parse_calls,
    report_lines,
    resampled_arrivals,
    to_arrivals,
    validate,
    z_score,
)

REPO = Path(__file__).resolve().parent.parent
SCALE = 60.0
RING = 3.0


# --- a tiny run, written by hand (no demo) ------------------------------------------------------


def site_doc(name: str, agents: int, *, wrap: float, threshold: float, abandons: str = "count_against",
             kind: str = "inhouse") -> dict:
    """A scaled site file (as the demo writes into the header): durations / SCALE."""
    return {
        "site": {"name": name, "region": "emea", "kind": kind},
        "routing": {"offer_timeout_s": 1.0},
        "queues": [{"name": "billing-en-voice", "skill": "billing", "channel": "voice", "language": "en",
                    "wrap_up_s": wrap / SCALE, "aht_s": 240 / SCALE,
                    "service_level": {"threshold_s": threshold / SCALE, "abandons": abandons}}],
        "agents": [{"id": f"{name}-a", "count": agents, "skills": {"billing": 5}, "languages": ["en"]}],
    }  # fmt: skip


def header(**over) -> dict:
    h = {
        "kind": "run", "format": 1, "run_id": "r1", "seed": 1, "time_scale": SCALE,
        "arrivals_end_s": 600.0, "drain_end_s": 900.0, "behaviour": {"ring_s": RING},
        "policy": {"version": 1, "default": {"wait_threshold": {"factor": 0.5}}},
        "sites": {"a": site_doc("a", 2, wrap=15, threshold=20), "b": site_doc("b", 2, wrap=30, threshold=20)},
        "partners_api": [], "rejects": 0, "no_answers": 0,
    }  # fmt: skip
    h.update(over)
    return h


def call(cid: str, **over) -> dict:
    c = {
        "kind": "call", "call_id": cid, "site": "a", "queue": "billing-en-voice", "stream": "billing-en-voice",
        "skill": "billing", "channel": "voice", "language": "en", "caller": "+331", "offered_s": 60.0,
        "talk_s": 120.0, "patience_s": 90.0, "outcome": "completed", "end_of_run": False, "wait_s": 13.0,
        "answered_site": "a", "answered_queue": "billing-en-voice", "agent_id": "a-a-001", "transfers": 0,
        "offers": 1, "talked_s": None, "ended_site": "a", "priority_class": "standard",
    }  # fmt: skip
    c.update(over)
    return c


def text(*lines: dict) -> str:
    return "\n".join(json.dumps(x) for x in lines) + "\n"


def small_run() -> LiveRun:
    return parse_calls(text(
        header(),
        call("c1", talked_s=120.6),  # answered at a after 13 s (10 s to the offer + 3 s ring): within 20 s
        call("c2", offered_s=120.0, wait_s=22.0),  # 19 s to the offer: within, aligned; 22 s: not, as reported
        call("c3", offered_s=180.0, outcome="abandoned", wait_s=50.0, answered_site="", answered_queue="",
             agent_id="", patience_s=50.0, transfers=1),  # a transfer aborted: it stayed at a
        # answered at b (b's wrap-up)
        call("c4", offered_s=240.0, answered_site="b", ended_site="b", transfers=1, wait_s=5.0),
        call("c5", offered_s=300.0, patience_s=2.0, outcome="abandoned", wait_s=2.0, answered_site="",
             answered_queue="", agent_id=""),  # gone before the ring
        call("c6", offered_s=590.0, patience_s=None, outcome="abandoned", end_of_run=True, wait_s=310.0,
             answered_site="", answered_queue="", agent_id=""),  # still waiting at the end
        call("c7", offered_s=595.0, outcome="offer_failed", wait_s=None, answered_site="", answered_queue=""),
        call("c8", site="b", offered_s=100.0, wait_s=3.5, answered_site="b", ended_site="b"),
    ))


def test_parse_calls_reads_the_header_and_every_call():
    run = small_run()
    assert run.time_scale == SCALE and run.ring_s == RING and run.drain_end_s == 900.0
    assert [c.call_id for c in run.calls] == [f"c{i}" for i in range(1, 9)]
    assert run.calls[5].patience_s is None and run.calls[5].end_of_run
    assert {s.site.name for s in run.site_configs()} == {"a", "b"}


@pytest.mark.parametrize("lines, words", [
    ([call("c1")], "no run header"),
    ([header(), header()], "second run header"),
    ([header(format=2)], "format 2"),
    ([header(), {"kind": "what"}], "kind must be"),
    ([header(), call("c1", outcome="lost")], "outcome must be one of"),
    ([header(), call("c1", offered_s=-1)], "offered_s and talk_s"),
    ([header(), call("c1", site="nowhere")], "nowhere"),
    ([header(), {k: v for k, v in call("c1").items() if k != "talk_s"}], "bad call line"),
    ([header(time_scale=0)], "time_scale must be > 0"),
])  # fmt: skip
def test_parse_calls_refuses_bad_files(lines, words):
    with pytest.raises(ValidateError, match=words):
        parse_calls(text(*lines), "calls.jsonl")
    with pytest.raises(ValidateError, match="not JSON"):
        parse_calls("{\n", "calls.jsonl")


def test_calls_become_arrivals_in_the_nodes_units():
    """Times / scale; handle = ring + talk + the answering queue's wrap-up; patience −
    ring; no call whose caller left before any agent could ring through, no failed offer."""
    run = small_run()
    arr = {a.call_id: a for a in to_arrivals(run)}
    assert set(arr) == {"c1", "c2", "c3", "c4", "c6", "c8"}
    a1 = arr["c1"]
    assert a1.at == pytest.approx(60.0 / SCALE) and a1.site == "a" and a1.caller == "+331"
    assert a1.handle_s == pytest.approx((RING + 120.0) / SCALE + 15.0 / SCALE)
    assert a1.patience_s == pytest.approx((90.0 - RING) / SCALE)
    assert arr["c4"].handle_s == pytest.approx((RING + 120.0 + 30.0) / SCALE)  # b's wrap-up: answered there
    assert arr["c3"].handle_s == pytest.approx((RING + 120.0 + 15.0) / SCALE)  # unanswered: the origin's
    assert math.isinf(arr["c6"].patience_s)
    assert [a.call_id for a in to_arrivals(run)] == ["c1", "c8", "c2", "c3", "c4", "c6"]  # arrival order
    # the replay stops at the demo's drain end: 900 s − the last arrival (590 s), scaled
    assert drain_s(run) == pytest.approx((900.0 - 590.0) / SCALE)


def test_live_figures_reported_and_aligned():
    run = small_run()
    rep = live_tallies(run, aligned=False)["a"]
    # as the demo reports: waits to the answer, every abandon counts (count_against)
    assert (rep.offered, rep.answered, rep.abandoned, rep.unfinished) == (6, 3, 3, 0)
    assert (rep.sl_num, rep.sl_den) == (2, 6)  # c1, c4 within 20 s; c2 at 22 s is not
    al = live_tallies(run, aligned=True)["a"]
    # aligned: waits to the offer (− ring), c5 gone before the ring, c6 unfinished
    assert (al.offered, al.answered, al.abandoned, al.unfinished) == (5, 3, 1, 1)
    assert (al.sl_num, al.sl_den) == (3, 4)
    assert al.overflow_out == 1  # c4 was answered at b
    assert al.wait_sum_s == pytest.approx((10.0 + 19.0 + 2.0) / SCALE)
    b = live_tallies(run)["b"]
    assert (b.offered, b.sl_num, b.sl_den) == (1, 1, 1)


def test_sampling_errors():
    assert binomial_se(0, 0) is None
    assert binomial_se(80, 100) == pytest.approx(math.sqrt(0.797 * 0.203 / 100), rel=1e-2)
    assert binomial_se(100, 100) > 0  # a perfect score still has an error
    assert combined(0.03, 0.04) == pytest.approx(0.05)
    assert combined(0.03, None) is None
    assert z_score(0.9, 0.8, 0.05) == pytest.approx(2.0)
    assert z_score(0.9, None, 0.05) is None and z_score(0.9, 0.8, 0.0) is None
    f = figure((90, 100), (85, 100), [0.85, 0.87, 0.86], [0.8, 0.9])
    assert f.live == 0.9 and f.sim_exact == 0.85 and f.sim == pytest.approx(0.86)
    assert f.z == pytest.approx((0.9 - 0.86) / combined(binomial_se(90, 100), binomial_se(85, 100)))
    assert f.sd_same == pytest.approx(0.01)
    assert f.z_same == pytest.approx(0.04 / (0.01 * math.sqrt(1 + 1 / 3)))
    assert f.z_rep == pytest.approx(0.04 / (math.sqrt(0.005) * math.sqrt(2)))


def test_jitter_and_resampling_are_seeded():
    run = small_run()
    arr = to_arrivals(run)
    j1, j2 = jittered(arr, 0.01, 5), jittered(arr, 0.01, 5)
    assert j1 == j2 and j1 != jittered(arr, 0.01, 6)
    orig = {a.call_id: a.at for a in arr}
    assert all(abs(a.at - orig[a.call_id]) <= 0.01 + 1e-12 and a.at >= 0 for a in j1)
    assert all(a.handle_s == next(b for b in arr if b.call_id == a.call_id).handle_s for a in j1)
    r1 = resampled_arrivals(run, 3)
    assert r1 == resampled_arrivals(run, 3)
    assert all(0 <= a.at < 600.0 / SCALE for a in r1) and {a.site for a in r1} <= {"a", "b"}
    # the live rate: 5 replayable calls of site a's stream in 600 s; on average 5 per sample
    n = [sum(a.site == "a" for a in resampled_arrivals(run, s)) for s in range(200)]
    assert 4.0 < sum(n) / len(n) < 6.0


def test_validate_a_small_run_without_a_demo():
    v = validate(small_run(), jitters=3, replications=3)
    assert set(v.sites) == {"a", "b"} and v.calls == 6
    a = v.sites["a"]
    assert a.live["offered"] == a.sim["offered"] == 5
    assert a.sl.n_live == 4 and a.sl.live == pytest.approx(0.75)
    assert a.sl_reported == pytest.approx(2 / 6)
    assert a.notes == {"gone_before_ring": 1, "reoffered": 0, "reoffered_missed": 0, "talk_overshoot_s": 0.6,
                       "answer_delay_s": None}
    assert v.sites["b"].notes["answer_delay_s"] == pytest.approx(0.5)  # c8: 3.5 s, 3 of them ringing
    d = v.to_dict()
    assert d["sites"]["a"]["sl"]["n_live"] == 4 and d["jitters"] == 3
    assert any("calls replayed" in line for line in report_lines(v))
    assert validate(small_run(), jitters=3, replications=3).to_dict() == d  # deterministic


def test_validate_refuses_partner_api_calls():
    run = parse_calls(text(header(partners_api=["blueline"]), call("c1", answered_site="partner:blueline",
                                                                   answered_queue="", transfers=1)))
    with pytest.raises(ValidateError, match="partner API"):
        validate(run, jitters=0, replications=0)


def test_call_lines_follow_the_owning_copy():
    """router.sim.report.call_lines: the offered call, its draws and the nodes' outcome
    (an overflowed call answered at the other site, with the wait from its origin)."""
    from router.sim.ledger import CallRecord
    from router.sim.report import call_lines
    from router.v1 import types_pb2 as t

    def rec(cid, **kw):
        r = CallRecord(call_id=cid, site="a", stream="q", caller="+1", talk_s=100.0, patience_s=50.0,
                       wake=None, offered_at=1000.5, acked_at=1000.6, assignments=1)  # type: ignore[arg-type]
        for k, v in kw.items():
            setattr(r, k, v)
        return r

    records = [rec("r-1"), rec("r-2", offered_at=1001.0, patience_s=None), rec("r-3", acked_at=0.0,
                                                                                outcome="offer_failed")]
    nodes = {
        "a": [t.Call(call_id="r-1", state=t.CALL_STATE_TRANSFERRED, site="a", queue="q", transfer_count=1,
                     offered_at=1000.5, queued_at=1000.5, channel=t.CHANNEL_VOICE, skill="billing"),
              t.Call(call_id="r-2", state=t.CALL_STATE_ABANDONED, site="a", queue="q", offered_at=1001.0,
                     queued_at=1001.0, ended_at=1003.0, abandon_reason="end_of_run", channel=t.CHANNEL_CHAT,
                     skill="support")],
        "b": [t.Call(call_id="r-1", state=t.CALL_STATE_COMPLETED, site="b", queue="qb", transfer_count=1,
                     offered_at=1000.7, queued_at=1000.7, answered_at=1000.9, ended_at=1002.0, agent_id="b-1",
                     channel=t.CHANNEL_VOICE, skill="billing", language="en")],
    }  # fmt: skip
    lines = {x["call_id"]: x for x in call_lines(records, nodes, 60.0, 1000.0)}
    one = lines["r-1"]
    assert one["offered_s"] == pytest.approx(30.0) and one["talk_s"] == 100.0 and one["patience_s"] == 50.0
    assert (one["outcome"], one["answered_site"], one["answered_queue"], one["queue"]) == ("completed", "b", "qb", "q")
    assert one["wait_s"] == pytest.approx(0.4 * 60.0) and one["transfers"] == 1 and one["channel"] == "voice"
    assert one["ended_site"] == "b" and one["talked_s"] == pytest.approx(1.1 * 60.0)
    two = lines["r-2"]
    assert (two["outcome"], two["end_of_run"], two["patience_s"], two["channel"]) == ("abandoned", True, None, "chat")
    assert two["wait_s"] == pytest.approx(120.0)
    assert lines["r-3"]["outcome"] == "offer_failed" and lines["r-3"]["wait_s"] is None


# --- one live demo, replayed call for call ------------------------------------------------------

DEMO_S = 30.0  # real seconds of arrivals: 30 simulated minutes at x60, about 480 calls
DEMO_SEED = 3


@pytest.fixture(scope="module")
def live_demo(tmp_path_factory):
    """One cluster run of ``tandem demo`` (no reference runs, no partner on the partner
    API: the simulator does not model one), its JSON summary and its call file."""
    d = tmp_path_factory.mktemp("validate")
    calls = d / "calls.jsonl"
    code = ("import sys; from pathlib import Path; from router.sim.demo import run_demo; "
            f"sys.exit(run_demo(Path({str(REPO / 'sites')!r}), {DEMO_S}, data_dir=Path({str(d / 'data')!r}), "
            f"json_out=True, seed={DEMO_SEED}, reference=False, calls_out=Path({str(calls)!r})))")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.monotonic() - t0
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    print(f"\nlive demo: {DEMO_S:g} s of traffic x60, seed {DEMO_SEED}, {wall:.1f} s wall")
    return json.loads(proc.stdout.strip().splitlines()[-1]), calls.read_text()


@pytest.mark.slow
def test_call_file_holds_what_the_demo_reported(live_demo):
    """The call file's lines give back the demo's own KPIs (the nodes' records, read the
    demo's way): offered, answered, abandoned and the service level of every site."""
    summary, raw = live_demo
    run = parse_calls(raw, "calls.jsonl")
    assert summary["lost"] == 0 and summary["duplicates"] == 0
    assert len(run.calls) == summary["offered"] + sum(c.outcome == "offer_failed" for c in run.calls)
    assert run.partners_api == () and run.time_scale == SCALE and run.ring_s == RING
    reported = live_tallies(run, aligned=False)
    for name, s in summary["sites"].items():
        t = reported[name]
        assert (t.offered, t.answered, t.abandoned, t.rejected) == (
            s["offered"], s["answered"], s["abandoned"], s["rejected"]), name
        assert t.service_level == pytest.approx(s["service_level"], abs=6e-5), name


@pytest.mark.slow
def test_simulator_matches_the_live_demo(live_demo):
    """The same calls through the simulator (real engine, real overflow policy, the
    scaled site files the nodes ran): service level per in-house site within sampling
    error (|z| <= 3, binomial errors of both sides combined)."""
    _, raw = live_demo
    run = parse_calls(raw, "calls.jsonl")
    t0 = time.perf_counter()
    v = validate(run)
    took = time.perf_counter() - t0
    print("\n" + "\n".join(report_lines(v)))
    print(f"validation: {1 + v.jitters + v.replications} replays in {took:.1f} s")
    print(json.dumps(v.to_dict(), sort_keys=True))
    for name in ("lyon", "montreal"):
        c = v.sites[name]
        assert c.kind == "inhouse"
        assert c.sl.n_live >= 100 and c.sl.n_sim >= 100, (name, c.sl)  # a meaningful sample
        assert c.live["offered"] == c.sim["offered"], name  # the very same calls on both sides
        assert c.sl.z is not None and abs(c.sl.z) <= Z_LIMIT, (name, c.to_dict())
    assert v.ok
    assert v.replay.sites["montreal"].overflow_out > 0  # the overloaded site overflows in the replay too


def test_cli_capacity_validate(tmp_path):
    """``tandem capacity validate --calls FILE``: the table, or one JSON object; exit 2
    for a file it cannot read or replay."""
    from typer.testing import CliRunner

    from router.capacity.validate_cli import register
    from router.cli import app

    register(app)
    register(app)  # idempotent
    f = tmp_path / "calls.jsonl"
    f.write_text(text(header(), call("c1"), call("c2", offered_s=120.0, wait_s=22.0),
                      call("c8", site="b", offered_s=100.0, wait_s=3.5, answered_site="b")))
    runner = CliRunner()
    r = runner.invoke(app, ["capacity", "validate", "--calls", str(f), "--jitters", "1", "--replications", "1"])
    assert r.exit_code in (0, 1), r.output
    assert "calls replayed" in r.output and "site" in r.output
    r = runner.invoke(app, ["capacity", "validate", "--calls", str(f), "--jitters", "0", "--replications", "0",
                            "--json"])
    doc = json.loads(r.output)
    assert set(doc["sites"]) == {"a", "b"} and doc["calls"] == 3 and doc["ok"] == (r.exit_code == 0)
    f.write_text(text(call("c1")))
    r = runner.invoke(app, ["capacity", "validate", "--calls", str(f)])
    assert r.exit_code == 2 and "no run header" in r.output
    r = runner.invoke(app, ["capacity", "validate", "--calls", str(tmp_path / "missing.jsonl")])
    assert r.exit_code == 2 and "cannot read" in r.output
