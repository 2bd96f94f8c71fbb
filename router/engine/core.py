"""State mutation and dispatch of the engine (part of :class:`router.engine.Engine`).

Everything here runs after a command was fully validated and cannot fail: it moves calls
between queues and agents, keeps the derived indexes (free-agent sets, staffed slots,
state counts, deadlines) in step, and dispatches (see :mod:`router.engine`).
"""

from __future__ import annotations

import heapq
from typing import Any

from router import policy
from router.engine.records import Agent, Call, Queue
from router.model import (
    AgentChanged,
    AssignmentCancelled,
    AssignmentOffered,
    CallChanged,
    Outcome,
    RoutingError,
)

CALL_STATES = ("queued", "assigned", "connected", "completed", "abandoned", "rejected")
# A call in one of these states is never changed again (a transfer that brings its id
# back makes a new Call): a snapshot may read it after the cut, off the loop
# (router.engine.snapshot). Every other state is "live" (Engine._live).
FROZEN_STATES = frozenset({"completed", "abandoned", "rejected"})
AGENT_STATES = ("signed_out", "not_ready", "ready", "wrap_up")
_STAFFED = frozenset({"ready", "wrap_up"})
OFFER, WRAP = 0, 1  # deadline kinds; at equal times offers expire first


class CoreMixin:
    # -- lookups that raise -------------------------------------------------------------

    def _call(self, cid: str) -> Call:
        call = self._calls.get(cid)
        if call is None:
            raise RoutingError("NOT_FOUND", "CALL_NOT_FOUND", f"unknown call {cid}", call_id=cid)
        return call

    def _agent(self, aid: str) -> Agent:
        a = self._agents.get(aid)
        if a is None:
            raise RoutingError(
                "NOT_FOUND", "UNKNOWN_AGENT", f"no agent {aid} in this site", agent_id=aid
            )
        return a

    def _signed_in(self, aid: str) -> Agent:
        a = self._agent(aid)
        if a.state == "signed_out":
            raise RoutingError(
                "FAILED_PRECONDITION", "AGENT_NOT_SIGNED_IN",
                f"agent {aid} is not signed in", agent_id=aid,
            )  # fmt: skip
        return a

    def _wrong_state(self, call: Call, op: str, wanted: str) -> RoutingError:
        return RoutingError(
            "FAILED_PRECONDITION", "WRONG_STATE",
            f"cannot {op} call {call.call_id}: it is {call.state}, not {wanted}",
            call_id=call.call_id, state=call.state,
        )  # fmt: skip

    def _unknown_assignment(self, asg: str, aid: str) -> RoutingError:
        return RoutingError(
            "NOT_FOUND", "UNKNOWN_ASSIGNMENT",
            f"agent {aid} has no pending assignment {asg}", assignment_id=asg, agent_id=aid,
        )  # fmt: skip

    def _connected_assignment(self, asg: str, aid: str) -> Call | None:
        call = self._calls.get(asg.rpartition("#")[0])
        if (
            call is not None
            and call.state == "connected"
            and call.assignment_id == asg
            and call.agent_id == aid
        ):
            return call
        return None

    # -- mutation helpers (called only after validation) --------------------------------

    def _begin(self, now: float) -> None:
        self._now = now
        self._fx = []
        self._dirty_agents = {}
        self._dirty_queues = {}

    def _commit(self, result: Any) -> Outcome:
        seen: set = set()
        effects = []
        for e in self._fx:
            if type(e) in (CallChanged, AgentChanged):
                if e in seen:
                    continue
                seen.add(e)
            effects.append(e)
        self._fx = []
        return Outcome(True, result, effects)

    def _set_call_state(self, call: Call, state: str) -> None:
        counts = self._call_counts
        if call.state:
            counts[call.state] -= 1
        counts[state] += 1
        call.state = state
        # keyed by id: a call that comes back by transfer (a new Call) replaces the old
        if state in FROZEN_STATES:
            self._live.pop(call.call_id, None)
        else:
            self._live[call.call_id] = call

    def _set_agent_state(self, a: Agent, state: str, reason: str, since: float) -> None:
        old = a.state
        if (old in _STAFFED) != (state in _STAFFED):
            sign = 1 if state in _STAFFED else -1
            for q in a.queues:
                q.staffed_slots += sign * a.capacity[q.channel]
        if (old == "signed_out") != (state == "signed_out"):
            sign = 1 if old == "signed_out" else -1
            for q in a.queues:
                q.signed_in += sign
        self._agent_counts[old] -= 1
        self._agent_counts[state] += 1
        a.state, a.reason, a.state_since = state, reason, since
        if state != "wrap_up":
            a.wrap_up_until = 0.0
        if state == "ready":
            if old != "ready":
                a.available_since = since
            self._dirty_agents[a.agent_id] = a
        self._refresh(a)
        self._fx.append(AgentChanged(a.agent_id))

    def _start_wrap_up(self, a: Agent, now: float, until: float) -> None:
        self._set_agent_state(a, "wrap_up", "", now)
        a.wrap_up_until = until
        heapq.heappush(self._deadlines, (until, WRAP, a.agent_id))

    def _refresh(self, a: Agent) -> None:
        """Keep the agent in the free sets of its queues iff it can take such a call."""
        ready = a.state == "ready"
        load, cap, aid = a.load, a.capacity, a.agent_id
        for q in a.queues:
            if ready and load[q.channel] < cap[q.channel]:
                if aid not in q.free:
                    q.free[aid] = a
                    self._free_heap_push(q, a)
            else:
                q.free.pop(aid, None)

    # -- longest-idle selection: a lazy heap per queue -----------------------------------
    #
    # Invariant: every agent in q.free has at least one entry in its queue's heap whose
    # key is <= its current selection key (an agent's key only grows while it stays
    # free: available_since follows engine time, which never goes back; skills change
    # only after it left the free sets). So when the top entry is an agent's current
    # key, it is the minimum over q.free: the same choice as min() over q.free, in
    # O(log n) amortized. Stale entries (agent gone, or key grown) are dropped or
    # re-pushed with the current key when they surface.

    def _free_heap_push(self, q: Queue, a: Agent) -> None:
        heap = self._free_heaps[q.name]
        heapq.heappush(heap, policy.selection_key(self._mode, a.available_since, a.skills[q.skill], a.agent_id))
        if len(heap) > 4 * len(q.free) + 64:  # too many stale entries: rebuild
            self._free_heap_rebuild(q)

    def _free_heap_rebuild(self, q: Queue) -> None:
        mode, skill = self._mode, q.skill
        heap = [policy.selection_key(mode, a.available_since, a.skills[skill], a.agent_id) for a in q.free.values()]
        heapq.heapify(heap)
        self._free_heaps[q.name] = heap

    def _select_agent(self, q: Queue) -> Agent:
        """The free agent of ``q`` with the least selection key (q.free non-empty)."""
        free, heap = q.free, self._free_heaps[q.name]
        mode, skill = self._mode, q.skill
        key = policy.selection_key
        while True:
            if not heap:  # cannot happen (see the invariant); never trust it blindly
                self._free_heap_rebuild(q)
                heap = self._free_heaps[q.name]
            top = heap[0]
            a = free.get(top[-1])
            if a is None:
                heapq.heappop(heap)
                continue
            cur = key(mode, a.available_since, a.skills[skill], a.agent_id)
            if cur == top:
                return a
            heapq.heapreplace(heap, cur)

    def _enqueue(self, call: Call, q: Queue) -> None:
        q.pq.push(call.handle, call.key)
        q.age.push(call.handle, call.queued_at)
        hs = self._hs[call.priority_class]
        q.head_starts[hs] = q.head_starts.get(hs, 0) + 1
        self._by_handle[call.handle] = call
        self._set_call_state(call, "queued")
        call.queue = q.name
        self._dirty_queues[q.name] = q

    def _dequeue(self, call: Call, q: Queue) -> None:
        q.pq.remove(call.handle)
        q.age.remove(call.handle)
        q.head_starts[self._hs[call.priority_class]] -= 1
        del self._by_handle[call.handle]

    def _release(self, call: Call) -> None:
        """Take the call off its agent (ringing or connected)."""
        a = self._agents[call.agent_id]
        a.load[call.channel] -= 1
        del a.calls[call.call_id]
        if call.state == "assigned":
            del self._ringing[call.assignment_id]
            call.offer_deadline = 0.0
        if not a.calls and self._pending_group:
            self._freed(a)  # a move waiting for it to be free (router.engine.staffing)
        self._refresh(a)
        if a.state == "ready":
            self._dirty_agents[a.agent_id] = a
        self._fx.append(AgentChanged(a.agent_id))

    def _requeue(self, call: Call, why: str) -> None:
        """Withdraw a ringing offer: the call goes back to its original place."""
        self._fx.append(AssignmentCancelled(call.agent_id, call.assignment_id, call.call_id, why))
        self._release(call)
        call.agent_id = call.assignment_id = ""
        self._enqueue(call, self._queues[call.queue])
        self._fx.append(CallChanged(call.call_id))

    def _assign(self, call: Call, q: Queue, a: Agent) -> None:
        now = self._now
        self._dequeue(call, q)
        call.n_offers += 1
        asg = f"{call.call_id}#{call.n_offers}"
        call.agent_id, call.assignment_id = a.agent_id, asg
        call.offer_deadline = now + self._offer_timeout
        self._set_call_state(call, "assigned")
        self._ringing[asg] = call
        heapq.heappush(self._deadlines, (call.offer_deadline, OFFER, asg))
        a.load[call.channel] += 1
        a.calls[call.call_id] = None
        a.available_since = now
        self._refresh(a)
        self._fx += [
            AssignmentOffered(a.agent_id, asg, call.call_id),
            CallChanged(call.call_id),
            AgentChanged(a.agent_id),
        ]

    def _dispatch(self) -> None:
        """Serve freed agents, then queues that received calls (see module docstring)."""
        agents = sorted(
            self._dirty_agents.values(), key=lambda a: (a.available_since, a.agent_id)
        )
        for a in agents:
            while a.state == "ready":
                best = best_q = None
                for q in a.queues:
                    if q.pq and a.load[q.channel] < a.capacity[q.channel]:
                        h, k = q.pq.peek()
                        if best is None or (k, h) < best:
                            best, best_q = (k, h), q
                if best_q is None:
                    break
                self._assign(self._by_handle[best[1]], best_q, a)
        active = [q for q in self._dirty_queues.values() if q.pq and q.free]
        while active:
            best = best_q = None
            for q in active:
                h, k = q.pq.peek()
                if best is None or (k, h) < best:
                    best, best_q = (k, h), q
            agent = self._select_agent(best_q)
            self._assign(self._by_handle[best[1]], best_q, agent)
            active = [q for q in active if q.pq and q.free]
        self._dirty_agents = {}
        self._dirty_queues = {}

    def _deadline_live(self, entry: tuple[float, int, str]) -> bool:
        when, kind, ident = entry
        if kind == OFFER:
            call = self._ringing.get(ident)
            return call is not None and call.offer_deadline == when
        a = self._agents[ident]
        return a.state == "wrap_up" and a.wrap_up_until == when

    def _ended_call(self, call: Call) -> None:
        self._ended.append(call.call_id)
        contacts = self._memory.get(call.caller) if call.caller else None
        if contacts:
            # Contacts are tuples, replaced rather than changed: a snapshot holds the
            # memory by reference and encodes it off the loop (router.engine.snapshot).
            for i in range(len(contacts) - 1, -1, -1):
                c = contacts[i]
                if c[0] == call.call_id:
                    new = (c[0], c[1], c[2], call.state, call.csat, c[5])
                    self._memory[call.caller] = contacts[:i] + (new,) + contacts[i + 1:]
                    break
        while len(self._ended) > self._retention:
            old = self._calls.pop(self._ended.popleft())
            self._call_counts[old.state] -= 1

    # -- repeat callers -----------------------------------------------------------------

    def _recent(self, caller: str, now: float) -> bool:
        """Did this caller have a contact within the repeat window? (read-only)"""
        if not caller or self._repeat_window_s <= 0:
            return False
        contacts = self._memory.get(caller)
        return bool(contacts) and contacts[-1][1] >= now - self._repeat_window_s

    def _remember(self, call: Call, now: float) -> None:
        if not call.caller or self._repeat_window_s <= 0:
            return
        cutoff = now - self._repeat_window_s
        fifo, memory = self._memory_fifo, self._memory
        while fifo and fifo[0][0] < cutoff:
            _, who = fifo.popleft()
            contacts = memory.get(who)
            if contacts is None:
                continue
            i = 0
            while i < len(contacts) and contacts[i][1] < cutoff:
                i += 1
            if i == len(contacts):
                del memory[who]
            elif i:
                memory[who] = contacts[i:]
        # immutable tuples, replaced on change (see _ended_call)
        contacts = memory.get(call.caller, ()) + ((call.call_id, now, call.skill, "", 0, call.handle),)
        if len(contacts) > self._history_keep:
            contacts = contacts[1:]
        memory[call.caller] = contacts
        fifo.append((now, call.caller))
