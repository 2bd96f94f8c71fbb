"""Certificates of the SPIFFE identities (``router.security.pki``, ``tandem certs``): real
certificates, checked field by field, and used for real mutual TLS with a grpc.aio server.

What the server sees of a client (grpcio 1.85): ``context.auth_context()`` carries the
client's SPIFFE ID under ``peer_spiffe_id`` (set by gRPC core only when the certificate has
exactly one URI SAN and it is a valid SPIFFE ID), and also under ``peer_uri``; the URI is
among ``x509_subject_alternative_name`` too, mixed with the DNS and IP SANs.
"""

from __future__ import annotations

import json
import shutil
import stat
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from router.cli import app
from router.security import bindings, certs_cli, pki, spiffe
from router.security.spiffe import SpiffeId
from router.v1 import diagnostics_pb2, diagnostics_pb2_grpc

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
SITES = [("lyon", "in_house"), ("montreal", "in_house"), ("callpro", "partner")]
LEAF_STEMS = ["site-lyon", "agents-lyon", "site-montreal", "agents-montreal", "site-callpro", "agents-callpro",
              "operator-admin"]
runner = CliRunner()


def cert_of(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def san(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cli(*args: str):
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> Path:
    """One CA with the three example sites (read-only for the tests that share it)."""
    d = tmp_path_factory.mktemp("pki") / "tls"
    pki.init(d, SITES)
    return d


@pytest.fixture(scope="module")
def other_tls(tmp_path_factory) -> Path:
    """Another CA with the same identities: its certificates must be refused."""
    d = tmp_path_factory.mktemp("pki-other") / "tls"
    pki.init(d, SITES)
    return d


@pytest.fixture
def own_tls(tmp_path) -> Path:
    """A directory of one's own, for tests that change it."""
    d = tmp_path / "tls"
    pki.init(d, [("lyon", "in_house")])
    return d


# --------------------------------------------------------------------------- files


def test_init_writes_the_layout_with_private_modes(tmp_path):
    d = tmp_path / "a" / "tls"
    written = pki.init(d, SITES)
    assert [p.name for p in written[:2]] == ["ca.crt", "ca.key"]
    assert {p.name for p in written} == ({"ca.crt", "ca.key", "bindings.json"}
                                         | {f"{s}.{ext}" for s in LEAF_STEMS for ext in ("crt", "key")})
    assert all(p.is_file() for p in written)
    assert mode(d) == 0o700
    for p in d.iterdir():
        assert mode(p) == (0o600 if p.suffix == ".key" else 0o644), p
    assert not list(d.glob(".*")), "no temporary file left behind"
    assert (d / "bindings.json").read_text() == bindings.dumps(bindings.starter("tandem", SITES))
    b = bindings.load_file(d / "bindings.json")
    assert [x.role for x in b.roles_of("spiffe://tandem/agents/lyon")] == ["agent-gateway"]


def test_init_refuses_an_existing_ca_unless_forced(own_tls):
    ca_before = (own_tls / "ca.crt").read_bytes()
    with pytest.raises(pki.PkiError, match="already exists"):
        pki.init(own_tls, [("lyon", "in_house")])
    assert (own_tls / "ca.crt").read_bytes() == ca_before
    pki.init(own_tls, [("lyon", "in_house")], force=True)
    assert (own_tls / "ca.crt").read_bytes() != ca_before
    leaf = cert_of(own_tls / "site-lyon.crt")
    leaf.verify_directly_issued_by(cert_of(own_tls / "ca.crt"))


@pytest.mark.parametrize("sites, match", [
    ([("Lyon", "in_house")], "bad site name"),
    ([("lyon", "remote")], "bad kind"),
    ([("lyon", "in_house"), ("lyon", "partner")], "duplicate"),
])
def test_init_rejects_bad_input_before_writing(tmp_path, sites, match):
    with pytest.raises(pki.PkiError, match=match):
        pki.init(tmp_path / "tls", sites)
    assert not (tmp_path / "tls").exists()


def test_the_ca(tls):
    ca = cert_of(tls / "ca.crt")
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Tandem CA (tandem)"
    assert ca.issuer == ca.subject
    assert san(ca).get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://tandem"]
    assert pki.trust_domain_of(tls) == "tandem"
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    life = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert timedelta(days=365) <= life <= timedelta(days=365, minutes=6)
    ca.verify_directly_issued_by(ca)


@pytest.mark.parametrize("stem", LEAF_STEMS)
def test_every_leaf(tls, stem):
    kind, _, name = stem.partition("-")
    ident = SpiffeId("tandem", kind, name)
    pem = (tls / f"{stem}.crt").read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    cert.verify_directly_issued_by(cert_of(tls / "ca.crt"))
    s = san(cert)
    assert s.get_values_for_type(x509.UniformResourceIdentifier) == [ident.uri]
    any_site = [f"site.{ident.trust_domain}"] if ident.kind == "site" else []
    assert s.get_values_for_type(x509.DNSName) == [ident.dns_name, "localhost", *any_site]
    assert [str(a) for a in s.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == ident.dns_name
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    eku = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    if kind == "site":
        assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert pki.identity_of(pem) == ident
    now = datetime.now(timezone.utc)
    assert abs(cert.not_valid_before_utc - (now - timedelta(minutes=5))) < timedelta(seconds=60)
    assert abs(pki.expires_at(pem) - (now + timedelta(days=7))) < timedelta(seconds=60)
    cert_pem, key_pem = pki.load_pair(tls, stem)
    assert cert_pem == pem and pki.key_matches(cert_pem, key_pem)


def _self_signed(uris: list[str]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    now = datetime.now(timezone.utc)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
         .serial_number(1).not_valid_before(now).not_valid_after(now + timedelta(days=1)))
    if uris:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("uris", [[], ["spiffe://tandem/site/a", "spiffe://tandem/site/b"], ["spiffe://tandem"],
                                  ["https://example.org/site/a"]])
def test_identity_of_wants_exactly_one_spiffe_uri(uris):
    with pytest.raises(spiffe.IdentityError):
        pki.identity_of(_self_signed(uris))
    assert pki.identity_of(_self_signed(["spiffe://tandem/partner/acme"])) == SpiffeId("tandem", "partner", "acme")


def test_issue_takes_the_trust_domain_from_the_ca(tmp_path):
    d = tmp_path / "tls"
    pki.init(d, [("lyon", "in_house")], trust_domain="acme.example", hosts=("10.0.0.7", "node1.lan"))
    assert pki.identity_of((d / "site-lyon.crt").read_bytes()).uri == "spiffe://acme.example/site/lyon"
    path = pki.issue(d, "partner", "callpro", hosts=("192.0.2.1", "gw.callpro.example", "::1"), days=30)
    assert path == d / "partner-callpro.crt" and mode(d / "partner-callpro.key") == 0o600
    pem = path.read_bytes()
    assert pki.identity_of(pem) == SpiffeId("acme.example", "partner", "callpro")
    s = san(x509.load_pem_x509_certificate(pem))
    assert s.get_values_for_type(x509.DNSName) == ["callpro.partner.acme.example", "localhost", "gw.callpro.example"]
    assert [str(a) for a in s.get_values_for_type(x509.IPAddress)] == ["192.0.2.1", "::1"]
    assert abs(pki.expires_at(pem) - datetime.now(timezone.utc) - timedelta(days=30)) < timedelta(seconds=60)
    for kind in ("site", "operator", "agents", "etcd"):
        assert pki.identity_of(pki.issue(d, kind, "x1").read_bytes()).kind == kind


def eku_of(pem: bytes) -> set:
    return set(x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_an_etcd_member_identity_serves_and_dials(own_tls):
    """``etcd/NAME``: serverAuth + clientAuth like a site, names from --host, no ``site.*`` SAN;
    the other kinds keep their key usages."""
    path = pki.issue(own_tls, "etcd", "e1", hosts=("127.0.0.1", "10.0.0.5", "etcd1.lan"))
    assert path == own_tls / "etcd-e1.crt" and mode(own_tls / "etcd-e1.key") == 0o600
    pem = path.read_bytes()
    ident = pki.identity_of(pem)
    assert ident == SpiffeId("tandem", "etcd", "e1") and ident.uri == "spiffe://tandem/etcd/e1"
    assert ident.file_stem == "etcd-e1" and spiffe.parse("spiffe://tandem/etcd/e1") == ident
    cert = x509.load_pem_x509_certificate(pem)
    cert.verify_directly_issued_by(cert_of(own_tls / "ca.crt"))
    s = san(cert)
    assert s.get_values_for_type(x509.DNSName) == ["e1.etcd.tandem", "localhost", "etcd1.lan"]
    assert [str(a) for a in s.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.0.0.5"]
    assert eku_of(pem) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    pki.issue(own_tls, "partner", "acme")
    expected = {"site": {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH},
                "partner": {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH},
                "operator": {ExtendedKeyUsageOID.CLIENT_AUTH}, "agents": {ExtendedKeyUsageOID.CLIENT_AUTH}}
    for leaf in pki.leaves(own_tls):
        kind = leaf.stem.partition("-")[0]
        if kind != "etcd":
            assert eku_of(leaf.read_bytes()) == expected[kind], leaf.name
    # a leaf like the others: listed, shown, renewed with the same names
    assert own_tls / "etcd-e1.crt" in pki.leaves(own_tls)
    rows = {r["file"]: r for r in pki.describe(own_tls)}
    assert rows["etcd-e1.crt"]["identity"] == ident.uri and rows["etcd-e1.crt"]["status"] == "ok"
    assert own_tls / "etcd-e1.crt" in pki.renew(own_tls)
    assert san(cert_of(own_tls / "etcd-e1.crt")) == s
    with pytest.raises(pki.PkiError, match="bad etcd name"):
        pki.issue(own_tls, "etcd", "E1")


def test_cli_issue_etcd(own_tls):
    code, out, err = cli("certs", "issue", own_tls, "--etcd", "e2", "--host", "127.0.0.1", "--host", "etcd2.lan")
    assert code == 0 and out.strip() == str(own_tls / "etcd-e2.crt"), err
    pem = (own_tls / "etcd-e2.crt").read_bytes()
    assert pki.identity_of(pem).uri == "spiffe://tandem/etcd/e2"
    assert pki.sans_of(pem) == {"uri": ["spiffe://tandem/etcd/e2"], "dns": ["e2.etcd.tandem", "localhost", "etcd2.lan"],
                                "ip": ["127.0.0.1"]}
    code, _, err = cli("certs", "issue", own_tls, "--etcd", "e3", "--site", "x")
    assert code == 1 and "--etcd NAME" in err


def test_a_site_issued_after_init_gets_its_starter_bindings(own_tls):
    """`certs issue --site/--agents/--partner` for an identity init did not make (a site
    added later, as ansible/add-site.yml does) binds it as init would; nothing else."""
    path = own_tls / "bindings.json"

    def roles(ident: str) -> list[tuple[str, tuple[str, ...]]]:
        return [(b.role, b.sites) for b in bindings.load_file(path).roles_of(ident)]

    before = bindings.load_file(path)
    code, out, err = cli("certs", "issue", own_tls, "--site", "toronto")
    assert code == 0, err
    assert out.splitlines() == [str(own_tls / "site-toronto.crt"),
                                f"{path}: bound spiffe://tandem/site/toronto to site on *"]
    assert roles("spiffe://tandem/site/toronto") == [("site", ("*",))]
    assert cli("certs", "issue", own_tls, "--agents", "toronto")[0] == 0
    assert roles("spiffe://tandem/agents/toronto") == [("agent-gateway", ("toronto",))]
    assert cli("certs", "issue", own_tls, "--partner", "acme")[0] == 0
    assert roles("spiffe://tandem/partner/acme") == [("partner", ("*",))]
    after = bindings.load_file(path)
    assert after.bindings[:len(before.bindings)] == before.bindings and len(after.bindings) == len(before.bindings) + 3
    # re-issuing, another kind, or an identity the administrator bound otherwise: unchanged
    doc = json.loads(path.read_text())
    for b in doc["bindings"]:
        if b["identity"] == "spiffe://tandem/site/toronto":
            b["role"] = "viewer"
    path.write_text(json.dumps(doc))
    text = path.read_text()
    for args in (("--site", "toronto"), ("--site", "lyon"), ("--operator", "bob"), ("--monitor", "prom"),
                 ("--rebalancer", "r2")):
        code, out, err = cli("certs", "issue", own_tls, *args)
        assert code == 0 and len(out.splitlines()) == 1, (args, out, err)
    assert path.read_text() == text
    # a bindings file that does not parse: exit 1, nothing issued, the file as it was
    path.write_text("{not json")
    code, _, err = cli("certs", "issue", own_tls, "--site", "vancouver")
    assert code == 1 and "invalid bindings" in err and "nothing issued" in err
    assert not (own_tls / "site-vancouver.crt").exists() and path.read_text() == "{not json"
    # no bindings file (the etcd document is in force): the certificate only
    path.unlink()
    assert cli("certs", "issue", own_tls, "--site", "vancouver")[0] == 0 and not path.exists()


def test_issue_errors(tmp_path, own_tls):
    with pytest.raises(pki.PkiError, match="no CA"):
        pki.issue(tmp_path / "nothing", "operator", "bob")
    with pytest.raises(pki.PkiError, match="bad kind"):
        pki.issue(own_tls, "robot", "bob")
    with pytest.raises(pki.PkiError, match="bad operator name"):
        pki.issue(own_tls, "operator", "Bob Smith")
    with pytest.raises(pki.PkiError, match="bad host"):
        pki.issue(own_tls, "operator", "bob", hosts=("a b",))
    assert not (own_tls / "operator-bob.crt").exists()


def test_a_leaf_never_outlives_its_ca(tmp_path):
    d = tmp_path / "tls"
    pki.init(d, [], ca_days=2)
    pem = pki.issue(d, "operator", "bob", days=30).read_bytes()
    assert pki.expires_at(pem) <= cert_of(d / "ca.crt").not_valid_after_utc


# --------------------------------------------------------------------------- renewal


def test_renew_reissues_every_leaf_with_a_new_key_and_the_same_names(own_tls):
    pki.issue(own_tls, "partner", "acme", hosts=("gw.acme.example",), days=30)
    before = {p.stem: (p.read_bytes(), p.with_suffix(".key").read_bytes()) for p in pki.leaves(own_tls)}
    time.sleep(1.1)  # validity has a one-second resolution
    renewed = pki.renew(own_tls)
    assert sorted(p.stem for p in renewed) == sorted(before)
    for stem, (old_cert, old_key) in before.items():
        new_cert, new_key = pki.load_pair(own_tls, stem)
        assert new_key != old_key and new_cert != old_cert
        old, new = x509.load_pem_x509_certificate(old_cert), x509.load_pem_x509_certificate(new_cert)
        assert san(old) == san(new) and old.subject == new.subject
        assert new.not_valid_after_utc > old.not_valid_after_utc
        # the same lifetime as before (the partner's 30 days stay 30 days)
        assert (new.not_valid_after_utc - new.not_valid_before_utc) == (old.not_valid_after_utc
                                                                        - old.not_valid_before_utc)
        new.verify_directly_issued_by(cert_of(own_tls / "ca.crt"))
        assert mode(own_tls / f"{stem}.key") == 0o600
    assert not list(own_tls.glob(".*"))
    assert all(r["status"] == "ok" for r in pki.describe(own_tls))


def test_renew_within_days_only_takes_those_expiring(own_tls):
    pki.issue(own_tls, "operator", "bob", days=1)
    pki.issue(own_tls, "partner", "acme", days=60)
    assert [p.name for p in pki.renew(own_tls, within_days=2)] == ["operator-bob.crt"]
    assert sorted(p.name for p in pki.renew(own_tls, within_days=8)) == [
        "agents-lyon.crt", "operator-admin.crt", "operator-bob.crt", "site-lyon.crt"]
    assert pki.renew(own_tls, within_days=0) == []


def test_renew_after_a_new_ca_resigns_the_leaves(own_tls):
    pki.issue(own_tls, "partner", "acme")
    pki.init(own_tls, [("lyon", "in_house")], force=True)
    status = {r["file"]: r["status"] for r in pki.describe(own_tls)}
    assert status["partner-acme.crt"] == "not signed by ca.crt" and status["site-lyon.crt"] == "ok"
    pki.renew(own_tls)
    assert {r["status"] for r in pki.describe(own_tls)} == {"ok"}


def test_renew_without_a_ca_fails(tmp_path):
    with pytest.raises(pki.PkiError, match="no CA"):
        pki.renew(tmp_path)


def test_load_pair_retries_until_the_key_matches(own_tls):
    cert_pem, key_pem = pki.load_pair(own_tls, "site-lyon")
    other_key = (own_tls / "agents-lyon.key").read_bytes()
    (own_tls / "site-lyon.key").write_bytes(other_key)  # as between the two replacements of a renewal
    with pytest.raises(pki.PkiError, match="does not match"):
        pki.load_pair(own_tls, "site-lyon", attempts=2, delay_s=0.01)
    timer = threading.Timer(0.1, lambda: (own_tls / "site-lyon.key").write_bytes(key_pem))
    timer.start()
    try:
        assert pki.load_pair(own_tls, "site-lyon", attempts=50, delay_s=0.02) == (cert_pem, key_pem)
    finally:
        timer.join()
    with pytest.raises(pki.PkiError, match="missing"):
        pki.load_pair(own_tls, "site-nowhere", attempts=1)


# --------------------------------------------------------------------------- CLI


def test_cli_init_issue_renew_show(tmp_path):
    sites = tmp_path / "sites"
    sites.mkdir()
    for f in ("lyon.yaml", "callpro.yaml"):
        shutil.copy(ROOT / "sites" / f, sites / f)
    d = tmp_path / "tls"
    code, out, err = cli("certs", "init", d, "--sites", sites, "--host", "127.0.0.1", "--host", "node.lan")
    assert code == 0, err
    assert f"{d / 'ca.key'}" in out.splitlines()
    assert json.loads((d / "bindings.json").read_text()) == json.loads(
        bindings.dumps(bindings.starter("tandem", [("callpro", "partner"), ("lyon", "in_house")])))
    assert "node.lan" in san(cert_of(d / "site-lyon.crt")).get_values_for_type(x509.DNSName)

    code, out, err = cli("certs", "init", d, "--sites", sites)
    assert code == 1 and "already exists" in err and out == ""
    assert cli("certs", "init", d, "--sites", sites, "--force", "--trust-domain", "acme",
               "--host", "node.lan")[0] == 0
    assert pki.trust_domain_of(d) == "acme"

    code, out, err = cli("certs", "issue", d, "--partner", "bpo1", "--days", "3")
    assert code == 0 and out.splitlines()[0] == str(d / "partner-bpo1.crt"), err
    assert bindings.load_file(d / "bindings.json").roles_of("spiffe://acme/partner/bpo1")[0].role == "partner"
    assert pki.identity_of((d / "partner-bpo1.crt").read_bytes()).uri == "spiffe://acme/partner/bpo1"
    for args in ((), ("--operator", "a", "--site", "b")):
        code, _, err = cli("certs", "issue", d, *args)
        assert code == 1 and "exactly one of" in err
    code, _, err = cli("certs", "issue", tmp_path / "none", "--operator", "bob")
    assert code == 1 and "no CA" in err
    code, _, err = cli("certs", "issue", d, "--agents", "Not_A_Name")
    assert code == 1 and "bad agents name" in err

    code, out, err = cli("certs", "renew", d, "--within-days", "4")
    assert code == 0 and out.split() == [str(d / "partner-bpo1.crt")]
    code, out, err = cli("certs", "renew", d, "--within-days", "0.001")
    assert code == 0 and out == "" and "nothing to renew" in err
    assert cli("certs", "renew", tmp_path / "none")[0] == 1

    code, out, err = cli("certs", "show", d, "-o", "json")
    assert code == 0, err
    rows = {r["file"]: r for r in json.loads(out)}
    assert set(rows) == {"ca.crt", "partner-bpo1.crt", "site-lyon.crt", "agents-lyon.crt", "site-callpro.crt",
                         "agents-callpro.crt", "operator-admin.crt", "rebalancer-rebalancer.crt"}
    assert rows["site-lyon.crt"]["identity"] == "spiffe://acme/site/lyon"
    assert rows["site-lyon.crt"]["sans"]["dns"] == ["lyon.site.acme", "localhost", "site.acme", "node.lan"]
    assert all(r["status"] == "ok" for r in rows.values())
    code, out, err = cli("certs", "show", d)
    assert code == 0 and "spiffe://acme/partner/bpo1" in out and "lyon.site.acme" in out
    assert cli("certs", "show", d, "-o", "yaml")[0] == 1
    assert cli("certs", "show", tmp_path / "none")[0] == 1


def test_cli_init_reads_the_repository_sites_by_default(tmp_path):
    assert certs_cli.default_sites_dir() == ROOT / "sites"
    code, _, err = cli("certs", "init", tmp_path / "tls")
    assert code == 0, err
    names = {p.stem for p in (tmp_path / "tls").glob("site-*.crt")}
    assert names == {"site-lyon", "site-montreal", "site-callpro"}
    code, _, err = cli("certs", "init", tmp_path / "tls2", "--sites", tmp_path / "empty")
    assert code == 1 and "no sites directory" in err


# --------------------------------------------------------------------------- mTLS


class Echo(diagnostics_pb2_grpc.DiagnosticsServicer):
    def __init__(self) -> None:
        self.peers: list[dict[str, list[bytes]]] = []

    async def Echo(self, request, context):
        self.peers.append(context.auth_context())
        return diagnostics_pb2.EchoResponse(payload=request.payload)


class MtlsServer:
    def __init__(self, tls: Path, stem: str) -> None:
        self.tls, self.stem, self.echo = tls, stem, Echo()

    async def __aenter__(self) -> "MtlsServer":
        cert, key = pki.load_pair(self.tls, self.stem)
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=(self.tls / "ca.crt").read_bytes(),
                                            require_client_auth=True)
        self.server = grpc.aio.server()
        diagnostics_pb2_grpc.add_DiagnosticsServicer_to_server(self.echo, self.server)
        self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        await self.server.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.server.stop(None)

    async def echo_as(self, client_tls: Path, stem: str, target: str, ca: Path | None = None) -> bytes:
        """One Echo from the client identity ``client_tls/stem``, expecting the server to be ``target``."""
        cert, key = pki.load_pair(client_tls, stem)
        creds = grpc.ssl_channel_credentials((ca or client_tls / "ca.crt").read_bytes(), key, cert)
        async with grpc.aio.secure_channel(f"127.0.0.1:{self.port}", creds,
                                           options=[("grpc.ssl_target_name_override", target)]) as ch:
            r = await diagnostics_pb2_grpc.DiagnosticsStub(ch).Echo(diagnostics_pb2.EchoRequest(payload=b"ping"),
                                                                    timeout=5)
        return r.payload


LYON = SpiffeId("tandem", "site", "lyon")


async def test_mtls_carries_the_client_spiffe_id(tls):
    async with MtlsServer(tls, "site-lyon") as srv:
        for stem in ("operator-admin", "agents-lyon", "site-montreal"):
            assert await srv.echo_as(tls, stem, LYON.dns_name) == b"ping"
            peer = srv.echo.peers[-1]
            uri = SpiffeId("tandem", *stem.split("-", 1)).uri.encode()
            assert peer["transport_security_type"] == [b"ssl"]
            assert peer["peer_spiffe_id"] == [uri]  # the key to read the caller's identity from
            assert peer["peer_uri"] == [uri]
            assert uri in peer["x509_subject_alternative_name"]
            assert pki.identity_of(peer["x509_pem_cert"][0]).uri.encode() == uri
        # "localhost" and the IP are SANs of every leaf: the plain address works too
        assert await srv.echo_as(tls, "operator-admin", "localhost") == b"ping"


async def test_mtls_refuses_a_client_of_another_ca(tls, other_tls):
    async with MtlsServer(tls, "site-lyon") as srv:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            # same identity, same names, trusts the right server CA: only the issuer differs
            await srv.echo_as(other_tls, "operator-admin", LYON.dns_name, ca=tls / "ca.crt")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert srv.echo.peers == []


async def test_mtls_client_refuses_a_server_of_another_ca(tls, other_tls):
    async with MtlsServer(other_tls, "site-lyon") as srv:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await srv.echo_as(tls, "operator-admin", LYON.dns_name)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_client_refuses_the_wrong_site(tls):
    async with MtlsServer(tls, "site-lyon") as srv:
        for wrong in (SpiffeId("tandem", "site", "montreal"), SpiffeId("tandem", "agents", "lyon")):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await srv.echo_as(tls, "operator-admin", wrong.dns_name)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert srv.echo.peers == []


async def test_renewed_certificates_work_with_the_old_ones(own_tls):
    old_client = own_tls.parent / "old"
    old_client.mkdir()
    for f in ("ca.crt", "operator-admin.crt", "operator-admin.key"):
        shutil.copy2(own_tls / f, old_client / f)
    pki.renew(own_tls)
    async with MtlsServer(own_tls, "site-lyon") as srv:
        assert await srv.echo_as(old_client, "operator-admin", LYON.dns_name) == b"ping"
        assert await srv.echo_as(own_tls, "operator-admin", LYON.dns_name) == b"ping"


def test_cli_issue_clickhouse(own_tls):
    """``clickhouse/NAME``: a history server's identity, serverAuth + clientAuth, its own
    kind (not a site: it must never answer as "some site of the cluster")."""
    code, out, err = cli("certs", "issue", own_tls, "--clickhouse", "ch1", "--host", "127.0.0.1")
    assert code == 0, err
    pem = (own_tls / "clickhouse-ch1.crt").read_bytes()
    assert pki.identity_of(pem).uri == "spiffe://tandem/clickhouse/ch1"
    names = pki.sans_of(pem)["dns"]
    assert "ch1.clickhouse.tandem" in names and "site.tandem" not in names
