"""Routing policy rules, one by one (pure functions, no engine)."""

from __future__ import annotations

import pytest

from router import policy
from router.config import CallerLists, PriorityClass, ServiceLevelDefinition

LISTS = policy.caller_sets(
    CallerLists(vip=["+1vip", "cust-vip"], whitelist=["+1white"], blacklist=["+1black", "cust-bad"])
)


@pytest.mark.parametrize(
    "caller, customer, declared, recent, expected",
    [
        ("+1", "", "", False, "standard"),
        ("+1", "", "standard", False, "standard"),
        ("+1", "", "", True, "repeat"),
        ("+1", "", "whitelist", True, "whitelist"),
        ("+1vip", "", "", False, "vip"),
        ("", "cust-vip", "", False, "vip"),
        ("+1white", "", "", True, "whitelist"),
        ("+1white", "", "vip", False, "vip"),
        ("+1", "", "vip", False, "vip"),
        ("+1", "", "repeat", False, "repeat"),
        ("+1black", "", "vip", True, "blacklist"),
        ("+1vip", "cust-bad", "", False, "blacklist"),
        ("", "", "", False, "standard"),
    ],
)
def test_classify(caller, customer, declared, recent, expected):
    assert policy.classify(caller, customer, declared, LISTS, recent) == expected


def test_classify_accepts_plain_caller_lists():
    lists = CallerLists(vip=["a"], blacklist=["b"])
    assert policy.classify("a", "", "", lists, False) == "vip"
    assert policy.classify("b", "", "", lists, False) == "blacklist"


def test_empty_ids_never_match_lists():
    sets = policy.caller_sets(CallerLists(vip=[""], blacklist=[""]))
    assert policy.classify("", "", "", sets, False) == "standard"


def test_priority_key_head_start_and_enum_keys():
    hs = {PriorityClass.VIP: 120.0, PriorityClass.STANDARD: 0.0}
    assert policy.head_start(hs, "vip") == 120.0
    assert policy.head_start(hs, "repeat") == 0.0
    assert policy.head_start(hs, "blacklist") == 0.0
    # A VIP arriving 100 s after a standard call is still served first.
    assert policy.priority_key(1100.0, 120.0) < policy.priority_key(1000.0, 0.0)
    assert policy.priority_key(1000.0, 0.0) == 1000.0


@pytest.mark.parametrize(
    "skills, langs, cap, q, expected",
    [
        ({"billing": 5}, ["fr"], {"voice": 1}, ("billing", "fr", "voice"), True),
        ({"billing": 5}, ["fr"], {"voice": 1}, ("billing", None, "voice"), True),
        ({"billing": 5}, ["fr"], {"voice": 1}, ("billing", "en", "voice"), False),
        ({"billing": 5}, ["fr"], {"voice": 1}, ("sales", None, "voice"), False),
        ({"billing": 5}, ["fr"], {"voice": 1}, ("billing", None, "chat"), False),
        ({"billing": 5}, ["fr"], {"voice": 1, "chat": 0}, ("billing", None, "chat"), False),
        ({"billing": 5}, [], {"chat": 3}, ("billing", None, "chat"), True),
    ],
)
def test_eligible(skills, langs, cap, q, expected):
    assert policy.eligible(skills, langs, cap, q[0], q[1], q[2]) is expected


def test_select_longest_idle():
    cands = [("b", 10.0, 5), ("a", 10.0, 5), ("c", 5.0, 1), ("d", 5.0, 9)]
    assert policy.select_agent("longest_idle", cands) == "d"
    assert policy.select_agent("longest_idle", cands[:2]) == "a"
    assert policy.select_agent("longest_idle", [("x", 1.0, 1), ("y", 1.0, 2)]) == "y"


def test_select_most_proficient():
    cands = [("b", 10.0, 5), ("a", 12.0, 9), ("c", 5.0, 9), ("d", 1.0, 1)]
    assert policy.select_agent("most_proficient", cands) == "c"
    assert policy.select_agent("most_proficient", [("b", 1.0, 9), ("a", 1.0, 9)]) == "a"
    assert policy.select_agent("most_proficient", []) is None


def test_expected_wait():
    assert policy.expected_wait(0, 180.0, 3, False) == 0.0
    assert policy.expected_wait(1, 180.0, 3, True) == 0.0
    assert policy.expected_wait(1, 180.0, 3, False) == pytest.approx(60.0)
    assert policy.expected_wait(2, 180.0, 3, True) == pytest.approx(120.0)
    # No staffed slot: no finite wait (issue 9), the documented sentinel.
    assert policy.expected_wait(4, 100.0, 0, False) == policy.UNBOUNDED_WAIT_S


def test_update_aht_ewma():
    aht = 100.0
    aht = policy.update_aht(aht, 200.0, alpha=0.1)
    assert aht == pytest.approx(110.0)
    for _ in range(200):
        aht = policy.update_aht(aht, 50.0, alpha=0.1)
    assert aht == pytest.approx(50.0, abs=1e-6)
    # The default factor (issue 9: smoother, about the last 50 calls).
    assert policy.update_aht(100.0, 200.0) == pytest.approx(100.0 + policy.AHT_ALPHA * 100.0)


def sl(abandons, threshold=20.0):
    return ServiceLevelDefinition(threshold_s=threshold, abandons=abandons)


FINISHED = [
    (True, 5.0),  # answered within
    (True, 20.0),  # answered exactly at T counts as within
    (True, 40.0),  # answered late
    (False, 3.0),  # short abandon
    (False, 60.0),  # long abandon
]


def test_service_level_count_against():
    assert policy.service_level(FINISHED, sl("count_against")) == pytest.approx(2 / 5)


def test_service_level_exclude():
    assert policy.service_level(FINISHED, sl("exclude")) == pytest.approx(2 / 3)


def test_service_level_short_excluded():
    assert policy.service_level(FINISHED, sl("short_excluded")) == pytest.approx(2 / 4)


def test_service_level_empty_denominator():
    assert policy.service_level([], sl("count_against")) == -1.0
    assert policy.service_level([(False, 3.0)], sl("exclude")) == -1.0
    assert policy.service_level([(False, 3.0)], sl("short_excluded")) == -1.0
    assert policy.service_level([(False, 30.0)], sl("short_excluded")) == 0.0


def test_service_level_counts_agree():
    d = sl("short_excluded")
    assert policy.service_level_from_counts(d, 3, 2, 2, 1) == policy.service_level(FINISHED, d)
