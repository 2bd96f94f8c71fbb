"""mTLS for gRPC servers and channels, from a TLS directory (``tandem certs init DIR``):
``DIR/ca.crt`` and one identity's ``DIR/STEM.crt`` + ``DIR/STEM.key`` (``site-lyon``,
``operator-admin``…).

* :func:`server_credentials` — a server that requires a client certificate from the
  cluster's CA; the files are read again when they change (rotation without a restart:
  gRPC asks for the configuration at every new handshake, and gets a new one only when
  a file's mtime or size changed).
* :class:`ChannelFactory` — channels with this identity's certificate, checking that the
  server is the identity the caller expects (``expect``: its DNS SAN
  ``NAME.KIND.TRUST_DOMAIN`` through ``grpc.ssl_target_name_override``; gRPC checks DNS
  and IP SANs, not URI SANs). Channels are made again once the files change.
  Without a TLS directory it makes plaintext channels (loopback development only).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from router.security import pki, spiffe

log = logging.getLogger("tandem.security")


class TlsConfigError(RuntimeError):
    """The TLS directory lacks a file or holds a certificate that does not fit."""


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (0, -1)
    return (st.st_mtime_ns, st.st_size)


@dataclass(frozen=True)
class Material:
    ca: bytes
    cert: bytes
    key: bytes
    identity: spiffe.SpiffeId


class TlsFiles:
    """One identity's files in a TLS directory. :meth:`load` reads them as a consistent
    set (a renewal replaces the key and the certificate one after the other: a pair that
    does not match is read again for up to a second)."""

    def __init__(self, directory: str | Path, stem: str) -> None:
        self.directory = Path(directory)
        self.stem = stem
        self.ca_path = self.directory / "ca.crt"
        self.cert_path = self.directory / f"{stem}.crt"
        self.key_path = self.directory / f"{stem}.key"

    def __repr__(self) -> str:
        return f"TlsFiles({str(self.directory)!r}, {self.stem!r})"

    def version(self) -> tuple:
        """Changes whenever one of the three files does."""
        return (_stat(self.ca_path), _stat(self.cert_path), _stat(self.key_path))

    def load(self) -> Material:
        try:
            ca = self.ca_path.read_bytes()
            # retried for up to a second while a renewal has replaced only the key
            cert, key = pki.load_pair(self.directory, self.stem, attempts=50, delay_s=0.02)
            return Material(ca, cert, key, pki.identity_of(cert))
        except OSError as e:
            raise TlsConfigError(f"TLS directory {self.directory}: {e.strerror}: {e.filename}") from None
        except (pki.PkiError, spiffe.IdentityError) as e:
            raise TlsConfigError(f"{self.cert_path}: {e}") from None


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """mTLS server credentials that pick up renewed files at the next handshake."""
    first = files.load()
    state = {"version": files.version()}

    def config(m: Material) -> Any:
        return grpc.ssl_server_certificate_configuration([(m.key, m.cert)], root_certificates=m.ca)

    def fetch() -> Any:
        v = files.version()
        if v == state["version"]:
            return None  # unchanged: gRPC keeps the current configuration
        try:
            m = files.load()
        except TlsConfigError as e:
            log.error("TLS files changed but cannot be used (keeping the previous ones): %s", e)
            return None
        state["version"] = v
        log.info("TLS: %s reloaded (%s)", files, m.identity)
        return config(m)

    return grpc.dynamic_ssl_server_credentials(config(first), fetch, require_client_authentication=True)


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost (host:port or [v6]:port)."""
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ChannelFactory:
    """Channels to Tandem servers: mTLS with ``files`` (None: plaintext), keyed by
    (address, expected identity), made again when the files change. ``close_all`` at
    exit. Old channels of a rotation are closed after ``grace_s``, so calls in flight on
    them finish."""

    def __init__(self, files: TlsFiles | None, options: tuple = (), grace_s: float = 30.0) -> None:
        self.files = files
        self.options = tuple(options)
        self.grace_s = grace_s
        self._version: tuple | None = None
        self._creds: grpc.ChannelCredentials | None = None
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self._retired: list[tuple[float, grpc.aio.Channel]] = []
        self.identity: spiffe.SpiffeId | None = files.load().identity if files is not None else None

    @property
    def secure(self) -> bool:
        return self.files is not None

    def expect(self, kind: str, name: str) -> spiffe.SpiffeId | None:
        """The identity ``kind/name`` in this factory's trust domain (None when plaintext)."""
        if self.identity is None:
            return None
        return spiffe.SpiffeId(self.identity.trust_domain, kind, name)

    def _refresh(self) -> None:
        assert self.files is not None
        v = self.files.version()
        if v == self._version and self._creds is not None:
            return
        m = self.files.load()
        self._creds = grpc.ssl_channel_credentials(root_certificates=m.ca, private_key=m.key, certificate_chain=m.cert)
        self.identity = m.identity
        if self._version is not None:
            now = time.monotonic()
            self._retired.extend((now, ch) for ch in self._channels.values())
            self._channels.clear()
        self._version = v

    def channel(self, address: str, expect: spiffe.SpiffeId | None = None) -> grpc.aio.Channel:
        """A channel to ``address``; with TLS, the server must prove ``expect`` (required)."""
        key = (address, expect.uri if expect is not None else "")
        if self.files is None:
            ch = self._channels.get(key)
            if ch is None:
                ch = self._channels[key] = grpc.aio.insecure_channel(address, options=self.options)
            return ch
        if expect is None:
            raise TlsConfigError(f"a TLS channel to {address} needs the identity it must reach")
        self._refresh()
        ch = self._channels.get(key)
        if ch is None:
            opts = (*self.options, ("grpc.ssl_target_name_override", expect.dns_name))
            ch = self._channels[key] = grpc.aio.secure_channel(address, self._creds, options=opts)
        return ch

    async def close_retired(self) -> None:
        now = time.monotonic()
        keep = []
        for at, ch in self._retired:
            if now - at >= self.grace_s:
                await ch.close()
            else:
                keep.append((at, ch))
        self._retired = keep

    async def close_all(self) -> None:
        chans = list(self._channels.values()) + [ch for _, ch in self._retired]
        self._channels.clear()
        self._retired.clear()
        for ch in chans:
            await ch.close()
