"""gRPC server metrics with go-grpc-prometheus's names, as a grpc.aio interceptor:

* ``grpc_server_handled_total{grpc_service, grpc_method, grpc_code}`` — RPCs finished;
* ``grpc_server_handling_seconds{grpc_service, grpc_method}`` — from the start of the
  handler to its end (the whole stream for streaming RPCs);
* ``grpc_server_started_total{grpc_service, grpc_method}``.

It is the first interceptor of the node's server, so calls the security interceptor
refuses (UNAUTHENTICATED, PERMISSION_DENIED) are counted with their code too. Methods
the server does not serve are counted as ``unknown`` (a caller cannot mint label values).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Callable, Iterable

import grpc
from google.protobuf import descriptor_pool
from prometheus_client import Counter, Histogram

LABELS = ["grpc_service", "grpc_method"]
STARTED = Counter("grpc_server_started_total", "RPCs started on the server", ["grpc_type", *LABELS])
HANDLED = Counter(
    "grpc_server_handled_total", "RPCs completed on the server, by status code", ["grpc_type", *LABELS, "grpc_code"]
)
HANDLING = Histogram(
    "grpc_server_handling_seconds", "Time from the start of an RPC to its end on the server",
    ["grpc_type", *LABELS],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


def known_methods(service_names: Iterable[str]) -> set[str]:
    """``/pkg.Service/Method`` of every method of the named services (default pool)."""
    pool = descriptor_pool.Default()
    out = set()
    for name in service_names:
        try:
            sd = pool.FindServiceByName(name)
        except KeyError:
            continue
        out.update(f"/{sd.full_name}/{m.name}" for m in sd.methods)
    return out


def _code_of(context: Any, exc: BaseException | None) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - a context without code()
        code = None
    if code is None or code == 0:
        return "OK" if exc is None or isinstance(exc, StopAsyncIteration) else "UNKNOWN"
    if isinstance(code, grpc.StatusCode):
        return code.name
    for sc in grpc.StatusCode:
        if sc.value[0] == code:
            return sc.name
    return "UNKNOWN"


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every RPC; ``methods``: the full method names served (others
    are labelled ``unknown``); None counts every name."""

    def __init__(self, methods: set[str] | None = None) -> None:
        self.methods = methods

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method or ""
        if self.methods is not None and method not in self.methods:
            service, name = "unknown", "unknown"
        else:
            service, _, name = method.lstrip("/").rpartition("/")
        if handler.unary_unary is not None:
            kind, inner, make = "unary", handler.unary_unary, grpc.unary_unary_rpc_method_handler
        elif handler.unary_stream is not None:
            kind, inner, make = "server_stream", handler.unary_stream, grpc.unary_stream_rpc_method_handler
        elif handler.stream_unary is not None:
            kind, inner, make = "client_stream", handler.stream_unary, grpc.stream_unary_rpc_method_handler
        else:
            kind, inner, make = "bidi_stream", handler.stream_stream, grpc.stream_stream_rpc_method_handler
        return make(_wrap(inner, kind, service, name),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


def _wrap(inner: Callable, kind: str, service: str, method: str) -> Callable:
    started = STARTED.labels(kind, service, method)
    timing = HANDLING.labels(kind, service, method)

    def done(context: Any, t0: float, exc: BaseException | None) -> None:
        timing.observe(time.perf_counter() - t0)
        HANDLED.labels(kind, service, method, _code_of(context, exc)).inc()

    if inspect.isasyncgenfunction(inner):
        async def gen_behavior(request: Any, context: Any) -> Any:
            started.inc()
            t0, exc = time.perf_counter(), None
            try:
                async for item in inner(request, context):
                    yield item
            except BaseException as e:
                exc = e
                raise
            finally:
                done(context, t0, exc)

        return gen_behavior

    async def behavior(request: Any, context: Any) -> Any:
        started.inc()
        t0, exc = time.perf_counter(), None
        try:
            result = inner(request, context)
            return await result if inspect.isawaitable(result) else result
        except BaseException as e:
            exc = e
            raise
        finally:
            done(context, t0, exc)

    return behavior
