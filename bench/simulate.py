"""The engine-driven queue simulator: its speed, and its figures against exact Erlang A.

Method: per case (N agents, Poisson arrivals, exponential handle times of mean AHT 180 s,
exponential patience), ``router.capacity.simulate.simulate_queue`` plays ``--hours``
measured simulated hours (after 1 warm-up hour) through the real engine
(``router.engine.Engine``: every offer, accept, complete and abandon a command, the
what-if replay's single-site rules; seeded, no clock). In the same run the anchor plays
the same model, the same number of hours, with a plain-Python M/M/N+M event loop and no
engine (a count of free agents, a heap of completions, a FIFO of waiting callers who
leave lazily at their deadline): what simulated time costs when nothing but the model
is computed. Speed is simulated hours (warm-up included) per CPU-second of this process
(``time.process_time``) for each; ``ratio`` = engine / plain.

Figures, both simulators: P(abandon), P(wait), ASA (the mean wait of all arrivals,
callers who hung up with the time they waited) and the service level within 20 s (all
arrivals answered within it), each with its batch-means standard error (20 batches by
arrival time) and ``z`` = (simulated - exact) / standard error against
``router.erlang.erlang_a``. Target: |z| <= 4 for every figure of every case of the
engine-driven simulator.

Output (``--json``): one line per case ``{"case", "agents", "arrivals_per_hour",
"aht_s", "patience_s", "hours", "calls", "engine_hours_per_cpu_s",
"plain_hours_per_cpu_s", "ratio", "engine": {figure: {"sim", "exact", "se", "z"}},
"plain": {...}}``, then ``{"engine_hours_per_cpu_min", "plain_hours_per_cpu_min",
"ratio", "worst_abs_z", "plain_worst_abs_z", "target", "met", "seconds"}`` (the speeds
of the whole run: all cases' hours over all cases' CPU time).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import statistics
import sys
import time
from collections import deque

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from router.capacity.simulate import simulate_queue  # after the sys.path fix
from router.erlang import erlang_a

AHT_S = 180.0
THRESHOLD_S = 20.0
BATCHES = 20
WARMUP_H = 1.0
TARGET_Z = 4.0
FIGURES = ("p_abandon", "p_wait", "asa_s", "service_level")

#: (case, agents, arrivals per hour, mean patience s): 0.9-1.2 Erlangs per agent
CASES = (
    ("n10-load1.0-pat120", 10, 200.0, 120.0),
    ("n10-load0.9-pat300", 10, 180.0, 300.0),
    ("n10-load1.2-pat60", 10, 240.0, 60.0),
    ("n15-load1.1-pat180", 15, 330.0, 180.0),
)


def plain_queue(agents: int, per_hour: float, aht_s: float, patience_s: float, hours: float, seed: int) -> dict:
    """M/M/N+M without the engine: the same measurement as ``simulate_queue``."""
    rng = random.Random(seed)
    lam, mu, theta = per_hour / 3600.0, 1.0 / aht_s, 1.0 / patience_s
    start, end = WARMUP_H * 3600.0, (WARMUP_H + hours) * 3600.0
    batch_s = (end - start) / BATCHES
    n = [0] * BATCHES
    waited = [0] * BATCHES
    abandoned = [0] * BATCHES
    wait_sum = [0.0] * BATCHES
    within = [0] * BATCHES
    free = agents
    busy: list[float] = []  # completion times
    queue: deque[tuple[float, float, int]] = deque()  # (arrival, hang-up time, batch)
    t = rng.expovariate(lam)

    def serve(now: float) -> None:
        nonlocal free
        while queue:
            at, gone, b = queue.popleft()
            if gone <= now:  # hung up before this agent was free
                if b >= 0:
                    abandoned[b] += 1
                    wait_sum[b] += gone - at
                continue
            if b >= 0:
                wait_sum[b] += now - at
                within[b] += now - at <= THRESHOLD_S
            heapq.heappush(busy, now + rng.expovariate(mu))
            return
        free += 1

    while t < end or busy:
        if busy and (busy[0] <= t or t >= end):
            serve(heapq.heappop(busy))
            continue
        b = int((t - start) // batch_s) if t >= start else -1
        if b >= 0:
            n[b] += 1
        if free:
            free -= 1
            if b >= 0:
                within[b] += 1
            heapq.heappush(busy, t + rng.expovariate(mu))
        else:
            if b >= 0:
                waited[b] += 1
            queue.append((t, t + rng.expovariate(theta), b))
        t += rng.expovariate(lam)
    for at, gone, b in queue:  # nobody left to answer them
        if b >= 0:
            abandoned[b] += 1
            wait_sum[b] += gone - at
    total = sum(n)
    out: dict = {"calls": total, "se": {}}
    for k, per in zip(FIGURES, (abandoned, waited, wait_sum, within)):
        out[k] = sum(per) / total
        out["se"][k] = statistics.stdev(x / m for x, m in zip(per, n)) / math.sqrt(BATCHES)
    return out


def compare(r: dict, exact: dict) -> dict:
    return {
        k: {"sim": round(r[k], 5), "exact": round(exact[k], 5), "se": round(r["se"][k], 5),
            "z": round((r[k] - exact[k]) / r["se"][k], 2)}
        for k in FIGURES
    }  # fmt: skip


def run_case(case: tuple, hours: float, seed: int) -> dict:
    name, agents, per_hour, patience = case
    c0 = time.process_time()
    r = simulate_queue(agents, per_hour, AHT_S, patience, hours, seed, threshold_s=THRESHOLD_S,
                       batches=BATCHES, warmup_h=WARMUP_H)  # fmt: skip
    c1 = time.process_time()
    p = plain_queue(agents, per_hour, AHT_S, patience, hours, seed)
    c2 = time.process_time()
    ex = erlang_a(agents, per_hour / 3600.0, AHT_S, patience)
    exact = {"p_abandon": ex.p_abandon, "p_wait": ex.p_wait, "asa_s": ex.asa_s,
             "service_level": ex.service_level(THRESHOLD_S)}  # fmt: skip
    sim_h = WARMUP_H + hours
    return {
        "case": name, "agents": agents, "arrivals_per_hour": per_hour, "aht_s": AHT_S,
        "patience_s": patience, "hours": hours, "calls": r["calls"],
        "engine_hours_per_cpu_s": round(sim_h / (c1 - c0), 1),
        "plain_hours_per_cpu_s": round(sim_h / (c2 - c1), 1),
        "ratio": round((c2 - c1) / (c1 - c0), 4),
        "engine": compare(r, exact), "plain": compare(p, exact),
        "_cpu": (c1 - c0, c2 - c1, sim_h),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per case, then a summary")
    ap.add_argument("--hours", type=float, default=1000.0, help="measured simulated hours per case")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--case", action="append", choices=[c[0] for c in CASES], help="only these cases")
    args = ap.parse_args(argv)
    started = time.monotonic()
    rows = []
    for case in CASES:
        if args.case and case[0] not in args.case:
            continue
        row = run_case(case, args.hours, args.seed)
        rows.append(row)
        shown = {k: v for k, v in row.items() if k != "_cpu"}
        if args.json:
            print(json.dumps(shown), flush=True)
        else:
            figs = ", ".join(f"{k} {v['sim']:.4f} (exact {v['exact']:.4f}, z {v['z']:+.2f})"
                             for k, v in row["engine"].items())
            print(f"{row['case']}: {row['engine_hours_per_cpu_s']} h/CPU-s (plain {row['plain_hours_per_cpu_s']}, "
                  f"ratio {row['ratio']}); {figs}", flush=True)  # fmt: skip
    eng_cpu = sum(r["_cpu"][0] for r in rows)
    plain_cpu = sum(r["_cpu"][1] for r in rows)
    sim_h = sum(r["_cpu"][2] for r in rows)
    worst = max(abs(v["z"]) for r in rows for v in r["engine"].values())
    summary = {
        "engine_hours_per_cpu_min": round(60 * sim_h / eng_cpu),
        "plain_hours_per_cpu_min": round(60 * sim_h / plain_cpu),
        "ratio": round(plain_cpu / eng_cpu, 4),
        "worst_abs_z": worst,
        "plain_worst_abs_z": max(abs(v["z"]) for r in rows for v in r["plain"].values()),
        "target": TARGET_Z,
        "met": worst <= TARGET_Z,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary) if args.json else f"summary: {summary}")
    return 0 if summary["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
