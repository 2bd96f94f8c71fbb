"""Issue 8, "nothing unauthenticated on the wire", on in-process nodes: real mTLS, real
certificates (``router.security.pki``), a real site node (``build_node(...,
security=NodeSecurity.open(...))``), no mocks.

* The permission matrix, generated from :data:`router.security.permissions.TABLE`: every
  RPC x every role x {in scope, out of scope}, each its own test id, against one shared
  lyon node; each call also checks the audit record it left (or did not).
* Refusals at the handshake (plaintext, another CA, expired) and at authentication
  (another trust domain, no SPIFFE ID) and authorization (unbound identity).
* A refused request changes nothing, and the audit log says so.
* SSRF: TransferCall to a bad or unknown target is refused at once and dials nobody.
* Rotation of the whole TLS directory (a new CA) and renewal under traffic.
* ``tandem node`` refuses plaintext on a non-loopback address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2  # noqa: F401 - registers the health service's descriptors
from grpc_reflection.v1alpha import reflection_pb2

from router.config import load_site
from router.node.server import build_node
from router.security import permissions, pki
from router.security.site import NodeSecurity
from router.security.spiffe import SpiffeId
from router.security.tls import ChannelFactory, TlsFiles
from router.status import error_info
from router.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    agents_pb2,
    diagnostics_pb2,
    diagnostics_pb2_grpc,
    interconnect_pb2,
    partner_pb2,
    interconnect_pb2_grpc,
    routing_pb2,
    routing_pb2_grpc,
)
from router.v1 import types_pb2 as t

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
LYON_FILE = ROOT / "sites" / "lyon.yaml"
SITES = [("lyon", "in_house"), ("montreal", "in_house")]
LYON = SpiffeId("tandem", "site", "lyon")
# Separate connections per channel: gRPC would otherwise share one subchannel between
# channels with equal arguments, and a test about handshakes must make its own.
CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)
DENIED = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)

# --------------------------------------------------------------------------- identities

# The kind of identity that holds each role, and the names of the one bound in scope
# (covering lyon) and the one bound out of scope (montreal only). A role not named here
# is held by an operator identity "<role>-in" / "<role>-out".
_HOLDERS = {
    "site": ("site", "montreal", "paris"),
    "agent-gateway": ("agents", "lyon", "montreal"),
    "partner": ("partner", "callpro", "acme"),
}
_IN_SCOPE_SITES = {"site": ["*"]}  # a site is bound on "*" (the starter bindings' way)


def holder(role: str, in_scope: bool) -> tuple[str, str]:
    """(kind, name) of the identity that holds ``role`` in or out of lyon's scope."""
    kind, name_in, name_out = _HOLDERS.get(role, ("operator", f"{role}-in", f"{role}-out"))
    return kind, name_in if in_scope else name_out


def stem(kind: str, name: str) -> str:
    return f"{kind}-{name}"


def uri(kind: str, name: str) -> str:
    return SpiffeId("tandem", kind, name).uri


def matrix_bindings() -> dict:
    """One binding per (role, scope) of the matrix, plus operator/admin on "*" (the
    observer of the tests)."""
    out = [{"identity": uri("operator", "admin"), "role": "operator", "sites": ["*"]}]
    for role in permissions.ROLES:
        for in_scope in (True, False):
            kind, name = holder(role, in_scope)
            sites = _IN_SCOPE_SITES.get(role, ["lyon"]) if in_scope else ["montreal"]
            out.append({"identity": uri(kind, name), "role": role, "sites": sites})
    return {"version": 1, "bindings": out}


def make_tls(directory: Path) -> Path:
    """A CA, lyon's and montreal's identities, every matrix identity, an unbound operator
    ``nobody``, and the matrix bindings."""
    pki.init(directory, SITES)
    for role in permissions.ROLES:
        for in_scope in (True, False):
            kind, name = holder(role, in_scope)
            if not (directory / f"{stem(kind, name)}.crt").exists():
                pki.issue(directory, kind, name)
    pki.issue(directory, "operator", "nobody")
    (directory / "bindings.json").write_text(json.dumps(matrix_bindings(), indent=2))
    return directory


# --------------------------------------------------------------------------- channels


def raw_channel(address: str, ca: bytes, cert: bytes | None, key: bytes | None,
                server: SpiffeId = LYON) -> grpc.aio.Channel:
    """An mTLS channel from raw PEM material (also certificates no tool of ours would make)."""
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.aio.secure_channel(address, creds,
                                   options=(*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", server.dns_name)))


def files_channel(address: str, directory: Path, stem_: str, ca_dir: Path | None = None) -> grpc.aio.Channel:
    """A channel with ``directory/stem_.crt|.key``, trusting ``(ca_dir or directory)/ca.crt``."""
    cert, key = pki.load_pair(directory, stem_)
    return raw_channel(address, ((ca_dir or directory) / "ca.crt").read_bytes(), cert, key)


def sign_with_ca(tls: Path, *, uri_san: str | None, not_before: datetime, not_after: datetime) -> tuple[bytes, bytes]:
    """A client certificate signed with ``tls``'s CA key, as pki would not make it: any URI
    SAN (or none), any validity. Returns (cert_pem, key_pem)."""
    ca_cert = x509.load_pem_x509_certificate((tls / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((tls / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName("forged.operator.tandem")]
    if uri_san is not None:
        sans.insert(0, x509.UniformResourceIdentifier(uri_san))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged.operator.tandem")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def cert_der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)


def presented_cert(address: str, client: Path, stem_: str = "operator-admin") -> bytes:
    """The certificate (DER) the server at ``address`` presents to a TLS client with
    ``client``'s material (blocking: run it in a thread)."""
    import socket
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(client / "ca.crt"))
    ctx.load_cert_chain(str(client / f"{stem_}.crt"), str(client / f"{stem_}.key"))
    ctx.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock, \
            ctx.wrap_socket(sock, server_hostname=LYON.dns_name) as tls_sock:
        return tls_sock.getpeercert(binary_form=True)


# --------------------------------------------------------------------------- nodes


class SecureNode:
    """An in-process lyon node over mTLS with its security, and channels by client stem."""

    def __init__(self, node, port: int, security: NodeSecurity, tls: Path) -> None:
        self.node, self.port, self.security, self.tls = node, port, security, tls
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._factories: list[ChannelFactory] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self, stem_: str) -> grpc.aio.Channel:
        """A channel as identity ``stem_`` of the node's TLS directory, through the
        ChannelFactory every Tandem client uses (one per identity, kept)."""
        ch = self._channels.get(stem_)
        if ch is None:
            f = ChannelFactory(TlsFiles(self.tls, stem_), options=CHANNEL_OPTIONS)
            self._factories.append(f)
            ch = self._channels[stem_] = f.channel(self.address, f.expect("site", "lyon"))
        return ch

    def audit(self) -> list:
        return self.security.audit.records()

    async def close(self) -> None:
        for f in self._factories:
            await f.close_all()
        await self.node.stop(grace=0.2)
        await self.security.aclose()


@contextlib.asynccontextmanager
async def secure_node(tls: Path, data_dir: Path):
    security = NodeSecurity.open("lyon", data_dir, tls)
    node, port = await build_node(load_site(LYON_FILE), data_dir, "127.0.0.1:0", sync="none",
                                  drain_s=0.2, security=security)
    await node.start()
    sn = SecureNode(node, port, security, tls)
    try:
        yield sn
    finally:
        await sn.close()


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> Path:
    """The module's CA and identities (read-only for the tests that share it)."""
    return make_tls(tmp_path_factory.mktemp("sec-node") / "tls")


@pytest.fixture(scope="module")
async def shared(tls, tmp_path_factory):
    """One lyon node for the matrix and the refusals."""
    async with secure_node(tls, tmp_path_factory.mktemp("sec-node-data") / "lyon") as sn:
        yield sn


@pytest.fixture
async def fresh(tls, tmp_path):
    """A lyon node of its own (tests that compare its state before and after)."""
    async with secure_node(tls, tmp_path / "lyon") as sn:
        yield sn


# --------------------------------------------------------------------------- one RPC, any RPC


def _method(method: str):
    """The method's descriptor (None for a method no descriptor of this process knows)."""
    service, name = method.lstrip("/").rsplit("/", 1)
    try:
        return descriptor_pool.Default().FindServiceByName(service).FindMethodByName(name)
    except KeyError:
        return None


def harmless(method: str) -> bytes:
    """A request that changes nothing when it is allowed: unknown ids, an unknown skill,
    targets that are not addresses (an allowed DrainSite must not drain the node)."""
    name = method.rsplit("/", 1)[1]
    voice = t.CHANNEL_VOICE
    if method.startswith("/router.v1.Partner/"):  # a partner without a contract, an unknown call
        msg = {
            "Connect": partner_pb2.PartnerGatewayMessage(hello=partner_pb2.PartnerHello(gateway="matrix")),
            "ReportOutcome": partner_pb2.ReportOutcomeRequest(call_id="matrix-nope"),
            "HandBack": partner_pb2.HandBackRequest(call_id="matrix-nope"),
        }[name]
        return msg.SerializeToString()
    msg = {
        "OfferCall": routing_pb2.OfferCallRequest(call_id="matrix-nope", skill="nope", channel=voice,
                                                  caller="+15550000000"),
        "AbandonCall": routing_pb2.AbandonCallRequest(call_id="matrix-nope"),
        "CompleteCall": routing_pb2.CompleteCallRequest(call_id="matrix-nope"),
        "GetCall": routing_pb2.GetCallRequest(call_id="matrix-nope"),
        "WatchCall": routing_pb2.WatchCallRequest(call_id="matrix-nope"),
        "EstimateWait": routing_pb2.EstimateWaitRequest(skill="nope", channel=voice),
        "SignIn": agents_pb2.SignInRequest(agent_id="matrix-nope"),
        "SignOut": agents_pb2.SignOutRequest(agent_id="matrix-nope"),
        "SetState": agents_pb2.SetStateRequest(agent_id="matrix-nope", state=t.AGENT_STATE_READY),
        "GetAgent": agents_pb2.GetAgentRequest(agent_id="matrix-nope"),
        "Connect": agents_pb2.AgentMessage(hello=agents_pb2.Hello(agent_id="matrix-nope")),
        # a hello for an unknown agent: answered by a CommandResult UNKNOWN_AGENT on the stream
        "Gateway": agents_pb2.GatewayFrame(messages=[
            agents_pb2.GatewayMessage(agent_id="matrix-nope", hello=agents_pb2.GatewayHello())]),
        "ListCalls": admin_pb2.ListCallsRequest(page_size=1),
        # no contract: refused before etcd is read or written (MISSING_FIELD)
        "ListPartners": admin_pb2.ListPartnersRequest(),
        "DiffContract": admin_pb2.DiffContractRequest(contract=""),
        "ApplyContract": admin_pb2.ApplyContractRequest(contract="", expected_revision=0),
        "Echo": diagnostics_pb2.EchoRequest(payload=b"ping"),
        # no call: refused before anything is reserved
        "ProposeTransfer": interconnect_pb2.ProposeTransferRequest(call_id="matrix-nope", transfer_no=1),
        "CommitTransfer": interconnect_pb2.CommitTransferRequest(call_id="matrix-nope", transfer_no=1),
        "AbortTransfer": interconnect_pb2.AbortTransferRequest(call_id="matrix-nope", transfer_no=1),
        "GetTransfer": interconnect_pb2.GetTransferRequest(call_id="matrix-nope", transfer_no=1),
        "TransferCall": interconnect_pb2.TransferCallRequest(call_id="matrix-nope", target="nope"),
        "DrainSite": interconnect_pb2.DrainSiteRequest(targets=["nope"]),
        "ServerReflectionInfo": reflection_pb2.ServerReflectionRequest(list_services=""),
    }.get(name)
    return msg.SerializeToString() if msg is not None else b""  # b"": the empty request


async def call_any(channel: grpc.aio.Channel, method: str, request: bytes | None = None,
                   timeout: float = 5.0) -> tuple[grpc.StatusCode, str | None]:
    """Call ``method`` with raw bytes whatever its kind (unary; server streaming: the first
    message; bidirectional: one request, the first answer). Returns (code, ErrorInfo
    reason): OK when a response (or the first message) came."""
    desc = _method(method)
    kind = (desc.client_streaming, desc.server_streaming) if desc is not None else (True, True)
    req = harmless(method) if request is None else request
    call = None
    try:
        if kind == (False, False):
            await channel.unary_unary(method)(req, timeout=timeout)
            return grpc.StatusCode.OK, None
        if kind == (False, True):
            call = channel.unary_stream(method)(req, timeout=timeout)
        else:
            call = channel.stream_stream(method)(timeout=timeout)
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await call.write(req)
        msg = await call.read()
        if msg is grpc.aio.EOF:
            return await call.code(), None
        return grpc.StatusCode.OK, None
    except grpc.aio.AioRpcError as e:
        info = error_info(e)
        return e.code(), info.reason if info is not None else None
    finally:
        if call is not None:
            call.cancel()


# --------------------------------------------------------------------------- 1. the matrix


def _case_id(method: str, role: str, in_scope: bool) -> str:
    return f"{method.lstrip('/').replace('router.v1.', '')}-{role}-{'in' if in_scope else 'out'}"


# The node's own services; the rebalancer's (served by `tandem rebalancer`, not by a node)
# have their matrix in tests/test_rebalancer_service.py.
NODE_TABLE = {m: r for m, r in permissions.TABLE.items() if not m.startswith("/router.v1.Rebalancer/")}
MATRIX = [(m, role, s) for m in NODE_TABLE for role in permissions.ROLES for s in (True, False)]


@pytest.mark.parametrize("method, role, in_scope", MATRIX, ids=[_case_id(*c) for c in MATRIX])
async def test_matrix(shared, method, role, in_scope):
    rule = permissions.TABLE[method]
    kind, name = holder(role, in_scope)
    before = len(shared.audit())
    code, reason = await call_any(shared.channel(stem(kind, name)), method)
    new = shared.audit()[before:]
    # a cluster-wide RPC (the overflow policy) needs scope "*": a site-scoped binding is
    # out of scope even on its own site (test_cluster_wide_needs_star has the "*" case)
    in_scope = in_scope and not rule.cluster_wide

    if role in rule.roles and in_scope:
        assert code not in DENIED, (code, reason)
        assert code != grpc.StatusCode.UNAVAILABLE, reason  # a transport failure is no answer
        if method.startswith("/router.v1."):
            assert code != grpc.StatusCode.UNIMPLEMENTED  # Tandem's own RPCs all answer
        # (library RPCs in the table that this process does not implement, reflection v1
        # and Health.List, answer an allowed caller UNIMPLEMENTED; the refusals still apply)
        if rule.mutates:
            assert [(r.decision, r.identity, r.role, r.method) for r in new] == [("allow", uri(kind, name), role, method)]
            streaming = _method(method).server_streaming
            # a stream is audited when it opens; a unary call with its result, before the answer
            assert (new[0].code, new[0].reason) == (("OK", "") if streaming else (code.name, reason or ""))
        else:
            assert new == [], "an allowed read leaves no audit record"
    else:
        expected = "ROLE_FORBIDS" if role not in rule.roles else "OUT_OF_SCOPE"
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, expected)
        assert [(r.decision, r.identity, r.role, r.method, r.code, r.reason) for r in new] == [
            ("deny", uri(kind, name), "", method, "PERMISSION_DENIED", expected)]


async def test_cluster_wide_needs_star(shared):
    """The operator bound on "*" may call the cluster-wide RPCs (the empty request is
    refused by the handler, after authorization and audit)."""
    wide = [m for m, r in NODE_TABLE.items() if r.cluster_wide]
    assert wide, "the overflow policy is cluster-wide"
    for method in wide:
        before = len(shared.audit())
        code, reason = await call_any(shared.channel(stem("operator", "admin")), method)
        assert code not in DENIED and reason == "MISSING_FIELD", (method, code, reason)
        new = shared.audit()[before:]
        assert [(r.decision, r.role, r.reason) for r in new] == [("allow", "operator", "MISSING_FIELD")]


async def test_list_audit_pages_through_the_log(shared):
    """ListAudit over mTLS: pages of at most page_size, together the log's records in
    order (a read leaves no record, so the log holds still); a foreign token is refused."""
    await _get_status(shared.channel(stem("operator", "nobody")))  # at least one denial
    want = [r.id for r in shared.audit()]
    assert want
    admin = admin_pb2_grpc.AdminStub(shared.channel(stem("operator", "admin")))
    got, token, pages = [], "", 0
    while True:
        r = await admin.ListAudit(admin_pb2.ListAuditRequest(page_size=7, page_token=token), timeout=10)
        assert len(r.entries) <= 7
        got += [e.id for e in r.entries]
        pages += 1
        token = r.next_page_token
        if not token:
            break
    assert got == want and pages >= len(want) // 7
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await admin.ListAudit(admin_pb2.ListAuditRequest(page_token="MjoxMA"), timeout=10)  # ListCalls' "2:10"
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(ei.value).reason == "INVALID_PAGE_TOKEN"


def test_every_served_method_is_in_the_table():
    """Default deny is the rule, but a served RPC missing from the table is a bug."""
    from router.node.server import SERVICE_NAMES

    pool = descriptor_pool.Default()
    served = {f"/{s}/{m.name}" for s in (*SERVICE_NAMES, "grpc.health.v1.Health",
                                         "grpc.reflection.v1alpha.ServerReflection")
              for m in pool.FindServiceByName(s).methods}
    assert served - set(permissions.TABLE) == set()


# --------------------------------------------------------------------------- 2. refusals


async def _get_status(channel: grpc.aio.Channel) -> tuple[grpc.StatusCode, str | None]:
    return await call_any(channel, "/router.v1.Admin/GetStatus", b"")


async def test_plaintext_client_is_refused(shared):
    async with grpc.aio.insecure_channel(shared.address, options=CHANNEL_OPTIONS) as ch:
        assert (await _get_status(ch))[0] == grpc.StatusCode.UNAVAILABLE


async def test_a_client_of_another_ca_is_refused(shared, tmp_path):
    other = tmp_path / "other"
    pki.init(other, SITES)  # the same identities, another CA
    before = len(shared.audit())
    # trusts the right server CA: only the client certificate's issuer is wrong
    async with files_channel(shared.address, other, "operator-admin", ca_dir=shared.tls) as ch:
        assert (await _get_status(ch))[0] == grpc.StatusCode.UNAVAILABLE
    assert shared.audit()[before:] == []  # nothing reached the server's handlers


async def test_an_expired_client_certificate_is_refused(shared):
    now = datetime.now(UTC)
    cert, key = sign_with_ca(shared.tls, uri_san=uri("operator", "admin"),
                             not_before=now - timedelta(days=2), not_after=now - timedelta(hours=1))
    async with raw_channel(shared.address, (shared.tls / "ca.crt").read_bytes(), cert, key) as ch:
        assert (await _get_status(ch))[0] == grpc.StatusCode.UNAVAILABLE
    # the same forgery, valid now, is let in (the expiry alone was refused)
    cert, key = sign_with_ca(shared.tls, uri_san=uri("operator", "admin"),
                             not_before=now - timedelta(minutes=5), not_after=now + timedelta(hours=1))
    async with raw_channel(shared.address, (shared.tls / "ca.crt").read_bytes(), cert, key) as ch:
        assert (await _get_status(ch))[0] == grpc.StatusCode.OK


async def test_another_trust_domain_is_unauthenticated(shared):
    now = datetime.now(UTC)
    cert, key = sign_with_ca(shared.tls, uri_san="spiffe://other/operator/x",
                             not_before=now - timedelta(minutes=5), not_after=now + timedelta(hours=1))
    before = len(shared.audit())
    async with raw_channel(shared.address, (shared.tls / "ca.crt").read_bytes(), cert, key) as ch:
        assert await _get_status(ch) == (grpc.StatusCode.UNAUTHENTICATED, "WRONG_TRUST_DOMAIN")
    [rec] = shared.audit()[before:]
    assert (rec.decision, rec.code, rec.reason) == ("deny", "UNAUTHENTICATED", "WRONG_TRUST_DOMAIN")
    assert rec.identity.startswith("unauthenticated:")


async def test_an_unbound_identity_is_denied(shared):
    before = len(shared.audit())
    assert await _get_status(shared.channel("operator-nobody")) == (grpc.StatusCode.PERMISSION_DENIED,
                                                                  "UNBOUND_IDENTITY")
    [rec] = shared.audit()[before:]
    assert (rec.identity, rec.decision, rec.reason) == (uri("operator", "nobody"), "deny", "UNBOUND_IDENTITY")


async def test_a_certificate_without_uri_san_is_unauthenticated(shared):
    now = datetime.now(UTC)
    cert, key = sign_with_ca(shared.tls, uri_san=None,
                             not_before=now - timedelta(minutes=5), not_after=now + timedelta(hours=1))
    async with raw_channel(shared.address, (shared.tls / "ca.crt").read_bytes(), cert, key) as ch:
        assert await _get_status(ch) == (grpc.StatusCode.UNAUTHENTICATED, "NO_IDENTITY")


# --------------------------------------------------------------------------- 3. nothing changes


BILLING_FR = {"skill": "billing", "channel": t.CHANNEL_VOICE, "language": "fr"}


async def _state(sn: SecureNode) -> tuple:
    """GetStatus and every call, as the operator sees them (the oldest wait grows with
    time: left out)."""
    admin = admin_pb2_grpc.AdminStub(sn.channel("operator-admin"))
    status = await admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
    for q in status.queues:
        q.oldest_wait_s = 0
    calls = await admin.ListCalls(admin_pb2.ListCallsRequest(page_size=1000), timeout=5)
    assert not calls.next_page_token
    return status.SerializeToString(deterministic=True), calls.SerializeToString(deterministic=True)


async def test_a_refused_request_changes_nothing_and_is_audited(fresh):
    sn = fresh
    start = len(sn.audit())
    gw = routing_pb2_grpc.RoutingStub(sn.channel("agents-lyon"))
    r = await gw.OfferCall(routing_pb2.OfferCallRequest(call_id="kept-1", caller="+33600000001", **BILLING_FR),
                           timeout=5)
    assert r.call.state == t.CALL_STATE_QUEUED
    before = await _state(sn)

    now = datetime.now(UTC)
    valid = {"not_before": now - timedelta(minutes=5), "not_after": now + timedelta(hours=1)}
    ca = (sn.tls / "ca.crt").read_bytes()
    foreign = raw_channel(sn.address, ca, *sign_with_ca(sn.tls, uri_san="spiffe://other/operator/x", **valid))
    anonymous = raw_channel(sn.address, ca, *sign_with_ca(sn.tls, uri_san=None, **valid))
    offer = routing_pb2.OfferCallRequest(call_id="refused-1", caller="+33600000002", **BILLING_FR).SerializeToString()
    sign_in = agents_pb2.SignInRequest(agent_id="lyon-fr-001").SerializeToString()
    transfer = interconnect_pb2.TransferCallRequest(call_id="kept-1", target="127.0.0.1:1").SerializeToString()
    drain = interconnect_pb2.DrainSiteRequest(targets=["127.0.0.1:1"]).SerializeToString()
    R, A, IC = "/router.v1.Routing/", "/router.v1.Agents/", "/router.v1.Interconnect/"
    attempts = [  # (who, channel, method, request, code, reason)
        ("operator-viewer-in", None, R + "OfferCall", offer, "PERMISSION_DENIED", "ROLE_FORBIDS"),
        ("agents-montreal", None, R + "OfferCall", offer, "PERMISSION_DENIED", "OUT_OF_SCOPE"),
        ("partner-callpro", None, R + "OfferCall", offer, "PERMISSION_DENIED", "ROLE_FORBIDS"),
        ("operator-nobody", None, R + "OfferCall", offer, "PERMISSION_DENIED", "UNBOUND_IDENTITY"),
        ("foreign", foreign, R + "OfferCall", offer, "UNAUTHENTICATED", "WRONG_TRUST_DOMAIN"),
        ("operator-viewer-in", None, A + "SignIn", sign_in, "PERMISSION_DENIED", "ROLE_FORBIDS"),
        ("agents-montreal", None, A + "SignIn", sign_in, "PERMISSION_DENIED", "OUT_OF_SCOPE"),
        ("anonymous", anonymous, A + "SignIn", sign_in, "UNAUTHENTICATED", "NO_IDENTITY"),
        ("operator-viewer-in", None, IC + "TransferCall", transfer, "PERMISSION_DENIED", "ROLE_FORBIDS"),
        ("operator-supervisor-out", None, IC + "TransferCall", transfer, "PERMISSION_DENIED", "OUT_OF_SCOPE"),
        ("agents-lyon", None, IC + "TransferCall", transfer, "PERMISSION_DENIED", "ROLE_FORBIDS"),
        ("operator-supervisor-in", None, IC + "DrainSite", drain, "PERMISSION_DENIED", "ROLE_FORBIDS"),
        ("operator-operator-out", None, IC + "DrainSite", drain, "PERMISSION_DENIED", "OUT_OF_SCOPE"),
        ("site-montreal", None, IC + "DrainSite", drain, "PERMISSION_DENIED", "ROLE_FORBIDS"),
    ]
    try:
        for who, ch, method, req, code, reason in attempts:
            got = await call_any(ch or sn.channel(who), method, req)
            assert got == (getattr(grpc.StatusCode, code), reason), (who, method)
    finally:
        await foreign.close()
        await anonymous.close()

    after = await _state(sn)
    assert after == before
    assert not sn.node.draining

    recs = sn.audit()[start:]
    # the offer (allowed mutation), then one denial per attempt; the operator's reads none
    assert [(r.decision, r.identity, r.role, r.method, r.code, r.reason) for r in recs[:1]] == [
        ("allow", uri("agents", "lyon"), "agent-gateway", R + "OfferCall", "OK", "")]
    assert recs[0].objects["call_id"] == "kept-1"
    denials = recs[1:]
    assert len(denials) == len(attempts)
    for rec, (who, _, method, _, code, reason) in zip(denials, attempts):
        assert (rec.decision, rec.method, rec.code, rec.reason, rec.role) == ("deny", method, code, reason, "")
        if code == "UNAUTHENTICATED":
            assert rec.identity.startswith("unauthenticated:ipv4:127.0.0.1:")
        else:
            assert rec.identity == uri(*who.split("-", 1))
        assert rec.peer.startswith("ipv4:127.0.0.1:") and rec.site == "lyon"
    assert denials[0].objects == {"call_id": "refused-1"}
    assert denials[8].objects == {"call_id": "kept-1", "target": "127.0.0.1:1"}
    assert denials[11].objects == {"targets": "127.0.0.1:1"}

    # allowed mutations that fail are audited with their result code; reads are not
    ic = interconnect_pb2_grpc.InterconnectStub(sn.channel("operator-admin"))
    mark = len(sn.audit())
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await ic.TransferCall(interconnect_pb2.TransferCallRequest(call_id="kept-1", target="nope"), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await _state(sn)
    await routing_pb2_grpc.RoutingStub(sn.channel("operator-viewer-in")).GetCall(
        routing_pb2.GetCallRequest(call_id="kept-1"), timeout=5)
    assert [(r.decision, r.identity, r.role, r.code, r.reason) for r in sn.audit()[mark:]] == [
        ("allow", uri("operator", "admin"), "operator", "INVALID_ARGUMENT", "BAD_TARGET")]


# --------------------------------------------------------------------------- 4. SSRF


async def _call_state(sn: SecureNode, call_id: str) -> int:
    r = await routing_pb2_grpc.RoutingStub(sn.channel("operator-admin")).GetCall(
        routing_pb2.GetCallRequest(call_id=call_id), timeout=5)
    return r.call.state


async def test_transfer_targets_are_checked_before_anything_is_dialed(fresh):
    sn = fresh
    gw = routing_pb2_grpc.RoutingStub(sn.channel("agents-lyon"))
    r = await gw.OfferCall(routing_pb2.OfferCallRequest(call_id="ssrf-1", caller="+33600000003", **BILLING_FR),
                           timeout=5)
    assert r.call.state == t.CALL_STATE_QUEUED
    ic = interconnect_pb2_grpc.InterconnectStub(sn.channel("operator-admin"))

    # a listener on loopback: the node must never connect to it
    dialed: list = []

    async def on_connect(reader, writer):
        dialed.append(writer.get_extra_info("peername"))
        writer.close()

    trap = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    trap_port = trap.sockets[0].getsockname()[1]
    try:
        cases = [("not an address", grpc.StatusCode.INVALID_ARGUMENT, "BAD_TARGET"),
                 ("127.0.0.1:1", grpc.StatusCode.FAILED_PRECONDITION, "UNKNOWN_TARGET"),
                 (f"127.0.0.1:{trap_port}", grpc.StatusCode.FAILED_PRECONDITION, "UNKNOWN_TARGET"),
                 (f"localhost:{trap_port}", grpc.StatusCode.FAILED_PRECONDITION, "UNKNOWN_TARGET")]
        for target, code, reason in cases:
            t0 = time.perf_counter()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await ic.TransferCall(interconnect_pb2.TransferCallRequest(call_id="ssrf-1", target=target,
                                                                           timeout_s=10), timeout=10)
            took = time.perf_counter() - t0
            assert (e.value.code(), error_info(e.value).reason) == (code, reason), target
            assert took < 0.5, (target, took)
            assert await _call_state(sn, "ssrf-1") == t.CALL_STATE_QUEUED
        # DrainSite checks its targets the same way, before it drains anything
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await ic.DrainSite(interconnect_pb2.DrainSiteRequest(targets=[f"127.0.0.1:{trap_port}"]), timeout=5)
        assert (e.value.code(), error_info(e.value).reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                                "UNKNOWN_TARGET")
        assert not sn.node.draining
        await asyncio.sleep(0.2)
        assert dialed == []
    finally:
        trap.close()
        await trap.wait_closed()
    assert await _call_state(sn, "ssrf-1") == t.CALL_STATE_QUEUED


# --------------------------------------------------------------------------- 5. rotation


async def test_rotation_to_a_new_ca_and_renewal_under_traffic(tmp_path):
    tls = tmp_path / "tls"
    pki.init(tls, SITES)
    old = tmp_path / "old"  # the first CA's material, as a client that never got the new one has it
    old.mkdir()
    for f in ("ca.crt", "operator-admin.crt", "operator-admin.key"):
        shutil.copy2(tls / f, old / f)

    async with secure_node(tls, tmp_path / "lyon") as sn:
        existing = files_channel(sn.address, old, "operator-admin")
        diag, admin = diagnostics_pb2_grpc.DiagnosticsStub(existing), admin_pb2_grpc.AdminStub(existing)
        results: list[tuple[float, str]] = []  # (monotonic time, "OK" or the code's name)
        stop = asyncio.Event()

        async def traffic() -> None:
            deadline = time.monotonic() + 20
            for i in range(5000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    if i % 2:
                        await diag.Echo(diagnostics_pb2.EchoRequest(payload=b"x"), timeout=2)
                    else:
                        await admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=2)
                    results.append((time.monotonic(), "OK"))
                except grpc.aio.AioRpcError as e:
                    results.append((time.monotonic(), e.code().name))
                    await asyncio.sleep(0.01)

        loop_task = asyncio.create_task(traffic())
        try:
            while sum(1 for _, r in results if r == "OK") < 30:
                assert not loop_task.done(), results[-5:]
                await asyncio.sleep(0.01)

            rotated_at = time.monotonic()
            await asyncio.to_thread(pki.init, tls, SITES, force=True)  # a new CA, every file replaced
            n_at_rotation = len(results)

            # a fresh client of the new CA gets in: the server took the new files, no restart
            async with files_channel(sn.address, tls, "operator-admin") as ch:
                assert await _get_status(ch) == (grpc.StatusCode.OK, None)
            assert await asyncio.to_thread(presented_cert, sn.address, tls) == cert_der(tls / "site-lyon.crt")
            # the old CA's material is refused: as it is (its CA no longer signs the server),
            # and trusting the new server (its client certificate is no longer accepted)
            async with files_channel(sn.address, old, "operator-admin") as ch:
                assert (await _get_status(ch))[0] == grpc.StatusCode.UNAVAILABLE
            async with files_channel(sn.address, old, "operator-admin", ca_dir=tls) as ch:
                assert (await _get_status(ch))[0] == grpc.StatusCode.UNAVAILABLE

            while len(results) < n_at_rotation + 30 and not loop_task.done():
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            await loop_task
            await existing.close()

        before = [r for at, r in results if at < rotated_at]
        after = [r for at, r in results if at >= rotated_at]
        assert before and set(before) == {"OK"}, "no failure before the rotation"
        assert len(after) >= 30
        assert set(after) <= {"OK", "UNAVAILABLE"}, after  # at worst a reconnect that fails

        # renewal with the same CA: new keys, new connections still succeed (old and new material)
        post = tmp_path / "post-rotation"
        post.mkdir()
        for f in ("ca.crt", "operator-admin.crt", "operator-admin.key"):
            shutil.copy2(tls / f, post / f)
        await asyncio.sleep(1.1)  # a certificate's validity has a one-second resolution
        renewed = await asyncio.to_thread(pki.renew, tls)
        assert tls / "site-lyon.crt" in renewed and tls / "operator-admin.crt" in renewed
        for client in (tls, post):
            async with files_channel(sn.address, client, "operator-admin") as ch:
                assert await _get_status(ch) == (grpc.StatusCode.OK, None), client
        # the server presents the renewed certificate (it reloaded its own pair too)
        assert await asyncio.to_thread(presented_cert, sn.address, tls) == cert_der(tls / "site-lyon.crt")


# --------------------------------------------------------------------------- 6. plaintext listen


TANDEM = Path(sys.executable).parent / "tandem"


def test_plaintext_node_refuses_a_non_loopback_listen(tmp_path):
    cmd = [str(TANDEM), "node", "--site", str(LYON_FILE), "--data-dir", str(tmp_path / "d"),
           "--listen", "0.0.0.0:0", "--sync", "none"]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2, r
    assert "--tls-dir" in r.stderr and "0.0.0.0:0" in r.stderr, r.stderr
    assert "listening on" not in r.stdout


def test_plaintext_node_on_any_address_with_insecure(tmp_path):
    cmd = [str(TANDEM), "node", "--site", str(LYON_FILE), "--data-dir", str(tmp_path / "d"),
           "--listen", "0.0.0.0:0", "--sync", "none", "--insecure"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TANDEM_DRAIN_S": "0.1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env)
    try:
        import select

        deadline = time.monotonic() + 30
        line = ""
        while "listening on" not in line:
            assert time.monotonic() < deadline, "no 'listening on' line within 30 s"
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                line = proc.stdout.readline()
                assert line or proc.poll() is None, f"exited with {proc.returncode}"
        assert line.startswith("tandem node lyon listening on 0.0.0.0:"), line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_partner_acts_only_as_its_certificate_names(shared):
    """The partner API takes the partner's name from its certificate: naming another
    partner is PERMISSION_DENIED PARTNER_MISMATCH (audited as an allowed call that the
    handler refused); its own name, or none, reaches the contract check (no etcd here:
    FAILED_PRECONDITION NO_CONTRACT)."""
    ch = shared.channel("partner-callpro")
    method = "/router.v1.Partner/Connect"

    def hello(name: str) -> bytes:
        return partner_pb2.PartnerGatewayMessage(
            hello=partner_pb2.PartnerHello(gateway="t", partner=name)).SerializeToString()

    assert await call_any(ch, method, hello("acme")) == (grpc.StatusCode.PERMISSION_DENIED, "PARTNER_MISMATCH")
    assert await call_any(ch, method, hello("callpro")) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_CONTRACT")
    assert await call_any(ch, method, hello("")) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_CONTRACT")
    report = partner_pb2.ReportOutcomeRequest(call_id="x", partner="acme").SerializeToString()
    assert await call_any(ch, "/router.v1.Partner/ReportOutcome", report) == (
        grpc.StatusCode.PERMISSION_DENIED, "PARTNER_MISMATCH")
    # a site identity is no partner, whatever it names
    assert (await call_any(shared.channel("site-montreal"), method, hello("callpro")))[0] == grpc.StatusCode.PERMISSION_DENIED
