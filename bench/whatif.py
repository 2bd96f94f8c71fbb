"""Plan what-ifs on the example cluster: serial against Ray tasks on this machine.

Method: the example cluster (``sites/``: Lyon, Montréal, the partner CallPro; the
overflow policy ``sites/overflow-policy.json``) under ``tandem demo``'s traffic
(``router/sim/traffic_example.yaml``) for ``--horizon-s`` simulated seconds, with
``--replications`` seeds (common random numbers: every candidate plays the same calls).
:func:`router.capacity.whatif.generate_candidates` gives the candidate plans; every
candidate x seed is one replay of the whole cluster through the real engines and
overflow policy. The anchor is the same work serially in this process, measured in the
same run (``serial_s``, wall time; its first unit is the pilot that measures the cost per
call). Then a local Ray on loopback (``router.capacity.raykit``; ``--ray-address`` for a
cluster) is started and warmed (``ray_start_s``, not in ``ray_s``), and the same units run
as Ray tasks batched to at least ``MIN_TASK_S`` (0.1 s) of estimated work each (``ray_s``:
from the first submission to the last result, scenario upload included).
``identical``: the search's whole result (every evaluation and the chosen plan) is the
same JSON both ways. Target on 2 CPUs: ``speedup`` = serial_s / ray_s >= 1.6. With
``--runs N`` the serial run and a fresh Ray session with its run are repeated N times
(Ray is never up during a serial run) and the figures are medians; ``speedups`` and
``loadavg_1m_before`` list each run's.

Output (``--json``): one object ``{"candidates", "units", "tasks", "min_task_est_s",
"serial_s", "serial_cpu_s", "ray_s", "ray_start_s", "speedup", "cpus", "identical", "target",
"met", "best": {"name", "service_level", "before", "cost"}, "horizon_s", "replications",
"runs", "speedups", "loadavg_1m_before"}`` (``serial_cpu_s``: this process's CPU time in the serial run; well
below ``serial_s`` when other work shared the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from router.capacity.raykit import ray_session  # after the sys.path fix
from router.capacity.whatif import all_units, generate_candidates, plan_batches, search, unit_cost_s
from router.capacity.whatif_run import evaluate, scenario_from_files

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.6


def one_run(sc, candidates, ray_address: str | None, min_task_s: float) -> dict:
    """Serial (Ray not running), then a fresh Ray session and the same units on it."""
    load = os.getloadavg()[0]  # other work on the machine skews both timings
    cpu = time.process_time()
    serial, sstats = evaluate(sc, candidates)
    cpu = time.process_time() - cpu
    a = json.dumps(search(sc, candidates, serial).to_dict(), sort_keys=True)
    with ray_session(ray_address) as session:
        ray_results, rstats = evaluate(sc, candidates, session=session, seconds_per_call=sstats.seconds_per_call,
                                       min_task_s=min_task_s)
        start_s, cpus = session.start_s, session.cpus
    found = search(sc, candidates, ray_results)
    return {"serial_s": sstats.seconds, "serial_cpu_s": cpu, "ray_s": rstats.seconds, "ray_start_s": start_s,
            "speedup": sstats.seconds / rstats.seconds, "cpus": cpus, "tasks": rstats.tasks,
            "spc": sstats.seconds_per_call, "identical": a == json.dumps(found.to_dict(), sort_keys=True),
            "found": found, "load": load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--horizon-s", type=float, default=7200.0, help="simulated seconds of traffic per replay")
    ap.add_argument("--replications", type=int, default=3, help="seeds per candidate")
    ap.add_argument("--runs", type=int, default=1, help="serial + Ray runs; figures are their medians")
    ap.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: a local one)")
    ap.add_argument("--min-task-s", type=float, default=0.1, help="least estimated work of one Ray task")
    args = ap.parse_args()

    sc = scenario_from_files(ROOT / "sites", ROOT / "sites" / "overflow-policy.json", None,
                             horizon_s=args.horizon_s, seeds=tuple(range(1, args.replications + 1)),
                             partners_dir=ROOT / "sites" / "partners")  # fmt: skip
    candidates = generate_candidates(sc)
    runs = [one_run(sc, candidates, args.ray_address, args.min_task_s) for _ in range(max(1, args.runs))]
    med = {k: statistics.median(r[k] for r in runs) for k in ("serial_s", "serial_cpu_s", "ray_s", "ray_start_s",
                                                                "speedup", "spc")}
    found = runs[-1]["found"]
    units = all_units(sc, candidates)
    cost = unit_cost_s(sc, med["spc"])
    est = min(len(x) for x in plan_batches(units, [cost] * len(units), args.min_task_s)) * cost
    identical = all(r["identical"] for r in runs)
    out = {
        "candidates": len(candidates), "units": len(units), "tasks": runs[-1]["tasks"],
        "min_task_est_s": round(est, 3), "serial_s": round(med["serial_s"], 3),
        "serial_cpu_s": round(med["serial_cpu_s"], 3), "ray_s": round(med["ray_s"], 3),
        "ray_start_s": round(med["ray_start_s"], 3), "speedup": round(med["speedup"], 3), "cpus": runs[-1]["cpus"],
        "identical": identical, "target": TARGET, "met": med["speedup"] >= TARGET and identical,
        "best": {"name": found.best.name, "service_level": round(found.best.service_level or 0.0, 6),
                 "before": round(found.evaluations[0].service_level or 0.0, 6), "cost": round(found.best.cost, 3)},
        "horizon_s": sc.horizon_s, "replications": len(sc.seeds), "runs": len(runs),
        "speedups": [round(r["speedup"], 3) for r in runs], "loadavg_1m_before": [round(r["load"], 2) for r in runs],
    }  # fmt: skip
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:16} {v}")


if __name__ == "__main__":
    main()
