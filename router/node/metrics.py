"""Prometheus metrics of a site node (prometheus-client, process-global registry).

Counters are bumped on the command path; gauges (queues, agents, calls, streams, the
cluster link, the history spool) are refreshed from the event loop once a second by
:meth:`Node.publish_metrics` — never read from the HTTP thread, which must not touch the
engine. The same registry feeds the node's in-app alerts (:mod:`router.alerts`): they
read exactly what Prometheus scrapes.

Naming (Prometheus's rules): one prefix, base units in the name (``_seconds``), ``_total``
on counters, a bounded ``state`` label rather than a gauge per state, and labels only from
{site, queue, state, member, partner, peer, method, code, op, result, reason, kind}: never
a call, caller or agent id. ``tandem_queue_wait_seconds`` has a bucket at every queue's
service-level threshold, so a queue's service level over any range is a bucket ratio::

    sum(rate(tandem_queue_wait_seconds_bucket{queue="q",le="20"}[30m]))
      / sum(rate(tandem_queue_wait_seconds_count{queue="q"}[30m]))

``tandem node`` serves them on ``--metrics-listen HOST:PORT`` (``TANDEM_METRICS_LISTEN``,
or ``127.0.0.1:$TANDEM_METRICS_PORT``); with ``--tls-dir`` over HTTPS requiring a client
certificate of the cluster CA (see :func:`serve`).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

COMMANDS = Counter(
    "tandem_node_commands_total",
    "Commands applied by the engine, by op and result (changed, unchanged or the refusal reason)",
    ["site", "op", "result"],
)
RPC_ERRORS = Counter(
    "tandem_node_rpc_errors_total", "Requests answered with an error, by method and reason", ["method", "reason"]
)
DURABLE_SECONDS = Histogram(
    "tandem_node_durable_seconds",
    "From applying a command to its journal record being durable",
    ["site"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
)
CALLS = Gauge("tandem_node_calls", "Retained calls by state", ["site", "state"])
STREAMS = Gauge("tandem_node_streams", "Open agent streams and call watchers", ["site", "kind"])
JOURNAL_SEQ = Gauge("tandem_node_journal_seq", "Last durable journal sequence number", ["site"])
# The event loop's responsiveness (router.node.node.LoopProbe): how late a timer due every
# few milliseconds ran. A stall of the loop (a long callback) shows as one late probe.
LOOP_LAG = Histogram(
    "tandem_node_loop_lag_seconds",
    "How late the event loop ran the lag probe's timer (a lower bound of each stall)",
    ["site"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
)
LOOP_STALL_MAX = Gauge(
    "tandem_node_loop_stall_max_seconds",
    "Longest event-loop stall seen by the lag probe, by window (recent: the last 10 s; start: since start)",
    ["site", "kind"],
)
COMPACTION_LOOP_SECONDS = Gauge(
    "tandem_node_compaction_loop_seconds",
    "Event-loop time of the last journal compaction (capturing the snapshot; the rest is off the loop)",
    ["site"],
)

# --- the real-time figures of a contact center ---------------------------------------------

QUEUE_CONTACTS = Gauge("tandem_queue_contacts", "Contacts waiting in a queue", ["site", "queue"])
QUEUE_OLDEST = Gauge(
    "tandem_queue_oldest_contact_age_seconds", "Wait so far of the oldest contact in a queue (0 when empty)",
    ["site", "queue"],
)
QUEUE_EXPECTED_WAIT = Gauge(
    "tandem_queue_expected_wait_seconds", "Expected wait of a new contact in a queue", ["site", "queue"]
)
QUEUE_SERVICE_LEVEL = Gauge(
    "tandem_queue_service_level",
    "Service level of a queue over its recent window, by the queue's own definition (ratio 0..1; "
    "absent until a contact finished in the window)",
    ["site", "queue"],
)
QUEUE_SERVICE_LEVEL_TARGET = Gauge(
    "tandem_queue_service_level_target", "A queue's service-level target (ratio 0..1)", ["site", "queue"]
)
QUEUE_SERVICE_LEVEL_THRESHOLD = Gauge(
    "tandem_queue_service_level_threshold_seconds", "A queue's service-level threshold (answered within it)",
    ["site", "queue"],
)
AGENTS = Gauge(
    "tandem_agents", "Agents by state (ready, on_contact, wrap_up, not_ready, signed_out)", ["site", "state"]
)
AGENT_STATES = ("ready", "on_contact", "wrap_up", "not_ready", "signed_out")

# Buckets of the wait histogram: these plus every queue's service-level threshold.
WAIT_BUCKETS = (5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 1200.0)
QUEUE_WAIT: Histogram | None = None  # made by configure_waits (the buckets depend on the site)

HANDLED = Counter("tandem_contacts_handled_total", "Contacts an agent handled to completion", ["site", "queue"])
ABANDONED = Counter("tandem_contacts_abandoned_total", "Contacts abandoned while waiting", ["site", "queue"])
OVERFLOW_OUT = Counter(
    "tandem_overflow_out_total", "Contacts moved from this site to a peer (committed transfers)",
    ["site", "queue", "peer"],
)
OVERFLOW_IN = Counter(
    "tandem_overflow_in_total", "Contacts moved to this site from a peer (committed transfers)",
    ["site", "queue", "peer"],
)
# The overflow decision on the OfferCall path (kind "offer") and in the sweep that decides
# again for calls that stayed (kind "sweep"): reading the peers' loads, the policy and
# writing the decision record, not the transfer that may follow.
OVERFLOW_DECISION_SECONDS = Histogram(
    "tandem_overflow_decision_seconds",
    "Time one overflow decision took on the node's event loop, by kind (offer or sweep)",
    ["site", "kind"],
    buckets=(0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
)

# --- the cluster link and the history ------------------------------------------------------

MEMBER_UP = Gauge(
    "tandem_cluster_member_up",
    "1 when a site this node has seen as a member (or that the overflow policy names) is registered now",
    ["site", "member"],
)
PARTNER_IN_USE = Gauge(
    "tandem_partner_calls_in_use", "Calls this site has active at a partner (counted against its cap)",
    ["site", "partner"],
)
PARTNER_CAP = Gauge("tandem_partner_calls_cap", "A partner's concurrency cap in its contract", ["site", "partner"])
PARTNER_OFFERS = Counter(
    "tandem_partner_offers_total",
    "Offers this site made to a partner's own ACD, by how they ended (assigned, declined, timeout, gateway_lost)",
    ["site", "partner", "outcome"],
)
PARTNER_GATEWAY = Gauge(
    "tandem_partner_gateway_connected", "1 while a partner's gateway is connected to this node", ["site", "partner"]
)
ETCD_CONNECTED = Gauge("tandem_etcd_connected", "1 while the node has a live etcd session", ["site"])
TARGETS_GENERATION = Gauge(
    "tandem_targets_generation",
    "Plan generation of the rebalancer targets this node applied (0: none; kept across restarts)", ["site"],
)
TARGETS_PENDING_MOVES = Gauge(
    "tandem_targets_pending_moves", "Agent moves of the applied targets waiting for the agent to be free",
    ["site"],
)
TARGETS_REFUSED = Counter(
    "tandem_targets_refused_total",
    "Rebalancer targets documents this node refused, by reason (stale_fencing: an epoch lower than the "
    "highest applied; invalid: the document does not parse or names what the site lacks)",
    ["site", "reason"],
)
HISTORY_SPOOL_ROWS = Gauge(
    "tandem_history_spool_rows", "History rows waiting in the outage spool for ClickHouse", ["site"]
)


def wait_buckets(thresholds: Iterable[float]) -> tuple[float, ...]:
    return tuple(sorted(set(WAIT_BUCKETS) | {float(t) for t in thresholds}))


def configure_waits(thresholds: Iterable[float]) -> Histogram:
    """The ``tandem_queue_wait_seconds`` histogram, with a bucket at each threshold.

    Its buckets are fixed once per process (a node process serves one site); an
    in-process node of another site reuses it, and ``observe`` still counts every wait,
    only a threshold missing from the buckets is then no exact bucket boundary."""
    global QUEUE_WAIT
    if QUEUE_WAIT is None:
        QUEUE_WAIT = Histogram(
            "tandem_queue_wait_seconds", "Wait of each answered contact in its queue (offer or arrival to answer)",
            ["site", "queue"], buckets=wait_buckets(thresholds),
        )
    return QUEUE_WAIT


def samples(registry: Any = REGISTRY, names: set[str] | None = None) -> Iterator[tuple[str, dict, float]]:
    """Every sample of the registry as (name, labels, value) — what a scrape reads; only
    the families whose samples are named in ``names`` when given."""
    for family in registry.collect():
        for s in family.samples:
            if names is None or s.name in names:
                yield s.name, s.labels, s.value


def serve(port: int, addr: str = "127.0.0.1", *, certfile: str | None = None, keyfile: str | None = None,
          client_cafile: str | None = None) -> int:
    """Start the /metrics HTTP endpoint (a daemon thread); returns the bound port.

    With ``certfile``/``keyfile`` it is HTTPS; with ``client_cafile`` too, a client
    certificate signed by that CA is required (nothing is served without one)."""
    kw: dict[str, Any] = {}
    if certfile:
        kw = {"certfile": certfile, "keyfile": keyfile}
        if client_cafile:
            kw.update(client_cafile=client_cafile, client_auth_required=True)
    server, _thread = start_http_server(port, addr=addr, **kw)
    return int(server.server_port)


# --- what a node publishes and observes -------------------------------------------------------


def agent_state(view: Any) -> str:
    """The engine's agent state as a metric state: a READY agent with a contact in hand
    (ringing or connected) is ``on_contact``."""
    if view.state == "ready" and view.call_ids:
        return "on_contact"
    return view.state


class NodeMetrics:
    """One node's figures: gauges refreshed by :meth:`publish` (loop thread, once a second),
    counters bumped by :meth:`observe` on the command path."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.site = site = node.site.site.name
        self.queue_cfg = {q.name: q for q in node.site.queues}
        self.waits = configure_waits(q.service_level.threshold_s for q in node.site.queues)
        self.members: dict[str, str] = {}  # site -> last address seen, every member ever seen
        self.partners: set[str] = set()
        for q in node.site.queues:
            sl = q.service_level
            QUEUE_SERVICE_LEVEL_TARGET.labels(site, q.name).set(sl.target)
            QUEUE_SERVICE_LEVEL_THRESHOLD.labels(site, q.name).set(sl.threshold_s)
            # every queue's series exist from the start, at zero (rate() and ratios work)
            self.waits.labels(site, q.name)
            HANDLED.labels(site, q.name)
            ABANDONED.labels(site, q.name)

    def publish(self) -> None:
        node, site = self.node, self.site
        eng = node.engine
        for q in eng.queues(now=node.view_time()):
            QUEUE_CONTACTS.labels(site, q.name).set(q.length)
            QUEUE_OLDEST.labels(site, q.name).set(q.oldest_wait_s if q.length else 0.0)
            QUEUE_EXPECTED_WAIT.labels(site, q.name).set(q.expected_wait_s)
            if q.service_level >= 0:
                QUEUE_SERVICE_LEVEL.labels(site, q.name).set(q.service_level)
            else:  # no contact finished in the window: no figure (and no alert on it)
                _remove(QUEUE_SERVICE_LEVEL, site, q.name)
        counts = dict.fromkeys(AGENT_STATES, 0)
        for a in eng.agents():
            s = agent_state(a)
            counts[s] = counts.get(s, 0) + 1
        for state, n in counts.items():
            AGENTS.labels(site, state).set(n)
        for state, n in eng.counts_by_state().items():
            CALLS.labels(site, state).set(n)
        STREAMS.labels(site, "agent").set(len(node.connected_agents))
        STREAMS.labels(site, "watch").set(node.watcher_count)
        JOURNAL_SEQ.labels(site).set(node.durable_seq)
        self._cluster(getattr(node, "cluster", None))
        history = getattr(node, "history", None)
        if history is not None:
            HISTORY_SPOOL_ROWS.labels(site).set(history.spool_rows())

    def _cluster(self, cluster: Any) -> None:
        if cluster is None:
            return
        site = self.site
        connected = bool(cluster.coord.connected)
        ETCD_CONNECTED.labels(site).set(1 if connected else 0)
        members = cluster.coord.members()
        for name, m in members.items():
            if name != site:
                self.members[name] = m.address
        named = cluster.policy_sites()
        for name in named:
            self.members.setdefault(name, "")
        if connected:  # without a session the member list is stale: report nothing new
            for name in self.members:
                MEMBER_UP.labels(site, name).set(1 if name in members else 0)
        partners = cluster.partner_calls()
        for p, (n, cap) in partners.items():
            PARTNER_IN_USE.labels(site, p).set(n)
            if cap is not None:
                PARTNER_CAP.labels(site, p).set(cap)
            else:
                _remove(PARTNER_CAP, site, p)
        for p in self.partners - set(partners):
            _remove(PARTNER_IN_USE, site, p)
            _remove(PARTNER_CAP, site, p)
        self.partners = set(partners)
        targets = getattr(cluster, "targets", None)
        if targets is not None:
            # the engine's record (journaled): right after a restart too, before etcd answers
            TARGETS_GENERATION.labels(site).set(self.node.engine.targets_applied()["generation"])
            TARGETS_PENDING_MOVES.labels(site).set(len(targets.pending))

    def peer_site(self, address: str) -> str:
        for name, addr in self.members.items():
            if addr == address:
                return name
        cluster = getattr(self.node, "cluster", None)
        if cluster is not None:
            for name, m in cluster.coord.members().items():
                if m.address == address:
                    return name
        return "unknown"

    def observe(self, records: list, effects: list) -> None:
        """Counters from one step's journaled commands and effects (after the engine)."""
        eng, site = self.node.engine, self.site
        t = records[0].get("t", 0.0) if records else 0.0
        ended: set[str] = set()
        for e in effects:
            kind = type(e).__name__
            if kind == "CallConnected":
                c = eng.call(e.call_id)
                self.waits.labels(site, c.queue).observe(max(0.0, c.answered_at - c.queued_at))
            elif kind == "CallChanged" and e.call_id not in ended:
                c = eng.call(e.call_id)
                if c.ended_at < t:
                    continue
                if c.state == "completed":
                    HANDLED.labels(site, c.queue).inc()
                elif c.state == "abandoned":
                    ABANDONED.labels(site, c.queue).inc()
                else:
                    continue
                ended.add(e.call_id)
        for cmd in records:
            op = cmd.get("op")
            if op == "transfer_done":
                c = eng.call(cmd["call_id"])
                OVERFLOW_OUT.labels(site, c.queue, self.peer_site(c.transfer_target)).inc()
            elif op == "transfer_commit":
                c = eng.call(cmd["call_id"])
                OVERFLOW_IN.labels(site, c.queue, c.transfer_origin or "unknown").inc()


def _remove(metric: Any, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


class NodeAlerts:
    """The alert spec evaluated on this node's own samples (``node.alerts``).

    ``TANDEM_ALERT_RULES`` names a rule file that replaces the packaged one (see
    :mod:`router.alerts`). :meth:`evaluate` runs once a second after the gauges are
    refreshed; :meth:`active` is what ``Admin.ListAlerts`` returns."""

    def __init__(self, site: str, spec: Any = None, registry: Any = REGISTRY) -> None:
        import os

        from router.alerts import load_spec

        self.site = site
        self.spec = spec if spec is not None else load_spec(os.environ.get("TANDEM_ALERT_RULES") or None)
        self.registry = registry
        self._names = {n for m in self.spec.metrics() for n in (m, f"{m}_total")}
        self._state: dict = {}
        self._alerts: list = []
        self._firing: set = set()

    def samples(self) -> list[tuple[str, dict, float]]:
        """This site's samples of the metrics the rules read."""
        return [(n, labels, v) for n, labels, v in samples(self.registry, self._names)
                if labels.get("site", self.site) == self.site]

    def evaluate(self, now: float | None = None) -> list:
        import logging
        import time

        from router.alerts import evaluate

        alerts = evaluate(self.spec, self.samples(), time.time() if now is None else now, self._state,
                          site=self.site)
        firing = {(a.name, tuple(sorted(a.labels.items()))): a for a in alerts if a.firing}
        log = logging.getLogger("tandem.alerts")
        for key in firing.keys() - self._firing:
            a = firing[key]
            log.warning("alert %s firing (%s): %s", a.name, a.severity, a.summary)
        for name, labels in self._firing - firing.keys():
            log.info("alert %s resolved %s", name, dict(labels))
        self._firing = set(firing)
        self._alerts = alerts
        return alerts

    def active(self) -> list:
        """Alerts pending or firing at the last evaluation."""
        return list(self._alerts)

    def firing(self) -> list:
        return [a for a in self._alerts if a.firing]
