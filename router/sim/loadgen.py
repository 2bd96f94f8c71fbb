"""A load generator that plays callers and agents against real site nodes over gRPC.

Callers: each :class:`CallStream` is a Poisson arrival process of one kind of call
(skill, channel, language) at one site (from a traffic profile:
:mod:`router.sim.traffic`). A caller is drawn from the site's
:class:`CallerPool` (a finite pool, so some callers call again; a small share are the
site's VIP / whitelisted / blacklisted numbers), offers the call (``OfferCall``) and waits
to be connected — the generator learns it from its own agents' ``Connected`` events — for
at most its patience (exponential with the stream's mean, or fixed; ``None`` = infinite), after which
it hangs up (``AbandonCall``). A call that overflowed to another site: the origin forwards
the hang-up and answers with the target's state (ABANDONED there, or FAILED_PRECONDITION
CALL_ANSWERED: taken by an agent meanwhile); when it answers TRANSFERRING, or TRANSFERRED
(target unreachable for now), the caller finds the site that owns the call (``GetCall``
on every node) and hangs up there, or sees it already ended by the forward. Agents: see :mod:`router.sim.agents`; they
answer calls at whichever site routes them.

Calls handed to a BPO partner's own ACD (the partner API): the partner simulated in the
same process (``router.partner.sim.PartnerSim``) is given :attr:`LoadGen.partner_line`, the
telephone line between these callers and its agents (:class:`PartnerLine`): the caller
is answered when the partner's agent picks up (unless the caller hung up first — the
partner then sees the line dead and does not answer), and the conversation ends when the
partner's agent ends it. A caller who hangs up on a call the partner owns asks the origin
(``AbandonCall``), which answers with its TRANSFERRED view and tells the partner's
gateway; the caller is done then.

Time compression: every duration in the configuration (rates per *simulated* hour, talk
times, patience, ring and recovery times) is in simulated seconds; the generator runs
``time_scale`` simulated seconds per real second. The nodes must be given site files
scaled the same way (see :func:`router.sim.demo.scaled_site`).

A run (:meth:`LoadGen.run`) is bounded: arrivals for ``duration`` real seconds (and at
most ``max_calls`` calls, ``max_active`` at once), then a drain of at most ``drain_s``
real seconds in which no call arrives and the calls in progress end on their own; then the
callers still waiting hang up (reason ``end_of_run``) and the conversations still going
are completed at once, so every call ends. Agents then go NOT_READY, close their streams
and sign out. Every RPC carries a deadline.

Afterwards :func:`router.sim.report.reconcile` compares the generator's records with
each node's (``Admin.ListCalls``): ``lost`` and ``duplicates`` must both be 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import grpc

from router.sim.agents import AgentBehaviour, SimAgent
from router.sim.ledger import CallRecord, Ledger
from router.sim.rpc import NodeClient, call_with_retry, describe, error_reason
from router.v1 import routing_pb2, types_pb2

log = logging.getLogger("tandem.loadgen")

CHANNELS = {
    "voice": types_pb2.CHANNEL_VOICE,
    "chat": types_pb2.CHANNEL_CHAT,
    "email": types_pb2.CHANNEL_EMAIL,
    "social": types_pb2.CHANNEL_SOCIAL,
}
# Answers to AbandonCall at the origin of a call that moved (or is moving) to another site.
_MOVING = (types_pb2.CALL_STATE_TRANSFERRING, types_pb2.CALL_STATE_TRANSFERRED)
# The call reached an agent: the caller no longer hangs up in the queue.
_TAKEN = (types_pb2.CALL_STATE_CONNECTED, types_pb2.CALL_STATE_COMPLETED)


@dataclass(frozen=True)
class CallStream:
    """Poisson arrivals of one kind of call at one site (simulated units)."""

    site: str
    skill: str
    rate_per_h: float  # simulated calls per simulated hour
    talk_s: float  # mean talk time, simulated seconds
    channel: str = "voice"
    language: str = ""
    talk_dist: Literal["exponential", "lognormal", "fixed"] = "exponential"
    talk_cv: float = 0.8  # coefficient of variation, lognormal only
    patience_s: float | None = None  # mean patience; None = infinite
    name: str = ""  # a label, usually the queue it should land in
    patience_dist: Literal["exponential", "fixed"] = "exponential"

    def sample_talk(self, rng: random.Random) -> float:
        if self.talk_dist == "exponential":
            return rng.expovariate(1.0 / self.talk_s)
        if self.talk_dist == "fixed":
            return self.talk_s
        sigma2 = math.log(1.0 + self.talk_cv**2)
        return rng.lognormvariate(math.log(self.talk_s) - sigma2 / 2, math.sqrt(sigma2))

    def sample_patience(self, rng: random.Random) -> float | None:
        if self.patience_s is None:
            return None
        if self.patience_dist == "fixed":
            return self.patience_s
        return rng.expovariate(1.0 / self.patience_s)


@dataclass(frozen=True)
class CallerPool:
    """Who calls one site: ``size`` ordinary numbers ``prefix`` + 7 digits (drawn
    uniformly, so repeat callers occur naturally) and the site's listed numbers."""

    prefix: str = "+1555"
    size: int = 1000
    vip: tuple[str, ...] = ()
    whitelist: tuple[str, ...] = ()
    blacklist: tuple[str, ...] = ()
    vip_p: float = 0.02
    whitelist_p: float = 0.01
    blacklist_p: float = 0.005

    def draw(self, rng: random.Random) -> str:
        u = rng.random()
        for share, numbers in (
            (self.vip_p, self.vip),
            (self.whitelist_p, self.whitelist),
            (self.blacklist_p, self.blacklist),
        ):
            if not numbers:
                continue  # an empty list's share goes to ordinary callers
            if u < share:
                return rng.choice(numbers)
            u -= share
        return f"{self.prefix}{1_000_000 + rng.randrange(self.size):07d}"


class PartnerLine:
    """The line between the generator's callers and a partner's agents in the same process
    (``router.partner.sim.PartnerLine``). ``force``: the end of the run (the partner ends
    its conversations at once, as the generator's agents do)."""

    def __init__(self, gen: "LoadGen") -> None:
        self.gen = gen
        self.force: asyncio.Event | None = gen.force
        self.owner: dict[str, str] = {}  # call id -> the partner that owns it now

    def assigned(self, call_id: str, partner: str) -> None:
        self.owner[call_id] = partner

    def handed_back(self, call_id: str) -> None:
        self.owner.pop(call_id, None)

    def caller_gone(self, call_id: str) -> bool:
        rec = self.gen.records.get(call_id)
        if rec is None:
            return False  # not one of our callers: the partner decides alone
        return call_id in self.gen.hung_up or (rec.outcome != "pending" and not rec.answered_at)

    def answered(self, call_id: str, at: float, partner: str, agent: str) -> bool:
        rec = self.gen.records.get(call_id)
        if rec is None:
            return True
        if self.caller_gone(call_id) or rec.answered_at:
            return False
        rec.answered_at, rec.owner = at, f"partner:{partner}"
        rec.wake.set()
        return True

    def ended(self, call_id: str, at: float) -> None:
        rec = self.gen.records.get(call_id)
        if rec is not None and rec.outcome == "pending" and rec.answered_at:
            rec.outcome, rec.ended_at = "completed", at
            rec.wake.set()


@dataclass
class LoadGenConfig:
    addresses: dict[str, str]  # site -> host:port
    streams: list[CallStream]
    agents: dict[str, list[str]]  # site -> agent ids to play
    # agent id -> channel name -> capacity, to check invariant 2 (optional)
    capacity: dict[str, dict[str, int]] = field(default_factory=dict)
    time_scale: float = 1.0
    behaviour: AgentBehaviour = AgentBehaviour()
    callers: dict[str, CallerPool] = field(default_factory=dict)
    seed: int = 1
    run_id: str = ""  # call-id prefix; default: derived from the clock
    max_calls: int = 100_000
    max_active: int = 5_000
    rpc_timeout_s: float = 5.0  # real seconds, per attempt
    drain_s: float = 20.0  # real seconds
    tls_dir: Path | None = None  # mTLS as each site's gateway (router.sim.rpc.NodeClient)
    agent_stop_s: float = 5.0


@dataclass
class Counters:
    offered: int = 0
    offer_failed: int = 0
    throttled: int = 0
    rejected: int = 0
    answered: int = 0
    abandoned: int = 0
    completed: int = 0
    waiting: int = 0
    talking: int = 0
    forced_abandons: int = 0


class LoadGen:
    """Plays :class:`LoadGenConfig` against running nodes; see the module docstring."""

    def __init__(self, cfg: LoadGenConfig) -> None:
        self.cfg = cfg
        self.scale = cfg.time_scale
        self.ledger = Ledger(capacity={
            aid: {CHANNELS[ch]: n for ch, n in caps.items()} for aid, caps in cfg.capacity.items()
        })
        self.force = asyncio.Event()
        self.stop_arrivals = asyncio.Event()
        self.clients = {s: NodeClient(s, a, cfg.tls_dir) for s, a in cfg.addresses.items()}
        self.counters: dict[str, Counters] = {s: Counters() for s in cfg.addresses}
        self.agents: list[SimAgent] = []
        self.run_id = cfg.run_id or f"r{int(time.time() * 1000) % 10**9:09d}"
        self._seq = 0
        self._active = 0
        self._call_tasks: set[asyncio.Task] = set()
        self.started_at = 0.0
        self.arrivals_ended_at = 0.0
        self.errors: list[str] = []
        self.hung_up: set[str] = set()  # callers who decided to hang up (before an answer)
        self.partner_line = PartnerLine(self)

    @property
    def records(self) -> dict[str, CallRecord]:
        return self.ledger.records

    def _error(self, text: str) -> None:
        if len(self.errors) < 50:
            self.errors.append(text)

    # --- the run ------------------------------------------------------------------------

    async def start_agents(self, stream_timeout: float = 3600.0) -> None:
        """Sign in and connect every agent; wait (bounded) until all are READY.
        ``stream_timeout``: the Connect streams' deadline (stop() ends them sooner)."""
        rng = random.Random(self.cfg.seed * 7919 + 1)
        for site, ids in self.cfg.agents.items():
            for aid in ids:
                self.agents.append(
                    SimAgent(
                        self.clients[site], aid, self.ledger, self.cfg.behaviour,
                        time_scale=self.scale, rng=random.Random(rng.random()),
                        rpc_timeout=self.cfg.rpc_timeout_s, stream_timeout=stream_timeout,
                        force=self.force,
                    )
                )
        await asyncio.gather(*(c.wait_ready(15.0) for c in self.clients.values()))
        sem = asyncio.Semaphore(32)

        async def start(a: SimAgent) -> None:
            async with sem:
                await a.start()

        await asyncio.gather(*(start(a) for a in self.agents))
        await asyncio.wait_for(
            asyncio.gather(*(a.ready_once.wait() for a in self.agents)), 15.0
        )

    async def run(self, duration: float) -> None:
        """Agents in, arrivals for ``duration`` real seconds, drain, agents out."""
        try:
            await self.start_agents(duration + self.cfg.drain_s + self.cfg.agent_stop_s + 120)
            self.started_at = time.time()
            rng = random.Random(self.cfg.seed)
            arrivals = [
                asyncio.create_task(self._arrivals(s, random.Random(rng.random())))
                for s in self.cfg.streams
                if s.rate_per_h > 0
            ]
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop_arrivals.wait(), duration)
            self.stop_arrivals.set()
            await asyncio.gather(*arrivals, return_exceptions=True)
            self.arrivals_ended_at = time.time()
            await self._drain()
        finally:
            self.stop_arrivals.set()
            self.force.set()
            await self._stop_agents()
            for t in list(self._call_tasks):
                t.cancel()
            if self._call_tasks:
                await asyncio.gather(*self._call_tasks, return_exceptions=True)

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.cfg.drain_s
        while self._call_tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._call_tasks:
            # Whoever still waits hangs up now; conversations end now (see run()).
            self.force.set()
            for rec in self.records.values():
                rec.wake.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*self._call_tasks, return_exceptions=True),
                    self.cfg.rpc_timeout_s * 4 + 5,
                )

    async def _stop_agents(self) -> None:
        await asyncio.gather(
            *(a.stop(self.cfg.agent_stop_s) for a in self.agents), return_exceptions=True
        )
        for c in self.clients.values():
            with contextlib.suppress(Exception):
                await c.close()

    async def _arrivals(self, stream: CallStream, rng: random.Random) -> None:
        rate = stream.rate_per_h / 3600.0 * self.scale  # calls per real second
        pool = self.cfg.callers.get(stream.site, CallerPool())
        loop = asyncio.get_running_loop()
        t = loop.time()
        while not self.stop_arrivals.is_set():
            t += rng.expovariate(rate)
            delay = t - loop.time()
            if delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop_arrivals.wait(), delay)
                if self.stop_arrivals.is_set():
                    break
            if self._seq >= self.cfg.max_calls:
                self.stop_arrivals.set()
                break
            caller = pool.draw(rng)
            talk = stream.sample_talk(rng)
            patience = stream.sample_patience(rng)
            if self._active >= self.cfg.max_active:
                self.counters[stream.site].throttled += 1
                continue
            self._seq += 1
            rec = CallRecord(
                call_id=f"{self.run_id}-{stream.site}-{self._seq:07d}",
                site=stream.site, stream=stream.name or stream.skill, caller=caller,
                talk_s=talk, patience_s=patience, wake=asyncio.Event(),
            )
            self.records[rec.call_id] = rec
            task = asyncio.create_task(self._call(stream, rec))
            self._call_tasks.add(task)
            task.add_done_callback(self._call_tasks.discard)

    # --- one caller ---------------------------------------------------------------------

    async def _call(self, stream: CallStream, rec: CallRecord) -> None:
        c = self.counters[rec.site]
        client = self.clients[rec.site]
        self._active += 1
        try:
            req = routing_pb2.OfferCallRequest(
                call_id=rec.call_id, channel=CHANNELS[stream.channel], skill=stream.skill,
                language=stream.language, caller=rec.caller,
                context=types_pb2.CallContext(ivr_path=["main", stream.skill]),
            )
            rec.offered_at = time.time()
            try:
                resp = await call_with_retry(
                    client.routing.OfferCall, req, timeout=self.cfg.rpc_timeout_s
                )
            except grpc.aio.AioRpcError as e:
                rec.outcome, rec.offer_error = "offer_failed", describe(e)
                c.offer_failed += 1
                self._error(f"{rec.call_id}: OfferCall failed: {describe(e)}")
                return
            rec.acked_at = time.time()
            rec.queue = resp.call.queue
            c.offered += 1
            if resp.call.state == types_pb2.CALL_STATE_REJECTED:
                rec.outcome, rec.ended_at, rec.node_call = "rejected", rec.acked_at, resp.call
                c.rejected += 1
                return
            c.waiting += 1
            try:
                await self._wait_connected(rec)
            finally:
                c.waiting -= 1
            if not rec.answered_at and rec.outcome == "pending":
                self.hung_up.add(rec.call_id)  # from now on no partner's agent answers it
                await self._abandon(rec, "end_of_run" if self.force.is_set() else "hangup")
            if rec.outcome == "abandoned":
                c.abandoned += 1
                return
            if not rec.answered_at:
                return  # neither abandoned nor seen connected: reconciliation reports it
            c.answered += 1
            c.talking += 1
            try:
                while rec.outcome == "pending" and not rec.complete_failed:
                    rec.wake.clear()
                    await rec.wake.wait()
            finally:
                c.talking -= 1
            if rec.outcome == "completed":
                c.completed += 1
        finally:
            self._active -= 1

    async def _wait_connected(self, rec: CallRecord) -> None:
        patience = None if rec.patience_s is None else rec.patience_s / self.scale
        deadline = None if patience is None else asyncio.get_running_loop().time() + patience
        loop = asyncio.get_running_loop()
        while not rec.answered_at and not self.force.is_set():
            rec.wake.clear()
            if rec.answered_at:
                break
            timeout = None if deadline is None else deadline - loop.time()
            if timeout is not None and timeout <= 0:
                break
            try:
                await asyncio.wait_for(rec.wake.wait(), timeout)
            except asyncio.TimeoutError:
                break

    async def _abandon(self, rec: CallRecord, reason: str) -> None:
        client = self.clients[rec.site]
        try:
            resp = await call_with_retry(
                client.routing.AbandonCall,
                routing_pb2.AbandonCallRequest(call_id=rec.call_id, reason=reason),
                timeout=self.cfg.rpc_timeout_s,
            )
        except grpc.aio.AioRpcError as e:
            if error_reason(e) == "WRONG_STATE" or e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                # Connected meanwhile: our agent's Connected event is on its way.
                await self._await_answer(rec)
                return
            rec.offer_error = f"AbandonCall failed: {describe(e)}"
            self._error(f"{rec.call_id}: {rec.offer_error}")
            return
        state = resp.call.state
        if state in _MOVING:
            # Overflowed (or on its way): the origin recorded the hang-up and hands it on
            # to the site that owns the call now; follow it there.
            await self._abandon_moved(rec, reason, resp.call)
            return
        if state == types_pb2.CALL_STATE_ABANDONED:
            self._abandoned(rec, resp.call, reason)
        else:
            self._error(f"{rec.call_id}: AbandonCall answered state {state}")
            await self._await_answer(rec)

    def _abandoned(self, rec: CallRecord, call: types_pb2.Call, reason: str) -> None:
        rec.outcome, rec.ended_at, rec.abandon_reason = "abandoned", time.time(), reason
        rec.node_call = call
        if reason == "end_of_run":
            self.counters[rec.site].forced_abandons += 1

    async def _locate(self, call_id: str) -> tuple[str, types_pb2.Call] | None:
        """The site that owns the call now and its copy there (the copy that is not
        TRANSFERRED; a TRANSFERRING one while nothing newer exists); None if no site
        answers for it."""
        best: tuple[str, types_pb2.Call] | None = None
        req = routing_pb2.GetCallRequest(call_id=call_id)
        for site, client in self.clients.items():
            try:
                r = await client.routing.GetCall(req, timeout=self.cfg.rpc_timeout_s)
            except grpc.aio.AioRpcError:
                continue
            c = r.call
            if c.state == types_pb2.CALL_STATE_TRANSFERRED:
                continue
            if best is None or c.transfer_count > best[1].transfer_count:
                best = (site, c)
        return best

    async def _abandon_moved(self, rec: CallRecord, reason: str, origin_view: types_pb2.Call) -> None:
        """Hang up a call that overflowed: find the site that owns it (the origin's
        forward may have ended it there already) and abandon it there. Bounded; a call
        it cannot settle stays "pending" for the reconciliation to report."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.rpc_timeout_s * 3
        while loop.time() < deadline:
            found = await self._locate(rec.call_id)
            partner = self.partner_line.owner.get(rec.call_id)
            if found is None and partner is not None:
                # A partner's ACD has it (no node holds it live): the origin told its
                # gateway, and the partner saw the line drop. The caller is gone.
                rec.owner = f"partner:{partner}"
                self._abandoned(rec, origin_view, reason)
                return
            if found is not None:
                site, call = found
                rec.owner = site
                if call.state == types_pb2.CALL_STATE_ABANDONED:
                    self._abandoned(rec, call, reason)
                    return
                if call.state in _TAKEN:
                    await self._await_answer(rec)  # our agent there sees it connected
                    return
                if call.state in (types_pb2.CALL_STATE_QUEUED, types_pb2.CALL_STATE_ASSIGNED):
                    try:
                        resp = await call_with_retry(
                            self.clients[site].routing.AbandonCall,
                            routing_pb2.AbandonCallRequest(call_id=rec.call_id, reason=reason),
                            timeout=self.cfg.rpc_timeout_s,
                        )
                    except grpc.aio.AioRpcError as e:
                        if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                            await self._await_answer(rec)  # connected meanwhile
                            return
                        self._error(f"{rec.call_id}: AbandonCall at {site} failed: {describe(e)}")
                    else:
                        if resp.call.state == types_pb2.CALL_STATE_ABANDONED:
                            self._abandoned(rec, resp.call, reason)
                            return
            await asyncio.sleep(0.05)  # transferring: the two-phase commit is deciding
        rec.offer_error = "AbandonCall: the overflowed call could not be located in time"
        self._error(f"{rec.call_id}: {rec.offer_error}")

    async def _await_answer(self, rec: CallRecord) -> None:
        """The node says the call is connected (or ended); wait, bounded, for our agent
        to see it — if no agent of ours ever does, reconciliation reports the call."""
        async def seen() -> None:
            while not rec.answered_at and rec.outcome == "pending":
                rec.wake.clear()
                await rec.wake.wait()

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(seen(), 10.0)

    # --- summaries ----------------------------------------------------------------------

    def totals(self) -> Counters:
        t = Counters()
        for c in self.counters.values():
            for k in vars(t):
                setattr(t, k, getattr(t, k) + getattr(c, k))
        return t


async def run_loadgen(cfg: LoadGenConfig, duration: float) -> LoadGen:
    """Convenience: run a generator to the end and return it (records, ledger)."""
    gen = LoadGen(cfg)
    await gen.run(duration)
    return gen
