"""Wire-level checks of engine commands (part of :mod:`router.engine`).

The node passes request fields straight through, and the journal replays whatever was
accepted, so the engine checks every field itself: types, lengths and formats. Each
parser returns the normalized fields or raises :class:`RoutingError` (always
INVALID_ARGUMENT here); nothing is mutated. Limits follow ``proto/router/v1``.

Reasons beyond the ones listed in the protos (a well-formed gRPC request never gets
them): INVALID_COMMAND (not a dict, unknown op, missing or bad ``t``), INVALID_FIELD (a
field of the wrong type, an unknown context key) and INVALID_LANGUAGE (not "" or two
lower-case letters).
"""

from __future__ import annotations

import math
import re
from typing import Any

from router.model import RoutingError
from router.policy import DECLARABLE_CLASSES

CHANNEL_ORDER = ("voice", "chat", "email", "social")
CHANNELS = frozenset(CHANNEL_ORDER)
AGENT_STATES = frozenset({"ready", "not_ready", "wrap_up"})

MAX_CALL_ID = 64
MAX_CALLER = 32
MAX_CUSTOMER_ID = 64
MAX_SKILL = 64
MAX_AGENT_ID = 64
MAX_ASSIGNMENT_ID = 96
MAX_REASON = 64
MAX_IVR_ENTRIES = 32
MAX_IVR_ENTRY = 64
MAX_TRANSCRIPT_BYTES = 16 * 1024
MAX_ATTRIBUTES = 32
MAX_ATTR_KEY = 64
MAX_ATTR_VALUE = 256
MAX_WRAP_UP_TIMEOUT = 3600.0
#: Command times are Unix seconds (or simulator seconds from 0); beyond this is a bug.
MAX_T = 1e12

_CALL_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_LANGUAGE = re.compile(r"[a-z]{2}")
_CONTEXT_KEYS = frozenset({"ivr_path", "bot_transcript", "attributes"})


def invalid(reason: str, message: str, **metadata: Any) -> RoutingError:
    return RoutingError("INVALID_ARGUMENT", reason, message, **metadata)


def parse_time(cmd: dict) -> float:
    t = cmd.get("t")
    if t is None:
        raise invalid("INVALID_COMMAND", "command has no time 't'", field="t")
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise invalid("INVALID_COMMAND", "'t' must be a number of seconds", field="t")
    if not (0 <= t <= MAX_T) or (isinstance(t, float) and not math.isfinite(t)):
        raise invalid("INVALID_COMMAND", f"'t' must be within 0..{MAX_T:g}", field="t")
    return float(t)


def text(cmd: dict, name: str, maxlen: int, *, required: bool = False) -> str:
    """A string field; absent or None reads as ""."""
    v = cmd.get(name)
    if v is None:
        v = ""
    elif not isinstance(v, str):
        raise invalid("INVALID_FIELD", f"{name} must be a string", field=name)
    if not v and required:
        raise invalid("MISSING_FIELD", f"{name} is required", field=name)
    if len(v) > maxlen:
        raise invalid("FIELD_TOO_LONG", f"{name} is longer than {maxlen} chars", field=name)
    return v


def call_id(cmd: dict) -> str:
    v = cmd.get("call_id")
    if v is None or v == "":
        raise invalid("MISSING_FIELD", "call_id is required", field="call_id")
    if not isinstance(v, str) or not _CALL_ID.fullmatch(v):
        raise invalid(
            "INVALID_CALL_ID", "call_id must be 1..64 chars of [A-Za-z0-9._:-]", field="call_id"
        )
    return v


def channel(cmd: dict) -> str:
    v = cmd.get("channel")
    if v is None or v == "":
        raise invalid("MISSING_FIELD", "channel is required", field="channel")
    if not isinstance(v, str) or v not in CHANNELS:
        raise invalid(
            "INVALID_CHANNEL", "channel must be voice, chat, email or social", field="channel"
        )
    return v


def language(cmd: dict) -> str:
    v = text(cmd, "language", 2)
    if v and not _LANGUAGE.fullmatch(v):
        raise invalid(
            "INVALID_LANGUAGE", "language must be '' or two lower-case letters", field="language"
        )
    return v


def context(v: object) -> dict:
    """Normalized context: always the three keys, copied (the caller keeps its own)."""
    if v is None:
        return {"ivr_path": [], "bot_transcript": "", "attributes": {}}
    if not isinstance(v, dict):
        raise invalid("INVALID_FIELD", "context must be a mapping", field="context")
    for k in v:
        if k not in _CONTEXT_KEYS:
            raise invalid("INVALID_FIELD", f"unknown context field {k!r}", field="context")
    ivr = v.get("ivr_path")
    if ivr is None:
        ivr = []
    if not isinstance(ivr, (list, tuple)):
        raise invalid("INVALID_FIELD", "context.ivr_path must be a list", field="context.ivr_path")
    if len(ivr) > MAX_IVR_ENTRIES:
        raise invalid(
            "TOO_MANY_ENTRIES",
            f"context.ivr_path has more than {MAX_IVR_ENTRIES} entries",
            field="context.ivr_path",
        )
    for step in ivr:
        if not isinstance(step, str):
            raise invalid(
                "INVALID_FIELD", "context.ivr_path entries must be strings", field="context.ivr_path"
            )
        if len(step) > MAX_IVR_ENTRY:
            raise invalid(
                "FIELD_TOO_LONG",
                f"a context.ivr_path entry is longer than {MAX_IVR_ENTRY} chars",
                field="context.ivr_path",
            )
    bot = v.get("bot_transcript")
    if bot is None:
        bot = ""
    if not isinstance(bot, str):
        raise invalid(
            "INVALID_FIELD", "context.bot_transcript must be a string", field="context.bot_transcript"
        )
    # UTF-8 takes at most 4 bytes a char: encode only when it could be over.
    if len(bot) * 4 > MAX_TRANSCRIPT_BYTES and len(
        bot.encode("utf-8", "surrogatepass")
    ) > MAX_TRANSCRIPT_BYTES:
        raise invalid(
            "FIELD_TOO_LONG",
            "context.bot_transcript is longer than 16 KiB",
            field="context.bot_transcript",
        )
    attrs = v.get("attributes")
    if attrs is None:
        attrs = {}
    if not isinstance(attrs, dict):
        raise invalid(
            "INVALID_FIELD", "context.attributes must be a mapping", field="context.attributes"
        )
    if len(attrs) > MAX_ATTRIBUTES:
        raise invalid(
            "TOO_MANY_ENTRIES",
            f"context.attributes has more than {MAX_ATTRIBUTES} entries",
            field="context.attributes",
        )
    for key, val in attrs.items():
        if not isinstance(key, str) or not isinstance(val, str):
            raise invalid(
                "INVALID_FIELD",
                "context.attributes keys and values must be strings",
                field="context.attributes",
            )
        if len(key) > MAX_ATTR_KEY or len(val) > MAX_ATTR_VALUE:
            raise invalid(
                "FIELD_TOO_LONG",
                f"context.attributes keys are <= {MAX_ATTR_KEY} and values <= "
                f"{MAX_ATTR_VALUE} chars",
                field="context.attributes",
            )
    return {"ivr_path": list(ivr), "bot_transcript": bot, "attributes": dict(attrs)}


def offer(cmd: dict) -> tuple[str, str, str, str, str, str, str, dict]:
    """(call_id, channel, skill, language, caller, customer_id, priority_class, context)"""
    cid = call_id(cmd)
    ch = channel(cmd)
    skill = text(cmd, "skill", MAX_SKILL, required=True)
    lang = language(cmd)
    caller = text(cmd, "caller", MAX_CALLER)
    customer = text(cmd, "customer_id", MAX_CUSTOMER_ID)
    pc = cmd.get("priority_class")
    if pc is None:
        pc = ""
    if not isinstance(pc, str) or pc not in DECLARABLE_CLASSES:
        raise invalid(
            "INVALID_PRIORITY_CLASS",
            "priority_class must be '', standard, repeat, whitelist or vip",
            field="priority_class",
        )
    return cid, ch, skill, lang, caller, customer, pc, context(cmd.get("context"))


def history_repeat(cmd: dict) -> bool:
    """The offer's optional ``history_repeat`` flag: the node found a contact of the
    caller within the repeat window in the history (journaled: replays need no history)."""
    hr = cmd.get("history_repeat")
    if hr is None:
        return False
    if not isinstance(hr, bool):
        raise invalid("INVALID_FIELD", "history_repeat must be a boolean", field="history_repeat")
    return hr


def complete(cmd: dict) -> tuple[str, bool, int, str]:
    """(call_id, resolved, csat, wrap_up_code)"""
    cid = call_id(cmd)
    resolved = cmd.get("resolved")
    if resolved is None:
        resolved = False
    if not isinstance(resolved, bool):
        raise invalid("INVALID_FIELD", "resolved must be a boolean", field="resolved")
    csat = cmd.get("csat")
    if csat is None:
        csat = 0
    if isinstance(csat, bool) or not isinstance(csat, int) or not 0 <= csat <= 5:
        raise invalid("INVALID_CSAT", "csat must be an integer 0..5", field="csat")
    code = text(cmd, "wrap_up_code", MAX_REASON)
    return cid, resolved, csat, code


def agent_id(cmd: dict) -> str:
    return text(cmd, "agent_id", MAX_AGENT_ID, required=True)


def assignment_id(cmd: dict) -> str:
    return text(cmd, "assignment_id", MAX_ASSIGNMENT_ID, required=True)


def set_state(cmd: dict) -> tuple[str, str, str, float]:
    """(agent_id, state, reason, timeout_s)"""
    aid = agent_id(cmd)
    state = cmd.get("state")
    if not isinstance(state, str) or state not in AGENT_STATES:
        raise invalid(
            "INVALID_STATE", "state must be ready, not_ready or wrap_up", field="state"
        )
    reason = text(cmd, "reason", MAX_REASON)
    if state == "not_ready" and not reason:
        raise invalid("MISSING_FIELD", "not_ready needs a reason", field="reason")
    timeout = cmd.get("timeout_s")
    if timeout is None:
        timeout = 0.0
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise invalid("INVALID_TIMEOUT", "timeout_s must be a number", field="timeout_s")
    timeout = float(timeout) if abs(timeout) < 1e300 else math.inf
    if state == "wrap_up" and not 0 < timeout <= MAX_WRAP_UP_TIMEOUT:
        raise invalid(
            "INVALID_TIMEOUT", "wrap_up needs timeout_s in (0, 3600]", field="timeout_s"
        )
    return aid, state, reason, timeout
