"""The node's side of the partner API (``proto/router/v1/partner.proto``): a BPO partner's
own ACD ("gateway") connects, receives overflow offers within its contract, accepts or
declines them, reports outcomes and hands calls back.

    node.partners = PartnerLink(node)        # server.py; the book comes with the cluster
    state = await node.partners.offer(call_id, "blueline")   # ClusterLink's overflow

One offer (the origin node decides; every step that matters is journaled first):

1. the contract allows it and the gateway is connected; a slot and the rate counters
   are taken in etcd (:meth:`router.coord.partners.PartnerBook.acquire`, all origins
   together);
2. ``transfer_begin`` to ``partner:<name>`` (journaled: the call leaves dispatch, keeps
   its place) -> fault point ``after_begin``;
3. Offer on the gateway's stream -> ``after_offer_sent``; wait for its answer, at most the
   contract's ``offer_timeout_s``;
4. Accept -> ``partner_assign`` (journaled: the partner owns the call) ->
   ``after_assign`` -> Assign on the stream (sent again at every reconnect until the
   outcome is reported: the gateway learns it owns the call even if it crashed);
   Decline / timeout / stream lost -> ``transfer_abort`` (journaled: the call is back in
   its place, same key) -> Withdraw (timeout) -> the slot is released.

Recovery after a restart (:meth:`resolve`, called by the transfer driver for every call
transferring to a ``partner:`` target): a begun offer is aborted (the gateway's stream
died with the old process, so it dropped the unassigned offer; the call is ours); an
assigned call stays the partner's. Then :meth:`reconcile_slots` frees the etcd slots of
this site's calls that are no longer with a partner.

Data minimization (invariant 7): an Offer (also inside an Assign) is built only by
:func:`router.contracts.offer_fields` from the contract in force; errors sent to a partner
name only the call id it sent; no metadata is attached.

Fault injection for the crash tests: ``TANDEM_FAULT=partner:<step>`` SIGKILLs the process
right after ``after_begin``, ``after_offer_sent``, ``after_accept`` (the gateway's Accept
read, nothing journaled), ``after_assign`` (journaled, Assign not sent), ``after_assign_sent``,
``after_outcome`` (journaled, not answered).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from router.contracts import PartnerContract, offer_fields
from router.coord.base import CoordinationUnavailable
from router.coord.partners import CapReached
from router.engine.partner import partner_of_target, partner_target
from router.model import RoutingError
from router.node import metrics
from router.node.errors import Malformed, abort, guard
from router.overflow import LoadSnapshot, PartnerContract as OverflowContract, PartnerUsage, PeerLoad, QueueLoad
from router.security.authz import caller
from router.v1 import partner_pb2 as pb
from router.v1 import partner_pb2_grpc, types_pb2

log = logging.getLogger("tandem.partner")

HELLO_TIMEOUT_S = 10.0
CHANNELS = ("voice", "chat", "email", "social")
_CHANNEL_ENUM = {
    "voice": types_pb2.CHANNEL_VOICE, "chat": types_pb2.CHANNEL_CHAT,
    "email": types_pb2.CHANNEL_EMAIL, "social": types_pb2.CHANNEL_SOCIAL,
}  # fmt: skip
_STATE_NAMES = {
    "completed": types_pb2.CALL_STATE_COMPLETED, "abandoned": types_pb2.CALL_STATE_ABANDONED,
    "rejected": types_pb2.CALL_STATE_REJECTED, "transferred": types_pb2.CALL_STATE_TRANSFERRED,
}  # fmt: skip
_FAULT = os.environ.get("TANDEM_FAULT", "")


def fault(step: str) -> None:
    if _FAULT == f"partner:{step}":
        log.warning("fault injection: SIGKILL after %s", step)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Gateway:
    """One partner gateway's open stream on this node."""

    partner: str
    name: str
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    free: dict[str, int] = field(default_factory=dict)
    ewt: dict[str, float] = field(default_factory=dict)
    offers: dict[tuple[str, int], asyncio.Future] = field(default_factory=dict)
    connected_at: float = field(default_factory=time.time)
    closed: bool = False
    end: tuple[str, str, str] | None = None  # (code, reason, message) the stream ends with

    def finish(self, code: str, reason: str, message: str) -> None:
        """End the stream with this status (once what is queued is sent)."""
        if self.end is None:
            self.end = (code, reason, message)
        self.out.put_nowait(None)

    def send(self, msg: pb.PartnerNodeMessage) -> None:
        if not self.closed:
            self.out.put_nowait(msg)


@dataclass
class PartnerStats:
    offered: int = 0
    assigned: int = 0
    declined: dict[str, int] = field(default_factory=dict)
    not_offered: dict[str, int] = field(default_factory=dict)
    outcomes: int = 0
    handed_back: int = 0


class PartnerLink:
    """Partner gateways connected to this node, and the offers made to them."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.book: Any = None  # router.coord.partners.PartnerBook, set by the cluster link
        self.gateways: dict[str, Gateway] = {}
        self.stats = PartnerStats()
        self._tasks: set[asyncio.Task] = set()
        self._inflight: set[str] = set()  # calls an offer driver of this process handles
        # call -> partners that handed it back: not offered to them again (bounded FIFO)
        self.handed_back: dict[str, set[str]] = {}

    # --- contracts and loads ---------------------------------------------------------

    def contracts(self) -> dict[str, PartnerContract]:
        return self.book.contracts() if self.book is not None else {}

    def contract(self, partner: str) -> PartnerContract | None:
        return self.contracts().get(partner)

    def overflow_contracts(self) -> dict[str, OverflowContract]:
        """The contracts as :func:`router.overflow.decide` reads them (value and the
        concurrency cap as advice; hours, skills, queues and rates are checked in
        :meth:`loads_for` and enforced by :meth:`offer`)."""
        return {
            p: OverflowContract(max_value=c.max_value, max_concurrent=c.caps.concurrent)
            for p, c in self.contracts().items() if p in self.gateways
        }  # fmt: skip

    def usage(self) -> dict[str, PartnerUsage]:
        if self.book is None:
            return {}
        return {p: PartnerUsage(concurrent=self.book.held(p)) for p in self.gateways}

    def loads_for(self, queue: str, skill: str, value: str, now: float) -> dict[str, PeerLoad]:
        """Connected partners whose contract allows a call of ``queue``/``skill``/``value``
        now, as load snapshots built from their gateways' availability."""
        out: dict[str, PeerLoad] = {}
        for p, gw in self.gateways.items():
            c = self.contract(p)
            if c is None or gw.closed or c.allows(skill, queue, value, now) is not None:
                continue
            queues = {}
            for sk, free in gw.free.items():
                if c.skills and sk not in c.skills:
                    continue
                for ch in CHANNELS:
                    queues[f"{sk}-{ch}"] = QueueLoad(
                        skill=sk, channel=ch, language="", value="standard", length=0,
                        expected_wait_s=max(0.0, gw.ewt.get(sk, 0.0)), staffed=max(0, free),
                        free_agents=max(0, free),
                    )  # fmt: skip
            snap = LoadSnapshot(site=p, region="partner", kind="partner", ts=time.time(),
                                free_agents={k: max(0, v) for k, v in gw.free.items()}, queues=queues)
            out[p] = PeerLoad(snap, 0.0)
        return out

    # --- the offer -------------------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _history(self, event: str, partner: str, call_id: str, no: int, **fields: Any) -> None:
        h = getattr(self.node, "history", None)
        if h is None or not hasattr(h, "partner_event"):
            return
        try:
            h.partner_event(event=event, partner=partner, call_id=call_id, offer_no=no, **fields)
        except Exception:  # noqa: BLE001 - history must never hurt routing
            log.exception("history row of %s %s failed", event, call_id)

    async def _offer_msg(self, call_id: str, no: int, c: PartnerContract, value: str,
                         wait_s: float | None = None) -> pb.PartnerOffer:
        node = self.node
        view = node.engine.call(call_id)
        key = await self.book.token_key(c.partner)
        pop = []
        if c.scopes.profile != "none":
            for pc in node.engine.screen_pop(call_id):
                if pc.call_id != call_id:
                    try:
                        resolved = node.engine.call(pc.call_id).resolved
                    except RoutingError:  # no longer retained here
                        resolved = False
                    pop.append({"call_id": pc.call_id, "offered_at": pc.offered_at, "skill": pc.skill,
                                "outcome": pc.outcome, "csat": pc.csat, "resolved": resolved})
        call = {
            "call_id": view.call_id, "skill": view.skill, "channel": view.channel, "language": view.language,
            "caller": view.caller, "customer_id": view.customer_id, "context": view.context,
        }  # fmt: skip
        if wait_s is None:
            wait_s = max(0.0, time.time() - view.offered_at)
        d = offer_fields(call, c, token_key=key, offer_no=no, wait_s=wait_s,
                         value_tier=value, past_contacts=pop)
        return offer_msg(d)

    async def offer(self, call_id: str, partner: str, value: str = "standard") -> str:
        """See :meth:`_offer`; one driver per call at a time."""
        if call_id in self._inflight:
            return self._not("not_queued")
        self._inflight.add(call_id)
        try:
            return await self._offer(call_id, partner, value)
        finally:
            self._inflight.discard(call_id)

    async def _offer(self, call_id: str, partner: str, value: str = "standard") -> str:
        """Offer a queued call to ``partner`` (see the module docstring). Returns
        "assigned", or why not: "declined", "timeout", "gateway_lost", "cap: ...",
        "not_connected", "no_contract", "not_allowed: ...", "etcd", "not_queued"."""
        node = self.node
        gw = self.gateways.get(partner)
        c = self.contract(partner)
        if c is None:
            return self._not("no_contract")
        if gw is None or gw.closed:
            return self._not("not_connected")
        try:
            view = node.engine.call(call_id)
        except RoutingError:
            return self._not("not_queued")
        if view.state != "queued":
            return self._not("not_queued")
        why = c.allows(view.skill, view.queue, value, time.time())
        if why is not None:
            return self._not(f"not_allowed: {why}")
        no = view.transfer_count + 1
        try:
            msg = await self._offer_msg(call_id, no, c, value)  # token key first: no side effect yet
            await self.book.acquire(partner, call_id, c, time.time())
        except CapReached as e:
            return self._not(f"cap: {e.reason}")
        except CoordinationUnavailable:
            return self._not("etcd")
        try:
            await self._exec({"op": "transfer_begin", "call_id": call_id, "transfer_no": no,
                              "target": partner_target(partner)})
        except RoutingError:
            await self._release(partner, call_id)
            return self._not("not_queued")
        fault("after_begin")
        self.stats.offered += 1
        fig = dict(origin_site=node.site.site.name, queue=view.queue, skill=view.skill, channel=view.channel,
                   value_tier=value, wait_s=msg.wait_s)
        self._history("offered", partner, call_id, no, at=time.time(), **fig)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        gw.offers[(call_id, no)] = fut
        if gw.closed:  # it went while we were taking the slot: nobody will answer
            fut.set_result(("gateway_lost", ""))
        gw.send(pb.PartnerNodeMessage(offer=msg))
        if _FAULT == "partner:after_offer_sent":
            await asyncio.sleep(0.3)
            fault("after_offer_sent")
        try:
            kind, detail = await asyncio.wait_for(asyncio.shield(fut), c.offer_timeout_s)
        except asyncio.TimeoutError:
            kind, detail = "timeout", ""
        finally:
            gw.offers.pop((call_id, no), None)
        if kind == "accept":
            fault("after_accept")
            try:
                await self._exec({"op": "partner_assign", "call_id": call_id, "transfer_no": no,
                                  "partner": partner, "agent": detail[:64], "value": value,
                                  "wait_s": msg.wait_s})
            except RoutingError as e:  # the call changed meanwhile (cannot happen: it is out of dispatch)
                log.error("assign of %s to %s refused: %s", call_id, partner, e)
                return await self._abort(gw, partner, call_id, no, "refused", fig)
            fault("after_assign")
            self.stats.assigned += 1
            metrics.PARTNER_OFFERS.labels(node.site.site.name, partner, "assigned").inc()
            now = time.time()
            self._history("assigned", partner, call_id, no, at=now, agent=detail[:64], **fig, **price_fields(c))
            gw.send(pb.PartnerNodeMessage(assign=pb.PartnerAssign(offer=msg, agent=detail[:64], assigned_at=now)))
            fault("after_assign_sent")
            return "assigned"
        if kind == "timeout":
            gw.send(pb.PartnerNodeMessage(withdraw=pb.PartnerWithdraw(call_id=call_id, offer_no=no, reason="timeout")))
        return await self._abort(gw, partner, call_id, no, kind if kind != "decline" else "declined", fig, detail)

    def _not(self, why: str) -> str:
        key = why.split(":")[0]
        self.stats.not_offered[key] = self.stats.not_offered.get(key, 0) + 1
        return why

    async def _abort(self, gw: Gateway | None, partner: str, call_id: str, no: int, why: str,
                     fig: dict, detail: str = "") -> str:
        await self._exec({"op": "transfer_abort", "call_id": call_id, "transfer_no": no,
                          "reason": f"partner {why}"[:64], "by_target": False})
        await self._release(partner, call_id)
        self.stats.declined[why] = self.stats.declined.get(why, 0) + 1
        metrics.PARTNER_OFFERS.labels(self.node.site.site.name, partner, why).inc()
        self._history(why if why in ("declined", "timeout", "gateway_lost") else "withdrawn", partner, call_id, no,
                      at=time.time(), reason=(detail or why)[:64], **fig)
        return why

    async def _release(self, partner: str, call_id: str) -> None:
        if self.book is None:
            return
        try:
            await self.book.release(partner, call_id)
        except Exception:  # noqa: BLE001 - a slot left behind is freed by reconcile_slots
            log.warning("could not free the slot of %s at %s now; it is freed on reconciliation", call_id, partner)
            self._spawn(self._release_later(partner, call_id), f"release-{call_id}")

    async def _release_later(self, partner: str, call_id: str) -> None:
        delay = 0.5
        while not self.node.stopped.is_set():
            await asyncio.sleep(delay)
            try:
                await self.book.release(partner, call_id)
                return
            except Exception:  # noqa: BLE001
                delay = min(delay * 2, 10.0)

    async def _exec(self, cmd: dict) -> Any:
        cmd["t"] = self.node.now()
        return await self.node.execute(cmd)

    # --- recovery --------------------------------------------------------------------

    async def resolve(self, call_id: str) -> None:
        """A call the engine lists as pending whose transfer target is a partner: an
        offer begun before a restart is aborted (its stream died with the old process);
        an abandon of a call the partner owns is passed on to the gateway."""
        view = self.node.engine.call(call_id)
        partner = partner_of_target(view.transfer_target) or ""
        if call_id in self._inflight:
            return  # an offer of this process is in flight: its driver decides
        if view.state == "transferring":
            log.info("aborting the partner offer of %s to %s left by a restart", call_id, partner)
            await self._exec({"op": "transfer_abort", "call_id": call_id, "transfer_no": view.transfer_count,
                              "reason": "partner offer lost on restart", "by_target": False})
            await self._release(partner, call_id)
            self._history("withdrawn", partner, call_id, view.transfer_count, at=time.time(),
                          reason="origin restarted", origin_site=self.node.site.site.name, queue=view.queue,
                          skill=view.skill, channel=view.channel)
            return
        if view.state == "transferred" and view.abandon_pending == 1:
            gw = self.gateways.get(partner)
            if gw is None:
                return  # told when it reconnects (the Assign's re-send carries no abandon; see connect)
            gw.send(pb.PartnerNodeMessage(withdraw=pb.PartnerWithdraw(
                call_id=call_id, offer_no=view.transfer_count, reason="abandoned")))
            await self._exec({"op": "transfer_forwarded", "call_id": call_id})

    async def reconcile_slots(self) -> None:
        """Free the etcd slots of this site's calls no longer with a partner (after a
        restart, and whenever etcd comes back)."""
        if self.book is None:
            return
        engine = self.node.engine

        def keep(partner: str, call_id: str) -> bool:
            try:
                view = engine.call(call_id)
            except RoutingError:
                return False
            if view.state == "transferring":
                return partner_of_target(view.transfer_target) == partner
            rec = engine.partner_record(call_id)
            return (view.state == "transferred" and rec is not None and rec["partner"] == partner
                    and rec["outcome"] is None and not rec["handed_back"])

        freed = await self.book.reconcile(keep)
        if freed:
            log.info("freed %d partner slots of calls no longer with a partner", freed)

    # --- the gateway's stream --------------------------------------------------------

    def partner_of_caller(self, named: str) -> str:
        """The partner the caller is: its certificate's name over mTLS (``named`` must be
        empty or equal), ``named`` on a plaintext node. RoutingError otherwise."""
        who = caller()
        if who is not None and who.spiffe is not None:
            if who.spiffe.kind != "partner":
                raise RoutingError("PERMISSION_DENIED", "ROLE_FORBIDS", "only a partner identity may use the partner API")
            if named and named != who.spiffe.name:
                raise RoutingError("PERMISSION_DENIED", "PARTNER_MISMATCH",
                                   "the partner named differs from the certificate's")
            return who.spiffe.name
        if not named:
            raise RoutingError("INVALID_ARGUMENT", "MISSING_FIELD", "partner is required on a plaintext node",
                               field="partner")
        return named

    def opened(self, partner: str, hello: pb.PartnerHello) -> Gateway:
        if self.contract(partner) is None:
            raise RoutingError("FAILED_PRECONDITION", "NO_CONTRACT", f"no valid contract for partner {partner}")
        if self.node.draining or self.node._closing:
            raise RoutingError("UNAVAILABLE", "NODE_DRAINING", "this node is draining")
        old = self.gateways.get(partner)
        if old is not None and not old.closed:
            # The newest stream wins: a gateway that died without closing its connection
            # (power loss, a partition) must be able to come back at once. The old
            # stream's open offers end as "gateway_lost" (the calls go back in place).
            log.info("partner %s: a new gateway stream replaces the open one", partner)
            old.out.put_nowait(None)
            self.closed(old)
        gw = Gateway(partner, hello.gateway[:64])
        self.availability(gw, hello.availability)
        self.gateways[partner] = gw
        metrics.PARTNER_GATEWAY.labels(self.node.site.site.name, partner).set(1)
        c = self.contract(partner)
        gw.send(pb.PartnerNodeMessage(welcome=pb.PartnerWelcome(
            partner=partner, site=self.node.site.site.name, offer_timeout_s=c.offer_timeout_s, skills=list(c.skills))))
        self._spawn(self._resend_assigns(gw), f"assigns-{partner}")
        log.info("partner %s gateway %r connected", partner, gw.name)
        return gw

    async def _resend_assigns(self, gw: Gateway) -> None:
        """Every call the partner owns and has not reported, again (at-least-once)."""
        engine = self.node.engine
        c = self.contract(gw.partner)
        for cid in engine.partner_owned(gw.partner):
            rec = engine.partner_record(cid)
            if rec is None or c is None:
                continue
            try:
                # the same offer as the first Assign: its value tier and the wait at the offer
                msg = await self._offer_msg(cid, rec["no"], c, rec.get("value") or "standard",
                                            wait_s=rec.get("wait_s"))
            except Exception:  # noqa: BLE001 - etcd down: the next reconnect tries again
                log.warning("could not re-send the assignment of %s to %s", cid, gw.partner)
                continue
            gw.send(pb.PartnerNodeMessage(assign=pb.PartnerAssign(offer=msg, agent=rec["agent"],
                                                                  assigned_at=rec["assigned_at"])))
            view = engine.call(cid)
            if view.abandon_pending == 1:
                gw.send(pb.PartnerNodeMessage(withdraw=pb.PartnerWithdraw(call_id=cid, offer_no=rec["no"],
                                                                          reason="abandoned")))
                await self._exec({"op": "transfer_forwarded", "call_id": cid})

    def availability(self, gw: Gateway, a: pb.PartnerAvailability) -> None:
        gw.free = {k[:64]: int(v) for k, v in list(a.free_agents.items())[:256]}
        gw.ewt = {k[:64]: float(v) for k, v in list(a.expected_wait_s.items())[:256] if v == v}

    def answer(self, gw: Gateway, call_id: str, no: int, kind: str, detail: str) -> None:
        fut = gw.offers.get((call_id, no))
        if fut is not None and not fut.done():
            fut.set_result((kind, detail))
            return
        if kind == "accept":  # too late, or never offered on this stream: it must not connect it
            gw.send(pb.PartnerNodeMessage(withdraw=pb.PartnerWithdraw(call_id=call_id[:64], offer_no=no,
                                                                      reason="not offered now")))

    def close_all(self, code: str, reason: str, message: str) -> None:
        """End every gateway stream with this status (the node stops: UNAVAILABLE
        NODE_DRAINING, which gateways retry on another node at once)."""
        for gw in list(self.gateways.values()):
            gw.finish(code, reason, message)

    def closed(self, gw: Gateway) -> None:
        gw.closed = True
        if self.gateways.get(gw.partner) is gw:
            del self.gateways[gw.partner]
            metrics.PARTNER_GATEWAY.labels(self.node.site.site.name, gw.partner).set(0)
        for fut in gw.offers.values():
            if not fut.done():
                fut.set_result(("gateway_lost", ""))
        log.info("partner %s gateway %r disconnected", gw.partner, gw.name)

    # --- outcomes --------------------------------------------------------------------

    async def report(self, partner: str, req: pb.ReportOutcomeRequest) -> bool:
        """Record an outcome (idempotent); True when it had been reported before."""
        cmd = {
            "op": "partner_outcome", "call_id": req.call_id, "partner": partner, "answered_at": req.answered_at,
            "talk_s": req.talk_s, "wrap_s": req.wrap_s, "disposition": req.disposition, "resolved": req.resolved,
            "csat": req.csat, "transferred_back": req.transferred_back,
        }  # fmt: skip
        before = self.node.engine.partner_record(req.call_id) if req.call_id else None
        await self._exec(cmd)
        fault("after_outcome")
        duplicate = before is not None and before["partner"] == partner and before["outcome"] is not None
        if not duplicate:
            self.stats.outcomes += 1
            rec = self.node.engine.partner_record(req.call_id) or {}
            c = self.contract(partner)
            view = self.node.engine.call(req.call_id)
            self._history("outcome", partner, req.call_id, rec.get("no", 0), at=time.time(),
                          answered_at=req.answered_at, talk_s=req.talk_s, wrap_s=req.wrap_s,
                          disposition=req.disposition[:64], resolved=int(req.resolved), csat=req.csat,
                          transferred_back=int(req.transferred_back), agent=rec.get("agent", ""),
                          origin_site=self.node.site.site.name, queue=view.queue, skill=view.skill,
                          channel=view.channel, **(price_fields(c) if c else {}))
        await self._release(partner, req.call_id)
        return duplicate

    async def hand_back(self, partner: str, call_id: str, reason: str) -> str:
        before = self.node.engine.partner_record(call_id) if call_id else None
        view = await self._exec({"op": "partner_handback", "call_id": call_id, "partner": partner,
                                 "reason": reason})
        if before is not None and not before["handed_back"]:
            self.stats.handed_back += 1
            self._history("handed_back", partner, call_id, before["no"], at=time.time(), reason=reason[:64],
                          origin_site=self.node.site.site.name, queue=view.queue, skill=view.skill,
                          channel=view.channel)
            self.handed_back.setdefault(call_id, set()).add(partner)
            while len(self.handed_back) > 10_000:
                del self.handed_back[next(iter(self.handed_back))]
            cluster = getattr(self.node, "cluster", None)
            if cluster is not None and view.state == "queued":
                cluster._stay_again(call_id)  # decided again by the sweeps, like a declined overflow
        await self._release(partner, call_id)
        return view.queue


def price_fields(c: PartnerContract) -> dict[str, Any]:
    """The contract's prices and SLA as history columns (the statement uses the terms in
    force when the event happened)."""
    sla = c.sla
    return {
        "price_per_contact": c.price.per_contact, "price_per_minute": c.price.per_handled_minute,
        "currency": c.price.currency, "sla_threshold_s": sla.threshold_s if sla else 0.0,
        "sla_target": sla.target if sla else 0.0, "sla_credit_per_point": sla.credit_per_point if sla else 0.0,
    }  # fmt: skip


def offer_msg(d: dict) -> pb.PartnerOffer:
    """The proto of an offer dict from :func:`router.contracts.offer_fields` (nothing
    else is copied: what the contract did not allow is not in ``d``)."""
    msg = pb.PartnerOffer()
    for k, v in d.items():
        if k == "channel":
            msg.channel = _CHANNEL_ENUM.get(v, types_pb2.CHANNEL_UNSPECIFIED)
        elif k == "past_contacts":
            for pc in v:
                msg.past_contacts.add(call_id=pc["call_id"], offered_at=pc["offered_at"], skill=pc["skill"],
                                      outcome=_STATE_NAMES.get(pc["outcome"], types_pb2.CALL_STATE_UNSPECIFIED),
                                      csat=pc["csat"])
        elif k == "ivr_path":
            msg.ivr_path.extend(v)
        else:
            setattr(msg, k, v)
    return msg


class PartnerService(partner_pb2_grpc.PartnerServicer):
    def __init__(self, node: Any) -> None:
        self.node = node

    @property
    def link(self) -> PartnerLink:
        return self.node.partners

    @guard
    async def Connect(self, request_iterator, context):
        requests = request_iterator.__aiter__()
        try:
            first = await asyncio.wait_for(requests.__anext__(), HELLO_TIMEOUT_S)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            await abort(context, "INVALID_ARGUMENT", "MISSING_FIELD", f"no hello within {HELLO_TIMEOUT_S:g} s",
                        field="hello")
        if isinstance(first, Malformed) or first.WhichOneof("msg") != "hello":
            await abort(context, "INVALID_ARGUMENT", "MALFORMED_REQUEST", "the first message must be a hello")
        link = self.link
        partner = link.partner_of_caller(first.hello.partner)
        gw = link.opened(partner, first.hello)
        reader = asyncio.create_task(self._read(context, gw))
        try:
            while True:
                msg = await gw.out.get()
                if msg is None:
                    break
                await context.write(msg)
            if gw.end is not None:
                await abort(context, *gw.end)
        finally:
            reader.cancel()
            link.closed(gw)

    async def _read(self, context, gw: Gateway) -> None:
        link = self.link
        try:
            while True:
                msg = await context.read()
                if msg is grpc.aio.EOF:
                    break
                if isinstance(msg, Malformed):
                    continue
                kind = msg.WhichOneof("msg")
                if kind == "availability":
                    link.availability(gw, msg.availability)
                elif kind == "accept":
                    link.answer(gw, msg.accept.call_id, msg.accept.offer_no, "accept", msg.accept.agent)
                elif kind == "decline":
                    link.answer(gw, msg.decline.call_id, msg.decline.offer_no, "decline", msg.decline.reason)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - transport errors end the stream
            log.info("partner %s stream read ended: %r", gw.partner, exc)
        gw.send(None)  # type: ignore[arg-type]

    @guard
    async def ReportOutcome(self, request, context):
        partner = self.link.partner_of_caller(request.partner)
        dup = await self.link.report(partner, request)
        return pb.ReportOutcomeResponse(call_id=request.call_id, duplicate=dup)

    @guard
    async def HandBack(self, request, context):
        partner = self.link.partner_of_caller(request.partner)
        queue = await self.link.hand_back(partner, request.call_id, request.reason)
        return pb.HandBackResponse(call_id=request.call_id, queue=queue)
