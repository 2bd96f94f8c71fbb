"""The contract between the routing engine (pure, in ``router.engine``) and its edges.

The site node is event-sourced. Every input is a *command*: a JSON-able dict with an
``op`` and the wall-clock time ``t`` (Unix seconds) at which the node accepted it. The
engine applies a command synchronously and deterministically — the same commands with the
same ``t`` always give the same state — so the journal replays them after a crash, and
the simulator drives the very same code.

Commands (all strings are plain str, enums as their lower-case names):

=========== ===================================================================
op          fields besides ``op`` and ``t``
=========== ===================================================================
offer       call_id, channel ("voice"|"chat"|"email"|"social"), skill, language (""
            for none), caller, customer_id, priority_class ("" = let the engine
            decide, else "standard"|"repeat"|"whitelist"|"vip"), context
            {"ivr_path": [str], "bot_transcript": str, "attributes": {str: str}}
abandon     call_id, reason
complete    call_id, resolved (bool), csat (int 0..5), wrap_up_code
sign_in     agent_id
sign_out    agent_id
set_state   agent_id, state ("ready"|"not_ready"|"wrap_up"), reason, timeout_s
accept      agent_id, assignment_id
reject      agent_id, assignment_id, reason
disconnect  agent_id                      (the agent's Connect stream ended)
tick        (nothing else)                (expire offer timeouts and wrap-ups due by t)
set_mode    mode ("normal"|"surge"|"emergency"), backoffice (bool: back-office agents
            take voice/chat), announcement (str <= 256, the IVR message)
=========== ===================================================================

``Engine.apply(cmd)`` either raises :class:`RoutingError` having changed nothing, or
returns an :class:`Outcome`. ``Outcome.changed`` is False for a command that left the
state as it was (an idempotent repeat, a tick with nothing due): the node does not journal
those. Effects list what the edges must tell the outside world once the command is
durable: assignments to push on agent streams, cancellations, call/agent changes for
watchers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ErrorCode = Literal[
    "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION", "UNAVAILABLE"
]


class RoutingError(Exception):
    """A refused command. ``code`` maps to the gRPC status code of the same name;
    ``reason`` is the UPPER_SNAKE google.rpc.ErrorInfo reason listed in the protos."""

    def __init__(self, code: ErrorCode, reason: str, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = {k: str(v) for k, v in metadata.items()}

    def __repr__(self) -> str:
        return f"RoutingError({self.code}, {self.reason}, {self.message!r})"


# --- effects -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AssignmentOffered:
    """Push an Assignment for call_id to agent_id's stream (ring the agent)."""

    agent_id: str
    assignment_id: str
    call_id: str


@dataclass(frozen=True, slots=True)
class AssignmentCancelled:
    """Tell agent_id that the offer is withdrawn ("abandoned", "no_answer", "rejected",
    "disconnected")."""

    agent_id: str
    assignment_id: str
    call_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class CallConnected:
    agent_id: str
    assignment_id: str
    call_id: str


@dataclass(frozen=True, slots=True)
class CallChanged:
    """The call's state, queue or agent changed (watchers get an update)."""

    call_id: str


@dataclass(frozen=True, slots=True)
class AgentChanged:
    agent_id: str


Effect = AssignmentOffered | AssignmentCancelled | CallConnected | CallChanged | AgentChanged


@dataclass(slots=True)
class Outcome:
    changed: bool
    result: Any = None
    effects: list[Effect] = field(default_factory=list)


# --- read-only views (what the engine hands to the edges) ------------------------------


@dataclass(slots=True)
class CallView:
    """A call as the node sees it. States: "queued", "assigned", "connected",
    "completed", "abandoned", "rejected" (and later "transferring")."""

    call_id: str
    state: str
    channel: str
    skill: str
    language: str
    queue: str
    site: str
    priority_class: str
    caller: str
    customer_id: str
    offered_at: float
    queued_at: float = 0.0
    answered_at: float = 0.0
    ended_at: float = 0.0
    agent_id: str = ""
    assignment_id: str = ""
    transfer_count: int = 0
    resolved: bool = False
    csat: int = 0
    wrap_up_code: str = ""
    context: dict = field(default_factory=dict)
    reject_reason: str = ""
    abandon_reason: str = ""
    # Transfers between sites (see router.engine.transfer): the target's address of the
    # call's latest outgoing transfer, its phase ("begun", "committing", "done",
    # "aborted"), the origin site it came from, and an abandon waiting for the transfer
    # (1) or already handed on (2). States "transferring" and "transferred" (final here:
    # the call moved to transfer_target).
    transfer_target: str = ""
    transfer_phase: str = ""
    transfer_origin: str = ""
    abandon_pending: int = 0


@dataclass(slots=True)
class AgentView:
    """States: "signed_out", "not_ready", "ready", "wrap_up"."""

    agent_id: str
    state: str
    reason: str
    skills: dict[str, int]
    languages: list[str]
    capacity: dict[str, int]
    call_ids: list[str]
    state_since: float
    wrap_up_until: float = 0.0


@dataclass(slots=True)
class QueueView:
    name: str
    skill: str
    channel: str
    language: str
    length: int
    expected_wait_s: float
    agents_ready: int
    agents_staffed: int
    service_level: float  # -1.0 when no call finished in the window yet
    offered: int
    answered: int
    abandoned: int
    oldest_wait_s: float


@dataclass(slots=True)
class PastContact:
    call_id: str
    offered_at: float
    skill: str
    outcome: str  # final state, or the current one for a call still active
    csat: int


@dataclass(slots=True)
class OfferResult:
    call: CallView
    position: int  # 1 = next in its queue, 0 when not queued
    expected_wait_s: float
    decision: str  # e.g. "queued: billing-fr-voice (vip)", "assigned: lyon-fr-003", "rejected: blacklist"


@dataclass(slots=True)
class TransferView:
    """The target's view of one transfer key (call_id, transfer_no): state "unknown"
    (never seen, or forgotten), "reserved", "committed" or "aborted"; reason of an abort
    ("expired", "aborted_by_origin", "call_id_conflict"). See router.engine.transfer."""

    call_id: str
    transfer_no: int
    state: str
    reason: str = ""
    origin: str = ""
    queue: str = ""
    expires_at: float = 0.0
    site: str = ""
