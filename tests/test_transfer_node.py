"""Transfers between two in-process nodes over gRPC: node.transfer, the Interconnect
RPCs (idempotency, declines, errors), context to the agent, abandon forwarding, and
drain."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from node_fixtures import AgentSession, error_reason, running_node
from router.v1 import admin_pb2, agents_pb2, interconnect_pb2 as pb, routing_pb2, types_pb2
from transfer_fixtures import interconnect, list_calls, named_site, offer_req, reconcile, state, wait_for


@contextlib.asynccontextmanager
async def pair(tmp_path, target_site=None):
    async with running_node(named_site("origin"), tmp_path / "o") as o:
        async with running_node(target_site or named_site("target"), tmp_path / "t") as t:
            o.node.transfers.ttl_s, o.node.transfers.margin_s = 2.0, 0.5
            yield o, t


async def test_transfer_keeps_arrival_class_and_context(tmp_path):
    async with pair(tmp_path) as (o, t):
        ctx = types_pb2.CallContext(ivr_path=["menu", "billing"], bot_transcript="wants a refund", attributes={"order": "42"})
        await t.stubs.routing.OfferCall(offer_req("t-early"))
        await o.stubs.routing.OfferCall(offer_req("vip", caller="+33600000001", context=ctx))
        await o.stubs.routing.OfferCall(offer_req("std"))
        await o.stubs.routing.OfferCall(offer_req("std2"))
        await asyncio.sleep(0.01)
        await t.stubs.routing.OfferCall(offer_req("t-late"))
        out = await o.node.transfer("std", t.address)
        assert (out.state, out.transfer_no, out.target_site) == ("committed", 1, "target")
        r = await interconnect(o.stubs).TransferCall(pb.TransferCallRequest(call_id="vip", target=t.address))
        assert r.outcome == pb.TRANSFER_STATE_COMMITTED and state(r.call) == "transferred"
        at_t = await list_calls(t.stubs)
        assert state(at_t["std"]) == "queued" and state(at_t["vip"]) == "queued"
        pos = {cid: (await t.stubs.routing.GetCall(routing_pb2.GetCallRequest(call_id=cid))).position
               for cid in ("vip", "t-early", "std", "t-late")}
        assert pos == {"vip": 1, "t-early": 2, "std": 3, "t-late": 4}
        owner = await reconcile(o.stubs, t.stubs, ["vip", "std", "std2"])
        assert owner == {"vip": "target", "std": "target", "std2": "origin"}
        # an agent at the target gets the VIP first, with its context and class
        await t.stubs.agents.SignIn(agents_pb2.SignInRequest(agent_id="fr-001"))
        s = await AgentSession(t.stubs, "fr-001").hello()
        await t.stubs.agents.SetState(agents_pb2.SetStateRequest(agent_id="fr-001", state=types_pb2.AGENT_STATE_READY))
        a = await s.next("assignment")
        assert a.call.call_id == "vip" and a.call.context == ctx
        assert a.call.priority_class == types_pb2.PRIORITY_CLASS_VIP and a.call.transfer_count == 1
        s.cancel()
        # the origin's status counts it
        st = await o.stubs.admin.GetStatus(admin_pb2.GetStatusRequest())
        assert st.calls_by_state["transferred"] == 2


async def test_interconnect_rpcs_are_idempotent(tmp_path):
    async with pair(tmp_path) as (o, t):
        ic = interconnect(t.stubs)
        call = pb.TransferredCall(channel=types_pb2.CHANNEL_VOICE, skill="billing", language="fr",
                                  priority_class=types_pb2.PRIORITY_CLASS_STANDARD, offered_at=1000.0)
        prop = pb.ProposeTransferRequest(call_id="x1", transfer_no=1, origin_site="origin", call=call, ttl_s=5)
        r1 = await ic.ProposeTransfer(prop)
        r2 = await ic.ProposeTransfer(prop)
        assert r1.transfer.state == r2.transfer.state == pb.TRANSFER_STATE_RESERVED
        assert r1.transfer.site == "target" and r1.transfer.queue == "billing-fr-voice"
        g = await ic.GetTransfer(pb.GetTransferRequest(call_id="x1", transfer_no=1))
        assert g.transfer.state == pb.TRANSFER_STATE_RESERVED
        c1 = await ic.CommitTransfer(pb.CommitTransferRequest(call_id="x1", transfer_no=1))
        c2 = await ic.CommitTransfer(pb.CommitTransferRequest(call_id="x1", transfer_no=1))
        assert c1.transfer.state == c2.transfer.state == pb.TRANSFER_STATE_COMMITTED
        a = await ic.AbortTransfer(pb.AbortTransferRequest(call_id="x1", transfer_no=1))
        assert a.transfer.state == pb.TRANSFER_STATE_COMMITTED
        # abort first: a late propose cannot reserve
        a = await ic.AbortTransfer(pb.AbortTransferRequest(call_id="x2", transfer_no=1, origin_site="origin"))
        assert a.transfer.state == pb.TRANSFER_STATE_ABORTED
        late = await ic.ProposeTransfer(pb.ProposeTransferRequest(call_id="x2", transfer_no=1, origin_site="origin", call=call))
        assert late.transfer.state == pb.TRANSFER_STATE_ABORTED
        g = await ic.GetTransfer(pb.GetTransferRequest(call_id="x3", transfer_no=1))
        assert g.transfer.state == pb.TRANSFER_STATE_UNKNOWN
        # errors
        for req, reason in [
            (pb.ProposeTransferRequest(call_id="x4", transfer_no=1, origin_site="origin",
                                       call=pb.TransferredCall(channel=types_pb2.CHANNEL_VOICE, skill="nope",
                                                               priority_class=1, offered_at=1.0)), "UNKNOWN_SKILL"),
            (pb.ProposeTransferRequest(call_id="x4", transfer_no=0, origin_site="origin", call=call), "INVALID_TRANSFER_NO"),
            (pb.ProposeTransferRequest(call_id="x4", transfer_no=1, call=call), "MISSING_FIELD"),
            (pb.ProposeTransferRequest(call_id="x1", transfer_no=2, origin_site="origin", call=call), "CALL_ID_CONFLICT"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await ic.ProposeTransfer(req)
            assert error_reason(e.value) == reason
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await ic.CommitTransfer(pb.CommitTransferRequest(call_id="x9", transfer_no=1))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and error_reason(e.value) == "TRANSFER_NOT_FOUND"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await interconnect(o.stubs).TransferCall(pb.TransferCallRequest(call_id="nope", target=t.address))
        assert error_reason(e.value) == "CALL_NOT_FOUND"


async def test_reservation_expires_and_never_commits(tmp_path):
    async with pair(tmp_path) as (o, t):
        ic = interconnect(t.stubs)
        call = pb.TransferredCall(channel=types_pb2.CHANNEL_VOICE, skill="billing", language="fr",
                                  priority_class=types_pb2.PRIORITY_CLASS_STANDARD, offered_at=1000.0)
        await ic.ProposeTransfer(pb.ProposeTransferRequest(call_id="e1", transfer_no=1, origin_site="o", call=call, ttl_s=1))
        await asyncio.sleep(1.2)
        g = await ic.GetTransfer(pb.GetTransferRequest(call_id="e1", transfer_no=1))
        assert g.transfer.state == pb.TRANSFER_STATE_ABORTED and g.transfer.reason == "expired"
        c = await ic.CommitTransfer(pb.CommitTransferRequest(call_id="e1", transfer_no=1))
        assert c.transfer.state == pb.TRANSFER_STATE_ABORTED
        assert "e1" not in await list_calls(t.stubs)


async def test_declined_or_unreachable_transfer_puts_the_call_back_in_place(tmp_path):
    target_site = named_site("target")
    target_site.queues[:] = [q for q in target_site.queues if q.skill != "billing"]  # serves no billing
    async with pair(tmp_path, target_site) as (o, t):
        for cid in ("a", "b", "c"):
            await o.stubs.routing.OfferCall(offer_req(cid))
        out = await o.node.transfer("b", t.address)
        assert (out.state, out.reason) == ("aborted", "UNKNOWN_SKILL")
        pos = (await o.stubs.routing.GetCall(routing_pb2.GetCallRequest(call_id="b"))).position
        assert pos == 2
        # nobody listens there: the origin tries AbortTransfer until TTL + margin, then aborts
        out = await o.node.transfer("b", "127.0.0.1:9")
        assert (out.state, out.reason, out.transfer_no) == ("aborted", "unreachable", 2)
        got = await o.stubs.routing.GetCall(routing_pb2.GetCallRequest(call_id="b"))
        assert got.position == 2 and state(got.call) == "queued" and got.call.transfer_count == 2
        from router.model import RoutingError

        with pytest.raises(RoutingError) as e:
            await o.node.transfer("zzz", t.address)
        assert getattr(e.value, "reason", "") == "CALL_NOT_FOUND"


async def test_abandon_of_a_transferred_call_is_forwarded(tmp_path):
    async with pair(tmp_path) as (o, t):
        await o.stubs.routing.OfferCall(offer_req("c1"))
        assert (await o.node.transfer("c1", t.address)).state == "committed"
        r = await o.stubs.routing.AbandonCall(routing_pb2.AbandonCallRequest(call_id="c1", reason="hangup"))
        # forwarded at once: the answer is the call as the target left it
        assert (state(r.call), r.call.site) == ("abandoned", "target")

        async def abandoned_at_target():
            c = (await list_calls(t.stubs))["c1"]
            return state(c) == "abandoned" and c.abandon_reason == "hangup"

        await wait_for(abandoned_at_target, 10, what="abandon forwarded")
        await wait_for(lambda: asyncio.sleep(0, o.node.engine.transfers_pending() == []), 5)


async def test_drain_moves_every_queued_call_and_stops_offers(tmp_path):
    async with pair(tmp_path) as (o, t):
        ids = [f"d{i}" for i in range(12)]
        for cid in ids:
            await o.stubs.routing.OfferCall(offer_req(cid, skill="support", channel=types_pb2.CHANNEL_CHAT, language=""))
        r = await interconnect(o.stubs).DrainSite(pb.DrainSiteRequest(targets=["127.0.0.1:9", t.address]))
        assert (r.moved, r.remaining) == (12, 0)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await o.stubs.routing.OfferCall(offer_req("late"))
        assert error_reason(e.value) == "NODE_DRAINING"
        owner = await reconcile(o.stubs, t.stubs, ids)
        assert set(owner.values()) == {"target"}
        # the order at the target is the arrival order at the origin
        order = t.node.engine.snapshot()["queues"]["support-chat"]["order"]
        assert order == ids
