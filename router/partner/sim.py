"""A simulated BPO partner ACD on the partner API: the reference gateway's behaviour.

    sim = PartnerSim("blueline", ["lyon=127.0.0.1:7001", "127.0.0.1:7002"], contract,
                     {"billing": 4, "support": 4}, aht_s=300, time_scale=60, seed=1)
    await sim.start()                  # one GatewaySession per node (router.partner.gateway)
    ...
    await sim.stop()                   # calls in hand end and are reported, streams close
    sim.summary()                      # {"partner", "offered", "accepted", ...}
    sim.records["c-17"]                # SimCall: what the partner saw of call c-17

The ACD: ``agents`` per skill (each agent has that one skill), each agent holding calls of
one channel at a time up to its capacity on that channel (``capacity``, default one voice
call, two chats, one e-mail, two social contacts). It tells every node its free agents
(idle ones) and expected wait per skill (0 while an agent is idle, as a node counts it:
the answer delay is ringing, not queueing; else the time for the next agent to free up),
in the Hello and whenever they change.

An Offer is accepted with an agent that can take it (the agent is reserved: the offer is
only tentative until the node's Assign), declined when none can. A Withdraw voids the
offer (the agent is free again); when a stream ends, the offers accepted on it and not
assigned are dropped. An Assign is authoritative: the call is served — by the reserved
agent, or, for a call never offered on this stream (the node re-sends Assigns after a
reconnect), by the first agent free — once per call and attempt (``offer_no``); a repeat
changes nothing. A configurable fraction (``handback_rate``) is handed back instead.
Serving: the agent answers after a uniform delay in [0, ``answer_delay_s``], talks for an
exponential time of mean ``aht_s``, wraps up for ``wrap_s``; then the outcome is reported to
the node that assigned the call (ReportOutcome, retried while the node is unreachable).
A Withdraw "abandoned" means the caller hung up: a call not answered yet ends with
``answered_at`` 0, one in conversation ends now. Every duration is in simulated seconds,
run ``time_scale`` times faster (the nodes of the demo run on the same compressed time);
what is reported (``talk_s``, ``wrap_s``) is in real seconds, as the nodes measure.

What the partner checks on its side, from its OWN copy of its contract:

* ``fields_outside_contract`` — every field of an Offer (also inside an Assign) outside the
  contract's data scopes (:func:`router.contracts.fields_outside` on the message as a
  dict), summed over every message received;
* ``cap_exceeded`` — how many times the calls it held at once, across all nodes together,
  went above ``caps.concurrent``. A call is held from its Assign until the partner reports
  its outcome or hands it back (the moment the call leaves its hands; the node frees the
  slot when it has recorded the report, a moment later, so this never counts too much);
  ``max_concurrent`` is the most it ever held.

A simulator that also plays the callers (the demo) passes a :class:`PartnerLine`: the
telephone line between a caller and the partner's agent, so that the two sides agree on
whether the caller was answered or hung up first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import grpc
from google.protobuf.json_format import MessageToDict

from router.contracts import PartnerContract, fields_outside
from router.partner.gateway import Channels, GatewaySession, NodeTarget, error_reason, error_text
from router.v1 import partner_pb2 as pb
from router.v1 import types_pb2

log = logging.getLogger("tandem.partner.sim")

DEFAULT_CAPACITY = {"voice": 1, "chat": 2, "email": 1, "social": 2}
CHANNEL_NAMES = {
    types_pb2.CHANNEL_VOICE: "voice", types_pb2.CHANNEL_CHAT: "chat",
    types_pb2.CHANNEL_EMAIL: "email", types_pb2.CHANNEL_SOCIAL: "social",
}  # fmt: skip
#: States of a call the partner holds (assigned to it, outcome not yet reported).
HELD = frozenset({"assigned", "waiting", "ringing", "talking", "wrap"})
RESOLVED_P = 0.8
CSAT_P = 0.35


class PartnerLine(Protocol):
    """The line between the callers and the partner's agents (a caller simulator in the
    same process implements it). ``force``: when set, conversations end at once."""

    force: asyncio.Event | None

    def assigned(self, call_id: str, partner: str) -> None:
        """The partner owns the call now."""

    def caller_gone(self, call_id: str) -> bool:
        """Whether the caller has hung up."""

    def answered(self, call_id: str, at: float, partner: str, agent: str) -> bool:
        """The partner's agent picks up at ``at``; False when the caller had hung up."""

    def ended(self, call_id: str, at: float) -> None:
        """The conversation is over."""

    def handed_back(self, call_id: str) -> None:
        """The partner gave the call back to the cluster."""


@dataclass
class SimAgent:
    agent_id: str
    skill: str
    capacity: Mapping[str, int]
    calls: dict[str, str] = field(default_factory=dict)  # call id -> channel (reserved or in hand)

    @property
    def idle(self) -> bool:
        return not self.calls

    def can_take(self, channel: str) -> bool:
        if any(ch != channel for ch in self.calls.values()):
            return False
        return len(self.calls) < self.capacity.get(channel, 0)


@dataclass(eq=False)
class SimCall:
    """One call as the partner saw it. Times are Unix seconds, durations real seconds.

    ``state``: offered | reserved | declined | withdrawn | dropped (accepted on a stream
    that ended before its Assign) | assigned | waiting (for an agent) | ringing | talking |
    wrap | reporting | done | handed_back | failed (its hand-back was refused).
    ``handled``: how many times the partner served it to an outcome after an Assign (1
    for a call it owned; a repeated Assign does not count). ``outcome``: completed |
    abandoned once served."""

    call_id: str
    site: str = ""
    address: str = ""
    skill: str = ""
    channel: str = ""
    language: str = ""
    state: str = "offered"
    no: int = 0  # the attempt (offer_no) now
    offers: int = 0
    offer_nos: list[int] = field(default_factory=list)
    accepted: int = 0
    declined: int = 0
    withdrawn: int = 0
    assigns: int = 0  # Assign messages received, repeats included
    handled: int = 0
    handed_back: int = 0
    agent: str = ""
    fields: dict = field(default_factory=dict)  # the last Offer received, as a dict
    fields_outside: list[str] = field(default_factory=list)
    assigned_at: float = 0.0
    answered_at: float = 0.0
    ended_at: float = 0.0
    talk_s: float = 0.0
    wrap_s: float = 0.0
    abandoned: bool = False
    outcome: str = ""
    reported: bool = False
    duplicate_reports: int = 0
    errors: list[str] = field(default_factory=list)
    session: Any = field(default=None, repr=False)  # the GatewaySession that assigned it
    request: Any = field(default=None, repr=False)  # (attempt, the ReportOutcomeRequest)


@dataclass
class Counters:
    """The partner's figures (:meth:`PartnerSim.summary`)."""

    offered: int = 0  # Offers received
    accepted: int = 0
    declined: int = 0
    handled: int = 0  # assigned calls an agent answered and finished (as statements count them)
    abandoned: int = 0  # assigned calls whose caller hung up before an agent answered
    handed_back: int = 0
    cap_exceeded: int = 0
    fields_outside_contract: int = 0
    max_concurrent: int = 0
    report_errors: int = 0  # outcomes or hand-backs the nodes refused or never answered


class PartnerSim:
    """A simulated partner ACD connected to ``nodes`` (``ADDR`` or ``SITE=ADDR``, or
    :class:`NodeTarget`); see the module docstring. ``contract``: the partner's own copy;
    ``agents``: skill -> number of agents; ``tls``: a TLS directory holding
    ``partner-NAME.crt`` (None: plaintext)."""

    def __init__(
        self,
        partner: str,
        nodes: Sequence[str | NodeTarget],
        contract: PartnerContract,
        agents: Mapping[str, int],
        *,
        aht_s: float = 300.0,
        wrap_s: float = 30.0,
        answer_delay_s: float = 5.0,
        handback_rate: float = 0.0,
        time_scale: float = 1.0,
        seed: int = 1,
        capacity: Mapping[str, int] | None = None,
        tls: Path | str | None = None,
        gateway: str = "",
        line: PartnerLine | None = None,
        rpc_timeout_s: float = 5.0,
    ) -> None:
        if time_scale <= 0 or aht_s <= 0 or wrap_s < 0 or answer_delay_s < 0:
            raise ValueError("time_scale and aht_s must be > 0, wrap_s and answer_delay_s >= 0")
        if not 0.0 <= handback_rate <= 1.0:
            raise ValueError(f"handback_rate must be within 0..1, got {handback_rate}")
        if contract.partner != partner:
            raise ValueError(f"the contract is partner {contract.partner}'s, not {partner}'s")
        self.partner = partner
        self.targets = [n if isinstance(n, NodeTarget) else NodeTarget.parse(n) for n in nodes]
        if not self.targets:
            raise ValueError("no node to connect to")
        self.contract = contract
        self.aht_s, self.wrap_s, self.answer_delay_s = aht_s, wrap_s, answer_delay_s
        self.handback_rate = handback_rate
        self.scale = time_scale
        self.rng = random.Random(seed)
        self.tls = Path(tls) if tls is not None else None
        self.gateway = gateway or f"{partner}-sim"
        self.line = line
        self.rpc_timeout_s = rpc_timeout_s
        cap = dict(DEFAULT_CAPACITY, **(capacity or {}))
        self.agents: list[SimAgent] = [
            SimAgent(f"{partner}-{skill}-{i + 1:03d}", skill, cap)
            for skill, n in sorted(agents.items()) for i in range(int(n))
        ]  # fmt: skip
        self.skills = sorted({a.skill for a in self.agents})
        self.records: dict[str, SimCall] = {}
        self.sessions: list[GatewaySession] = []
        self.channels: Channels | None = None
        self.counts = Counters()
        self._held: set[str] = set()
        self._tentative: dict[tuple[str, int], tuple[GatewaySession, int, SimAgent]] = {}
        self._gone: dict[str, asyncio.Event] = {}
        self._freed: asyncio.Event | None = None
        self._waiting: dict[str, int] = {}  # skill -> calls waiting for an agent
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._end_now: asyncio.Event | None = None
        self._give_up: asyncio.Event | None = None
        self._avail_pending = False
        self._last_avail: bytes = b""

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to every node (each session reconnects on its own until :meth:`stop`)."""
        self._freed = asyncio.Event()
        self._end_now = asyncio.Event()
        self._give_up = asyncio.Event()
        self.channels = Channels(self.partner, self.tls)
        for i, t in enumerate(self.targets):
            s = GatewaySession(t, self.partner, self.gateway, self, self.channels,
                               rpc_timeout_s=self.rpc_timeout_s, rng=random.Random(self.rng.random() + i))
            self.sessions.append(s)
            await s.start()

    async def wait_connected(self, timeout: float = 10.0) -> None:
        """Until every session has been welcomed by its node (TimeoutError otherwise)."""
        await asyncio.wait_for(asyncio.gather(*(s.connected.wait() for s in self.sessions)), timeout)

    @property
    def busy(self) -> int:
        """Calls in hand or being reported, and serving tasks still running."""
        return len(self._tasks)

    async def settle(self, timeout: float = 30.0) -> bool:
        """Wait (bounded) until no call is in hand and every outcome is reported; True
        when that happened in time."""
        deadline = time.monotonic() + timeout
        while self._tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self._tasks

    async def stop(self, timeout: float = 30.0, end_calls: bool = False) -> None:
        """Take no new offer (decline them; free agents 0), let the calls in hand end —
        at once with ``end_calls`` — and their outcomes be reported (bounded by
        ``timeout``), then close every stream."""
        self._closing = True
        self._send_availability()
        if end_calls and self._end_now is not None:
            self._end_now.set()
        if not await self.settle(timeout):
            log.warning("%s: %d calls still in hand at stop", self.partner, len(self._tasks))
            if self._end_now is not None:
                self._end_now.set()
            if not await self.settle(5.0):
                if self._give_up is not None:
                    self._give_up.set()
                for t in list(self._tasks):
                    t.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(s.stop() for s in self.sessions), return_exceptions=True)
        if self.channels is not None:
            await self.channels.close()

    async def abort(self) -> None:
        """Die like a crashed gateway: every stream cut, the calls in hand forgotten and
        nothing reported (the nodes send their Assigns again to the next gateway)."""
        self._closing = True
        if self._give_up is not None:
            self._give_up.set()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(s.abort() for s in self.sessions), return_exceptions=True)
        if self.channels is not None:
            await self.channels.close()

    def summary(self) -> dict:
        return {"partner": self.partner, **dataclasses.asdict(self.counts)}

    # --- availability -----------------------------------------------------------------------

    def _availability(self) -> pb.PartnerAvailability:
        free: dict[str, int] = {}
        ewt: dict[str, float] = {}
        for skill in self.skills:
            mine = [a for a in self.agents if a.skill == skill]
            n_free = 0 if self._closing else sum(1 for a in mine if a.idle)
            free[skill] = n_free
            if n_free:  # no wait in queue (the answer delay rings, as a node's agents do)
                ewt[skill] = 0.0
            else:  # the next agent frees up in about a holding time shared by the agents
                per_call = (self.aht_s + self.wrap_s) / self.scale / max(1, len(mine))
                ewt[skill] = (self._waiting.get(skill, 0) + 1) * per_call
        return pb.PartnerAvailability(free_agents=free, expected_wait_s=ewt)

    def hello_availability(self) -> pb.PartnerAvailability:
        a = self._availability()
        self._last_avail = a.SerializeToString(deterministic=True)
        return a

    def _changed(self) -> None:
        """Send the availability once this burst of changes is over (same loop tick)."""
        if not self._avail_pending:
            self._avail_pending = True
            asyncio.get_running_loop().call_soon(self._send_availability)

    def _send_availability(self) -> None:
        self._avail_pending = False
        a = self._availability()
        raw = a.SerializeToString(deterministic=True)
        if raw == self._last_avail:
            return
        self._last_avail = raw
        for s in self.sessions:
            s.availability(a)

    # --- agents -----------------------------------------------------------------------------

    def _free_agent(self, skill: str, channel: str) -> SimAgent | None:
        fits = [a for a in self.agents if a.skill == skill and a.can_take(channel)]
        if not fits:
            return None
        return min(fits, key=lambda a: (len(a.calls), a.agent_id))  # the least loaded first

    def _release(self, agent: SimAgent | None, call_id: str) -> None:
        if agent is not None and agent.calls.pop(call_id, None) is not None:
            if self._freed is not None:
                self._freed.set()
                self._freed = asyncio.Event()
            self._changed()

    # --- what the node says (GatewayHandler) ------------------------------------------------

    def _record(self, session: GatewaySession, offer: pb.PartnerOffer) -> SimCall:
        rec = self.records.get(offer.call_id)
        if rec is None:
            rec = self.records[offer.call_id] = SimCall(offer.call_id)
        rec.site, rec.address = session.site, session.target.address
        rec.skill, rec.language = offer.skill, offer.language
        rec.channel = CHANNEL_NAMES.get(offer.channel, "voice")
        d = MessageToDict(offer, preserving_proto_field_name=True)
        rec.fields = d
        outside = fields_outside(d, self.contract.scopes)
        if outside:
            self.counts.fields_outside_contract += len(outside)
            rec.fields_outside = sorted(set(rec.fields_outside) | set(outside))
            log.error("%s: call %s arrived from %s with fields outside the contract: %s",
                      self.partner, offer.call_id, session.site, ", ".join(outside))
        return rec

    def welcomed(self, session: GatewaySession, welcome: pb.PartnerWelcome) -> None:
        if welcome.partner and welcome.partner != self.partner:
            log.error("%s: node %s welcomed us as partner %s", self.partner, session.target, welcome.partner)

    def offered(self, session: GatewaySession, offer: pb.PartnerOffer) -> None:
        self.counts.offered += 1
        rec = self._record(session, offer)
        rec.offers += 1
        rec.offer_nos.append(offer.offer_no)
        why = ""
        agent = None
        if self._closing:
            why = "closing"
        elif rec.state in HELD or rec.state == "reporting":
            why = "already in hand"  # a node bug: it offers a call we hold
            log.error("%s: call %s offered again (attempt %d) while in hand (attempt %d)",
                      self.partner, rec.call_id, offer.offer_no, rec.no)
        elif self.line is not None and self.line.caller_gone(offer.call_id):
            why = "caller gone"
        else:
            old = self._tentative.pop((offer.call_id, rec.no), None) if rec.state == "reserved" else None
            if old is not None:  # a new attempt: the older one is void
                self._release(old[2], offer.call_id)
            agent = self._free_agent(rec.skill, rec.channel)
            if agent is None:
                why = "no agent free" if rec.skill in self.skills else f"no {rec.skill} agents"
        if agent is None:
            session.decline(offer, why)
            rec.declined += 1
            self.counts.declined += 1
            if rec.state not in HELD and rec.state != "reporting":
                rec.state = "declined"
            return
        agent.calls[offer.call_id] = rec.channel
        if not session.accept(offer, agent.agent_id):  # the stream is gone already
            agent.calls.pop(offer.call_id, None)
            rec.state = "dropped"
            return
        self._tentative[(offer.call_id, offer.offer_no)] = (session, session.stream_no, agent)
        rec.state, rec.no, rec.agent = "reserved", offer.offer_no, agent.agent_id
        rec.accepted += 1
        self.counts.accepted += 1
        self._changed()

    def withdrawn(self, session: GatewaySession, w: pb.PartnerWithdraw) -> None:
        rec = self.records.get(w.call_id)
        t = self._tentative.pop((w.call_id, w.offer_no), None)
        if t is not None:
            self._release(t[2], w.call_id)
            if rec is not None and rec.state == "reserved":
                rec.state = "withdrawn"
        if rec is not None:
            rec.withdrawn += 1
        if w.reason == "abandoned":
            if rec is not None and rec.state in HELD:
                rec.abandoned = True
            self._gone_event(w.call_id).set()

    def assigned(self, session: GatewaySession, a: pb.PartnerAssign) -> None:
        offer = a.offer
        cid, no = offer.call_id, offer.offer_no
        rec = self._record(session, offer)
        rec.assigns += 1
        t = self._tentative.pop((cid, no), None)
        agent = t[2] if t is not None else None
        if rec.no == no and rec.state in (HELD | {"reporting", "done", "handed_back"}):
            # Again (a reconnect re-sends what is not reported): handled or being handled.
            if agent is not None:
                self._release(agent, cid)
            if rec.state == "done" and not rec.reported:
                self._spawn(self._report(rec, session, self._outcome_request(rec)), f"report-{cid}")
            return
        if rec.state in HELD or rec.state == "reporting":
            log.error("%s: call %s assigned again (attempt %d) while in hand (attempt %d)",
                      self.partner, cid, no, rec.no)
        rec.state, rec.no, rec.session = "assigned", no, session
        rec.assigned_at = a.assigned_at or time.time()
        rec.agent = agent.agent_id if agent is not None else a.agent
        rec.abandoned, rec.outcome, rec.reported = False, "", False
        rec.answered_at = rec.ended_at = rec.talk_s = rec.wrap_s = 0.0
        self._hold(cid)
        if self.line is not None:
            self.line.assigned(cid, self.partner)
        self._spawn(self._serve(rec, session, agent), f"serve-{cid}")

    def stream_ended(self, session: GatewaySession, stream_no: int) -> None:
        """Offers accepted on that stream and not assigned are void: drop them."""
        for key, (s, no, agent) in list(self._tentative.items()):
            if s is session and no == stream_no:
                del self._tentative[key]
                self._release(agent, key[0])
                rec = self.records.get(key[0])
                if rec is not None and rec.state == "reserved":
                    rec.state = "dropped"

    # --- serving a call ---------------------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _gone_event(self, call_id: str) -> asyncio.Event:
        ev = self._gone.get(call_id)
        if ev is None:
            ev = self._gone[call_id] = asyncio.Event()
        return ev

    def _hold(self, call_id: str) -> None:
        self._held.add(call_id)
        n = len(self._held)
        self.counts.max_concurrent = max(self.counts.max_concurrent, n)
        cap = self.contract.caps.concurrent
        if cap is not None and n > cap:
            self.counts.cap_exceeded += 1
            log.error("%s: holds %d calls at once, above its cap of %d (call %s)", self.partner, n, cap, call_id)

    def _caller_gone(self, rec: SimCall) -> bool:
        ev = self._gone.get(rec.call_id)
        if ev is not None and ev.is_set():
            return True
        return self.line is not None and self.line.caller_gone(rec.call_id)

    async def _pause(self, seconds: float, rec: SimCall, *, talk: bool = False) -> None:
        """Sleep ``seconds``, or less: the caller hangs up; for a conversation also the
        end of the run (``stop(end_calls=True)`` or the line's ``force``)."""
        events = [self._gone_event(rec.call_id)]
        if talk:
            events += [e for e in (self._end_now, getattr(self.line, "force", None)) if e is not None]
        if any(e.is_set() for e in events) or seconds <= 0:
            return
        waits = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _agent_for(self, rec: SimCall) -> SimAgent | None:
        """The first agent free for the call (it waits, in the ACD's own queue); None
        when the caller hangs up first."""
        self._waiting[rec.skill] = self._waiting.get(rec.skill, 0) + 1
        rec.state = "waiting"
        self._changed()
        try:
            while not self._caller_gone(rec):
                agent = self._free_agent(rec.skill, rec.channel)
                if agent is not None:
                    agent.calls[rec.call_id] = rec.channel
                    return agent
                freed = self._freed or asyncio.Event()
                gone = self._gone_event(rec.call_id)
                waits = [asyncio.ensure_future(freed.wait()), asyncio.ensure_future(gone.wait())]
                try:
                    await asyncio.wait(waits, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
            return None
        finally:
            self._waiting[rec.skill] -= 1
            self._changed()

    async def _serve(self, rec: SimCall, session: GatewaySession, agent: SimAgent | None) -> None:
        cid, no = rec.call_id, rec.no
        try:
            if agent is None and rec.skill not in self.skills:
                await self._hand_back(rec, session, f"no {rec.skill} agents here")
                return
            if (self.handback_rate and not self._closing and not self._caller_gone(rec)
                    and self.rng.random() < self.handback_rate):
                self._release(agent, cid)
                await self._hand_back(rec, session, "simulated hand-back")
                return
            if agent is None:
                agent = await self._agent_for(rec)
            rec.agent = agent.agent_id if agent is not None else rec.agent
            answered = False
            if agent is not None:
                rec.state = "ringing"
                await self._pause(self.rng.uniform(0.0, self.answer_delay_s) / self.scale, rec)
                if not self._caller_gone(rec):
                    now = time.time()
                    if self.line is None or self.line.answered(cid, now, self.partner, agent.agent_id):
                        answered, rec.answered_at, rec.state = True, now, "talking"
            if answered:
                await self._pause(self.rng.expovariate(1.0 / self.aht_s) / self.scale, rec, talk=True)
                rec.ended_at = time.time()
                rec.talk_s = max(0.0, rec.ended_at - rec.answered_at)
                if self.line is not None:
                    self.line.ended(cid, rec.ended_at)
                rec.state = "wrap"
                rec.wrap_s = self.wrap_s / self.scale
                await asyncio.sleep(rec.wrap_s)
                rec.outcome = "completed"
            else:
                rec.abandoned, rec.outcome = True, "abandoned"
                rec.ended_at = time.time()
            self._release(agent, cid)
            agent = None
            rec.handled += 1
            if rec.abandoned:
                self.counts.abandoned += 1
            else:
                self.counts.handled += 1
            await self._report(rec, session, self._outcome_request(rec))
        finally:
            self._release(agent, cid)
            if rec.no == no:
                self._held.discard(cid)

    def _outcome_request(self, rec: SimCall) -> pb.ReportOutcomeRequest:
        """The outcome of a served call; built once per call and attempt, so a retry
        sends exactly the same report (the node answers it as a duplicate)."""
        if rec.request is not None and rec.request[0] == rec.no:
            return rec.request[1]
        if rec.outcome == "completed":
            resolved = self.rng.random() < RESOLVED_P
            csat = self.rng.choice((3, 4, 4, 5, 5)) if self.rng.random() < CSAT_P else 0
            r = pb.ReportOutcomeRequest(call_id=rec.call_id, answered_at=rec.answered_at, talk_s=rec.talk_s,
                                        wrap_s=rec.wrap_s, disposition="RESOLVED" if resolved else "FOLLOW_UP",
                                        resolved=resolved, csat=csat, partner=self.partner)
        else:
            r = pb.ReportOutcomeRequest(call_id=rec.call_id, answered_at=0.0, disposition="ABANDONED",
                                        partner=self.partner)
        rec.request = (rec.no, r)
        return r

    async def _report(self, rec: SimCall, session: GatewaySession, req: pb.ReportOutcomeRequest) -> None:
        rec.state = "reporting"
        self._held.discard(rec.call_id)  # out of its hands now (see the module docstring)
        try:
            resp = await session.report_outcome(req, give_up=self._give_up, max_s=None)
        except grpc.aio.AioRpcError as e:
            self.counts.report_errors += 1
            rec.errors.append(f"ReportOutcome: {error_text(e)}")
            if error_reason(e) == "DISPOSITION_CONFLICT":
                log.error("%s: BUG: two different outcomes of call %s: %s", self.partner, rec.call_id, error_text(e))
            else:
                log.error("%s: outcome of %s not reported: %s", self.partner, rec.call_id, error_text(e))
        else:
            rec.reported = True
            if resp.duplicate:
                rec.duplicate_reports += 1
        rec.state = "done"

    async def _hand_back(self, rec: SimCall, session: GatewaySession, reason: str) -> None:
        self._held.discard(rec.call_id)
        try:
            await session.hand_back(pb.HandBackRequest(call_id=rec.call_id, reason=reason[:64], partner=self.partner),
                                    give_up=self._give_up, max_s=None)
        except grpc.aio.AioRpcError as e:
            rec.errors.append(f"HandBack: {error_text(e)}")
            self.counts.report_errors += 1
            log.error("%s: hand-back of %s failed: %s", self.partner, rec.call_id, error_text(e))
            rec.state = "failed"  # the node still counts it ours: its Assign again is served
            return
        rec.state = "handed_back"
        rec.handed_back += 1
        self.counts.handed_back += 1
        if self.line is not None:
            self.line.handed_back(rec.call_id)


def parse_agents(items: Sequence[str]) -> dict[str, int]:
    """``["billing=4", "support=2"]`` -> ``{"billing": 4, "support": 2}`` (ValueError)."""
    out: dict[str, int] = {}
    for item in items:
        for part in item.split(","):
            skill, sep, n = part.strip().partition("=")
            if not sep or not skill or not n.strip().isdigit():
                raise ValueError(f"bad agents {part!r}: give SKILL=N")
            out[skill.strip()] = int(n)
    return out


async def run_for(sim: PartnerSim, duration: float | None, stop: asyncio.Event | None = None) -> dict:
    """Start ``sim``, run until ``duration`` real seconds passed or ``stop`` is set, stop
    it; its summary."""
    stop = stop or asyncio.Event()
    await sim.start()
    try:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), duration)
    finally:
        await sim.stop(end_calls=True)
    return sim.summary()
