"""gRPC error statuses shared by every server and client of Tandem: a google.rpc.Status
carrying a google.rpc.ErrorInfo (domain ``tandem.router``, an UPPER_SNAKE reason, string
metadata). The node's handlers (:mod:`router.node.errors`) and the security layer
(:mod:`router.security.authz`) answer with :func:`error_status`; tools and tests read the
reason back with :func:`error_info`."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "tandem.router"

_CODES = {
    "INVALID_ARGUMENT": code_pb2.INVALID_ARGUMENT,
    "NOT_FOUND": code_pb2.NOT_FOUND,
    "ALREADY_EXISTS": code_pb2.ALREADY_EXISTS,
    "FAILED_PRECONDITION": code_pb2.FAILED_PRECONDITION,
    "UNAVAILABLE": code_pb2.UNAVAILABLE,
    "RESOURCE_EXHAUSTED": code_pb2.RESOURCE_EXHAUSTED,
    "ABORTED": code_pb2.ABORTED,
    "INTERNAL": code_pb2.INTERNAL,
    "UNAUTHENTICATED": code_pb2.UNAUTHENTICATED,
    "PERMISSION_DENIED": code_pb2.PERMISSION_DENIED,
}


def status_code(code: str) -> int:
    """The google.rpc.Code number of a status name (UNKNOWN for a name not listed)."""
    return _CODES.get(code, code_pb2.UNKNOWN)


def error_status(code: str, reason: str, message: str, metadata: dict | None = None) -> grpc.Status:
    """The grpc.Status for ``context.abort_with_status`` (google.rpc.Status with ErrorInfo)."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata or {})
    detail = any_pb2.Any()
    detail.Pack(info)
    st = status_pb2.Status(code=_CODES.get(code, code_pb2.UNKNOWN), message=message, details=[detail])
    return rpc_status.to_status(st)


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


def reason_in_metadata(metadata: object) -> str:
    """The ErrorInfo reason carried by trailing metadata (``grpc-status-details-bin``);
    "" when there is none or it does not parse."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == "grpc-status-details-bin":
            try:
                st = status_pb2.Status.FromString(value)
            except Exception:  # noqa: BLE001 - not ours to judge: no reason then
                return ""
            for d in st.details:
                if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    d.Unpack(info)
                    return info.reason
    return ""
