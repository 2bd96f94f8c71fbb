"""Actions on the site's staffing (part of :class:`router.engine.Engine`): the operators'
``move_agent`` and ``set_drain``, the rebalancer's ``targets_applied``. All are journaled
like any command.

``move_agent`` {"agent_id", "group"}: the agent takes the profile (skills, languages,
capacity, back-office flag) of another agent group of the site file, live: no sign-out,
its state and state clock are kept. Refused with AGENT_BUSY while it has a contact ringing
or in hand (its capacity per channel could no longer hold it), UNKNOWN_GROUP for a group
the site does not have. Its queues are recomputed exactly as at start-up; a ready agent
takes queued calls of its new queues at once (the usual dispatch, invariant 3). Result
(also when unchanged): the agent's view. The current group of every agent whose group
differs from the site file is in the snapshot (``"groups"``).

With ``"when_free": true`` (the rebalancer's targets, :mod:`router.node.targets`) a busy
agent is not refused: the move is recorded as *pending* and made by the engine itself in
the very command that takes the agent's last contact off it (complete, abandon, reject,
no answer, disconnect…), before that command dispatches — so an agent that would be
handed its next contact at once still moves first. A ``when_free`` move to the agent's
current group cancels its pending move (changed True when there was one), one to another
group replaces it. A plain move of a busy agent is refused as before, and a plain move to
its current group changes nothing: either leaves a pending move as it is. An agent with a
pending move always holds a contact. Pending moves are in the snapshot
(``"pending_groups"``; absent in older snapshots: none).

``set_drain`` {"draining": bool}: records that an operator drained the site (the node
refuses new offers and transfers in while it is set, and hands its queued calls out). The
engine itself only stores the flag: it is in the snapshot (``"drained"``) so a drained
site stays drained after a restart. Result: ``{"draining": bool}``.

``targets_applied`` {"fencing", "generation", "plan", "moved", "doc"}: records that the
node applied a rebalancer's targets document (:mod:`router.plans`): the fencing epoch of
the leader that wrote it, the plan generation and id, ``moved`` — the agents those targets
place (their ``groups``; the next targets send back home the ones they no longer name) —
and ``doc``, the document itself (its JSON, opaque here, at most 1 MiB; "" for none), so
a restarted node lays the targets it applied over its policy again even when etcd is away
or now holds a document it refuses. Refused with FAILED_PRECONDITION STALE_FENCING when ``fencing`` is lower than the highest
one applied (a deposed leader's late write): nothing changes. The same document again is a
no-op (changed False). The engine only stores the record — the node runs the
``move_agent`` commands and lays the overflow targets over its policy — and keeps it in
the snapshot (``"targets"``; absent in older snapshots: none applied, fencing 0), so a
restarted node still refuses the lower epoch. Result: :meth:`targets_applied` (the view).
"""

from __future__ import annotations

from router import policy
from router.config import AgentGroup
from router.engine import validate as v
from router.engine.mode import GATED_CHANNELS
from router.engine.records import Agent
from router.model import AgentChanged, Outcome, RoutingError

_STAFFED = ("ready", "wrap_up")
MAX_PLAN_ID = 64
MAX_TARGETS_DOC = 1 << 20
#: Fencing epochs and generations are etcd revisions and counters: int64 in etcd.
MAX_EPOCH = 2**63 - 1


def _count(cmd: dict, name: str) -> int:
    """A non-negative integer field (absent: 0)."""
    x = cmd.get(name, 0)
    if isinstance(x, bool) or not isinstance(x, int) or not (0 <= x <= MAX_EPOCH):
        raise v.invalid("INVALID_FIELD", f"{name} must be an integer within 0..{MAX_EPOCH}", field=name)
    return x


class StaffingMixin:
    def _init_staffing(self) -> None:
        self._groups: dict[str, AgentGroup] = {g.id: g for g in self.site.agents}
        profiles = self.site.agent_profiles()
        self._home_group: dict[str, str] = {aid: g.id for aid, g in profiles.items()}
        self._group_of: dict[str, str] = dict(self._home_group)
        self._drained = False
        # The rebalancer's targets last applied (targets_applied): the highest fencing
        # epoch, its generation and plan, the agents those targets place (sorted).
        self._targets_fencing = 0
        self._targets_generation = 0
        self._targets_plan = ""
        self._targets_moved: tuple[str, ...] = ()
        self._targets_doc = ""
        # agent id -> group: moves made when the agent's last contact leaves it (when_free)
        self._pending_group: dict[str, str] = {}
        self._ops["move_agent"] = self._op_move_agent
        self._ops["set_drain"] = self._op_set_drain
        self._ops["targets_applied"] = self._op_targets_applied

    # -- views ---------------------------------------------------------------------------

    @property
    def drained(self) -> bool:
        return self._drained

    def agent_group(self, agent_id: str) -> str:
        self._agent(agent_id)  # NOT_FOUND UNKNOWN_AGENT
        return self._group_of[agent_id]

    def group_names(self) -> list[str]:
        return list(self._groups)

    def agent_queues(self, agent_id: str) -> list[str]:
        """The queues the agent may take now (config order)."""
        return [q.name for q in self._agent(agent_id).queues]

    def moved_groups(self) -> dict[str, str]:
        """agent id -> group, for agents not in their site-file group (snapshot)."""
        return {aid: g for aid, g in self._group_of.items() if g != self._home_group[aid]}

    def home_groups(self) -> dict[str, str]:
        """agent id -> its group in the site file."""
        return dict(self._home_group)

    def current_groups(self) -> dict[str, str]:
        """agent id -> its group now."""
        return dict(self._group_of)

    def pending_groups(self) -> dict[str, str]:
        """agent id -> group of the moves waiting for the agent to be free (sorted)."""
        return dict(sorted(self._pending_group.items()))

    def targets_applied(self) -> dict:
        """The rebalancer's targets last applied: ``{"fencing", "generation", "plan",
        "moved", "doc"}`` (0, 0, "", [], "" when none was; moved sorted). JSON-able; also
        the snapshot's ``"targets"``."""
        return {"fencing": self._targets_fencing, "generation": self._targets_generation,
                "plan": self._targets_plan, "moved": list(self._targets_moved), "doc": self._targets_doc}

    @property
    def targets_fencing(self) -> int:
        """The highest fencing epoch of targets applied (0: none)."""
        return self._targets_fencing

    def _load_targets(self, d: dict | None) -> None:
        """Restore :meth:`targets_applied` from a snapshot (None: an older snapshot)."""
        d = d or {}
        self._targets_fencing = int(d.get("fencing", 0))
        self._targets_generation = int(d.get("generation", 0))
        self._targets_plan = str(d.get("plan", ""))
        self._targets_moved = tuple(sorted(d.get("moved", ())))
        self._targets_doc = str(d.get("doc", ""))

    # -- commands ------------------------------------------------------------------------

    def _op_targets_applied(self, cmd: dict, now: float) -> Outcome:
        fencing, generation = _count(cmd, "fencing"), _count(cmd, "generation")
        plan = v.text(cmd, "plan", MAX_PLAN_ID)
        doc = v.text(cmd, "doc", MAX_TARGETS_DOC)
        moved = cmd.get("moved", [])
        if not isinstance(moved, list) or not all(isinstance(a, str) for a in moved):
            raise v.invalid("INVALID_FIELD", "moved must be a list of agent ids", field="moved")
        for aid in moved:
            self._agent(aid)  # NOT_FOUND UNKNOWN_AGENT
        if fencing < self._targets_fencing:
            raise RoutingError(
                "FAILED_PRECONDITION", "STALE_FENCING",
                f"targets of fencing epoch {fencing} are older than the applied epoch {self._targets_fencing}",
                fencing=fencing, applied=self._targets_fencing,
            )  # fmt: skip
        placed = tuple(sorted(set(moved)))
        new = (fencing, generation, plan, placed, doc)
        if new == (self._targets_fencing, self._targets_generation, self._targets_plan, self._targets_moved,
                   self._targets_doc):
            return Outcome(False, self.targets_applied())
        self._begin(now)
        (self._targets_fencing, self._targets_generation, self._targets_plan, self._targets_moved,
         self._targets_doc) = new
        return self._commit(self.targets_applied())


    def _op_set_drain(self, cmd: dict, now: float) -> Outcome:
        draining = cmd.get("draining")
        if not isinstance(draining, bool):
            raise v.invalid("INVALID_FIELD", "draining must be a boolean", field="draining")
        if draining == self._drained:
            return Outcome(False, {"draining": draining})
        self._begin(now)
        self._drained = draining
        return self._commit({"draining": draining})

    def _op_move_agent(self, cmd: dict, now: float) -> Outcome:
        a = self._agent(v.agent_id(cmd))
        group = cmd.get("group")
        if not isinstance(group, str) or not group:
            raise v.invalid("MISSING_FIELD", "group is required", field="group")
        if group not in self._groups:
            raise v.invalid("UNKNOWN_GROUP", f"site {self._site_name} has no agent group {group!r}", field="group")
        when_free = cmd.get("when_free", False)
        if not isinstance(when_free, bool):
            raise v.invalid("INVALID_FIELD", "when_free must be a boolean", field="when_free")
        aid = a.agent_id
        pending = self._pending_group.get(aid)
        if group == self._group_of[aid]:
            if pending is None or not when_free:
                return Outcome(False, a.view())
            self._begin(now)  # back to where it is: the pending move is cancelled
            del self._pending_group[aid]
            return self._commit(a.view())
        if a.calls:
            if not when_free:
                raise RoutingError(
                    "FAILED_PRECONDITION", "AGENT_BUSY",
                    f"agent {aid} holds {len(a.calls)} contact(s): move it when it has none",
                    agent_id=aid,
                )  # fmt: skip
            if pending == group:
                return Outcome(False, a.view())
            self._begin(now)
            self._pending_group[aid] = group
            return self._commit(a.view())
        self._begin(now)
        self._pending_group.pop(aid, None)
        self._regroup(a, group)
        if a.state == "ready":
            self._dirty_agents[a.agent_id] = a
        if a.state != "signed_out":
            self._fx.append(AgentChanged(a.agent_id))
        self._dispatch()
        return self._commit(a.view())

    def _freed(self, a: Agent) -> None:
        """Core's hook: ``a``'s last contact just left it (inside a command, before its
        dispatch). Makes the agent's pending move, if any."""
        group = self._pending_group.pop(a.agent_id, None)
        if group is not None and group != self._group_of[a.agent_id]:
            self._regroup(a, group)

    def _regroup(self, a: Agent, group: str) -> None:
        """Give ``a`` (holding no contact) the profile of ``group``: leave every queue the
        way sign-out would, take the new profile, join the new queues the way sign-in
        would (queue counters, free sets, back-office gating)."""
        aid = a.agent_id
        staffed, signed_in = a.state in _STAFFED, a.state != "signed_out"
        for q in a.queues:
            if staffed:
                q.staffed_slots -= a.capacity[q.channel]
            if signed_in:
                q.signed_in -= 1
            q.agents.remove(a)
            q.free.pop(aid, None)
        g = self._groups[group]
        cap = dict.fromkeys(v.CHANNEL_ORDER, 0)
        cap.update({getattr(ch, "value", ch): n for ch, n in g.capacity.items()})
        a.skills, a.languages, a.capacity = dict(g.skills), list(g.languages), cap
        a.load = dict.fromkeys(cap, 0)
        eligible = [
            q for q in self._queues.values()
            if policy.eligible(a.skills, a.languages, cap, q.skill, q.language, q.channel)
        ]  # fmt: skip
        self._all_queues[aid] = eligible
        gated = [q for q in eligible if q.channel in GATED_CHANNELS] if g.backoffice else []
        if gated:
            self._gated[aid] = gated
        else:
            self._gated.pop(aid, None)
        a.queues = [q for q in eligible if q not in gated or self._backoffice_on]
        for q in a.queues:
            q.agents.append(a)
            if staffed:
                q.staffed_slots += cap[q.channel]
            if signed_in:
                q.signed_in += 1
        self._group_of[aid] = group
        self._refresh(a)
