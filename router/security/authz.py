"""The one place that checks every RPC of a node: identity, role, scope, membership —
then the audit record (invariant 7).

:class:`AuthInterceptor` wraps every handler of the server. For each call:

1. **Authenticate.** With TLS, the peer's certificate was verified against the cluster's CA
   during the handshake (no certificate, an expired or foreign one: the handshake fails
   and nothing is served — the client sees UNAVAILABLE). The identity is the
   certificate's SPIFFE ID; none, or another trust domain: UNAUTHENTICATED
   (``NO_IDENTITY`` / ``WRONG_TRUST_DOMAIN``). Without TLS (a loopback node started
   without ``--tls-dir``) the caller is ``insecure:<peer>`` and may do everything.
2. **Authorize** against :data:`router.security.permissions.TABLE` and the bindings:
   PERMISSION_DENIED with ``UNBOUND_IDENTITY`` (no binding), ``ROLE_FORBIDS`` (no bound
   role may call it; also any method not in the table), ``OUT_OF_SCOPE`` (a role that may,
   but not on this node's site), ``NOT_A_MEMBER`` (the transfer protocol from a site that
   is not a current member). A refused request never reaches the handler: it changes
   nothing.
3. **Audit** every denial and every call of a mutating RPC (with its result code) into the
   node's audit log, durable before the answer leaves.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from router.security import permissions, pki, spiffe
from router.security.bindings import Bindings, BindingsError, load_file, parse
from router.status import error_status, reason_in_metadata

log = logging.getLogger("tandem.security")

# Request fields copied into an audit record's objects (what the request names).
_CALLER: contextvars.ContextVar["Principal | None"] = contextvars.ContextVar("tandem_caller", default=None)
_OBJECT_FIELDS = ("call_id", "agent_id", "target", "targets", "assignment_id", "transfer_no", "origin_site", "site")


def caller() -> "Principal | None":
    """The authenticated caller of the RPC being handled (None outside an mTLS node's
    handler). Handlers use it where the permission table is not enough: a site may act
    in the transfer protocol only as itself (router.node.interconnect)."""
    return _CALLER.get()


@dataclass(frozen=True, slots=True)
class Principal:
    identity: str  # SPIFFE URI, or "insecure:<peer>"
    peer: str
    spiffe: spiffe.SpiffeId | None = None


class Refusal(Exception):
    """Authentication or authorization said no: ``code`` (UNAUTHENTICATED /
    PERMISSION_DENIED), ``reason`` (ErrorInfo), ``message``."""

    def __init__(self, code: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


class BindingsSource:
    """The bindings in force: from etcd when the cluster holds a document (an invalid one
    is refused and the previous stays), else from a file (re-read when it changes,
    looked at once a second at most), else none (default deny)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self._file: Bindings | None = None
        self._file_version: tuple | None = None
        self._checked = 0.0
        self._etcd: Bindings | None = None
        self.error: str | None = None
        self.source = "none"
        self._reload_file(force=True)

    def _reload_file(self, force: bool = False) -> None:
        if self.path is None:
            return
        now = time.monotonic()
        if not force and now - self._checked < 1.0:
            return
        self._checked = now
        try:
            st = self.path.stat()
            version = (st.st_mtime_ns, st.st_size)
        except OSError:
            version = None
        if version == self._file_version:
            return
        self._file_version = version
        if version is None:
            self._file = None
            return
        try:
            self._file = load_file(self.path)
            log.info("bindings loaded from %s (%d)", self.path, len(self._file.bindings))
        except BindingsError as e:
            self.error = str(e)
            log.error("ignoring %s, the previous bindings stay in force: %s", self.path, e)

    def set_etcd(self, raw: bytes | None) -> bool:
        """A new stored document (None: deleted). False when it is invalid (kept the old)."""
        if raw is None:
            self._etcd = None
            return True
        try:
            self._etcd = parse(raw)
        except BindingsError as e:
            self.error = str(e)
            log.error("ignoring the stored bindings, the previous ones stay in force: %s", e)
            return False
        self.error = None
        log.info("bindings from etcd in force (%d)", len(self._etcd.bindings))
        return True

    def current(self) -> Bindings:
        if self._etcd is not None:
            self.source = "etcd"
            return self._etcd
        self._reload_file()
        self.source = "file" if self._file is not None else "none"
        return self._file or Bindings()


_cert_cache: dict[bytes, spiffe.SpiffeId | str] = {}


def _spiffe_of_uri(uri: bytes) -> spiffe.SpiffeId | str:
    got = _cert_cache.get(uri)
    if got is None:
        try:
            got = spiffe.parse(uri)
        except spiffe.IdentityError as e:
            got = str(e)
        if len(_cert_cache) > 10_000:
            _cert_cache.clear()
        _cert_cache[uri] = got
    return got


def _spiffe_of_pem(pem: bytes) -> spiffe.SpiffeId | str:
    """The certificate's SPIFFE ID, or a string saying why there is none (cached: one
    parse per certificate, not per call)."""
    got = _cert_cache.get(pem)
    if got is None:
        try:
            got = pki.identity_of(pem)
        except (pki.PkiError, spiffe.IdentityError) as e:
            got = str(e) or type(e).__name__
        if len(_cert_cache) > 10_000:
            _cert_cache.clear()
        _cert_cache[pem] = got
    return got


class Authorizer:
    """Authentication and authorization of one node (site ``site``). ``secure``: the
    server is mTLS (else every caller is trusted: loopback development). ``members``:
    the current member sites, or None when the node has no cluster view (then any bound
    site identity counts as a member)."""

    def __init__(
        self, site: str, *, secure: bool, trust_domain: str | None = None,
        bindings: BindingsSource | None = None, members: Callable[[], set[str] | None] | None = None,
        audit: Any = None,
    ) -> None:
        self.site = site
        self.secure = secure
        self.trust_domain = trust_domain
        self.bindings = bindings or BindingsSource()
        self.members = members
        self.audit = audit

    def authenticate(self, context: Any) -> Principal:
        peer = context.peer() or ""
        if not self.secure:
            return Principal("insecure:" + peer, peer)
        # The handshake verified the chain; the SANs it extracted are the peer's
        # identities (cheap: no PEM). One spiffe:// URI is the identity; anything else
        # is looked at in the certificate itself, to say what is wrong.
        uris = [v for v in context.peer_identities() or () if v.startswith(b"spiffe://")]
        if len(uris) == 1:
            sid = _spiffe_of_uri(uris[0])
        else:
            auth = context.auth_context() or {}
            pems = auth.get("x509_pem_cert") or []
            if not pems:
                raise Refusal("UNAUTHENTICATED", "NO_IDENTITY", "no client certificate")
            sid = _spiffe_of_pem(pems[0])
        if isinstance(sid, str):
            raise Refusal("UNAUTHENTICATED", "NO_IDENTITY", f"the client certificate carries no SPIFFE ID ({sid})")
        if self.trust_domain and sid.trust_domain != self.trust_domain:
            raise Refusal("UNAUTHENTICATED", "WRONG_TRUST_DOMAIN",
                          f"{sid.uri} is not of trust domain {self.trust_domain}")
        return Principal(sid.uri, peer, sid)

    def authorize(self, who: Principal, method: str) -> str:
        """The role that allows ``method`` to ``who`` on this site, or Refusal."""
        if not self.secure:
            return "insecure"
        rule = permissions.rule(method)
        bound = self.bindings.current().roles_of(who.identity)
        if not bound:
            raise Refusal("PERMISSION_DENIED", "UNBOUND_IDENTITY", f"{who.identity} has no role binding")
        if rule is None:
            raise Refusal("PERMISSION_DENIED", "ROLE_FORBIDS", f"{method} is not open to any role")
        able = [b for b in bound if b.role in rule.roles]
        if not able:
            roles = ", ".join(sorted({b.role for b in bound}))
            raise Refusal("PERMISSION_DENIED", "ROLE_FORBIDS", f"{who.identity} ({roles}) may not call {method}")
        scoped = [b for b in able if b.covers(self.site)]
        if not scoped:
            raise Refusal("PERMISSION_DENIED", "OUT_OF_SCOPE",
                          f"{who.identity} may call {method}, but not on site {self.site}")
        if rule.cluster_wide:
            scoped = [b for b in scoped if "*" in b.sites]
            if not scoped:
                raise Refusal("PERMISSION_DENIED", "OUT_OF_SCOPE",
                              f"{method} acts on every site: {who.identity} needs a binding with scope '*'")
        role = scoped[0].role
        if rule.members_only:
            if who.spiffe is None or who.spiffe.kind != "site":
                raise Refusal("PERMISSION_DENIED", "NOT_A_MEMBER", f"{who.identity} is not a site")
            current = self.members() if self.members is not None else None
            if current is not None and who.spiffe.name not in current:
                raise Refusal("PERMISSION_DENIED", "NOT_A_MEMBER",
                              f"site {who.spiffe.name} is not a current member of the cluster")
        return role

    async def record(self, who: Principal, method: str, role: str, request: Any, decision: str,
                     code: str, reason: str) -> None:
        if self.audit is None:
            return
        from router.security.audit import AuditRecord

        await self.audit.record(AuditRecord(
            id=uuid.uuid4().hex, at=time.time(), site=self.site, identity=who.identity, role=role,
            peer=who.peer, method=method, objects=objects_of(request), decision=decision, reason=reason, code=code,
        ))


def objects_of(request: Any) -> dict[str, str]:
    """What a request names (call, agent, target…), for the audit record; bounded."""
    out: dict[str, str] = {}
    if request is None or not hasattr(request, "DESCRIPTOR"):
        return out
    fields = request.DESCRIPTOR.fields_by_name
    for name in _OBJECT_FIELDS:
        if name in fields:
            v = getattr(request, name)
            if isinstance(v, (list, tuple)) or hasattr(v, "extend"):
                v = ",".join(str(x) for x in list(v)[:20])
            if v not in ("", 0, None):
                out[name] = str(v)[:256]
    return out


def _code_name(context: Any) -> str:
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - older grpc: no code() on the aio context
        code = None
    if code is None:
        return "UNKNOWN"
    if isinstance(code, grpc.StatusCode):
        return code.name
    try:
        return grpc.StatusCode(code).name  # type: ignore[call-arg]
    except Exception:  # noqa: BLE001
        for sc in grpc.StatusCode:
            if sc.value[0] == code:
                return sc.name
    return str(code)


def _reason_of(status: Any) -> str:
    """The ErrorInfo reason a grpc.Status carries ("" when none)."""
    return reason_in_metadata(getattr(status, "trailing_metadata", None))


class _AuditedContext:
    """The servicer context handed to an audited unary handler. grpc.aio sends the status
    inside ``abort``/``abort_with_status``, before the handler's exception unwinds: the
    allow record (with the result code) is made durable first, so it precedes the answer
    like every other audit record. Everything else is the real context's."""

    def __init__(self, context: Any, audit: Callable) -> None:
        self._context = context
        self._audit = audit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        await self._audit(code.name if isinstance(code, grpc.StatusCode) else str(code))
        await self._context.abort(code, details, trailing_metadata)

    async def abort_with_status(self, status: Any) -> None:
        code = status.code
        await self._audit(code.name if isinstance(code, grpc.StatusCode) else str(code), _reason_of(status))
        await self._context.abort_with_status(status)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Applies :class:`Authorizer` to every handler of the server it is given to."""

    def __init__(self, authz: Authorizer) -> None:
        self.authz = authz

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method = details.method
        if handler is None:
            return self._unserved(method)
        rule = permissions.rule(method)
        audited = rule is not None and rule.mutates
        if handler.unary_unary is not None:
            fn = self._unary(handler.unary_unary, method, audited)
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            fn = self._streaming(handler.unary_stream, method, audited)
            return grpc.unary_stream_rpc_method_handler(
                fn, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.stream_unary is not None:
            fn = self._unary(handler.stream_unary, method, audited, stream_in=True)
            return grpc.stream_unary_rpc_method_handler(
                fn, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        fn = self._streaming(handler.stream_stream, method, audited, stream_in=True)
        return grpc.stream_stream_rpc_method_handler(
            fn, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)

    def _unserved(self, method: str) -> Any:
        """A method this server does not serve is refused like any other first (an
        unauthenticated or unbound caller learns nothing of what is served); only a
        caller allowed to call it hears UNIMPLEMENTED (clients that try reflection v1
        and fall back to v1alpha rely on it)."""

        async def behavior(request_iterator: Any, context: Any) -> None:
            await self._check(None, context, method)
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")

        return grpc.stream_stream_rpc_method_handler(behavior)

    async def _check(self, request: Any, context: Any, method: str) -> tuple[Principal, str]:
        authz = self.authz
        try:
            who = authz.authenticate(context)
        except Refusal as r:
            who = Principal("unauthenticated:" + (context.peer() or ""), context.peer() or "")
            await authz.record(who, method, "", request, "deny", r.code, r.reason)
            await context.abort_with_status(error_status(r.code, r.reason, r.message))
            raise AssertionError("unreachable")  # abort raises
        try:
            role = authz.authorize(who, method)
        except Refusal as r:
            await authz.record(who, method, "", request, "deny", r.code, r.reason)
            await context.abort_with_status(error_status(r.code, r.reason, r.message,
                                                         {"identity": who.identity, "site": authz.site}))
            raise AssertionError("unreachable")
        _CALLER.set(who)  # the handler runs in this task: it sees who is calling
        return who, role

    def _unary(self, inner: Callable, method: str, audited: bool, stream_in: bool = False) -> Callable:
        authz = self.authz

        async def behavior(request: Any, context: Any) -> Any:
            who, role = await self._check(None if stream_in else request, context, method)
            if not audited or authz.audit is None:
                return await inner(request, context)
            recorded = False

            async def audit(code: str, reason: str = "") -> None:
                nonlocal recorded
                if not recorded:
                    recorded = True
                    await authz.record(who, method, role, None if stream_in else request, "allow", code, reason)

            ok = False
            try:
                # grpc.aio sends the status inside abort(): the record must be durable first
                resp = await inner(request, _AuditedContext(context, audit))
                ok = True
                return resp
            finally:
                await audit("OK" if ok else _code_name(context))

        return behavior

    def _streaming(self, inner: Callable, method: str, audited: bool, stream_in: bool = False) -> Callable:
        authz = self.authz

        if inspect.isasyncgenfunction(inner):
            async def gen_behavior(request: Any, context: Any) -> Any:
                who, role = await self._check(None if stream_in else request, context, method)
                if audited:  # a stream is audited when it opens (what flows on it is journaled)
                    await authz.record(who, method, role, None if stream_in else request, "allow", "OK", "")
                async for item in inner(request, context):
                    yield item

            return gen_behavior

        async def behavior(request: Any, context: Any) -> Any:
            who, role = await self._check(None if stream_in else request, context, method)
            if audited:
                await authz.record(who, method, role, None if stream_in else request, "allow", "OK", "")
            return await inner(request, context)

        return behavior
