"""Simulated agents for the load generator: one :class:`SimAgent` per configured agent.

An agent signs in, opens its ``Connect`` stream (hello first), becomes READY and then
answers what the node pushes:

* ``Assignment`` — reject it (probability ``reject_p``), let it ring out (``no_answer_p``;
  the node withdraws it after ``offer_timeout_s``) or accept it after ``ring_s``;
* ``Connected`` — talk for the call's handle time, then ``CompleteCall`` with a
  disposition (resolved, CSAT); the node's wrap-up makes the agent READY again;
* its own state NOT_READY after a reject / no-answer — READY again after ``recover_s``.

With ``protocol="auto"`` the agent speaks the cheaper protocol instead: auto answer in
its hello (every Assignment arrives already connected: no accept, no ``Connected``;
``reject_p`` / ``no_answer_p`` do not apply) and ``Complete`` on its stream, answered by
a ``CommandResult`` there (falling back to the unary ``CompleteCall`` if that answer
does not come within the RPC timeout).

With ``protocol="gateway"`` the agents speak the ``auto`` protocol through one
:class:`AgentGatewayLink` — a site's agent gateway: one ``Agents.Gateway`` stream for all
of them, what they write in one loop turn sent as one frame, the node's frames dispatched
to each agent by ``agent_id``. An agent's ``stop`` sends a ``Leave`` (the end of its
session) instead of closing a stream of its own.

Every duration is *simulated* seconds divided by the generator's ``time_scale``. What the
agent sees goes to the shared :class:`Ledger`, which flags a call offered to two agents
at once or connected twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass

import grpc

from router.sim.rpc import NodeClient, call_with_retry, describe, error_reason
from router.v1 import agents_pb2, routing_pb2, types_pb2

from router.sim.ledger import CallRecord, Ledger

log = logging.getLogger("tandem.loadgen")


@dataclass(frozen=True)
class AgentBehaviour:
    """How simulated agents answer (durations in simulated seconds)."""

    reject_p: float = 0.0
    no_answer_p: float = 0.0
    ring_s: float = 0.0  # from the offer to the accept
    recover_s: float = 10.0  # NOT_READY after a reject / no-answer, then READY again
    resolved_p: float = 0.8
    csat_p: float = 0.3  # share of callers who leave a CSAT score
    default_talk_s: float = 0.0  # for calls the generator did not offer itself
    # "classic" (accept, unary CompleteCall) | "auto" | "gateway" (see module doc)
    protocol: str = "classic"


class StreamCommandError(Exception):
    """A command sent on the Connect stream was refused (its CommandResult)."""

    def __init__(self, result: agents_pb2.CommandResult) -> None:
        super().__init__(f"{result.op} {result.call_id}: {result.reason}: {result.message}")
        self.result = result


class SimAgent:
    """One simulated agent desktop on one node."""

    def __init__(
        self,
        client: NodeClient,
        agent_id: str,
        ledger: Ledger,
        behaviour: AgentBehaviour,
        *,
        time_scale: float,
        rng: random.Random,
        rpc_timeout: float,
        stream_timeout: float,
        force: asyncio.Event,
        gateway: "AgentGatewayLink | None" = None,
    ) -> None:
        self.client = client
        self.agent_id = agent_id
        self.ledger = ledger
        self.b = behaviour
        self.scale = time_scale
        self.rng = rng
        self.rpc_timeout = rpc_timeout
        self.stream_timeout = stream_timeout
        self.force = force  # set at the end of a run: talk no longer, answer nothing
        self.state = types_pb2.AGENT_STATE_UNSPECIFIED
        self.reason = ""
        self.stopping = False
        self.ready_once = asyncio.Event()
        self.errors = 0
        self._stream: grpc.aio.StreamStreamCall | None = None
        self._write_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._accepts: dict[str, asyncio.Task] = {}  # assignment id -> pending accept
        self._talking: set[str] = set()
        self._recovering = False
        self._reader: asyncio.Task | None = None
        self.auto = behaviour.protocol in ("auto", "gateway")
        if behaviour.protocol not in ("classic", "auto", "gateway"):
            raise ValueError(f"protocol must be classic, auto or gateway, not {behaviour.protocol!r}")
        if (behaviour.protocol == "gateway") != (gateway is not None):
            raise ValueError("protocol gateway needs a gateway link (and only it does)")
        self.gateway = gateway
        self._results: dict[str, asyncio.Future] = {}  # call id -> CommandResult awaited

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Sign in, connect, hello, READY. Raises if the node refuses."""
        try:
            await self.client.agents.SignIn(
                agents_pb2.SignInRequest(agent_id=self.agent_id), timeout=self.rpc_timeout
            )
        except grpc.aio.AioRpcError as e:
            if error_reason(e) != "AGENT_ALREADY_SIGNED_IN":
                raise
        if self.gateway is not None:
            self.gateway.attach(self)
            self.gateway.send(agents_pb2.GatewayMessage(
                agent_id=self.agent_id, hello=agents_pb2.GatewayHello(auto_answer=True)))
        else:
            self._stream = self.client.agents.Connect(timeout=self.stream_timeout)
            await self._write(
                agents_pb2.AgentMessage(hello=agents_pb2.Hello(agent_id=self.agent_id, auto_answer=self.auto))
            )
            self._reader = asyncio.create_task(self._read_loop(), name=f"agent-{self.agent_id}")
        await self._set_state(types_pb2.AGENT_STATE_READY)

    async def stop(self, timeout: float) -> None:
        """End of shift: NOT_READY, wait (bounded) for calls in hand, close the stream,
        sign out. Never raises."""
        self.stopping = True
        deadline = time.monotonic() + timeout
        with contextlib.suppress(Exception):
            await self._set_state(types_pb2.AGENT_STATE_NOT_READY, "end_of_shift")
        while (self._talking or self._accepts) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.gateway is not None:
            with contextlib.suppress(Exception):
                self.gateway.send(agents_pb2.GatewayMessage(agent_id=self.agent_id, leave=agents_pb2.Leave()))
            self.gateway.detach(self)
            self._stream_over()
        if self._stream is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._stream.done_writing(), 1.0)
            self._stream.cancel()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._reader, 1.0)
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        while time.monotonic() < deadline:
            try:
                await self.client.agents.SignOut(
                    agents_pb2.SignOutRequest(agent_id=self.agent_id), timeout=self.rpc_timeout
                )
                return
            except grpc.aio.AioRpcError as e:
                if error_reason(e) == "AGENT_NOT_SIGNED_IN":
                    return
                if error_reason(e) != "AGENT_BUSY" and e.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    log.warning("%s: sign-out failed: %s", self.agent_id, describe(e))
                    return
            await asyncio.sleep(0.05)

    # --- stream -------------------------------------------------------------------------

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    async def _write(self, msg: agents_pb2.AgentMessage) -> None:
        if self.gateway is not None:  # the same message, tagged, in the gateway's next frame
            kind = msg.WhichOneof("kind")
            self.gateway.send(agents_pb2.GatewayMessage(agent_id=self.agent_id, **{kind: getattr(msg, kind)}))
            return
        async with self._write_lock:
            await self._stream.write(msg)

    async def _read_loop(self) -> None:
        stream = self._stream
        try:
            while True:
                msg = await stream.read()
                if msg is grpc.aio.EOF:
                    break
                self.on_message(msg)
        except grpc.aio.AioRpcError as e:
            if not self.stopping:
                self.errors += 1
                log.warning("%s: stream ended: %s", self.agent_id, describe(e))
        except asyncio.CancelledError:
            pass
        finally:
            self._stream_over()

    def on_message(self, msg: agents_pb2.NodeMessage) -> None:
        """One message from the node (on the agent's stream, or its gateway's)."""
        kind = msg.WhichOneof("kind")
        if kind == "assignment":
            if msg.assignment.connected:
                self._on_connected(msg.assignment)
            else:
                self._on_assignment(msg.assignment)
        elif kind == "result":
            fut = self._results.pop(msg.result.call_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg.result)
        elif kind == "cancelled":
            c = msg.cancelled
            task = self._accepts.pop(c.assignment_id, None)
            if task is not None:
                task.cancel()
            self.ledger.withdrawn(self.agent_id, c.call_id)
        elif kind == "connected":
            self._accepts.pop(msg.connected.assignment_id, None)
            self.ledger.connected(self.agent_id, msg.connected.call_id)
            self._talking.add(msg.connected.call_id)
            self._spawn(self._talk(msg.connected.call_id))
        elif kind == "agent":
            self._on_state(msg.agent)

    def session_ended(self, why: str) -> None:
        """The node ended this agent's session (its stream, or its session on the
        gateway): ``why`` says how ("" when it was asked to)."""
        if why and not self.stopping:
            self.errors += 1
            log.warning("%s: session ended: %s", self.agent_id, why)
        self._stream_over()

    def _stream_over(self) -> None:
        # The node's contract (agents.proto, Connect): when the stream ends, the
        # agent's ringing offers go back to the queue. No AssignmentCancelled can
        # reach a closed stream, so the ledger withdraws them here; otherwise the
        # next offer of such a call to another agent looks like a double assignment.
        for call_id in list(self.ledger.in_hand.get(self.agent_id, {})):
            if call_id not in self._talking:
                self.ledger.withdrawn(self.agent_id, call_id)

    def _on_state(self, agent: agents_pb2.Agent) -> None:
        self.state, self.reason = agent.state, agent.reason
        if agent.state == types_pb2.AGENT_STATE_READY:
            self.ready_once.set()
        if (
            agent.state == types_pb2.AGENT_STATE_NOT_READY
            and agent.reason in ("rejected", "no_answer")
            and not self.stopping
            and not self.force.is_set()
            and not self._recovering
        ):
            self._recovering = True
            self._spawn(self._recover())

    async def _recover(self) -> None:
        try:
            await asyncio.sleep(self.b.recover_s / self.scale)
            if not self.stopping:
                await self._set_state(types_pb2.AGENT_STATE_READY)
        except grpc.aio.AioRpcError as e:
            self.errors += 1
            log.warning("%s: back to READY failed: %s", self.agent_id, describe(e))
        finally:
            self._recovering = False

    def _on_connected(self, a: agents_pb2.Assignment) -> None:
        """An auto-answered assignment: the call is ours and connected already."""
        call_id = a.call.call_id
        if call_id in self._talking:
            return  # sent again after a reconnect
        self.ledger.assigned(self.agent_id, call_id, a.call.channel)
        self.ledger.connected(self.agent_id, call_id)
        self._talking.add(call_id)
        self._spawn(self._talk(call_id))

    def _on_assignment(self, a: agents_pb2.Assignment) -> None:
        call_id = a.call.call_id
        self.ledger.assigned(self.agent_id, call_id, a.call.channel)
        if self.stopping or self.force.is_set():
            # End of the run: let the caller's abandon (or the offer timeout) take it back.
            self.ledger.released(self.agent_id, call_id)
            self._spawn(self._reject(a.assignment_id, call_id, "end_of_shift"))
            return
        u = self.rng.random()
        if u < self.b.reject_p:
            self.ledger.rejects += 1
            self.ledger.released(self.agent_id, call_id)
            self._spawn(self._reject(a.assignment_id, call_id, "busy"))
        elif u < self.b.reject_p + self.b.no_answer_p:
            self.ledger.no_answers += 1
            self.ledger.released(self.agent_id, call_id)  # it rings out; nobody picks up
        else:
            self._accepts[a.assignment_id] = self._spawn(self._accept(a.assignment_id))

    async def _reject(self, assignment_id: str, call_id: str, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self._write(
                agents_pb2.AgentMessage(
                    reject=agents_pb2.Reject(assignment_id=assignment_id, reason=reason)
                )
            )

    async def _accept(self, assignment_id: str) -> None:
        # Until the accept is written the offer is ours to drop; after, it stays pending
        # until the node answers (Connected / AssignmentCancelled), so stop() waits for it.
        try:
            if self.b.ring_s > 0:
                await asyncio.sleep(self.b.ring_s / self.scale)
        except asyncio.CancelledError:
            self._accepts.pop(assignment_id, None)
            raise
        try:
            await self._write(
                agents_pb2.AgentMessage(accept=agents_pb2.Accept(assignment_id=assignment_id))
            )
        except Exception as e:  # noqa: BLE001 - the stream is gone; the node re-queues
            self.errors += 1
            log.warning("%s: accept failed: %s", self.agent_id, describe(e))

    async def _talk(self, call_id: str) -> None:
        rec = self.ledger.records.get(call_id)
        talk = rec.talk_s if rec is not None else self.b.default_talk_s
        try:
            if talk > 0 and not self.force.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.force.wait(), talk / self.scale)
            disposition = self._disposition(rec)
            # The node frees the agent's slot when it applies the completion, and may push
            # the next offer before our answer is back: release first.
            self.ledger.released(self.agent_id, call_id)
            call = await self._stream_complete(call_id, disposition) if self.auto else None
            if call is None:
                resp = await call_with_retry(
                    self.client.routing.CompleteCall,
                    routing_pb2.CompleteCallRequest(call_id=call_id, disposition=disposition),
                    timeout=self.rpc_timeout,
                )
                call = resp.call
            if rec is not None:
                rec.completed(call)
        except (grpc.aio.AioRpcError, StreamCommandError) as e:
            self.errors += 1
            self.ledger.note(f"{call_id}: CompleteCall by {self.agent_id} failed: {describe(e)}")
            if rec is not None:
                rec.complete_failed = describe(e)
                rec.wake.set()
        finally:
            self._talking.discard(call_id)
            self.ledger.released(self.agent_id, call_id)

    async def _stream_complete(self, call_id: str, disposition: types_pb2.Disposition) -> types_pb2.Call | None:
        """Complete on the stream; the call as the node left it, or None when no answer
        came in time (the caller then uses the unary CompleteCall: idempotent).
        Raises AioRpcError-like errors for a refusal (code != 0)."""
        fut = asyncio.get_running_loop().create_future()
        self._results[call_id] = fut
        try:
            await self._write(agents_pb2.AgentMessage(
                complete=agents_pb2.Complete(call_id=call_id, disposition=disposition)
            ))
            res = await asyncio.wait_for(fut, self.rpc_timeout)
        except (asyncio.TimeoutError, grpc.aio.AioRpcError, grpc.aio.UsageError, ConnectionError):
            return None
        finally:
            self._results.pop(call_id, None)
        if res.code != 0:
            raise StreamCommandError(res)
        return res.call

    def _disposition(self, rec: "CallRecord | None") -> types_pb2.Disposition:
        resolved = self.rng.random() < self.b.resolved_p
        csat = 0
        if self.rng.random() < self.b.csat_p:
            # Happier callers when they waited little and the issue was resolved.
            waited = rec.wait_sim(self.scale) if rec is not None else 0.0
            base = 4.6 if resolved else 3.0
            score = base - min(2.0, waited / 120.0) + self.rng.gauss(0, 0.7)
            csat = int(min(5, max(1, round(score))))
        return types_pb2.Disposition(resolved=resolved, csat=csat, wrap_up_code="sim")

    async def _set_state(self, state: int, reason: str = "") -> None:
        await call_with_retry(
            self.client.agents.SetState,
            agents_pb2.SetStateRequest(agent_id=self.agent_id, state=state, reason=reason),
            timeout=self.rpc_timeout,
        )


class AgentGatewayLink:
    """A site's agent gateway: one ``Agents.Gateway`` stream for many :class:`SimAgent`.

    :meth:`send` queues a message; everything queued while the previous frame was being
    written (or in the same loop turn) goes out as one ``GatewayFrame`` (at most
    ``max_frame`` messages each: frames stay well under the node's 64 KiB request
    limit). Frames from the node are dispatched to each agent by ``agent_id``. When the
    stream ends, every agent's session is over (:meth:`SimAgent.session_ended`)."""

    def __init__(self, client: NodeClient, *, stream_timeout: float, max_frame: int = 200) -> None:
        self.client = client
        self.stream_timeout = stream_timeout
        self.max_frame = max_frame
        self.agents: dict[str, SimAgent] = {}
        self.frames_out = 0
        self.frames_in = 0
        self.messages_in = 0
        self.error: str | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self._pending: list[agents_pb2.GatewayMessage] = []
        self._wake = asyncio.Event()
        self._closed = False
        self._tasks: list[asyncio.Task] = []

    async def open(self) -> None:
        self._call = self.client.agents.Gateway(timeout=self.stream_timeout)
        self._tasks = [asyncio.create_task(self._write_loop(), name="gateway-writer"),
                       asyncio.create_task(self._read_loop(), name="gateway-reader")]

    def attach(self, agent: SimAgent) -> None:
        self.agents[agent.agent_id] = agent

    def detach(self, agent: SimAgent) -> None:
        if self.agents.get(agent.agent_id) is agent:
            del self.agents[agent.agent_id]

    def send(self, msg: agents_pb2.GatewayMessage) -> None:
        """Queue one message for the next frame; raises ConnectionError once the stream
        is over (as a write on a dead stream would)."""
        if self._closed:
            raise ConnectionError(f"the gateway stream is over: {self.error or 'closed'}")
        self._pending.append(msg)
        self._wake.set()

    async def _write_loop(self) -> None:
        call = self._call
        try:
            while not self._closed:
                if not self._pending:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                batch, self._pending = self._pending[:self.max_frame], self._pending[self.max_frame:]
                await call.write(agents_pb2.GatewayFrame(messages=batch))
                self.frames_out += 1
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as e:
            self._over(describe(e))
        except asyncio.CancelledError:
            pass

    async def _read_loop(self) -> None:
        call = self._call
        why = "the node closed the gateway stream"
        try:
            while True:
                frame = await call.read()
                if frame is grpc.aio.EOF:
                    break
                self.frames_in += 1
                self.messages_in += len(frame.messages)
                agents = self.agents
                for m in frame.messages:
                    agent = agents.get(m.agent_id)
                    if agent is None:
                        if m.WhichOneof("kind") == "message" and m.message.result.code:
                            log.warning("gateway: %s for %r refused: %s", m.message.result.op,
                                        m.agent_id, m.message.result.message)
                        continue
                    if m.WhichOneof("kind") == "ended":
                        e = m.ended
                        self.detach(agent)
                        agent.session_ended("" if e.code == 0 else f"{e.reason}: {e.message}")
                    else:
                        agent.on_message(m.message)
        except grpc.aio.AioRpcError as e:
            why = describe(e)
        except asyncio.CancelledError:
            why = ""
        self._over(why)

    def _over(self, why: str) -> None:
        if self._closed:
            return
        self._closed = True
        self.error = why or None
        self._wake.set()
        agents, self.agents = self.agents, {}
        for agent in agents.values():
            agent.session_ended(why)

    async def close(self) -> None:
        """Close the stream (every session on it ends: the node disconnects its agents)."""
        if self._call is not None:
            # let what is queued (e.g. the agents' Leave) go out first, bounded
            deadline = time.monotonic() + 1.0
            while self._pending and not self._closed and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._call.done_writing(), 1.0)
            self._call.cancel()
        self._over("")
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
