"""gRPC servicers of a site node: Routing, Agents, Diagnostics (Admin: router.node.admin).

Thin on purpose: each handler converts its request (``convert``), hands a command to the
:class:`~router.node.node.Node` (which applies, journals and waits for durability) or
reads a view, and converts the answer back. Every handler is wrapped by
:func:`~router.node.errors.guard` (RoutingError -> status + ErrorInfo, bug -> INTERNAL).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from router.model import RoutingError
from router.node import convert, gateway
from router.node.errors import Malformed, abort, duration, guard, malformed_error, refuse_if_draining
from router.node.node import FINAL_CALL_STATES, Node
from router.status import error_info
from router.v1 import (
    agents_pb2,
    agents_pb2_grpc,
    diagnostics_pb2,
    diagnostics_pb2_grpc,
    routing_pb2,
    routing_pb2_grpc,
)

log = logging.getLogger("tandem.node")

ECHO_MAX_PAYLOAD = 64 * 1024
DEFAULT_WATCH_INTERVAL_S = 1.0
MIN_WATCH_INTERVAL_S = 0.05
HELLO_TIMEOUT_S = 30.0


def _error_info(e: grpc.RpcError) -> tuple[str, dict]:
    """(ErrorInfo reason, metadata) of another node's refusal; (code name, {}) without one."""
    info = error_info(e) if isinstance(e, grpc.aio.AioRpcError) else None
    return (info.reason, dict(info.metadata)) if info is not None else (e.code().name, {})


def _required(value: str, name: str) -> str:
    """INVALID_ARGUMENT MISSING_FIELD for an empty id, on every RPC alike (an empty id is
    a client bug, not an unknown object)."""
    if not value:
        raise RoutingError("INVALID_ARGUMENT", "MISSING_FIELD", f"{name} is required", field=name)
    return value


class RoutingService(routing_pb2_grpc.RoutingServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    @guard
    async def OfferCall(self, request, context):
        refuse_if_draining(self.node)
        node = self.node
        cmd = convert.offer_cmd(request, 0.0)
        if node.history is not None:  # repeat caller from the history: bounded, never raises
            await node.history.prepare_offer(cmd)
        cmd["t"] = node.now()
        outcome, fut = node.submit(cmd)
        res = outcome.result
        # The call as this step left it (connected already if an auto-answer agent took
        # it); the assignment's message has it built when the call went to an agent.
        call = node.step_calls.get(res.call.call_id) if outcome.changed else None
        msg = routing_pb2.OfferCallResponse(
            call=call if call is not None else convert.call_msg(res.call),
            position=res.position,
            expected_wait_s=res.expected_wait_s,
            decision=res.decision,
        )
        await node.settle(fut)
        cluster = getattr(node, "cluster", None)  # set by router.node.main with --etcd
        if cluster is not None and res.position:
            cluster.offered(res)  # overflow decision (router.node.cluster); never raises
        return msg

    @guard
    async def AbandonCall(self, request, context):
        node = self.node
        view = await node.execute(convert.abandon_cmd(request, node.now()))
        if view.state == "transferred" and view.transfer_target:
            # The call lives at the target now: hand the abandon on and answer with what
            # it did there (see routing.proto).
            return await self._abandon_at_target(view, request.reason)
        return routing_pb2.AbandonCallResponse(call=convert.call_msg(view))

    async def _abandon_at_target(self, view, reason: str) -> routing_pb2.AbandonCallResponse:
        """AbandonCall of a call this node transferred: forward it to the target now and
        answer with the target's call (ABANDONED there), FAILED_PRECONDITION
        CALL_ANSWERED when an agent there had already taken it, or — target unreachable
        — this node's TRANSFERRED view (the node keeps forwarding in the background)."""
        node, cid, target = self.node, view.call_id, view.transfer_target
        transfers = getattr(node, "transfers", None)
        if transfers is None or target.startswith("partner:"):
            # A partner's ACD has it: the partner link tells its gateway in the background
            # (a Withdraw "abandoned"; router.node.partner) and the partner reports the outcome.
            return routing_pb2.AbandonCallResponse(call=convert.call_msg(view))
        stub = routing_pb2_grpc.RoutingStub(transfers._channel(target))
        req = routing_pb2.AbandonCallRequest(call_id=cid, reason=view.abandon_reason or reason)
        try:
            resp = await stub.AbandonCall(req, timeout=transfers.rpc_timeout_s)
        except grpc.RpcError as e:
            reason_there, metadata = _error_info(e)
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION and reason_there == "WRONG_STATE":
                await self._forwarded(cid)  # nothing to abandon there: the forward is done
                state = metadata.get("state", "")
                raise RoutingError(
                    "FAILED_PRECONDITION", "CALL_ANSWERED",
                    f"call {cid} was transferred to {target}, where it is {state or 'answered'}: "
                    "not abandoned", call_id=cid, target=target, state=state,
                ) from None
            log.info("abandon of %s at %s: %s; forwarding in the background", cid, target, reason_there)
            return routing_pb2.AbandonCallResponse(call=convert.call_msg(view))
        await self._forwarded(cid)
        return routing_pb2.AbandonCallResponse(call=resp.call)

    async def _forwarded(self, cid: str) -> None:
        try:
            await self.node.execute({"op": "transfer_forwarded", "t": self.node.now(), "call_id": cid})
        except RoutingError as e:  # e.g. forwarded meanwhile by the transfer driver
            log.info("transfer_forwarded of %s: %s", cid, e.reason)

    @guard
    async def CompleteCall(self, request, context):
        view = await self.node.execute(convert.complete_cmd(request, self.node.now()))
        return routing_pb2.CompleteCallResponse(call=convert.call_msg(view))

    @guard
    async def GetCall(self, request, context):
        node = self.node
        call = node.engine.call(_required(request.call_id, "call_id"))
        position, wait = node.position_of(call)
        msg = routing_pb2.GetCallResponse(call=convert.call_msg(call), position=position, expected_wait_s=wait)
        await node.barrier()
        return msg

    @guard
    async def EstimateWait(self, request, context):
        node = self.node
        q = node.engine.estimate(
            request.skill, convert.channel_str(request.channel), request.language, now=node.view_time()
        )
        return convert.estimate_msg(q, node.engine.announcement)

    @guard
    async def WatchCall(self, request, context):
        node = self.node
        _required(request.call_id, "call_id")
        interval = duration(request.interval_s, "interval_s")
        if interval == 0:
            interval = DEFAULT_WATCH_INTERVAL_S
        interval = min(max(interval, MIN_WATCH_INTERVAL_S), 3600.0)
        watch = await node.open_watch(request.call_id)
        try:
            last_key = None
            last_sent = time.monotonic()
            queued = True
            while True:
                timeout = None
                if queued:
                    timeout = max(0.0, last_sent + interval - time.monotonic())
                try:
                    if not watch.queue.empty():
                        upd = watch.queue.get_nowait()
                    else:
                        upd = await asyncio.wait_for(watch.queue.get(), timeout)
                except asyncio.TimeoutError:
                    # periodic position / expected-wait refresh while queued
                    try:
                        call = node.engine.call(request.call_id)
                    except RoutingError:
                        return  # dropped from retention: nothing more to tell
                    if call.state != "queued":
                        last_sent = time.monotonic()  # the state change comes as an effect
                        continue
                    upd = node.call_update(request.call_id)
                    key = (upd.position, round(upd.expected_wait_s, 1), node.engine.announcement)
                    if key == last_key:
                        last_sent = time.monotonic()
                        continue
                    await node.barrier()
                if upd is None:  # closed by the node
                    if watch.end:
                        await abort(context, *watch.end)
                    return
                last_key = (upd.position, round(upd.expected_wait_s, 1), node.engine.announcement)
                last_sent = time.monotonic()
                if upd.announcement != node.engine.announcement:
                    # the contingency mode's IVR message, as of now (the update may be
                    # shared by several watchers: a copy carries it)
                    shared, upd = upd, routing_pb2.CallUpdate()
                    upd.CopyFrom(shared)
                    upd.announcement = node.engine.announcement
                yield upd
                state = convert.call_state_str(upd.call.state)
                if state in FINAL_CALL_STATES:
                    return
                queued = state == "queued"
        finally:
            node.close_watch(watch)


class AgentsService(agents_pb2_grpc.AgentsServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    @guard
    async def SignIn(self, request, context):
        refuse_if_draining(self.node, offers=False)
        view = await self.node.execute({"op": "sign_in", "t": self.node.now(), "agent_id": request.agent_id})
        return agents_pb2.SignInResponse(agent=convert.agent_msg(view))

    @guard
    async def SignOut(self, request, context):
        view = await self.node.execute({"op": "sign_out", "t": self.node.now(), "agent_id": request.agent_id})
        return agents_pb2.SignOutResponse(agent=convert.agent_msg(view))

    @guard
    async def SetState(self, request, context):
        duration(request.timeout_s, "timeout_s")
        view = await self.node.execute(convert.set_state_cmd(request, self.node.now()))
        return agents_pb2.SetStateResponse(agent=convert.agent_msg(view))

    @guard
    async def GetAgent(self, request, context):
        agent = self.node.engine.agent(_required(request.agent_id, "agent_id"))
        msg = agents_pb2.GetAgentResponse(agent=convert.agent_msg(agent))
        await self.node.barrier()
        return msg

    @guard
    async def Connect(self, request_iterator, context):
        node = self.node
        requests = request_iterator.__aiter__()
        try:
            first = await asyncio.wait_for(requests.__anext__(), HELLO_TIMEOUT_S)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            await abort(context, "INVALID_ARGUMENT", "MISSING_FIELD", f"no hello within {HELLO_TIMEOUT_S:g} s", field="hello")
        if isinstance(first, Malformed):
            raise malformed_error(first)
        if first.WhichOneof("kind") != "hello" or not first.hello.agent_id:
            await abort(context, "INVALID_ARGUMENT", "MISSING_FIELD", "the first message must be a hello with agent_id", field="hello.agent_id")
        stream = await node.open_agent_stream(first.hello.agent_id, first.hello.auto_answer)
        reader = asyncio.create_task(self._read(context, stream))
        try:
            while True:
                msg = await stream.queue.get()
                if msg is None:
                    break
                await context.write(msg)
            if stream.end is not None:
                await abort(context, *stream.end)
        finally:
            reader.cancel()
            node.close_agent_stream(stream)

    @guard
    async def Gateway(self, request_iterator, context):
        """Many agents' sessions on one stream, in batches (router.node.gateway)."""
        await gateway.serve(self.node, context)

    async def _read(self, context, stream) -> None:
        """Accept / Reject / Complete from the agent. When the agent closes its side (or
        the transport fails), the stream ends. Reads with ``context.read()`` (the request
        iterator only wraps it in an async generator)."""
        node = self.node
        read = context.read
        try:
            while True:
                msg = await read()
                if msg is grpc.aio.EOF:
                    break
                if isinstance(msg, Malformed):  # answered; the stream stays up
                    node.agent_refused(stream, "", malformed_error(msg))
                    continue
                kind = msg.WhichOneof("kind")
                if kind == "complete":
                    node.agent_complete(stream, convert.stream_complete_cmd(msg.complete))
                elif kind == "accept":
                    self.node.agent_answer(stream, {"op": "accept", "assignment_id": msg.accept.assignment_id})
                elif kind == "reject":
                    self.node.agent_answer(
                        stream,
                        {"op": "reject", "assignment_id": msg.reject.assignment_id, "reason": msg.reject.reason},
                    )
                else:
                    log.info("agent %s sent %s on an open stream; ignored", stream.agent_id, kind)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - transport errors end the stream
            log.info("agent %s stream read ended: %r", stream.agent_id, exc)
        stream.close()


class DiagnosticsService(diagnostics_pb2_grpc.DiagnosticsServicer):
    def __init__(self, node: Node) -> None:
        self.node = node

    @guard
    async def Echo(self, request, context):
        if len(request.payload) > ECHO_MAX_PAYLOAD:
            raise RoutingError(
                "INVALID_ARGUMENT", "FIELD_TOO_LONG", f"payload is over {ECHO_MAX_PAYLOAD} bytes", field="payload"
            )
        return diagnostics_pb2.EchoResponse(payload=request.payload)
