"""The calls a replay plays: :class:`Arrival`, from history rows or from Poisson streams.

An :class:`Arrival` is one call as it reached its *origin* site (where it first arrived),
with what the replay needs to play the caller and the agent: when, what kind of call
(skill, channel, language), who (caller, customer id, declared class), how long an
agent spends on it (``handle_s``), how long the caller waits before hanging up
(``patience_s``), and what happened to it in reality (``outcome``, ``waited_s``).

Unknown figures are ``None`` and the replay fills them (seeded, the same draws for every
policy; see :func:`router.whatif.simulator.replay`): the handle time of a call that was
never answered, the patience of a call that was answered (its patience is *censored*:
only known to exceed its wait).

:func:`arrivals_from_rows` turns the plain rows of
:func:`router.history.replay.recent_arrivals` into arrivals; :func:`poisson_arrivals`
makes synthetic ones (tests, benchmarks, planning without history).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

#: Classes an arrival may declare (a floor; the engine still applies its caller lists).
DECLARABLE = ("", "standard", "repeat", "whitelist", "vip")
OUTCOMES = ("", "completed", "abandoned", "rejected")


class WhatIfError(ValueError):
    """Input a replay cannot use (an arrival for an unknown site or queue, a duplicate
    call id, a bad figure); the message names the arrival and what is wrong."""


@dataclass(frozen=True, slots=True)
class Arrival:
    """One call at its origin site.

    ``at``: arrival time in seconds, any epoch (partner opening hours read it as Unix
    time). ``priority_class``: a declared floor ("" = the engine classifies; the
    engine's caller lists and repeat-caller memory still apply). ``handle_s``: the agent
    time the call costs (talk + wrap-up), wherever it is answered; ``None`` = unknown.
    ``patience_s``: seconds from arrival after which the caller hangs up if no agent
    answered; ``math.inf`` = never; ``None`` = unknown (censored). ``waited_s``: the
    recorded wait before the answer or the hang-up (a lower bound of a censored
    patience). ``outcome``: the recorded outcome ("" for synthetic calls).
    """

    call_id: str
    site: str
    at: float
    skill: str
    channel: str = "voice"
    language: str = ""
    caller: str = ""
    customer_id: str = ""
    priority_class: str = ""
    handle_s: float | None = None
    patience_s: float | None = None
    waited_s: float = 0.0
    outcome: str = ""

    def check(self) -> None:
        """Raise :class:`WhatIfError` for a figure the replay cannot use."""
        who = f"arrival {self.call_id!r}"
        if not self.call_id or not isinstance(self.call_id, str):
            raise WhatIfError(f"arrival at {self.at}: call_id must be a non-empty string")
        if not (isinstance(self.at, (int, float)) and math.isfinite(self.at) and self.at >= 0):
            raise WhatIfError(f"{who}: at must be a finite time >= 0, got {self.at!r}")
        if self.priority_class not in DECLARABLE:
            raise WhatIfError(f"{who}: priority_class must be one of {DECLARABLE}, got {self.priority_class!r}")
        if self.handle_s is not None and not (math.isfinite(self.handle_s) and self.handle_s >= 0):
            raise WhatIfError(f"{who}: handle_s must be a finite number >= 0 or None, got {self.handle_s!r}")
        if self.patience_s is not None and not (self.patience_s >= 0):  # inf allowed, NaN not
            raise WhatIfError(f"{who}: patience_s must be >= 0 (inf = never) or None, got {self.patience_s!r}")
        if not (math.isfinite(self.waited_s) and self.waited_s >= 0):
            raise WhatIfError(f"{who}: waited_s must be a finite number >= 0, got {self.waited_s!r}")
        if self.outcome not in OUTCOMES:
            raise WhatIfError(f"{who}: outcome must be one of {OUTCOMES}, got {self.outcome!r}")


_ROW_KEYS = ("call_id", "site", "at", "skill")


def arrivals_from_rows(rows: Iterable[Mapping[str, Any]]) -> list[Arrival]:
    """Arrivals from :func:`router.history.replay.recent_arrivals` rows (plain dicts),
    in arrival order. A recorded "blacklist" class is not declarable: the engine finds
    it again from its caller lists. Raises :class:`WhatIfError` naming a bad row."""
    out = []
    for i, r in enumerate(rows):
        missing = [k for k in _ROW_KEYS if k not in r]
        if missing:
            raise WhatIfError(f"history row {i}: missing {', '.join(missing)}")
        klass = r.get("priority_class") or ""
        if klass not in DECLARABLE:
            klass = ""
        handle = r.get("handle_s")
        patience = r.get("patience_s")
        a = Arrival(
            call_id=str(r["call_id"]), site=str(r["site"]), at=float(r["at"]), skill=str(r["skill"]),
            channel=str(r.get("channel") or "voice"), language=str(r.get("language") or ""),
            caller=str(r.get("caller") or ""), customer_id=str(r.get("customer_id") or ""),
            priority_class=klass,
            handle_s=None if handle is None else float(handle),
            patience_s=None if patience is None else float(patience),
            waited_s=float(r.get("waited_s") or 0.0), outcome=str(r.get("outcome") or ""),
        )  # fmt: skip
        a.check()
        out.append(a)
    out.sort(key=lambda a: (a.at, a.call_id))
    return out


@dataclass(frozen=True)
class Stream:
    """Poisson arrivals of one kind of call at one site: ``rate_per_h`` calls per hour,
    handle times (talk + wrap-up) of mean ``handle_s`` (exponential, or lognormal with
    coefficient of variation ``handle_cv``), patience exponential of mean
    ``patience_s`` (None = infinite)."""

    site: str
    skill: str
    rate_per_h: float
    handle_s: float
    channel: str = "voice"
    language: str = ""
    handle_dist: Literal["exponential", "lognormal"] = "exponential"
    handle_cv: float = 0.8
    patience_s: float | None = None


def poisson_arrivals(
    streams: Sequence[Stream], duration_s: float, *, seed: int = 1, start: float = 0.0
) -> list[Arrival]:
    """Synthetic arrivals of ``streams`` over ``[start, start + duration_s)``, in
    arrival order; the same seed gives the same calls (ids ``<site>-<n>``)."""
    rng = random.Random(seed)
    raw: list[tuple[float, int, Stream, float, float]] = []
    for k, s in enumerate(streams):
        if s.rate_per_h <= 0:
            continue
        rate = s.rate_per_h / 3600.0
        t = start
        while True:
            t += rng.expovariate(rate)
            if t >= start + duration_s:
                break
            if s.handle_dist == "lognormal":
                sigma2 = math.log(1.0 + s.handle_cv**2)
                handle = rng.lognormvariate(math.log(s.handle_s) - sigma2 / 2, math.sqrt(sigma2))
            else:
                handle = rng.expovariate(1.0 / s.handle_s)
            patience = math.inf if s.patience_s is None else rng.expovariate(1.0 / s.patience_s)
            raw.append((t, k, s, handle, patience))
    raw.sort(key=lambda x: (x[0], x[1]))
    out = []
    for n, (t, _k, s, handle, patience) in enumerate(raw):
        out.append(Arrival(
            call_id=f"{s.site}-{n:07d}", site=s.site, at=t, skill=s.skill, channel=s.channel,
            language=s.language, handle_s=handle, patience_s=patience,
        ))  # fmt: skip
    return out
