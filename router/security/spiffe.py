"""SPIFFE identities of a Tandem cluster: ``spiffe://TRUST_DOMAIN/KIND/NAME``.

Kinds: ``site`` (a node), ``operator`` (a person or tool), ``partner`` (a BPO's gateway),
``agents`` (a site's peripheral gateway: its PBX/IVR adapter and agent desktops),
``etcd`` (a member of the cluster's etcd: it serves the nodes' etcd clients),
``clickhouse`` (a ClickHouse server of the history: it serves the nodes' writers),
``rebalancer`` (the capacity rebalancer), ``monitor`` (a metrics scraper such as
Prometheus: a client certificate of the CA for the nodes' metrics endpoints; no RPC of
the permission table and no etcd user is granted to it). The
URI SAN of a certificate is its identity; its DNS SAN ``NAME.KIND.TRUST_DOMAIN`` is what
a client checks the server's certificate against (gRPC verifies DNS and IP SANs only, so
a client asks for ``lyon.site.tandem`` through ``grpc.ssl_target_name_override`` to know
it reached site ``lyon``, wherever it listens). Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("site", "operator", "partner", "agents", "etcd", "clickhouse", "rebalancer", "monitor")
DEFAULT_TRUST_DOMAIN = "tandem"
# DNS-label-like names: they also appear in DNS SANs and file names.
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?$")


class IdentityError(ValueError):
    """Not a Tandem SPIFFE ID (wrong scheme, kind, name or trust domain)."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    kind: str
    name: str

    def __post_init__(self) -> None:
        if not TRUST_DOMAIN_RE.match(self.trust_domain):
            raise IdentityError(f"bad trust domain {self.trust_domain!r}")
        if self.kind not in KINDS:
            raise IdentityError(f"bad identity kind {self.kind!r} (one of {', '.join(KINDS)})")
        if not NAME_RE.match(self.name):
            raise IdentityError(f"bad {self.kind} name {self.name!r} (lower-case letters, digits, '-')")

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/{self.kind}/{self.name}"

    @property
    def dns_name(self) -> str:
        """The DNS SAN a client checks: ``NAME.KIND.TRUST_DOMAIN``."""
        return f"{self.name}.{self.kind}.{self.trust_domain}"

    @property
    def file_stem(self) -> str:
        """``site-lyon``: the certificate is ``DIR/site-lyon.crt`` with ``.key`` beside it."""
        return f"{self.kind}-{self.name}"

    def __str__(self) -> str:
        return self.uri


def parse(uri: str | bytes) -> SpiffeId:
    """``spiffe://tandem/site/lyon`` -> SpiffeId; IdentityError on anything else."""
    if isinstance(uri, bytes):
        uri = uri.decode("utf-8", "replace")
    m = re.fullmatch(r"spiffe://([^/]+)/([^/]+)/([^/]+)", uri or "")
    if not m:
        raise IdentityError(f"not a Tandem SPIFFE ID: {uri!r} (spiffe://DOMAIN/KIND/NAME)")
    return SpiffeId(m.group(1), m.group(2), m.group(3))
