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

* :func:`erlang_a`: the exact steady state of M/M/N+M, a birth-death chain on the number
  ``n`` of calls in the system (waiting or talking) with births at rate ``lambda`` and
  deaths at rate ``min(n, N) mu + max(n - N, 0) theta``. Relative to ``pi_N``:
  ``pi_n / pi_N = prod_{m=n+1}^{N} m / A`` below N (summed by a recurrence in log
  space), ``w_k = pi_{N+k} / pi_N = prod_{j=1}^{k} lambda / (N mu + j theta)`` above
  (summed term by term in log space, with a running scale, until the rest is below
  1e-17 of the sum; the ratios fall, so a geometric bound holds the rest). Then

  - P(wait) = P(n >= N) (arrivals see time averages, PASTA);
  - P(abandon) = theta E[queue] / lambda (the abandonment rate over the arrival rate);
  - ASA = E[queue] / lambda (Little): the mean time in queue over *all* arrivals,
    answered or not (callers who hang up count with the time they waited);
  - occupancy = lambda (1 - P(abandon)) aht / N, the carried load per agent;
  - service level SL(T) = the fraction of *all* arrivals answered within T seconds
    (abandons count against it, however early). A caller who finds ``k`` callers
    waiting would, if patient, be answered after the sum of independent exponentials
    of rates ``N mu + i theta``, ``i = k .. 0`` (its offered wait V), and is answered by
    T when V <= T and its own patience outlasts V: P = E[exp(-theta V); V <= T].
    With ``b = N mu / theta``, ``exp(-theta V)`` has the Beta(b, k + 1) law (the rates
    are those of the order statistics of exponentials), which gives
    ``P = b / (b + k + 1) * P(F > k)``, F the number of failures before the
    ``(b + 1)``-th success in trials that succeed with probability ``exp(-theta T)``
    (negative binomial): sums of positive terms, in log space.
    SL(0) = 1 - P(wait); SL(inf) = 1 - P(abandon).

  Without patience (``patience_s`` None or inf) it is Erlang C, by the functions above.

Times are in seconds throughout; functions take plain floats and ints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = [
    "ErlangA",
    "agents_for_asa",
    "agents_for_service_level",
    "asa",
    "erlang_a",
    "erlang_a_delay",
    "erlang_b",
    "erlang_c",
    "occupancy",
    "service_level",
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
    lo = math.floor(load)  # not enough (unstable), or 0
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


# --- Erlang A: exact M/M/N+M --------------------------------------------------------------

#: The tail of the birth-death chain is summed until what is left is below this fraction.
_TAIL_EPS = 1e-17
#: More states above N than this: refuse rather than loop for minutes (patience far longer
#: than the handle time with a heavy overload; use Erlang C, ``patience_s=None``, then).
_MAX_TAIL = 5_000_000


def _log_add(x: float, y: float) -> float:
    """log(e^x + e^y) without overflow; -inf stands for 0."""
    if x < y:
        x, y = y, x
    if y == -math.inf:
        return x
    return x + math.log1p(math.exp(y - x))


@dataclass(frozen=True)
class ErlangA:
    """The steady state of one M/M/N+M queue (see the module docstring for the model
    and the definitions). ``patience_s`` None: Erlang C (no one hangs up); then
    ``asa_s`` is inf when the queue is unstable (``rate * aht_s >= agents``).

    ``p_wait``: P(an arrival waits); ``p_abandon``: P(it hangs up before an answer);
    ``asa_s``: mean time in queue over all arrivals; ``occupancy``: carried load per
    agent. :meth:`service_level` gives the fraction of all arrivals answered within T.
    """

    agents: int
    rate: float
    aht_s: float
    patience_s: float | None
    p_wait: float
    p_abandon: float
    asa_s: float
    occupancy: float
    # P(n < N), and P(n = N + k) for k = 0, 1, ... (Erlang A only): what service_level reads.
    p_below: float = field(default=0.0, repr=False)
    tail: tuple[float, ...] = field(default=(), repr=False)

    @property
    def load(self) -> float:
        """Offered load in Erlangs (``rate * aht_s``)."""
        return self.rate * self.aht_s

    def service_level(self, threshold_s: float) -> float:
        """The fraction of all arrivals answered within ``threshold_s`` seconds (those
        who hang up count as not answered); ``1 - p_wait`` at 0, ``1 - p_abandon`` at
        inf."""
        if not threshold_s >= 0:
            raise ValueError(f"threshold_s must be >= 0, got {threshold_s}")
        if self.patience_s is None:
            if math.isinf(threshold_s):
                return 0.0 if self.load >= self.agents else 1.0
            return service_level(self.agents, self.rate, self.aht_s, threshold_s)
        if self.rate == 0:
            return 1.0
        if threshold_s == 0:
            return self.p_below
        theta = 1.0 / self.patience_s
        b = self.agents / self.aht_s / theta  # N mu / theta
        if math.isinf(threshold_s):  # F is infinite: every caller who would be answered is
            return min(1.0, self.p_below + sum(p * b / (b + k + 1) for k, p in enumerate(self.tail)))
        # F: failures before success number b + 1, success probability q = exp(-theta T).
        log_fail = math.log(-math.expm1(-theta * threshold_s))  # log(1 - q)
        log_pmf = -(b + 1) * theta * threshold_s  # log P(F = 0) = (b + 1) log q
        cdf = 0.0
        total = self.p_below
        for k, p in enumerate(self.tail):
            if k:
                log_pmf += log_fail + math.log((k + b) / k)
            cdf += math.exp(log_pmf)
            if cdf >= 1.0:
                break  # the rest of the answered-by-T probabilities are 0 (to rounding)
            total += p * b / (b + k + 1) * (1.0 - cdf)
        return min(1.0, total)


def erlang_a(agents: int, rate: float, aht_s: float, patience_s: float | None) -> ErlangA:
    """The exact steady state of M/M/N+M: ``agents`` agents, Poisson arrivals at ``rate``
    calls per second, exponential handle times of mean ``aht_s`` seconds, exponential
    patience of mean ``patience_s`` seconds (None or inf: nobody hangs up, Erlang C).
    Always stable with patience, whatever the load. ``ValueError`` for bad arguments or
    a tail of more than five million states (patience far longer than the handle time
    in a heavy overload: use Erlang C)."""
    load = _load(rate, aht_s)
    _check(agents, load)
    if patience_s is None or math.isinf(patience_s):
        if patience_s is not None and patience_s < 0:
            raise ValueError(f"patience_s must be > 0, got {patience_s}")
        pw = erlang_c(agents, load)
        return ErlangA(agents, rate, aht_s, None, pw, 0.0, asa(agents, rate, aht_s),
                       occupancy(agents, rate, aht_s))
    if not (patience_s > 0):
        raise ValueError(f"patience_s must be a number > 0 seconds, got {patience_s}")
    if rate == 0:
        return ErlangA(agents, rate, aht_s, patience_s, 0.0, 0.0, 0.0, 0.0, 1.0, (0.0,))
    theta = 1.0 / patience_s
    served = agents / aht_s  # N mu
    # log of sum_{n<N} pi_n / pi_N: G_N = (N / A) (1 + G_{N-1}), G_0 = 0.
    log_below = -math.inf
    for n in range(1, agents + 1):
        log_below = math.log(n / load) + _log_add(0.0, log_below)
    # The tail w_k, k >= 0, with sums s0 = sum w_k and s1 = sum k w_k scaled by exp(-scale).
    logs = [0.0]
    scale, s0, s1 = 0.0, 1.0, 0.0
    lw, k = 0.0, 0
    while True:
        k += 1
        if k > _MAX_TAIL:
            raise ValueError("Erlang A: the queue's tail exceeds five million states; "
                             "patience too long for this overload (use Erlang C)")
        lw += math.log(rate / (served + k * theta))
        logs.append(lw)
        if lw > scale:
            f = math.exp(scale - lw)
            s0, s1, scale = s0 * f, s1 * f, lw
        w = math.exp(lw - scale)
        s0 += w
        s1 += k * w
        r = rate / (served + (k + 1) * theta)  # the next ratio; the ratios only fall
        if r < 1:
            rest0 = w * r / (1 - r)
            rest1 = w * (k * r / (1 - r) + r / (1 - r) ** 2)
            if rest0 <= _TAIL_EPS * s0 and rest1 <= _TAIL_EPS * s1:
                break
    log_z = _log_add(log_below, scale + math.log(s0))
    p_wait = math.exp(scale + math.log(s0) - log_z)
    queue = s1 * math.exp(scale - log_z)  # E[number waiting]
    asa_s = queue / rate
    p_abandon = min(1.0, theta * asa_s)
    carried = rate * (1.0 - p_abandon) * aht_s
    occ = min(1.0, carried / agents) if agents else 0.0
    tail = tuple(math.exp(x - log_z) for x in logs)
    return ErlangA(agents, rate, aht_s, patience_s, p_wait, p_abandon, asa_s, occ,
                   math.exp(log_below - log_z), tail)
