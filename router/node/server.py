"""Build a site node: recover the engine from the journal, wire the gRPC server.

    node, port = await build_node(site, data_dir, "127.0.0.1:0")
    await node.start()
    ...
    await node.shutdown()      # SIGTERM path: drain, then stop
    await node.stop()          # immediate stop (tests)

The server serves router.v1 Routing, Agents, Admin, Diagnostics, Interconnect
(transfers between sites: ``node.transfer``, ``node.drain``) and Partner (BPO partners'
own ACDs: ``node.partners``, :mod:`router.node.partner`), the standard health
service (overall "" and each service name SERVING until shutdown) and reflection.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from router.config import SiteConfig
from router.model import RoutingError
from router.node.errors import Malformed
from router.node.interconnect import InterconnectService
from router.node.node import Node, maybe_await
from router.node.partner import PartnerLink, PartnerService
from router.node.admin import AdminService
from router.node.services import AgentsService, DiagnosticsService, RoutingService
from router.node.transfer import Transfers
from router.v1 import admin_pb2, agents_pb2, diagnostics_pb2, interconnect_pb2, partner_pb2, routing_pb2

log = logging.getLogger("tandem.node")

# The largest request accepted: a 64 KiB Echo payload plus its framing; an OfferCall at
# its documented limits is far below. A bigger one reaches the handler as a Malformed
# and is refused with RESOURCE_EXHAUSTED + ErrorInfo MESSAGE_TOO_LARGE (documented in
# every service's proto header). gRPC itself only refuses what is over
# CORE_MAX_RECEIVE_BYTES, before any handler runs: that answer is RESOURCE_EXHAUSTED
# without an ErrorInfo (grpc core gives no hook to attach one).
MAX_REQUEST_BYTES = 64 * 1024 + 1024
CORE_MAX_RECEIVE_BYTES = 4 * 1024 * 1024

SERVICE_NAMES = (
    routing_pb2.DESCRIPTOR.services_by_name["Routing"].full_name,
    agents_pb2.DESCRIPTOR.services_by_name["Agents"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
    diagnostics_pb2.DESCRIPTOR.services_by_name["Diagnostics"].full_name,
    interconnect_pb2.DESCRIPTOR.services_by_name["Interconnect"].full_name,
    partner_pb2.DESCRIPTOR.services_by_name["Partner"].full_name,
)


# grpcurl and newer tools ask for reflection v1 first; grpcio-reflection serves only
# v1alpha. v1 is the same protocol (identical messages) under a new service name.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def add_reflection_v1(server: grpc.aio.Server, names: tuple[str, ...]) -> None:
    """Serve reflection v1 with the v1alpha implementation (wire-identical messages)."""
    from grpc_reflection.v1alpha import reflection_pb2
    from grpc_reflection.v1alpha._async import ReflectionServicer

    servicer = ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),)
    )


def _tolerant(parse: Any) -> Any:
    """A request deserializer that hands a :class:`Malformed` to the handler instead of
    raising (grpc would answer UNKNOWN; the handler answers INVALID_ARGUMENT)."""

    def deserialize(data: bytes) -> Any:
        if len(data) > MAX_REQUEST_BYTES:
            return Malformed("too large", too_large=len(data), limit=MAX_REQUEST_BYTES)
        try:
            return parse(data)
        except Exception as e:  # noqa: BLE001 - DecodeError and friends
            return Malformed(str(e))

    return deserialize


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_service(server: grpc.aio.Server, servicer: Any, file_descriptor: Any, service: str) -> None:
    """Like the generated ``add_XServicer_to_server``, with tolerant deserializers."""
    sd = file_descriptor.services_by_name[service]
    handlers = {}
    for m in sd.methods:
        req = message_factory.GetMessageClass(m.input_type)
        resp = message_factory.GetMessageClass(m.output_type)
        handlers[m.name] = _HANDLER_KINDS[(m.client_streaming, m.server_streaming)](
            getattr(servicer, m.name),
            request_deserializer=_tolerant(req.FromString),
            response_serializer=resp.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(sd.full_name, handlers),))
    server.add_registered_method_handlers(sd.full_name, handlers)


class RecoveryError(RuntimeError):
    """A journal record that applied once no longer applies: a bug (engine not
    deterministic, or an incompatible journal). The node refuses to start."""


def recover_engine(site: SiteConfig, snapshot: Any, records: list, queue_factory: Any = None) -> tuple[Any, float]:
    """Engine from snapshot + records; returns it and the last command time."""
    from router.engine import Engine

    if snapshot is not None:
        engine = Engine.restore(site, snapshot, queue_factory=queue_factory)
    else:
        engine = Engine(site, queue_factory=queue_factory)
    last_t = 0.0
    for i, rec in enumerate(records):
        try:
            engine.apply(rec)
        except RoutingError as e:
            log.critical("journal replay: record %d %r refused: %r", i, rec, e)
            raise RecoveryError(
                f"journal replay failed at record {i} (op {rec.get('op')!r}): {e.reason}: {e.message}"
            ) from e
        t = rec.get("t")
        if isinstance(t, (int, float)) and t > last_t:
            last_t = float(t)
    return engine, last_t


async def build_node(
    site: SiteConfig,
    data_dir: str | Path,
    address: str = "127.0.0.1:0",
    sync: str = "fdatasync",
    *,
    drain_s: float = 2.0,
    max_watchers: int = 10_000,
    compact_every: int = 20_000,
    queue_factory: Any = None,
    security: Any = None,
) -> tuple[Node, int]:
    """Recover the site's state from ``data_dir`` and bind a gRPC server on ``address``.

    ``security``: a :class:`router.security.node.NodeSecurity` (mTLS files, bindings,
    audit log); None = plaintext, every caller trusted, no audit — only for loopback
    (tests and development). Returns the node (not started: call ``await node.start()``)
    and the bound port. Raises RecoveryError when the journal does not replay,
    RuntimeError when the address cannot be bound.
    """
    from router.journal import Journal

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    journal = await maybe_await(Journal.open(data_dir, sync=sync))
    try:
        snapshot, records = await maybe_await(journal.recover())
        engine, last_t = recover_engine(site, snapshot, list(records), queue_factory)
    except BaseException:
        await maybe_await(journal.close())
        raise
    log.info(
        "%s: recovered %s snapshot + %d records in %.3f s",
        site.site.name, "a" if snapshot is not None else "no", len(records), time.perf_counter() - started,
    )

    node = Node(site, engine, journal, max_watchers=max_watchers, compact_every=compact_every, drain_s=drain_s)
    node._last_t = last_t
    node.security = security
    node.durable_seq = int(getattr(journal, "last_seq", 0) or 0)  # all recovered records are on disk

    from router.node.rpc_metrics import MetricsInterceptor, known_methods

    # first: the calls the security interceptor refuses are counted too
    interceptors: list = [MetricsInterceptor(known_methods(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1)))]
    if security is not None:
        node.channels = security.channels
        interceptors.append(security.interceptor(security.authorizer(node)))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", CORE_MAX_RECEIVE_BYTES),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.so_reuseport", 0),  # two nodes must never share a port silently
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ]
    )
    add_service(server, RoutingService(node), routing_pb2.DESCRIPTOR, "Routing")
    add_service(server, AgentsService(node), agents_pb2.DESCRIPTOR, "Agents")
    add_service(server, AdminService(node), admin_pb2.DESCRIPTOR, "Admin")
    add_service(server, DiagnosticsService(node), diagnostics_pb2.DESCRIPTOR, "Diagnostics")
    add_service(server, InterconnectService(node), interconnect_pb2.DESCRIPTOR, "Interconnect")
    # BPO partners' own ACDs (router.node.partner); contracts come with the cluster link.
    node.partners = PartnerLink(node)
    add_service(server, PartnerService(node), partner_pb2.DESCRIPTOR, "Partner")
    # Transfers between sites (router.node.transfer): node.transfer(call_id, target) and
    # node.drain(targets); the driver also resolves transfers a crash left in flight.
    node.transfers = Transfers(node)
    node.transfer = node.transfers.transfer
    node.drain = node.transfers.drain

    health_servicer = health.aio.HealthServicer()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1)
    reflection.enable_server_reflection(names, server)
    add_reflection_v1(server, names)

    try:
        if security is not None and security.tls is not None:
            port = server.add_secure_port(address, security.server_credentials())
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as e:
        await maybe_await(journal.close())
        raise RuntimeError(f"cannot listen on {address}: {e}") from e
    if port == 0:
        await maybe_await(journal.close())
        raise RuntimeError(f"cannot listen on {address}")
    node.server = server
    node.health = health_servicer
    node.port = port
    node.transfers.start()
    return node, port
