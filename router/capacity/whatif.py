"""Plan what-ifs, pure: candidate plans for a cluster, each evaluated by simulation
(:func:`router.whatif.replay`, the real engine and overflow policy on simulated time),
scored, and the best one chosen. No I/O, no clock: the runner that times and
distributes the work (serially or as Ray tasks) is :mod:`router.capacity.whatif_run`.

* :class:`Scenario`: the cluster (site files, overflow policy), its traffic (Poisson
  ``streams`` over ``horizon_s``, or fixed ``arrivals``), the replications (``seeds``),
  the targets in force per site, the operators' contingency modes, and the prices
  (partner price per contact, cost of one moved agent);
* :func:`generate_candidates`: "no change" first, then per in-house site: agents moved
  into a group that serves one of its shortest queues, the wait factor of those queues,
  each partner of the policy closed (or opened again), surge mode; each a
  :class:`Candidate` with the site's full targets after it;
* :func:`run_unit` / :func:`run_batch`: one candidate x one seed (a *unit*) replayed;
  :func:`plan_batches` groups units into tasks of at least ``min_s`` of estimated work;
* :func:`score` pools the units into one :class:`Evaluation` per candidate, and
  :func:`search` picks the best.

**Common random numbers**: a unit's arrivals depend only on its seed (:func:`arrivals_for`),
and the replay's own draws only on the seed too; every candidate sees the very same calls,
so differences between candidates are the candidates', and a candidate's per-seed
difference to "no change" is paired (its standard error, ``delta_se``, is that of the
mean of the paired differences).

**Determinism**: a unit's summary is a function of (scenario, candidate, seed) alone;
pooling sums in (candidate, seed) order whatever order the units ran in. The same
inputs give bit-identical JSON serially and on Ray.

**Choice** (:func:`search`): the highest cluster service level (pooled over the seeds:
answered within the threshold over the calls that count, each origin queue's own
definition); among the candidates within ``tolerance`` (0.005) of it, the least cost
(partner price x the calls sent to partners per horizon, plus ``move_cost`` per moved
agent; surge counts its back-office agents as moved: they leave their own work); then
the earliest candidate (no change first).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from router.config import SiteConfig
from router.engine.mode import GATED_CHANNELS
from router.overflow import ContingencyState, OverflowPolicy
from router.plans import Plan, PlanError, SiteTargets, check_targets
from router.policy import eligible
from router.whatif import Arrival, Stream, poisson_arrivals, replay

#: Service levels closer than this count as equal; the cheaper candidate wins.
TIE_TOLERANCE = 0.005
#: The least estimated work of one Ray task (seconds): less and Ray's own overhead shows.
MIN_TASK_S = 0.1
#: Replay cost per call on a 2-core machine of 2026 (seconds of CPU), when not measured.
SECONDS_PER_CALL = 3.2e-4
#: Agents moved per move candidate, wait factors tried, short queues per site looked at.
MOVE_SIZES = (2, 4)
WAIT_FACTORS = (0.5, 1.5, 2.0)
SHORT_QUEUES = 2
DONORS = 2
#: Where arrivals start on the clock (partner hours read it as Unix time): a weekday noon.
START = 1_790_000_000.0


class WhatIfPlanError(ValueError):
    """A scenario the search cannot use; the message says what is wrong."""


@dataclass(frozen=True)
class Scenario:
    """What the search simulates (see the module docstring). ``current``: site -> the
    targets in force; ``contingency``: site -> the operator's mode; ``partner_price``:
    partner -> price of one contact (``default_partner_price`` for the others);
    ``move_cost``: the cost of one agent moved, in the same money."""

    sites: tuple[SiteConfig, ...]
    policy: OverflowPolicy
    streams: tuple[Stream, ...] = ()
    arrivals: tuple[Arrival, ...] | None = None
    horizon_s: float = 3600.0
    seeds: tuple[int, ...] = (1, 2, 3)
    current: Mapping[str, SiteTargets] = field(default_factory=dict)
    contingency: Mapping[str, ContingencyState] = field(default_factory=dict)
    partner_price: Mapping[str, float] = field(default_factory=dict)
    default_partner_price: float = 1.0
    move_cost: float = 0.5
    start: float = START

    def check(self) -> None:
        """Raise :class:`WhatIfPlanError` for a scenario that cannot be run (no site,
        no traffic, duplicate seeds, a bad horizon or price, targets or modes of unknown
        sites, current targets naming what the site files or the policy do not have)."""
        if not self.sites:
            raise WhatIfPlanError("a scenario needs at least one site")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise WhatIfPlanError(f"seeds must be distinct and at least one, got {list(self.seeds)}")
        if self.arrivals is None and not self.streams:
            raise WhatIfPlanError("give traffic: streams or arrivals")
        if not (self.horizon_s > 0 and math.isfinite(self.horizon_s)):
            raise WhatIfPlanError(f"horizon_s must be a positive number, got {self.horizon_s}")
        names = {s.site.name for s in self.sites}
        for what, keys in (("current targets", self.current), ("contingency", self.contingency)):
            unknown = sorted(set(keys) - names)
            if unknown:
                raise WhatIfPlanError(f"{what} for unknown site(s) {unknown}; sites are {sorted(names)}")
        if self.move_cost < 0 or self.default_partner_price < 0 or any(p < 0 for p in self.partner_price.values()):
            raise WhatIfPlanError("prices and the move cost must be >= 0")
        partners = set(self.policy.partners) | {s.site.name for s in self.sites if s.site.kind == "partner"}
        for s in self.sites:
            t = self.current.get(s.site.name)
            if t is not None:
                try:
                    check_targets(s, t, partners)
                except PlanError as e:
                    raise WhatIfPlanError(f"current targets: {e}") from None

    def site(self, name: str) -> SiteConfig:
        return next(s for s in self.sites if s.site.name == name)

    def price(self, partner: str) -> float:
        return float(self.partner_price.get(partner, self.default_partner_price))


@dataclass(frozen=True)
class Candidate:
    """One plan: ``name`` in words, ``targets`` every site's full targets after it (the
    scenario's ``current`` with the change laid over), ``moves`` agents it moves (surge:
    its back-office agents), ``kind`` none | move | wait_factor | partner | mode,
    ``site`` the site it changes ("" for none)."""

    name: str
    targets: Mapping[str, SiteTargets]
    moves: int = 0
    kind: str = "none"
    site: str = ""


# --- traffic and load ------------------------------------------------------------------


def arrivals_for(scenario: Scenario, seed: int) -> list[Arrival]:
    """The calls of one replication: the same for every candidate (common random
    numbers). Fixed ``arrivals`` are the same for every seed too (the replay's own draws
    of unknown figures still follow the seed)."""
    if scenario.arrivals is not None:
        return list(scenario.arrivals)
    return poisson_arrivals(list(scenario.streams), scenario.horizon_s, seed=seed, start=scenario.start)


def offered_erlangs(scenario: Scenario) -> dict[tuple[str, str], float]:
    """(site, queue) -> offered load in Erlangs (calls per second x mean handle time) of
    the scenario's traffic, routed as the engine routes (exact language, else the
    language-less queue)."""
    out: dict[tuple[str, str], float] = {}
    by_name = {s.site.name: s for s in scenario.sites}

    def add(site: str, skill: str, channel: str, language: str, erl: float) -> None:
        cfg = by_name.get(site)
        q = cfg.queue_for(skill, channel, language or None) if cfg else None  # type: ignore[arg-type]
        if q is not None:
            out[(site, q.name)] = out.get((site, q.name), 0.0) + erl

    if scenario.arrivals is not None:
        for a in scenario.arrivals:
            add(a.site, a.skill, a.channel, a.language, (a.handle_s or 0.0) / scenario.horizon_s)
    else:
        for st in scenario.streams:
            add(st.site, st.skill, st.channel, st.language, st.rate_per_h / 3600.0 * st.handle_s)
    return out


def expected_calls(scenario: Scenario) -> float:
    """Calls one replication plays (the mean for Poisson streams)."""
    if scenario.arrivals is not None:
        return float(len(scenario.arrivals))
    return sum(st.rate_per_h for st in scenario.streams) * scenario.horizon_s / 3600.0


def _groups_now(cfg: SiteConfig, targets: SiteTargets | None) -> dict[str, str]:
    """agent -> group under ``targets`` (site-file groups for the others)."""
    now = {aid: g.id for aid, g in cfg.agent_profiles().items()}
    if targets is not None:
        now.update(targets.groups)
    return now


def _serves(cfg: SiteConfig, group_id: str, queue: str, backoffice_on: bool) -> bool:
    g = next(g for g in cfg.agents if g.id == group_id)
    q = next(q for q in cfg.queues if q.name == queue)
    cap = {getattr(ch, "value", ch): n for ch, n in g.capacity.items()}
    ch = q.channel.value
    if g.backoffice and ch in GATED_CHANNELS and not backoffice_on:
        return False
    return eligible(g.skills, g.languages, cap, q.skill, q.language, ch)


def _slots(cfg: SiteConfig, group_id: str, queue: str, backoffice_on: bool) -> int:
    """Contacts of the queue's channel one agent of the group holds at once (0: none)."""
    if not _serves(cfg, group_id, queue, backoffice_on):
        return 0
    g = next(g for g in cfg.agents if g.id == group_id)
    ch = next(q for q in cfg.queues if q.name == queue).channel.value
    return int({getattr(c, "value", c): n for c, n in g.capacity.items()}.get(ch, 0))


def _mode_of(scenario: Scenario, site: str) -> str:
    op = scenario.contingency.get(site, ContingencyState()).mode
    t = scenario.current.get(site)
    return t.mode if op == "normal" and t is not None and t.mode is not None else op


def pressure(scenario: Scenario) -> dict[tuple[str, str], float]:
    """(site, queue) -> offered Erlangs per slot that may serve the queue now (agents
    that may serve it x their capacity on its channel; a shared agent counts for each of
    its queues: a rough, deterministic rank of shortness; an unstaffed queue with traffic
    ranks first)."""
    erl = offered_erlangs(scenario)
    out = {}
    for cfg in scenario.sites:
        name = cfg.site.name
        groups = _groups_now(cfg, scenario.current.get(name))
        on = scenario.policy.mode_settings(_mode_of(scenario, name)).backoffice_agents
        for q in cfg.queues:
            load = erl.get((name, q.name), 0.0)
            if load <= 0:
                continue
            slots = sum(_slots(cfg, g, q.name, on) for g in groups.values())
            out[(name, q.name)] = load / slots if slots else math.inf
    return out


# --- candidates ------------------------------------------------------------------------


def _with(scenario: Scenario, site: str, **change: Any) -> dict[str, SiteTargets]:
    """The scenario's targets with ``site``'s updated by ``change`` (dicts merged)."""
    out = dict(scenario.current)
    base = out.get(site, SiteTargets())
    upd = {}
    for k, v in change.items():
        old = getattr(base, k)
        upd[k] = {**old, **v} if isinstance(v, dict) else v
    out[site] = base.model_copy(update=upd)
    return out


def generate_candidates(
    scenario: Scenario,
    *,
    move_sizes: Sequence[int] = MOVE_SIZES,
    wait_factors: Sequence[float] = WAIT_FACTORS,
    short_queues: int = SHORT_QUEUES,
    donors: int = DONORS,
    peer_moves: bool = True,
) -> list[Candidate]:
    """The candidate plans, deterministic (the same scenario gives the same list in the
    same order); "no change" first. Per in-house site (a partner's agents are not ours):

    * for each of its ``short_queues`` queues of highest :func:`pressure`: the group of
      the site (not a back-office one) that serves the queue with the best proficiency
      in its skill (then by id) receives ``k`` in ``move_sizes`` agents from each of the ``donors`` groups
      that do not serve it and are least loaded (lowest pressure of the queues they
      serve); the agents taken are the donor group's last ``k`` by id among those the
      targets in force do not place;
    * for each of those queues with enabled overflow rules: the wait factor set to each
      of ``wait_factors`` other than the one in force;
    * each partner of the policy closed to the site (opened again if the targets in
      force close it);
    * surge mode, if the site has back-office agents and its mode is normal (back to
      normal if the targets in force set surge);
    * with ``peer_moves`` (cluster-aware, after every site's own candidates): for each of
      a site's ``short_queues`` queues whose overflow rules are enabled, each *other*
      in-house site that has a queue for the same skill, channel and language (where
      overflow would send the calls) gets the same move candidates at home: its
      receiver group for that queue, ``k`` agents from each of its ``donors`` least
      loaded groups that do not serve it — agents who could take the work only from a
      group that serves it, so that overflow can reach them. A candidate whose targets
      equal an earlier one's is left out.
    """
    scenario.check()
    out = [Candidate("no change", dict(scenario.current))]
    press = pressure(scenario)
    for cfg in scenario.sites:
        name = cfg.site.name
        if cfg.site.kind == "partner":
            continue
        cur = scenario.current.get(name, SiteTargets())
        groups = _groups_now(cfg, cur)
        mode = _mode_of(scenario, name)
        mine = sorted(((p, q) for (s, q), p in press.items() if s == name), key=lambda x: (-x[0], x[1]))
        short = [q for _, q in mine[:short_queues]]
        for qname in short:
            out += _moves_for(scenario, cfg, qname, press, move_sizes, donors, "")
            rules = scenario.policy.rules_for(name, qname)
            if rules is None or not rules.enabled:
                continue
            now = cur.wait_factor.get(qname, rules.wait_threshold.factor if rules.wait_threshold else None)
            for f in wait_factors:
                if now is not None and math.isclose(f, now):
                    continue
                out.append(Candidate(f"wait factor of {name}/{qname} {'unset' if now is None else f'{now:g}'} -> {f:g}",
                                     _with(scenario, name, wait_factor={qname: float(f)}), kind="wait_factor",
                                     site=name))  # fmt: skip
        for p in sorted(scenario.policy.partners):
            is_open = cur.partners.get(p, True)
            out.append(Candidate(f"{'close' if is_open else 'open'} partner {p} to {name}",
                                 _with(scenario, name, partners={p: not is_open}), kind="partner", site=name))
        backoffice = sum(1 for g in groups.values() if next(x for x in cfg.agents if x.id == g).backoffice)
        op = scenario.contingency.get(name, ContingencyState()).mode
        if backoffice and op == "normal":
            if mode == "normal":
                out.append(Candidate(f"surge mode at {name} ({backoffice} back-office agent(s) on calls)",
                                     _with(scenario, name, mode="surge"), moves=backoffice, kind="mode", site=name))
            elif cur.mode == "surge":
                out.append(Candidate(f"back to normal mode at {name}", _with(scenario, name, mode=None), kind="mode",
                                     site=name))  # fmt: skip
    if peer_moves:
        out += _peer_moves(scenario, press, out, move_sizes, short_queues, donors)
    return out


def _moves_for(scenario: Scenario, cfg: SiteConfig, qname: str, press: Mapping[tuple[str, str], float],
               move_sizes: Sequence[int], donors: int, why: str) -> list[Candidate]:
    """The move candidates of one site for one of its queues (see
    :func:`generate_candidates`): the best receiver group serving ``qname``, ``k``
    agents from each of the ``donors`` least loaded groups that do not serve it.
    ``why`` is added to the names (the peer queue a cluster-aware move is for)."""
    name = cfg.site.name
    cur = scenario.current.get(name, SiteTargets())
    groups = _groups_now(cfg, cur)
    on = scenario.policy.mode_settings(_mode_of(scenario, name)).backoffice_agents
    q = next(x for x in cfg.queues if x.name == qname)
    receivers = [g for g in cfg.agents if _serves(cfg, g.id, qname, True) and not g.backoffice]
    if not receivers:
        return []
    to = min(receivers, key=lambda g: (-g.skills.get(q.skill, 0), g.id)).id
    # the least loaded donors: the highest pressure among the queues they serve now
    load_of = {
        g.id: max((press.get((name, x.name), 0.0) for x in cfg.queues if _serves(cfg, g.id, x.name, on)),
                  default=0.0)
        for g in cfg.agents
    }  # fmt: skip
    donor_groups = sorted(
        (g.id for g in cfg.agents if g.id != to and not _serves(cfg, g.id, qname, on)),
        key=lambda gid: (load_of[gid], gid),
    )[:donors]
    out = []
    for gid in donor_groups:
        free = sorted(a for a, g in groups.items() if g == gid and a not in cur.groups)
        for k in move_sizes:
            if k < 1 or k > len(free):
                continue
            picked = free[-k:]
            out.append(Candidate(
                f"move {k} agent(s) of {name}/{gid} to {to} for {qname}{why} ({', '.join(picked)})",
                _with(scenario, name, groups=dict.fromkeys(picked, to)), moves=k, kind="move", site=name,
            ))  # fmt: skip
    return out


def _peer_moves(scenario: Scenario, press: Mapping[tuple[str, str], float], have: Sequence[Candidate],
                move_sizes: Sequence[int], short_queues: int, donors: int) -> list[Candidate]:
    """The cluster-aware move candidates (see :func:`generate_candidates`), skipping
    target sets an earlier candidate already has."""
    def key(c: Candidate) -> str:
        return repr(sorted((s, t.to_dict().__repr__()) for s, t in c.targets.items()))

    seen = {key(c) for c in have}
    out = []
    for cfg in scenario.sites:
        name = cfg.site.name
        if cfg.site.kind == "partner":
            continue
        mine = sorted(((p, q) for (s, q), p in press.items() if s == name), key=lambda x: (-x[0], x[1]))
        for _, qname in mine[:short_queues]:
            rules = scenario.policy.rules_for(name, qname)
            if rules is None or not rules.enabled:
                continue  # overflow would not take these calls anywhere
            q = next(x for x in cfg.queues if x.name == qname)
            for peer in scenario.sites:
                if (peer is cfg or peer.site.kind == "partner" or not rules.inhouse or peer.site.name in rules.exclude
                        or (rules.to is not None and peer.site.name not in rules.to)):
                    continue
                pq = peer.queue_for(q.skill, q.channel, q.language)
                if pq is None:
                    continue
                for c in _moves_for(scenario, peer, pq.name, press, move_sizes, donors, f" (overflow of {name}/{qname})"):
                    k = key(c)
                    if k not in seen:
                        seen.add(k)
                        out.append(c)
    return out


# --- units, batches --------------------------------------------------------------------

#: Fields of a unit's tally, in order (a unit's summary holds lists, compact on the wire).
TALLY = ("sl_num", "sl_den", "offered", "answered", "abandoned", "overflow_in", "overflow_out")


def run_unit(scenario: Scenario, candidate: Candidate, seed: int) -> dict[str, Any]:
    """One replication of one candidate: ``{"sites": {site: [TALLY...]}, "total":
    [TALLY...], "applied": int}``; a function of its arguments alone."""
    r = replay(
        list(scenario.sites), arrivals_for(scenario, seed), scenario.policy,
        contingency=dict(scenario.contingency) or None, seed=seed,
        targets={s: t for s, t in candidate.targets.items() if not t.empty} or None,
    )  # fmt: skip
    row = lambda t: [getattr(t, k) for k in TALLY]  # noqa: E731
    return {"sites": {n: row(s) for n, s in sorted(r.sites.items())}, "total": row(r.total),
            "applied": r.targets_applied}


Unit = tuple[int, int]  # (candidate index, seed index)


def run_batch(scenario: Scenario, candidates: Sequence[Candidate], units: Sequence[Unit]) -> list[tuple[int, int, dict]]:
    """The units of one task, in order: ``(candidate index, seed index, summary)``."""
    return [(ci, si, run_unit(scenario, candidates[ci], scenario.seeds[si])) for ci, si in units]


def all_units(scenario: Scenario, candidates: Sequence[Candidate]) -> list[Unit]:
    """Every candidate x seed, candidate-major."""
    return [(ci, si) for ci in range(len(candidates)) for si in range(len(scenario.seeds))]


def unit_cost_s(scenario: Scenario, seconds_per_call: float = SECONDS_PER_CALL) -> float:
    """The estimated work of one unit: its calls x ``seconds_per_call`` (measured by the
    runner on a pilot unit, or the module's default)."""
    return expected_calls(scenario) * seconds_per_call


def plan_batches(units: Sequence[Unit], costs: Sequence[float], min_s: float = MIN_TASK_S) -> list[list[Unit]]:
    """Units grouped in order into batches of at least ``min_s`` of estimated work each
    (``costs[i]``: unit ``i``'s): a batch closes as soon as it reaches ``min_s``; a last
    batch short of it joins the one before. All units in one batch when they do not add
    up to ``min_s``; no batch when there is no unit."""
    if len(units) != len(costs):
        raise ValueError(f"{len(units)} units but {len(costs)} costs")
    batches: list[list[Unit]] = []
    cur: list[Unit] = []
    acc = 0.0
    for u, c in zip(units, costs):
        cur.append(u)
        acc += c
        if acc >= min_s:
            batches.append(cur)
            cur, acc = [], 0.0
    if cur:
        if batches:
            batches[-1].extend(cur)
        else:
            batches.append(cur)
    return batches


# --- scores, search --------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """One candidate over every seed: ``service_level`` of the cluster and ``sites`` per
    origin site (pooled over the seeds; None where no call counted), ``delta`` the mean
    per-seed difference of the cluster's service level to "no change" and ``delta_se``
    its standard error (None with one seed), ``partner_calls`` calls sent to each
    partner per horizon (mean over seeds), ``partner_cost`` their price, ``cost`` that
    plus ``move_cost`` x ``moves``."""

    index: int
    name: str
    kind: str
    site: str
    moves: int
    service_level: float | None
    sites: dict[str, float | None]
    delta: float | None
    delta_se: float | None
    partner_calls: dict[str, float]
    partner_cost: float
    cost: float
    per_seed: tuple[float | None, ...]

    def to_dict(self) -> dict[str, Any]:
        r = lambda x: None if x is None else round(x, 6)  # noqa: E731
        return {
            "index": self.index, "name": self.name, "kind": self.kind, "site": self.site, "moves": self.moves,
            "service_level": r(self.service_level), "sites": {k: r(v) for k, v in sorted(self.sites.items())},
            "delta": r(self.delta), "delta_se": r(self.delta_se),
            "partner_calls": {k: r(v) for k, v in sorted(self.partner_calls.items())},
            "partner_cost": r(self.partner_cost), "cost": r(self.cost),
            "per_seed": [r(x) for x in self.per_seed],
        }  # fmt: skip


def _sl(row: Sequence[float]) -> float | None:
    return row[0] / row[1] if row[1] else None


def score(scenario: Scenario, candidates: Sequence[Candidate],
          results: Mapping[Unit, dict[str, Any]]) -> list[Evaluation]:
    """One :class:`Evaluation` per candidate from every unit's summary (``results``:
    (candidate index, seed index) -> :func:`run_unit`'s summary; every unit needed).
    Sums run in seed order: the same summaries give the same figures, whatever ran
    them. Candidate 0 is the reference of ``delta`` ("no change")."""
    n = len(scenario.seeds)
    partners = sorted(s.site.name for s in scenario.sites if s.site.kind == "partner")
    missing = [(ci, si) for ci in range(len(candidates)) for si in range(n) if (ci, si) not in results]
    if missing:
        raise WhatIfPlanError(f"{len(missing)} unit(s) without a result, e.g. {missing[0]}")
    base = [_sl(results[(0, si)]["total"]) for si in range(n)] if candidates else []
    out = []
    for ci, cand in enumerate(candidates):
        rows = [results[(ci, si)] for si in range(n)]
        total = [sum(r["total"][k] for r in rows) for k in range(len(TALLY))]
        names = sorted(rows[0]["sites"])
        sites = {s: _sl([sum(r["sites"][s][k] for r in rows) for k in range(2)]) for s in names}
        per_seed = tuple(_sl(r["total"]) for r in rows)
        diffs = [a - b for a, b in zip(per_seed, base) if a is not None and b is not None]
        delta = sum(diffs) / len(diffs) if diffs else None
        se = None
        if len(diffs) > 1:
            m = delta
            se = math.sqrt(sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))  # type: ignore[operator]
        calls = {p: sum(r["sites"][p][TALLY.index("overflow_in")] for r in rows) / n for p in partners}
        pcost = sum(scenario.price(p) * c for p, c in calls.items())
        out.append(Evaluation(
            index=ci, name=cand.name, kind=cand.kind, site=cand.site, moves=cand.moves,
            service_level=_sl(total), sites=sites, delta=delta, delta_se=se, partner_calls=calls,
            partner_cost=pcost, cost=pcost + scenario.move_cost * cand.moves, per_seed=per_seed,
        ))  # fmt: skip
    return out


def best(evaluations: Sequence[Evaluation], tolerance: float = TIE_TOLERANCE) -> Evaluation:
    """The highest cluster service level; within ``tolerance`` of it, the least cost;
    then the lowest index. Raises :class:`WhatIfPlanError` when nothing was evaluated."""
    if not evaluations:
        raise WhatIfPlanError("no candidate evaluated")
    top = max((e.service_level for e in evaluations if e.service_level is not None), default=None)
    if top is None:
        return evaluations[0]
    near = [e for e in evaluations if e.service_level is not None and e.service_level >= top - tolerance]
    return min(near, key=lambda e: (round(e.cost, 9), e.index))


@dataclass(frozen=True)
class SearchResult:
    """What :func:`search` found: the ``best`` evaluation, its ``candidate``, the
    ``plan`` to commit (sites whose targets it changes, expected service levels before
    (no change) and after, cost), and every evaluation in candidate order."""

    best: Evaluation
    candidate: Candidate
    plan: Plan
    evaluations: list[Evaluation]

    def to_dict(self) -> dict[str, Any]:
        return {
            "best": self.best.to_dict(),
            "plan": self.plan.model_dump(mode="json"),
            "evaluations": [e.to_dict() for e in self.evaluations],
        }


def make_plan(scenario: Scenario, candidate: Candidate, ev: Evaluation, before: Evaluation) -> Plan:
    """The :class:`router.plans.Plan` of one candidate (``base_revision`` 0: the
    rebalancer that commits it sets the etcd revision it read)."""
    empty = SiteTargets()
    changed = {s: t for s, t in sorted(candidate.targets.items()) if t != scenario.current.get(s, empty)}
    expected = {s: {"before": before.sites.get(s), "after": ev.sites.get(s)} for s in sorted(ev.sites)}
    cost = {"moves": float(candidate.moves), "partner_calls": float(sum(ev.partner_calls.values())),
            "partner_cost": ev.partner_cost}
    return Plan(base_revision=0, candidate=candidate.name, sites=changed, expected=expected,
                cluster={"before": before.service_level, "after": ev.service_level}, cost=cost,
                horizon_s=scenario.horizon_s).with_id()


def search(scenario: Scenario, candidates: Sequence[Candidate], results: Mapping[Unit, dict[str, Any]],
           tolerance: float = TIE_TOLERANCE) -> SearchResult:
    """Score every candidate (:func:`score`) and choose (:func:`best`); candidate 0 must
    be "no change" (the "before" of the plan)."""
    evs = score(scenario, candidates, results)
    b = best(evs, tolerance)
    return SearchResult(best=b, candidate=candidates[b.index], plan=make_plan(scenario, candidates[b.index], b, evs[0]),
                        evaluations=evs)
