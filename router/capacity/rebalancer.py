"""The rebalancer: one elected process plans capacity and applies plans as fenced targets.

Leadership is an etcd election (:data:`router.coord.keys.REBALANCER`); the leader key's
create revision is the fencing epoch. A plan is computed from one read of the state
(:meth:`router.coord.base.Coordinator.rebalance_state`: its revision is the plan's base)
by a :data:`Planner` (the what-if search, :mod:`router.capacity.whatif`), and applied
with :meth:`~router.coord.base.Coordinator.apply_plan`: one transaction, refused when
this process no longer leads (:class:`NotLeader`) or the base moved (:class:`StalePlan`).
Every apply writes the targets of every site of the cluster, so each site reports the
new generation (``rebalancer/applied/<site>``), which :meth:`Rebalancer.apply` can wait
for.

Auto mode (``auto_every_s``) re-plans on that period while leading and applies a plan
when it changes something and the simulation expects at least ``min_gain`` more cluster
service level. The planner runs in a worker thread: it is CPU work (or waits on Ray) and
the event loop keeps the leadership and the gRPC service alive meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from router.config import SiteConfig
from router.coord import CoordinationUnavailable, EtcdCoordinator, Leadership, NotLeader, StalePlan
from router.coord.keys import REBALANCER
from router.overflow import ContingencyState, OverflowPolicy
from router.plans import Plan, PlanError, SiteTargets, check_targets, diff

log = logging.getLogger("tandem.rebalancer")


@dataclass(frozen=True)
class PlanInput:
    """What a planner gets: the site files, the policy and modes in force, the targets in
    force per site (empty for a site without), the simulated horizon and replications."""

    sites: Sequence[SiteConfig]
    policy: OverflowPolicy
    contingency: Mapping[str, ContingencyState]
    current: Mapping[str, SiteTargets]
    horizon_s: float
    replications: int


@dataclass(frozen=True)
class PlanOutput:
    """A planner's answer: the targets of every site after the plan (the current ones
    where it changes nothing), per-site service levels before/after, cluster service
    levels, cost, what changed in words, how many candidates were simulated."""

    targets: Mapping[str, SiteTargets]
    expected: Mapping[str, Mapping[str, float | None]]
    cluster_before: float | None
    cluster_after: float | None
    cost: Mapping[str, float]
    candidate: str
    candidates: int


#: Computes a plan (blocking; run in a thread).
Planner = Callable[[PlanInput], PlanOutput]


class RebalanceError(Exception):
    """A request the rebalancer refuses: ``code`` (gRPC status name) and ``reason``."""

    def __init__(self, code: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason = code, reason


@dataclass
class Applied:
    """The outcome of one apply."""

    generation: int
    revision: int
    fencing: int
    seconds: float | None  # commit -> every site reported (None without wait or on timeout)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)


class Rebalancer:
    """One rebalancer process (see the module docstring). ``name``: its value in the
    election (shown as the leader). ``sites``: the cluster's site files (in-house and
    partner nodes). ``planner``: the search. The coordinator must be started."""

    def __init__(self, coord: EtcdCoordinator, name: str, sites: Sequence[SiteConfig], planner: Planner, *,
                 horizon_s: float = 1800.0, replications: int = 4, auto_every_s: float | None = None,
                 min_gain: float = 0.005) -> None:
        self.coord = coord
        self.name = name
        self.sites = {s.site.name: s for s in sites}
        self.planner = planner
        self.horizon_s = horizon_s
        self.replications = replications
        self.auto_every_s = auto_every_s
        self.min_gain = min_gain
        self.leadership: Leadership | None = None
        self.plans_applied = 0
        self.stale_refused = 0
        self.last_plan: Plan | None = None
        self._lock = asyncio.Lock()  # one plan or apply at a time
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()

    # --- leadership ----------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        return self.leadership is not None and self.leadership.active

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.leading:
            try:
                await self.coord.resign(self.leadership)  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001 - etcd gone: the lease expires by itself
                pass

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.leadership = await self.coord.campaign(REBALANCER, self.name, timeout=30.0)
            except CoordinationUnavailable:
                continue
            log.info("%s leads the rebalancer (fencing epoch %d)", self.name, self.leadership.token)
            try:
                await self._lead(self.leadership)
            finally:
                log.warning("%s no longer leads the rebalancer", self.name)

    async def _lead(self, lead: Leadership) -> None:
        lost = asyncio.ensure_future(lead.lost.wait())
        try:
            while lead.active:
                if self.auto_every_s is None:
                    await asyncio.wait({lost}, timeout=None)
                    return
                await self._auto_once()
                await asyncio.wait({lost}, timeout=self.auto_every_s)
        finally:
            lost.cancel()

    async def _auto_once(self) -> None:
        try:
            plan = await self.plan()
            gain = _gain(plan)
            if not diff(await self._current(), plan.sites) or gain < self.min_gain:
                log.info("auto: plan %s changes nothing worth applying (gain %.3f)", plan.id, gain)
                return
            await self.apply(plan)
        except RebalanceError as e:
            log.warning("auto: %s %s", e.reason, e)
        except CoordinationUnavailable as e:
            log.warning("auto: etcd unavailable: %s", e)

    def _require_leader(self) -> Leadership:
        if not self.leading:
            raise RebalanceError("FAILED_PRECONDITION", "NOT_LEADER",
                                 f"{self.name} does not lead the rebalancer election")
        return self.leadership  # type: ignore[return-value]

    # --- plans ---------------------------------------------------------------------------

    async def _current(self, state: Mapping[str, Any] | None = None) -> dict[str, SiteTargets]:
        state = state if state is not None else await self.coord.rebalance_state()
        out = {}
        for site in self.sites:
            doc = state["targets"].get(site)
            try:
                out[site] = SiteTargets.model_validate(doc.get("targets", {})) if doc else SiteTargets()
            except ValueError:
                out[site] = SiteTargets()
        return out

    async def plan(self, horizon_s: float | None = None, replications: int | None = None) -> Plan:
        """A plan computed now from the state at one revision (its ``base_revision``);
        only the leader plans (its apply is fenced anyway)."""
        self._require_leader()
        async with self._lock:
            state = await self.coord.rebalance_state()
            policy, _rev = await self.coord.get_policy()
            current = await self._current(state)
            modes = {s: self.coord.contingency(s) for s in self.sites}
            inp = PlanInput(sites=list(self.sites.values()), policy=policy, contingency=modes, current=current,
                            horizon_s=horizon_s or self.horizon_s, replications=replications or self.replications)
            try:
                out = await asyncio.to_thread(self.planner, inp)
            except ValueError as e:  # no traffic to plan for, a scenario the search refuses
                raise RebalanceError("FAILED_PRECONDITION", "PLAN_FAILED", f"no plan: {e}") from None
            plan = Plan(base_revision=int(state["revision"]), computed_at=time.time(), leader=self.name,
                        candidate=out.candidate, sites=dict(out.targets),
                        expected={s: dict(v) for s, v in out.expected.items()},
                        cluster={"before": out.cluster_before, "after": out.cluster_after},
                        cost=dict(out.cost), candidates=out.candidates, horizon_s=inp.horizon_s).with_id()
            self.last_plan = plan
            return plan

    async def _partners(self, policy: OverflowPolicy) -> set[str]:
        names = set(policy.partners) | {n for n, s in self.sites.items() if s.site.kind == "partner"}
        rng = await self.coord.link.run("list contracts", lambda c: c.get_prefix(
            self.coord.keys.partner_contracts_prefix.encode(), keys_only=True))
        for kv in rng:
            name = self.coord.keys.site_of(kv.key, self.coord.keys.partner_contracts_prefix)
            if name:
                names.add(name)
        return names

    async def check(self, plan: Plan) -> None:
        """:class:`RebalanceError` INVALID_PLAN if the plan names a site, agent, group,
        queue or partner the cluster does not have."""
        policy = self.coord.policy
        partners = await self._partners(policy)
        for site, t in plan.sites.items():
            cfg = self.sites.get(site)
            if cfg is None:
                raise RebalanceError("INVALID_ARGUMENT", "INVALID_PLAN", f"sites.{site}: no site {site!r} in the cluster")
            try:
                check_targets(cfg, t, partners)
            except PlanError as e:
                raise RebalanceError("INVALID_ARGUMENT", "INVALID_PLAN", str(e)) from None

    async def apply(self, plan: Plan, *, wait: bool = False, timeout_s: float = 10.0) -> Applied:
        """Apply ``plan`` in one fenced transaction (every site's targets: the plan's, or
        the current ones for a site it leaves out). Raises :class:`RebalanceError`
        (INVALID_PLAN, NOT_LEADER, STALE_PLAN) with nothing written."""
        lead = self._require_leader()
        await self.check(plan)
        async with self._lock:
            current = await self._current()
            targets = {s: plan.sites.get(s, current.get(s, SiteTargets())).to_dict() for s in self.sites}
            try:
                generation, revision = await self.coord.apply_plan(
                    targets, lead, base_revision=plan.base_revision, plan=plan.id, sites=list(self.sites))
            except NotLeader as e:
                self.stale_refused += 1
                raise RebalanceError("FAILED_PRECONDITION", "NOT_LEADER", str(e)) from None
            except StalePlan as e:
                self.stale_refused += 1
                raise RebalanceError("ABORTED", "STALE_PLAN", str(e)) from None
            committed = time.monotonic()
            self.plans_applied += 1
            log.info("applied plan %s as generation %d (epoch %d): %s", plan.id, generation, lead.token,
                     plan.candidate or "no change")
        out = Applied(generation=generation, revision=revision, fencing=lead.token, seconds=None)
        if wait:
            out.sites = await self.wait_applied(generation, timeout_s)
            if all(v["applied"] for v in out.sites.values()):
                out.seconds = time.monotonic() - committed
        return out

    async def site_reports(self, generation: int | None = None) -> dict[str, dict[str, Any]]:
        """What every live member site reports applied (``applied``: at least
        ``generation``, default the generation in force)."""
        state = await self.coord.rebalance_state()
        if generation is None:
            generation = int((state.get("generation") or {}).get("generation", 0))
        members = await self.coord.list_members()
        out = {}
        for site in sorted(set(members) & set(self.sites)):
            doc = state["applied"].get(site) or {}
            g = int(doc.get("generation", 0))
            out[site] = {"generation": g, "fencing": int(doc.get("fencing", 0)),
                         "pending_moves": int(doc.get("pending_moves", 0)), "refused": int(doc.get("refused", 0)),
                         "applied": g >= generation}
        return out

    async def wait_applied(self, generation: int, timeout_s: float) -> dict[str, dict[str, Any]]:
        """Poll the sites' reports (every 20 ms) until every live member reports
        ``generation`` or ``timeout_s`` passes; the last reports."""
        deadline = time.monotonic() + timeout_s
        while True:
            reports = await self.site_reports(generation)
            if all(r["applied"] for r in reports.values()) or time.monotonic() >= deadline:
                return reports
            await asyncio.sleep(0.02)

    async def status(self) -> dict[str, Any]:
        held = await self.coord.leader(REBALANCER)
        state = await self.coord.rebalance_state()
        gen = state.get("generation") or {}
        return {
            "leader": self.leading, "leader_name": held[0] if held else "", "fencing": held[1] if held else 0,
            "generation": int(gen.get("generation", 0)), "plan_id": str(gen.get("plan", "")),
            "auto": self.auto_every_s is not None, "auto_every_s": self.auto_every_s or 0.0,
            "plans_applied": self.plans_applied, "stale_refused": self.stale_refused,
            "sites": await self.site_reports(int(gen.get("generation", 0))),
        }


def _gain(plan: Plan) -> float:
    before, after = plan.cluster.get("before"), plan.cluster.get("after")
    if before is None or after is None:
        return 0.0
    return after - before
