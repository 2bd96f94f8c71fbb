"""Erlang C against textbook values and an independent exact computation."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from router import erlang


def exact_erlang_c(n: int, a: Fraction) -> Fraction:
    """The textbook closed form, in exact rationals (only usable for small N)."""
    top = a**n / math.factorial(n) * Fraction(n) / (n - a)
    bottom = sum(a**k / math.factorial(k) for k in range(n)) + top
    return top / bottom


# The classic worked example (e.g. callcentrehelper.com "Erlang C formula"): 100 calls
# in 30 minutes, AHT 3 minutes -> 10 Erlangs; target 80% in 20 s.
RATE = 100 / 1800
AHT = 180.0


@pytest.mark.parametrize(
    "agents, pw, asa_s, sl20",
    [
        (11, 0.6821, 122.78, 0.3896),
        (12, 0.4494, 40.44, 0.6402),
        (13, 0.2853, 17.12, 0.7956),
        (14, 0.1741, 7.84, 0.8884),
        (15, 0.1020, 3.67, 0.9415),
    ],
)
def test_textbook_example(agents, pw, asa_s, sl20):
    assert erlang.erlang_c(agents, RATE * AHT) == pytest.approx(pw, abs=5e-5)
    assert erlang.asa(agents, RATE, AHT) == pytest.approx(asa_s, abs=5e-3)
    assert erlang.service_level(agents, RATE, AHT, 20) == pytest.approx(sl20, abs=5e-5)


def test_required_agents_textbook():
    assert erlang.agents_for_service_level(RATE, AHT, 20, 0.8) == 14
    assert erlang.agents_for_service_level(RATE, AHT, 20, 0.79) == 13
    assert erlang.agents_for_asa(RATE, AHT, 10.0) == 14
    assert erlang.agents_for_asa(RATE, AHT, 7.0) == 15


def test_small_closed_forms():
    # M/M/1: P(wait) = rho; ASA = rho / (mu - lambda).
    assert erlang.erlang_c(1, 0.5) == pytest.approx(0.5)
    assert erlang.asa(1, 0.5, 1.0) == pytest.approx(1.0)
    # M/M/2 with A = 1: P(wait) = 1/3.
    assert erlang.erlang_c(2, 1.0) == pytest.approx(1 / 3)
    # Erlang B, one trunk: A / (1 + A).
    assert erlang.erlang_b(1, 3.0) == pytest.approx(0.75)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 21, 40])
@pytest.mark.parametrize("rho", [Fraction(1, 10), Fraction(1, 2), Fraction(4, 5), Fraction(99, 100)])
def test_matches_exact_form(n, rho):
    a = rho * n
    assert erlang.erlang_c(n, float(a)) == pytest.approx(float(exact_erlang_c(n, a)), rel=1e-12)


def test_large_n_is_stable():
    # The factorial form overflows floats long before this; the recurrence does not.
    c = erlang.erlang_c(20_000, 19_900.0)
    assert 0 < c < 1 and math.isfinite(c)
    # Square-root staffing (Halfin-Whitt): with N = A + beta sqrt(A) the wait probability
    # tends to 1 / (1 + beta Phi(beta) / phi(beta)), about 0.2234 for beta = 1.
    beta = 1.0
    cdf = 0.5 * (1 + math.erf(beta / math.sqrt(2)))
    pdf = math.exp(-beta * beta / 2) / math.sqrt(2 * math.pi)
    limit = 1 / (1 + beta * cdf / pdf)
    a = 10_000.0
    assert erlang.erlang_c(int(a + beta * math.sqrt(a)), a) == pytest.approx(limit, abs=3e-3)


def test_unstable_and_edge_cases():
    assert erlang.erlang_c(5, 5.0) == 1.0
    assert erlang.erlang_c(5, 7.0) == 1.0
    assert erlang.asa(5, 1.0, 6.0) == math.inf
    assert erlang.service_level(5, 1.0, 6.0, 20) == 0.0
    assert erlang.erlang_c(3, 0.0) == 0.0
    assert erlang.asa(3, 0.0, 60) == 0.0
    assert erlang.service_level(3, 0.0, 60, 0) == 1.0
    assert erlang.agents_for_service_level(0.0, 60, 20, 0.8) == 0
    # At threshold 0, SL is the chance of not waiting at all.
    assert erlang.service_level(14, RATE, AHT, 0) == pytest.approx(1 - erlang.erlang_c(14, 10.0))
    with pytest.raises(ValueError):
        erlang.erlang_c(-1, 1.0)
    with pytest.raises(ValueError):
        erlang.erlang_c(3, float("nan"))
    with pytest.raises(TypeError):
        erlang.erlang_c(3.0, 1.0)
    with pytest.raises(ValueError):
        erlang.asa(3, 1.0, 0.0)
    with pytest.raises(ValueError):
        erlang.agents_for_service_level(1.0, 1.0, 20, 1.0)


def test_monotone_in_agents():
    prev_c, prev_sl = 1.0, 0.0
    for n in range(11, 40):
        c = erlang.erlang_c(n, 10.0)
        sl = erlang.service_level(n, RATE, AHT, 20)
        assert c < prev_c and sl > prev_sl
        prev_c, prev_sl = c, sl


def test_required_agents_is_minimal():
    for rate, aht, t, target in [(2.0, 240.0, 20, 0.8), (0.3, 300.0, 30, 0.9), (50.0, 180.0, 15, 0.8)]:
        n = erlang.agents_for_service_level(rate, aht, t, target)
        assert erlang.service_level(n, rate, aht, t) >= target
        assert erlang.service_level(n - 1, rate, aht, t) < target
