"""Transfers between sites: the engine's half of the two-phase protocol (part of
:class:`router.engine.Engine`).

A queued call moves from an *origin* site to a *target* site exactly once. The key of a
transfer is ``(call_id, transfer_no)``; ``transfer_no`` is the call's ``transfer_count``
+ 1 when the origin begins it, so every attempt (also a retry after an abort) has a key
of its own. The **target decides** each key, once: committed or aborted.

Origin commands (the call's side; results are CallViews):

==================== ==================================================================
op                   fields besides ``op`` and ``t``
==================== ==================================================================
transfer_begin       call_id, transfer_no, target (the target's address)
transfer_committing  call_id, transfer_no
transfer_done        call_id, transfer_no
transfer_abort       call_id, transfer_no, reason, by_target (bool)
transfer_forwarded   call_id        (an abandon was handed on to the target)
==================== ==================================================================

* ``transfer_begin``: a QUEUED call (not ringing, not blacklisted) becomes
  "transferring": out of dispatch, but it keeps its handle and key, so an abort puts it
  back exactly where it was. ``transfer_no`` must be ``transfer_count + 1``
  (FAILED_PRECONDITION TRANSFER_NO_MISMATCH); ``transfer_count`` becomes it.
* ``transfer_committing``: the origin is about to send CommitTransfer. Journaled before
  the message leaves, so after a crash the origin knows whether a Commit may be out there:
  from then on only the target's answer resolves the transfer.
* ``transfer_done``: the target answered COMMITTED: the call is final here, state
  "transferred", ``transfer_target`` kept. Needs a committing transfer.
* ``transfer_abort``: the call goes back to its place (same handle, same key) and to
  dispatch. Refused while committing unless ``by_target`` (the target said ABORTED):
  FAILED_PRECONDITION TRANSFER_COMMITTING.
* ``abandon`` of a transferring call records the abandon (``abandon_pending``) and
  answers the call as it is; an aborted transfer then ends the call as abandoned here,
  a committed one leaves the abandon for the node to forward to the target (then
  ``transfer_forwarded``). ``abandon`` of a transferred call records it the same way.
  A repeated abandon changes nothing.

Target commands (results are :class:`router.model.TransferView`):

==================== ==================================================================
transfer_reserve     call_id, transfer_no, origin, channel, skill, language, caller,
                     customer_id, priority_class (resolved: standard|repeat|whitelist|
                     vip), offered_at (original arrival), context, ttl_s
transfer_commit      call_id, transfer_no
transfer_cancel      call_id, transfer_no, origin
==================== ==================================================================

* ``transfer_reserve`` validates (a queue serves the call: NOT_FOUND UNKNOWN_SKILL; the
  queue has room counting reservations: FAILED_PRECONDITION QUEUE_FULL; no call of that
  id is live here: ALREADY_EXISTS CALL_ID_CONFLICT) and reserves a place until
  ``t + ttl_s`` (ttl clipped to 1..60 s, 0 = 10 s). Repeating it answers the key's
  state; the same key with other call data: ALREADY_EXISTS TRANSFER_CONFLICT.
* ``transfer_commit`` queues the call with its original ``offered_at`` and class: key
  ``offered_at - head_start(class)``, as if it had arrived here (a fresh handle: exact
  key ties go to calls already here). ``queued_at`` is the commit time. A reservation
  expired at ``t`` (``t >= expires_at``) is aborted instead ("expired"); a call of that
  id live here by then aborts it too. Unknown key: NOT_FOUND TRANSFER_NOT_FOUND.
* ``transfer_cancel`` aborts a reservation; on an unknown key it records the key as
  aborted (a tombstone), so a Propose that arrives late can never reserve it; on a
  committed key it answers COMMITTED.
* A ``tick`` aborts reservations whose ``expires_at`` is due ("expired").
* Decided keys are remembered (the newest ``TRANSFER_RETENTION``) for idempotent answers.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from typing import Any

from router.engine import validate as v
from router import policy
from router.engine.records import Call
from router.model import CallChanged, Outcome, RoutingError, TransferView

RESERVE = 2  # deadline kind of a reservation's expiry (ident: its key)
TRANSFER_STATES = ("transferring", "transferred")
DEFAULT_TTL_S = 10.0
MAX_TTL_S = 60.0
MAX_TRANSFER_NO = 65_535
MAX_TARGET = 256
MAX_ORIGIN = 256
TRANSFER_RETENTION = 50_000
TRANSFERABLE_CLASSES = frozenset({"standard", "repeat", "whitelist", "vip"})


def key_of(call_id: str, transfer_no: int) -> str:
    return f"{call_id}/{transfer_no}"


def parse_transfer_no(cmd: dict) -> int:
    n = cmd.get("transfer_no")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_TRANSFER_NO:
        raise v.invalid(
            "INVALID_TRANSFER_NO", f"transfer_no must be an integer 1..{MAX_TRANSFER_NO}",
            field="transfer_no",
        )  # fmt: skip
    return n


def parse_reserve(cmd: dict) -> tuple[str, int, str, float, dict]:
    """(call_id, transfer_no, origin, ttl_s, call data)"""
    cid = v.call_id(cmd)
    no = parse_transfer_no(cmd)
    origin = v.text(cmd, "origin", MAX_ORIGIN, required=True)
    channel = v.channel(cmd)
    skill = v.text(cmd, "skill", v.MAX_SKILL, required=True)
    lang = v.language(cmd)
    caller = v.text(cmd, "caller", v.MAX_CALLER)
    customer = v.text(cmd, "customer_id", v.MAX_CUSTOMER_ID)
    klass = cmd.get("priority_class")
    if not isinstance(klass, str) or klass not in TRANSFERABLE_CLASSES:
        raise v.invalid(
            "INVALID_PRIORITY_CLASS",
            "priority_class must be standard, repeat, whitelist or vip",
            field="priority_class",
        )
    offered_at = cmd.get("offered_at")
    if (
        isinstance(offered_at, bool)
        or not isinstance(offered_at, (int, float))
        or not math.isfinite(offered_at)
        or not 0 < offered_at <= v.MAX_T
    ):
        raise v.invalid("INVALID_FIELD", "offered_at must be a time in seconds", field="offered_at")
    ttl = cmd.get("ttl_s")
    if ttl is None or ttl == 0:
        ttl = DEFAULT_TTL_S
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl < 0:
        raise v.invalid("INVALID_TTL", "ttl_s must be a number of seconds >= 0", field="ttl_s")
    ttl = min(max(float(ttl), 1.0), MAX_TTL_S)
    data = {
        "channel": channel, "skill": skill, "language": lang, "caller": caller,
        "customer_id": customer, "priority_class": klass, "offered_at": float(offered_at),
        "context": v.context(cmd.get("context")),
    }  # fmt: skip
    return cid, no, origin, ttl, data


class TransferMixin:
    def _init_transfers(self) -> None:
        for s in TRANSFER_STATES:
            self._call_counts.setdefault(s, 0)
        # Target side: key -> {"state", "reason", "origin", "queue", "expires_at", "call"}
        # ("call": the call's data while reserved, None once decided).
        self._xin: dict[str, dict] = {}
        self._xin_decided: deque[str] = deque()  # decided keys, oldest first (retention)
        self._reserved: dict[str, int] = {}  # queue name -> live reservations
        # Origin side: calls the node must act on (transferring, or transferred with an
        # abandon to forward).
        self._xout: dict[str, None] = {}
        self._ops.update(
            transfer_begin=self._op_transfer_begin,
            transfer_committing=self._op_transfer_committing,
            transfer_done=self._op_transfer_done,
            transfer_abort=self._op_transfer_abort,
            transfer_forwarded=self._op_transfer_forwarded,
            transfer_reserve=self._op_transfer_reserve,
            transfer_commit=self._op_transfer_commit,
            transfer_cancel=self._op_transfer_cancel,
        )

    # -- reads --------------------------------------------------------------------------

    def transfer(self, call_id: str, transfer_no: int) -> TransferView:
        """The target's view of a key ("unknown" when it never saw it or forgot it)."""
        rec = self._xin.get(key_of(call_id, transfer_no))
        if rec is None:
            return TransferView(call_id, transfer_no, "unknown", site=self._site_name)
        return self._xview(call_id, transfer_no, rec)

    def transfers_pending(self) -> list[str]:
        """Origin side: ids of calls that are transferring, or transferred with an
        abandon not yet forwarded to the target."""
        return list(self._xout)

    # -- origin -------------------------------------------------------------------------

    def _transferring(self, cid: str, no: int) -> Call:
        call = self._call(cid)
        if call.state != "transferring":
            raise self._wrong_state(call, "resolve the transfer of", "transferring")
        if call.transfer_count != no:
            raise self._no_mismatch(call, no)
        return call

    def _no_mismatch(self, call: Call, no: int) -> RoutingError:
        return RoutingError(
            "FAILED_PRECONDITION", "TRANSFER_NO_MISMATCH",
            f"call {call.call_id} is at transfer {call.transfer_count}, not {no}",
            call_id=call.call_id, transfer_count=call.transfer_count,
        )  # fmt: skip

    def _op_transfer_begin(self, cmd: dict, now: float) -> Outcome:
        cid, no = v.call_id(cmd), parse_transfer_no(cmd)
        target = v.text(cmd, "target", MAX_TARGET, required=True)
        call = self._call(cid)
        if call.state == "transferring" and call.transfer_count == no and call.xfer_target == target:
            return Outcome(False, call.view(self._site_name))
        if call.state != "queued":
            raise self._wrong_state(call, "transfer", "queued")
        if call.priority_class not in TRANSFERABLE_CLASSES:
            raise RoutingError(
                "FAILED_PRECONDITION", "NOT_TRANSFERABLE",
                f"call {cid} of class {call.priority_class} stays at this site", call_id=cid,
            )  # fmt: skip
        if no != call.transfer_count + 1:
            raise self._no_mismatch(call, no)
        self._begin(now)
        self._dequeue(call, self._queues[call.queue])
        self._set_call_state(call, "transferring")
        call.transfer_count = no
        call.xfer_target, call.xfer_phase, call.xfer_at = target, "begun", now
        self._xout[cid] = None
        self._fx.append(CallChanged(cid))
        return self._commit(call.view(self._site_name))

    def _op_transfer_committing(self, cmd: dict, now: float) -> Outcome:
        call = self._transferring(v.call_id(cmd), parse_transfer_no(cmd))
        if call.xfer_phase == "committing":
            return Outcome(False, call.view(self._site_name))
        self._begin(now)
        call.xfer_phase = "committing"
        self._fx.append(CallChanged(call.call_id))
        return self._commit(call.view(self._site_name))

    def _op_transfer_done(self, cmd: dict, now: float) -> Outcome:
        cid, no = v.call_id(cmd), parse_transfer_no(cmd)
        call = self._call(cid)
        if call.state == "transferred" and call.transfer_count == no:
            return Outcome(False, call.view(self._site_name))
        call = self._transferring(cid, no)
        if call.xfer_phase != "committing":
            raise RoutingError(
                "FAILED_PRECONDITION", "TRANSFER_NOT_COMMITTING",
                f"transfer {no} of call {cid} was never committed", call_id=cid,
            )  # fmt: skip
        self._begin(now)
        self._set_call_state(call, "transferred")
        call.xfer_phase = "done"
        call.ended_at = now
        if call.abandon_pending != 1:
            self._xout.pop(cid, None)
        self._ended_call(call)
        self._fx.append(CallChanged(cid))
        return self._commit(call.view(self._site_name))

    def _op_transfer_abort(self, cmd: dict, now: float) -> Outcome:
        cid, no = v.call_id(cmd), parse_transfer_no(cmd)
        v.text(cmd, "reason", v.MAX_REASON)
        by_target = cmd.get("by_target") or False
        if not isinstance(by_target, bool):
            raise v.invalid("INVALID_FIELD", "by_target must be a boolean", field="by_target")
        call = self._call(cid)
        if call.transfer_count == no and call.xfer_phase == "aborted":
            return Outcome(False, call.view(self._site_name))
        call = self._transferring(cid, no)
        if call.xfer_phase == "committing" and not by_target:
            raise RoutingError(
                "FAILED_PRECONDITION", "TRANSFER_COMMITTING",
                f"transfer {no} of call {cid} was sent to commit: only the target decides",
                call_id=cid,
            )  # fmt: skip
        self._begin(now)
        call.xfer_phase = "aborted"
        self._xout.pop(cid, None)
        if call.abandon_pending:
            self._end_abandoned(call, now)
        else:
            self._enqueue(call, self._queues[call.queue])  # same handle, same key: its old place
            self._dispatch()
        self._fx.append(CallChanged(cid))
        return self._commit(call.view(self._site_name))

    def _end_abandoned(self, call: Call, now: float) -> None:
        """A call that came back (an aborted transfer, a partner's hand-back) while its
        caller had hung up: it ends here, abandoned, counted in its queue."""
        q = self._queues[call.queue]
        call.abandon_pending = 2
        self._xout.pop(call.call_id, None)
        q.abandoned += 1
        q.add_finished(now, False, now - call.queued_at, self._sl_window_s)
        self._set_call_state(call, "abandoned")
        call.ended_at = now
        self._ended_call(call)

    def _op_transfer_forwarded(self, cmd: dict, now: float) -> Outcome:
        call = self._call(v.call_id(cmd))
        if call.state != "transferred":
            raise self._wrong_state(call, "forward an abandon of", "transferred")
        if call.abandon_pending != 1:
            return Outcome(False, call.view(self._site_name))
        self._begin(now)
        call.abandon_pending = 2
        self._xout.pop(call.call_id, None)
        self._fx.append(CallChanged(call.call_id))
        return self._commit(call.view(self._site_name))

    def _abandon_transferring(self, call: Call, reason: str, now: float) -> Outcome:
        """``abandon`` of a transferring or transferred call (see the module doc)."""
        if call.abandon_pending:
            return Outcome(False, call.view(self._site_name))
        self._begin(now)
        call.abandon_pending = 1
        call.abandon_reason = reason
        self._xout[call.call_id] = None
        self._fx.append(CallChanged(call.call_id))
        return self._commit(call.view(self._site_name))

    # -- target -------------------------------------------------------------------------

    def _xview(self, cid: str, no: int, rec: dict) -> TransferView:
        return TransferView(
            call_id=cid, transfer_no=no, state=rec["state"], reason=rec["reason"],
            origin=rec["origin"], queue=rec["queue"], expires_at=rec["expires_at"],
            site=self._site_name,
        )  # fmt: skip

    def _decide(self, key: str, rec: dict, state: str, reason: str) -> None:
        if rec["state"] == "reserved":
            self._reserved[rec["queue"]] -= 1
        rec["state"], rec["reason"], rec["call"] = state, reason, None
        self._xin_decided.append(key)
        while len(self._xin_decided) > TRANSFER_RETENTION:
            self._xin.pop(self._xin_decided.popleft(), None)

    def _live_here(self, cid: str) -> bool:
        c = self._calls.get(cid)
        return c is not None and c.state != "transferred"

    def _op_transfer_reserve(self, cmd: dict, now: float) -> Outcome:
        cid, no, origin, ttl, data = parse_reserve(cmd)
        key = key_of(cid, no)
        rec = self._xin.get(key)
        if rec is not None:
            if rec["state"] == "reserved":
                if now >= rec["expires_at"]:
                    self._begin(now)
                    self._decide(key, rec, "aborted", "expired")
                    return self._commit(self._xview(cid, no, rec))
                if rec["call"] != data or rec["origin"] != origin:
                    raise RoutingError(
                        "ALREADY_EXISTS", "TRANSFER_CONFLICT",
                        f"transfer {no} of call {cid} was proposed with different content",
                        call_id=cid,
                    )  # fmt: skip
            return Outcome(False, self._xview(cid, no, rec))
        old = self._calls.get(cid)
        if old is not None and not (old.state == "transferred" and old.transfer_count < no):
            raise RoutingError(
                "ALREADY_EXISTS", "CALL_ID_CONFLICT",
                f"call {cid} is known here ({old.state})", call_id=cid, state=old.state,
            )  # fmt: skip
        skill, channel, lang = data["skill"], data["channel"], data["language"]
        q = self._route.get((skill, channel, lang or None)) or self._route.get((skill, channel, None))
        if q is None:
            raise RoutingError(
                "NOT_FOUND", "UNKNOWN_SKILL",
                f"no queue serves skill {skill!r} on {channel}" + (f" in {lang!r}" if lang else ""),
                skill=skill, channel=channel, language=lang,
            )  # fmt: skip
        if len(q.pq) + self._reserved.get(q.name, 0) >= q.max_length:
            raise RoutingError(
                "FAILED_PRECONDITION", "QUEUE_FULL",
                f"queue {q.name} is full ({q.max_length} calls)", queue=q.name,
            )  # fmt: skip
        self._begin(now)
        rec = {
            "state": "reserved", "reason": "", "origin": origin, "queue": q.name,
            "expires_at": now + ttl, "call": data,
        }  # fmt: skip
        self._xin[key] = rec
        self._reserved[q.name] = self._reserved.get(q.name, 0) + 1
        heapq.heappush(self._deadlines, (rec["expires_at"], RESERVE, key))
        return self._commit(self._xview(cid, no, rec))

    def _op_transfer_commit(self, cmd: dict, now: float) -> Outcome:
        cid, no = v.call_id(cmd), parse_transfer_no(cmd)
        key = key_of(cid, no)
        rec = self._xin.get(key)
        if rec is None:
            raise RoutingError(
                "NOT_FOUND", "TRANSFER_NOT_FOUND",
                f"no transfer {no} of call {cid} here (never reserved, or long forgotten)",
                call_id=cid,
            )  # fmt: skip
        if rec["state"] != "reserved":
            return Outcome(False, self._xview(cid, no, rec))
        self._begin(now)
        if now >= rec["expires_at"]:
            self._decide(key, rec, "aborted", "expired")
        elif self._live_here(cid):
            self._decide(key, rec, "aborted", "call_id_conflict")
        else:
            self._queue_transferred(cid, no, rec, now)
            self._decide(key, rec, "committed", "")
            self._dispatch()
        return self._commit(self._xview(cid, no, rec))

    def _queue_transferred(self, cid: str, no: int, rec: dict, now: float) -> None:
        d = rec["call"]
        old = self._calls.pop(cid, None)
        if old is not None:  # it left this site earlier and comes back
            self._call_counts[old.state] -= 1
            try:
                self._ended.remove(cid)
            except ValueError:
                pass
            self._xout.pop(cid, None)
        handle = self._next_handle
        self._next_handle += 1
        ctx = d["context"]
        ctx = {
            "ivr_path": list(ctx["ivr_path"]),
            "bot_transcript": ctx["bot_transcript"],
            "attributes": dict(ctx["attributes"]),
        }
        klass = d["priority_class"]
        call = Call.offered(
            cid, d["channel"], d["skill"], d["language"], d["caller"], d["customer_id"],
            klass, ctx, d["offered_at"], handle,
        )  # fmt: skip
        call.priority_class = klass
        call.transfer_count = no
        call.xfer_origin = rec["origin"]
        self._calls[cid] = call
        self._remember(call, now)
        q = self._queues[rec["queue"]]
        call.queued_at = now
        call.key = policy.priority_key(call.offered_at, self._hs[klass])
        q.offered += 1
        self._enqueue(call, q)
        call.decision = f"queued: {q.name} ({klass}, transfer {no} from {rec['origin']})"
        self._fx.append(CallChanged(cid))

    def _op_transfer_cancel(self, cmd: dict, now: float) -> Outcome:
        cid, no = v.call_id(cmd), parse_transfer_no(cmd)
        origin = v.text(cmd, "origin", MAX_ORIGIN)
        key = key_of(cid, no)
        rec = self._xin.get(key)
        if rec is not None and rec["state"] != "reserved":
            return Outcome(False, self._xview(cid, no, rec))
        self._begin(now)
        if rec is None:  # a tombstone: a Propose arriving late can never reserve this key
            rec = {"state": "aborted", "reason": "", "origin": origin, "queue": "", "expires_at": now, "call": None}
            self._xin[key] = rec
            self._decide(key, rec, "aborted", "aborted_by_origin")
        else:
            self._decide(key, rec, "aborted", "expired" if now >= rec["expires_at"] else "aborted_by_origin")
        return self._commit(self._xview(cid, no, rec))

    # -- deadlines, snapshot ------------------------------------------------------------

    def _deadline_live(self, entry: tuple[float, int, str]) -> bool:
        when, kind, ident = entry
        if kind == RESERVE:
            rec = self._xin.get(ident)
            return rec is not None and rec["state"] == "reserved" and rec["expires_at"] == when
        return super()._deadline_live(entry)  # type: ignore[misc]

    def _expire_reservation(self, key: str) -> None:
        rec = self._xin[key]
        self._decide(key, rec, "aborted", "expired")

    def _dump_transfers(self) -> dict:
        return {
            "records": {k: dict(r) for k, r in self._xin.items()},
            "decided": list(self._xin_decided),
        }

    def _load_transfers(self, d: Any) -> None:
        """Restore (called by ``restore`` after the calls, before deadlines are checked)."""
        for c in self._calls.values():
            if c.state == "transferring" or (c.state == "transferred" and c.abandon_pending == 1):
                self._xout[c.call_id] = None
        if not d:
            return
        for k, r in d["records"].items():
            r = dict(r)
            self._xin[k] = r
            if r["state"] == "reserved":
                self._reserved[r["queue"]] = self._reserved.get(r["queue"], 0) + 1
                self._deadlines.append((r["expires_at"], RESERVE, k))
        self._xin_decided = deque(d["decided"])
