"""Stores and migrations: the same schema and SQL on clickhouse-server 18.16 and chdb."""

from __future__ import annotations

import sys

import pytest

from router.history import schema
from router.history.store import ChdbStore, StoreError, literal, open_store, render


def test_migrations_are_idempotent_and_recorded(history_store):
    assert history_store.migrate() == []  # the fixture migrated already
    assert history_store.applied_versions() == [m.version for m in schema.MIGRATIONS]
    rows = history_store.query("SELECT version, name FROM {db}.schema_migrations FINAL ORDER BY version")
    assert [r[0] for r in rows] == [m.version for m in schema.MIGRATIONS]


def test_schema_matches_the_column_lists(history_store):
    """The literal DDL of the migrations and TABLES (what the writer inserts) agree."""
    for table, cols in schema.TABLES.items():
        got = history_store.query(f"DESCRIBE TABLE {{db}}.{table}")
        assert [(r[0], r[1]) for r in got] == [(c.name, c.type) for c in cols], table


def test_replacing_keys_on_both_engines(history_store):
    """A replayed row and a corrected row: FINAL shows one row per key, the higher ver."""
    cols = [c.name for c in schema.INTERACTIONS]
    base = {c.name: c.default for c in schema.INTERACTIONS}
    base.update(interaction_id="k1", ver=1, offered_at=1_790_000_000, csat=2, outcome="completed")
    newer = dict(base, ver=2, csat=5)
    for row in (base, base, newer, base):
        history_store.insert("interactions", cols, [[row[c]] for c in cols])
    assert history_store.query("SELECT count(), max(csat) FROM {db}.interactions FINAL") == [(1, 5)]
    (raw,), = history_store.query("SELECT count() FROM {db}.interactions")
    assert raw == 4


def test_migrate_from_scratch_on_the_server(clickhouse_server):
    from history_fixtures import unique_database

    store = open_store(clickhouse_server.store_url(unique_database("mig")))
    try:
        assert store.applied_versions() == []  # no database yet
        assert store.migrate() == [m.version for m in schema.MIGRATIONS]
        assert store.migrate() == []
        assert store.ping()
    finally:
        store.query("DROP DATABASE IF EXISTS {db}")
        store.close()


def test_errors_are_classified(history_store):
    with pytest.raises(StoreError) as e:
        history_store.query("SELECT no_such_column FROM {db}.interactions")
    assert e.value.code == 47
    with pytest.raises(StoreError):
        history_store.insert("interactions", ["interaction_id", "nope"], [["a"], [1]])


def test_render_and_literal():
    assert literal("it's a \\ test") == "'it\\'s a \\\\ test'"
    assert literal([1, 2.5, "x"]) == "[1, 2.5, 'x']"
    assert literal(True) == "1"
    with pytest.raises(ValueError):
        literal(float("nan"))
    with pytest.raises(TypeError):
        literal(object())
    assert render("SELECT {a} FROM {db}.t", "tandem", {"a": "x"}) == "SELECT 'x' FROM tandem.t"
    with pytest.raises(KeyError):
        render("SELECT {missing}", "db")


def test_open_store_picks_the_backend(chdb_path):
    s = open_store(chdb_path)  # the same path as the session's chdb: shared
    try:
        assert isinstance(s, ChdbStore) and s.ping()
    finally:
        s.close()
    with pytest.raises(ValueError):
        open_store("clickhouse://127.0.0.1:9000/bad-name!")


def test_one_chdb_path_per_process(chdb_path, tmp_path):
    with pytest.raises(StoreError, match="already open"):
        ChdbStore(tmp_path / "other")


def test_importing_history_does_not_import_chdb():
    import subprocess

    code = ("import sys, router.history.writer, router.history.kpi, router.history.rows, "
            "router.history.recent, router.history.cli, router.cli; "
            "print('chdb' in sys.modules, 'clickhouse_driver' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
