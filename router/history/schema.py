"""The history schema: tables, columns and versioned migrations.

One SQL text runs on Debian's clickhouse-server 18.16 and on current ClickHouse (chdb), so
the DDL keeps to what 18.16 has: plain types (String, UInt*, Float64, DateTime('UTC'),
Array), no Nullable in keys, no LowCardinality, no TTL, no DateTime64, no skip indexes;
``ENGINE = ReplacingMergeTree(ver) PARTITION BY … ORDER BY …`` (custom partitioning,
there since 1.1.54310).

**Times** are whole Unix seconds in ``DateTime('UTC')`` columns (0 = "never", e.g. the
``answered_at`` of an abandoned call); durations that KPIs compare with thresholds
(``wait_s``, ``talk_s``, ``handle_s``) are exact ``Float64`` seconds computed by the node.

**Idempotent keys** (invariant 5: written at least once, read exactly once). Each table is
a ReplacingMergeTree whose sorting key is the row's identity, and whose partition key is a
function of that same row (the month of its own time), so a replayed copy lands in the
same partition with the same key:

* ``interactions``: ``interaction_id`` (one row per final outcome). ``ver`` orders
  corrections: a later row for the same id with a higher ``ver`` wins.
* ``routing_decisions``: ``(call_id, seq)``.
* ``agent_state_changes``: ``(site, agent_id, at, seq)``.
* ``audit``: ``(site, id)`` (one row per audit record of a node, :mod:`router.security.audit`;
  a node re-submits the records its log retains at every start).
* ``partner_events``: ``(partner, call_id, offer_no, event)`` (one row per event of an
  overflow offer to a BPO partner's own ACD, written by the origin node;
  :mod:`router.history.partner`). ``ver`` is the event time in ms.

Background merges remove duplicates eventually, never on a schedule, so readers must not
rely on them: every query reads through ``FROM <table> FINAL`` (see :mod:`router.history.kpi`
for why FINAL rather than GROUP BY/argMax).

Migrations are numbered; :func:`router.history.store.HistoryStore.migrate` applies the
missing ones in order and records each in ``schema_migrations``. Every statement is
idempotent (``IF NOT EXISTS``), so a migration interrupted half-way is simply run again.
Add a migration at the end; never edit an applied one.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The default database of a store URL without one.
DEFAULT_DATABASE = "tandem"


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    #: the value a row that omits this column gets (also the spool's fill-in for rows
    #: written before the column existed)
    default: object


def _c(name: str, type_: str) -> Column:
    if type_.startswith("Array"):
        d: object = []
    elif type_ == "String":
        d = ""
    elif type_ == "Float64":
        d = 0.0
    else:  # UInt*, DateTime: whole numbers
        d = 0
    return Column(name, type_, d)


DT = "DateTime('UTC')"

INTERACTIONS: tuple[Column, ...] = (
    _c("interaction_id", "String"),
    _c("ver", "UInt64"),  # higher wins among rows of one interaction (e.g. ended_at in ms)
    _c("site", "String"),  # the site that ended the call (handled it, or lost it)
    _c("region", "String"),  # that site's region
    _c("partner", "String"),  # the site's name when it is a partner, else ''
    _c("origin_site", "String"),  # where the call first arrived (= site unless overflowed)
    _c("origin_region", "String"),  # the customer's region: who pays (chargeback)
    _c("queue", "String"),
    _c("skill", "String"),
    _c("channel", "String"),
    _c("language", "String"),
    _c("priority_class", "String"),
    _c("caller", "String"),
    _c("customer_id", "String"),
    _c("agent_id", "String"),
    _c("outcome", "String"),  # completed | abandoned | rejected
    _c("reason", "String"),  # abandon or reject reason
    _c("offered_at", DT),
    _c("queued_at", DT),
    _c("transferred_at", DT),
    _c("answered_at", DT),
    _c("ended_at", DT),
    _c("wait_s", "Float64"),  # queued (or offered) -> answered, or -> abandoned
    _c("talk_s", "Float64"),  # answered -> ended
    _c("wrap_s", "Float64"),  # after-call work
    _c("handle_s", "Float64"),  # talk + wrap-up (0 when not answered)
    _c("csat", "UInt8"),  # 1..5, 0 = no survey answer
    _c("resolved", "UInt8"),
    _c("wrap_up_code", "String"),
    _c("transfer_count", "UInt16"),
)

ROUTING_DECISIONS: tuple[Column, ...] = (
    _c("call_id", "String"),
    _c("seq", "UInt32"),  # decision number within the call (0, 1, … per re-route)
    _c("site", "String"),
    _c("region", "String"),
    _c("at", DT),
    _c("rule", "String"),  # e.g. queue_here, overflow_expected_wait, partner_split, reject
    _c("target_kind", "String"),  # queue | site | partner | agent | reject
    _c("target", "String"),  # e.g. "lyon/billing-fr-voice", "callpro", an agent id
    _c("candidates", "Array(String)"),
    _c("candidate_waits_s", "Array(Float64)"),  # expected wait of each candidate
    _c("expected_wait_s", "Float64"),  # of the chosen target
    _c("reason", "String"),  # the decision text, e.g. "queued: billing-fr-voice (vip)"
    _c("details", "String"),  # JSON object, free-form extra inputs of the rule
)

AGENT_STATE_CHANGES: tuple[Column, ...] = (
    _c("site", "String"),
    _c("region", "String"),
    _c("partner", "String"),
    _c("agent_id", "String"),
    _c("seq", "UInt64"),  # node-wide change number (journal seq): tells apart two changes in one second
    _c("at", DT),  # when the agent entered `state`
    _c("state", "String"),  # signed_out | not_ready | ready | busy | wrap_up
    _c("reason", "String"),
    _c("prev_state", "String"),  # the state left at `at` …
    _c("prev_at", DT),  # … entered at prev_at (0 when unknown): the interval [prev_at, at)
    _c("calls", "UInt16"),  # interactions in hand after the change
)

# What the request named (call_id, agent_id, target…) is two parallel arrays rather than a
# JSON text: 18.16 has no JSONExtract, but it filters and unnests arrays (``has``,
# ``indexOf``, ``ARRAY JOIN``), e.g. ``object_values[indexOf(object_keys, 'call_id')]``.
AUDIT: tuple[Column, ...] = (
    _c("site", "String"),  # the node's site
    _c("id", "String"),  # unique per record (uuid4 hex)
    _c("at", DT),  # when the node decided (whole seconds) …
    _c("at_us", "UInt32"),  # … and the microseconds within that second
    _c("identity", "String"),  # SPIFFE URI of the caller, or "insecure:" + peer
    _c("role", "String"),  # the role that allowed it; '' when denied or unbound
    _c("peer", "String"),  # e.g. "ipv4:127.0.0.1:5555"
    _c("method", "String"),  # full gRPC method, e.g. "/router.v1.Routing/OfferCall"
    _c("object_keys", "Array(String)"),  # what the request names: call_id, agent_id, …
    _c("object_values", "Array(String)"),  # … and their values, in the same order
    _c("decision", "String"),  # allow | deny
    _c("reason", "String"),  # ErrorInfo reason of a denial or an error; '' when fine
    _c("code", "String"),  # gRPC status code name of the result: OK, PERMISSION_DENIED…
)

# One row per event of an offer to a BPO partner's gateway (router/node/partner*.py writes
# them through router.history.partner.partner_event_row). The contract's terms in force at
# the event travel in the row, so a statement never depends on today's contract.
PARTNER_EVENTS: tuple[Column, ...] = (
    _c("partner", "String"),
    _c("call_id", "String"),
    _c("offer_no", "UInt32"),  # the attempt within the call, as in the Offer
    _c("event", "String"),  # offered | accepted | declined | timeout | gateway_lost | withdrawn |
    #                         assigned | outcome | handed_back
    _c("ver", "UInt64"),  # the event time in ms: a later record of the same event wins
    _c("at", DT),  # the event time, whole seconds …
    _c("at_s", "Float64"),  # … and exact (Unix time)
    _c("origin_site", "String"),  # the node that offered the call
    _c("origin_region", "String"),
    _c("queue", "String"),
    _c("skill", "String"),
    _c("channel", "String"),
    _c("value_tier", "String"),
    _c("wait_s", "Float64"),  # waited since the call's original arrival, at the offer
    _c("agent", "String"),  # the partner's agent or label (accepted, assigned)
    _c("reason", "String"),  # decline, timeout, withdraw or hand-back reason
    _c("answered_at", "Float64"),  # outcome: Unix time, 0 = never answered
    _c("talk_s", "Float64"),
    _c("wrap_s", "Float64"),
    _c("disposition", "String"),  # the partner's wrap-up code
    _c("resolved", "UInt8"),
    _c("csat", "UInt8"),  # 1..5, 0 = none
    _c("transferred_back", "UInt8"),  # the partner transferred the caller back by phone
    _c("sla_threshold_s", "Float64"),  # the contract's SLA threshold then; 0 = no SLA
    _c("sla_target", "Float64"),  # share answered within the threshold, 0..1
    _c("sla_credit_per_point", "Float64"),  # credit per point of SL under the target
    _c("price_per_contact", "Float64"),
    _c("price_per_minute", "Float64"),  # per handled minute (talk + wrap-up)
    _c("currency", "String"),
    # simulated seconds per real second of the run that wrote it (tandem demo); 1 = real time
    Column("time_scale", "Float64", 1.0),
)

#: table -> columns, in insert order
TABLES: dict[str, tuple[Column, ...]] = {
    "interactions": INTERACTIONS,
    "routing_decisions": ROUTING_DECISIONS,
    "agent_state_changes": AGENT_STATE_CHANGES,
    "audit": AUDIT,
    "partner_events": PARTNER_EVENTS,
}

# Migration 1 as applied: literal text, never edited (later changes are new migrations).
_V1_INTERACTIONS = """\
CREATE TABLE IF NOT EXISTS {db}.interactions (
    interaction_id String,
    ver UInt64,
    site String,
    region String,
    partner String,
    origin_site String,
    origin_region String,
    queue String,
    skill String,
    channel String,
    language String,
    priority_class String,
    caller String,
    customer_id String,
    agent_id String,
    outcome String,
    reason String,
    offered_at DateTime('UTC'),
    queued_at DateTime('UTC'),
    transferred_at DateTime('UTC'),
    answered_at DateTime('UTC'),
    ended_at DateTime('UTC'),
    wait_s Float64,
    talk_s Float64,
    wrap_s Float64,
    handle_s Float64,
    csat UInt8,
    resolved UInt8,
    wrap_up_code String,
    transfer_count UInt16
) ENGINE = ReplacingMergeTree(ver) PARTITION BY toYYYYMM(offered_at) ORDER BY (interaction_id)
"""

_V1_ROUTING_DECISIONS = """\
CREATE TABLE IF NOT EXISTS {db}.routing_decisions (
    call_id String,
    seq UInt32,
    site String,
    region String,
    at DateTime('UTC'),
    rule String,
    target_kind String,
    target String,
    candidates Array(String),
    candidate_waits_s Array(Float64),
    expected_wait_s Float64,
    reason String,
    details String
) ENGINE = ReplacingMergeTree PARTITION BY toYYYYMM(at) ORDER BY (call_id, seq)
"""

_V1_AGENT_STATE_CHANGES = """\
CREATE TABLE IF NOT EXISTS {db}.agent_state_changes (
    site String,
    region String,
    partner String,
    agent_id String,
    seq UInt64,
    at DateTime('UTC'),
    state String,
    reason String,
    prev_state String,
    prev_at DateTime('UTC'),
    calls UInt16
) ENGINE = ReplacingMergeTree PARTITION BY toYYYYMM(at) ORDER BY (site, agent_id, at, seq)
"""

# Migration 2 as applied: literal text, never edited.
_V2_AUDIT = """\
CREATE TABLE IF NOT EXISTS {db}.audit (
    site String,
    id String,
    at DateTime('UTC'),
    at_us UInt32,
    identity String,
    role String,
    peer String,
    method String,
    object_keys Array(String),
    object_values Array(String),
    decision String,
    reason String,
    code String
) ENGINE = ReplacingMergeTree PARTITION BY toYYYYMM(at) ORDER BY (site, id)
"""

# Migration 3 as applied: literal text, never edited.
_V3_PARTNER_EVENTS = """\
CREATE TABLE IF NOT EXISTS {db}.partner_events (
    partner String,
    call_id String,
    offer_no UInt32,
    event String,
    ver UInt64,
    at DateTime('UTC'),
    at_s Float64,
    origin_site String,
    origin_region String,
    queue String,
    skill String,
    channel String,
    value_tier String,
    wait_s Float64,
    agent String,
    reason String,
    answered_at Float64,
    talk_s Float64,
    wrap_s Float64,
    disposition String,
    resolved UInt8,
    csat UInt8,
    transferred_back UInt8,
    sla_threshold_s Float64,
    sla_target Float64,
    sla_credit_per_point Float64,
    price_per_contact Float64,
    price_per_minute Float64,
    currency String,
    time_scale Float64 DEFAULT 1
) ENGINE = ReplacingMergeTree(ver) PARTITION BY toYYYYMM(at) ORDER BY (partner, call_id, offer_no, event)
"""

MIGRATIONS_TABLE_SQL = (
    "CREATE TABLE IF NOT EXISTS {db}.schema_migrations "
    f"(version UInt32, name String, applied_at {DT}) "
    "ENGINE = ReplacingMergeTree ORDER BY version"
)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]  # "{db}" stands for the database name


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "interactions, routing_decisions, agent_state_changes",
        (_V1_INTERACTIONS, _V1_ROUTING_DECISIONS, _V1_AGENT_STATE_CHANGES),
    ),
    Migration(2, "audit", (_V2_AUDIT,)),
    Migration(3, "partner_events", (_V3_PARTNER_EVENTS,)),
)


def latest_version() -> int:
    return MIGRATIONS[-1].version
