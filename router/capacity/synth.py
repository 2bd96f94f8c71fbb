"""Synthetic interval history for forecasting (seeded, deterministic, pure).

Per queue and 15-minute interval (96 a day): the calls offered and their mean handle
time, drawn around known expected rates, so a backtest can compare a forecast with the
best any forecast could do (the *Poisson floor*: the error of forecasting with the true
rates themselves).

The expected rate of interval ``i`` of day ``d`` of a queue is

    peak * weekly[weekday] * shape[day type][i] * (1 + trend * d / 7) * holiday

* ``shape``: the intraday profile, maximum 1. Weekdays have two peaks (mid-morning and
  mid-afternoon, the afternoon one lower); Saturday and Sunday one flat midday hump. A
  little traffic all night.
* ``weekly``: Monday busiest, Friday a little lower, Saturday about half, Sunday a
  quarter (:data:`WEEKLY`).
* ``trend``: linear growth per week (each queue its own, some shrinking).
* holidays: listed days (``holidays``: day -> fraction) that take Sunday's weekly factor
  and shape times the fraction: 1.0 a Sunday-like day, 0.05 a near-closed one.
* ``day_noise`` (0 by default): a random level per day (lognormal, this sigma), part of
  the true rate — what an intraday re-forecast is for.

Counts are Poisson around the rate; the mean handle time of an interval is the mean of
its calls' exponential handle times (a gamma draw), 0.0 when no call came.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

INTERVALS = 96
#: Monday .. Sunday.
WEEKLY = (1.15, 1.05, 1.0, 1.0, 0.9, 0.45, 0.25)
#: (peak calls per interval on a reference Monday-to-Friday day, weekly trend, AHT seconds)
QUEUES = ((2.0, 0.02, 420.0), (10.0, -0.01, 300.0), (50.0, 0.01, 240.0), (200.0, 0.015, 180.0))
CLOSED = 0.05


def _gauss(h: float, mu: float, sigma: float) -> float:
    return math.exp(-0.5 * ((h - mu) / sigma) ** 2)


def _shape(weekend: bool) -> tuple[float, ...]:
    raw = []
    for i in range(INTERVALS):
        h = (i + 0.5) * 24 / INTERVALS
        if weekend:
            raw.append(0.02 + _gauss(h, 12.5, 2.6))
        else:
            raw.append(0.02 + _gauss(h, 10.5, 1.4) + 0.75 * _gauss(h, 15.0, 1.8))
    top = max(raw)
    return tuple(r / top for r in raw)


WEEKDAY_SHAPE = _shape(False)
WEEKEND_SHAPE = _shape(True)


@dataclass(frozen=True)
class SynthQueue:
    """One queue's days: ``counts[d][i]`` offered calls, ``rates[d][i]`` their expected
    value, ``handle_s[d][i]`` the mean handle time of those calls (0.0 if none)."""

    name: str
    peak: float
    aht_s: float
    counts: list[list[int]]
    rates: list[list[float]]
    handle_s: list[list[float]]


@dataclass(frozen=True)
class SynthHistory:
    """``days`` days from a day whose weekday is ``first_weekday`` (0 = Monday);
    ``holidays``: day index -> fraction of a Sunday's traffic."""

    days: int
    first_weekday: int
    holidays: dict[int, float]
    queues: tuple[SynthQueue, ...]


def default_holidays(days: int, first_weekday: int = 0) -> dict[int, float]:
    """Three Monday-to-Friday holidays spread over ``days`` (one of them in the last week):
    Sunday-like, near-closed, Sunday-like."""
    out: dict[int, float] = {}
    for day, fraction in ((days // 4, 1.0), (days // 2 + 1, CLOSED), (days - 4, 1.0)):
        while (first_weekday + day) % 7 >= 5:
            day -= 1
        if 0 <= day < days:
            out[day] = fraction
    return out


def poisson(rnd: random.Random, lam: float) -> int:
    """An exact Poisson draw (inversion; large means as a sum of smaller ones)."""
    if lam <= 0:
        return 0
    total = 0
    while lam > 500:
        total += poisson(rnd, 500.0)
        lam -= 500
    u = rnd.random()
    k, p = 0, math.exp(-lam)
    cdf = p
    while u > cdf:
        k += 1
        p *= lam / k
        cdf += p
        if p == 0.0:
            break
    return total + k


def expected_handle(aht_s: float, interval: int) -> float:
    """The expected handle time of a call in ``interval``: calls run longer late in the day."""
    return aht_s * (0.9 + 0.2 * interval / INTERVALS)


def expected_rate(peak: float, trend: float, day: int, interval: int, first_weekday: int,
                  holidays: Mapping[int, float]) -> float:
    wd = (first_weekday + day) % 7
    level = peak * (1 + trend * day / 7)
    if day in holidays:
        return level * WEEKLY[6] * WEEKEND_SHAPE[interval] * holidays[day]
    shape = WEEKEND_SHAPE if wd >= 5 else WEEKDAY_SHAPE
    return level * WEEKLY[wd] * shape[interval]


def generate(weeks: int = 8, *, seed: int = 1, queues: Sequence[tuple[float, float, float]] = QUEUES,
             first_weekday: int = 0, holidays: Mapping[int, float] | None = None,
             day_noise: float = 0.0) -> SynthHistory:
    """``weeks`` weeks of interval history for each of ``queues`` ((peak, weekly trend,
    AHT)); the same arguments give the same history."""
    rnd = random.Random(seed)
    days = weeks * 7
    hol = dict(default_holidays(days, first_weekday) if holidays is None else holidays)
    out = []
    for peak, trend, aht in queues:
        counts, rates, handle = [], [], []
        for d in range(days):
            shock = math.exp(rnd.gauss(0.0, day_noise) - day_noise ** 2 / 2) if day_noise else 1.0
            r_day = [expected_rate(peak, trend, d, i, first_weekday, hol) * shock for i in range(INTERVALS)]
            c_day = [poisson(rnd, r) for r in r_day]
            h_day = [rnd.gammavariate(n, expected_handle(aht, i) / n) if n else 0.0
                     for i, n in enumerate(c_day)]
            rates.append(r_day)
            counts.append(c_day)
            handle.append(h_day)
        out.append(SynthQueue(f"q{peak:g}", peak, aht, counts, rates, handle))
    return SynthHistory(days, first_weekday, hol, tuple(out))
