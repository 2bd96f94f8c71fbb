"""etcd's own access control for a Tandem cluster, keyed by the client certificate.

etcd over mTLS (``--client-cert-auth``) with its authentication enabled takes the Common
Name of a client's certificate as its user name (etcd 3.4: when a request carries no
token). A Tandem leaf's CN is its DNS name ``NAME.KIND.TRUST_DOMAIN`` (``lyon.site.tandem``,
``admin.operator.tandem``; :mod:`router.security.pki`), so:

* every site identity gets a user ``NAME.site.TD`` with the role ``tandem-site``;
* every operator identity gets a user ``NAME.operator.TD`` with the role ``tandem-operator``;
* both roles may read and write the keys under the cluster's prefix (``/tandem/``) and
  nothing else: a site cannot touch another prefix, another cluster's or etcd's own;
  a site may only read ``/tandem/security/`` (the role bindings: operators write them);
* partners' gateways, agents gateways and every other identity of the CA get no user:
  etcd refuses their reads and writes (permission denied);
* the user ``root`` (etcd requires it, with the role ``root``, before enabling auth) is
  created without a password: nobody logs in as ``root``; the identity that provisions
  (whose certificate :func:`provision` connects with, an operator) gets the ``root`` role
  too, so that it may provision again once auth is on;
* then auth is enabled.

:func:`provision` is idempotent: it adds what is missing (roles, permissions, users, role
grants, auth) and returns what it changed (nothing on a second run). The two Tandem roles
hold exactly the planned permissions (any other is revoked: one Tandem cluster, one
prefix, per etcd); it never removes a user or a role a user holds: decommissioning an
identity is done by hand (``etcdctl user delete CN``). It talks etcd's Auth API through
aetcd's generated stubs, over :class:`router.coord.link.Link` (TLS from the settings; the
server must be an etcd identity when the certificate is a Tandem one).

Before auth is on, every certificate of the CA may do anything: provision a new etcd
before the cluster's other identities can reach it (``etcd_server(…, sites=…)`` does,
``tandem certs etcd-access`` right after the etcd members are installed).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aetcd
import grpc
from aetcd import rpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from router.coord.keys import Keys
from router.coord.link import EtcdSettings, Link, TlsMaterialError

log = logging.getLogger("tandem.coord")

SITE_ROLE = "tandem-site"
OPERATOR_ROLE = "tandem-operator"
ROOT = "root"  # etcd's root user and role
_PERM = {kind: rpc.Permission.Type.Value(kind) for kind in ("READ", "WRITE", "READWRITE")}
_KIND = {v: k.lower() for k, v in _PERM.items()}
# Codes of an Authenticate that says nothing about auth (the server did not answer).
_NO_ANSWER = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


class AccessError(Exception):
    """Provisioning failed: etcd refused (the identity does not hold etcd's root role) or
    did not answer; nothing after the failed step was done (running it again is safe)."""


def user_name(kind: str, name: str, trust_domain: str) -> str:
    """The etcd user of a Tandem identity: its certificate's CN ``NAME.KIND.TRUST_DOMAIN``
    (the same as :attr:`router.security.spiffe.SpiffeId.dns_name`)."""
    return f"{name}.{kind}.{trust_domain}"


def prefix_end(prefix: str) -> str:
    """The end of the key range ``[prefix, end)`` of every key under ``prefix``."""
    b = prefix.encode()
    return (b[:-1] + bytes([b[-1] + 1])).decode()


@dataclass(frozen=True)
class AccessPlan:
    """What etcd must hold: roles with their permissions (key, range end, READ |
    READWRITE), users with their roles."""

    roles: dict[str, tuple[tuple[str, str, str], ...]] = field(default_factory=dict)
    users: dict[str, tuple[str, ...]] = field(default_factory=dict)


def plan(*, sites: Iterable[str], operators: Iterable[str], trust_domain: str, prefix: str,
         admin: str, rebalancers: Iterable[str] = ()) -> AccessPlan:
    """The roles and users for ``sites`` and ``operators`` (names) of ``trust_domain`` under
    ``prefix``; ``admin`` (a CN) is the user that holds etcd's root role.

    ``tandem-operator``: read and write every key under the prefix. ``tandem-site``: the
    same, except ``PREFIX security/`` (the role bindings), which it may only read: a node
    never writes them, and a site that could would grant itself any role. A rebalancer
    (``rebalancers``: names of ``rebalancer`` identities) gets ``tandem-operator``: it
    reads the state and writes targets under the prefix."""
    keys = Keys(prefix)  # validates it
    security = keys.security_bindings.rpartition("/")[0] + "/"  # PREFIX security/
    end, security_end = prefix_end(prefix), prefix_end(security)
    site = ((prefix, security, "READWRITE"), (security, security_end, "READ"), (security_end, end, "READWRITE"))
    users: dict[str, set[str]] = {ROOT: {ROOT}}
    for s in sites:
        users.setdefault(user_name("site", s, trust_domain), set()).add(SITE_ROLE)
    for o in operators:
        users.setdefault(user_name("operator", o, trust_domain), set()).add(OPERATOR_ROLE)
    for r in rebalancers:
        users.setdefault(user_name("rebalancer", r, trust_domain), set()).add(OPERATOR_ROLE)
    users.setdefault(admin, set()).add(ROOT)
    return AccessPlan(roles={SITE_ROLE: site, OPERATOR_ROLE: ((prefix, end, "READWRITE"),)},
                      users={u: tuple(sorted(r)) for u, r in sorted(users.items())})


def common_name(cert_file: str | Path) -> str:
    """The subject CN of a PEM certificate (AccessError when there is none)."""
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise AccessError(f"{cert_file}: no single Common Name (etcd takes it as the user name)")
    return str(cns[0].value)


def trust_domain_of(cert_file: str | Path) -> str:
    """The trust domain of a Tandem leaf (from its CN ``NAME.KIND.TD``)."""
    parts = common_name(cert_file).split(".", 2)
    if len(parts) != 3:
        raise AccessError(f"{cert_file}: not a Tandem identity (CN NAME.KIND.TRUST_DOMAIN)")
    return parts[2]


class _Auth:
    """etcd's Auth API on a :class:`Link`; errors become AccessError."""

    def __init__(self, link: Link) -> None:
        self.link = link

    async def call(self, method: str, request: Any) -> Any:
        async def op(client):
            await client.connect()
            try:
                return await getattr(rpc.AuthStub(client.channel), method)(
                    request, timeout=self.link.settings.op_timeout_s, metadata=client.metadata)
            except rpc.AioRpcError as e:
                aetcd.exceptions._handle_exception(e)

        try:
            return await self.link.run(f"auth {method}", op)
        except Exception as e:  # CoordinationUnavailable, and what etcd said
            hint = ""
            if "permission denied" in str(e):
                hint = f" ({self.link.settings.cert_file} does not hold etcd's root role)"
            raise AccessError(f"etcd {method}: {e}{hint}") from e

    async def enabled(self) -> bool:
        """Whether auth is on (etcd 3.5+: AuthStatus; 3.4: an Authenticate that cannot
        succeed says 'not enabled' only when it is off)."""
        async def op(client):
            await client.connect()
            stub = rpc.AuthStub(client.channel)
            timeout = self.link.settings.op_timeout_s
            try:
                return (await stub.AuthStatus(rpc.AuthStatusRequest(), timeout=timeout)).enabled
            except rpc.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    aetcd.exceptions._handle_exception(e)
            try:
                # root has no password: this never logs in
                await stub.Authenticate(rpc.AuthenticateRequest(name=ROOT, password=""), timeout=timeout)
            except rpc.AioRpcError as e:
                if "authentication is not enabled" in (e.details() or ""):
                    return False
                if e.code() in _NO_ANSWER:
                    aetcd.exceptions._handle_exception(e)
                return True  # "authentication failed" in one of its forms: auth is on
            return True

        try:
            return await self.link.run("auth status", op)
        except Exception as e:
            raise AccessError(f"etcd auth status: {e}") from e


def _text(key: bytes) -> str:
    return key.decode("utf-8", "replace")


async def apply(link: Link, want: AccessPlan) -> list[str]:
    """Add what ``want`` lacks in etcd, then enable auth; returns the changes made."""
    auth = _Auth(link)
    changes: list[str] = []
    enabled = await auth.enabled()
    roles = set((await auth.call("RoleList", rpc.AuthRoleListRequest())).roles)
    for role, perms in want.roles.items():
        if role not in roles:
            await auth.call("RoleAdd", rpc.AuthRoleAddRequest(name=role))
            changes.append(f"role {role} added")
        have = {(p.key, p.range_end): p.permType
                for p in (await auth.call("RoleGet", rpc.AuthRoleGetRequest(role=role))).perm}
        wanted = {(key.encode(), end.encode()): _PERM[kind] for key, end, kind in perms}
        # Tandem's roles are Tandem's: a range they should not have (an older plan, another
        # prefix) is revoked, or a site could keep a wider permission than planned.
        for (key, end), kind in have.items():
            if (key, end) not in wanted:
                await auth.call("RoleRevokePermission",
                                rpc.AuthRoleRevokePermissionRequest(role=role, key=key, range_end=end))
                changes.append(f"role {role}: revoked {_KIND[kind]} [{_text(key)}, {_text(end)})")
        for (key, end), kind in wanted.items():
            if have.get((key, end)) != kind:  # granting again replaces the type
                perm = rpc.Permission(permType=kind, key=key, range_end=end)
                await auth.call("RoleGrantPermission", rpc.AuthRoleGrantPermissionRequest(name=role, perm=perm))
                changes.append(f"role {role}: {_KIND[kind]} [{_text(key)}, {_text(end)})")
    users = set((await auth.call("UserList", rpc.AuthUserListRequest())).users)
    for user, user_roles in want.users.items():
        if user not in users:
            opts = rpc.UserAddOptions(no_password=True)  # only its certificate logs it in
            await auth.call("UserAdd", rpc.AuthUserAddRequest(name=user, options=opts))
            changes.append(f"user {user} added")
            have_roles: set[str] = set()
        else:
            have_roles = set((await auth.call("UserGet", rpc.AuthUserGetRequest(name=user))).roles)
        for role in user_roles:
            if role not in have_roles:
                await auth.call("UserGrantRole", rpc.AuthUserGrantRoleRequest(user=user, role=role))
                changes.append(f"user {user}: role {role}")
    if not enabled:
        await auth.call("AuthEnable", rpc.AuthEnableRequest())
        changes.append("auth enabled")
    for c in changes:
        log.info("etcd access: %s", c)
    return changes


async def provision(settings: EtcdSettings, *, sites: Iterable[str], operators: Iterable[str],
                    prefix: str | None = None, rebalancers: Iterable[str] = ()) -> list[str]:
    """Give the cluster's sites and operators their etcd users and roles (read and write
    under ``prefix``, default ``settings.prefix``) and enable etcd's auth, connected with
    ``settings`` — a client certificate of the cluster (an operator's) that holds etcd's
    root role, or any when auth is still off (its CN then gets the root role). Idempotent;
    returns the changes made. AccessError when etcd refuses or does not answer."""
    if not settings.cert_file:
        raise AccessError("provisioning needs a client certificate (its CN is the etcd user)")
    admin = common_name(settings.cert_file)
    want = plan(sites=sites, operators=operators, trust_domain=trust_domain_of(settings.cert_file),
                prefix=prefix or settings.prefix, admin=admin, rebalancers=rebalancers)
    try:
        link = Link(settings)
    except TlsMaterialError as e:
        raise AccessError(str(e)) from None
    try:
        return await apply(link, want)
    finally:
        await link.close()


def run_blocking(coro: Coroutine[Any, Any, list[str]]) -> list[str]:
    """Run a provisioning coroutine to its end from synchronous code, also when an event
    loop is running in this thread (then in a thread of its own)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
