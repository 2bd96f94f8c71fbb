"""Outboxes of the node's server streams: an agent's Connect stream, a WatchCall, an
agent gateway (Agents.Gateway).

The node puts messages in (from the loop, once they are durable); the stream's handler
takes them out and writes them. ``None`` in the queue ends the stream, ``end`` says
with which status. A backlog over ``max_backlog`` (a client that does not read) ends the
stream with ABORTED SLOW_CONSUMER rather than growing without bound.

An agent in session on a gateway has an :class:`AgentStream` like any other (the node
handles both alike); :meth:`AgentStream.attach` points its queue at the gateway's
:class:`GatewayOutbox`, so what the node delivers to the agent lands, tagged with the
agent's id, in the gateway's next frame.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from router.v1 import agents_pb2


class Outbox:
    """A FIFO with one consumer (the stream's handler): the part of asyncio.Queue the
    streams use (put_nowait, get, get_nowait, empty, qsize), without its bookkeeping
    (unfinished-task counts, a getter list, a loop look-up per blocking get). Created on
    the loop's thread."""

    __slots__ = ("_items", "_waiter", "_loop")

    def __init__(self) -> None:
        self._items: deque = deque()
        self._waiter: asyncio.Future | None = None
        self._loop = asyncio.get_running_loop()

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    async def get(self) -> Any:
        while not self._items:
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return self._items.popleft()


class GatewayOutbox:
    """The outbox of one gateway stream: ``(agent_id, item)`` pairs, item a NodeMessage or
    a :class:`SessionEnd`. One consumer (the stream's writer) takes everything queued at
    once (:meth:`take`) and sends it as one frame: what the node delivers in one loop
    turn (e.g. all the records of one journal group commit) shares a frame. A backlog
    over ``max_backlog`` messages closes it with ABORTED SLOW_CONSUMER. Created on the
    loop's thread."""

    max_backlog = 100_000

    __slots__ = ("_items", "_waiter", "_loop", "closed", "end", "on_session_end")

    def __init__(self) -> None:
        self._items: list = []
        self._waiter: asyncio.Future | None = None
        self._loop = asyncio.get_running_loop()
        self.closed = False
        self.end: tuple[str, str, str] | None = None
        # called with the AgentStream the node ended (replaced, node stopping)
        self.on_session_end: Any = None

    def qsize(self) -> int:
        return len(self._items)

    def put(self, agent_id: str, item: Any) -> None:
        if self.closed:
            return
        if len(self._items) >= self.max_backlog:
            self.close("ABORTED", "SLOW_CONSUMER", "the gateway stream is not being read fast enough")
            return
        self._items.append((agent_id, item))
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def take(self) -> list | None:
        """Everything queued (waits for something); None once closed and sent."""
        while not self._items:
            if self.closed:
                return None
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        items, self._items = self._items, []
        return items

    def take_ready(self) -> list:
        """Everything queued now (no wait; [] when nothing)."""
        items, self._items = self._items, []
        return items

    def close(self, code: str | None = None, reason: str = "", message: str = "") -> None:
        """No more messages; the writer sends what is queued, then ends the stream (with
        ``code`` when given)."""
        if self.closed:
            return
        self.closed = True
        if code is not None:
            self.end = (code, reason, message)
            self._items.clear()  # an aborted stream sends nothing more
        self._wake()


class SessionEnd:
    """An agent's session on a gateway ended: (code, reason, message); code "OK" after
    a Leave."""

    __slots__ = ("code", "reason", "message")

    def __init__(self, code: str, reason: str = "", message: str = "") -> None:
        self.code, self.reason, self.message = code, reason, message


class _Lane:
    """Stands in for the queue of an agent's stream when the agent is in session on a
    gateway: messages go to the gateway's outbox tagged with the agent's id; ``None``
    (the node ended the stream) ends the session there."""

    __slots__ = ("outbox", "stream")

    def __init__(self, outbox: GatewayOutbox, stream: "AgentStream") -> None:
        self.outbox = outbox
        self.stream = stream

    def qsize(self) -> int:
        return 0  # the gateway's outbox bounds the backlog of all its agents together

    def empty(self) -> bool:
        return True

    def put_nowait(self, item: Any) -> None:
        stream = self.stream
        if item is None:
            hook = self.outbox.on_session_end
            if hook is not None:
                hook(stream)
            return
        self.outbox.put(stream.agent_id, item)


class _Subscriber:
    """A stream's outbox. ``None`` in the queue ends the stream; ``end`` says how."""

    max_backlog = 10_000

    def __init__(self) -> None:
        self.queue = Outbox()
        self.closed = False
        self.end: tuple[str, str, str] | None = None  # (code, reason, message)

    def deliver(self, msg: Any) -> None:
        if self.closed:
            return
        if self.queue.qsize() >= self.max_backlog:
            self.close("ABORTED", "SLOW_CONSUMER", "the stream is not being read fast enough")
            return
        self.queue.put_nowait(msg)

    def close(self, code: str | None = None, reason: str = "", message: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        if code is not None:
            self.end = (code, reason, message)
        self.queue.put_nowait(None)


class AgentStream(_Subscriber):
    """The outbox of one agent's Connect stream. ``auto_answer`` (from the hello): the
    node connects the calls it assigns to this agent at once. ``status`` is the agent
    state last queued on the stream (state, reason, state_since, wrap_up_until): an
    ``Agent`` message is only sent when it changes."""

    def __init__(self, agent_id: str, auto_answer: bool = False) -> None:
        super().__init__()
        self.agent_id = agent_id
        self.auto_answer = auto_answer
        self.status: tuple | None = None
        self._offered: set[str] = set()  # ringing assignment ids already pushed (no duplicates)

    def deliver(self, msg: agents_pb2.NodeMessage) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "assignment":
            aid = msg.assignment.assignment_id
            if aid in self._offered:
                return
            if not msg.assignment.connected:
                self._offered.add(aid)
        elif kind == "cancelled":
            self._offered.discard(msg.cancelled.assignment_id)
        elif kind == "connected":
            self._offered.discard(msg.connected.assignment_id)
        super().deliver(msg)

    def attach(self, outbox: GatewayOutbox) -> None:
        """From now on this agent speaks through a gateway: what is queued so far and
        everything delivered later goes to ``outbox``, in order."""
        old = self.queue
        lane = _Lane(outbox, self)
        self.queue = lane  # type: ignore[assignment]
        while not old.empty():
            lane.put_nowait(old.get_nowait())


class CallWatch(_Subscriber):
    def __init__(self, call_id: str) -> None:
        super().__init__()
        self.call_id = call_id
