"""router.capacity.simulate: the engine-driven queue simulator against exact Erlang A
(router.erlang.erlang_a), and against router.whatif.replay on the same calls."""

from __future__ import annotations

import math

import pytest

from router.capacity.simulate import SITE, SKILL, play, queue_site, simulate_queue
from router.overflow import parse_policy
from router.whatif import Stream, poisson_arrivals, replay

FIGURES = ("p_abandon", "p_wait", "asa_s", "service_level")

# (agents, arrivals per hour, AHT s, mean patience s, measured hours): loads 0.9-1.2 per
# agent; 54k-72k measured calls each (the file runs in ~20 s on a 2-core machine)
CASES = [
    (10, 200.0, 180.0, 120.0, 300.0),  # 1.0 per agent
    (10, 180.0, 180.0, 300.0, 300.0),  # 0.9
    (10, 240.0, 180.0, 60.0, 300.0),  # 1.2, impatient callers
    (15, 330.0, 180.0, 180.0, 200.0),  # 1.1
]


@pytest.mark.parametrize("agents,rate,aht,patience,hours", CASES, ids=lambda x: str(x))
def test_erlang_a_within_four_standard_errors(agents, rate, aht, patience, hours):
    r = simulate_queue(agents, rate, aht, patience, hours, seed=agents * 1000 + int(rate))
    assert r["calls"] > 0.9 * rate * hours
    assert 0 < r["p_abandon"] < r["p_wait"] < 1
    for k in FIGURES:
        exact, got, se = r["exact"][k], r[k], r["se"][k]
        assert se > 0, k
        assert abs(got - exact) <= 4 * se, f"{k}: simulated {got:.4f} ± {se:.4f}, Erlang A {exact:.4f}"
        # and the standard error is small enough for the check to mean something
        assert se <= 0.05 * exact, f"{k}: standard error {se:.4f} too wide against {exact:.4f}"


def test_no_patience_is_erlang_c():
    r = simulate_queue(10, 160.0, 180.0, None, 60.0, seed=5)  # 0.8 per agent
    assert r["p_abandon"] == 0 and r["exact"]["p_abandon"] == 0
    for k in ("p_wait", "asa_s", "service_level"):
        assert abs(r[k] - r["exact"][k]) <= 4 * r["se"][k], k


def test_same_seed_same_result():
    a = simulate_queue(10, 200.0, 180.0, 120.0, 10.0, seed=7, batches=5)
    b = simulate_queue(10, 200.0, 180.0, 120.0, 10.0, seed=7, batches=5)
    c = simulate_queue(10, 200.0, 180.0, 120.0, 10.0, seed=8, batches=5)
    assert a == b
    assert a["calls"] != c["calls"] or a["asa_s"] != c["asa_s"]


def test_plays_the_calls_as_whatif_replay_does():
    """The same arrivals through play() and through router.whatif.replay (one site, no
    overflow rule): the same answered and abandoned calls, the same waits."""
    stream = Stream(site=SITE, skill=SKILL, rate_per_h=230.0, handle_s=180.0, patience_s=90.0)
    arrivals = poisson_arrivals([stream], 4 * 3600.0, seed=3, start=1.0)
    cfg = queue_site(10, 180.0, threshold_s=20.0)
    out = list(play(cfg, ((0, a) for a in arrivals)))
    assert len(out) == len(arrivals)
    answered = [w for _, _, ok, w in out if ok]
    abandoned = [w for _, a, ok, w in out if not ok]
    total = replay([cfg], arrivals, parse_policy({})).total
    assert (total.answered, total.abandoned, total.unfinished) == (len(answered), len(abandoned), 0)
    assert total.wait_sum_s == pytest.approx(sum(answered), rel=1e-12)
    assert total.sl_num == sum(w <= 20.0 for w in answered)
    # a caller who hangs up waited exactly their patience
    by_id = {a.call_id: a for a in arrivals}
    assert all(math.isclose(w, by_id[a.call_id].patience_s) for _, a, ok, w in out if not ok)


@pytest.mark.parametrize("kw", [
    {"agents": 0}, {"arrivals_per_hour": 0.0}, {"aht_s": -1.0}, {"hours": math.inf},
    {"patience_s": 0.0}, {"batches": 1}, {"warmup_h": -1.0}, {"threshold_s": 0.0},
])  # fmt: skip
def test_bad_figures(kw):
    args = {"agents": 2, "arrivals_per_hour": 10.0, "aht_s": 180.0, "patience_s": 60.0, "hours": 1.0, "seed": 1}
    args.update(kw)
    with pytest.raises(ValueError):
        simulate_queue(**args)
