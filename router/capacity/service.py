"""The Rebalancer gRPC service (proto/router/v1/rebalancer.proto) and its server.

``serve_rebalancer`` binds the service with the same security as a node: mTLS with the
process's rebalancer identity (``TLS_DIR/rebalancer-NAME.crt``, spiffe://TD/rebalancer/NAME), callers authorized by the
permission table and the role bindings (``TLS_DIR/bindings.json``, or etcd's document),
mutations and refusals in an audit log. Without a TLS directory it serves plaintext on
loopback only (tests, development).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from router.capacity.rebalancer import Applied, RebalanceError, Rebalancer
from router.coord import CoordinationUnavailable
from router.plans import PlanError, diff, parse_plan
from router.security.authz import Authorizer, AuthInterceptor, BindingsSource
from router.security.tls import TlsFiles, is_loopback, server_credentials
from router.status import error_status
from router.v1 import rebalancer_pb2, rebalancer_pb2_grpc

SERVICE = "router.v1.Rebalancer"


async def _abort(context: grpc.aio.ServicerContext, code: str, reason: str, message: str) -> None:
    await context.abort_with_status(error_status(code, reason, message))


def _sites(reports: dict[str, dict[str, Any]]) -> list[rebalancer_pb2.SiteApplied]:
    return [rebalancer_pb2.SiteApplied(site=s, generation=r["generation"], fencing=r["fencing"],
                                       pending_moves=r["pending_moves"], applied=r["applied"], refused=r["refused"])
            for s, r in sorted(reports.items())]


def _text(v: Any) -> str:
    return "" if v is None else (json.dumps(v) if not isinstance(v, str) else v)


class RebalancerService(rebalancer_pb2_grpc.RebalancerServicer):
    def __init__(self, rb: Rebalancer) -> None:
        self.rb = rb

    async def GetRebalancerStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            st = await self.rb.status()
        except CoordinationUnavailable as e:
            await _abort(context, "UNAVAILABLE", "COORDINATION_UNAVAILABLE", str(e))
        return rebalancer_pb2.RebalancerStatus(
            leader=st["leader"], leader_name=st["leader_name"], fencing=st["fencing"], generation=st["generation"],
            plan_id=st["plan_id"], auto=st["auto"], auto_every_s=st["auto_every_s"],
            plans_applied=st["plans_applied"], stale_refused=st["stale_refused"], sites=_sites(st["sites"]))

    async def PlanCapacity(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        h, n = request.horizon_s, request.replications
        if h and (not math.isfinite(h) or not 60 <= h <= 86400):
            await _abort(context, "INVALID_ARGUMENT", "INVALID_FIELD", f"horizon_s must be in 60..86400, got {h}")
        if n > 64:
            await _abort(context, "INVALID_ARGUMENT", "INVALID_FIELD", f"replications must be at most 64, got {n}")
        started = time.monotonic()
        try:
            plan = await self.rb.plan(h or None, n or None)
            current = await self.rb._current()
        except RebalanceError as e:
            await _abort(context, e.code, e.reason, str(e))
        except CoordinationUnavailable as e:
            await _abort(context, "UNAVAILABLE", "COORDINATION_UNAVAILABLE", str(e))
        changes = [rebalancer_pb2.PlanChange(site=r["site"], what=r["what"], key=r["key"], before=_text(r["before"]),
                                             after=_text(r["after"])) for r in diff(current, plan.sites)]

        def sl(v: Any) -> float:
            return -1.0 if v is None else float(v)

        return rebalancer_pb2.PlanCapacityReply(
            plan_json=plan.to_json(), plan_id=plan.id, base_revision=plan.base_revision, candidate=plan.candidate,
            changes=changes,
            expected=[rebalancer_pb2.SiteExpectation(site=s, service_level_before=sl(v.get("before")),
                                                     service_level_after=sl(v.get("after")))
                      for s, v in sorted(plan.expected.items())],
            cluster_service_level_before=sl(plan.cluster.get("before")),
            cluster_service_level_after=sl(plan.cluster.get("after")),
            candidates=plan.candidates, seconds=time.monotonic() - started)

    async def ApplyPlan(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            plan = parse_plan(request.plan_json)
        except PlanError as e:
            await _abort(context, "INVALID_ARGUMENT", "INVALID_PLAN", str(e))
        timeout = request.timeout_s or 10.0
        if not math.isfinite(timeout) or not 0 < timeout <= 600:
            await _abort(context, "INVALID_ARGUMENT", "INVALID_FIELD", f"timeout_s must be in (0, 600], got {timeout}")
        try:
            out: Applied = await self.rb.apply(plan, wait=request.wait, timeout_s=timeout)
        except RebalanceError as e:
            await _abort(context, e.code, e.reason, str(e))
        except CoordinationUnavailable as e:
            await _abort(context, "UNAVAILABLE", "COORDINATION_UNAVAILABLE", str(e))
        return rebalancer_pb2.ApplyPlanReply(generation=out.generation, revision=out.revision, fencing=out.fencing,
                                             seconds=-1.0 if out.seconds is None else out.seconds,
                                             sites=_sites(out.sites))


@dataclass
class Served:
    """A started Rebalancer server: ``port`` bound, ``bindings`` in force (None in
    plaintext: the caller feeds etcd's bindings document to it), ``audit`` log (None in
    plaintext). :meth:`stop` stops the server and closes the audit log."""

    server: grpc.aio.Server
    port: int
    bindings: BindingsSource | None = None
    audit: Any = None

    async def stop(self, grace: float = 1.0) -> None:
        await self.server.stop(grace)
        if self.audit is not None:
            await self.audit.aclose()


async def serve_rebalancer(rb: Rebalancer, address: str, tls_dir: str | Path | None, identity: str,
                           data_dir: str | Path | None = None, trust_domain: str | None = None) -> Served:
    """Start the Rebalancer service (and gRPC health) on ``address`` (see :class:`Served`).
    With ``tls_dir``: mTLS with ``rebalancer-IDENTITY``, the permission table, and an audit
    log of every apply and every refusal in ``data_dir/audit`` (required then). ``tls_dir`` None: plaintext, refused unless ``address`` is
    loopback. Raises TlsConfigError for missing or unfit identity files."""
    interceptors: list = []
    creds = None
    bindings = None
    audit = None
    if tls_dir is not None:
        if data_dir is None:
            raise ValueError("an mTLS rebalancer keeps an audit log: give a data directory")
        files = TlsFiles(tls_dir, f"rebalancer-{identity}")
        material = files.load()
        bindings = BindingsSource(Path(tls_dir) / "bindings.json")
        from router.security.audit import AuditLog

        audit = AuditLog.open(Path(data_dir) / "audit", "rebalancer")
        authz = Authorizer("*", secure=True, trust_domain=trust_domain or material.identity.trust_domain,
                           bindings=bindings, audit=audit)
        interceptors.append(AuthInterceptor(authz))
        creds = server_credentials(files)
    elif not is_loopback(address):
        raise ValueError(f"a plaintext rebalancer listens on loopback only, not {address}")
    server = grpc.aio.server(interceptors=interceptors)
    rebalancer_pb2_grpc.add_RebalancerServicer_to_server(RebalancerService(rb), server)
    hs = health.aio.HealthServicer()
    await hs.set("", health_pb2.HealthCheckResponse.SERVING)
    await hs.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    port = server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}")
    await server.start()
    return Served(server, port, bindings, audit)
