"""The engine's mutable records (part of :mod:`router.engine`): calls, agents, queues.

Plain ``__slots__`` classes, cheap to create and to mutate in place; the edges never see
them (they get the views of :mod:`router.model`). Each record knows how to write itself
into a snapshot and read itself back.
"""

from __future__ import annotations

from collections import deque
from operator import attrgetter
from typing import Any

from router import policy
from router.config import QueueConfig
from router.model import AgentView, CallView


class Call:
    # Snapshot rows list these fields in this order.
    FIELDS = (
        "call_id", "state", "channel", "skill", "language", "queue", "priority_class",
        "caller", "customer_id", "offered_at", "queued_at", "answered_at", "ended_at",
        "agent_id", "assignment_id", "transfer_count", "resolved", "csat", "wrap_up_code",
        "context", "reject_reason", "abandon_reason",
        # engine-only: arrival handle, priority key, the requested class (idempotency),
        # the decision at offer, the ringing offer's deadline, offers made so far.
        "handle", "key", "requested_class", "decision", "offer_deadline", "n_offers",
        # transfers (router.engine.transfer); rows of older snapshots lack them
        "xfer_target", "xfer_phase", "xfer_at", "xfer_origin", "abandon_pending",
    )  # fmt: skip
    _NEW_DEFAULTS = ("", "", 0.0, "", 0)
    __slots__ = FIELDS

    @classmethod
    def offered(
        cls, call_id: str, channel: str, skill: str, language: str, caller: str,
        customer_id: str, requested_class: str, context: dict, offered_at: float, handle: int,
    ) -> "Call":  # fmt: skip
        """A new call, before it is classified, queued or rejected."""
        c = cls.__new__(cls)
        c.call_id, c.state, c.channel, c.skill, c.language = call_id, "", channel, skill, language
        c.queue, c.priority_class, c.caller, c.customer_id = "", "", caller, customer_id
        c.offered_at, c.queued_at, c.answered_at, c.ended_at = offered_at, 0.0, 0.0, 0.0
        c.agent_id = c.assignment_id = ""
        c.transfer_count, c.resolved, c.csat, c.wrap_up_code = 0, False, 0, ""
        c.context, c.reject_reason, c.abandon_reason = context, "", ""
        c.handle, c.key, c.requested_class, c.decision = handle, 0.0, requested_class, ""
        c.offer_deadline, c.n_offers = 0.0, 0
        c.xfer_target, c.xfer_phase, c.xfer_at, c.xfer_origin, c.abandon_pending = cls._NEW_DEFAULTS
        return c

    def row(self) -> list:
        return list(_row(self))

    @classmethod
    def from_row(cls, row: list) -> "Call":
        c = cls.__new__(cls)
        missing = len(cls.FIELDS) - len(row)
        if 0 < missing <= len(cls._NEW_DEFAULTS):
            row = row + list(cls._NEW_DEFAULTS[-missing:])
        for name, value in zip(cls.FIELDS, row, strict=True):
            setattr(c, name, value)
        return c

    def view(self, site: str) -> CallView:
        return CallView(
            call_id=self.call_id,
            state=self.state,
            channel=self.channel,
            skill=self.skill,
            language=self.language,
            queue=self.queue,
            site=site,
            priority_class=self.priority_class,
            caller=self.caller,
            customer_id=self.customer_id,
            offered_at=self.offered_at,
            queued_at=self.queued_at,
            answered_at=self.answered_at,
            ended_at=self.ended_at,
            agent_id=self.agent_id,
            assignment_id=self.assignment_id,
            transfer_count=self.transfer_count,
            resolved=self.resolved,
            csat=self.csat,
            wrap_up_code=self.wrap_up_code,
            context=self.context,
            reject_reason=self.reject_reason,
            abandon_reason=self.abandon_reason,
            transfer_target=self.xfer_target,
            transfer_phase=self.xfer_phase,
            transfer_origin=self.xfer_origin,
            abandon_pending=self.abandon_pending,
        )


_row = attrgetter(*Call.FIELDS)


class Agent:
    """A configured agent; ``state`` is "signed_out" until it signs in."""

    __slots__ = (
        "agent_id", "skills", "languages", "capacity", "queues",
        "state", "reason", "state_since", "wrap_up_until", "available_since",
        "load", "calls",
    )  # fmt: skip

    def __init__(
        self, agent_id: str, skills: dict[str, int], languages: list[str], capacity: dict[str, int]
    ) -> None:
        self.agent_id = agent_id
        self.skills = skills
        self.languages = languages
        self.capacity = capacity  # every channel present, 0 when none
        self.queues: list[Queue] = []  # queues it is eligible for, in config order
        self.state = "signed_out"
        self.reason = ""
        self.state_since = 0.0
        self.wrap_up_until = 0.0
        # Longest-idle clock: when it last became ready or was last handed a call.
        self.available_since = 0.0
        self.load = dict.fromkeys(capacity, 0)  # ringing + connected calls per channel
        self.calls: dict[str, None] = {}  # call ids in hand, in assignment order

    def view(self) -> AgentView:
        return AgentView(
            agent_id=self.agent_id,
            state=self.state,
            reason=self.reason,
            skills=dict(self.skills),
            languages=list(self.languages),
            capacity={ch: n for ch, n in self.capacity.items() if n},
            call_ids=list(self.calls),
            state_since=self.state_since,
            wrap_up_until=self.wrap_up_until,
        )

    def dump(self) -> dict:
        return {
            "state": self.state,
            "reason": self.reason,
            "state_since": self.state_since,
            "wrap_up_until": self.wrap_up_until,
            "available_since": self.available_since,
            "calls": list(self.calls),
        }


class Queue:
    """A queue's calls, eligible agents, counters and what it learns from its calls:
    ``aht`` (:func:`router.policy.update_aht`, on complete) and its callers' patience,
    ``pat_abandons`` / ``pat_exposure`` (:func:`router.policy.update_patience`, whenever
    a call stops waiting: answered or abandoned, through :meth:`add_finished`). Both are
    changed only by commands and are part of the snapshot; :meth:`expected_wait` reads
    them."""

    __slots__ = (
        "cfg", "name", "skill", "channel", "language", "max_length", "wrap_up_s",
        "pq", "age", "agents", "free", "signed_in", "staffed_slots", "head_starts",
        "offered", "answered", "abandoned", "aht", "window", "win",
        "pat_abandons", "pat_exposure",
    )  # fmt: skip

    def __init__(self, cfg: QueueConfig, queue_factory: Any) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.skill = cfg.skill
        self.channel = cfg.channel.value
        self.language = cfg.language
        self.max_length = cfg.max_length
        self.wrap_up_s = float(cfg.wrap_up_s)
        self.pq = queue_factory()  # handle -> priority key: service order
        self.age = queue_factory()  # handle -> queued_at: the oldest waiting call
        self.agents: list[Agent] = []  # eligible agents, config order
        self.free: dict[str, Agent] = {}  # eligible, ready, with a free slot on the channel
        self.signed_in = 0  # eligible agents signed in, whatever their state
        self.staffed_slots = 0  # capacity on the channel of eligible ready/wrap-up agents
        self.head_starts: dict[float, int] = {}  # queued calls per head start
        self.offered = 0
        self.answered = 0
        self.abandoned = 0
        self.aht = float(cfg.aht_s)
        # Finished calls of the recent window: (time, answered, waited_s), oldest first,
        # and their counts [answered, answered within T, abandoned, abandoned within T].
        self.window: deque[tuple[float, bool, float]] = deque()
        self.win = [0, 0, 0, 0]
        # Abandonment statistics (weighted abandons, weighted seconds waited).
        self.pat_abandons = 0.0
        self.pat_exposure = 0.0

    def abandon_rate(self) -> float:
        """Learned hang-ups per second per waiting caller (0 until one abandons)."""
        return policy.abandon_rate(self.pat_abandons, self.pat_exposure)

    def expected_wait(self, position: int) -> float:
        """Expected wait of the call at ``position`` (:func:`router.policy.expected_wait`
        on this queue's staffed slots, free agents, AHT and learned abandonment)."""
        return policy.expected_wait(
            position, self.aht, self.staffed_slots, bool(self.free),
            policy.abandon_rate(self.pat_abandons, self.pat_exposure),
        )  # fmt: skip

    def add_finished(self, now: float, answered: bool, waited: float, span: float) -> None:
        """A call stopped waiting here (answered, or abandoned) after ``waited`` s: the
        service-level window and the abandonment statistics learn it."""
        self.pat_abandons, self.pat_exposure = policy.update_patience(
            self.pat_abandons, self.pat_exposure, not answered, waited
        )
        within = waited <= self.cfg.service_level.threshold_s
        self.window.append((now, answered, waited))
        i = 0 if answered else 2
        self.win[i] += 1
        self.win[i + 1] += within
        self.prune_window(now - span)

    def prune_window(self, cutoff: float) -> None:
        w, win, t = self.window, self.win, self.cfg.service_level.threshold_s
        while w and w[0][0] < cutoff:
            _, answered, waited = w.popleft()
            i = 0 if answered else 2
            win[i] -= 1
            win[i + 1] -= waited <= t

    def dump(self, order: list[str]) -> dict:
        return {
            "order": order,
            "offered": self.offered,
            "answered": self.answered,
            "abandoned": self.abandoned,
            "aht": self.aht,
            "window": [list(x) for x in self.window],
            # [weighted abandons, weighted seconds waited]; absent in older snapshots
            "patience": [self.pat_abandons, self.pat_exposure],
        }

    def load(self, d: dict) -> None:
        self.offered = d["offered"]
        self.answered = d["answered"]
        self.abandoned = d["abandoned"]
        self.aht = d["aht"]
        # Older snapshots have no abandonment statistics: learn them afresh.
        self.pat_abandons, self.pat_exposure = (float(x) for x in d.get("patience", (0.0, 0.0)))
        self.window = deque()
        self.win = [0, 0, 0, 0]
        t = self.cfg.service_level.threshold_s
        for when, answered, waited in d["window"]:
            self.window.append((when, answered, waited))
            i = 0 if answered else 2
            self.win[i] += 1
            self.win[i + 1] += waited <= t
