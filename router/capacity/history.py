"""The calls a capacity forecast learns from, read from the history store.

:func:`arrival_rows` reads the ``interactions`` table through ``FROM interactions FINAL``
(one row per call however often it was written, invariant 5; the same SQL text on
clickhouse-server 18.16 and chdb, as :mod:`router.history.kpi`) and returns one dict per
call that reached a queue (rejected calls, which never queued, are left out):

=============  ===========================================================================
site           the site whose queue took the call (the row's ``site``: ``queue`` names one
               of *its* queues, so a call that overflowed counts where it was served)
origin_site    where the call first arrived (= ``site`` unless it overflowed)
queue          the queue's name at ``site``
offered_at     Unix seconds (UTC), when it was offered
outcome        completed | abandoned
handle_s       talk + wrap-up of a completed call, else 0.0
wait_s         its time in the queue: to the answer (completed) or the hang-up (abandoned)
=============  ===========================================================================

Only ``offered_at`` (the same in every version of a row) is filtered inside the FINAL
subquery; site and queue are filtered after the merge, so a corrected row never leaves a
stale version behind (see :mod:`router.history.kpi`).

Cost: one dict per call in Python — fine for months of a mid-size center (a million
calls in a few seconds), not for years of a large one (give ``start``).
"""

from __future__ import annotations

from typing import Any

from router.history.kpi import END_OF_TIME
from router.history.store import HistoryStore

ARRIVALS_SQL = """
SELECT site, origin_site, queue, toUInt32(offered_at) AS t, outcome, handle_s, wait_s
FROM (
    SELECT site, origin_site, queue, offered_at, outcome, handle_s, wait_s
    FROM {db}.interactions FINAL
    WHERE offered_at >= toDateTime({start}, 'UTC') AND offered_at < toDateTime({end}, 'UTC')
)
WHERE queue != '' AND outcome != 'rejected'{filters}
ORDER BY t
"""


def arrivals_sql(site: str | None = None, queue: str | None = None) -> str:
    """The query text; ``{db}``, ``{start}``, ``{end}`` (and ``{site}``, ``{queue}`` when
    filtered) are the store's parameters."""
    filters = ""
    if site is not None:
        filters += " AND site = {site}"
    if queue is not None:
        filters += " AND queue = {queue}"
    return ARRIVALS_SQL.replace("{filters}", filters)


def arrival_rows(store: HistoryStore, *, site: str | None = None, queue: str | None = None,
                 start: int = 0, end: int = END_OF_TIME) -> list[dict[str, Any]]:
    """The queued calls offered in ``[start, end)`` (Unix seconds), oldest first, as the
    module docstring describes; only ``site`` / ``queue`` when given."""
    params: dict[str, Any] = {"start": int(start), "end": int(end)}
    if site is not None:
        params["site"] = site
    if queue is not None:
        params["queue"] = queue
    out = []
    for s, origin, q, t, outcome, handle_s, wait_s in store.query(arrivals_sql(site, queue), params):
        out.append({"site": s, "origin_site": origin or s, "queue": q, "offered_at": int(t), "outcome": outcome,
                    "handle_s": float(handle_s), "wait_s": float(wait_s)})
    return out
