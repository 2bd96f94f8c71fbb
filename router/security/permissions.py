"""The permission table: which role may call which RPC. One place; the README prints it
(``tandem security table``) and the tests are generated from it. Pure: no I/O.

Every RPC of a node acts on that node's site, so a binding's scope (a list of sites, or
``*``) covers a call when it names the serving node's site. Default deny: an RPC missing
from :data:`TABLE` is refused to everybody.

Roles:

* ``viewer`` — reads: status, calls, agents, transfers, wait estimates.
* ``supervisor`` — reads, plus agent and site actions (set an agent's state, sign an
  agent out, move an agent to another group, move a queued call to another member,
  drain the site, set its contingency mode), its audit records and replay input.
* ``operator`` — everything an operator does: the above, offers and agent sessions on
  behalf of the site, the overflow policy and the partners' contracts (cluster-wide:
  only with scope ``*``). Not the member-to-member transfer protocol.
* ``site`` — a node of the cluster: the Interconnect transfer protocol, between current
  members only; also Routing.GetCall (an origin asks a partner node about the calls it
  sent, for caps) and Routing.AbandonCall (an abandon forwarded after a transfer).
* ``agent-gateway`` — a site's peripheral gateway (PBX/IVR adapter and agent desktops):
  the Routing and Agents services of its own site; the only role that may open the
  multiplexed agent stream (``Agents.Gateway``: every agent of the site on one stream).
* ``operator``, ``supervisor``, ``viewer`` also on the rebalancer (``tandem rebalancer``,
  which acts on the whole cluster, so only bindings with scope ``*`` count there): its
  status for every reader, a plan computed for supervisors and operators, a plan applied
  for operators.
* ``partner`` — a BPO partner's gateway: the Partner service (offers within its
  contract, outcomes, hand-backs), as the partner its certificate names; nothing of the
  node's other services.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("viewer", "supervisor", "operator", "site", "agent-gateway", "partner")

_READ = frozenset({"viewer", "supervisor", "operator"})
_ALL_BUT_PARTNER = frozenset({"viewer", "supervisor", "operator", "site", "agent-gateway"})


@dataclass(frozen=True, slots=True)
class Rule:
    """Who may call one RPC, and whether it changes anything (mutations are audited
    whatever the decision; reads only when refused)."""

    roles: frozenset[str]
    mutates: bool = False
    members_only: bool = False  # the caller's site identity must be a current member
    cluster_wide: bool = False  # acts on every site: the binding's scope must be "*"


def _r(*roles: str | frozenset[str], mutates: bool = False, members_only: bool = False,
       cluster_wide: bool = False) -> Rule:
    out: set[str] = set()
    for r in roles:
        out |= {r} if isinstance(r, str) else set(r)
    unknown = out - set(ROLES)
    assert not unknown, unknown
    return Rule(frozenset(out), mutates, members_only, cluster_wide)


R = "/router.v1.Routing/"
A = "/router.v1.Agents/"
ADM = "/router.v1.Admin/"
IC = "/router.v1.Interconnect/"
PT = "/router.v1.Partner/"
RB = "/router.v1.Rebalancer/"

#: full gRPC method name -> rule. Default deny for anything not listed.
TABLE: dict[str, Rule] = {
    R + "OfferCall": _r("agent-gateway", "operator", mutates=True),
    R + "AbandonCall": _r("agent-gateway", "operator", "site", mutates=True),
    R + "CompleteCall": _r("agent-gateway", "operator", mutates=True),
    R + "GetCall": _r(_READ, "agent-gateway", "site"),
    R + "WatchCall": _r(_READ, "agent-gateway"),
    R + "EstimateWait": _r(_READ, "agent-gateway"),
    A + "SignIn": _r("agent-gateway", "operator", mutates=True),
    A + "SignOut": _r("agent-gateway", "supervisor", "operator", mutates=True),
    A + "SetState": _r("agent-gateway", "supervisor", "operator", mutates=True),
    A + "GetAgent": _r(_READ, "agent-gateway"),
    A + "Connect": _r("agent-gateway", "operator", mutates=True),
    # Many agents' sessions on one stream: a site's gateway only, not a person.
    A + "Gateway": _r("agent-gateway", mutates=True),
    ADM + "GetStatus": _r(_READ),
    ADM + "ListCalls": _r(_READ),
    ADM + "ListAgents": _r(_READ),
    ADM + "ListMembers": _r(_READ),
    ADM + "GetPolicy": _r(_READ),
    ADM + "DiffPolicy": _r(_READ),
    ADM + "ApplyPolicy": _r("operator", mutates=True, cluster_wide=True),
    ADM + "GetReplayInput": _r("supervisor", "operator"),
    ADM + "SetDrain": _r("supervisor", "operator", mutates=True),
    ADM + "SetMode": _r("supervisor", "operator", mutates=True),
    ADM + "MoveAgent": _r("supervisor", "operator", mutates=True),
    ADM + "ListAlerts": _r(_READ),
    ADM + "ListAudit": _r("supervisor", "operator"),
    ADM + "DescribeCall": _r(_READ),
    ADM + "ListPartners": _r(_READ),
    ADM + "DiffContract": _r(_READ),
    ADM + "ApplyContract": _r("operator", mutates=True, cluster_wide=True),
    "/router.v1.Diagnostics/Echo": _r(_ALL_BUT_PARTNER),
    IC + "ProposeTransfer": _r("site", mutates=True, members_only=True),
    IC + "CommitTransfer": _r("site", mutates=True, members_only=True),
    IC + "AbortTransfer": _r("site", mutates=True, members_only=True),
    IC + "GetTransfer": _r("site", _READ, members_only=False),
    IC + "TransferCall": _r("supervisor", "operator", mutates=True),
    IC + "DrainSite": _r("operator", mutates=True),
    # A partner acts only as the partner its certificate names (router.node.partner), on
    # the calls this node assigned to it.
    PT + "Connect": _r("partner", mutates=True),
    PT + "ReportOutcome": _r("partner", mutates=True),
    PT + "HandBack": _r("partner", mutates=True),
    # The rebalancer (``tandem rebalancer``) acts on the whole cluster: scope '*' for all.
    RB + "GetRebalancerStatus": _r(_READ),
    RB + "PlanCapacity": _r("supervisor", "operator"),
    RB + "ApplyPlan": _r("operator", mutates=True, cluster_wide=True),
    "/grpc.health.v1.Health/Check": _r(ROLES),
    "/grpc.health.v1.Health/Watch": _r(ROLES),
    "/grpc.health.v1.Health/List": _r(ROLES),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _r(_ALL_BUT_PARTNER),
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": _r(_ALL_BUT_PARTNER),
}


def rule(method: str) -> Rule | None:
    return TABLE.get(method)


def allowed(role: str, method: str) -> bool:
    r = TABLE.get(method)
    return r is not None and role in r.roles


def markdown_table() -> str:
    """The table as Markdown (RPC x role), for the README."""
    head = "| RPC | " + " | ".join(ROLES) + " |\n|---|" + "---|" * len(ROLES) + "\n"
    rows = []
    for method, r in TABLE.items():
        name = method.lstrip("/").replace("router.v1.", "")
        marks = " | ".join("yes" if role in r.roles else "" for role in ROLES)
        extra = " (audited)" if r.mutates else ""
        extra += " (members only)" if r.members_only else ""
        extra += " (scope *)" if r.cluster_wide else ""
        rows.append(f"| `{name}`{extra} | {marks} |")
    return head + "\n".join(rows) + "\n"
