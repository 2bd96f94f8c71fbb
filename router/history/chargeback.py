"""Chargeback: who pays for which contacts, from the history and a rates file.

* **Per region**: each regional business pays for its own customers' contacts — the
  interactions whose ``origin_region`` (where the call first arrived, wherever it was
  handled) is that region, with an outcome in ``billable_outcomes`` (default: completed),
  at the region's rate per channel (per contact, plus optionally per handled minute).
* **Per partner**: a partner bills the overflow it handled (completed interactions whose
  handling site is that partner) at its contracted rate per channel; each line also says
  which region sent the overflow, so it can be recharged.

A contact belongs to the period in which it was offered (``offered_at``, UTC). Rates come
from a YAML file validated with pydantic (example: ``router/history/rates_example.yaml``).
Regions or partners with contacts but no rate are reported with ``rate: null`` and
amount 0 (listed in ``unrated``) rather than silently dropped.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from router.config import Channel
from router.history.store import HistoryStore

Outcome = Literal["completed", "abandoned", "rejected"]


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Rate(_M):
    per_contact: dict[Channel, float] = Field(default_factory=dict)
    per_minute: dict[Channel, float] = Field(default_factory=dict)

    def amount(self, channel: str, contacts: int, minutes: float) -> float | None:
        ch = Channel(channel) if channel in Channel._value2member_map_ else None
        if ch is None or (ch not in self.per_contact and ch not in self.per_minute):
            return None
        return contacts * self.per_contact.get(ch, 0.0) + minutes * self.per_minute.get(ch, 0.0)


class Rates(_M):
    currency: str = Field("EUR", pattern=r"^[A-Z]{3}$")
    billable_outcomes: list[Outcome] = Field(default_factory=lambda: ["completed"], min_length=1)
    regions: dict[str, Rate] = Field(default_factory=dict)
    partners: dict[str, Rate] = Field(default_factory=dict)

    def model_post_init(self, _ctx: object) -> None:
        for kind, table in (("regions", self.regions), ("partners", self.partners)):
            for name, rate in table.items():
                for ch, v in {**rate.per_contact, **rate.per_minute}.items():
                    if not 0 <= v <= 1e6:
                        raise ValueError(f"{kind}.{name}: rate for {ch.value} must be 0..1e6, got {v}")


class RatesError(ValueError):
    pass


def load_rates(path: str | Path) -> Rates:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise RatesError(f"{p}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise RatesError(f"{p}: not valid YAML: {e}") from None
    try:
        return Rates.model_validate(data or {})
    except ValidationError as e:
        lines = [f"{p}: invalid rates"]
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"]) or "(top level)"
            lines.append(f"  {where}: {err['msg']}")
        raise RatesError("\n".join(lines)) from None


def example_rates_path() -> Path:
    return Path(__file__).with_name("rates_example.yaml")


_PERIOD = re.compile(r"^(\d{4})-(\d{2})$")


def period_bounds(period: str) -> tuple[int, int]:
    """'2026-11' -> [start, end) in Unix seconds (UTC)."""
    m = _PERIOD.match(period)
    if not m or not 1 <= int(m.group(2)) <= 12:
        raise ValueError(f"period must be YYYY-MM, got {period!r}")
    y, mo = int(m.group(1)), int(m.group(2))
    start = calendar.timegm((y, mo, 1, 0, 0, 0))
    y2, mo2 = (y + 1, 1) if mo == 12 else (y, mo + 1)
    return start, calendar.timegm((y2, mo2, 1, 0, 0, 0))


@dataclass
class Line:
    kind: str  # "region" | "partner"
    name: str  # region or partner name
    channel: str
    origin_region: str  # partner lines: the region that sent the overflow; region lines: = name
    contacts: int
    minutes: float  # handle time (talk + wrap-up)
    rate_per_contact: float | None
    rate_per_minute: float | None
    amount: float
    currency: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Chargeback:
    start: int
    end: int
    currency: str
    lines: list[Line]
    unrated: list[str]

    def totals(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {"region": {}, "partner": {}}
        for ln in self.lines:
            out[ln.kind][ln.name] = round(out[ln.kind].get(ln.name, 0.0) + ln.amount, 6)
        return out

    def to_dict(self) -> dict:
        return {
            "from": _iso(self.start), "to": _iso(self.end), "currency": self.currency,
            "lines": [ln.to_dict() for ln in self.lines], "totals": self.totals(),
            "unrated": self.unrated,
        }


def _iso(t: int) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


REGION_SQL = """
SELECT origin_region, channel, count() AS n, sum(handle_s) AS s
FROM (
    SELECT origin_region, channel, outcome, handle_s
    FROM {db}.interactions FINAL
    WHERE offered_at >= toDateTime({start}, 'UTC') AND offered_at < toDateTime({end}, 'UTC')
)
WHERE has({outcomes}, outcome)
GROUP BY origin_region, channel
ORDER BY origin_region, channel
"""

PARTNER_SQL = """
SELECT partner, origin_region, channel, count() AS n, sum(handle_s) AS s
FROM (
    SELECT partner, origin_region, channel, outcome, handle_s
    FROM {db}.interactions FINAL
    WHERE offered_at >= toDateTime({start}, 'UTC') AND offered_at < toDateTime({end}, 'UTC')
)
WHERE partner != '' AND outcome = 'completed'
GROUP BY partner, origin_region, channel
ORDER BY partner, origin_region, channel
"""


def chargeback(store: HistoryStore, rates: Rates, start: int, end: int) -> Chargeback:
    params = {"start": int(start), "end": int(end), "outcomes": list(rates.billable_outcomes)}
    lines: list[Line] = []
    unrated: set[str] = set()

    def line(kind: str, name: str, origin: str, channel: str, n: int, secs: float,
             table: Mapping[str, Rate]) -> Line:
        minutes = float(secs) / 60.0
        rate = table.get(name)
        amount = rate.amount(channel, int(n), minutes) if rate else None
        if amount is None:
            unrated.add(f"{kind}:{name or '(none)'}:{channel}")
        pc = rate.per_contact.get(Channel(channel)) if rate and channel in Channel._value2member_map_ else None
        pm = rate.per_minute.get(Channel(channel)) if rate and channel in Channel._value2member_map_ else None
        return Line(kind, name, channel, origin, int(n), round(minutes, 6), pc, pm,
                    round(amount or 0.0, 6), rates.currency)

    for region, channel, n, secs in store.query(REGION_SQL, params):
        lines.append(line("region", region, region, channel, n, secs, rates.regions))
    for partner, origin, channel, n, secs in store.query(PARTNER_SQL, params):
        lines.append(line("partner", partner, origin, channel, n, secs, rates.partners))
    return Chargeback(int(start), int(end), rates.currency, lines, sorted(unrated))
