"""The traffic simulator: callers and agents played against real nodes over gRPC.

``loadgen`` (Poisson callers with patience), ``agents`` (simulated agents on the
Agents stream), ``ledger`` (the simulator's own record of calls), ``rpc`` (gRPC
plumbing), ``report`` (reconciliation of the simulator's records with the nodes' and
KPIs) and ``demo`` (``tandem demo``: the example cluster under load). It talks to
nodes only through their gRPC APIs, and starts them through :mod:`router.local`.
"""
