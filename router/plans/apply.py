"""What targets mean for a site and for the overflow policy in force (pure).

The node and the simulator share these functions, so a plan simulated is the plan the
nodes apply: :func:`move_commands` gives the engine's ``move_agent`` commands,
:func:`policy_with_targets` the overflow policy the site decides with.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from router.config import SiteConfig
from router.overflow import OverflowPolicy, QueueRules, WaitThreshold
from router.plans.model import PlanError, SiteTargets


def check_targets(cfg: SiteConfig, targets: SiteTargets, partners: Iterable[str] = ()) -> None:
    """Raise :class:`PlanError` if ``targets`` name an agent, group or queue ``cfg`` does not
    have, or a partner not in ``partners`` (the policy's and contracts' partners)."""
    agents = cfg.agent_profiles()
    groups = {g.id for g in cfg.agents}
    queues = {q.name for q in cfg.queues}
    name = cfg.site.name
    for aid, gid in targets.groups.items():
        if aid not in agents:
            raise PlanError(f"sites.{name}.groups.{aid}: site {name} has no agent {aid!r}")
        if gid not in groups:
            raise PlanError(f"sites.{name}.groups.{aid}: site {name} has no agent group {gid!r}")
    for q in targets.wait_factor:
        if q not in queues:
            raise PlanError(f"sites.{name}.wait_factor.{q}: site {name} has no queue {q!r}")
    known = set(partners)
    for p in targets.partners:
        if p not in known:
            raise PlanError(f"sites.{name}.partners.{p}: no partner {p!r} in the policy or the contracts")


def move_commands(home: Mapping[str, str], current: Mapping[str, str], moved_by_targets: Iterable[str],
                  targets: SiteTargets) -> list[dict[str, Any]]:
    """The ``move_agent`` commands that bring a site to ``targets``.

    ``home``: agent -> site-file group; ``current``: agent -> group now; ``moved_by_targets``:
    the agents the previous targets placed. An agent named by ``targets`` goes to its
    group; one the previous targets placed and these do not name goes home; every other
    agent is left where it is (an operator may have moved it). Commands only for agents
    not already there, in agent order (deterministic)."""
    want: dict[str, str] = {a: home[a] for a in moved_by_targets if a in home and a not in targets.groups}
    want.update(targets.groups)
    return [{"op": "move_agent", "agent_id": a, "group": g} for a, g in sorted(want.items()) if current.get(a) != g]


def policy_with_targets(policy: OverflowPolicy, targets: Mapping[str, SiteTargets],
                        queues: Mapping[str, Iterable[str]]) -> OverflowPolicy:
    """``policy`` with each site's targets laid over it: per (site, queue) rules whose wait
    threshold factor is the target's, and partners closed to a site excluded from every
    one of its queues' rules (``queues``: site -> its queue names). A partner a target
    opens is one a previous closing excluded: opening removes it from ``exclude`` only
    where the policy itself did not exclude it. Returns ``policy`` itself when no target
    changes anything."""
    sites: dict[str, dict[str, QueueRules]] = {s: dict(r) for s, r in policy.sites.items()}
    changed = False
    for site, t in targets.items():
        closed = sorted(p for p, is_open in t.partners.items() if not is_open)
        names = list(queues.get(site, ()))
        for q in names:
            factor = t.wait_factor.get(q)
            if factor is None and not closed:
                continue
            base = policy.rules_for(site, q) or QueueRules()
            update: dict[str, Any] = {}
            if factor is not None:
                update["wait_threshold"] = WaitThreshold(factor=factor)
            if closed:
                update["exclude"] = sorted(set(base.exclude) | set(closed))
            sites.setdefault(site, {})[q] = base.model_copy(update=update)
            changed = True
    if not changed:
        return policy
    return policy.model_copy(update={"sites": sites})


def diff(before: Mapping[str, SiteTargets], after: Mapping[str, SiteTargets]) -> list[dict[str, Any]]:
    """Rows ``{"site", "what", "key", "before", "after"}`` (what: group | wait_factor |
    partner | mode) for everything ``after`` sets differently from ``before``, sorted."""
    rows: list[dict[str, Any]] = []
    empty = SiteTargets()
    for site in sorted(set(before) | set(after)):
        b, a = before.get(site, empty), after.get(site, empty)
        for what, bm, am in (("group", b.groups, a.groups), ("wait_factor", b.wait_factor, a.wait_factor),
                             ("partner", b.partners, a.partners)):
            for key in sorted(set(bm) | set(am)):
                if bm.get(key) != am.get(key):
                    rows.append({"site": site, "what": what, "key": key, "before": bm.get(key), "after": am.get(key)})
        if b.mode != a.mode:
            rows.append({"site": site, "what": "mode", "key": "", "before": b.mode, "after": a.mode})
    return rows
