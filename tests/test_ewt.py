"""Expected-wait announcements that account for callers hanging up (issue 9).

The estimator (router.erlang.erlang_a_delay, router.policy.expected_wait), what a queue
learns of its callers' patience (router.policy.update_patience / abandon_rate, kept by
the engine's queue records), the "no finite wait" of an unstaffed queue and how the
overflow policy reads it, and snapshot / restore / replay of the learned state.
"""

from __future__ import annotations

import copy
import json
import math
import random

import pytest

from router import erlang, policy
from router.config import parse_site
from router.engine import Engine
from router.model import AssignmentOffered
from router.overflow import LoadSnapshot, PeerLoad, decide, local_queue, parse_policy, site_load
from router.policy import UNBOUNDED_WAIT_S


def brute_delay(k: int, n: int, aht: float, theta: float) -> float:
    return sum(1.0 / (n / aht + j * theta) for j in range(k))


# --- the formula -------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 7, 16, 17, 40, 500, 20_000])
@pytest.mark.parametrize("theta", [1e-9, 1 / 600, 1 / 120, 0.5, 20.0])
@pytest.mark.parametrize("n, aht", [(1, 180.0), (10, 180.0), (300, 30.0)])
def test_erlang_a_delay_is_the_sum_over_the_callers_ahead(k, theta, n, aht):
    assert erlang.erlang_a_delay(k, n, aht, theta) == pytest.approx(brute_delay(k, n, aht, theta), rel=1e-9)


@pytest.mark.parametrize("k, n, aht", [(1, 1, 180.0), (3, 3, 180.0), (17, 10, 100.0), (9999, 7, 33.3)])
def test_without_abandonment_it_is_k_aht_over_n(k, n, aht):
    assert erlang.erlang_a_delay(k, n, aht, 0.0) == k * aht / n  # exactly the M/M/N figure
    # the policy gives exactly what it gave before issue 9 for a staffed queue
    assert policy.expected_wait(k, aht, n, False) == k * aht / max(1, n)
    assert policy.expected_wait(k, aht, n, False, 0.0) == k * aht / n


def test_it_decreases_with_the_abandonment_rate():
    for k in (2, 5, 16, 17, 100, 5000):
        waits = [policy.expected_wait(k, 180.0, 10, False, th) for th in (0.0, 1e-4, 1 / 600, 1 / 120, 1 / 30, 1.0)]
        assert all(a > b for a, b in zip(waits, waits[1:])), (k, waits)
    # The head of the queue does not depend on the others' patience: 1 / (N mu).
    assert policy.expected_wait(1, 180.0, 10, False, 1 / 120) == pytest.approx(18.0)
    # A long queue of impatient callers: about log(k) / theta, far below k AHT / N.
    k, th = 1000, 1 / 120
    w = policy.expected_wait(k, 180.0, 10, False, th)
    assert w < 0.05 * k * 18.0
    assert w == pytest.approx(math.log(1 + k * th / (10 / 180)) / th, rel=0.02)


def test_edge_cases_of_the_policy():
    assert policy.expected_wait(0, 180.0, 10, False, 0.01) == 0.0  # not queued
    assert policy.expected_wait(1, 180.0, 10, True, 0.01) == 0.0  # a free agent takes it
    assert policy.expected_wait(2, 180.0, 10, True, 0.0) == pytest.approx(36.0)
    # A huge finite estimate is capped at the sentinel, never above it.
    assert policy.expected_wait(1_000_000, 86_400.0, 1, False) == UNBOUNDED_WAIT_S
    with pytest.raises(ValueError):
        erlang.erlang_a_delay(3, 2, 180.0, -1.0)
    with pytest.raises(ValueError):
        erlang.erlang_a_delay(3, 0, 180.0, 0.0)
    with pytest.raises(ValueError):
        erlang.erlang_a_delay(3, 2, math.inf, 0.0)


@pytest.mark.parametrize("theta", [0.0, 1 / 120])
@pytest.mark.parametrize("position", [1, 2, 50])
def test_an_unstaffed_queue_announces_no_finite_wait(position, theta):
    w = policy.expected_wait(position, 180.0, 0, False, theta)
    assert w == UNBOUNDED_WAIT_S and w >= 1e9


# --- learning the patience ----------------------------------------------------------------


def test_patience_statistics_are_censored_mle_with_a_prior():
    a, e = 0.0, 0.0
    assert policy.abandon_rate(a, e) == 0.0
    # answered at once: no information
    assert policy.update_patience(a, e, False, 0.0) == (0.0, 0.0)
    a, e = policy.update_patience(a, e, True, 10.0)  # hung up after 10 s
    assert (a, e) == (1.0, 10.0)
    assert policy.abandon_rate(a, e) == pytest.approx(1 / (10.0 + policy.PATIENCE_PRIOR_S))
    a, e = policy.update_patience(a, e, False, 30.0)  # answered after 30 s: exposure only
    keep = 1 - 1 / policy.PATIENCE_WINDOW
    assert (a, e) == (pytest.approx(keep), pytest.approx(10.0 * keep + 30.0))


def test_patience_learned_from_exponential_callers():
    """Callers with exponential patience of mean 120 s, answered after exponential waits
    of mean 60 s if still there: the learned rate is about 1/120."""
    rng = random.Random(7)
    a = e = 0.0
    for _ in range(20_000):
        patience, service = rng.expovariate(1 / 120), rng.expovariate(1 / 60)
        a, e = policy.update_patience(a, e, patience < service, min(patience, service))
    assert policy.abandon_rate(a, e) * 120 == pytest.approx(1.0, abs=0.2)


# --- the engine -------------------------------------------------------------------------


def make_site(agents: int = 2, aht: float = 100.0):
    return parse_site({
        "site": {"name": "ewt", "region": "r"},
        "routing": {"offer_timeout_s": 60, "repeat_window_h": 0},
        "queues": [{"name": "q", "skill": "s", "channel": "voice", "wrap_up_s": 0, "aht_s": aht}],
        "agents": [{"id": "a", "count": agents, "skills": {"s": 5}}],
    })  # fmt: skip


def offer(e: Engine, cid: str, t: float):
    return e.apply({"op": "offer", "t": t, "call_id": cid, "channel": "voice", "skill": "s"})


def answer_all(e: Engine, out, t: float, cmds: list[dict] | None = None) -> list[str]:
    """Accept every offer the outcome rang (agents answer at once)."""
    got = []
    for fx in out.effects:
        if isinstance(fx, AssignmentOffered):
            cmd = {"op": "accept", "t": t, "agent_id": fx.agent_id, "assignment_id": fx.assignment_id}
            e.apply(cmd)
            if cmds is not None:
                cmds.append(cmd)
            got.append(fx.call_id)
    return got


def staffed_engine(cmds: list[dict] | None = None) -> Engine:
    e = Engine(make_site())
    for aid in ("a-001", "a-002"):
        for cmd in ({"op": "sign_in", "t": 0, "agent_id": aid},
                    {"op": "set_state", "t": 0, "agent_id": aid, "state": "ready"}):  # fmt: skip
            e.apply(cmd)
            if cmds is not None:
                cmds.append(cmd)
    return e


def learning_stream(e: Engine, cmds: list[dict]) -> None:
    """Both agents busy from t=1; four callers wait: c3 hangs up after 20 s, c4 after
    40 s; c5 and c6 are answered after 49 and 60 s when c1 and c2 end."""

    def run(cmd):
        cmds.append(cmd)
        out = e.apply(cmd)
        answer_all(e, out, cmd["t"], cmds)
        return out

    for i in range(1, 7):
        run({"op": "offer", "t": float(i), "call_id": f"c{i}", "channel": "voice", "skill": "s"})
    run({"op": "abandon", "t": 23.0, "call_id": "c3"})
    run({"op": "abandon", "t": 44.0, "call_id": "c4"})
    run({"op": "complete", "t": 54.0, "call_id": "c1"})  # c5 answered at 54: waited 49
    run({"op": "complete", "t": 66.0, "call_id": "c2"})  # c6 answered at 66: waited 60


def expected_stats() -> tuple[float, float]:
    a = e = 0.0
    for abandoned, waited in ((True, 20.0), (True, 40.0), (False, 49.0), (False, 60.0)):
        a, e = policy.update_patience(a, e, abandoned, waited)
    return a, e


def test_the_engine_learns_its_callers_patience_from_commands():
    cmds: list[dict] = []
    e = staffed_engine(cmds)
    q = e._queues["q"]
    learning_stream(e, cmds)
    a, x = expected_stats()
    assert (q.pat_abandons, q.pat_exposure) == (pytest.approx(a), pytest.approx(x))
    theta = policy.abandon_rate(a, x)
    assert q.abandon_rate() == pytest.approx(theta) and theta > 0
    # Reads change nothing.
    before = json.dumps(e.snapshot(), sort_keys=True)
    e.queues(), e.estimate("s", "voice"), e.expected_wait("c5")
    assert json.dumps(e.snapshot(), sort_keys=True) == before
    # Announcements use it: both agents busy, three new callers.
    aht = q.aht
    for i, t in ((7, 70.0), (8, 71.0), (9, 72.0)):
        r = offer(e, f"c{i}", t).result
        assert r.position == i - 6
        assert r.expected_wait_s == pytest.approx(erlang.erlang_a_delay(i - 6, 2, aht, theta))
        assert r.expected_wait_s < (i - 6) * aht / 2 or i == 7
    assert e.expected_wait("c9") == pytest.approx(erlang.erlang_a_delay(3, 2, aht, theta))
    assert e.queue("q").expected_wait_s == pytest.approx(erlang.erlang_a_delay(4, 2, aht, theta))
    assert e.estimate("s", "voice").expected_wait_s == e.queue("q").expected_wait_s


def test_an_unstaffed_queue_in_the_engine():
    e = Engine(make_site())
    r = offer(e, "c1", 1).result
    assert r.position == 1 and r.expected_wait_s == UNBOUNDED_WAIT_S
    assert e.expected_wait("c1") == UNBOUNDED_WAIT_S
    assert e.queue("q").expected_wait_s == UNBOUNDED_WAIT_S
    # Signed in but NOT_READY staffs nothing either.
    e.apply({"op": "sign_in", "t": 2, "agent_id": "a-001"})
    assert e.queue("q").agents_staffed == 1
    assert e.expected_wait("c1") == UNBOUNDED_WAIT_S
    # Once an agent is ready the wait is finite again.
    out = e.apply({"op": "set_state", "t": 3, "agent_id": "a-001", "state": "ready"})
    assert answer_all(e, out, 3) == ["c1"]
    r2 = offer(e, "c2", 4).result
    assert r2.position == 1 and r2.expected_wait_s == pytest.approx(100.0)  # 1 * AHT / 1


# --- snapshot, restore, replay ------------------------------------------------------------


def test_snapshot_restore_and_replay_keep_the_learned_patience():
    cmds: list[dict] = []
    e = staffed_engine(cmds)
    learning_stream(e, cmds)
    snap = e.snapshot()
    assert snap["queues"]["q"]["patience"] == list(expected_stats())
    text = json.dumps(snap, sort_keys=True)
    restored = Engine.restore(make_site(), json.loads(text))
    q1, q2 = e._queues["q"], restored._queues["q"]
    assert (q2.pat_abandons, q2.pat_exposure, q2.aht) == (q1.pat_abandons, q1.pat_exposure, q1.aht)
    assert json.dumps(restored.snapshot(), sort_keys=True) == text
    replayed = Engine(make_site())
    for cmd in cmds:
        replayed.apply(copy.deepcopy(cmd))
    assert json.dumps(replayed.snapshot(), sort_keys=True) == text
    # All three announce the same wait to the next caller, and stay equal after.
    results = [offer(x, "c7", 70.0).result.expected_wait_s for x in (e, restored, replayed)]
    assert results[0] == results[1] == results[2] < 100.0
    assert len({json.dumps(x.snapshot(), sort_keys=True) for x in (e, restored, replayed)}) == 1


def test_a_snapshot_without_patience_restores_with_nothing_learned():
    cmds: list[dict] = []
    e = staffed_engine(cmds)
    learning_stream(e, cmds)
    old = e.snapshot()
    del old["queues"]["q"]["patience"]  # as written before issue 9
    r = Engine.restore(make_site(), old)
    q = r._queues["q"]
    assert (q.pat_abandons, q.pat_exposure, q.abandon_rate()) == (0.0, 0.0, 0.0)
    assert r.snapshot()["queues"]["q"]["patience"] == [0.0, 0.0]
    # It learns again from the next waits.
    offer(r, "c7", 70.0)
    r.apply({"op": "abandon", "t": 80.0, "call_id": "c7"})
    assert q.abandon_rate() == pytest.approx(1 / (10.0 + policy.PATIENCE_PRIOR_S))


# --- what overflow makes of it ------------------------------------------------------------


def test_overflow_leaves_an_unstaffed_queue_and_never_picks_one():
    e = Engine(make_site())
    r = offer(e, "c1", 1).result
    qv = e.queue("q")
    # Its load snapshot is strict JSON that peers can read (no Infinity / null).
    load = site_load("lyon", "emea", "inhouse", e.queues(), {}, e.counts_by_state())
    raw = load.model_dump_json()
    assert "Infinity" not in raw and "null" not in raw
    back = LoadSnapshot.model_validate_json(raw)
    assert back.queues["q"].expected_wait_s == UNBOUNDED_WAIT_S
    # The call leaves for a staffed peer (wait threshold, and the margin rule too).
    local = local_queue("lyon", "emea", qv, None, r.expected_wait_s)
    pol = parse_policy({"queues": {"q": {"wait_threshold": {"factor": 1.0},
                                         "margin": {"seconds": 30, "ratio": 0.2}}}})  # fmt: skip
    staffed_peer = LoadSnapshot(site="montreal", region="amer", queues={"q": back.queues["q"].model_copy(
        update={"expected_wait_s": 600.0, "staffed": 3, "length": 20})})  # fmt: skip
    d = decide("c1", local, pol, {"montreal": PeerLoad(staffed_peer, 0.1)}, now=0.0)
    assert d.target == "montreal", d.reason
    # A peer signed in but with nobody ready publishes the sentinel: never chosen.
    idle_peer = LoadSnapshot(site="paris", region="emea", queues={"q": back.queues["q"].model_copy(
        update={"staffed": 2})})  # fmt: skip
    d = decide("c1", local, pol, {"paris": PeerLoad(idle_peer, 0.1)}, now=0.0)
    assert d.target is None
    busy_local = local_queue("lyon", "emea", qv, None, 120.0)
    d = decide("c1", busy_local, pol, {"paris": PeerLoad(idle_peer, 0.1)}, now=0.0)
    assert d.target is None
