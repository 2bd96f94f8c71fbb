"""The cluster simulator checked against the live demo (issue 12): the same calls, SL per site.

``tandem demo`` (with ``calls_out``: :func:`router.sim.demo.write_calls`) runs the example
cluster — etcd, one real node process per site, the overflow policy in etcd, simulated
callers and agents over gRPC — on compressed time, and writes every call it offered as a
JSON line: when, what kind, the talk time and patience drawn for it, and what the nodes
made of it. :func:`validate` plays those very calls through the what-if simulator
(:func:`router.whatif.replay`: the real engine and the real overflow code, on simulated
time) and compares the service level and abandon rate of each site with a sampling
error. Pure: the caller reads the file (:func:`parse_calls` takes its text).

**Units.** The nodes ran on compressed time: site files with every duration divided by
the time scale, and real-time rhythms of their own that are *not* scaled (loads
published at most 4 times a real second and re-put every real second, overflow sweeps
every 0.5 real s, peers' loads older than ``max_peer_age_s`` real seconds ignored,
partner caps counted per real second). The replay therefore runs in the nodes' units:
the *scaled* site files the nodes ran (from the file's header) and the calls' times
divided by the scale, so that the simulator's own rhythms (:data:`router.whatif.PUBLISH_S`,
``SWEEP_S``, ``HEARTBEAT_S``, the policy's ``max_peer_age_s``) line up with the nodes'.
Results are converted back to simulated seconds.

**Calls to arrivals** (:func:`to_arrivals`; ``r`` = the demo agents' ring time):

* ``at`` = offered time / scale; origin site, skill, channel, language and caller (the
  engine classifies VIP, whitelist, blacklist and repeat callers itself, as the node did);
* ``handle_s`` = (``r`` + drawn talk) / scale + the scaled wrap-up of the queue that
  answered the call live (of its origin queue when nobody answered it). The simulator's
  agent accepts at once and talks ``handle_s`` minus the wrap-up of the queue that
  answers it there, then wraps up: the agent is held ring + talk + wrap-up, as the demo's
  agent was (it rings ``r``, talks, and the node's wrap-up follows). Answered by another
  queue in the replay than live, the call costs the other queue's wrap-up difference
  (at most 15 simulated seconds in the example) more or less;
* ``patience_s`` = (drawn patience − ``r``) / scale (infinite when none was drawn): the
  demo's caller hangs up unless an agent *connected* within its patience, that is unless
  the agent was offered the call ``r`` before; the simulator's caller is answered at the
  offer;
* left out (of the replay and of the live figures alike, :func:`replayable`): calls no
  node took (``offer_failed``), and calls whose drawn patience was no longer than ``r``
  — their callers hung up before any agent could ring through, where the simulator
  would answer them at once when an agent is free.

**Live figures.** Two readings of the same node records: ``reported`` — the demo's own
(its wait runs to the answer, the agent's accept after ringing; every abandon counts,
also the callers the end of the run made hang up): it equals ``tandem demo --json``'s
``service_level`` per site; ``aligned`` — what the simulator measures: the wait to the
agent's offer (the live wait minus ``r``, for answered and abandoned calls alike), and
calls unfinished when the run ended (callers still waiting at the end of the drain, made
to hang up; calls with no final state) left out, as the simulator leaves out the calls
still waiting at the same instant (``drain_s`` = the demo's drain end − the last
arrival). The comparison uses ``aligned``. Both judge a call by its origin queue's
service-level definition (threshold, how abandons count), wherever it was answered.

**Sampling errors.** Per site, for the service level (answered within the threshold over
the definition's denominator), the abandon rate (abandoned over answered + abandoned)
and, as a diagnostic, the share of the site's calls that left it by overflow, three
errors of the difference live − simulated, from three questions:

* ``z`` — the check (|z| <= :data:`Z_LIMIT` per in-house site): binomial errors
  ``sqrt(p (1 - p) / n)`` of each side, ``p`` shrunk to ``(k + 0.5) / (n + 1)`` so that
  a perfect 100 % still has an error, combined as for independent figures. It treats
  calls as independent draws, which waits in a queue are not (calls of one busy period
  share their fate), and the two sides as independent, which they are not (the same
  calls);
* ``z_same`` — the simulator's own path noise on the same calls: the spread
  (``sd_same``) of the site's figure over the exact replay and ``jitters`` replays with
  every arrival moved by up to ``jitter_s`` (10 ms real: a live run's RPC latency and
  event-loop turns; a queue forgets such a nudge within a busy period, so 2 ms or
  100 ms give the same spread). The simulated figure ``sim`` is the mean of those
  replays. This is the error of the question "same calls, same model?": a live run
  that differs by more carries an effect the simulator does not model;
* ``z_rep`` — the run-to-run spread (``sd_rep``) of the site's figure over
  ``replications`` replays of independent traffic like the run's (per origin site and
  stream a Poisson stream at the live rate, each call's kind, caller, talk time and
  patience drawn from the live calls of that stream): how much a run of this length
  varies at all, warm-up from an empty cluster and end of run included, times √2 for
  two runs. The loosest of the three.

What still differs, and is not aligned: the demo's agents reject 1 % of offers and let
0.5 % ring out (the node then offers the call again; the agent is NOT_READY for 30 s;
a call that rings out waits the node's offer timeout, which the demo floors at 1 real
second: 60 simulated seconds at a scale of 60) — near saturation that lowers the live
service level measurably, where agents that always answer leave none of it;
every RPC, stream push and event-loop turn takes real milliseconds (× the scale in
simulated seconds: 2 ms is 0.12 s at 60); the node polls its load every 0.1 real s
before publishing; transfers take a few RPCs, not an instant; a call answered by a
different queue than live costs that queue's wrap-up; the node also finds repeat
callers in its history. :class:`SiteCheck` ``notes`` measure some of it per site
(re-offered calls, the talk overshoot, the answer delay beyond the ring). BPO partners on the partner
API (``partners_api`` in the header) are not modelled: :func:`validate` refuses a run
where one took calls.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from router.config import ConfigError, SiteConfig, parse_site
from router.overflow import OverflowPolicy, PolicyError, parse_policy
from router.whatif import Arrival, ReplayResult, Tally, WhatIfError, replay

#: The format of the demo's call file this module reads (router.sim.demo.CALLS_FORMAT).
FORMAT = 1
#: Replays of the same calls with jittered arrival times (the simulator's path noise).
JITTERS = 20
#: The jitter, real seconds (the nodes' units): of the order of a live run's RPC latency
#: and event-loop turns (2 ms to 100 ms give the same spread: a queue's path forgets).
JITTER_S = 0.01
#: Replays of independent traffic like the run's (the run-to-run spread).
REPLICATIONS = 20
#: |z| above this: the simulator and the live run disagree beyond sampling error.
Z_LIMIT = 3.0

_OUTCOMES = ("completed", "abandoned", "rejected", "active", "offer_failed")


class ValidateError(ValueError):
    """A call file (or a run) this check cannot use; the message says what and where."""


@dataclass(frozen=True)
class LiveCall:
    """One offered call of the demo (a ``"kind": "call"`` line; times in simulated s)."""

    call_id: str
    site: str
    queue: str
    stream: str
    skill: str
    channel: str
    language: str
    caller: str
    offered_s: float
    talk_s: float
    patience_s: float | None
    outcome: str
    end_of_run: bool = False
    wait_s: float | None = None
    answered_site: str = ""
    answered_queue: str = ""
    transfers: int = 0
    offers: int = 1
    ended_site: str = ""
    talked_s: float | None = None
    priority_class: str = ""

    def gone_before_ring(self, ring_s: float) -> bool:
        """The caller's patience was no longer than the agents' ring time: it hung up
        before any agent could have connected (see :func:`to_arrivals`)."""
        return self.patience_s is not None and self.patience_s <= ring_s


@dataclass(frozen=True)
class LiveRun:
    """A demo run's call file: its header and its calls (offer order)."""

    time_scale: float
    arrivals_end_s: float
    drain_end_s: float
    ring_s: float
    policy: Mapping[str, Any]
    sites: Mapping[str, Mapping[str, Any]]  # name -> the scaled site file the node ran
    calls: tuple[LiveCall, ...]
    partners_api: tuple[str, ...] = ()
    seed: int = 0
    run_id: str = ""
    rejects: int | None = None  # the agents' rejected offers (None: not recorded)
    no_answers: int | None = None

    def site_configs(self) -> list[SiteConfig]:
        """The scaled site files, validated (ValidateError naming a bad one)."""
        out = []
        for name, doc in self.sites.items():
            try:
                out.append(parse_site(doc, f"<call file: site {name}>"))
            except ConfigError as e:
                raise ValidateError(str(e)) from None
        return out


def parse_calls(text: str, source: str = "<calls>") -> LiveRun:
    """Read a call file (``tandem demo --calls-out``): a ``"kind": "run"`` header line,
    then ``"kind": "call"`` lines. Raises :class:`ValidateError` naming the line."""
    header: dict | None = None
    calls: list[LiveCall] = []
    for no, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{source}:{no}"
        try:
            d = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValidateError(f"{where}: not JSON: {e.msg}") from None
        if not isinstance(d, dict):
            raise ValidateError(f"{where}: expected a JSON object")
        kind = d.get("kind")
        if kind == "run":
            if header is not None:
                raise ValidateError(f"{where}: a second run header")
            if d.get("format") != FORMAT:
                raise ValidateError(f"{where}: call file format {d.get('format')!r}, this check reads {FORMAT}")
            header = d
        elif kind == "call":
            calls.append(_call(d, where))
        else:
            raise ValidateError(f"{where}: kind must be 'run' or 'call', got {kind!r}")
    if header is None:
        raise ValidateError(f"{source}: no run header (a 'kind': 'run' line)")
    try:
        scale = float(header["time_scale"])
        run = LiveRun(
            time_scale=scale, arrivals_end_s=float(header["arrivals_end_s"]),
            drain_end_s=float(header["drain_end_s"]),
            ring_s=float((header.get("behaviour") or {}).get("ring_s", 0.0)),
            policy=dict(header["policy"]), sites=dict(header["sites"]), calls=tuple(calls),
            partners_api=tuple(header.get("partners_api") or ()), seed=int(header.get("seed", 0)),
            run_id=str(header.get("run_id", "")),
            rejects=header.get("rejects"), no_answers=header.get("no_answers"),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise ValidateError(f"{source}: bad run header: {e!r}") from None
    if not (scale > 0 and math.isfinite(scale)):
        raise ValidateError(f"{source}: time_scale must be > 0, got {scale!r}")
    unknown = sorted({c.site for c in calls} - set(run.sites))
    if unknown:
        raise ValidateError(f"{source}: calls of site(s) {unknown} the header has no site file for")
    return run


def _call(d: Mapping[str, Any], where: str) -> LiveCall:
    try:
        c = LiveCall(
            call_id=str(d["call_id"]), site=str(d["site"]), queue=str(d.get("queue") or ""),
            stream=str(d.get("stream") or ""), skill=str(d["skill"]), channel=str(d.get("channel") or "voice"),
            language=str(d.get("language") or ""), caller=str(d.get("caller") or ""),
            offered_s=float(d["offered_s"]), talk_s=float(d["talk_s"]),
            patience_s=None if d.get("patience_s") is None else float(d["patience_s"]),
            outcome=str(d["outcome"]), end_of_run=bool(d.get("end_of_run", False)),
            wait_s=None if d.get("wait_s") is None else float(d["wait_s"]),
            answered_site=str(d.get("answered_site") or ""), answered_queue=str(d.get("answered_queue") or ""),
            transfers=int(d.get("transfers") or 0), offers=int(d.get("offers", 1) or 0),
            ended_site=str(d.get("ended_site") or ""),
            talked_s=None if d.get("talked_s") is None else float(d["talked_s"]),
            priority_class=str(d.get("priority_class") or ""),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise ValidateError(f"{where}: bad call line: {e!r}") from None
    if c.outcome not in _OUTCOMES:
        raise ValidateError(f"{where}: outcome must be one of {_OUTCOMES}, got {c.outcome!r}")
    if not (math.isfinite(c.offered_s) and c.offered_s >= 0 and math.isfinite(c.talk_s) and c.talk_s >= 0):
        raise ValidateError(f"{where}: offered_s and talk_s must be finite numbers >= 0")
    return c


# --- calls -> arrivals ------------------------------------------------------------------------


def replayable(run: LiveRun) -> list[LiveCall]:
    """The calls both sides count: every call a node took (not ``offer_failed``) but
    those whose caller hung up before an agent could ring through (patience <= ring)."""
    return [c for c in run.calls if c.outcome != "offer_failed" and not c.gone_before_ring(run.ring_s)]


def _arrival(c: LiveCall, call_id: str, at: float, wrap: float, run: LiveRun) -> Arrival:
    k, ring = run.time_scale, run.ring_s
    return Arrival(
        call_id=call_id, site=c.site, at=at, skill=c.skill, channel=c.channel, language=c.language,
        caller=c.caller, handle_s=(ring + c.talk_s) / k + wrap,
        patience_s=math.inf if c.patience_s is None else max(0.0, c.patience_s - ring) / k,
    )  # fmt: skip


def _wrap(sites: Mapping[str, SiteConfig], site: str, queue: str) -> float:
    cfg = sites.get(site)
    q = next((q for q in cfg.queues if q.name == queue), None) if cfg is not None else None
    return q.wrap_up_s if q is not None else 0.0


def _origin_wrap(by_name: Mapping[str, SiteConfig], c: LiveCall) -> float:
    q = by_name[c.site].queue_for(c.skill, c.channel, c.language or None)  # type: ignore[arg-type]
    return q.wrap_up_s if q is not None else 0.0


def to_arrivals(run: LiveRun, sites: Sequence[SiteConfig] | None = None) -> list[Arrival]:
    """The :func:`replayable` calls as arrivals in the nodes' units, in arrival order
    (see the module docstring: times / scale; handle = ring + talk + the scaled wrap-up
    of the queue that answered it live, else of its origin queue; patience − ring);
    ``sites``: the scaled site files (default the header's)."""
    by_name = {s.site.name: s for s in (sites if sites is not None else run.site_configs())}
    out = []
    for c in replayable(run):
        if c.answered_site in by_name and c.answered_queue:
            wrap = _wrap(by_name, c.answered_site, c.answered_queue)
        else:
            wrap = _origin_wrap(by_name, c)
        out.append(_arrival(c, c.call_id, c.offered_s / run.time_scale, wrap, run))
    out.sort(key=lambda a: (a.at, a.call_id))
    return out


def drain_s(run: LiveRun) -> float:
    """The replay's drain (nodes' units): from the last arrival to the demo's drain end,
    when the callers still waiting were made to hang up."""
    last = max((c.offered_s for c in replayable(run)), default=0.0)
    return max(0.0, run.drain_end_s - last) / run.time_scale


def jittered(arrivals: Sequence[Arrival], jitter_s: float, seed: int) -> list[Arrival]:
    """The same calls, each arriving up to ``jitter_s`` earlier or later (uniform,
    seeded; never before 0): the timing noise of a live run (RPC latency, event-loop
    turns), in the arrivals' units."""
    rng = random.Random(seed)
    out = [replace(a, at=max(0.0, a.at + rng.uniform(-jitter_s, jitter_s))) for a in arrivals]
    out.sort(key=lambda a: (a.at, a.call_id))
    return out


def resampled_arrivals(run: LiveRun, seed: int, sites: Sequence[SiteConfig] | None = None) -> list[Arrival]:
    """Independent traffic like the run's, in the nodes' units: per (origin site,
    stream) a Poisson stream over the run's arrival period at the live rate (its
    :func:`replayable` calls / period), each call's kind, caller, talk time and patience
    drawn from those calls. Handle time = ring + talk + the origin queue's wrap-up.
    Seeded."""
    by_name = {s.site.name: s for s in (sites if sites is not None else run.site_configs())}
    calls = replayable(run)
    period = max(run.arrivals_end_s, max((c.offered_s for c in calls), default=0.0)) / run.time_scale
    pools: dict[tuple[str, str], list[LiveCall]] = {}
    for c in calls:
        pools.setdefault((c.site, c.stream or f"{c.skill}/{c.channel}/{c.language}"), []).append(c)
    rng = random.Random(seed)
    out = []
    for key in sorted(pools):
        pool = pools[key]
        rate = len(pool) / period if period > 0 else 0.0
        t, n = 0.0, 0
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= period:
                break
            c = pool[rng.randrange(len(pool))]
            n += 1
            out.append(_arrival(c, f"{key[0]}-{key[1]}-{n:06d}", t, _origin_wrap(by_name, c), run))
    out.sort(key=lambda a: (a.at, a.call_id))
    return out


# --- the live figures -------------------------------------------------------------------------


def live_tallies(run: LiveRun, *, aligned: bool = True,
                 sites: Sequence[SiteConfig] | None = None) -> dict[str, Tally]:
    """Per origin site, the live calls counted as :class:`router.whatif.Tally` (by the
    origin queue's service-level definition, waits in the nodes' units). ``aligned``
    (see the module docstring): the :func:`replayable` calls, waits to the agent's offer
    (live wait − ring), calls unfinished at the end of the run apart; else the demo's
    own reading of every call it offered (waits to the answer, every abandon counts)."""
    by_name = {s.site.name: s for s in (sites if sites is not None else run.site_configs())}
    out = {name: Tally() for name in by_name}
    k = run.time_scale
    for c in replayable(run) if aligned else run.calls:
        if c.outcome == "offer_failed":
            continue
        t = out[c.site]
        t.offered += 1
        if c.transfers and (c.ended_site or c.answered_site or c.site) != c.site:
            t.overflow_out += 1  # left its origin by a committed transfer: owned elsewhere
        if c.outcome == "rejected":
            t.rejected += 1
            continue
        if c.outcome == "active" or (aligned and c.end_of_run):
            t.unfinished += 1
            continue
        q = next((q for q in by_name[c.site].queues if q.name == c.queue), None)
        if q is None:
            raise ValidateError(f"call {c.call_id}: site {c.site} has no queue {c.queue!r}")
        wait = c.wait_s or 0.0
        if aligned:
            wait = max(0.0, wait - run.ring_s)
        t.add_finished(q.service_level, c.outcome == "completed", wait / k)
    return out


def _live_notes(run: LiveRun, sites: Mapping[str, SiteConfig]) -> dict[str, dict[str, Any]]:
    """Per origin site, what the replay cannot reproduce of the live calls:
    ``gone_before_ring`` (left out of both sides); ``reoffered`` (offered to an agent
    more than once: an agent rejected it or let it ring out) and ``reoffered_missed``
    (of those, answered later than the threshold, or abandoned); ``talk_overshoot_s``
    (mean simulated seconds a conversation lasted on the node beyond its drawn talk
    time, over the calls the end of the run did not cut; None without them) and
    ``answer_delay_s`` (median of the live wait minus the ring time over the calls
    answered at once — within ring + 1 s —: the offer-to-connect delays of the live run
    beyond the ring, simulated seconds)."""
    out: dict[str, dict[str, Any]] = {}
    over: dict[str, list[float]] = {name: [] for name in sites}
    delay: dict[str, list[float]] = {name: [] for name in sites}
    for name in sites:
        out[name] = {"gone_before_ring": 0, "reoffered": 0, "reoffered_missed": 0}
    for c in run.calls:
        if c.outcome == "offer_failed":
            continue
        n = out[c.site]
        if c.gone_before_ring(run.ring_s):
            n["gone_before_ring"] += 1
            continue
        if c.offers > 1:
            n["reoffered"] += 1
            q = next((q for q in sites[c.site].queues if q.name == c.queue), None)
            threshold = q.service_level.threshold_s * run.time_scale if q is not None else math.inf
            if c.outcome == "abandoned" or (c.wait_s or 0.0) - run.ring_s > threshold:
                n["reoffered_missed"] += 1
        if c.outcome == "completed" and c.wait_s is not None:
            if c.talked_s is not None and c.offered_s + c.wait_s + c.talk_s < run.drain_end_s - 60.0:
                over[c.site].append(c.talked_s - c.talk_s)
            if c.wait_s <= run.ring_s + 1.0:
                delay[c.site].append(c.wait_s - run.ring_s)
    for name in sites:
        out[name]["talk_overshoot_s"] = round(statistics.fmean(over[name]), 3) if over[name] else None
        out[name]["answer_delay_s"] = round(statistics.median(delay[name]), 3) if delay[name] else None
    return out


# --- errors -------------------------------------------------------------------------------------


def binomial_se(k: int, n: int) -> float | None:
    """Standard error of a share ``k / n``: ``sqrt(p (1 - p) / n)`` with ``p = (k + 0.5)
    / (n + 1)`` (never 0, also at 0 % or 100 %); None for ``n == 0``."""
    if n <= 0:
        return None
    p = (k + 0.5) / (n + 1)
    return math.sqrt(p * (1.0 - p) / n)


def z_score(a: float | None, b: float | None, se: float | None) -> float | None:
    """``(a - b) / se``; None when a figure or the error is missing or the error is 0."""
    if a is None or b is None or se is None or se <= 0:
        return None
    return (a - b) / se


def combined(*errors: float | None) -> float | None:
    """The error of a difference of independent figures: root of the summed squares."""
    if any(e is None for e in errors):
        return None
    return math.sqrt(sum(e * e for e in errors))  # type: ignore[operator]


def _sl_parts(t: Tally) -> tuple[int, int]:
    return t.sl_num, t.sl_den


def _abandon_parts(t: Tally) -> tuple[int, int]:
    return t.abandoned, t.answered + t.abandoned


def _overflow_parts(t: Tally) -> tuple[int, int]:
    return t.overflow_out, t.offered


# --- the comparison ---------------------------------------------------------------------------


@dataclass
class Figure:
    """One figure (a share) of one site, live and simulated, with its errors.

    ``live`` over ``n_live`` calls; ``sim`` the mean over the replays of the same calls
    (the exact one, ``sim_exact`` over ``n_sim`` calls, and the jittered ones); ``z`` =
    (live − sim) / √(se_live² + se_sim²), binomial errors — the check; ``sd_same``: the
    spread of the replays of the same calls, ``z_same`` = (live − sim) / (sd_same ·
    √(1 + 1/replays)); ``sd_rep``: the run-to-run spread over independent traffic
    (``rep_mean`` its mean), ``z_rep`` = (live − sim) / (sd_rep · √2)."""

    live: float | None
    sim: float | None
    sim_exact: float | None
    n_live: int
    n_sim: int
    se_live: float | None
    se_sim: float | None
    z: float | None = None
    sd_same: float | None = None
    z_same: float | None = None
    sd_rep: float | None = None
    rep_mean: float | None = None
    z_rep: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in vars(self).items()}


def _sd(values: Sequence[float]) -> float | None:
    return statistics.stdev(values) if len(values) >= 2 else None


def figure(live: tuple[int, int], exact: tuple[int, int], same: Sequence[float],
           reps: Sequence[float]) -> Figure:
    """A :class:`Figure` from the live (numerator, denominator), the exact replay's, the
    shares of every replay of the same calls (the exact one included) and of the
    independent replications."""
    (lk, ln), (sk, sn) = live, exact
    lp = lk / ln if ln else None
    exact_p = sk / sn if sn else None
    sim = statistics.fmean(same) if same else exact_p
    se_l, se_s = binomial_se(lk, ln), binomial_se(sk, sn)
    sd_same, sd_rep = _sd(same), _sd(reps)
    return Figure(
        live=lp, sim=sim, sim_exact=exact_p, n_live=ln, n_sim=sn, se_live=se_l, se_sim=se_s,
        z=z_score(lp, sim, combined(se_l, se_s)),
        sd_same=sd_same, z_same=z_score(lp, sim, None if sd_same is None else sd_same * math.sqrt(1 + 1 / len(same))),
        sd_rep=sd_rep, rep_mean=statistics.fmean(reps) if reps else None,
        z_rep=z_score(lp, sim, None if sd_rep is None else sd_rep * math.sqrt(2.0)),
    )  # fmt: skip


@dataclass
class SiteCheck:
    """One site: service level (``sl``), abandon rate (``abandon``) and the share of its
    calls that left it by overflow (``overflow``, not checked: a diagnostic) live vs
    simulated, the demo's own service level (``sl_reported``), counts of both sides
    (``live``, ``sim``: the exact replay) and the live calls' notes (``notes``: gone
    before the ring, re-offered)."""

    site: str
    kind: str
    sl: Figure
    abandon: Figure
    overflow: Figure
    sl_reported: float | None
    live: dict[str, Any] = field(default_factory=dict)
    sim: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """|z| of the service level within :data:`Z_LIMIT` (or no figure to compare)."""
        return self.sl.z is None or abs(self.sl.z) <= Z_LIMIT

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "kind": self.kind, "ok": self.ok, "sl": self.sl.to_dict(),
                "abandon": self.abandon.to_dict(), "overflow": self.overflow.to_dict(),
                "sl_reported": None if self.sl_reported is None else round(self.sl_reported, 6),
                "live": self.live, "sim": self.sim, "notes": self.notes}


@dataclass
class Validation:
    """The outcome of :func:`validate`: one :class:`SiteCheck` per site, the exact
    replay of the live calls, and how many replays of each kind made the errors."""

    sites: dict[str, SiteCheck]
    replay: ReplayResult
    calls: int
    time_scale: float
    drain_s: float
    jitters: int
    replications: int
    jitter_s: float

    @property
    def ok(self) -> bool:
        """Every in-house site within :data:`Z_LIMIT`."""
        return all(c.ok for c in self.sites.values() if c.kind == "inhouse")

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "calls": self.calls, "time_scale": self.time_scale,
            "drain_s": round(self.drain_s * self.time_scale, 3), "z_limit": Z_LIMIT,
            "jitters": self.jitters, "jitter_s": self.jitter_s, "replications": self.replications,
            "sites": {n: c.to_dict() for n, c in sorted(self.sites.items())},
            "decisions": dict(sorted(self.replay.decisions.items())),
            "transfers_aborted": self.replay.transfers_aborted,
        }  # fmt: skip


def _counts(t: Tally, scale: float) -> dict[str, Any]:
    asa = t.asa_s
    return {"offered": t.offered, "answered": t.answered, "abandoned": t.abandoned, "rejected": t.rejected,
            "unfinished": t.unfinished, "overflow_out": t.overflow_out,
            "asa_s": None if asa is None else round(asa * scale, 3)}


def validate(run: LiveRun, *, jitters: int = JITTERS, replications: int = REPLICATIONS, seed: int = 1,
             jitter_s: float = JITTER_S, policy: OverflowPolicy | None = None) -> Validation:
    """Replay the run's calls through the simulator and compare per site (see the module
    docstring). ``jitters``: extra replays of the same calls with arrival times jittered
    by up to ``jitter_s`` real seconds (the simulator's own path noise: ``sd_same``);
    ``replications``: replays of independent traffic like the run's (the run-to-run
    spread: ``sd_rep``); ``seed``: theirs (the same inputs and seed give the same
    figures); ``policy``: default the header's (the one the demo put into etcd).
    Raises :class:`ValidateError` for a run this check cannot replay (calls a partner
    on the partner API took, a bad site file or policy, calls the replay refuses)."""
    api = [c.call_id for c in run.calls if c.answered_site.startswith("partner:")]
    if run.partners_api and (api or any(c.transfers and not c.answered_site for c in run.calls)):
        raise ValidateError(
            f"BPO partner(s) on the partner API ({', '.join(run.partners_api)}) played in this run and may "
            f"have taken calls ({len(api)} answered there); the simulator does not model them: run the demo "
            "without them")
    sites = run.site_configs()
    by_name = {s.site.name: s for s in sites}
    if policy is None:
        try:
            policy = parse_policy(dict(run.policy), "<call file: policy>")
        except PolicyError as e:
            raise ValidateError(str(e)) from None
    drain = drain_s(run)
    names = list(by_name)
    same_sl: dict[str, list[float]] = {n: [] for n in names}
    same_ab: dict[str, list[float]] = {n: [] for n in names}
    same_ov: dict[str, list[float]] = {n: [] for n in names}
    rep_sl: dict[str, list[float]] = {n: [] for n in names}
    rep_ab: dict[str, list[float]] = {n: [] for n in names}
    rep_ov: dict[str, list[float]] = {n: [] for n in names}

    def play(arrivals: list[Arrival], sl: dict[str, list[float]], ab: dict[str, list[float]],
             ov: dict[str, list[float]]) -> ReplayResult:
        r = replay(sites, arrivals, policy, seed=seed, censored="inf", drain_s=drain)  # type: ignore[arg-type]
        for name, sr in r.sites.items():
            if sr.service_level is not None:
                sl[name].append(sr.service_level)
            if sr.abandon_rate is not None:
                ab[name].append(sr.abandon_rate)
            if sr.offered:
                ov[name].append(sr.overflow_out / sr.offered)
        return r

    try:
        arrivals = to_arrivals(run, sites)
        exact = play(arrivals, same_sl, same_ab, same_ov)
        for i in range(jitters):
            play(jittered(arrivals, jitter_s, seed * 1_000_003 + i), same_sl, same_ab, same_ov)
        for i in range(replications):
            play(resampled_arrivals(run, seed * 2_000_003 + i, sites), rep_sl, rep_ab, rep_ov)
    except WhatIfError as e:
        raise ValidateError(f"the replay refused the calls: {e}") from None
    live = live_tallies(run, aligned=True, sites=sites)
    reported = live_tallies(run, aligned=False, sites=sites)
    notes = _live_notes(run, by_name)
    checks = {}
    for name in names:
        lt, st = live[name], exact.sites[name]
        checks[name] = SiteCheck(
            site=name, kind=by_name[name].site.kind,
            sl=figure(_sl_parts(lt), _sl_parts(st), same_sl[name], rep_sl[name]),
            abandon=figure(_abandon_parts(lt), _abandon_parts(st), same_ab[name], rep_ab[name]),
            overflow=figure(_overflow_parts(lt), _overflow_parts(st), same_ov[name], rep_ov[name]),
            sl_reported=reported[name].service_level,
            live=_counts(lt, run.time_scale), sim=_counts(st, run.time_scale), notes=notes[name],
        )  # fmt: skip
    return Validation(checks, exact, len(arrivals), run.time_scale, drain, jitters, replications, jitter_s)


def report_lines(v: Validation) -> list[str]:
    """:func:`validate`'s figures as plain text, one line per site."""
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    def num(x: float | None, d: int = 2) -> str:
        return "-" if x is None else f"{x:+.{d}f}" if d == 2 else f"{x:.{d}f}"

    title = (
        f"{v.calls} calls replayed (time scale {v.time_scale:g}); per origin site, live (wait to the agent's "
        f"offer) against the simulator on the same calls (mean of the exact replay and {v.jitters} jittered by "
        f"{v.jitter_s:g} s); z: binomial errors combined (the check, |z| <= {Z_LIMIT:g}); z same: the replays' "
        f"own spread; z rep: the run-to-run spread of {v.replications} independent traffic samples x sqrt 2"
    )
    columns = (
        f"{'site':9} {'kind':7} {'SL live':>7} {'demo':>6} {'SL sim':>7} {'exact':>6} {'n':>4} {'se bin':>6} "
        f"{'z':>6} {'sd same':>7} {'z same':>6} {'sd rep':>6} {'z rep':>6} {'ab live':>7} {'ab sim':>6} "
        f"{'z ab':>6} {'ovf live':>8} {'ovf sim':>7} {'z same':>6} {'reoff.':>6}"
    )
    out = [title, columns]
    for name, c in sorted(v.sites.items()):
        se = combined(c.sl.se_live, c.sl.se_sim)
        out.append(
            f"{name:9} {c.kind:7} {pct(c.sl.live):>7} {pct(c.sl_reported):>6} {pct(c.sl.sim):>7} "
            f"{pct(c.sl.sim_exact):>6} {c.sl.n_live:>4} {num(se, 3):>6} {num(c.sl.z):>6} {num(c.sl.sd_same, 3):>7} "
            f"{num(c.sl.z_same):>6} {num(c.sl.sd_rep, 3):>6} {num(c.sl.z_rep):>6} {pct(c.abandon.live):>7} "
            f"{pct(c.abandon.sim):>6} {num(c.abandon.z):>6} {pct(c.overflow.live):>8} {pct(c.overflow.sim):>7} "
            f"{num(c.overflow.z_same):>6} "
            f"{c.notes.get('reoffered', 0):>3}/{c.notes.get('reoffered_missed', 0):<2}")
    return out
