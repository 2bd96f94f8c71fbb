"""The multiplexed agent gateway (``Agents.Gateway``): many agents' sessions on one stream.

A site's CTI / agent gateway holds one connection to the node for all its desktops. Each
agent in session on it has an ordinary :class:`~router.node.streams.AgentStream`, opened
and closed through the same :class:`~router.node.node.Node` calls as a per-agent
``Connect`` stream (``open_agent_stream`` / ``close_agent_stream``, ``agent_answer``,
``agent_complete``), so the semantics are the same by construction: auto answer, ringing
offers pushed again on a new session, a newer stream taking the agent over, disconnect
on the end of the session. Only the transport differs: the stream's queue is attached to
the gateway's :class:`~router.node.streams.GatewayOutbox`, whose writer sends everything
queued as one ``GatewayNodeFrame`` — what the node delivers in one loop turn (the
records of one journal group commit, or whatever arrived while the previous frame was
being written) goes out together, one gRPC message for many agents' messages. Frames
from the gateway are handled message by message, in order.

Errors are per message (a CommandResult for that agent; the stream stays up) — see
agents.proto, ``Gateway``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc

from router.model import RoutingError
from router.node import convert
from router.node.errors import Malformed, abort, duration, empty_id, malformed_error, refuse_if_draining
from router.node.streams import AgentStream, GatewayOutbox, SessionEnd
from router.status import status_code
from router.v1 import agents_pb2

log = logging.getLogger("tandem.node")

# The most messages one frame to the gateway carries (a bound on a frame's size; what is
# left goes in the next frame, right after).
MAX_FRAME_MESSAGES = 1000


def _result(op: str, err: RoutingError, call_id: str = "", assignment_id: str = "") -> agents_pb2.NodeMessage:
    return agents_pb2.NodeMessage(result=agents_pb2.CommandResult(
        op=op, call_id=call_id, code=status_code(err.code), reason=err.reason, message=err.message,
        assignment_id=assignment_id,
    ))


class _Reply:
    """A delivery target for a refusal addressed to an agent without a session here (the
    node delivers it in journal order, like a stream's)."""

    __slots__ = ("outbox", "agent_id", "call_id")

    def __init__(self, outbox: GatewayOutbox, agent_id: str, call_id: str = "") -> None:
        self.outbox, self.agent_id, self.call_id = outbox, agent_id, call_id

    def deliver(self, msg: agents_pb2.NodeMessage) -> None:
        if self.call_id and not msg.result.call_id:
            msg.result.call_id = self.call_id
        self.outbox.put(self.agent_id, msg)


class GatewaySession:
    """One open gateway stream: its outbox and the agents in session on it."""

    def __init__(self, node: Any, context: Any) -> None:
        self.node = node
        self.context = context
        self.outbox = GatewayOutbox()
        self.outbox.on_session_end = self._ended_by_node
        self.sessions: dict[str, AgentStream] = {}

    async def serve(self) -> None:
        """Run until the gateway closes its side, the transport fails or the node ends
        the stream; then end every session on it as a Connect stream's end would."""
        reader = asyncio.create_task(self._read())
        try:
            await self._write()
        finally:
            reader.cancel()
            self.outbox.close()
            self._end_all()

    # --- node -> gateway ----------------------------------------------------------------

    async def _write(self) -> None:
        outbox, context = self.outbox, self.context
        while True:
            items = await outbox.take()
            if items is None:
                break
            if len(items) < MAX_FRAME_MESSAGES and not outbox.closed:
                # One more loop turn: the journal resolves several group commits' futures
                # in one turn (and streams' handlers deliver in theirs); all of it shares
                # this frame. Costs no wait when nothing else is ready.
                await asyncio.sleep(0)
                more = outbox.take_ready()
                if more:
                    items += more
            for start in range(0, len(items), MAX_FRAME_MESSAGES):
                frame = agents_pb2.GatewayNodeFrame()
                add = frame.messages.add
                for agent_id, item in items[start:start + MAX_FRAME_MESSAGES]:
                    if type(item) is SessionEnd:
                        code = 0 if item.code == "OK" else status_code(item.code)
                        add(agent_id=agent_id, ended=agents_pb2.SessionEnded(
                            code=code, reason=item.reason, message=item.message))
                    else:
                        add(agent_id=agent_id, message=item)
                await context.write(frame)
        if outbox.end is not None:
            await abort(context, *outbox.end)

    def _ended_by_node(self, stream: AgentStream) -> None:
        """The node ended an agent's stream (another stream took the agent over, or the
        node stops): the session is over; tell the gateway why."""
        if self.sessions.get(stream.agent_id) is stream:
            del self.sessions[stream.agent_id]
        code, reason, message = stream.end or ("ABORTED", "STREAM_REPLACED", "the session ended")
        if reason == "NODE_DRAINING":
            self.outbox.close(code, reason, message)  # the whole stream ends with it
            return
        self.outbox.put(stream.agent_id, SessionEnd(code, reason, message))

    def _end_all(self) -> None:
        sessions, self.sessions = self.sessions, {}
        for stream in sessions.values():
            self.node.close_agent_stream(stream)  # ringing offers back, agent NOT_READY

    # --- gateway -> node ----------------------------------------------------------------

    async def _read(self) -> None:
        """Frames from the gateway, message by message. When the gateway closes its side
        (or the transport fails) the stream ends."""
        read = self.context.read
        try:
            while True:
                frame = await read()
                if frame is grpc.aio.EOF:
                    break
                if isinstance(frame, Malformed):  # answered; nothing of it applied
                    self.outbox.put("", _result("", malformed_error(frame)))
                    continue
                for msg in frame.messages:
                    kind = msg.WhichOneof("kind")
                    if kind == "hello":
                        await self._hello(msg.agent_id, msg.hello.auto_answer)
                    else:
                        self._command(msg, kind)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - transport errors end the stream
            log.info("gateway stream read ended: %r", exc)
        self.outbox.close()

    def _refuse(self, agent_id: str, op: str, err: RoutingError, call_id: str = "",
                assignment_id: str = "") -> None:
        """Answer a refused message with a CommandResult for ``agent_id``, after
        everything journaled before it (the node's order, as on a Connect stream)."""
        log.info("gateway %s from %r refused: %s %s", op, agent_id, err.reason, err.message)
        self.node.agent_refused(_Reply(self.outbox, agent_id, call_id), op, err, assignment_id)

    async def _hello(self, agent_id: str, auto_answer: bool) -> None:
        if not agent_id:
            self._refuse("", "hello", RoutingError("INVALID_ARGUMENT", "MISSING_FIELD", "agent_id is required",
                                                   field="agent_id"))
            return
        if agent_id in self.sessions:
            self._refuse(agent_id, "hello", RoutingError(
                "ALREADY_EXISTS", "AGENT_ALREADY_CONNECTED",  # type: ignore[arg-type]
                f"agent {agent_id} is already in session on this gateway", agent_id=agent_id))
            return
        try:
            stream = await self.node.open_agent_stream(agent_id, auto_answer)
        except RoutingError as e:
            if e.reason == "NODE_DRAINING":
                self.outbox.close(e.code, e.reason, e.message)
                return
            self._refuse(agent_id, "hello", empty_id(e))
            return
        if self.outbox.closed:  # the gateway went away meanwhile
            self.node.close_agent_stream(stream)
            return
        # Registered before attached: a stream the node ended meanwhile (taken over by a
        # newer one) hands its end to the outbox, which then drops the session again.
        self.sessions[agent_id] = stream
        stream.attach(self.outbox)

    def _command(self, msg: agents_pb2.GatewayMessage, kind: str | None) -> None:
        agent_id = msg.agent_id
        op = kind or ""
        if not agent_id:
            self._refuse("", op, RoutingError("INVALID_ARGUMENT", "MISSING_FIELD", "agent_id is required",
                                              field="agent_id"))
            return
        if kind is None:
            self._refuse(agent_id, "", RoutingError("INVALID_ARGUMENT", "MISSING_FIELD",
                                                    "the message names no kind (hello, accept, ...)",
                                                    field="kind"))
            return
        if kind == "set_state":  # as the unary SetState: no session needed
            self._set_state(agent_id, msg.set_state)
            return
        if kind in ("sign_in", "sign_out"):  # as the unary SignIn / SignOut: no session needed
            self._sign(agent_id, kind)
            return
        stream = self.sessions.get(agent_id)
        call_id = msg.complete.call_id if kind == "complete" else ""
        assignment_id = msg.accept.assignment_id if kind == "accept" else (
            msg.reject.assignment_id if kind == "reject" else "")
        if stream is None:
            self._refuse(agent_id, op, RoutingError(
                "FAILED_PRECONDITION", "AGENT_NOT_CONNECTED",  # type: ignore[arg-type]
                f"agent {agent_id} has no session on this gateway (send a hello first)",
                agent_id=agent_id), call_id, assignment_id)
            return
        node = self.node
        if kind == "complete":
            if not call_id:
                self._refuse(agent_id, op, RoutingError("INVALID_ARGUMENT", "MISSING_FIELD",
                                                        "call_id is required", field="call_id"))
                return
            node.agent_complete(stream, convert.stream_complete_cmd(msg.complete))
        elif kind == "accept":
            node.agent_answer(stream, {"op": "accept", "assignment_id": assignment_id})
        elif kind == "reject":
            node.agent_answer(stream, {"op": "reject", "assignment_id": assignment_id,
                                       "reason": msg.reject.reason})
        elif kind == "leave":
            del self.sessions[agent_id]
            node.close_agent_stream(stream)  # as the end of its Connect stream
            # answered once the disconnect is durable, like every answer of the node
            node.deliver_in_order(_Reply(self.outbox, agent_id), SessionEnd("OK", "", "left"))

    def _set_state(self, agent_id: str, m: agents_pb2.GatewaySetState) -> None:
        """Agents.SetState in a frame (see :meth:`_unary`)."""
        def cmd() -> dict:
            duration(m.timeout_s, "timeout_s")
            req = agents_pb2.SetStateRequest(agent_id=agent_id, state=m.state, reason=m.reason,
                                             timeout_s=m.timeout_s)
            return convert.set_state_cmd(req, self.node.now())

        self._unary(agent_id, "set_state", cmd)

    def _sign(self, agent_id: str, op: str) -> None:
        """Agents.SignIn / SignOut in a frame (see :meth:`_unary`)."""
        def cmd() -> dict:
            if op == "sign_in":
                refuse_if_draining(self.node, offers=False)
            return {"op": op, "t": self.node.now(), "agent_id": agent_id}

        self._unary(agent_id, op, cmd)

    def _unary(self, agent_id: str, op: str, make_cmd: Callable[[], dict]) -> None:
        """A unary Agents RPC carried in a frame: ``make_cmd()`` checks the message and
        builds the command; refused like the RPC (changing nothing), else answered by an
        OK CommandResult once durable (after the messages the command makes)."""
        node = self.node
        try:
            node.submit(make_cmd())
        except RoutingError as e:
            self._refuse(agent_id, op, e)
            return
        node.deliver_in_order(_Reply(self.outbox, agent_id),
                              agents_pb2.NodeMessage(result=agents_pb2.CommandResult(op=op)))


async def serve(node: Any, context: Any) -> None:
    """The ``Agents.Gateway`` handler's body (router.node.services). Like Connect, it
    is served while the node drains (agents finish their work)."""
    await GatewaySession(node, context).serve()
