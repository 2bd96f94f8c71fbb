"""The connection to etcd: settings, a TLS-capable aetcd client, endpoint failover and
the one place where client errors become :class:`CoordinationUnavailable`.

aetcd 1.0 connects to one ``host:port`` over an insecure channel. :class:`_Client`
opens the channel itself (TLS with a CA, client certificate and key when configured),
and :class:`Link` spreads over several endpoints: after a connection failure or a
timeout it drops the channel and the next operation goes to the next endpoint (with a
single endpoint this re-creates the channel, which also resets gRPC's reconnect
backoff). Watches and leases opened on the dropped channel fail, and the loops that own
them start over on the new one.

TLS material is read again from its files for every new client when a file's mtime or
size changed (``tandem certs renew``), and a client made with outdated material is
replaced at the next operation: no handshake, not even one of gRPC's own reconnects,
presents a certificate that was renewed. A renewal caught half done (new key, old
certificate) leaves the previous material in force until the pair matches. When the client certificate is a
Tandem identity (a SPIFFE ID ``spiffe://TD/KIND/NAME`` in its URI SAN) and the CA file
is the Tandem CA of that trust domain (URI SAN ``spiffe://TD``), i.e. the material comes
from a Tandem TLS dir, the server must be an etcd member of the same trust domain: a TLS
handshake made before the channel reads the server's SPIFFE ID (kind ``etcd``, name
``NAME``), and the channel then checks, at every handshake, the DNS SAN
``NAME.etcd.TD`` (``grpc.ssl_target_name_override``) instead of the endpoint's host
name, which every leaf of the CA carries (127.0.0.1, localhost). Another identity of
the CA at an endpoint is refused (:class:`ServerIdentityError`). Other material
(another PKI) keeps the usual host name check.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aetcd
import grpc
from aetcd import rpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from router.coord.base import CoordinationUnavailable
from router.coord.keys import DEFAULT_PREFIX, Keys

log = logging.getLogger("tandem.coord")
T = TypeVar("T")


class EtcdSettings(BaseModel):
    """How to reach etcd. ``endpoints``: ``host:port``, ``http://host:port`` or
    ``https://host:port`` (https = TLS). TLS also when ``ca_file`` is set; ``cert_file``
    and ``key_file`` give a client certificate (both or neither)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    prefix: str = DEFAULT_PREFIX
    ttl_s: int = Field(3, ge=1, le=3600)  # session lease TTL
    op_timeout_s: float = Field(2.0, gt=0, le=60)  # one etcd operation
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = None
    load_max_rate: float = Field(4.0, gt=0, le=100)  # load publications per second
    load_heartbeat_s: float = Field(1.0, gt=0, le=60)  # re-publish an unchanged load

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("at least one endpoint is needed")
        for e in v:
            _split_endpoint(e)
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        Keys(v)
        return v

    @model_validator(mode="after")
    def _tls(self) -> "EtcdSettings":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        return self

    @property
    def tls(self) -> bool:
        return self.wants_tls(self.endpoints, self.ca_file, self.cert_file)

    @staticmethod
    def wants_tls(endpoints: Iterable[str], ca_file: str | None = None, cert_file: str | None = None) -> bool:
        """The rule of :attr:`tls`: TLS when a CA or a client certificate is given, or an
        endpoint is ``https://``."""
        return bool(ca_file) or bool(cert_file) or any(str(e).startswith("https://") for e in endpoints)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> "EtcdSettings":
        """Settings from ``TANDEM_ETCD_ENDPOINTS`` (comma-separated), ``TANDEM_ETCD_PREFIX``,
        ``TANDEM_ETCD_TTL``, ``TANDEM_ETCD_CA``, ``TANDEM_ETCD_CERT``, ``TANDEM_ETCD_KEY``,
        ``TANDEM_ETCD_USER`` / ``TANDEM_ETCD_PASSWORD``; keyword arguments win."""
        env = os.environ if env is None else env
        kw: dict = {}
        if env.get("TANDEM_ETCD_ENDPOINTS"):
            kw["endpoints"] = tuple(e.strip() for e in env["TANDEM_ETCD_ENDPOINTS"].split(",") if e.strip())
        for var, name in (
            ("TANDEM_ETCD_PREFIX", "prefix"), ("TANDEM_ETCD_TTL", "ttl_s"),
            ("TANDEM_ETCD_CA", "ca_file"), ("TANDEM_ETCD_CERT", "cert_file"),
            ("TANDEM_ETCD_KEY", "key_file"), ("TANDEM_ETCD_USER", "username"),
            ("TANDEM_ETCD_PASSWORD", "password"),
        ):
            if env.get(var):
                kw[name] = env[var]
        kw.update(overrides)
        return cls(**kw)


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    e = endpoint
    for scheme in ("http://", "https://"):
        if e.startswith(scheme):
            e = e[len(scheme):]
    e = e.rstrip("/")
    host, sep, port = e.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint must be host:port (optionally http:// or https://), got {endpoint!r}")
    return host.strip("[]"), int(port)


# Reconnect quickly once etcd is back, and give up a hanging connect soon.
_CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.min_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.enable_retries": 0,
}


class _Client(aetcd.Client):
    """aetcd.Client that opens its channel with TLS credentials when given.

    Replaces ``aetcd.Client.connect`` (aetcd 1.0 builds only insecure channels); the
    rest of the client is unchanged. Pinned to aetcd 1.0.x in pyproject.toml because
    it sets the attributes that ``connect`` sets there.
    """

    def __init__(self, target: str, tls: _Tls | None, settings: EtcdSettings) -> None:
        host, port = _split_endpoint(target)
        super().__init__(
            host=host, port=port, username=settings.username, password=settings.password,
            timeout=settings.op_timeout_s, options=dict(_CHANNEL_OPTIONS),
            connect_wait_timeout=settings.op_timeout_s,
        )
        self._target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.tls = tls
        self.server_identity: str | None = None  # the server's SPIFFE ID, once checked

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            opts = list(self._options.items())
            if self.tls is not None:
                if self.tls.trust_domain is not None:
                    name = await self._check_server(self.tls)
                    # every handshake of the channel (gRPC reconnects too) checks this name
                    opts.append(("grpc.ssl_target_name_override", f"{name}.{SERVER_KIND}.{self.tls.trust_domain}"))
                self.channel = rpc.secure_channel(self._target, self.tls.credentials, options=opts)
            else:
                self.channel = rpc.insecure_channel(self._target, options=opts)
            if self._username is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                resp = await self.auth_stub.Authenticate(
                    rpc.AuthenticateRequest(name=self._username, password=self._password),
                    timeout=self._timeout,
                )
                self.metadata = (("token", resp.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)
            self._connected.set()
        except rpc.AioRpcError as e:
            aetcd.exceptions._handle_exception(e)
        finally:
            self._is_connecting = False

    async def _check_server(self, tls: _Tls) -> str:
        """Handshake with the endpoint and read the server's SPIFFE ID: it must be an
        ``etcd`` identity of ``tls.trust_domain``. Returns its name; ServerIdentityError
        otherwise (ssl.SSLError, OSError when the handshake fails)."""
        host, port = self._host, self._port
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=tls.ssl_context, server_hostname=host),
                self._timeout,
            )
        except ValueError as e:
            raise ConnectionError(f"TLS handshake with {self._target} failed: {e}") from e
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            cert = x509.load_der_x509_certificate(der) if der else None
        except ValueError as e:  # e.g. the server aborted the handshake: it refused our certificate
            raise ConnectionError(f"TLS handshake with {self._target} failed: {e}") from e
        finally:
            writer.close()
            await quietly(writer.wait_closed())
        if cert is None:
            raise ConnectionError(f"TLS handshake with {self._target} failed: no server certificate")
        ident = _spiffe_id(cert)
        if ident is None or ident[0] != tls.trust_domain or ident[1] != SERVER_KIND:
            shown = "spiffe://" + "/".join(ident) if ident else "a certificate without a Tandem SPIFFE ID"
            log.warning("etcd endpoint %s presented %s, not an etcd identity of trust domain %s: refused",
                        self._target, shown, tls.trust_domain)
            raise ServerIdentityError(f"the server at {self._target} is {shown}, not an etcd member "
                                      f"(spiffe://{tls.trust_domain}/{SERVER_KIND}/NAME)")
        self.server_identity = "spiffe://" + "/".join(ident)
        return ident[2]


# --- TLS material ------------------------------------------------------------------------

SERVER_KIND = "etcd"  # the SPIFFE kind an etcd member's certificate has (router.security.spiffe)
_SPIFFE = re.compile(r"spiffe://([a-z0-9.-]+)/([a-z]+)/([a-z0-9-]+)")


class ServerIdentityError(ConnectionError):
    """The server at an endpoint is not an etcd member of the cluster."""


class TlsMaterialError(Exception):
    """The TLS files cannot be used together (the key does not belong to the certificate,
    or they changed while being read): read them again later."""


def _spiffe_id(cert: x509.Certificate) -> tuple[str, str, str] | None:
    """(trust domain, kind, name) of a certificate's single SPIFFE URI SAN, else None."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    m = _SPIFFE.fullmatch(uris[0]) if len(uris) == 1 else None
    return (m.group(1), m.group(2), m.group(3)) if m else None


def _is_tandem_ca(ca_pem: bytes, trust_domain: str) -> bool:
    """Whether the CA file holds the CA of a Tandem TLS dir of ``trust_domain`` (its URI
    SAN is ``spiffe://TRUST_DOMAIN``)."""
    try:
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        return False
    for ca in cas:
        try:
            sans = ca.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            continue
        if f"spiffe://{trust_domain}" in sans.get_values_for_type(x509.UniformResourceIdentifier):
            return True
    return False


def _stat(path: str | None) -> tuple[int, int]:
    if not path:
        return (0, 0)
    try:
        st = os.stat(path)
    except OSError:
        return (0, -1)
    return (st.st_mtime_ns, st.st_size)


@dataclass(frozen=True)
class _Tls:
    """TLS material as read at one ``version`` of the files."""

    version: tuple
    credentials: grpc.ChannelCredentials
    trust_domain: str | None  # set: the client is a Tandem identity, the server must be etcd's
    ssl_context: ssl.SSLContext | None  # for the server check (same files)


class _TlsFiles:
    """The CA, client certificate and key files of the settings."""

    def __init__(self, settings: EtcdSettings) -> None:
        self.ca_file, self.cert_file, self.key_file = settings.ca_file, settings.cert_file, settings.key_file

    def version(self) -> tuple:
        """Changes whenever one of the files does (mtime or size)."""
        return (_stat(self.ca_file), _stat(self.cert_file), _stat(self.key_file))

    def load(self) -> _Tls:
        """Read the files (OSError when one cannot be read; TlsMaterialError when the key
        does not belong to the certificate, e.g. read between the two replacements of a
        renewal, or a file changed while being read)."""
        version = self.version()
        ca = Path(self.ca_file).read_bytes() if self.ca_file else None
        cert = Path(self.cert_file).read_bytes() if self.cert_file else None
        key = Path(self.key_file).read_bytes() if self.key_file else None
        trust_domain, ctx = None, None
        if cert is not None and key is not None:
            try:
                c = x509.load_pem_x509_certificate(cert)
                k = serialization.load_pem_private_key(key, password=None)
            except (ValueError, TypeError) as e:
                raise TlsMaterialError(f"{self.cert_file} / {self.key_file}: {e}") from None
            fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            if c.public_key().public_bytes(*fmt) != k.public_key().public_bytes(*fmt):
                raise TlsMaterialError(f"{self.key_file} does not belong to {self.cert_file}")
            ident = _spiffe_id(c)
            if ident is not None and ca is not None and _is_tandem_ca(ca, ident[0]):
                trust_domain = ident[0]
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False  # the identity is checked instead (_check_server)
                ctx.verify_mode = ssl.CERT_REQUIRED
                ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
                ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.version() != version:
            raise TlsMaterialError("the TLS files changed while being read")
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        return _Tls(version, creds, trust_domain, ctx)

    def load_settled(self, wait_s: float = 1.0) -> _Tls:
        """:meth:`load`, retried for up to ``wait_s`` while the files are inconsistent."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self.load()
            except TlsMaterialError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


class LeaseGone(CoordinationUnavailable):
    """The lease a write named no longer exists (the session is lost)."""


# Errors that mean "the store did not answer": drop the channel, try the next endpoint.
_CONNECTION_ERRORS = (
    aetcd.ConnectionFailedError,
    aetcd.ConnectionTimeoutError,
    aetcd.WatchTimeoutError,
    aetcd.InternalError,
    asyncio.TimeoutError,
    grpc.RpcError,
    OSError,
)


class Link:
    """The current aetcd client and the endpoint it talks to.

    :meth:`run` runs one operation with a deadline and maps every failure to
    :class:`CoordinationUnavailable` (:class:`LeaseGone` when etcd says the lease is
    not found). Connection failures and timeouts drop the client so that the next
    operation reconnects, to the next endpoint.
    """

    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        self._files = _TlsFiles(settings) if settings.tls else None
        self._tls = self._files.load_settled() if self._files is not None else None
        self._unusable: tuple | None = None  # a version of the files that could not be loaded
        self._index = 0
        self._client: _Client | None = None
        self.generation = 0  # bumped on every reset: watches compare it
        self._closing: set[asyncio.Task] = set()

    @property
    def endpoint(self) -> str:
        return self.settings.endpoints[self._index]

    def client(self) -> _Client:
        if self._client is None:
            self._refresh_tls()
            self._client = _Client(self.endpoint, self._tls, self.settings)
        return self._client

    @property
    def tls_version(self) -> tuple | None:
        """The version (mtimes and sizes) of the TLS files in use (None: no TLS)."""
        return self._tls.version if self._tls is not None else None

    def _refresh_tls(self) -> bool:
        """Read the TLS files again if they changed; True when new material was taken.
        Files that cannot be used (a renewal half done, a file missing) leave the current
        material in force, and are tried again once they change."""
        if self._files is None or self._tls is None:
            return False
        v = self._files.version()
        if v == self._tls.version or v == self._unusable:
            return False
        try:
            self._tls = self._files.load()
        except (OSError, TlsMaterialError, ssl.SSLError) as e:
            if v != self._unusable:
                log.warning("etcd TLS files changed but cannot be used yet (keeping the previous ones): %s", e)
            self._unusable = v
            return False
        self._unusable = None
        log.info("etcd TLS files reloaded (%s)", self.settings.cert_file or self.settings.ca_file)
        return True

    def _replace_outdated_client(self) -> None:
        # A renewed certificate: the current channel would present the old one at its
        # next handshake (a reconnect of its own), so open a new client now.
        if self._refresh_tls() and self._client is not None and self._client.tls is not self._tls:
            self.reset(why="TLS files renewed", rotate=False)

    def reset(self, generation: int | None = None, why: str = "", rotate: bool = True) -> None:
        """Drop the client (if ``generation`` is still current) and move to the next
        endpoint (unless not ``rotate``); in-flight operations and watches on it fail."""
        if generation is not None and generation != self.generation:
            return
        old, self._client = self._client, None
        self.generation += 1
        if rotate and len(self.settings.endpoints) > 1:
            self._index = (self._index + 1) % len(self.settings.endpoints)
        if why:
            log.debug("etcd link reset (%s); next endpoint %s", why, self.endpoint)
        if old is not None:
            t = asyncio.get_running_loop().create_task(self._close(old))
            self._closing.add(t)
            t.add_done_callback(self._closing.discard)

    async def _close(self, client: _Client) -> None:
        await quietly(client.close(), 2.0)

    async def run(self, what: str, op: Callable[[_Client], Awaitable[T]], timeout: float | None = None) -> T:
        self._replace_outdated_client()
        gen = self.generation
        endpoint = self.endpoint
        try:
            result = await asyncio.wait_for(op(self.client()), timeout or self.settings.op_timeout_s)
            _raise_if_cancelling()
            return result
        except aetcd.ClientError as e:
            if "lease not found" in str(e):
                raise LeaseGone(f"{what}: the session lease is gone") from e
            if isinstance(e, _CONNECTION_ERRORS):
                self.reset(gen, f"{what}: {type(e).__name__}")
            raise CoordinationUnavailable(f"{what}: etcd at {endpoint} failed: {type(e).__name__}: {e}") from e
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled
            # grpc.aio cancels the calls of a channel closed under them (a reset).
            raise CoordinationUnavailable(f"{what}: etcd connection to {endpoint} was reset") from None
        except _CONNECTION_ERRORS as e:
            self.reset(gen, f"{what}: {type(e).__name__}")
            if isinstance(e, ServerIdentityError):
                kind = f"refused: {e}"
            elif isinstance(e, asyncio.TimeoutError):
                kind = "did not answer in time"
            else:
                kind = f"unreachable: {e}"
            raise CoordinationUnavailable(f"{what}: etcd at {endpoint} {kind}") from e

    async def watch(self, what: str, key: bytes, range_end: bytes | None = None,
                    start_revision: int | None = None) -> EventStream:
        """Open a watch (from ``start_revision``) on the current client."""
        return await self.run(what, lambda c: EventStream()._open(c, key, range_end, start_revision))

    async def close(self) -> None:
        old, self._client = self._client, None
        self.generation += 1
        if old is not None:
            await self._close(old)
        for t in list(self._closing):
            await t


class WatchEnded(Exception):
    """The watch stream ended (its channel was closed or it broke): start over."""


class EventStream:
    """The events of one etcd watch, through a queue we own.

    aetcd's own ``Watch`` iterator (nested async generators) has been seen not to
    finish when its task is cancelled, which hung ``close()``; waiting on a plain
    queue is always cancellable. ``async for ev in stream`` yields aetcd ``Event``s
    and raises :class:`WatchEnded` when the stream ends or breaks.
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._watcher: aetcd.Watcher | None = None
        self._watch_id: int | None = None

    async def _open(self, client: "_Client", key: bytes, range_end: bytes | None, start_revision: int | None) -> "EventStream":
        await client.connect()
        self._watcher = client._watcher

        async def deliver(item) -> None:  # an Event, an exception, or None at shutdown
            self._queue.put_nowait(item)

        cb = await self._watcher.add_callback(key, deliver, range_end=range_end, start_revision=start_revision)
        self._watch_id = cb.watch_id
        return self

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self):
        item = await self._queue.get()
        if item is None or isinstance(item, BaseException):
            raise WatchEnded(repr(item)) from (item if isinstance(item, BaseException) else None)
        return item

    async def cancel(self) -> None:
        if self._watcher is not None and self._watch_id is not None:
            await quietly(self._watcher.cancel(self._watch_id))
            self._watch_id = None


def _raise_if_cancelling() -> None:
    # Python 3.11's wait_for returns the result, and drops the cancellation, when the
    # awaited operation completes just as the caller is cancelled; restore it, or the
    # cancelled task would carry on (and close() would wait for it forever).
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def quietly(aw: Awaitable, timeout: float = 1.0) -> None:
    """Await a clean-up step (cancel a watch, close a channel) for at most ``timeout``,
    ignoring its errors but not the cancellation of the caller."""
    try:
        await asyncio.wait_for(aw, timeout)
        _raise_if_cancelling()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except Exception:  # noqa: BLE001 - the channel or stream is gone anyway
        pass


async def cancel_all(tasks: set[asyncio.Task]) -> None:
    """Cancel tasks and wait until they are done, cancelling again any that swallowed
    the cancellation (see _raise_if_cancelling)."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)


class Backoff:
    """Exponential backoff with jitter, for loops that retry through an outage."""

    def __init__(self, first: float = 0.1, cap: float = 2.0) -> None:
        self.first, self.cap, self._next = first, cap, first

    def reset(self) -> None:
        self._next = self.first

    def delay(self) -> float:
        d = self._next * random.uniform(0.8, 1.2)
        self._next = min(self.cap, self._next * 2)
        return d

    async def sleep(self) -> None:
        await asyncio.sleep(self.delay())
