"""``tandem ctl``: the operator's commands (kubectl-like nouns and verbs), every one an
Admin (or Agents) RPC to the nodes, authorized by role and scope and audited there.

Reads are cluster-wide: every node is asked at once with a short deadline; a node that
does not answer is shown as unreachable, and the command fails (exit 2) only when none
answers. Mutations ask ``[y/N]`` on a terminal and need ``--yes`` otherwise.

Exit codes: 0 ok, 1 error (``policy diff``, ``partner diff``: something would change),
2 cannot connect, 3 permission denied, 4 not found, 64 usage (see :mod:`router.ctl.client`).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

import grpc
import typer
from google.protobuf.json_format import MessageToDict
from typer.core import TyperGroup

from router.ctl import output
from router.ctl.client import (
    EXIT_CODES_TEXT,
    EXIT_ERROR,
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    ClusterClient,
    CtlError,
    NodeResult,
    describe,
    exit_code,
    overall_exit,
    raise_if_none,
)
from router.ctl.context import ContextError, resolve
from router.ctl.output import Column, pct, secs
from router.engine.partner import partner_of_target
from router.v1 import admin_pb2, agents_pb2
from router.v1 import types_pb2 as t

try:  # typer >= 0.24 vendors click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer on click
    from click.exceptions import UsageError  # type: ignore[no-redef]


class _UsageExit64(TyperGroup):
    """Bad arguments to any ``ctl`` command exit 64 (click's default 2 means "cannot
    connect" here)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as e:
            e.exit_code = EXIT_USAGE
            raise


HELP = (
    "Operate the cluster: get, describe, drain, mode, agent, policy, partner, audit. Every action "
    "is an Admin RPC authorized and audited by the nodes. Context: --context FILE, "
    "else $TANDEM_CONTEXT, else the user config file (tandem up writes one).\n\n"
    "Data goes to stdout, messages to stderr; -o table|wide|json|yaml; NO_COLOR honoured. "
    "Mutations ask \\[y/N] on a terminal and need --yes otherwise.\n\n" + EXIT_CODES_TEXT
)

ctl_app = typer.Typer(cls=_UsageExit64, no_args_is_help=True, help=HELP, add_completion=False)
get_app = typer.Typer(no_args_is_help=True, add_completion=False,
                      help="List sites, members, queues, agents, calls, the policy, partners or alerts, "
                           "cluster-wide.")
describe_app = typer.Typer(no_args_is_help=True, add_completion=False, help="Show one object in full.")
agent_app = typer.Typer(no_args_is_help=True, add_completion=False, help="Move an agent or sign one out.")
policy_app = typer.Typer(no_args_is_help=True, add_completion=False,
                         help="Compare or apply an overflow policy file.")
partner_app = typer.Typer(no_args_is_help=True, add_completion=False,
                          help="Compare or apply a BPO partner's contract file.")
ctl_app.add_typer(get_app, name="get")
ctl_app.add_typer(describe_app, name="describe")
ctl_app.add_typer(agent_app, name="agent")
ctl_app.add_typer(policy_app, name="policy")
ctl_app.add_typer(partner_app, name="partner")


def register(app: typer.Typer) -> None:
    """``tandem ctl …`` and ``tandem top``."""
    from router.ctl import top

    app.add_typer(ctl_app, name="ctl")
    top.register(app)


# ---------------------------------------------------------------- plumbing

@dataclass
class Settings:
    context: Optional[Path] = None
    name: Optional[str] = None
    timeout: float = 3.0


@ctl_app.callback()
def _main(
    ctx: typer.Context,
    context: Optional[Path] = typer.Option(None, "--context", metavar="FILE",
                                           help="context file (default: $TANDEM_CONTEXT, else the user config)"),
    name: Optional[str] = typer.Option(None, "--context-name", metavar="NAME",
                                       help="a context of the file other than its current-context"),
    timeout: float = typer.Option(3.0, "--timeout", min=0.1, help="deadline of each RPC, seconds"),
) -> None:
    ctx.obj = Settings(context, name, timeout)


def _settings(ctx: typer.Context) -> Settings:
    s = ctx.find_object(Settings)
    return s if s is not None else Settings()


def run(ctx: typer.Context, body: Callable[[ClusterClient], Awaitable[int | None]]) -> None:
    """Resolve the context, run ``body`` with a client, exit with its code (or the code
    of the CtlError / RPC error it raised)."""
    s = _settings(ctx)
    try:
        context = resolve(s.context, s.name)
    except ContextError as e:
        output.error(str(e))
        raise typer.Exit(EXIT_USAGE) from None

    async def main() -> int | None:
        async with ClusterClient(context, s.timeout) as client:
            return await body(client)

    try:
        code = asyncio.run(main())
    except CtlError as e:
        output.error(e.message)
        raise typer.Exit(e.code) from None
    except grpc.RpcError as e:
        output.error(describe(e))
        raise typer.Exit(exit_code(e)) from None
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    raise typer.Exit(code or 0)


def confirm(action: str, yes: bool) -> None:
    """Ask ``[y/N]`` on a terminal; off a terminal, only ``--yes`` lets a mutation run."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise CtlError(EXIT_USAGE, f"refusing to {action} without --yes (stdin is not a terminal)")
    if not typer.confirm(f"{action}?", default=False, err=True):
        raise CtlError(EXIT_ERROR, "aborted: nothing changed")


def _fmt_option() -> Any:
    return typer.Option("table", "-o", "--output", metavar="FORMAT", help="table | wide | json | yaml",
                        callback=_check_format)


def _check_format(v: str) -> str:
    if v not in output.FORMATS:
        raise typer.BadParameter(f"{v!r}: choose one of {', '.join(output.FORMATS)}")
    return v


def _watch_option() -> Any:
    return typer.Option(False, "-w", "--watch", help="redraw every second until Ctrl-C")


def _count_option() -> Any:
    return typer.Option(0, "--watch-count", hidden=True, min=0, help="stop after N refreshes (tests)")


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S")


def _when_ms(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3]


def _enum(value: int, enum: Any, prefix: str) -> str:
    try:
        name = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix).lower()


def _msg(m: Any) -> dict:
    return MessageToDict(m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _kind(kind: str) -> str:
    return "partner" if kind == "partner" else "in-house"


def _warn_failures(results: dict[str, NodeResult], what: str) -> None:
    for r in results.values():
        if r.error is not None:
            output.warn(f"{r.site} ({r.address}): {what}: {r.status}: {describe(r.error)}")


async def _loop(render: Callable[[int], Awaitable[int | None]], watch: bool, count: int, fmt: str) -> int | None:
    """Render once, or every second with --watch (at most ``count`` times when given).
    On a terminal a table redraws in place; elsewhere each refresh follows the last."""
    n = 0
    code: int | None = None
    tty = sys.stdout.isatty()
    while True:
        if watch and tty and fmt in ("table", "wide") and n:
            output.out().clear()
        code = await render(n)
        n += 1
        if not watch or (count and n >= count):
            return code
        if not tty and fmt in ("table", "wide"):
            sys.stdout.write("\n")
        elif fmt == "yaml":
            sys.stdout.write("---\n")
        sys.stdout.flush()
        await asyncio.sleep(1.0)


# ---------------------------------------------------------------- get

def site_rows(statuses: dict[str, NodeResult], members: list[Any] | None, addresses: dict[str, str]) -> list[dict]:
    """One row per site: the node's own status where it answered, else what etcd says."""
    by_member = {m.site: m for m in members or ()}
    rows = []
    for name in sorted(set(statuses) | set(by_member)):
        r, m = statuses.get(name), by_member.get(name)
        row: dict[str, Any] = {"name": name, "address": addresses.get(name) or (m.address if m else ""),
                               "status": r.status if r is not None else "not asked"}
        if r is not None and r.ok:
            st = r.value
            qs = list(st.queues)
            measured = [(q.service_level, q.offered) for q in qs if q.service_level >= 0]
            weight = sum(max(o, 1) for _, o in measured)
            sl = sum(s * max(o, 1) for s, o in measured) / weight if measured else None
            row.update({
                "kind": _kind(st.kind), "region": st.region, "serving": st.serving, "draining": st.draining,
                "mode": st.mode or (m.mode if m and m.mode else "normal"),
                "waiting": sum(q.length for q in qs),
                "service_level": round(sl, 4) if sl is not None else None,
                "oldest_wait_s": round(max((q.oldest_wait_s for q in qs), default=0.0), 3),
                "agents_ready": st.agents_by_state.get("ready", 0),
                "agents_not_ready": st.agents_by_state.get("not_ready", 0),
                "agents_wrap_up": st.agents_by_state.get("wrap_up", 0),
                "calls": dict(st.calls_by_state),
                "overflow_in_last_min": st.overflow_in_last_min,
                "overflow_out_last_min": st.overflow_out_last_min,
                "alerts_firing": st.alerts_firing, "queues": len(qs), "journal_seq": st.journal_seq,
                "targets_generation": st.targets_generation, "targets_fencing": st.targets_fencing,
                "targets_pending_moves": st.targets_pending_moves,
                "member": m is not None if members is not None else None,
            })
        else:
            row.update({
                "kind": _kind(m.kind) if m else None, "region": m.region if m else None,
                "serving": None, "draining": (not m.accepting) if m else None,
                "mode": m.mode if m else None, "waiting": m.waiting if m else None, "service_level": None,
                "member": m is not None if members is not None else None,
            })
            if r is not None and r.error is not None:
                row["error"] = describe(r.error)
        rows.append(row)
    return rows


SITE_COLUMNS = [
    Column("name", "SITE"), Column("kind", "KIND"), Column("status", "STATUS"),
    Column("serving", "SERVING"), Column("draining", "DRAINING"), Column("mode", "MODE"),
    Column("waiting", "WAITING", justify="right"), Column("service_level", "SL", pct, justify="right"),
    Column("oldest_wait_s", "OLDEST", secs, wide=True, justify="right"),
    Column("agents_ready", "READY", wide=True, justify="right"),
    Column("overflow_in_last_min", "OVF-IN/MIN", wide=True, justify="right"),
    Column("overflow_out_last_min", "OVF-OUT/MIN", wide=True, justify="right"),
    Column("alerts_firing", "ALERTS", wide=True, justify="right"),
    Column("targets_generation", "PLAN-GEN", wide=True, justify="right"),
    Column("region", "REGION", wide=True), Column("address", "ADDRESS", wide=True),
]


@get_app.command("sites")
def get_sites(ctx: typer.Context, fmt: str = _fmt_option(), watch: bool = _watch_option(),
              count: int = _count_option()) -> None:
    """Every site: kind, serving, draining, mode, waiting calls, service level."""

    async def body(c: ClusterClient) -> int | None:
        async def render(n: int) -> int | None:
            members = await c.discover() if n == 0 else c.members
            statuses = await c.each("GetStatus", admin_pb2.GetStatusRequest())
            if n == 0:
                raise_if_none(statuses, "get sites")
            rows = site_rows(statuses, members, c.sites)
            output.emit(rows, fmt, rows, SITE_COLUMNS, compact=watch)
            return None

        return await _loop(render, watch, count, fmt)

    run(ctx, body)


MEMBER_COLUMNS = [
    Column("site", "SITE"), Column("kind", "KIND"), Column("accepting", "ACCEPTING"), Column("mode", "MODE"),
    Column("waiting", "WAITING", justify="right"), Column("load_age_s", "LOAD-AGE", secs, justify="right"),
    Column("region", "REGION", wide=True), Column("address", "ADDRESS", wide=True),
]


@get_app.command("members")
def get_members(ctx: typer.Context, fmt: str = _fmt_option(), watch: bool = _watch_option(),
                count: int = _count_option()) -> None:
    """The cluster's members as etcd holds them (through a node), with their load."""

    async def body(c: ClusterClient) -> int | None:
        async def render(n: int) -> int | None:
            c.members = None
            members = await c.discover()
            if members is None:
                err = c.discovery_error
                raise CtlError(exit_code(err) if err else EXIT_ERROR,
                               f"get members: no node could list the members ({describe(err) if err else 'no node'})")
            rows = [{**_msg(m), "kind": _kind(m.kind)} for m in sorted(members, key=lambda m: m.site)]
            output.emit(rows, fmt, rows, MEMBER_COLUMNS, compact=watch)
            return None

        return await _loop(render, watch, count, fmt)

    run(ctx, body)


def queue_rows(statuses: dict[str, NodeResult]) -> list[dict]:
    rows = []
    for site, r in sorted(statuses.items()):
        if not r.ok:
            rows.append({"site": site, "queue": "-", "status": r.status, "error": describe(r.error)})
            continue
        for q in r.value.queues:
            rows.append({
                "site": site, "queue": q.name, "status": "ok", "skill": q.skill,
                "channel": _enum(q.channel, t.Channel, "CHANNEL_"), "language": q.language,
                "waiting": q.length, "oldest_wait_s": round(q.oldest_wait_s, 3),
                "expected_wait_s": round(q.expected_wait_s, 3) if q.expected_wait_s < output.UNBOUNDED_S else None,
                "service_level": round(q.service_level, 4) if q.service_level >= 0 else None,
                "service_level_target": q.service_level_target,
                "service_level_threshold_s": q.service_level_threshold_s,
                "agents_ready": q.agents_ready, "agents_on_contact": q.agents_on_contact,
                "agents_wrap_up": q.agents_wrap_up, "agents_not_ready": q.agents_not_ready,
                "agents_staffed": q.agents_staffed, "offered": q.offered, "answered": q.answered,
                "abandoned": q.abandoned, "overflow_in_last_min": q.overflow_in_last_min,
                "overflow_out_last_min": q.overflow_out_last_min,
            })
    return rows


def _sl_target(row: dict) -> str:
    return pct(row.get("service_level_target")) if row.get("service_level_target") else "-"


QUEUE_COLUMNS = [
    Column("site", "SITE"), Column("queue", "QUEUE"), Column("waiting", "WAITING", justify="right"),
    Column("oldest_wait_s", "OLDEST", secs, justify="right"),
    Column("expected_wait_s", "EWT", secs, justify="right"),
    Column("service_level", "SL", pct, justify="right"),
    Column("service_level_target", "TARGET", lambda v: pct(v) if v else "-", justify="right"),
    Column("agents_ready", "READY", justify="right"), Column("agents_staffed", "STAFFED", justify="right"),
    Column("channel", "CHANNEL", wide=True), Column("skill", "SKILL", wide=True),
    Column("language", "LANG", lambda v: v or "-", wide=True),
    Column("agents_on_contact", "ON-CONTACT", wide=True, justify="right"),
    Column("agents_wrap_up", "ACW", wide=True, justify="right"),
    Column("agents_not_ready", "NOT-READY", wide=True, justify="right"),
    Column("offered", "OFFERED", wide=True, justify="right"),
    Column("answered", "ANSWERED", wide=True, justify="right"),
    Column("abandoned", "ABANDONED", wide=True, justify="right"),
    Column("overflow_in_last_min", "OVF-IN/MIN", wide=True, justify="right"),
    Column("overflow_out_last_min", "OVF-OUT/MIN", wide=True, justify="right"),
]


@get_app.command("queues")
def get_queues(ctx: typer.Context, fmt: str = _fmt_option(), watch: bool = _watch_option(),
               count: int = _count_option(),
               site: Optional[str] = typer.Option(None, "--site", help="only this site")) -> None:
    """Every queue of every site: waiting, oldest and expected wait, service level, agents."""

    async def body(c: ClusterClient) -> int | None:
        if site is not None:
            await _need_site(c, site)

        async def render(n: int) -> int | None:
            statuses = await c.each("GetStatus", admin_pb2.GetStatusRequest(), sites=[site] if site else None)
            raise_if_none(statuses, "get queues")
            rows = queue_rows(statuses)
            output.emit(rows, fmt, rows, QUEUE_COLUMNS, compact=watch)
            return None

        return await _loop(render, watch, count, fmt)

    run(ctx, body)


AGENT_COLUMNS = [
    Column("site", "SITE"), Column("agent_id", "AGENT"), Column("group", "GROUP"), Column("state", "STATE"),
    Column("reason", "REASON", lambda v: v or "-"), Column("call_ids", "CALLS", output.joined),
    Column("state_since", "SINCE", _when, wide=True), Column("connected", "CONNECTED", output.yesno, wide=True),
    Column("queues", "QUEUES", output.joined, wide=True),
]


@get_app.command("agents")
def get_agents(ctx: typer.Context, fmt: str = _fmt_option(), watch: bool = _watch_option(),
               count: int = _count_option(),
               site: Optional[str] = typer.Option(None, "--site", help="only this site")) -> None:
    """Every agent of every site: group, state, contacts in hand."""

    async def body(c: ClusterClient) -> int | None:
        if site is not None:
            await _need_site(c, site)

        async def render(n: int) -> int | None:
            res = await c.each("ListAgents", admin_pb2.ListAgentsRequest(), sites=[site] if site else None)
            raise_if_none(res, "get agents")
            _warn_failures(res, "list agents")
            rows = []
            for s, r in sorted(res.items()):
                for a in r.value.agents if r.ok else ():
                    rows.append({"site": s, "agent_id": a.agent_id, "group": a.group,
                                 "state": _enum(a.state, t.AgentState, "AGENT_STATE_"), "reason": a.reason,
                                 "call_ids": list(a.call_ids), "queues": list(a.queues),
                                 "state_since": a.state_since, "connected": a.connected})
            output.emit(rows, fmt, rows, AGENT_COLUMNS, compact=watch)
            return None

        return await _loop(render, watch, count, fmt)

    run(ctx, body)


def _target(site: str, address: str) -> str:
    """Where a call went, as an operator reads it: the site (or partner) name with the
    address, or the address alone when the node could not name it."""
    if not address:
        return ""
    if not site:
        return address
    return site if partner_of_target(address) == site else f"{site} ({address})"


def call_row(site: str, c: Any) -> dict:
    end = c.ended_at or c.answered_at or 0.0
    return {
        "site": site, "call_id": c.call_id, "state": _enum(c.state, t.CallState, "CALL_STATE_"),
        "queue": c.queue, "skill": c.skill, "channel": _enum(c.channel, t.Channel, "CHANNEL_"),
        "language": c.language, "priority": _enum(c.priority_class, t.PriorityClass, "PRIORITY_CLASS_"),
        "agent_id": c.agent_id, "offered_at": c.offered_at, "answered_at": c.answered_at,
        "ended_at": c.ended_at, "waited_s": round(((c.answered_at or end or time.time()) - c.queued_at), 3)
        if c.queued_at else None,
        "transfer_count": c.transfer_count, "transfer_target": c.transfer_target,
        "transfer_target_site": c.transfer_target_site, "transfer_origin": c.transfer_origin,
        "to": _target(c.transfer_target_site, c.transfer_target),
        "reject_reason": c.reject_reason, "abandon_reason": c.abandon_reason,
    }


CALL_COLUMNS = [
    Column("site", "SITE"), Column("call_id", "CALL"), Column("state", "STATE"), Column("queue", "QUEUE"),
    Column("agent_id", "AGENT", lambda v: v or "-"), Column("waited_s", "WAITED", secs, justify="right"),
    Column("offered_at", "OFFERED", _when, wide=True), Column("priority", "PRIORITY", wide=True),
    Column("transfer_count", "TRANSFERS", wide=True, justify="right"),
    Column("transfer_origin", "FROM", lambda v: v or "-", wide=True),
    Column("to", "TO", lambda v: v or "-", wide=True),
    Column("reject_reason", "REJECTED", lambda v: v or "-", wide=True),
    Column("abandon_reason", "ABANDONED", lambda v: v or "-", wide=True),
]

# the states a call rests in (OFFERED only exists within the command that offers it)
_STATES = [n.removeprefix("CALL_STATE_").lower() for n in t.CallState.keys()
           if n not in ("CALL_STATE_UNSPECIFIED", "CALL_STATE_OFFERED")]


@get_app.command("calls")
def get_calls(ctx: typer.Context, fmt: str = _fmt_option(), watch: bool = _watch_option(),
              count: int = _count_option(),
              state: Optional[str] = typer.Option(None, "--state", help=f"only calls in this state: {'|'.join(_STATES)}"),
              site: Optional[str] = typer.Option(None, "--site", help="only this site"),
              limit: int = typer.Option(1000, "--limit", min=1, help="at most this many calls per site")) -> None:
    """The calls every node knows (active and retained ended ones), in offer order."""
    if state is not None and state.lower() not in _STATES:
        raise typer.BadParameter(f"{state!r}: choose one of {', '.join(_STATES)}", param_hint="--state")
    st = t.CallState.Value("CALL_STATE_" + state.upper()) if state else 0

    async def list_site(c: ClusterClient, s: str) -> list[Any]:
        calls: list[Any] = []
        token = ""
        while len(calls) < limit:
            r = await c.call(s, "ListCalls", admin_pb2.ListCallsRequest(
                page_size=min(1000, limit - len(calls)), page_token=token, state=st))
            calls.extend(r.calls)
            token = r.next_page_token
            if not token:
                break
        return calls[:limit]

    async def body(c: ClusterClient) -> int | None:
        if site is not None:
            await _need_site(c, site)

        async def render(n: int) -> int | None:
            names = [site] if site else sorted(c.sites)
            got = await asyncio.gather(*(list_site(c, s) for s in names), return_exceptions=True)
            res = {}
            for s, g in zip(names, got):
                if isinstance(g, BaseException) and not isinstance(g, Exception):
                    raise g
                res[s] = NodeResult(s, c.sites[s], error=g) if isinstance(g, Exception) else NodeResult(s, c.sites[s], g)
            raise_if_none(res, "get calls")
            _warn_failures(res, "list calls")
            rows = [call_row(s, call) for s, r in sorted(res.items()) if r.ok for call in r.value]
            output.emit(rows, fmt, rows, CALL_COLUMNS, compact=watch)
            return None

        return await _loop(render, watch, count, fmt)

    run(ctx, body)


@get_app.command("policy")
def get_policy(ctx: typer.Context, fmt: str = _fmt_option()) -> None:
    """The overflow policy in force (from etcd, through a node) and its revision."""

    async def body(c: ClusterClient) -> int | None:
        r = await c.first("GetPolicy", admin_pb2.GetPolicyRequest())
        p = r.value
        data = {"revision": p.revision, "from": r.site, "error": p.error,
                "policy": json.loads(p.policy_json) if p.policy_json else None}
        if fmt in ("json", "yaml"):
            output.emit(data, fmt)
        else:
            output.message(f"overflow policy, revision {p.revision} (from {r.site})"
                           + (f"; stored policy invalid: {p.error}" if p.error else ""))
            sys.stdout.write(output.dump(data["policy"], "yaml"))
        return None

    run(ctx, body)


def partner_rows(results: dict[str, NodeResult]) -> list[dict]:
    """One row per partner from every node's ListPartners: the contract as the node with
    the newest revision holds it (every node reads the same etcd), and the sites its
    gateway is connected to (each node knows only its own gateways)."""
    rows: dict[str, dict] = {}
    best: dict[str, tuple[int, str]] = {}
    for site, r in sorted(results.items()):
        if not r.ok:
            continue
        for p in r.value.partners:
            row = rows.setdefault(p.partner, {"partner": p.partner, "connected": [], "gateways": {}})
            if p.connected:
                row["connected"].append(site)
                row["gateways"][site] = p.gateway
            if p.partner in best and best[p.partner] >= (p.revision, site):
                continue
            best[p.partner] = (p.revision, site)
            row.update({
                "cap": p.cap or None, "held": p.held, "revision": p.revision, "error": p.error,
                "contract": json.loads(p.contract_json) if p.contract_json else None, "from": site,
            })
    return [rows[k] for k in sorted(rows)]


PARTNER_COLUMNS = [
    Column("partner", "PARTNER"), Column("cap", "CAP", lambda v: str(v) if v else "none", justify="right"),
    Column("held", "HELD", justify="right"), Column("connected", "CONNECTED", output.joined),
    Column("revision", "REVISION", justify="right"),
    Column("error", "ERROR", lambda v: "; ".join(x.strip() for x in v.splitlines()) if v else "-"),
    Column("gateways", "GATEWAYS", lambda v: ",".join(f"{k}={x}" for k, x in sorted((v or {}).items())) or "-",
           wide=True),
]


@get_app.command("partners")
def get_partners(ctx: typer.Context, fmt: str = _fmt_option()) -> None:
    """BPO partners with a contract: its cap, slots held cluster-wide, where its gateway is connected.

    The revision is that of the contract in force; ERROR says why a stored one is
    ignored (the previous one stays in force)."""

    async def body(c: ClusterClient) -> int | None:
        await c.discover()
        res = await c.each("ListPartners", admin_pb2.ListPartnersRequest())
        raise_if_none(res, "get partners")
        _warn_failures(res, "list partners")
        rows = partner_rows(res)
        output.emit(rows, fmt, rows, PARTNER_COLUMNS)
        return None

    run(ctx, body)


ALERT_COLUMNS = [
    Column("site", "SITE"), Column("name", "ALERT"), Column("severity", "SEVERITY"), Column("state", "STATE"),
    Column("since", "SINCE", _when), Column("summary", "SUMMARY"),
    Column("value", "VALUE", lambda v: f"{v:g}" if v is not None else "-", wide=True),
    Column("labels", "LABELS", lambda v: ",".join(f"{k}={x}" for k, x in sorted((v or {}).items())) or "-",
           wide=True),
]


@get_app.command("alerts")
def get_alerts(ctx: typer.Context, fmt: str = _fmt_option(), watch: bool = _watch_option(),
               count: int = _count_option()) -> None:
    """Alerts pending or firing at every node."""

    async def body(c: ClusterClient) -> int | None:
        async def render(n: int) -> int | None:
            res = await c.each("ListAlerts", admin_pb2.ListAlertsRequest())
            raise_if_none(res, "get alerts")
            _warn_failures(res, "list alerts")
            rows = [{"site": a.site or s, "name": a.name, "severity": a.severity, "state": a.state,
                     "since": a.since, "value": a.value, "summary": a.summary, "labels": dict(a.labels)}
                    for s, r in sorted(res.items()) if r.ok for a in r.value.alerts]
            output.emit(rows, fmt, rows, ALERT_COLUMNS, compact=watch)
            return None

        return await _loop(render, watch, count, fmt)

    run(ctx, body)


# ---------------------------------------------------------------- describe

def _detail(ev: Any) -> dict:
    if not ev.detail_json:
        return {}
    try:
        d = json.loads(ev.detail_json)
    except ValueError:
        return {"raw": ev.detail_json}
    return d if isinstance(d, dict) else {"value": d}


def merge_events(results: dict[str, NodeResult]) -> list[dict]:
    """Every node's events of a call, one list in time order (an event the node and its
    history both report is kept once)."""
    seen: set[tuple] = set()
    events = []
    for site, r in results.items():
        if not r.ok:
            continue
        for ev in r.value.events:
            key = (round(ev.at, 3), ev.site or site, ev.kind, ev.summary)
            if key in seen:
                continue
            seen.add(key)
            events.append({"at": ev.at, "site": ev.site or site, "kind": ev.kind, "summary": ev.summary,
                           "detail": _detail(ev), "reported_by": site})
    return order_events(events)


_PHASE = {"offered": 0, "decision": 1, "overflow_decision": 1, "queued": 2}


def order_events(events: list[dict]) -> list[dict]:
    """The path in time order. The history keeps whole seconds: such an event sorts with
    the first finer event of its site in that second; at one instant the origin site comes
    before the sites the call moved to (a transferred call keeps its offer time), then the
    lifecycle (offer, decision, queue, the rest), then the node's decision sequence."""
    finer: dict[tuple[str, int], float] = {}
    for e in events:
        if e["at"] != int(e["at"]):
            k = (e["site"], int(e["at"]))
            finer[k] = min(finer.get(k, e["at"]), e["at"])
    origin = next((e["site"] for e in events if e["kind"] == "offered" and "transferred from" not in e["summary"]),
                  None)

    def key(e: dict) -> tuple:
        at = e["at"]
        if at == int(at):
            at = finer.get((e["site"], int(at)), at)
        hop = 0 if origin is None or e["site"] == origin else 1
        seq = e["detail"].get("seq", 0) if isinstance(e["detail"].get("seq", 0), (int, float)) else 0
        return (at, hop, _PHASE.get(e["kind"], 3), seq, e["at"])

    return sorted(events, key=key)


def _owner(results: dict[str, NodeResult]) -> tuple[str, Any] | None:
    """The site that holds the call now (not in state TRANSFERRED), else the latest."""
    held = [(s, r.value.call) for s, r in results.items() if r.ok and r.value.HasField("call")
            and r.value.call.call_id]
    if not held:
        return None
    current = [h for h in held if h[1].state != t.CALL_STATE_TRANSFERRED]
    pool = current or held
    return max(pool, key=lambda h: (h[1].queued_at, h[1].offered_at))


def _figure(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_figure(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_figure(x) for x in v) + "]"
    return str(v)


def _detail_lines(detail: dict, indent: str) -> list[str]:
    lines = []
    for k, v in detail.items():
        if k == "seq":
            continue
        if isinstance(v, dict) and v:
            lines.append(f"{indent}{k}:")
            lines += _detail_lines(v, indent + "  ")
        elif k == "candidates" and isinstance(v, list):
            waits = detail.get("candidate_waits_s")
            lines.append(f"{indent}candidates:")
            for i, cand in enumerate(v):
                w = f" (expected wait {waits[i]:.3g} s)" if isinstance(waits, list) and i < len(waits) else ""
                lines.append(f"{indent}  - {_figure(cand)}{w}")
        elif k != "candidate_waits_s" or "candidates" not in detail:
            lines.append(f"{indent}{k}: {_figure(v)}")
    return lines


_EXPLAINED = ("decision", "overflow", "reject", "transfer")


def call_text(call_id: str, owner: tuple[str, Any] | None, events: list[dict], wide: bool) -> str:
    lines = [f"Call {call_id}"]
    if owner is not None:
        site, c = owner
        row = call_row(site, c)
        lines += [
            f"  state:    {row['state']} at {site}",
            f"  queue:    {c.queue or '-'} ({row['skill']}, {row['channel']}{', ' + c.language if c.language else ''})",
            f"  priority: {row['priority']}",
            f"  agent:    {c.agent_id or '-'}",
            f"  offered:  {_when_ms(c.offered_at)}   answered: {_when_ms(c.answered_at)}   "
            f"ended: {_when_ms(c.ended_at)}",
            f"  transfers: {c.transfer_count}"
            + (f" (from {c.transfer_origin})" if c.transfer_origin else "")
            + (f" (to {_target(c.transfer_target_site, c.transfer_target)})" if c.transfer_target else ""),
        ]
        if c.reject_reason or c.abandon_reason:
            lines.append(f"  outcome reason: {c.reject_reason or c.abandon_reason}")
    lines.append("Path:")
    if not events:
        lines.append("  (no events)")
    for e in events:
        lines.append(f"  {_when_ms(e['at'])}  {e['site']:<10} {e['kind']:<18} {e['summary']}")
        if e["detail"] and (wide or e["kind"] in _EXPLAINED or "decision" in e["kind"]):
            lines += _detail_lines(e["detail"], " " * 16)
    return "\n".join(lines) + "\n"


@describe_app.command("call")
def describe_call(ctx: typer.Context, call_id: str = typer.Argument(..., metavar="ID"),
                  fmt: str = _fmt_option()) -> None:
    """A call's whole path, from every node and the history.

    Offer, every overflow decision with its rule, figures and candidates, transfers, the
    agent and the outcome."""

    async def body(c: ClusterClient) -> int | None:
        await c.discover()
        res = await c.each("DescribeCall", admin_pb2.DescribeCallRequest(call_id=call_id))
        answered = {s: r for s, r in res.items() if r.ok}
        if not answered:
            errors = [r.error for r in res.values() if r.error is not None]
            if errors and all(exit_code(e) == EXIT_NOT_FOUND for e in errors):
                raise CtlError(EXIT_NOT_FOUND, f"no node knows call {call_id!r}")
            detail = "; ".join(f"{r.site}: {describe(r.error)}" for r in res.values()
                               if r.error is not None and exit_code(r.error) != EXIT_NOT_FOUND)
            raise CtlError(overall_exit([e for e in errors if exit_code(e) != EXIT_NOT_FOUND]),
                           f"describe call {call_id}: {detail}")
        for r in res.values():
            if r.error is not None and exit_code(r.error) != EXIT_NOT_FOUND:
                output.warn(f"{r.site}: {r.status}: {describe(r.error)} (the path may lack its part)")
        events = merge_events(res)
        owner = _owner(answered)
        if fmt in ("json", "yaml"):
            data = {
                "call_id": call_id,
                "owner": owner[0] if owner else None,
                "call": call_row(*owner) if owner else None,
                "sites": sorted(answered),
                "history": any(r.value.history for r in answered.values()),
                "events": events,
            }
            output.emit(data, fmt)
        else:
            sys.stdout.write(call_text(call_id, owner, events, fmt == "wide"))
        return None

    run(ctx, body)


# ---------------------------------------------------------------- mutations

_YES = typer.Option(False, "--yes", "-y", help="do not ask (required off a terminal)")


async def _need_site(c: ClusterClient, site: str) -> None:
    if site not in c.sites:
        await c.discover()
    if site not in c.sites:
        raise CtlError(EXIT_NOT_FOUND, f"no site {site!r} in the cluster (known: {', '.join(sorted(c.sites))})")


def _drain(ctx: typer.Context, site: str, draining: bool, yes: bool) -> None:
    verb = "drain" if draining else "undrain"

    async def body(c: ClusterClient) -> int | None:
        await _need_site(c, site)
        confirm(f"{verb} site {site}", yes)
        r = await c.call(site, "SetDrain", admin_pb2.SetDrainRequest(draining=draining))
        state = "drained" if r.draining else "serving (undrained)"
        note = "" if r.changed else " (unchanged)"
        extra = f", {r.queued} calls still queued there" if r.draining and r.queued else ""
        print(f"site {site} {state}{note}{extra}")
        return None

    run(ctx, body)


@ctl_app.command("drain")
def drain(ctx: typer.Context, site: str = typer.Argument(..., metavar="SITE"), yes: bool = _YES) -> None:
    """Drain a site: no new offers, its queued calls go to other members (journaled).

    The drain survives a restart of the node."""
    _drain(ctx, site, True, yes)


@ctl_app.command("undrain")
def undrain(ctx: typer.Context, site: str = typer.Argument(..., metavar="SITE"), yes: bool = _YES) -> None:
    """Let a drained site take offers and transfers again."""
    _drain(ctx, site, False, yes)


MODES = ("normal", "surge", "emergency")


@ctl_app.command("mode")
def mode(
    ctx: typer.Context,
    site: str = typer.Argument(..., metavar="SITE"),
    new_mode: str = typer.Argument(..., metavar="normal|surge|emergency"),
    backoffice: bool = typer.Option(False, "--backoffice/--no-backoffice", help="enable back-office agents"),
    announcement: str = typer.Option("", "--announcement", help="IVR announcement (at most 256 characters)"),
    yes: bool = _YES,
) -> None:
    """Set a site's contingency mode."""
    if new_mode not in MODES:
        raise typer.BadParameter(f"{new_mode!r}: choose one of {', '.join(MODES)}", param_hint="mode")
    if len(announcement) > 256:
        raise typer.BadParameter("at most 256 characters", param_hint="--announcement")

    async def body(c: ClusterClient) -> int | None:
        await _need_site(c, site)
        confirm(f"set site {site} to mode {new_mode}", yes)
        r = await c.call(site, "SetMode", admin_pb2.SetModeRequest(mode=new_mode, backoffice=backoffice,
                                                                   announcement=announcement))
        print(f"site {site} mode {r.mode}{' with back-office' if r.backoffice else ''}"
              f"{'' if r.changed else ' (unchanged)'}")
        return None

    run(ctx, body)


async def _locate_agent(c: ClusterClient, agent: str, site: str | None) -> str:
    """The site of ``agent`` (asked of every node unless ``site`` is given)."""
    if site is not None:
        await _need_site(c, site)
        return site
    await c.discover()
    res = await c.each("GetAgent", agents_pb2.GetAgentRequest(agent_id=agent), service="agents")
    found = sorted(s for s, r in res.items() if r.ok)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise CtlError(EXIT_USAGE, f"agent {agent!r} exists at {', '.join(found)}: say which with --site")
    errors = [r.error for r in res.values() if r.error is not None]
    if errors and all(exit_code(e) == EXIT_NOT_FOUND for e in errors):
        raise CtlError(EXIT_NOT_FOUND, f"no site knows agent {agent!r}")
    others = [e for e in errors if exit_code(e) != EXIT_NOT_FOUND]
    raise CtlError(overall_exit(others), f"cannot find agent {agent!r}: "
                   + "; ".join(f"{r.site}: {describe(r.error)}" for r in res.values()
                               if r.error is not None and exit_code(r.error) != EXIT_NOT_FOUND))


_SITE_OPT = typer.Option(None, "--site", help="the agent's site (default: found by asking every node)")


@agent_app.command("move")
def agent_move(ctx: typer.Context, agent: str = typer.Argument(..., metavar="AGENT"),
               group: str = typer.Option(..., "--group", help="the agent group to move to"),
               site: Optional[str] = _SITE_OPT, yes: bool = _YES) -> None:
    """Move an agent to another agent group of its site, live (journaled, no sign-out)."""

    async def body(c: ClusterClient) -> int | None:
        where = await _locate_agent(c, agent, site)
        confirm(f"move agent {agent} at {where} to group {group}", yes)
        r = await c.call(where, "MoveAgent", admin_pb2.MoveAgentRequest(agent_id=agent, group=group))
        print(f"agent {agent} at {where}: group {r.previous_group or '-'} -> {r.agent.group or group}"
              f"{'' if r.changed else ' (unchanged)'}")
        return None

    run(ctx, body)


@agent_app.command("logout")
def agent_logout(ctx: typer.Context, agent: str = typer.Argument(..., metavar="AGENT"),
                 site: Optional[str] = _SITE_OPT, yes: bool = _YES) -> None:
    """Sign an agent out (the contacts it holds are finished or requeued by its node)."""

    async def body(c: ClusterClient) -> int | None:
        where = await _locate_agent(c, agent, site)
        confirm(f"sign agent {agent} out at {where}", yes)
        r = await c.call(where, "SignOut", agents_pb2.SignOutRequest(agent_id=agent), service="agents")
        print(f"agent {agent} at {where}: {_enum(r.agent.state, t.AgentState, 'AGENT_STATE_')}")
        return None

    run(ctx, body)


# ---------------------------------------------------------------- policy

def _read_policy(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise CtlError(EXIT_USAGE, f"cannot read {path}: {e.strerror}") from None


def _policy_error(e: grpc.RpcError) -> CtlError:
    return CtlError(exit_code(e), f"policy refused: {describe(e)}")


@policy_app.command("diff")
def policy_diff(ctx: typer.Context, file: Path = typer.Argument(..., metavar="FILE"),
                fmt: str = _fmt_option()) -> None:
    """What FILE would change in the policy in force (exit 0: nothing, 1: something).

    Other errors exit as listed in tandem ctl --help."""

    async def body(c: ClusterClient) -> int | None:
        text = _read_policy(file)
        try:
            r = await c.first("DiffPolicy", admin_pb2.DiffPolicyRequest(policy=text))
        except grpc.RpcError as e:
            raise _policy_error(e) from None
        d = r.value
        if fmt in ("json", "yaml"):
            output.emit({"revision": d.revision, "changes": list(d.changes), "changed": bool(d.changes)}, fmt)
        elif d.changes:
            for ch in d.changes:
                print(ch)
        else:
            output.message(f"no change against revision {d.revision}")
        return EXIT_ERROR if d.changes else 0

    run(ctx, body)


@policy_app.command("apply")
def policy_apply(
    ctx: typer.Context,
    file: Path = typer.Argument(..., metavar="FILE"),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="change nothing: replay recent history through the simulator with both "
                                      "policies and print the service level per site before and after"),
    hours: float = typer.Option(3.0, "--hours", min=0.01, help="history replayed by --dry-run, hours"),
    yes: bool = _YES,
    fmt: str = _fmt_option(),
) -> None:
    """Validate FILE and store it as the cluster's overflow policy.

    Every member applies it at once. Needs an operator bound on every site."""

    async def body(c: ClusterClient) -> int | None:
        text = _read_policy(file)
        try:
            d = (await c.first("DiffPolicy", admin_pb2.DiffPolicyRequest(policy=text))).value
        except grpc.RpcError as e:
            raise _policy_error(e) from None
        if dry_run:
            return await _dry_run(c, d, hours, fmt)
        if not d.changes:
            output.message(f"no change against revision {d.revision}: nothing to apply")
            return 0
        for ch in d.changes:
            output.message(f"  {ch}")
        confirm(f"apply {len(d.changes)} change(s) to the overflow policy (revision {d.revision})", yes)
        try:
            r = (await c.first("ApplyPolicy", admin_pb2.ApplyPolicyRequest(
                policy=text, expected_revision=d.revision))).value
        except grpc.RpcError as e:
            raise _policy_error(e) from None
        print(f"policy applied: revision {r.revision} ({len(r.changes)} change(s))")
        return None

    run(ctx, body)


async def _dry_run(c: ClusterClient, diff: Any, hours: float, fmt: str) -> int | None:
    """Replay the last ``hours`` of every site's arrivals (``Admin.GetReplayInput``) with
    the policy in force and with the new one (:func:`router.whatif.compare`, locally);
    print service level per site before and after. Changes nothing."""
    try:
        from router import whatif
    except ImportError:
        raise CtlError(EXIT_ERROR, "policy apply --dry-run needs the what-if simulator (router.whatif), "
                                   "which this installation lacks") from None
    from router.config import parse_site
    from router.overflow import parse_policy

    await c.discover()
    before = (await c.first("GetPolicy", admin_pb2.GetPolicyRequest())).value
    since = time.time() - hours * 3600
    inputs = await c.each("GetReplayInput", admin_pb2.GetReplayInputRequest(since_s=since),
                          timeout=max(c.timeout, 30.0))
    raise_if_none(inputs, "policy apply --dry-run")
    _warn_failures(inputs, "replay input (that site is left out of the replay)")
    sites, rows = [], {}
    for name, r in sorted(inputs.items()):
        if not r.ok:
            continue
        try:
            sites.append(parse_site(yaml_load(r.value.site_yaml), f"<{name}>"))
        except ValueError as e:
            raise CtlError(EXIT_ERROR, f"{name}: its configuration does not load here: {e}") from None
        for call in r.value.calls:
            row = replay_row(name, call)
            rows.setdefault(call.call_id, row)  # one call once (a shared history answers alike)
    try:
        arrivals = whatif.arrivals_from_rows(rows.values())
        policies = (parse_policy(json.loads(before.policy_json or "{}"), "policy in force"),
                    parse_policy(json.loads(diff.policy_json), "new policy"))
        known = {s.site.name for s in sites}
        arrivals = [a for a in arrivals if a.site in known]
        result = await asyncio.to_thread(whatif.compare, sites, arrivals, *policies)
    except ValueError as e:  # WhatIfError, PolicyError
        raise CtlError(EXIT_ERROR, f"dry run: {e}") from None
    out = [{"site": name, "calls": v["before"].get("offered"), "before": v["before"]["service_level"],
            "after": v["after"]["service_level"], "delta": v["delta"]["service_level"],
            "overflow_out_before": v["before"]["overflow_out"], "overflow_out_after": v["after"]["overflow_out"]}
           for name, v in sorted(result["sites"].items())]
    total = result["total"]
    out.append({"site": "(cluster)", "calls": total["before"].get("offered"),
                "before": total["before"]["service_level"], "after": total["after"]["service_level"],
                "delta": total["delta"]["service_level"], "overflow_out_before": total["before"]["overflow_out"],
                "overflow_out_after": total["after"]["overflow_out"]})
    cols = [Column("site", "SITE"), Column("calls", "CALLS", justify="right"),
            Column("before", "SL-BEFORE", pct, justify="right"), Column("after", "SL-AFTER", pct, justify="right"),
            Column("delta", "DELTA", lambda v: "-" if v is None else f"{100 * v:+.1f} pt", justify="right"),
            Column("overflow_out_before", "OVF-BEFORE", wide=True, justify="right"),
            Column("overflow_out_after", "OVF-AFTER", wide=True, justify="right")]
    output.message(f"dry run: {len(diff.changes)} change(s) against revision {diff.revision}; "
                   f"{len(arrivals)} calls of the last {hours:g} h replayed; nothing was changed")
    output.emit(out, fmt, out, cols)
    return None


def yaml_load(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


_OUTCOMES = ("completed", "abandoned", "rejected")


def replay_row(site: str, call: Any) -> dict:
    """A GetReplayInput call as a row of :func:`router.whatif.arrivals_from_rows`."""
    outcome = call.outcome if call.outcome in _OUTCOMES else ""
    return {
        "call_id": call.call_id, "site": call.origin_site or site, "at": call.offered_at, "skill": call.skill,
        "channel": _enum(call.channel, t.Channel, "CHANNEL_") if call.channel else "voice",
        "language": call.language, "caller": call.caller, "customer_id": call.customer_id,
        "handle_s": call.handle_s if call.handle_s > 0 else None,
        "patience_s": call.waited_s if outcome == "abandoned" else None,
        "waited_s": call.waited_s, "outcome": outcome, "priority_class": call.priority_class,
    }


# ---------------------------------------------------------------- partner

def _contract_error(e: grpc.RpcError) -> CtlError:
    return CtlError(exit_code(e), f"contract refused: {describe(e)}")


def _show_changes(d: Any, fmt: str) -> None:
    """A DiffContract answer: the changes on stdout (data), or a message when none."""
    if fmt in ("json", "yaml"):
        output.emit({"partner": d.partner, "revision": d.revision, "changes": list(d.changes),
                     "changed": bool(d.changes)}, fmt)
    elif d.changes:
        for ch in d.changes:
            print(ch)
    else:
        output.message(f"no change to the contract of {d.partner} against revision {d.revision}")


@partner_app.command("diff")
def partner_diff(ctx: typer.Context, file: Path = typer.Argument(..., metavar="FILE"),
                 fmt: str = _fmt_option()) -> None:
    """What FILE would change in the stored contract of the partner it names (exit 0: nothing, 1: something).

    Other errors exit as listed in tandem ctl --help."""

    async def body(c: ClusterClient) -> int | None:
        text = _read_policy(file)
        try:
            d = (await c.first("DiffContract", admin_pb2.DiffContractRequest(contract=text))).value
        except grpc.RpcError as e:
            raise _contract_error(e) from None
        _show_changes(d, fmt)
        return EXIT_ERROR if d.changes else 0

    run(ctx, body)


@partner_app.command("apply")
def partner_apply(
    ctx: typer.Context,
    file: Path = typer.Argument(..., metavar="FILE"),
    dry_run: bool = typer.Option(False, "--dry-run", help="change nothing: validate FILE and print what would change"),
    expected_revision: Optional[int] = typer.Option(
        None, "--expected-revision", min=0, metavar="N",
        help="apply only if the stored contract is at revision N (0: none stored); default: the one just compared"),
    yes: bool = _YES,
    fmt: str = _fmt_option(),
) -> None:
    """Validate FILE and store it as the contract of the partner it names.

    Every node enforces it at once. Needs an operator bound on every site. A contract
    that does not validate is refused: the previous one stays in force."""

    async def body(c: ClusterClient) -> int | None:
        text = _read_policy(file)
        try:
            d = (await c.first("DiffContract", admin_pb2.DiffContractRequest(contract=text))).value
        except grpc.RpcError as e:
            raise _contract_error(e) from None
        if expected_revision is not None and expected_revision != d.revision:
            raise CtlError(EXIT_ERROR, f"contract refused: the stored contract of {d.partner} is at revision "
                                       f"{d.revision}, not {expected_revision} (CONTRACT_CHANGED): nothing changed")
        if dry_run:
            _show_changes(d, fmt)
            output.message(f"dry run: {len(d.changes)} change(s) to the contract of {d.partner} against revision "
                           f"{d.revision}; nothing was changed")
            return None
        if not d.changes:
            output.message(f"no change to the contract of {d.partner} against revision {d.revision}: "
                           "nothing to apply")
            return 0
        for ch in d.changes:
            output.message(f"  {ch}")
        confirm(f"apply {len(d.changes)} change(s) to the contract of partner {d.partner} (revision {d.revision})",
                yes)
        try:
            r = (await c.first("ApplyContract", admin_pb2.ApplyContractRequest(
                contract=text, expected_revision=d.revision))).value
        except grpc.RpcError as e:
            raise _contract_error(e) from None
        print(f"contract of {r.partner} applied: revision {r.revision} ({len(r.changes)} change(s))")
        return None

    run(ctx, body)


# ---------------------------------------------------------------- audit

_SINCE_RE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_since(text: str | None, now: float | None = None) -> float:
    """``10m``, ``2h``, ``1d``, ``30s``, an ISO time or Unix seconds -> Unix seconds."""
    if not text:
        return 0.0
    now = time.time() if now is None else now
    m = _SINCE_RE.match(text.strip())
    if m:
        return now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise typer.BadParameter(f"{text!r}: a duration (30s, 10m, 2h, 1d), an ISO time or Unix seconds",
                                 param_hint="--since") from None


AUDIT_COLUMNS = [
    Column("at", "TIME", _when), Column("site", "SITE"), Column("identity", "IDENTITY"), Column("role", "ROLE"),
    Column("method", "METHOD", lambda v: (v or "").rsplit("/", 1)[-1] or "-"),
    Column("decision", "DECISION"), Column("reason", "REASON", lambda v: v or "-"),
    Column("objects", "OBJECTS", lambda v: ",".join(f"{k}={x}" for k, x in sorted((v or {}).items())) or "-",
           wide=True),
    Column("code", "CODE", lambda v: v or "-", wide=True), Column("peer", "PEER", wide=True),
]


@ctl_app.command("audit")
def audit(ctx: typer.Context,
          since: Optional[str] = typer.Option(None, "--since", help="30s, 10m, 2h, 1d, an ISO time or Unix seconds"),
          site: Optional[str] = typer.Option(None, "--site", help="only this site's audit log"),
          all_: bool = typer.Option(False, "--all", help="also the routing traffic: allowed requests of "
                                    "site and agents identities (offers, agent sessions, transfers)"),
          limit: int = typer.Option(500, "--limit", min=0, help="the newest N records (0: all)"),
          fmt: str = _fmt_option()) -> None:
    """The audit records of every node by time: operators' and partners' requests and every denial.

    Who did what, where, allowed or denied. --all adds the routing traffic (the allowed
    requests of site and agents identities); --limit keeps the newest records."""
    since_s = parse_since(since)

    async def list_site(c: ClusterClient, s: str) -> list[Any]:
        entries: list[Any] = []
        token = ""
        while True:
            r = await c.call(s, "ListAudit", admin_pb2.ListAuditRequest(since=since_s, page_size=1000,
                                                                        page_token=token, exclude_traffic=not all_))
            entries.extend(r.entries)
            token = r.next_page_token
            if not token:
                return entries

    async def body(c: ClusterClient) -> int | None:
        await c.discover()
        if site is not None:
            await _need_site(c, site)
        names = [site] if site else sorted(c.sites)
        got = await asyncio.gather(*(list_site(c, s) for s in names), return_exceptions=True)
        res = {s: NodeResult(s, c.sites[s], error=g) if isinstance(g, Exception) else NodeResult(s, c.sites[s], g)
               for s, g in zip(names, got)}
        raise_if_none(res, "audit")
        _warn_failures(res, "audit")
        rows = sorted(({"id": e.id, "at": e.at, "site": e.site or s, "identity": e.identity, "role": e.role,
                        "method": e.method, "objects": dict(e.objects), "decision": e.decision,
                        "reason": e.reason, "code": e.code, "peer": e.peer}
                       for s, r in res.items() if r.ok for e in r.value), key=lambda x: (x["at"], x["site"]))
        if limit:
            rows = rows[-limit:]
        output.emit(rows, fmt, rows, AUDIT_COLUMNS)
        return None

    run(ctx, body)
