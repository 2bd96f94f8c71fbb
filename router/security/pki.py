"""The cluster's certificates: a small CA and one leaf certificate per SPIFFE identity.

A TLS directory (``tandem certs init DIR``) holds::

    ca.crt  ca.key                     the cluster's CA (EC P-256, 365 days)
    site-NAME.crt     site-NAME.key    a node: serverAuth + clientAuth
    agents-NAME.crt   agents-NAME.key  a site's peripheral gateway: clientAuth
    operator-NAME.crt operator-NAME.key
    partner-NAME.crt  partner-NAME.key (``tandem certs issue --partner``)
    etcd-NAME.crt     etcd-NAME.key    an etcd member: serverAuth + clientAuth
    clickhouse-NAME.crt clickhouse-NAME.key  a ClickHouse server of the history: the same
                                       (``tandem certs issue --etcd NAME --host …``)
    bindings.json                      the starter role bindings

Every leaf carries exactly one URI SAN, its SPIFFE ID (``spiffe://TRUST_DOMAIN/KIND/NAME``),
the DNS SANs ``NAME.KIND.TRUST_DOMAIN`` and ``localhost`` plus the host names it was issued
for, and IP SANs for the addresses it was issued for. Its subject CN is the DNS name. The
CA carries the URI SAN ``spiffe://TRUST_DOMAIN``, from which :func:`issue` and
:func:`renew` learn the trust domain. Lifetimes are short (leaves 7 days) on purpose:
:func:`renew` (``tandem certs renew DIR --within-days 2`` from a timer) re-issues them.

Writes are atomic per file (temporary file, fsync, ``os.replace``); a pair is replaced key
first, then certificate. A reader that loads between the two replacements sees a new key
with the old certificate: it must load the pair with :func:`load_pair`, which checks that
the key matches the certificate and retries. Key files are 0600, the directory 0700.

Only the ``cryptography`` package is used; nothing shells out to openssl.
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from router.security import bindings, spiffe
from router.security.spiffe import SpiffeId

LEAF_DAYS = 7
CA_DAYS = 365
SKEW = timedelta(minutes=5)  # not_valid_before = now - SKEW: peers' clocks differ a little
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
BINDINGS = "bindings.json"
# Kinds that also serve TLS (a node; a partner's gateway; an etcd member, which also dials
# its peers) get serverAuth besides clientAuth.
_SERVER_KINDS = frozenset({"site", "partner", "etcd", "clickhouse", "rebalancer"})


class PkiError(Exception):
    """A clear, user-facing error: no CA in the directory, a bad kind or name, a refusal."""


# --------------------------------------------------------------------------- reading


def load_cert(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise PkiError(f"not a PEM certificate: {e}") from None


def _uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def identity_of(cert_pem: bytes) -> SpiffeId:
    """The certificate's SPIFFE ID: its single URI SAN. IdentityError if it has none, several,
    or one that is not a Tandem SPIFFE ID."""
    uris = _uris(load_cert(cert_pem))
    if len(uris) != 1:
        raise spiffe.IdentityError(f"a certificate must carry exactly one URI SAN (its SPIFFE ID), found {uris}")
    return spiffe.parse(uris[0])


def expires_at(cert_pem: bytes) -> datetime:
    """not_valid_after, timezone-aware (UTC)."""
    return load_cert(cert_pem).not_valid_after_utc


def sans_of(cert_pem: bytes) -> dict[str, list[str]]:
    """``{"uri": [...], "dns": [...], "ip": [...]}``."""
    cert = load_cert(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return {"uri": [], "dns": [], "ip": []}
    return {
        "uri": san.get_values_for_type(x509.UniformResourceIdentifier),
        "dns": san.get_values_for_type(x509.DNSName),
        "ip": [str(a) for a in san.get_values_for_type(x509.IPAddress)],
    }


def _public_der(key_or_cert) -> bytes:
    pub = key_or_cert.public_key()
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_matches(cert_pem: bytes, key_pem: bytes) -> bool:
    """Whether the private key belongs to the certificate."""
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        return _public_der(load_cert(cert_pem)) == _public_der(key)
    except (ValueError, TypeError, PkiError):
        return False


def load_pair(directory: str | Path, stem: str, *, attempts: int = 5, delay_s: float = 0.05) -> tuple[bytes, bytes]:
    """``(cert_pem, key_pem)`` of ``DIR/STEM.crt`` and ``DIR/STEM.key``, retried until the key
    matches the certificate (a renewal replaces the key, then the certificate: a read in
    between sees a mismatch for an instant). PkiError if they never match or are missing."""
    d = Path(directory)
    last = "?"
    for i in range(max(1, attempts)):
        try:
            cert_pem = (d / f"{stem}.crt").read_bytes()
            key_pem = (d / f"{stem}.key").read_bytes()
        except FileNotFoundError as e:
            last = f"missing {e.filename}"
        else:
            if key_matches(cert_pem, key_pem):
                return cert_pem, key_pem
            last = "the key does not match the certificate"
        if i + 1 < attempts:
            time.sleep(delay_s)
    raise PkiError(f"{d / stem}.crt/.key: {last}")


# --------------------------------------------------------------------------- writing


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temp(path: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` to a fresh temporary file beside ``path`` (created with ``mode``)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # not narrowed or widened by the umask
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    os.replace(_write_temp(path, data, mode), path)
    _fsync_dir(path.parent)


def _write_pair(directory: Path, stem: str, cert_pem: bytes, key_pem: bytes) -> Path:
    """Both to temporary files first, then the key replaced, then the certificate."""
    key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.crt"
    key_tmp = _write_temp(key_path, key_pem, 0o600)
    try:
        cert_tmp = _write_temp(cert_path, cert_pem, 0o644)
    except BaseException:
        key_tmp.unlink(missing_ok=True)
        raise
    os.replace(key_tmp, key_path)
    os.replace(cert_tmp, cert_path)
    _fsync_dir(directory)
    return cert_path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# --------------------------------------------------------------------------- building


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _host_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for h in hosts:
        h = h.strip()
        if not h:
            continue
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h.strip("[]"))))
        except ValueError:
            if any(c.isspace() or c in "/:@" for c in h):
                raise PkiError(f"bad host {h!r} (a DNS name or an IP address)") from None
            out.append(x509.DNSName(h.lower()))
    return out


def _leaf_sans(ident: SpiffeId, hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(ident.uri), x509.DNSName(ident.dns_name),
                                     x509.DNSName("localhost")]
    if ident.kind == "site":
        # "some site of this cluster" (router.node.peers.any_site): what a node expects of
        # a transfer target that has left the membership since the transfer began.
        names.append(x509.DNSName(f"site.{ident.trust_domain}"))
    for n in _host_names(hosts):
        if n not in names:
            names.append(n)
    return names


def _identity(kind: str, name: str, trust_domain: str) -> SpiffeId:
    try:
        return SpiffeId(trust_domain, kind, name)
    except spiffe.IdentityError as e:
        raise PkiError(str(e)) from None


def _new_ca(trust_domain: str, days: float) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tandem"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"Tandem CA ({trust_domain})")])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - SKEW).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _sign_leaf(ca_cert: x509.Certificate, ca_key, ident: SpiffeId, sans: Sequence[x509.GeneralName],
               days: float) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)  # never outlive the CA
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if ident.kind in _SERVER_KINDS:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tandem"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, ident.dns_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - SKEW).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        # SPIFFE X.509-SVID: the SAN is critical only when the subject is empty; ours has a CN.
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _load_ca(directory: Path) -> tuple[x509.Certificate, object, str]:
    """The CA of DIR and its trust domain (from its URI SAN ``spiffe://TRUST_DOMAIN``)."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not cert_path.is_file() or not key_path.is_file():
        raise PkiError(f"no CA in {directory} (expected {CA_CERT} and {CA_KEY}; `tandem certs init {directory}`)")
    cert = load_cert(cert_path.read_bytes())
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise PkiError(f"{key_path}: not a usable private key: {e}") from None
    if _public_der(cert) != _public_der(key):
        raise PkiError(f"{key_path} does not match {cert_path}")
    uris = [u for u in _uris(cert) if u.startswith("spiffe://")]
    td = uris[0][len("spiffe://"):].rstrip("/") if len(uris) == 1 else ""
    if not spiffe.TRUST_DOMAIN_RE.match(td):
        raise PkiError(f"{cert_path}: no trust domain (expected one URI SAN spiffe://TRUST_DOMAIN)")
    return cert, key, td


def trust_domain_of(directory: str | Path) -> str:
    """The trust domain of DIR's CA."""
    return _load_ca(Path(directory))[2]


# --------------------------------------------------------------------------- API


def init(directory: str | Path, sites: Iterable[tuple[str, str]], trust_domain: str = spiffe.DEFAULT_TRUST_DOMAIN,
         hosts: Iterable[str] = DEFAULT_HOSTS, leaf_days: float = LEAF_DAYS, ca_days: float = CA_DAYS, *,
         operators: Iterable[str] = ("admin",), partners: Iterable[str] = (), rebalancers: Iterable[str] = (),
         force: bool = False) -> list[Path]:
    """A new CA in DIR (created 0700), then for every ``(name, kind)`` site (kind
    ``in_house`` or ``partner``) its ``site-NAME`` and ``agents-NAME`` certificates, an
    ``operator-NAME`` certificate per operator, a ``partner-NAME`` certificate per BPO
    partner on the partner API, a ``rebalancer-NAME`` certificate per rebalancer
    process (``tandem rebalancer``: a server, and an etcd client), and ``bindings.json`` (the starter bindings). Refuses when DIR already holds ``ca.key``, unless ``force`` (a new CA:
    certificates of the old one left in DIR stop being trusted; ``renew`` re-signs them).
    Returns the files written, CA first."""
    d = Path(directory)
    sites = [(n, "in_house" if k == "inhouse" else k) for n, k in sites]  # config.py spells it "inhouse"
    operators = list(operators)
    partners = list(partners)
    rebalancers = list(rebalancers)
    if not spiffe.TRUST_DOMAIN_RE.match(trust_domain or ""):
        raise PkiError(f"bad trust domain {trust_domain!r} (lower-case letters, digits, '.', '-')")
    for name, kind in sites:
        if kind not in ("in_house", "partner"):
            raise PkiError(f"bad kind {kind!r} of site {name!r} (in_house or partner)")
        _identity("site", name, trust_domain)
    for op in operators:
        _identity("operator", op, trust_domain)
    for p in partners:
        _identity("partner", p, trust_domain)
    for r in rebalancers:
        _identity("rebalancer", r, trust_domain)
    names = [n for n, _ in sites]
    if len(set(names)) != len(names):
        raise PkiError(f"duplicate site names {names}")
    hosts = list(hosts)
    _host_names(hosts)  # validate before anything is written
    if leaf_days <= 0 or ca_days <= 0:
        raise PkiError("lifetimes must be positive")
    if d.exists() and not d.is_dir():
        raise PkiError(f"{d} exists and is not a directory")
    if (d / CA_KEY).exists() and not force:
        raise PkiError(f"{d / CA_KEY} already exists: refusing to replace the CA (--force replaces it; "
                       f"every certificate it signed stops being trusted)")
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)

    ca_cert, ca_key = _new_ca(trust_domain, ca_days)
    _write_pair(d, "ca", ca_cert.public_bytes(serialization.Encoding.PEM), _key_pem(ca_key))
    written = [d / CA_CERT, d / CA_KEY]
    idents = [_identity(k, n, trust_domain) for n, _ in sites for k in ("site", "agents")]
    idents += [_identity("operator", op, trust_domain) for op in operators]
    idents += [_identity("partner", p, trust_domain) for p in partners]
    idents += [_identity("rebalancer", r, trust_domain) for r in rebalancers]
    for ident in idents:
        cert_pem, key_pem = _sign_leaf(ca_cert, ca_key, ident, _leaf_sans(ident, hosts), leaf_days)
        written += [_write_pair(d, ident.file_stem, cert_pem, key_pem), d / f"{ident.file_stem}.key"]
    doc = bindings.dumps(bindings.starter(trust_domain, sites, operators=operators, partners=partners))
    _write_atomic(d / BINDINGS, doc.encode(), 0o644)
    written.append(d / BINDINGS)
    return written


def issue(directory: str | Path, kind: str, name: str, hosts: Iterable[str] = DEFAULT_HOSTS,
          days: float = LEAF_DAYS) -> Path:
    """A new leaf ``DIR/KIND-NAME.crt`` (and ``.key``) signed by DIR's CA, in the CA's trust
    domain. Replaces an existing pair of that identity (new key). Returns the certificate's path."""
    d = Path(directory)
    if kind not in spiffe.KINDS:
        raise PkiError(f"bad kind {kind!r} (one of {', '.join(spiffe.KINDS)})")
    if days <= 0:
        raise PkiError("days must be positive")
    hosts = list(hosts)
    _host_names(hosts)
    ca_cert, ca_key, td = _load_ca(d)
    ident = _identity(kind, name, td)
    cert_pem, key_pem = _sign_leaf(ca_cert, ca_key, ident, _leaf_sans(ident, hosts), days)
    return _write_pair(d, ident.file_stem, cert_pem, key_pem)


def starter_update(directory: str | Path, kind: str, name: str) -> tuple[bindings.Binding, bindings.Bindings] | None:
    """What issuing ``KIND-NAME`` after ``init`` adds to ``DIR/bindings.json`` (a site
    added later must be let in): the starter binding of a site, agents gateway or partner
    identity and the document with it, for :func:`write_bindings`. None when DIR has no
    bindings file, the kind has no starter binding or the identity already holds one.
    PkiError when the file does not parse (nothing is written: check before issuing)."""
    d = Path(directory)
    path = d / BINDINGS
    if not path.exists():
        return None
    _ca_cert, _ca_key, td = _load_ca(d)
    new = bindings.starter_binding(_identity(kind, name, td))
    if new is None:
        return None
    try:
        merged = bindings.with_binding(bindings.load_file(path), new)
    except bindings.BindingsError as e:
        raise PkiError(f"{path}: {e}; nothing issued") from None
    return None if merged is None else (new, merged)


def write_bindings(directory: str | Path, doc: bindings.Bindings) -> Path:
    """Replace ``DIR/bindings.json`` atomically; returns its path."""
    path = Path(directory) / BINDINGS
    _write_atomic(path, bindings.dumps(doc).encode(), 0o644)
    return path


def leaves(directory: str | Path) -> list[Path]:
    """The leaf certificates in DIR (``KIND-NAME.crt``), sorted by name."""
    out = []
    for p in sorted(Path(directory).glob("*.crt")):
        kind, _, name = p.stem.partition("-")
        if p.name != CA_CERT and kind in spiffe.KINDS and name:
            out.append(p)
    return out


def renew(directory: str | Path, within_days: float | None = None, *, days: float | None = None) -> list[Path]:
    """Re-issue the leaves of DIR with DIR's CA: same identity and SANs, a new key, a new
    validity (``days``, default each certificate's own lifetime). With ``within_days``, only
    those expiring within that many days (expired ones included). Returns the certificates
    renewed. Every leaf is checked before any is written: PkiError names the bad ones."""
    d = Path(directory)
    ca_cert, ca_key, td = _load_ca(d)
    now = _now()
    plan: list[tuple[SpiffeId, list[x509.GeneralName], float]] = []
    bad: list[str] = []
    for path in leaves(d):
        try:
            pem = path.read_bytes()
            cert = load_cert(pem)
            ident = identity_of(pem)
        except (OSError, PkiError, spiffe.IdentityError) as e:
            bad.append(f"{path.name}: {e}")
            continue
        if ident.file_stem != path.stem:
            bad.append(f"{path.name}: holds {ident.uri}, expected a {path.stem} identity")
            continue
        if ident.trust_domain != td:
            bad.append(f"{path.name}: trust domain {ident.trust_domain!r}, the CA's is {td!r}")
            continue
        if within_days is not None and cert.not_valid_after_utc - now > timedelta(days=within_days):
            continue
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        lifetime = days
        if lifetime is None:
            span = cert.not_valid_after_utc - cert.not_valid_before_utc - SKEW
            lifetime = max(span.total_seconds() / 86400, 1 / 24)
        plan.append((ident, list(san), lifetime))
    if bad:
        raise PkiError("cannot renew:\n  " + "\n  ".join(bad))
    return [_write_pair(d, ident.file_stem, *_sign_leaf(ca_cert, ca_key, ident, sans, lifetime))
            for ident, sans, lifetime in plan]


def describe(directory: str | Path) -> list[dict]:
    """One dict per certificate in DIR (the CA first): file, identity, subject, not_before,
    expires (ISO 8601 UTC), days_left, sans, status (``ok``, ``expired``, ``not yet valid``,
    ``not signed by ca.crt``, ``key mismatch``, ``missing key``)."""
    d = Path(directory)
    if not d.is_dir():
        raise PkiError(f"no directory {d}")
    ca_path = d / CA_CERT
    ca = load_cert(ca_path.read_bytes()) if ca_path.is_file() else None
    now = datetime.now(timezone.utc)
    out = []
    for path in ([ca_path] if ca is not None else []) + leaves(d):
        pem = path.read_bytes()
        try:
            cert = load_cert(pem)
        except PkiError as e:
            out.append({"file": path.name, "identity": None, "status": str(e)})
            continue
        if path.name == CA_CERT:
            uris = _uris(cert)
            identity = uris[0] if len(uris) == 1 else None
        else:
            try:
                identity = identity_of(pem).uri
            except spiffe.IdentityError:
                identity = None
        status = "ok"
        key_path = path.with_suffix(".key")
        if not key_path.is_file():
            status = "missing key"
        elif not key_matches(pem, key_path.read_bytes()):
            status = "key mismatch"
        if ca is not None and status == "ok":
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                status = "not signed by ca.crt"
        if status == "ok" and cert.not_valid_after_utc <= now:
            status = "expired"
        if status == "ok" and cert.not_valid_before_utc > now:
            status = "not yet valid"
        if identity is None and status == "ok" and path.name != CA_CERT:
            status = "no SPIFFE ID"
        out.append({
            "file": path.name,
            "identity": identity,
            "subject": cert.subject.rfc4514_string(),
            "not_before": cert.not_valid_before_utc.isoformat(),
            "expires": cert.not_valid_after_utc.isoformat(),
            "days_left": round((cert.not_valid_after_utc - now).total_seconds() / 86400, 2),
            "sans": sans_of(pem),
            "status": status,
        })
    return out
