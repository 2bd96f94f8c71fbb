"""The routing engine of one site: a deterministic, event-sourced state machine with no
I/O, no clock and no randomness (see :mod:`router.engine.machine` for its contract).

Parts: ``machine`` (the :class:`Engine` and its call and agent commands), ``core``
(state mutation and dispatch), ``records`` (calls, agents, queues), ``validate``
(wire-level checks of commands), ``views`` (the read API), ``snapshot`` (snapshot and
restore), ``transfer`` (the engine's half of the two-phase transfer), ``mode``
(contingency modes). It imports only the shared pure modules (config, model, policy,
pqueue), never the node, gRPC or etcd.
"""

from router.engine.machine import Engine

__all__ = ["Engine"]
