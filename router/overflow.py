"""Overflow policy: should this call stay at its site or go to a peer, and which one.

Pure code shared by the live node and the simulator: no I/O, no clock, no randomness —
the time (``now``) and every figure are arguments. The policy model is pydantic; the very
same JSON is stored in etcd under ``policy/overflow`` (see ``router.coord.keys``).

Inputs of :func:`decide`: the local queue (:class:`LocalQueue`: length, the new call's
expected wait, staffed slots, the service-level target), the peers' load snapshots
(:class:`PeerLoad`: a :class:`LoadSnapshot` plus its age), partner usage counters
(:class:`PartnerUsage`), the site's contingency mode and the queue-ratio hysteresis state.
Output: a :class:`Decision` with the target (or stay), the rule that decided, the reason,
the figures used and every candidate with its expected wait or why it was left out — a
row for the history store.

Rules, per queue (:class:`QueueRules`, looked up by :meth:`OverflowPolicy.rules_for`),
all optional and combinable:

1. **Eligibility** of each peer, always applied: a peer whose load is missing or older
   than ``max_peer_age_s`` is never a candidate (invariant 6: no overflow on stale
   news); nor one that is draining, has no queue for the call's skill/channel/language,
   has no staffed slot there, or is excluded by ``to`` / ``exclude``. A partner needs a
   contract (``partners``), partner overflow enabled for the queue and in the site's
   contingency mode, the call's value within the contract's ``max_value`` (high-value
   work never goes to a partner: the model refuses it), the partner open (``hours`` in
   its own time zone) and under its caps (concurrent calls, calls per second).
2. **Split** (``split``): a fixed share of the queue's calls goes to the best eligible
   site of ``split.to``, chosen by a hash of the call id (the same call always decides
   the same way, so a retried offer does not move). Calls outside the share, or whose
   split targets are all ineligible, go on to the load rules.
3. **Load rules**, all configured ones must hold:
   * ``wait_threshold``: the local expected wait exceeds ``factor`` × the queue's
     target (its service-level threshold, which is the region's target), × the
     contingency mode's ``wait_factor``;
   * ``margin`` (Avaya BSR style): a peer qualifies only if its expected wait is better
     by the margin: ``peer_ew <= local_ew * (1 - ratio) - seconds``;
   * ``queue_ratio`` (Perry & Whitt 2009): with ``D = q1/n1 - r * q2/n2`` (queue
     length over staffed slots, here and at the peer), overflow to that peer switches
     on when ``D > on`` and off when ``D <= off`` (``off < on``); in between it keeps
     its previous state, so it does not flap. The state is an input
     (``ratio_active``) and an output (``Decision.ratio_active``).
   In every case a load-based overflow goes only to a peer whose expected wait is
   strictly shorter than the local one; the best qualifying peer (shortest expected
   wait, then in-house before partner, then name) is chosen.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from router.config import Name  # site, queue and skill names: one definition
from router.contracts import Hours
Value = Literal["low", "standard", "high"]
PartnerValue = Literal["low", "standard"]
Mode = Literal["normal", "surge", "emergency"]
MODES: tuple[str, ...] = ("normal", "surge", "emergency")
VALUE_RANK: dict[str, int] = {"low": 0, "standard": 1, "high": 2}


class PolicyError(ValueError):
    """An overflow policy or contingency state that cannot be used; the message names
    the source and every offending field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- load snapshots (published by each node under load/<site>) ---------------------------


class QueueLoad(_Model):
    """One queue of a site as its node publishes it."""

    skill: Name
    channel: Literal["voice", "chat", "email", "social"] = "voice"
    language: str = ""  # "" = any language
    value: Value = "standard"
    length: int = Field(0, ge=0)
    expected_wait_s: float = Field(0.0, ge=0)  # of a call joining the queue now
    staffed: int = Field(0, ge=0)  # staffed slots (the n of Perry & Whitt)
    free_agents: int = Field(0, ge=0)
    target_wait_s: float = Field(20.0, gt=0)  # service-level threshold
    service_level: float = Field(-1.0, ge=-1, le=1)  # recent; -1 = no finished call yet


class LoadSnapshot(_Model):
    """A site's load as published under ``load/<site>``. ``seq`` grows with every
    publication of one node process, ``ts`` is the publisher's wall clock."""

    site: Name
    region: Name
    kind: Literal["inhouse", "partner"] = "inhouse"
    seq: int = Field(0, ge=0)
    ts: float = 0.0
    accepting: bool = True  # False while the site drains: send it nothing
    mode: Mode = "normal"
    active_calls: int = Field(0, ge=0)  # queued + being served
    service_level: float = Field(-1.0, ge=-1, le=1)
    free_agents: dict[Name, int] = Field(default_factory=dict)  # per skill
    queues: dict[str, QueueLoad] = Field(default_factory=dict)

    def queue_for(self, skill: str, channel: str, language: str) -> tuple[str, QueueLoad] | None:
        """The queue that would take such a call: the exact language first, else the
        queue of that skill and channel with no language (as ``SiteConfig.queue_for``)."""
        fallback = None
        for name in sorted(self.queues):
            q = self.queues[name]
            if q.skill == skill and q.channel == channel:
                if q.language == (language or ""):
                    return name, q
                if q.language == "":
                    fallback = (name, q)
        return fallback

    def same_load(self, other: "LoadSnapshot | None") -> bool:
        """Equal apart from ``seq`` and ``ts`` (a publisher skips unchanged loads)."""
        if other is None:
            return False
        return self.model_dump(exclude={"seq", "ts"}) == other.model_dump(exclude={"seq", "ts"})


@dataclass(frozen=True, slots=True)
class PeerLoad:
    """A peer's latest snapshot and how old our copy is (seconds since we received it)."""

    snapshot: LoadSnapshot
    age_s: float


@dataclass(frozen=True, slots=True)
class PartnerUsage:
    """What a partner is already carrying: concurrent overflow calls and calls sent in
    the last second. The node counts them (its own transfers in flight plus what the
    partner's load snapshot shows)."""

    concurrent: int = 0
    calls_last_s: float = 0.0


@dataclass(frozen=True, slots=True)
class LocalQueue:
    """The queue a new call is about to join, at the deciding site."""

    site: str
    region: str
    queue: str
    skill: str
    channel: str = "voice"
    language: str = ""
    value: Value = "standard"
    length: int = 0  # calls waiting now, not counting the new one
    expected_wait_s: float = 0.0  # the new call's expected wait if it stays
    staffed: int = 0
    target_wait_s: float = 20.0  # the queue's service-level threshold (region's target)


# --- the policy (stored under policy/overflow) -----------------------------------------


class WaitThreshold(_Model):
    """Overflow only when the local expected wait exceeds ``factor`` × target."""

    factor: float = Field(1.0, gt=0, le=100)


class Margin(_Model):
    """A peer qualifies only if ``peer_ew <= local_ew * (1 - ratio) - seconds``."""

    seconds: float = Field(0.0, ge=0, le=86400)
    ratio: float = Field(0.0, ge=0, lt=1)


class QueueRatio(_Model):
    """Perry & Whitt: ``D = q1/n1 - r * q2/n2``; on when ``D > on``, off when ``D <= off``."""

    r: float = Field(1.0, gt=0, le=100)
    on: float = Field(ge=-1000, le=1000)
    off: float = Field(ge=-1000, le=1000)

    @model_validator(mode="after")
    def _hysteresis(self) -> "QueueRatio":
        if not self.off < self.on:
            raise ValueError(f"off ({self.off}) must be below on ({self.on})")
        return self


class Split(_Model):
    """Send ``percent`` % of the queue's calls to the best eligible site of ``to``."""

    percent: float = Field(gt=0, le=100)
    to: list[Name] = Field(min_length=1)
    salt: str = Field("", max_length=64)  # different salts split independent hotlines


class QueueRules(_Model):
    """The overflow rules of one queue; see the module docstring."""

    enabled: bool = True
    wait_threshold: WaitThreshold | None = None
    margin: Margin | None = None
    queue_ratio: QueueRatio | None = None
    split: Split | None = None
    to: list[Name] | None = None  # allowed targets; None = any peer
    exclude: list[Name] = Field(default_factory=list)
    inhouse: bool = True  # may overflow to other in-house sites
    partners: bool = True  # may overflow to partners (value, contract and mode permitting)
    value: Value | None = None  # overrides the queue's configured value

    def load_rules(self) -> list[str]:
        return [n for n in ("wait_threshold", "margin", "queue_ratio") if getattr(self, n)]


class PartnerHours(Hours):
    """Opening hours in the partner's own time zone; ``close < open`` spans midnight;
    ``holidays`` (local dates) close the shift that starts on them. One definition with the
    partner contracts (:class:`router.contracts.Hours`): the overflow decision and the
    partner API agree on when a partner is open."""


class PartnerContract(_Model):
    """What a partner accepts. High-value work is never allowed (``max_value``)."""

    max_value: PartnerValue = "low"
    max_concurrent: int | None = Field(None, ge=0)
    max_calls_per_s: float | None = Field(None, ge=0)
    hours: PartnerHours | None = None


class ModeSettings(_Model):
    """What a contingency mode turns on at a site. ``backoffice_agents`` and
    ``announcement`` are for the node (sign in back-office overflow agents, set the IVR
    message); the rest shapes overflow decisions."""

    backoffice_agents: bool = False
    partner_overflow: bool = True
    partner_max_value: PartnerValue | None = None  # raises the contracts' max_value
    wait_factor: float = Field(1.0, gt=0, le=10)  # scales wait thresholds
    announcement: str = Field("", max_length=500)


def _default_modes() -> dict[str, ModeSettings]:
    return {
        "normal": ModeSettings(),
        "surge": ModeSettings(
            backoffice_agents=True,
            announcement="We are experiencing a high number of calls; thank you for waiting.",
        ),
        "emergency": ModeSettings(
            backoffice_agents=True,
            partner_max_value="standard",
            wait_factor=0.5,
            announcement="Due to exceptional circumstances, waiting times are longer than usual.",
        ),
    }


class OverflowPolicy(_Model):
    """The cluster's overflow policy (the JSON under ``policy/overflow``).

    Rules of a queue: ``sites[site][queue]`` if present, else ``queues[queue]``, else
    ``default``; none means the queue never overflows. A partner without an entry in
    ``partners`` receives nothing.
    """

    version: Literal[1] = 1
    max_peer_age_s: float = Field(3.0, gt=0, le=300)
    default: QueueRules | None = None
    queues: dict[str, QueueRules] = Field(default_factory=dict)
    sites: dict[Name, dict[str, QueueRules]] = Field(default_factory=dict)
    partners: dict[Name, PartnerContract] = Field(default_factory=dict)
    modes: dict[Mode, ModeSettings] = Field(default_factory=_default_modes)

    @field_validator("modes")
    @classmethod
    def _all_modes(cls, v: dict[str, ModeSettings]) -> dict[str, ModeSettings]:
        defaults = _default_modes()
        return {m: v.get(m, defaults[m]) for m in MODES}

    def rules_for(self, site: str, queue: str) -> QueueRules | None:
        per_site = self.sites.get(site, {})
        if queue in per_site:
            return per_site[queue]
        return self.queues.get(queue, self.default)

    def mode_settings(self, mode: str) -> ModeSettings:
        return self.modes.get(mode, self.modes["normal"])  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_defaults=False), sort_keys=True, separators=(",", ":"))


class ContingencyState(_Model):
    """A site's contingency mode (the JSON under ``contingency/<site>``)."""

    mode: Mode = "normal"
    announcement: str | None = Field(None, max_length=500)  # overrides the mode's
    reason: str = Field("", max_length=500)
    set_by: str = Field("", max_length=100)
    set_at: float = 0.0

    def settings(self, policy: OverflowPolicy) -> ModeSettings:
        """The mode's settings under ``policy``, with this state's announcement."""
        s = policy.mode_settings(self.mode)
        if self.announcement is not None:
            s = s.model_copy(update={"announcement": self.announcement})
        return s

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _parse(model: type[_Model], data: object, what: str, source: str) -> Any:
    if isinstance(data, (bytes, bytearray)):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError(f"{source}: invalid {what}: not UTF-8 text") from None
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as e:
            raise PolicyError(f"{source}: invalid {what}: not valid JSON: {e}") from None
    if isinstance(data, model):
        return data
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = [f"{source}: invalid {what}"]
        for err in e.errors():
            lines.append(f"  {_field_path(err['loc']) or '(top level)'}: {err['msg']}")
        raise PolicyError("\n".join(lines)) from None


def parse_policy(data: object, source: str = "policy/overflow") -> OverflowPolicy:
    """Validate a policy given as a model, a mapping, or JSON text/bytes."""
    return _parse(OverflowPolicy, data, "overflow policy", source)


def parse_contingency(data: object, source: str = "contingency") -> ContingencyState:
    """Validate a contingency state given as a model, a mapping, JSON, or a bare mode
    name ("surge")."""
    if isinstance(data, str) and data in MODES:
        data = {"mode": data}
    return _parse(ContingencyState, data, "contingency state", source)


# --- the decision ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    """A peer as the decision saw it: its figures, and why it was left out ("" if not)."""

    site: str
    kind: str
    region: str
    queue: str = ""
    expected_wait_s: float | None = None
    length: int = 0
    staffed: int = 0
    free_agents: int = 0
    age_s: float | None = None
    ratio: float | None = None  # Perry & Whitt's D against this peer
    ratio_on: bool = False
    excluded: str = ""

    @property
    def eligible(self) -> bool:
        return not self.excluded

    def to_dict(self) -> dict[str, Any]:
        """The candidate's fields as a dict — what ``dataclasses.asdict`` gives, without
        its recursive deep copy (every field is an immutable scalar): a decision records
        one per peer, and at 20 sites ``asdict`` cost more than ``decide`` itself."""
        return {name: getattr(self, name) for name in _CANDIDATE_FIELDS}


_CANDIDATE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Candidate))


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a call goes and why. ``target`` None = stay. ``rule``: for an overflow the
    rule(s) that sent it ("split", "wait_threshold+margin", ...); for a stay the rule
    that kept it ("no_rule", "disabled", "wait_threshold", "margin", "queue_ratio",
    "no_candidate", "no_better_peer", "no_load_rule"). ``figures`` holds the numbers
    used (local expected wait, thresholds, split bucket, ...)."""

    call_id: str
    site: str
    queue: str
    target: str | None
    target_queue: str
    rule: str
    reason: str
    mode: str
    figures: dict[str, float | str] = field(default_factory=dict)
    candidates: tuple[Candidate, ...] = ()
    ratio_active: frozenset[str] = frozenset()

    @property
    def overflow(self) -> bool:
        return self.target is not None

    def to_record(self) -> dict[str, Any]:
        """A JSON-able dict for the history store."""
        return {
            "call_id": self.call_id,
            "site": self.site,
            "queue": self.queue,
            "target": self.target or "",
            "target_queue": self.target_queue,
            "rule": self.rule,
            "reason": self.reason,
            "mode": self.mode,
            "figures": dict(self.figures),
            "candidates": [c.to_dict() for c in self.candidates],
        }


def split_bucket(call_id: str, salt: str = "") -> float:
    """A number in [0, 1) fixed by the call id (and salt): the same on every node and
    every retry, uniform over many ids."""
    h = hashlib.blake2b(f"{salt}\x00{call_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def queue_ratio_d(q1: int, n1: int, q2: int, n2: int, r: float) -> float:
    """Perry & Whitt's ``D = q1/n1 - r * q2/n2`` (a site with no staffed slot counts as
    one slot, so a queue nobody serves still pushes work out)."""
    return q1 / max(1, n1) - r * q2 / max(1, n2)


def hysteresis(d: float, was_on: bool, on: float, off: float) -> bool:
    """Switch on when ``d > on``, off when ``d <= off``; otherwise keep the state."""
    if was_on:
        return d > off
    return d > on


def _fmt(x: float) -> str:
    return f"{x:.1f}" if math.isfinite(x) else str(x)


def _eligibility(
    site: str,
    peer: PeerLoad,
    local: LocalQueue,
    rules: QueueRules,
    policy: OverflowPolicy,
    settings: ModeSettings,
    value: str,
    mode: str,
    now: float,
    usage: PartnerUsage,
    members: Collection[str] | None,
    suspect: Collection[str] = (),
) -> tuple[Candidate, QueueLoad | None]:
    snap = peer.snapshot
    base = dict(site=site, kind=snap.kind, region=snap.region, age_s=round(peer.age_s, 3))

    def out(why: str, **kw: Any) -> tuple[Candidate, None]:
        return Candidate(**base, **kw, excluded=why), None

    if snap.site != site:
        return out(f"snapshot names site {snap.site!r}")
    if members is not None and site not in members:
        return out("not a member")
    if site in suspect:
        return out("suspect (a proposal or the connection to it failed just now)")
    if not math.isfinite(peer.age_s) or peer.age_s > policy.max_peer_age_s:
        return out(f"stale load ({_fmt(peer.age_s)} s old > {_fmt(policy.max_peer_age_s)} s)")
    if not snap.accepting:
        return out("not accepting calls (draining)")
    if rules.to is not None and site not in rules.to:
        return out("not an allowed target")
    if site in rules.exclude:
        return out("excluded")
    found = snap.queue_for(local.skill, local.channel, local.language)
    if found is None:
        return out("no queue for this skill, channel and language")
    qname, q = found
    fig = dict(
        queue=qname,
        expected_wait_s=q.expected_wait_s,
        length=q.length,
        staffed=q.staffed,
        free_agents=q.free_agents,
    )
    if q.staffed <= 0:
        return out("no staffed agent", **fig)
    if snap.kind == "inhouse":
        if not rules.inhouse:
            return out("in-house overflow off for this queue", **fig)
    else:
        if not rules.partners:
            return out("partner overflow off for this queue", **fig)
        if not settings.partner_overflow:
            return out(f"partner overflow off in {mode} mode", **fig)
        contract = policy.partners.get(site)
        if contract is None:
            return out("no partner contract", **fig)
        allowed = contract.max_value
        if settings.partner_max_value and VALUE_RANK[settings.partner_max_value] > VALUE_RANK[allowed]:
            allowed = settings.partner_max_value
        # High-value work never goes to a partner, whatever the policy says.
        if value == "high" or VALUE_RANK[value] > VALUE_RANK[allowed]:
            return out(f"{value}-value work stays in-house (partner takes up to {allowed})", **fig)
        if contract.hours is not None and not contract.hours.is_open(now):
            return out("partner closed now", **fig)
        if contract.max_concurrent is not None and usage.concurrent >= contract.max_concurrent:
            return out(f"concurrency cap ({usage.concurrent} >= {contract.max_concurrent})", **fig)
        if contract.max_calls_per_s is not None and usage.calls_last_s >= contract.max_calls_per_s:
            return out(
                f"rate cap ({_fmt(usage.calls_last_s)}/s >= {_fmt(contract.max_calls_per_s)}/s)", **fig
            )
    return Candidate(**base, **fig), q


def decide(
    call_id: str,
    local: LocalQueue,
    policy: OverflowPolicy,
    peers: Mapping[str, PeerLoad],
    *,
    now: float,
    mode: str = "normal",
    partner_usage: Mapping[str, PartnerUsage] | None = None,
    ratio_active: Collection[str] = (),
    members: Collection[str] | None = None,
    suspect: Collection[str] = (),
) -> Decision:
    """Decide whether the call ``call_id`` joining ``local`` stays or overflows.

    ``peers``: load by site (the deciding site itself is ignored if present);
    ``now``: Unix time (partner opening hours); ``mode``: the deciding site's
    contingency mode; ``partner_usage``: counters by partner site (missing = none);
    ``ratio_active``: peers whose queue-ratio overflow was on for this queue after the
    previous decision; ``members``: if given, peers not in it are left out;
    ``suspect``: peers the caller saw fail just now (a proposal that got no answer, a
    connection lost and not re-established) — left out at once, before their member
    key or load can expire (a pure filter: the caller decides who is suspect and for
    how long, see :meth:`router.node.cluster.ClusterLink.suspects`).
    """
    settings = policy.mode_settings(mode)
    rules = policy.rules_for(local.site, local.queue)
    figures: dict[str, float | str] = {
        "local_expected_wait_s": round(local.expected_wait_s, 3),
        "local_length": local.length,
        "local_staffed": local.staffed,
        "target_wait_s": local.target_wait_s,
    }

    def result(target: Candidate | None, rule: str, reason: str, cands=(), active=frozenset()) -> Decision:
        return Decision(
            call_id=call_id,
            site=local.site,
            queue=local.queue,
            target=target.site if target else None,
            target_queue=target.queue if target else "",
            rule=rule,
            reason=reason,
            mode=mode,
            figures=figures,
            candidates=tuple(cands),
            ratio_active=frozenset(active),
        )

    if rules is None:
        return result(None, "no_rule", f"no overflow rule for queue {local.queue}")
    if not rules.enabled:
        return result(None, "disabled", f"overflow disabled for queue {local.queue}")
    value = rules.value or local.value
    figures["value"] = value
    usage = partner_usage or {}
    was_active = set(ratio_active)
    cands: list[Candidate] = []
    active: set[str] = set()
    qr = rules.queue_ratio
    for site in sorted(peers):
        if site == local.site:
            continue
        c, q = _eligibility(
            site, peers[site], local, rules, policy, settings, value, mode, now,
            usage.get(site, PartnerUsage()), members, suspect,
        )
        if q is not None and qr is not None:
            d = queue_ratio_d(local.length, local.staffed, q.length, q.staffed, qr.r)
            on = hysteresis(d, site in was_active, qr.on, qr.off)
            if on:
                active.add(site)
            c = replace(c, ratio=round(d, 4), ratio_on=on)
        cands.append(c)
    eligible = [c for c in cands if c.eligible]

    def best(pool: list[Candidate]) -> Candidate:
        return min(pool, key=lambda c: (c.expected_wait_s, c.kind != "inhouse", c.site))

    split_note = ""
    if rules.split is not None:
        sp = rules.split
        bucket = split_bucket(call_id, sp.salt)
        figures["split_bucket"] = round(bucket, 6)
        figures["split_percent"] = sp.percent
        if bucket * 100.0 < sp.percent:
            pool = [c for c in eligible if c.site in sp.to]
            if pool:
                t = best(pool)
                return result(t, "split", f"{_fmt(sp.percent)} % split of {local.queue} to {t.site}", cands, active)
            split_note = "; split target unavailable"

    names = rules.load_rules()
    if not names:
        rule = "split" if rules.split is not None else "no_load_rule"
        return result(None, rule, f"no load rule for {local.queue}{split_note}", cands, active)
    ew = local.expected_wait_s
    if rules.wait_threshold is not None:
        thr = rules.wait_threshold.factor * settings.wait_factor * local.target_wait_s
        figures["wait_threshold_s"] = round(thr, 3)
        if not ew > thr:
            return result(
                None, "wait_threshold",
                f"expected wait {_fmt(ew)} s within threshold {_fmt(thr)} s{split_note}", cands, active,
            )
    if not eligible:
        return result(None, "no_candidate", f"no eligible peer{split_note}", cands, active)
    pool = [c for c in eligible if c.expected_wait_s < ew]
    if not pool:
        return result(
            None, "no_better_peer",
            f"no peer with an expected wait below {_fmt(ew)} s{split_note}", cands, active,
        )
    if rules.margin is not None:
        m = rules.margin
        bar = ew * (1.0 - m.ratio) - m.seconds
        figures["margin_bar_s"] = round(bar, 3)
        pool = [c for c in pool if c.expected_wait_s <= bar]
        if not pool:
            return result(
                None, "margin",
                f"no peer better by the margin (expected wait <= {_fmt(bar)} s){split_note}", cands, active,
            )
    if qr is not None:
        figures["ratio_on"] = qr.on
        figures["ratio_off"] = qr.off
        figures["ratio_r"] = qr.r
        pool = [c for c in pool if c.ratio_on]
        if not pool:
            return result(None, "queue_ratio", f"queue ratio below its threshold{split_note}", cands, active)
    t = best(pool)
    return result(
        t, "+".join(names),
        f"expected wait {_fmt(ew)} s here, {_fmt(t.expected_wait_s or 0.0)} s at {t.site}",
        cands, active,
    )


# --- the node's inputs to decide, built from engine views (shared with router.whatif) ----

#: Call states a load snapshot counts as active (``LoadSnapshot.active_calls``).
ACTIVE_STATES = ("queued", "assigned", "connected", "transferring")


def site_load(
    site: str,
    region: str,
    kind: str,
    queues: Collection[Any],
    queue_cfgs: Mapping[str, Any],
    counts: Mapping[str, int],
    *,
    accepting: bool = True,
    mode: str = "normal",
) -> LoadSnapshot:
    """A site's :class:`LoadSnapshot` (``seq``/``ts`` left to the publisher) from its
    engine's queue views (``router.model.QueueView``), its queue configurations by name
    (``router.config.QueueConfig``: value, service-level threshold; a queue without one
    counts as standard value with a 20 s target) and its calls per state. The site's
    service level is the queues' recent service levels weighted by their finished calls.
    Used by the live node (``router.node.cluster``) and the replay simulator alike."""
    loads: dict[str, QueueLoad] = {}
    free: dict[str, int] = {}
    sl_num = sl_den = 0.0
    for q in queues:
        cfg = queue_cfgs.get(q.name)
        target = cfg.service_level.threshold_s if cfg is not None else 20.0
        loads[q.name] = QueueLoad(
            skill=q.skill, channel=q.channel, language=q.language,
            value=cfg.value if cfg is not None else "standard",
            length=q.length, expected_wait_s=q.expected_wait_s, staffed=q.agents_staffed,
            free_agents=q.agents_ready, target_wait_s=target, service_level=q.service_level,
        )  # fmt: skip
        free[q.skill] = max(free.get(q.skill, 0), q.agents_ready)
        if q.service_level >= 0:
            w = max(1, q.answered + q.abandoned)
            sl_num += q.service_level * w
            sl_den += w
    return LoadSnapshot(
        site=site, region=region, kind=kind, accepting=accepting, mode=mode,
        active_calls=sum(counts.get(s, 0) for s in ACTIVE_STATES),
        service_level=round(sl_num / sl_den, 4) if sl_den else -1.0,
        free_agents=free, queues=loads,
    )  # fmt: skip


def local_queue(site: str, region: str, view: Any, cfg: Any, expected_wait_s: float) -> LocalQueue:
    """The :class:`LocalQueue` of a call waiting in the queue ``view`` (a
    ``router.model.QueueView`` that counts the call itself) configured as ``cfg`` (a
    ``QueueConfig`` or None: standard value, 20 s target); ``expected_wait_s`` is the
    call's own expected wait."""
    return LocalQueue(
        site=site, region=region, queue=view.name, skill=view.skill, channel=view.channel,
        language=view.language, value=cfg.value if cfg is not None else "standard",
        length=max(0, view.length - 1), expected_wait_s=expected_wait_s, staffed=view.agents_staffed,
        target_wait_s=cfg.service_level.threshold_s if cfg is not None else 20.0,
    )  # fmt: skip


def charge_transfers(loads: Mapping[str, PeerLoad], pending: Collection[tuple[str, str]]) -> dict[str, PeerLoad]:
    """The peers' loads, each charged with the transfers sent to it that its published
    load cannot show yet (``pending``: one ``(site, queue)`` per transfer): they take
    the queue's free agents first, then lengthen its queue (and its expected wait by the
    queue's current wait per call, or its target over its staffed agents). Peers or
    queues not in ``loads`` are ignored; ``loads`` itself is not changed."""
    out = dict(loads)
    if not pending:
        return out
    extra: dict[tuple[str, str], int] = {}
    for key in pending:
        if key[0] in out:
            extra[key] = extra.get(key, 0) + 1
    for (site, qname), k in extra.items():
        peer = out[site]
        q = peer.snapshot.queues.get(qname)
        if q is None:
            continue
        free = min(q.free_agents, k)
        excess = k - free
        per_call = q.expected_wait_s / (q.length + 1) if q.expected_wait_s > 0 else q.target_wait_s / max(1, q.staffed)
        q2 = q.model_copy(update={
            "free_agents": q.free_agents - free,
            "length": q.length + excess,
            "expected_wait_s": q.expected_wait_s + excess * per_call,
        })  # fmt: skip
        snap = peer.snapshot.model_copy(update={"queues": {**peer.snapshot.queues, qname: q2}})
        out[site] = PeerLoad(snap, peer.age_s)
    return out


def policy_changes(old: OverflowPolicy, new: OverflowPolicy) -> list[str]:
    """What replacing ``old`` by ``new`` changes, one line per changed leaf
    (``path: old -> new``, ``path: added …``, ``path: removed``), sorted by path. Empty
    when the two are the same policy (defaults included)."""
    a = json.loads(old.to_json())
    b = json.loads(new.to_json())
    out: list[str] = []

    def walk(path: str, x: Any, y: Any) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                p = f"{path}.{k}" if path else str(k)
                if k not in y:
                    out.append(f"{p}: removed")
                elif k not in x:
                    out.append(f"{p}: added {json.dumps(y[k], sort_keys=True)}")
                else:
                    walk(p, x[k], y[k])
        elif x != y:
            out.append(f"{path}: {json.dumps(x, sort_keys=True)} -> {json.dumps(y, sort_keys=True)}")

    walk("", a, b)
    return out
