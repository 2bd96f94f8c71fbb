"""What a replay reports: per origin site (and queue) and for the cluster.

A call counts for the site and queue where it *arrived* (its origin), with the outcome
it got wherever it ended — as ``tandem demo``'s report does: an overflowed call answered
at another site is answered for its origin, its wait runs from its arrival at the origin
to its answer, and it is judged by the origin queue's
:class:`router.config.ServiceLevelDefinition` (threshold; abandons ``count_against``,
``exclude`` or ``short_excluded``). ``overflow_out`` counts the calls of a site that
left it by a committed transfer; ``overflow_in`` the calls that came to the site that
way (they count for their origin, not here).

Conservation: ``offered == answered + abandoned + rejected + unfinished`` for every site
and queue (``unfinished``: still waiting when the replay stopped — only with a
``drain_s`` limit, or for a queue that no agent serves and callers of infinite patience).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from router.config import ServiceLevelDefinition


@dataclass
class Tally:
    """Counts of one site (or queue, or the cluster)."""

    offered: int = 0
    answered: int = 0
    abandoned: int = 0
    rejected: int = 0
    unfinished: int = 0
    overflow_out: int = 0
    overflow_in: int = 0
    wait_sum_s: float = 0.0  # of answered calls, from arrival at the origin
    sl_num: int = 0
    sl_den: int = 0

    def add_finished(self, sl: ServiceLevelDefinition, answered: bool, waited_s: float) -> None:
        """One answered or abandoned call of this tally, waited ``waited_s`` seconds."""
        within = waited_s <= sl.threshold_s
        if answered:
            self.answered += 1
            self.wait_sum_s += waited_s
            self.sl_num += within
            self.sl_den += 1
        else:
            self.abandoned += 1
            if sl.abandons == "count_against" or (sl.abandons == "short_excluded" and not within):
                self.sl_den += 1

    def merge(self, other: "Tally") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def service_level(self) -> float | None:
        return self.sl_num / self.sl_den if self.sl_den else None

    @property
    def asa_s(self) -> float | None:
        return self.wait_sum_s / self.answered if self.answered else None

    @property
    def abandon_rate(self) -> float | None:
        n = self.answered + self.abandoned
        return self.abandoned / n if n else None

    def to_dict(self) -> dict[str, Any]:
        sl, asa, ab = self.service_level, self.asa_s, self.abandon_rate
        return {
            "offered": self.offered,
            "answered": self.answered,
            "abandoned": self.abandoned,
            "rejected": self.rejected,
            "unfinished": self.unfinished,
            "service_level": None if sl is None else round(sl, 6),
            "asa_s": None if asa is None else round(asa, 3),
            "abandon_rate": None if ab is None else round(ab, 6),
            "overflow_out": self.overflow_out,
            "overflow_in": self.overflow_in,
        }


@dataclass
class SiteResult(Tally):
    """A site's tally, and one per origin queue (rejected calls, which joined no queue,
    under "(rejected)")."""

    site: str = ""
    queues: dict[str, Tally] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["queues"] = {name: t.to_dict() for name, t in sorted(self.queues.items())}
        return d


@dataclass
class ReplayResult:
    """Per origin site and for the whole cluster; ``decisions`` counts the overflow
    decisions by rule (as the live node's ``stats.by_rule``: every decision at an offer,
    and the sweeps' decisions that moved a call); ``transfers_aborted`` the overflows the
    target refused (e.g. QUEUE_FULL); ``targets_applied`` the target sets applied (the
    initial targets and a controller's, see :func:`router.whatif.simulator.replay`)."""

    sites: dict[str, SiteResult]
    total: Tally
    calls: int
    decisions: dict[str, int] = field(default_factory=dict)
    transfers_aborted: int = 0
    seed: int = 1
    span_s: float = 0.0  # from the first arrival to the last event
    targets_applied: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "seed": self.seed,
            "span_s": round(self.span_s, 3),
            "sites": {name: s.to_dict() for name, s in sorted(self.sites.items())},
            "total": self.total.to_dict(),
            "decisions": dict(sorted(self.decisions.items())),
            "transfers_aborted": self.transfers_aborted,
            "targets_applied": self.targets_applied,
        }
