"""Benchmark the queue core against heapq on the same steady-state work.

Workload: the classic *hold model* of priority-queue benchmarks. The queue is
prefilled to ``n`` entries; each step pops the next call and pushes a new one
whose key is the popped key plus a random increment (exponential, mean ``n``),
so the size stays at ``n`` and the key distribution is stationary -- like a
contact-center queue, where a new call's key (its arrival time less its class
boost) lands mostly behind the calls already waiting.

* push/pop part: ``IndexedPQ`` (``pop()``, ``push(handle, key)``) and ``heapq``
  over ``(key, handle)`` tuples (``heappop``, ``heappush``) run the same steps
  with the same increments, in the same process, alternating run by run.
  Reported as ns per operation (one step = 2 operations); ``speedup`` is
  heapq / core.
* mixed (core only, heapq cannot do it): the same steps plus, every 4th step,
  ``update`` of the handle just pushed, and every 8th step a ``contains`` check
  and ``remove`` of a handle pushed a while ago followed by a replacement
  ``push``. Reported as ``mixed_ns_per_op`` over all core calls made.

Each figure is the median of ``--runs`` runs of ``--ops`` operations; the GC is
off during timed loops (as in timeit). ``--json`` prints one object per size:
``{"n": ..., "core_ns_per_op": ..., "heapq_ns_per_op": ..., "speedup": ...,
"mixed_ns_per_op": ...}``.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from router.pqueue import IndexedPQ  # noqa: E402  (after the sys.path fix)

DEFAULT_SIZES = (1_000, 100_000, 1_000_000)


def _timed(fn, *args) -> int:
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter_ns()
        fn(*args)
        return time.perf_counter_ns() - t0
    finally:
        gc.enable()


def core_hold(q: IndexedPQ, incs: list[float], h: int) -> None:
    push, pop = q.push, q.pop
    for x in incs:
        _, k = pop()
        push(h, k + x)
        h += 1


def heapq_hold(heap: list[tuple[float, int]], incs: list[float], h: int) -> None:
    push, pop = heapq.heappush, heapq.heappop
    for x in incs:
        k, _ = pop(heap)
        push(heap, (k + x, h))
        h += 1


def core_mixed(q: IndexedPQ, incs: list[float], h: int, back: list[int]) -> int:
    """Hold steps plus updates and removes; returns the number of core calls."""
    push, pop, update, remove = q.push, q.pop, q.update, q.remove
    calls = 0
    for i, x in enumerate(incs):
        _, k = pop()
        push(h, k + x)
        calls += 2
        if i & 3 == 0:
            update(h, k + 2.0 * x)  # reprioritise the call just queued
            calls += 1
            if i & 7 == 0:
                victim = h - back[i]  # abandon a call queued a while ago
                calls += 1
                if victim in q:
                    remove(victim)
                    h += 1
                    push(h, k + x)
                    calls += 2
        h += 1
    return calls


def bench_size(n: int, ops: int, runs: int, seed: int) -> dict[str, float]:
    rnd = random.Random(seed + n)
    steps = ops // 2
    prefill = [rnd.expovariate(1.0) * n for _ in range(n)]
    q = IndexedPQ(n)
    for h, k in enumerate(prefill):
        q.push(h, k)
    heap = [(k, h) for h, k in enumerate(prefill)]
    heapq.heapify(heap)
    h_core = h_heap = n

    core_t, heap_t, mixed_t = [], [], []
    for _ in range(runs):
        incs = [rnd.expovariate(1.0) * n for _ in range(steps)]
        back = [rnd.randrange(1, n + 1) for _ in range(steps)]
        core_t.append(_timed(core_hold, q, incs, h_core) / ops)
        h_core += steps
        heap_t.append(_timed(heapq_hold, heap, incs, h_heap) / ops)
        h_heap += steps
        calls = [0]

        def mixed(incs=incs, back=back, h=h_core) -> None:
            calls[0] = core_mixed(q, incs, h, back)

        elapsed = _timed(mixed)
        mixed_t.append(elapsed / calls[0])
        h_core += 2 * steps + 1  # core_mixed issues at most 2 handles per step
        assert len(q) == n and len(heap) == n
    core = statistics.median(core_t)
    hq = statistics.median(heap_t)
    return {
        "n": n,
        "core_ns_per_op": round(core, 1),
        "heapq_ns_per_op": round(hq, 1),
        "speedup": round(hq / core, 2),
        "mixed_ns_per_op": round(statistics.median(mixed_t), 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per size")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    ap.add_argument("--ops", type=int, default=200_000, help="operations per run")
    ap.add_argument("--runs", type=int, default=5, help="runs per size (median)")
    ap.add_argument("--seed", type=int, default=2024)
    args = ap.parse_args(argv)

    if not args.json:
        print(f"{'n':>9} {'core ns/op':>11} {'heapq ns/op':>12} {'speedup':>8} {'mixed ns/op':>12}")
    for n in args.sizes:
        row = bench_size(n, args.ops, args.runs, args.seed)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            print(
                f"{row['n']:>9} {row['core_ns_per_op']:>11.1f} {row['heapq_ns_per_op']:>12.1f}"
                f" {row['speedup']:>7.2f}x {row['mixed_ns_per_op']:>12.1f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
