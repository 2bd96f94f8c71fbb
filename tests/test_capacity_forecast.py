"""Arrival forecasting (router.capacity.forecast) on hand-made series and on the seeded
synthetic history (router.capacity.synth)."""

from __future__ import annotations

import math
import statistics

import pytest

from router.capacity import forecast as fc
from router.capacity import synth

W = synth.INTERVALS


@pytest.fixture(scope="module")
def history() -> synth.SynthHistory:
    return synth.generate(6, seed=3)


# --- the generator ------------------------------------------------------------------------------


def test_generator_is_deterministic_for_a_seed():
    a, b = synth.generate(2, seed=7), synth.generate(2, seed=7)
    assert [q.counts for q in a.queues] == [q.counts for q in b.queues]
    assert [q.handle_s for q in a.queues] == [q.handle_s for q in b.queues]
    assert a.holidays == b.holidays
    assert [q.counts for q in synth.generate(2, seed=8).queues] != [q.counts for q in a.queues]


def test_generator_has_its_seasonality_trend_and_holidays(history):
    q = max(history.queues, key=lambda q: q.peak)
    assert len(q.counts) == history.days == 42 and all(len(d) == W for d in q.counts)
    totals = [sum(d) for d in q.counts]
    by_wd = {wd: statistics.mean(totals[d] for d in range(history.days)
                                 if (history.first_weekday + d) % 7 == wd and d not in history.holidays)
             for wd in range(7)}
    assert by_wd[0] > by_wd[4] > by_wd[5] > by_wd[6]  # Monday busiest, weekends low
    monday = q.counts[7]
    noon, morning, afternoon, night = (sum(monday[i - 2:i + 2]) for i in (50, 42, 60, 12))
    assert morning > noon < afternoon and night < morning / 10  # two peaks, quiet nights
    assert len(history.holidays) == 3 and synth.CLOSED in history.holidays.values()
    for day, fraction in history.holidays.items():
        assert (history.first_weekday + day) % 7 < 5
        assert totals[day] < by_wd[6] * fraction * 1.5 + 30
    # Trend: the same weekday later in the history is busier (this queue grows).
    assert q.rates[35][40] > q.rates[0][40]
    # Counts are Poisson around the rates: mean matches, variance ~ mean.
    pairs = [(c, r) for day, rates in zip(q.counts, q.rates) for c, r in zip(day, rates) if r > 50]
    assert abs(sum(c for c, _ in pairs) / sum(r for _, r in pairs) - 1) < 0.01
    z = [(c - r) / math.sqrt(r) for c, r in pairs]
    assert 0.85 < statistics.pvariance(z) < 1.15


def test_poisson_draws_have_the_right_mean_and_variance():
    import random

    rnd = random.Random(1)
    for lam in (0.3, 4.0, 120.0, 900.0):
        xs = [synth.poisson(rnd, lam) for _ in range(4000)]
        assert abs(statistics.mean(xs) - lam) < 4 * math.sqrt(lam / 4000)
        assert 0.85 < statistics.pvariance(xs) / lam < 1.15


# --- baselines on hand-made series --------------------------------------------------------------


def _days(n: int, width: int = 4) -> list[list[float]]:
    return [[10 * d + i for i in range(width)] for d in range(n)]


def test_seasonal_naive_repeats_last_week():
    h = _days(10)
    assert fc.seasonal_naive(h, 1) == [h[3]]
    assert fc.seasonal_naive(h, 9) == [h[3 + k % 7] for k in range(9)]
    with pytest.raises(ValueError):
        fc.seasonal_naive(h[:6], 1)


def test_weekday_average_takes_the_same_weekday_over_n_weeks():
    h = _days(30)  # forecast day 30: same weekday on days 23, 16, 9, 2
    assert fc.weekday_average(h, 4) == [[(230 + 160 + 90 + 20) / 4 + i for i in range(4)]]
    assert fc.weekday_average(h, 2) == [[(230 + 160) / 2 + i for i in range(4)]]
    assert fc.weekday_average(h[:10], 4) == [[30.0 + i for i in range(4)]]  # only one week back
    assert fc.weekday_average(h, 4, horizon=2)[1] == [(240 + 170 + 100 + 30) / 4 + i for i in range(4)]


def test_wape():
    assert fc.wape([10, 0, 10], [5, 5, 10]) == pytest.approx(0.5)
    assert fc.wape([[1, 1], [2]], [[1, 1], [2]]) == 0.0
    assert math.isnan(fc.wape([0, 0], [1, 1]))
    with pytest.raises(ValueError):
        fc.wape([1], [1, 2])


def test_decomposition_recovers_an_exact_multiplicative_series():
    weekly = (1.2, 1.1, 1.0, 1.0, 0.9, 0.5, 0.3)
    shape = [1.0, 3.0, 4.0, 2.0]
    series = [[(100 + 2 * d) * weekly[d % 7] * s for s in shape] for d in range(28)]
    f = fc.decomposition(series, 8, smooth=0)
    for k, day in enumerate(f):
        d = 28 + k
        assert day == pytest.approx([(100 + 2 * d) * weekly[d % 7] * s for s in shape], rel=1e-9)
    # A holiday is left out of the fit and forecast as a fraction of a Sunday.
    series[10] = [0.0] * 4
    m = fc.fit_decomposition(series, holidays={10: 0.0, 30: 0.5}, smooth=0)
    assert m.day(29) == pytest.approx([(158) * weekly[1] * s for s in shape], rel=1e-9)
    assert m.day(30, 0.5) == pytest.approx([160 * weekly[6] * 0.5 * s for s in shape], rel=1e-9)


def test_holiday_fraction_reads_the_history(history):
    q = max(history.queues, key=lambda q: q.peak)
    for day, fraction in history.holidays.items():
        got = fc.holiday_fraction(q.counts[:day + 1], [day], first_weekday=history.first_weekday,
                                  holidays={d: f for d, f in history.holidays.items() if d < day}, weeks=8)
        assert got == pytest.approx(fraction, rel=0.1, abs=0.02)


# --- the chosen method on the synthetic history -------------------------------------------------


def test_decomposition_beats_seasonal_naive_and_nears_the_floor(history):
    busy = [q for q in history.queues if q.peak >= 50]
    actual, naive, best, true = [], [], [], []
    for q in busy:
        for d in range(history.days - 7, history.days):
            actual.append(q.counts[d])
            true.append(q.rates[d])
            naive.append(fc.seasonal_naive(q.counts[:d], 1)[0])
            best.append(fc.decomposition(q.counts[:d], 1, first_weekday=history.first_weekday,
                                         holidays=history.holidays)[0])
    w_naive, w_best, floor = fc.wape(actual, naive), fc.wape(actual, best), fc.wape(actual, true)
    assert w_best <= 0.85 * w_naive, (w_best, w_naive)
    assert w_best <= 1.3 * floor, (w_best, floor)


def test_intraday_reforecast_follows_a_level_shift():
    today = [10.0] * 8
    actual = [15.0] * 8  # the day runs 50 % above the forecast
    rest = fc.intraday_reforecast(today, actual[:4], prior_calls=10)
    assert len(rest) == 4
    assert fc.wape(actual[4:], rest) < fc.wape(actual[4:], today[4:]) / 3
    assert rest[0] == pytest.approx(10 * (60 + 10) / (40 + 10))
    # Shrunk toward 1 for small counts: one extra call on a quiet queue moves little.
    assert fc.intraday_reforecast([0.1] * 8, [1, 0, 0, 0], prior_calls=10)[0] == pytest.approx(0.1 * 11 / 10.4)
    assert fc.intraday_reforecast(today, []) == today


def test_intraday_reforecast_helps_afternoons_of_noisy_days():
    h = synth.generate(5, seed=4, day_noise=0.15, queues=((200.0, 0.0, 180.0),))
    q = h.queues[0]
    actual, ahead, re = [], [], []
    for d in range(h.days - 7, h.days):
        today = fc.decomposition(q.counts[:d], 1, first_weekday=h.first_weekday, holidays=h.holidays)[0]
        actual.append(q.counts[d][48:])
        ahead.append(today[48:])
        re.append(fc.intraday_reforecast(today, q.counts[d][:48]))
    assert fc.wape(actual, re) < fc.wape(actual, ahead)


def test_handle_forecast_is_near_the_truth(history):
    q = max(history.queues, key=lambda q: q.peak)
    d = history.days - 1
    f = fc.forecast_handle(q.handle_s[:d], q.counts[:d], 1, first_weekday=history.first_weekday,
                           holidays=history.holidays)[0]
    busy = [i for i in range(W) if q.rates[d][i] > 50]
    assert busy and all(abs(f[i] / synth.expected_handle(q.aht_s, i) - 1) < 0.05 for i in busy)


# --- from history rows ---------------------------------------------------------------------------

MONDAY = 1_790_553_600  # 2026-09-28 00:00 UTC, a Monday


def test_interval_counts_on_hand_made_rows():
    rows = [
        {"offered_at": MONDAY + 10, "queue": "a", "handle_s": 100.0},
        {"offered_at": MONDAY + 899, "queue": "a", "handle_s": 200.0},
        {"offered_at": MONDAY + 900, "queue": "a", "handle_s": 0.0},  # abandoned: counted, no handle
        {"offered_at": MONDAY + 86_400 + 3600, "queue": "b", "handle_s": 60.0},
        {"offered_at": MONDAY + 5, "queue": "", "handle_s": 0.0},  # rejected: no queue
    ]
    out = fc.interval_counts(rows)
    assert sorted(out) == ["a", "b"]
    a, b = out["a"], out["b"]
    assert a.first_day == MONDAY and a.first_weekday == 0
    assert len(a.counts) == len(b.counts) == 2 and len(a.counts[0]) == 96
    assert a.counts[0][:3] == [2, 1, 0] and sum(map(sum, a.counts)) == 3
    assert a.handle_s[0][:2] == [150.0, 0.0]
    assert b.counts[1][4] == 1 and b.handle_s[1][4] == 60.0 and sum(b.counts[0]) == 0
    hourly = fc.interval_counts(rows, interval_s=3600, utc_offset_s=-1800)  # day starts 00:30 UTC
    assert hourly["a"].first_day == MONDAY - 86_400 + 1800 and hourly["a"].first_weekday == 6
    assert hourly["a"].counts[0][23] == 3 and len(hourly["a"].counts) == 3  # b: Tuesday 00:30
    assert fc.interval_counts([]) == {}
    with pytest.raises(ValueError):
        fc.interval_counts(rows, interval_s=7000)


def test_forecasters_run_on_rows_from_the_history():
    h = synth.generate(3, seed=5, queues=((20.0, 0.0, 200.0),))
    q = h.queues[0]
    rows = [{"offered_at": MONDAY + d * 86_400 + i * 900 + k, "queue": "sales", "handle_s": q.handle_s[d][i]}
            for d in range(h.days) for i in range(W) for k in range(q.counts[d][i])]
    series = fc.interval_counts(rows)["sales"]
    assert series.counts == q.counts[:len(series.counts)] and series.first_weekday == 0
    assert fc.seasonal_naive(series.counts, 1)[0] == [float(c) for c in series.counts[-7]]
    assert len(fc.decomposition(series.counts, 1, first_weekday=series.first_weekday,
                                holidays=h.holidays)[0]) == W
