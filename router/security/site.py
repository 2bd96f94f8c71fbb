"""The security of one site node, in one object the node is built with
(:func:`router.node.server.build_node` ``security=``):

* ``tls`` — the site's identity files (``TLS_DIR/site-NAME.crt|.key`` and ``ca.crt``), or
  None for a plaintext loopback node;
* ``channels`` — the :class:`~router.security.tls.ChannelFactory` every outgoing channel
  of the node comes from (peers, partners), with the same identity;
* ``bindings`` — the bindings in force (etcd document, else ``TLS_DIR/bindings.json``);
* ``audit`` — the node's audit log (``DATA_DIR/audit``), where every mutation and every
  denial is made durable before the answer. A plaintext node has no identities to record
  and keeps no audit log.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.security.authz import Authorizer, AuthInterceptor, BindingsSource
from router.security.tls import ChannelFactory, TlsFiles, server_credentials


@dataclass
class NodeSecurity:
    site: str
    tls: TlsFiles | None
    channels: ChannelFactory
    bindings: BindingsSource
    audit: Any = None  # router.security.audit.AuditLog

    @classmethod
    def open(cls, site: str, data_dir: str | Path, tls_dir: str | Path | None, *, audit: bool = True) -> "NodeSecurity":
        """Load the site's identity from ``tls_dir`` (TlsConfigError when a file is missing
        or does not fit) and open the audit log under ``data_dir``."""
        if tls_dir is None:
            return cls(site, None, ChannelFactory(None), BindingsSource())
        files = TlsFiles(tls_dir, f"site-{site}")
        material = files.load()
        if material.identity.kind != "site" or material.identity.name != site:
            from router.security.tls import TlsConfigError

            raise TlsConfigError(f"{files.cert_path} is {material.identity.uri}, not site {site}")
        log = None
        if audit:
            from router.security.audit import AuditLog

            log = AuditLog.open(Path(data_dir) / "audit", site)
        # peers' channels reconnect within a second of a restart (gRPC's default backoff
        # grows to minutes): a restarted peer is reachable again for aborts and transfers
        peer_options = (("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000))
        return cls(site, files, ChannelFactory(files, options=peer_options),
                   BindingsSource(Path(tls_dir) / "bindings.json"), log)

    @property
    def trust_domain(self) -> str | None:
        return self.channels.identity.trust_domain if self.channels.identity is not None else None

    def authorizer(self, node: Any) -> Authorizer:
        def members() -> set[str] | None:
            cluster = getattr(node, "cluster", None)
            return None if cluster is None else set(cluster.coord.members())

        return Authorizer(
            self.site, secure=self.tls is not None, trust_domain=self.trust_domain,
            bindings=self.bindings, members=members, audit=self.audit,
        )

    def interceptor(self, authz: Authorizer) -> AuthInterceptor:
        return AuthInterceptor(authz)

    def server_credentials(self) -> Any:
        assert self.tls is not None
        return server_credentials(self.tls)

    def attach_history(self, writer_submit: Any) -> None:
        """Audit rows go to the history writer from now on (and the retained ones again)."""
        if self.audit is not None:
            self.audit.set_sink(lambda row: writer_submit("audit", row))

    async def aclose(self) -> None:
        await self.channels.close_all()
        if self.audit is not None:
            await self.audit.aclose()
