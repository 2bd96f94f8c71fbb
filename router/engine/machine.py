"""The deterministic, event-sourced routing engine of one site node.

``Engine.apply(cmd)`` validates a command completely (raising :class:`RoutingError`
with nothing changed), then mutates. No I/O, no clock, no randomness: time is the
command's ``t``. Engine time never goes backwards: a command older than the latest one
applied runs at the latest time. ``Outcome.changed`` is False exactly when the state is
untouched (idempotent repeats, a tick with nothing due); the state — ``snapshot()`` —
changes only when it is True.

Routing (see :mod:`router.policy` for the rules):

* A new call is queued by (skill, channel, language) and offered at once to the best
  free eligible agent, if any. A blacklisted caller is rejected, or with
  ``blacklist_action: restricted_queue`` queued in that queue (class "blacklist", no
  head start) when the call is on that queue's channel — rejected otherwise.
* Whenever an agent frees up (becomes ready, loses a call), it takes the queued call with
  the minimal ``(key, handle)`` over all its eligible queues, repeatedly while it has a
  free slot (invariant 3). Whenever calls enter queues (offer, reject, no answer,
  disconnect), the best queued head goes to the best free agent, repeatedly. After every
  command no ready agent has a free slot on a channel while an eligible call waits
  (work conservation).
* A ringing offer (call "assigned") holds a slot of the agent's capacity (invariant 2).
  It is withdrawn by a reject, by a tick at or past ``offered_at + offer_timeout_s``
  (an accept that arrives first still wins) or by a disconnect: the call goes back to
  its original place (same handle, same key) and the agent to not_ready ("rejected",
  "no_answer", "disconnected").
* After ``complete``: an agent that was ready enters wrap-up for the queue's
  ``wrap_up_s`` (0: stays ready); one already in wrap-up has it extended to the later
  end; a not_ready agent stays not_ready. AHT samples are talk time + ``wrap_up_s``.
* Queue counters: ``offered`` counts calls queued there (not blacklist rejections),
  ``answered`` accepts, ``abandoned`` abandons. The service-level window holds calls
  when answered (waited = answered_at - queued_at, ringing included) or abandoned
  (waited = ended_at - queued_at), for ``routing.service_level_window_s``. The same
  waits teach the queue its callers' patience (``Queue.add_finished``), which the
  expected waits announced account for (:func:`router.policy.expected_wait`).
* Repeat callers: the last ``screen_pop_history + 1`` contacts of each non-empty
  caller within ``repeat_window_h`` are remembered (0 h: no memory, no repeat class).
  An offer may carry ``history_repeat: true`` (the node found a contact within the
  window in the interaction history): the call then counts as a repeat caller too.
  It is not part of the offer's identity (a retry without it is the same offer).
  Only contacts that are no longer waiting count: a caller whose earlier call is still
  queued, ringing or being transferred is not a repeat caller because of that call (a
  second line must not jump ahead of the first).
* ``complete`` of a completed call: the same disposition again is an idempotent no-op;
  another one is refused (FAILED_PRECONDITION DISPOSITION_CONFLICT), the first stays.
* Contingency mode (``set_mode``, see :mod:`router.engine.mode`): back-office agents
  (``AgentGroup.backoffice``) are eligible for voice/chat queues only while the mode
  turns them on; the mode's IVR announcement is kept for the edges.
* ``set_state`` to the current state is a no-op (changed False): ready again,
  not_ready with the same reason, wrap_up again (the running wrap-up keeps its end).

Results (also when ``changed`` is False): offer -> OfferResult; abandon, complete,
accept, reject -> CallView; sign_in, sign_out, set_state, disconnect -> AgentView;
tick -> None.

Effects, in the order things happened (CallChanged / AgentChanged at most once per id):
offer: CallChanged, plus AssignmentOffered + AgentChanged when it rings an agent.
abandon: CallChanged; if it was ringing, AssignmentCancelled("abandoned") + AgentChanged.
complete: CallChanged + AgentChanged. accept: CallConnected + CallChanged.
reject / disconnect / tick: AssignmentCancelled("rejected" / "disconnected" /
"no_answer") + CallChanged per withdrawn offer, AgentChanged. sign_in, sign_out,
set_state: AgentChanged. Any command that frees an agent or queues a call also carries
the assignments it causes (AssignmentOffered + CallChanged + AgentChanged each).
Effects of a command that changed nothing: none.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Any

from router.engine import validate as v
from router import policy
from router.config import SiteConfig
from router.engine.core import AGENT_STATES, CALL_STATES, OFFER, WRAP, CoreMixin
from router.engine.mode import GATED_CHANNELS, ModeMixin
from router.engine.records import Agent, Call, Queue
from router.engine.snapshot import SnapshotMixin
from router.engine.partner import PartnerMixin
from router.engine.staffing import StaffingMixin
from router.engine.transfer import RESERVE, TransferMixin
from router.engine.views import ViewsMixin
from router.model import (
    AgentChanged,
    AssignmentCancelled,
    CallChanged,
    CallConnected,
    OfferResult,
    Outcome,
    RoutingError,
)


# Call states of a contact still waiting for an agent here (no REPEAT from these).
_WAITING = frozenset({"queued", "assigned", "transferring"})


class Engine(ViewsMixin, SnapshotMixin, PartnerMixin, TransferMixin, StaffingMixin, ModeMixin, CoreMixin):
    def __init__(self, site: SiteConfig, *, queue_factory: Any = None) -> None:
        if queue_factory is None:
            from router.pqueue import IndexedPQ as queue_factory
        self.site = site
        self._site_name = site.site.name
        self._qf = queue_factory
        r = site.routing
        self._mode = r.agent_selection
        self._offer_timeout = float(r.offer_timeout_s)
        hs = {getattr(k, "value", k): float(s) for k, s in r.head_start_s.items()}
        self._hs = {c: hs.get(c, 0.0) for c in ("standard", "repeat", "whitelist", "vip")}
        self._hs["blacklist"] = 0.0
        self._lists = policy.caller_sets(site.lists)
        self._repeat_window_s = float(r.repeat_window_h) * 3600.0
        # The newest contact may be the current call: keep one more than the pop shows.
        self._history_keep = r.screen_pop_history + 1
        self._retention = r.ended_call_retention
        self._sl_window_s = float(r.service_level_window_s)

        self._queues: dict[str, Queue] = {q.name: Queue(q, queue_factory) for q in site.queues}
        # queue name -> lazy heap of its free agents' selection keys (core._select_agent)
        self._free_heaps: dict[str, list] = {name: [] for name in self._queues}
        self._route = {(q.skill, q.channel, q.language): q for q in self._queues.values()}
        self._restricted = (
            self._queues[r.restricted_queue] if r.blacklist_action == "restricted_queue" else None
        )
        self._agents: dict[str, Agent] = {}
        all_queues: dict[str, list[Queue]] = {}
        backoffice: set[str] = set()
        for aid, g in site.agent_profiles().items():
            cap = dict.fromkeys(v.CHANNEL_ORDER, 0)
            cap.update({getattr(ch, "value", ch): n for ch, n in g.capacity.items()})
            a = Agent(aid, dict(g.skills), list(g.languages), cap)
            gated = getattr(g, "backoffice", False)  # voice/chat only in some modes
            if gated:
                backoffice.add(aid)
            all_queues[aid] = []
            for q in self._queues.values():
                if policy.eligible(a.skills, a.languages, cap, q.skill, q.language, q.channel):
                    all_queues[aid].append(q)
                    if not (gated and q.channel in GATED_CHANNELS):
                        a.queues.append(q)
                        q.agents.append(a)
            self._agents[aid] = a

        self._now = 0.0
        self._next_handle = 1
        self._calls: dict[str, Call] = {}  # every retained call, in offer order
        self._by_handle: dict[int, Call] = {}  # queued calls
        self._ringing: dict[str, Call] = {}  # assignment id -> call, offers not answered
        self._ended: deque[str] = deque()  # ended call ids, oldest first (retention)
        # Calls not in a frozen state (core.FROZEN_STATES), by id: the only calls a
        # snapshot must copy on the loop (router.engine.snapshot).
        self._live: dict[str, Call] = {}
        self._call_counts = dict.fromkeys(CALL_STATES, 0)
        self._agent_counts = dict.fromkeys(AGENT_STATES, 0)
        self._agent_counts["signed_out"] = len(self._agents)
        # Repeat-caller memory: caller -> ((call_id, offered_at, skill, outcome, csat,
        # handle), ...) oldest first; the FIFO drops contacts older than the window.
        # Tuples, replaced and never changed in place: snapshots share them.
        self._memory: dict[str, tuple[tuple, ...]] = {}
        self._memory_fifo: deque[tuple[float, str]] = deque()
        # (time, kind, id): offer timeouts by assignment id, wrap-up ends by agent id.
        # Entries go stale when the offer or the wrap-up ends first; checked on pop.
        self._deadlines: list[tuple[float, int, str]] = []
        self._fx: list = []
        self._dirty_agents: dict[str, Agent] = {}
        self._dirty_queues: dict[str, Queue] = {}
        self._ops = {
            "offer": self._op_offer,
            "abandon": self._op_abandon,
            "complete": self._op_complete,
            "sign_in": self._op_sign_in,
            "sign_out": self._op_sign_out,
            "set_state": self._op_set_state,
            "accept": self._op_accept,
            "reject": self._op_reject,
            "disconnect": self._op_disconnect,
            "tick": self._op_tick,
        }
        self._init_transfers()  # transfer_* commands (router.engine.transfer)
        self._init_partner()  # partner_* commands (router.engine.partner)
        self._init_mode(all_queues, backoffice)  # set_mode (router.engine.mode)
        self._init_staffing()  # move_agent, set_drain (router.engine.staffing)

    # -- entry point --------------------------------------------------------------------

    def apply(self, cmd: dict) -> Outcome:
        """Apply one command (see :mod:`router.model`); raise RoutingError, changing
        nothing, when it is refused."""
        if not isinstance(cmd, dict):
            raise v.invalid("INVALID_COMMAND", "a command must be a mapping")
        op = cmd.get("op")
        handler = self._ops.get(op) if isinstance(op, str) else None
        if handler is None:
            raise v.invalid("INVALID_COMMAND", f"unknown op {op!r}", field="op")
        t = v.parse_time(cmd)
        return handler(cmd, t if t > self._now else self._now)

    # -- commands -----------------------------------------------------------------------

    def _op_offer(self, cmd: dict, now: float) -> Outcome:
        fields = v.offer(cmd)
        cid, channel, skill, language, caller, customer, declared, ctx = fields
        from_history = v.history_repeat(cmd)
        call = self._calls.get(cid)
        if call is not None:
            if fields == (
                call.call_id, call.channel, call.skill, call.language, call.caller,
                call.customer_id, call.requested_class, call.context,
            ):  # fmt: skip
                return Outcome(False, self._offer_result(call))
            raise RoutingError(
                "ALREADY_EXISTS", "CALL_ID_CONFLICT",
                f"call {cid} was offered with different content", call_id=cid,
            )  # fmt: skip
        q = self._route.get((skill, channel, language or None)) or self._route.get(
            (skill, channel, None)
        )
        if q is None:
            raise RoutingError(
                "NOT_FOUND", "UNKNOWN_SKILL",
                f"no queue serves skill {skill!r} on {channel}"
                + (f" in {language!r}" if language else ""),
                skill=skill, channel=channel, language=language,
            )  # fmt: skip
        recent = from_history or self._recent_ended(caller, now)
        klass = policy.classify(caller, customer, declared, self._lists, recent)
        if klass == "blacklist":
            # Restricted only on the queue's own channel; anything else is rejected.
            r = self._restricted
            q = r if r is not None and r.channel == channel else None
        if q is not None and len(q.pq) >= q.max_length:
            raise RoutingError(
                "FAILED_PRECONDITION", "QUEUE_FULL",
                f"queue {q.name} is full ({q.max_length} calls)", queue=q.name,
            )  # fmt: skip

        self._begin(now)
        handle = self._next_handle
        self._next_handle += 1
        call = Call.offered(cid, channel, skill, language, caller, customer, declared, ctx, now, handle)
        call.priority_class = klass
        self._calls[cid] = call
        self._remember(call, now)
        if q is None:
            self._set_call_state(call, "rejected")
            call.ended_at = now
            call.reject_reason = "blacklist"
            call.decision = "rejected: blacklist"
            self._ended_call(call)
        else:
            call.queued_at = now
            call.key = policy.priority_key(now, self._hs[klass])
            q.offered += 1
            self._enqueue(call, q)
            self._dispatch()
            if call.state == "assigned":
                call.decision = f"assigned: {call.agent_id} ({q.name}, {klass})"
            else:
                call.decision = f"queued: {q.name} ({klass})"
        self._fx.append(CallChanged(cid))
        position = self._newest_position(call, q) if call.state == "queued" else 0
        wait = q.expected_wait(position) if q is not None else 0.0
        return self._commit(OfferResult(call.view(self._site_name), position, wait, call.decision))

    def _op_abandon(self, cmd: dict, now: float) -> Outcome:
        cid = v.call_id(cmd)
        reason = v.text(cmd, "reason", v.MAX_REASON)
        call = self._call(cid)
        if call.state == "abandoned":
            return Outcome(False, call.view(self._site_name))
        if call.state in ("transferring", "transferred"):
            done = self._partner_abandon(call)
            if done is not None:
                return done
            return self._abandon_transferring(call, reason, now)
        if call.state not in ("queued", "assigned"):
            raise self._wrong_state(call, "abandon", "queued or assigned")
        self._begin(now)
        q = self._queues[call.queue]
        if call.state == "queued":
            self._dequeue(call, q)
        else:
            self._fx.append(
                AssignmentCancelled(call.agent_id, call.assignment_id, cid, "abandoned")
            )
            self._release(call)
        q.abandoned += 1
        q.add_finished(now, False, now - call.queued_at, self._sl_window_s)
        self._set_call_state(call, "abandoned")
        call.ended_at = now
        call.abandon_reason = reason
        self._ended_call(call)
        self._fx.append(CallChanged(cid))
        self._dispatch()
        return self._commit(call.view(self._site_name))

    def _op_complete(self, cmd: dict, now: float) -> Outcome:
        cid, resolved, csat, code = v.complete(cmd)
        call = self._call(cid)
        if call.state == "completed":
            if (call.resolved, call.csat, call.wrap_up_code) != (resolved, csat, code):
                raise RoutingError(
                    "FAILED_PRECONDITION", "DISPOSITION_CONFLICT",
                    f"call {cid} was already completed with another disposition",
                    call_id=cid,
                )  # fmt: skip
            return Outcome(False, call.view(self._site_name))
        if call.state != "connected":
            raise self._wrong_state(call, "complete", "connected")
        self._begin(now)
        q = self._queues[call.queue]
        a = self._agents[call.agent_id]
        self._release(call)
        self._set_call_state(call, "completed")
        call.ended_at = now
        call.resolved, call.csat, call.wrap_up_code = resolved, csat, code
        q.aht = policy.update_aht(q.aht, (now - call.answered_at) + q.wrap_up_s)
        self._ended_call(call)
        self._fx.append(CallChanged(cid))
        if a.state == "ready":
            if q.wrap_up_s > 0:
                self._start_wrap_up(a, now, now + q.wrap_up_s)
            else:
                a.available_since = now
        elif a.state == "wrap_up" and now + q.wrap_up_s > a.wrap_up_until:
            a.wrap_up_until = now + q.wrap_up_s
            heapq.heappush(self._deadlines, (a.wrap_up_until, WRAP, a.agent_id))
        self._dispatch()
        return self._commit(call.view(self._site_name))

    def _recent_ended(self, caller: str, now: float) -> bool:
        """A contact of ``caller`` within the repeat window that is no longer waiting
        for an agent (a call still queued, ringing or being transferred is the same
        contact, not a reason to call again: it gives no REPEAT). Read-only."""
        if not self._recent(caller, now):
            return False
        cutoff = now - self._repeat_window_s
        for contact in reversed(self._memory[caller]):
            if contact[1] < cutoff:
                break
            earlier = self._calls.get(contact[0])
            if earlier is None or earlier.state not in _WAITING:
                return True
        return False

    def _op_sign_in(self, cmd: dict, now: float) -> Outcome:
        a = self._agent(v.agent_id(cmd))
        if a.state != "signed_out":
            raise RoutingError(
                "ALREADY_EXISTS", "AGENT_ALREADY_SIGNED_IN",
                f"agent {a.agent_id} is already signed in", agent_id=a.agent_id,
            )  # fmt: skip
        self._begin(now)
        a.available_since = now
        self._set_agent_state(a, "not_ready", "signed_in", now)
        return self._commit(a.view())

    def _op_sign_out(self, cmd: dict, now: float) -> Outcome:
        a = self._signed_in(v.agent_id(cmd))
        if a.calls:
            raise RoutingError(
                "FAILED_PRECONDITION", "AGENT_BUSY",
                f"agent {a.agent_id} still holds {len(a.calls)} call(s)", agent_id=a.agent_id,
            )  # fmt: skip
        self._begin(now)
        self._set_agent_state(a, "signed_out", "", now)
        return self._commit(a.view())

    def _op_set_state(self, cmd: dict, now: float) -> Outcome:
        aid, state, reason, timeout = v.set_state(cmd)
        a = self._signed_in(aid)
        if a.state == state and (state != "not_ready" or a.reason == reason):
            return Outcome(False, a.view())
        self._begin(now)
        if state == "wrap_up":
            self._start_wrap_up(a, now, now + timeout)
        elif state == "not_ready" and a.state == "not_ready":
            a.reason, a.state_since = reason, now  # a new not-ready period
            self._fx.append(AgentChanged(aid))
        else:
            self._set_agent_state(a, state, reason if state == "not_ready" else "", now)
        self._dispatch()
        return self._commit(a.view())

    def _op_accept(self, cmd: dict, now: float) -> Outcome:
        aid, asg = v.agent_id(cmd), v.assignment_id(cmd)
        a = self._signed_in(aid)
        call = self._ringing.get(asg)
        if call is None or call.agent_id != a.agent_id:
            done = self._connected_assignment(asg, a.agent_id)
            if done is not None:
                return Outcome(False, done.view(self._site_name))
            raise self._unknown_assignment(asg, a.agent_id)
        self._begin(now)
        del self._ringing[asg]
        q = self._queues[call.queue]
        self._set_call_state(call, "connected")
        call.answered_at = now
        call.offer_deadline = 0.0
        q.answered += 1
        q.add_finished(now, True, now - call.queued_at, self._sl_window_s)
        self._fx += [CallConnected(a.agent_id, asg, call.call_id), CallChanged(call.call_id)]
        return self._commit(call.view(self._site_name))

    def _op_reject(self, cmd: dict, now: float) -> Outcome:
        aid, asg = v.agent_id(cmd), v.assignment_id(cmd)
        v.text(cmd, "reason", v.MAX_REASON)
        a = self._signed_in(aid)
        call = self._ringing.get(asg)
        if call is None or call.agent_id != a.agent_id:
            if self._connected_assignment(asg, a.agent_id) is not None:
                raise RoutingError(
                    "FAILED_PRECONDITION", "WRONG_STATE",
                    f"assignment {asg} was already accepted", assignment_id=asg,
                )  # fmt: skip
            raise self._unknown_assignment(asg, a.agent_id)
        self._begin(now)
        self._requeue(call, "rejected")
        self._set_agent_state(a, "not_ready", "rejected", now)
        self._dispatch()
        return self._commit(call.view(self._site_name))

    def _op_disconnect(self, cmd: dict, now: float) -> Outcome:
        a = self._signed_in(v.agent_id(cmd))
        ringing = [self._calls[c] for c in a.calls if self._calls[c].state == "assigned"]
        if not ringing and a.state == "not_ready" and a.reason == "disconnected":
            return Outcome(False, a.view())
        self._begin(now)
        for call in ringing:
            self._requeue(call, "disconnected")
        self._set_agent_state(a, "not_ready", "disconnected", now)
        self._dispatch()
        return self._commit(a.view())

    def _op_tick(self, cmd: dict, now: float) -> Outcome:
        due = []
        dl = self._deadlines
        while dl and dl[0][0] <= now:
            entry = heapq.heappop(dl)
            if self._deadline_live(entry):
                due.append(entry)
        if not due:
            return Outcome(False, None)
        self._begin(now)
        for entry in due:
            if not self._deadline_live(entry):  # an earlier one this tick settled it
                continue
            when, kind, ident = entry
            if kind == OFFER:
                call = self._ringing[ident]
                a = self._agents[call.agent_id]
                self._requeue(call, "no_answer")
                # since the deadline, unless the agent changed state after it
                self._set_agent_state(a, "not_ready", "no_answer", max(when, a.state_since))
            elif kind == RESERVE:
                self._expire_reservation(ident)
            else:
                self._set_agent_state(self._agents[ident], "ready", "", when)
        self._dispatch()
        return self._commit(None)
