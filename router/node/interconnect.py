"""The Interconnect servicer: the target side of transfers between sites, and the
operator entry points (TransferCall, DrainSite) that start them on the origin side.

Each target RPC is one engine command (``transfer_reserve`` / ``transfer_commit`` /
``transfer_cancel``, see :mod:`router.engine.transfer`) through ``node.execute``, so the
answer leaves only once the decision is durable. GetTransfer first applies a ``tick``
(journaled when it expires something), so an expired reservation reads as ABORTED only
once that is on disk. Contract and errors: ``proto/router/v1/interconnect.proto``.
"""

from __future__ import annotations

import math

from router.model import RoutingError, TransferView
from router.node import convert
from router.node.errors import guard
from router.node.transfer import fault
from router.security.authz import caller
from router.v1 import interconnect_pb2 as pb
from router.v1 import interconnect_pb2_grpc

_STATES = {
    "unknown": pb.TRANSFER_STATE_UNKNOWN,
    "reserved": pb.TRANSFER_STATE_RESERVED,
    "committed": pb.TRANSFER_STATE_COMMITTED,
    "aborted": pb.TRANSFER_STATE_ABORTED,
}
_OUTCOMES = {"committed": pb.TRANSFER_STATE_COMMITTED, "aborted": pb.TRANSFER_STATE_ABORTED}
DEFAULT_TRANSFER_TIMEOUT_S = 30.0
DEFAULT_DRAIN_TIMEOUT_S = 60.0


def status_msg(v: TransferView) -> pb.TransferStatus:
    return pb.TransferStatus(
        call_id=v.call_id, transfer_no=v.transfer_no, state=_STATES[v.state], reason=v.reason,
        site=v.site, queue=v.queue, expires_at=v.expires_at,
    )  # fmt: skip


def _timeout(value: float, default: float) -> float:
    if not math.isfinite(value) or value <= 0:
        return default
    return min(value, 3600.0)


class InterconnectService(interconnect_pb2_grpc.InterconnectServicer):
    def __init__(self, node) -> None:
        self.node = node

    def _as_origin(self, origin: str, call_id: str = "", transfer_no: int = 0) -> None:
        """Over mTLS a site acts in the transfer protocol only as itself: the origin it
        names (or, for a commit, the origin that made the reservation) must be its own
        identity. PERMISSION_DENIED ORIGIN_MISMATCH otherwise; nothing changes."""
        who = caller()
        if who is None or who.spiffe is None or who.spiffe.kind != "site":
            return  # plaintext node, or an operator reading
        if not origin and call_id:
            origin = self.node.engine.transfer(call_id, transfer_no).origin
        if origin and origin != who.spiffe.name:
            raise RoutingError("PERMISSION_DENIED", "ORIGIN_MISMATCH",
                               f"{who.identity} may not act for origin site {origin!r}", origin=origin)

    def _refuse_if_draining(self) -> None:
        if self.node.draining:
            raise RoutingError("UNAVAILABLE", "NODE_DRAINING", "this node is draining: it takes no transfer")

    @guard
    async def ProposeTransfer(self, request, context):
        self._as_origin(request.origin_site)
        self._refuse_if_draining()
        c = request.call
        ctx = c.context
        cmd = {
            "op": "transfer_reserve", "t": self.node.now(), "call_id": request.call_id,
            "transfer_no": request.transfer_no, "origin": request.origin_site,
            "channel": convert.channel_str(c.channel), "skill": c.skill, "language": c.language,
            "caller": c.caller, "customer_id": c.customer_id,
            "priority_class": convert.priority_str(c.priority_class), "offered_at": c.offered_at,
            "context": {
                "ivr_path": list(ctx.ivr_path), "bot_transcript": ctx.bot_transcript,
                "attributes": dict(ctx.attributes),
            },
            "ttl_s": request.ttl_s if math.isfinite(request.ttl_s) else -1.0,
        }  # fmt: skip
        view = await self.node.execute(cmd)
        if view.state == "reserved":
            fault("after_reserve")
        return pb.ProposeTransferResponse(transfer=status_msg(view))

    @guard
    async def CommitTransfer(self, request, context):
        self._as_origin("", request.call_id, request.transfer_no)
        view = await self.node.execute({
            "op": "transfer_commit", "t": self.node.now(),
            "call_id": request.call_id, "transfer_no": request.transfer_no,
        })  # fmt: skip
        if view.state == "committed":
            fault("after_commit")
        return pb.CommitTransferResponse(transfer=status_msg(view))

    @guard
    async def AbortTransfer(self, request, context):
        self._as_origin(request.origin_site or "", request.call_id, request.transfer_no)
        view = await self.node.execute({
            "op": "transfer_cancel", "t": self.node.now(), "call_id": request.call_id,
            "transfer_no": request.transfer_no, "origin": request.origin_site,
        })  # fmt: skip
        fault("after_abort")
        return pb.AbortTransferResponse(transfer=status_msg(view))

    @guard
    async def GetTransfer(self, request, context):
        node = self.node
        await node.execute({"op": "tick", "t": node.now()})
        if not request.call_id or request.transfer_no == 0:
            raise RoutingError("INVALID_ARGUMENT", "MISSING_FIELD", "call_id and transfer_no are required")
        view = node.engine.transfer(request.call_id, request.transfer_no)
        await node.barrier()
        return pb.GetTransferResponse(transfer=status_msg(view))

    @guard
    async def TransferCall(self, request, context):
        node = self.node
        if not request.target:
            raise RoutingError("INVALID_ARGUMENT", "MISSING_FIELD", "target is required", field="target")
        out = await node.transfers.transfer(
            request.call_id, request.target, _timeout(request.timeout_s, DEFAULT_TRANSFER_TIMEOUT_S)
        )
        msg = pb.TransferCallResponse(
            outcome=_OUTCOMES.get(out.state, pb.TRANSFER_STATE_UNKNOWN), reason=out.reason,
            transfer_no=out.transfer_no, target_site=out.target_site,
            call=convert.call_msg(node.engine.call(request.call_id)),
        )  # fmt: skip
        await node.barrier()
        return msg

    @guard
    async def DrainSite(self, request, context):
        res = await self.node.transfers.drain(
            list(request.targets), _timeout(request.timeout_s, DEFAULT_DRAIN_TIMEOUT_S)
        )
        return pb.DrainSiteResponse(moved=res.moved, remaining=res.remaining, declined=res.declined)
