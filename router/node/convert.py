"""Proto <-> engine conversions: requests become command dicts, views become messages.

Enums travel to the engine as their lower-case names without the prefix
(``CHANNEL_VOICE`` -> ``"voice"``); ``*_UNSPECIFIED`` becomes ``""`` and a number the
proto does not know (proto3 enums are open) becomes ``"unknown_<n>"``, so the engine —
not this module — decides what is valid and answers with its documented reason.
Nothing here validates business rules.
"""

from __future__ import annotations

import math
from typing import Any

from router import model
from router.v1 import admin_pb2, agents_pb2, routing_pb2, types_pb2


def _tables(enum_type: Any, prefix: str) -> tuple[dict[int, str], dict[str, int]]:
    to_str = {}
    for v in enum_type.DESCRIPTOR.values:
        to_str[v.number] = "" if v.name.endswith("_UNSPECIFIED") else v.name[len(prefix):].lower()
    return to_str, {s: n for n, s in to_str.items() if s}


_CHANNEL, _CHANNEL_NUM = _tables(types_pb2.Channel, "CHANNEL_")
_CALL_STATE, _CALL_STATE_NUM = _tables(types_pb2.CallState, "CALL_STATE_")
_PRIORITY, _PRIORITY_NUM = _tables(types_pb2.PriorityClass, "PRIORITY_CLASS_")
_AGENT_STATE, _AGENT_STATE_NUM = _tables(types_pb2.AgentState, "AGENT_STATE_")


def _to_str(table: dict[int, str], value: int) -> str:
    s = table.get(value)
    return f"unknown_{value}" if s is None else s


def channel_str(v: int) -> str:
    return _to_str(_CHANNEL, v)


def channel_enum(s: str) -> int:
    return _CHANNEL_NUM.get(s, 0)


def call_state_str(v: int) -> str:
    return _to_str(_CALL_STATE, v)


def call_state_enum(s: str) -> int:
    return _CALL_STATE_NUM.get(s, 0)


def priority_str(v: int) -> str:
    return _to_str(_PRIORITY, v)


def priority_enum(s: str) -> int:
    return _PRIORITY_NUM.get(s, 0)


def agent_state_str(v: int) -> str:
    return _to_str(_AGENT_STATE, v)


def agent_state_enum(s: str) -> int:
    return _AGENT_STATE_NUM.get(s, 0)


# --- requests -> commands ----------------------------------------------------------


def offer_cmd(req: routing_pb2.OfferCallRequest, t: float) -> dict:
    ctx = req.context
    return {
        "op": "offer",
        "t": t,
        "call_id": req.call_id,
        "channel": channel_str(req.channel),
        "skill": req.skill,
        "language": req.language,
        "caller": req.caller,
        "customer_id": req.customer_id,
        "priority_class": priority_str(req.priority_class),
        "context": {
            "ivr_path": list(ctx.ivr_path),
            "bot_transcript": ctx.bot_transcript,
            "attributes": dict(ctx.attributes),
        },
    }


def abandon_cmd(req: routing_pb2.AbandonCallRequest, t: float) -> dict:
    return {"op": "abandon", "t": t, "call_id": req.call_id, "reason": req.reason}


def complete_cmd(req: routing_pb2.CompleteCallRequest, t: float) -> dict:
    d = req.disposition
    return {
        "op": "complete",
        "t": t,
        "call_id": req.call_id,
        "resolved": d.resolved,
        "csat": d.csat,
        "wrap_up_code": d.wrap_up_code,
    }


def stream_complete_cmd(msg: agents_pb2.Complete) -> dict:
    """A complete command from a Complete on an agent's stream (the node adds ``t``)."""
    d = msg.disposition
    return {
        "op": "complete",
        "call_id": msg.call_id,
        "resolved": d.resolved,
        "csat": d.csat,
        "wrap_up_code": d.wrap_up_code,
    }


def set_state_cmd(req: agents_pb2.SetStateRequest, t: float) -> dict:
    timeout = req.timeout_s
    if not math.isfinite(timeout):
        # The journal takes strict JSON only (no NaN/inf); -1 is refused by the engine
        # exactly where NaN/inf would be (wrap_up) and ignored where they would be.
        timeout = -1.0
    return {
        "op": "set_state",
        "t": t,
        "agent_id": req.agent_id,
        "state": agent_state_str(req.state),
        "reason": req.reason,
        "timeout_s": timeout,
    }


# --- views -> messages ---------------------------------------------------------------


def context_msg(ctx: dict | None) -> types_pb2.CallContext:
    ctx = ctx or {}
    return types_pb2.CallContext(
        ivr_path=list(ctx.get("ivr_path") or ()),
        bot_transcript=ctx.get("bot_transcript") or "",
        attributes=dict(ctx.get("attributes") or {}),
    )


def call_msg(v: model.CallView) -> types_pb2.Call:
    return types_pb2.Call(
        call_id=v.call_id,
        state=call_state_enum(v.state),
        channel=channel_enum(v.channel),
        skill=v.skill,
        language=v.language or "",
        queue=v.queue or "",
        site=v.site or "",
        priority_class=priority_enum(v.priority_class),
        caller=v.caller or "",
        customer_id=v.customer_id or "",
        offered_at=v.offered_at,
        queued_at=v.queued_at,
        answered_at=v.answered_at,
        ended_at=v.ended_at,
        agent_id=v.agent_id or "",
        transfer_count=v.transfer_count,
        disposition=types_pb2.Disposition(
            resolved=v.resolved, csat=v.csat, wrap_up_code=v.wrap_up_code or ""
        ),
        context=context_msg(v.context),
        reject_reason=v.reject_reason or "",
        abandon_reason=v.abandon_reason or "",
        transfer_target=(v.transfer_target or "") if v.state in _HANDED_OVER else "",
        transfer_origin=v.transfer_origin or "",
    )


_HANDED_OVER = frozenset({"transferring", "transferred"})


def agent_msg(v: model.AgentView) -> agents_pb2.Agent:
    return agents_pb2.Agent(
        agent_id=v.agent_id,
        state=agent_state_enum(v.state),
        reason=v.reason or "",
        skills=[
            agents_pb2.SkillLevel(skill=s, proficiency=p) for s, p in sorted(v.skills.items())
        ],
        languages=list(v.languages),
        capacity=[
            agents_pb2.ChannelCapacity(channel=channel_enum(str(getattr(ch, "value", ch))), capacity=n)
            for ch, n in sorted(v.capacity.items(), key=lambda kv: str(kv[0]))
        ],
        call_ids=list(v.call_ids),
        state_since=v.state_since,
        wrap_up_until=v.wrap_up_until,
    )


def past_contact_msg(p: model.PastContact) -> types_pb2.PastContact:
    return types_pb2.PastContact(
        call_id=p.call_id,
        offered_at=p.offered_at,
        skill=p.skill,
        outcome=call_state_enum(p.outcome),
        csat=p.csat,
    )


def screen_pop_msg(call: model.CallView, history: list[model.PastContact]) -> agents_pb2.ScreenPop:
    return agents_pb2.ScreenPop(
        caller=call.caller or "",
        customer_id=call.customer_id or "",
        priority_class=priority_enum(call.priority_class),
        history=[past_contact_msg(p) for p in history],
    )


def queue_status_msg(q: model.QueueView) -> admin_pb2.QueueStatus:
    return admin_pb2.QueueStatus(
        name=q.name,
        skill=q.skill,
        channel=channel_enum(q.channel),
        language=q.language or "",
        length=q.length,
        expected_wait_s=q.expected_wait_s,
        agents_ready=q.agents_ready,
        agents_staffed=q.agents_staffed,
        service_level=q.service_level,
        offered=q.offered,
        answered=q.answered,
        abandoned=q.abandoned,
        oldest_wait_s=q.oldest_wait_s,
    )


def estimate_msg(q: model.QueueView, announcement: str = "") -> routing_pb2.EstimateWaitResponse:
    return routing_pb2.EstimateWaitResponse(
        announcement=announcement,
        queue=q.name,
        expected_wait_s=q.expected_wait_s,
        queue_length=q.length,
        agents_ready=q.agents_ready,
        agents_staffed=q.agents_staffed,
        service_level=q.service_level,
    )
