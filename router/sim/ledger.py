"""The simulator's own record of calls (:class:`CallRecord`, one per offered call) and
of what its agents saw (:class:`Ledger`: assignments, duplicates, capacity), kept apart
from the node's view so that :mod:`router.sim.report` can check one against the other."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from router.v1 import types_pb2

FINAL = {
    types_pb2.CALL_STATE_COMPLETED: "completed",
    types_pb2.CALL_STATE_ABANDONED: "abandoned",
    types_pb2.CALL_STATE_REJECTED: "rejected",
}


@dataclass(slots=True, eq=False)
class CallRecord:
    """One call as the generator saw it. Times are Unix seconds (wall clock, comparable
    with the node's since they run on the same machine); 0 = not reached."""

    call_id: str
    site: str
    stream: str
    caller: str
    talk_s: float  # drawn talk time, simulated seconds
    patience_s: float | None  # drawn patience, simulated seconds
    wake: asyncio.Event
    queue: str = ""
    offered_at: float = 0.0
    acked_at: float = 0.0
    assign_recv_at: float = 0.0
    answered_at: float = 0.0
    ended_at: float = 0.0
    outcome: str = "pending"  # offer_failed | rejected | abandoned | completed | pending
    abandon_reason: str = ""
    agent_id: str = ""
    assignments: int = 0
    offer_error: str = ""
    complete_failed: str = ""
    node_call: object = None  # the node's final Call, from Complete/Abandon answers
    owner: str = ""  # the site that owned the call when the caller hung up, if it moved

    def completed(self, call: types_pb2.Call) -> None:
        self.outcome = FINAL.get(call.state, "pending")
        self.ended_at = time.time()
        self.node_call = call
        self.wake.set()

    def wait_sim(self, scale: float) -> float:
        end = self.answered_at or time.time()
        return max(0.0, end - self.offered_at) * scale


@dataclass
class Ledger:
    """The generator's own record of calls, and the anomalies its agents saw."""

    records: dict[str, "CallRecord"] = field(default_factory=dict)
    holders: dict[str, set[str]] = field(default_factory=dict)  # call -> agents ringing/talking
    connects: dict[str, int] = field(default_factory=dict)
    suspects: dict[str, set[str]] = field(default_factory=dict)  # call -> earlier holders
    dup_connected: set[str] = field(default_factory=set)
    _noted: set[str] = field(default_factory=set)
    # agent -> channel (types_pb2.Channel) -> capacity; agents not listed are not checked
    capacity: dict[str, dict[int, int]] = field(default_factory=dict)
    in_hand: dict[str, dict[str, int]] = field(default_factory=dict)  # agent -> call -> channel
    over_capacity: set[str] = field(default_factory=set)
    anomalies: list[str] = field(default_factory=list)
    assignments: int = 0
    rejects: int = 0
    no_answers: int = 0

    def note(self, text: str) -> None:
        if len(self.anomalies) < 50:
            self.anomalies.append(text)

    def assigned(self, agent_id: str, call_id: str, channel: int = 0) -> None:
        self.assignments += 1
        held = self.holders.setdefault(call_id, set())
        others = held - {agent_id}
        if others:
            # Maybe the node withdrew the other offer (offer timeout) and that agent's
            # AssignmentCancelled is still on its way on another stream: a suspect until
            # the cancellation arrives (see withdrawn()).
            self.suspects.setdefault(call_id, set()).update(others)
        held.add(agent_id)
        hand = self.in_hand.setdefault(agent_id, {})
        hand[call_id] = channel
        cap = self.capacity.get(agent_id)
        if cap is not None:
            n = sum(1 for ch in hand.values() if ch == channel)
            if n > cap.get(channel, 0):
                self.over_capacity.add(call_id)
                self.note(f"{call_id}: {agent_id} holds {n} calls on channel {channel}, "
                          f"capacity {cap.get(channel, 0)}")
        rec = self.records.get(call_id)
        if rec is not None:
            rec.assign_recv_at = time.time()
            rec.assignments += 1

    def withdrawn(self, agent_id: str, call_id: str) -> None:
        """The node cancelled this agent's offer of the call (AssignmentCancelled)."""
        self.released(agent_id, call_id)
        sus = self.suspects.get(call_id)
        if sus is not None:
            sus.discard(agent_id)
            if not sus:
                del self.suspects[call_id]

    def released(self, agent_id: str, call_id: str) -> None:
        self.in_hand.get(agent_id, {}).pop(call_id, None)
        held = self.holders.get(call_id)
        if held is not None:
            held.discard(agent_id)
            if not held:
                del self.holders[call_id]

    def connected(self, agent_id: str, call_id: str) -> None:
        n = self.connects.get(call_id, 0) + 1
        self.connects[call_id] = n
        if n > 1:
            self.dup_connected.add(call_id)
            self.note(f"{call_id} connected {n} times (last at {agent_id})")
        rec = self.records.get(call_id)
        if rec is not None and not rec.answered_at:
            rec.answered_at = time.time()
            rec.agent_id = agent_id
            rec.wake.set()

    @property
    def dup_assigned(self) -> set[str]:
        """Calls offered to an agent while another still held them, the node never
        having withdrawn the earlier offer."""
        return set(self.suspects)

    @property
    def duplicates(self) -> set[str]:
        dup = self.dup_assigned | self.dup_connected
        for call_id in self.dup_assigned - self._noted:
            self._noted.add(call_id)
            self.note(f"{call_id} offered to two agents at once ({sorted(self.suspects[call_id])} "
                      "never saw the offer withdrawn)")
        return dup
