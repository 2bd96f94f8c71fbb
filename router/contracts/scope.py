"""What reaches a partner: the fields of an offer its contract's data scopes allow.

Invariant 7: nothing outside a partner's scopes leaves the cluster. :func:`offer_fields`
builds an offer from the internal call description and is the only place that decides
what a partner sees; :func:`allowed_fields` is the list it keeps to, and
:func:`fields_outside` checks an offer as a partner received it against that list.

Pure: no I/O; the token key is an argument.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence, Sized
from typing import Any

from router.contracts.model import PartnerContract, Scopes

# Sent with every offer, whatever the scopes: what the partner needs to take the call.
OFFER_BASE_FIELDS: tuple[str, ...] = (
    "call_id", "offer_no", "skill", "channel", "language", "value_tier", "wait_s", "timeout_s",
)
_CALLER: dict[str, tuple[str, ...]] = {
    "none": (), "token": ("caller_token",), "last_digits": ("caller_last_digits",), "full": ("caller",),
}
_PROFILE: dict[str, tuple[str, ...]] = {
    "none": (), "basic": ("contacts_90d", "last_resolved"),
    "full": ("contacts_90d", "last_resolved", "customer_id", "past_contacts"),
}
_TOKEN_DOMAIN = b"tandem-partner-token:"


def caller_token(key: bytes, partner: str, caller: str) -> str:
    """A stable pseudonym of ``caller`` for ``partner``: ``"t_"`` + 24 hex digits ("" for
    an empty caller).

    HMAC-SHA256 under a per-partner key, itself HMAC(``key``, "tandem-partner-token:" +
    partner). So the same caller has the same token at one partner for as long as the
    key lives (the partner can recognize a repeat caller), while two partners' tokens of
    one caller are unlinkable (a partner cannot join its tokens with another partner's).
    And since the key is secret — 32 random bytes per partner kept in etcd (its token-key
    key, ``router.coord.keys``), never sent to a partner — nobody can reverse a token
    by hashing every possible phone number, which a plain hash would allow. The number
    is hashed as given: callers normalize it (E.164) before.

    Raises ValueError for a key shorter than 16 bytes (that would be guessable).
    """
    if len(key) < 16:
        raise ValueError("token key must be at least 16 bytes (32 random bytes)")
    if not caller:
        return ""
    partner_key = hmac.new(key, _TOKEN_DOMAIN + partner.encode("utf-8"), hashlib.sha256).digest()
    return "t_" + hmac.new(partner_key, caller.encode("utf-8"), hashlib.sha256).hexdigest()[:24]


def last_digits(caller: str, n: int = 4) -> str:
    """The last ``n`` digits of a phone number (other characters dropped); "" when it has
    fewer than ``n + 2`` digits, so a short number is never given away whole or nearly
    so."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    digits = "".join(ch for ch in caller if "0" <= ch <= "9")
    return digits[-n:] if len(digits) >= n + 2 else ""


def allowed_fields(scopes: Scopes) -> frozenset[str]:
    """Every field an offer may carry under ``scopes``: the base fields, the caller
    (token, last digits or the number), the profile (basic: contacts in 90 days and
    whether the last was resolved; full: also the customer id and the past contacts),
    the bot transcript, the IVR path, and always ``recording`` (whether the partner may
    record the call)."""
    out = {*OFFER_BASE_FIELDS, "recording", *_CALLER[scopes.caller], *_PROFILE[scopes.profile]}
    if scopes.transcript:
        out.add("transcript")
    if scopes.ivr_path:
        out.add("ivr_path")
    return frozenset(out)


def offer_fields(
    call: Mapping[str, Any],
    contract: PartnerContract,
    *,
    token_key: bytes,
    offer_no: int,
    wait_s: float,
    value_tier: str,
    past_contacts: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The fields of an Offer to ``contract.partner`` for ``call``.

    ``call``: ``call_id``, ``skill``, ``channel`` ("voice" | "chat" | "email" |
    "social"), ``language``, ``caller``, ``customer_id`` and ``context``
    (``ivr_path``: list of str, ``bot_transcript``: str, ``attributes``: dict).
    ``past_contacts``: the caller's screen-pop history (``call_id``, ``offered_at``,
    ``skill``, ``outcome``, ``csat``, ``resolved``).

    The keys are always a subset of ``allowed_fields(contract.scopes)``; the base fields
    are always there, a scoped field whose value would be empty is left out. Context
    attributes never go to a partner, whatever the scopes: they are free-form, set by
    the IVR or the carrier, and can hold anything (account numbers, notes, secrets).
    Past contacts are copied field by field, so nothing else a history row carries
    leaves either.
    """
    scopes = contract.scopes
    context: Mapping[str, Any] = call.get("context") or {}
    channel = call.get("channel", "voice")
    out: dict[str, Any] = {
        "call_id": str(call["call_id"]),
        "offer_no": int(offer_no),
        "skill": str(call["skill"]),
        "channel": str(getattr(channel, "value", channel)),
        "language": str(call.get("language") or ""),
        "value_tier": value_tier,
        "wait_s": float(wait_s),
        "timeout_s": contract.offer_timeout_s,
        "recording": scopes.recording == "allowed",
    }
    caller = str(call.get("caller") or "")
    if scopes.caller == "token":
        _put(out, "caller_token", caller_token(token_key, contract.partner, caller))
    elif scopes.caller == "last_digits":
        _put(out, "caller_last_digits", last_digits(caller))
    elif scopes.caller == "full":
        _put(out, "caller", caller)
    if scopes.profile in ("basic", "full"):
        out["contacts_90d"] = len(past_contacts)
        if past_contacts:
            newest = max(past_contacts, key=lambda p: float(p.get("offered_at") or 0.0))
            out["last_resolved"] = bool(newest.get("resolved"))
    if scopes.profile == "full":
        _put(out, "customer_id", str(call.get("customer_id") or ""))
        _put(out, "past_contacts", [
            {"call_id": str(p.get("call_id") or ""), "offered_at": float(p.get("offered_at") or 0.0),
             "skill": str(p.get("skill") or ""), "outcome": str(p.get("outcome") or ""),
             "csat": int(p.get("csat") or 0)}
            for p in past_contacts
        ])
    if scopes.transcript:
        _put(out, "transcript", str(context.get("bot_transcript") or ""))
    if scopes.ivr_path:
        _put(out, "ivr_path", [str(step) for step in context.get("ivr_path") or ()])
    return out


def _put(out: dict[str, Any], name: str, value: Any) -> None:
    if not _empty(value):
        out[name] = value


def _empty(value: Any) -> bool:
    """What a protobuf field holds when unset: None, "", 0, False or an empty list/map."""
    if value is None or value is False:
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 0
    return isinstance(value, Sized) and len(value) == 0


def fields_outside(received: Mapping[str, Any], scopes: Scopes) -> list[str]:
    """The non-empty fields of ``received`` (an Offer as a partner saw it, as a dict)
    that ``scopes`` does not allow, sorted. Empty ones are left out because a protobuf
    message turned into a dict may carry every field with its default value."""
    allowed = allowed_fields(scopes)
    return sorted(k for k, v in received.items() if k not in allowed and not _empty(v))
