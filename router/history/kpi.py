"""Contact-center KPIs from the history, per site, queue, region, partner and interval.

:func:`kpis` runs three queries (each the same SQL on clickhouse-server 18.16 and chdb) and
merges them by group:

* **interactions** (one row per call, bucketed by ``offered_at``):
  offered, answered, abandoned, rejected;
  **service level** by each queue's own :class:`ServiceLevelDefinition` (threshold and
  how abandons count, passed in per (site, queue)): ``answered within T /
  (answered + abandoned)`` (count_against), ``/ answered`` (exclude), ``/ (answered +
  abandoned after T)`` (short_excluded) — a group of several queues sums each call's
  numerator and denominator, as :mod:`router.sim.report` does;
  **ASA** = mean wait of answered calls; **AHT** = mean handle time (talk + wrap-up) of
  completed calls; **abandon rate** = abandoned / (answered + abandoned);
  **CSAT** = mean score of the calls that have one (1..5).
* **FCR** (first-contact resolution): the share of completed contacts after which the
  same customer (``customer_id``, else the caller number) made no other contact for the
  same skill within ``fcr_days`` — any outcome but rejected counts as a contact, and so
  does another contact in the same second. Later contacts up to ``fcr_days`` past the
  report's end are looked at. (Customers are grouped by a 64-bit hash of customer and
  skill: two customers would have to collide for a miscount.)
* **occupancy** = handling time (busy + wrap-up) / staffed time (signed in: ready, busy,
  wrap-up, not ready), from the intervals in ``agent_state_changes`` clipped to the
  report range and to each bucket. Agents serve several queues, so occupancy exists only
  for groupings by site, region and partner (None when grouping by queue, skill...).
  An agent's current state counts once its next change (or a checkpoint row) is written.

**Deduplication** (invariant 5): every read is ``FROM <table> FINAL``. Both servers merge
the rows of one key at read time, so a replayed row is never counted twice. FINAL was
chosen over ``GROUP BY key`` + ``argMax``: on 18.16 the KPI query over 10 M rows took
~3 s with FINAL and ~47 s with argMax (the GROUP BY builds a 10 M-key hash table); chdb
runs the very same text. Filters inside the FINAL subqueries touch
only columns that never differ between the versions of a row (``offered_at``, ``at``), so
filtering before the merge cannot keep a stale version; everything else is filtered after.

Cost (bench/history.py, 10 M rows, 18.16 on 2 cores): the interactions query ~3.3 s, the
FCR query ~11 s (it groups every contact by customer); occupancy reads the much smaller
agent_state_changes table.

Times are Unix seconds (UTC); buckets start at multiples of ``interval_s``.

**Compressed runs**: ``tandem demo`` runs its nodes on site files whose durations are
divided by its time scale (60 simulated seconds per real second by default), so their
history holds compressed times. It records the scale in ``DATA_DIR/time_scale``
(:data:`TIME_SCALE_FILE`); ``tandem report kpi`` then reads the history in the run's time:
:func:`in_run_time` multiplies every duration back (waits, handle times, agents'
handling and staffed time; shares and rates are unchanged), and the command divides the
bucket length and the FCR window by the scale before querying.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from router.config import ServiceLevelDefinition, SiteConfig
from router.history.store import HistoryStore

#: Columns a report may group by; occupancy only for the first three.
DIMENSIONS = ("site", "region", "partner", "queue", "skill", "channel", "language", "origin_region")
OCCUPANCY_DIMENSIONS = frozenset({"site", "region", "partner"})
#: "No end": 2100-01-01 (18.16 cannot take a DateTime past 2106, nor 2**32-1).
END_OF_TIME = 4_102_444_800
_MODES = {"count_against": 0, "exclude": 1, "short_excluded": 2}

SlDefinitions = Mapping[tuple[str, str], ServiceLevelDefinition]
#: The file in a demo's data dir that holds its time scale (simulated s per real s).
TIME_SCALE_FILE = "time_scale"


def sl_definitions(sites: Iterable[SiteConfig]) -> dict[tuple[str, str], ServiceLevelDefinition]:
    """(site, queue) -> the queue's service-level definition, from site files."""
    return {(s.site.name, q.name): q.service_level for s in sites for q in s.queues}


@dataclass(frozen=True)
class KpiQuery:
    by: tuple[str, ...] = ("site", "queue")
    interval_s: int | None = None  # e.g. 900 for 15-minute buckets; None = whole range
    start: int = 0  # offered_at >= start (Unix seconds)
    end: int = END_OF_TIME  # offered_at < end
    fcr_days: float = 7.0
    service_levels: SlDefinitions = field(default_factory=dict)
    default_sl: ServiceLevelDefinition = ServiceLevelDefinition()

    def __post_init__(self) -> None:
        bad = [d for d in self.by if d not in DIMENSIONS]
        if bad:
            raise ValueError(f"cannot group by {bad}; choose from {', '.join(DIMENSIONS)}")
        if len(set(self.by)) != len(self.by):
            raise ValueError("a dimension is named twice")
        if self.interval_s is not None and not 60 <= self.interval_s <= 366 * 86400:
            raise ValueError("interval must be between 1 minute and 366 days")
        if not 0 <= self.start < self.end <= END_OF_TIME:
            raise ValueError("need 0 <= start < end <= 2100-01-01")
        if not 0 <= self.fcr_days <= 366:
            raise ValueError("fcr_days must be 0..366")


@dataclass
class KpiRow:
    group: dict[str, str]
    bucket: int | None  # start of the interval (Unix seconds), None without --interval
    offered: int = 0
    answered: int = 0
    abandoned: int = 0
    rejected: int = 0
    sl_num: int = 0
    sl_den: int = 0
    wait_sum_s: float = 0.0
    handled: int = 0  # completed calls (AHT's denominator)
    handle_sum_s: float = 0.0
    csat_sum: int = 0
    csat_n: int = 0
    fcr_num: int = 0
    fcr_den: int = 0
    handling_time_s: float = 0.0
    staffed_time_s: float = 0.0
    occupancy_known: bool = False

    @property
    def service_level(self) -> float | None:
        return self.sl_num / self.sl_den if self.sl_den else None

    @property
    def asa_s(self) -> float | None:
        return self.wait_sum_s / self.answered if self.answered else None

    @property
    def aht_s(self) -> float | None:
        return self.handle_sum_s / self.handled if self.handled else None

    @property
    def abandon_rate(self) -> float | None:
        n = self.answered + self.abandoned
        return self.abandoned / n if n else None

    @property
    def csat(self) -> float | None:
        return self.csat_sum / self.csat_n if self.csat_n else None

    @property
    def fcr(self) -> float | None:
        return self.fcr_num / self.fcr_den if self.fcr_den else None

    @property
    def occupancy(self) -> float | None:
        if not self.occupancy_known or not self.staffed_time_s:
            return None
        return self.handling_time_s / self.staffed_time_s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("occupancy_known")
        for k in ("service_level", "asa_s", "aht_s", "abandon_rate", "csat", "fcr", "occupancy"):
            d[k] = getattr(self, k)
        return d


def in_run_time(rows: list[KpiRow], scale: float) -> list[KpiRow]:
    """Rows of a run compressed ``scale`` times, in the run's own time: every duration
    multiplied by ``scale`` (in place; returns ``rows``)."""
    if scale != 1.0:
        for r in rows:
            r.wait_sum_s *= scale
            r.handle_sum_s *= scale
            r.handling_time_s *= scale
            r.staffed_time_s *= scale
    return rows


# --- SQL -----------------------------------------------------------------------------------


def _sl_exprs(q: KpiQuery) -> tuple[str, str]:
    """Per-row threshold and abandon mode, looked up by 'site/queue'."""
    d = q.default_sl
    if not q.service_levels:
        return repr(float(d.threshold_s)), str(_MODES[d.abandons])
    keys = sorted(q.service_levels)
    names = ", ".join(_lit(f"{s}/{n}") for s, n in keys)
    ts = ", ".join(repr(float(q.service_levels[k].threshold_s)) for k in keys)
    ms = ", ".join(f"toUInt8({_MODES[q.service_levels[k].abandons]})" for k in keys)
    key = "concat(site, '/', queue)"
    return (
        f"transform({key}, [{names}], [{ts}], {float(d.threshold_s)!r})",
        f"transform({key}, [{names}], [{ms}], toUInt8({_MODES[d.abandons]}))",
    )


def _lit(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _bucket(col: str, q: KpiQuery) -> str:
    if q.interval_s is None:
        return "toUInt32(0)"
    return f"intDiv(toUInt32({col}), {int(q.interval_s)}) * {int(q.interval_s)}"


def _dimhash(q: KpiQuery) -> str:
    """One UInt64 standing for a group's dimension values (the FCR query carries it
    instead of the strings: 40% faster at 10 M rows on 18.16)."""
    return f"cityHash64({', '.join(q.by)})" if q.by else "toUInt64(0)"


def _group_clause(q: KpiQuery) -> tuple[str, str]:
    """(select list prefix, GROUP BY/ORDER BY clause)."""
    cols = list(q.by) + ["bucket"]
    return ", ".join(cols), ", ".join(cols)


def interactions_sql(q: KpiQuery) -> str:
    sl_t, sl_m = _sl_exprs(q)
    sel, grp = _group_clause(q)
    dims = ", ".join(DIMENSIONS)
    return f"""
SELECT {sel},
    count() AS n_offered,
    sum(ans) AS n_answered,
    sum(ab) AS n_abandoned,
    sum(rej) AS n_rejected,
    sum(ans AND wait_s <= sl_t) AS n_sl_num,
    sum(ans) + sum(ab AND (sl_m = 0 OR (sl_m = 2 AND wait_s > sl_t))) AS n_sl_den,
    sumIf(wait_s, ans) AS s_wait,
    sum(done) AS n_handled,
    sumIf(handle_s, done) AS s_handle,
    sumIf(csat, csat > 0) AS s_csat,
    countIf(csat > 0) AS n_csat,
    any(dimhash) AS dimhash
FROM (
    SELECT {dims}, {_bucket('offered_at', q)} AS bucket,
        toUInt32(answered_at) > 0 AS ans,
        outcome = 'abandoned' AS ab,
        outcome = 'rejected' AS rej,
        outcome = 'completed' AND toUInt32(answered_at) > 0 AS done,
        wait_s, handle_s, csat,
        {sl_t} AS sl_t,
        {sl_m} AS sl_m,
        {_dimhash(q)} AS dimhash
    FROM {{db}}.interactions FINAL
    WHERE offered_at >= toDateTime({q.start}, 'UTC') AND offered_at < toDateTime({q.end}, 'UTC')
)
GROUP BY {grp}
ORDER BY {grp}
"""


def fcr_sql(q: KpiQuery) -> str:
    """Contacts grouped by a 64-bit hash of (customer, skill) — a string key made the
    hash table the slowest part at 10 M rows — as arrays of numeric tuples (offered
    second, completed?, group hash) sorted by time; a contact is repeated when its
    successor came within the window or its predecessor in the same second (so the order
    among same-second contacts does not matter). Rows come out as (group hash, bucket,
    den, num); :func:`kpis` maps the hash back to the group's values."""
    window = int(round(q.fcr_days * 86400))
    horizon = min(END_OF_TIME, q.end + window)
    return f"""
SELECT dimhash, bucket, count() AS n_fcr_den, sum(NOT rep) AS n_fcr_num
FROM (
    SELECT c.1 AS t, c.2 AS done, c.3 AS dimhash,
        {_bucket('c.1', q)} AS bucket,
        (nt > 0 AND toInt64(nt) - toInt64(c.1) <= {window}) OR pt = c.1 AS rep
    FROM (
        SELECT arraySort(x -> x.1, groupArray((toUInt32(offered_at), toUInt8(outcome = 'completed'), dh))) AS cs,
            arrayMap(x -> x.1, cs) AS ts,
            arrayPushBack(arrayPopFront(ts), toUInt32(0)) AS nts,
            arrayPushFront(arrayPopBack(ts), toUInt32(0)) AS pts
        FROM (
            SELECT * FROM (
                SELECT outcome, offered_at, {_dimhash(q)} AS dh,
                    if(customer_id != '', concat('id:', customer_id), concat('tel:', caller)) AS cust,
                    cityHash64(cust, skill) AS cust_skill
                FROM {{db}}.interactions FINAL
                WHERE offered_at >= toDateTime({q.start}, 'UTC')
                  AND offered_at < toDateTime({horizon}, 'UTC')
            )
            WHERE outcome != 'rejected' AND cust NOT IN ('id:', 'tel:')
        )
        GROUP BY cust_skill
    )
    ARRAY JOIN cs AS c, nts AS nt, pts AS pt
)
WHERE done AND t >= {q.start} AND t < {q.end}
GROUP BY dimhash, bucket
"""


def occupancy_sql(q: KpiQuery) -> str:
    sel, grp = _group_clause(q)
    lo = f"greatest(toInt64(toUInt32(prev_at)), toInt64({q.start}))"
    hi = f"least(toInt64(toUInt32(at)), toInt64({q.end}))"
    if q.interval_s is None:
        bucket_join = ""
        span = f"{hi} - {lo}"
        bucket = "toUInt32(0)"
    else:
        iv = int(q.interval_s)
        bucket_join = (
            f"ARRAY JOIN arrayMap(k -> (intDiv({lo}, {iv}) + k) * {iv}, "
            f"range(toUInt64(intDiv({hi} - 1, {iv}) - intDiv({lo}, {iv}) + 1))) AS b"
        )
        span = f"least({hi}, b + {iv}) - greatest({lo}, b)"
        bucket = "toUInt32(b)"
    return f"""
SELECT {sel},
    sumIf(secs, st IN ('busy', 'wrap_up')) AS s_handling,
    sumIf(secs, st IN ('ready', 'busy', 'wrap_up', 'not_ready')) AS s_staffed
FROM (
    SELECT site, region, partner, prev_state AS st, {bucket} AS bucket, {span} AS secs
    FROM (
        SELECT site, region, partner, prev_state, prev_at, at
        FROM {{db}}.agent_state_changes FINAL
        WHERE at > toDateTime({q.start}, 'UTC') AND prev_at < toDateTime({q.end}, 'UTC')
    )
    {bucket_join}
    WHERE toUInt32(prev_at) > 0 AND {hi} > {lo}
)
WHERE secs > 0
GROUP BY {grp}
ORDER BY {grp}
"""


# --- running ---------------------------------------------------------------------------------


def kpis(store: HistoryStore, q: KpiQuery) -> list[KpiRow]:
    """The KPI rows of ``q``, sorted by group then bucket."""
    n = len(q.by)
    rows: dict[tuple, KpiRow] = {}

    def row(key: Sequence[Any]) -> KpiRow:
        k = tuple(str(v) for v in key[:n]) + (int(key[n]),)
        r = rows.get(k)
        if r is None:
            r = rows[k] = KpiRow(dict(zip(q.by, k[:n])), k[n] if q.interval_s else None)
        return r

    groups: dict[int, tuple] = {}  # dimension hash -> dimension values
    for rec in store.query(interactions_sql(q)):
        r = row(rec)
        (r.offered, r.answered, r.abandoned, r.rejected, r.sl_num, r.sl_den, r.wait_sum_s,
         r.handled, r.handle_sum_s, r.csat_sum, r.csat_n) = _numbers(rec[n + 1:n + 12])
        groups[int(rec[n + 12])] = tuple(rec[:n])
    for dimhash, bucket, den, num in store.query(fcr_sql(q)):
        # Every completed contact in range is also an offered one: its group is known.
        r = row(groups[int(dimhash)] + (bucket,))
        r.fcr_den, r.fcr_num = int(den), int(num)
    if set(q.by) <= OCCUPANCY_DIMENSIONS:
        for r in rows.values():
            r.occupancy_known = True
        for rec in store.query(occupancy_sql(q)):
            r = row(rec)
            r.occupancy_known = True
            r.handling_time_s, r.staffed_time_s = float(rec[n + 1]), float(rec[n + 2])
    return [rows[k] for k in sorted(rows)]


def _numbers(values: Sequence[Any]) -> list:
    out = []
    for v in values:
        if isinstance(v, float):
            out.append(0.0 if math.isnan(v) else v)
        else:
            out.append(int(v) if v is not None else 0)
    return out
