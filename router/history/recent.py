"""Recent contacts of a caller, for repeat-caller priority and screen pop.

:class:`RecentContacts` answers "the last N interactions of this caller" from the history
through a TTL cache, and never makes routing wait long: a look-up that does not answer
within ``timeout_s`` (store down, slow, hung) returns ``[]`` — "no history" — and the
store is left alone for ``cooldown_s`` before it is asked again, so an outage costs one
timeout, not one per call. At most ``max_inflight`` queries run at once (in threads);
more look-ups meanwhile get the cache or ``[]``.

Use from the node (asyncio)::

    recent = RecentContacts(store, limit=site.routing.screen_pop_history,
                            window_s=30 * 86400)
    contacts = await recent.lookup(caller)        # list[PastContact], newest first
    klass = "repeat" if is_repeat(contacts, now, site.routing.repeat_window_h) else ""
    ...
    recent.record(caller, PastContact(...))       # when a call ends: seen at once

or without waiting: ``recent.peek(caller)`` returns the cached list (or None) and starts a
refresh in the background.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from router.history.store import HistoryStore
from router.model import PastContact

log = logging.getLogger("tandem.history")

RECENT_SQL = """
SELECT interaction_id, toUInt32(offered_at), skill, outcome, csat
FROM {db}.interactions FINAL
WHERE caller = {caller} AND offered_at >= toDateTime({since}, 'UTC')
ORDER BY offered_at DESC, interaction_id DESC
LIMIT {limit}
"""


def is_repeat(contacts: list[PastContact], now: float, window_h: float) -> bool:
    """True when some contact was offered within ``window_h`` hours before ``now``."""
    if window_h <= 0:
        return False
    return any(now - c.offered_at <= window_h * 3600 for c in contacts)


class RecentContacts:
    def __init__(
        self,
        store: HistoryStore,
        *,
        limit: int = 5,
        window_s: float = 30 * 86400,
        ttl_s: float = 60.0,
        timeout_s: float = 0.25,
        cooldown_s: float = 5.0,
        max_entries: int = 100_000,
        max_inflight: int = 4,
        trip_on_timeout: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.limit = limit
        self.window_s = window_s
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.cooldown_s = cooldown_s
        self.max_entries = max_entries
        self.max_inflight = max_inflight
        # False: a look-up that outwaits timeout_s returns [] but leaves the store in
        # service (its query goes on and fills the cache); only a failed query trips
        # the cool-down, and at most max_inflight queries wait on a hung store. For a
        # short timeout (the node's 20 ms) that a healthy but busy store may miss.
        self.trip_on_timeout = trip_on_timeout
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, list[PastContact]]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future] = {}
        self._down_until = 0.0
        self.hits = self.misses = self.degraded = 0

    # --- reads ---------------------------------------------------------------------------

    def peek(self, caller: str) -> list[PastContact] | None:
        """The cached contacts (None when unknown or stale); starts a background refresh
        when stale. Needs a running event loop for the refresh."""
        hit = self._fresh(caller)
        if hit is None and caller:
            try:
                asyncio.get_running_loop().create_task(self.lookup(caller))
            except RuntimeError:
                pass
        return hit

    async def lookup(self, caller: str) -> list[PastContact]:
        """The caller's last ``limit`` contacts within ``window_s``, newest first; ``[]``
        when unknown or when the history cannot answer in ``timeout_s``."""
        if not caller:
            return []
        hit = self._fresh(caller)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        if self._clock() < self._down_until:
            self.degraded += 1
            return []
        fut = self._inflight.get(caller)
        if fut is None:
            if len(self._inflight) >= self.max_inflight:
                self.degraded += 1
                return []
            fut = asyncio.ensure_future(self._fetch(caller))
            self._inflight[caller] = fut
            fut.add_done_callback(lambda f, c=caller: self._fetched(c, f))
        try:
            # shield: a timed-out waiter must not cancel the fetch others may share
            return list(await asyncio.wait_for(asyncio.shield(fut), self.timeout_s))
        except asyncio.TimeoutError:
            if self.trip_on_timeout:
                self._trip(f"no answer within {self.timeout_s} s")
            else:
                self.degraded += 1
            return []
        except Exception:  # StoreError or worse: routing goes on without history
            return []  # (_fetched has tripped the breaker)

    def cached(self, caller: str) -> list[PastContact] | None:
        """The cached contacts, fresh or stale (None when unknown); no I/O, no refresh."""
        entry = self._cache.get(caller)
        return list(entry[1]) if entry is not None else None

    # --- writes --------------------------------------------------------------------------

    def record(self, caller: str, contact: PastContact) -> None:
        """A contact that just ended on this node: visible at once to later look-ups of a
        caller already in the cache (the store sees it after the writer's next batch)."""
        entry = self._cache.get(caller)
        if entry is None:
            return
        contacts = [c for c in entry[1] if c.call_id != contact.call_id]
        contacts.insert(0, contact)
        contacts.sort(key=lambda c: (c.offered_at, c.call_id), reverse=True)
        self._cache[caller] = (entry[0], contacts[: self.limit])

    def invalidate(self, caller: str | None = None) -> None:
        if caller is None:
            self._cache.clear()
        else:
            self._cache.pop(caller, None)

    # --- internals -----------------------------------------------------------------------

    def _fresh(self, caller: str) -> list[PastContact] | None:
        entry = self._cache.get(caller)
        if entry is None:
            return None
        if self._clock() - entry[0] > self.ttl_s:
            return None
        self._cache.move_to_end(caller)
        return list(entry[1])

    async def _fetch(self, caller: str) -> list[PastContact]:
        since = max(0, int(self._clock() - self.window_s))
        rows = await asyncio.to_thread(
            self.store.query, RECENT_SQL, {"caller": caller, "since": since, "limit": int(self.limit)}
        )
        contacts = [PastContact(str(r[0]), float(r[1]), str(r[2]), str(r[3]), int(r[4])) for r in rows]
        self._cache[caller] = (self._clock(), contacts)
        self._cache.move_to_end(caller)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return contacts

    def _fetched(self, caller: str, fut: asyncio.Future) -> None:
        self._inflight.pop(caller, None)
        if not fut.cancelled() and fut.exception() is not None:
            self._trip(str(fut.exception()))  # also marks the exception as retrieved

    def _trip(self, why: str) -> None:
        self.degraded += 1
        if self._clock() >= self._down_until:
            log.warning("history look-ups degraded for %.0f s: %s", self.cooldown_s, why)
        self._down_until = self._clock() + self.cooldown_s
