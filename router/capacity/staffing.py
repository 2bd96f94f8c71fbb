"""Agents needed for one queue and interval: exact Erlang C, or Erlang A with the
queue's patience, square-root staffing as a cross-check (pure; no I/O, no numpy).

:func:`staff` takes the interval's arrival rate (calls per hour), the mean handle time,
a service-level goal "GOAL of the calls answered within T seconds", and optionally the
callers' mean patience (Erlang A: exponential patience; without it nobody hangs up,
Erlang C), a number of agents to evaluate instead of solving for one, a cap on
occupancy and the shrinkage. It returns a :class:`StaffingResult`:

* ``agents``: the given N, or the fewest agents whose service level reaches the goal
  and whose occupancy is at most ``max_occupancy`` (both are monotone in N: a doubling
  search from a lower bound, then a bisection);
* ``service_level``, ``asa_s``, ``p_wait``, ``p_abandon``, ``occupancy`` at that N, as
  defined in :mod:`router.erlang` (service level and ASA over *all* arrivals; occupancy
  = carried load / N, the carried load ``lambda (1 - P(abandon)) aht``);
* ``scheduled`` = ceil(agents / (1 - shrinkage)): the agents to put on the schedule so
  that ``agents`` are on the phones after breaks, training and absence;
* ``sqrt_staffing_agents`` (and ``sqrt_staffing_beta``): the square-root staffing rule
  N = R + beta sqrt(R) (R the offered load) for the same service-level goal, beta solved
  from the many-server (QED) approximation of the service level — Halfin-Whitt for
  Erlang C, Garnett-Mandelbaum-Reiman for Erlang A (below). It ignores the occupancy cap;
  a large gap to ``agents`` means the approximation does not fit this (small) queue.

QED approximation (N = R + beta sqrt(R), tau = T sqrt(R) / aht, r = sqrt(aht / patience),
beta^ = beta / r, h the hazard rate phi / (1 - Phi) of the standard normal):

* Erlang C: P(wait) = [1 + beta Phi(beta) / phi(beta)]^-1, SL = 1 - P(wait) e^(-beta tau);
* Erlang A: P(wait) = [1 + r h(beta^) / h(-beta)]^-1, and
  SL = 1 - P(wait) [(1 - Phi(beta^ + r tau)) / (1 - Phi(beta^)) + r (h(beta^) - beta^) / sqrt(R)]
  (waits beyond T, then the abandonments), which tends to the Erlang C form as r -> 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from router import erlang

_MAX_AGENTS = 1_000_000


@dataclass(frozen=True)
class StaffingResult:
    """One queue's staffing for one interval; :meth:`to_dict` is the CLI's JSON."""

    model: str  # "erlang_c" or "erlang_a"
    arrivals_per_hour: float
    aht_s: float
    offered_load: float  # Erlangs
    sl_threshold_s: float
    sl_goal: float
    patience_s: float | None
    max_occupancy: float | None
    shrinkage: float
    agents: int
    service_level: float
    asa_s: float  # inf for an unstable Erlang C queue (given too few agents)
    p_wait: float
    p_abandon: float
    occupancy: float
    scheduled: int
    sqrt_staffing_agents: int
    sqrt_staffing_beta: float
    meets_goal: bool  # service level and occupancy cap both met at ``agents``

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values; an infinite ASA (unstable queue) becomes None."""
        d = asdict(self)
        if math.isinf(d["asa_s"]):
            d["asa_s"] = None
        return d


def _evaluate(agents: int, rate: float, aht_s: float, patience_s: float | None) -> erlang.ErlangA:
    return erlang.erlang_a(agents, rate, aht_s, patience_s)


def _meets(q: erlang.ErlangA, threshold_s: float, goal: float, max_occupancy: float | None) -> bool:
    if q.patience_s is None and q.load >= q.agents:
        return False  # unstable: the queue grows without bound
    if max_occupancy is not None and q.occupancy > max_occupancy:
        return False
    return q.service_level(threshold_s) >= goal


def _smallest(ok, start: int) -> int:
    """Smallest N >= start with ok(N), ok monotone (False then True) and False below
    ``start``."""
    lo, hi = start - 1, start
    while not ok(hi):
        lo, hi = hi, hi * 2
        if hi > _MAX_AGENTS:
            raise ValueError("the goal needs more than a million agents")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def scheduled_agents(agents: int, shrinkage: float) -> int:
    """ceil(agents / (1 - shrinkage)), without rounding noise pushing an exact quotient
    up by one (14 / 0.7 is 20.000000000000004 in floats)."""
    if not 0 <= shrinkage < 1:
        raise ValueError(f"shrinkage must be in [0, 1), got {shrinkage}")
    return math.ceil(agents / (1.0 - shrinkage) - 1e-9)


def staff(
    arrivals_per_hour: float,
    aht_s: float,
    sl_threshold_s: float,
    sl_goal: float,
    *,
    patience_s: float | None = None,
    agents: int | None = None,
    max_occupancy: float | None = None,
    shrinkage: float = 0.0,
) -> StaffingResult:
    """Staff one queue for one interval (see the module docstring). ``ValueError`` names
    the bad argument: rates, times and patience must be positive and finite,
    0 < sl_goal < 1, sl_threshold_s >= 0, 0 < max_occupancy <= 1, 0 <= shrinkage < 1,
    agents >= 1."""
    for name, v in (("arrivals_per_hour", arrivals_per_hour), ("aht_s", aht_s)):
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a positive number, got {v}")
    if patience_s is not None and not (patience_s > 0 and math.isfinite(patience_s)):
        raise ValueError(f"patience_s must be a positive number, got {patience_s}")
    if not (sl_threshold_s >= 0 and math.isfinite(sl_threshold_s)):
        raise ValueError(f"sl_threshold_s must be a number >= 0, got {sl_threshold_s}")
    if not 0 < sl_goal < 1:
        raise ValueError(f"sl_goal must be in (0, 1), got {sl_goal}")
    if max_occupancy is not None and not 0 < max_occupancy <= 1:
        raise ValueError(f"max_occupancy must be in (0, 1], got {max_occupancy}")
    if not 0 <= shrinkage < 1:
        raise ValueError(f"shrinkage must be in [0, 1), got {shrinkage}")
    if agents is not None and (not isinstance(agents, int) or agents < 1 or agents > _MAX_AGENTS):
        raise ValueError(f"agents must be an integer from 1 to {_MAX_AGENTS}, got {agents}")

    rate = arrivals_per_hour / 3600.0
    load = rate * aht_s
    if agents is None:
        # Below the start nothing meets the goal: Erlang C needs N > A; in Erlang A the
        # answered share 1 - P(abandon) is at most N / A (occupancy <= 1), so the service
        # level is below the goal while N < goal * A.
        start = math.floor(load) + 1 if patience_s is None else max(1, math.floor(sl_goal * load))
        agents = _smallest(lambda n: _meets(_evaluate(n, rate, aht_s, patience_s),
                                            sl_threshold_s, sl_goal, max_occupancy), start)
    q = _evaluate(agents, rate, aht_s, patience_s)
    beta = sqrt_staffing_beta(load, aht_s, sl_threshold_s, sl_goal, patience_s)
    sqrt_n = max(1, math.ceil(load + beta * math.sqrt(load) - 1e-9))
    return StaffingResult(
        model="erlang_c" if patience_s is None else "erlang_a",
        arrivals_per_hour=arrivals_per_hour,
        aht_s=aht_s,
        offered_load=load,
        sl_threshold_s=sl_threshold_s,
        sl_goal=sl_goal,
        patience_s=patience_s,
        max_occupancy=max_occupancy,
        shrinkage=shrinkage,
        agents=agents,
        service_level=q.service_level(sl_threshold_s),
        asa_s=q.asa_s,
        p_wait=q.p_wait,
        p_abandon=q.p_abandon,
        occupancy=q.occupancy,
        scheduled=scheduled_agents(agents, shrinkage),
        sqrt_staffing_agents=sqrt_n,
        sqrt_staffing_beta=beta,
        meets_goal=_meets(q, sl_threshold_s, sl_goal, max_occupancy),
    )


# --- square-root staffing ----------------------------------------------------------------

_SQRT_2PI = math.sqrt(2 * math.pi)


def _phi(x: float) -> float:
    return math.exp(-0.5 * x * x) / _SQRT_2PI


def _upper(x: float) -> float:
    """1 - Phi(x)."""
    return 0.5 * math.erfc(x / math.sqrt(2))


def _mills(x: float) -> float:
    """(1 - Phi(x)) / phi(x) for x >= 5, where both underflow soon (Laplace's continued
    fraction)."""
    f = x
    for k in range(60, 0, -1):
        f = x + k / f
    return 1.0 / f


def _hazard(x: float) -> float:
    """h(x) = phi(x) / (1 - Phi(x)); 0 where phi underflows (x far below 0)."""
    return _phi(x) / _upper(x) if x < 5 else 1.0 / _mills(x)


def _tail_ratio(y: float, x: float) -> float:
    """(1 - Phi(y)) / (1 - Phi(x)) for y >= x."""
    if x < 5:
        return _upper(y) / _upper(x)
    return _mills(y) / _mills(x) * math.exp(-0.5 * (y - x) * (y + x))


def qed_service_level(beta: float, load: float, aht_s: float, threshold_s: float,
                      patience_s: float | None) -> float:
    """The QED approximation of the service level with N = R + beta sqrt(R) (module
    docstring); Erlang C needs beta > 0 (0 returned otherwise)."""
    tau = threshold_s * math.sqrt(load) / aht_s
    if patience_s is None:
        if beta <= 0:
            return 0.0
        p_wait = 1.0 / (1.0 + beta / _hazard(-beta))
        return 1.0 - p_wait * math.exp(-beta * tau)
    r = math.sqrt(aht_s / patience_s)
    bh = beta / r
    p_wait = 1.0 / (1.0 + r * _hazard(bh) / _hazard(-beta))
    late = _tail_ratio(bh + r * tau, bh)
    abandon = r * (_hazard(bh) - bh) / math.sqrt(load)
    return 1.0 - p_wait * (late + abandon)


def sqrt_staffing_beta(load: float, aht_s: float, threshold_s: float, goal: float,
                       patience_s: float | None) -> float:
    """The beta whose QED service level is ``goal`` (bisection; the approximation
    rises with beta)."""
    lo, hi = (0.0, 40.0) if patience_s is None else (-40.0, 40.0)
    for _ in range(200):
        mid = (lo + hi) / 2
        if qed_service_level(mid, load, aht_s, threshold_s, patience_s) >= goal:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-12:
            break
    return hi
