"""Rebalancing plans and the targets they set on sites, pure (no I/O, no clock).

* :mod:`router.plans.model` — :class:`SiteTargets` (what a rebalancer sets on one site:
  agents' groups, overflow wait factors, partners open or closed), :class:`TargetDoc`
  (the fenced document under ``targets/<site>``), :class:`Plan` (a plan with its base
  revision, expected service levels and cost), :class:`PlanError`;
* :mod:`router.plans.apply` — what targets mean for a site's engine (``move_agent``
  commands) and for the overflow policy in force (:func:`policy_with_targets`), and the
  diff of two sets of targets (:func:`diff`).
"""

from router.plans.apply import check_targets, diff, move_commands, policy_with_targets
from router.plans.model import Plan, PlanError, SiteTargets, TargetDoc, parse_plan, parse_target_doc

__all__ = [
    "Plan", "PlanError", "SiteTargets", "TargetDoc", "parse_plan", "parse_target_doc",
    "check_targets", "diff", "move_commands", "policy_with_targets",
]
