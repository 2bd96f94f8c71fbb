"""After a load-generator run: reconcile with the nodes, and KPIs from the nodes' records.

:func:`reconcile` compares the generator's own record of every call with what the nodes
say (``Admin.ListCalls``):

* ``lost`` — a call the generator offered successfully that no node owns (unknown, or
  TRANSFERRED everywhere), whose final state on the owning node differs from the generator's (completed / abandoned / rejected), or
  that the generator saw connected while the node never answered it;
* ``duplicates`` — a call listed twice by a node, owned by two sites (two live copies,
  or TRANSFERRED and live copies that disagree: see :func:`ownership`), offered to two
  of our agents at once, connected twice, or connected to one agent by our account and
  to another by the node's;
* ``unfinished`` — calls the generator could not take to an end itself (an RPC of its own
  failed); not a node fault, listed for the curious.

Calls handed to a BPO partner on the partner API (its own ACD, not a node: the origin's
copy is TRANSFERRED to ``partner:<name>`` and no node has the call after that) are owned
by the partner. The partner's own records (:class:`PartnerCall`, from the simulated
partner of the demo) say what it did: such a call must have been served there exactly
once (twice is a duplicate; never, or no record at all, is lost), the origin must have
recorded the partner's outcome (the same answer time), and the generator's caller must
agree (answered when the partner answered, abandoned when it did not).

:func:`queue_kpis` computes per site and queue (where the call arrived; an overflowed
call keeps counting for its origin queue, with the outcome it got at the other site): offered, answered, abandoned, rejected,
service level by the queue's own definition (``ServiceLevelDefinition``), ASA, AHT (talk
time on the node plus the queue's configured wrap-up), abandon rate and CSAT. The nodes
ran on compressed time, so every duration is multiplied by ``time_scale`` back to
simulated seconds and compared with the *unscaled* site configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from router.config import Channel, SiteConfig
from router.sim.ledger import CallRecord, Ledger
from router.v1 import types_pb2

_STATE_OF_OUTCOME = {
    "completed": types_pb2.CALL_STATE_COMPLETED,
    "abandoned": types_pb2.CALL_STATE_ABANDONED,
    "rejected": types_pb2.CALL_STATE_REJECTED,
}


@dataclass
class Reconciliation:
    offered: int = 0
    lost: int = 0
    duplicates: int = 0
    unfinished: int = 0
    unknown: int = 0  # calls of this run on a node that the generator never offered
    transferred: int = 0  # calls owned at the end by another site than the one offered
    examples: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.examples) < 20:
            self.examples.append(text)


_MOVED = types_pb2.CALL_STATE_TRANSFERRED
_MOVING = types_pb2.CALL_STATE_TRANSFERRING
PARTNER_PREFIX = "partner:"  # the transfer target of a call handed to a partner's gateway


@dataclass(frozen=True)
class PartnerCall:
    """One call as a partner's own ACD saw it (the simulated partner's record:
    ``router.partner.sim.SimCall``; see :func:`partner_calls`).

    ``site``: the origin that offered or assigned it; ``offers``: offers received;
    ``handled``: times it served the call to an outcome after an Assign (1 for a call it
    owned); ``handed_back``: times it gave it back; ``in_hand``: assigned and not yet
    ended; ``reported``: the origin recorded its outcome; ``answered_at``: its answer
    time (0: the caller hung up first); ``ended_at``: when the call ended there."""

    partner: str
    site: str
    offers: int = 0
    handled: int = 0
    handed_back: int = 0
    in_hand: bool = False
    reported: bool = False
    answered_at: float = 0.0
    ended_at: float = 0.0


_IN_HAND = frozenset({"assigned", "waiting", "ringing", "talking", "wrap", "reporting"})


def partner_calls(partner: str, records: Mapping[str, Any]) -> dict[str, PartnerCall]:
    """:class:`PartnerCall` of every call a simulated partner recorded (``records``: call
    id -> its record, with the attributes of ``router.partner.sim.SimCall``)."""
    return {
        cid: PartnerCall(partner, r.site, r.offers, r.handled, r.handed_back, r.state in _IN_HAND,
                         r.reported, r.answered_at, r.ended_at)
        for cid, r in records.items()
    }  # fmt: skip


def transfer_target(call: Any) -> str:
    """The transfer target a Call message carries ("" when its message has no such field)."""
    return str(getattr(call, "transfer_target", "") or "")


@dataclass
class Owned:
    """One call over all sites: the copy that owns it, where it arrived, every copy."""

    call_id: str
    site: str  # the owning site
    call: object  # its Call there
    origin_site: str
    origin_queue: str
    origin_start: float  # when it joined the origin's queue (Unix seconds)
    copies: list = field(default_factory=list)  # (site, Call), in node order
    problem: str = ""  # "" | "lost" | "duplicate": how the copies break invariant 1
    partner: str = ""  # the partner (partner API) that owns it; ``site`` is then "partner:<name>"

    @property
    def moved(self) -> bool:
        return self.site != self.origin_site


def ownership(
    node_calls: dict[str, list],
    partners: Mapping[str, PartnerCall] | None = None,
    origins: Mapping[str, str] | None = None,
) -> dict[str, Owned]:
    """Every call the nodes list, with the copy that owns it (invariant 1).

    A call that moved between sites has a TRANSFERRED copy at each site it left (with
    the transfer number of that hop as ``transfer_count``) and one live copy — queued,
    ringing, talking or final — at the site that has it now, whose ``transfer_count``
    is at least every TRANSFERRED copy's. The origin is the site that handed it on
    first (the TRANSFERRED copy with the lowest transfer number), or the owner itself.
    A copy still TRANSFERRING owns the call unless the target already shows the same
    transfer committed (the origin's Commit answer still on its way): then the target
    owns it. ``problem``: "lost" when no copy owns the call, "duplicate" when two
    copies do, or when the TRANSFERRED and live copies disagree (a live copy older
    than a committed hand-over, a site listing the call twice).

    ``partners`` (call id -> :class:`PartnerCall`): a call whose last hand-over went to a
    partner's gateway and that no node holds live is the partner's (``site`` is then
    "partner:<name>", ``call`` the origin's TRANSFERRED copy); served there twice, or
    also live at a site, it is a duplicate. ``origins`` (call id -> the site where it
    arrived): a live copy with transfer attempts but no TRANSFERRED copy is fine at its
    origin (every attempt was aborted, e.g. declined by a partner), and so is one whose
    attempts the partner's records explain.
    """
    partners = partners or {}
    origins = origins or {}
    where: dict[str, list[tuple[str, object]]] = {}
    twice: set[str] = set()
    for site, calls in node_calls.items():
        seen: set[str] = set()
        for call in calls:
            if call.call_id in seen:
                twice.add(call.call_id)
            seen.add(call.call_id)
            where.setdefault(call.call_id, []).append((site, call))
    out: dict[str, Owned] = {}
    for call_id, copies in where.items():
        moved = sorted(((s, c) for s, c in copies if c.state == _MOVED), key=lambda sc: sc[1].transfer_count)
        live = [(s, c) for s, c in copies if c.state != _MOVED]
        problem = "duplicate" if call_id in twice else ""
        if len(live) > 1:
            # A transfer between commit and done: the target's copy owns the call.
            landed = [(s, c) for s, c in live if c.state != _MOVING]
            moving = [(s, c) for s, c in live if c.state == _MOVING]
            if len(landed) == 1 and all(c.transfer_count <= landed[0][1].transfer_count for _, c in moving):
                live = landed
            else:
                problem = "duplicate"
        p = partners.get(call_id)
        partner = ""
        if live:
            site, call = max(live, key=lambda sc: sc[1].transfer_count)
            if moved and call.transfer_count < moved[-1][1].transfer_count:
                problem = "duplicate"  # a live copy older than a committed hand-over
            explained = origins.get(call_id) == site or (p is not None and p.site == site and p.offers > 0)
            if call.transfer_count and not moved and len(node_calls) > 1 and not explained:
                # Arrived by a transfer whose origin has no record of it: the origin
                # might still think it owns it. (A single node listed: nothing to check.)
                problem = problem or "duplicate"
            if p is not None and p.handled:
                problem = "duplicate"  # served by the partner, and live at a site too
        else:
            site, call = moved[-1]
            named = transfer_target(call)
            if named.startswith(PARTNER_PREFIX):
                partner = named[len(PARTNER_PREFIX):]
            elif not named and p is not None and p.site == site and (p.handled or p.in_hand):
                partner = p.partner
            if partner:
                site = PARTNER_PREFIX + partner
                if p is not None and p.handled > 1:
                    problem = "duplicate"  # served twice by the partner
            else:
                problem = "lost"
        first_site, first = moved[0] if moved else (site, call)
        out[call_id] = Owned(
            call_id, site, call, first_site, first.queue,
            first.queued_at or first.offered_at, copies, problem, partner,
        )
    return out


def reconcile(
    records: Iterable[CallRecord],
    node_calls: dict[str, list],
    ledger: Ledger,
    run_id: str,
    partners: Mapping[str, PartnerCall] | None = None,
) -> Reconciliation:
    """The generator's records against every site's (see the module docstring). Each
    call is checked against the copy that owns it over all sites (:func:`ownership`),
    wherever it was offered: after an overflow the site that took the offer holds only
    a TRANSFERRED record. ``partners``: the records of the partners on the partner API
    (call id -> :class:`PartnerCall`)."""
    r = Reconciliation()
    records = list(records)
    partners = partners or {}
    owned = ownership(node_calls, partners, {rec.call_id: rec.site for rec in records})
    dup: set[str] = set()
    for call_id, o in owned.items():
        if o.problem == "duplicate":
            dup.add(call_id)
            r.note(f"{call_id}: owned inconsistently: " + ", ".join(
                f"{s} {types_pb2.CallState.Name(c.state)}#{c.transfer_count}" for s, c in o.copies))
    for call_id in ledger.duplicates:
        dup.add(call_id)
    r.examples.extend(ledger.anomalies[: max(0, 20 - len(r.examples))])

    offered_ids: set[str] = set()
    for rec in records:
        offered_ids.add(rec.call_id)
        if not rec.acked_at:  # the offer itself failed; nothing to hold the node to
            if rec.outcome != "offer_failed":
                r.unfinished += 1
            continue
        r.offered += 1
        o = owned.get(rec.call_id)
        if o is None or o.problem == "lost":
            r.lost += 1
            r.note(f"{rec.call_id}: offered to {rec.site}, owned by no node"
                   + (f" (copies: {[s for s, _ in o.copies]})" if o else ""))
            continue
        call = o.call
        if o.site != rec.site and rec.site in node_calls:
            r.transferred += 1
        if o.partner:
            _reconcile_partner(r, rec, o, partners.get(rec.call_id))
            continue
        if rec.outcome in _STATE_OF_OUTCOME:
            if call.state != _STATE_OF_OUTCOME[rec.outcome]:
                r.lost += 1
                r.note(
                    f"{rec.call_id}: generator saw {rec.outcome}, node {o.site} says "
                    f"{types_pb2.CallState.Name(call.state)}"
                )
                continue
        elif rec.outcome == "pending":
            r.unfinished += 1
            r.note(f"{rec.call_id}: unfinished by the generator ({rec.complete_failed or rec.offer_error})"
                   f"; node {o.site} says {types_pb2.CallState.Name(call.state)}")
        if rec.answered_at and not call.answered_at:
            r.lost += 1
            r.note(f"{rec.call_id}: our agent {rec.agent_id} was connected, node {o.site} never answered it")
            continue
        if rec.agent_id and call.agent_id and rec.agent_id != call.agent_id:
            dup.add(rec.call_id)
            r.note(f"{rec.call_id}: connected to {rec.agent_id}, node {o.site} says {call.agent_id}")
    prefix = f"{run_id}-"
    r.unknown = sum(1 for cid in owned if cid.startswith(prefix) and cid not in offered_ids)
    r.duplicates = len(dup)
    return r


def _reconcile_partner(r: Reconciliation, rec: CallRecord, o: Owned, p: PartnerCall | None) -> None:
    """A call the partner owns: served there once, its outcome recorded by the origin, and
    the caller's account agreeing with the partner's."""
    cid, where = rec.call_id, f"partner {o.partner}"
    if p is None or not p.handled:
        if p is not None and p.in_hand:
            r.unfinished += 1
            r.note(f"{cid}: still in hand at {where}")
        else:
            r.lost += 1
            r.note(f"{cid}: TRANSFERRED to {where} by {o.origin_site}, never served there")
        return
    if not p.reported:
        r.unfinished += 1
        r.note(f"{cid}: {where} served it but its outcome was not recorded")
        return
    if o.call.answered_at != p.answered_at:
        r.lost += 1
        r.note(f"{cid}: {where} answered it at {p.answered_at}, the origin says {o.call.answered_at}")
        return
    said = "completed" if p.answered_at else "abandoned"
    if rec.outcome == "pending":
        r.unfinished += 1
        r.note(f"{cid}: unfinished by the generator; {where} says {said}")
    elif rec.outcome != said or (rec.answered_at and rec.answered_at != p.answered_at):
        r.lost += 1
        r.note(f"{cid}: generator saw {rec.outcome} (answered at {rec.answered_at}), {where} says {said} "
               f"(answered at {p.answered_at})")


@dataclass
class Overflow:
    """Transfers of one site: calls it handed on to another site (``out``: its TRANSFERRED
    copies) and calls it took from another site (``in_``: its copies that arrived by a
    transfer). Over all sites the two sums are equal. Calls it handed to a partner on the
    partner API (not a site) count apart, in ``to_partners``."""

    out: int = 0
    in_: int = 0
    to_partners: int = 0


def overflow_counts(node_calls: dict[str, list], partners: Mapping[str, PartnerCall] | None = None,
                    origins: Mapping[str, str] | None = None) -> dict[str, Overflow]:
    out = {site: Overflow() for site in node_calls}
    for o in ownership(node_calls, partners, origins).values():
        if o.problem:  # counted by reconcile(); its copies tell no consistent story
            continue
        last = max((c.transfer_count for _, c in o.copies if c.state == _MOVED), default=-1)
        for site, c in o.copies:
            if c.state == _MOVED:
                if o.partner and c.transfer_count == last:
                    out[site].to_partners += 1  # the hand-over to the partner
                else:
                    out[site].out += 1
            if site != o.origin_site:
                out[site].in_ += 1
    return out


@dataclass
class QueueKpi:
    site: str
    queue: str
    threshold_s: float = 20.0
    target: float = 0.8
    abandons: str = "short_excluded"
    wrap_up_s: float = 0.0
    offered: int = 0
    answered: int = 0
    abandoned: int = 0
    rejected: int = 0
    active: int = 0  # not ended when the records were read
    answered_in_t: int = 0
    abandoned_after_t: int = 0
    wait_sum: float = 0.0
    talk_sum: float = 0.0
    talk_n: int = 0
    csat_sum: int = 0
    csat_n: int = 0
    # An aggregate's service level sums each queue's own numerator and denominator.
    sl_num_den_parts: list = field(default_factory=list)

    def add(self, other: "QueueKpi") -> None:
        for k in ("offered", "answered", "abandoned", "rejected", "active", "answered_in_t",
                  "abandoned_after_t", "wait_sum", "talk_sum", "talk_n", "csat_sum", "csat_n"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.sl_num_den_parts.append(other.sl_parts())

    def sl_parts(self) -> tuple[int, int]:
        if self.sl_num_den_parts:
            return (sum(n for n, _ in self.sl_num_den_parts), sum(d for _, d in self.sl_num_den_parts))
        if self.abandons == "count_against":
            den = self.answered + self.abandoned
        elif self.abandons == "exclude":
            den = self.answered
        else:
            den = self.answered + self.abandoned_after_t
        return self.answered_in_t, den

    @property
    def service_level(self) -> float | None:
        num, den = self.sl_parts()
        return num / den if den else None

    @property
    def asa_s(self) -> float | None:
        return self.wait_sum / self.answered if self.answered else None

    @property
    def aht_s(self) -> float | None:
        return self.talk_sum / self.talk_n if self.talk_n else None

    @property
    def abandon_rate(self) -> float | None:
        n = self.answered + self.abandoned
        return self.abandoned / n if n else None

    @property
    def csat(self) -> float | None:
        return self.csat_sum / self.csat_n if self.csat_n else None


def queue_kpis(
    node_calls: dict[str, list], sites: dict[str, SiteConfig], time_scale: float,
    origin_site: dict[str, str] | None = None,
    partners: Mapping[str, PartnerCall] | None = None,
) -> dict[str, dict[str, QueueKpi]]:
    """site -> queue -> KPIs (rejected calls, which have no queue, under "(rejected)").

    Calls count where they *arrived* (site and queue), with the outcome of the copy that
    owns them (:func:`ownership`): a call that overflowed counts for its origin queue,
    its wait from its arrival there to its answer at the other site, against the origin
    queue's service-level definition. ``origin_site`` (call id -> site) overrides the
    arrival site, for runs where several sites' traffic went to one node (the pooled
    reference of the demo). A call a partner owns (``partners``, see :func:`ownership`)
    counts with the partner's outcome as its origin recorded it: answered at the
    partner's answer time, or abandoned when the partner reported no answer."""
    partners = partners or {}
    out: dict[str, dict[str, QueueKpi]] = {}
    for o in ownership(node_calls, partners, origin_site).values():
        call = o.call
        site = (origin_site or {}).get(o.call_id, o.origin_site)
        cfg = sites.get(site)
        qname = o.origin_queue
        per = out.setdefault(site, {})
        name = qname or "(rejected)"
        k = per.get(name)
        if k is None:
            q = next((q for q in cfg.queues if q.name == qname), None) if cfg else None
            k = per[name] = QueueKpi(site, name)
            if q is not None:
                k.threshold_s = q.service_level.threshold_s
                k.target = q.service_level.target
                k.abandons = q.service_level.abandons
                k.wrap_up_s = q.wrap_up_s
        k.offered += 1
        start = o.origin_start
        if call.state == types_pb2.CALL_STATE_REJECTED:
            k.rejected += 1
        elif call.answered_at:
            k.answered += 1
            wait = max(0.0, call.answered_at - start) * time_scale
            k.wait_sum += wait
            k.answered_in_t += wait <= k.threshold_s
            if (call.state == types_pb2.CALL_STATE_COMPLETED or o.partner) and call.ended_at:
                k.talk_sum += max(0.0, call.ended_at - call.answered_at) * time_scale + k.wrap_up_s
                k.talk_n += 1
                if call.disposition.csat:
                    k.csat_sum += call.disposition.csat
                    k.csat_n += 1
        elif call.state == types_pb2.CALL_STATE_ABANDONED or (
                o.partner and o.call_id in partners and partners[o.call_id].reported):
            k.abandoned += 1
            p = partners.get(o.call_id) if o.partner else None
            ended = (p.ended_at if p is not None and p.ended_at else call.ended_at) or start
            waited = max(0.0, ended - start) * time_scale
            k.abandoned_after_t += waited > k.threshold_s
        else:
            k.active += 1
    for site in node_calls:
        if origin_site is None:
            out.setdefault(site, {})
    return {site: dict(sorted(per.items())) for site, per in out.items()}


def total(kpis: Iterable[QueueKpi], site: str = "", queue: str = "") -> QueueKpi:
    agg = QueueKpi(site, queue)
    for k in kpis:
        agg.add(k)
    return agg


def voice_occupancy(
    node_calls: dict[str, list], sites: dict[str, SiteConfig], t0: float, t1: float
) -> dict[str, float | None]:
    """Per site: the share of its voice agents' time in [t0, t1] (Unix seconds) spent on
    voice calls — talk plus the queue's wrap-up as configured on the node. Pass the site
    files the nodes ran (scaled ones under time compression)."""
    out: dict[str, float | None] = {}
    for site, calls in node_calls.items():
        cfg = sites.get(site)
        if cfg is None or t1 <= t0:
            out[site] = None
            continue
        agents = sum(
            1 for g in cfg.agent_profiles().values() if g.capacity.get(Channel.VOICE, 0) > 0
        )
        wrap = {q.name: q.wrap_up_s for q in cfg.queues}
        busy = 0.0
        for c in calls:
            if c.channel != types_pb2.CHANNEL_VOICE or not c.answered_at or c.state == _MOVED:
                continue  # a TRANSFERRED copy was answered elsewhere (at a partner) if at all
            end = (c.ended_at or t1) + wrap.get(c.queue, 0.0)
            busy += max(0.0, min(end, t1) - max(c.answered_at, t0))
        out[site] = busy / (agents * (t1 - t0)) if agents else None
    return out


# --- the offered calls, one JSON line each (tandem demo --calls-out) ------------------------

#: What a call line's ``outcome`` says (see :func:`call_lines`).
CALL_OUTCOMES = ("completed", "abandoned", "rejected", "active", "offer_failed")
_CHANNEL_NAMES = {
    types_pb2.CHANNEL_VOICE: "voice",
    types_pb2.CHANNEL_CHAT: "chat",
    types_pb2.CHANNEL_EMAIL: "email",
    types_pb2.CHANNEL_SOCIAL: "social",
}


_CLASS_NAMES = {
    types_pb2.PRIORITY_CLASS_STANDARD: "standard",
    types_pb2.PRIORITY_CLASS_REPEAT: "repeat",
    types_pb2.PRIORITY_CLASS_WHITELIST: "whitelist",
    types_pb2.PRIORITY_CLASS_VIP: "vip",
    types_pb2.PRIORITY_CLASS_BLACKLIST: "blacklist",
}


def call_lines(
    records: Iterable[CallRecord],
    node_calls: dict[str, list],
    time_scale: float,
    started_at: float,
    streams: Mapping[tuple[str, str], Any] | None = None,
    partners: Mapping[str, PartnerCall] | None = None,
) -> list[dict[str, Any]]:
    """One plain dict per call the generator offered (or tried to), in offer order:
    what the caller and the agent were given and what the nodes made of it, with
    :func:`queue_kpis`' reading of the nodes' records (the owning copy, the origin
    queue, the wait from the arrival at the origin) so that the demo's KPIs can be
    recomputed from the lines alone.

    Keys: ``call_id``; ``site`` and ``queue`` (origin: where it arrived and the queue it
    joined there, "" when rejected); ``stream`` (the generator's stream label);
    ``skill``, ``channel``, ``language``, ``caller``; ``offered_s`` (when the generator
    offered it, simulated seconds since its arrivals started at ``started_at``, a Unix
    time); ``talk_s`` and ``patience_s`` (the generator's draws, simulated seconds;
    patience None = waits forever); ``outcome`` (:data:`CALL_OUTCOMES`: completed = an
    agent answered it — a conversation the end of the run cut short too —, abandoned,
    rejected, active = no final state on its owning node, offer_failed = no node took
    the offer); ``end_of_run`` (abandoned because the run ended: the caller was still
    waiting); ``wait_s`` (simulated seconds from its arrival at the origin to its answer,
    or to its hang-up; None otherwise); ``answered_site``, ``answered_queue`` and
    ``agent_id`` (where it was answered: a site, or "partner:NAME" for a partner on the
    partner API; "" when not answered); ``transfers`` (hand-overs between sites);
    ``offers`` (times one of the generator's agents was offered it: more than 1 when an
    agent rejected it or let it ring out, or the node withdrew an offer); ``talked_s``
    (an answered call: from its answer to its end on the node that answered it,
    simulated seconds — the drawn talk time plus the live run's delays, or less when the
    end of the run cut the conversation short; None otherwise); ``ended_site`` (the site
    whose copy owns the call: where it ended, "partner:NAME" at a partner on the partner
    API; "" without a node copy); ``priority_class`` (the class the node gave it).

    ``streams``: (site, stream label) -> the generator's ``CallStream``, for the skill,
    channel and language of a call no node recorded; ``partners``: as for
    :func:`ownership`."""
    partners = partners or {}
    records = sorted(records, key=lambda r: (r.offered_at, r.call_id))
    owned = ownership(node_calls, partners, {r.call_id: r.site for r in records})
    out: list[dict[str, Any]] = []
    for rec in records:
        st = (streams or {}).get((rec.site, rec.stream))
        o = owned.get(rec.call_id)
        call = o.call if o is not None else None
        line: dict[str, Any] = {
            "call_id": rec.call_id, "site": rec.site, "queue": o.origin_queue if o is not None else "",
            "stream": rec.stream,
            "skill": call.skill if call is not None else getattr(st, "skill", ""),
            "channel": _CHANNEL_NAMES.get(call.channel, "") if call is not None else getattr(st, "channel", ""),
            "language": call.language if call is not None else getattr(st, "language", ""),
            "caller": rec.caller,
            "offered_s": round(max(0.0, rec.offered_at - started_at) * time_scale, 6),
            "talk_s": round(rec.talk_s, 6),
            "patience_s": None if rec.patience_s is None else round(rec.patience_s, 6),
            "outcome": "offer_failed", "end_of_run": False, "wait_s": None,
            "answered_site": "", "answered_queue": "", "agent_id": "",
            "transfers": 0, "offers": rec.assignments, "talked_s": None, "ended_site": "",
            "priority_class": "",
        }  # fmt: skip
        out.append(line)
        if o is None or not rec.acked_at:
            continue
        line["transfers"] = max((c.transfer_count for _, c in o.copies), default=0)
        line["ended_site"] = o.site
        line["priority_class"] = _CLASS_NAMES.get(call.priority_class, "")
        start = o.origin_start
        if call.state == types_pb2.CALL_STATE_REJECTED:
            line["outcome"] = "rejected"
        elif call.answered_at:
            line.update(outcome="completed", wait_s=round(max(0.0, call.answered_at - start) * time_scale, 6),
                        answered_site=o.site, answered_queue=call.queue if not o.partner else "",
                        agent_id=call.agent_id)
            if call.ended_at:
                line["talked_s"] = round(max(0.0, call.ended_at - call.answered_at) * time_scale, 6)
        elif call.state == types_pb2.CALL_STATE_ABANDONED or (o.partner and o.call_id in partners
                                                               and partners[o.call_id].reported):
            p = partners.get(o.call_id) if o.partner else None
            ended = (p.ended_at if p is not None and p.ended_at else call.ended_at) or start
            reason = call.abandon_reason or rec.abandon_reason
            line.update(outcome="abandoned", wait_s=round(max(0.0, ended - start) * time_scale, 6),
                        end_of_run=reason == "end_of_run" or rec.abandon_reason == "end_of_run")
        else:
            line["outcome"] = "active"
    return out
