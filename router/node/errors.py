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
import math
from typing import Any, Callable

import grpc

from router.model import RoutingError
from router.node import metrics
from router.status import error_status

log = logging.getLogger("tandem.node")


class Malformed:
    """Stands in for a request whose bytes did not parse, or that is over the node's
    size limit (``too_large``: its size in bytes; see server.add_service)."""

    __slots__ = ("error", "too_large", "limit")

    def __init__(self, error: str, too_large: int = 0, limit: int = 0) -> None:
        self.error = error
        self.too_large = too_large
        self.limit = limit

    def WhichOneof(self, _name: str) -> None:  # so a stream handler can inspect it safely
        return None


def duration(value: float, name: str) -> float:
    """A request's duration field: negative, NaN or infinite -> INVALID_ARGUMENT
    INVALID_FIELD (0 means "not given")."""
    if not math.isfinite(value) or value < 0:
        raise RoutingError(
            "INVALID_ARGUMENT", "INVALID_FIELD", f"{name} must be a finite number >= 0", field=name
        )
    return value


def refuse_if_draining(node: Any, offers: bool = True) -> None:
    """UNAVAILABLE NODE_DRAINING while the node shuts down; for offers also while the
    site is drained by an operator (its agents still sign in and finish their work)."""
    if node.shutting_down or (offers and node.draining):
        why = "the node is shutting down" if node.shutting_down else "the site is drained by an operator"
        raise RoutingError("UNAVAILABLE", "NODE_DRAINING", f"{why}; retry on another node")


def malformed_error(m: Malformed) -> RoutingError:
    if m.too_large:
        return RoutingError(
            "RESOURCE_EXHAUSTED", "MESSAGE_TOO_LARGE",
            f"the message is {m.too_large} bytes, over this node's limit of {m.limit} bytes",
            size_bytes=str(m.too_large), limit_bytes=str(m.limit),
        )  # fmt: skip
    return RoutingError("INVALID_ARGUMENT", "MALFORMED_REQUEST", f"the request does not parse: {m.error}")


_ID_FIELDS = ("call_id", "agent_id", "assignment_id")


def empty_id(err: RoutingError) -> RoutingError:
    """A NOT_FOUND about an empty id is the client's missing field: INVALID_ARGUMENT
    MISSING_FIELD on every RPC alike (handlers that look an id up directly would
    otherwise answer CALL_NOT_FOUND / UNKNOWN_AGENT for "")."""
    if err.code != "NOT_FOUND":
        return err
    for name in _ID_FIELDS:
        if err.metadata.get(name) == "":
            return RoutingError("INVALID_ARGUMENT", "MISSING_FIELD", f"{name} is required", field=name)
    return err


def status_of(err: RoutingError) -> grpc.Status:
    return error_status(err.code, err.reason, err.message, err.metadata)


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
            exc = empty_id(exc)
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
