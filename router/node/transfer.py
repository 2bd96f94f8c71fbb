"""The origin side of transfers between sites: the driver that moves a queued call to
another node exactly once, and recovers transfers in flight after a restart.

    outcome = await node.transfer(call_id, "10.0.0.7:7443")    # TransferOutcome
    result = await node.drain(["10.0.0.7:7443", "10.0.0.8:7443"])

Protocol (the engine half is :mod:`router.engine.transfer`; messages in
``proto/router/v1/interconnect.proto``). The target decides each key (call_id,
transfer_no); the origin journals its steps so that, after a crash, it knows what may be
out on the wire:

1. ``transfer_begin`` (journaled): the call leaves dispatch, keeping its place.
2. ProposeTransfer. A decline (an error with an ErrorInfo reason) -> ``transfer_abort``:
   the call is back in its place. Never sent (below) -> ``transfer_abort`` at once,
   reason "unreachable": the target never saw the key. Any other failure (no answer,
   deadline, connection lost after the request may have left) -> the target may or may
   not hold a reservation, but no Commit was ever sent, so it can never commit: the
   origin sends AbortTransfer (retried with a short backoff, at most
   ``ABORT_BACKOFF_MAX_S``) and aborts locally as soon as the target answers it — the
   target then records the key aborted (a tombstone if it never saw it), so a Propose
   still on the wire can never reserve it — or on its own once the reservation's TTL + a
   margin has passed.
3. RESERVED -> ``transfer_committing`` (journaled *before* the Commit leaves), then
   CommitTransfer, retried with backoff until the target answers: COMMITTED ->
   ``transfer_done`` (the call is "transferred" here, final); ABORTED (the reservation
   expired first) -> ``transfer_abort(by_target)``. While the target is unreachable the
   call stays "transferring": two-phase commit blocks rather than guess (a guess could
   lose or duplicate the call). It is neither dispatched here nor lost.

"Never sent" — exactly one error counts: UNAVAILABLE whose details start with
``failed to connect to all addresses`` (gRPC core's status when the channel's load
balancer is in TRANSIENT_FAILURE at the call's pick: the TCP connect was refused, the
TLS handshake failed, the name did not resolve, ...). gRPC produces it before the call
is given to any transport, so no byte of the request was written; a call is only
retried transparently by gRPC when its earlier attempt provably never reached the
server application (not sent, or refused as a stream), so a retry that ends with this
status did not deliver either. A request written on a connection that broke afterwards
fails with other details ("Socket closed", "Connection reset by peer", GOAWAY, ...) and
stays an unknown outcome, as do DEADLINE_EXCEEDED (the call may have been queued while
CONNECTING, or sent) and every other code. Should a gRPC version word it differently,
the rule simply no longer matches and the safe path applies: a wrong "unknown" costs
time, never a call. Nothing here uses ``wait_for_ready`` (with it, a call would wait
for a connection rather than fail at the pick).

Suspects: every Propose (or Commit, or Abort) that fails without an answer, and every
connection to a target that is lost and cannot be re-established (a watcher per channel
reconnects at once after a drop; a dead peer refuses at once), is reported to the
cluster link (``node.cluster.peer_failed(address, why)``), which leaves that peer out of
its overflow decisions for a short time (:meth:`router.node.cluster.ClusterLink.suspects`).
It only changes where new calls go, never a transfer's outcome.

Recovery: a background loop resolves every call the engine lists in
``transfers_pending()`` that no task is handling — after a restart, all of them: "begun"
as in step 2 (abort at the target, then locally), "committing" as in step 3.

AbandonCall of a transferring call is recorded by the engine (``abandon_pending``): an
aborted transfer then ends the call as abandoned here; a committed one leaves the call
"transferred" with the abandon pending, and this driver forwards it to the target's
Routing.AbandonCall (retried; the target owns the call) and records
``transfer_forwarded``. The carrier may keep talking to the origin.

Fault injection for the crash tests: ``TANDEM_FAULT=transfer:<step>`` makes the process
SIGKILL itself right after the named step — origin: after_begin, after_propose_sent,
after_proposed, after_committing, after_commit_sent, after_committed, after_done;
target (router.node.interconnect): after_reserve, after_commit, after_abort.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from router.engine.partner import PARTNER_PREFIX
from router.model import RoutingError
from router.node import convert
from router.status import error_info
from router.v1 import interconnect_pb2 as pb
from router.v1 import interconnect_pb2_grpc, routing_pb2, routing_pb2_grpc

log = logging.getLogger("tandem.transfer")

RPC_TIMEOUT_S = 3.0
TTL_S = 10.0
MARGIN_S = 2.0
POLL_S = 0.25
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 2.0
ABORT_BACKOFF_MAX_S = 0.5  # AbortTransfer retries after an unknown Propose (cheap while refused)
DRAIN_CONCURRENCY = 8

#: Plaintext channels to targets reconnect within a second of a restart: gRPC's default
#: reconnect backoff grows to minutes, and every call in that backoff fails at the pick
#: (never sent, so safe, but the peer would look dead long after it is back).
CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000))

_FAULT = os.environ.get("TANDEM_FAULT", "")
_SENT_FAULTS = {"after_propose_sent", "after_commit_sent"}

#: Error codes of a definitive answer from the target (a decline); anything else
#: (UNAVAILABLE without NODE_DRAINING, DEADLINE_EXCEEDED, ...) leaves the outcome unknown.
_DECLINES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
}
#: gRPC core's status details when the call failed at the pick, before any transport
#: had it (see "Never sent" in the module docstring).
_NOT_CONNECTED = "failed to connect to all addresses"


def fault(step: str) -> None:
    """SIGKILL this process if TANDEM_FAULT names this step (crash tests only)."""
    if _FAULT == f"transfer:{step}":
        log.warning("TANDEM_FAULT: killing myself after %s", step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def _fault_armed(step: str) -> bool:
    return _FAULT == f"transfer:{step}"


@dataclass
class TransferOutcome:
    """``state``: "committed", "aborted", or "pending" (not decided within the wait;
    the node keeps resolving it)."""

    call_id: str
    transfer_no: int
    state: str
    reason: str = ""
    target: str = ""
    target_site: str = ""
    unsent: bool = False  # aborted because the Propose provably never left (see the docstring)


@dataclass
class DrainResult:
    moved: int = 0
    remaining: int = 0
    declined: dict[str, int] = field(default_factory=dict)


def _reason(e: grpc.RpcError) -> str:
    info = error_info(e) if isinstance(e, grpc.aio.AioRpcError) else None
    return info.reason if info is not None else e.code().name


def _is_decline(e: grpc.RpcError) -> bool:
    if e.code() in _DECLINES:
        return True
    return e.code() == grpc.StatusCode.UNAVAILABLE and _reason(e) == "NODE_DRAINING"


def never_sent(e: grpc.RpcError) -> bool:
    """True when the call provably never reached the target (module docstring, "Never
    sent"): UNAVAILABLE failed at the pick, no transport ever had it."""
    if e.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    try:
        details = e.details() or ""
    except Exception:  # noqa: BLE001 - a non-aio error without details: unknown
        return False
    return details.startswith(_NOT_CONNECTED)


class Transfers:
    """The origin-side driver of one node (``node.transfers``)."""

    def __init__(
        self, node: Any, *, ttl_s: float = TTL_S, margin_s: float = MARGIN_S,
        rpc_timeout_s: float = RPC_TIMEOUT_S, poll_s: float = POLL_S,
    ) -> None:  # fmt: skip
        self.node = node
        self.ttl_s = ttl_s
        self.margin_s = margin_s
        self.rpc_timeout_s = rpc_timeout_s
        self.poll_s = poll_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._watched: dict[str, grpc.aio.Channel] = {}  # target -> the channel watched
        self._watchers: set[asyncio.Task] = set()
        self._tasks: dict[str, asyncio.Task] = {}
        self._loop_task: asyncio.Task | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def _closing(self) -> bool:
        n = self.node
        return n._closing or n.failed is not None or n.stopped.is_set()

    async def _run(self) -> None:
        """Resolve whatever the engine lists as pending and no task handles (recovery)."""
        try:
            while not self._closing():
                try:
                    for cid in self.node.engine.transfers_pending():
                        if cid not in self._tasks:
                            self._spawn(cid, self._resolve(cid))
                except Exception:  # noqa: BLE001 - never let recovery die
                    log.exception("transfer recovery scan failed")
                try:
                    await asyncio.wait_for(self.node.stopped.wait(), self.poll_s)
                except asyncio.TimeoutError:
                    pass
        finally:
            await self.close()

    async def close(self) -> None:
        tasks = list(self._tasks.values()) + list(self._watchers)
        self._watched.clear()
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close()

    def _spawn(self, cid: str, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks[cid] = task

        def done(t: asyncio.Task) -> None:
            if self._tasks.get(cid) is t:
                del self._tasks[cid]
            if not t.cancelled() and t.exception() is not None and not isinstance(t.exception(), RoutingError):
                log.error("transfer task of %s failed", cid, exc_info=t.exception())

        task.add_done_callback(done)
        return task

    def _channel(self, target: str) -> grpc.aio.Channel:
        factory = getattr(self.node, "channels", None)
        if factory is not None and getattr(factory, "secure", True):
            # mTLS with the node's identity; the target must prove it is the member site
            # at that address (or, for a transfer resumed after a restart whose target
            # has left, some site of the cluster).
            ch = factory.channel(target, self.node.peer_identity(target))
        else:
            ch = self._channels.get(target)
            if ch is None:
                ch = self._channels[target] = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        if self._watched.get(target) is not ch:
            self._watched[target] = ch
            task = asyncio.get_running_loop().create_task(self._watch(target, ch), name=f"transfer-watch-{target}")
            self._watchers.add(task)
            task.add_done_callback(self._watchers.discard)
        return ch

    def _peer_failed(self, target: str, why: str) -> None:
        """Tell the cluster link (if any) that ``target`` just failed us (a suspect)."""
        cluster = getattr(self.node, "cluster", None)
        hook = getattr(cluster, "peer_failed", None)
        if hook is None:
            return
        try:
            hook(target, why)
        except Exception:  # noqa: BLE001 - advice for overflow, never a reason to fail a transfer
            log.exception("reporting %s as suspect failed", target)

    async def _watch(self, target: str, ch: grpc.aio.Channel) -> None:
        """Report a connection to ``target`` that is lost and cannot be re-established.

        After READY -> IDLE (the peer closed the connection: it died, restarted, or an
        idle timeout) the channel is asked to reconnect at once; a live peer is READY
        again within a round trip and is never reported, a dead one refuses and the
        channel enters TRANSIENT_FAILURE, which is reported."""
        conn = grpc.ChannelConnectivity
        try:
            state = ch.get_state()
            while self._watched.get(target) is ch and not self._closing():
                await ch.wait_for_state_change(state)
                new = ch.get_state(try_to_connect=state == conn.READY)
                if new == conn.SHUTDOWN:
                    return
                if new == conn.TRANSIENT_FAILURE and state != conn.TRANSIENT_FAILURE:
                    self._peer_failed(target, "connection failed")
                state = new
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a closed channel: nothing more to watch
            log.debug("watch of the channel to %s ended", target, exc_info=True)
        finally:
            if self._watched.get(target) is ch:
                del self._watched[target]

    def _stub(self, target: str) -> interconnect_pb2_grpc.InterconnectStub:
        return interconnect_pb2_grpc.InterconnectStub(self._channel(target))

    async def _exec(self, cmd: dict) -> Any:
        cmd["t"] = self.node.now()
        return await self.node.execute(cmd)

    async def _sleep(self, delay: float) -> float:
        await asyncio.sleep(delay)
        return min(delay * 2, BACKOFF_MAX_S)

    # -- API ----------------------------------------------------------------------------

    async def transfer(self, call_id: str, target: str, timeout: float | None = None) -> TransferOutcome:
        """Move a QUEUED call to the node at ``target`` (host:port). Returns the outcome,
        or state "pending" after ``timeout`` seconds (the transfer goes on in the
        background). Raises RoutingError (nothing changed) when the transfer cannot
        begin: INVALID_ARGUMENT BAD_TARGET (not host:port), FAILED_PRECONDITION
        UNKNOWN_TARGET (not a current member's address), CALL_NOT_FOUND, WRONG_STATE (not
        queued), NOT_TRANSFERABLE, or NODE_DRAINING while the node shuts down."""
        self.node.check_target(target)
        running = self._tasks.get(call_id)
        if running is not None:
            raise RoutingError(
                "FAILED_PRECONDITION", "WRONG_STATE", f"call {call_id} is already being transferred",
                call_id=call_id, state="transferring",
            )  # fmt: skip
        view = self.node.engine.call(call_id)
        no = view.transfer_count + 1
        task = self._spawn(call_id, self._drive(call_id, no, target))
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except asyncio.TimeoutError:
            return TransferOutcome(call_id, no, "pending", "", target)

    async def drain(self, targets: list[str], timeout: float = 60.0, *, refuse_new: bool = True) -> DrainResult:
        """Stop new offers and transfers in (UNAVAILABLE NODE_DRAINING; not with
        ``refuse_new=False``: an operator drain refuses them by its journaled flag) and
        move every queued call to one of ``targets``, tried in turn per call (a decline
        sends the call to the next one). Passes repeat while calls keep moving (a ringing
        call that comes back to the queue goes in the next pass)."""
        if not targets:
            raise RoutingError("INVALID_ARGUMENT", "MISSING_FIELD", "drain needs at least one target", field="targets")
        for target in targets:
            self.node.check_target(target)
        node = self.node
        if refuse_new:
            node.draining = True
        log.info("draining to %s", ", ".join(targets))
        res = DrainResult()
        deadline = time.monotonic() + timeout
        sem = asyncio.Semaphore(DRAIN_CONCURRENCY)
        start = 0

        async def move(cid: str, first: int) -> bool:
            async with sem:
                for k in range(len(targets)):
                    target = targets[(first + k) % len(targets)]
                    try:
                        left = deadline - time.monotonic()
                        out = await self.transfer(cid, target, timeout=max(left, 0.1))
                    except RoutingError:
                        return False  # no longer queued (answered, abandoned)
                    if out.state == "committed":
                        return True
                    if out.state == "pending":
                        return False
                    res.declined[out.reason] = res.declined.get(out.reason, 0) + 1
                return False

        while time.monotonic() < deadline:
            queued = [c.call_id for c in node.engine.calls("queued")]
            if not queued:
                break
            moved = await asyncio.gather(*(move(cid, start + i) for i, cid in enumerate(queued)))
            start += len(queued)
            res.moved += sum(moved)
            if not any(moved):
                break
        counts = node.engine.counts_by_state()
        res.remaining = sum(counts.get(s, 0) for s in ("queued", "assigned", "transferring"))
        return res

    # -- the protocol -------------------------------------------------------------------

    async def _drive(self, cid: str, no: int, target: str) -> TransferOutcome:
        node = self.node
        view = await self._exec({"op": "transfer_begin", "call_id": cid, "transfer_no": no, "target": target})
        fault("after_begin")
        req = pb.ProposeTransferRequest(
            call_id=cid, transfer_no=no, origin_site=node.site.site.name, ttl_s=self.ttl_s,
            call=pb.TransferredCall(
                channel=convert.channel_enum(view.channel), skill=view.skill, language=view.language,
                priority_class=convert.priority_enum(view.priority_class), offered_at=view.offered_at,
                caller=view.caller, customer_id=view.customer_id, context=convert.context_msg(view.context),
            ),
        )  # fmt: skip
        horizon = time.monotonic() + self.ttl_s + self.margin_s
        try:
            call = self._stub(target).ProposeTransfer(req, timeout=self.rpc_timeout_s)
            if _fault_armed("after_propose_sent"):
                await asyncio.sleep(0.3)  # let it reach the target
                fault("after_propose_sent")
            resp = await call
        except grpc.RpcError as e:
            if _is_decline(e):
                return await self._abort(cid, no, target, _reason(e))
            self._peer_failed(target, f"propose: {e.code().name}")
            if never_sent(e):
                # The target never saw this key and never will: the call goes back now.
                log.info("propose %s/%d to %s: never sent (%s); aborting", cid, no, target, e.details())
                return await self._abort(cid, no, target, "unreachable", unsent=True)
            log.info("propose %s/%d to %s: no answer (%s); aborting", cid, no, target, e.code().name)
            return await self._abort_unknown(cid, no, target, horizon)
        st = resp.transfer
        if st.state == pb.TRANSFER_STATE_ABORTED:
            return await self._abort(cid, no, target, st.reason or "aborted", by_target=True)
        if st.state not in (pb.TRANSFER_STATE_RESERVED, pb.TRANSFER_STATE_COMMITTED):
            log.error("propose %s/%d: unexpected answer %s; aborting", cid, no, st)
            return await self._abort_unknown(cid, no, target, horizon)
        fault("after_proposed")
        await self._exec({"op": "transfer_committing", "call_id": cid, "transfer_no": no})
        fault("after_committing")
        return await self._commit(cid, no, target)

    async def _abort(
        self, cid: str, no: int, target: str, reason: str, by_target: bool = False, unsent: bool = False,
    ) -> TransferOutcome:  # fmt: skip
        await self._exec({
            "op": "transfer_abort", "call_id": cid, "transfer_no": no,
            "reason": reason[:64], "by_target": by_target,
        })  # fmt: skip
        return TransferOutcome(cid, no, "aborted", reason, target, unsent=unsent)

    async def _abort_unknown(self, cid: str, no: int, target: str, horizon: float) -> TransferOutcome:
        """No Commit was ever sent for this key: abort it at the target if it answers,
        on our own once the reservation cannot be alive any more."""
        delay = BACKOFF_MIN_S
        req = pb.AbortTransferRequest(call_id=cid, transfer_no=no, origin_site=self.node.site.site.name)
        while True:
            try:
                resp = await self._stub(target).AbortTransfer(req, timeout=self.rpc_timeout_s)
            except grpc.RpcError as e:
                if e.code() in _DECLINES:  # a bad request: nothing of ours is there
                    return await self._abort(cid, no, target, _reason(e))
                self._peer_failed(target, f"abort: {e.code().name}")
                if time.monotonic() >= horizon:
                    return await self._abort(cid, no, target, "unreachable")
                # A short backoff: the moment the target is back, its answer (a tombstone
                # for a key it never saw) puts the call back in dispatch.
                await asyncio.sleep(min(delay, max(0.0, horizon - time.monotonic())))
                delay = min(delay * 2, ABORT_BACKOFF_MAX_S)
                continue
            if resp.transfer.state == pb.TRANSFER_STATE_COMMITTED:  # cannot happen without a Commit
                log.critical("target says %s/%d COMMITTED though no Commit was sent; following it", cid, no)
                await self._exec({"op": "transfer_committing", "call_id": cid, "transfer_no": no})
                return await self._commit(cid, no, target)
            return await self._abort(cid, no, target, resp.transfer.reason or "aborted", by_target=True)

    async def _commit(self, cid: str, no: int, target: str) -> TransferOutcome:
        """A Commit may be out there: only the target's answer resolves the key."""
        delay = BACKOFF_MIN_S
        req = pb.CommitTransferRequest(call_id=cid, transfer_no=no)
        while True:
            try:
                call = self._stub(target).CommitTransfer(req, timeout=self.rpc_timeout_s)
                if _fault_armed("after_commit_sent"):
                    await asyncio.sleep(0.3)
                    fault("after_commit_sent")
                resp = await call
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    log.critical("target %s does not know transfer %s/%d (forgotten?); still asking", target, cid, no)
                else:
                    self._peer_failed(target, f"commit: {e.code().name}")
                    log.info("commit %s/%d to %s: %s; retrying", cid, no, target, e.code().name)
                delay = await self._sleep(delay if e.code() != grpc.StatusCode.NOT_FOUND else BACKOFF_MAX_S)
                continue
            st = resp.transfer
            if st.state == pb.TRANSFER_STATE_COMMITTED:
                fault("after_committed")
                view = await self._exec({"op": "transfer_done", "call_id": cid, "transfer_no": no})
                fault("after_done")
                if view.abandon_pending == 1:
                    await self._forward_abandon(cid, target)
                return TransferOutcome(cid, no, "committed", "", target, st.site)
            if st.state == pb.TRANSFER_STATE_ABORTED:
                return await self._abort(cid, no, target, st.reason or "aborted", by_target=True)
            log.error("commit %s/%d: unexpected answer %s; retrying", cid, no, st)
            delay = await self._sleep(BACKOFF_MAX_S)

    async def _forward_abandon(self, cid: str, target: str) -> None:
        """Hand an abandon that reached us after the call moved on to the target."""
        view = self.node.engine.call(cid)
        stub = routing_pb2_grpc.RoutingStub(self._channel(target))
        delay = BACKOFF_MIN_S
        while True:
            try:
                await stub.AbandonCall(
                    routing_pb2.AbandonCallRequest(call_id=cid, reason=view.abandon_reason), timeout=self.rpc_timeout_s
                )
                break
            except grpc.RpcError as e:
                if e.code() in _DECLINES:  # connected by now, or gone: nothing to abandon there
                    log.info("abandon of %s at %s: %s", cid, target, _reason(e))
                    break
                delay = await self._sleep(delay)
        await self._exec({"op": "transfer_forwarded", "call_id": cid})

    async def _resolve(self, cid: str) -> TransferOutcome | None:
        """Recovery of one pending call (see the module docstring)."""
        view = self.node.engine.call(cid)
        target, no = view.transfer_target, view.transfer_count
        if target.startswith(PARTNER_PREFIX):  # a partner's gateway (router.node.partner)
            partners = getattr(self.node, "partners", None)
            if partners is not None:
                await partners.resolve(cid)
            return None
        if view.state == "transferred":
            if view.abandon_pending == 1:
                await self._forward_abandon(cid, target)
            return None
        if view.state != "transferring":
            return None
        log.info("recovering transfer %s/%d to %s (%s)", cid, no, target, view.transfer_phase)
        if view.transfer_phase == "committing":
            return await self._commit(cid, no, target)
        # The begin may be recent (it was journaled just before a crash): the reservation
        # may live up to TTL after it; count from now, which is later.
        return await self._abort_unknown(cid, no, target, time.monotonic() + self.ttl_s + self.margin_s)
