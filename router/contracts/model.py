"""The contract of one BPO partner: what it takes, when, how much, at what price, and
which data about a caller it may see.

A contract is stored as canonical JSON in etcd (:func:`contract_json`; the key is
``router.coord.keys`` ``partner_contract``); operators write it in YAML
(``sites/partners/*.yaml``).
:func:`parse_contract` reads either and refuses a bad one with a :class:`ContractError`
whose message names the source and every offending field.

Pure: no I/O, no clock — the time (``now``, Unix seconds) is an argument.
"""

from __future__ import annotations

import json
import math
import re
from datetime import date, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from router.config import Name  # site, queue and skill names: one definition

Tier = Literal["low", "standard"]


class ContractError(ValueError):
    """A partner contract that cannot be used; the message names the source and every
    offending field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Hours(_Model):
    """Opening hours in the partner's own time zone; ``close < open`` spans midnight.

    Same semantics as ``router.overflow.PartnerHours`` (kept identical on purpose: the
    overflow decision and the partner gateway must agree on when a partner is open),
    plus ``holidays``: local dates on which the partner is closed. A shift belongs to the
    day it starts on — the early morning of an overnight shift belongs to the previous
    day's shift — so a holiday closes the shift that *starts* on it, and the morning
    after a holiday's eve shift is still open.
    """

    tz: str
    open: str = "00:00"
    close: str = "24:00"
    days: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4, 5, 6])  # 0 = Monday
    holidays: list[date] = Field(default_factory=list)

    @field_validator("tz")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}") from None
        return v

    @field_validator("open", "close", mode="before")
    @classmethod
    def _hhmm(cls, v: object) -> str:
        m = re.fullmatch(r"(\d{2}):(\d{2})", v) if isinstance(v, str) else None
        if not m or int(m[1]) > 24 or int(m[2]) > 59 or (int(m[1]) == 24 and int(m[2])):
            raise ValueError(f"must be HH:MM (00:00..24:00), got {v!r}")
        return v

    @field_validator("days")
    @classmethod
    def _days(cls, v: list[int]) -> list[int]:
        if not v or any(not 0 <= d <= 6 for d in v):
            raise ValueError("days must be a non-empty list of 0 (Monday) .. 6 (Sunday)")
        return v

    def shift_day(self, now: float) -> date | None:
        """The local date the opening window containing ``now`` starts on, or None when
        ``now`` is outside the daily window (days and holidays not applied)."""
        local = datetime.fromtimestamp(now, ZoneInfo(self.tz))
        minute = local.hour * 60 + local.minute
        o, c = _minutes(self.open), _minutes(self.close)
        if o <= c:
            return local.date() if o <= minute < c else None
        # Overnight: the evening belongs to today, the early morning to yesterday's shift.
        if minute >= o:
            return local.date()
        return local.date() - timedelta(days=1) if minute < c else None

    def closed_reason(self, now: float) -> str | None:
        """None when open at Unix time ``now``; else "holiday" (the shift it would be in
        starts on a holiday) or "closed now"."""
        day = self.shift_day(now)
        if day is None or day.weekday() not in self.days:
            return "closed now"
        return "holiday" if day in self.holidays else None

    def is_open(self, now: float) -> bool:
        """Whether the partner takes calls at Unix time ``now``."""
        return self.closed_reason(now) is None


def _minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


class Caps(_Model):
    """Limits shared by every node (counted in etcd); None = no cap. ``concurrent`` is
    calls the partner owns at once, the others are offers per second / hour / local day
    (buckets of :func:`rate_buckets`)."""

    concurrent: int | None = Field(None, ge=1)
    per_second: int | None = Field(None, ge=1)
    per_hour: int | None = Field(None, ge=1)
    per_day: int | None = Field(None, ge=1)


class Price(_Model):
    """What the partner charges: per contact it takes and per minute it handles."""

    currency: str = Field("USD", pattern=r"^[A-Z]{3}$")
    per_contact: float = Field(0.0, ge=0, allow_inf_nan=False)
    per_handled_minute: float = Field(0.0, ge=0, allow_inf_nan=False)


class Sla(_Model):
    """The partner's service level: ``target`` of its calls answered within
    ``threshold_s`` of being assigned to it; ``credit_per_point`` is money credited per
    percentage point the achieved level falls below the target over a statement period
    (see :func:`sla_credit`)."""

    threshold_s: float = Field(gt=0, le=86400, allow_inf_nan=False)
    target: float = Field(gt=0, le=1, allow_inf_nan=False)
    credit_per_point: float = Field(0.0, ge=0, allow_inf_nan=False)


class Scopes(_Model):
    """Which data about a call reaches the partner (``router.contracts.scope`` applies
    it). Everything defaults to the least: no caller identity, no profile, no
    transcript, no IVR path, recording paused."""

    caller: Literal["none", "token", "last_digits", "full"] = "none"
    profile: Literal["none", "basic", "full"] = "none"
    transcript: bool = False
    ivr_path: bool = False
    recording: Literal["allowed", "paused"] = "paused"


class PartnerContract(_Model):
    """The contract of one partner. Empty ``skills`` / ``queues`` mean every skill / any
    origin queue; no ``hours`` means always open. High-value work never goes to a
    partner: ``value_tiers`` refuses "high"."""

    partner: Name
    version: Literal[1] = 1
    skills: list[Name] = Field(default_factory=list)
    queues: list[Name] = Field(default_factory=list)  # origin queue names
    hours: Hours | None = None
    caps: Caps = Caps()
    value_tiers: list[Tier] = Field(default_factory=lambda: ["low"], min_length=1)
    offer_timeout_s: float = Field(10.0, ge=0.5, le=120, allow_inf_nan=False)
    price: Price = Price()
    sla: Sla | None = None
    scopes: Scopes = Scopes()

    @field_validator("value_tiers", mode="before")
    @classmethod
    def _no_high(cls, v: object) -> object:
        if isinstance(v, list) and "high" in v:
            raise ValueError("high-value work never goes to a partner")
        return v

    @property
    def max_value(self) -> Tier:
        """The highest tier the partner takes ("standard" if listed, else "low")."""
        return "standard" if "standard" in self.value_tiers else "low"

    @property
    def tz(self) -> str:
        """The partner's time zone: that of its hours, UTC when it has none."""
        return self.hours.tz if self.hours else "UTC"

    def allows(self, skill: str, queue: str, value: str, now: float) -> str | None:
        """None when an offer of ``skill`` from origin ``queue`` with value tier
        ``value`` may go to the partner at Unix time ``now``; else the reason of the
        first failing check, in this order: "skill S not in contract", "queue Q not in
        contract", "value V not in contract", "holiday", "closed now". Caps are not
        checked here (they are counters shared in etcd)."""
        if self.skills and skill not in self.skills:
            return f"skill {skill} not in contract"
        if self.queues and queue not in self.queues:
            return f"queue {queue} not in contract"
        if value not in self.value_tiers:
            return f"value {value} not in contract"
        return self.hours.closed_reason(now) if self.hours else None


def rate_buckets(now: float, tz: str) -> dict[str, str]:
    """The rate-cap buckets Unix time ``now`` falls in: ``s`` (the second), ``h`` (the
    UTC hour since the epoch) and ``d`` (the local date in ``tz``, the contract's time
    zone — a partner's day cap resets at its own midnight)."""
    day = datetime.fromtimestamp(now, ZoneInfo(tz)).date()
    return {"s": str(int(now)), "h": str(int(now) // 3600), "d": day.isoformat()}


def sla_credit(sla: Sla, handled: int, within: int) -> tuple[float, float]:
    """(achieved service level, credit owed by the partner) over a statement period.

    ``handled`` is the calls assigned to the partner in the period, ``within`` those of
    them answered within ``sla.threshold_s`` of assignment. The achieved level is
    ``within / handled`` (NaN with no call, and then no credit); the credit is
    ``credit_per_point`` × the percentage points it falls below ``target``, 0 when at
    or above it. Raises ValueError unless ``0 <= within <= handled``.
    """
    if handled < 0 or not 0 <= within <= handled:
        raise ValueError(f"need 0 <= within <= handled, got within={within}, handled={handled}")
    if handled == 0:
        return math.nan, 0.0
    achieved = within / handled
    # Rounded so that 0.80 - 0.75 is 5 points, not 5.000000000000004.
    points = max(0.0, round((sla.target - achieved) * 100, 9))
    return achieved, points * sla.credit_per_point


# --- reading and writing -------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1 base-60 numbers, so ``close: 18:30`` is the text
    "18:30" and not the integer 1110."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: dict) -> str:
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


def parse_contract(raw: bytes | str, *, partner: str | None = None, source: str = "contract") -> PartnerContract:
    """Validate a contract given as JSON or YAML text (or its UTF-8 bytes).

    ``partner``, when given, is the name the contract is stored under (the name in its
    etcd key, or the file's): the contract's own ``partner`` must equal it. Raises :class:`ContractError` naming ``source`` and every offending
    field, one per line: ``"<source>: invalid partner contract"`` then
    ``"  caps.concurrent: Input should be greater than or equal to 1"``.
    """
    what = "invalid partner contract"
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise ContractError(f"{source}: {what}: not UTF-8 text") from None
    # JSON first: what etcd holds is JSON, and YAML 1.1 reads a few JSON numbers ("1e3")
    # as text.
    try:
        data: Any = json.loads(raw)
    except json.JSONDecodeError:
        try:
            data = yaml.load(raw, Loader=_Loader)  # a SafeLoader: no arbitrary objects
        except yaml.YAMLError as e:
            raise ContractError(f"{source}: {what}: not valid JSON or YAML: {e}") from None
    if not isinstance(data, dict):
        raise ContractError(f"{source}: {what}: must be a mapping of fields, got {type(data).__name__}")
    lines: list[str] = []
    contract: PartnerContract | None = None
    try:
        contract = PartnerContract.model_validate(data)
    except ValidationError as e:
        lines = [f"  {_field_path(err['loc']) or '(top level)'}: {_message(err)}" for err in e.errors()]
    named = data.get("partner")
    if partner is not None and isinstance(named, str) and named != partner:
        lines.append(f"  partner: {named!r} does not match the partner it is stored for, {partner!r}")
    if lines:
        raise ContractError("\n".join([f"{source}: {what}", *lines]))
    assert contract is not None
    return contract


def contract_json(c: PartnerContract) -> str:
    """Canonical JSON of a contract (sorted keys, no spaces): what is stored in etcd, and
    equal text for equal contracts."""
    return json.dumps(c.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
