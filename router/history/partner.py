"""BPO partner events in the history, and what each partner is owed for a period.

**Rows.** The origin node writes one ``partner_events`` row per event of an overflow offer
to a partner's own ACD (its gateway; ``proto/router/v1/partner.proto``), built by
:func:`partner_event_row`::

    writer.submit("partner_events", partner_event_row(
        partner="callpro", call_id=c, offer_no=n, event="assigned", at=time.time(),
        agent="cp-17", origin_site="lyon", …, price_per_contact=2.5, currency="EUR"))

Events (:data:`EVENTS`), each for one offer ``(call_id, offer_no)``: ``offered``, then
``accepted`` or one of ``declined`` / ``timeout`` / ``gateway_lost`` / ``withdrawn``
(:data:`DECLINE_EVENTS`; a late accept is answered by ``withdrawn``), ``assigned`` (the
partner owns the call), then ``outcome`` or ``handed_back``. ``outcome`` and
``handed_back`` carry the ``offer_no`` of the assignment they end. Every row carries the
contract's terms in force when it happened (SLA, prices, currency): a statement reads
the terms of the call's own ``outcome`` row, else of its ``assigned`` row, never today's
contract. The key is ``(partner, call_id, offer_no, event)`` and ``ver`` the event time
in ms, so writing an event again (a node's replay) never counts twice.

**Statement** (:func:`partner_statement`, ``tandem report partner``): per partner, for
the events whose time ``at`` is in ``[start, end)``:

* offered / accepted (assigned) / declined (by kind): distinct offers;
* handled = outcomes answered (``answered_at > 0``), abandoned at the partner = outcomes
  never answered, handed back;
* handled minutes = (talk + wrap-up) of handled calls / 60;
* SL = the share of handled calls answered within the SLA threshold of their
  assignment (``answered_at - assigned at_s <= sla_threshold_s``; calls without an
  assignment or without an SLA are left out; ``None`` when none is left);
  credits = ``max(0, (target - SL) * 100) * credit_per_point``;
* amount = per handled call ``price_per_contact + minutes * price_per_minute``, minus the
  credits, never below 0;
* reconciliation: the mismatches of :data:`PROBLEMS`, and with the partner's own records
  (``--partner-records``) the calls missing on either side and talk times more than 1 s
  apart. ``reconciled`` counts the calls of the period (assigned, with an outcome or
  handed back, or in the partner's records) without any mismatch.

An assignment made before ``start`` still counts for the SL and the checks of a call whose
outcome is in the period; a partner record of a call whose outcome we recorded in another
period is not a mismatch (it belongs to that period).

**Compressed runs**: ``tandem demo`` runs in compressed time and its nodes write real
seconds. ``time_scale`` (from the data dir, as ``tandem report kpi``) multiplies
durations (talk, wrap-up, the answer delay against the SLA threshold) back into the run's
time; the rows' own ``time_scale`` column only records the scale they were written at.
Talk times are compared with the partner's records as recorded (the same clock).

**Reads** go through ``FROM partner_events FINAL`` and filter on the event time outside
the FINAL subquery (a later record of an event may carry another time), as plain SQL
that runs on ClickHouse 18.16 and chdb; the per-call logic is Python on the period's rows.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from router.history.encode import converter
from router.history.schema import PARTNER_EVENTS
from router.history.store import HistoryStore

TABLE = "partner_events"

#: Every event name a row may carry.
EVENTS = ("offered", "accepted", "declined", "timeout", "gateway_lost", "withdrawn",
          "assigned", "outcome", "handed_back")
#: The ways an offer ends without an assignment (``declined_by_reason``'s keys).
DECLINE_EVENTS = ("declined", "timeout", "gateway_lost", "withdrawn")

#: The reconciliation problems a statement lists (the talk one with both figures).
ASSIGNED_NO_OUTCOME = "assigned, no outcome reported"
OUTCOME_NO_ASSIGNMENT = "outcome without assignment"
HANDED_BACK_AFTER_OUTCOME = "handed back after an outcome"
ANSWERED_BEFORE_ASSIGNMENT = "answered before assignment"
MISSING_IN_PARTNER_RECORDS = "missing in partner records"
NOT_IN_OUR_RECORDS = "not in our records"
PROBLEMS = (ASSIGNED_NO_OUTCOME, OUTCOME_NO_ASSIGNMENT, HANDED_BACK_AFTER_OUTCOME,
            ANSWERED_BEFORE_ASSIGNMENT, MISSING_IN_PARTNER_RECORDS, NOT_IN_OUR_RECORDS,
            "talk differs (ours X s, theirs Y s)")

#: How far apart an answer and its assignment, or two talk times, may be (clocks, rounding).
TOLERANCE_S = 1.0

_COLUMNS = {c.name: c for c in PARTNER_EVENTS}
_DERIVED = frozenset({"partner", "call_id", "offer_no", "event", "ver", "at", "at_s"})
_CONVERT = {c.name: converter(c.type) for c in PARTNER_EVENTS}
_MAX_AT = 2**32 - 1
#: call ids per look-up query (18.16 refuses SQL texts over 256 KiB)
_CHUNK = 1000


def partner_event_row(*, partner: str, call_id: str, offer_no: int, event: str, at: float,
                      **fields: Any) -> dict[str, Any]:
    """The ``partner_events`` row of one event: every column, in table order.

    ``at`` is the event's exact Unix time (``at_s``; ``at`` whole seconds, ``ver`` = ms).
    ``fields`` are the other columns (``origin_site``, ``agent``, ``answered_at``,
    ``talk_s``, ``price_per_contact``, …); the ones not given get their defaults (0, '',
    ``time_scale`` 1). ValueError for an unknown event or column, an empty partner or
    call id, or a value the column cannot hold (a negative or non-finite number, a
    non-number where one is expected); a bool is stored as 0/1.
    """
    if event not in EVENTS:
        raise ValueError(f"unknown partner event {event!r}; one of {', '.join(EVENTS)}")
    for name, v in (("partner", partner), ("call_id", call_id)):
        if not isinstance(v, str) or not v:
            raise ValueError(f"{TABLE}.{name} must be a non-empty string, got {v!r}")
    if isinstance(offer_no, bool) or not isinstance(offer_no, int) or not 0 <= offer_no <= 2**32 - 1:
        raise ValueError(f"{TABLE}.offer_no must be a whole number 0..2**32-1, got {offer_no!r}")
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not (0 < at <= _MAX_AT):
        raise ValueError(f"{TABLE}.at must be a Unix time, got {at!r}")
    bad = sorted(set(fields) - set(_COLUMNS))
    if bad:
        raise ValueError(f"unknown column(s) {bad} for {TABLE}")
    derived = sorted(set(fields) & _DERIVED)
    if derived:
        raise ValueError(f"{TABLE}: {derived} are derived from the event, not given")
    row: dict[str, Any] = {}
    for c in PARTNER_EVENTS:
        row[c.name] = c.default if c.name not in fields else _value(c.name, fields[c.name])
    at = float(at)
    row.update(partner=partner, call_id=call_id, offer_no=offer_no, event=event,
               ver=int(at * 1000), at=int(at), at_s=at)
    return row


def _value(name: str, v: Any) -> Any:
    try:
        out = _CONVERT[name](v)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"{TABLE}.{name}: {e}") from None
    if isinstance(out, float) and out < 0:
        raise ValueError(f"{TABLE}.{name}: {out} is negative")
    return out


# --- the statement -------------------------------------------------------------------------


@dataclass
class PartnerStatement:
    """One partner's figures (unrounded; :meth:`to_dict` rounds)."""

    partner: str
    offered: int = 0
    accepted: int = 0
    declined: int = 0
    declined_by_reason: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DECLINE_EVENTS, 0))
    handled: int = 0
    abandoned_at_partner: int = 0
    handed_back: int = 0
    handled_minutes: float = 0.0
    sl: float | None = None
    sl_target: float = 0.0
    sla_threshold_s: float = 0.0
    credits: float = 0.0
    amount: float = 0.0
    currency: str = ""
    price_per_contact: float = 0.0
    price_per_minute: float = 0.0
    reconciled: int = 0
    mismatches: list[dict[str, str]] = field(default_factory=list)  # {call_id, problem}

    def to_dict(self) -> dict[str, Any]:
        """Money to cents, minutes to 2 decimals, SL to 4 (None when undefined)."""
        return {
            "partner": self.partner, "offered": self.offered, "accepted": self.accepted,
            "declined": self.declined, "declined_by_reason": dict(self.declined_by_reason),
            "handled": self.handled, "abandoned_at_partner": self.abandoned_at_partner,
            "handed_back": self.handed_back, "handled_minutes": round(self.handled_minutes, 2),
            "sl": None if self.sl is None else round(self.sl, 4), "sl_target": self.sl_target,
            "sla_threshold_s": self.sla_threshold_s, "credits": round(self.credits, 2),
            "amount": round(self.amount, 2), "currency": self.currency,
            "price_per_contact": self.price_per_contact, "price_per_minute": self.price_per_minute,
            "reconciled": self.reconciled, "mismatches": [dict(m) for m in self.mismatches],
        }


@dataclass
class Statement:
    start: int
    end: int
    time_scale: float
    partners: list[PartnerStatement]

    def to_dict(self) -> dict[str, Any]:
        return {"period": {"from": _iso(self.start), "to": _iso(self.end)},
                "partners": [p.to_dict() for p in self.partners]}


def _iso(t: int) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Ev(NamedTuple):
    partner: str
    call_id: str
    offer_no: int
    event: str
    at_s: float
    answered_at: float
    talk_s: float
    wrap_s: float
    sla_threshold_s: float
    sla_target: float
    sla_credit_per_point: float
    price_per_contact: float
    price_per_minute: float
    currency: str

    @property
    def key(self) -> tuple[str, int]:
        return self.call_id, self.offer_no

    @property
    def has_terms(self) -> bool:
        return bool(self.currency or self.sla_threshold_s or self.sla_target or self.sla_credit_per_point
                    or self.price_per_contact or self.price_per_minute)


_FIELDS = ", ".join(_Ev._fields)


def _select(inner: Sequence[str], outer: Sequence[str]) -> str:
    """Rows of ``partner_events`` FINAL: ``inner`` filters only key columns (before the
    merge), ``outer`` the rest (after it)."""
    sql = f"SELECT {_FIELDS} FROM (SELECT {_FIELDS}, at FROM {{db}}.{TABLE} FINAL"
    if inner:
        sql += " WHERE " + " AND ".join(inner)
    sql += ")"
    if outer:
        sql += " WHERE " + " AND ".join(outer)
    return sql


def _rows(store: HistoryStore, sql: str, params: Mapping[str, Any]) -> list[_Ev]:
    out = []
    for r in store.query(sql, params):
        p, c, n, ev, at_s, ans, talk, wrap, thr, tgt, cpp, ppc, ppm, cur = r
        out.append(_Ev(str(p), str(c), int(n), str(ev), float(at_s), float(ans), float(talk), float(wrap),
                       float(thr), float(tgt), float(cpp), float(ppc), float(ppm), str(cur)))
    return out


def _chunks(items: Iterable[str]) -> Iterable[list[str]]:
    items = sorted(items)
    for i in range(0, len(items), _CHUNK):
        yield items[i:i + _CHUNK]


def partner_statement(store: HistoryStore, *, partner: str | None, start: int, end: int,
                      time_scale: float = 1.0,
                      partner_records: list[dict] | None = None) -> Statement:
    """Every partner's statement (or only ``partner``'s, listed even without events) for
    the events with ``start <= at < end`` (Unix seconds), sorted by partner.

    ``partner_records``: the partner's own records ({call_id, answered_at, talk_s, wrap_s,
    disposition}, e.g. from :func:`load_partner_records`); a record with a ``partner``
    field is for that partner, one without is for ``partner`` (ValueError when none is
    given). StoreError when the store fails (code 60: no ``partner_events`` table yet).
    """
    if not 0 <= int(start) < int(end):
        raise ValueError("need 0 <= start < end")
    if not (time_scale > 0 and math.isfinite(time_scale)):
        raise ValueError("time_scale must be a positive number")
    start, end = int(start), int(end)
    records = _records_by_partner(partner_records, partner)

    inner = ["partner = {partner}"] if partner is not None else []
    params: dict[str, Any] = {"start": start, "end": end}
    if partner is not None:
        params["partner"] = partner
    period = ["at >= toDateTime({start}, 'UTC')", "at < toDateTime({end}, 'UTC')"]
    by_partner: dict[str, list[_Ev]] = defaultdict(list)
    for e in _rows(store, _select(inner, period), params):
        by_partner[e.partner].append(e)

    # The assignments (and outcomes) before the period of the calls that end in it.
    ending = {e.call_id for evs in by_partner.values() for e in evs if e.event in ("outcome", "handed_back")}
    earlier: dict[str, list[_Ev]] = defaultdict(list)
    for ids in _chunks(ending):
        sql = _select([*inner, "event IN ('assigned', 'outcome')", "has({ids}, call_id)"],
                      ["at < toDateTime({start}, 'UTC')"])
        for e in _rows(store, sql, {**params, "ids": ids}):
            earlier[e.partner].append(e)

    names = set(by_partner) | set(records)
    if partner is not None:
        names = {partner}
    out = []
    for name in sorted(names):
        evs = by_partner.get(name, [])
        recs = records.get(name)
        elsewhere: set[str] = set()
        if recs:
            ours = {e.call_id for e in evs if e.event == "outcome"}
            unknown = set(recs) - ours
            for ids in _chunks(unknown):
                sql = _select(["partner = {p}", "event = 'outcome'", "has({ids}, call_id)"], [])
                elsewhere.update(e.call_id for e in _rows(store, sql, {"p": name, "ids": ids}))
        out.append(_compute(name, evs, earlier.get(name, []), time_scale, recs, elsewhere))
    return Statement(start, end, time_scale, out)


def _compute(name: str, evs: list[_Ev], earlier: list[_Ev], scale: float,
             records: dict[str, dict] | None, elsewhere: set[str]) -> PartnerStatement:
    st = PartnerStatement(name)
    by_event: dict[str, dict[tuple[str, int], _Ev]] = {ev: {} for ev in EVENTS}
    for e in sorted(evs, key=lambda e: e.at_s):
        if e.event in by_event:
            by_event[e.event][e.key] = e
    assigned = by_event["assigned"]
    outcomes = by_event["outcome"]
    handed = by_event["handed_back"]
    every_assignment = {e.key: e for e in earlier if e.event == "assigned"} | assigned
    earlier_outcomes = {e.key: e for e in earlier if e.event == "outcome"}

    st.offered = len(by_event["offered"])
    st.accepted = len(assigned)
    declined: set[tuple[str, int]] = set()
    for kind in DECLINE_EVENTS:
        st.declined_by_reason[kind] = len(by_event[kind])
        declined.update(by_event[kind])
    st.declined = len(declined)
    st.handed_back = len(handed)

    # The contract shown: the latest terms recorded in the period (else before it).
    with_terms = [e for e in evs if e.has_terms and e.event in ("assigned", "outcome")] \
        or [e for e in evs if e.has_terms] or [e for e in earlier if e.has_terms]
    shown = max(with_terms, key=lambda e: e.at_s) if with_terms else None
    if shown is not None:
        st.sla_threshold_s, st.sl_target = shown.sla_threshold_s, shown.sla_target
        st.price_per_contact, st.price_per_minute = shown.price_per_contact, shown.price_per_minute
        st.currency = shown.currency

    problems: set[tuple[str, str]] = set()
    gross = 0.0
    sl_num = sl_den = 0
    for key, o in outcomes.items():
        a = every_assignment.get(key)
        if a is None:
            problems.add((o.call_id, OUTCOME_NO_ASSIGNMENT))
        if o.answered_at <= 0:
            st.abandoned_at_partner += 1
            continue
        st.handled += 1
        terms = o if o.has_terms or a is None or not a.has_terms else a
        minutes = (o.talk_s + o.wrap_s) * scale / 60.0
        st.handled_minutes += minutes
        gross += terms.price_per_contact + minutes * terms.price_per_minute
        if a is not None:
            if o.answered_at < a.at_s - TOLERANCE_S:
                problems.add((o.call_id, ANSWERED_BEFORE_ASSIGNMENT))
            if terms.sla_threshold_s > 0:
                sl_den += 1
                sl_num += (o.answered_at - a.at_s) * scale <= terms.sla_threshold_s
    for key, a in assigned.items():
        if key not in outcomes and key not in handed:
            problems.add((a.call_id, ASSIGNED_NO_OUTCOME))
    for key, h in handed.items():
        o = outcomes.get(key) or earlier_outcomes.get(key)
        if o is not None and o.at_s <= h.at_s:
            problems.add((h.call_id, HANDED_BACK_AFTER_OUTCOME))

    if sl_den:
        st.sl = sl_num / sl_den
        if st.sl_target > 0:
            st.credits = max(0.0, (st.sl_target - st.sl) * 100.0) * (shown.sla_credit_per_point if shown else 0.0)
    st.amount = max(0.0, gross - st.credits)

    calls = {k[0] for k in assigned} | {k[0] for k in outcomes} | {k[0] for k in handed}
    if records is not None:
        ours = {o.call_id: o for o in sorted(outcomes.values(), key=lambda e: e.at_s)}
        for call_id, o in ours.items():
            theirs = records.get(call_id)
            if theirs is None:
                problems.add((call_id, MISSING_IN_PARTNER_RECORDS))
            elif abs(o.talk_s - theirs["talk_s"]) > TOLERANCE_S:
                problems.add((call_id, f"talk differs (ours {_num(o.talk_s)} s, theirs {_num(theirs['talk_s'])} s)"))
        for call_id in records:
            if call_id not in ours and call_id not in elsewhere:
                problems.add((call_id, NOT_IN_OUR_RECORDS))
                calls.add(call_id)
    st.mismatches = [{"call_id": c, "problem": p} for c, p in sorted(problems)]
    st.reconciled = len(calls - {c for c, _ in problems})
    return st


def _num(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


# --- the partner's own records ---------------------------------------------------------------


class PartnerRecordsError(ValueError):
    pass


_RECORD_NUMBERS = ("answered_at", "talk_s", "wrap_s")


def _record(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise PartnerRecordsError(f"{where}: a record must be an object, got {type(raw).__name__}")
    call_id = str(raw.get("call_id") or "").strip()
    if not call_id:
        raise PartnerRecordsError(f"{where}: call_id is missing")
    rec: dict[str, Any] = {"call_id": call_id, "partner": str(raw.get("partner") or "").strip(),
                           "disposition": str(raw.get("disposition") or "")}
    for k in _RECORD_NUMBERS:
        v = raw.get(k)
        if v is None or v == "":
            rec[k] = 0.0
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = _iso_time(v) if k == "answered_at" else None
        if f is None or not math.isfinite(f) or f < 0:
            raise PartnerRecordsError(f"{where}: {k} is not a number of seconds: {v!r}")
        rec[k] = f
    return rec


def _iso_time(v: Any) -> float | None:
    try:
        d = datetime.fromisoformat(str(v).strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return (d if d.tzinfo else d.replace(tzinfo=timezone.utc)).timestamp()


def _records_by_partner(records: list[dict] | None, partner: str | None) -> dict[str, dict[str, dict]]:
    """partner -> call_id -> record (the last of a call wins)."""
    if records is None:
        return {}
    out: dict[str, dict[str, dict]] = {} if partner is None else {partner: {}}
    for i, raw in enumerate(records):
        rec = _record(raw, f"partner record {i + 1}")
        owner = rec["partner"] or partner
        if owner is None:
            raise PartnerRecordsError(f"partner record {i + 1} names no partner: give the partner "
                                      "(--partner) or a partner column")
        if partner is not None and owner != partner:
            continue  # another partner's
        out.setdefault(owner, {})[rec["call_id"]] = rec
    return out


def load_partner_records(path: str | Path) -> list[dict[str, Any]]:
    """A partner's own records of its calls: a CSV file with a header (call_id,
    answered_at, talk_s, wrap_s, disposition; optionally partner), or JSON (a list of
    such objects, or {"records": [...]}). ``answered_at``: Unix seconds or ISO time
    (UTC unless it says), empty or 0 = never answered. PartnerRecordsError when the file
    cannot be read or a record is bad."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise PartnerRecordsError(f"{p}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    if p.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PartnerRecordsError(f"{p}: not valid JSON: {e}") from None
        if isinstance(data, Mapping):
            data = data.get("records")
        if not isinstance(data, list):
            raise PartnerRecordsError(f'{p}: expected a list of records or {{"records": [...]}}')
        return [_record(r, f"{p}: record {i + 1}") for i, r in enumerate(data)]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or "call_id" not in [f.strip() for f in reader.fieldnames]:
        raise PartnerRecordsError(f"{p}: a CSV file needs a header with call_id (and talk_s, answered_at, …)")
    rows = []
    for i, r in enumerate(reader):
        clean = {(k or "").strip(): (v.strip() if isinstance(v, str) else v) for k, v in r.items()}
        rows.append(_record(clean, f"{p}: line {i + 2}"))
    return rows
