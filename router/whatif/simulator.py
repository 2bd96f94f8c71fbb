"""Replay calls through a simulated cluster under an overflow policy (discrete events).

``replay(sites, arrivals, policy)`` plays every arrival through one real
:class:`router.engine.Engine` per site — the state machine of the live nodes, fed the
same commands — on simulated time, in-process and deterministic (``seed``). Overflow is
decided by the live node's own pure code (:mod:`router.overflow`: ``site_load`` for the
published loads, ``local_queue``, ``charge_transfers``, ``decide``) with the live node's
rhythm:

* **staffing as configured, not as it was**: every agent of the site files is signed in
  and ready from the first arrival on, and stays (no breaks, no shifts). The site's
  contingency mode (``contingency``; normal if absent) is applied first with a
  ``set_mode``, as the node does (back-office agents on in surge and emergency);
* **agents** accept every offer at once (no ring time, no reject, no timeout), talk for
  ``handle_s`` minus the wrap-up of the queue that answered the call, complete; the
  engine's wrap-up then keeps them busy for that queue's ``wrap_up_s``, so a call costs
  its ``handle_s`` of agent time wherever it is answered (at least the wrap-up);
* **callers** hang up ``patience_s`` after their arrival at the origin if still queued
  (wherever the call is by then);
* **loads**: each site publishes its load (:func:`router.overflow.site_load` of its
  engine's views) on a grid of ``PUBLISH_S`` (the coordinator's default rate limit,
  4 a second) when it changed since its last publication, and re-publishes every
  ``HEARTBEAT_S`` anyway (that only resets the age peers see). Peers see a publication
  at once; its age is the time since it (or its heartbeat) was put. The node's own 0.1 s
  poll before publishing is not modelled;
* **decisions**: after every offer that left the call queued (``ClusterLink.offered``),
  and every ``SWEEP_S`` for the calls that stayed, newest first, until one stays, at
  most ``SWEEP_MAX`` per queue (``ClusterLink.sweep``). Transfers the origin sent that
  the target's load cannot show yet are charged to it, as the live node does; partner
  caps count the origin's calls active at the partner (forgotten the moment they end,
  where the node polls every second) and its transfers of the last second. Every site
  is a member; etcd never fails; nobody drains. Calls that came by overflow are not
  decided again (as live);
* **transfers** complete instantly: the engines run the whole two-phase exchange
  (begin, reserve, committing, commit, done) at the decision's instant; a target that
  refuses (e.g. QUEUE_FULL) aborts it and the call stays, decided again in the sweeps.

At one instant events run in this order: wrap-up ends (engine ticks), completions,
hang-ups, arrivals, sweeps; arrivals in (time, call id) order.

Unknown figures of an arrival are drawn before the simulation, from ``random.Random
(seed)``, so every policy replays the very same calls:

* ``handle_s`` None (a call never answered): a recorded handle time of an answered
  call of the same origin site, skill and channel, else of the same skill and channel
  anywhere, else the origin queue's configured ``aht_s``;
* ``patience_s`` None (an answered call: its patience is censored at its recorded wait
  ``waited_s``) with ``censored="resample"`` (default): the patience of a call that did
  hang up, of the same origin site, skill and channel, drawn among those longer than
  ``waited_s`` — the caller is known to have waited that long — and infinite when no
  recorded hang-up waited longer; with ``censored="inf"``: infinite (answered callers
  never hang up: optimistic where the replay makes them wait longer than they did).
  Both are simple, Kaplan-Meier-free choices; the first keeps abandonment in an
  overloaded replay, the second is an upper bound of the service level.

**Targets** (a rebalancing plan, :class:`router.plans.SiteTargets` per site) are applied
the way a node applies them, with the functions the nodes use (:mod:`router.plans.apply`):

* ``targets`` are applied at the start, after the contingency mode and the sign-ins;
* the agents' groups by ``move_agent`` commands (:func:`router.plans.move_commands`: an
  agent named goes to its group, one the previous targets of the site placed and these do
  not name goes home) with ``when_free``, as the nodes apply them: an agent holding a
  contact has its move pending in the engine, made when its last contact leaves it,
  before it is handed the next one (a newer target set replaces or cancels it);
* wait factors and partners closed at once, as the overflow policy of every decision
  from then on (:func:`router.plans.policy_with_targets` over the replay's policy); calls
  of a queue that had no enabled rule when they queued are not swept later;
* a target ``mode`` at once where the site's ``contingency`` is normal (an operator's
  surge or emergency wins), with the mode's ``set_mode`` as at the start.

A site the new targets do not name keeps the targets it had. A **controller**
(``controller(t, observation)``) is called every ``control_every_s`` of simulated time
from the first arrival on, for as long as calls still arrive (``t`` on the arrivals'
clock; :class:`router.whatif.observe.Observation`: what a rebalancer could see then); the
target sets it returns are applied ``apply_delay_s`` later, after that instant's sweeps
(a controller's call and an application come after every other event of their instant).
``ReplayResult.targets_applied`` counts the target sets applied.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from router.config import SiteConfig
from router.engine import Engine
from router.engine.mode import MAX_ANNOUNCEMENT
from router.model import AssignmentOffered, RoutingError
from router.overflow import (
    ContingencyState,
    LoadSnapshot,
    OverflowPolicy,
    PartnerUsage,
    PeerLoad,
    charge_transfers,
    decide,
    local_queue,
    site_load,
    split_bucket,
)
from router.plans import PlanError, SiteTargets, check_targets, move_commands, policy_with_targets
from router.whatif.arrivals import Arrival, WhatIfError
from router.whatif.observe import Observation, QueueObservation, SiteObservation
from router.whatif.result import ReplayResult, SiteResult, Tally

#: Load publications: at most ``load_max_rate`` (4) a second, as router.coord's defaults.
PUBLISH_S = 0.25
#: An unchanged load is put again this often (``load_heartbeat_s``): the age peers see.
HEARTBEAT_S = 1.0
#: Calls that stayed are decided again this often, at most SWEEP_MAX per queue
#: (router.node.cluster.SWEEP_S / SWEEP_MAX).
SWEEP_S = 0.5
SWEEP_MAX = 50
#: Reservation lifetime of a transfer (they commit at once: never reached).
TRANSFER_TTL_S = 10.0

_TICK, _COMPLETE, _ABANDON, _ARRIVE, _SWEEP, _CONTROL, _TARGETS = range(7)
Censored = Literal["resample", "inf"]
Targets = Mapping[str, SiteTargets]
Controller = Callable[[float, Observation], "Targets | None"]


class _Call:
    __slots__ = ("a", "site", "origin", "oqueue", "state", "handle", "patience", "answered_at",
                 "moved", "partner", "agent")

    def __init__(self, a: Arrival, origin: "_Site", handle: float, patience: float) -> None:
        self.a = a
        self.site = origin  # where it is now
        self.origin = origin
        self.oqueue = ""  # the queue it joined at its origin
        self.state = "new"  # new | queued | connected | done
        self.handle = handle
        self.patience = patience
        self.answered_at = 0.0
        self.moved = False
        self.partner: _Site | None = None  # the capped partner it was sent to
        self.agent = ""  # who answered it


class _Site:
    """One simulated node: its engine, its published load and its overflow state."""

    def __init__(self, cfg: SiteConfig, mode: ContingencyState, policy: OverflowPolicy) -> None:
        self.cfg = cfg
        self.name = cfg.site.name
        self.region = cfg.site.region
        self.kind = cfg.site.kind
        self.engine = Engine(cfg)
        self.qcfg = {q.name: q for q in cfg.queues}
        self.mode = mode
        self.contingency = mode  # the operator's mode (a target mode applies only over normal)
        self.settings = mode.settings(policy)
        self.rules = {q.name: policy.rules_for(self.name, q.name) for q in cfg.queues}
        # targets: site-file groups, agents the targets in force placed
        self.home = {aid: g.id for aid, g in cfg.agent_profiles().items()}
        self.placed: set[str] = set()
        self.arrived: dict[str, int] = {}  # queue -> arrivals (counted for a controller only)
        self.arrived_seen: dict[str, int] = {}  # at the controller's previous call
        self.version = 0  # bumped by every command that changed the engine
        self.views: dict[str, tuple[int, Any]] = {}  # queue -> (version, QueueView)
        self.memo: dict[str, tuple] = {}  # queue -> inputs of the sweep's last "stay"
        self.read = True  # some peer decides overflow: publish this site's load
        self.content: tuple = ()  # the published figures decide reads (the sweep's memo key)
        self.memo2: dict[str, tuple] = {}
        self.peer_queue: dict[str, list[tuple[_Site, int]]] = {}  # queue -> (peer, index of its queue)
        # published load: the engine's views captured at pub_at, a LoadSnapshot on demand
        self.dirty_since: float | None = None
        self.pub_at = 0.0
        self.pub_raw: tuple[list, dict] | None = None
        self.pub_snap: LoadSnapshot | None = None
        self.tick_at: float | None = None
        self.sweep_at: float | None = None
        # overflow state, as ClusterLink keeps it
        self.stayed: dict[str, dict[str, None]] = {}
        self.ratio_active: dict[str, frozenset[str]] = {}
        self.sent: list[list] = []  # [target site, target queue, done_at or None]
        self.partner_calls: dict[str, set[str]] = {}
        self.partner_rate: dict[str, deque[float]] = {}

    def snapshot(self) -> LoadSnapshot:
        if self.pub_snap is None:
            queues, counts = self.pub_raw  # type: ignore[misc]
            self.pub_snap = site_load(
                self.name, self.region, self.kind, queues, self.qcfg, counts, mode=self.mode.mode
            )
        return self.pub_snap


class _Replay:
    def __init__(
        self, sites: Sequence[SiteConfig], arrivals: Sequence[Arrival], policy: OverflowPolicy,
        contingency: Mapping[str, ContingencyState] | None, seed: int, censored: Censored,
        drain_s: float | None, targets: Targets | None = None, controller: Controller | None = None,
        control_every_s: float | None = None, apply_delay_s: float = 0.0,
    ) -> None:  # fmt: skip
        if censored not in ("resample", "inf"):
            raise WhatIfError(f"censored must be 'resample' or 'inf', got {censored!r}")
        names = [s.site.name for s in sites]
        if len(set(names)) != len(names):
            raise WhatIfError(f"duplicate site names {names}")
        contingency = dict(contingency or {})
        unknown = sorted(set(contingency) - set(names))
        if unknown:
            raise WhatIfError(f"contingency for unknown site(s) {unknown}; sites are {sorted(names)}")
        self.policy = policy
        self.max_age = policy.max_peer_age_s
        self.hours = any(c.hours is not None for c in policy.partners.values())
        self.sites = {s.site.name: _Site(s, contingency.get(s.site.name, ContingencyState()), policy) for s in sites}
        self.members = frozenset(names)
        for s in self.sites.values():
            # the queue of each peer that would take a call of each of s's queues
            for q in s.cfg.queues:
                s.peer_queue[q.name] = [
                    (p, p.cfg.queues.index(pq)) for p in self.sites.values()
                    if p is not s and (pq := p.cfg.queue_for(q.skill, q.channel, q.language)) is not None
                ]  # fmt: skip
            # does any other site decide overflow (read s's load)?
            s.read = any(r is not None and r.enabled for o in self.sites.values() if o is not s for r in o.rules.values())
        self.seed = seed
        self.drain_s = drain_s
        self.base_policy = policy
        self.in_force: dict[str, SiteTargets] = {}  # site -> the targets applied last
        self.queue_names = {n: [q.name for q in s.cfg.queues] for n, s in self.sites.items()}
        self.partner_names = set(policy.partners) | {n for n, s in self.sites.items() if s.kind == "partner"}
        self.initial = self._check_targets(targets, "targets") if targets else None
        if controller is not None and not (control_every_s is not None and control_every_s > 0
                                           and math.isfinite(control_every_s)):
            raise WhatIfError(f"a controller needs control_every_s > 0, got {control_every_s!r}")
        if not (apply_delay_s >= 0 and math.isfinite(apply_delay_s)):
            raise WhatIfError(f"apply_delay_s must be a finite number >= 0, got {apply_delay_s!r}")
        self.controller = controller
        self.control_every_s = control_every_s
        self.apply_delay_s = apply_delay_s
        self.last_control = 0.0
        self.result = ReplayResult(
            sites={n: SiteResult(site=n) for n in names}, total=Tally(), calls=len(arrivals), seed=seed
        )
        self._check(arrivals)
        self.arrivals = sorted(arrivals, key=lambda a: (a.at, a.call_id))
        t_min = self.arrivals[0].at if self.arrivals else 0.0
        self.shift = 1.0 - t_min if t_min < 1.0 else 0.0  # engine times must be > 0
        self.t0 = t_min + self.shift
        self.calls = self._prepare(random.Random(seed), censored)
        self.heap: list[tuple[float, int, int, Any]] = []
        self.seq = 0

    # -- input -----------------------------------------------------------------------------

    def _check(self, arrivals: Sequence[Arrival]) -> None:
        seen: set[str] = set()
        for a in arrivals:
            if not isinstance(a, Arrival):
                raise WhatIfError(f"expected Arrival objects, got {type(a).__name__}")
            a.check()
            s = self.sites.get(a.site)
            if s is None:
                raise WhatIfError(
                    f"arrival {a.call_id!r}: unknown site {a.site!r}; the replay has {sorted(self.sites)}"
                )
            if a.channel not in ("voice", "chat", "email", "social"):
                raise WhatIfError(f"arrival {a.call_id!r}: unknown channel {a.channel!r}")
            if s.cfg.queue_for(a.skill, a.channel, a.language or None) is None:  # type: ignore[arg-type]
                have = ", ".join(f"{q.name} ({q.skill}/{q.channel.value}/{q.language or '*'})" for q in s.cfg.queues)
                raise WhatIfError(
                    f"arrival {a.call_id!r}: site {a.site} has no queue for skill {a.skill!r} on "
                    f"{a.channel}" + (f" in {a.language!r}" if a.language else "") + f"; its queues: {have}"
                )  # fmt: skip
            if a.call_id in seen:
                raise WhatIfError(f"arrival {a.call_id!r} appears twice")
            seen.add(a.call_id)

    def _prepare(self, rng: random.Random, censored: Censored) -> dict[str, _Call]:
        """Fill unknown handle times and patience (see the module docstring)."""
        handles: dict[tuple, list[float]] = {}
        patience: dict[tuple, list[float]] = {}
        for a in self.arrivals:
            if a.handle_s is not None and a.outcome in ("", "completed"):
                handles.setdefault((a.site, a.skill, a.channel), []).append(a.handle_s)
                handles.setdefault(("", a.skill, a.channel), []).append(a.handle_s)
            if a.patience_s is not None and a.outcome == "abandoned":
                patience.setdefault((a.site, a.skill, a.channel), []).append(a.patience_s)
        for v in patience.values():
            v.sort()
        calls = {}
        for a in self.arrivals:
            h = a.handle_s
            if h is None:
                pool = handles.get((a.site, a.skill, a.channel)) or handles.get(("", a.skill, a.channel))
                if pool:
                    h = pool[rng.randrange(len(pool))]
                else:
                    q = self.sites[a.site].cfg.queue_for(a.skill, a.channel, a.language or None)  # type: ignore[arg-type]
                    h = q.aht_s  # type: ignore[union-attr]
            p = a.patience_s
            if p is None:
                p = math.inf
                pool = patience.get((a.site, a.skill, a.channel))
                if censored == "resample" and pool:
                    i = bisect.bisect_right(pool, a.waited_s)
                    if i < len(pool):
                        p = pool[i + rng.randrange(len(pool) - i)]
            calls[a.call_id] = _Call(a, self.sites[a.site], float(h), float(p))
        return calls

    # -- events ----------------------------------------------------------------------------

    def push(self, t: float, kind: int, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, kind, self.seq, payload))

    def run(self) -> ReplayResult:
        t = self.t0
        for s in self.sites.values():
            self._start(s, t)
        if self.initial is not None:
            self._apply_targets(self.initial, t)
        for a in self.arrivals:
            self.push(a.at + self.shift, _ARRIVE, a.call_id)
        last_arrival = self.arrivals[-1].at + self.shift if self.arrivals else t
        stop = math.inf if self.drain_s is None else last_arrival + self.drain_s
        self.last_arrival = last_arrival
        if self.controller is not None and self.arrivals:
            self.last_control = self.t0
            self.push(self.t0, _CONTROL, None)
        heap = self.heap
        end = t  # the last event of a call: a controller's instants do not stretch the span
        while heap:
            t, kind, _, payload = heapq.heappop(heap)
            if t > stop:
                t = end = stop
                break
            if kind < _CONTROL:
                end = t
            if kind == _ARRIVE:
                self._arrive(self.calls[payload], t)
            elif kind == _COMPLETE:
                self._complete(self.calls[payload], t)
            elif kind == _ABANDON:
                self._abandon(self.calls[payload], t)
            elif kind == _TICK:
                self._tick(payload, t)
            elif kind == _SWEEP:
                self._sweep(payload, t)
            elif kind == _CONTROL:
                self._control(t)
            else:
                self._apply_targets(payload, t)
        self.result.span_s = max(0.0, end - self.t0)
        return self._finish()

    def _start(self, s: _Site, t: float) -> None:
        e = s.engine
        e.apply({
            "op": "set_mode", "t": t, "mode": s.mode.mode, "backoffice": s.settings.backoffice_agents,
            "announcement": s.settings.announcement[:MAX_ANNOUNCEMENT],
        })  # fmt: skip
        for aid in s.cfg.agent_profiles():
            e.apply({"op": "sign_in", "t": t, "agent_id": aid})
            e.apply({"op": "set_state", "t": t, "agent_id": aid, "state": "ready"})
        self._capture(s, t)

    def _due(self, s: _Site, t: float) -> None:
        """Publish ``s``'s load at the latest grid instant <= t if it changed before it
        (call before anything changes ``s`` at ``t``, and before reading its load).
        Loads nobody reads (no other site has a queue with overflow rules) are not
        built."""
        if s.dirty_since is None or not s.read:
            return
        g = self.t0 + math.floor((t - self.t0) / PUBLISH_S) * PUBLISH_S
        if s.dirty_since < g:
            self._capture(s, g)

    @staticmethod
    def _capture(s: _Site, g: float) -> None:
        """The load ``s`` publishes at ``g`` (its state now: nothing changed it since).

        The views are read at ``now=0``: every figure ``decide`` uses (lengths, expected
        waits, staffed and free agents) does not depend on the reading time, and the
        engine then takes its recent service level from its window counters as of the
        queue's last finished call instead of rescanning the whole window (O(calls of
        the last 30 min) per queue and reading). That service level is only shown in
        the load, never used by a decision."""
        views = s.engine.queues(now=0.0)
        s.pub_at = g
        s.pub_raw = (views, s.engine.counts_by_state())
        s.pub_snap = None
        s.dirty_since = None
        s.content = tuple((v.length, v.expected_wait_s, v.agents_staffed, v.agents_ready) for v in views)

    def _pub_at(self, s: _Site, t: float) -> float:
        """When the load of ``s`` that peers see at ``t`` was published (without
        capturing it: what :meth:`_due` would make of it)."""
        if s.dirty_since is not None:
            g = self.t0 + math.floor((t - self.t0) / PUBLISH_S) * PUBLISH_S
            if s.dirty_since < g:
                return g
        return s.pub_at

    def _apply(self, s: _Site, cmd: dict) -> Any:
        """Apply a command at ``s`` and play its effects (agents accept every offer at
        once); returns the command's result."""
        t = cmd["t"]
        out = s.engine.apply(cmd)
        if out.changed:
            s.version += 1
            if s.dirty_since is None:
                s.dirty_since = t
        for fx in out.effects:
            if type(fx) is AssignmentOffered:
                view = s.engine.apply({
                    "op": "accept", "t": t, "agent_id": fx.agent_id, "assignment_id": fx.assignment_id,
                }).result  # fmt: skip
                self._answered(s, self.calls[fx.call_id], view.queue, t, fx.agent_id)
        nd = s.engine.next_deadline()
        if nd is not None and (s.tick_at is None or nd < s.tick_at):
            s.tick_at = nd
            self.push(max(nd, t), _TICK, s)
        return out.result

    def _answered(self, s: _Site, c: _Call, queue: str, t: float, agent: str) -> None:
        if not c.oqueue:  # answered by its own offer
            c.oqueue = queue
        c.state = "connected"
        c.agent = agent
        c.answered_at = t
        self._unstay(c)
        self._tally(c, "answered", t - (c.a.at + self.shift))
        talk = max(0.0, c.handle - s.qcfg[queue].wrap_up_s)
        self.push(t + talk, _COMPLETE, c.a.call_id)

    def _arrive(self, c: _Call, t: float) -> None:
        s = c.origin
        a = c.a
        if self.controller is not None:  # what the controller is told arrived
            q = s.cfg.queue_for(a.skill, a.channel, a.language or None)  # type: ignore[arg-type]
            if q is not None:
                s.arrived[q.name] = s.arrived.get(q.name, 0) + 1
        self._due(s, t)
        try:
            res = self._apply(s, {
                "op": "offer", "t": t, "call_id": a.call_id, "channel": a.channel, "skill": a.skill,
                "language": a.language, "caller": a.caller, "customer_id": a.customer_id,
                "priority_class": a.priority_class,
            })  # fmt: skip
        except RoutingError as e:  # QUEUE_FULL: the node refuses the offer
            if e.reason != "QUEUE_FULL":
                raise WhatIfError(f"arrival {a.call_id!r} refused by {s.name}: {e.reason}: {e.message}") from None
            c.state = "done"
            self._tally(c, "rejected", 0.0)
            return
        view = res.call
        c.oqueue = view.queue
        if view.state == "rejected":
            c.state = "done"
            self._tally(c, "rejected", 0.0)
            return
        if c.state != "new":  # answered by its own offer
            return
        c.state = "queued"
        if math.isfinite(c.patience):
            self.push(t + c.patience, _ABANDON, a.call_id)
        if view.state == "queued":
            if not self._decide(s, a.call_id, view.queue, res.expected_wait_s, t, log_stay=True):
                rules = s.rules[view.queue]
                if rules is not None and rules.enabled:  # else every sweep would keep it: skip them
                    self._stay(s, view.queue, a.call_id, t)

    def _complete(self, c: _Call, t: float) -> None:
        s = c.site
        self._due(s, t)
        self._apply(s, {"op": "complete", "t": t, "call_id": c.a.call_id, "resolved": True})
        c.state = "done"
        self._ended(c)

    def _abandon(self, c: _Call, t: float) -> None:
        if c.state != "queued":
            return
        s = c.site
        self._due(s, t)
        self._apply(s, {"op": "abandon", "t": t, "call_id": c.a.call_id, "reason": "patience"})
        c.state = "done"
        self._unstay(c)
        self._ended(c)
        self._tally(c, "abandoned", t - (c.a.at + self.shift))

    def _tick(self, s: _Site, t: float) -> None:
        if s.tick_at != t:
            return  # superseded by an earlier deadline
        s.tick_at = None
        self._due(s, t)
        self._apply(s, {"op": "tick", "t": t})

    def _ended(self, c: _Call) -> None:
        p = c.partner
        if p is not None:
            c.origin.partner_calls.get(p.name, set()).discard(c.a.call_id)
            c.partner = None

    # -- overflow, as router.node.cluster.ClusterLink ---------------------------------------

    def _stay(self, s: _Site, queue: str, cid: str, t: float) -> None:
        s.stayed.setdefault(queue, {})[cid] = None
        if s.sweep_at is None:
            s.sweep_at = self.t0 + (math.floor((t - self.t0) / SWEEP_S) + 1) * SWEEP_S
            self.push(s.sweep_at, _SWEEP, s)

    def _unstay(self, c: _Call) -> None:
        if c.moved:  # came by overflow: never among the calls that stayed
            return
        ids = c.origin.stayed.get(c.oqueue)
        if ids is not None:
            ids.pop(c.a.call_id, None)

    def _sweep(self, s: _Site, t: float) -> None:
        s.sweep_at = None
        for queue, ids in list(s.stayed.items()):
            moved = 0
            for cid in reversed(list(ids)):
                if moved >= SWEEP_MAX:
                    break
                if cid not in ids:
                    continue
                if not self._decide(s, cid, queue, s.engine.expected_wait(cid), t, log_stay=False):
                    break
                moved += 1
            if not s.stayed.get(queue):
                s.stayed.pop(queue, None)
        if s.stayed and s.sweep_at is None:
            s.sweep_at = t + SWEEP_S
            self.push(s.sweep_at, _SWEEP, s)

    def _cannot_overflow(self, s: _Site, queue: str, rules: Any, cid: str, ew: float, t: float) -> bool:
        """A sweep's shortcut, exact: True when ``decide`` can only answer "stay" for
        the call — no split share for it, and no peer publishes a staffed queue for the
        call with an expected wait below the call's, and below the margin's bar if any (load rules only ever choose such a
        peer; the charges for our transfers only lengthen a peer's wait). Not taken with
        a queue-ratio rule, whose hysteresis state every decision updates."""
        if rules.queue_ratio is not None:
            return False
        if rules.split is not None and split_bucket(cid, rules.split.salt) * 100.0 < rules.split.percent:
            return False
        if rules.wait_threshold is not None:
            if not ew > rules.wait_threshold.factor * s.settings.wait_factor * s.qcfg[queue].service_level.threshold_s:
                s.ratio_active[queue] = frozenset()
                return True
        bar = ew
        if rules.margin is not None:  # decide then also wants peer_ew <= this bar
            bar = min(ew, ew * (1.0 - rules.margin.ratio) - rules.margin.seconds)
        for p, idx in s.peer_queue[queue]:
            self._due(p, t)
            _, pew, staffed, _ = p.content[idx]
            if staffed > 0 and pew < ew and pew <= bar:
                return False
        s.ratio_active[queue] = frozenset()
        return True

    def _peer_loads(self, s: _Site, t: float) -> dict[str, PeerLoad]:
        loads = {}
        for p in self.sites.values():
            if p is s:
                continue
            self._due(p, t)
            loads[p.name] = PeerLoad(p.snapshot(), (t - p.pub_at) % HEARTBEAT_S)
        if not s.sent:
            return loads
        sites = self.sites
        s.sent = [x for x in s.sent if x[2] is None or sites[x[0]].pub_at <= x[2]]  # shown: forget
        return charge_transfers(loads, [(x[0], x[1]) for x in s.sent])

    def _partner_usage(self, s: _Site, t: float) -> dict[str, PartnerUsage]:
        out = {}
        for name, p in self.sites.items():
            if p.kind != "partner" or p is s:
                continue
            rate = s.partner_rate.get(name)
            while rate and rate[0] < t - 1.0:
                rate.popleft()
            out[name] = PartnerUsage(concurrent=len(s.partner_calls.get(name, ())), calls_last_s=float(len(rate or ())))
        return out

    def _decide(self, s: _Site, cid: str, queue: str, ew: float, t: float, *, log_stay: bool) -> bool:
        """``ClusterLink._decide``: decide for the queued call ``cid`` and start its
        transfer on an overflow; True when it overflowed. ``log_stay`` False (sweeps):
        a stay is not counted, and a stay on inputs identical to the sweep's previous
        stay for this queue is not decided again (``decide`` is a pure function of
        them: the same stay)."""
        rules = s.rules[queue]
        if rules is None or not rules.enabled:  # decide's first answer, without the figures
            s.ratio_active[queue] = frozenset()
            if log_stay:
                rule = "no_rule" if rules is None else "disabled"
                self.result.decisions[rule] = self.result.decisions.get(rule, 0) + 1
            return False
        usage = self._partner_usage(s, t)
        ratio = s.ratio_active.get(queue, frozenset())
        sweep = not log_stay
        if sweep:  # first: the same site state and the same publications as the last stay?
            pubs = tuple(self._pub_at(p, t) for p in self.sites.values())
            common = (
                cid, ew, ratio, tuple((t - g) % HEARTBEAT_S > self.max_age for g in pubs),
                tuple((x[0], x[1], x[2]) for x in s.sent), tuple(usage.values()),
                int((t - self.shift) // 60) if self.hours else 0,
            )  # fmt: skip
            key1 = (s.version, pubs, common)
            if s.memo.get(queue) == key1:
                return False
            if self._cannot_overflow(s, queue, rules, cid, ew, t):
                return False
        cached = s.views.get(queue)
        if cached is not None and cached[0] == s.version:
            qv = cached[1]
        else:
            qv = s.engine.queue(queue, now=0.0)  # see _capture: decide's figures only
            s.views[queue] = (s.version, qv)
        loads = self._peer_loads(s, t)
        if sweep:  # then: the same figures (local queue, peers' loads) as the last stay?
            charged = tuple((x[0], x[1]) for x in s.sent)  # after _peer_loads forgot the shown ones
            key2 = (qv.length, qv.agents_staffed, tuple(p.content for p in self.sites.values() if p is not s),
                    charged, common)
            if s.memo2.get(queue) == key2:
                s.memo[queue] = key1
                return False
        local = local_queue(s.name, s.region, qv, s.qcfg.get(queue), ew)
        d = decide(
            cid, local, self.policy, loads, now=t - self.shift, mode=s.mode.mode,
            partner_usage=usage, ratio_active=ratio, members=self.members,
        )  # fmt: skip
        s.ratio_active[queue] = d.ratio_active
        if not d.overflow:
            if sweep:
                s.memo[queue], s.memo2[queue] = key1, key2
            else:
                self.result.decisions[d.rule] = self.result.decisions.get(d.rule, 0) + 1
            return False
        self.result.decisions[d.rule] = self.result.decisions.get(d.rule, 0) + 1
        self._transfer(s, self.calls[cid], self.sites[d.target], t)  # type: ignore[index]
        return True

    def _transfer(self, s: _Site, c: _Call, target: _Site, t: float) -> None:
        """The two-phase transfer, all at ``t`` (see the module docstring)."""
        cid = c.a.call_id
        queue = c.oqueue
        self._unstay(c)
        sent = [target.name, "", None]
        s.sent.append(sent)
        if target.kind == "partner":
            s.partner_calls.setdefault(target.name, set()).add(cid)
            s.partner_rate.setdefault(target.name, deque()).append(t)
        try:
            view = self._apply(s, {"op": "transfer_begin", "t": t, "call_id": cid,
                                   "transfer_no": 1 + s.engine.call(cid).transfer_count, "target": target.name})
        except RoutingError:  # e.g. a blacklisted caller in a restricted queue: it stays, forgotten
            self._forget(s, sent, cid, target)
            return
        no = view.transfer_count
        reserve = {
            "op": "transfer_reserve", "t": t, "call_id": cid, "transfer_no": no, "origin": s.name,
            "channel": view.channel, "skill": view.skill, "language": view.language, "caller": view.caller,
            "customer_id": view.customer_id, "priority_class": view.priority_class,
            "offered_at": view.offered_at, "context": view.context, "ttl_s": TRANSFER_TTL_S,
        }  # fmt: skip
        self._due(target, t)
        try:
            tv = self._apply(target, reserve)
            reason = tv.reason if tv.state != "reserved" else ""
        except RoutingError as e:
            reason = e.reason
        if reason:
            self._apply(s, {"op": "transfer_abort", "t": t, "call_id": cid, "transfer_no": no,
                            "reason": reason.lower()[:64], "by_target": True})
            self._forget(s, sent, cid, target)
            self.result.transfers_aborted += 1
            self._stay(s, queue, cid, t)
            self._resort_stayed(s, queue)
            return
        sent[1] = tv.queue
        self._apply(s, {"op": "transfer_committing", "t": t, "call_id": cid, "transfer_no": no})
        c.site = target
        c.moved = True
        if target.kind == "partner":
            c.partner = target
        tv = self._apply(target, {"op": "transfer_commit", "t": t, "call_id": cid, "transfer_no": no})
        if tv.state != "committed":  # cannot happen at one instant; keep the books right anyway
            raise WhatIfError(f"transfer of {cid} to {target.name} not committed: {tv.reason}")
        self._apply(s, {"op": "transfer_done", "t": t, "call_id": cid, "transfer_no": no})
        sent[2] = t
        self.result.sites[s.name].overflow_out += 1
        self.result.sites[s.name].queues.setdefault(queue, Tally()).overflow_out += 1
        self.result.sites[target.name].overflow_in += 1

    def _forget(self, s: _Site, sent: list, cid: str, target: _Site) -> None:
        if sent in s.sent:
            s.sent.remove(sent)
        s.partner_calls.get(target.name, set()).discard(cid)

    def _resort_stayed(self, s: _Site, queue: str) -> None:
        ids = s.stayed.get(queue)
        if ids:
            s.stayed[queue] = dict.fromkeys(sorted(ids, key=lambda k: (self.calls[k].a.at, k)))

    # -- targets and the controller ----------------------------------------------------------

    def _check_targets(self, targets: Any, what: str) -> dict[str, SiteTargets]:
        """``targets`` as a plain dict, after checking them against the site files."""
        if not isinstance(targets, Mapping):
            raise WhatIfError(f"{what} must map site names to SiteTargets, got {type(targets).__name__}")
        out = {}
        for site, t in targets.items():
            s = self.sites.get(site)
            if s is None:
                raise WhatIfError(f"{what}: unknown site {site!r}; the replay has {sorted(self.sites)}")
            if not isinstance(t, SiteTargets):
                raise WhatIfError(f"{what}[{site}] must be a SiteTargets, got {type(t).__name__}")
            try:
                check_targets(s.cfg, t, self.partner_names)
            except PlanError as e:
                raise WhatIfError(f"{what}: {e}") from None
            out[site] = t
        return out

    def _move(self, s: _Site, agent: str, group: str, t: float) -> None:
        """``move_agent`` with ``when_free`` at ``s``, as the node's targets applier does: a
        busy agent's move is pending in the engine, made when its last contact leaves it
        (before that command hands out the next one); to its current group it cancels a
        pending move."""
        self._due(s, t)
        try:
            self._apply(s, {"op": "move_agent", "t": t, "agent_id": agent, "group": group, "when_free": True})
        except RoutingError as e:
            raise WhatIfError(f"moving agent {agent} of {s.name} to {group}: {e.reason}: {e.message}") from None

    def _apply_targets(self, targets: Mapping[str, SiteTargets], t: float) -> None:
        """Apply one target set at ``t`` as a node does (see the module docstring)."""
        for name in sorted(targets):
            s, want = self.sites[name], targets[name]
            current = dict(s.home)
            current.update(s.engine.moved_groups())
            wanted = {c["agent_id"]: c["group"] for c in move_commands(s.home, current, s.placed, want)}
            s.placed = set(want.groups)
            for aid in s.engine.pending_groups():
                if aid not in wanted:  # superseded: where it is now is where these targets want it
                    self._move(s, aid, current[aid], t)
            for aid, group in wanted.items():
                self._move(s, aid, group, t)
            self.in_force[name] = want
        self.policy = policy_with_targets(self.base_policy, self.in_force, self.queue_names)
        for name, s in self.sites.items():
            want = self.in_force.get(name)
            mode = s.contingency
            if mode.mode == "normal" and want is not None and want.mode is not None:
                mode = ContingencyState(mode=want.mode)
            s.settings = mode.settings(self.policy)
            if mode != s.mode:
                s.mode = mode
                self._due(s, t)
                self._apply(s, {
                    "op": "set_mode", "t": t, "mode": mode.mode, "backoffice": s.settings.backoffice_agents,
                    "announcement": s.settings.announcement[:MAX_ANNOUNCEMENT],
                })  # fmt: skip
            s.rules = {q: self.policy.rules_for(name, q) for q in self.queue_names[name]}
            # the sweeps' memos hold decisions under the old rules: decide afresh
            s.memo.clear()
            s.memo2.clear()
        for s in self.sites.values():
            s.read = any(r is not None and r.enabled for o in self.sites.values() if o is not s
                         for r in o.rules.values())
        self.result.targets_applied += 1

    def _control(self, t: float) -> None:
        """Call the controller with what it could see at ``t``; schedule what it returns
        ``apply_delay_s`` later, and its next call."""
        obs = self._observe(t)
        self.last_control = t
        out = self.controller(t - self.shift, obs)  # type: ignore[misc]
        if out:
            self.push(t + self.apply_delay_s, _TARGETS, self._check_targets(out, f"controller at t={t - self.shift:g}"))
        nxt = t + self.control_every_s  # type: ignore[operator]
        if nxt <= self.last_arrival:
            self.push(nxt, _CONTROL, None)

    def _observe(self, t: float) -> Observation:
        sites = {}
        for name, s in self.sites.items():
            tallies = self.result.sites[name].queues
            queues = {}
            for qv in s.engine.queues(now=0.0):
                total = s.arrived.get(qv.name, 0)
                tally = tallies.get(qv.name)
                queues[qv.name] = QueueObservation(
                    arrivals=total - s.arrived_seen.get(qv.name, 0), arrivals_total=total, length=qv.length,
                    staffed=qv.agents_staffed, service_level=None if tally is None else tally.service_level,
                )  # fmt: skip
            s.arrived_seen = dict(s.arrived)
            sites[name] = SiteObservation(queues=queues, mode=s.mode.mode, moved=s.engine.moved_groups())
        since = t - self.last_control if t > self.t0 else 0.0
        return Observation(t=t - self.shift, since_s=since, applied=self.result.targets_applied, sites=sites)

    # -- results ---------------------------------------------------------------------------

    def _tally(self, c: _Call, outcome: str, waited: float) -> None:
        site = self.result.sites[c.origin.name]
        qname = c.oqueue if outcome != "rejected" or c.oqueue else "(rejected)"
        q = site.queues.setdefault(qname, Tally())
        for k in (site, q):
            k.offered += 1
            if outcome == "rejected":
                k.rejected += 1
            elif outcome == "unfinished":
                k.unfinished += 1
            else:
                sl = c.origin.qcfg[c.oqueue].service_level
                k.add_finished(sl, outcome == "answered", max(0.0, waited))

    def _finish(self) -> ReplayResult:
        for c in self.calls.values():
            if c.state in ("new", "queued"):
                self._tally(c, "unfinished", 0.0)
        total = self.result.total
        for s in self.result.sites.values():
            total.merge(s)
        return self.result


def replay(
    sites: list[SiteConfig],
    arrivals: list[Arrival],
    policy: OverflowPolicy,
    *,
    contingency: dict[str, ContingencyState] | None = None,
    seed: int = 1,
    censored: Censored = "resample",
    drain_s: float | None = None,
    targets: Mapping[str, SiteTargets] | None = None,
    controller: Controller | None = None,
    control_every_s: float | None = None,
    apply_delay_s: float = 0.0,
) -> ReplayResult:
    """Play ``arrivals`` through ``sites`` under ``policy`` (see the module docstring).

    ``contingency``: each site's mode (default normal). ``seed``: the draws of unknown
    handle times and patience; the same inputs and seed give the same result.
    ``censored``: how the unknown patience of answered calls is drawn ("resample" or
    "inf"). ``drain_s``: stop that long after the last arrival (calls still waiting
    count as ``unfinished``); None = until every call ended.

    ``targets``: site -> :class:`router.plans.SiteTargets` applied at the start;
    ``controller(t, observation)``, called every ``control_every_s`` while calls arrive,
    returns target sets (or None) applied ``apply_delay_s`` later (see the module
    docstring). Without them the replay is exactly the one without targets.

    Raises :class:`WhatIfError` for an arrival of an unknown site or with no queue there, a
    duplicate call id, a bad figure, targets naming an unknown site, agent, group, queue
    or partner, or a controller without a positive ``control_every_s``.
    """
    if not isinstance(policy, OverflowPolicy):
        raise WhatIfError(f"policy must be an OverflowPolicy (router.overflow.parse_policy), got {type(policy).__name__}")
    return _Replay(sites, arrivals, policy, contingency, seed, censored, drain_s, targets, controller,
                   control_every_s, apply_delay_s).run()


def compare(
    sites: list[SiteConfig],
    arrivals: list[Arrival],
    before: OverflowPolicy,
    after: OverflowPolicy,
    *,
    contingency: dict[str, ContingencyState] | None = None,
    seed: int = 1,
    censored: Censored = "resample",
    drain_s: float | None = None,
) -> dict[str, Any]:
    """Replay the same arrivals (same seed, same draws) under ``before`` and ``after``:
    ``{"calls", "seed", "before": ReplayResult.to_dict(), "after": ..., "sites": {site:
    {"before": {...}, "after": {...}, "delta": {...}}}, "total": {...}}``. A delta is
    after minus before for service_level, asa_s, abandon_rate, answered, abandoned,
    overflow_out and overflow_in (None where either side has no figure)."""
    kw = dict(contingency=contingency, seed=seed, censored=censored, drain_s=drain_s)
    b = replay(sites, arrivals, before, **kw).to_dict()  # type: ignore[arg-type]
    a = replay(sites, arrivals, after, **kw).to_dict()  # type: ignore[arg-type]

    def row(x: dict, y: dict) -> dict:
        bx = {k: v for k, v in x.items() if k != "queues"}
        ay = {k: v for k, v in y.items() if k != "queues"}
        delta = {}
        for k in ("service_level", "asa_s", "abandon_rate", "answered", "abandoned", "overflow_out", "overflow_in"):
            delta[k] = None if bx[k] is None or ay[k] is None else round(ay[k] - bx[k], 6)
        return {"before": bx, "after": ay, "delta": delta}

    return {
        "calls": b["calls"],
        "seed": seed,
        "before": b,
        "after": a,
        "sites": {name: row(b["sites"][name], a["sites"][name]) for name in b["sites"]},
        "total": row(b["total"], a["total"]),
    }
