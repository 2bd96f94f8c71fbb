"""Site configuration: the validated model of ``sites/*.yaml``.

A site file describes one site node: who it is (name, region, in-house or partner), how it
routes (priority head starts, agent selection, offer timeout), its queues with their
service targets, its caller lists and its agents. ``load_site`` refuses a bad file with a
:class:`ConfigError` whose message names the file and the offending field.
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
AgentId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]
Language = Annotated[str, StringConstraints(pattern=r"^[a-z]{2}$")]


class ConfigError(ValueError):
    """A site file that cannot be used; the message names the file and field."""


class Channel(str, Enum):
    VOICE = "voice"
    CHAT = "chat"
    EMAIL = "email"
    SOCIAL = "social"


class PriorityClass(str, Enum):
    STANDARD = "standard"
    REPEAT = "repeat"
    WHITELIST = "whitelist"
    VIP = "vip"
    BLACKLIST = "blacklist"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServiceLevelDefinition(_Model):
    """How service level is computed for a queue.

    ``abandons``: ``count_against`` — SL = answered within T / (answered + abandoned);
    ``exclude`` — SL = answered within T / answered;
    ``short_excluded`` — abandons within T are left out, later abandons count against:
    SL = answered within T / (answered + abandoned after T).
    """

    threshold_s: float = Field(20.0, gt=0, le=86400)
    target: float = Field(0.8, gt=0, le=1)
    abandons: Literal["count_against", "exclude", "short_excluded"] = "short_excluded"


class QueueConfig(_Model):
    """A queue serves one skill on one channel, optionally for one language.

    A call for (skill, channel, language) goes to the queue with that exact language, or
    else to the queue of that skill and channel with no language.
    """

    name: Name
    skill: Name
    channel: Channel = Channel.VOICE
    language: Language | None = None
    service_level: ServiceLevelDefinition = ServiceLevelDefinition()
    wrap_up_s: float = Field(10.0, ge=0, le=3600)
    max_length: int = Field(10_000, ge=1, le=1_000_000)
    # First estimate of the average handle time (talk + wrap-up), before any call ended.
    aht_s: float = Field(180.0, gt=0, le=86400)
    # Value of the work for overflow eligibility (issue 3): low-value work may go to partners.
    value: Literal["low", "standard", "high"] = "standard"


class AgentGroup(_Model):
    """One agent (``id``) or ``count`` agents named ``{id}-{n:03d}`` sharing a profile.

    ``backoffice: true`` marks back-office overflow agents: they take calls of their
    skills on the voice and chat channels only while the site's contingency mode turns
    back-office agents on (``backoffice_agents`` of the mode's settings in the overflow
    policy: by default surge and emergency). Otherwise they are not eligible for any
    voice or chat queue; their other channels (email, social) are never affected.
    """

    id: AgentId
    count: int | None = Field(None, ge=1, le=10_000)
    skills: dict[Name, int] = Field(min_length=1)
    languages: list[Language] = Field(default_factory=list)
    capacity: dict[Channel, int] = Field(default_factory=lambda: {Channel.VOICE: 1})
    backoffice: bool = False

    @field_validator("skills")
    @classmethod
    def _proficiency(cls, v: dict[str, int]) -> dict[str, int]:
        for skill, level in v.items():
            if not 1 <= level <= 10:
                raise ValueError(f"proficiency of {skill!r} must be 1..10, got {level}")
        return v

    @field_validator("capacity")
    @classmethod
    def _capacity(cls, v: dict[Channel, int]) -> dict[Channel, int]:
        for ch, n in v.items():
            if not 0 <= n <= 50:
                raise ValueError(f"capacity for {ch.value} must be 0..50, got {n}")
        if not any(v.values()):
            raise ValueError("an agent needs capacity on at least one channel")
        return v

    def agent_ids(self) -> list[str]:
        if self.count is None:
            return [self.id]
        return [f"{self.id}-{n:03d}" for n in range(1, self.count + 1)]


class CallerLists(_Model):
    """Caller numbers (or customer ids) per class; blacklist entries are refused."""

    vip: list[str] = Field(default_factory=list)
    whitelist: list[str] = Field(default_factory=list)
    blacklist: list[str] = Field(default_factory=list)


class RoutingConfig(_Model):
    # Head start in seconds per class: effective priority = head start + time waited.
    head_start_s: dict[PriorityClass, float] = Field(
        default_factory=lambda: {
            PriorityClass.STANDARD: 0.0,
            PriorityClass.REPEAT: 30.0,
            PriorityClass.WHITELIST: 60.0,
            PriorityClass.VIP: 120.0,
        }
    )
    agent_selection: Literal["longest_idle", "most_proficient"] = "longest_idle"
    offer_timeout_s: float = Field(10.0, gt=0, le=300)
    repeat_window_h: float = Field(24.0, ge=0, le=24 * 30)
    blacklist_action: Literal["reject", "restricted_queue"] = "reject"
    restricted_queue: Name | None = None
    screen_pop_history: int = Field(5, ge=0, le=50)
    # Recent-window length for the service level published by the node.
    service_level_window_s: float = Field(1800.0, gt=0, le=86400)
    # Ended calls kept in memory (GetCall, idempotent re-offers); oldest dropped first.
    ended_call_retention: int = Field(200_000, ge=100, le=10_000_000)

    @field_validator("head_start_s")
    @classmethod
    def _head_starts(cls, v: dict[PriorityClass, float]) -> dict[PriorityClass, float]:
        if PriorityClass.BLACKLIST in v:
            raise ValueError("blacklist has no head start (it is rejected or restricted)")
        for cls_, s in v.items():
            if not 0 <= s <= 86400:
                raise ValueError(f"head start of {cls_.value} must be 0..86400 s, got {s}")
        return v


class SiteInfo(_Model):
    name: Name
    region: Name
    kind: Literal["inhouse", "partner"] = "inhouse"
    listen: str = "127.0.0.1:0"
    description: str = ""

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if not re.fullmatch(r"[^\s:]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5}", v):
            raise ValueError(f"listen must be host:port, got {v!r}")
        return v


class SiteConfig(_Model):
    site: SiteInfo
    routing: RoutingConfig = RoutingConfig()
    queues: list[QueueConfig] = Field(min_length=1)
    lists: CallerLists = CallerLists()
    agents: list[AgentGroup] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> "SiteConfig":
        names = [q.name for q in self.queues]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"queues: duplicate queue name(s) {sorted(dup)}")
        keys = [(q.skill, q.channel, q.language) for q in self.queues]
        if len(set(keys)) != len(keys):
            raise ValueError("queues: two queues serve the same skill, channel and language")
        r = self.routing
        if r.blacklist_action == "restricted_queue" and r.restricted_queue not in names:
            raise ValueError(
                "routing.restricted_queue: must name a configured queue when "
                "blacklist_action is restricted_queue"
            )
        skills = {q.skill for q in self.queues}
        ids: set[str] = set()
        for i, g in enumerate(self.agents):
            unknown = set(g.skills) - skills
            if unknown:
                raise ValueError(f"agents[{i}].skills: no queue serves {sorted(unknown)}")
            for aid in g.agent_ids():
                if aid in ids:
                    raise ValueError(f"agents[{i}]: duplicate agent id {aid!r}")
                ids.add(aid)
        return self

    def agent_profiles(self) -> dict[str, AgentGroup]:
        """agent id -> its profile, with groups expanded."""
        return {aid: g for g in self.agents for aid in g.agent_ids()}

    def queue_for(self, skill: str, channel: Channel, language: str | None) -> QueueConfig | None:
        """The queue serving this call: exact language first, else the language-less one."""
        fallback = None
        for q in self.queues:
            if q.skill == skill and q.channel == channel:
                if q.language == (language or None):
                    return q
                if q.language is None:
                    fallback = q
        return fallback


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_site(data: object, source: str = "<config>") -> SiteConfig:
    """Validate a parsed YAML/JSON document; ConfigError names the source and field."""
    try:
        return SiteConfig.model_validate(data)
    except ValidationError as e:
        lines = [f"{source}: invalid site configuration"]
        for err in e.errors():
            where = _field_path(err["loc"]) or "(top level)"
            lines.append(f"  {where}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def load_site(path: str | Path) -> SiteConfig:
    """Read and validate one site file."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    return parse_site(data, str(p))


def load_sites(directory: str | Path) -> list[SiteConfig]:
    """Every ``*.yaml`` in a directory, sorted by file name; site names must be unique."""
    sites = [load_site(p) for p in sorted(Path(directory).glob("*.yaml"))]
    names = [s.site.name for s in sites]
    if len(set(names)) != len(names):
        raise ConfigError(f"{directory}: duplicate site names {names}")
    return sites
