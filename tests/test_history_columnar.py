"""Columnar inserts (Native column bytes built with numpy, router.history.inserter) against
the REAL clickhouse-server: every table of the schema, edge values of every type, read
back and compared exactly with what the driver's row-wise encoding stores; the writer's
two paths end to end; bad input refused as before, changing nothing."""

from __future__ import annotations

import contextlib
import random

import pytest

from history_fixtures import unique_database
from router.history import synth
from router.history.encode import ColumnarBatch, TableEncoder, columnar
from router.history.inserter import ProcessInserter, ThreadInserter, insert_columnar
from router.history.schema import TABLES
from router.history.store import ClickHouseServerStore, StoreError
from router.history.writer import HistoryWriter

UINT_MAX = {"UInt8": 255, "UInt16": 65_535, "UInt32": 2**32 - 1, "UInt64": 2**64 - 1}
STRINGS = ["", "a", "lyon", "é", "漢字テキスト", "x" * 127, "y" * 128, "z" * 16_383, "w" * 16_384,
           "mixed é " * 40, "tab\tnew\nline\0nul", "'quote\\"]
FLOATS = [0.0, -0.0, 1.5, -2.25, 1e300, -1e-300, 5e-324, 12.0, 3, 2**53 + 1, 0.1]


def value(type_: str, rnd: random.Random, i: int):
    """A value of ``type_``, cycling through the edge cases with ``i``."""
    if type_ == "String":
        return STRINGS[i % len(STRINGS)] + (str(rnd.randrange(1000)) if i % 3 else "")
    if type_ in UINT_MAX:
        edges = [0, 1, UINT_MAX[type_], UINT_MAX[type_] - 1, True]
        return edges[i % 5] if i % 2 else rnd.randrange(UINT_MAX[type_] + 1)
    if type_.startswith("DateTime"):
        # Tables are partitioned by month: random times over 136 years would make one
        # part per row (tens of seconds per insert on 18.16); a few edges, then one month.
        return [0, 1, 2**32 - 1][i % 3] if i % 50 == 1 else 1_790_000_000 + rnd.randrange(20 * 86_400)
    if type_ == "Float64":
        return FLOATS[i % len(FLOATS)] if i % 2 else rnd.uniform(-1e6, 1e6)
    if type_.startswith("Array("):
        return [value(type_[6:-1], rnd, i + k) for k in range(i % 4)]
    raise AssertionError(type_)


def table_rows(table: str, n: int, seed: int = 1) -> list[dict]:
    rnd = random.Random(seed)
    cols = TABLES[table]
    rows = []
    for i in range(n):
        row = {c.name: value(c.type, rnd, i + j) for j, c in enumerate(cols)}
        row[cols[0].name] = f"k{i}"  # every key column starts with a String: keep rows apart
        rows.append(row)
    return rows


def as_stored(type_: str, col: list) -> list:
    if type_ == "Float64":
        return [float(v) for v in col]
    if type_.startswith("Array("):
        return [as_stored(type_[6:-1], v) for v in col]
    return col


def everything(store: ClickHouseServerStore, table: str) -> list[tuple]:
    return sorted(store.query(f"SELECT * FROM {{db}}.{table}"), key=repr)


@pytest.fixture
def twin_store(clickhouse_server):
    """A second migrated database on the same server: the row-wise side of a comparison."""
    store = ClickHouseServerStore(clickhouse_server.store_url(unique_database("rw")))
    store.migrate()
    yield store
    with contextlib.suppress(Exception):
        store.query("DROP DATABASE IF EXISTS {db}")
    store.close()


@pytest.mark.parametrize("table", sorted(TABLES))
def test_columnar_stores_exactly_what_the_row_wise_path_stores(server_store, twin_store, table):
    rows = table_rows(table, 600, seed=len(table))
    enc = TableEncoder(table)
    data, rejected = enc.encode(rows)
    assert not rejected
    batch = columnar(table, enc.names, data)
    assert isinstance(batch, ColumnarBatch) and batch.rows == 600
    # What the fallback would send: the same values as stored (a Float64 column's ints
    # as the floats the driver packs them as).
    assert batch.to_lists() == [as_stored(c.type, col) for c, col in zip(enc.columns, data)]
    insert_columnar(server_store, batch)
    twin_store.insert(table, enc.names, data)  # the driver's own (row-wise) encoding
    got, want = everything(server_store, table), everything(twin_store, table)
    assert len(got) == 600
    assert got == want
    # And as text: -0.0 == 0.0, but their reprs differ; so do 1 and 1.0, True and 1.
    assert repr(got) == repr(want)


def test_interactions_from_synth_round_trip(server_store, twin_store):
    rows = synth.interactions(5000, seed=21, start=1_790_000_000)
    rows[7] = dict(rows[7], caller="+33 é 漢", reason="r" * 300)
    enc = TableEncoder("interactions")
    data, _ = enc.encode(rows)
    ThreadInserter(server_store, columnar=True).insert("interactions", enc.names, data)
    ThreadInserter(twin_store, columnar=False).insert("interactions", enc.names, data)
    assert everything(server_store, "interactions") == everything(twin_store, "interactions")


@pytest.mark.parametrize("bad", [
    ("csat", "5"), ("csat", -1), ("csat", 256), ("csat", 1.5), ("csat", None),
    ("wait_s", "slow"), ("wait_s", None),
    ("offered_at", 2**32), ("caller", 12), ("caller", None),
    ("caller", "lone \udc80 surrogate"),
])
def test_values_outside_the_columnar_encoding_keep_the_old_path(server_store, bad):
    """Data that did not come through the encoder (a hand-made batch, an old spool file):
    no ColumnarBatch; the store then sees the lists, as before, and refuses the whole
    batch with a StoreError — nothing lands."""
    name, v = bad
    rows = synth.interactions(50, seed=3, start=1_790_000_000)
    enc = TableEncoder("interactions")
    data, _ = enc.encode(rows)
    data[enc.names.index(name)][17] = v
    assert columnar("interactions", enc.names, data) is None
    with pytest.raises(StoreError):
        ThreadInserter(server_store, columnar=True).insert("interactions", enc.names, data)
    assert server_store.query("SELECT count() FROM {db}.interactions") == [(0,)]


@pytest.mark.parametrize("v", [float("nan"), float("inf")])
def test_non_finite_floats_keep_the_old_path(server_store, v):
    """The encoder sets such rows aside; in a hand-made batch the driver stores them, as
    it always did — columnar() leaves them to it."""
    enc = TableEncoder("interactions")
    data, _ = enc.encode(synth.interactions(50, seed=3, start=1_790_000_000))
    data[enc.names.index("wait_s")][17] = v
    assert columnar("interactions", enc.names, data) is None
    ThreadInserter(server_store, columnar=True).insert("interactions", enc.names, data)
    assert server_store.query("SELECT count() FROM {db}.interactions") == [(50,)]


def test_unknown_table_or_column_is_not_columnar():
    enc = TableEncoder("interactions")
    data, _ = enc.encode(synth.interactions(3, seed=1))
    assert columnar("no_such_table", enc.names, data) is None
    assert columnar("interactions", enc.names[:-1] + ["nonsense"], data) is None
    assert columnar("interactions", enc.names, data[:-1]) is None
    assert columnar("interactions", enc.names, [c[:2] if i == 3 else c for i, c in enumerate(data)]) is None


def test_server_columns_differing_from_the_schema_fall_back_to_the_driver(server_store):
    """A server whose table has another type (here csat UInt16, at_s missing from the
    batch's order) gets the driver's block from the same batch: the rows still land."""
    server_store.query("DROP TABLE {db}.interactions")
    server_store.query("CREATE TABLE {db}.interactions (interaction_id String, ver UInt64, csat UInt16, "
                       "offered_at DateTime) ENGINE = MergeTree ORDER BY interaction_id")
    rows = synth.interactions(20, seed=5, start=1_790_000_000)
    names = ["interaction_id", "ver", "csat", "offered_at"]
    data = [[r[n] for r in rows] for n in names]
    batch = columnar("interactions", names, data)
    assert batch is not None
    insert_columnar(server_store, batch)
    got = server_store.query("SELECT interaction_id, ver, csat, toUInt32(offered_at) FROM {db}.interactions "
                             "ORDER BY interaction_id")
    assert got == sorted(zip(*data))


def test_server_refusal_is_a_store_error_and_the_connection_recovers(server_store):
    enc = TableEncoder("interactions")
    data, _ = enc.encode(synth.interactions(10, seed=6))
    batch = columnar("interactions", enc.names, data)
    server_store.query("DROP TABLE {db}.interactions")
    with pytest.raises(StoreError) as err:
        insert_columnar(server_store, batch)
    assert "interactions" in str(err.value)
    assert server_store.query("SELECT 1") == [(1,)]


def test_process_inserter_columnar_and_row_wise_agree(server_store, twin_store):
    rows = synth.interactions(3000, seed=8, start=1_790_000_000)
    enc = TableEncoder("interactions")
    data, _ = enc.encode(rows)
    a, b = ProcessInserter(server_store, columnar=True), ProcessInserter(twin_store, columnar=False)
    try:
        a.insert("interactions", enc.names, data)
        b.insert("interactions", enc.names, data)
        bad = [list(c) for c in data]
        bad[enc.names.index("csat")][0] = "five"
        with pytest.raises(StoreError):
            a.insert("interactions", enc.names, bad)  # refused whole: nothing of it lands
    finally:
        a.close()
        b.close()
    assert everything(server_store, "interactions") == everything(twin_store, "interactions")


@pytest.mark.parametrize("columnar_path", [True, False])
def test_writer_end_to_end(server_store, tmp_path, columnar_path):
    """The whole writer (insert processes), bad rows set aside as before."""
    rows = synth.interactions(12_000, seed=9, start=1_790_000_000)
    bad = [dict(rows[0], interaction_id="bad1", csat=9000), dict(rows[1], interaction_id="bad2", wait_s="x")]
    with HistoryWriter(server_store, tmp_path / "spool", batch_rows=4000, flush_interval_s=0.1,
                       columnar=columnar_path) as w:
        for r in rows + bad:
            w.submit("interactions", r)
        for r in synth.routing_decisions(rows[:300]):
            w.submit("routing_decisions", r)
        assert w.flush(60)
        st = w.stats()
    assert st.rejected_rows == 2 and st.inserted == 12_000 + 300 and st.rejected_batches == 0
    (n, csat, wait), = server_store.query(
        "SELECT count(), sum(csat), sum(wait_s) FROM {db}.interactions FINAL")
    assert (n, csat) == (12_000, sum(r["csat"] for r in rows))
    assert wait == pytest.approx(sum(r["wait_s"] for r in rows), rel=1e-12)
    assert server_store.query("SELECT sum(length(candidates)) FROM {db}.routing_decisions FINAL") == [
        (sum(len(r["candidates"]) for r in synth.routing_decisions(rows[:300])),)]
