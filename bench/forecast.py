"""Arrival forecasts per queue and 15-minute interval, backtested on a synthetic history.

Method: :func:`router.capacity.synth.generate` makes ``--weeks`` weeks of seeded interval
history (daily and weekly seasonality, a linear trend per queue, three listed holidays,
Poisson counts) for four queues peaking at 2, 10, 50 and 200 calls per interval. Each
method forecasts, day-ahead, each of the last ``--days`` days from the days before it
(rolling origin; the holidays are given to the methods that use them), queue by queue.

* ``wape`` = sum |actual - forecast| / sum actual over those days and intervals;
* ``floor`` = the same for the true expected rates the counts were drawn from: the
  Poisson floor, the error of a perfect forecast; ``floor_ratio`` = wape / floor;
* ``vs_seasonal_naive`` = wape / the one-week seasonal naive's wape (the anchor, in the
  same run, on the same days);
* ``fit_s``: the time to fit and forecast every queue and day, median of ``--runs`` runs.

"Busy" figures pool the queues peaking at 50 calls per interval or more.

Also measured: the handle-time forecast (:func:`router.capacity.forecast.forecast_handle`)
as a call-weighted error ``sum n |h - ĥ| / sum n h`` against the same for the true mean
handle time; and the intraday re-forecast: the afternoon (from ``--morning`` intervals on)
forecast day-ahead against re-forecast at noon from the morning's actuals, on the same
history and on one whose days carry a random level (``--day-noise``, lognormal sigma).

Output (``--json``): one line per method and queue ``{"method", "queue", "peak", "wape",
"floor", "floor_ratio", "vs_seasonal_naive"}``, one per method ``{"method", "wape_busy",
"floor_busy", "floor_ratio_busy", "vs_seasonal_naive", "wape_busy_ordinary_days", "fit_s"}``
(``wape_busy_ordinary_days``: the busy wape over the backtest days that are not holidays —
the baselines know no holidays), one per queue
``{"handle_queue", "handle_wape", "handle_floor"}``, one per intraday scenario and queue
``{"intraday_queue", "day_noise", "wape_day_ahead", "wape_reforecast", "floor"}``, then
``{"best_method", "wape_best", "wape_seasonal_naive", "wape_floor", "fit_s"}`` (busy
queues). Target: the best method's wape at least 15 % below the seasonal naive's and
within 1.3x the floor on the busy queues. A few seconds.

    .venv/bin/python bench/forecast.py --json [--seed 1] [--weeks 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from router.capacity import forecast as fc
from router.capacity import synth

BUSY_PEAK = 50.0
Method = Callable[[list[list[int]], synth.SynthHistory], list[float]]

METHODS: dict[str, Method] = {
    "seasonal_naive": lambda hist, h: fc.seasonal_naive(hist, 1)[0],
    "weekday_average_4w": lambda hist, h: fc.weekday_average(hist, 4)[0],
    "decomposition": lambda hist, h: fc.decomposition(hist, 1, first_weekday=h.first_weekday,
                                                      holidays=h.holidays)[0],
}


def backtest(h: synth.SynthHistory, method: Method, days: int) -> tuple[dict[str, list[list[float]]], float]:
    """Forecasts of the last ``days`` days per queue, and the seconds they took."""
    out: dict[str, list[list[float]]] = {}
    started = time.perf_counter()
    for q in h.queues:
        out[q.name] = [method(q.counts[:d], h) for d in range(h.days - days, h.days)]
    return out, time.perf_counter() - started


def pooled(pairs: list[tuple[list, list]]) -> float:
    return fc.wape([a for a, _ in pairs], [f for _, f in pairs])


def intraday(h: synth.SynthHistory, days: int, morning: int) -> list[dict]:
    rows = []
    for q in h.queues:
        actual, ahead, re, true = [], [], [], []
        for d in range(h.days - days, h.days):
            today = fc.decomposition(q.counts[:d], 1, first_weekday=h.first_weekday, holidays=h.holidays)[0]
            actual.append(q.counts[d][morning:])
            ahead.append(today[morning:])
            re.append(fc.intraday_reforecast(today, q.counts[d][:morning]))
            true.append(q.rates[d][morning:])
        rows.append({"intraday_queue": q.name, "wape_day_ahead": round(fc.wape(actual, ahead), 4),
                     "wape_reforecast": round(fc.wape(actual, re), 4), "floor": round(fc.wape(actual, true), 4)})
    return rows


def handle(h: synth.SynthHistory, days: int) -> list[dict]:
    rows = []
    for q in h.queues:
        err = err_true = weight = 0.0
        for d in range(h.days - days, h.days):
            f = fc.forecast_handle(q.handle_s[:d], q.counts[:d], 1, first_weekday=h.first_weekday,
                                   holidays=h.holidays)[0]
            for i, n in enumerate(q.counts[d]):
                err += n * abs(q.handle_s[d][i] - f[i])
                err_true += n * abs(q.handle_s[d][i] - synth.expected_handle(q.aht_s, i))
                weight += n * q.handle_s[d][i]
        rows.append({"handle_queue": q.name, "handle_wape": round(err / weight, 4),
                     "handle_floor": round(err_true / weight, 4)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per line, then a summary")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--weeks", type=int, default=8, help="weeks of synthetic history")
    ap.add_argument("--days", type=int, default=14, help="backtest days (the last ones, rolling origin)")
    ap.add_argument("--runs", type=int, default=3, help="runs per method (median fit time)")
    ap.add_argument("--morning", type=int, default=48, help="intervals known at the intraday re-forecast")
    ap.add_argument("--day-noise", type=float, default=0.1, help="daily level sigma, intraday scenario")
    args = ap.parse_args(argv)

    def emit(row: dict) -> None:
        print(json.dumps(row) if args.json else "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    h = synth.generate(args.weeks, seed=args.seed)
    last = range(h.days - args.days, h.days)
    busy = {q.name for q in h.queues if q.peak >= BUSY_PEAK}
    floors = {q.name: ([q.counts[d] for d in last], [q.rates[d] for d in last]) for q in h.queues}
    floor_busy = pooled([(a, f) for name in sorted(busy) for a, f in zip(*floors[name])])
    results = {}
    for name, method in METHODS.items():
        times = []
        for _ in range(args.runs):
            fcs, seconds = backtest(h, method, args.days)
            times.append(seconds)
        results[name] = (fcs, statistics.median(times))
    anchor = {}
    summary_rows = []
    for name, (fcs, fit_s) in results.items():
        for q in h.queues:
            actual = floors[q.name][0]
            w = fc.wape(actual, fcs[q.name])
            floor = fc.wape(actual, floors[q.name][1])
            if name == "seasonal_naive":
                anchor[q.name] = w
            emit({"method": name, "queue": q.name, "peak": q.peak, "wape": round(w, 4), "floor": round(floor, 4),
                  "floor_ratio": round(w / floor, 3), "vs_seasonal_naive": round(w / anchor[q.name], 3)})
        w_busy = pooled([(a, f) for qn in sorted(busy) for a, f in zip(floors[qn][0], fcs[qn])])
        if name == "seasonal_naive":
            anchor["busy"] = w_busy
        ordinary = [k for k, d in enumerate(last) if d not in h.holidays]
        w_ord = pooled([(floors[qn][0][k], fcs[qn][k]) for qn in sorted(busy) for k in ordinary])
        row = {"method": name, "wape_busy": round(w_busy, 4), "floor_busy": round(floor_busy, 4),
               "floor_ratio_busy": round(w_busy / floor_busy, 3),
               "vs_seasonal_naive": round(w_busy / anchor["busy"], 3),
               "wape_busy_ordinary_days": round(w_ord, 4), "fit_s": round(fit_s, 4)}
        summary_rows.append(row)
        emit(row)
    for row in handle(h, args.days):
        emit(row)
    for noise in (0.0, args.day_noise):
        hn = h if noise == 0.0 else synth.generate(args.weeks, seed=args.seed, day_noise=noise)
        for row in intraday(hn, args.days, args.morning):
            emit({"intraday_queue": row.pop("intraday_queue"), "day_noise": noise, **row})
    best = min(summary_rows, key=lambda r: r["wape_busy"])
    emit({"best_method": best["method"], "wape_best": best["wape_busy"], "wape_seasonal_naive": round(anchor["busy"], 4),
          "wape_floor": round(floor_busy, 4), "fit_s": best["fit_s"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
