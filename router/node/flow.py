"""Overflow flow of a node in the last minute: calls handed to other sites (``out``: the
origin's ``transfer_done``) and taken from them (``in``: the target's committed
``transfer_commit``), per queue. For ``Admin.GetStatus`` and ``tandem top``; bounded
(entries older than the window are dropped as new ones come or on read)."""

from __future__ import annotations

import time
from collections import deque

WINDOW_S = 60.0
MAX_ENTRIES = 100_000


class FlowWindow:
    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._events: deque[tuple[float, str, str]] = deque(maxlen=MAX_ENTRIES)

    def record(self, direction: str, queue: str, now: float | None = None) -> None:
        """``direction`` "in" or "out"."""
        self._events.append((time.monotonic() if now is None else now, direction, queue))

    def counts(self, now: float | None = None) -> dict[tuple[str, str], int]:
        """(direction, queue) -> calls in the window; also (direction, "") for the site."""
        now = time.monotonic() if now is None else now
        ev = self._events
        while ev and ev[0][0] < now - self.window_s:
            ev.popleft()
        out: dict[tuple[str, str], int] = {}
        for _t, d, q in ev:
            out[(d, q)] = out.get((d, q), 0) + 1
            out[(d, "")] = out.get((d, ""), 0) + 1
        return out
