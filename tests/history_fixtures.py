"""Fixtures for the history tests: a real clickhouse-server, chdb, stores per test.

* ``clickhouse_server`` (session): a :class:`router.local.clickhouse.ClickHouseServer`
  started on free loopback ports (tcp, http, interserver) in a temp dir with a minimal
  config.xml/users.xml, stopped at exit — or, when ``TANDEM_TEST_CLICKHOUSE_URL`` is set
  (``clickhouse://host:port``), that server, which the tests then never stop.
* ``clickhouse_outage_server`` (module): always our own server, for tests that stop and
  start it (``.stop()``, ``.kill()``, ``.start()``; data survives in its dir).
* ``server_store`` / ``chdb_store`` (function): a store on a database of its own, dropped
  afterwards; ``history_store`` is parametrized over both ("server", "chdb").

The server binary is found as :mod:`router.local.clickhouse` says; without one the
tests fail with a message saying to run ``make deps`` (Debian's ``clickhouse-server``) or
to set the URL.
"""

from __future__ import annotations

import contextlib
import os
import uuid

import pytest

from router.local.clickhouse import ClickHouseServer, ExternalClickHouse, running_clickhouse  # noqa: F401


def unique_database(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def clickhouse_server(tmp_path_factory):
    url = os.environ.get("TANDEM_TEST_CLICKHOUSE_URL")
    if url:
        yield ExternalClickHouse(url)
        return
    with running_clickhouse(tmp_path_factory.mktemp("clickhouse")) as srv:
        yield srv


@pytest.fixture(scope="module")
def clickhouse_outage_server(tmp_path_factory):
    with running_clickhouse(tmp_path_factory.mktemp("clickhouse-outage")) as srv:
        yield srv


@pytest.fixture
def server_store(clickhouse_server):
    from router.history.store import ClickHouseServerStore

    store = ClickHouseServerStore(clickhouse_server.store_url(unique_database()))
    store.migrate()
    yield store
    with contextlib.suppress(Exception):
        store.query("DROP DATABASE IF EXISTS {db}")
    store.close()


@pytest.fixture(scope="session")
def chdb_path(tmp_path_factory):
    """chdb's directory for the whole run (one path per process), kept open by a store
    of its own so tests do not reopen the engine."""
    from router.history.store import ChdbStore

    path = tmp_path_factory.mktemp("chdb")
    keeper = ChdbStore(path, database="keeper")
    yield path
    keeper.close()


@pytest.fixture
def chdb_store(chdb_path):
    from router.history.store import ChdbStore

    store = ChdbStore(chdb_path, database=unique_database())
    store.migrate()
    yield store
    with contextlib.suppress(Exception):
        store.query("DROP DATABASE IF EXISTS {db}")
    store.close()


@pytest.fixture(params=["server", "chdb"])
def history_store(request):
    """A migrated store on each backend, on a database of its own."""
    name = "server_store" if request.param == "server" else "chdb_store"
    return request.getfixturevalue(name)
