"""Routing policy: pure functions shared by the live engine and the simulator.

Nothing here keeps state, reads a clock or draws a random number; every input is an
argument. The engine (``router.engine``) owns the state and calls these rules.

Rules, in one place:

* **Class** (:func:`classify`): "blacklist" if the caller or the customer id is
  blacklisted (it overrides everything); otherwise the highest of the declared floor,
  "vip" / "whitelist" list membership of the caller or the customer id, and "repeat"
  when the caller had a recent contact. Rank: vip > whitelist > repeat > standard.
* **Priority key** (:func:`priority_key`): ``key = arrival - head_start_s[class]``;
  smaller is served first, equal keys by handle (= arrival order). Equivalently, the
  effective priority is head start + time waited. A call keeps its key for life, so a
  rejected offer puts it back at its original place.
* **Fairness** (invariant 3): a freed agent takes the queued call with the minimal
  ``(key, handle)`` over every queue it is eligible for (:func:`eligible`).
* **Agent selection** for a call that finds free agents (:func:`selection_key`):
  "longest_idle" (earliest available-since; then higher proficiency; then agent id) or
  "most_proficient" (higher proficiency; then longest idle; then agent id).
* **Expected wait** (:func:`expected_wait`): Erlang A on the queue's position, staffed
  slots, AHT and learned abandonment rate (:func:`update_patience`,
  :func:`abandon_rate`); :data:`UNBOUNDED_WAIT_S` when nobody staffs the queue.
* **Service level** (:func:`service_level`): by the queue's ServiceLevelDefinition.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import NamedTuple

from router import erlang
from router.config import ServiceLevelDefinition

#: Class rank; the engine picks the maximum. Blacklist is not ranked: it overrides.
CLASS_RANK: dict[str, int] = {"standard": 0, "repeat": 1, "whitelist": 2, "vip": 3}
#: Classes a request may declare as a floor ("" = let the engine decide).
DECLARABLE_CLASSES = frozenset({"", "standard", "repeat", "whitelist", "vip"})
#: Smoothing factor of the average handle time (exponentially weighted moving average):
#: about the last 50 calls. With exponential handle times its noise is 10 % of the AHT
#: (sqrt(alpha / (2 - alpha))); at 0.1 it was 23 %, and, correlated with the queue
#: length, it made announcements 4-10 % long even without abandonment (bench/ewt.py).
AHT_ALPHA = 0.02
#: The expected wait of a call in a queue that no agent staffs (no staffed slot, no
#: ready agent): no finite wait can be announced. A documented sentinel rather than
#: ``inf`` so that every edge carries it as it is (protobuf, the etcd load snapshots'
#: strict JSON, Prometheus, ClickHouse), and ordered as "very long" wherever waits are
#: compared (overflow leaves such a queue and never picks it). Announcers treat
#: ``expected_wait_s >= UNBOUNDED_WAIT_S`` as "unknown": announce no wait.
UNBOUNDED_WAIT_S = 1e9
#: Waiting calls over which the abandonment rate is smoothed (the weight of the oldest
#: falls by 1/e after this many more calls that waited).
PATIENCE_WINDOW = 200
#: Exposure (seconds of waiting without an abandon) the rate starts from, so that the
#: first abandons after a few seconds of waiting do not swing it (one abandon after 10 s
#: gives 1/70 s, not 1/10 s); negligible once the window holds hours of waiting.
PATIENCE_PRIOR_S = 60.0


class CallerSets(NamedTuple):
    """The site's caller lists as sets (build once with :func:`caller_sets`)."""

    vip: frozenset[str]
    whitelist: frozenset[str]
    blacklist: frozenset[str]


def caller_sets(lists: object) -> CallerSets:
    """Sets from a :class:`router.config.CallerLists` (or anything with the three
    attributes); empty strings are dropped so that an unknown caller ("") never
    matches."""
    return CallerSets(
        *(frozenset(x for x in getattr(lists, name) if x) for name in CallerSets._fields)
    )


def classify(
    caller: str,
    customer_id: str,
    declared_class: str,
    lists: CallerSets | object,
    recent_contact: bool,
) -> str:
    """The priority class of a new call (see the module docstring).

    ``declared_class`` is "" or one of :data:`CLASS_RANK` (a floor the request asks
    for); ``lists`` is a :class:`CallerSets` or a ``CallerLists`` (slower: lists).
    """
    ids = [x for x in (caller, customer_id) if x]
    if any(x in lists.blacklist for x in ids):  # type: ignore[attr-defined]
        return "blacklist"
    best = declared_class or "standard"
    rank = CLASS_RANK[best]
    if any(x in lists.vip for x in ids):  # type: ignore[attr-defined]
        return "vip"
    if rank < 2 and any(x in lists.whitelist for x in ids):  # type: ignore[attr-defined]
        best, rank = "whitelist", 2
    if rank < 1 and recent_contact:
        best = "repeat"
    return best


def head_start(head_start_s: Mapping[str, float], klass: str) -> float:
    """Seconds of head start of a class (0 for a class the site does not list and for
    blacklist). Keys may be plain strings or ``PriorityClass`` members."""
    return float(head_start_s.get(klass, 0.0))


def priority_key(arrival: float, head_start_s: float) -> float:
    """Service-order key of a queued call: smaller first; ties by handle (arrival)."""
    return arrival - head_start_s


def eligible(
    agent_skills: Mapping[str, int],
    agent_languages: Collection[str],
    agent_capacity: Mapping[str, int],
    queue_skill: str,
    queue_language: str | None,
    queue_channel: str,
) -> bool:
    """An agent may serve a queue iff it has the queue's skill, speaks the queue's
    language (or the queue has none) and has capacity > 0 on the queue's channel."""
    return (
        queue_skill in agent_skills
        and (queue_language is None or queue_language in agent_languages)
        and agent_capacity.get(queue_channel, 0) > 0
    )


def selection_key(
    mode: str, available_since: float, proficiency: int, agent_id: str
) -> tuple[float, float, str]:
    """Sort key of a free agent for a new call; the minimum is chosen.

    "longest_idle": earliest ``available_since``, then higher proficiency, then id;
    "most_proficient": higher proficiency, then earliest ``available_since``, then id.
    """
    if mode == "most_proficient":
        return (-proficiency, available_since, agent_id)
    return (available_since, -proficiency, agent_id)


def select_agent(
    mode: str, candidates: Iterable[tuple[str, float, int]]
) -> str | None:
    """The best of ``(agent_id, available_since, proficiency)`` candidates, or None."""
    best = None
    best_key = None
    for agent_id, since, prof in candidates:
        k = selection_key(mode, since, prof, agent_id)
        if best_key is None or k < best_key:
            best, best_key = agent_id, k
    return best


def update_aht(aht_s: float, handle_time_s: float, alpha: float = AHT_ALPHA) -> float:
    """One EWMA step of the average handle time (talk + wrap-up)."""
    return aht_s + alpha * (handle_time_s - aht_s)


def update_patience(
    abandons: float, exposure_s: float, abandoned: bool, waited_s: float
) -> tuple[float, float]:
    """One step of a queue's abandonment statistics when a call stops waiting there
    (answered or abandoned) after ``waited_s`` seconds; returns the new
    ``(abandons, exposure_s)``.

    Callers are assumed to have exponential patience of rate theta; the maximum-likelihood
    estimate from censored waits is abandons / total waiting time, where an answered
    call's wait counts as exposure too (it would have hung up later, if at all). Both
    sums are exponentially weighted over the last :data:`PATIENCE_WINDOW` calls that
    waited; a call answered at once (``waited_s <= 0``) carries no information and
    changes nothing.
    """
    if not waited_s > 0:
        return abandons, exposure_s
    keep = 1.0 - 1.0 / PATIENCE_WINDOW
    return abandons * keep + (1.0 if abandoned else 0.0), exposure_s * keep + waited_s


def abandon_rate(abandons: float, exposure_s: float) -> float:
    """Hang-ups per second per waiting caller (theta, 1 / mean patience) from the
    statistics of :func:`update_patience`, with :data:`PATIENCE_PRIOR_S` of prior
    exposure; 0 before any abandon."""
    if abandons <= 0:
        return 0.0
    return abandons / (exposure_s + PATIENCE_PRIOR_S)


def expected_wait(
    position: int, aht_s: float, staffed_slots: int, free_agent: bool, abandon_rate: float = 0.0
) -> float:
    """Expected wait in seconds of the call at ``position`` (1 = next) in a queue, if
    it waits until answered (an announcement: what the caller will wait if they stay).

    ``W(k) = sum_{j=0}^{k-1} 1 / (S / AHT + j theta)`` (:func:`router.erlang.erlang_a_delay`):
    AHT is the queue's average handle time, S its staffed slots — the sum, over agents
    eligible for the queue that are signed in and not NOT_READY (ready or in wrap-up),
    of their capacity on the queue's channel — and theta the rate at which its waiting
    callers hang up (:func:`abandon_rate`). While j callers are ahead, the next of them
    leaves at rate S/AHT (a slot frees and takes the head) plus j theta (one hangs up).
    With theta = 0 it is ``k * AHT / S``, the time for k slot turnovers. The call at
    position 1 waits 0 when an eligible agent is free; position 0 (not queued) waits 0.

    A queue with no staffed slot (hence no free agent) has no finite wait: it returns
    :data:`UNBOUNDED_WAIT_S`; an estimate that large anyway is capped at it.
    """
    if position <= 0 or (position == 1 and free_agent):
        return 0.0
    if staffed_slots <= 0:
        return UNBOUNDED_WAIT_S
    w = erlang.erlang_a_delay(position, staffed_slots, aht_s, abandon_rate)
    return w if w < UNBOUNDED_WAIT_S else UNBOUNDED_WAIT_S


def service_level_from_counts(
    definition: ServiceLevelDefinition,
    answered: int,
    answered_within: int,
    abandoned: int,
    abandoned_within: int,
) -> float:
    """Service level from window counts ("within" = waited <= threshold_s); -1.0 when
    the denominator is 0. See :class:`ServiceLevelDefinition` for the three rules."""
    if definition.abandons == "count_against":
        denom = answered + abandoned
    elif definition.abandons == "exclude":
        denom = answered
    else:  # short_excluded
        denom = answered + abandoned - abandoned_within
    if denom <= 0:
        return -1.0
    return answered_within / denom


def service_level(
    finished: Iterable[tuple[bool, float]], definition: ServiceLevelDefinition
) -> float:
    """Service level of finished calls given as ``(answered, waited_s)``: an answered
    call counts when it was answered, an abandoned one when the caller hung up."""
    t = definition.threshold_s
    ans = ans_in = ab = ab_in = 0
    for answered, waited in finished:
        within = waited <= t
        if answered:
            ans += 1
            ans_in += within
        else:
            ab += 1
            ab_in += within
    return service_level_from_counts(definition, ans, ans_in, ab, ab_in)
