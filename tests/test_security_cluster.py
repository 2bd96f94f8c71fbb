"""Issue 8 on a real cluster: two ``tandem node`` processes (lyon, montreal) serving mTLS
with ``--tls-dir``, members of one cluster through the real etcd (plaintext etcd on
loopback), talking to each other over mTLS with their site identities.

* an operator's TransferCall moves a queued call from lyon to montreal's advertised
  address: committed, and queued at montreal exactly once;
* a target that is no member's address is refused (UNKNOWN_TARGET);
* a site identity bound as ``site`` that is not a current member may not use the
  transfer protocol (NOT_A_MEMBER);
* bindings stored in etcd (``<prefix>security/bindings``) take over without a restart;
  an invalid document leaves the previous one in force.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import grpc
import pytest

from node_fixtures import until
from router.coord import EtcdCoordinator, EtcdSettings
from router.coord.keys import Keys
from router.local.nodes import spawn_node, stop_nodes, wait_listening
from router.security import bindings as bnd
from router.security import pki
from router.security.spiffe import SpiffeId
from router.status import error_info
from router.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    interconnect_pb2,
    interconnect_pb2_grpc,
    routing_pb2,
    routing_pb2_grpc,
)
from router.v1 import types_pb2 as t

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent
SITES = [("lyon", "in_house"), ("montreal", "in_house")]
TTL_S = 2
CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)


def channel(address: str, tls: Path, stem: str, site: str) -> grpc.aio.Channel:
    """mTLS as ``tls/stem``, expecting the server to be site ``site``."""
    cert, key = pki.load_pair(tls, stem)
    creds = grpc.ssl_channel_credentials((tls / "ca.crt").read_bytes(), key, cert)
    name = SpiffeId("tandem", "site", site).dns_name
    return grpc.aio.secure_channel(address, creds,
                                   options=(*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", name)))


def failure(e: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str | None]:
    info = error_info(e)
    return e.code(), info.reason if info is not None else None


class Cluster:
    def __init__(self, tls: Path, nodes: dict, prefix: str, observer: EtcdCoordinator, etcd) -> None:
        self.tls, self.nodes, self.prefix, self.observer, self.etcd = tls, nodes, prefix, observer, etcd
        self.keys = Keys(prefix)
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}

    def channel(self, site: str, stem: str) -> grpc.aio.Channel:
        key = (site, stem)
        if key not in self._channels:
            self._channels[key] = channel(self.nodes[site].address, self.tls, stem, site)
        return self._channels[key]

    def log(self, site: str) -> str:
        return self.nodes[site].log_path.read_text(errors="replace")

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()


@pytest.fixture(scope="module")
async def cluster(etcd, tmp_path_factory):
    root = tmp_path_factory.mktemp("sec-cluster")
    tls = root / "tls"
    pki.init(tls, SITES)
    pki.issue(tls, "site", "paris")  # a site identity of the CA, bound, never a member
    pki.issue(tls, "operator", "watcher")  # bound later, through etcd
    doc = bnd.load_file(tls / "bindings.json")
    paris = bnd.Binding(identity=SpiffeId("tandem", "site", "paris").uri, role="site", sites=("*",))
    (tls / "bindings.json").write_text(bnd.dumps(bnd.Bindings(bindings=(*doc.bindings, paris))))

    prefix = f"/tandem-test/{uuid.uuid4().hex[:12]}/"
    args = ["--tls-dir", str(tls), "--etcd", ",".join(etcd.endpoints), "--etcd-prefix", prefix,
            "--etcd-ttl", str(TTL_S), "--sync", "none"]
    env = dict(os.environ, TANDEM_DRAIN_S="0.2")
    nodes = [spawn_node(ROOT / "sites" / f"{name}.yaml", root / name, extra_args=args, env=env) for name, _ in SITES]
    observer = None
    try:
        wait_listening(nodes, 30)
        observer = EtcdCoordinator("observer", EtcdSettings(endpoints=tuple(etcd.endpoints), prefix=prefix,
                                                            ttl_s=TTL_S, op_timeout_s=1.0))
        await observer.start()
        await observer.wait_ready(10)

        async def both():
            return len(observer.members()) == 2

        await until(both, 15, "lyon and montreal to register")
        c = Cluster(tls, {n.name: n for n in nodes}, prefix, observer, etcd)
        try:
            yield c
        finally:
            await c.close()
    finally:
        if observer is not None:
            await observer.close()
        stop_nodes(nodes, 10)


def offer(call_id: str) -> routing_pb2.OfferCallRequest:
    return routing_pb2.OfferCallRequest(call_id=call_id, skill="billing", channel=t.CHANNEL_VOICE, language="fr",
                                        caller="+33611111111")


async def list_calls(ch: grpc.aio.Channel) -> list:
    r = await admin_pb2_grpc.AdminStub(ch).ListCalls(admin_pb2.ListCallsRequest(page_size=1000), timeout=5)
    assert not r.next_page_token
    return list(r.calls)


async def test_transfer_between_members_over_mtls(cluster):
    members = cluster.observer.members()
    # the advertised addresses in etcd are the ones the nodes said they listen on
    assert {n: m.address for n, m in members.items()} == {n: p.address for n, p in cluster.nodes.items()}
    montreal = members["montreal"].address
    for node in cluster.nodes.values():  # nothing in plaintext: the nodes serve mTLS only
        async with grpc.aio.insecure_channel(node.address, options=CHANNEL_OPTIONS) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await admin_pb2_grpc.AdminStub(ch).GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE

    gw = routing_pb2_grpc.RoutingStub(cluster.channel("lyon", "agents-lyon"))
    r = await gw.OfferCall(offer("mtls-1"), timeout=5)
    assert r.call.state == t.CALL_STATE_QUEUED  # nobody signed in at lyon

    # montreal takes a proposal only from a site its own view holds as a member; that view
    # may trail the observer's by a moment too (a refusal would abort the transfer)
    async def montreal_sees_lyon():
        r = await admin_pb2_grpc.AdminStub(cluster.channel("montreal", "operator-admin")).ListMembers(
            admin_pb2.ListMembersRequest(), timeout=5)
        return "lyon" in {m.site for m in r.members}

    await until(montreal_sees_lyon, 10, "montreal to know lyon as a member", step=0.1)
    ic = interconnect_pb2_grpc.InterconnectStub(cluster.channel("lyon", "operator-admin"))
    req = interconnect_pb2.TransferCallRequest(call_id="mtls-1", target=montreal, timeout_s=10)

    async def transferred():
        try:
            return await ic.TransferCall(req, timeout=15)
        except grpc.aio.AioRpcError as e:
            # lyon's own view of the membership may trail the observer's by a moment
            assert failure(e) == (grpc.StatusCode.FAILED_PRECONDITION, "UNKNOWN_TARGET"), failure(e)
            return None

    out = await until(transferred, 5, "lyon to know montreal as a member", step=0.1)
    # committed: lyon dialed montreal over mTLS as site/lyon (montreal's Interconnect takes
    # only a current member's site identity) and checked it reached site/montreal
    assert out.outcome == interconnect_pb2.TRANSFER_STATE_COMMITTED, out
    assert out.target_site == "montreal" and out.transfer_no == 1
    assert out.call.state == t.CALL_STATE_TRANSFERRED

    at_montreal = [c for c in await list_calls(cluster.channel("montreal", "operator-admin")) if c.call_id == "mtls-1"]
    assert [c.state for c in at_montreal] == [t.CALL_STATE_QUEUED]  # exactly once
    at_lyon = [c for c in await list_calls(cluster.channel("lyon", "operator-admin")) if c.call_id == "mtls-1"]
    assert [c.state for c in at_lyon] == [t.CALL_STATE_TRANSFERRED]


async def test_transfer_to_a_non_member_address_is_refused(cluster):
    gw = routing_pb2_grpc.RoutingStub(cluster.channel("lyon", "agents-lyon"))
    await gw.OfferCall(offer("stay-1"), timeout=5)
    ic = interconnect_pb2_grpc.InterconnectStub(cluster.channel("lyon", "operator-admin"))
    # not a member; lyon's own address (no transfer to itself); a member's host, another port
    montreal_host = cluster.nodes["montreal"].host
    for target in ("127.0.0.1:1", cluster.nodes["lyon"].address, f"{montreal_host}:1"):
        t0 = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await ic.TransferCall(interconnect_pb2.TransferCallRequest(call_id="stay-1", target=target), timeout=5)
        assert failure(e.value) == (grpc.StatusCode.FAILED_PRECONDITION, "UNKNOWN_TARGET"), target
        assert time.perf_counter() - t0 < 1.0
    r = await routing_pb2_grpc.RoutingStub(cluster.channel("lyon", "operator-admin")).GetCall(
        routing_pb2.GetCallRequest(call_id="stay-1"), timeout=5)
    assert r.call.state == t.CALL_STATE_QUEUED


async def test_a_site_that_is_not_a_member_may_not_propose(cluster):
    req = interconnect_pb2.ProposeTransferRequest(
        call_id="paris-1", transfer_no=1, origin_site="paris",
        call=interconnect_pb2.TransferredCall(channel=t.CHANNEL_VOICE, skill="billing", language="fr",
                                              caller="+33622222222", priority_class=t.PRIORITY_CLASS_STANDARD,
                                              offered_at=time.time()))
    paris = interconnect_pb2_grpc.InterconnectStub(cluster.channel("lyon", "site-paris"))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await paris.ProposeTransfer(req, timeout=5)
    assert failure(e.value) == (grpc.StatusCode.PERMISSION_DENIED, "NOT_A_MEMBER")
    # the same identity may still read what its binding allows without membership
    r = await paris.GetTransfer(interconnect_pb2.GetTransferRequest(call_id="paris-1", transfer_no=1), timeout=5)
    assert r.transfer.state == interconnect_pb2.TRANSFER_STATE_UNKNOWN  # nothing was reserved
    # nothing was reserved at lyon for paris' proposal
    calls = await list_calls(cluster.channel("lyon", "operator-admin"))
    assert "paris-1" not in {c.call_id for c in calls}
    # a member with the same request is not refused by the security layer
    montreal = interconnect_pb2_grpc.InterconnectStub(cluster.channel("lyon", "site-montreal"))
    req.origin_site = "montreal"
    req.call_id = "montreal-1"
    got = await montreal.ProposeTransfer(req, timeout=5)
    assert got.transfer.state == interconnect_pb2.TRANSFER_STATE_RESERVED
    await montreal.AbortTransfer(interconnect_pb2.AbortTransferRequest(call_id="montreal-1", transfer_no=1,
                                                                       origin_site="montreal"), timeout=5)


async def test_a_member_acts_only_as_itself_in_the_transfer_protocol(cluster):
    """montreal may not propose, commit or abort in lyon's name (ORIGIN_MISMATCH), and
    nothing is reserved or decided by such a request."""
    call = interconnect_pb2.TransferredCall(channel=t.CHANNEL_VOICE, skill="billing", language="fr",
                                            caller="+33633333333", priority_class=t.PRIORITY_CLASS_STANDARD,
                                            offered_at=time.time())
    montreal = interconnect_pb2_grpc.InterconnectStub(cluster.channel("lyon", "site-montreal"))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await montreal.ProposeTransfer(interconnect_pb2.ProposeTransferRequest(
            call_id="spoof-1", transfer_no=1, origin_site="lyon", call=call), timeout=5)
    assert failure(e.value) == (grpc.StatusCode.PERMISSION_DENIED, "ORIGIN_MISMATCH")
    r = await montreal.GetTransfer(interconnect_pb2.GetTransferRequest(call_id="spoof-1", transfer_no=1), timeout=5)
    assert r.transfer.state == interconnect_pb2.TRANSFER_STATE_UNKNOWN
    # a reservation montreal made itself may not be aborted in another origin's name ...
    got = await montreal.ProposeTransfer(interconnect_pb2.ProposeTransferRequest(
        call_id="own-1", transfer_no=1, origin_site="montreal", call=call), timeout=5)
    assert got.transfer.state == interconnect_pb2.TRANSFER_STATE_RESERVED
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await montreal.AbortTransfer(interconnect_pb2.AbortTransferRequest(
            call_id="own-1", transfer_no=1, origin_site="lyon"), timeout=5)
    assert failure(e.value) == (grpc.StatusCode.PERMISSION_DENIED, "ORIGIN_MISMATCH")
    r = await montreal.GetTransfer(interconnect_pb2.GetTransferRequest(call_id="own-1", transfer_no=1), timeout=5)
    assert r.transfer.state == interconnect_pb2.TRANSFER_STATE_RESERVED
    # (a commit is checked against the reservation's origin the same way; with two members
    # only the origin itself can reach it, so it is not exercised here)
    await montreal.AbortTransfer(interconnect_pb2.AbortTransferRequest(
        call_id="own-1", transfer_no=1, origin_site="montreal"), timeout=5)


async def test_bindings_from_etcd_hot_reload_and_an_invalid_document_is_ignored(cluster):
    watcher = admin_pb2_grpc.AdminStub(cluster.channel("lyon", "operator-watcher"))

    async def status():
        try:
            await watcher.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
            return grpc.StatusCode.OK, None
        except grpc.aio.AioRpcError as e:
            return failure(e)

    assert await status() == (grpc.StatusCode.PERMISSION_DENIED, "UNBOUND_IDENTITY")

    file_doc = bnd.load_file(cluster.tls / "bindings.json")
    viewer = bnd.Binding(identity=SpiffeId("tandem", "operator", "watcher").uri, role="viewer", sites=("lyon",))
    stored = bnd.dumps(bnd.Bindings(bindings=(*file_doc.bindings, viewer)))
    key = cluster.keys.security_bindings
    assert key == cluster.prefix + "security/bindings"
    try:
        cluster.etcd.etcdctl("put", key, stored)
        t0 = time.monotonic()

        async def allowed():
            return await status() == (grpc.StatusCode.OK, None)

        await until(allowed, 5, "lyon to take the stored bindings", step=0.1)
        assert time.monotonic() - t0 < 5
        # still a viewer: reads, no mutation
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await routing_pb2_grpc.RoutingStub(cluster.channel("lyon", "operator-watcher")).OfferCall(
                offer("watcher-1"), timeout=5)
        assert failure(e.value) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_FORBIDS")

        # invalid documents (not JSON; an unknown role) are refused, the previous stays in force
        for bad in ("{not json", json.dumps({"version": 1, "bindings": [
                {"identity": viewer.identity, "role": "god", "sites": ["*"]}]})):
            before = cluster.log("lyon").count("ignoring the stored bindings")
            cluster.etcd.etcdctl("put", key, bad)

            async def refused(before: int = before) -> bool:
                return cluster.log("lyon").count("ignoring the stored bindings") > before

            await until(refused, 5, "lyon to refuse the invalid bindings", step=0.1)
            assert await status() == (grpc.StatusCode.OK, None)
            admin = admin_pb2_grpc.AdminStub(cluster.channel("lyon", "operator-admin"))
            await admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
    finally:
        cluster.etcd.etcdctl("del", key)

    # deleted: the TLS directory's file is in force again, where the watcher has no binding
    async def unbound():
        return await status() == (grpc.StatusCode.PERMISSION_DENIED, "UNBOUND_IDENTITY")

    await until(unbound, 5, "lyon to fall back to the file's bindings", step=0.1)
