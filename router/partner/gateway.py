"""The partner API's client side (``proto/router/v1/partner.proto``): one
:class:`GatewaySession` per in-house node a partner's gateway takes calls from (each node
offers its own calls on its own stream).

    channels = Channels("blueline", tls_dir)           # None: plaintext (loopback development)
    s = GatewaySession(NodeTarget.parse("lyon=127.0.0.1:7001"), "blueline", "bl-gw", handler, channels)
    await s.start()          # connects, says Hello, reconnects with backoff until stop()
    s.accept(offer, "bl-billing-001") / s.decline(offer, "no agent free") / s.availability(a)
    await s.report_outcome(request)                    # retried while UNAVAILABLE
    await s.stop()

The session only speaks the protocol; what to answer is its :class:`GatewayHandler`'s
business (:class:`router.partner.sim.PartnerSim` is the reference one). The handler is
told every message of the node in order, on the event loop, and ``stream_ended`` when a
stream is over: offers that were not assigned on it are void then (the node declined
them when it saw the stream end), so the handler drops them; Assigns the node decided are
sent again on the next stream.

Identity. Over mTLS (``tls_dir``) the session presents ``partner-NAME.crt`` and checks the
node: with ``SITE=ADDR`` the node must prove it is site SITE (its DNS SAN, as every Tandem
client checks, :class:`router.security.tls.ChannelFactory`); with a bare ``ADDR`` only that
its certificate is of the cluster's CA and issued for that address. The partner name is
also sent in the Hello and in every request: a plaintext node takes it from there, an
mTLS node checks it against the certificate.

Reconnects: exponential backoff from ``backoff_min_s`` to ``backoff_max_s`` (with jitter),
back to the minimum once a stream got its Welcome. A refusal (NO_CONTRACT,
ALREADY_CONNECTED while the node still holds the previous stream, NODE_DRAINING) is retried
the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol

import grpc

from router.security import spiffe
from router.security.tls import ChannelFactory, TlsFiles
from router.status import reason_in_metadata
from router.v1 import partner_pb2 as pb
from router.v1 import partner_pb2_grpc

log = logging.getLogger("tandem.partner.gateway")

#: Unary RPCs of the partner API are idempotent by call_id: these failures are retried.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

_CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


def error_text(err: BaseException) -> str:
    """``UNAVAILABLE/NODE_DRAINING: details`` of a failed RPC."""
    if isinstance(err, grpc.aio.AioRpcError):
        try:
            why = reason_in_metadata(err.trailing_metadata() or ())
        except Exception:  # noqa: BLE001 - a broken error object has no reason
            why = ""
        return f"{err.code().name}{'/' + why if why else ''}: {err.details()}"
    return f"{type(err).__name__}: {err}"


def error_reason(err: BaseException) -> str:
    if isinstance(err, grpc.aio.AioRpcError):
        with contextlib.suppress(Exception):
            return reason_in_metadata(err.trailing_metadata() or ())
    return ""


@dataclass(frozen=True)
class NodeTarget:
    """A node to connect to: ``address`` (host:port) and, optionally, the site it must be."""

    address: str
    site: str = ""

    @classmethod
    def parse(cls, text: str) -> "NodeTarget":
        """``ADDR`` or ``SITE=ADDR``. ValueError when it is neither."""
        site, sep, address = text.strip().partition("=")
        if not sep:
            site, address = "", site
        if not address or ":" not in address:
            raise ValueError(f"bad node {text!r}: give host:port or SITE=host:port")
        if site:
            spiffe.SpiffeId(spiffe.DEFAULT_TRUST_DOMAIN, "site", site)  # a valid site name
        return cls(address, site)

    def __str__(self) -> str:
        return f"{self.site}={self.address}" if self.site else self.address


class Channels:
    """gRPC channels of one partner's gateway: plaintext without ``tls_dir``, else mTLS
    as ``partner-NAME`` from ``tls_dir`` (``tandem certs issue DIR --partner NAME``)."""

    def __init__(self, partner: str, tls_dir: Path | None = None) -> None:
        self.partner = partner
        self.tls_dir = Path(tls_dir) if tls_dir is not None else None
        self._plain: dict[str, grpc.aio.Channel] = {}
        self._factory: ChannelFactory | None = None
        self._bare: dict[str, grpc.aio.Channel] = {}
        if self.tls_dir is not None:
            self._files = TlsFiles(self.tls_dir, f"partner-{partner}")
            self._factory = ChannelFactory(self._files, options=_CHANNEL_OPTIONS)
            ident = self._factory.identity
            if ident is None or ident.kind != "partner" or ident.name != partner:
                raise ValueError(f"{self.tls_dir}/partner-{partner}.crt is not partner {partner}'s ({ident})")

    @property
    def secure(self) -> bool:
        return self._factory is not None

    def channel(self, target: NodeTarget) -> grpc.aio.Channel:
        if self._factory is None:
            ch = self._plain.get(target.address)
            if ch is None:
                ch = self._plain[target.address] = grpc.aio.insecure_channel(target.address, options=_CHANNEL_OPTIONS)
            return ch
        if target.site:
            return self._factory.channel(target.address, self._factory.expect("site", target.site))
        # No site named: the cluster's CA and the address the certificate was issued for.
        ch = self._bare.get(target.address)
        if ch is None:
            m = self._files.load()
            creds = grpc.ssl_channel_credentials(root_certificates=m.ca, private_key=m.key, certificate_chain=m.cert)
            ch = self._bare[target.address] = grpc.aio.secure_channel(target.address, creds, options=_CHANNEL_OPTIONS)
        return ch

    async def close(self) -> None:
        chans = list(self._plain.values()) + list(self._bare.values())
        self._plain.clear()
        self._bare.clear()
        for ch in chans:
            with contextlib.suppress(Exception):
                await ch.close()
        if self._factory is not None:
            await self._factory.close_all()


class GatewayHandler(Protocol):
    """What a gateway does with the node's messages (all called on the event loop)."""

    def hello_availability(self) -> pb.PartnerAvailability: ...

    def welcomed(self, session: "GatewaySession", welcome: pb.PartnerWelcome) -> None: ...

    def offered(self, session: "GatewaySession", offer: pb.PartnerOffer) -> None: ...

    def withdrawn(self, session: "GatewaySession", withdraw: pb.PartnerWithdraw) -> None: ...

    def assigned(self, session: "GatewaySession", assign: pb.PartnerAssign) -> None: ...

    def stream_ended(self, session: "GatewaySession", stream_no: int) -> None: ...


class GatewaySession:
    """The gateway's session with one node: a Connect stream kept open (reconnecting
    with backoff) and the unary RPCs to the same node. See the module docstring."""

    def __init__(
        self,
        target: NodeTarget,
        partner: str,
        gateway: str,
        handler: GatewayHandler,
        channels: Channels,
        *,
        backoff_min_s: float = 0.2,
        backoff_max_s: float = 5.0,
        rpc_timeout_s: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        self.target = target
        self.partner = partner
        self.gateway = gateway[:64]
        self.handler = handler
        self.channels = channels
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.rpc_timeout_s = rpc_timeout_s
        self.rng = rng or random.Random()
        self.site = target.site  # the node's site (from its Welcome)
        self.welcome: pb.PartnerWelcome | None = None
        self.connected = asyncio.Event()  # a stream is open and welcomed
        self.stream_no = 0  # increases with every stream
        self.streams = 0  # streams that got a Welcome
        self.last_error = ""
        self._outbox: asyncio.Queue | None = None
        self._call: Any = None
        self._task: asyncio.Task | None = None
        self._stopping = asyncio.Event()

    def __repr__(self) -> str:
        return f"GatewaySession({self.partner} -> {self.target})"

    @property
    def stub(self) -> partner_pb2_grpc.PartnerStub:
        return partner_pb2_grpc.PartnerStub(self.channels.channel(self.target))

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"partner-session-{self.target}")

    async def stop(self, timeout: float = 2.0) -> None:
        """Half-close the stream (the node ends it: offers open on it are declined), then
        cancel what is left after ``timeout`` seconds."""
        self._stopping.set()
        if self._outbox is not None:
            self._outbox.put_nowait(None)
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - stopping anyway
                if self._call is not None:
                    self._call.cancel()
                self._task.cancel()
                with contextlib.suppress(BaseException):
                    await self._task
            self._task = None

    async def abort(self) -> None:
        """Cut the stream at once, like a crashed gateway (tests)."""
        self._stopping.set()
        if self._call is not None:
            self._call.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None

    # --- the stream -----------------------------------------------------------------------

    def send(self, msg: pb.PartnerGatewayMessage) -> bool:
        """Queue ``msg`` on the open stream; False when no stream is open (dropped)."""
        if self._outbox is None or self._stopping.is_set():
            return False
        self._outbox.put_nowait(msg)
        return True

    def accept(self, offer: pb.PartnerOffer, agent: str) -> bool:
        return self.send(pb.PartnerGatewayMessage(accept=pb.PartnerAccept(
            call_id=offer.call_id, offer_no=offer.offer_no, agent=agent[:64])))

    def decline(self, offer: pb.PartnerOffer, reason: str) -> bool:
        return self.send(pb.PartnerGatewayMessage(decline=pb.PartnerDecline(
            call_id=offer.call_id, offer_no=offer.offer_no, reason=reason[:64])))

    def availability(self, a: pb.PartnerAvailability) -> bool:
        return self.send(pb.PartnerGatewayMessage(availability=a))

    async def _requests(self, outbox: asyncio.Queue):
        yield pb.PartnerGatewayMessage(hello=pb.PartnerHello(
            gateway=self.gateway, partner=self.partner, availability=self.handler.hello_availability()))
        while True:
            m = await outbox.get()
            if m is None:
                return
            yield m

    async def _run(self) -> None:
        delay = self.backoff_min_s
        while not self._stopping.is_set():
            welcomed = await self._stream()
            if self._stopping.is_set():
                break
            delay = self.backoff_min_s if welcomed else min(self.backoff_max_s, delay * 2)
            wait = delay * (0.5 + self.rng.random())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait)

    async def _stream(self) -> bool:
        """One stream, from Hello to its end; True when it was welcomed."""
        self.stream_no += 1
        no = self.stream_no
        outbox: asyncio.Queue = asyncio.Queue()
        self._outbox = outbox
        welcomed = False
        call = None
        try:
            self._call = call = self.stub.Connect(self._requests(outbox))
            async for msg in call:
                kind = msg.WhichOneof("msg")
                if kind == "welcome":
                    welcomed = True
                    self.streams += 1
                    self.welcome = msg.welcome
                    if self.site and msg.welcome.site and msg.welcome.site != self.site:
                        log.warning("%s: the node says it is site %s", self, msg.welcome.site)
                    self.site = msg.welcome.site or self.site
                    self.last_error = ""
                    self.connected.set()
                    log.info("%s: connected to site %s (stream %d)", self, self.site, no)
                    self.handler.welcomed(self, msg.welcome)
                elif kind == "offer":
                    self.handler.offered(self, msg.offer)
                elif kind == "withdraw":
                    self.handler.withdrawn(self, msg.withdraw)
                elif kind == "assign":
                    self.handler.assigned(self, msg.assign)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as e:
            if not (self._stopping.is_set() and e.code() == grpc.StatusCode.CANCELLED):
                self.last_error = error_text(e)
                level = logging.INFO if e.code() in RETRYABLE else logging.WARNING
                log.log(level, "%s: stream %d ended: %s", self, no, self.last_error)
        except Exception as e:  # noqa: BLE001 - a handler's bug must not end the session
            self.last_error = error_text(e)
            log.exception("%s: stream %d failed", self, no)
        finally:
            self._call = None
            if self._outbox is outbox:
                self._outbox = None
            outbox.put_nowait(None)  # the request iterator ends too
            if call is not None and not call.done():
                call.cancel()  # e.g. a handler failed: the node must see this stream end
            self.connected.clear()
            try:
                self.handler.stream_ended(self, no)
            except Exception:  # noqa: BLE001
                log.exception("%s: stream_ended handler failed", self)
        return welcomed

    # --- unary RPCs -----------------------------------------------------------------------

    async def _retry(self, what: str, rpc: Callable[[], Awaitable[Any]], give_up: asyncio.Event | None,
                     max_s: float | None) -> Any:
        """``rpc()`` until it answers or fails for good; transient failures (UNAVAILABLE,
        DEADLINE_EXCEEDED) are retried with backoff, for at most ``max_s`` seconds (None:
        until ``give_up`` is set)."""
        loop = asyncio.get_running_loop()
        deadline = None if max_s is None else loop.time() + max_s
        delay = 0.05
        while True:
            try:
                return await rpc()
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRYABLE:
                    raise
                if (deadline is not None and loop.time() + delay > deadline) or (give_up is not None and give_up.is_set()):
                    raise
                log.info("%s: %s: %s; retrying", self, what, error_text(e))
            await asyncio.sleep(delay * (0.5 + self.rng.random()))
            delay = min(2.0, delay * 2)

    async def report_outcome(self, req: pb.ReportOutcomeRequest, *, give_up: asyncio.Event | None = None,
                             max_s: float | None = 60.0) -> pb.ReportOutcomeResponse:
        """ReportOutcome to this node, retried while it is unreachable (idempotent)."""
        if not req.partner:
            req.partner = self.partner
        return await self._retry(f"report of {req.call_id}",
                                 lambda: self.stub.ReportOutcome(req, timeout=self.rpc_timeout_s), give_up, max_s)

    async def hand_back(self, req: pb.HandBackRequest, *, give_up: asyncio.Event | None = None,
                        max_s: float | None = 60.0) -> pb.HandBackResponse:
        """HandBack to this node, retried while it is unreachable (idempotent)."""
        if not req.partner:
            req.partner = self.partner
        return await self._retry(f"hand-back of {req.call_id}",
                                 lambda: self.stub.HandBack(req, timeout=self.rpc_timeout_s), give_up, max_s)
