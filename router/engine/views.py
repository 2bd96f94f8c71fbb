"""The engine's read API (part of :class:`router.engine.Engine`).

Reads never change the state. Views are built on demand, one per call; a CallView shares
the call's ``context`` dict with the engine — treat it as read-only. Times default to the
engine's time (the latest applied command's ``t``); ``now=`` reads at another instant.

QueueView: ``expected_wait_s`` is that of a new standard call joining now (position
length + 1, see :func:`router.policy.expected_wait`: Erlang A with the queue's learned
abandonment; :data:`router.policy.UNBOUNDED_WAIT_S` when nobody staffs the queue — the
same figure OfferCall, GetCall and WatchCall announce); ``agents_ready`` counts eligible
agents that are ready with a free slot on the queue's channel; ``agents_staffed`` the
eligible agents signed in, whatever their state; ``oldest_wait_s`` the wait so far of
the longest-waiting queued call; ``service_level`` uses the recent window.

Paging (:meth:`ViewsMixin.calls_page`) relies on one property of the engine: a call
enters ``_calls`` (offer, transfer in, restore) with a handle larger than every handle
before it, so the dict's order is handle order. Pages resume after a handle, through an
index kept here (a list of the calls in handle order, extended from the dict's newest
end and compacted when too many of its entries have left retention): a page costs
O(log n + what it scans), not O(retained calls).
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from operator import attrgetter
from typing import TYPE_CHECKING

from router.engine import validate as v
from router import policy
from router.model import AgentView, CallView, OfferResult, PastContact, QueueView, RoutingError

if TYPE_CHECKING:  # pragma: no cover
    from router.engine.records import Call, Queue

_LISTABLE_STATES = frozenset(
    {"queued", "assigned", "connected", "completed", "abandoned", "rejected", "transferring", "transferred"}
)
_HANDLE = attrgetter("handle")


class _CallIndex:
    """Calls in handle order as of ``next_handle`` (some may have left ``_calls``)."""

    __slots__ = ("calls", "next_handle")

    def __init__(self, calls: list, next_handle: int) -> None:
        self.calls = calls
        self.next_handle = next_handle


class ViewsMixin:
    @property
    def now(self) -> float:
        """The engine's time: the latest ``t`` of a command that changed the state."""
        return self._now

    # -- calls --------------------------------------------------------------------------

    def call(self, call_id: str) -> CallView:
        return self._call(call_id).view(self._site_name)

    def position(self, call_id: str) -> int:
        """1-based place in its queue (1 = next), 0 when not queued. O(queue length)."""
        call = self._call(call_id)
        if call.state != "queued":
            return 0
        return self._queues[call.queue].pq.rank(call.handle) + 1

    def expected_wait(self, call_id: str) -> float:
        """Expected seconds until an agent is offered the call (0 unless queued;
        :data:`router.policy.UNBOUNDED_WAIT_S` when nobody staffs its queue)."""
        call = self._call(call_id)
        if call.state != "queued":
            return 0.0
        q = self._queues[call.queue]
        return q.expected_wait(q.pq.rank(call.handle) + 1)

    def calls(self, state: str | None = None) -> list[CallView]:
        """Retained calls (active and ended), in offer order, optionally of one state."""
        if state is not None and state not in _LISTABLE_STATES:
            raise RoutingError(
                "INVALID_ARGUMENT", "INVALID_STATE", f"unknown call state {state!r}", state=state
            )
        site = self._site_name
        return [
            c.view(site) for c in self._calls.values() if state is None or c.state == state
        ]

    def calls_page(
        self, state: str | None, after: int, size: int, scan_limit: int
    ) -> tuple[list[CallView], int]:
        """One page of :meth:`calls`: up to ``size`` calls (of ``state``, if given) that
        come after handle ``after`` (0: from the start), examining at most
        ``scan_limit`` calls. Returns the views and the handle to resume after, or 0
        when nothing is left (a page may be short, even empty, and still not be the
        last: a sparse state filter stops at the scan limit)."""
        if state is not None and state not in _LISTABLE_STATES:
            raise RoutingError(
                "INVALID_ARGUMENT", "INVALID_STATE", f"unknown call state {state!r}", state=state
            )
        index = self._call_index()
        order, live, site = index.calls, self._calls, self._site_name
        i = bisect_right(order, after, key=_HANDLE)
        n = len(order)
        out: list[CallView] = []
        scanned = 0
        while i < n and len(out) < size and scanned < scan_limit:
            c = order[i]
            i += 1
            scanned += 1
            if live.get(c.call_id) is c and (state is None or c.state == state):
                out.append(c.view(site))
        while i < n and live.get(order[i].call_id) is not order[i]:
            i += 1  # entries that left retention: no reason to hand out another page
        return out, (order[i - 1].handle if i < n else 0)

    def _call_index(self) -> _CallIndex:
        """The paging index, brought up to date: O(calls offered since the last page),
        plus an amortized rebuild once half of it is calls no longer retained."""
        calls = self._calls
        index = getattr(self, "_paging_index", None)
        if index is None or len(index.calls) > 2 * len(calls) + 1024:
            index = self._paging_index = _CallIndex(list(calls.values()), self._next_handle)
            return index
        if index.next_handle != self._next_handle:
            first_new = index.next_handle
            new = []
            for c in reversed(calls.values()):  # newest first: the dict is in handle order
                if c.handle < first_new:
                    break
                new.append(c)
            new.reverse()
            index.calls += new
            index.next_handle = self._next_handle
        return index

    def call_holder(self, call_id: str) -> str:
        """The agent a call is (or was last) assigned to, "" if none; NOT_FOUND
        CALL_NOT_FOUND for a call the engine does not know. No view is built."""
        return self._call(call_id).agent_id

    def agent_status(self, agent_id: str) -> tuple[str, str, float, float]:
        """(state, reason, state_since, wrap_up_until) of an agent, without a view."""
        a = self._agent(agent_id)
        return a.state, a.reason, a.state_since, a.wrap_up_until

    def screen_pop(self, call_id: str) -> list[PastContact]:
        """The caller's contacts before this call and within the repeat window before
        it, newest first, at most ``routing.screen_pop_history``."""
        call = self._call(call_id)
        contacts = self._memory.get(call.caller) if call.caller else None
        if not contacts:
            return []
        cutoff = call.offered_at - self._repeat_window_s
        out: list[PastContact] = []
        limit = self._history_keep - 1
        for cid, offered_at, skill, outcome, csat, handle in reversed(contacts):
            if len(out) >= limit or offered_at < cutoff:
                break
            if handle >= call.handle:
                continue
            live = self._calls.get(cid)
            if live is not None and live.handle == handle:
                outcome, csat = live.state, live.csat
            out.append(PastContact(cid, offered_at, skill, outcome, csat))
        return out

    def counts_by_state(self) -> dict[str, int]:
        """Retained calls per state (every state present, 0 included)."""
        return dict(self._call_counts)

    # -- agents -------------------------------------------------------------------------

    def agent(self, agent_id: str) -> AgentView:
        return self._agent(agent_id).view()

    def agents(self) -> list[AgentView]:
        """Every configured agent, in configuration order."""
        return [a.view() for a in self._agents.values()]

    def agents_by_state(self) -> dict[str, int]:
        return dict(self._agent_counts)

    def assignment(self, assignment_id: str) -> tuple[str, str] | None:
        """(agent_id, call_id) of a ringing or connected assignment, else None."""
        call = self._ringing.get(assignment_id)
        if call is None:
            call = self._calls.get(assignment_id.rpartition("#")[0])
            if call is None or call.state != "connected" or call.assignment_id != assignment_id:
                return None
        return call.agent_id, call.call_id

    def next_deadline(self) -> float | None:
        """When the next tick has something to do (offer timeout or wrap-up end)."""
        dl = self._deadlines
        while dl and not self._deadline_live(dl[0]):
            heapq.heappop(dl)  # stale: the offer or wrap-up ended first
        return dl[0][0] if dl else None

    # -- queues -------------------------------------------------------------------------

    def queues(self, *, now: float | None = None) -> list[QueueView]:
        t = self._now if now is None else now
        return [self._queue_view(q, t) for q in self._queues.values()]

    def queue(self, name: str, *, now: float | None = None) -> QueueView:
        q = self._queues.get(name)
        if q is None:
            raise RoutingError("NOT_FOUND", "UNKNOWN_QUEUE", f"no queue {name!r}", queue=name)
        return self._queue_view(q, self._now if now is None else now)

    def estimate(
        self, skill: str, channel: str, language: str = "", *, now: float | None = None
    ) -> QueueView:
        """The queue a standard call for skill/channel/language would join now; its
        ``expected_wait_s`` is that new call's. NOT_FOUND UNKNOWN_SKILL otherwise."""
        req = {"skill": skill, "channel": channel, "language": language}
        skill = v.text(req, "skill", v.MAX_SKILL, required=True)
        channel = v.channel(req)
        language = v.language(req)
        q = self._route.get((skill, channel, language or None)) or self._route.get(
            (skill, channel, None)
        )
        if q is None:
            raise RoutingError(
                "NOT_FOUND", "UNKNOWN_SKILL", f"no queue serves skill {skill!r} on {channel}",
                skill=skill, channel=channel, language=language,
            )  # fmt: skip
        return self._queue_view(q, self._now if now is None else now)

    # -- helpers ------------------------------------------------------------------------

    def _queue_view(self, q: Queue, now: float) -> QueueView:
        n = len(q.pq)
        oldest = max(0.0, now - q.age.peek()[1]) if n else 0.0
        return QueueView(
            name=q.name,
            skill=q.skill,
            channel=q.channel,
            language=q.language or "",
            length=n,
            expected_wait_s=q.expected_wait(n + 1),
            agents_ready=len(q.free),
            agents_staffed=q.signed_in,
            service_level=self._service_level(q, now),
            offered=q.offered,
            answered=q.answered,
            abandoned=q.abandoned,
            oldest_wait_s=oldest,
        )

    def _service_level(self, q: Queue, now: float) -> float:
        cutoff = now - self._sl_window_s
        if q.window and q.window[0][0] < cutoff:  # older entries not pruned yet
            recent = ((ans, waited) for t, ans, waited in q.window if t >= cutoff)
            return policy.service_level(recent, q.cfg.service_level)
        ans, ans_in, ab, ab_in = q.win
        return policy.service_level_from_counts(q.cfg.service_level, ans, ans_in, ab, ab_in)

    def _newest_position(self, call: Call, q: Queue) -> int:
        """Position of the call queued last. Every other queued call arrived no later,
        so it is ahead unless its head start is smaller: only then scan the queue."""
        hs = self._hs[call.priority_class]
        if any(n and h < hs for h, n in q.head_starts.items()):
            return q.pq.rank(call.handle) + 1
        return len(q.pq)

    def _offer_result(self, call: Call) -> OfferResult:
        position = wait = 0
        if call.state == "queued":
            q = self._queues[call.queue]
            position = q.pq.rank(call.handle) + 1
            wait = q.expected_wait(position)
        return OfferResult(call.view(self._site_name), position, float(wait), call.decision)
