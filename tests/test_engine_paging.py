"""Engine.calls_page: the O(page) paging behind Admin.ListCalls agrees with calls()."""

from __future__ import annotations

import random

import pytest

from node_fixtures import site_dict
from router.config import parse_site
from router.engine import Engine


def _offer(i: int, t: float, caller: str) -> dict:
    return {
        "op": "offer", "t": t, "call_id": f"p{i:05d}", "channel": "voice", "skill": "billing",
        "language": "fr", "caller": caller, "customer_id": "", "priority_class": "",
        "context": {"ivr_path": [], "bot_transcript": "", "attributes": {}},
    }


def _pages(e: Engine, state: str | None, size: int, scan: int) -> list[str]:
    out, after = [], 0
    for _ in range(10_000):
        page, after = e.calls_page(state, after, size, scan)
        assert len(page) <= size
        out += [c.call_id for c in page]
        if not after:
            return out
    raise AssertionError("paging did not end")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pages_match_calls_through_retention_drops_and_rebuilds(seed):
    doc = site_dict(repeat_window_h=0)
    doc["routing"]["ended_call_retention"] = 100
    e = Engine(parse_site(doc, "<test>"))
    rng = random.Random(seed)
    t = 1.0
    for i in range(3000):
        t += 0.01
        # blacklisted callers end at once (and push old calls out of retention); the
        # others queue (no agent is signed in) and some are abandoned later
        caller = "+33600000666" if rng.random() < 0.7 else f"+3361{i:07d}"
        e.apply(_offer(i, t, caller))
        if rng.random() < 0.1:
            queued = [c.call_id for c in e.calls("queued")]
            if queued:
                e.apply({"op": "abandon", "t": t, "call_id": rng.choice(queued), "reason": "hangup"})
        if i % 97 == 0:  # page now and then, so the index is extended and rebuilt
            for state in (None, "queued", "rejected", "abandoned", "completed"):
                want = [c.call_id for c in e.calls(state)]
                assert _pages(e, state, rng.choice([1, 7, 50]), rng.choice([5, 64, 10_000])) == want


def test_page_validation():
    e = Engine(parse_site(site_dict(), "<test>"))
    with pytest.raises(Exception) as err:
        e.calls_page("nope", 0, 10, 100)
    assert getattr(err.value, "reason", "") == "INVALID_STATE"
    assert e.calls_page(None, 0, 10, 100) == ([], 0)
    # every state of the API's CallState a call can rest in can be listed (ctl get calls
    # --state offers them); OFFERED is only ever passed through within one command
    from router.ctl.commands import _STATES
    from router.v1 import types_pb2

    resting = [n.removeprefix("CALL_STATE_").lower() for n in types_pb2.CallState.keys()
               if n not in ("CALL_STATE_UNSPECIFIED", "CALL_STATE_OFFERED")]
    assert sorted(_STATES) == sorted(resting)
    for state in resting:
        assert e.calls(state) == [] and e.calls_page(state, 0, 10, 100) == ([], 0), state
    with pytest.raises(Exception) as err:
        e.calls("offered")
    assert getattr(err.value, "reason", "") == "INVALID_STATE"
