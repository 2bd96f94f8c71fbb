"""Partner contracts (router.contracts.model): parsing and refusal, opening hours with
holidays, rate buckets, allows() reasons, SLA credits."""

from __future__ import annotations

import json
import math
from datetime import date
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from router.contracts import (
    ContractError,
    Hours,
    PartnerContract,
    Sla,
    contract_json,
    parse_contract,
    rate_buckets,
    sla_credit,
)
from router.overflow import PartnerHours

ROOT = Path(__file__).resolve().parent.parent
BLUELINE = ROOT / "sites" / "partners" / "blueline.yaml"

# Hand-computed Unix times (UTC wall clock in the comment).
DUBLIN_XMAS_EVE_LAST = 1798156799   # 2026-12-24T23:59:59Z = 23:59:59 GMT, Thursday
DUBLIN_XMAS_START = 1798156800      # 2026-12-25T00:00:00Z = 00:00 GMT, a holiday
DUBLIN_XMAS_LAST = 1798243199       # 2026-12-25T23:59:59Z
DUBLIN_ST_STEPHEN = 1798243200      # 2026-12-26T00:00:00Z


def blueline() -> PartnerContract:
    return parse_contract(BLUELINE.read_text(), partner="blueline", source=str(BLUELINE))


def minimal(**over) -> dict:
    doc = {"partner": "acme"}
    doc.update(over)
    return doc


# --- the example and round trips ---------------------------------------------------------


def test_the_example_contract_parses_with_what_it_says():
    c = blueline()
    assert c.partner == "blueline" and c.version == 1
    assert c.skills == ["billing", "support"] and c.queues == ["billing-en-voice", "support-en-voice", "support-chat"]
    assert c.hours is not None and c.hours.tz == "Europe/Dublin"
    assert c.hours.holidays == [date(2026, 12, 25), date(2027, 1, 1)]
    assert (c.caps.concurrent, c.caps.per_second, c.caps.per_hour, c.caps.per_day) == (6, 2, 600, 5000)
    assert c.value_tiers == ["low", "standard"] and c.max_value == "standard"
    assert c.offer_timeout_s == 5
    assert (c.price.currency, c.price.per_contact, c.price.per_handled_minute) == ("USD", 1.20, 0.35)
    assert c.sla is not None and (c.sla.threshold_s, c.sla.target, c.sla.credit_per_point) == (20, 0.8, 2.5)
    assert c.scopes.model_dump() == {"caller": "token", "profile": "basic", "transcript": False,
                                     "ivr_path": True, "recording": "allowed"}


def test_defaults_are_the_least():
    c = parse_contract('{"partner": "acme"}')
    assert c.skills == [] and c.queues == [] and c.hours is None and c.sla is None
    assert c.value_tiers == ["low"] and c.max_value == "low" and c.tz == "UTC"
    assert c.caps.model_dump() == {"concurrent": None, "per_second": None, "per_hour": None, "per_day": None}
    assert c.scopes.model_dump() == {"caller": "none", "profile": "none", "transcript": False,
                                     "ivr_path": False, "recording": "paused"}


def test_contract_json_round_trips_and_is_canonical():
    c = blueline()
    text = contract_json(c)
    assert parse_contract(text, partner="blueline") == c
    assert parse_contract(text.encode()) == c
    assert json.loads(text) == json.loads(json.dumps(json.loads(text), sort_keys=True))
    assert contract_json(parse_contract(text)) == text
    assert list(json.loads(text)) == sorted(json.loads(text))


def test_yaml_times_are_text_not_base_60_numbers():
    # YAML 1.1 reads an unquoted 18:30 as the integer 1110; the contract reader does not.
    c = parse_contract("partner: acme\nhours: {tz: UTC, open: 08:00, close: 18:30}\n")
    assert c.hours is not None and (c.hours.open, c.hours.close) == ("08:00", "18:30")


def test_json_numbers_yaml_1_1_would_read_as_text():
    assert parse_contract('{"partner": "acme", "offer_timeout_s": 1e1}').offer_timeout_s == 10


# --- refusals ----------------------------------------------------------------------------


REFUSED = [
    ("unknown key", minimal(colour="blue"), ["colour", "Extra inputs are not permitted"]),
    ("unknown nested key", minimal(caps={"concurrency": 3}), ["caps.concurrency"]),
    ("high tier", minimal(value_tiers=["low", "high"]),
     ["value_tiers", "high-value work never goes to a partner"]),
    ("no tier", minimal(value_tiers=[]), ["value_tiers"]),
    ("bad tz", minimal(hours={"tz": "Mars/Olympus"}), ["hours.tz", "unknown time zone 'Mars/Olympus'"]),
    ("bad HH:MM", minimal(hours={"tz": "UTC", "open": "8:00"}), ["hours.open", "HH:MM"]),
    ("close past 24:00", minimal(hours={"tz": "UTC", "close": "24:30"}), ["hours.close", "HH:MM"]),
    ("bad day", minimal(hours={"tz": "UTC", "days": [7]}), ["hours.days"]),
    ("bad holiday", minimal(hours={"tz": "UTC", "holidays": ["2026-02-30"]}), ["hours.holidays[0]"]),
    ("concurrent 0", minimal(caps={"concurrent": 0}), ["caps.concurrent", "greater than or equal to 1"]),
    ("per_day 0", minimal(caps={"per_day": 0}), ["caps.per_day"]),
    ("negative price", minimal(price={"per_contact": -1}), ["price.per_contact"]),
    ("negative minute price", minimal(price={"per_handled_minute": -0.01}), ["price.per_handled_minute"]),
    ("bad currency", minimal(price={"currency": "usd"}), ["price.currency"]),
    ("sla target 0", minimal(sla={"threshold_s": 20, "target": 0}), ["sla.target"]),
    ("sla target > 1", minimal(sla={"threshold_s": 20, "target": 1.5}), ["sla.target"]),
    ("sla threshold 0", minimal(sla={"threshold_s": 0, "target": 0.8}), ["sla.threshold_s"]),
    ("sla without target", minimal(sla={"threshold_s": 20}), ["sla.target", "Field required"]),
    ("negative credit", minimal(sla={"threshold_s": 20, "target": 0.8, "credit_per_point": -1}),
     ["sla.credit_per_point"]),
    ("timeout too short", minimal(offer_timeout_s=0.1), ["offer_timeout_s"]),
    ("timeout too long", minimal(offer_timeout_s=121), ["offer_timeout_s"]),
    ("bad caller scope", minimal(scopes={"caller": "phone"}), ["scopes.caller"]),
    ("bad recording", minimal(scopes={"recording": "on"}), ["scopes.recording"]),
    ("version 2", minimal(version=2), ["version"]),
    ("bad skill name", minimal(skills=["Billing!"]), ["skills[0]"]),
    ("no partner", {"skills": ["billing"]}, ["partner", "Field required"]),
    ("bad partner name", {"partner": "Acme Corp"}, ["partner"]),
]


@pytest.mark.parametrize("doc,needles", [(d, n) for _, d, n in REFUSED], ids=[i for i, _, _ in REFUSED])
@pytest.mark.parametrize("form", ["json", "yaml"])
def test_every_invalid_field_is_refused_naming_it(doc, needles, form):
    import yaml

    text = json.dumps(doc) if form == "json" else yaml.safe_dump(doc)
    with pytest.raises(ContractError) as e:
        parse_contract(text, source="contract acme")
    msg = str(e.value)
    assert msg.startswith("contract acme: invalid partner contract"), msg
    for needle in needles:
        assert needle in msg, msg


def test_every_offending_field_is_named_at_once():
    doc = minimal(caps={"concurrent": 0}, price={"per_contact": -1}, value_tiers=["high"], bogus=1)
    with pytest.raises(ContractError) as e:
        parse_contract(json.dumps(doc), partner="other", source="partners/other")
    lines = str(e.value).splitlines()
    assert lines[0] == "partners/other: invalid partner contract"
    for name in ("caps.concurrent", "price.per_contact", "value_tiers", "bogus", "partner"):
        assert any(line.startswith(f"  {name}: ") for line in lines[1:]), lines


def test_the_partner_must_be_the_one_it_is_stored_for():
    with pytest.raises(ContractError, match=r"partner: 'blueline' does not match .* 'callpro'"):
        parse_contract(BLUELINE.read_text(), partner="callpro", source="contract callpro")
    assert parse_contract(BLUELINE.read_bytes(), partner="blueline").partner == "blueline"


@pytest.mark.parametrize("raw,needle", [
    ("- a\n- b\n", "must be a mapping of fields, got list"),
    ("just text", "must be a mapping of fields, got str"),
    ("", "must be a mapping of fields, got NoneType"),
    ('{"partner": "acme",', "not valid JSON or YAML"),
    ("partner: [unclosed\n", "not valid JSON or YAML"),
    ("partner: acme\n  bad: indent\n", "not valid JSON or YAML"),
    (b"\xff\xfe{}", "not UTF-8 text"),
], ids=["list", "scalar", "empty", "bad json", "bad yaml flow", "bad yaml indent", "not utf-8"])
def test_a_document_that_is_not_a_contract_is_refused(raw, needle):
    with pytest.raises(ContractError) as e:
        parse_contract(raw, source="sites/partners/x.yaml")
    assert str(e.value).startswith("sites/partners/x.yaml: invalid partner contract: "), str(e.value)
    assert needle in str(e.value)


def test_contract_error_is_a_value_error_and_models_are_frozen():
    assert issubclass(ContractError, ValueError)
    c = blueline()
    with pytest.raises(ValidationError, match="frozen"):
        c.offer_timeout_s = 1  # type: ignore[misc]


# --- opening hours -----------------------------------------------------------------------


def test_blueline_is_closed_on_its_holidays_in_dublin_time():
    hours = blueline().hours
    assert hours is not None
    assert hours.is_open(DUBLIN_XMAS_EVE_LAST)
    assert hours.closed_reason(DUBLIN_XMAS_START) == "holiday"
    assert not hours.is_open(DUBLIN_XMAS_LAST)
    assert hours.is_open(DUBLIN_ST_STEPHEN)
    # 2027-01-01 00:30 GMT and 2026-12-31 23:30 GMT
    assert not hours.is_open(1798763400)
    assert hours.is_open(1798759800)


@pytest.mark.parametrize("now,expected", [
    (1772805540, False),  # Fri 2026-03-06 13:59Z = 08:59 EST
    (1772805600, True),   # 14:00Z = 09:00 EST
    (1772834340, True),   # 21:59Z = 16:59 EST
    (1772834400, False),  # 22:00Z = 17:00 EST
    (1773061140, False),  # Mon 2026-03-09 12:59Z = 08:59 EDT (DST began on the 8th)
    (1773061200, True),   # 13:00Z = 09:00 EDT
])
def test_day_hours_follow_the_partners_time_zone_and_dst(now, expected):
    hours = Hours(tz="America/New_York", open="09:00", close="17:00")
    assert hours.is_open(now) is expected


# Manila (UTC+8, no DST), overnight 22:00-06:00, shifts starting Monday..Friday, and a
# holiday on Wednesday 2026-03-04: it closes the shift Wed 22:00 -> Thu 06:00, not the
# morning of Wednesday (which belongs to Tuesday's shift).
MANILA_NIGHT = Hours(tz="Asia/Manila", open="22:00", close="06:00", days=[0, 1, 2, 3, 4],
                     holidays=[date(2026, 3, 4)])


@pytest.mark.parametrize("now,reason", [
    (1772564400, None),           # Wed 03:00 local (Tue 19:00Z): Tuesday's shift
    (1772575140, None),           # Wed 05:59 local
    (1772575200, "closed now"),   # Wed 06:00 local: the shift has ended
    (1772636400, "holiday"),      # Wed 23:00 local (Wed 15:00Z): the holiday's shift
    (1772650800, "holiday"),      # Thu 03:00 local: still the shift that started Wed
    (1772661540, "holiday"),      # Thu 05:59 local
    (1772661600, "closed now"),   # Thu 06:00 local
    (1772719140, "closed now"),   # Thu 21:59 local
    (1772719200, None),           # Thu 22:00 local: Thursday's shift
    (1772737200, None),           # Fri 03:00 local
    (1772823600, None),           # Sat 03:00 local: Friday's shift
    (1772895600, "closed now"),   # Sat 23:00 local: no Saturday shift
    (1772996400, "closed now"),   # Mon 03:00 local: would be Sunday's shift
])
def test_overnight_shift_belongs_to_the_day_it_starts_on(now, reason):
    assert MANILA_NIGHT.closed_reason(now) == reason
    assert MANILA_NIGHT.is_open(now) is (reason is None)


_HHMM = st.builds(lambda h, m: f"{h:02d}:{m:02d}", st.integers(0, 23), st.sampled_from([0, 15, 30, 59]))


@settings(max_examples=300, deadline=None)
@given(
    tz=st.sampled_from(["UTC", "Europe/Dublin", "America/New_York", "Asia/Manila", "Australia/Lord_Howe"]),
    open_=_HHMM,
    close=st.one_of(_HHMM, st.just("24:00")),
    days=st.lists(st.integers(0, 6), min_size=1, max_size=7, unique=True),
    now=st.integers(1_700_000_000, 1_900_000_000),
)
def test_without_holidays_hours_agree_with_the_overflow_policy(tz, open_, close, days, now):
    ours = Hours(tz=tz, open=open_, close=close, days=days)
    theirs = PartnerHours(tz=tz, open=open_, close=close, days=days)
    assert ours.is_open(now) == theirs.is_open(now)


# --- rate buckets ------------------------------------------------------------------------


def test_rate_buckets_day_is_the_local_date_of_the_contract():
    # 2026-07-01T23:30Z is 00:30 on 2 July in Dublin (IST, UTC+1).
    assert rate_buckets(1782948600.7, "Europe/Dublin") == {
        "s": "1782948600", "h": str(1782948600 // 3600), "d": "2026-07-02"}
    assert rate_buckets(1782948600, "UTC")["d"] == "2026-07-01"
    assert rate_buckets(1782946799, "Europe/Dublin")["d"] == "2026-07-01"  # 23:59:59 IST
    # New York: the day turns at 05:00Z in winter.
    assert rate_buckets(1767243599, "America/New_York")["d"] == "2025-12-31"
    assert rate_buckets(1767243600, "America/New_York")["d"] == "2026-01-01"
    assert rate_buckets(1767243600, "America/New_York")["h"] == "490901"


def test_contract_time_zone_for_buckets():
    assert blueline().tz == "Europe/Dublin"
    assert rate_buckets(1782948600, blueline().tz)["d"] == "2026-07-02"


# --- allows ------------------------------------------------------------------------------


def test_allows_gives_the_reason_of_the_first_failing_check():
    c = blueline()
    open_now = DUBLIN_ST_STEPHEN
    assert c.allows("billing", "billing-en-voice", "low", open_now) is None
    assert c.allows("support", "support-chat", "standard", open_now) is None
    assert c.allows("sales", "sales-voice", "low", open_now) == "skill sales not in contract"
    assert c.allows("billing", "billing-en-voice", "high", open_now) == "value high not in contract"
    assert c.allows("billing", "billing-en-voice", "low", DUBLIN_XMAS_START) == "holiday"
    narrow = c.model_copy(update={"queues": ["billing-en-voice"], "value_tiers": ["low"]})
    assert narrow.allows("billing", "billing-fr-voice", "low", open_now) == "queue billing-fr-voice not in contract"
    assert narrow.allows("billing", "billing-en-voice", "standard", open_now) == "value standard not in contract"
    day = parse_contract(json.dumps(minimal(hours={"tz": "America/New_York", "open": "09:00", "close": "17:00"})))
    assert day.allows("anything", "any-queue", "low", 1772805540) == "closed now"
    assert day.allows("anything", "any-queue", "low", 1772805600) is None
    assert parse_contract('{"partner": "acme"}').allows("x", "y", "low", 0) is None


# --- SLA credit --------------------------------------------------------------------------


@pytest.mark.parametrize("handled,within,achieved,credit", [
    (100, 75, 0.75, 12.5),     # 5 points below 80% at 2.5 per point
    (100, 80, 0.80, 0.0),      # on target
    (100, 95, 0.95, 0.0),      # above target: no credit, no bonus
    (10, 0, 0.0, 200.0),       # 80 points below
    (3, 2, 2 / 3, (80 - 200 / 3) * 2.5),
])
def test_sla_credit(handled, within, achieved, credit):
    sla = Sla(threshold_s=20, target=0.8, credit_per_point=2.5)
    got_achieved, got_credit = sla_credit(sla, handled, within)
    assert got_achieved == pytest.approx(achieved)
    assert got_credit == pytest.approx(credit)


def test_sla_credit_without_calls_and_bad_counts():
    sla = Sla(threshold_s=20, target=0.8, credit_per_point=2.5)
    achieved, credit = sla_credit(sla, 0, 0)
    assert math.isnan(achieved) and credit == 0
    assert sla_credit(Sla(threshold_s=20, target=0.9), 10, 0) == (0.0, 0.0)  # no credit agreed
    for handled, within in [(5, 6), (5, -1), (-1, 0)]:
        with pytest.raises(ValueError):
            sla_credit(sla, handled, within)
