"""Shared pytest fixtures. Keep this file small: helpers live in modules next to it
(``node_fixtures.py`` for site nodes) and are registered here."""

from __future__ import annotations

import pytest

from node_fixtures import make_site, running_node
from history_fixtures import chdb_path, chdb_store, clickhouse_outage_server, clickhouse_server, history_store, server_store  # noqa: F401
from etcd_fixtures import etcd, etcd_prefix, etcd_settings, own_etcd  # noqa: F401
from ctl_fixtures import tandem_cluster  # noqa: F401
from ray_fixtures import ray_local  # noqa: F401


@pytest.fixture
def site():
    """A small test site (see node_fixtures.TEST_SITE)."""
    return make_site()


@pytest.fixture
async def node(tmp_path):
    """An in-process site node on 127.0.0.1:0 with a journal in tmp_path; ``node.stubs``
    holds routing/agents/admin/diag/health stubs."""
    async with running_node(make_site(), tmp_path / "node") as n:
        yield n
