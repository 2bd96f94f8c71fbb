"""``tandem top``: a live full-screen view of the cluster (rich Live).

A header with the cluster's totals, one row per site followed by a row per queue —
waiting, oldest wait, expected wait, service level in the window against its target,
agents available / on contact / after-contact work / not ready, overflow in and out per
minute, alerts firing — and a footer with the alerts firing. Refreshed every
``--interval`` seconds (1 by default) from every node's ``Admin.GetStatus`` and
``Admin.ListAlerts``, asked at once; a node that does not answer shows as unreachable.
Quits on ``q`` or Ctrl-C (or after ``--iterations``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from router.ctl import output
from router.ctl.output import UNBOUNDED_S
from router.ctl.client import EXIT_USAGE, ClusterClient, CtlError, NodeResult, describe, raise_if_none
from router.ctl.context import ContextError, resolve
from router.v1 import admin_pb2


def register(app: typer.Typer) -> None:
    app.command("top")(top)


@dataclass
class Snapshot:
    """One refresh: every node's status and alerts."""

    at: float
    statuses: dict[str, NodeResult]
    alerts: dict[str, NodeResult]
    members: list[Any] | None = None
    n: int = 0
    sites: dict[str, str] = field(default_factory=dict)


def _pct(v: float | None) -> str:
    return "-" if v is None or v < 0 else f"{100 * v:.0f}%"


def _sl_cell(sl: float | None, target: float | None) -> Text:
    if sl is None or sl < 0:
        return Text("-")
    text = f"{100 * sl:.0f}%" + (f"/{100 * target:.0f}" if target else "")
    style = "" if not target else ("green" if sl >= target else "red")
    return Text(text, style=style)


def _site_sl(queues: list[Any]) -> tuple[float | None, float | None]:
    measured = [q for q in queues if q.service_level >= 0]
    if not measured:
        return None, None
    w = sum(max(q.offered, 1) for q in measured)
    sl = sum(q.service_level * max(q.offered, 1) for q in measured) / w
    target = sum(q.service_level_target * max(q.offered, 1) for q in measured) / w
    return sl, target or None


def render(snap: Snapshot) -> Group:
    """The whole screen for one snapshot (pure: tests may render it without a terminal)."""
    ok = {s: r.value for s, r in snap.statuses.items() if r.ok}
    firing = [(s, a) for s, r in sorted(snap.alerts.items()) if r.ok for a in r.value.alerts if a.state == "firing"]
    all_q = [q for st in ok.values() for q in st.queues]
    waiting = sum(q.length for q in all_q)
    sl, target = _site_sl(all_q)
    avail = sum(st.agents_by_state.get("ready", 0) for st in ok.values())
    ovf_out = sum(st.overflow_out_last_min for st in ok.values())
    head = Text.assemble(
        ("tandem top", "bold"),
        f"  {datetime.fromtimestamp(snap.at).strftime('%H:%M:%S')}  refresh #{snap.n}   ",
        (f"sites {len(ok)}/{len(snap.statuses)} up", "" if len(ok) == len(snap.statuses) else "red"),
        f"   waiting {waiting}   oldest {max((q.oldest_wait_s for q in all_q), default=0):.0f}s",
        "   SL ", _sl_cell(sl, target),
        f"   agents available {avail}   overflow {ovf_out}/min",
        ("   alerts firing " + str(len(firing)), "red bold" if firing else ""),
    )
    t = Table(box=box.SIMPLE_HEAD, expand=True, show_edge=False, pad_edge=False, header_style="bold")
    for name, justify in [("SITE / QUEUE", "left"), ("STATE", "left"), ("WAIT", "right"), ("OLDEST", "right"),
                          ("EWT", "right"), ("SL/TGT", "right"), ("AVAIL", "right"), ("ON", "right"),
                          ("ACW", "right"), ("NRDY", "right"), ("OVF-IN", "right"), ("OVF-OUT", "right"),
                          ("ALERTS", "right")]:
        t.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for site in sorted(snap.statuses):
        r = snap.statuses[site]
        if not r.ok:
            t.add_row(Text(site, style="bold"), Text(r.status, style="red"), *["-"] * 11)
            continue
        st = r.value
        qs = list(st.queues)
        s_sl, s_target = _site_sl(qs)
        state = "draining" if st.draining else ("serving" if st.serving else "not serving")
        if st.mode and st.mode != "normal":
            state += f" {st.mode}"
        t.add_row(
            Text(site, style="bold"), Text(state, style="yellow" if st.draining or not st.serving else "green"),
            str(sum(q.length for q in qs)), f"{max((q.oldest_wait_s for q in qs), default=0):.0f}s", "",
            _sl_cell(s_sl, s_target), str(st.agents_by_state.get("ready", 0)),
            str(_on_contact(st)), str(st.agents_by_state.get("wrap_up", 0)),
            str(st.agents_by_state.get("not_ready", 0)), str(st.overflow_in_last_min),
            str(st.overflow_out_last_min), str(st.alerts_firing),
        )
        for q in qs:
            t.add_row(
                f"  {q.name}", "", str(q.length), f"{q.oldest_wait_s:.0f}s", (f"{q.expected_wait_s:.0f}s" if q.expected_wait_s < UNBOUNDED_S else "-"),
                _sl_cell(q.service_level if q.service_level >= 0 else None, q.service_level_target),
                str(q.agents_ready), str(q.agents_on_contact), str(q.agents_wrap_up), str(q.agents_not_ready),
                str(q.overflow_in_last_min), str(q.overflow_out_last_min), "",
            )
    foot = Table.grid(padding=(0, 2))
    if firing:
        for s, a in firing:
            foot.add_row(Text(f"FIRING {a.severity or ''}".strip(), style="red bold"), a.site or s, a.name,
                         a.summary)
    else:
        foot.add_row(Text("no alert firing", style="green"))
    problems = [f"{s}: {r.status}" for s, r in sorted(snap.alerts.items())
                if not r.ok and r.status not in ("unreachable",)]
    parts: list[Any] = [Panel(head, box=box.SQUARE, padding=(0, 1)), t,
                        Panel(foot, title="alerts", title_align="left", box=box.SQUARE)]
    if problems:
        parts.append(Text("alerts unavailable from " + ", ".join(problems), style="dim"))
    parts.append(Text("q or Ctrl-C quits", style="dim"))
    return Group(*parts)


def _on_contact(st: Any) -> int:
    """A site row's "on contact": the contacts ringing or in hand (the site counters
    count agents by state only; the queue rows count eligible agents by activity)."""
    return int(st.calls_by_state.get("assigned", 0) + st.calls_by_state.get("connected", 0))


async def snapshot(c: ClusterClient, n: int) -> Snapshot:
    statuses, alerts = await asyncio.gather(
        c.each("GetStatus", admin_pb2.GetStatusRequest()),
        c.each("ListAlerts", admin_pb2.ListAlertsRequest()),
    )
    return Snapshot(time.time(), statuses, alerts, c.members, n, dict(c.sites))


@contextlib.contextmanager
def _keys() -> Iterator[asyncio.Event]:
    """An event set when ``q`` is typed (stdin a terminal: cbreak mode, restored after)."""
    quit_ = asyncio.Event()
    if not sys.stdin.isatty():
        yield quit_
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            ch = os.read(fd, 32)
        except OSError:
            return
        if b"q" in ch or b"Q" in ch or b"\x03" in ch:
            quit_.set()

    try:
        tty.setcbreak(fd)
        loop.add_reader(fd, readable)
        yield quit_
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


async def run_top(c: ClusterClient, interval: float, iterations: int, console: Console, screen: bool) -> None:
    await c.discover()
    first = await snapshot(c, 1)
    raise_if_none(first.statuses, "top")
    with _keys() as quit_, Live(render(first), console=console, screen=screen, auto_refresh=False,
                                transient=False) as live:
        n = 1
        while not (iterations and n >= iterations):
            try:
                await asyncio.wait_for(quit_.wait(), timeout=interval)
                return
            except asyncio.TimeoutError:
                pass
            n += 1
            live.update(render(await snapshot(c, n)), refresh=True)


def top(
    context: Optional[Path] = typer.Option(None, "--context", metavar="FILE",
                                           help="context file (default: $TANDEM_CONTEXT, else the user config)"),
    name: Optional[str] = typer.Option(None, "--context-name", metavar="NAME", help="a context of the file"),
    interval: float = typer.Option(1.0, "--interval", min=0.1, max=1.0, help="seconds between refreshes (<= 1)"),
    iterations: int = typer.Option(0, "--iterations", min=0, help="stop after N refreshes (0: until q or Ctrl-C)"),
    timeout: float = typer.Option(0.8, "--timeout", min=0.1, help="deadline of each RPC, seconds"),
) -> None:
    """A live full-screen view of the cluster: per site and queue the waiting calls, oldest
    and expected wait, service level against its target, agents (available, on contact,
    after-contact work, not ready), overflow in and out per minute, and the alerts firing.
    Quits on q or Ctrl-C. Exit codes as for tandem ctl."""
    try:
        ctx = resolve(context, name)
    except ContextError as e:
        output.error(str(e))
        raise typer.Exit(EXIT_USAGE) from None
    console = Console(no_color=bool(os.environ.get("NO_COLOR")) or None)
    screen = console.is_terminal

    async def main() -> None:
        async with ClusterClient(ctx, timeout) as c:
            await run_top(c, interval, iterations, console, screen)

    try:
        asyncio.run(main())
    except CtlError as e:
        output.error(e.message)
        raise typer.Exit(e.code) from None
    except KeyboardInterrupt:
        pass
    except Exception as e:  # noqa: BLE001 - an RPC error outside a node's result
        import grpc

        if isinstance(e, grpc.RpcError):
            from router.ctl.client import exit_code

            output.error(describe(e))
            raise typer.Exit(exit_code(e)) from None
        raise
