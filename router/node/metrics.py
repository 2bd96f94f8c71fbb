"""Prometheus metrics of a site node (prometheus-client, process-global registry).

Counters are bumped on the command path; gauges (queues, agents, calls, streams) are
refreshed from the event loop once a second by :meth:`Node.publish_metrics` — never read
from the HTTP thread, which must not touch the engine. ``tandem node`` serves them on
``127.0.0.1:$TANDEM_METRICS_PORT`` when that variable is set.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

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
QUEUE_LENGTH = Gauge("tandem_node_queue_length", "Calls waiting in a queue", ["site", "queue"])
QUEUE_EXPECTED_WAIT = Gauge("tandem_node_queue_expected_wait_seconds", "Expected wait of a new call", ["site", "queue"])
AGENTS = Gauge("tandem_node_agents", "Agents by state", ["site", "state"])
CALLS = Gauge("tandem_node_calls", "Retained calls by state", ["site", "state"])
STREAMS = Gauge("tandem_node_streams", "Open agent streams and call watchers", ["site", "kind"])
JOURNAL_SEQ = Gauge("tandem_node_journal_seq", "Last durable journal sequence number", ["site"])


def serve(port: int, addr: str = "127.0.0.1") -> None:
    """Start the /metrics HTTP endpoint (a daemon thread)."""
    start_http_server(port, addr=addr)
