"""The operator tool's access to the cluster: gRPC to every node of a context, with the
context's operator identity (mTLS, each node must prove ``spiffe://TD/site/NAME``), or
plaintext when the context has no TLS directory.

* :class:`ClusterClient` — async; ``discover()`` adds the members a node lists
  (``Admin.ListMembers``, read from etcd by the node) to the context's seed addresses;
  ``each()`` asks every node at once with a short deadline and returns one
  :class:`NodeResult` per site (a value or the error), ``one()`` asks one site.
* :func:`exit_code` — the documented exit code of a failed RPC.

Exit codes (the same table is in ``tandem ctl --help``)::

    0   ok
    1   error (also: ``policy diff`` or ``partner diff`` found something that would change)
    2   cannot connect (UNAVAILABLE, deadline exceeded: no node answered)
    3   permission denied (PERMISSION_DENIED, UNAUTHENTICATED)
    4   not found (unknown site, call, agent)
    64  usage (bad arguments, no context, a mutation without --yes off a terminal)

The client never writes etcd itself: every action is an Admin (or Agents) RPC that the
node authorizes, audits and carries out.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import grpc

from router.ctl.context import Context
from router.security.tls import ChannelFactory, TlsConfigError, TlsFiles
from router.status import error_info
from router.v1 import admin_pb2, admin_pb2_grpc, agents_pb2_grpc, rebalancer_pb2_grpc

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_UNREACHABLE = 2
EXIT_DENIED = 3
EXIT_NOT_FOUND = 4
EXIT_USAGE = 64

EXIT_CODES_TEXT = (
    "Exit codes: 0 ok; 1 error (also policy diff, partner diff: something would change); "
    "2 cannot connect (no node answered); 3 permission denied; 4 not found; "
    "64 usage (bad arguments, no context, a mutation without --yes off a terminal)."
)

_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_DENIED = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)

# A fresh connection per tool run; keep reconnect attempts short so a dead node costs
# one deadline, not gRPC's backoff.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),
)


class CtlError(Exception):
    """A failure the command reports with ``message`` on stderr and exits with ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def exit_code(err: BaseException) -> int:
    """The exit code of a failed RPC (or a CtlError)."""
    if isinstance(err, CtlError):
        return err.code
    if isinstance(err, grpc.RpcError):
        code = err.code()
        if code in _UNREACHABLE:
            return EXIT_UNREACHABLE
        if code in _DENIED:
            return EXIT_DENIED
        if code == grpc.StatusCode.NOT_FOUND:
            return EXIT_NOT_FOUND
    if isinstance(err, (TimeoutError, asyncio.TimeoutError, OSError)):
        return EXIT_UNREACHABLE
    return EXIT_ERROR


def reason(err: BaseException) -> str:
    """The ErrorInfo reason of a failed RPC ("" when none)."""
    if isinstance(err, grpc.RpcError):
        try:
            info = error_info(err)
        except Exception:  # noqa: BLE001 - a status without details has no reason
            info = None
        return info.reason if info is not None else ""
    return ""


def describe(err: BaseException) -> str:
    """One line: ``PERMISSION_DENIED/OUT_OF_SCOPE: message``."""
    if isinstance(err, grpc.RpcError):
        code = err.code().name if err.code() else "?"
        why = reason(err)
        return f"{code}{'/' + why if why else ''}: {err.details()}"
    if isinstance(err, (TimeoutError, asyncio.TimeoutError)):
        return "DEADLINE_EXCEEDED: no answer in time"
    return f"{type(err).__name__}: {err}"


def overall_exit(errors: list[BaseException]) -> int:
    """The exit code when every node failed: permission denied over not found over
    cannot connect over error (the most telling answer wins)."""
    codes = {exit_code(e) for e in errors}
    for c in (EXIT_DENIED, EXIT_NOT_FOUND, EXIT_UNREACHABLE):
        if c in codes:
            return c
    return EXIT_ERROR


@dataclass
class NodeResult:
    """One node's answer: ``value`` or ``error``."""

    site: str
    address: str
    value: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def status(self) -> str:
        """"ok", "unreachable", "denied", "not found", "unimplemented" or "error"."""
        if self.error is None:
            return "ok"
        if isinstance(self.error, grpc.RpcError) and self.error.code() == grpc.StatusCode.UNIMPLEMENTED:
            return "unimplemented"
        return {EXIT_UNREACHABLE: "unreachable", EXIT_DENIED: "denied",
                EXIT_NOT_FOUND: "not found"}.get(exit_code(self.error), "error")


_SERVICES = {"admin": admin_pb2_grpc.AdminStub, "agents": agents_pb2_grpc.AgentsStub}


class ClusterClient:
    """Channels to every node of a context. Use as ``async with ClusterClient(ctx) as c``."""

    def __init__(self, ctx: Context, timeout: float = 3.0) -> None:
        self.ctx = ctx
        self.timeout = timeout
        self.sites: dict[str, str] = dict(ctx.sites)
        self.members: list[Any] | None = None  # admin_pb2.Member, once discovered
        self.members_from: str | None = None
        self.discovery_error: BaseException | None = None
        try:
            files = TlsFiles(ctx.tls_dir, ctx.identity or "operator-admin") if ctx.tls_dir is not None else None
            self.factory = ChannelFactory(files, options=CHANNEL_OPTIONS)
        except TlsConfigError as e:
            raise CtlError(EXIT_USAGE, f"the context's identity cannot be used: {e}") from None
        self._stubs: dict[tuple[str, str], Any] = {}

    async def __aenter__(self) -> "ClusterClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.factory.close_all()

    @property
    def identity(self) -> str:
        return self.factory.identity.uri if self.factory.identity is not None else "(plaintext)"

    def stub(self, site: str, service: str = "admin") -> Any:
        if site not in self.sites:
            raise CtlError(EXIT_NOT_FOUND, f"no site {site!r} in the cluster (known: {', '.join(sorted(self.sites))})")
        key = (site, service)
        if key not in self._stubs:
            ch = self.factory.channel(self.sites[site], self.factory.expect("site", site))
            self._stubs[key] = _SERVICES[service](ch)
        return self._stubs[key]

    def rebalancer(self, address: str | None = None) -> Any:
        """A Rebalancer stub to ``address`` (default: the context's ``rebalancer``); the
        server must prove the context's rebalancer identity (spiffe://TD/rebalancer/NAME)."""
        address = address or self.ctx.rebalancer
        if not address:
            raise CtlError(EXIT_USAGE, "no rebalancer address: give --rebalancer HOST:PORT or set "
                                       "rebalancer: in the context")
        key = (address, "rebalancer")
        if key not in self._stubs:
            ch = self.factory.channel(address, self.factory.expect("rebalancer", self.ctx.rebalancer_identity))
            self._stubs[key] = rebalancer_pb2_grpc.RebalancerStub(ch)
        return self._stubs[key]

    async def call(self, site: str, method: str, request: Any, service: str = "admin",
                   timeout: float | None = None) -> Any:
        """One RPC to one site; raises grpc.RpcError (or CtlError for an unknown site)."""
        fn = getattr(self.stub(site, service), method)
        return await fn(request, timeout=timeout or self.timeout)

    async def discover(self) -> list[Any] | None:
        """Ask the seed nodes, all at once, for the members they see in etcd; the first
        answer wins. Members unknown to the context join ``sites``. None when no node
        could list members (no etcd, unreachable, denied)."""
        if self.members is not None:
            return self.members
        results = await self.each("ListMembers", admin_pb2.ListMembersRequest())
        for r in sorted(results.values(), key=lambda r: r.site):
            if r.ok:
                self.members, self.members_from = list(r.value.members), r.site
                for m in r.value.members:
                    if m.address and m.site not in self.sites:
                        self.sites[m.site] = m.address
                return self.members
        errs = [r.error for r in results.values() if r.error is not None]
        self.discovery_error = errs[0] if errs else None
        return None

    async def each(self, method: str, request: Any = None, service: str = "admin",
                   sites: list[str] | None = None, timeout: float | None = None) -> dict[str, NodeResult]:
        """``method`` on every site (or ``sites``) at once; never raises for a node's
        failure: it is in that node's result."""
        names = sorted(sites if sites is not None else self.sites)

        async def one(site: str) -> NodeResult:
            res = NodeResult(site, self.sites.get(site, ""))
            try:
                res.value = await self.call(site, method, request, service, timeout)
            except (grpc.RpcError, CtlError, OSError, asyncio.TimeoutError) as e:
                res.error = e
            return res

        got = await asyncio.gather(*(one(s) for s in names))
        return {r.site: r for r in got}

    async def first(self, method: str, request: Any, service: str = "admin") -> NodeResult:
        """``method`` on the first node (by name) that answers; raises CtlError when none
        does, with the exit code of the most telling failure."""
        errors: list[BaseException] = []
        for site in sorted(self.sites):
            try:
                return NodeResult(site, self.sites[site], await self.call(site, method, request, service))
            except grpc.RpcError as e:
                if exit_code(e) != EXIT_UNREACHABLE:
                    raise  # an answer, though a refusal: the others would say the same
                errors.append(e)
        raise CtlError(overall_exit(errors) if errors else EXIT_UNREACHABLE,
                       "no node answered" + (f" (last: {describe(errors[-1])})" if errors else ""))


def raise_if_none(results: dict[str, NodeResult], what: str) -> None:
    """CtlError when not one node answered ``what``."""
    if results and any(r.ok for r in results.values()):
        return
    errors = [r.error for r in results.values() if r.error is not None]
    if not results:
        raise CtlError(EXIT_USAGE, "the context names no site")
    detail = "; ".join(f"{r.site}: {describe(r.error)}" for r in results.values() if r.error is not None)
    raise CtlError(overall_exit(errors), f"{what}: no node answered ({detail})")
