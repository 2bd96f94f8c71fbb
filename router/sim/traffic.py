"""Traffic profiles: what ``tandem demo --traffic FILE`` plays, without writing code.

A profile (YAML, validated with pydantic; example: ``router/sim/traffic_example.yaml``)
names, per site of the cluster, the Poisson streams of calls offered there and who
calls::

    version: 1
    time_scale: 60            # optional: simulated seconds per real second (demo default 60)
    sites:
      lyon:
        callers: {size: 2000, vip_p: 0.02, whitelist_p: 0.01, blacklist_p: 0.005}
        head_start_s: {repeat: 30, vip: 120}     # optional, over the site file's
        streams:
          - queue: billing-fr-voice             # or skill / channel / language
            rate_per_h: 120                     # or erlangs: 8.5 (with the queue's wrap-up)
            handle: {dist: lognormal, mean_s: 240, cv: 0.7}   # exponential | fixed
            patience: {dist: exponential, mean_s: 180}        # fixed | none

Every time is in **simulated** seconds (the demo divides them by its time scale, as it
does the site files). ``handle`` is the talk time the simulated agents hold each call
(the site's wrap-up comes on top); ``patience`` how long a caller waits before hanging
up (``none``: waits for ever). ``erlangs`` turns into a rate with the stream's mean
handle time plus its queue's ``wrap_up_s``. ``callers``: the site's caller pool —
``size`` ordinary numbers drawn uniformly (so some call again: repeat callers; default
1.2 times the calls expected in the run) and the shares of calls from the site's VIP,
whitelisted and blacklisted numbers (the priority mix). ``head_start_s`` replaces those
classes' head starts in the site's routing (for every run of the demo).

Sites of the cluster the profile does not name get no traffic. :func:`load_profile`
reads and validates a file; :meth:`TrafficProfile.call_streams` checks it against the
site files (every site, queue and skill must exist) and gives the generator's streams.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from router.config import Channel, PriorityClass, SiteConfig, parse_site
from router.sim.loadgen import CallerPool, CallStream


class ProfileError(ValueError):
    """A traffic profile that cannot be used; the message says where and why."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
_Share = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class Exponential(_Model):
    dist: Literal["exponential"]
    mean_s: _Seconds


class Lognormal(_Model):
    dist: Literal["lognormal"]
    mean_s: _Seconds
    cv: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] = 0.8  # std dev / mean


class Fixed(_Model):
    dist: Literal["fixed"]
    mean_s: _Seconds  # every call: exactly this


class Forever(_Model):
    dist: Literal["none"]  # the caller never hangs up


HandleTime = Annotated[Union[Exponential, Lognormal, Fixed], Field(discriminator="dist")]
Patience = Annotated[Union[Exponential, Fixed, Forever], Field(discriminator="dist")]


class StreamSpec(_Model):
    """One Poisson stream of calls at a site."""

    queue: str | None = None  # a queue of the site: its skill, channel and language
    skill: str | None = None
    channel: Channel | None = None
    language: str | None = None
    rate_per_h: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    erlangs: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    handle: HandleTime
    patience: Patience = Forever(dist="none")

    @model_validator(mode="after")
    def _one_of_each(self) -> "StreamSpec":
        if (self.rate_per_h is None) == (self.erlangs is None):
            raise ValueError("give exactly one of rate_per_h and erlangs")
        if self.queue is None and self.skill is None:
            raise ValueError("give a queue, or a skill (with channel and language)")
        if self.queue is not None and (self.skill, self.channel, self.language) != (None, None, None):
            raise ValueError("give a queue or skill/channel/language, not both")
        return self


class CallersSpec(_Model):
    """The site's caller pool (see :class:`router.sim.loadgen.CallerPool`)."""

    size: Annotated[int, Field(ge=1)] | None = None  # default: 1.2 x the calls expected
    prefix: Annotated[str, Field(pattern=r"^\+?[0-9]{1,8}$")] | None = None
    vip_p: _Share = 0.02
    whitelist_p: _Share = 0.01
    blacklist_p: _Share = 0.005

    @model_validator(mode="after")
    def _shares(self) -> "CallersSpec":
        if self.vip_p + self.whitelist_p + self.blacklist_p > 1:
            raise ValueError("vip_p + whitelist_p + blacklist_p must be <= 1")
        return self


class SiteTraffic(_Model):
    callers: CallersSpec = CallersSpec()
    head_start_s: dict[PriorityClass, Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = None
    streams: list[StreamSpec] = []


class TrafficProfile(_Model):
    version: Literal[1] = 1
    description: str = ""
    time_scale: Annotated[float, Field(gt=0, le=100_000, allow_inf_nan=False)] | None = None
    sites: dict[str, SiteTraffic]

    # --- against the site files -------------------------------------------------------

    def check(self, sites: list[SiteConfig]) -> None:
        """ProfileError unless every site, queue and skill named exists."""
        self.call_streams(sites)

    def call_streams(self, sites: list[SiteConfig]) -> list[CallStream]:
        """The generator's streams, in the order of ``sites`` then of each site's list."""
        by_name = {s.site.name: s for s in sites}
        unknown = sorted(set(self.sites) - set(by_name))
        if unknown:
            raise ProfileError(f"traffic profile: unknown site(s) {', '.join(unknown)} "
                               f"(the cluster has {', '.join(sorted(by_name))})")
        out: list[CallStream] = []
        for site in sites:
            spec = self.sites.get(site.site.name)
            for i, st in enumerate(spec.streams if spec else ()):
                out.append(_stream(site, st, f"sites.{site.site.name}.streams[{i}]"))
        return [s for s in out if s.rate_per_h > 0]

    def caller_pools(self, sites: list[SiteConfig], streams: list[CallStream],
                     duration_sim_s: float) -> dict[str, CallerPool]:
        """One pool per site: its numbers, the profile's shares and size (default: 1.2
        times the calls expected in ``duration_sim_s``; about a third of the calls then
        come from someone who called before in the run)."""
        prefixes = {"emea": "+3361", "amer": "+1514", "apac": "+6327"}
        pools = {}
        for s in sites:
            spec = self.sites.get(s.site.name, SiteTraffic()).callers
            expected = sum(st.rate_per_h for st in streams if st.site == s.site.name) * duration_sim_s / 3600
            pools[s.site.name] = CallerPool(
                prefix=spec.prefix or prefixes.get(s.site.region, "+1555"),
                size=spec.size or max(50, int(expected * 1.2)),
                vip=tuple(s.lists.vip), whitelist=tuple(s.lists.whitelist), blacklist=tuple(s.lists.blacklist),
                vip_p=spec.vip_p, whitelist_p=spec.whitelist_p, blacklist_p=spec.blacklist_p,
            )
        return pools

    def apply_to_sites(self, sites: list[SiteConfig]) -> list[SiteConfig]:
        """The site files with the profile's head starts (the others unchanged)."""
        out = []
        for s in sites:
            spec = self.sites.get(s.site.name)
            if spec is None or not spec.head_start_s:
                out.append(s)
                continue
            d = s.model_dump(mode="json", exclude_none=True)
            d["routing"]["head_start_s"].update({k.value: v for k, v in spec.head_start_s.items()})
            out.append(parse_site(d, f"<{s.site.name} with the traffic profile's head starts>"))
        return out


def _stream(site: SiteConfig, st: StreamSpec, where: str) -> CallStream:
    name = site.site.name
    if st.queue is not None:
        q = next((q for q in site.queues if q.name == st.queue), None)
        if q is None:
            raise ProfileError(f"traffic profile, {where}: site {name} has no queue {st.queue!r} "
                               f"(it has {', '.join(q.name for q in site.queues)})")
        skill, channel, language = q.skill, q.channel, q.language or ""
    else:
        skill, channel, language = st.skill, st.channel or Channel.VOICE, st.language or ""
        # the engine's routing: (skill, channel, language), else the any-language queue
        q = next((q for q in site.queues if (q.skill, q.channel, q.language or "") == (skill, channel, language)),
                 None) or next((q for q in site.queues if (q.skill, q.channel) == (skill, channel)
                                and not q.language), None)
        if q is None:
            raise ProfileError(f"traffic profile, {where}: no queue of site {name} serves {skill!r} on "
                               f"{channel.value}" + (f" in {language!r}" if language else ""))
    h = st.handle
    rate = st.rate_per_h
    if rate is None:
        rate = st.erlangs * 3600.0 / (h.mean_s + q.wrap_up_s)
    p = st.patience
    return CallStream(
        site=name, skill=skill, channel=channel.value, language=language, rate_per_h=rate,
        talk_s=h.mean_s, talk_dist=h.dist, talk_cv=getattr(h, "cv", 0.8),
        patience_s=None if p.dist == "none" else p.mean_s,
        patience_dist="fixed" if p.dist == "fixed" else "exponential",
        name=q.name,
    )


def parse_profile(data: object, source: str = "<traffic profile>") -> TrafficProfile:
    try:
        return TrafficProfile.model_validate(data)
    except ValidationError as e:
        lines = [f"{source}: not a valid traffic profile:"]
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            lines.append(f"  {loc}: {err['msg']}")
        raise ProfileError("\n".join(lines)) from None


def load_profile(path: str | Path) -> TrafficProfile:
    """Read and validate a profile file; ProfileError says what is wrong and where."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ProfileError(f"{path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ProfileError(f"{path}: not YAML: {e}") from None
    return parse_profile(data, str(path))


def example_profile_path() -> Path:
    """The example profile shipped with the package (the demo's own traffic)."""
    return Path(__file__).with_name("traffic_example.yaml")
