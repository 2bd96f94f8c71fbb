"""What a rebalancer could see of the cluster at one instant of a replay: the argument of
the controller hook of :func:`router.whatif.simulator.replay`.

Figures are per origin site and queue, as the sites' published loads and the history
would give them to a live rebalancer: calls that arrived (since the controller's
previous call and since the start), calls waiting in the queue now, agents staffed on
it now (ready or in wrap-up, as the engine's queue view counts them), and the service
level of the calls that arrived there and finished so far (None before any). Frozen:
the controller may keep an observation, never change the replay through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class QueueObservation:
    """One queue of one site. ``arrivals``: calls that arrived at the site for this
    queue since the controller's previous call (since the start for the first call);
    ``arrivals_total``: since the start."""

    arrivals: int
    arrivals_total: int
    length: int
    staffed: int
    service_level: float | None


@dataclass(frozen=True, slots=True)
class SiteObservation:
    """One site: its queues, its contingency mode in force, and the agents that are not
    in their site-file group now (agent id -> group)."""

    queues: Mapping[str, QueueObservation]
    mode: str
    moved: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Observation:
    """The cluster at ``t`` (seconds on the arrivals' clock). ``since_s``: simulated time
    since the controller's previous call (since the first arrival for the first call);
    ``applied``: target sets applied so far (the initial ``targets`` count as one)."""

    t: float
    since_s: float
    applied: int
    sites: Mapping[str, SiteObservation]
