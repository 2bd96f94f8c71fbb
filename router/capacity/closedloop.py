"""The closed capacity loop on simulated time, pure: a surge scenario, the rebalancer's
controller for :func:`router.whatif.replay`, and the pooled bound (``bench/rebalance.py``).

* :class:`Surge` / :func:`scenario_arrivals`: the calls of one replication: a scenario's
  Poisson streams over the horizon plus a surge (extra Erlangs of one queue of one site
  from ``start_s`` on), seeded; every arm of the bench plays the very same calls;
* :class:`Controller`: what an auto-mode rebalancer does, as the replay's controller hook:
  every call it re-forecasts each (site, queue)'s rate from the arrivals it observed
  since its previous call (handle times and patience as the base streams say: the
  forecast knows them, not the surge), runs the what-if search
  (:func:`router.capacity.whatif.generate_candidates`, :func:`~router.capacity.whatif.search`)
  from the targets in force, and returns the best candidate's targets when they change
  something and gain at least ``min_gain`` of cluster service level; it records every
  target set it returned (``applied``);
* :func:`pooled_bound`: the cluster as one site, an upper bound of what agent moves plus
  overflow can do (see its docstring), and :func:`pooled_arrivals` / :func:`pooled_sites_sl`
  to play the same calls there and read the service level per origin site.

No I/O, no clock: the bench times and prints.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from router.capacity.whatif import (
    MOVE_SIZES,
    START,
    Scenario,
    generate_candidates,
    run_unit,
    search,
)
from router.config import SiteConfig, parse_site
from router.overflow import OverflowPolicy
from router.plans import SiteTargets, diff
from router.whatif import Arrival, Stream, poisson_arrivals
from router.whatif.observe import Observation
from router.whatif.result import ReplayResult, Tally

#: The pooled site's name, and the separator of its per-origin skill and queue names.
POOLED = "pooled"
SEP = "--"


# --- traffic ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Surge:
    """``erlangs`` more of ``site``'s ``queue`` from ``start_s`` (seconds after the first
    instant of the horizon) to the horizon's end, with the handle time and patience of
    that queue's base stream."""

    site: str
    queue: str
    erlangs: float
    start_s: float = 0.0


def surge_stream(sites: Sequence[SiteConfig], streams: Sequence[Stream], surge: Surge) -> Stream:
    """The surge as a :class:`Stream` (rate = Erlangs / handle time of the base stream of
    the same site and queue). ``ValueError`` when the site has no such queue or no base
    stream for it."""
    cfg = next((s for s in sites if s.site.name == surge.site), None)
    q = None if cfg is None else next((q for q in cfg.queues if q.name == surge.queue), None)
    if q is None:
        raise ValueError(f"surge: site {surge.site!r} has no queue {surge.queue!r}")
    base = next((st for st in streams if st.site == surge.site and cfg.queue_for(  # type: ignore[union-attr]
        st.skill, st.channel, st.language or None) is q), None)  # type: ignore[arg-type]
    if base is None:
        raise ValueError(f"surge: no base stream of {surge.site}/{surge.queue} to take handle times from")
    return dataclasses.replace(base, rate_per_h=surge.erlangs * 3600.0 / base.handle_s)


def scenario_arrivals(sites: Sequence[SiteConfig], streams: Sequence[Stream], surge: Surge | None,
                      horizon_s: float, seed: int, start: float = START) -> list[Arrival]:
    """The calls of one replication: ``streams`` over ``[start, start + horizon_s)`` and
    the surge over ``[start + surge.start_s, start + horizon_s)`` (its call ids prefixed
    ``surge-``), in arrival order; a function of the arguments (the seed) alone."""
    out = poisson_arrivals(list(streams), horizon_s, seed=seed, start=start)
    if surge is not None and surge.erlangs > 0 and surge.start_s < horizon_s:
        extra = poisson_arrivals([surge_stream(sites, streams, surge)], horizon_s - surge.start_s,
                                 seed=seed * 7919 + 1, start=start + surge.start_s)
        out += [dataclasses.replace(a, call_id=f"surge-{a.call_id}") for a in extra]
    out.sort(key=lambda a: (a.at, a.call_id))
    return out


# --- the pooled bound -------------------------------------------------------------------


def movable_groups(cfg: SiteConfig) -> list[str]:
    """Groups of an in-house site an agent may be moved into by a plan: every group
    that is not a back-office one (the receivers of :func:`generate_candidates`); none
    for a partner (its agents are not ours)."""
    if cfg.site.kind == "partner":
        return []
    return [g.id for g in cfg.agents if not g.backoffice]


def pooled_bound(sites: Sequence[SiteConfig]) -> SiteConfig:
    """The whole cluster as one site, every agent signed in there: an upper bound of what
    agent moves plus overflow can reach on the same calls.

    * **queues**: one per origin site and queue (``<site>--<queue>``, skill
      ``<skill>--<site>``, the origin queue's language, channel, service-level
      definition, wrap-up and value), so each call is judged by its own origin queue's
      definition, as in the cluster;
    * **agents**: each of every site, with the skills of every site's queue it could
      serve *anywhere* (an agent with skill ``billing`` gets ``billing--lyon``,
      ``billing--montreal``…: overflow and pooling without delay or caps, no value or
      partner rules, no thresholds); an in-house agent a plan may move has the union of
      its own group and every group it may be moved into (:func:`movable_groups`: the
      highest proficiency per skill, every language, the highest capacity per channel)
      and is never gated as back-office (surge mode or a move would un-gate it);
    * **routing**: the largest in-house site's (head starts, agent selection).

    Whatever targets and overflow decisions the cluster takes, every call an agent
    answers there is one this site's agent may answer at that instant, with no transfer
    delay and no cap: an upper bound (up to the engine's order of service)."""
    biggest = max(sites, key=lambda s: (s.site.kind == "inhouse", len(s.agent_profiles()), s.site.name))
    queues: list[dict[str, Any]] = []
    for s in sites:
        for q in s.queues:
            d = q.model_dump(mode="json", exclude_none=True)
            d["name"] = f"{s.site.name}{SEP}{q.name}"
            d["skill"] = f"{q.skill}{SEP}{s.site.name}"
            queues.append(d)
    site_names = [s.site.name for s in sites]
    agents: list[dict[str, Any]] = []
    for s in sites:
        union = movable_groups(s)
        by_id = {g.id: g for g in s.agents}
        for g in s.agents:
            members = [g] + [by_id[x] for x in union if x != g.id]
            skills: dict[str, int] = {}
            langs: set[str] = set()
            cap: dict[str, int] = {}
            for m in members:
                for k, v in m.skills.items():
                    skills[k] = max(skills.get(k, 0), v)
                langs.update(m.languages)
                for ch, n in m.capacity.items():
                    c = getattr(ch, "value", ch)
                    cap[c] = max(cap.get(c, 0), n)
            gated = g.backoffice and not union
            agents.append({
                "id": f"{s.site.name}{SEP}{g.id}", "count": len(g.agent_ids()),
                "skills": {f"{k}{SEP}{o}": v for k, v in sorted(skills.items()) for o in site_names
                           if any(q.skill == k for q in next(x for x in sites if x.site.name == o).queues)},
                "languages": sorted(langs), "capacity": cap, "backoffice": gated,
            })  # fmt: skip
    d = biggest.model_dump(mode="json", exclude_none=True)
    d["site"] = {"name": POOLED, "region": biggest.site.region, "kind": "inhouse", "listen": "127.0.0.1:0",
                 "description": "the cluster as one site, movable agents with their reachable skills"}
    d["routing"]["blacklist_action"] = "reject"
    d["routing"].pop("restricted_queue", None)
    d["queues"] = queues
    d["agents"] = agents
    d["lists"] = {}
    return parse_site(d, "<pooled bound>")


def pooled_arrivals(arrivals: Sequence[Arrival]) -> list[Arrival]:
    """The same calls offered to the pooled site (skill ``<skill>--<origin>``)."""
    return [dataclasses.replace(a, site=POOLED, skill=f"{a.skill}{SEP}{a.site}") for a in arrivals]


def pooled_sites_sl(result: ReplayResult) -> dict[str, Tally]:
    """origin site -> its calls' tally in a pooled replay (from the per-origin queues)."""
    out: dict[str, Tally] = {}
    for qname, t in result.sites[POOLED].queues.items():
        origin = qname.split(SEP, 1)[0] if SEP in qname else "(rejected)"
        out.setdefault(origin, Tally()).merge(t)
    return out


# --- the controller ---------------------------------------------------------------------


def observed_counts(obs: Observation) -> dict[tuple[str, str], int]:
    """(site, queue) -> calls that arrived there since the controller's previous call."""
    return {(site, q): qo.arrivals for site, so in obs.sites.items() for q, qo in so.queues.items()}


def forecast_streams(counts: Mapping[tuple[str, str], int], span_s: float, base: Sequence[Stream],
                     sites: Sequence[SiteConfig]) -> list[Stream]:
    """Each base stream at the rate seen over the last ``span_s`` seconds (``counts``:
    (site, queue) -> calls that arrived in it, per hour), with the queue's handle time
    and patience from ``base`` (what a forecast knows of a queue; a queue with arrivals
    and no base stream is left out: nothing to take its handle time from). Streams of a
    queue with no arrival are left out; ``span_s`` <= 0: the base streams themselves."""
    if span_s <= 0:
        return list(base)
    by_site = {s.site.name: s for s in sites}
    out = []
    for st in base:
        q = by_site[st.site].queue_for(st.skill, st.channel, st.language or None)  # type: ignore[arg-type]
        n = 0 if q is None else counts.get((st.site, q.name), 0)
        if n > 0:
            out.append(dataclasses.replace(st, rate_per_h=n * 3600.0 / span_s))
    return out


@dataclass
class ControlStep:
    """One call of the controller: when (``t``, seconds since the first arrival), what
    it chose (``candidate``, ``gain`` of cluster SL expected, ``applied``: returned),
    ``candidates`` simulated, ``targets`` returned (None when not applied)."""

    t: float
    candidate: str
    gain: float
    applied: bool
    candidates: int
    targets: dict[str, SiteTargets] | None = None


#: Evaluates (scenario, candidates) -> {(candidate, seed): summary}: serial by default,
#: or router.capacity.whatif_run.evaluate on Ray (the runner, not imported here: pure).
Evaluator = Callable[[Scenario, list], Mapping[tuple[int, int], dict[str, Any]]]


def serial_evaluate(scenario: Scenario, candidates: list) -> dict[tuple[int, int], dict[str, Any]]:
    """Every candidate x seed replayed here, in order."""
    return {(ci, si): run_unit(scenario, c, seed) for ci, c in enumerate(candidates)
            for si, seed in enumerate(scenario.seeds)}


@dataclass
class Controller:
    """The auto-mode rebalancer as :func:`router.whatif.replay`'s controller (see the
    module docstring). ``base``: the expected streams (rates, handle times, patience);
    ``plan_horizon_s`` and ``seeds``: the what-if's horizon and replications;
    ``min_gain``: the least expected gain of cluster service level worth a plan.
    ``evaluate``: how the units run (serial default). ``window_s``: the forecast's rates
    are the arrivals of the last control periods adding up to at least this (the base
    streams' rates before ``min_span_s`` of observation); ``move_sizes``: agents per
    move candidate; ``rounds``: searches per call at most, each from the targets the
    previous one chose (greedy; it stops at the first that gains less than ``min_gain``). State: ``current`` the targets in
    force, ``steps`` every call, ``applied`` the target sets returned, in order."""

    sites: Sequence[SiteConfig]
    policy: OverflowPolicy
    base: Sequence[Stream]
    plan_horizon_s: float = 1800.0
    seeds: tuple[int, ...] = (1,)
    min_gain: float = 0.005
    move_cost: float = 0.5
    evaluate: Evaluator = serial_evaluate
    window_s: float = 1200.0
    move_sizes: tuple[int, ...] = MOVE_SIZES
    rounds: int = 1
    min_span_s: float = 60.0
    seen: list[tuple[float, dict[tuple[str, str], int]]] = field(default_factory=list)
    current: dict[str, SiteTargets] = field(default_factory=dict)
    steps: list[ControlStep] = field(default_factory=list)
    applied: list[dict[str, SiteTargets]] = field(default_factory=list)

    def __call__(self, t: float, obs: Observation) -> dict[str, SiteTargets] | None:
        # the forecast: arrivals over the last ``window_s`` (whole control periods)
        if obs.since_s > 0:
            self.seen.append((obs.since_s, observed_counts(obs)))
        span, counts = 0.0, {}  # type: ignore[var-annotated]
        for since, c in reversed(self.seen):
            if span >= self.window_s:
                break
            span += since
            for k, v in c.items():
                counts[k] = counts.get(k, 0) + v
        streams = forecast_streams(counts, span if span >= self.min_span_s else 0.0, self.base, self.sites)
        if not streams:
            return None
        # greedy: each round searches from the targets the previous rounds chose, and
        # stops at the first round that finds nothing worth its min gain
        want = dict(self.current)
        names, gains = [], []
        for _ in range(max(1, self.rounds)):
            scenario = Scenario(sites=tuple(self.sites), policy=self.policy, streams=tuple(streams),
                                horizon_s=self.plan_horizon_s, seeds=self.seeds,
                                current={s: x for s, x in want.items() if not x.empty},
                                move_cost=self.move_cost, start=t)
            candidates = generate_candidates(scenario, move_sizes=self.move_sizes)
            found = search(scenario, candidates, self.evaluate(scenario, candidates))
            before, after = found.evaluations[0].service_level, found.best.service_level
            gain = 0.0 if before is None or after is None else after - before
            nxt = {s.site.name: found.candidate.targets.get(s.site.name, want.get(s.site.name, SiteTargets()))
                   for s in self.sites}
            if not diff(want, nxt) or gain < self.min_gain:
                if not names:  # the first round's best, for the record
                    names, gains = [found.candidate.name], [gain]
                break
            want = nxt
            names.append(found.candidate.name)
            gains.append(gain)
        ok = bool(diff(self.current, want))
        self.steps.append(ControlStep(t=t, candidate="; ".join(names), gain=sum(gains), applied=ok,
                                      candidates=len(candidates), targets=want if ok else None))
        if not ok:
            return None
        want = {s.site.name: want.get(s.site.name, SiteTargets()) for s in self.sites}
        self.current = want
        self.applied.append(want)
        return want


def gap_closed(static: float | None, rebalanced: float | None, pooled: float | None) -> float | None:
    """(rebalanced − static) / (pooled − static); None when a figure is missing or the
    bound leaves no gap."""
    if static is None or rebalanced is None or pooled is None or not math.isfinite(pooled - static):
        return None
    gap = pooled - static
    return None if gap <= 1e-9 else (rebalanced - static) / gap
