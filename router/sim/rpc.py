"""gRPC plumbing shared by the load generator, the demo and the benchmark.

One :class:`NodeClient` per node: a channel and its stubs. :func:`call_with_retry` runs a
unary RPC with a deadline and retries the transient failures (UNAVAILABLE,
DEADLINE_EXCEEDED) of RPCs the protos declare safe to retry. :func:`error_reason` reads
the ``google.rpc.ErrorInfo`` reason a node attaches to a refusal.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Awaitable, Callable

import grpc

from router.security.tls import ChannelFactory, TlsFiles
from router.status import reason_in_metadata
from router.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    agents_pb2_grpc,
    diagnostics_pb2_grpc,
    routing_pb2_grpc,
)

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

# Keep the connection warm between bursts and let many streams share it.
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_concurrent_streams", 10_000),
]


def error_reason(err: grpc.RpcError) -> str:
    """The ErrorInfo reason of a failed call ("" when there is none)."""
    try:
        md = err.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - a broken error object has no reason
        return ""
    return reason_in_metadata(md)


def describe(err: BaseException) -> str:
    if isinstance(err, grpc.RpcError):
        code = err.code().name if err.code() else "?"
        reason = error_reason(err)
        return f"{code}{'/' + reason if reason else ''}: {err.details()}"
    return f"{type(err).__name__}: {err}"


class NodeClient:
    """A channel to one node and its four stubs.

    With ``tls_dir`` (``tandem certs init``) the simulator speaks mTLS as the real edges
    would: calls and agents as the site's peripheral gateway (``agents-SITE``: Routing and
    Agents), status and call listings as an operator (``operator-admin``: Admin), each
    checking that the server is site ``site``. Without it: one plaintext channel."""

    def __init__(self, site: str, address: str, tls_dir: Path | None = None,
                 operator: str = "admin") -> None:
        self.site = site
        self.address = address
        self._factories: list[ChannelFactory] = []
        if tls_dir is None:
            self.channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
            admin_channel = self.channel
        else:
            gateway = ChannelFactory(TlsFiles(tls_dir, f"agents-{site}"), options=_CHANNEL_OPTIONS)
            ops = ChannelFactory(TlsFiles(tls_dir, f"operator-{operator}"), options=_CHANNEL_OPTIONS)
            self._factories = [gateway, ops]
            self.channel = gateway.channel(address, gateway.expect("site", site))
            admin_channel = ops.channel(address, ops.expect("site", site))
        self.routing = routing_pb2_grpc.RoutingStub(self.channel)
        self.agents = agents_pb2_grpc.AgentsStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(admin_channel)
        self.diagnostics = diagnostics_pb2_grpc.DiagnosticsStub(self.channel)

    async def wait_ready(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self.channel.channel_ready(), timeout)

    async def close(self) -> None:
        if self._factories:
            for f in self._factories:
                await f.close_all()
        else:
            await self.channel.close(grace=None)

    async def list_calls(self, timeout: float = 10.0, page_size: int = 1000) -> list:
        """Every call the node knows (Admin.ListCalls, all pages)."""
        out: list = []
        token = ""
        for _ in range(100_000):  # bounded: 100k pages of up to 1000 calls
            resp = await call_with_retry(
                self.admin.ListCalls,
                admin_pb2.ListCallsRequest(page_size=page_size, page_token=token),
                timeout=timeout,
            )
            out.extend(resp.calls)
            token = resp.next_page_token
            if not token:
                break
        return out


async def call_with_retry(
    method: Callable[..., Awaitable[Any]],
    request: Any,
    *,
    timeout: float,
    attempts: int = 4,
    backoff: float = 0.05,
) -> Any:
    """A unary call with a deadline per attempt; transient failures are retried (only
    use it for RPCs that are safe to retry)."""
    for attempt in range(attempts):
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() not in RETRYABLE or attempt == attempts - 1:
                raise
            await asyncio.sleep(backoff * (2**attempt))
    raise AssertionError("unreachable")
