"""Erlang C and A: the M/M/N queue of staffing textbooks, without and with callers who
hang up (pure, no I/O, no numpy/scipy).

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

Erlang A (M/M/N+M: the same queue where each waiting caller hangs up after an
exponential patience of rate ``theta``, mean ``1/theta``) — what the engine announces:

* :func:`erlang_a_delay`: the expected wait of a caller who finds ``k - 1`` callers
  ahead and all N agents busy, if that caller waits until answered (Whitt 1999,
  "Predicting queueing delays", the queue-length-based predictor for M/M/s+M):
  ``E[W_k] = sum_{j=0}^{k-1} 1 / (N mu + j theta)``, ``mu = 1 / aht``. While ``j``
  callers are ahead, the next departure from ahead — a service completion that moves
  the head to an agent, or one of the ``j`` hanging up — comes at rate
  ``N mu + j theta``; by memorylessness the stages are independent exponentials. With
  ``theta = 0`` it is ``k aht / N``, the M/M/N figure.

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
    "erlang_a_delay",
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


#: Terms of :func:`erlang_a_delay` summed one by one; the rest by Euler-Maclaurin.
_DIRECT_TERMS = 16


def erlang_a_delay(position: int, agents: int, aht_s: float, theta: float) -> float:
    """Expected wait in seconds, until an agent takes it, of a caller at ``position``
    (1 = next; ``position - 1`` callers ahead) of an M/M/N+M queue whose ``agents``
    agents are all busy, each finishing a call in an exponential time of mean
    ``aht_s``, and whose waiting callers hang up at rate ``theta`` per second each
    (0 = nobody hangs up): ``sum_{j=0}^{k-1} 1 / (N/aht + j theta)``, for a caller who
    does not hang up (see the module docstring).

    Exactly ``position * aht_s / agents`` when ``theta == 0``; decreasing in ``theta``;
    grows like ``log(k) / theta`` for long queues. 0 for ``position <= 0``.
    O(1): the first 16 terms are summed, the tail by the Euler-Maclaurin formula (its
    terms vary by at most 1/16 from one to the next: the truncation error is below
    1e-9 relative).
    """
    if not isinstance(agents, int) or agents <= 0:
        raise ValueError(f"agents must be an int >= 1, got {agents!r}")
    if not (aht_s > 0 and math.isfinite(aht_s)):
        raise ValueError(f"aht_s must be a finite number > 0, got {aht_s}")
    if not (theta >= 0 and math.isfinite(theta)):
        raise ValueError(f"theta must be a finite rate >= 0, got {theta}")
    if position <= 0:
        return 0.0
    if theta == 0:
        return position * aht_s / agents
    a = agents / aht_s
    m = min(position, _DIRECT_TERMS)
    total = 0.0
    for j in range(m):
        total += 1.0 / (a + j * theta)
    if position > m:
        n = position - 1  # the tail: terms j = m .. n, with f(j) = 1 / (a + j theta)
        xm, xn = a + m * theta, a + n * theta
        total += (
            math.log1p(theta * (n - m) / xm) / theta  # integral of f from m to n
            + (1.0 / xm + 1.0 / xn) / 2.0
            + theta * (1.0 / (xm * xm) - 1.0 / (xn * xn)) / 12.0  # (f'(n) - f'(m)) / 12
            - theta**3 * (1.0 / xm**4 - 1.0 / xn**4) / 120.0  # -(f'''(n) - f'''(m)) / 720
        )
    return total
