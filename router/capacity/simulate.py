"""One site's queue simulated with the real engine, for checking Erlang A (issue 12 §3).

:func:`simulate_queue` plays an M/M/N+M queue — ``agents`` identical agents, Poisson
arrivals, exponential handle times, callers who hang up after an exponential patience —
through one :class:`router.engine.Engine` on simulated time (no clock, no sleeping;
seeded and deterministic), and measures what :func:`router.erlang.erlang_a` predicts:
P(abandon), P(wait), the mean wait of all arrivals (``asa_s``, callers who hung up count
with the time they waited) and the service level within ``threshold_s`` (the fraction of
all arrivals answered within it: abandons count against it).

Built on the what-if simulator (:mod:`router.whatif`), which already has everything the
model needs: its traffic is :func:`router.whatif.poisson_arrivals` (a
:class:`~router.whatif.Stream` with exponential handle times and exponential patience),
and its calls are played by the rules of :func:`router.whatif.replay` for one site
(every agent signed in and ready, offers accepted at once, talk = handle time minus the
queue's wrap-up, the engine's wrap-up and offer deadlines run by ``tick``, a caller
hangs up ``patience_s`` after arriving if still queued; events of one instant in the
order ticks, completions, hang-ups, arrivals). The replay itself reports only totals
(and the ASA of answered calls); the measurement needs every call's wait, per batch,
over runs of thousands of hours. So the loop below is that single-site path of
``replay`` with per-call bookkeeping, arrivals generated lazily a batch at a time (a
Poisson stream restarted at a batch boundary is the same Poisson stream), memory
bounded by the calls in the system. ``tests/test_capacity_simulate.py`` checks that it
gives exactly ``replay``'s answered, abandoned and waits on the same arrivals. No
overflow policy is involved (one site); the cluster replay is ``replay`` itself.

Measurement: the first ``warmup_h`` simulated hours start from an empty queue and are
not measured; the next ``hours`` are split into ``batches`` batches of equal length by
arrival time; every arrival of a batch counts for it with its outcome (the run goes on
until every measured call ended). A figure is the ratio over all measured arrivals; its
standard error is that of the batch means (``stdev(batch figures) / sqrt(batches)``),
which holds for correlated waits as long as a batch is much longer than the queue's
memory (a batch of hours against handle times and patience of minutes).
"""

from __future__ import annotations

import heapq
import math
import random
import statistics
from collections.abc import Iterator
from typing import Any

from router.config import SiteConfig, parse_site
from router.engine import Engine
from router.erlang import erlang_a
from router.model import AssignmentOffered
from router.whatif import Arrival, Stream, poisson_arrivals

SITE = "sim"
SKILL = "s"
QUEUE = "q"

# at one instant, as router.whatif.simulator: ticks, completions, hang-ups, arrivals
_TICK, _COMPLETE, _ABANDON, _ARRIVE = range(4)


def queue_site(agents: int, aht_s: float, threshold_s: float = 20.0) -> SiteConfig:
    """The simulated site: one voice queue (wrap-up 0, the engine's AHT prior ``aht_s``,
    abandons counting against the service level as in Erlang A) and ``agents`` agents."""
    return parse_site({
        "site": {"name": SITE, "region": "sim"},
        "routing": {"offer_timeout_s": 300, "repeat_window_h": 0, "ended_call_retention": 100},
        "queues": [{
            "name": QUEUE, "skill": SKILL, "channel": "voice", "wrap_up_s": 0, "aht_s": aht_s,
            "max_length": 1_000_000,
            "service_level": {"threshold_s": threshold_s, "abandons": "count_against"},
        }],
        "agents": [{"id": "a", "count": agents, "skills": {SKILL: 5}}],
    })  # fmt: skip


def play(cfg: SiteConfig, arrivals: Iterator[tuple[int, Arrival]]) -> Iterator[tuple[int, Arrival, bool, float]]:
    """Play ``(tag, arrival)`` pairs (in arrival order, times > 0, each with its
    ``handle_s`` and ``patience_s``) through one engine by the single-site rules of
    :func:`router.whatif.replay`; yield ``(tag, arrival, answered, waited_s)`` for every
    call when it is answered or hangs up. The engine's call ids are ``c<n>`` in arrival
    order (``Arrival.call_id`` is not read: batches may repeat ids)."""
    eng = Engine(cfg)
    wrap = {q.name: q.wrap_up_s for q in cfg.queues}
    heap: list[tuple[float, int, int, Any]] = []
    seq = 0
    tick_at: float | None = None
    calls: dict[str, list] = {}  # call id -> [tag, arrival, state]; state 0 queued, 1 answered
    done: list[tuple[int, Arrival, bool, float]] = []
    n = 0

    def push(t: float, kind: int, payload: Any) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (t, kind, seq, payload))

    def apply(cmd: dict) -> Any:
        nonlocal tick_at
        t = cmd["t"]
        out = eng.apply(cmd)
        for fx in out.effects:
            if type(fx) is AssignmentOffered:
                view = eng.apply({"op": "accept", "t": t, "agent_id": fx.agent_id,
                                  "assignment_id": fx.assignment_id}).result  # fmt: skip
                c = calls[fx.call_id]
                c[2] = 1
                a = c[1]
                done.append((c[0], a, True, t - a.at))
                push(t + max(0.0, a.handle_s - wrap[view.queue]), _COMPLETE, fx.call_id)
        nd = eng.next_deadline()
        if nd is not None and (tick_at is None or nd < tick_at):
            tick_at = nd
            push(max(nd, t), _TICK, None)
        return out.result

    def next_arrival() -> None:
        nxt = next(arrivals, None)
        if nxt is not None:
            push(nxt[1].at, _ARRIVE, nxt)

    next_arrival()
    first = True
    while heap:
        t, kind, _, payload = heapq.heappop(heap)
        if first:  # staffing as configured, from the first arrival on (as replay)
            first = False
            for aid in cfg.agent_profiles():
                apply({"op": "sign_in", "t": t, "agent_id": aid})
                apply({"op": "set_state", "t": t, "agent_id": aid, "state": "ready"})
        if kind == _ARRIVE:
            tag, a = payload
            cid = f"c{n}"
            n += 1
            calls[cid] = [tag, a, 0]
            next_arrival()
            res = apply({"op": "offer", "t": t, "call_id": cid, "channel": a.channel, "skill": a.skill})
            if res.call.state == "rejected":
                raise ValueError(f"call {cid} rejected by the engine: {res.call.reason}")
            if calls[cid][2] == 0 and math.isfinite(a.patience_s):
                push(t + a.patience_s, _ABANDON, cid)
        elif kind == _COMPLETE:
            del calls[payload]
            apply({"op": "complete", "t": t, "call_id": payload, "resolved": True})
        elif kind == _ABANDON:
            c = calls.get(payload)
            if c is not None and c[2] == 0:
                del calls[payload]
                apply({"op": "abandon", "t": t, "call_id": payload, "reason": "patience"})
                done.append((c[0], c[1], False, t - c[1].at))
        elif tick_at == t:  # else superseded by an earlier deadline
            tick_at = None
            apply({"op": "tick", "t": t})
        if done:
            yield from done
            done.clear()


def simulate_queue(
    agents: int,
    arrivals_per_hour: float,
    aht_s: float,
    patience_s: float | None,
    hours: float,
    seed: int,
    *,
    threshold_s: float = 20.0,
    batches: int = 20,
    warmup_h: float = 1.0,
) -> dict[str, Any]:
    """Simulate ``hours`` measured hours (after ``warmup_h``) of an M/M/N+M queue with
    the real engine (see the module docstring); ``patience_s`` None or inf = callers
    never hang up (M/M/N). Same arguments, same result.

    Returns ``{"agents", "arrivals_per_hour", "aht_s", "patience_s", "hours",
    "warmup_h", "seed", "threshold_s", "batches", "calls", "simulated_hours",
    "p_abandon", "p_wait", "asa_s", "service_level", "se": {the four},
    "exact": {the four, from router.erlang.erlang_a}}`` — ``calls`` the measured
    arrivals, ``se`` the batch-means standard errors. Raises ValueError for a bad
    figure."""
    if not (isinstance(agents, int) and agents >= 1):
        raise ValueError(f"agents must be an integer >= 1, got {agents!r}")
    for name, x in (("arrivals_per_hour", arrivals_per_hour), ("aht_s", aht_s), ("hours", hours)):
        if not (math.isfinite(x) and x > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {x!r}")
    if patience_s is not None and not patience_s > 0:
        raise ValueError(f"patience_s must be > 0 (None or inf = never hang up), got {patience_s!r}")
    if not (isinstance(batches, int) and batches >= 2):
        raise ValueError(f"batches must be an integer >= 2 (standard errors), got {batches!r}")
    if not (math.isfinite(warmup_h) and warmup_h >= 0):
        raise ValueError(f"warmup_h must be a finite number >= 0, got {warmup_h!r}")
    if not (math.isfinite(threshold_s) and threshold_s > 0):
        raise ValueError(f"threshold_s must be a finite number > 0, got {threshold_s!r}")
    patience = None if patience_s is None or math.isinf(patience_s) else float(patience_s)
    stream = Stream(site=SITE, skill=SKILL, rate_per_h=float(arrivals_per_hour), handle_s=float(aht_s),
                    patience_s=patience)  # fmt: skip
    batch_s = hours * 3600.0 / batches
    # chunk 0 the warm-up (tag -1), then one chunk per batch; engine times start at 1 s
    spans = ([(-1, 1.0, warmup_h * 3600.0)] if warmup_h > 0 else []) + [
        (b, 1.0 + warmup_h * 3600.0 + b * batch_s, batch_s) for b in range(batches)
    ]
    rng = random.Random(seed)
    seeds = [rng.getrandbits(63) for _ in spans]

    def traffic() -> Iterator[tuple[int, Arrival]]:
        for (tag, start, length), s in zip(spans, seeds):
            for a in poisson_arrivals([stream], length, seed=s, start=start):
                yield tag, a

    n = [0] * batches
    waited = [0] * batches
    abandoned = [0] * batches
    wait_sum = [0.0] * batches
    within = [0] * batches
    for tag, _a, answered, w in play(queue_site(agents, aht_s, threshold_s), traffic()):
        if tag < 0:
            continue
        n[tag] += 1
        waited[tag] += w > 0.0
        wait_sum[tag] += w
        if answered:
            within[tag] += w <= threshold_s
        else:
            abandoned[tag] += 1

    total = sum(n)
    figures = {
        "p_abandon": (abandoned, total and sum(abandoned) / total),
        "p_wait": (waited, total and sum(waited) / total),
        "asa_s": (wait_sum, total and sum(wait_sum) / total),
        "service_level": (within, total and sum(within) / total),
    }
    se = {}
    for k, (per, _) in figures.items():
        means = [x / m for x, m in zip(per, n) if m]
        se[k] = statistics.stdev(means) / math.sqrt(len(means)) if len(means) >= 2 else math.nan
    ex = erlang_a(agents, arrivals_per_hour / 3600.0, aht_s, patience)
    return {
        "agents": agents, "arrivals_per_hour": arrivals_per_hour, "aht_s": aht_s, "patience_s": patience,
        "hours": hours, "warmup_h": warmup_h, "seed": seed, "threshold_s": threshold_s, "batches": batches,
        "calls": total, "simulated_hours": warmup_h + hours,
        **{k: v for k, (_, v) in figures.items()},
        "se": se,
        "exact": {"p_abandon": ex.p_abandon, "p_wait": ex.p_wait, "asa_s": ex.asa_s,
                  "service_level": ex.service_level(threshold_s)},
    }  # fmt: skip
