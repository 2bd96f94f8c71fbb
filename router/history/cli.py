"""``tandem history …`` and ``tandem report …`` (registered by :func:`register`).

Every command takes the history as ``--clickhouse URL`` (``clickhouse://host:9000/db``;
``report audit`` also as ``--history URL``)
or ``--data-dir DIR`` (the embedded chdb history of a node, kept in ``DIR/history``; when
there is none, the node histories below ``DIR`` — e.g. ``tandem demo --data-dir DIR``'s,
one per node — are read merged, see :mod:`router.history.merge`). Heavy modules are imported inside the commands so ``tandem --help``
stays fast.
"""

from __future__ import annotations

import calendar
import csv
import json
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer

history_app = typer.Typer(add_completion=False, no_args_is_help=True,
                          help="History store: schema migrations and status.")
report_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="Reports from the history: KPIs, chargeback, partner statements and audit.")

_CLICKHOUSE = typer.Option(None, "--clickhouse", help="clickhouse://host:port/database")
_DATA_DIR = typer.Option(None, "--data-dir", help="data dir whose history/ holds the embedded (chdb) history; "
                         "without one, the node histories below it (e.g. a demo's) are read merged")


def register(app: typer.Typer) -> None:
    app.add_typer(history_app, name="history")
    app.add_typer(report_app, name="report")


def history_path(data_dir: str | Path) -> Path:
    """Where a node (or the demo) keeps its embedded history inside its data dir."""
    return Path(data_dir) / "history"


def _open(clickhouse: Optional[str], data_dir: Optional[Path], *, create: bool = False):
    from router.history.store import StoreError, open_store

    if bool(clickhouse) == bool(data_dir):
        _fail("give exactly one of --clickhouse URL or --data-dir DIR")
    if clickhouse and not clickhouse.startswith(("clickhouse://", "clickhouses://")):
        # open_store would take a bare word for an embedded directory and create it here.
        _fail(f"--clickhouse wants a URL (clickhouse://host:port/database), not {clickhouse!r}; "
              f"an embedded history is --data-dir DIR")
    if data_dir and not create and not history_path(data_dir).is_dir():
        from router.history.merge import merged_store, node_histories

        found = node_histories(data_dir)  # e.g. the demo's nodes, one history each
        if not found:
            _fail(f"no history in {data_dir} (expected {history_path(data_dir)}/ or node histories "
                  f"below it; `tandem history migrate --data-dir {data_dir}` creates an empty one)")
        try:
            return merged_store(found)
        except (StoreError, OSError) as e:
            _fail(str(e))
    try:
        return open_store(clickhouse) if clickhouse else open_store(history_path(data_dir))
    except (StoreError, ValueError) as e:
        _fail(str(e))


def default_sites(data_dir: Optional[Path]) -> Path:
    """The site files a data dir keeps (``DIR/sites`` or ``DIR/*/sites``: the demo writes
    its time-scaled copies there), else ``./sites``."""
    if data_dir is not None:
        for cand in [Path(data_dir) / "sites", *sorted(Path(data_dir).glob("*/sites"))]:
            if cand.is_dir() and any(cand.glob("*.yaml")):
                return cand
    return Path("sites")


def recorded_time_scale(data_dir: Optional[Path]) -> tuple[float, Optional[Path]]:
    """The time scale a compressed run (``tandem demo``) recorded in its data dir, looked
    for in ``data_dir`` and up to three directories above it (a node's own dir inside a
    demo's); (1.0, None) when there is none."""
    from router.history.kpi import TIME_SCALE_FILE

    if data_dir is None:
        return 1.0, None
    d = Path(data_dir).resolve()
    for cand in [d, *list(d.parents)[:3]]:
        f = cand / TIME_SCALE_FILE
        if f.is_file():
            try:
                scale = float(f.read_text().strip())
            except (OSError, ValueError):
                _fail(f"{f}: not a time scale (a positive number)")
            if not (scale > 0 and scale < float("inf")):
                _fail(f"{f}: not a time scale (a positive number)")
            return scale, f
    return 1.0, None


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_interval(text: str) -> int:
    """'15m', '1h', '900s', '900', '1d' -> seconds."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if not m or int(m.group(1)) == 0:
        raise typer.BadParameter(f"expected e.g. 15m, 1h, 900s; got {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2) or "s"]


def parse_time(text: str) -> int:
    """Unix seconds, or an ISO date/datetime (UTC unless it says otherwise)."""
    t = text.strip()
    if re.fullmatch(r"\d{9,10}", t):
        return int(t)
    try:
        d = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"expected an ISO date/time or Unix seconds, got {text!r}") from None
    if d.tzinfo is None:
        return calendar.timegm(d.timetuple())
    return int(d.timestamp())


def iso(t: int | None) -> str:
    if t is None:
        return ""
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M")


# --- tandem history ----------------------------------------------------------------------


@history_app.command("migrate")
def migrate(clickhouse: Optional[str] = _CLICKHOUSE, data_dir: Optional[Path] = _DATA_DIR) -> None:
    """Create or upgrade the history schema (idempotent)."""
    from router.history.store import StoreError

    store = _open(clickhouse, data_dir, create=True)
    try:
        applied = store.migrate()
        versions = store.applied_versions()
    except StoreError as e:
        _fail(f"{store.url}: {e}", 1)
    finally:
        store.close()
    now = versions[-1] if versions else 0
    if applied:
        typer.echo(f"applied migration(s) {', '.join(map(str, applied))}; schema version {now}")
    else:
        typer.echo(f"schema up to date (version {now})")


@history_app.command("status")
def status(clickhouse: Optional[str] = _CLICKHOUSE, data_dir: Optional[Path] = _DATA_DIR,
           json_out: bool = typer.Option(False, "--json")) -> None:
    """Schema version and rows per table (each interaction counted once)."""
    from router.history.schema import TABLES, latest_version
    from router.history.store import StoreError

    store = _open(clickhouse, data_dir)
    try:
        versions = store.applied_versions()
        counts = {}
        for t in TABLES:
            try:
                counts[t] = int(store.query(f"SELECT count() FROM {{db}}.{t} FINAL")[0][0])
            except StoreError as e:
                if e.code != 60:
                    raise
                counts[t] = None
    except StoreError as e:
        _fail(f"{store.url}: {e}", 1)
    finally:
        store.close()
    out = {"schema_version": versions[-1] if versions else 0, "latest": latest_version(), "rows": counts}
    if json_out:
        typer.echo(json.dumps(out))
    else:
        typer.echo(f"schema version {out['schema_version']} (latest {out['latest']})")
        for t, n in counts.items():
            typer.echo(f"  {t}: {'(missing)' if n is None else n}")


@history_app.command("synth")
def synth_cmd(clickhouse: Optional[str] = _CLICKHOUSE, data_dir: Optional[Path] = _DATA_DIR,
              calls: int = typer.Option(10_000, "--calls", min=1, max=10_000_000),
              days: float = typer.Option(1.0, "--days", min=0.01, max=366.0),
              start: Optional[str] = typer.Option(None, "--from", help="first offer (default: --days ago)"),
              seed: int = typer.Option(1, "--seed")) -> None:
    """Fill a history with synthetic interactions, routing decisions and agent states
    (to try the reports; rows are keyed, so running it twice adds nothing)."""
    import time

    from router.history import synth
    from router.history.writer import HistoryWriter

    span = int(days * 86400)
    t0 = parse_time(start) if start else int(time.time()) - span
    store = _open(clickhouse, data_dir, create=True)
    import tempfile

    spool = history_path(data_dir) / "spool-synth" if data_dir else Path(tempfile.mkdtemp(prefix="tandem-synth-"))
    try:
        with HistoryWriter(store, spool, fsync=False) as w:
            rows = synth.interactions(calls, seed=seed, start=t0, span_s=span)
            for r in rows:
                w.submit("interactions", r)
            for r in synth.routing_decisions(rows):
                w.submit("routing_decisions", r)
            for r in synth.agent_state_changes(8, seed=seed, start=t0, span_s=span):
                w.submit("agent_state_changes", r)
            ok = w.flush(120)
            st = w.stats()
    finally:
        store.close()
    if not ok:
        _fail(f"could not write everything ({st.spool_files} batch(es) left in {spool})", 1)
    if spool.exists() and not any(spool.iterdir()):
        spool.rmdir()
    typer.echo(f"wrote {st.inserted} rows ({calls} interactions) to {store.url}")


# --- tandem report -----------------------------------------------------------------------


@report_app.command("kpi")
def report_kpi(
    clickhouse: Optional[str] = _CLICKHOUSE,
    data_dir: Optional[Path] = _DATA_DIR,
    by: str = typer.Option("site,queue", "--by", help="comma-separated: site, queue, region, partner, skill, channel, language, origin_region ('' = total)"),
    interval: Optional[str] = typer.Option(None, "--interval", help="bucket length, e.g. 15m, 1h"),
    start: Optional[str] = typer.Option(None, "--from", help="offered at or after (ISO UTC or Unix s)"),
    end: Optional[str] = typer.Option(None, "--to", help="offered before (ISO UTC or Unix s)"),
    sites: Optional[Path] = typer.Option(
        None, "--sites", help="site files with each queue's service-level definition (default: the site "
        "files kept in --data-dir, e.g. the demo's scaled copies, else ./sites)"),
    fcr_days: float = typer.Option(7.0, "--fcr-days", help="FCR: no repeat contact for the same skill within N days"),
    json_out: bool = typer.Option(False, "--json", help="one JSON document instead of a table"),
    time_scale: Optional[float] = typer.Option(
        None, "--time-scale", help="the history is of a run compressed N times: report in the run's time "
        "(durations x N; --interval and --fcr-days in the run's time). Default: the scale `tandem demo` "
        "recorded in --data-dir (its time_scale file), else 1"),
) -> None:
    """Service level, ASA, AHT, abandon rate, CSAT, FCR and occupancy per group and interval.

    The history of a `tandem demo` run (compressed time) is read in the run's time."""
    from router.config import ConfigError, load_sites
    from router.history.kpi import END_OF_TIME, KpiQuery, in_run_time, kpis, sl_definitions
    from router.history.store import StoreError

    recorded = None
    if time_scale is None:
        time_scale, recorded = recorded_time_scale(data_dir)
    elif not (0 < time_scale < float("inf")):
        _fail("--time-scale must be a positive number")
    dims = tuple(d.strip() for d in by.split(",") if d.strip())
    if sites is None:
        sites = default_sites(data_dir)
    defs = {}
    if sites.is_dir():
        try:
            defs = sl_definitions(load_sites(sites))
        except ConfigError as e:
            _fail(str(e))
    try:
        q = KpiQuery(by=dims, interval_s=max(1, round(parse_interval(interval) / time_scale)) if interval else None,
                     start=parse_time(start) if start else 0, end=parse_time(end) if end else END_OF_TIME,
                     fcr_days=fcr_days / time_scale, service_levels=defs)
    except ValueError as e:
        _fail(str(e))
    store = _open(clickhouse, data_dir)
    try:
        rows = in_run_time(kpis(store, q), time_scale)
    except StoreError as e:
        _fail(f"{store.url}: {e}", 1)
    finally:
        store.close()
    if json_out:
        # durations in the run's time; interval_s, fcr_days too (from, to, bucket_start:
        # the clock's own Unix times)
        doc = {"by": list(dims), "interval_s": q.interval_s * time_scale if q.interval_s else None,
               "from": q.start, "to": q.end, "fcr_days": fcr_days, "time_scale": time_scale,
               "rows": [dict(r.to_dict(), bucket_start=iso(r.bucket) or None) for r in rows]}
        typer.echo(json.dumps(doc))
        return
    title = "KPIs from the history"
    if time_scale != 1.0:
        where = f", recorded in {recorded}" if recorded else ""
        title += (f" — in the run's simulated time (compressed x{time_scale:g}{where}): durations x{time_scale:g}; "
                  "interval starts are clock times")
    _print_kpi_table(rows, dims, q.interval_s is not None, title)


def _console():
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=200)  # piped: do not squeeze to 80 columns


def _print_kpi_table(rows, dims, with_bucket: bool, title: str = "KPIs from the history") -> None:
    from rich import box
    from rich.table import Table

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    def sec(v):
        return "-" if v is None else f"{v:.0f}s"

    t = Table(box=box.SIMPLE_HEAD, title=title)
    if not set(dims) <= {"site", "region", "partner"}:
        t.caption = "occ.: agents serve several queues, so occupancy is given by site, region or partner (--by site)"
    for d in dims:
        t.add_column(d)
    if with_bucket:
        t.add_column("interval (UTC)")
    for c in ("offered", "answered", "abandoned", "rejected", "SL", "ASA", "AHT", "aband.", "CSAT", "FCR", "occ."):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(
            *[r.group[d] or "(none)" for d in dims], *([iso(r.bucket)] if with_bucket else []),
            str(r.offered), str(r.answered), str(r.abandoned), str(r.rejected), pct(r.service_level), sec(r.asa_s),
            sec(r.aht_s), pct(r.abandon_rate), "-" if r.csat is None else f"{r.csat:.2f}",
            pct(r.fcr), pct(r.occupancy),
        )
    _console().print(t)
    if not rows:
        typer.echo("(no interactions in range)")


@report_app.command("chargeback")
def report_chargeback(
    clickhouse: Optional[str] = _CLICKHOUSE,
    data_dir: Optional[Path] = _DATA_DIR,
    period: Optional[str] = typer.Option(None, "--period", help="a month, YYYY-MM (UTC)"),
    start: Optional[str] = typer.Option(None, "--from", help="instead of --period: offered at or after"),
    end: Optional[str] = typer.Option(None, "--to", help="instead of --period: offered before"),
    rates_file: Optional[Path] = typer.Option(None, "--rates", help="rates YAML (default: the example rates)"),
    csv_out: bool = typer.Option(False, "--csv", help="CSV lines on stdout"),
    json_out: bool = typer.Option(False, "--json", help="one JSON document on stdout"),
) -> None:
    """What each region pays for its customers' contacts and each partner bills for overflow."""
    from router.history.chargeback import RatesError, chargeback, example_rates_path, load_rates, period_bounds
    from router.history.store import StoreError

    if csv_out and json_out:
        _fail("choose one of --csv and --json")
    if period and (start or end):
        _fail("give --period or --from/--to, not both")
    try:
        if period:
            lo, hi = period_bounds(period)
        elif start and end:
            lo, hi = parse_time(start), parse_time(end)
        else:
            _fail("give --period YYYY-MM or both --from and --to")
        rates = load_rates(rates_file or example_rates_path())
    except (ValueError, RatesError) as e:
        _fail(str(e))
    if hi <= lo:
        _fail("the period is empty (--to must be after --from)")
    store = _open(clickhouse, data_dir)
    try:
        cb = chargeback(store, rates, lo, hi)
    except StoreError as e:
        _fail(f"{store.url}: {e}", 1)
    finally:
        store.close()
    for u in cb.unrated:
        typer.echo(f"warning: no rate for {u}; counted with amount 0", err=True)
    if json_out:
        typer.echo(json.dumps(cb.to_dict()))
    elif csv_out:
        w = csv.writer(sys.stdout, lineterminator="\n")
        fields = ["kind", "name", "channel", "origin_region", "contacts", "minutes",
                  "rate_per_contact", "rate_per_minute", "amount", "currency"]
        w.writerow(fields)
        for ln in cb.lines:
            d = ln.to_dict()
            w.writerow(["" if d[f] is None else d[f] for f in fields])
    else:
        _print_chargeback(cb)


def _print_chargeback(cb) -> None:
    from rich import box
    from rich.table import Table

    t = Table(box=box.SIMPLE_HEAD, title=f"Chargeback {iso(cb.start)} .. {iso(cb.end)} UTC ({cb.currency})")
    for c in ("kind", "name", "from region", "channel", "contacts", "minutes", "amount"):
        t.add_column(c, justify="right" if c in ("contacts", "minutes", "amount") else "left")
    for ln in cb.lines:
        t.add_row(ln.kind, ln.name or "(none)", ln.origin_region or "(none)", ln.channel,
                  str(ln.contacts), f"{ln.minutes:.1f}", f"{ln.amount:.2f}")
    _console().print(t)
    for kind, totals in cb.totals().items():
        for name, amount in totals.items():
            typer.echo(f"total {kind} {name or '(none)'}: {amount:.2f} {cb.currency}")


PARTNER_CSV_FIELDS = ("partner", "offered", "accepted", "declined", "handled", "abandoned_at_partner",
                      "handed_back", "handled_minutes", "sl", "sl_target", "sla_threshold_s", "credits",
                      "amount", "currency", "reconciled", "mismatches")


@report_app.command("partner")
def report_partner(
    clickhouse: Optional[str] = _CLICKHOUSE,
    data_dir: Optional[Path] = _DATA_DIR,
    partner: Optional[str] = typer.Option(None, "--partner", help="only this partner (default: every partner "
                                          "with events in the period)"),
    start: Optional[str] = typer.Option(None, "--from", help="events at or after (ISO UTC or Unix s; "
                                        "default: the beginning)"),
    end: Optional[str] = typer.Option(None, "--to", help="events before (ISO UTC or Unix s; default: "
                                      "a day from now)"),
    output: str = typer.Option("table", "-o", "--output", help="table | json | csv"),
    records_file: Optional[Path] = typer.Option(
        None, "--partner-records", help="the partner's own records to reconcile with: CSV (header call_id, "
        "answered_at, talk_s, wrap_s, disposition[, partner]) or JSON (a list of such objects)"),
    time_scale: Optional[float] = typer.Option(
        None, "--time-scale", help="the history is of a run compressed N times: durations x N. Default: the "
        "scale `tandem demo` recorded in --data-dir (its time_scale file), else 1"),
) -> None:
    """What each BPO partner handled and is owed: offers, declines, handled calls and
    minutes, SL against the contract's target, credits, amount, and the calls whose records
    disagree (listed; they do not change the exit code)."""
    import time

    from router.history.kpi import END_OF_TIME
    from router.history.partner import PartnerRecordsError, load_partner_records, partner_statement
    from router.history.store import StoreError

    if output not in ("table", "json", "csv"):
        _fail(f"-o must be table, json or csv, not {output!r}")
    if time_scale is None:
        time_scale, _ = recorded_time_scale(data_dir)
    elif not (0 < time_scale < float("inf")):
        _fail("--time-scale must be a positive number")
    lo = parse_time(start) if start else 0
    hi = parse_time(end) if end else min(int(time.time()) + 86400, END_OF_TIME)
    if hi <= lo:
        _fail("the period is empty (--to must be after --from)")
    records = None
    if records_file is not None:
        try:
            records = load_partner_records(records_file)
            if partner is None and any(not r["partner"] for r in records):
                raise PartnerRecordsError(f"{records_file}: records without a partner column need --partner")
        except PartnerRecordsError as e:
            _fail(str(e))
    store = _open(clickhouse, data_dir)
    try:
        st = partner_statement(store, partner=partner, start=lo, end=hi, time_scale=time_scale,
                               partner_records=records)
    except StoreError as e:
        if e.code == 60:
            _fail(f"{store.url}: no partner_events table (`tandem history migrate` creates it)", 1)
        _fail(f"{store.url}: {e}", 1)
    finally:
        store.close()
    doc = st.to_dict()
    if output == "json":
        typer.echo(json.dumps(doc))
    elif output == "csv":
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(PARTNER_CSV_FIELDS)
        for p in doc["partners"]:
            row = dict(p, mismatches=len(p["mismatches"]))
            w.writerow(["" if row[f] is None else row[f] for f in PARTNER_CSV_FIELDS])
    else:
        _print_partner_statement(doc, time_scale)


def _print_partner_statement(doc: dict, time_scale: float) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    period = f"{doc['period']['from']} .. {doc['period']['to']}".replace("T", " ").replace("Z", "")
    t = Table(box=box.SIMPLE_HEAD, title=f"Partner statement {period} UTC")
    if time_scale != 1.0:
        t.caption = f"in the run's simulated time (compressed x{time_scale:g}): durations x{time_scale:g}"
    for c in ("partner", "offered", "accepted", "declined", "handled", "handled min", "SL / target",
              "credits", "amount"):
        t.add_column(c, justify="left" if c == "partner" else "right")
    for p in doc["partners"]:
        sl = f"{pct(p['sl'])} / {pct(p['sl_target']) if p['sla_threshold_s'] else '-'}"
        cur = f" {p['currency']}" if p["currency"] else ""
        t.add_row(Text(p["partner"]), str(p["offered"]), str(p["accepted"]), str(p["declined"]),
                  str(p["handled"]), f"{p['handled_minutes']:.2f}", sl, f"{p['credits']:.2f}{cur}",
                  f"{p['amount']:.2f}{cur}")
    _console().print(t)
    if not doc["partners"]:
        typer.echo("(no partner events in range)")
        return
    bad = [(p["partner"], m) for p in doc["partners"] for m in p["mismatches"]]
    if not bad:
        typer.echo("records reconciled: no mismatches")
        return
    m = Table(box=box.SIMPLE_HEAD, title=f"Mismatches ({len(bad)})")
    for c in ("partner", "call", "problem"):
        m.add_column(c, overflow="fold")
    for name, x in bad:
        m.add_row(Text(name), Text(x["call_id"]), Text(x["problem"]))  # Text: ids are never markup
    _console().print(m)


@report_app.command("audit")
def report_audit(
    clickhouse: Optional[str] = typer.Option(None, "--clickhouse", "--history", help="clickhouse://host:port/database"),
    data_dir: Optional[Path] = _DATA_DIR,
    since: Optional[str] = typer.Option(
        None, "--since", help="from this time on: ISO date/time (UTC unless it says), Unix seconds, "
        "or how long ago (900, 15m, 1h, 7d)"),
    site: Optional[str] = typer.Option(None, "--site", help="only this site's records"),
    decision: Optional[str] = typer.Option(None, "--decision", help="allow | deny"),
    limit: int = typer.Option(1000, "--limit", min=1, max=10_000_000, help="the newest N records"),
    output: str = typer.Option("table", "-o", "--output", help="table | json"),
) -> None:
    """Audit records (who did or was refused what, from where, and the result), oldest
    first; each record once, however often it was written."""
    import time

    from router.history.store import StoreError

    if output not in ("table", "json"):
        _fail(f"-o must be table or json, not {output!r}")
    if decision is not None and decision not in ("allow", "deny"):
        _fail(f"--decision must be allow or deny, not {decision!r}")
    try:
        start = parse_since(since, time.time()) if since else 0
    except typer.BadParameter as e:
        _fail(str(e))
    where = ["at >= toDateTime({start}, 'UTC')"]
    params: dict = {"start": start, "limit": limit}
    if site is not None:
        where.append("site = {site}")
        params["site"] = site
    if decision is not None:
        where.append("decision = {decision}")
        params["decision"] = decision
    sql = ("SELECT site, id, toUInt32(at), at_us, identity, role, peer, method, object_keys, "
           "object_values, decision, reason, code FROM {db}.audit FINAL "
           f"WHERE {' AND '.join(where)} ORDER BY at DESC, at_us DESC, id DESC LIMIT {{limit}}")
    store = _open(clickhouse, data_dir)
    try:
        rows = store.query(sql, params)
    except StoreError as e:
        if e.code == 60:
            _fail(f"{store.url}: no audit table (`tandem history migrate` creates it)", 1)
        _fail(f"{store.url}: {e}", 1)
    finally:
        store.close()
    records = [_audit_record(r) for r in reversed(rows)]
    if output == "json":
        typer.echo(json.dumps({"since": start, "site": site, "decision": decision, "limit": limit,
                               "records": records}))
        return
    _print_audit(records)


def parse_since(text: str, now: float) -> int:
    """'2026-11-02T08:00', Unix seconds (9-10 digits), or how long ago: '900', '15m',
    '1h', '7d' -> Unix seconds."""
    t = text.strip()
    if re.fullmatch(r"\d{1,8}\s*[smhd]?", t):
        return max(0, int(now) - parse_interval(t))
    return parse_time(t)


def _audit_record(r: tuple) -> dict:
    site, id_, at, at_us, identity, role, peer, method, keys, values, decision, reason, code = r
    at = int(at) + int(at_us) / 1e6
    stamp = datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {"id": id_, "at": at, "time": stamp, "site": site, "identity": identity, "role": role,
            "peer": peer, "method": method, "objects": dict(zip(keys, values)),
            "decision": decision, "reason": reason, "code": code}


def _print_audit(records: list[dict]) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    t = Table(box=box.SIMPLE_HEAD, title="Audit records")
    for c in ("time (UTC)", "site", "decision", "code", "reason", "identity", "role", "method", "objects", "peer"):
        t.add_column(c, overflow="fold")  # an identity or method cut short would say nothing
    for r in records:
        cells = (r["time"][:-4].replace("T", " "), r["site"], r["decision"], r["code"], r["reason"] or "-",
                 r["identity"], r["role"] or "-", r["method"],
                 " ".join(f"{k}={v}" for k, v in r["objects"].items()) or "-", r["peer"])
        t.add_row(*map(Text, cells))  # Text: what a caller sent is never read as markup
    _console().print(t)
    if not records:
        typer.echo("(no audit records in range)")
