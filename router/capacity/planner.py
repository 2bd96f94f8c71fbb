"""The rebalancer's planner: the what-if search (:mod:`router.capacity.whatif`) on the
state the rebalancer read, run serially or on Ray (:mod:`router.capacity.whatif_run`).

:class:`WhatIfPlanner` is a :data:`router.capacity.rebalancer.Planner`: given the site
files, the policy and modes in force and the targets in force, it simulates every
candidate over the horizon with common random numbers and returns the best one's targets
for every site. Its Ray session starts on the first plan and lasts until :meth:`close`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from router.capacity.rebalancer import PlanInput, PlanOutput
from router.capacity.traffic import TrafficError, streams_from_profile
from router.capacity.whatif import Scenario, generate_candidates, search
from router.capacity.whatif_run import evaluate, example_traffic_path, partner_prices
from router.config import SiteConfig
from router.plans import SiteTargets
from router.whatif import Stream

log = logging.getLogger("tandem.rebalancer")


def load_streams(traffic: Path | None, sites: Sequence[SiteConfig]) -> list[Stream]:
    """The expected traffic of a profile file, checked against the site files;
    ``ValueError`` naming the file and field. Without a file: the example's traffic for
    the sites of the example that ``sites`` has (none at all for a cluster of others)."""
    path = traffic or example_traffic_path()
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TrafficError(f"{path}: not YAML: {e}") from None
    if traffic is None and isinstance(data, dict) and isinstance(data.get("sites"), dict):
        names = {s.site.name for s in sites}
        data = {**data, "sites": {k: v for k, v in data["sites"].items() if k in names}}
        if not data["sites"]:
            return []
    try:
        return streams_from_profile(data, sites)
    except TrafficError as e:
        raise TrafficError(f"{path}: {e}") from None


class WhatIfPlanner:
    """Plans with the what-if search (see the module docstring). ``streams``: the
    traffic expected over a plan's horizon; ``serial``: no Ray; ``ray_address``: an
    existing Ray cluster (default: a local Ray on loopback); ``partners_dir``: contracts
    for partner prices."""

    def __init__(self, streams: Sequence[Stream], *, ray_address: str | None = None, serial: bool = False,
                 partners_dir: Path | None = None, move_cost: float = 0.5) -> None:
        self.streams = tuple(streams)
        self.ray_address = ray_address
        self.serial = serial
        self.prices = partner_prices(partners_dir, self.streams)
        self.move_cost = move_cost
        self._stack = ExitStack()
        self._session: Any = None
        self._lock = threading.Lock()
        self.last_stats: dict[str, Any] = {}
        self.ray_failures = 0

    def _ray(self) -> Any:
        if self.serial:
            return None
        if self._session is None:
            from router.capacity.raykit import ray_session

            try:
                self._session = self._stack.enter_context(ray_session(self.ray_address))
            except Exception as e:  # noqa: BLE001 - Ray's start failures are of many kinds
                # The same seeds give the same plan serially: plan without Ray rather
                # than not at all, and try Ray again at the next plan.
                log.warning("Ray did not start (%s: %s): this plan is computed in-process",
                            type(e).__name__, e)
                self.ray_failures += 1
                return None
        return self._session

    def __call__(self, inp: PlanInput) -> PlanOutput:
        with self._lock:
            scenario = Scenario(sites=tuple(inp.sites), policy=inp.policy, streams=self.streams,
                                horizon_s=inp.horizon_s, seeds=tuple(range(1, inp.replications + 1)),
                                current={s: t for s, t in inp.current.items() if not t.empty},
                                contingency={s: m for s, m in inp.contingency.items() if m.mode != "normal"},
                                partner_price=self.prices, move_cost=self.move_cost)
            scenario.check()
            candidates = generate_candidates(scenario)
            results, stats = evaluate(scenario, candidates, session=self._ray())
            self.last_stats = stats.to_dict()
            found = search(scenario, candidates, results)
        names = [s.site.name for s in inp.sites]
        targets = {s: found.candidate.targets.get(s, inp.current.get(s, SiteTargets())) for s in names}
        return PlanOutput(targets=targets, expected=found.plan.expected, cluster_before=found.evaluations[0].service_level,
                          cluster_after=found.best.service_level, cost=found.plan.cost, candidate=found.candidate.name,
                          candidates=len(candidates))

    def close(self) -> None:
        self._stack.close()
        self._session = None


def make_planner(streams: Sequence[Stream], *, ray_address: str | None = None, serial: bool = False,
                 partners_dir: Path | None = None) -> WhatIfPlanner:
    return WhatIfPlanner(streams, ray_address=ray_address, serial=serial, partners_dir=partners_dir)
