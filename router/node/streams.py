"""Outboxes of the node's server streams: an agent's Connect stream, a WatchCall.

The node puts messages in (from the loop, once they are durable); the stream's handler
takes them out and writes them. ``None`` in the queue ends the stream, ``end`` says
with which status. A backlog over ``max_backlog`` (a client that does not read) ends the
stream with ABORTED SLOW_CONSUMER rather than growing without bound.
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


class CallWatch(_Subscriber):
    def __init__(self, call_id: str) -> None:
        super().__init__()
        self.call_id = call_id
