"""gRPC error answers: a google.rpc.Status carrying a google.rpc.ErrorInfo.

Every refusal leaves the handler through :func:`guard`, which turns a
:class:`~router.model.RoutingError` into the status of the same name with an ErrorInfo
(domain ``tandem.router``, the UPPER_SNAKE reason, string metadata), and any other
exception into a logged INTERNAL answer — a bug in one request never takes the node down.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from typing import Any, Callable

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from router.model import RoutingError
from router.node import metrics

DOMAIN = "tandem.router"
log = logging.getLogger("tandem.node")

_CODES = {
    "INVALID_ARGUMENT": code_pb2.INVALID_ARGUMENT,
    "NOT_FOUND": code_pb2.NOT_FOUND,
    "ALREADY_EXISTS": code_pb2.ALREADY_EXISTS,
    "FAILED_PRECONDITION": code_pb2.FAILED_PRECONDITION,
    "UNAVAILABLE": code_pb2.UNAVAILABLE,
    "RESOURCE_EXHAUSTED": code_pb2.RESOURCE_EXHAUSTED,
    "ABORTED": code_pb2.ABORTED,
    "INTERNAL": code_pb2.INTERNAL,
}


def status_code(code: str) -> int:
    """The google.rpc.Code number of a status name (UNKNOWN for a name not listed)."""
    return _CODES.get(code, code_pb2.UNKNOWN)


class Malformed:
    """Stands in for a request whose bytes did not parse (see server.add_service)."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error

    def WhichOneof(self, _name: str) -> None:  # so a stream handler can inspect it safely
        return None


def malformed_error(m: Malformed) -> RoutingError:
    return RoutingError("INVALID_ARGUMENT", "MALFORMED_REQUEST", f"the request does not parse: {m.error}")


def error_status(code: str, reason: str, message: str, metadata: dict | None = None) -> grpc.Status:
    """The grpc.Status for ``context.abort_with_status`` (google.rpc.Status with ErrorInfo)."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata or {})
    detail = any_pb2.Any()
    detail.Pack(info)
    st = status_pb2.Status(code=_CODES.get(code, code_pb2.UNKNOWN), message=message, details=[detail])
    return rpc_status.to_status(st)


def status_of(err: RoutingError) -> grpc.Status:
    return error_status(err.code, err.reason, err.message, err.metadata)


def error_info(rpc_error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """Client side: the ErrorInfo of a failed call, or None (used by tests and tools)."""
    st = rpc_status.from_call(rpc_error) if hasattr(rpc_error, "trailing_metadata") else None
    if st is None:
        return None
    for d in st.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            return info
    return None


async def abort_status(context: grpc.aio.ServicerContext, status: grpc.Status) -> None:
    """``context.abort_with_status``, unless the RPC is already over (the client went
    away: there is nobody to tell, and grpc would raise)."""
    done = getattr(context, "done", None)
    if done is not None and done():
        raise asyncio.CancelledError()
    try:
        await context.abort_with_status(status)
    except grpc.aio.AbortError:
        raise
    except Exception as exc:  # noqa: BLE001 - the call finished under us
        log.debug("could not send status: %r", exc)
        raise asyncio.CancelledError() from exc


async def abort(context: grpc.aio.ServicerContext, code: str, reason: str, message: str, **md: str) -> None:
    await abort_status(context, error_status(code, reason, message, {k: str(v) for k, v in md.items()}))


def guard(method: Callable) -> Callable:
    """Wrap a servicer method (coroutine or async generator): RoutingError -> its status,
    anything else unexpected -> logged INTERNAL. Aborts and cancellations pass through."""

    name = method.__qualname__

    async def _fail(context: Any, exc: BaseException) -> None:
        if isinstance(exc, RoutingError):
            metrics.RPC_ERRORS.labels(method.__name__, exc.reason).inc()
            await abort_status(context, status_of(exc))
            return
        metrics.RPC_ERRORS.labels(method.__name__, "INTERNAL").inc()
        log.error("unexpected error in %s", name, exc_info=exc)
        await abort_status(
            context, error_status("INTERNAL", "INTERNAL", f"internal error in {name}; see the node log")
        )

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def gen_wrapper(self: Any, request: Any, context: Any) -> Any:
            try:
                if isinstance(request, Malformed):
                    raise malformed_error(request)
                async for item in method(self, request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001 - the contract: never crash the node
                await _fail(context, exc)

        return gen_wrapper

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            if isinstance(request, Malformed):
                raise malformed_error(request)
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001
            await _fail(context, exc)

    return wrapper
