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
* **Expected wait** (:func:`expected_wait`): see there.
* **Service level** (:func:`service_level`): by the queue's ServiceLevelDefinition.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import NamedTuple

from router.config import ServiceLevelDefinition

#: Class rank; the engine picks the maximum. Blacklist is not ranked: it overrides.
CLASS_RANK: dict[str, int] = {"standard": 0, "repeat": 1, "whitelist": 2, "vip": 3}
#: Classes a request may declare as a floor ("" = let the engine decide).
DECLARABLE_CLASSES = frozenset({"", "standard", "repeat", "whitelist", "vip"})
#: Smoothing factor of the average handle time (exponentially weighted moving average).
AHT_ALPHA = 0.1


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


def expected_wait(
    position: int, aht_s: float, staffed_slots: int, free_agent: bool
) -> float:
    """Expected wait in seconds of the call at ``position`` (1 = next) in a queue.

    ``W(k) = k * AHT / max(1, S)`` where AHT is the queue's average handle time and S
    the staffed slots: the sum, over agents eligible for the queue that are signed in
    and not NOT_READY (ready or in wrap-up), of their capacity on the queue's channel.
    It is the time until k slots have turned over, assuming the S slots are busy and
    free up evenly. The call at position 1 waits 0 when an eligible agent is free.
    Position 0 (not queued) waits 0.
    """
    if position <= 0 or (position == 1 and free_agent):
        return 0.0
    return position * aht_s / max(1, staffed_slots)


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
