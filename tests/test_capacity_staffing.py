"""Staffing one queue: exact Erlang C and Erlang A (router.erlang.erlang_a), the staffing
search with occupancy cap and shrinkage (router.capacity.staffing), and
`tandem capacity staff`. Erlang A is checked against a truncated birth-death solve and a
uniformized tagged-caller chain written here, independently of the module."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from router import erlang
from router.capacity.staffing import qed_service_level, scheduled_agents, staff
from router.cli import app

# --- independent references ---------------------------------------------------------------


def birth_death(lam: float, mu: float, theta: float, n_agents: int, states: int = 2000) -> list[float]:
    """pi_0 .. pi_{states-1} of M/M/N+M, truncated, solved in log space."""
    logs = [0.0]
    for n in range(1, states):
        death = min(n, n_agents) * mu + max(n - n_agents, 0) * theta
        logs.append(logs[-1] + math.log(lam / death))
    top = max(logs)
    weights = [math.exp(x - top) for x in logs]
    z = math.fsum(weights)
    return [w / z for w in weights]


def reference(lam, mu, theta, n_agents):
    pi = birth_death(lam, mu, theta, n_agents)
    p_wait = math.fsum(pi[n_agents:])
    queue = math.fsum((n - n_agents) * p for n, p in enumerate(pi) if n > n_agents)
    p_abandon = math.fsum((n - n_agents) * theta * p for n, p in enumerate(pi) if n > n_agents) / lam
    return pi, p_wait, p_abandon, queue / lam


def answered_within(pi, mu, theta, n_agents, t):
    """P(an arrival is answered within t): the tagged caller's chain (i callers ahead:
    moves up at rate N mu + i theta, hangs up at rate theta), uniformized; None when
    that takes too many steps."""
    tail = pi[n_agents:]
    while len(tail) > 1 and tail[-1] < 1e-18:
        tail.pop()
    k_max = len(tail) - 1
    big = n_agents * mu + (k_max + 1) * theta
    if big * t > 1000:
        return None  # too many steps for a quick check
    v = list(tail)  # mass with i callers ahead
    answered = 0.0
    result = 0.0
    m, weight = 0, math.exp(-big * t)  # Poisson(big t) weights; big t stays small here
    cum = 0.0
    while cum < 1 - 1e-15:
        result += weight * answered
        cum += weight
        # one uniformized step
        new = [0.0] * len(v)
        for i, mass in enumerate(v):
            move = (n_agents * mu + i * theta) / big
            stay = 1 - move - theta / big
            new[i] += mass * stay
            if i == 0:
                answered += mass * move
            else:
                new[i - 1] += mass * move
        v = new
        m += 1
        weight *= big * t / m
    return math.fsum(pi[:n_agents]) + result


# (lambda, mu, theta, N): under- and overloaded (lambda > N mu), short and long patience.
CASES = [
    (1 / 18, 1 / 180, 1 / 120, 12),  # the worked example's queue, 2 minutes of patience
    (1 / 18, 1 / 180, 1 / 120, 7),  # overloaded: 10 Erlangs on 7 agents
    (3.0, 0.1, 0.01, 25),  # 1.2 times overloaded, patient callers
    (0.9, 1.0, 0.2, 1),
    (5.0, 1.0, 2.0, 2),  # 2.5 times overloaded, impatient callers
    (0.5, 1 / 300, 1 / 600, 100),  # 150 Erlangs on 100 agents
    (0.4, 1 / 300, 1 / 90, 140),  # 120 Erlangs on 140 agents
]


@pytest.mark.parametrize("lam, mu, theta, n", CASES)
def test_erlang_a_matches_birth_death(lam, mu, theta, n):
    q = erlang.erlang_a(n, lam, 1 / mu, 1 / theta)
    _, p_wait, p_abandon, asa_s = reference(lam, mu, theta, n)
    assert q.p_wait == pytest.approx(p_wait, rel=1e-9)
    assert q.p_abandon == pytest.approx(p_abandon, rel=1e-9)
    assert q.asa_s == pytest.approx(asa_s, rel=1e-9)
    assert q.occupancy == pytest.approx(lam * (1 - p_abandon) / (n * mu), rel=1e-9)


@pytest.mark.parametrize("lam, mu, theta, n", CASES)
def test_erlang_a_service_level(lam, mu, theta, n):
    q = erlang.erlang_a(n, lam, 1 / mu, 1 / theta)
    assert q.service_level(0) == pytest.approx(1 - q.p_wait, abs=1e-12)
    assert q.service_level(math.inf) == pytest.approx(1 - q.p_abandon, abs=1e-12)
    assert q.service_level(1e7 / theta) == pytest.approx(1 - q.p_abandon, abs=1e-12)
    pi = birth_death(lam, mu, theta, n)
    levels, checked = [], 0
    for t in sorted((0.5 / (n * mu + theta), 2 / (n * mu + theta), 20.0)):
        sl = q.service_level(t)
        levels.append(sl)
        expected = answered_within(pi, mu, theta, n, t)
        if expected is not None:
            checked += 1
            assert sl == pytest.approx(expected, abs=1e-10)
    assert checked >= 2
    assert levels == sorted(levels)


def test_erlang_a_without_patience_is_erlang_c():
    rate, aht = 1 / 18, 180.0
    for n in (11, 14, 20):
        q = erlang.erlang_a(n, rate, aht, None)
        assert q.p_wait == erlang.erlang_c(n, rate * aht)
        assert q.asa_s == erlang.asa(n, rate, aht)
        assert q.service_level(20) == erlang.service_level(n, rate, aht, 20)
        assert q.p_abandon == 0 and q.occupancy == pytest.approx(10 / n)
        assert erlang.erlang_a(n, rate, aht, math.inf) == q
    unstable = erlang.erlang_a(10, rate, aht, None)
    assert unstable.p_wait == 1 and unstable.asa_s == math.inf and unstable.service_level(20) == 0


@pytest.mark.parametrize("n", [11, 14, 20])
def test_long_patience_tends_to_erlang_c(n):
    rate, aht = 1 / 18, 180.0
    q = erlang.erlang_a(n, rate, aht, 1e10)
    assert q.p_wait == pytest.approx(erlang.erlang_c(n, rate * aht), rel=1e-5)
    assert q.asa_s == pytest.approx(erlang.asa(n, rate, aht), rel=1e-5)
    assert q.service_level(20) == pytest.approx(erlang.service_level(n, rate, aht, 20), abs=1e-6)
    assert q.p_abandon < 1e-7


def test_erlang_a_extremes_stay_finite():
    # One agent, ten times overloaded, patient callers: the tail's terms reach e^1000.
    lam, mu, theta = 10.0, 1.0, 0.01
    q = erlang.erlang_a(1, lam, 1 / mu, 1 / theta)
    _, p_wait, p_abandon, asa_s = reference(lam, mu, theta, 1)
    assert q.p_wait == pytest.approx(p_wait, rel=1e-9)
    assert q.p_abandon == pytest.approx(p_abandon, rel=1e-9)
    assert q.asa_s == pytest.approx(asa_s, rel=1e-9)
    # Many agents, light load: pi_N / pi_0 underflows in a direct product.
    q = erlang.erlang_a(2000, 1.0, 100.0, 60.0)
    assert q.p_wait == 0.0 or q.p_wait < 1e-300
    assert q.service_level(20) == pytest.approx(1.0)
    # Nobody on the phones: every caller hangs up after waiting its patience.
    q = erlang.erlang_a(0, 0.1, 100.0, 60.0)
    assert q.p_wait == 1 and q.p_abandon == pytest.approx(1) and q.asa_s == pytest.approx(60)
    with pytest.raises(ValueError):
        erlang.erlang_a(5, 1.0, 100.0, 0.0)


# --- staffing --------------------------------------------------------------------------------


def test_worked_example():
    # 100 calls in 30 minutes, AHT 180 s, 80 % in 20 s (callcentrehelper.com's Erlang C
    # example): 14 agents, 88.84 % in 20 s, ASA 7.84 s, P(wait) 17.41 %, occupancy 71.4 %.
    r = staff(200, 180, 20, 0.8)
    assert r.model == "erlang_c" and r.agents == 14
    assert r.service_level == pytest.approx(0.8884, abs=1e-4)
    assert r.asa_s == pytest.approx(7.84, abs=5e-3)
    assert r.p_wait == pytest.approx(0.1741, abs=1e-4)
    assert r.occupancy == pytest.approx(10 / 14)
    assert r.p_abandon == 0 and r.scheduled == 14 and r.meets_goal
    assert staff(200, 180, 20, 0.8, agents=13).service_level == pytest.approx(0.7956, abs=1e-4)
    assert abs(r.sqrt_staffing_agents - r.agents) <= 1


@pytest.mark.parametrize(
    "per_hour, aht, t, goal, agents",
    [
        (200, 180, 20, 0.79, 13),
        (200, 180, 20, 0.90, 15),
        (720, 300, 30, 0.80, 66),  # 60 Erlangs
        (60, 120, 15, 0.80, 4),  # 2 Erlangs: P(wait) with 3 agents is 4/9
    ],
)
def test_classic_erlang_c_staffing(per_hour, aht, t, goal, agents):
    r = staff(per_hour, aht, t, goal)
    assert r.agents == agents == erlang.agents_for_service_level(per_hour / 3600, aht, t, goal)
    assert staff(per_hour, aht, t, goal, agents=agents - 1).service_level < goal <= r.service_level


def test_erlang_c_three_agents_two_erlangs():
    assert staff(60, 120, 15, 0.5, agents=3).p_wait == pytest.approx(4 / 9, rel=1e-12)


@pytest.mark.parametrize("patience", [30.0, 120.0, 600.0])
def test_erlang_a_staffing_is_the_smallest(patience):
    r = staff(200, 180, 20, 0.8, patience_s=patience)
    assert r.model == "erlang_a" and r.meets_goal
    below = staff(200, 180, 20, 0.8, patience_s=patience, agents=r.agents - 1)
    assert below.service_level < 0.8 <= r.service_level
    q = erlang.erlang_a(r.agents, 200 / 3600, 180, patience)
    assert r.p_abandon == q.p_abandon and r.occupancy == q.occupancy
    # Callers who hang up shorten the queue: never more agents than Erlang C asks.
    assert r.agents <= 14


def test_occupancy_cap_and_shrinkage():
    r = staff(200, 180, 20, 0.8, max_occupancy=0.65)
    assert r.agents == 16 and r.occupancy <= 0.65  # 10 / 15 = 0.667 > 0.65
    r = staff(200, 180, 20, 0.8, patience_s=120, max_occupancy=0.7)
    assert r.occupancy <= 0.7
    assert staff(200, 180, 20, 0.8, patience_s=120, agents=r.agents - 1, max_occupancy=0.7).occupancy > 0.7
    assert staff(200, 180, 20, 0.8, shrinkage=0.3).scheduled == 20  # 14 / 0.7, not 21
    assert staff(200, 180, 20, 0.8, shrinkage=0.35).scheduled == 22
    assert scheduled_agents(7, 0.0) == 7
    with pytest.raises(ValueError):
        scheduled_agents(7, 1.0)


@pytest.mark.parametrize("patience", [None, 60.0, 300.0, 1800.0])
def test_square_root_staffing_agrees_on_large_queues(patience):
    r = staff(10800, 300, 20, 0.8, patience_s=patience)  # 900 Erlangs
    assert abs(r.sqrt_staffing_agents - r.agents) <= max(2, 0.015 * r.agents)
    assert qed_service_level(r.sqrt_staffing_beta, r.offered_load, 300, 20, patience) == pytest.approx(0.8)


def test_qed_limits():
    # theta = mu: M/M/inf, P(wait) = P(Poisson(R) >= N) -> 1 - Phi(beta); with T = 0 the
    # service level is 1 - P(wait) minus a vanishing abandonment term.
    beta, load = 0.5, 1e12
    sl = qed_service_level(beta, load, 100.0, 0.0, 100.0)
    assert sl == pytest.approx(0.5 * (1 + math.erf(beta / math.sqrt(2))), abs=1e-5)
    # Long patience: the Erlang C (Halfin-Whitt) form.
    assert qed_service_level(0.8, 100.0, 180, 20, 1e12) == pytest.approx(
        qed_service_level(0.8, 100.0, 180, 20, None), abs=1e-5)


@pytest.mark.parametrize("kwargs", [
    {"arrivals_per_hour": 0}, {"aht_s": -1}, {"sl_goal": 1.0}, {"sl_goal": 0.0},
    {"sl_threshold_s": -1}, {"patience_s": 0.0}, {"max_occupancy": 0.0}, {"max_occupancy": 1.1},
    {"shrinkage": 1.0}, {"shrinkage": -0.1}, {"agents": 0},
])
def test_staff_rejects_bad_arguments(kwargs):
    args = {"arrivals_per_hour": 200, "aht_s": 180, "sl_threshold_s": 20, "sl_goal": 0.8}
    args.update(kwargs)
    positional = [args.pop(k) for k in ("arrivals_per_hour", "aht_s", "sl_threshold_s", "sl_goal")]
    with pytest.raises(ValueError):
        staff(*positional, **args)


# --- the command -----------------------------------------------------------------------------

BASE = ["capacity", "staff", "--arrivals-per-hour", "200", "--aht-s", "180", "--sl", "20:0.8"]
KEYS = {"agents", "service_level", "asa_s", "p_wait", "p_abandon", "occupancy", "scheduled",
        "sqrt_staffing_agents"}


def run(*extra: str):
    return CliRunner().invoke(app, [*BASE, *extra], env={"NO_COLOR": "1", "COLUMNS": "120"})


def run_json(*extra: str) -> dict:
    r = run(*extra, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_cli_solves_the_worked_example():
    d = run_json()
    assert KEYS <= d.keys()
    assert d["agents"] == 14 and d["scheduled"] == 14 and d["p_abandon"] == 0
    assert d["service_level"] == pytest.approx(0.8884, abs=1e-4)
    assert d["asa_s"] == pytest.approx(7.84, abs=5e-3)
    assert d["occupancy"] == pytest.approx(0.714, abs=5e-4)


def test_cli_given_agents_patience_cap_and_shrinkage():
    d = run_json("--agents", "13")
    assert d["agents"] == 13 and not d["meets_goal"]
    assert d["service_level"] == pytest.approx(0.7956, abs=1e-4)
    d = run_json("--agents", "10")  # 10 Erlangs on 10 agents: unstable without patience
    assert d["asa_s"] is None and d["p_wait"] == 1 and d["service_level"] == 0
    d = run_json("--agents", "10", "--patience-s", "120")
    assert d["model"] == "erlang_a" and 0 < d["p_abandon"] < 1 and d["asa_s"] > 0
    assert run_json("--max-occupancy", "0.65")["agents"] == 16
    assert run_json("--shrinkage", "0.3")["scheduled"] == 20
    d = run_json("--patience-s", "120")
    assert d["agents"] == staff(200, 180, 20, 0.8, patience_s=120).agents
    assert d["p_abandon"] > 0
    text = run("--patience-s", "120")
    assert text.exit_code == 0 and "service level" in text.output


@pytest.mark.parametrize("extra", [
    ["--sl", "20"], ["--sl", "20:1"], ["--sl", "20:0"], ["--sl", "x:0.8"], ["--sl", "-5:0.8"],
    ["--aht-s", "0"], ["--arrivals-per-hour", "-1"], ["--shrinkage", "1"], ["--max-occupancy", "0"],
    ["--max-occupancy", "1.5"], ["--patience-s", "0"], ["--agents", "0"],
], ids=lambda e: " ".join(e))
def test_cli_bad_input_exits_2(extra):
    r = run(*extra)
    assert r.exit_code == 2, r.output
