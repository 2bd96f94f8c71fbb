"""Running the what-if units of :mod:`router.capacity.whatif`: serially in this process,
or as Ray tasks (:mod:`router.capacity.raykit`), each of at least ``min_task_s`` of work.

The work of a unit is estimated from its calls and a cost per call: the ``seconds_per_call``
given, else measured here on a pilot unit (candidate 0, seed 0: its CPU time over its
calls; its result is kept, not run again). Batches come from
:func:`router.capacity.whatif.plan_batches`. Results are merged by (candidate, seed)
whatever order the tasks finish in, so serial and Ray runs give the same figures.

:func:`scenario_from_files` builds a scenario from the site files, the overflow policy, a
traffic profile and the partner contracts (the edge where files are read).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from router.capacity.traffic import TrafficError, streams_from_profile
from router.capacity.whatif import (
    MIN_TASK_S,
    Candidate,
    Scenario,
    WhatIfPlanError,
    Unit,
    all_units,
    arrivals_for,
    plan_batches,
    run_batch,
    run_unit,
    unit_cost_s,
)
from router.config import load_sites
from router.contracts import parse_contract
from router.overflow import OverflowPolicy, parse_policy
from router.whatif import Stream


@dataclass
class RunStats:
    """How a run went: ``runner`` serial | ray, ``units`` replays, ``tasks`` (batches;
    one per unit serially), ``seconds`` wall time (Ray: submission to the last result),
    ``seconds_per_call`` the cost estimate used, ``min_task_s`` the bound, ``cpus``."""

    runner: str
    units: int
    tasks: int
    seconds: float
    seconds_per_call: float
    min_task_s: float
    cpus: int

    def to_dict(self) -> dict[str, Any]:
        return {"runner": self.runner, "units": self.units, "tasks": self.tasks, "seconds": round(self.seconds, 3),
                "seconds_per_call": self.seconds_per_call, "min_task_s": self.min_task_s, "cpus": self.cpus}


def pilot(scenario: Scenario, candidates: Sequence[Candidate]) -> tuple[float, dict[str, Any]]:
    """Seconds of CPU per call of unit (0, 0), and its summary."""
    calls = max(1, len(arrivals_for(scenario, scenario.seeds[0])))
    c0 = time.process_time()
    summary = run_unit(scenario, candidates[0], scenario.seeds[0])
    return max(1e-7, (time.process_time() - c0) / calls), summary


def evaluate(
    scenario: Scenario,
    candidates: Sequence[Candidate],
    *,
    session: Any = None,
    seconds_per_call: float | None = None,
    min_task_s: float = MIN_TASK_S,
) -> tuple[dict[Unit, dict[str, Any]], RunStats]:
    """Every unit's summary ((candidate index, seed index) -> :func:`run_unit`'s) and the
    run's :class:`RunStats`. ``session``: a :class:`router.capacity.raykit.RaySession`
    (None: serially here). Without ``seconds_per_call`` a pilot unit is timed first
    (on Ray, in this process: its result is used)."""
    units = all_units(scenario, candidates)
    results: dict[Unit, dict[str, Any]] = {}
    t0 = time.perf_counter()
    if seconds_per_call is None and units:
        seconds_per_call, results[units[0]] = pilot(scenario, candidates)
    spc = float(seconds_per_call or 0.0)
    todo = [u for u in units if u not in results]
    if session is None:
        for ci, si in todo:
            results[(ci, si)] = run_unit(scenario, candidates[ci], scenario.seeds[si])
        stats = RunStats("serial", len(units), len(units), time.perf_counter() - t0, spc, min_task_s, 1)
        return results, stats
    ray = session.ray
    cost = unit_cost_s(scenario, spc)
    batches = plan_batches(todo, [cost] * len(todo), min_task_s)
    task = ray.remote(num_cpus=1)(run_batch)
    sref, cref = ray.put(scenario), ray.put(list(candidates))
    refs = [task.remote(sref, cref, b) for b in batches]
    for part in ray.get(refs):
        for ci, si, summary in part:
            results[(ci, si)] = summary
    stats = RunStats("ray", len(units), len(batches), time.perf_counter() - t0, spc, min_task_s, session.cpus)
    return results, stats


def example_traffic_path() -> Path:
    """The traffic profile shipped with the package (``tandem demo``'s own traffic)."""
    return Path(__file__).resolve().parent.parent / "sim" / "traffic_example.yaml"


def partner_prices(partners_dir: Path | None, streams: Sequence[Stream]) -> dict[str, float]:
    """partner -> price of one contact from the contracts in ``partners_dir``
    (``*.yaml``, the file's stem the partner's name): ``per_contact`` plus
    ``per_handled_minute`` x the rate-weighted mean handle time of ``streams`` (what a
    contact costs on average; the search prices calls, not their minutes)."""
    if partners_dir is None or not partners_dir.is_dir():
        return {}
    rate = sum(s.rate_per_h for s in streams)
    mean_min = sum(s.rate_per_h * s.handle_s for s in streams) / rate / 60.0 if rate else 0.0
    out = {}
    for p in sorted(partners_dir.glob("*.yaml")):
        c = parse_contract(p.read_text(), partner=p.stem, source=str(p))
        out[c.partner] = c.price.per_contact + c.price.per_handled_minute * mean_min
    return out


def scenario_from_files(
    sites_dir: Path, policy_file: Path | None, traffic_file: Path | None, *, horizon_s: float = 3600.0,
    seeds: Sequence[int] = (1, 2, 3), partners_dir: Path | None = None, default_partner_price: float = 1.0,
    move_cost: float = 0.5,
) -> Scenario:
    """A :class:`Scenario` from the site files, the overflow policy (JSON; none = no
    overflow), a traffic profile (YAML; None = the example) and the partner contracts
    (prices). Raises ``ValueError`` subclasses naming the file and field."""
    sites = load_sites(sites_dir)
    if not sites:
        raise WhatIfPlanError(f"{sites_dir}: no site files (*.yaml)")
    policy = parse_policy(policy_file.read_text(), str(policy_file)) if policy_file else OverflowPolicy()
    path = traffic_file or example_traffic_path()
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TrafficError(f"{path}: not YAML: {e}") from None
    try:
        streams = streams_from_profile(data, sites)
    except TrafficError as e:
        raise TrafficError(f"{path}: {e}") from None
    sc = Scenario(sites=tuple(sites), policy=policy, streams=tuple(streams), horizon_s=horizon_s, seeds=tuple(seeds),
                  partner_price=partner_prices(partners_dir, streams), default_partner_price=default_partner_price,
                  move_cost=move_cost)
    sc.check()
    return sc
