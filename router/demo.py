"""``tandem demo``: the example cluster under load, on compressed time.

:func:`run_demo` starts one node per site file (:mod:`router.nodeproc`) on scaled copies
of the site files, signs in every configured agent (simulated by :mod:`router.loadgen`),
offers traffic for ``duration`` real seconds at ``time_scale`` simulated seconds per real
second (default 60: one simulated hour per real minute), shows a live view while it runs,
then prints KPI tables per site and queue computed from the nodes' own records
(``Admin.ListCalls``) and reconciles those records with the generator's.

Traffic: :data:`DEMO_LOAD` gives each queue of the example sites an offered load in
Erlangs, chosen for ~85-90% voice-agent occupancy in Lyon and at the partner, while
Montréal is offered more than its agents can take (abandons balance it) — so service
levels differ by site.
Queues of other site files get a share of 85% of their site's voice agents.

Output: with ``json_out`` the tables go to stderr and stdout holds exactly one line, the
JSON summary; without, the tables go to stdout. The live view is drawn only on a terminal
and without ``json_out``. JSON keys: ``duration_s``, ``offered``, ``answered``,
``abandoned``, ``rejected``, ``lost``, ``duplicates``, ``service_level``, ``asa_s``,
``sites`` {name: {``offered``, ``answered``, ``abandoned``, ``rejected``,
``service_level``, ``asa_s``, ``aht_s``, ``abandon_rate``, ``csat``}}, plus
``time_scale``. **Every time in it is in simulated seconds** (real seconds multiplied back
by the time scale), ``duration_s`` included; rates and service levels are fractions,
null when undefined (nothing answered).

Exit code: 0 when ``lost`` and ``duplicates`` are both 0 and no agent was offered more
calls of a channel than its capacity (invariant 2, checked by the simulated agents); 1
otherwise; 2 when the nodes could not be started; 130 when interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import sys
import tempfile
import time
from pathlib import Path

import grpc
import yaml
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from router.config import Channel, SiteConfig, load_sites
from router.loadgen import CallerPool, CallStream, LoadGen, LoadGenConfig
from router.loadgen_agents import AgentBehaviour
from router.loadgen_rpc import NodeClient, describe
from router.loadgen_report import (
    QueueKpi,
    Reconciliation,
    queue_kpis,
    reconcile,
    total,
    voice_occupancy,
)
from router.nodeproc import NodeStartError, running_nodes
from router.v1 import admin_pb2

DEMO_TIME_SCALE = 60.0
# A real offer timeout below this would be a race with the generator's own latency.
MIN_OFFER_TIMEOUT_S = 1.0

# Offered load in Erlangs per (site, queue) of the example cluster (talk + wrap-up).
#   Lyon, 28 voice agents: 26.5 E -> ~90% occupancy, billing-en (8 bilingual agents,
#     shared with three other queues) the weak spot.
#   Montréal, 26 voice agents: 28.5 E -> overloaded; abandons bring occupancy to ~95%+ and
#     service level well below Lyon's.
#   CallPro, 18 voice agents: 15 E -> ~83%.
# Chat and e-mail run on their own capacity (agents' chat / e-mail slots).
DEMO_LOAD = {
    ("lyon", "billing-fr-voice"): 11.0,
    ("lyon", "billing-en-voice"): 3.0,
    ("lyon", "support-fr-voice"): 7.0,
    ("lyon", "sales-voice"): 5.5,
    ("lyon", "support-chat"): 6.0,
    ("lyon", "billing-email"): 8.0,
    ("montreal", "billing-en-voice"): 10.5,
    ("montreal", "billing-fr-voice"): 2.5,
    ("montreal", "support-en-voice"): 11.0,
    ("montreal", "sales-voice"): 4.5,
    ("montreal", "support-chat"): 6.0,
    ("montreal", "screening-voice"): 0.0,  # only blacklisted callers land here
    ("callpro", "billing-en-voice"): 6.0,
    ("callpro", "support-en-voice"): 9.0,
    ("callpro", "support-chat"): 6.0,
}
# Mean talk time (simulated s) by skill and channel; patience by channel (None: waits).
TALK_S = {"billing": 240.0, "support": 360.0, "sales": 300.0, "screening": 420.0}
TALK_S_BY_CHANNEL = {Channel.CHAT: 600.0, Channel.EMAIL: 300.0}
PATIENCE_S = {Channel.VOICE: 180.0, Channel.CHAT: 420.0, Channel.EMAIL: None, Channel.SOCIAL: None}
BEHAVIOUR = AgentBehaviour(
    reject_p=0.01, no_answer_p=0.005, ring_s=3.0, recover_s=30.0, resolved_p=0.8, csat_p=0.35
)


# --- scaled site files ------------------------------------------------------------------


def scaled_site(site: SiteConfig, scale: float, min_offer_timeout_s: float = MIN_OFFER_TIMEOUT_S) -> dict:
    """The site file, as a dict, with every duration divided by ``scale`` (service-level
    thresholds, wrap-up, first AHT estimate, head starts, offer timeout — floored at
    ``min_offer_timeout_s`` real seconds —, service-level and repeat-caller windows)."""
    d = site.model_dump(mode="json", exclude_none=True)
    d["site"]["listen"] = "127.0.0.1:0"
    r = d["routing"]
    r["head_start_s"] = {k: v / scale for k, v in r["head_start_s"].items()}
    r["offer_timeout_s"] = max(min_offer_timeout_s, r["offer_timeout_s"] / scale)
    r["repeat_window_h"] = r["repeat_window_h"] / scale
    r["service_level_window_s"] = r["service_level_window_s"] / scale
    for q in d["queues"]:
        q["service_level"]["threshold_s"] = q["service_level"]["threshold_s"] / scale
        q["wrap_up_s"] = q["wrap_up_s"] / scale
        q["aht_s"] = q["aht_s"] / scale
    return d


def write_scaled_sites(sites: list[SiteConfig], directory: Path, scale: float) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in sites:
        p = directory / f"{s.site.name}.yaml"
        header = f"# {s.site.name}, every duration divided by {scale:g} (tandem demo)\n"
        p.write_text(header + yaml.safe_dump(scaled_site(s, scale), sort_keys=False))
        paths.append(p)
    return paths


# --- traffic ------------------------------------------------------------------------------


def _voice_agents(site: SiteConfig) -> int:
    return sum(
        1 for g in site.agent_profiles().values() if g.capacity.get(Channel.VOICE, 0) > 0
    )


def demo_streams(sites: list[SiteConfig]) -> list[CallStream]:
    """One Poisson stream per queue, at the load of :data:`DEMO_LOAD`."""
    streams = []
    for site in sites:
        voice = [q for q in site.queues if q.channel == Channel.VOICE]
        default_share = 0.85 * _voice_agents(site) / max(1, len(voice))
        for q in site.queues:
            erlangs = DEMO_LOAD.get((site.site.name, q.name))
            if erlangs is None:
                erlangs = default_share if q.channel == Channel.VOICE else 2.0
            talk = TALK_S_BY_CHANNEL.get(q.channel, TALK_S.get(q.skill, 300.0))
            if erlangs <= 0:
                continue
            streams.append(
                CallStream(
                    site=site.site.name, skill=q.skill, channel=q.channel.value,
                    language=q.language or "", rate_per_h=erlangs * 3600.0 / (talk + q.wrap_up_s),
                    talk_s=talk, talk_dist="lognormal", talk_cv=0.7,
                    patience_s=PATIENCE_S[q.channel], name=q.name,
                )
            )
    return streams


def caller_pools(sites: list[SiteConfig], streams: list[CallStream], duration_sim_s: float) -> dict[str, CallerPool]:
    """Pools 1.2 times the expected number of calls: drawn uniformly, about a third of
    the calls then come from someone who called before in the run."""
    pools = {}
    prefixes = {"emea": "+3361", "amer": "+1514", "apac": "+6327"}
    for s in sites:
        expected = sum(st.rate_per_h for st in streams if st.site == s.site.name) * duration_sim_s / 3600
        pools[s.site.name] = CallerPool(
            prefix=prefixes.get(s.site.region, "+1555"),
            size=max(50, int(expected * 1.2)),
            vip=tuple(s.lists.vip), whitelist=tuple(s.lists.whitelist),
            blacklist=tuple(s.lists.blacklist),
        )
    return pools


# --- live view and tables -----------------------------------------------------------------


def _pct(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _dur(s: float) -> str:
    """A threshold the way a planner writes it: 20s, 2m, 4h."""
    for unit, size in (("h", 3600), ("m", 60)):
        if s >= 2 * size and s % size == 0:
            return f"{s / size:g}{unit}"
    return f"{s:g}s"


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}s"


_SL_ABBR = {"count_against": "A", "exclude": "X", "short_excluded": "S"}


def _progress_table(gen: LoadGen, status: dict, scale: float, t0: float) -> Table:
    elapsed = (time.time() - t0) * scale if t0 else 0.0
    t = _table(f"tandem demo — simulated time {elapsed / 60:.0f} min (x{scale:g})")
    for col in ("site", "offered", "answered", "abandoned", "rejected", "queued", "talking",
                "ready", "SL now"):
        t.add_column(col, justify="left" if col == "site" else "right", no_wrap=True)
    for site, c in gen.counters.items():
        st = status.get(site)
        queued = ready = sl = "-"
        if st is not None:
            queued = str(sum(q.length for q in st.queues))
            ready = str(st.agents_by_state.get("ready", 0))
            vals = [(q.service_level, q.answered) for q in st.queues if q.service_level >= 0]
            if vals and sum(n for _, n in vals):
                sl = _pct(sum(v * n for v, n in vals) / sum(n for _, n in vals))
        t.add_row(site, str(c.offered), str(c.answered), str(c.abandoned), str(c.rejected),
                  queued, str(c.talking), ready, sl)
    t.caption = "SL now: the nodes' recent service level; ready: agents ready for a call"
    return t


_COLS = ("offer", "ans", "aband", "rej", "SL", "ASA", "AHT", "ab.%", "CSAT")


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0),
                 pad_edge=False, caption_justify="left")


def kpi_tables(kpis: dict[str, dict[str, QueueKpi]], occupancy: dict[str, float | None]) -> Group:
    """Per-site and per-queue KPI tables (times in simulated seconds)."""
    sites = _table("KPIs per site — simulated time, from the nodes' records")
    sites.add_column("site", no_wrap=True)
    for c in _COLS:
        sites.add_column(c, justify="right")
    sites.add_column("occ", justify="right")
    sites.caption = ("SL by each queue's own definition; ASA, AHT (talk + wrap-up) in seconds; "
                     "occ: voice agents' occupancy after the first 10% of the run")
    queues = _table("KPIs per queue")
    queues.add_column("queue", no_wrap=True)
    queues.add_column("target", no_wrap=True)
    for c in _COLS:
        if c != "rej":  # a rejected call never reaches a queue
            queues.add_column(c, justify="right")
    queues.caption = "target: SL threshold and goal; abandons: " + ", ".join(
        f"{v} = {k}" for k, v in _SL_ABBR.items())

    def row(k: QueueKpi, rejected: bool = True) -> list[str]:
        cells = [str(k.offered), str(k.answered), str(k.abandoned), str(k.rejected),
                 _pct(k.service_level), _secs(k.asa_s), _secs(k.aht_s), _pct(k.abandon_rate),
                 "-" if k.csat is None else f"{k.csat:.2f}"]
        return cells if rejected else cells[:3] + cells[4:]

    for site, per in kpis.items():
        sites.add_row(site, *row(total(per.values(), site)), _pct(occupancy.get(site)))
        queues.add_row(f"[bold]{site}[/bold]")
        for name, k in per.items():
            if name == "(rejected)":
                continue
            target = f"{_dur(k.threshold_s)} {100 * k.target:g}% {_SL_ABBR[k.abandons]}"
            queues.add_row(f" {name}", target, *row(k, rejected=False))
    all_k = total([total(per.values()) for per in kpis.values()])
    sites.add_row("all", *row(all_k), "", style="bold")
    return Group(sites, "", queues)


def summary(kpis: dict[str, dict[str, QueueKpi]], rec: Reconciliation, duration_sim_s: float,
            scale: float, occupancy: dict[str, float | None]) -> dict:
    def rnd(x: float | None, n: int = 4) -> float | None:
        return None if x is None or math.isnan(x) else round(x, n)

    sites = {}
    for site, per in kpis.items():
        k = total(per.values(), site)
        sites[site] = {
            "offered": k.offered, "answered": k.answered, "abandoned": k.abandoned,
            "rejected": k.rejected, "service_level": rnd(k.service_level),
            "asa_s": rnd(k.asa_s, 2), "aht_s": rnd(k.aht_s, 2),
            "abandon_rate": rnd(k.abandon_rate), "csat": rnd(k.csat, 3),
            "occupancy": rnd(occupancy.get(site)),
        }
    a = total([total(per.values()) for per in kpis.values()])
    return {
        "duration_s": round(duration_sim_s, 1),
        "offered": a.offered, "answered": a.answered, "abandoned": a.abandoned,
        "rejected": a.rejected, "lost": rec.lost, "duplicates": rec.duplicates,
        "service_level": rnd(a.service_level), "asa_s": rnd(a.asa_s, 2),
        "sites": sites, "time_scale": scale,
    }


# --- the run --------------------------------------------------------------------------------


async def _poll_status(gen: LoadGen, status: dict, stop: asyncio.Event, log: Console | None,
                       scale: float) -> None:
    """GetStatus from every node twice a second (for the live view); without a live view,
    a plain progress line on ``log`` every 10 s."""
    last_line = time.monotonic()
    while not stop.is_set():
        for site, client in gen.clients.items():
            with contextlib.suppress(Exception):
                status[site] = await client.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=1.0)
        if log is not None and gen.started_at and time.monotonic() - last_line >= 10:
            last_line = time.monotonic()
            sim_min = (time.time() - gen.started_at) * scale / 60
            log.print(f"simulated {sim_min:.0f} min: " + "; ".join(
                f"{site} offered {c.offered} answered {c.answered} abandoned {c.abandoned} "
                f"waiting {c.waiting}" for site, c in gen.counters.items()), soft_wrap=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


async def _drive(addresses: dict[str, str], sites: list[SiteConfig], duration: float, scale: float,
                 seed: int, live_console: Console | None, log_console: Console) -> tuple:
    streams = demo_streams(sites)
    cfg = LoadGenConfig(
        addresses=addresses,
        streams=streams,
        agents={s.site.name: list(s.agent_profiles()) for s in sites},
        capacity={aid: {ch.value: n for ch, n in g.capacity.items()}
                  for s in sites for aid, g in s.agent_profiles().items()},
        time_scale=scale,
        behaviour=BEHAVIOUR,
        callers=caller_pools(sites, streams, duration * scale),
        seed=seed,
        drain_s=min(20.0, max(5.0, duration / 4)),
        max_calls=200_000,
    )
    gen = LoadGen(cfg)
    status: dict = {}
    stop = asyncio.Event()
    poller = asyncio.create_task(
        _poll_status(gen, status, stop, None if live_console else log_console, scale)
    )
    t0 = time.time()
    try:
        if live_console is not None:
            with Live(console=live_console, refresh_per_second=2, transient=False,
                      get_renderable=lambda: _progress_table(gen, status, scale, gen.started_at)):
                await gen.run(duration)
        else:
            await gen.run(duration)
    finally:
        stop.set()
        await asyncio.gather(poller, return_exceptions=True)
    log_console.print(f"traffic and drain took {time.time() - t0:.1f} s; reading the nodes' records")
    node_calls = {}
    for site, addr in addresses.items():
        client = NodeClient(site, addr)
        try:
            calls = await client.list_calls(timeout=10.0)
        finally:
            await client.close()
        node_calls[site] = [c for c in calls if c.call_id.startswith(gen.run_id + "-")]
    rec = reconcile(gen.records.values(), node_calls, gen.ledger, gen.run_id)
    return gen, node_calls, rec


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _console(file) -> Console:
    c = Console(file=file, highlight=False)
    if not c.is_terminal:  # a log file or a pipe: do not squeeze the tables to 80 columns
        c = Console(file=file, highlight=False, width=160)
    return c


def run_demo(
    sites_dir: Path,
    duration: float = 60.0,
    data_dir: Path | None = None,
    json_out: bool = False,
    seed: int = 1,
    time_scale: float = DEMO_TIME_SCALE,
) -> int:
    """Run the demo; returns the process exit code (see the module docstring)."""
    import uvloop

    out = _console(sys.stderr if json_out else sys.stdout)
    err = _console(sys.stderr)
    sites = load_sites(sites_dir)
    if not sites:
        err.print(f"no site files (*.yaml) in {sites_dir}")
        return 2
    live = out if (out.is_terminal and not json_out) else None
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tandem-demo-")))
        else:
            root = Path(data_dir)
            root.mkdir(parents=True, exist_ok=True)
        files = write_scaled_sites(sites, root / "sites", time_scale)
        scaled = {s.site.name: s for s in load_sites(root / "sites")}
        err.print(f"starting {len(files)} nodes ({', '.join(s.site.name for s in sites)}); data in {root}")
        # SIGTERM ends the demo like Ctrl-C: the nodes are stopped, the temp dir removed.
        stack.callback(signal.signal, signal.SIGTERM, signal.getsignal(signal.SIGTERM))
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            with running_nodes(files, root / "nodes") as nodes:
                addresses = {name: n.address for name, n in nodes.items()}
                err.print("nodes: " + ", ".join(f"{k} {v}" for k, v in addresses.items()))
                try:
                    gen, node_calls, rec = uvloop.run(
                        _drive(addresses, sites, duration, time_scale, seed, live, err)
                    )
                except (grpc.RpcError, OSError, asyncio.TimeoutError) as e:
                    err.print(f"[red]the run failed:[/red] {describe(e)}")
                    for n in nodes.values():
                        err.print(f"--- {n.name} ({'running' if n.alive() else 'exited'}), "
                                  f"{n.log_path}:\n{n.log_tail(10)}", markup=False)
                    return 1
        except NodeStartError as e:
            err.print(f"[red]could not start the nodes:[/red] {e}")
            return 2
        except KeyboardInterrupt:
            err.print("interrupted: nodes stopped")
            return 130
    kpis = queue_kpis(node_calls, {s.site.name: s for s in sites}, time_scale)
    t0, t1 = gen.started_at, gen.arrivals_ended_at
    occupancy = voice_occupancy(node_calls, scaled, t0 + 0.1 * (t1 - t0), t1)
    out.print(kpi_tables(kpis, occupancy))
    out.print(
        f"reconciliation: {rec.offered} calls offered by the generator, lost {rec.lost}, "
        f"duplicates {rec.duplicates}, unfinished by the generator {rec.unfinished}, "
        f"unknown {rec.unknown}; agent rejects {gen.ledger.rejects}, no-answers "
        f"{gen.ledger.no_answers}; callers still waiting at the end {gen.totals().forced_abandons}"
    )
    over = len(gen.ledger.over_capacity)
    if over:
        out.print(f"[red]{over} offers exceeded an agent's capacity on a channel[/red]")
    for ex in rec.examples[:10]:
        out.print(f"  {ex}")
    for e in gen.errors[:10]:
        out.print(f"  generator: {e}")
    if json_out:
        sys.stdout.write(json.dumps(summary(kpis, rec, duration * time_scale, time_scale, occupancy)) + "\n")
        sys.stdout.flush()
    return 0 if rec.lost == 0 and rec.duplicates == 0 and not over else 1
