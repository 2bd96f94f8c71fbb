"""Arrival and handle-time forecasts per queue and interval (pure; no I/O, no numpy).

A history is a list of days, each a list of interval values (96 for 15-minute
intervals), oldest first; a forecast has the same form for the days after it. Day ``d``
of a history falls on weekday ``(first_weekday + d) % 7`` (0 = Monday). ``holidays``
maps a day index (of the history or of the forecast days that follow it) to that day's
traffic as a fraction of a Sunday's (1.0: a Sunday-like day, 0.05: nearly closed).

Methods:

* :func:`seasonal_naive` — each day as the same weekday one week before (the anchor).
* :func:`weekday_average` — the mean of the same weekday over the last ``weeks`` weeks.
* :func:`decomposition` — multiplicative: level with a linear trend (least squares on
  the daily totals of the last ``weeks`` weeks, each divided by its weekday factor) ×
  weekday factor × intraday profile. The profile is pooled over every day of a *day
  type* (Monday-Friday, Saturday, Sunday) in those weeks and smoothed over neighbouring
  intervals. Holidays are left out of the fit and forecast as a Sunday times their
  fraction.
* :func:`intraday_reforecast` — the rest of today, scaled by how the day has run so far.
* :func:`forecast_handle` — mean handle time per interval, a call-weighted profile.

:func:`interval_counts` turns history rows (``offered_at``, ``queue``, ``handle_s``)
into these per-queue series, so the same methods run on the ClickHouse history.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Days = Sequence[Sequence[float]]
#: Weekday (Monday first) -> day type: weekdays pooled, Saturday and Sunday each alone.
DAY_TYPES = (0, 0, 0, 0, 0, 1, 2)
SUNDAY = 6


def seasonal_naive(history: Days, horizon: int) -> list[list[float]]:
    """Day ``len(history) + h`` = the day one week before it (repeating the last week
    when ``horizon`` > 7). Needs at least 7 days."""
    if len(history) < 7:
        raise ValueError("seasonal_naive needs at least 7 days of history")
    out: list[list[float]] = []
    for h in range(horizon):
        src = history[len(history) - 7 + h % 7]
        out.append([float(v) for v in src])
    return out


def weekday_average(history: Days, weeks: int = 4, horizon: int = 1) -> list[list[float]]:
    """Each forecast day = the interval-wise mean of the same weekday over the last
    ``weeks`` weeks (fewer if the history is shorter; at least one)."""
    if len(history) < 7:
        raise ValueError("weekday_average needs at least 7 days of history")
    n = len(history)
    out = []
    for h in range(horizon):
        target = n + h
        same = [target - 7 * k for k in range(1, weeks + 1) if 0 <= target - 7 * k < n]
        days = [history[d] for d in same]
        out.append([sum(col) / len(days) for col in zip(*days)])
    return out


def _smooth(values: Sequence[float], passes: int) -> list[float]:
    """``passes`` times the [1, 2, 1] / 4 kernel (each end taken as its own neighbour)."""
    v = list(values)
    for _ in range(passes):
        if len(v) < 3:
            break
        v = [v[0] * 0.75 + v[1] * 0.25] + [
            0.25 * v[i - 1] + 0.5 * v[i] + 0.25 * v[i + 1] for i in range(1, len(v) - 1)
        ] + [v[-1] * 0.75 + v[-2] * 0.25]
    return v


@dataclass(frozen=True)
class Decomposition:
    """A fitted multiplicative model: expected calls in interval ``i`` of day ``d`` =
    ``(intercept + slope * d) * weekday[wd] * profiles[DAY_TYPES[wd]][i]`` (profiles sum
    to 1 over a day; ``weekday`` has mean 1)."""

    intercept: float
    slope: float
    weekday: tuple[float, ...]
    profiles: tuple[tuple[float, ...], ...]
    first_weekday: int
    day_types: tuple[int, ...] = DAY_TYPES

    def day(self, d: int, holiday: float | None = None) -> list[float]:
        wd = SUNDAY if holiday is not None else (self.first_weekday + d) % 7
        total = max(0.0, self.intercept + self.slope * d) * self.weekday[wd] * (1.0 if holiday is None else holiday)
        return [total * p for p in self.profiles[self.day_types[wd]]]


def fit_decomposition(history: Days, *, first_weekday: int = 0, holidays: Mapping[int, float] | None = None,
                      weeks: int = 6, smooth: int = 2, day_types: Sequence[int] = DAY_TYPES,
                      iterations: int = 8) -> Decomposition:
    """Fit :class:`Decomposition` on the last ``weeks`` weeks of ``history`` (holidays
    left out). Needs every weekday at least once outside holidays."""
    hol = holidays or {}
    n = len(history)
    width = len(history[0])
    days = [d for d in range(max(0, n - 7 * weeks), n) if d not in hol]
    totals = {d: float(sum(history[d])) for d in days}
    wd_of = {d: (first_weekday + d) % 7 for d in days}
    if {wd_of[d] for d in days} != set(range(7)):
        raise ValueError("fit_decomposition needs every weekday outside holidays")
    weekday = [1.0] * 7
    intercept, slope = 0.0, 0.0
    for _ in range(iterations):
        # Trend: least squares on the deseasonalised daily totals.
        xs = days
        ys = [totals[d] / weekday[wd_of[d]] for d in days]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
        intercept = my - slope * mx
        # Weekday factors: ratio of sums (robust to quiet days), then mean 1.
        num, den = [0.0] * 7, [0.0] * 7
        for d in days:
            num[wd_of[d]] += totals[d]
            den[wd_of[d]] += max(1e-9, intercept + slope * d)
        weekday = [num[k] / den[k] for k in range(7)]
        mean = sum(weekday) / 7
        if mean <= 0:
            break
        weekday = [w / mean for w in weekday]
        intercept, slope = intercept * mean, slope * mean
    profiles: list[tuple[float, ...]] = []
    for t in range(max(day_types) + 1):
        sums = [0.0] * width
        for d in days:
            if day_types[wd_of[d]] == t:
                for i, v in enumerate(history[d]):
                    sums[i] += v
        sums = _smooth(sums, smooth)
        whole = sum(sums)
        profiles.append(tuple(s / whole for s in sums) if whole > 0 else tuple([1.0 / width] * width))
    return Decomposition(intercept, slope, tuple(weekday), tuple(profiles), first_weekday, tuple(day_types))


def decomposition(history: Days, horizon: int = 1, *, first_weekday: int = 0,
                  holidays: Mapping[int, float] | None = None, weeks: int = 6,
                  smooth: int = 2) -> list[list[float]]:
    """The next ``horizon`` days by :func:`fit_decomposition`."""
    hol = holidays or {}
    model = fit_decomposition(history, first_weekday=first_weekday, holidays=hol, weeks=weeks, smooth=smooth)
    n = len(history)
    return [model.day(d, hol.get(d)) for d in range(n, n + horizon)]


def holiday_fraction(history: Days, days: Iterable[int], *, first_weekday: int = 0,
                     holidays: Mapping[int, float] | None = None, weeks: int = 6) -> float:
    """The history's own holiday pattern: the traffic of the past holidays ``days`` as a
    fraction of what a Sunday would have had on those dates (the model fitted on
    ``history`` without ``holidays``, which should include ``days``) — the fraction to
    give a coming holiday of the same kind."""
    hol = dict(holidays or {})
    picked = list(days)
    hol.update({d: 0.0 for d in picked if d not in hol})
    model = fit_decomposition(history, first_weekday=first_weekday, holidays=hol, weeks=weeks)
    expected = sum(sum(model.day(d, 1.0)) for d in picked)
    return sum(sum(history[d]) for d in picked) / expected if expected > 0 else 0.0


def intraday_reforecast(forecast_today: Sequence[float], actual_so_far: Sequence[float],
                        prior_calls: float = 30.0) -> list[float]:
    """The rest of today (the intervals after ``actual_so_far``): ``forecast_today``
    times ``(actual + k) / (forecast + k)`` over the intervals so far — the ratio of what
    came to what was expected, shrunk toward 1 by ``k = prior_calls`` pseudo-calls (a
    gamma prior on the day's level), so a quiet morning moves a small queue little."""
    n = len(actual_so_far)
    if n > len(forecast_today):
        raise ValueError("more actual intervals than the day has")
    expected = sum(forecast_today[:n])
    ratio = (sum(actual_so_far) + prior_calls) / (expected + prior_calls) if expected + prior_calls > 0 else 1.0
    return [f * ratio for f in forecast_today[n:]]


def wape(actual: Iterable[float] | Days, forecast: Iterable[float] | Days) -> float:
    """Weighted absolute percentage error: sum |actual - forecast| / sum actual (flat
    sequences or lists of days; NaN when nothing came)."""
    a, f = _flat(actual), _flat(forecast)
    if len(a) != len(f):
        raise ValueError(f"{len(a)} actual values, {len(f)} forecast")
    total = sum(a)
    return sum(abs(x - y) for x, y in zip(a, f)) / total if total else float("nan")


def _flat(values: Any) -> list[float]:
    out: list[float] = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out.extend(float(x) for x in v)
        else:
            out.append(float(v))
    return out


def forecast_handle(handle_s: Days, counts: Days, horizon: int = 1, *, first_weekday: int = 0,
                    holidays: Mapping[int, float] | None = None, weeks: int = 4, smooth: int = 2,
                    day_types: Sequence[int] = DAY_TYPES) -> list[list[float]]:
    """Mean handle time per interval of the next ``horizon`` days: per day type, the
    call-weighted mean over the last ``weeks`` weeks (holidays left out) of each
    interval, smoothed over neighbours (also call-weighted); where no call came, the
    day type's mean, else the overall mean."""
    hol = holidays or {}
    n, width = len(counts), len(counts[0])
    days = [d for d in range(max(0, n - 7 * weeks), n) if d not in hol]
    calls: dict[int, list[float]] = {}
    seconds: dict[int, list[float]] = {}
    for d in days:
        t = day_types[(first_weekday + d) % 7]
        c, s = calls.setdefault(t, [0.0] * width), seconds.setdefault(t, [0.0] * width)
        for i in range(width):
            c[i] += counts[d][i]
            s[i] += counts[d][i] * handle_s[d][i]
    all_calls = sum(sum(c) for c in calls.values())
    overall = sum(sum(s) for s in seconds.values()) / all_calls if all_calls else 0.0
    profile: dict[int, list[float]] = {}
    for t, raw in calls.items():
        c, s = _smooth(raw, smooth), _smooth(seconds[t], smooth)
        mean = sum(seconds[t]) / sum(raw) if sum(raw) else overall
        profile[t] = [s[i] / c[i] if c[i] > 0 else mean for i in range(width)]
    out = []
    for d in range(n, n + horizon):
        t = day_types[SUNDAY if d in hol else (first_weekday + d) % 7]
        out.append(list(profile.get(t, [overall] * width)))
    return out


@dataclass(frozen=True)
class QueueHistory:
    """One queue's interval series from history rows: ``counts[d][i]`` calls offered,
    ``handle_s[d][i]`` their mean handle time (completed calls only; 0.0 if none). Day
    0 starts at ``first_day`` (Unix seconds, local midnight) and is ``first_weekday``."""

    counts: list[list[int]]
    handle_s: list[list[float]]
    first_day: int
    first_weekday: int


def interval_counts(rows: Iterable[Mapping[str, Any]], interval_s: int = 900,
                    utc_offset_s: int = 0) -> dict[str, QueueHistory]:
    """Per queue (rows with an empty queue are skipped): calls offered per interval of
    ``interval_s`` (by ``offered_at``) and the mean ``handle_s`` of those with one, every
    queue over the same days: from the first row's day to the last row's, days starting
    at midnight UTC + ``utc_offset_s`` (the site's local time)."""
    if 86_400 % interval_s:
        raise ValueError("interval_s must divide a day")
    width = 86_400 // interval_s
    cells: dict[str, dict[tuple[int, int], list[float]]] = {}
    first = last = None
    for r in rows:
        if not r.get("queue"):
            continue
        local = int(r["offered_at"]) + utc_offset_s
        day, slot = divmod(local, 86_400)
        first = day if first is None or day < first else first
        last = day if last is None or day > last else last
        cell = cells.setdefault(r["queue"], {}).setdefault((day, slot // interval_s), [0, 0, 0.0])
        cell[0] += 1
        h = float(r.get("handle_s") or 0.0)
        if h > 0:
            cell[1] += 1
            cell[2] += h
    if first is None or last is None:
        return {}
    ndays = last - first + 1
    weekday = (first + 3) % 7  # 1970-01-01 was a Thursday
    out = {}
    for queue, qcells in sorted(cells.items()):
        counts = [[0] * width for _ in range(ndays)]
        handle = [[0.0] * width for _ in range(ndays)]
        for (day, i), (n, nh, hs) in qcells.items():
            counts[day - first][i] = int(n)
            handle[day - first][i] = hs / nh if nh else 0.0
        out[queue] = QueueHistory(counts, handle, first * 86_400 - utc_offset_s, weekday)
    return out
