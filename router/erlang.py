"""Erlang C: the M/M/N queue of staffing textbooks (pure, no I/O, no numpy/scipy).

Model: Poisson arrivals at rate ``rate`` (calls per second), exponential handle times of
mean ``aht_s`` seconds, ``agents`` identical servers, first come first served, infinite
patience and an unbounded queue. The offered load is ``A = rate * aht_s`` Erlangs; the
queue is stable only when ``A < agents``. For an unstable or saturated queue
(``A >= agents``) every call waits: P(wait) = 1, ASA = inf, service level = 0.

Formulas (N agents, load A):

* Erlang B by the recurrence ``B(0) = 1``, ``B(n) = A B(n-1) / (n + A B(n-1))`` — every
  term stays in [0, 1], so it is exact to rounding for N in the tens of thousands, where
  the factorial form overflows;
* Erlang C: ``C = N B / (N - A (1 - B))`` = P(a call waits);
* ASA (mean wait over all calls) = ``C * aht / (N - A)``;
* service level P(W <= t) = ``1 - C * exp(-(N - A) t / aht)``.

Times are in seconds throughout; functions take plain floats and ints.
"""

from __future__ import annotations

import math

__all__ = [
    "erlang_b",
    "erlang_c",
    "asa",
    "service_level",
    "occupancy",
    "agents_for_service_level",
    "agents_for_asa",
]

_MAX_AGENTS = 1_000_000


def _check(agents: int, load: float) -> None:
    if not isinstance(agents, int) or isinstance(agents, bool):
        raise TypeError(f"agents must be an int, got {type(agents).__name__}")
    if agents < 0 or agents > _MAX_AGENTS:
        raise ValueError(f"agents must be 0..{_MAX_AGENTS}, got {agents}")
    if not (load >= 0 and math.isfinite(load)):
        raise ValueError(f"load must be a finite number >= 0 Erlangs, got {load}")


def erlang_b(agents: int, load: float) -> float:
    """Blocking probability of M/M/N/N (Erlang B) with ``load`` Erlangs offered."""
    _check(agents, load)
    b = 1.0
    for n in range(1, agents + 1):
        ab = load * b
        b = ab / (n + ab)
    return b


def erlang_c(agents: int, load: float) -> float:
    """Probability that a call waits (Erlang C); 1.0 when ``load >= agents``."""
    _check(agents, load)
    if load >= agents:
        return 1.0
    if load == 0:
        return 0.0
    b = erlang_b(agents, load)
    return agents * b / (agents - load * (1.0 - b))


def _load(rate: float, aht_s: float) -> float:
    if not (rate >= 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a finite number >= 0 calls/s, got {rate}")
    if not (aht_s > 0 and math.isfinite(aht_s)):
        raise ValueError(f"aht_s must be a finite number > 0, got {aht_s}")
    return rate * aht_s


def asa(agents: int, rate: float, aht_s: float) -> float:
    """Average speed of answer in seconds, over all calls (those that wait and those
    that do not); ``math.inf`` when the queue is not stable."""
    load = _load(rate, aht_s)
    c = erlang_c(agents, load)
    if load >= agents:
        return math.inf
    return c * aht_s / (agents - load)


def service_level(agents: int, rate: float, aht_s: float, threshold_s: float) -> float:
    """P(wait <= threshold_s): the fraction of calls answered within the threshold."""
    if not (threshold_s >= 0):
        raise ValueError(f"threshold_s must be >= 0, got {threshold_s}")
    load = _load(rate, aht_s)
    c = erlang_c(agents, load)
    if load >= agents:
        return 0.0
    return max(0.0, 1.0 - c * math.exp(-(agents - load) * threshold_s / aht_s))


def occupancy(agents: int, rate: float, aht_s: float) -> float:
    """Fraction of the agents' time spent handling calls (capped at 1)."""
    load = _load(rate, aht_s)
    if agents <= 0:
        return 1.0 if load > 0 else 0.0
    return min(1.0, load / agents)


def _smallest_agents(load: float, ok) -> int:
    """Smallest N > load with ok(N); the metrics are monotone in N, so a doubling search
    then a bisection finds it in O(log N) Erlang evaluations."""
    lo = int(math.floor(load))  # not enough (unstable), or 0
    if lo == load and ok(lo):  # only possible for load == 0
        return lo
    hi = max(1, lo + 1)
    while not ok(hi):
        lo = hi
        hi = hi * 2
        if hi > _MAX_AGENTS:
            raise ValueError("target needs more than a million agents")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mid > load and ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def agents_for_service_level(
    rate: float, aht_s: float, threshold_s: float, target: float
) -> int:
    """Fewest agents such that P(wait <= threshold_s) >= target (0 < target < 1)."""
    if not 0 < target < 1:
        raise ValueError(f"target must be in (0, 1), got {target}")
    load = _load(rate, aht_s)
    if load == 0:
        return 0
    return _smallest_agents(
        load, lambda n: n > load and service_level(n, rate, aht_s, threshold_s) >= target
    )


def agents_for_asa(rate: float, aht_s: float, target_asa_s: float) -> int:
    """Fewest agents such that the ASA is at most ``target_asa_s`` seconds."""
    if not target_asa_s > 0:
        raise ValueError(f"target_asa_s must be > 0, got {target_asa_s}")
    load = _load(rate, aht_s)
    if load == 0:
        return 0
    return _smallest_agents(load, lambda n: n > load and asa(n, rate, aht_s) <= target_asa_s)
