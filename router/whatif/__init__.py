"""What-if replays: history (or synthetic) calls through a simulated cluster under an
overflow policy, with the live nodes' engine and overflow code on simulated time (the
dry run of ``tandem ctl policy apply``). Pure: no I/O, no clock; randomness only from
the given seed.

* :mod:`router.whatif.arrivals` — :class:`Arrival`, :func:`arrivals_from_rows` (rows of
  :func:`router.history.replay.recent_arrivals`), :func:`poisson_arrivals`;
* :mod:`router.whatif.simulator` — :func:`replay` and :func:`compare` (before / after);
* :mod:`router.whatif.result` — :class:`ReplayResult` per origin site and queue;
* :mod:`router.whatif.observe` — :class:`Observation`, what a controller (a simulated
  rebalancer) sees of the replay at one instant.
"""

from router.whatif.arrivals import Arrival, Stream, WhatIfError, arrivals_from_rows, poisson_arrivals
from router.whatif.simulator import HEARTBEAT_S, PUBLISH_S, SWEEP_MAX, SWEEP_S, compare, replay
from router.whatif.observe import Observation, QueueObservation, SiteObservation
from router.whatif.result import ReplayResult, SiteResult, Tally

__all__ = [
    "Arrival", "Stream", "WhatIfError", "arrivals_from_rows", "poisson_arrivals",
    "replay", "compare", "ReplayResult", "SiteResult", "Tally",
    "Observation", "QueueObservation", "SiteObservation",
    "PUBLISH_S", "HEARTBEAT_S", "SWEEP_S", "SWEEP_MAX",
]
