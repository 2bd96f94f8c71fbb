"""Node views -> history rows. Pure functions (plus one small in-memory tracker), no I/O.

How a site node feeds the history (the wiring lives in the node; ``writer`` is a
:class:`router.history.writer.HistoryWriter`):

* a call reaches a final outcome (completed / abandoned / rejected; the ``CallChanged``
  effect of a durable command; a call "transferred" away is written by the site that
  ends it, with this site as its origin)::

      writer.submit("interactions", interaction_row(engine.call(call_id), site_cfg))

* an offer was decided (the ``OfferResult`` of ``offer``; later the overflow policy's
  own decisions, with their candidates and expected waits)::

      writer.submit("routing_decisions", decision_from_offer(site_cfg, result, seq=0, at=t))

* an agent changed (every ``AgentChanged`` effect, and on ``CallConnected`` /
  ``CallChanged`` for the agent holding the call, since "busy" depends on calls in
  hand)::

      row = tracker.observe(engine.agent(agent_id), seq=journal_seq, at=t)
      if row: writer.submit("agent_state_changes", row)

Every row is keyed so that submitting it twice is harmless (invariant 5). After a restart
(SIGKILL included) the node re-submits the row of every ended call its engine retains
(``engine.calls()`` in a final state) rather than track what reached the store, and seeds
the tracker with ``tracker.restore(engine.agents())``. Routing decisions and agent
intervals of the last second before a SIGKILL may be missing; interactions are not.

Times in rows are whole Unix seconds (floored); durations are exact float seconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from router.config import SiteConfig
from router.model import AgentView, CallView, OfferResult

FINAL_STATES = frozenset({"completed", "abandoned", "rejected"})

#: History agent states: the engine's, with "busy" for an agent holding any interaction.
AGENT_STATES = ("signed_out", "not_ready", "ready", "busy", "wrap_up")


def _ts(t: float) -> int:
    return math.floor(t) if t and t > 0 else 0


def partner_of(site: SiteConfig) -> str:
    return site.site.name if site.site.kind == "partner" else ""


def interaction_row(
    call: CallView,
    site: SiteConfig,
    *,
    origin_site: str = "",
    origin_region: str = "",
    transferred_at: float = 0.0,
    wrap_s: float | None = None,
    regions: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The ``interactions`` row of a call in a final state (completed, abandoned,
    rejected — not "transferred": the site that ends the call writes its row).

    ``origin_site`` / ``origin_region``: where the call first arrived (who pays for it),
    when it came to this site by overflow; by default the call's ``transfer_origin``, or
    ``context["attributes"]["origin_site"/"origin_region"]``, or this site; the origin's
    region comes from ``regions`` (site -> region, e.g. from cluster membership) when not
    given. ``wrap_s`` defaults to the queue's configured wrap-up for an answered call
    (what the engine counts in its AHT).
    """
    if call.state not in FINAL_STATES:
        raise ValueError(f"call {call.call_id} is {call.state}, not a final outcome")
    attrs = (call.context or {}).get("attributes") or {}
    answered = call.answered_at > 0
    start = call.queued_at or call.offered_at
    if answered:
        wait = max(0.0, call.answered_at - start)
    elif call.state == "abandoned":
        wait = max(0.0, (call.ended_at or start) - start)
    else:
        wait = 0.0
    talk = max(0.0, call.ended_at - call.answered_at) if answered and call.ended_at else 0.0
    if wrap_s is None:
        wrap_s = 0.0
        if answered and call.state == "completed":
            q = next((q for q in site.queues if q.name == call.queue), None)
            wrap_s = q.wrap_up_s if q is not None else 0.0
    info = site.site
    o_site = (origin_site or getattr(call, "transfer_origin", "") or attrs.get("origin_site", "")
              or info.name)
    if origin_region:
        o_region = origin_region
    elif attrs.get("origin_region"):
        o_region = attrs["origin_region"]
    elif regions and o_site in regions:
        o_region = regions[o_site]
    else:
        o_region = info.region if o_site == info.name and info.kind == "inhouse" else ""
    return {
        "interaction_id": call.call_id,
        # Later rows for one call win (a correction); replays carry the same ver.
        "ver": int(round((call.ended_at or call.offered_at) * 1000)),
        "site": info.name,
        "region": info.region,
        "partner": partner_of(site),
        "origin_site": o_site,
        "origin_region": o_region,
        "queue": call.queue,
        "skill": call.skill,
        "channel": call.channel,
        "language": call.language,
        "priority_class": call.priority_class,
        "caller": call.caller,
        "customer_id": call.customer_id,
        "agent_id": call.agent_id if answered else "",
        "outcome": call.state,
        "reason": call.abandon_reason or call.reject_reason,
        "offered_at": _ts(call.offered_at),
        "queued_at": _ts(call.queued_at),
        "transferred_at": _ts(transferred_at),
        "answered_at": _ts(call.answered_at),
        "ended_at": _ts(call.ended_at),
        "wait_s": float(wait),
        "talk_s": float(talk),
        "wrap_s": float(wrap_s) if answered else 0.0,
        "handle_s": float(talk + wrap_s) if answered else 0.0,
        "csat": int(call.csat or 0),
        "resolved": 1 if call.resolved else 0,
        "wrap_up_code": call.wrap_up_code,
        "transfer_count": int(call.transfer_count),
    }


def routing_decision_row(
    site: SiteConfig,
    *,
    call_id: str,
    seq: int,
    at: float,
    rule: str,
    target_kind: str,
    target: str,
    candidates: Mapping[str, float] | Iterable[tuple[str, float]] = (),
    expected_wait_s: float = 0.0,
    reason: str = "",
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One routing decision: which rule sent the call where, among which candidates
    (name -> expected wait in seconds, in the order the rule considered them)."""
    items = list(candidates.items() if isinstance(candidates, Mapping) else candidates)
    return {
        "call_id": call_id,
        "seq": int(seq),
        "site": site.site.name,
        "region": site.site.region,
        "at": _ts(at),
        "rule": rule,
        "target_kind": target_kind,
        "target": target,
        "candidates": [str(n) for n, _ in items],
        "candidate_waits_s": [float(w) if math.isfinite(w) else -1.0 for _, w in items],
        "expected_wait_s": float(expected_wait_s) if math.isfinite(expected_wait_s) else -1.0,
        "reason": reason,
        "details": json.dumps(dict(details or {}), sort_keys=True, separators=(",", ":")),
    }


_DECISION_KIND = {"queued": ("queue_here", "queue"), "assigned": ("assign", "agent"),
                  "rejected": ("reject", "reject")}


def decision_from_offer(site: SiteConfig, result: OfferResult, *, seq: int, at: float) -> dict[str, Any]:
    """The routing decision of an accepted offer, from the engine's ``OfferResult``
    (its ``decision`` text is e.g. "queued: billing-fr-voice (vip)", "assigned:
    lyon-fr-003", "rejected: blacklist")."""
    call = result.call
    head, _, rest = result.decision.partition(":")
    rule, kind = _DECISION_KIND.get(head.strip(), (head.strip() or "unknown", "queue"))
    if kind == "queue":
        target = f"{site.site.name}/{call.queue}"
    elif kind == "agent":
        target = call.agent_id or rest.strip()
    else:
        target = ""
    here = f"{site.site.name}/{call.queue}" if call.queue else site.site.name
    return routing_decision_row(
        site, call_id=call.call_id, seq=seq, at=at, rule=rule, target_kind=kind, target=target,
        candidates=[(here, result.expected_wait_s)], expected_wait_s=result.expected_wait_s,
        reason=result.decision,
        details={"priority_class": call.priority_class, "position": result.position},
    )


def agent_history_state(view: AgentView) -> str:
    """The engine's agent state, with "busy" for a signed-in agent holding interactions
    (ringing or connected) outside wrap-up."""
    if view.call_ids and view.state in ("ready", "not_ready"):
        return "busy"
    return view.state


class AgentStateTracker:
    """Turns successive AgentViews into ``agent_state_changes`` rows: one row per change
    of history state, carrying the interval just left ([prev_at, at) in prev_state).

    Not thread-safe; one per node. ``restore`` seeds it after a restart (from the
    engine's agents, with their ``state_since``) so the first interval is not lost."""

    def __init__(self, site: SiteConfig) -> None:
        self.site = site
        self._last: dict[str, tuple[str, float, str]] = {}  # agent -> (state, since, reason)

    def restore(self, views: Iterable[AgentView]) -> None:
        for v in views:
            self._last[v.agent_id] = (agent_history_state(v), v.state_since, v.reason)

    def observe(self, view: AgentView, *, seq: int, at: float) -> dict[str, Any] | None:
        state = agent_history_state(view)
        prev = self._last.get(view.agent_id)
        if prev is not None and prev[0] == state and prev[2] == view.reason:
            return None
        self._last[view.agent_id] = (state, at, view.reason)
        return agent_state_row(
            self.site, agent_id=view.agent_id, seq=seq, at=at, state=state, reason=view.reason,
            prev_state=prev[0] if prev else "", prev_at=prev[1] if prev else 0.0,
            calls=len(view.call_ids),
        )

    def checkpoint(self, *, seq: int, at: float) -> list[dict[str, Any]]:
        """Rows closing every signed-in agent's current interval at ``at`` (same state
        again): emit at interval boundaries or a clean stop so occupancy covers the time
        up to now."""
        rows = []
        for aid, (state, since, reason) in sorted(self._last.items()):
            if state == "signed_out" or at <= since:
                continue
            self._last[aid] = (state, at, reason)
            rows.append(agent_state_row(
                self.site, agent_id=aid, seq=seq, at=at, state=state, reason=reason,
                prev_state=state, prev_at=since, calls=0,
            ))
        return rows


def agent_state_row(
    site: SiteConfig,
    *,
    agent_id: str,
    seq: int,
    at: float,
    state: str,
    reason: str = "",
    prev_state: str = "",
    prev_at: float = 0.0,
    calls: int = 0,
) -> dict[str, Any]:
    if state not in AGENT_STATES:
        raise ValueError(f"unknown agent state {state!r}")
    return {
        "site": site.site.name,
        "region": site.site.region,
        "partner": partner_of(site),
        "agent_id": agent_id,
        "seq": int(seq),
        "at": _ts(at),
        "state": state,
        "reason": reason,
        "prev_state": prev_state,
        "prev_at": _ts(prev_at),
        "calls": int(calls),
    }
