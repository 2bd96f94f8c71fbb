"""``tandem up`` / ``tandem down`` with real processes (etcd over mTLS, nodes, the traffic
player), run as the ``tandem`` command from a directory that is not the repository's root.

The module's cluster (``tandem_cluster``, tests/ctl_fixtures.py) plays the demo's traffic;
the journal test starts its own one-site cluster without traffic (and without history,
to be quick) in its own data dir, so it can stop it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ctl_fixtures import ENV, tandem, tandem_up
from router.ctl import context, runstate
from router.local.nodes import spawn_node, stop_nodes, wait_listening
from router.security.tls import ChannelFactory, TlsFiles
from router.sim.demo import example_sites_dir
from router.v1 import admin_pb2, admin_pb2_grpc, routing_pb2, routing_pb2_grpc, types_pb2

EXAMPLE_SITES = {"lyon", "montreal", "callpro"}


async def test_context_file_is_valid_and_its_nodes_answer_over_mtls(tandem_cluster):
    c = tandem_cluster
    cf = context.load(c.context)
    assert cf.current_context == "local"
    ctx = cf.current()
    assert set(ctx.sites) == EXAMPLE_SITES
    assert ctx.identity == "operator-admin" and ctx.secure
    assert ctx.tls_dir == c.data_dir / "tls" and (ctx.tls_dir / "operator-admin.crt").exists()
    assert ctx.data_dir == c.data_dir
    assert set(ctx.metrics) == EXAMPLE_SITES  # every node's Prometheus endpoint
    try:
        for site, address in ctx.sites.items():
            assert address.startswith("127.0.0.1:")
            ch = c.channel(site)  # operator-admin; the server must prove it is site/SITE
            h = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert h.status == health_pb2.HealthCheckResponse.SERVING
            st = await admin_pb2_grpc.AdminStub(ch).GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
            assert st.site == site and st.serving
    finally:
        await c.close_channels()
    assert "export TANDEM_CONTEXT=" + str(c.context) in c.output and "tandem down --data-dir" in c.output


async def test_a_plaintext_client_is_refused(tandem_cluster):
    for site, address in tandem_cluster.sites.items():
        async with grpc.aio.insecure_channel(address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await admin_pb2_grpc.AdminStub(ch).GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, site


async def test_traffic_flows_at_several_sites(tandem_cluster):
    """Within a few seconds, calls arrive at (at least) two sites and agents are READY or busy."""
    c = tandem_cluster

    async def totals() -> dict[str, int]:
        out = {}
        for site in c.sites:
            st = await admin_pb2_grpc.AdminStub(c.channel(site)).GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
            out[site] = sum(st.calls_by_state.values())
        return out

    try:
        first = await totals()
        deadline = time.monotonic() + 15
        grew: set[str] = set()
        while time.monotonic() < deadline and len(grew) < 2:
            await asyncio.sleep(0.5)
            now = await totals()
            grew = {s for s in now if now[s] > first[s]}
        assert len(grew) >= 2, (first, now, (c.data_dir / "traffic.log").read_text()[-2000:])
        st = await admin_pb2_grpc.AdminStub(c.channel("montreal")).GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
        signed_in = sum(n for state, n in st.agents_by_state.items() if state != "signed_out")
        assert signed_in > 0, dict(st.agents_by_state)  # the simulated desktops
    finally:
        await c.close_channels()
    assert "offering calls" in (c.data_dir / "traffic.log").read_text()


def test_up_twice_on_the_same_dir_refuses(tandem_cluster):
    c = tandem_cluster
    before = c.pids()
    r = tandem("up", "--data-dir", str(c.data_dir), "--traffic", cwd=c.cwd, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "already runs" in r.stderr and "tandem down" in r.stderr
    assert c.pids() == before
    doc = runstate.load(c.data_dir)
    assert len(runstate.running(doc)) == len(before) == 1 + len(EXAMPLE_SITES) + 2  # etcd, nodes, rebalancer, traffic


def test_down_with_nothing_running_exits_0(tmp_path):
    r = tandem("down", "--data-dir", str(tmp_path / "never-made"), cwd=tmp_path, timeout=30)
    assert r.returncode == 0 and "nothing running" in r.stderr, r.stdout + r.stderr


async def test_down_stops_every_process_and_queued_calls_stay_in_the_journal(tmp_path):
    sites = tmp_path / "sites"
    sites.mkdir()
    shutil.copy(example_sites_dir() / "lyon.yaml", sites)
    d = tmp_path / "one"
    ids = [f"kept-{i}" for i in range(3)]
    with tandem_up(d, "--sites", str(sites), "--history", "off", cwd=tmp_path / "cwd") as c:
        assert set(c.sites) == {"lyon"}
        gw = routing_pb2_grpc.RoutingStub(c.channel("lyon", "agents-lyon"))  # the site's agents gateway
        for cid in ids:  # nobody is signed in at lyon: the calls wait in the queue
            r = await gw.OfferCall(routing_pb2.OfferCallRequest(
                call_id=cid, skill="billing", channel=types_pb2.CHANNEL_VOICE, language="fr",
                caller="+33611111111"), timeout=5)
            assert r.call.state == types_pb2.CALL_STATE_QUEUED
        await c.close_channels()
        pids = c.pids()
        assert set(pids) == {"etcd", "node lyon", "rebalancer"}
        doc = runstate.load(d)
        r = tandem("down", "--data-dir", str(d), cwd=c.cwd, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "node lyon" in r.stdout and "etcd" in r.stdout and "rebalancer" in r.stdout
        assert not any(runstate.alive(pid, marker) for _, pid, marker in runstate.processes(doc))
        assert runstate.load(d) is None

    # The node alone again, on its data dir (no etcd needed): it recovers from its journal.
    node = spawn_node(d / "sites" / "lyon.yaml", d / "nodes" / "lyon",
                      extra_args=["--tls-dir", str(d / "tls"), "--history", "off"], env=dict(os.environ, **ENV))
    try:
        wait_listening([node], 60)
        f = ChannelFactory(TlsFiles(d / "tls", "agents-lyon"))
        gw = routing_pb2_grpc.RoutingStub(f.channel(node.address, f.expect("site", "lyon")))
        try:
            for cid in ids:  # the same calls, still waiting in the queue
                r = await gw.GetCall(routing_pb2.GetCallRequest(call_id=cid), timeout=5)
                assert r.call.state == types_pb2.CALL_STATE_QUEUED, cid
        finally:
            await f.close_all()
    finally:
        stop_nodes([node], 10)


def test_the_example_sites_ship_with_the_package(tmp_path, monkeypatch):
    """`tandem up` and `tandem demo` find the example cluster from any directory: the
    package's copy (setup.py puts the top-level sites/ into router/sim/sites), or the
    source tree's in an editable install."""
    from router.sim.demo import sites_or_example

    d = example_sites_dir()
    assert {p.stem for p in d.glob("*.yaml")} == EXAMPLE_SITES and (d / "overflow-policy.json").exists()
    monkeypatch.chdir(tmp_path)  # no sites/ here
    assert sites_or_example(Path("sites")) == d
    (tmp_path / "sites").mkdir()
    assert sites_or_example(Path("sites")) == Path("sites")  # one of our own wins
    assert sites_or_example(tmp_path / "mine") == tmp_path / "mine"
