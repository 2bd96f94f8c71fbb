"""The node's side of the rebalancer (issue 12): apply this site's fenced targets live.

    applier = TargetsApplier(cluster)   # in ClusterLink.__init__: before coord.start()
    cluster.start()                     # spawns applier.run(): resume, retry moves, report
    cluster.policy                      # coord.policy with the targets laid over it
    cluster.mode                        # the operator's mode, else the targets' mode

What it does, on the node's event loop:

* watches ``targets/<site>`` (this site's key only) through the coordinator's
  ``watch_prefix`` and parses each value with :func:`router.plans.parse_target_doc` and
  :func:`router.plans.check_targets` (agents, groups, queues of the site file). An
  invalid document is logged and counted (``tandem_targets_refused_total{reason="invalid"}``);
  the targets in force stay;
* refuses a document whose fencing epoch is lower than the highest one applied (the
  engine's, journaled, so it survives restarts): a deposed leader's late write. Counted
  (``reason="stale_fencing"``), logged with both epochs; nothing changes;
* otherwise runs :func:`router.plans.move_commands` as journaled ``move_agent`` commands
  (the path of ``Admin.MoveAgent``) with ``when_free``, then journals the engine's
  ``targets_applied`` (epoch, generation, plan, the agents the targets place, the
  document). An agent with a contact ringing or in hand gets a *pending* move that the
  engine makes itself in the command that takes its last contact off it, before that
  command dispatches (so it moves even when calls wait for it; journaled with that
  command, kept in snapshots); newer targets cancel the pending moves they supersede.
  The targets' wait factors and closed partners are laid over the cluster's policy
  (:func:`router.plans.policy_with_targets`, cached per policy object and application),
  and their contingency mode applies while the operator's mode for the site is normal;
* reports what it applied under ``rebalancer/applied/<site>`` — ``{"generation",
  "fencing", "plan", "pending_moves", "refused", "ts"}`` (refused: documents refused
  since this process started) — once the ``targets_applied`` record is durable, without
  waiting for pending moves, and again when the pending moves reach 0 and after each
  refusal; retried while etcd is away.

A restarted node lays the document it applied last (kept by the engine) over its policy
at once, retries the moves still pending, and re-applies what the watch loads first —
idempotently: the same document journals nothing new. A node that has never applied
targets and finds no key keeps the site file and the policy as they are. A deleted key
changes nothing (a deletion carries no fencing epoch; only newer targets replace targets).

Invariant 6: nothing here blocks routing or raises into it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from router.engine.staffing import MAX_PLAN_ID, MAX_TARGETS_DOC
from router.model import RoutingError
from router.node import metrics
from router.overflow import ContingencyState, OverflowPolicy
from router.plans import (
    PlanError,
    SiteTargets,
    TargetDoc,
    check_targets,
    move_commands,
    parse_target_doc,
    policy_with_targets,
)

log = logging.getLogger("tandem.targets")

PENDING_POLL_S = 0.1  # how often the pending moves are counted (the report when they reach 0)
REPORT_RETRY_S = 0.5  # how often a report etcd did not take is tried again
REFUSE_REASONS = ("stale_fencing", "invalid")


class TargetsApplier:
    """This node's targets in force and their application; see the module docstring.

    ``cluster``: the node's :class:`router.node.cluster.ClusterLink` (its ``node``,
    ``coord``, ``site``); the coordinator must not be started yet (``watch_prefix``)."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.node = cluster.node
        self.coord = cluster.coord
        self.site: str = cluster.site
        self.key = self.coord.keys.targets(self.site)
        self.applied_key = self.coord.keys.applied(self.site)
        self._queues = [q.name for q in self.node.site.queues]
        self.doc: TargetDoc | None = None  # the targets in force
        self.refused = 0
        self.refused_by_reason: dict[str, int] = {}
        self.last_error = ""
        self.reports = 0
        self._version = 0  # bumped whenever the targets in force change (caches)
        self._policy_cache: tuple[Any, int, OverflowPolicy] | None = None
        self._mode_cache: tuple[int, ContingencyState] | None = None
        self._report = asyncio.Event()
        self._pending_seen = asyncio.Event()
        self._refused_metric = {r: metrics.TARGETS_REFUSED.labels(self.site, r) for r in REFUSE_REASONS}
        self._restore()
        self.coord.watch_prefix("targets", self.key, self._reset, self._event)

    # --- what is in force ------------------------------------------------------------------

    @property
    def pending(self) -> dict[str, str]:
        """agent id -> group: the moves waiting for a busy agent (the engine's ``when_free``
        moves; only the targets make them)."""
        return self.node.engine.pending_groups()

    @property
    def targets(self) -> SiteTargets | None:
        return self.doc.targets if self.doc is not None else None

    def policy_over(self, base: OverflowPolicy) -> OverflowPolicy:
        """``base`` (the cluster's policy) with the targets in force laid over it; ``base``
        itself when there are none. Cached per (policy object, application): the policy
        watch replaces the object on every change, so identity is the right key."""
        doc = self.doc
        if doc is None:
            return base
        c = self._policy_cache
        if c is not None and c[0] is base and c[1] == self._version:
            return c[2]
        p = policy_with_targets(base, {self.site: doc.targets}, {self.site: self._queues})
        self._policy_cache = (base, self._version, p)
        return p

    def mode_over(self, operator: ContingencyState) -> ContingencyState:
        """The contingency state in force: the operator's, unless it is normal and the
        targets set a mode (an operator's surge or emergency always wins)."""
        doc = self.doc
        if doc is None or operator.mode != "normal" or doc.targets.mode in (None, "normal"):
            return operator
        c = self._mode_cache  # only the operator's "normal" gets here: the version is the key
        if c is not None and c[0] == self._version:
            return c[1]
        state = ContingencyState(
            mode=doc.targets.mode, reason=f"rebalancer plan {doc.plan} (generation {doc.generation})"[:500],
            set_by=(doc.leader or "rebalancer")[:100], set_at=doc.ts,
        )  # fmt: skip
        self._mode_cache = (self._version, state)
        return state

    def applied(self) -> dict[str, Any]:
        """The engine's record: ``{"fencing", "generation", "plan", "moved"}``."""
        a = self.node.engine.targets_applied()
        return {k: a[k] for k in ("fencing", "generation", "plan", "moved")}

    def stats(self) -> dict[str, Any]:
        """For the node's status (``ClusterLink.stats_dict``)."""
        a = self.applied()
        return {
            "generation": a["generation"], "fencing": a["fencing"], "plan": a["plan"],
            "moved": a["moved"], "pending_moves": dict(sorted(self.pending.items())),
            "in_force": self.doc.targets.to_dict() if self.doc is not None else None,
            "refused": self.refused, "refused_by_reason": dict(self.refused_by_reason),
            "last_error": self.last_error, "reports": self.reports,
        }

    # --- receiving ---------------------------------------------------------------------------

    def _restore(self) -> None:
        """The document the engine recorded (journal, snapshot) is in force again at once."""
        raw = self.node.engine.targets_applied().get("doc") or ""
        if not raw:
            return
        try:
            self.doc = parse_target_doc(raw)
            self._version += 1
        except PlanError as e:  # journaled by an older build? then the watch brings it again
            log.error("%s: the targets recorded in the journal do not parse: %s", self.site, e)

    def _reset(self, kvs: dict[str, Any]) -> None:
        kv = kvs.get(self.key)
        if kv is not None:  # no key: nothing to apply (a deletion replaces nothing)
            self.receive(kv.value, kv.mod_revision)

    def _event(self, put: bool, key: str, kv: Any) -> None:
        if key != self.key:  # a prefix watch: targets/<site>-east is another site's key
            return
        if put:
            self.receive(kv.value, kv.mod_revision)
        else:
            log.warning("%s: targets key deleted; the targets in force stay", self.site)

    def _refuse(self, reason: str, message: str) -> None:
        self.refused += 1
        self.refused_by_reason[reason] = self.refused_by_reason.get(reason, 0) + 1
        self._refused_metric[reason].inc()
        self.last_error = message
        self._report.set()

    def receive(self, raw: bytes | str, revision: int = 0) -> bool:
        """One value of the targets key: apply it, or refuse it (see the module
        docstring). Returns True when it is in force afterwards. Never raises."""
        try:
            doc = parse_target_doc(raw)
            check_targets(self.node.site, doc.targets, doc.targets.partners)  # partners: the policy's call
            body = json.dumps(doc.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
            if len(body) > MAX_TARGETS_DOC:
                raise PlanError(f"targets document: {len(body)} bytes, over {MAX_TARGETS_DOC}")
        except PlanError as e:
            log.error("%s: ignoring the targets at revision %d, the targets in force stay: %s",
                      self.site, revision, e)
            self._refuse("invalid", str(e))
            return False
        applied = self.node.engine.targets_fencing
        if doc.fencing < applied:
            msg = (f"targets of plan {doc.plan or '?'} (generation {doc.generation}) carry fencing epoch "
                   f"{doc.fencing}, lower than the applied epoch {applied}: refused (a deposed leader's write)")
            log.warning("%s: %s", self.site, msg)
            self._refuse("stale_fencing", msg)
            return False
        try:
            return self._apply(doc, body)
        except Exception:  # noqa: BLE001 - a bug here must not stop the watch or routing
            log.exception("%s: applying targets of generation %d failed", self.site, doc.generation)
            return False

    def _apply(self, doc: TargetDoc, body: str) -> bool:
        """Apply a checked ``doc`` (``body``: its canonical JSON) whose epoch is not lower
        than the applied one."""
        node = self.node
        engine = node.engine
        t = doc.targets
        # The agents the *previous* targets placed and these do not name go home.
        cmds = move_commands(engine.home_groups(), engine.current_groups(), engine.targets_applied()["moved"], t)
        # Moves first, the record after them: a crash in between leaves the previous
        # record, from which the same document recomputes the same moves at the restart
        # (the record first would forget which agents the previous targets placed).
        wanted = {c["agent_id"]: c["group"] for c in cmds}
        current = engine.current_groups()
        for aid in engine.pending_groups():
            if aid not in wanted:  # superseded: where it is now is where these targets want it
                self._move(aid, current[aid])
        for aid, group in wanted.items():
            self._move(aid, group)
        record = {
            "op": "targets_applied", "t": node.now(), "fencing": doc.fencing, "generation": doc.generation,
            "plan": doc.plan[:MAX_PLAN_ID], "moved": sorted(t.groups), "doc": body,
        }  # fmt: skip
        try:
            outcome, _ = node.submit(record)
        except RoutingError as e:  # the epoch and the fields were checked: a stopping node
            log.error("%s: targets of generation %d not recorded: %s %s", self.site, doc.generation,
                      e.reason, e.message)
            return False
        new = self.doc is None or self.doc != doc
        if new:
            self.doc = doc
            self._version += 1
        pending = len(self.pending)
        if outcome.changed or new:
            log.info("%s: targets applied: plan %s, generation %d, fencing %d: %d move(s), %d pending; "
                     "wait factors %s, partners %s, mode %s", self.site, doc.plan or "?", doc.generation,
                     doc.fencing, len(cmds) - pending, pending, t.wait_factor or "-", t.partners or "-",
                     t.mode or "-")
            self.cluster.targets_changed()
        self._report.set()
        if pending:
            self._pending_seen.set()
        return True

    def _move(self, agent_id: str, group: str) -> None:
        """One journaled ``move_agent`` with ``when_free``: made now, or pending in the
        engine while the agent holds a contact (to its current group: cancels that)."""
        node = self.node
        try:
            out, _ = node.submit({"op": "move_agent", "t": node.now(), "agent_id": agent_id, "group": group,
                                  "when_free": True})
        except RoutingError as e:  # UNKNOWN_AGENT / UNKNOWN_GROUP cannot pass check_targets; a stopping node can
            log.warning("%s: move of %s to %s refused: %s %s", self.site, agent_id, group, e.reason, e.message)
            return
        if not out.changed:
            return
        if node.engine.agent_group(agent_id) == group and agent_id not in node.engine.pending_groups():
            log.info("%s: agent %s in group %s (rebalancer targets)", self.site, agent_id, group)
        else:
            log.info("%s: agent %s moves to group %s once its contacts end (rebalancer targets)",
                     self.site, agent_id, group)

    # --- the loop: resume, retry pending moves, report --------------------------------------

    async def run(self) -> None:
        """Resume after a restart, retry pending moves, report (spawned by the cluster)."""
        if self.doc is not None:
            # Idempotent: the moves of the targets in force are recomputed (none journaled
            # when every agent is where they want it or its move is pending already).
            self._apply(self.doc, self.node.engine.targets_applied()["doc"])
        reporter = asyncio.ensure_future(self._report_loop())
        try:
            while not self.node.stopped.is_set():
                if not self.pending:
                    self._pending_seen.clear()
                    await self._pending_seen.wait()
                    continue
                # The engine makes the moves; here they are only counted, for the report.
                while self.pending and not self.node.stopped.is_set():
                    await asyncio.sleep(PENDING_POLL_S)
                self._report.set()
        finally:
            reporter.cancel()

    def report_doc(self) -> dict[str, Any]:
        """What goes under ``rebalancer/applied/<site>``."""
        a = self.applied()
        return {"generation": a["generation"], "fencing": a["fencing"], "plan": a["plan"],
                "pending_moves": len(self.pending), "refused": self.refused, "ts": time.time()}

    async def _report_loop(self) -> None:
        while True:
            await self._report.wait()
            self._report.clear()
            try:
                await self.node.barrier()  # report only what a crash cannot take back
            except Exception:  # noqa: BLE001 - the journal failed: the node stops
                return
            doc = self.report_doc()
            try:
                await self.coord.put_document(self.applied_key, json.dumps(doc, sort_keys=True,
                                                                          separators=(",", ":")))
                self.reports += 1
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - CoordinationUnavailable (etcd away) and the like: later
                log.debug("%s: applied report not written (%s); retrying", self.site, e)
                self._report.set()
                await asyncio.sleep(REPORT_RETRY_S)
