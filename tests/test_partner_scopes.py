"""What reaches a partner (router.contracts.scope): an offer carries only the fields its
contract's scopes allow, and no value outside them leaks (invariant 7); caller tokens
are stable per partner and unlinkable across partners."""

from __future__ import annotations

import hashlib
import hmac
import re
import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.contracts import (
    OFFER_BASE_FIELDS,
    PartnerContract,
    Scopes,
    allowed_fields,
    caller_token,
    fields_outside,
    last_digits,
    offer_fields,
    parse_contract,
)

ROOT = Path(__file__).resolve().parent.parent
KEY = bytes(range(32))
FAST = settings(max_examples=200, deadline=None)

# Every field any scope can allow, and the sentinels planted in calls.
EVERY_FIELD = allowed_fields(Scopes(caller="full", profile="full", transcript=True, ivr_path=True)) | {
    "caller_token", "caller_last_digits"}
ATTR_SECRET = "ATTRSECRET"
CUSTOMER_SECRET = "CUSTSECRET"
TRANSCRIPT_SECRET = "TRANSCRIPTSECRET"
IVR_SECRET = "IVRSECRET"
PAST_SECRET = "PASTNOTESECRET"

_letters = st.text(alphabet=string.ascii_letters, min_size=1, max_size=12)
_name = st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True)

scopes_st = st.builds(
    Scopes,
    caller=st.sampled_from(["none", "token", "last_digits", "full"]),
    profile=st.sampled_from(["none", "basic", "full"]),
    transcript=st.booleans(),
    ivr_path=st.booleans(),
    recording=st.sampled_from(["allowed", "paused"]),
)
contract_st = st.builds(
    PartnerContract,
    partner=_name,
    scopes=scopes_st,
    offer_timeout_s=st.sampled_from([0.5, 5.0, 10.0, 15.5, 120.0]),  # short reprs: see the caller check
    value_tiers=st.sampled_from([["low"], ["low", "standard"], ["standard"]]),
)
# Callers of 8..15 digits behind a "+", which no other value of an offer contains.
caller_st = st.builds(lambda d: "+" + d, st.text(alphabet=string.digits, min_size=8, max_size=15))
past_contact_st = st.fixed_dictionaries({
    "call_id": _letters.map(lambda s: "past-" + s),
    "offered_at": st.floats(1.6e9, 1.9e9),
    "skill": _name,
    "outcome": st.sampled_from(["completed", "abandoned", "transferred"]),
    "csat": st.integers(0, 5),
    "resolved": st.booleans(),
    "notes": _letters.map(lambda s: PAST_SECRET + s),   # history carries more than an offer may
})
call_st = st.fixed_dictionaries({
    "call_id": _letters.map(lambda s: "call-" + s),
    "skill": _name,
    "channel": st.sampled_from(["voice", "chat", "email", "social"]),
    "language": st.sampled_from(["en", "fr", ""]),
    "caller": caller_st,
    "customer_id": _letters.map(lambda s: CUSTOMER_SECRET + s),
    "context": st.fixed_dictionaries({
        "ivr_path": st.lists(_letters.map(lambda s: IVR_SECRET + s), min_size=1, max_size=4),
        "bot_transcript": st.text(max_size=40).map(lambda s: TRANSCRIPT_SECRET + s),
        "attributes": st.dictionaries(_letters, _letters.map(lambda s: ATTR_SECRET + s), min_size=1, max_size=4)
        .map(lambda d: {**d, "account_pin": ATTR_SECRET + "1234"}),
    }),
})


def make_offer(call, contract, past):
    return offer_fields(call, contract, token_key=KEY, offer_no=1, wait_s=12.5, value_tier="low",
                        past_contacts=past)


@FAST
@given(contract=contract_st, call=call_st, past=st.lists(past_contact_st, max_size=4))
def test_an_offer_carries_only_what_the_scopes_allow(contract, call, past):
    scopes = contract.scopes
    offer = make_offer(call, contract, past)
    text = repr(offer)
    assert set(offer) <= allowed_fields(scopes)
    assert set(OFFER_BASE_FIELDS) <= set(offer) and "recording" in offer
    assert offer["recording"] is (scopes.recording == "allowed")
    assert offer["timeout_s"] == contract.offer_timeout_s
    assert fields_outside(offer, scopes) == []
    # Nothing outside the scopes leaks, under any field name.
    assert ATTR_SECRET not in text and "account_pin" not in text
    assert PAST_SECRET not in text
    if scopes.caller != "full":
        # (not in the free texts the scopes let through: a transcript may hold any digits)
        bare = repr({k: v for k, v in offer.items() if k not in ("transcript", "ivr_path")})
        assert call["caller"] not in bare
        if scopes.profile != "full":  # past contacts' times are digits too ("1600000000.0")
            assert call["caller"][1:] not in bare
    if scopes.caller != "last_digits":
        assert "caller_last_digits" not in offer
    if scopes.profile != "full":
        assert CUSTOMER_SECRET not in text
        assert "past-" not in text
    if scopes.profile == "none":
        assert "contacts_90d" not in offer and "last_resolved" not in offer
    if not scopes.transcript:
        assert TRANSCRIPT_SECRET not in text
    if not scopes.ivr_path:
        assert IVR_SECRET not in text
    # And what is in scope is what the call says.
    if scopes.caller == "token":
        assert offer["caller_token"] == caller_token(KEY, contract.partner, call["caller"])
    if scopes.caller == "last_digits":
        assert offer["caller_last_digits"] == call["caller"][-4:]
    if scopes.caller == "full":
        assert offer["caller"] == call["caller"]
    if scopes.profile != "none":
        assert offer["contacts_90d"] == len(past)
        if past:
            newest = max(past, key=lambda p: p["offered_at"])
            assert offer["last_resolved"] is newest["resolved"]
    if scopes.profile == "full":
        assert offer["customer_id"] == call["customer_id"]
        assert offer.get("past_contacts", []) == [
            {k: p[k] for k in ("call_id", "offered_at", "skill", "outcome", "csat")} for p in past]
    if scopes.transcript:
        assert offer["transcript"] == call["context"]["bot_transcript"]
    if scopes.ivr_path:
        assert offer["ivr_path"] == call["context"]["ivr_path"]


def test_the_blueline_offer():
    contract = parse_contract((ROOT / "sites" / "partners" / "blueline.yaml").read_text(), partner="blueline")
    call = {"call_id": "c-1", "skill": "billing", "channel": "voice", "language": "en",
            "caller": "+353861234567", "customer_id": "C-42",
            "context": {"ivr_path": ["billing", "invoice"], "bot_transcript": "my bill is wrong",
                        "attributes": {"account": "123"}}}
    past = [{"call_id": "p-1", "offered_at": 100.0, "skill": "billing", "outcome": "completed", "csat": 4,
             "resolved": False},
            {"call_id": "p-2", "offered_at": 200.0, "skill": "support", "outcome": "completed", "csat": 5,
             "resolved": True}]
    offer = offer_fields(call, contract, token_key=KEY, offer_no=2, wait_s=31.0, value_tier="standard",
                         past_contacts=past)
    assert offer == {
        "call_id": "c-1", "offer_no": 2, "skill": "billing", "channel": "voice", "language": "en",
        "value_tier": "standard", "wait_s": 31.0, "timeout_s": 5.0,
        "caller_token": caller_token(KEY, "blueline", "+353861234567"),
        "contacts_90d": 2, "last_resolved": True,
        "ivr_path": ["billing", "invoice"], "recording": True,
    }


def test_allowed_fields_per_scope():
    base = set(OFFER_BASE_FIELDS) | {"recording"}
    assert allowed_fields(Scopes()) == base
    assert allowed_fields(Scopes(caller="token", profile="basic", ivr_path=True)) == base | {
        "caller_token", "contacts_90d", "last_resolved", "ivr_path"}
    assert allowed_fields(Scopes(caller="last_digits")) == base | {"caller_last_digits"}
    assert allowed_fields(Scopes(caller="full", profile="full", transcript=True)) == base | {
        "caller", "contacts_90d", "last_resolved", "customer_id", "past_contacts", "transcript"}


def test_empty_values_are_left_out():
    contract = PartnerContract(partner="acme", scopes=Scopes(caller="full", profile="full", transcript=True,
                                                             ivr_path=True))
    offer = offer_fields({"call_id": "c", "skill": "s", "caller": "", "customer_id": "", "context": {}},
                         contract, token_key=KEY, offer_no=1, wait_s=0, value_tier="low")
    assert set(offer) == set(OFFER_BASE_FIELDS) | {"recording", "contacts_90d"}
    assert offer["contacts_90d"] == 0 and offer["recording"] is False


# --- fields_outside ----------------------------------------------------------------------


@FAST
@given(contract=contract_st, call=call_st, past=st.lists(past_contact_st, max_size=2), data=st.data())
def test_fields_outside_flags_what_the_scopes_do_not_allow(contract, call, past, data):
    scopes = contract.scopes
    offer = make_offer(call, contract, past)
    assert fields_outside(offer, scopes) == []
    outside = sorted(EVERY_FIELD - allowed_fields(scopes)) + ["attributes"]
    extra = data.draw(st.lists(st.sampled_from(outside), min_size=1, unique=True))
    received = {**offer, **{name: "leaked" for name in extra}}
    assert fields_outside(received, scopes) == sorted(extra)
    # A protobuf message as a dict carries every field; its defaults are not "received".
    defaults = {**offer, **{name: d for name, d in zip(outside, ["", 0, False, [], None, {}] * 5)}}
    assert fields_outside(defaults, scopes) == []


# --- caller tokens -----------------------------------------------------------------------


def test_token_is_the_documented_keyed_hash():
    partner_key = hmac.new(KEY, b"tandem-partner-token:blueline", hashlib.sha256).digest()
    expected = "t_" + hmac.new(partner_key, b"+353861234567", hashlib.sha256).hexdigest()[:24]
    assert caller_token(KEY, "blueline", "+353861234567") == expected
    assert caller_token(KEY, "blueline", "") == ""
    with pytest.raises(ValueError):
        caller_token(b"short", "blueline", "+353861234567")


@FAST
@given(key=st.binary(min_size=32, max_size=32), partner=_name, caller=caller_st)
def test_token_is_deterministic_per_key_partner_and_caller(key, partner, caller):
    token = caller_token(key, partner, caller)
    assert re.fullmatch(r"t_[0-9a-f]{24}", token)
    assert caller_token(bytes(key), str(partner), str(caller)) == token
    assert caller[1:] not in token


@FAST
@given(key=st.binary(min_size=32, max_size=32), a=_name, b=_name, caller=caller_st)
def test_tokens_of_two_partners_differ(key, a, b, caller):
    if a != b:
        assert caller_token(key, a, caller) != caller_token(key, b, caller)
    other_key = bytes(x ^ 1 for x in key)
    assert caller_token(other_key, a, caller) != caller_token(key, a, caller)


def test_tokens_of_two_partners_are_unlinkable_over_many_callers():
    callers = [f"+3538{n:08d}" for n in range(2000)]
    blue = [caller_token(KEY, "blueline", c) for c in callers]
    pro = [caller_token(KEY, "callpro", c) for c in callers]
    assert len(set(blue)) == len(callers) and len(set(pro)) == len(callers)
    assert not set(blue) & set(pro)
    assert all(x != y for x, y in zip(blue, pro))


# --- last digits -------------------------------------------------------------------------


@pytest.mark.parametrize("caller,n,expected", [
    ("+353 86 123 4567", 4, "4567"),
    ("+1 (555) 010-9999", 4, "9999"),
    ("123456", 4, "3456"),
    ("12345", 4, ""),           # fewer than n + 2 digits: nothing
    ("", 4, ""),
    ("anonymous", 4, ""),
    ("+3538612345", 2, "45"),
])
def test_last_digits(caller, n, expected):
    assert last_digits(caller, n) == expected
