"""The partner API end to end (issue 11): real etcd, real node processes, and a gateway
that speaks the partner protocol over real gRPC (written here with the generated stubs, so
each test decides exactly when the gateway answers, stays silent or dies).

``alpha`` and ``beta`` are in-house sites with no agent signed in: every call they queue
waits, and the policy sends 100 % of their queues to the partner ``blueline`` (a split to
the partner), whose contract (in etcd) caps it at ``CAP`` concurrent calls for the whole
cluster.

Checked: offers carry only the contract's fields (a caller token that is the same for the
same caller from either origin); accept -> assigned (origin TRANSFERRED to
partner:blueline), the outcome is idempotent and a different one is DISPOSITION_CONFLICT;
a decline, a timeout and a dead gateway put the call back in its place (original arrival
and class); both origins together never have more than CAP calls with the partner, also
across a restart of an origin; an invalid contract in etcd is ignored (the previous one
stays) and refused by the writer; hand-back re-queues the call; and the SIGKILL matrix:
the origin killed after each step of an offer, or the gateway dying, leaves exactly one
owner of every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import grpc
import pytest
import yaml

from node_fixtures import Stubs, error_reason, node_process, site_dict, start_node_process
from test_cluster import node_env, observer, offer, until
from router.contracts import contract_json, parse_contract
from router.coord.base import CoordinationUnavailable
from router.coord.keys import Keys
from router.coord.partners import ContractRejected, PartnerBook
from router.v1 import admin_pb2
from router.v1 import partner_pb2 as pb
from router.v1 import partner_pb2_grpc
from router.v1 import types_pb2 as t

CAP = 2
PARTNER = "blueline"

CONTRACT = {
    "partner": PARTNER,
    "skills": ["billing", "support"],
    "caps": {"concurrent": CAP, "per_second": 50, "per_hour": 10000, "per_day": 100000},
    "value_tiers": ["low", "standard"],
    "offer_timeout_s": 2.0,
    "price": {"currency": "USD", "per_contact": 1.0, "per_handled_minute": 0.5},
    "sla": {"threshold_s": 20, "target": 0.8, "credit_per_point": 1.0},
    "scopes": {"caller": "token", "profile": "none", "transcript": False, "ivr_path": False,
               "recording": "paused"},
}
POLICY = {"max_peer_age_s": 3.0, "default": {"split": {"percent": 100, "to": [PARTNER]}}}


def contract(**over) -> str:
    return contract_json(parse_contract(json.dumps({**CONTRACT, **over})))


class Gateway:
    """One partner gateway stream to one node (the test drives every answer)."""

    def __init__(self, address: str, partner: str = PARTNER, free: int = 5) -> None:
        self.address, self.partner, self.free = address, partner, free
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = partner_pb2_grpc.PartnerStub(self.channel)
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.received: list[pb.PartnerNodeMessage] = []
        self._out: asyncio.Queue = asyncio.Queue()
        self._call = None
        self._reader: asyncio.Task | None = None

    def hello(self) -> pb.PartnerGatewayMessage:
        return pb.PartnerGatewayMessage(hello=pb.PartnerHello(
            gateway="test", partner=self.partner,
            availability=pb.PartnerAvailability(free_agents={"billing": self.free, "support": self.free},
                                                expected_wait_s={"billing": 0.0, "support": 0.0})))

    async def _requests(self):
        yield self.hello()
        while True:
            m = await self._out.get()
            if m is None:
                return
            yield m

    async def open(self) -> pb.PartnerWelcome:
        self._call = self.stub.Connect(self._requests())
        self._reader = asyncio.create_task(self._read())
        m = await self.next("welcome")
        return m.welcome

    async def _read(self) -> None:
        try:
            async for m in self._call:
                self.received.append(m)
                await self.inbox.put(m)
        except grpc.RpcError as e:
            await self.inbox.put(e)
        await self.inbox.put(None)

    async def next(self, kind: str | None = None, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while True:
            m = await asyncio.wait_for(self.inbox.get(), max(0.01, deadline - time.monotonic()))
            if m is None or isinstance(m, grpc.RpcError):
                raise AssertionError(f"stream ended while waiting for {kind}: {m}")
            if kind is None or m.WhichOneof("msg") == kind:
                return m

    def accept(self, offer: pb.PartnerOffer, agent: str = "bl-1") -> None:
        self._out.put_nowait(pb.PartnerGatewayMessage(accept=pb.PartnerAccept(
            call_id=offer.call_id, offer_no=offer.offer_no, agent=agent)))

    def decline(self, offer: pb.PartnerOffer, reason: str = "busy") -> None:
        self._out.put_nowait(pb.PartnerGatewayMessage(decline=pb.PartnerDecline(
            call_id=offer.call_id, offer_no=offer.offer_no, reason=reason)))

    async def report(self, call_id: str, **kw) -> pb.ReportOutcomeResponse:
        req = pb.ReportOutcomeRequest(call_id=call_id, partner=self.partner, answered_at=kw.pop("answered_at", time.time()),
                                      talk_s=kw.pop("talk_s", 60.0), wrap_s=kw.pop("wrap_s", 10.0),
                                      disposition=kw.pop("disposition", "DONE"), resolved=True, csat=kw.pop("csat", 4))
        return await self.stub.ReportOutcome(req, timeout=5)

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        await self.channel.close()


def write_sites(directory: Path) -> dict[str, Path]:
    out = {}
    for name in ("alpha", "beta"):
        d = site_dict()
        d["site"]["name"] = name
        p = directory / f"{name}.yaml"
        p.write_text(yaml.safe_dump(d))
        out[name] = p
    return out


async def state_of(stubs: Stubs, cid: str):
    from router.v1 import routing_pb2

    return (await stubs.routing.GetCall(routing_pb2.GetCallRequest(call_id=cid), timeout=5)).call


async def retried(fn, tries: int = 6):
    """The observer's etcd operations, retried: its link (1 s operation timeout) is reset
    when etcd is slow to answer while node processes start on a loaded machine."""
    for i in range(tries):
        try:
            return await fn()
        except CoordinationUnavailable:
            if i == tries - 1:
                raise
            await asyncio.sleep(0.3)


async def slots(obs, prefix: str) -> list[dict]:
    k = Keys(prefix).partner_slots(PARTNER).encode()
    rng = await retried(lambda: obs.link.run("test slots", lambda c: c.get_prefix(k)))
    return [json.loads(kv.value) for kv in rng]


@contextlib.asynccontextmanager
async def setup(tmp_path: Path, etcd, prefix: str, *, fault: dict[str, str] | None = None):
    async with observer(etcd.endpoints, prefix) as obs:
        await retried(lambda: obs.put_policy(POLICY))
        await retried(lambda: obs.put_document(Keys(prefix).partner_contract(PARTNER), contract()))
        files = write_sites(tmp_path)
        env = node_env(etcd.endpoints, prefix)
        fault = fault or {}
        with node_process(files["alpha"], tmp_path / "alpha", sync="none", env={**env, **fault.get("alpha", {})}) as a, \
                node_process(files["beta"], tmp_path / "beta", sync="none", env=env) as b:
            yield obs, files, env, a, b


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def welcome(address: str, **kw) -> tuple[Gateway, pb.PartnerWelcome]:
    """Connect once the node has read the contract (NO_CONTRACT until then)."""
    deadline = time.monotonic() + 10
    while True:
        gw = Gateway(address, **kw)
        try:
            return gw, await gw.open()
        except AssertionError:
            await gw.close()
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_offers_carry_only_the_contract_and_caps_hold_for_the_whole_cluster(etcd, etcd_prefix, tmp_path):
    async with setup(tmp_path, etcd, etcd_prefix) as (obs, files, env, alpha, beta):
        sa, sb = Stubs.connect(alpha.address), Stubs.connect(beta.address)
        ga, w = await welcome(alpha.address)
        gb, _ = await welcome(beta.address)
        assert (w.partner, w.site, w.offer_timeout_s) == (PARTNER, "alpha", 2.0)
        try:
            ids_a = [f"pa-{i}" for i in range(4)]
            ids_b = [f"pb-{i}" for i in range(4)]
            same_caller = "+33612345678"
            for cid in ids_a + ids_b:
                r = offer(cid)
                if cid in ("pa-0", "pb-0"):
                    r.caller = same_caller
                await (sa if cid.startswith("pa") else sb).routing.OfferCall(r, timeout=5)
            # The gateway accepts everything; the caps let only CAP calls out at a time.
            owned: dict[str, pb.PartnerOffer] = {}
            offers: list[pb.PartnerOffer] = []

            async def take(gw: Gateway, n: int, timeout: float = 10.0):
                for _ in range(n):
                    m = await gw.next("offer", timeout)
                    offers.append(m.offer)
                    gw.accept(m.offer)
                    a = await gw.next("assign")
                    owned[a.assign.offer.call_id] = a.assign.offer

            deadline = time.monotonic() + 15
            while len(owned) < CAP and time.monotonic() < deadline:
                for gw in (ga, gb):
                    with contextlib.suppress(asyncio.TimeoutError):
                        await take(gw, 1, timeout=0.5)
            assert len(owned) == CAP
            assert len(await slots(obs, etcd_prefix)) == CAP
            # No more offers while CAP calls are with the partner (from either origin).
            for gw in (ga, gb):
                with pytest.raises(asyncio.TimeoutError):
                    await gw.next("offer", timeout=1.5)
            # Data minimization: the contract's scopes (caller token only).
            for o in offers:
                d = {f.name for f, v in o.ListFields()}
                assert d <= {"call_id", "offer_no", "skill", "channel", "language", "value_tier", "wait_s",
                             "timeout_s", "caller_token"}, d
                assert "+336" not in str(o)
            # The outcome frees a slot: another offer comes; the report is idempotent.
            done = next(iter(owned))
            gw_of = ga if done.startswith("pa") else gb
            r1 = await gw_of.report(done, answered_at=1000.0, csat=5)
            r2 = await gw_of.report(done, answered_at=1000.0, csat=5)
            assert (r1.duplicate, r2.duplicate) == (False, True)
            with pytest.raises(grpc.RpcError) as ei:
                await gw_of.report(done, answered_at=1000.0, csat=1)
            assert ei.value.code() == grpc.StatusCode.ALREADY_EXISTS and error_reason(ei.value) == "DISPOSITION_CONFLICT"
            call = await state_of(sa if done.startswith("pa") else sb, done)
            assert call.state == t.CALL_STATE_TRANSFERRED and call.answered_at == 1000.0
            assert call.transfer_target == "partner:blueline", call.transfer_target
            listed = await (sa if done.startswith("pa") else sb).admin.ListCalls(
                admin_pb2.ListCallsRequest(state=t.CALL_STATE_TRANSFERRED), timeout=5)
            assert [c.transfer_target_site for c in listed.calls if c.call_id == done] == [PARTNER]
            await until(lambda: len(owned) < CAP + 1 and True, 1, "")
            got_more = False
            deadline = time.monotonic() + 10
            while not got_more and time.monotonic() < deadline:
                for gw in (ga, gb):
                    with contextlib.suppress(asyncio.TimeoutError):
                        await take(gw, 1, timeout=0.5)
                        got_more = True
                        break
            assert got_more and len(owned) == CAP + 1
            # Same caller, either origin: the same token (one key per partner, in etcd).
            tokens = {o.call_id: o.caller_token for o in offers}
            if "pa-0" in tokens and "pb-0" in tokens:
                assert tokens["pa-0"] == tokens["pb-0"] != ""
            # Another partner's name on a report: not found, and nothing said about the call.
            other = Gateway(alpha.address, partner="other")
            with pytest.raises(grpc.RpcError) as ei:
                await other.report(next(c for c in owned if c.startswith("pa")))
            assert error_reason(ei.value) == "CALL_NOT_FOUND"
            await other.close()
        finally:
            for gw in (ga, gb):
                await gw.close()
            await sa.channel.close()
            await sb.channel.close()


async def test_decline_timeout_and_a_dead_gateway_put_the_call_back(etcd, etcd_prefix, tmp_path):
    async with setup(tmp_path, etcd, etcd_prefix) as (obs, files, env, alpha, beta):
        sa = Stubs.connect(alpha.address)
        gw, _ = await welcome(alpha.address)
        try:
            await sa.routing.OfferCall(offer("d-1"), timeout=5)
            before = await state_of(sa, "d-1")
            m = await gw.next("offer")
            gw.decline(m.offer, "no agent")
            await until(lambda: True, 0.1, "")
            # declined: back in place, then offered again (a later attempt, new offer_no)
            m2 = await gw.next("offer", timeout=10)
            assert m2.offer.call_id == "d-1" and m2.offer.offer_no == m.offer.offer_no + 1
            # silence: timeout -> Withdraw, back in place
            w = await gw.next("withdraw", timeout=5)
            assert (w.withdraw.call_id, w.withdraw.reason) == ("d-1", "timeout")
            # a late accept is answered with a Withdraw and assigns nothing
            gw.accept(m2.offer)
            w2 = await gw.next("withdraw", timeout=5)
            assert w2.withdraw.offer_no == m2.offer.offer_no
            m3 = await gw.next("offer", timeout=10)
            await gw.close()  # the gateway dies with an offer open
            await asyncio.sleep(0.5)
            call = await state_of(sa, "d-1")
            assert call.state == t.CALL_STATE_QUEUED
            assert (call.offered_at, call.priority_class) == (before.offered_at, before.priority_class)
            assert call.transfer_count >= m3.offer.offer_no
            assert call.transfer_target == "" and call.transfer_origin == ""  # the aborted hand-over left none
            await until(lambda: True, 0.1, "")
            assert len(await slots(obs, etcd_prefix)) == 0
        finally:
            await gw.close()
            await sa.channel.close()


async def test_contracts_are_validated_and_hot_reloaded(etcd, etcd_prefix, tmp_path):
    async with setup(tmp_path, etcd, etcd_prefix) as (obs, files, env, alpha, beta):
        book = PartnerBook.__new__(PartnerBook)  # only its writer: no watches needed
        book.coord, book.keys, book.site = obs, Keys(etcd_prefix), "observer"
        with pytest.raises(ContractRejected) as ei:
            await book.put_contract(json.dumps({**CONTRACT, "value_tiers": ["high"]}))
        assert "high" in str(ei.value)
        raw = etcd.etcdctl("get", Keys(etcd_prefix).partner_contract(PARTNER), "--print-value-only")
        assert json.loads(raw)["value_tiers"] == ["low", "standard"]
        # a bad value written behind the validator's back: the previous contract stays
        await retried(lambda: obs.put_document(Keys(etcd_prefix).partner_contract(PARTNER),
                                               '{"partner": "blueline", "caps": {"concurrent": 0}}'))
        await until(lambda: "ignoring the stored contract of blueline" in alpha.log(), 10, "alpha to refuse it")
        gw, w = await welcome(alpha.address)
        assert w.offer_timeout_s == 2.0
        await gw.close()
        # a valid change is in force at once (hot reload)
        await retried(lambda: book.put_contract(contract(offer_timeout_s=3.5)))
        deadline = time.monotonic() + 10
        while True:
            gw, w = await welcome(alpha.address)
            await gw.close()
            if w.offer_timeout_s == 3.5 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert w.offer_timeout_s == 3.5
        # no contract: the gateway is refused
        other = Gateway(alpha.address, partner="nobody")
        with pytest.raises(AssertionError, match="NO_CONTRACT|FAILED_PRECONDITION"):
            await other.open()
        await other.close()


async def test_hand_back_requeues_in_place(etcd, etcd_prefix, tmp_path):
    async with setup(tmp_path, etcd, etcd_prefix) as (obs, files, env, alpha, beta):
        sa = Stubs.connect(alpha.address)
        gw, _ = await welcome(alpha.address)
        try:
            await sa.routing.OfferCall(offer("h-1"), timeout=5)
            before = await state_of(sa, "h-1")
            m = await gw.next("offer")
            gw.accept(m.offer)
            await gw.next("assign")
            r = await gw.stub.HandBack(pb.HandBackRequest(call_id="h-1", partner=PARTNER, reason="needs French"),
                                       timeout=5)
            assert r.queue == before.queue
            call = await state_of(sa, "h-1")
            assert call.state in (t.CALL_STATE_QUEUED, t.CALL_STATE_TRANSFERRING)
            assert call.offered_at == before.offered_at
            with pytest.raises(grpc.RpcError) as ei:
                await gw.report("h-1")
            assert error_reason(ei.value) in ("WRONG_STATE", "CALL_NOT_FOUND")
        finally:
            await gw.close()
            await sa.channel.close()


ORIGIN_STEPS = ["after_begin", "after_offer_sent", "after_accept", "after_assign", "after_assign_sent"]


@pytest.mark.parametrize("step", ORIGIN_STEPS)
async def test_origin_sigkilled_at_each_step_leaves_one_owner(etcd, etcd_prefix, tmp_path, step):
    """The origin dies right after ``step`` of an offer; restarted, it and the gateway
    agree on one owner: the partner (an Assign arrives on reconnect) exactly when the
    assignment was journaled, the origin (the call queued in its old place) otherwise."""
    fault = {"alpha": {"TANDEM_FAULT": f"partner:{step}"}}
    async with setup(tmp_path, etcd, etcd_prefix, fault=fault) as (obs, files, env, alpha, beta):
        sa = Stubs.connect(alpha.address)
        gw, _ = await welcome(alpha.address)
        try:
            await sa.routing.OfferCall(offer("k-1"), timeout=5)
            before = await state_of(sa, "k-1")
            with contextlib.suppress(AssertionError, asyncio.TimeoutError):
                m = await gw.next("offer", timeout=10)
                gw.accept(m.offer)
                await gw.next("assign", timeout=5)
            await until(lambda: not alpha.alive(), 15, f"alpha to die {step}")
            await gw.close()
            await sa.channel.close()
            again = start_node_process(files["alpha"], tmp_path / "alpha", sync="none", env=env)
            try:
                sa = Stubs.connect(again.address)
                gw, _ = await welcome(again.address, free=0)  # no free agent: no new offer
                assigned = step in ("after_assign", "after_assign_sent")
                if assigned:
                    a = await gw.next("assign", timeout=10)
                    assert a.assign.offer.call_id == "k-1"
                    call = await state_of(sa, "k-1")
                    assert call.state == t.CALL_STATE_TRANSFERRED
                    await until(lambda: True, 0.1, "")
                    held = await slots(obs, etcd_prefix)
                    assert [h["call_id"] for h in held] == ["k-1"]
                else:
                    async def back():
                        c = await state_of(sa, "k-1")
                        return c if c.state == t.CALL_STATE_QUEUED else None

                    deadline = time.monotonic() + 15
                    call = None
                    while call is None and time.monotonic() < deadline:
                        call = await back()
                        await asyncio.sleep(0.1)
                    assert call is not None, "the call did not come back to the origin"
                    assert (call.offered_at, call.priority_class) == (before.offered_at, before.priority_class)
                    with pytest.raises(asyncio.TimeoutError):
                        await gw.next("assign", timeout=1.0)
                    deadline = time.monotonic() + 15
                    while await slots(obs, etcd_prefix) and time.monotonic() < deadline:
                        await asyncio.sleep(0.2)
                    assert await slots(obs, etcd_prefix) == []
            finally:
                await gw.close()
                await sa.channel.close()
                again.kill()
        finally:
            await gw.close()


async def test_outcome_reported_as_the_origin_dies_is_kept_once(etcd, etcd_prefix, tmp_path):
    fault = {"alpha": {"TANDEM_FAULT": "partner:after_outcome"}}
    async with setup(tmp_path, etcd, etcd_prefix, fault=fault) as (obs, files, env, alpha, beta):
        sa = Stubs.connect(alpha.address)
        gw, _ = await welcome(alpha.address)
        await sa.routing.OfferCall(offer("o-1"), timeout=5)
        m = await gw.next("offer")
        gw.accept(m.offer)
        await gw.next("assign")
        with pytest.raises(grpc.RpcError):
            await gw.report("o-1", answered_at=1234.0)
        await gw.close()
        await sa.channel.close()
        again = start_node_process(files["alpha"], tmp_path / "alpha", sync="none", env=env)
        try:
            sa = Stubs.connect(again.address)
            gw, _ = await welcome(again.address, free=0)
            # journaled before the crash: no Assign again; the retried report is a duplicate
            with pytest.raises(asyncio.TimeoutError):
                await gw.next("assign", timeout=1.0)
            r = await gw.report("o-1", answered_at=1234.0)
            assert r.duplicate
            call = await state_of(sa, "o-1")
            assert call.answered_at == 1234.0
            deadline = time.monotonic() + 15
            while await slots(obs, etcd_prefix) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert await slots(obs, etcd_prefix) == []
        finally:
            await gw.close()
            await sa.channel.close()
            again.kill()


async def test_caps_hold_for_several_origins_while_one_restarts(etcd, etcd_prefix, tmp_path):
    """CAP calls are with the partner, from both origins; alpha is SIGKILLed and comes
    back. Its call stays the partner's and keeps its slot (slots are not on a lease), so
    beta, which keeps offering, gets no room meanwhile; the outcome reported to the
    restarted alpha frees the slot and beta's next call goes out."""
    async with setup(tmp_path, etcd, etcd_prefix) as (obs, files, env, alpha, beta):
        sa, sb = Stubs.connect(alpha.address), Stubs.connect(beta.address)
        ga, _ = await welcome(alpha.address)
        gb, _ = await welcome(beta.address)
        try:
            await sa.routing.OfferCall(offer("r-a1"), timeout=5)
            m = await ga.next("offer")
            ga.accept(m.offer)
            await ga.next("assign")
            for i in range(4):
                await sb.routing.OfferCall(offer(f"r-b{i}"), timeout=5)
            m = await gb.next("offer")
            gb.accept(m.offer)
            first_b = (await gb.next("assign")).assign.offer.call_id
            assert sorted(h["call_id"] for h in await slots(obs, etcd_prefix)) == sorted(["r-a1", first_b])
            alpha.kill()
            await ga.close()
            with pytest.raises(asyncio.TimeoutError):  # beta offers nothing: alpha's slot is held
                await gb.next("offer", timeout=3.0)
            again = start_node_process(files["alpha"], tmp_path / "alpha", sync="none", env=env)
            try:
                ga, _ = await welcome(again.address, free=0)
                a = await ga.next("assign", timeout=10)  # still the partner's
                assert a.assign.offer.call_id == "r-a1"
                await asyncio.sleep(1.0)  # alpha's reconciliation keeps the slot of a call still out
                assert "r-a1" in [h["call_id"] for h in await slots(obs, etcd_prefix)]
                with pytest.raises(asyncio.TimeoutError):
                    await gb.next("offer", timeout=1.0)
                await ga.report("r-a1")
                m = await gb.next("offer", timeout=10)  # room again, for beta
                assert m.offer.call_id.startswith("r-b")
            finally:
                await ga.close()
                again.kill()
        finally:
            await gb.close()
            await sa.channel.close()
            await sb.channel.close()


async def test_a_new_stream_replaces_a_hung_one_and_a_stop_ends_it_draining(etcd, etcd_prefix, tmp_path):
    """A gateway that reconnects while its old stream still looks open (it died without
    closing it) is served at once; the old stream's open offer goes back in place and is
    offered again on the new stream. A node that stops (SIGTERM) ends the stream with
    UNAVAILABLE NODE_DRAINING — the gateway's cue to use another node — not with the
    server's grace."""
    async with setup(tmp_path, etcd, etcd_prefix) as (obs, files, env, alpha, beta):
        sa = Stubs.connect(alpha.address)
        old, _ = await welcome(alpha.address)
        try:
            await sa.routing.OfferCall(offer("n-1"), timeout=5)
            m = await old.next("offer")
            new, w = await welcome(alpha.address)  # the old one never answered nor closed
            try:
                m2 = await new.next("offer", timeout=10)
                assert m2.offer.call_id == "n-1" and m2.offer.offer_no == m.offer.offer_no + 1
                new.accept(m2.offer)
                assert (await new.next("assign")).assign.offer.call_id == "n-1"
                with pytest.raises(AssertionError, match="stream ended"):
                    await old.next("offer", timeout=5)
                t0 = time.monotonic()
                assert await asyncio.to_thread(alpha.terminate) == 0
                ended = await asyncio.wait_for(new.inbox.get(), 5)
                while isinstance(ended, pb.PartnerNodeMessage):
                    ended = await asyncio.wait_for(new.inbox.get(), 5)
                assert isinstance(ended, grpc.aio.AioRpcError), ended
                assert (ended.code(), error_reason(ended)) == (grpc.StatusCode.UNAVAILABLE, "NODE_DRAINING"), ended
                assert time.monotonic() - t0 < 10
            finally:
                await new.close()
        finally:
            await old.close()
            await sa.channel.close()


async def test_etcd_unreachable_means_no_offer_to_partners(own_etcd, etcd_prefix, tmp_path):
    """Invariant 6 for partners: the cluster-wide caps live in etcd, so with etcd frozen no
    slot can be taken and nothing is offered; the call keeps its place and is offered once
    etcd answers again."""
    import signal

    async with setup(tmp_path, own_etcd, etcd_prefix) as (obs, files, env, alpha, beta):
        sa = Stubs.connect(alpha.address)
        gw, _ = await welcome(alpha.address)
        try:
            own_etcd.proc.send_signal(signal.SIGSTOP)
            try:
                await sa.routing.OfferCall(offer("e6-1"), timeout=5)
                before = await state_of(sa, "e6-1")
                with pytest.raises(asyncio.TimeoutError):
                    m = await gw.next("offer", timeout=6)
                    raise AssertionError(f"offered with etcd frozen: {m}")
                call = await state_of(sa, "e6-1")
                assert call.state == t.CALL_STATE_QUEUED
                assert (call.offered_at, call.priority_class) == (before.offered_at, before.priority_class)
                assert not [m for m in gw.received if m.WhichOneof("msg") in ("offer", "assign")]
            finally:
                own_etcd.proc.send_signal(signal.SIGCONT)
            m = await gw.next("offer", timeout=30)
            assert m.offer.call_id == "e6-1"
        finally:
            await gw.close()
            await sa.channel.close()
