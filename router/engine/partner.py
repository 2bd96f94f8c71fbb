"""Calls handed to a BPO partner's own ACD (part of :class:`router.engine.Engine`).

The origin node is the single decider of a partner offer (``proto/router/v1/partner.proto``):
it begins an ordinary transfer with target ``partner:<name>`` (``transfer_begin``: the call
leaves dispatch and keeps its place), offers the call on the partner gateway's stream, and
on the gateway's Accept records the decision here. A decline, a timeout or a lost gateway
is an ordinary ``transfer_abort`` (the call is back in its place, original arrival and
class). After the decision the partner owns the call until it reports an outcome or hands
the call back.

==================== ==================================================================
op                   fields besides ``op`` and ``t``
==================== ==================================================================
partner_assign       call_id, transfer_no, partner, agent, value (low | standard),
                     wait_s (at the offer)
partner_outcome      call_id, partner, answered_at, talk_s, wrap_s, disposition,
                     resolved, csat, transferred_back
partner_handback     call_id, partner, reason
==================== ==================================================================

* ``partner_assign``: a call "transferring" to ``partner:<partner>`` (transfer
  ``transfer_no``, not yet decided) becomes "transferred" there, owned by the partner;
  the record keeps the partner's ``agent`` (its agent id or label), and the offer's
  value tier and wait (an Assign sent again says what the first one said). Repeating it
  answers the call unchanged. A transfer to a node, another partner or an older
  attempt: FAILED_PRECONDITION WRONG_STATE / TRANSFER_NO_MISMATCH.
* ``partner_outcome``: the partner's report of a call it owns. The call takes
  ``answered_at`` (0: never answered), ``resolved``, ``csat`` and the disposition as its
  wrap-up code, and ends here (retention starts). Idempotent: the same report again
  changes nothing; a different one is ALREADY_EXISTS DISPOSITION_CONFLICT; after a hand
  back FAILED_PRECONDITION WRONG_STATE. A call this partner does not own (unknown,
  another partner's, never assigned): NOT_FOUND CALL_NOT_FOUND — the answer never tells
  a partner whether the call exists for someone else.
* ``partner_handback``: the partner gives the call back: it is "queued" again in its
  queue with its original key (arrival time and class: its old place, exactly as after
  an aborted transfer) and ``transfer_count`` unchanged (a later transfer takes the next
  number). Idempotent; after an outcome FAILED_PRECONDITION WRONG_STATE.

A call the partner owns stays out of the ended-call retention until its outcome is
reported (an hours-long BPO call must not be forgotten by a busy origin).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from router.engine import validate as v
from router.engine.records import Call
from router.engine.transfer import parse_transfer_no
from router.model import CallChanged, Outcome, RoutingError

PARTNER_PREFIX = "partner:"
PARTNER_RETENTION = 50_000  # decided partner records kept for idempotent answers
MAX_PARTNER = 64
MAX_AGENT = 64
MAX_SECONDS = 7 * 86400.0


def partner_target(partner: str) -> str:
    """The transfer target that names a partner's gateway (never a host:port)."""
    return PARTNER_PREFIX + partner


def partner_of_target(target: str) -> str | None:
    return target[len(PARTNER_PREFIX):] if target.startswith(PARTNER_PREFIX) else None


def _seconds(cmd: dict, name: str, *, unix: bool = False) -> float:
    x = cmd.get(name, 0.0)
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
        raise v.invalid("INVALID_FIELD", f"{name} must be a finite number >= 0", field=name)
    if not unix and x > MAX_SECONDS:
        raise v.invalid("INVALID_FIELD", f"{name} must be at most {MAX_SECONDS:.0f} s", field=name)
    return float(x)


def parse_outcome(cmd: dict) -> dict:
    """The outcome fields of a ``partner_outcome`` command, validated."""
    csat = cmd.get("csat", 0)
    if isinstance(csat, bool) or not isinstance(csat, int) or not 0 <= csat <= 5:
        raise v.invalid("INVALID_FIELD", "csat must be 0 (none) or 1..5", field="csat")
    out = {
        "answered_at": _seconds(cmd, "answered_at", unix=True),
        "talk_s": _seconds(cmd, "talk_s"),
        "wrap_s": _seconds(cmd, "wrap_s"),
        "disposition": v.text(cmd, "disposition", v.MAX_REASON),
        "csat": csat,
    }
    for name in ("resolved", "transferred_back"):
        b = cmd.get(name, False)
        if not isinstance(b, bool):
            raise v.invalid("INVALID_FIELD", f"{name} must be a boolean", field=name)
        out[name] = b
    return out


class PartnerMixin:
    def _init_partner(self) -> None:
        # call id -> {"partner", "no", "agent", "assigned_at", "outcome" (dict | None),
        # "handed_back" (bool), "reason"}
        self._prec: dict[str, dict] = {}
        self._prec_done: deque[str] = deque()  # decided records, oldest first (retention)
        self._ops.update(
            partner_assign=self._op_partner_assign,
            partner_outcome=self._op_partner_outcome,
            partner_handback=self._op_partner_handback,
        )

    # -- reads --------------------------------------------------------------------------

    def partner_record(self, call_id: str) -> dict | None:
        """A copy of the partner record of a call (None: never assigned to a partner)."""
        rec = self._prec.get(call_id)
        return None if rec is None else {**rec, "outcome": dict(rec["outcome"]) if rec["outcome"] else None}

    def partner_owned(self, partner: str) -> list[str]:
        """Ids of calls ``partner`` owns and has not reported or handed back, oldest
        assignment first (what a reconnecting gateway is told again)."""
        return [
            cid for cid, r in self._prec.items()
            if r["partner"] == partner and r["outcome"] is None and not r["handed_back"]
        ]  # fmt: skip

    # -- commands -----------------------------------------------------------------------

    def _owned_by(self, cmd: dict) -> tuple[Call, dict]:
        cid = v.call_id(cmd)
        partner = v.text(cmd, "partner", MAX_PARTNER, required=True)
        rec = self._prec.get(cid)
        call = self._calls.get(cid)
        if rec is None or call is None or rec["partner"] != partner:
            raise RoutingError(
                "NOT_FOUND", "CALL_NOT_FOUND", f"no call {cid} was assigned to partner {partner}", call_id=cid
            )  # fmt: skip
        return call, rec

    def _op_partner_assign(self, cmd: dict, now: float) -> Outcome:
        cid, no = v.call_id(cmd), parse_transfer_no(cmd)
        partner = v.text(cmd, "partner", MAX_PARTNER, required=True)
        agent = v.text(cmd, "agent", MAX_AGENT)
        value = cmd.get("value", "standard")
        if value not in ("low", "standard"):
            raise v.invalid("INVALID_FIELD", "value must be low or standard", field="value")
        wait_s = _seconds(cmd, "wait_s", unix=True)
        call = self._call(cid)
        rec = self._prec.get(cid)
        if call.state == "transferred" and rec is not None and rec["no"] == no and rec["partner"] == partner:
            return Outcome(False, call.view(self._site_name))
        if call.state != "transferring" or call.xfer_target != partner_target(partner):
            raise self._wrong_state(call, f"assign to partner {partner}", f"transferring to {partner}")
        if call.transfer_count != no:
            raise self._no_mismatch(call, no)
        if call.xfer_phase != "begun":
            raise RoutingError(
                "FAILED_PRECONDITION", "WRONG_STATE",
                f"transfer {no} of call {cid} is {call.xfer_phase}", call_id=cid, state=call.state,
            )  # fmt: skip
        self._begin(now)
        self._set_call_state(call, "transferred")
        call.xfer_phase = "done"
        call.ended_at = now
        if call.abandon_pending != 1:
            self._xout.pop(cid, None)
        if cid in self._prec:  # an earlier attempt that was handed back
            try:
                self._prec_done.remove(cid)
            except ValueError:
                pass
        self._prec[cid] = {
            "partner": partner, "no": no, "agent": agent, "assigned_at": now, "value": value, "wait_s": wait_s,
            "outcome": None, "handed_back": False, "reason": "",
        }  # fmt: skip
        self._fx.append(CallChanged(cid))
        return self._commit(call.view(self._site_name))

    def _op_partner_outcome(self, cmd: dict, now: float) -> Outcome:
        call, rec = self._owned_by(cmd)
        out = parse_outcome(cmd)
        if rec["outcome"] is not None:
            if rec["outcome"] == out:
                return Outcome(False, call.view(self._site_name))
            raise RoutingError(
                "ALREADY_EXISTS", "DISPOSITION_CONFLICT",
                f"another outcome was reported for call {call.call_id}", call_id=call.call_id,
            )  # fmt: skip
        if rec["handed_back"]:
            raise self._wrong_state(call, "report the outcome of", "with the partner (it was handed back)")
        self._begin(now)
        rec["outcome"] = out
        call.answered_at = out["answered_at"]
        call.resolved, call.csat, call.wrap_up_code = out["resolved"], out["csat"], out["disposition"]
        if out["answered_at"] > 0:
            call.ended_at = max(out["answered_at"] + out["talk_s"], rec["assigned_at"])
        self._retire_partner(call.call_id)
        self._ended_call(call)
        self._fx.append(CallChanged(call.call_id))
        return self._commit(call.view(self._site_name))

    def _op_partner_handback(self, cmd: dict, now: float) -> Outcome:
        call, rec = self._owned_by(cmd)
        reason = v.text(cmd, "reason", v.MAX_REASON)
        if rec["handed_back"]:
            return Outcome(False, call.view(self._site_name))
        if rec["outcome"] is not None:
            raise self._wrong_state(call, "hand back", "with the partner (its outcome was reported)")
        self._begin(now)
        rec["handed_back"], rec["reason"] = True, reason
        self._retire_partner(call.call_id)
        if call.abandon_pending:  # the caller hung up while the partner had the call
            self._end_abandoned(call, now)
        else:
            self._set_call_state(call, "queued")
            call.xfer_phase, call.ended_at = "handed_back", 0.0
            call.decision = f"queued: {call.queue} (handed back by {rec['partner']}: {reason or 'no reason'})"
            self._enqueue(call, self._queues[call.queue])  # its handle and key: its old place
            self._dispatch()
        self._fx.append(CallChanged(call.call_id))
        return self._commit(call.view(self._site_name))

    def _partner_abandon(self, call: Call) -> Outcome | None:
        """``abandon`` of a call a partner reported on: it ended there. Answered:
        FAILED_PRECONDITION CALL_ANSWERED; not answered: the call as it is (nothing to
        do). None when the partner still has the call (the abandon is recorded and passed
        on to its gateway as for any transferred call)."""
        rec = self._prec.get(call.call_id)
        if rec is None or rec["outcome"] is None or call.state != "transferred":
            return None
        if rec["outcome"]["answered_at"] > 0:
            raise RoutingError(
                "FAILED_PRECONDITION", "CALL_ANSWERED",
                f"call {call.call_id} was answered by partner {rec['partner']}: not abandoned",
                call_id=call.call_id, state="completed",
            )  # fmt: skip
        return Outcome(False, call.view(self._site_name))

    def _retire_partner(self, cid: str) -> None:
        self._prec_done.append(cid)
        while len(self._prec_done) > PARTNER_RETENTION:
            old = self._prec_done.popleft()
            r = self._prec.get(old)
            if r is not None and (r["outcome"] is not None or r["handed_back"]):
                del self._prec[old]

    # -- snapshot -----------------------------------------------------------------------

    def _dump_partner(self) -> dict:
        return {"records": {cid: dict(r) for cid, r in self._prec.items()}, "done": list(self._prec_done)}

    def _load_partner(self, d: Any) -> None:
        if not d:
            return
        self._prec = {cid: dict(r) for cid, r in d["records"].items()}
        self._prec_done = deque(d["done"])
