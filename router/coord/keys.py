"""Every etcd key Tandem uses, under one configurable prefix (default ``/tandem/``).

Values are JSON (UTF-8, compact, sorted keys) so that ``etcdctl get --prefix /tandem/``
shows them as they are. "lease" means the key is bound to the writing node's session
lease: it vanishes by itself when the node dies (TTL, default 3 s) or loses etcd.

Key layout::

    /tandem/members/<site>        lease  {"site", "address", "region", "kind", "pid",
                                          "started_at", "version"}
                                          membership: the node serving <site> and the
                                          gRPC address peers reach it at
    /tandem/load/<site>           lease  LoadSnapshot: {"site", "region", "kind", "seq",
                                          "ts", "accepting", "mode", "active_calls",
                                          "service_level", "free_agents": {skill: n},
                                          "queues": {name: {"skill", "channel",
                                          "language", "value", "length",
                                          "expected_wait_s", "staffed", "free_agents",
                                          "target_wait_s", "service_level"}}}
                                          published on change, at most a few times a
                                          second, and re-published every second
    /tandem/policy/overflow       -      OverflowPolicy (router.overflow): the cluster's
                                          overflow rules, partner contracts and
                                          contingency-mode settings; validated before
                                          it is written, and a watcher keeps the
                                          previous policy in force if the stored value
                                          is invalid
    /tandem/contingency/<site>    -      ContingencyState: {"mode": "normal" | "surge" |
                                          "emergency", "announcement", "reason",
                                          "set_by", "set_at"}; no key = normal
    /tandem/security/bindings     -      role bindings (router.security.bindings):
                                          {"version": 1, "bindings": [{"identity",
                                          "role", "sites"}]}; validated by the nodes,
                                          an invalid document leaves the previous one
                                          in force
    /tandem/partners/contracts/<p> -     PartnerContract (router.contracts) of BPO partner
                                          <p>: validated before it is written; a
                                          watcher keeps the previous contract of <p>
                                          in force if the stored value is invalid
    /tandem/partners/token-keys/<p> -    32 random bytes (hex): the key of <p>'s
                                          pseudonymous caller tokens; created once by
                                          the first node that needs it, never sent to
                                          a partner
    /tandem/partners/slots/<p>/<i> -     {"site", "call_id"}: concurrency slot i
                                          (0 <= i < caps.concurrent) of <p>, held by
                                          the origin's call from offer to outcome;
                                          not leased (a restarting origin keeps its
                                          slots and reconciles them with its journal)
    /tandem/partners/rate/<p>/<u>/<bucket> lease  calls offered to <p> in one
                                          second / hour / local day (u = s | h | d);
                                          the key expires with a lease of its own
                                          once the bucket is over
    /tandem/rebalancer/leader     lease  {"candidate", "pid", "since"}: the elected
                                          rebalancer; the key's create revision is
                                          the fencing token
    /tandem/targets/<site>        -      TargetDoc (router.plans): {"fencing",
                                          "generation", "plan", "base_revision",
                                          "leader", "ts", "targets": {"groups",
                                          "wait_factor", "partners"}}: the
                                          rebalancer's targets for <site>, written
                                          only while the writer's fencing token is
                                          the leader key's create revision; nodes
                                          refuse a fencing epoch lower than the
                                          highest they have applied
    /tandem/rebalancer/generation -      {"generation", "plan", "fencing", "leader",
                                          "ts"}: the plan generation last applied
                                          (written in the same transaction as its
                                          targets)
    /tandem/rebalancer/applied/<site> -  {"generation", "fencing", "plan",
                                          "pending_moves", "refused", "ts"}: what
                                          the node of <site> applied (written by it)

``/tandem/`` stands for the configured prefix (``TANDEM_ETCD_PREFIX``). Other
elections use ``<prefix><name>/leader`` the same way.
"""

from __future__ import annotations

import re

DEFAULT_PREFIX = "/tandem/"
#: The rebalancer's election name: its leader key is ``<prefix>rebalancer/leader``.
REBALANCER = "rebalancer"

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def _check_name(kind: str, name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"{kind} name must match {_NAME.pattern}, got {name!r}")
    return name


class Keys:
    """Key names under one prefix. ``Keys("/tandem/")`` is the default layout; tests use
    a unique prefix each so that they never see each other's keys."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not prefix.startswith("/") or not prefix.endswith("/") or "//" in prefix:
            raise ValueError(f"key prefix must start and end with '/', got {prefix!r}")
        self.prefix = prefix
        self.members_prefix = prefix + "members/"
        self.load_prefix = prefix + "load/"
        self.policy_overflow = prefix + "policy/overflow"
        self.contingency_prefix = prefix + "contingency/"
        self.security_bindings = prefix + "security/bindings"
        self.targets_prefix = prefix + "targets/"
        self.partner_contracts_prefix = prefix + "partners/contracts/"
        self.partner_slots_prefix = prefix + "partners/slots/"
        self.rebalancer_generation = prefix + "rebalancer/generation"
        self.applied_prefix = prefix + "rebalancer/applied/"

    def __repr__(self) -> str:
        return f"Keys({self.prefix!r})"

    def member(self, site: str) -> str:
        return self.members_prefix + _check_name("site", site)

    def load(self, site: str) -> str:
        return self.load_prefix + _check_name("site", site)

    def contingency(self, site: str) -> str:
        return self.contingency_prefix + _check_name("site", site)

    def leader(self, election: str = REBALANCER) -> str:
        return f"{self.prefix}{_check_name('election', election)}/leader"

    def targets(self, site: str) -> str:
        return self.targets_prefix + _check_name("site", site)

    def applied(self, site: str) -> str:
        return self.applied_prefix + _check_name("site", site)

    def partner_contract(self, partner: str) -> str:
        return self.partner_contracts_prefix + _check_name("partner", partner)

    def partner_token_key(self, partner: str) -> str:
        return f"{self.prefix}partners/token-keys/{_check_name('partner', partner)}"

    def partner_slots(self, partner: str) -> str:
        return f"{self.partner_slots_prefix}{_check_name('partner', partner)}/"

    def partner_slot(self, partner: str, i: int) -> str:
        return f"{self.partner_slots(partner)}{int(i)}"

    def partner_rate(self, partner: str, unit: str, bucket: str) -> str:
        if unit not in ("s", "h", "d") or not re.fullmatch(r"[0-9-]{1,16}", bucket):
            raise ValueError(f"bad rate bucket {unit}/{bucket}")
        return f"{self.prefix}partners/rate/{_check_name('partner', partner)}/{unit}/{bucket}"

    @staticmethod
    def site_of(key: bytes | str, under: str) -> str | None:
        """The site name of a key directly under ``under`` (e.g. ``members_prefix``), or
        None for a key that is not of that form."""
        k = key.decode() if isinstance(key, bytes) else key
        if not k.startswith(under):
            return None
        rest = k[len(under):]
        return rest if _NAME.match(rest) else None
