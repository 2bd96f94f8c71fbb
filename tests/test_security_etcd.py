"""etcd over mTLS with the cluster's own CA: a real etcd (``router.local.etcd`` from a
Tandem TLS directory) serving its identity ``spiffe://tandem/etcd/local``, requiring a
client certificate signed by ``DIR/ca.crt``, with etcd's access control on
(:mod:`router.coord.access`: the sites' and operators' CNs are users, scoped to the
``/tandem-test/`` prefix every test here uses).

* a coordinator presenting site lyon's certificate joins, registers, reads and writes,
  and its link checked that the server is the etcd identity;
* a client with a certificate of another CA, and a client without a certificate, are
  refused (CoordinationUnavailable), and write nothing;
* a partner's and an agents gateway's certificates (same CA) can neither read nor write;
  a site and an operator can, under the prefix only, and a site only reads the role
  bindings; provisioning is idempotent (and brings a widened Tandem role back to the
  plan), also through ``tandem certs etcd-access``;
* a server presenting another identity of the CA (a site's certificate) is refused;
* a renewed client certificate is used after a reconnect (the old one has expired);
* a real ``tandem node --site sites/lyon.yaml --tls-dir DIR --etcd https://…`` process,
  given nothing else, registers as a member, and leaves when stopped; so does one given
  ``--etcd HOST:PORT --etcd-ca DIR/ca.crt`` (TLS on without https://).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
import uuid
from pathlib import Path

import pytest
from aetcd import rpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from node_fixtures import until
from router.cli import app
from router.coord import CoordinationUnavailable, EtcdCoordinator, EtcdSettings, access
from router.coord.base import Member
from router.coord.link import Link
from router.local import etcd as etcdproc
from router.local.nodes import spawn_node, stop_nodes, wait_listening
from router.security import pki
from router.security.spiffe import SpiffeId

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
TTL_S = 2
ETCD_ID = SpiffeId("tandem", "etcd", etcdproc.DEFAULT_IDENTITY)
SCOPE = "/tandem-test/"  # the prefix the cluster's users may use: every test prefix is under it


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> Path:
    """The cluster's TLS dir: lyon's identities and the etcd member's."""
    d = tmp_path_factory.mktemp("etcd-mtls") / "tls"
    pki.init(d, [("lyon", "in_house")])
    pki.issue(d, "etcd", etcdproc.DEFAULT_IDENTITY, hosts=("127.0.0.1", "localhost"))
    pki.issue(d, "operator", "ops")
    return d


@pytest.fixture(scope="module")
def other_tls(tmp_path_factory) -> Path:
    """Another CA with the same identities: its certificates must be refused."""
    d = tmp_path_factory.mktemp("etcd-mtls-other") / "tls"
    pki.init(d, [("lyon", "in_house")])
    return d


@pytest.fixture(scope="module")
def server(tls):
    # admin provisions (and holds etcd's root role); ops is an operator like any other
    with etcdproc.etcd_server(tls_dir=tls, sites=["lyon"], operators=["admin", "ops"], prefix=SCOPE) as srv:
        yield srv


def settings(server, prefix: str, **tls_files) -> EtcdSettings:
    return EtcdSettings(endpoints=server.urls, prefix=prefix, ttl_s=TTL_S, op_timeout_s=1.0, **tls_files)


def site_files(tls: Path, ca: Path | None = None) -> dict[str, str]:
    return {"ca_file": str(ca or tls / "ca.crt"), "cert_file": str(tls / "site-lyon.crt"),
            "key_file": str(tls / "site-lyon.key")}


def files_of(tls: Path, stem: str) -> dict[str, str]:
    return {"ca_file": str(tls / "ca.crt"), "cert_file": str(tls / f"{stem}.crt"), "key_file": str(tls / f"{stem}.key")}


def doc_key(coord: EtcdCoordinator) -> str:
    """A key under the coordinator's prefix that every site may write (unlike security/)."""
    return coord.keys.prefix + "test/doc"


def test_prefix():
    return f"{SCOPE}{uuid.uuid4().hex[:12]}/"


test_prefix.__test__ = False  # a helper, not a test


def test_the_server_is_https_with_the_etcd_identity(server, tls):
    assert server.url == f"https://127.0.0.1:{server.client_port}" and server.urls == (server.url,)
    assert server.tls["server_cert"] == tls / "etcd-local.crt" and server.tls["ca"] == tls / "ca.crt"
    ctx = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    ctx.load_cert_chain(str(tls / "site-lyon.crt"), str(tls / "site-lyon.key"))
    with (socket.create_connection(("127.0.0.1", server.client_port), timeout=5) as raw,
          ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s):
        der = s.getpeercert(binary_form=True)
    pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    assert pki.identity_of(pem) == ETCD_ID


def test_tls_from_dir_says_what_is_missing(tmp_path, tls):
    with pytest.raises(etcdproc.EtcdStartError, match="not a TLS directory"):
        etcdproc.tls_from_dir(tmp_path)
    with pytest.raises(etcdproc.EtcdStartError, match="--etcd nowhere"):
        etcdproc.tls_from_dir(tls, "nowhere")
    # a certificate of another kind under an etcd file name is not etcd's identity
    d = tmp_path / "tls"
    pki.init(d, [("lyon", "in_house")])
    for ext in ("crt", "key"):
        (d / f"etcd-local.{ext}").write_bytes((d / f"site-lyon.{ext}").read_bytes())
    with pytest.raises(etcdproc.EtcdStartError, match="spiffe://tandem/site/lyon, not an etcd/local"):
        etcdproc.tls_from_dir(d)


async def test_a_site_certificate_joins_reads_and_writes(server, tls):
    prefix = f"/tandem-test/{uuid.uuid4().hex[:12]}/"
    lyon = EtcdCoordinator("lyon", settings(server, prefix, **site_files(tls)))
    try:
        await lyon.start()
        await lyon.wait_ready(5)
        assert await lyon.register(Member(site="lyon", address="127.0.0.1:7000", region="emea"))
        key = doc_key(lyon)
        rev = await lyon.put_document(key, '{"doc": 1}')
        assert rev > 0
        assert await lyon.get_document(key) == b'{"doc": 1}'
        assert set(await lyon.list_members()) == {"lyon"}

        async def seen():
            return "lyon" in lyon.members()

        await until(seen, 3, "lyon's own membership through the watch")
        # the link checked whom it reached: the etcd identity, not just any leaf of the CA
        assert lyon.link.client().server_identity == ETCD_ID.uri
    finally:
        await lyon.close()
    assert not lyon._tasks


@pytest.mark.parametrize("who", ["another CA", "no certificate"])
async def test_a_client_without_a_certificate_of_the_ca_is_refused(server, tls, other_tls, who):
    prefix = f"/tandem-test/{uuid.uuid4().hex[:12]}/"
    if who == "another CA":
        # same identity, same names, trusts the right server CA: only the issuer differs
        files = site_files(other_tls, ca=tls / "ca.crt")
    else:
        files = {"ca_file": str(tls / "ca.crt")}
    intruder = EtcdCoordinator("lyon", settings(server, prefix, **files))
    try:
        await intruder.start()
        with pytest.raises(CoordinationUnavailable):
            await intruder.wait_ready(1.5)
        with pytest.raises(CoordinationUnavailable):
            await intruder.put_document(intruder.keys.security_bindings, "{}")
        with pytest.raises(CoordinationUnavailable):
            await intruder.get_document(intruder.keys.security_bindings)
        assert not intruder.connected
    finally:
        await intruder.close()
    # nothing was written under its prefix
    check = EtcdCoordinator("check", settings(server, prefix, **site_files(tls)))
    try:
        assert await check.get_document(check.keys.security_bindings) is None
        assert await check.list_members() == {}
    finally:
        await check.close()


async def refused(what, *args) -> str:
    """The message of the CoordinationUnavailable that ``await what(*args)`` raises."""
    with pytest.raises(CoordinationUnavailable) as e:
        await what(*args)
    return str(e.value)


@pytest.mark.parametrize("stem", ["partner-acme", "agents-lyon"])
async def test_partners_and_agents_gateways_may_not_use_etcd(server, tls, stem):
    """Certificates of the cluster's CA that are neither a site nor an operator: etcd has
    no user for their CN, so it refuses their reads and writes (the role bindings
    included: nobody grants itself a role through etcd)."""
    if stem == "partner-acme":
        pki.issue(tls, "partner", "acme")
    prefix = test_prefix()
    ops = EtcdCoordinator("ops", settings(server, prefix, **files_of(tls, "operator-ops")))
    other = EtcdCoordinator("lyon", settings(server, prefix, **files_of(tls, stem)))
    try:
        key = other.keys.security_bindings
        assert await ops.put_document(key, '{"version": 1, "bindings": []}') > 0
        grab = '{"version": 1, "bindings": [{"identity": "spiffe://tandem/partner/acme", "role": "operator"}]}'
        for msg in (await refused(other.put_document, key, grab),
                    await refused(other.get_document, key),
                    await refused(other.list_members),
                    await refused(other.put_document, other.keys.contingency("lyon"), "emergency")):
            assert "permission denied" in msg, msg
        await other.start()
        with pytest.raises(CoordinationUnavailable):
            await other.wait_ready(1.5)
        assert await ops.get_document(key) == b'{"version": 1, "bindings": []}'  # unchanged
        assert await ops.get_document(ops.keys.contingency("lyon")) is None
    finally:
        await other.close()
        await ops.close()


@pytest.mark.parametrize("stem", ["site-lyon", "operator-ops", "operator-admin"])
async def test_sites_and_operators_use_the_prefix_and_only_it(server, tls, stem):
    """The roles are scoped to the cluster's prefix: inside it a site or an operator reads
    and writes, except the role bindings (``PREFIX security/``), which a site only reads;
    outside it, nothing. The operator that provisioned (admin) holds etcd's root role: it
    may use every key."""
    inside = EtcdCoordinator("lyon", settings(server, test_prefix(), **files_of(tls, stem)))
    outside = EtcdCoordinator("lyon", settings(server, f"/elsewhere-{uuid.uuid4().hex[:8]}/", **files_of(tls, stem)))
    root = EtcdCoordinator("lyon", settings(server, "/", **files_of(tls, stem)))
    cluster = EtcdCoordinator("lyon", settings(server, SCOPE, **files_of(tls, stem)))  # the provisioned prefix
    try:
        key = doc_key(inside)
        assert await inside.put_document(key, "{}") > 0 and await inside.get_document(key) == b"{}"
        await cluster.start()
        await cluster.wait_ready(5)  # a session, the watches (the bindings' too)
        bindings = cluster.keys.security_bindings
        if stem == "site-lyon":
            assert "permission denied" in await refused(cluster.put_document, bindings, "{}")
            await cluster.get_document(bindings)
        else:
            assert await cluster.put_document(bindings, "{}") > 0 and await cluster.get_document(bindings) == b"{}"
        for c in (outside, root):
            if stem == "operator-admin":
                assert await c.put_document(doc_key(c), "{}") > 0
                assert await c.get_document(doc_key(c)) == b"{}"
                continue
            assert "permission denied" in await refused(c.put_document, doc_key(c), "{}")
            assert "permission denied" in await refused(c.get_document, doc_key(c))
    finally:
        for c in (inside, outside, root, cluster):
            await c.close()


def test_provisioning_is_idempotent(server, tls):
    assert etcdproc.provision_access(server, tls, ["lyon"], ["admin", "ops"], SCOPE) == []


async def test_provisioning_revokes_a_wider_permission_of_a_tandem_role(server, tls):
    """The Tandem roles hold the planned permissions and no others: a site role that
    could write the whole prefix (the bindings too) is brought back to the plan."""
    link = Link(settings(server, SCOPE, **files_of(tls, "operator-admin")))
    try:
        perm = rpc.Permission(permType=rpc.Permission.Type.Value("READWRITE"), key=SCOPE.encode(),
                              range_end=access.prefix_end(SCOPE).encode())
        await access._Auth(link).call("RoleGrantPermission",
                                      rpc.AuthRoleGrantPermissionRequest(name=access.SITE_ROLE, perm=perm))
    finally:
        await link.close()
    changes = await asyncio.to_thread(etcdproc.provision_access, server, tls, ["lyon"], ["admin", "ops"], SCOPE)
    assert changes == [f"role tandem-site: revoked readwrite [{SCOPE}, /tandem-test0)"]
    assert etcdproc.provision_access(server, tls, ["lyon"], ["admin", "ops"], SCOPE) == []


async def test_tandem_certs_etcd_access_provisions_a_cluster(tls, tmp_path):
    """The CLI on a fresh server: users for DIR's sites and operators, auth on; a second
    run changes nothing; then a partner is refused and lyon is not."""
    pki.issue(tls, "partner", "acme")
    runner = CliRunner()
    with etcdproc.etcd_server(tmp_path, tls_dir=tls) as srv:
        args = ["certs", "etcd-access", str(tls), "--endpoints", srv.url, "--prefix", SCOPE]
        first = runner.invoke(app, args)
        assert first.exit_code == 0, first.output
        lines = first.stdout.splitlines()
        assert {"user lyon.site.tandem added", "user admin.operator.tandem added", "user root added",
                "user admin.operator.tandem: role root", "auth enabled"} <= set(lines), lines
        assert not any("partner" in ln or "agents" in ln for ln in lines), lines
        again = runner.invoke(app, args)
        assert again.exit_code == 0 and again.stdout == "" and "nothing to change" in again.stderr
        lyon = EtcdCoordinator("lyon", settings(srv, test_prefix(), **site_files(tls)))
        acme = EtcdCoordinator("lyon", settings(srv, test_prefix(), **files_of(tls, "partner-acme")))
        try:
            assert await lyon.put_document(doc_key(lyon), "{}") > 0
            assert "permission denied" in await refused(acme.put_document, doc_key(acme), "{}")
        finally:
            await lyon.close()
            await acme.close()
        bad = runner.invoke(app, ["certs", "etcd-access", str(tls), "--endpoints", srv.url, "--as", "nobody"])
        assert bad.exit_code == 1 and "operator-nobody.crt" in bad.stderr
        # an operator without etcd's root role may use the prefix, not provision
        ops = runner.invoke(app, [*args, "--as", "ops"])
        assert ops.exit_code == 1 and "operator-ops.crt does not hold etcd's root role" in ops.stderr, ops.output


async def test_a_server_with_another_identity_of_the_ca_is_refused(tls, tmp_path):
    """An etcd serving a *site* certificate of the right CA: valid for 127.0.0.1 (every
    leaf is), so a host name check passes; the link wants an etcd identity and refuses."""
    cert, key = tls / "site-lyon.crt", tls / "site-lyon.key"
    impostor = etcdproc.EtcdServer(tmp_path / "data", tls={"ca": tls / "ca.crt", "server_cert": cert,
                                                           "server_key": key, "client_cert": cert, "client_key": key})
    impostor.start()
    coord = EtcdCoordinator("lyon", settings(impostor, test_prefix(), **site_files(tls)))
    try:
        ctx = ssl.create_default_context(cafile=str(tls / "ca.crt"))  # checks 127.0.0.1: passes
        ctx.load_cert_chain(str(cert), str(key))
        with (socket.create_connection(("127.0.0.1", impostor.client_port), timeout=5) as raw,
              ctx.wrap_socket(raw, server_hostname="127.0.0.1")):
            pass
        msg = await refused(coord.put_document, coord.keys.security_bindings, "{}")
        assert "spiffe://tandem/site/lyon, not an etcd member" in msg, msg
        await refused(coord.get_document, coord.keys.security_bindings)
        await coord.start()
        with pytest.raises(CoordinationUnavailable):
            await coord.wait_ready(1.5)
    finally:
        await coord.close()
        impostor.kill()


async def test_a_renewed_client_certificate_is_used_after_a_reconnect(tmp_path):
    """Site lyon's certificate expires seconds after the coordinator connected; it is
    renewed (``tandem certs renew --within-days``), the old one expires, etcd restarts:
    the reconnect must present the new certificate, read again from the files."""
    d = tmp_path / "tls"
    pki.init(d, [("lyon", "in_house")])
    pki.issue(d, "etcd", etcdproc.DEFAULT_IDENTITY, hosts=("127.0.0.1", "localhost"))
    with etcdproc.etcd_server(tmp_path, tls_dir=d, sites=["lyon"], prefix=SCOPE) as srv:
        pki.issue(d, "site", "lyon", days=6 / 86400)  # valid for 6 s (+ the 5 min skew before)
        expires = pki.expires_at((d / "site-lyon.crt").read_bytes()).timestamp()
        lyon = EtcdCoordinator("lyon", settings(srv, test_prefix(), **site_files(d)))
        try:
            await lyon.start()
            await lyon.wait_ready(4)
            assert await lyon.register(Member(site="lyon", address="127.0.0.1:7000", region="emea"))
            first = lyon.link.tls_version
            assert [p.name for p in pki.renew(d, within_days=0.5, days=1)] == ["site-lyon.crt"]
            await asyncio.sleep(max(0.0, expires - time.time()) + 1.0)  # the old certificate is expired
            srv.kill()
            srv.start()

            async def works():
                try:
                    return await lyon.put_document(doc_key(lyon), "{}")
                except CoordinationUnavailable:
                    return None

            await until(works, 10, "a put after the restart, with the renewed certificate", step=0.2)
            assert lyon.link.tls_version != first
            assert lyon.link.client().tls.version == lyon.link.tls_version
            await lyon.wait_ready(5)
            assert "lyon" in await lyon.list_members()
        finally:
            await lyon.close()


async def test_a_half_done_renewal_keeps_the_previous_material(tmp_path):
    """A renewal replaces the key, then the certificate: in between, the pair does not
    match and the link keeps what it has; once both are new, it takes them."""
    d = tmp_path / "tls"
    pki.init(d, [("lyon", "in_house")])
    link = Link(EtcdSettings(endpoints=("https://127.0.0.1:1",), **site_files(d)))
    first = link.tls_version
    assert link.client().tls.trust_domain == "tandem"  # a Tandem identity: the server must be etcd's
    old_cert = (d / "site-lyon.crt").read_bytes()
    pki.issue(d, "site", "lyon")  # a new pair; then the old certificate back beside the new key
    new_cert = (d / "site-lyon.crt").read_bytes()
    (d / "site-lyon.crt").write_bytes(old_cert)
    assert not link._refresh_tls() and link.tls_version == first
    (d / "site-lyon.crt").write_bytes(new_cert)
    assert link._refresh_tls() and link.tls_version != first
    await link.close()


@pytest.mark.parametrize("how", ["https", "ca"])
async def test_a_node_with_its_tls_dir_joins_etcd_over_mtls(server, tls, tmp_path, how):
    """``how``: ``--etcd https://…``, or ``--etcd 127.0.0.1:PORT --etcd-ca DIR/ca.crt``
    (TLS on through the CA, as EtcdSettings decides: the node presents its certificate)."""
    prefix = test_prefix()
    endpoint = server.url if how == "https" else server.endpoint
    args = ["--tls-dir", str(tls), "--etcd", endpoint, "--etcd-prefix", prefix, "--etcd-ttl", str(TTL_S),
            "--sync", "none"]
    if how == "ca":
        args += ["--etcd-ca", str(tls / "ca.crt")]
    env = dict(os.environ, TANDEM_DRAIN_S="0.2")
    env = {k: v for k, v in env.items() if not k.startswith("TANDEM_ETCD_")}  # nothing else given
    node = spawn_node(ROOT / "sites" / "lyon.yaml", tmp_path / "lyon", extra_args=args, env=env)
    observer = EtcdCoordinator("observer", settings(server, prefix, **site_files(tls)))
    try:
        wait_listening([node], 30)
        await observer.start()
        await observer.wait_ready(5)

        async def registered():
            return (await observer.list_members()).get("lyon")

        member = await until(registered, 15, "the lyon node to register", step=0.1)
        assert member.address == node.address and member.pid == node.pid
        log = node.log_path.read_text(errors="replace")
        assert "etcd session" in log and f"at {endpoint}" in log and " ERROR " not in log, log
        assert stop_nodes([node], 10) == {"lyon": 0}

        async def left():
            return "lyon" not in await observer.list_members()

        await until(left, TTL_S + 3, "the stopped node to leave the membership", step=0.1)
    finally:
        stop_nodes([node], 5)
        await observer.close()
