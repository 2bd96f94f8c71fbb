"""Who this node may dial, and whom it expects to find there.

A transfer target is never an arbitrary host (issue: a plaintext node once dialed any
host:port it was given and held the call out of dispatch meanwhile):

* it must be ``host:port`` (INVALID_ARGUMENT ``BAD_TARGET`` otherwise, nothing changed);
* when the node has a cluster view it must be the advertised address of a current member
  other than itself (FAILED_PRECONDITION ``UNKNOWN_TARGET``);
* an mTLS node without a cluster view knows no member: it refuses every target
  (``UNKNOWN_TARGET``). A plaintext node without one (loopback development and tests)
  accepts any well-formed address.

Over mTLS the target must also prove the identity of the member at that address (its
certificate's DNS SAN ``SITE.site.TRUST_DOMAIN``); a transfer resumed after a restart
whose target is no longer a member accepts any site of the cluster (``site.TRUST_DOMAIN``)
so that it can still be resolved.
"""

from __future__ import annotations

import re
from typing import Any

from router.model import RoutingError
from router.security import spiffe

_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]{1,253}):(\d{1,5})$")


def parse_address(target: str) -> tuple[str, int]:
    m = _ADDRESS.match(target or "")
    if not m or not 0 < int(m.group(2)) < 65536:
        raise RoutingError("INVALID_ARGUMENT", "BAD_TARGET", f"target {target[:100]!r} is not host:port", field="target")
    return m.group(1), int(m.group(2))


def members_by_address(node: Any) -> dict[str, str] | None:
    """address -> site of the current members other than this node, or None without a
    cluster view."""
    cluster = getattr(node, "cluster", None)
    if cluster is None:
        return None
    me = node.site.site.name
    return {m.address: name for name, m in cluster.coord.members().items() if name != me}


def check_target(node: Any, target: str) -> None:
    """Raise RoutingError unless ``target`` may receive a transfer from ``node``."""
    parse_address(target)
    members = members_by_address(node)
    secure = getattr(node, "channels", None) is not None and node.channels.secure
    if members is None:
        if secure:
            raise RoutingError("FAILED_PRECONDITION", "UNKNOWN_TARGET",
                               "this node has no cluster view: no member address to transfer to", target=target)
        return
    if target not in members:
        raise RoutingError("FAILED_PRECONDITION", "UNKNOWN_TARGET",
                           f"{target} is not the address of a current member", target=target)


def peer_identity(node: Any, address: str) -> spiffe.SpiffeId | None:
    """The identity the node at ``address`` must prove (None on a plaintext node)."""
    factory = getattr(node, "channels", None)
    if factory is None or not factory.secure or factory.identity is None:
        return None
    members = members_by_address(node) or {}
    site = members.get(address)
    if site is not None:
        return factory.expect("site", site)
    return any_site(factory.identity.trust_domain)


class _AnySite(spiffe.SpiffeId):
    """Stands for "some site of the trust domain": its DNS name is ``site.DOMAIN``."""

    @property
    def dns_name(self) -> str:  # type: ignore[override]
        return f"site.{self.trust_domain}"

    @property
    def uri(self) -> str:  # type: ignore[override]
        return f"spiffe://{self.trust_domain}/site/*"


def any_site(trust_domain: str) -> spiffe.SpiffeId:
    return _AnySite(trust_domain, "site", "any")
