"""BPO partner events: the row builder, the table and its migration, the statement (every
figure worked out by hand below) on clickhouse-server 18.16 and chdb, the reconciliation
with a partner's own records, and ``tandem report partner``."""

from __future__ import annotations

import calendar
import contextlib
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from history_fixtures import unique_database
from router.cli import app
from router.history import schema
from router.history.encode import TableEncoder
from router.history.partner import (
    EVENTS,
    PartnerRecordsError,
    load_partner_records,
    partner_event_row,
    partner_statement,
)

NOV = calendar.timegm((2026, 11, 1, 0, 0, 0))
DEC = calendar.timegm((2026, 12, 1, 0, 0, 0))
T = calendar.timegm((2026, 11, 2, 8, 0, 0)) + 0.25  # most events: 2026-11-02 08:00
OCT = calendar.timegm((2026, 10, 20, 9, 0, 0))

# The contracts in force: callpro has an SLA (20 s, 80 %, 1.50 per point), voxa none.
CALLPRO = dict(sla_threshold_s=20.0, sla_target=0.8, sla_credit_per_point=1.5,
               price_per_contact=2.5, price_per_minute=0.4, currency="EUR")
VOXA = dict(price_per_contact=3.0, price_per_minute=0.0, currency="USD")


def ev(partner, call_id, offer_no, event, at, **kw):
    terms = CALLPRO if partner == "callpro" else VOXA
    extra = dict(terms, origin_site="lyon", origin_region="emea", queue="billing", skill="billing",
                 channel="voice", value_tier="low") if event in ("assigned", "outcome") else {}
    return partner_event_row(partner=partner, call_id=call_id, offer_no=offer_no, event=event, at=at,
                             **{**extra, **kw})


def call(partner, call_id, t, *, answer_after=None, talk=0.0, wrap=0.0, offer_no=1, outcome=True):
    """offered at t, assigned at t+1, answered answer_after s after the assignment (None:
    never), outcome reported at t+600."""
    rows = [ev(partner, call_id, offer_no, "offered", t, wait_s=42.0),
            ev(partner, call_id, offer_no, "accepted", t + 0.5, agent="a1"),
            ev(partner, call_id, offer_no, "assigned", t + 1, agent="a1")]
    if outcome:
        answered = 0.0 if answer_after is None else t + 1 + answer_after
        rows.append(ev(partner, call_id, offer_no, "outcome", t + 600, answered_at=answered, talk_s=talk,
                       wrap_s=wrap, disposition="done", resolved=True, csat=4))
    return rows


def events() -> list[dict]:
    rows = []
    # callpro ---------------------------------------------------------------------------
    rows += call("callpro", "c1", T, answer_after=8, talk=300, wrap=60)  # in SL
    rows += call("callpro", "c2", T + 10, answer_after=30, talk=120, wrap=30)  # out of SL
    rows += [ev("callpro", "c3", 1, "offered", T + 20), ev("callpro", "c3", 1, "declined", T + 21, reason="busy"),
             ev("callpro", "c3", 2, "offered", T + 40), ev("callpro", "c3", 2, "timeout", T + 48)]
    rows += call("callpro", "c3", T + 60, offer_no=3, outcome=False)
    rows.append(ev("callpro", "c3", 3, "handed_back", T + 90, reason="needs spanish"))
    rows += [ev("callpro", "c4", 1, "offered", T + 30), ev("callpro", "c4", 1, "gateway_lost", T + 31),
             ev("callpro", "c4", 2, "offered", T + 50), ev("callpro", "c4", 2, "withdrawn", T + 58),
             ev("callpro", "c4", 2, "accepted", T + 59, agent="late")]
    rows += call("callpro", "c5", T + 70)  # the caller hung up at the partner
    rows += call("callpro", "c6", T + 80, outcome=False)  # assigned, never reported
    rows.append(ev("callpro", "c7", 1, "outcome", T + 700, answered_at=T + 100, talk_s=60.0))  # no assignment
    c8 = call("callpro", "c8", T + 110, answer_after=5, talk=240, wrap=60)
    rows += c8 + c8  # a node's replay: the same rows again
    rows += call("callpro", "c9", OCT, answer_after=3, talk=500, wrap=0)  # October: not in the period
    # Assigned in October, answered 15 s later in November: counts, with its assignment.
    rows += [ev("callpro", "c10", 1, "offered", NOV - 11), ev("callpro", "c10", 1, "assigned", NOV - 10),
             ev("callpro", "c10", 1, "outcome", NOV + 300, answered_at=NOV + 5.0, talk_s=200.0, wrap_s=40.0)]
    # voxa ------------------------------------------------------------------------------
    rows += call("voxa", "v1", T, answer_after=2, talk=180)
    rows += [ev("voxa", "v2", 1, "offered", T + 5), ev("voxa", "v2", 1, "declined", T + 6, reason="closed")]
    v3 = call("voxa", "v3", T + 10, talk=60)
    v3[-1]["answered_at"] = T + 11 - 5.0  # answered 5 s before it was assigned
    rows += v3
    rows += call("voxa", "v4", T + 20, answer_after=4, talk=90, wrap=30)
    rows.append(ev("voxa", "v4", 1, "handed_back", T + 900))  # after its outcome
    return rows


def insert(store, rows):
    data, rejected = TableEncoder("partner_events").encode(rows)  # what the writer does
    assert rejected == []
    store.insert("partner_events", [c.name for c in schema.PARTNER_EVENTS], data)


# By hand. callpro: offered c1 c2 c3×3 c4×2 c5 c6 c8 = 10; assigned c1 c2 c3/3 c5 c6 c8 = 6;
# declined c3/1 c3/2 c4/1 c4/2 = 4; handled c1 c2 c7 c8 c10 = 5, minutes (360 + 150 + 60 +
# 300 + 240) / 60 = 18.5; SL of c1 c2 c8 c10 (c7 has no assignment) = 3/4; credits
# (80 - 75) × 1.50 = 7.50; amount 5 × 2.50 + 18.5 × 0.40 - 7.50 = 12.40.
CALLPRO_WANT = {
    "partner": "callpro", "offered": 10, "accepted": 6, "declined": 4,
    "declined_by_reason": {"declined": 1, "timeout": 1, "gateway_lost": 1, "withdrawn": 1},
    "handled": 5, "abandoned_at_partner": 1, "handed_back": 1, "handled_minutes": 18.5,
    "sl": 0.75, "sl_target": 0.8, "sla_threshold_s": 20.0, "credits": 7.5, "amount": 12.4,
    "currency": "EUR", "price_per_contact": 2.5, "price_per_minute": 0.4,
    "reconciled": 6,  # c1 c2 c3 c5 c8 c10 of c1..c8, c10
    "mismatches": [{"call_id": "c6", "problem": "assigned, no outcome reported"},
                   {"call_id": "c7", "problem": "outcome without assignment"}],
}
# voxa: offered v1..v4, assigned v1 v3 v4, declined v2, handled v1 v3 v4 (180 + 60 + 120 s
# = 6 min), no SLA; amount 3 × 3.00 = 9.00.
VOXA_WANT = {
    "partner": "voxa", "offered": 4, "accepted": 3, "declined": 1,
    "declined_by_reason": {"declined": 1, "timeout": 0, "gateway_lost": 0, "withdrawn": 0},
    "handled": 3, "abandoned_at_partner": 0, "handed_back": 1, "handled_minutes": 6.0,
    "sl": None, "sl_target": 0.0, "sla_threshold_s": 0.0, "credits": 0.0, "amount": 9.0,
    "currency": "USD", "price_per_contact": 3.0, "price_per_minute": 0.0,
    "reconciled": 1,
    "mismatches": [{"call_id": "v3", "problem": "answered before assignment"},
                   {"call_id": "v4", "problem": "handed back after an outcome"}],
}

RECORDS_CSV = """call_id,answered_at,talk_s,wrap_s,disposition
c1,{t1},300,60,done
c2,,125,30,done
c5,0,0,0,hung up
c7,,60.4,0,done
c8,,240.5,60,done
c9,,500,0,done
c99,,75,10,done
"""


def records_file(tmp_path, partner_column=False):
    text = RECORDS_CSV.format(t1=T + 9)
    if partner_column:
        lines = text.splitlines()
        text = "\n".join([lines[0] + ",partner"] + [ln + ",callpro" for ln in lines[1:]]) + "\n"
    p = tmp_path / "callpro.csv"
    p.write_text(text)
    return p


# --- rows ------------------------------------------------------------------------------------


def test_row_builder_fills_and_checks():
    r = partner_event_row(partner="callpro", call_id="c1", offer_no=2, event="outcome", at=1_793_500_000.987,
                          answered_at=1_793_499_990.5, talk_s=61, resolved=True, csat=5)
    assert list(r) == [c.name for c in schema.PARTNER_EVENTS]
    assert r["ver"] == 1_793_500_000_987 and r["at"] == 1_793_500_000 and r["at_s"] == 1_793_500_000.987
    assert r["talk_s"] == 61.0 and isinstance(r["talk_s"], float) and r["resolved"] == 1
    assert r["time_scale"] == 1.0 and r["currency"] == "" and r["wrap_s"] == 0.0
    assert set(EVENTS) == {"offered", "accepted", "declined", "timeout", "gateway_lost", "withdrawn",
                           "assigned", "outcome", "handed_back"}
    ok = dict(partner="p", call_id="c", offer_no=1, event="offered", at=1_793_500_000.0)
    for bad, match in [({"event": "rang"}, "unknown partner event"), ({"partner": ""}, "partner"),
                       ({"offer_no": -1}, "offer_no"), ({"at": float("nan")}, "Unix time"),
                       ({"colour": "red"}, "unknown column"), ({"ver": 3}, "derived"),
                       ({"csat": 300}, "csat"), ({"talk_s": -1.0}, "negative"), ({"talk_s": "long"}, "talk_s")]:
        with pytest.raises(ValueError, match=match):
            partner_event_row(**{**ok, **bad})


# --- table and migration ---------------------------------------------------------------------


@pytest.fixture(params=["server", "chdb"])
def fresh_store(request, chdb_path):
    """An empty store (no schema yet) on a database of its own, on each backend."""
    from router.history.store import ChdbStore, open_store

    if request.param == "server":
        store = open_store(request.getfixturevalue("clickhouse_server").store_url(unique_database("pmig")))
    else:
        store = ChdbStore(chdb_path, database=unique_database("pmig"))
    yield store
    with contextlib.suppress(Exception):
        store.query("DROP DATABASE IF EXISTS {db}")
    store.close()


def test_migration_applies_on_an_existing_store(fresh_store, monkeypatch):
    with monkeypatch.context() as m:  # a store of the schema before partner events
        m.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:2])
        assert fresh_store.migrate() == [1, 2]
    fresh_store.insert("audit", ["site", "id", "at"], [["lyon"], ["x1"], [NOV]])
    assert fresh_store.migrate() == [3]
    assert fresh_store.migrate() == []  # twice: nothing to do
    assert fresh_store.applied_versions() == [1, 2, 3]
    got = fresh_store.query("DESCRIBE TABLE {db}.partner_events")
    assert [(r[0], r[1]) for r in got] == [(c.name, c.type) for c in schema.PARTNER_EVENTS]
    assert fresh_store.query("SELECT count() FROM {db}.audit FINAL") == [(1,)]


# --- the statement ---------------------------------------------------------------------------


def test_statement_by_hand(history_store, tmp_path):
    insert(history_store, events())
    insert(history_store, events()[:15])  # replayed again: FINAL counts each event once
    (raw,), = history_store.query("SELECT count() FROM {db}.partner_events")
    assert raw > len(events())
    st = partner_statement(history_store, partner=None, start=NOV, end=DEC)
    doc = st.to_dict()
    assert doc["period"] == {"from": "2026-11-01T00:00:00Z", "to": "2026-12-01T00:00:00Z"}
    assert doc["partners"] == [CALLPRO_WANT, VOXA_WANT]
    json.dumps(doc)

    # One partner; and a period starting 2026-11-02 leaves out c10 (handled in SL, 4 min).
    only = partner_statement(history_store, partner="callpro", start=NOV + 86400, end=DEC).to_dict()
    (cp,) = only["partners"]
    assert (cp["handled"], cp["handled_minutes"], cp["sl"]) == (4, 14.5, round(2 / 3, 4))
    assert cp["credits"] == 20.0  # (80 - 66.67) × 1.50
    assert cp["amount"] == 0.0  # 4 × 2.50 + 14.5 × 0.40 - 20.00 is below 0
    # A partner without events is still listed when asked for.
    (none,) = partner_statement(history_store, partner="nobody", start=NOV, end=DEC).partners
    assert none.offered == 0 and none.sl is None and none.amount == 0 and none.mismatches == []
    # October: c9 alone, and c10's offer and assignment.
    (oct_,) = partner_statement(history_store, partner="callpro", start=OCT - 86400, end=NOV).to_dict()["partners"]
    assert (oct_["offered"], oct_["accepted"], oct_["handled"]) == (2, 2, 1)
    assert oct_["mismatches"] == [{"call_id": "c10", "problem": "assigned, no outcome reported"}]

    # Compressed time (x60): durations x60, every answer now later than 20 s.
    (cp60, _) = partner_statement(history_store, partner=None, start=NOV, end=DEC, time_scale=60).to_dict()["partners"]
    assert cp60["handled_minutes"] == 1110.0 and cp60["sl"] == 0.0 and cp60["credits"] == 120.0
    assert cp60["amount"] == round(5 * 2.5 + 1110 * 0.4 - 120.0, 2)

    # The partner's records: c2's talk differs, c10 is missing, c99 is unknown to us, c9 is
    # October's (not this period's, not a mismatch), c8 within 1 s.
    recs = load_partner_records(records_file(tmp_path))
    assert recs[0]["answered_at"] == T + 9 and recs[1]["answered_at"] == 0.0
    (cp,) = partner_statement(history_store, partner="callpro", start=NOV, end=DEC,
                              partner_records=recs).to_dict()["partners"]
    assert cp["mismatches"] == [
        {"call_id": "c10", "problem": "missing in partner records"},
        {"call_id": "c2", "problem": "talk differs (ours 120 s, theirs 125 s)"},
        {"call_id": "c6", "problem": "assigned, no outcome reported"},
        {"call_id": "c7", "problem": "outcome without assignment"},
        {"call_id": "c99", "problem": "not in our records"},
    ]
    assert cp["reconciled"] == 4  # c1 c3 c5 c8
    assert cp["amount"] == 12.4  # reconciliation changes no figure
    with pytest.raises(PartnerRecordsError, match="names no partner"):
        partner_statement(history_store, partner=None, start=NOV, end=DEC, partner_records=recs)


def test_partner_records_files(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"records": [{"call_id": "c1", "answered_at": "2026-11-02T08:00:09Z", "talk_s": 3}]}))
    (r,) = load_partner_records(p)
    assert r == {"call_id": "c1", "partner": "", "disposition": "", "answered_at": NOV + 86400 + 8 * 3600 + 9,
                 "talk_s": 3.0, "wrap_s": 0.0}
    for name, text, match in [("r.csv", "talk_s\n3\n", "header with call_id"),
                              ("r.csv", "call_id,talk_s\nc1,long\n", "line 2"),
                              ("r.json", "[1]", "must be an object"), ("r.json", "{", "not valid JSON")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(PartnerRecordsError, match=match):
            load_partner_records(tmp_path / name)
    with pytest.raises(PartnerRecordsError, match="cannot read"):
        load_partner_records(tmp_path / "missing.csv")


# --- tandem report partner ---------------------------------------------------------------------

runner = CliRunner()


def run(*args):
    r = runner.invoke(app, list(args))
    return r.exit_code, r.output


@pytest.fixture
def url(clickhouse_server):
    from router.history.store import open_store

    u = clickhouse_server.store_url(unique_database("pcli"))
    s = open_store(u)
    s.migrate()
    insert(s, events())
    yield u
    s.query("DROP DATABASE IF EXISTS {db}")
    s.close()


def test_report_partner_on_the_server(url, tmp_path):
    period = ["--from", "2026-11-01", "--to", "2026-12-01"]
    code, out = run("report", "partner", "--clickhouse", url, *period, "-o", "json")
    assert code == 0, out
    assert json.loads(out)["partners"] == [CALLPRO_WANT, VOXA_WANT]

    code, out = run("report", "partner", "--clickhouse", url, "--partner", "voxa", "-o", "json")  # default period
    assert code == 0, out
    assert json.loads(out)["partners"] == [VOXA_WANT]

    code, out = run("report", "partner", "--clickhouse", url, *period, "-o", "csv")
    assert code == 0, out
    lines = list(csv.DictReader(io.StringIO(out)))
    assert [ln["partner"] for ln in lines] == ["callpro", "voxa"]
    assert lines[0]["amount"] == "12.4" and lines[0]["sl"] == "0.75" and lines[0]["mismatches"] == "2"
    assert lines[1]["sl"] == "" and lines[1]["handled_minutes"] == "6.0" and lines[1]["currency"] == "USD"

    code, out = run("report", "partner", "--clickhouse", url, "--from", "2026-11-02", "--to", "2026-12-01")
    assert code == 0, out
    for text in ("Partner statement", "callpro", "voxa", "14.50", "66.7% / 80.0%", "- / -", "20.00 EUR",
                 "0.00 EUR", "9.00 USD", "Mismatches (4)", "assigned, no outcome reported",
                 "answered before assignment"):
        assert text in out, text

    code, out = run("report", "partner", "--clickhouse", url, *period, "--partner", "callpro",
                    "--partner-records", str(records_file(tmp_path)), "-o", "json")
    assert code == 0, out  # mismatches are listed, not an error
    (cp,) = json.loads(out)["partners"]
    assert len(cp["mismatches"]) == 5 and cp["reconciled"] == 4
    # The partner in the file instead of --partner.
    code, out = run("report", "partner", "--clickhouse", url, *period,
                    "--partner-records", str(records_file(tmp_path, partner_column=True)), "-o", "json")
    assert code == 0, out
    cp, vx = json.loads(out)["partners"]
    assert len(cp["mismatches"]) == 5 and vx == VOXA_WANT


@pytest.mark.parametrize("args,msg", [
    (["-o", "yaml"], "-o must be"),
    (["--from", "2026-12-01", "--to", "2026-11-01"], "period is empty"),
    (["--time-scale", "0"], "--time-scale"),
    (["--partner-records", "RECORDS"], "need --partner"),
    (["--partner-records", "/nonexistent/r.csv", "--partner", "x"], "cannot read"),
])
def test_report_partner_bad_arguments(args, msg, tmp_path):
    args = [str(records_file(tmp_path)) if a == "RECORDS" else a for a in args]
    code, out = run("report", "partner", "--clickhouse", "clickhouse://127.0.0.1:9/x", *args)
    assert code == 2 and msg in out


def test_report_partner_store_cannot_be_opened(tmp_path):
    code, out = run("report", "partner", "--data-dir", str(tmp_path))
    assert code == 2 and "no history in" in out
    code, out = run("report", "partner", "--clickhouse", "clickhouse://127.0.0.1:9000/bad-name!")
    assert code == 2 and "error:" in out


WRITE = """
import sys
from router.history.store import open_store
from test_history_partner import events, insert
s = open_store(sys.argv[1] + "/history")
s.migrate()
insert(s, events())
s.close()
open(sys.argv[1] + "/time_scale", "w").write("60\\n")
"""


def test_report_partner_on_a_data_dir(tmp_path):
    """chdb in a child process (this one holds chdb on another path); the time scale the
    demo recorded in the data dir applies."""
    d = str(tmp_path / "run")
    r = subprocess.run([sys.executable, "-c", WRITE, d], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).parent)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "router.cli", "report", "partner", "--data-dir", d,
                        "--from", "2026-11-01", "--to", "2026-12-01", "-o", "json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cp, vx = json.loads(r.stdout)["partners"]
    assert cp["handled_minutes"] == 1110.0 and cp["sl"] == 0.0 and cp["amount"] == round(12.5 + 444 - 120, 2)
    assert vx["handled_minutes"] == 360.0 and vx["amount"] == 9.0
