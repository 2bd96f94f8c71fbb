"""The calls of a past period, for the what-if replay (``tandem ctl policy apply --dry-run``).

:func:`recent_arrivals` reads the ``interactions`` table (``FINAL``: one row per call,
as every history reader) and returns one plain dict per call, at its *origin* — where
it first arrived — with what the replay needs (:func:`router.whatif.arrivals_from_rows`
turns them into :class:`router.whatif.Arrival`):

==============  ==========================================================================
call_id         the interaction id
site            the origin site (``origin_site``; the row's site when empty)
at              arrival time, Unix seconds (float, see below)
skill, channel, language, caller, customer_id, priority_class (the class it got)
outcome         completed | abandoned | rejected
ended_site      the site that ended it (differs from ``site`` for an overflowed call)
waited_s        from arrival at the origin to the answer or the hang-up
handle_s        talk + wrap-up of an answered call, else None
patience_s      ``waited_s`` of an abandoned call (its patience), else None (censored)
transfer_count  how many times it moved
==============  ==========================================================================

One call, one dict: a call that overflowed is written by the site that ended it, with
the origin in ``origin_site`` and its first arrival in ``offered_at``; should rows of one
call be present for several sites (a correction, a replayed or merged history), the one
with the highest ``ver`` (the latest) gives the outcome, as ``FINAL`` does.

Times: ``offered_at`` is stored in whole seconds, but ``ver`` (the end in milliseconds)
minus the exact ``wait_s`` and ``talk_s`` gives the start of the wait to the
millisecond; for a call that never moved that start is its arrival, used when it agrees
with ``offered_at`` (within its second). For an overflowed call the arrival is
``offered_at`` (whole second) and the wait runs from there to the answer or hang-up at
the other site (queued there at ``ver`` - ``wait_s`` - ``talk_s``).
"""

from __future__ import annotations

import math
from typing import Any

from router.history.store import HistoryStore

ARRIVALS_SQL = """
SELECT interaction_id, ver, site, origin_site, skill, channel, language, caller, customer_id,
    priority_class, outcome, toUInt32(offered_at), toUInt32(answered_at), wait_s, talk_s, handle_s,
    transfer_count
FROM {db}.interactions FINAL
WHERE offered_at >= toDateTime({since}, 'UTC') AND offered_at < toDateTime({until}, 'UTC')
ORDER BY offered_at, interaction_id
"""

#: "No end": 2100-01-01 (as router.history.kpi.END_OF_TIME).
_END = 4_102_444_800


def recent_arrivals(store: HistoryStore, since_s: float, until_s: float | None = None) -> list[dict[str, Any]]:
    """Calls that arrived in ``[since_s, until_s)`` (Unix seconds; ``until_s`` None =
    no end), one dict per call in arrival order (see the module docstring)."""
    since = max(0, math.floor(since_s))
    until = _END if until_s is None else min(_END, math.ceil(until_s))
    if until <= since:
        return []
    rows = store.query(ARRIVALS_SQL, {"since": since, "until": until})
    best: dict[str, tuple] = {}
    for r in rows:
        cur = best.get(r[0])
        if cur is None or r[1] > cur[1]:
            best[r[0]] = r
    out = [_arrival(r) for r in best.values()]
    out = [a for a in out if since_s <= a["at"] and (until_s is None or a["at"] < until_s)]
    out.sort(key=lambda a: (a["at"], a["call_id"]))
    return out


def _arrival(r: tuple) -> dict[str, Any]:
    (cid, ver, site, origin, skill, channel, language, caller, customer, klass, outcome,
     offered_at, answered_at, wait_s, talk_s, handle_s, transfers) = r  # fmt: skip
    answered = int(answered_at) > 0
    end = int(ver) / 1000.0
    start = end - float(wait_s) - (float(talk_s) if answered else 0.0)  # when its last wait began
    moved = int(transfers) > 0 or (origin and origin != site)
    if not moved and offered_at <= start < offered_at + 1.001:
        at = start
    else:
        at = float(offered_at)
    if outcome == "rejected":
        waited = 0.0
    elif moved:
        waited = max(float(wait_s), start + float(wait_s) - at)
    else:
        waited = float(wait_s)
    return {
        "call_id": cid,
        "site": origin or site,
        "at": at,
        "skill": skill,
        "channel": channel,
        "language": language,
        "caller": caller,
        "customer_id": customer,
        "priority_class": klass,
        "outcome": outcome,
        "ended_site": site,
        "waited_s": waited,
        "handle_s": float(handle_s) if answered and outcome == "completed" else None,
        "patience_s": waited if outcome == "abandoned" else None,
        "transfer_count": int(transfers),
    }
