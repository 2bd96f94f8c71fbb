"""``tandem demo``: the example cluster under load, on compressed time.

:func:`run_demo` starts a throw-away etcd (:mod:`router.local.etcd`, free loopback ports,
data under the demo's data dir), writes the cluster's overflow policy into it
(:data:`DEMO_POLICY`), starts one node per site file (:mod:`router.local.nodes`) with
``--etcd`` on scaled copies of the site files, signs in every configured agent
(simulated by :mod:`router.sim.loadgen`), offers traffic for ``duration`` real seconds at
``time_scale`` simulated seconds per real second (default 60: one simulated hour per
real minute), shows a live view while it runs (overflow counts included), then prints
KPI tables per site and queue computed from the nodes' own records
(``Admin.ListCalls``) and reconciles those records with the generator's over all sites
(:func:`router.sim.report.reconcile`: a call that overflowed is owned by the site
that took it, and TRANSFERRED at the one it left).

BPO partners on the partner API: for every contract in ``SITES/partners/*.yaml`` that
:data:`DEMO_PARTNERS` knows (the example's ``blueline``), the cluster run writes the
contract into etcd and plays the partner's own ACD in the demo process, as an asyncio
task: a simulated partner (``router.partner.sim.PartnerSim``, handed to :func:`run_demo`
by the ``tandem`` command: it is of the same layer as this package) connected over
mTLS as ``partner-NAME`` to the in-house nodes only (CallPro runs a Tandem node and stays
a site). It answers the generator's callers on the same line (the caller is answered when
the partner's agent picks up; a caller who hangs up first is not), and keeps its own
records, which the reconciliation uses for the calls the partner owns.

Traffic: a traffic profile (:mod:`router.sim.traffic`; ``tandem demo --traffic FILE``:
rates, handle-time and patience distributions, caller pools, head starts; its
``time_scale`` replaces the default). Without one, :func:`demo_profile`: the load of
:data:`DEMO_LOAD` (shipped as ``router/sim/traffic_example.yaml``), unbalanced on purpose: Montréal is offered more than its
agents can take, Lyon is moderately busy and the partner CallPro has agents to spare, so
overflow visibly happens: Montréal's English billing and support work goes to the BPO
partner blueline while one of its agents is idle, else to CallPro (standard value, within
each partner's contract and cap), its French and its high-value sales work to Lyon.

Reference runs (skipped with ``reference=False``): the same traffic — same seed, same
arrivals, talk times and patience — is played twice more, each run as long as the
cluster's: ``isolated`` (the same three nodes without etcd: no overflow) and ``pooled``
(one node whose site merges every agent and queue of the cluster: the bound perfect
pooling would reach). Every call's service level is measured against the definition of
the queue it arrived in, wherever it was answered.

Output: with ``json_out`` the tables go to stderr and stdout holds exactly one line, the
JSON summary; without, the tables go to stdout. The live view is drawn only on a terminal
and without ``json_out``. JSON keys: ``duration_s``, ``offered``, ``answered``,
``abandoned``, ``rejected``, ``lost``, ``duplicates``, ``service_level``, ``asa_s``,
``overflow`` (calls handed from one site to another), ``isolated_service_level``,
``pooled_service_level`` (null without the reference runs), ``sites`` {name:
{``offered``, ``answered``, ``abandoned``, ``rejected``, ``service_level``, ``asa_s``,
``aht_s``, ``abandon_rate``, ``csat``, ``occupancy``, ``overflow_out``, ``overflow_in``,
``isolated_service_level``, ``partner_out``}}, ``partners`` {name: {``offered``,
``accepted``, ``declined``, ``handled``, ``abandoned``, ``handed_back``, ``cap_exceeded``,
``fields_outside_contract``, ``max_concurrent``}} (the partners on the partner API, as
their simulated ACD counted: offers received, accepted, declined, calls its agents
answered and finished, calls whose caller hung up before an answer, handed back; how often it held more calls at once than its contract's cap, how
many fields outside its contract's data scopes it received, the most it held at once; {}
without one), plus ``time_scale``. A site's calls are those that
*arrived* there (an overflowed call counts for its origin, with the outcome it got where
it was answered, at a partner too); ``overflow_out`` / ``overflow_in`` count the
hand-overs it made to / took from another site, ``partner_out`` those it made to a
partner on the partner API.
**Every time in it is in simulated seconds** (real seconds multiplied back by the time
scale), ``duration_s`` included; rates and service levels are fractions, null when
undefined (nothing answered).

Calls out (``run_demo(calls_out=FILE)``): the cluster run's offered calls, one JSON line
each after a header line (:func:`write_calls`: the draws of every call — offered time,
talk time, patience — and what the nodes made of it, with the scaled site files and the
policy the nodes ran), for :mod:`router.capacity.validate`, which replays them through
the what-if simulator and compares the service level per site.

History: the cluster run's nodes write the interaction history (compressed times); the
demo records its time scale in ``DATA_DIR/time_scale`` so that ``tandem report kpi
--data-dir DATA_DIR`` reports in the run's simulated time, as the tables here do.

Exit code: 0 when ``lost`` and ``duplicates`` are both 0 (in every run), no agent was
offered more calls of a channel than its capacity (invariant 2, checked by the simulated
agents) and every partner saw its contract kept (``cap_exceeded`` and
``fields_outside_contract`` 0); 1 otherwise; 2 when etcd or the nodes could not be
started; 130 when interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import grpc
import yaml
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from router.config import Channel, SiteConfig, load_sites, parse_site
from router.contracts import ContractError, PartnerContract, contract_json, parse_contract
from router.local.etcd import EtcdStartError, etcd_server
from router.sim.loadgen import CallerPool, CallStream, LoadGen, LoadGenConfig
from router.sim.traffic import TrafficProfile, parse_profile
from router.sim.agents import AgentBehaviour
from router.sim.rpc import NodeClient, describe
from router.sim.report import (
    Overflow,
    PartnerCall,
    QueueKpi,
    Reconciliation,
    call_lines,
    overflow_counts,
    partner_calls,
    queue_kpis,
    reconcile,
    total,
    voice_occupancy,
)
from router.local.nodes import NodeStartError, running_nodes
from router.v1 import admin_pb2

DEMO_TIME_SCALE = 60.0
DEMO_DURATION_S = 40.0  # real seconds of arrivals per run (cluster, isolated, pooled)
# A real offer timeout below this would be a race with the generator's own latency.
MIN_OFFER_TIMEOUT_S = 1.0
ETCD_PREFIX = "/tandem-demo/"
ETCD_TTL_S = 3

# Offered load in Erlangs per (site, queue) of the example cluster (talk + wrap-up).
#   Montréal, 26 voice agents: 37 E -> overloaded (~140%): only abandons or overflow
#     relieve it; its English work is standard value (partner may take it).
#   Lyon, 28 voice agents: 19.5 E -> ~70%, room for Montréal's French and sales calls.
#   CallPro, 18 voice agents: 10 E -> ~55%, room for English billing and support.
# Together 66.5 E on 72 voice agents (~92%): pooled, the cluster could meet its targets.
# Chat and e-mail run on their own capacity (agents' chat / e-mail slots).
DEMO_LOAD = {
    ("lyon", "billing-fr-voice"): 8.5,
    ("lyon", "billing-en-voice"): 2.0,
    ("lyon", "support-fr-voice"): 5.5,
    ("lyon", "sales-voice"): 3.5,
    ("lyon", "support-chat"): 6.0,
    ("lyon", "billing-email"): 8.0,
    ("montreal", "billing-en-voice"): 14.0,
    ("montreal", "billing-fr-voice"): 3.5,
    ("montreal", "support-en-voice"): 14.0,
    ("montreal", "sales-voice"): 5.5,
    ("montreal", "support-chat"): 8.0,
    ("montreal", "screening-voice"): 0.0,  # only blacklisted callers land here
    ("callpro", "billing-en-voice"): 4.0,
    ("callpro", "support-en-voice"): 6.0,
    ("callpro", "support-chat"): 5.0,
}
# Other load mixes on the same sites (bench/overflow.py).
LOAD_MIXES: dict[str, dict[tuple[str, str], float]] = {
    "montreal-surge": DEMO_LOAD,
    # Lyon overloaded in billing and sales (French billing can go to Montréal's bilingual
    # agents, English billing to Montréal or CallPro, sales to Montréal); Montréal busy.
    "lyon-surge": {
        ("lyon", "billing-fr-voice"): 13.0,
        ("lyon", "billing-en-voice"): 5.0,
        ("lyon", "support-fr-voice"): 6.0,
        ("lyon", "sales-voice"): 7.0,
        ("lyon", "support-chat"): 6.0,
        ("lyon", "billing-email"): 8.0,
        ("montreal", "billing-en-voice"): 7.5,
        ("montreal", "billing-fr-voice"): 2.0,
        ("montreal", "support-en-voice"): 8.0,
        ("montreal", "sales-voice"): 2.5,
        ("montreal", "support-chat"): 6.0,
        ("montreal", "screening-voice"): 0.0,
        ("callpro", "billing-en-voice"): 4.0,
        ("callpro", "support-en-voice"): 6.5,
        ("callpro", "support-chat"): 5.0,
    },
}
# Mean talk time (simulated s) by skill and channel; patience by channel (None: waits).
TALK_S = {"billing": 240.0, "support": 360.0, "sales": 300.0, "screening": 420.0}
TALK_S_BY_CHANNEL = {Channel.CHAT: 600.0, Channel.EMAIL: 300.0}
PATIENCE_S = {Channel.VOICE: 180.0, Channel.CHAT: 420.0, Channel.EMAIL: None, Channel.SOCIAL: None}
BEHAVIOUR = AgentBehaviour(
    reject_p=0.01, no_answer_p=0.005, ring_s=3.0, recover_s=30.0, resolved_p=0.8, csat_p=0.35
)

# The cluster's overflow policy (put into etcd under ETCD_PREFIX + "policy/overflow").
# Every queue: overflow when the call's expected wait here exceeds half its region's
# service-level threshold (wait_threshold 0.5 x target: move the call while it can
# still be answered in time elsewhere, not once it is late), and only to a site whose
# expected wait is better by a margin (at least a third shorter: BSR style, so that two
# equally loaded sites do not trade calls).
# Value decides where: high-value work (sales) stays in-house; the partner CallPro takes
# low- and standard-value English work (its queues: billing and support voice, chat) up
# to 14 calls at once (of its 18 agents: it keeps room for its own traffic). Loads older
# than 3 s are never used.
DEMO_POLICY = {
    "version": 1,
    "max_peer_age_s": 3.0,
    "default": {"wait_threshold": {"factor": 0.5}, "margin": {"ratio": 0.33}},
    "queues": {
        "billing-email": {"enabled": False},  # only Lyon answers e-mail
        "screening-voice": {"enabled": False},  # blacklisted callers stay with the fraud team
    },
    "partners": {"callpro": {"max_value": "standard", "max_concurrent": 14}},
}


@dataclass(frozen=True)
class DemoPartner:
    """How the demo plays a BPO partner's ACD on the partner API (its contract comes from
    ``SITES/partners/NAME.yaml``): agents per skill, mean talk time, wrap-up and answer
    delay in simulated seconds, the share of calls it hands back."""

    agents: Mapping[str, int]
    aht_s: float = 300.0
    wrap_s: float = 20.0
    answer_delay_s: float = 6.0
    handback_rate: float = 0.1


# blueline: two agents per skill. While one is idle it advertises no wait and wins the tie
# with CallPro (same expected wait, both partners: the name decides), so it takes
# Montréal's English overflow first; once its agents are busy CallPro takes the rest.
DEMO_PARTNERS: dict[str, DemoPartner] = {
    "blueline": DemoPartner(agents={"billing": 2, "support": 2}),
}
#: Builds a simulated partner: ``router.partner.sim.PartnerSim`` (see :func:`run_demo`).
PartnerSimFactory = Callable[..., Any]


# --- site files ---------------------------------------------------------------------------


def example_sites_dir() -> Path:
    """The example cluster's site files (lyon, montreal, callpro, overflow-policy.json):
    ``router/sim/sites`` in an installed package (setup.py copies the repository's
    top-level ``sites/`` there), else the source tree's ``sites/`` (editable install)."""
    here = Path(__file__).resolve().parent
    packaged = here / "sites"
    if packaged.is_dir():
        return packaged
    return here.parents[1] / "sites"


def sites_or_example(sites_dir: Path) -> Path:
    """``sites_dir``; the default relative ``sites`` (``tandem demo``'s) when there is no
    such directory here means the example cluster (:func:`example_sites_dir`)."""
    if Path(sites_dir) == Path("sites") and not Path(sites_dir).is_dir():
        return example_sites_dir()
    return Path(sites_dir)



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


def pooled_site(sites: list[SiteConfig], name: str = "pooled") -> dict:
    """One site file (a dict) with every agent and every queue of ``sites``: the cluster
    as one shared queue set, the bound perfect pooling would reach. Queues of the same
    name (same skill, channel, language) become one, with the mean wrap-up; routing is
    the largest in-house site's; caller lists are merged."""
    biggest = max(sites, key=lambda s: (s.site.kind == "inhouse", len(s.agent_profiles())))
    d = biggest.model_dump(mode="json", exclude_none=True)
    d["site"] = {"name": name, "region": biggest.site.region, "kind": "inhouse", "listen": "127.0.0.1:0",
                 "description": "the whole cluster as one site (tandem demo reference)"}
    queues: dict[str, dict] = {}
    wraps: dict[str, list[float]] = {}
    for s in sites:
        for q in s.model_dump(mode="json", exclude_none=True)["queues"]:
            queues.setdefault(q["name"], q)
            wraps.setdefault(q["name"], []).append(q["wrap_up_s"])
    for qname, q in queues.items():
        q["wrap_up_s"] = sum(wraps[qname]) / len(wraps[qname])
    d["queues"] = list(queues.values())
    d["agents"] = [g for s in sites for g in s.model_dump(mode="json", exclude_none=True)["agents"]]
    lists = {k: sorted({n for s in sites for n in getattr(s.lists, k)}) for k in ("vip", "whitelist", "blacklist")}
    d["lists"] = lists
    parse_site(d, f"<{name}>")  # valid, or a clear error
    return d


# --- traffic ------------------------------------------------------------------------------


def _voice_agents(site: SiteConfig) -> int:
    return sum(
        1 for g in site.agent_profiles().values() if g.capacity.get(Channel.VOICE, 0) > 0
    )


def demo_profile(sites: list[SiteConfig], load: Mapping[tuple[str, str], float] | None = None) -> TrafficProfile:
    """The demo's default traffic profile: one Poisson stream per queue at the Erlangs of
    ``load`` (default :data:`DEMO_LOAD`; a queue it does not name: 85% of the site's
    voice agents shared by its voice queues, 2 E elsewhere), lognormal handle times
    (:data:`TALK_S`, cv 0.7), exponential patience (:data:`PATIENCE_S`)."""
    load = DEMO_LOAD if load is None else load
    doc: dict = {"version": 1, "description": "tandem demo's built-in traffic", "sites": {}}
    for site in sites:
        voice = [q for q in site.queues if q.channel == Channel.VOICE]
        default_share = 0.85 * _voice_agents(site) / max(1, len(voice))
        streams = []
        for q in site.queues:
            erlangs = load.get((site.site.name, q.name))
            if erlangs is None:
                erlangs = default_share if q.channel == Channel.VOICE else 2.0
            if erlangs <= 0:
                continue
            patience = PATIENCE_S[q.channel]
            streams.append({
                "queue": q.name, "erlangs": erlangs,
                "handle": {"dist": "lognormal", "mean_s": TALK_S_BY_CHANNEL.get(q.channel, TALK_S.get(q.skill, 300.0)),
                           "cv": 0.7},
                "patience": {"dist": "none"} if patience is None else {"dist": "exponential", "mean_s": patience},
            })
        doc["sites"][site.site.name] = {"streams": streams}
    return parse_profile(doc, "<demo profile>")


def demo_streams(sites: list[SiteConfig], load: Mapping[tuple[str, str], float] | None = None) -> list[CallStream]:
    """One Poisson stream per queue, at the load of ``load`` (default :data:`DEMO_LOAD`):
    the streams of :func:`demo_profile`."""
    return demo_profile(sites, load).call_streams(sites)


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


def _progress_table(gen: LoadGen, status: dict, scale: float, t0: float, title: str = "tandem demo") -> Table:
    elapsed = (time.time() - t0) * scale if t0 else 0.0
    t = _table(f"{title} — simulated time {elapsed / 60:.0f} min (x{scale:g})")
    for col in ("site", "offered", "answered", "abandoned", "rejected", "queued", "talking",
                "ready", "ovf out", "ovf in", "SL now"):
        t.add_column(col, justify="left" if col == "site" else "right", no_wrap=True)
    flows = _live_flows(gen, status)
    for site, c in gen.counters.items():
        st = status.get(site)
        queued = ready = sl = "-"
        if st is not None:
            queued = str(sum(q.length for q in st.queues))
            ready = str(st.agents_by_state.get("ready", 0))
            vals = [(q.service_level, q.answered) for q in st.queues if q.service_level >= 0]
            if vals and sum(n for _, n in vals):
                sl = _pct(sum(v * n for v, n in vals) / sum(n for _, n in vals))
        out, in_ = flows.get(site, ("-", "-"))
        t.add_row(site, str(c.offered), str(c.answered), str(c.abandoned), str(c.rejected),
                  queued, str(c.talking), ready, str(out), str(in_), sl)
    t.caption = ("offered/answered/abandoned: calls that arrived at the site, wherever answered; "
                 "ovf out: calls it handed to another site; ovf in: other sites' calls its agents "
                 "answered; SL now: the nodes' recent service level")
    return t


def _live_flows(gen: LoadGen, status: dict) -> dict[str, tuple[int, int]]:
    """Per site, for the live view: hand-overs out (the node's TRANSFERRED calls) and
    other sites' calls its agents answered (from the simulated agents' view)."""
    agent_site = getattr(gen, "_agent_site", None)
    if agent_site is None:
        agent_site = gen._agent_site = {a: s for s, ids in gen.cfg.agents.items() for a in ids}  # type: ignore[attr-defined]
    in_: dict[str, int] = {}
    for rec in list(gen.records.values()):
        if rec.agent_id:
            where = agent_site.get(rec.agent_id)
            if where is not None and where != rec.site:
                in_[where] = in_.get(where, 0) + 1
    out = {}
    for site in gen.counters:
        st = status.get(site)
        out[site] = (st.calls_by_state.get("transferred", 0) if st is not None else 0, in_.get(site, 0))
    return out


_COLS = ("offer", "ans", "aband", "rej", "SL", "ASA", "AHT", "ab.%", "CSAT")


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0),
                 pad_edge=False, caption_justify="left")


def kpi_tables(kpis: dict[str, dict[str, QueueKpi]], occupancy: dict[str, float | None],
               flows: dict[str, Overflow] | None = None) -> Group:
    """Per-site and per-queue KPI tables (times in simulated seconds)."""
    flows = flows or {}
    sites = _table("KPIs per site — simulated time, from the nodes' records")
    sites.add_column("site", no_wrap=True)
    for c in _COLS:
        sites.add_column(c, justify="right")
    sites.add_column("occ", justify="right")
    sites.add_column("ovf out", justify="right")
    sites.add_column("ovf in", justify="right")
    sites.caption = ("calls count where they arrived, with the outcome they got where they were "
                     "answered; SL by the arrival queue's own definition, wait from the arrival; "
                     "ASA, AHT (talk + wrap-up) in seconds; occ: voice agents' occupancy after the "
                     "first 10% of the run; ovf out/in: calls handed to / taken from other sites")
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
        f = flows.get(site)
        sites.add_row(site, *row(total(per.values(), site)), _pct(occupancy.get(site)),
                      str(f.out) if f else "-", str(f.in_) if f else "-")
        queues.add_row(f"[bold]{site}[/bold]")
        for name, k in per.items():
            if name == "(rejected)":
                continue
            target = f"{_dur(k.threshold_s)} {100 * k.target:g}% {_SL_ABBR[k.abandons]}"
            queues.add_row(f" {name}", target, *row(k, rejected=False))
    all_k = total([total(per.values()) for per in kpis.values()])
    moved = sum(f.out for f in flows.values())
    sites.add_row("all", *row(all_k), "", str(moved) if flows else "", str(moved) if flows else "", style="bold")
    return Group(sites, "", queues)


def _rnd(x: float | None, n: int = 4) -> float | None:
    return None if x is None or math.isnan(x) else round(x, n)


def service_level(kpis: dict[str, dict[str, QueueKpi]]) -> float | None:
    """The overall service level of a run (each queue's own numerator and denominator)."""
    return total([total(per.values()) for per in kpis.values()]).service_level


PARTNER_KEYS = ("offered", "accepted", "declined", "handled", "abandoned", "handed_back", "cap_exceeded",
                "fields_outside_contract", "max_concurrent")


def summary(kpis: dict[str, dict[str, QueueKpi]], rec: Reconciliation, duration_sim_s: float,
            scale: float, occupancy: dict[str, float | None], flows: dict[str, Overflow] | None = None,
            isolated: dict[str, dict[str, QueueKpi]] | None = None,
            pooled: dict[str, dict[str, QueueKpi]] | None = None,
            partners: Mapping[str, Mapping] | None = None) -> dict:
    flows = flows or {}
    sites = {}
    for site, per in kpis.items():
        k = total(per.values(), site)
        f = flows.get(site, Overflow())
        iso = total(isolated[site].values()).service_level if isolated and site in isolated else None
        sites[site] = {
            "offered": k.offered, "answered": k.answered, "abandoned": k.abandoned,
            "rejected": k.rejected, "service_level": _rnd(k.service_level),
            "asa_s": _rnd(k.asa_s, 2), "aht_s": _rnd(k.aht_s, 2),
            "abandon_rate": _rnd(k.abandon_rate), "csat": _rnd(k.csat, 3),
            "occupancy": _rnd(occupancy.get(site)),
            "overflow_out": f.out, "overflow_in": f.in_,
            "isolated_service_level": _rnd(iso), "partner_out": f.to_partners,
        }
    a = total([total(per.values()) for per in kpis.values()])
    return {
        "duration_s": round(duration_sim_s, 1),
        "offered": a.offered, "answered": a.answered, "abandoned": a.abandoned,
        "rejected": a.rejected, "lost": rec.lost, "duplicates": rec.duplicates,
        "service_level": _rnd(a.service_level), "asa_s": _rnd(a.asa_s, 2),
        "overflow": sum(f.out for f in flows.values()),
        "isolated_service_level": _rnd(service_level(isolated)) if isolated else None,
        "pooled_service_level": _rnd(service_level(pooled)) if pooled else None,
        "sites": sites,
        "partners": {name: {k: p[k] for k in PARTNER_KEYS} for name, p in sorted((partners or {}).items())},
        "time_scale": scale,
    }


# --- the run --------------------------------------------------------------------------------


class RunFailed(RuntimeError):
    """A run's traffic could not be driven (an RPC, a node or etcd failed)."""


@dataclass
class RunResult:
    """One run of the traffic: ``kind`` "cluster" | "isolated" | "pooled"."""

    kind: str
    gen: LoadGen
    node_calls: dict[str, list]
    rec: Reconciliation
    kpis: dict[str, dict[str, QueueKpi]]
    flows: dict[str, Overflow] = field(default_factory=dict)
    occupancy: dict[str, float | None] = field(default_factory=dict)
    wall_s: float = 0.0
    partners: dict[str, dict] = field(default_factory=dict)  # name -> the simulated partner's summary
    partner_records: dict[str, PartnerCall] = field(default_factory=dict)  # call id -> a partner's record
    streams: list[CallStream] = field(default_factory=list)  # the generator's streams

    @property
    def service_level(self) -> float | None:
        return service_level(self.kpis)

    @property
    def contracts_kept(self) -> bool:
        """Every partner saw its contract kept: never above its cap, no field outside its scopes."""
        return all(p["cap_exceeded"] == 0 and p["fields_outside_contract"] == 0 for p in self.partners.values())

    @property
    def clean(self) -> bool:
        return (self.rec.lost == 0 and self.rec.duplicates == 0 and not self.gen.ledger.over_capacity
                and self.contracts_kept)


async def _poll_status(gen: LoadGen, status: dict, stop: asyncio.Event, log: Console | None,
                       scale: float, label: str) -> None:
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
            flows = _live_flows(gen, status) if label == "cluster" else {}
            log.print(f"{label}, simulated {sim_min:.0f} min: " + "; ".join(
                f"{site} offered {c.offered} answered {c.answered} abandoned {c.abandoned} "
                f"waiting {c.waiting}" + (f" overflow out {flows[site][0]} in {flows[site][1]}"
                                          if site in flows else "")
                for site, c in gen.counters.items()), soft_wrap=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


async def cluster_up(endpoints: tuple[str, ...], prefix: str, names: list[str], policy: Mapping,
                     timeout: float = 20.0, etcd_tls: Mapping[str, str] | None = None,
                     contracts: Mapping[str, PartnerContract] | None = None) -> None:
    """Put the partners' ``contracts`` and the overflow policy into etcd and wait until
    every node is a member with its load published (so the first calls already see their
    peers). ``etcd_tls``: the ``ca_file``, ``cert_file`` and ``key_file`` of an etcd over
    TLS (an operator's)."""
    from router.coord import EtcdCoordinator, EtcdSettings
    from router.coord.keys import Keys

    coord = EtcdCoordinator("demo", EtcdSettings(endpoints=endpoints, prefix=prefix, ttl_s=ETCD_TTL_S,
                                                 op_timeout_s=2.0, **dict(etcd_tls or {})))
    await coord.start()
    try:
        await coord.wait_ready(timeout)
        for name, c in (contracts or {}).items():  # validated already; the nodes read them at once
            await coord.put_document(Keys(prefix).partner_contract(name), contract_json(c))
        await coord.put_policy(dict(policy))
        deadline = time.monotonic() + timeout
        while not (set(names) <= set(coord.members()) and set(names) <= set(coord.peer_loads())):
            if time.monotonic() > deadline:
                raise RunFailed(f"the nodes did not join the cluster within {timeout:g} s "
                                f"(members {sorted(coord.members())}, loads {sorted(coord.peer_loads())})")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # every node's watch has its peers by now
    finally:
        await coord.close()


async def _settle(clients: dict[str, NodeClient], timeout: float = 15.0) -> None:
    """Wait (bounded) until no node has a call in the middle of a transfer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = 0
        for c in clients.values():
            with contextlib.suppress(Exception):
                st = await c.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=1.0)
                busy += st.calls_by_state.get("transferring", 0)
        if not busy:
            return
        await asyncio.sleep(0.2)


def demo_config(sites: list[SiteConfig], addresses: dict[str, str], streams: list[CallStream], duration: float,
                scale: float, seed: int, tls_dir: Path | None = None,
                callers: dict[str, CallerPool] | None = None) -> LoadGenConfig:
    """The generator's configuration for ``duration`` real seconds of ``streams``: every
    configured agent of ``sites`` plays (:data:`BEHAVIOUR`), callers from ``callers``
    (default :func:`caller_pools`), over mTLS as each site's gateway with ``tls_dir``."""
    return LoadGenConfig(
        tls_dir=tls_dir,
        addresses=addresses,
        streams=streams,
        agents={s.site.name: list(s.agent_profiles()) for s in sites},
        capacity={aid: {ch.value: n for ch, n in g.capacity.items()}
                  for s in sites for aid, g in s.agent_profiles().items()},
        time_scale=scale,
        behaviour=BEHAVIOUR,
        callers=callers if callers is not None else caller_pools(sites, streams, duration * scale),
        seed=seed,
        drain_s=min(20.0, max(5.0, duration / 6)),
        max_calls=200_000,
    )


def _partner_sims(factory: PartnerSimFactory | None, contracts: Mapping[str, PartnerContract],
                  sites: list[SiteConfig], addresses: dict[str, str], gen: LoadGen, scale: float, seed: int,
                  tls_dir: Path | None) -> dict[str, Any]:
    """One simulated partner ACD per contract, connected to the in-house nodes (``SITE=ADDR``:
    over mTLS each node proves it is that site), on the generator's line."""
    if factory is None:
        return {}
    inhouse = [f"{s.site.name}={addresses[s.site.name]}" for s in sites if s.site.kind == "inhouse"]
    sims = {}
    for i, (name, c) in enumerate(sorted(contracts.items())):
        d = DEMO_PARTNERS[name]
        sims[name] = factory(name, inhouse, c, dict(d.agents), aht_s=d.aht_s, wrap_s=d.wrap_s,
                             answer_delay_s=d.answer_delay_s, handback_rate=d.handback_rate, time_scale=scale,
                             seed=seed * 1009 + i, tls=tls_dir, line=gen.partner_line)
    return sims


async def _drive(kind: str, addresses: dict[str, str], listing: dict[str, str], sites: list[SiteConfig],
                 streams: list[CallStream], duration: float, scale: float, seed: int,
                 live_console: Console | None, log_console: Console, tls_dir: Path | None = None,
                 callers: dict[str, CallerPool] | None = None, partner_sim: PartnerSimFactory | None = None,
                 contracts: Mapping[str, PartnerContract] | None = None) -> tuple:
    gen = LoadGen(demo_config(sites, addresses, streams, duration, scale, seed, tls_dir, callers))
    sims = _partner_sims(partner_sim, contracts or {}, sites, addresses, gen, scale, seed, tls_dir)
    status: dict = {}
    stop = asyncio.Event()
    poller = asyncio.create_task(
        _poll_status(gen, status, stop, None if live_console else log_console, scale, kind)
    )
    t0 = time.time()
    try:
        for name, sim in sims.items():
            await sim.start()
            try:
                await sim.wait_connected(15.0)
            except asyncio.TimeoutError:
                errors = "; ".join(f"{s.target}: {s.last_error or 'no answer'}" for s in sim.sessions)
                raise RunFailed(f"partner {name} could not connect to the nodes: {errors}") from None
            log_console.print(f"{kind}: partner {name} connected to " + ", ".join(s.site for s in sim.sessions))
        if live_console is not None:
            with Live(console=live_console, refresh_per_second=2, transient=False,
                      get_renderable=lambda: _progress_table(gen, status, scale, gen.started_at)):
                await gen.run(duration)
        else:
            await gen.run(duration)
    finally:
        stop.set()
        await asyncio.gather(poller, return_exceptions=True)
        # The callers are done: the partners finish the calls in hand and report them.
        for sim in sims.values():
            await sim.stop(timeout=15.0, end_calls=True)
    partners: dict[str, PartnerCall] = {}
    for name, sim in sims.items():
        partners.update(partner_calls(name, sim.records))
    node_calls = {}
    clients = {site: NodeClient(site, addr, tls_dir) for site, addr in listing.items()}
    try:
        await _settle(clients)
        for site, client in clients.items():
            calls = await client.list_calls(timeout=10.0)
            node_calls[site] = [c for c in calls if c.call_id.startswith(gen.run_id + "-")]
    finally:
        for client in clients.values():
            await client.close()
    log_console.print(f"{kind}: traffic and drain took {time.time() - t0:.1f} s")
    rec = reconcile(gen.records.values(), node_calls, gen.ledger, gen.run_id, partners)
    return gen, node_calls, rec, partners, {name: sim.summary() for name, sim in sims.items()}


def _node_logs(nodes: dict) -> str:
    return "\n".join(f"--- {n.name} ({'running' if n.alive() else 'exited'}), {n.log_path}:\n{n.log_tail(10)}"
                     for n in nodes.values())


async def run_traffic(
    kind: str,
    sites: list[SiteConfig],
    root: Path,
    *,
    load: Mapping[tuple[str, str], float] | None = None,
    duration: float = DEMO_DURATION_S,
    scale: float = DEMO_TIME_SCALE,
    seed: int = 1,
    etcd_endpoints: tuple[str, ...] = (),
    etcd_prefix: str = ETCD_PREFIX,
    policy: Mapping | None = None,
    live_console: Console | None = None,
    log_console: Console | None = None,
    profile: TrafficProfile | None = None,
    contracts: Mapping[str, PartnerContract] | None = None,
    partner_sim: PartnerSimFactory | None = None,
) -> RunResult:
    """One run of the traffic ``profile`` (default: :func:`demo_profile` of ``load``) on
    the example sites, data under ``root/kind``.

    ``kind``: "cluster" (one node per site, joined through etcd at ``etcd_endpoints``
    with ``policy``), "isolated" (one node per site, no etcd) or "pooled" (one node
    serving every agent and queue: :func:`pooled_site`). The same ``seed`` plays the same
    arrivals in every kind. ``contracts`` (partner -> contract; cluster runs only): BPO
    partners on the partner API, each played by ``partner_sim(...)`` (a
    ``router.partner.sim.PartnerSim``) in this process, with :data:`DEMO_PARTNERS`'
    settings. Raises :class:`NodeStartError` or :class:`RunFailed`."""
    log_console = log_console or _console(sys.stderr)
    base = Path(root) / kind
    profile = profile if profile is not None else demo_profile(sites, load)
    streams = profile.call_streams(sites)
    callers = profile.caller_pools(sites, streams, duration * scale)
    extra: list[str] = []
    tls_dir: Path | None = None
    contracts = dict(contracts or {}) if kind == "cluster" and partner_sim is not None else {}
    if kind == "pooled":
        d = scaled_site(parse_site(pooled_site(sites), "<pooled>"), scale)
        (base / "sites").mkdir(parents=True, exist_ok=True)
        files = [base / "sites" / "pooled.yaml"]
        files[0].write_text(yaml.safe_dump(d, sort_keys=False))
    else:
        files = write_scaled_sites(sites, base / "sites", scale)
        if kind == "cluster":
            if not etcd_endpoints:
                raise ValueError("a cluster run needs etcd endpoints")
            extra = ["--etcd", ",".join(etcd_endpoints), "--etcd-prefix", etcd_prefix,
                     "--etcd-ttl", str(ETCD_TTL_S)]
            # The cluster runs over mTLS: a CA and every identity in its data dir (the
            # reference runs are plaintext: they only replay the traffic for comparison).
            tls_dir = make_certs(sites, base / "tls", partners=tuple(sorted(contracts)))
            extra += ["--tls-dir", str(tls_dir)]
    # The cluster run fills the history (each node: chdb in its data dir, read merged by
    # `tandem report kpi --data-dir DIR`; TANDEM_HISTORY=URL or off overrides); the
    # reference runs replay the same call ids and must not touch it.
    extra += ["--history", os.environ.get("TANDEM_HISTORY", "embedded") if kind == "cluster" else "off"]
    running = {p.stem: load_site_file(p) for p in files}
    with running_nodes(files, base / "nodes", extra_args=extra) as nodes:
        if kind == "pooled":
            addr = nodes["pooled"].address
            addresses = {s.site.name: addr for s in sites}
            listing = {"pooled": addr}
        else:
            addresses = listing = {name: n.address for name, n in nodes.items()}
        log_console.print(f"{kind}: nodes " + ", ".join(f"{k} {n.address}" for k, n in nodes.items()))
        try:
            if kind == "cluster":
                await cluster_up(tuple(etcd_endpoints), etcd_prefix, list(nodes), policy or DEMO_POLICY,
                                 contracts=contracts)
            t0 = time.time()
            gen, node_calls, rec, partners, summaries = await _drive(
                kind, addresses, listing, sites, streams, duration, scale, seed, live_console, log_console,
                tls_dir, callers, partner_sim, contracts)
        except (grpc.RpcError, OSError, asyncio.TimeoutError) as e:
            raise RunFailed(f"the {kind} run failed: {describe(e)}\n{_node_logs(nodes)}") from None
        except RunFailed as e:
            raise RunFailed(f"{e}\n{_node_logs(nodes)}") from None
    by_site = {s.site.name: s for s in sites}
    origin = {r.call_id: r.site for r in gen.records.values()} if kind == "pooled" else None
    kpis = queue_kpis(node_calls, by_site, scale, origin_site=origin, partners=partners)
    kpis = {s.site.name: kpis.get(s.site.name, {}) for s in sites}
    t_a, t_b = gen.started_at, gen.arrivals_ended_at
    occupancy = voice_occupancy(node_calls, running, t_a + 0.1 * (t_b - t_a), t_b)
    arrived = {r.call_id: r.site for r in gen.records.values()}
    flows = overflow_counts(node_calls, partners, arrived) if kind == "cluster" else {}
    return RunResult(kind, gen, node_calls, rec, kpis, flows, occupancy, time.time() - t0, summaries,
                     partners, streams)


#: Version of the call file's format (``tandem demo --calls-out``; see :func:`write_calls`).
CALLS_FORMAT = 1


def calls_document(run: RunResult, sites: list[SiteConfig], scale: float, seed: int,
                   policy: Mapping | None = None) -> list[dict[str, Any]]:
    """The offered calls of a run as plain dicts, the lines of :func:`write_calls`.

    First a ``{"kind": "run", ...}`` header: ``format`` (:data:`CALLS_FORMAT`),
    ``run_id``, ``seed``, ``time_scale``; ``arrivals_end_s`` (when the arrivals stopped)
    and ``drain_end_s`` (when the callers still waiting were made to hang up and the
    conversations still going were ended: the end of the drain), both simulated seconds
    since the first arrival could come; ``behaviour`` (the simulated agents': ring
    time, reject and no-answer shares, recovery, in simulated seconds); ``policy``
    (the overflow policy put into etcd); ``sites`` (site name -> the *scaled* site file
    the node ran, as a dict: every duration in it divided by ``time_scale``);
    ``partners_api`` (the BPO partners that played on the partner API: their calls are
    not the nodes'); ``rejects`` and ``no_answers`` (offers the agents rejected or let
    ring out). Then one ``{"kind": "call", ...}`` per call the generator offered,
    in offer order (:func:`router.sim.report.call_lines`; times in simulated seconds)."""
    gen = run.gen
    started = gen.started_at
    end = gen.arrivals_ended_at or started
    header = {
        "kind": "run", "format": CALLS_FORMAT, "run_id": gen.run_id, "seed": seed, "time_scale": scale,
        "arrivals_end_s": round((end - started) * scale, 6),
        "drain_end_s": round((end + gen.cfg.drain_s - started) * scale, 6),
        "behaviour": dict(vars(gen.cfg.behaviour)),
        "policy": dict(policy or DEMO_POLICY),
        "sites": {s.site.name: scaled_site(s, scale) for s in sites},
        "partners_api": sorted(run.partners),
        "rejects": gen.ledger.rejects, "no_answers": gen.ledger.no_answers,
    }  # fmt: skip
    streams = {(st.site, st.name or st.skill): st for st in run.streams}
    lines = call_lines(gen.records.values(), run.node_calls, scale, started, streams, run.partner_records)
    return [header] + [{"kind": "call", **line} for line in lines]


def write_calls(path: Path, run: RunResult, sites: list[SiteConfig], scale: float, seed: int,
                policy: Mapping | None = None) -> int:
    """Write :func:`calls_document` to ``path``, one JSON object per line; returns the
    number of calls written."""
    doc = calls_document(run, sites, scale, seed, policy)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for line in doc:
            f.write(json.dumps(line, separators=(",", ":")) + "\n")
    return len(doc) - 1


def write_time_scale(root: Path, scale: float) -> Path:
    """Record the run's time scale in its data dir (see the module docstring)."""
    from router.history.kpi import TIME_SCALE_FILE

    path = Path(root) / TIME_SCALE_FILE
    path.write_text(f"{scale!r}\n")
    return path


def make_certs(sites: list[SiteConfig], directory: Path, partners: tuple[str, ...] = ()) -> Path:
    """``tandem certs init`` for the example sites (kept when already there), with a
    ``partner-NAME`` identity bound to the partner role for each of ``partners``."""
    from router.security import bindings, pki, spiffe

    if not (directory / "ca.key").exists():
        pki.init(directory, [(s.site.name, s.site.kind) for s in sites], partners=partners,
                 rebalancers=("rebalancer",))
    if not (directory / "rebalancer-rebalancer.crt").exists():  # a directory made before the rebalancer
        pki.issue(directory, "rebalancer", "rebalancer")
    missing = [p for p in partners if not (directory / f"partner-{p}.crt").exists()]
    if missing:  # a directory made before the partner joined
        doc = bindings.load_file(directory / "bindings.json")
        td = pki.trust_domain_of(directory)
        extra = [bindings.Binding(identity=spiffe.SpiffeId(td, "partner", p).uri, role="partner", sites=("*",))
                 for p in missing]
        for p in missing:
            pki.issue(directory, "partner", p)
        doc = bindings.Bindings(bindings=(*doc.bindings, *extra))
        (directory / "bindings.json").write_text(bindings.dumps(doc))
    return directory


def partner_contracts(sites_dir: Path) -> dict[str, PartnerContract]:
    """The contracts of ``SITES/partners/*.yaml`` that :data:`DEMO_PARTNERS` plays (none
    when the directory is missing). ContractError for an invalid one."""
    out = {}
    for f in sorted((Path(sites_dir) / "partners").glob("*.yaml")):
        c = parse_contract(f.read_text(), source=str(f))
        if c.partner in DEMO_PARTNERS:
            out[c.partner] = c
    return out


def load_site_file(path: Path) -> SiteConfig:
    from router.config import load_site

    return load_site(path)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _console(file) -> Console:
    c = Console(file=file, highlight=False)
    if not c.is_terminal:  # a log file or a pipe: do not squeeze the tables to 80 columns
        c = Console(file=file, highlight=False, width=160)
    return c


def gap_closed(cluster: float | None, isolated: float | None, pooled: float | None) -> float | None:
    """How much of the service-level gap between isolated sites and perfect pooling the
    cluster closes: (cluster - isolated) / (pooled - isolated); None when undefined."""
    if cluster is None or isolated is None or pooled is None or pooled - isolated <= 1e-9:
        return None
    return (cluster - isolated) / (pooled - isolated)


def _report(out: Console, res: RunResult) -> None:
    rec, gen = res.rec, res.gen
    out.print(
        f"{res.kind} reconciliation: {rec.offered} calls offered by the generator, lost {rec.lost}, "
        f"duplicates {rec.duplicates}, answered or ended at another site than offered "
        f"{rec.transferred}, unfinished by the generator {rec.unfinished}, unknown {rec.unknown}; "
        f"agent rejects {gen.ledger.rejects}, no-answers {gen.ledger.no_answers}; callers still "
        f"waiting at the end {gen.totals().forced_abandons}"
    )
    over = len(gen.ledger.over_capacity)
    if over:
        out.print(f"[red]{res.kind}: {over} offers exceeded an agent's capacity on a channel[/red]")
    for name, p in res.partners.items():
        broken = p["cap_exceeded"] or p["fields_outside_contract"]
        out.print(
            f"{'[red]' if broken else ''}{res.kind}: partner {name} (partner API): offered {p['offered']}, accepted "
            f"{p['accepted']}, declined {p['declined']}, handled {p['handled']}, abandoned {p['abandoned']}, "
            f"handed back {p['handed_back']}, "
            f"at most {p['max_concurrent']} at once; above its cap {p['cap_exceeded']} times, fields outside its "
            f"contract {p['fields_outside_contract']}{'[/red]' if broken else ''}")
    for ex in rec.examples[:10]:
        out.print(f"  {ex}", markup=False)
    for e in gen.errors[:10]:
        out.print(f"  generator: {e}", markup=False)


def run_demo(
    sites_dir: Path,
    duration: float = DEMO_DURATION_S,
    data_dir: Path | None = None,
    json_out: bool = False,
    seed: int = 1,
    time_scale: float | None = None,
    reference: bool = True,
    traffic: Path | None = None,
    partner_sim: PartnerSimFactory | None = None,
    calls_out: Path | None = None,
) -> int:
    """Run the demo; returns the process exit code (see the module docstring).
    ``calls_out``: also write the cluster run's offered calls there, one JSON line each
    (:func:`write_calls`; what ``tandem capacity validate`` replays).
    ``traffic``: a traffic profile file (:mod:`router.sim.traffic`); ``time_scale``:
    default the profile's, else :data:`DEMO_TIME_SCALE`. ``partner_sim``: builds the
    simulated partners (``router.partner.sim.PartnerSim``, passed by the ``tandem`` command;
    None: the BPO partners of ``SITES/partners`` stay out of the run)."""
    import uvloop

    from router.sim.traffic import ProfileError, load_profile

    out = _console(sys.stderr if json_out else sys.stdout)
    err = _console(sys.stderr)
    sites = load_sites(sites_or_example(sites_dir))
    if not sites:
        err.print(f"no site files (*.yaml) in {sites_dir}")
        return 2
    try:
        contracts = partner_contracts(sites_or_example(sites_dir)) if partner_sim is not None else {}
    except (ContractError, OSError) as e:
        err.print(str(e), markup=False)
        return 2
    profile = None
    if traffic is not None:
        try:
            profile = load_profile(traffic)
            profile.check(sites)
            sites = profile.apply_to_sites(sites)
        except ProfileError as e:
            err.print(str(e), markup=False)
            return 2
    if time_scale is None:
        time_scale = profile.time_scale if profile is not None and profile.time_scale else DEMO_TIME_SCALE
    live = out if (out.is_terminal and not json_out) else None

    async def main() -> tuple[RunResult, RunResult | None, RunResult | None]:
        with etcd_server(root / "etcd") as etcd:
            err.print(f"etcd at {etcd.endpoint} (data in {etcd.data_dir}); overflow policy under "
                      f"{ETCD_PREFIX}policy/overflow")
            cluster = await run_traffic("cluster", sites, root, duration=duration, scale=time_scale,
                                        seed=seed, etcd_endpoints=etcd.endpoints, live_console=live,
                                        log_console=err, profile=profile, contracts=contracts,
                                        partner_sim=partner_sim)
        isolated = pooled = None
        if reference:
            err.print("reference runs on the same traffic: isolated sites (no overflow), then all "
                      "agents pooled in one site")
            isolated = await run_traffic("isolated", sites, root, duration=duration, scale=time_scale,
                                         seed=seed, log_console=err, profile=profile)
            pooled = await run_traffic("pooled", sites, root, duration=duration, scale=time_scale,
                                       seed=seed, log_console=err, profile=profile)
        return cluster, isolated, pooled

    with contextlib.ExitStack() as stack:
        if data_dir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tandem-demo-")))
        else:
            root = Path(data_dir)
            root.mkdir(parents=True, exist_ok=True)
        # `tandem report kpi --data-dir` reads the history in the run's time with it
        write_time_scale(root, time_scale)
        n_runs = 3 if reference else 1
        err.print(f"tandem demo: {len(sites)} sites ({', '.join(s.site.name for s in sites)}), "
                  f"{n_runs} run(s) of {duration:g} s of traffic (x{time_scale:g}); data in {root}")
        # SIGTERM ends the demo like Ctrl-C: the nodes are stopped, the temp dir removed.
        stack.callback(signal.signal, signal.SIGTERM, signal.getsignal(signal.SIGTERM))
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            cluster, isolated, pooled = uvloop.run(main())
        except (NodeStartError, EtcdStartError) as e:
            err.print(f"[red]could not start the cluster:[/red] {e}", markup=True)
            return 2
        except RunFailed as e:
            err.print("[red]the run failed:[/red]")
            err.print(str(e), markup=False)
            return 1
        except KeyboardInterrupt:
            err.print("interrupted: nodes and etcd stopped")
            return 130
    out.print(kpi_tables(cluster.kpis, cluster.occupancy, cluster.flows))
    if calls_out is not None:
        n = write_calls(calls_out, cluster, sites, time_scale, seed)
        err.print(f"{n} offered calls of the cluster run written to {calls_out}")
    runs = [r for r in (cluster, isolated, pooled) if r is not None]
    for r in runs:
        _report(out, r)
    if isolated is not None and pooled is not None:
        gap = gap_closed(cluster.service_level, isolated.service_level, pooled.service_level)
        out.print(
            f"service level on the same traffic: cluster {_pct(cluster.service_level, 1)}, isolated sites "
            f"{_pct(isolated.service_level, 1)}, all agents pooled {_pct(pooled.service_level, 1)}"
            + (f" — the cluster closes {_pct(gap)} of the gap" if gap is not None else "")
        )
        out.print("  per site, cluster vs isolated: " + ", ".join(
            f"{s} {_pct(total(cluster.kpis[s].values()).service_level)} vs "
            f"{_pct(total(isolated.kpis.get(s, {}).values()).service_level)}" for s in cluster.kpis))
    if json_out:
        doc = summary(cluster.kpis, cluster.rec, duration * time_scale, time_scale, cluster.occupancy,
                      cluster.flows, isolated.kpis if isolated else None, pooled.kpis if pooled else None,
                      cluster.partners)
        if any(not r.clean for r in runs[1:]):
            doc["reference_lost"] = sum(r.rec.lost for r in runs[1:])
            doc["reference_duplicates"] = sum(r.rec.duplicates for r in runs[1:])
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()
    return 0 if all(r.clean for r in runs) else 1
