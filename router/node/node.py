"""The site node's state holder: one engine, one journal, the agent streams and watchers.

Event sourcing, in one place (:meth:`Node.submit`):

1. a command dict is applied to the engine synchronously, on the loop thread, with no
   ``await`` in between — so commands are serialized without a lock;
2. if it changed the state it is appended to the journal; the messages its effects
   call for (assignments, cancellations, agent states, call updates) are built *now*,
   from the state right after the command, for the streams open *now*;
3. those messages are delivered, strictly in journal order, only once the record is
   durable (invariant 4: nothing is told to anyone before it is on disk). A client that
   goes away while waiting does not cancel the delivery.

A command that changed nothing (an idempotent repeat), and every read, is answered only
after everything journaled before it is durable (:meth:`Node.barrier`), so no answer
ever reports a state that a crash could still take back.

A stream opened after a command was applied but before it became durable gets the
current state as its first messages instead (taken when it opens, written once the
journal has caught up), so it misses nothing and sees nothing early.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import time
from typing import Any

from router import model
from router.config import SiteConfig
from router.model import AgentChanged, AssignmentOffered, CallChanged, CallConnected, RoutingError
from router.node import convert, metrics, peers
from router.node.errors import empty_id
from router.node.flow import FlowWindow
from router.status import status_code
from router.node.streams import AgentStream, CallWatch
from router.v1 import agents_pb2, routing_pb2

log = logging.getLogger("tandem.node")

FINAL_CALL_STATES = frozenset({"completed", "abandoned", "rejected"})
COMPACT_QUIET_S = 0.05
COMPACT_MAX_DEFER_S = 1.0  # the capture is short now: no need to wait long
# A clean stop compacts when at least this many records would otherwise be replayed.
COMPACT_AT_STOP = 1000
METRICS_INTERVAL_S = 1.0
_FLOW_OPS = frozenset({"transfer_done", "transfer_commit"})
# How long an agent may be READY (or in wrap-up) without an open Connect stream before
# the node takes it out of routing (journaled ``disconnect``: NOT_READY "disconnected",
# ringing offers back at their place). The grace lets a desktop send SetState READY
# right after its hello, before the node has read the hello (and lets agents reconnect
# after a node restart).
STREAM_GRACE_S = 10.0
_STAFFED = frozenset({"ready", "wrap_up"})


LOOP_PROBE_S = 0.005
LOOP_RECENT_S = 10


class LoopProbe:
    """Measures how late the event loop runs a timer due every ``interval`` seconds: a
    callback that holds the loop for S seconds makes one probe late by S minus at most
    ``interval``. Keeps the longest lag since start and over the last ``LOOP_RECENT_S``
    whole seconds, and feeds the Prometheus metrics (``tandem_node_loop_*``). Costs one
    timer callback per interval (≈ 200 a second, a few µs each)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, site: str, interval: float = LOOP_PROBE_S) -> None:
        self._loop, self.interval = loop, interval
        self.max_since_start = 0.0
        self._second = 0  # the whole second the current maximum belongs to
        self._cur = 0.0
        self._recent: collections.deque = collections.deque(maxlen=LOOP_RECENT_S)
        self._hist = metrics.LOOP_LAG.labels(site)
        self._g_start = metrics.LOOP_STALL_MAX.labels(site, "start")
        self._g_recent = metrics.LOOP_STALL_MAX.labels(site, "recent")
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        self._due = self._loop.time() + self.interval
        self._handle = self._loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def recent_max(self) -> float:
        return max(self._cur, max(self._recent, default=0.0))

    def _tick(self) -> None:
        now = self._loop.time()
        lag = max(0.0, now - self._due)
        self._hist.observe(lag)
        second = int(now)
        if second != self._second:
            self._recent.append(self._cur)
            self._second, self._cur = second, 0.0
            self._g_recent.set(self.recent_max())
        if lag > self._cur:
            self._cur = lag
            if lag > self.max_since_start:
                self.max_since_start = lag
                self._g_start.set(lag)
            self._g_recent.set(self.recent_max())
        self._due = now + self.interval
        self._handle = self._loop.call_at(self._due, self._tick)


class NodeFailed(RoutingError):
    """The journal failed: the in-memory state is ahead of the disk; the node stops.
    Clients get UNAVAILABLE (NODE_DRAINING: retry, here after the restart or elsewhere);
    the command they sent may or may not have survived — every retry is safe."""

    def __init__(self, message: str) -> None:
        super().__init__("UNAVAILABLE", "NODE_DRAINING", message)


async def maybe_await(x: Any) -> Any:
    return await x if inspect.isawaitable(x) else x


class Node:
    """A running site node. Built by :func:`router.node.server.build_node`."""

    def __init__(
        self,
        site: SiteConfig,
        engine: Any,
        journal: Any,
        *,
        max_watchers: int = 10_000,
        compact_every: int = 20_000,
        drain_s: float = 2.0,
    ) -> None:
        self.site = site
        self.engine = engine
        self.journal = journal
        self.max_watchers = max_watchers
        self.compact_every = compact_every
        self.drain_s = drain_s
        self.server: Any = None  # grpc.aio.Server, set by build_node
        self.health: Any = None  # grpc_health aio HealthServicer, set by build_node
        self.port = 0
        # shutting down (SIGTERM) or draining to targets (DrainSite); see ``draining``
        self.shutting_down = False
        self.failed: BaseException | None = None
        self.durable_seq = 0
        self.stopped = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._last_t = 0.0
        self._tail: asyncio.Future | None = None
        self._pending: collections.deque = collections.deque()  # (future, deliveries)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._last_fired: float | None = None
        self._last_apply = 0.0
        self._counters: dict = {}
        self._durable_hist = metrics.DURABLE_SECONDS.labels(site.site.name)
        self._metrics_task: asyncio.Task | None = None
        self.metrics = metrics.NodeMetrics(self)
        self.loop_probe = LoopProbe(self._loop, site.site.name)  # started with the metrics
        self._compaction_gauge = metrics.COMPACTION_LOOP_SECONDS.labels(site.site.name)
        # The alert rules on this node's own figures (router.alerts; TANDEM_ALERT_RULES
        # overrides the packaged spec): .active() lists those pending or firing.
        self.alerts = metrics.NodeAlerts(site.site.name)
        self._streams: dict[str, AgentStream] = {}
        self.stream_grace_s = STREAM_GRACE_S
        # agent id -> timer: staffed (ready / wrap-up) without an open stream
        self._unstreamed: dict[str, asyncio.TimerHandle] = {}
        self._auto_streams = 0  # open streams with auto answer
        # Call messages built by the last submit (for its assignments), as the step left
        # the calls: the caller may reuse them for its reply instead of building again.
        self.step_calls: dict[str, Any] = {}
        self.history: Any = None  # router.node.history_link.HistoryLink, set by main
        self.cluster: Any = None  # router.node.cluster.ClusterLink, set by main (with etcd)
        self.partners: Any = None  # router.node.partner.PartnerLink, set by build_node
        self.security: Any = None  # router.security.site.NodeSecurity, set by build_node
        self.flow = FlowWindow()  # overflow in/out in the last minute (Admin.GetStatus)
        # router.security.tls.ChannelFactory: every channel the node opens (peers,
        # partners); None = plaintext channels (set by build_node)
        self.channels: Any = None
        self._watchers: dict[str, set[CallWatch]] = {}
        self._watcher_count = 0
        self._compaction: asyncio.Task | None = None
        self._closing = False
        self._stop_task: asyncio.Task | None = None

    # --- time --------------------------------------------------------------------------

    def now(self) -> float:
        """Wall-clock time for a command, never going backwards (the journal's order)."""
        t = time.time()
        if t < self._last_t:
            t = self._last_t
        self._last_t = t
        return t

    def view_time(self) -> float:
        """The time at which reads see waits and ages (never before the engine's)."""
        return max(time.time(), self._last_t)

    # --- commands ----------------------------------------------------------------------

    def submit(
        self, cmd: dict, reply_to: AgentStream | None = None
    ) -> tuple[model.Outcome, asyncio.Future | None]:
        """Apply one command now; journal it if it changed the state.

        Assignments it makes to auto-answer agents are accepted in the same step (one
        more ``accept`` command each, applied and journaled right after it: a replay
        gives the same state). ``reply_to``: an agent stream that sent the command and
        gets its CommandResult, in order with the step's other messages.

        Returns the outcome and the journal future (None when nothing changed). Raises
        RoutingError (nothing changed) or NodeFailed.
        """
        if self.failed is not None or self._closing:
            raise RoutingError("UNAVAILABLE", "NODE_DRAINING", "the node is shutting down")
        op = cmd.get("op", "")
        try:
            outcome = self.engine.apply(cmd)
        except RoutingError as e:
            self._count(op, e.reason)
            raise
        except Exception:
            # The engine validates before it mutates, so this is a bug that may have
            # left the state half-changed and ahead of the journal. Keep serving (one
            # bad command must not take the site down) but say it loudly.
            log.critical("engine raised on %r; its state may now differ from the journal", cmd)
            raise
        fut = None
        effects = outcome.effects
        answered: set | None = None
        self.step_calls = {}
        if outcome.changed:
            records = [cmd]
            if effects and self._auto_streams:
                effects, answered = self._auto_answer(cmd, effects, records)
            # Nothing may come between a state change and its journal record.
            try:
                fut = self.journal.append(cmd) if len(records) == 1 else self.journal.append_many(records)
            except BaseException as exc:
                self._fail(exc)
                raise NodeFailed(f"journal append failed: {exc!r}") from exc
            self._tail = fut
        self._last_apply = time.monotonic()
        try:
            deliveries = self._capture(effects, answered) if effects else []
            if reply_to is not None:  # the answer first, then what followed from it
                deliveries.insert(0, (reply_to, self._result_msg(cmd, outcome.result)))
        except Exception:  # noqa: BLE001 - streams resync on reconnect; the state is safe
            log.exception("building stream messages for %r failed", cmd)
            deliveries = []
        if outcome.changed:
            try:
                self.metrics.observe(records, effects)
            except Exception:  # noqa: BLE001 - metrics must never hurt routing
                log.exception("metrics of %r failed", cmd)
        if self.history is not None and outcome.changed:  # rows follow the journal ack
            self.history.capture(records, effects, outcome.result, deliveries)
        if fut is not None:
            self._pending.append((fut, deliveries, self._last_apply))
            fut.add_done_callback(self._on_durable)
            self._maybe_compact()
        elif deliveries:
            self._deliver_in_order(deliveries)
        if outcome.changed and op in _FLOW_OPS:
            self._flow(op, outcome.result)
        if effects:
            self._check_streams(effects)
        self._count(op, "changed" if outcome.changed else "unchanged")
        self._rearm_timer()
        return outcome, fut

    def _auto_answer(self, cmd: dict, effects: list, records: list) -> tuple[list, set | None]:
        """Accept, in this step, the offers the command made to auto-answer agents."""
        answered = None
        for e in effects:
            if type(e) is not AssignmentOffered:
                continue
            stream = self._streams.get(e.agent_id)
            if stream is None or not stream.auto_answer:
                continue
            accept = {"op": "accept", "t": cmd["t"], "agent_id": e.agent_id, "assignment_id": e.assignment_id}
            try:
                out = self.engine.apply(accept)
            except Exception:  # noqa: BLE001 - a live offer is always acceptable: a bug
                log.exception("auto answer of %s refused", e.assignment_id)
                continue
            if not out.changed:
                continue
            records.append(accept)
            self._count("accept", "changed")
            if answered is None:
                answered = set()
                effects = list(effects)
            answered.add(e.assignment_id)
            effects += out.effects
        return effects, answered

    def deliver_in_order(self, target: Any, msg: Any) -> None:
        """``target.deliver(msg)`` once everything journaled so far is durable (an answer
        that reports that state, such as the end of an agent's gateway session)."""
        self._deliver_in_order([(target, msg)])

    def _deliver_in_order(self, deliveries: list) -> None:
        """Deliver after everything journaled so far (the messages report that state)."""
        tail = self._tail
        if tail is not None and not tail.done():
            self._pending.append((tail, deliveries, None))
        else:
            self._deliver(deliveries)

    def _result_msg(self, cmd: dict, view: Any) -> agents_pb2.NodeMessage:
        return agents_pb2.NodeMessage(
            result=agents_pb2.CommandResult(op=cmd["op"], call_id=cmd.get("call_id", ""), call=convert.call_msg(view))
        )

    def _error_msg(self, op: str, call_id: str, err: RoutingError) -> agents_pb2.NodeMessage:
        return agents_pb2.NodeMessage(
            result=agents_pb2.CommandResult(
                op=op, call_id=call_id, code=status_code(err.code), reason=err.reason, message=err.message
            )
        )

    def check_target(self, target: str) -> None:
        """RoutingError unless a transfer may go to ``target`` (router.node.peers)."""
        peers.check_target(self, target)

    def peer_identity(self, address: str) -> Any:
        """The identity the node at ``address`` must prove over mTLS (router.node.peers)."""
        return peers.peer_identity(self, address)

    async def execute(self, cmd: dict) -> Any:
        """Apply, and return the result once it (and everything before it) is durable."""
        outcome, fut = self.submit(cmd)
        await self.settle(fut)
        return outcome.result

    async def settle(self, fut: asyncio.Future | None) -> None:
        """Wait until a submit's record (``fut``; None: everything so far) is durable."""
        if fut is not None:
            await self._wait_durable(fut)
        else:
            await self.barrier()

    async def barrier(self) -> None:
        """Wait until everything journaled so far is durable."""
        tail = self._tail
        if tail is not None:
            await self._wait_durable(tail)

    async def _wait_durable(self, fut: asyncio.Future) -> None:
        if not fut.done():
            # shield: a client giving up must not cancel the journal's future
            await asyncio.shield(fut)
        if fut.cancelled() or fut.exception() is not None:
            raise NodeFailed("the journal failed; the node is stopping")

    def _on_durable(self, _fut: asyncio.Future) -> None:
        # Deliver strictly in journal order, whatever order the futures resolve in.
        now = time.monotonic()
        while self._pending and self._pending[0][0].done():
            fut, deliveries, applied_at = self._pending.popleft()
            if fut.cancelled() or fut.exception() is not None:
                self._fail(fut.exception() if not fut.cancelled() else RuntimeError("cancelled"))
                self._pending.clear()
                return
            seq = fut.result()
            if isinstance(seq, int) and seq > self.durable_seq:
                self.durable_seq = seq
            if applied_at is not None:
                self._durable_hist.observe(now - applied_at)
            self._deliver(deliveries)

    def _flow(self, op: str, result: Any) -> None:
        if op == "transfer_done":
            self.flow.record("out", getattr(result, "queue", ""))
        elif getattr(result, "state", "") == "committed":
            self.flow.record("in", getattr(result, "queue", ""))

    def _count(self, op: str, result: str) -> None:
        child = self._counters.get((op, result))
        if child is None:
            child = self._counters[(op, result)] = metrics.COMMANDS.labels(self.site.site.name, op, result)
        child.inc()

    def publish_metrics(self) -> None:
        """Refresh the gauges from the engine, the cluster link and the history (on the
        loop thread); see :class:`router.node.metrics.NodeMetrics`."""
        self.metrics.publish()

    async def _metrics_loop(self) -> None:
        while not self._closing:
            try:
                self.publish_metrics()
            except Exception:  # noqa: BLE001 - metrics must never hurt routing
                log.exception("metrics refresh failed")
            try:
                self.alerts.evaluate()  # on exactly what was just published
            except Exception:  # noqa: BLE001
                log.exception("alert evaluation failed")
            await asyncio.sleep(METRICS_INTERVAL_S)

    def _deliver(self, deliveries: list) -> None:
        for target, msg in deliveries:
            target.deliver(msg)

    def _capture(self, effects: list, answered: set | None = None) -> list:
        """Messages the effects call for, built from the state right after the command,
        addressed to the streams open right now. ``answered``: assignments auto-answered
        in this step (one Assignment marked connected, no Connected message)."""
        out: list = []
        call_msgs: dict[str, routing_pb2.CallUpdate] = {}
        for e in effects:
            kind = type(e)
            if kind is CallChanged:
                ws = self._watchers.get(e.call_id)
                if not ws:
                    continue
                upd = call_msgs.get(e.call_id)
                if upd is None:
                    upd = call_msgs[e.call_id] = self.call_update(e.call_id)
                out.extend((w, upd) for w in ws)
                continue
            stream = self._streams.get(e.agent_id)
            if stream is None:
                continue
            if kind is AssignmentOffered:
                connected = answered is not None and e.assignment_id in answered
                asg = self.assignment_msg(e.assignment_id, e.call_id, connected)
                self.step_calls[e.call_id] = asg.call
                msg = agents_pb2.NodeMessage(assignment=asg)
            elif kind is AgentChanged:
                # only when the state itself changed, not the calls in hand
                status = self.engine.agent_status(e.agent_id)
                if status == stream.status:
                    continue
                stream.status = status
                msg = agents_pb2.NodeMessage(agent=convert.agent_msg(self.engine.agent(e.agent_id)))
            elif kind is CallConnected:
                if answered is not None and e.assignment_id in answered:
                    continue  # said by its Assignment
                msg = agents_pb2.NodeMessage(
                    connected=agents_pb2.Connected(assignment_id=e.assignment_id, call_id=e.call_id)
                )
            elif isinstance(e, model.AssignmentCancelled):
                msg = agents_pb2.NodeMessage(
                    cancelled=agents_pb2.AssignmentCancelled(
                        assignment_id=e.assignment_id, call_id=e.call_id, reason=e.reason
                    )
                )
            else:
                continue
            out.append((stream, msg))
        return out

    # --- views -------------------------------------------------------------------------

    def assignment_msg(self, assignment_id: str, call_id: str, connected: bool = False) -> agents_pb2.Assignment:
        call = self.engine.call(call_id)
        pop = self.engine.screen_pop(call_id)
        if self.history is not None:  # merged with the caller's contacts in the history
            pop = self.history.screen_pop(call, pop)
        return agents_pb2.Assignment(
            assignment_id=assignment_id,
            call=convert.call_msg(call),
            screen_pop=convert.screen_pop_msg(call, pop),
            offer_timeout_s=self.site.routing.offer_timeout_s,
            connected=connected,
        )

    def call_update(self, call_id: str) -> routing_pb2.CallUpdate:
        call = self.engine.call(call_id)
        position, wait = self.position_of(call)
        return routing_pb2.CallUpdate(call=convert.call_msg(call), position=position, expected_wait_s=wait)

    def position_of(self, call: model.CallView) -> tuple[int, float]:
        if call.state != "queued":
            return 0, 0.0
        return self.engine.position(call.call_id), self.engine.expected_wait(call.call_id)

    # --- timers ------------------------------------------------------------------------

    def _rearm_timer(self) -> None:
        deadline = self.engine.next_deadline()
        if deadline is None or self._closing:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = self._timer_at = None
            return
        if self._timer is not None:
            if self._timer_at == deadline:
                return
            self._timer.cancel()
        # +1 ms: the loop's monotonic clock and the wall clock drift apart a little
        delay = max(0.0, deadline - time.time()) + 0.001
        if deadline == self._last_fired:
            delay = max(delay, 0.05)  # a tick left it due: retry, but not in a busy loop
        self._timer = self._loop.call_later(delay, self._on_timer)
        self._timer_at = deadline

    def _on_timer(self) -> None:
        self._last_fired = self._timer_at
        self._timer = self._timer_at = None
        if self._closing or self.failed is not None:
            return
        try:
            self.submit({"op": "tick", "t": self.now()})
        except NodeFailed:
            return
        except RoutingError as e:
            log.error("tick refused: %r", e)
        except Exception:  # noqa: BLE001 - a bug in a tick must not kill the loop
            log.exception("tick failed")
        if self._timer is None:
            self._rearm_timer()

    # --- compaction --------------------------------------------------------------------

    def _maybe_compact(self) -> None:
        if self._compaction is not None or self.compact_every <= 0:
            return
        if getattr(self.journal, "records_since_snapshot", 0) >= self.compact_every:
            self._compaction = self._loop.create_task(self._compact())

    async def _compact(self, defer: bool = True) -> None:
        """Snapshot the engine and let the journal drop what it covers.

        The snapshot is captured on the loop (it must match the journal position exactly)
        by :meth:`Engine.snapshot_parts`: rows of the live calls (queued, ringing,
        connected, in transfer) and reference copies of the rest — finished calls, which
        never change again, the repeat-caller memory and service-level windows, made of
        immutable tuples. The journal encodes those in its compaction thread, a slice at a
        time, giving the GIL back between slices. So the loop is held for C-speed copies
        (≈ 10–20 ms with 200,000 retained calls here) plus a row per live call, not for
        the whole state. It still waits for a quiet moment when one comes soon: no
        command for 50 ms, or at most ``COMPACT_MAX_DEFER_S``.
        """
        try:
            if defer:
                give_up = time.monotonic() + COMPACT_MAX_DEFER_S
                while not self._closing:
                    quiet = time.monotonic() - self._last_apply
                    if quiet >= COMPACT_QUIET_S or time.monotonic() >= give_up:
                        break
                    await asyncio.sleep(COMPACT_QUIET_S - quiet)
                if self._closing:
                    return
            # No await between the capture and compact()'s first step: the snapshot
            # covers exactly the records appended so far.
            log.info("journal compaction started at seq %s", getattr(self.journal, "last_seq", "?"))
            started = time.perf_counter()
            parts = getattr(self.engine, "snapshot_parts", None)
            if parts is not None:
                head, shared = parts()
                # "queues" holds the service-level windows (long at high rates): encoded
                # in the compaction thread too. Nothing in it is changed by the engine.
                shared["queues"] = head.pop("queues")
            else:  # an engine without it (tests' stand-ins): the plain snapshot
                head = self.engine.snapshot()
                shared = {"calls": head.pop("calls")}
            captured = time.perf_counter() - started
            await maybe_await(self.journal.compact(head, handed_over=shared))
            on_loop = captured + getattr(self.journal, "last_compact_loop_s", 0.0)
            self._compaction_gauge.set(on_loop)
            log.info("journal compacted in %.3f s (%.1f ms on the loop)",
                     time.perf_counter() - started, on_loop * 1e3)
        except Exception:  # noqa: BLE001
            log.exception("journal compaction failed (the journal keeps growing)")
        finally:
            if self._compaction is asyncio.current_task():
                self._compaction = None

    # --- agent streams -----------------------------------------------------------------

    async def open_agent_stream(self, agent_id: str, auto_answer: bool = False) -> AgentStream:
        """Register agent_id's Connect stream (replacing an older one) and queue its
        first messages: the agent's state and the offers ringing at it. With
        ``auto_answer`` the ringing offers are accepted first, and the first messages
        carry every connected call as an Assignment marked connected."""
        if self._closing:
            raise RoutingError("UNAVAILABLE", "NODE_DRAINING", "the node is shutting down")
        view = self.engine.agent(agent_id)
        if view.state == "signed_out":
            raise RoutingError(
                "FAILED_PRECONDITION", "AGENT_NOT_SIGNED_IN", f"agent {agent_id} is not signed in",
                agent_id=agent_id,
            )
        old = self._streams.pop(agent_id, None)
        if old is not None:
            self._forget(old)
            old.close("ABORTED", "STREAM_REPLACED", "a newer Connect for this agent replaced this stream")
        if auto_answer:
            for call_id in view.call_ids:
                call = self.engine.call(call_id)
                if call.state == "assigned" and call.agent_id == agent_id and call.assignment_id:
                    self.submit({"op": "accept", "t": self.now(), "agent_id": agent_id,
                                 "assignment_id": call.assignment_id})
            view = self.engine.agent(agent_id)
        stream = AgentStream(agent_id, auto_answer)
        self._streams[agent_id] = stream
        timer = self._unstreamed.pop(agent_id, None)
        if timer is not None:
            timer.cancel()
        self._auto_streams += auto_answer
        stream.status = self.engine.agent_status(agent_id)
        stream.deliver(agents_pb2.NodeMessage(agent=convert.agent_msg(view)))
        for call_id in view.call_ids:
            call = self.engine.call(call_id)
            if call.agent_id != agent_id or not call.assignment_id:
                continue
            if call.state == "assigned" or (auto_answer and call.state == "connected"):
                stream.deliver(agents_pb2.NodeMessage(
                    assignment=self.assignment_msg(call.assignment_id, call_id, call.state == "connected")
                ))
        try:
            await self.barrier()  # the state just queued must be durable before it is written
        except BaseException:
            self.close_agent_stream(stream)  # the client left (or the journal failed)
            raise
        return stream

    def _check_streams(self, effects: list) -> None:
        """Arm the grace timer of every agent the step left staffed (READY, wrap-up)
        without an open stream; drop it for the others."""
        for e in effects:
            if type(e) is not AgentChanged or e.agent_id in self._streams:
                continue
            self._watch_unstreamed(e.agent_id)

    def _watch_unstreamed(self, agent_id: str) -> None:
        staffed = self.engine.agent_status(agent_id)[0] in _STAFFED
        timer = self._unstreamed.get(agent_id)
        if staffed and timer is None and not self._closing:
            self._unstreamed[agent_id] = self._loop.call_later(
                self.stream_grace_s, self._no_stream, agent_id
            )
        elif not staffed and timer is not None:
            timer.cancel()
            del self._unstreamed[agent_id]

    def _no_stream(self, agent_id: str) -> None:
        """The grace ran out: a staffed agent without a stream is taken out of routing."""
        self._unstreamed.pop(agent_id, None)
        if agent_id in self._streams or self._closing or self.failed is not None:
            return
        if self.engine.agent_status(agent_id)[0] not in _STAFFED:
            return
        log.info("agent %s is %s without a Connect stream: disconnected", agent_id,
                 self.engine.agent_status(agent_id)[0])
        try:
            self.submit({"op": "disconnect", "t": self.now(), "agent_id": agent_id})
        except NodeFailed:
            pass
        except RoutingError as e:
            log.info("disconnect of %s refused: %s", agent_id, e.reason)

    def _forget(self, stream: AgentStream) -> None:
        """Called when the stream leaves ``_streams``."""
        if stream.auto_answer:
            self._auto_streams -= 1

    def close_agent_stream(self, stream: AgentStream) -> None:
        """The stream ended. If it was still the agent's current one, the agent is
        disconnected: ringing offers go back to the queue (engine ``disconnect``)."""
        stream.closed = True
        if self._streams.get(stream.agent_id) is not stream:
            return
        del self._streams[stream.agent_id]
        self._forget(stream)
        if self._closing or self.failed is not None:
            return  # a node shutting down keeps agent states as they are for the restart
        try:
            self.submit({"op": "disconnect", "t": self.now(), "agent_id": stream.agent_id})
        except NodeFailed:
            pass
        except RoutingError as e:
            log.info("disconnect of %s refused: %s", stream.agent_id, e.reason)

    def agent_answer(self, stream: AgentStream, cmd: dict) -> None:
        """An Accept / Reject from the agent's stream. A refused one (an unknown or stale
        assignment: NOT_FOUND UNKNOWN_ASSIGNMENT, e.g. an answer that raced a timeout)
        changes nothing and is answered on the stream by a CommandResult carrying the
        error; the stream stays up. Accepted ones are answered by Connected /
        AssignmentCancelled as before."""
        if self._streams.get(stream.agent_id) is not stream:
            return  # a replaced stream speaks for nobody
        cmd["t"] = self.now()
        cmd["agent_id"] = stream.agent_id
        try:
            self.submit(cmd)
        except RoutingError as e:
            log.info("%s from %s refused: %s %s", cmd["op"], stream.agent_id, e.reason, e.message)
            self.agent_refused(stream, cmd["op"], e, cmd.get("assignment_id", ""))

    def agent_refused(self, stream: AgentStream, op: str, err: RoutingError, assignment_id: str = "") -> None:
        """Answer a refused stream command with a CommandResult carrying the error,
        after everything journaled before it."""
        if not isinstance(assignment_id, str):
            assignment_id = ""
        call_id = assignment_id.rpartition("#")[0] if "#" in assignment_id else ""
        msg = self._error_msg(op, call_id, empty_id(err))
        msg.result.assignment_id = assignment_id
        self._deliver_in_order([(stream, msg)])

    def agent_complete(self, stream: AgentStream, cmd: dict) -> None:
        """A Complete from the agent's stream (``cmd``: a complete command without
        ``t``). Answered on the stream by a CommandResult once durable; a refusal
        (changing nothing) right away, after what was journaled before it."""
        if self._streams.get(stream.agent_id) is not stream:
            return  # a replaced stream speaks for nobody
        call_id = cmd.get("call_id", "")
        try:
            if self.engine.call_holder(call_id) != stream.agent_id:
                raise RoutingError(
                    "FAILED_PRECONDITION", "WRONG_AGENT",
                    f"call {call_id} is not connected to agent {stream.agent_id}",
                    call_id=call_id, agent_id=stream.agent_id,
                )  # fmt: skip
            cmd["t"] = self.now()
            self.submit(cmd, reply_to=stream)
        except RoutingError as e:
            self._deliver_in_order([(stream, self._error_msg("complete", call_id, e))])

    # --- call watchers -----------------------------------------------------------------

    async def open_watch(self, call_id: str) -> CallWatch:
        if self._closing:
            raise RoutingError("UNAVAILABLE", "NODE_DRAINING", "the node is shutting down")
        if self._watcher_count >= self.max_watchers:
            raise RoutingError(
                "RESOURCE_EXHAUSTED", "TOO_MANY_WATCHERS",  # type: ignore[arg-type]
                f"this node serves at most {self.max_watchers} WatchCall streams",
            )
        update = self.call_update(call_id)  # RoutingError CALL_NOT_FOUND
        watch = CallWatch(call_id)
        self._watchers.setdefault(call_id, set()).add(watch)
        self._watcher_count += 1
        watch.deliver(update)
        try:
            await self.barrier()
        except BaseException:
            self.close_watch(watch)
            raise
        return watch

    def close_watch(self, watch: CallWatch) -> None:
        watch.closed = True
        ws = self._watchers.get(watch.call_id)
        if ws is not None and watch in ws:
            ws.discard(watch)
            self._watcher_count -= 1
            if not ws:
                del self._watchers[watch.call_id]

    @property
    def watcher_count(self) -> int:
        return self._watcher_count

    @property
    def connected_agents(self) -> list[str]:
        return sorted(self._streams)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self, *, publish_metrics: bool = False) -> None:
        """Start serving (and, if asked, refreshing the Prometheus gauges every second)."""
        await self.server.start()
        self._rearm_timer()
        for a in self.engine.agents():  # after a restart no agent has a stream yet
            if a.state in _STAFFED and a.agent_id not in self._streams:
                self._watch_unstreamed(a.agent_id)
        if publish_metrics:
            self._metrics_task = self._loop.create_task(self._metrics_loop())
            self.loop_probe.start()

    def _fail(self, exc: BaseException | None) -> None:
        if self.failed is not None:
            return
        self.failed = exc or RuntimeError("journal failure")
        log.critical("journal failure, the node stops (state is ahead of the disk): %r", exc)
        if self._stop_task is None:
            self._stop_task = self._loop.create_task(self.stop(grace=0.5))

    @property
    def draining(self) -> bool:
        """Refusing new work (offers, sign-ins, transfers in): shutting down, draining
        to targets, or drained by an operator (journaled: ``engine.drained``)."""
        return self.shutting_down or self.engine.drained

    @draining.setter
    def draining(self, value: bool) -> None:  # the shutdown and DrainSite paths
        self.shutting_down = value

    async def shutdown(self, drain_s: float | None = None) -> None:
        """Graceful stop (SIGTERM): health NOT_SERVING, refuse new work (OfferCall,
        SignIn: UNAVAILABLE NODE_DRAINING) for ``drain_s`` while in-flight work finishes,
        then stop."""
        if not self.shutting_down:
            self.shutting_down = True
            log.info("draining")
            if self.health is not None:
                await self.health.enter_graceful_shutdown()
            await asyncio.sleep(self.drain_s if drain_s is None else drain_s)
        await self.stop(grace=1.0)

    async def stop(self, grace: float | None = 0.5) -> None:
        """Stop serving, flush and close the journal. Idempotent."""
        if self._closing:
            await self.stopped.wait()
            return
        self._closing = True
        self.draining = True
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for timer in self._unstreamed.values():
            timer.cancel()
        self._unstreamed.clear()
        if self._metrics_task is not None:
            self._metrics_task.cancel()
        self.loop_probe.stop()
        for stream in list(self._streams.values()):
            stream.close("UNAVAILABLE", "NODE_DRAINING", "the node is shutting down")
        for ws in list(self._watchers.values()):
            for w in list(ws):
                w.close("UNAVAILABLE", "NODE_DRAINING", "the node is shutting down")
        if self.partners is not None:
            self.partners.close_all("UNAVAILABLE", "NODE_DRAINING", "the node is shutting down")
        try:
            if self.server is not None:
                await self.server.stop(grace)
            if self._compaction is not None:
                try:
                    await self._compaction
                except Exception:  # noqa: BLE001 - already logged
                    pass
            if self.failed is None and getattr(self.journal, "records_since_snapshot", 0) >= COMPACT_AT_STOP:
                # the next start restores a snapshot instead of replaying every record
                await self._compact(defer=False)
            if self.failed is None:
                try:
                    await maybe_await(self.journal.flush())
                except Exception as exc:  # noqa: BLE001
                    log.error("journal flush at stop failed: %r", exc)
                    self.failed = exc
            try:
                await maybe_await(self.journal.close())
            except Exception as exc:  # noqa: BLE001
                log.error("journal close failed: %r", exc)
        finally:
            self.stopped.set()
            log.info("stopped")

    async def wait_stopped(self) -> None:
        await self.stopped.wait()
