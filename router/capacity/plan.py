"""A day's staffing table from history rows (pure; no I/O): ``tandem capacity forecast``.

:func:`build_plan` takes per-call rows (``site``, ``queue``, ``offered_at``, ``outcome``,
``handle_s``, ``wait_s``: :func:`router.capacity.history.arrival_rows`) and, per (site,
queue):

1. counts the calls offered and their mean handle time per interval
   (:func:`router.capacity.forecast.interval_counts`; days start at midnight UTC, the
   history's first and last days count as whole days);
2. forecasts the calls of the day asked for with the chosen method (``decomposition``,
   ``seasonal_naive``, ``weekday_average``) from the days before it — with fewer than 7
   days of history every method needs a full week, so the forecast is the mean profile of
   the days there are (:data:`MEAN_PROFILE`; :attr:`Plan.method` says which ran) — and
   the handle time per interval (:func:`router.capacity.forecast.forecast_handle`);
3. estimates the callers' patience (:func:`estimate_patience`);
4. staffs every interval with :func:`router.capacity.staffing.staff` (Erlang A with that
   patience, Erlang C when nobody ever hung up): the agents on the phones, the agents to
   schedule after shrinkage, and the service level they give. An interval forecast to
   get no call needs nobody (agents 0, service level None).

A day that falls inside the history is forecast from the days before it only (a
backtest); one further ahead than the day after the history is the method's forecast
that many days out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from router.capacity import forecast as fc
from router.capacity.staffing import staff

METHODS = ("decomposition", "seasonal_naive", "weekday_average")
#: What runs instead of a method when the history is shorter than a week.
MEAN_PROFILE = "mean_profile"
MIN_DAYS = 7
DAY_S = 86_400


def estimate_patience(rows: Iterable[Mapping[str, Any]]) -> float | None:
    """Mean patience (seconds) of exponentially patient callers: the total time all
    callers waited (answered calls are censored: they would have waited at least that
    long) divided by the number who hung up — the maximum-likelihood estimate for
    right-censored exponential data. None when nobody hung up (patience unbounded as far
    as the history knows: Erlang C)."""
    waited, abandons = 0.0, 0
    for r in rows:
        waited += max(0.0, float(r.get("wait_s") or 0.0))
        abandons += r.get("outcome") == "abandoned"
    if not abandons:
        return None
    return max(waited / abandons, 1e-3)  # all abandoned at once: keep patience positive


@dataclass(frozen=True)
class IntervalPlan:
    """One interval of one queue: ``start`` (Unix seconds), forecast ``calls``, ``aht_s``
    (None when the queue never completed a call), ``agents`` on the phones, ``scheduled``
    after shrinkage, the ``service_level`` they give (None without calls or AHT)."""

    start: int
    calls: float
    aht_s: float | None
    agents: int | None
    scheduled: int | None
    service_level: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"start": iso_utc(self.start), "calls": self.calls, "aht_s": self.aht_s, "agents": self.agents,
                "scheduled": self.scheduled, "service_level": self.service_level}


@dataclass(frozen=True)
class QueuePlan:
    site: str
    queue: str
    patience_s: float | None
    interval_s: int
    intervals: tuple[IntervalPlan, ...]

    @property
    def calls(self) -> float:
        return sum(i.calls for i in self.intervals)

    @property
    def agent_hours(self) -> float:
        return sum(i.agents or 0 for i in self.intervals) * self.interval_s / 3600

    @property
    def scheduled_hours(self) -> float:
        return sum(i.scheduled or 0 for i in self.intervals) * self.interval_s / 3600

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "queue": self.queue, "patience_s": self.patience_s,
                "intervals": [i.to_dict() for i in self.intervals], "calls": self.calls,
                "agent_hours": self.agent_hours, "scheduled_hours": self.scheduled_hours}


@dataclass(frozen=True)
class Plan:
    """The staffing table of ``day`` (Unix seconds of its midnight UTC); ``method`` is
    the one that ran (:data:`MEAN_PROFILE` for a history shorter than a week),
    ``history_days`` how many days it learned from."""

    day: int
    method: str
    history_days: int
    interval_s: int
    sl_threshold_s: float
    sl_goal: float
    queues: tuple[QueuePlan, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"day": iso_utc(self.day)[:10], "method": self.method, "history_days": self.history_days,
                "interval_s": self.interval_s, "sl_threshold_s": self.sl_threshold_s, "sl_goal": self.sl_goal,
                "queues": [q.to_dict() for q in self.queues]}


def iso_utc(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def history_span(rows: Sequence[Mapping[str, Any]]) -> tuple[int, int] | None:
    """(midnight UTC of the first row's day, of the last row's day), None without rows."""
    if not rows:
        return None
    ts = [int(r["offered_at"]) for r in rows]
    return min(ts) // DAY_S * DAY_S, max(ts) // DAY_S * DAY_S


def forecast_day(counts: Sequence[Sequence[float]], handle_s: Sequence[Sequence[float]], ahead: int,
                 method: str, first_weekday: int) -> tuple[list[float], list[float], str]:
    """(calls per interval, mean handle time per interval, the method that ran) of the
    day ``ahead`` days after the last of ``counts`` (1 = the next day)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if ahead < 1 or not counts:
        raise ValueError("need at least one day of history before the day to forecast")
    if len(counts) < MIN_DAYS:
        calls = [sum(col) / len(counts) for col in zip(*counts)]
        used = MEAN_PROFILE
    elif method == "decomposition":
        calls = fc.decomposition(counts, ahead, first_weekday=first_weekday)[-1]
        used = method
    elif method == "seasonal_naive":
        calls = fc.seasonal_naive(counts, ahead)[-1]
        used = method
    else:
        calls = fc.weekday_average(counts, horizon=ahead)[-1]
        used = method
    aht = fc.forecast_handle(handle_s, counts, ahead, first_weekday=first_weekday)[-1]
    return [max(0.0, float(c)) for c in calls], [float(h) for h in aht], used


def staff_day(calls: Sequence[float], aht_s: Sequence[float | None], day: int, interval_s: int,
              sl_threshold_s: float, sl_goal: float, *, patience_s: float | None = None,
              max_occupancy: float | None = None, shrinkage: float = 0.0) -> list[IntervalPlan]:
    """Staff each interval of a day: ``calls[i]`` forecast in the interval starting at
    ``day + i * interval_s``, handled in ``aht_s[i]`` seconds on average."""
    out = []
    for i, (c, h) in enumerate(zip(calls, aht_s)):
        start = day + i * interval_s
        aht = h if h is not None and h > 0 and math.isfinite(h) else None
        if c <= 0:
            out.append(IntervalPlan(start, 0.0, aht, 0, 0, None))
        elif aht is None:
            out.append(IntervalPlan(start, c, None, None, None, None))
        else:
            r = staff(c * 3600.0 / interval_s, aht, sl_threshold_s, sl_goal, patience_s=patience_s,
                      max_occupancy=max_occupancy, shrinkage=shrinkage)
            out.append(IntervalPlan(start, c, aht, r.agents, r.scheduled, r.service_level))
    return out


def build_plan(rows: Sequence[Mapping[str, Any]], day: int | None = None, *, method: str = "decomposition",
               interval_s: int = 900, sl_threshold_s: float = 20.0, sl_goal: float = 0.8,
               max_occupancy: float | None = None, shrinkage: float = 0.0) -> Plan:
    """The staffing table of ``day`` (any Unix second of it, UTC; default the day after
    the history's last) for every (site, queue) in ``rows``. ``ValueError`` when there is
    no history before ``day`` or an argument is out of range."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if not (60 <= interval_s <= DAY_S and DAY_S % interval_s == 0):
        raise ValueError(f"the interval must divide a day and be at least a minute, got {interval_s} s")
    span = history_span(rows)
    if span is None:
        raise ValueError("no calls in the history")
    first, last = span
    day = last + DAY_S if day is None else int(day) // DAY_S * DAY_S
    if day <= first:
        raise ValueError(f"no history before {iso_utc(day)[:10]} (it starts {iso_utc(first)[:10]})")
    before = [r for r in rows if int(r["offered_at"]) < day]
    # One key per (site, queue): interval_counts groups by "queue" alone, and keeps every
    # queue over the same days.
    keyed = [dict(r, queue=f"{r['site']}\x00{r['queue']}") for r in before]
    series = fc.interval_counts(keyed, interval_s)
    by_key: dict[str, list[Mapping[str, Any]]] = {}
    for r in keyed:
        by_key.setdefault(r["queue"], []).append(r)
    queues = []
    used, ndays = MEAN_PROFILE, 0
    for key, h in sorted(series.items()):
        site, queue = key.split("\x00", 1)
        ndays = len(h.counts)
        ahead = (day - h.first_day) // DAY_S - ndays + 1
        calls, aht, used = forecast_day(h.counts, h.handle_s, ahead, method, h.first_weekday)
        patience = estimate_patience(by_key[key])
        intervals = staff_day(calls, aht, day, interval_s, sl_threshold_s, sl_goal, patience_s=patience,
                              max_occupancy=max_occupancy, shrinkage=shrinkage)
        queues.append(QueuePlan(site, queue, patience, interval_s, tuple(intervals)))
    return Plan(day, used, ndays, interval_s, sl_threshold_s, sl_goal, tuple(queues))
