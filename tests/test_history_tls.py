"""ClickHouse over TLS on the native protocol (issue 8), on a real Debian 18.16 server
started TLS-only (:mod:`router.local.clickhouse` with ``tls_dir``): the URL's ``ca=``,
``cert=``, ``key=`` become clickhouse-driver's options and never reach a message; the
writer (its insert processes included) and the store insert and read back over TLS; a
client without a certificate of the cluster's CA, a client that does not trust the
server, and a plaintext client are refused; no plaintext port is served; a ``tandem
node --tls-dir`` writes its interaction and audit rows with its own identity."""

from __future__ import annotations

import asyncio
import os
import ssl
import urllib.request
from pathlib import Path

import pytest

from history_fixtures import unique_database
from node_fixtures import node_process, write_site
from router.history import synth
from router.history.store import ClickHouseServerStore, StoreUnavailable, shown_url, tls_params
from router.history.writer import HistoryWriter
from router.local.clickhouse import SERVER_STEM, running_clickhouse
from router.security import pki
from router.security.spiffe import SpiffeId
from router.security.tls import ChannelFactory, TlsFiles
from router.v1 import routing_pb2, routing_pb2_grpc
from router.v1 import types_pb2 as t

pytestmark = pytest.mark.timeout(120)

SITE = "testsite"  # the site of node_fixtures.TEST_SITE


@pytest.fixture(scope="module")
def tls_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """The cluster's TLS directory and another cluster's (another CA, the same names)."""
    root = tmp_path_factory.mktemp("ch-pki")
    pki.init(root / "tls", [(SITE, "in_house")])
    pki.init(root / "other", [(SITE, "in_house")])
    return root / "tls", root / "other"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, tls_dirs):
    with running_clickhouse(tmp_path_factory.mktemp("clickhouse-tls"), tls_dir=tls_dirs[0]) as srv:
        yield srv


def url_of(srv, database: str, *, ca: Path | None = None, stem: str | None = None,
           scheme: str = "clickhouses") -> str:
    """A URL of ``srv``: ``ca=`` the given bundle, ``cert=``/``key=`` the pair ``stem``
    beside it."""
    query = [f"ca={ca}"] if ca is not None else []
    if stem is not None:
        assert ca is not None
        query += [f"cert={ca.parent / stem}.crt", f"key={ca.parent / stem}.key"]
    return f"{scheme}://127.0.0.1:{srv.tcp_port}/{database}" + ("?" + "&".join(query) if query else "")


def test_url_parameters_are_the_drivers_tls_options_and_stay_out_of_messages(tls_dirs):
    tls, other = tls_dirs
    url = (f"clickhouses://bob:secret@127.0.0.1:1/hist?ca={tls}/ca.crt"
           f"&cert={tls}/site-{SITE}.crt&key={tls}/site-{SITE}.key")
    store = ClickHouseServerStore(url)
    conn = store._client.connection
    assert (conn.secure_socket, conn.verify_cert, conn.check_hostname) == (True, True, True)
    assert conn.ssl_options == {"ca_certs": f"{tls}/ca.crt", "certfile": f"{tls}/site-{SITE}.crt",
                                "keyfile": f"{tls}/site-{SITE}.key"}
    assert store.url == shown_url(url) == "clickhouses://bob@127.0.0.1:1/hist"
    spec_url, kw = store.spec()  # what the insert processes get: the files as keywords
    assert spec_url == store.url and kw["key"] == f"{tls}/site-{SITE}.key" and kw["password"] == "secret"
    with pytest.raises(StoreUnavailable) as err:  # nothing listens on port 1
        store.query("SELECT 1")
    assert "?" not in str(err.value) and ".key" not in str(err.value) and "secret" not in str(err.value)
    store.close()
    # plain clickhouses://: the system's CAs, no client certificate; the secure default port
    plain = ClickHouseServerStore("clickhouses://db.example/hist")
    assert plain._client.connection.ssl_options.get("ca_certs") == ssl.get_default_verify_paths().cafile
    assert "certfile" not in plain._client.connection.ssl_options
    assert list(plain._client.connection.hosts) == [("db.example", 9440)]
    assert tls_params("clickhouses://h/x?ca=%2Fa%20b") == {"ca": "/a b"}
    for bad in (f"clickhouse://h/x?ca={tls}/ca.crt",  # TLS files on a plaintext URL
                "clickhouses://h/x?cafile=/etc/ssl/ca.pem",  # a typo must not fall back to system CAs
                f"clickhouses://h/x?key={tls}/site-{SITE}.key",  # a key without its certificate
                f"clickhouses://h/x?ca={tls}/site-{SITE}.key",  # not a CA bundle
                f"clickhouses://h/x?cert={tls}/site-{SITE}.crt&key={other}/site-{SITE}.key"):  # not its key
        with pytest.raises(ValueError) as err:
            ClickHouseServerStore(bad)
        assert "?" not in str(err.value) and "PRIVATE KEY" not in str(err.value), str(err.value)


def test_the_writer_and_the_store_over_tls(tls_server, tmp_path):
    assert tls_server.url.startswith(f"clickhouses://127.0.0.1:{tls_server.tcp_port}?ca=")
    store = ClickHouseServerStore(tls_server.store_url(unique_database("tls")))
    try:
        rows = synth.interactions(3000, seed=5)
        # two insert processes opened from store.spec(): TLS files passed as keywords
        with HistoryWriter(store, tmp_path / "spool", batch_rows=1000, flush_interval_s=0.1) as w:
            for r in rows:
                w.submit("interactions", r)
            assert w.flush(30)
            st = w.stats()
        assert st.inserted == 3000 and st.spooled == 0 and st.rejected_rows == 0
        (n, ids), = store.query("SELECT count(), uniqExact(interaction_id) FROM {db}.interactions FINAL")
        assert (n, ids) == (3000, len({r["interaction_id"] for r in rows}))
        sock = store._client.connection.socket
        assert isinstance(sock, ssl.SSLSocket) and sock.version() in ("TLSv1.2", "TLSv1.3")
        assert sock.getpeercert()["subject"] == ((("organizationName", "Tandem"),),
                                                 (("commonName", "local.clickhouse.tandem"),))
        store.query("DROP DATABASE IF EXISTS {db}")
    finally:
        store.close()


@pytest.mark.parametrize("case", ["other CA's client certificate", "no client certificate",
                                  "server of another CA", "system CAs", "plaintext native protocol"])
def test_refused(tls_server, tls_dirs, case):
    tls, other = tls_dirs
    url = {
        "other CA's client certificate": url_of(tls_server, "r", ca=tls / "ca.crt")
        + f"&cert={other}/site-{SITE}.crt&key={other}/site-{SITE}.key",
        "no client certificate": url_of(tls_server, "r", ca=tls / "ca.crt"),
        "server of another CA": url_of(tls_server, "r", ca=other / "ca.crt")
        + f"&cert={tls}/site-{SITE}.crt&key={tls}/site-{SITE}.key",
        "system CAs": url_of(tls_server, "r"),
        "plaintext native protocol": url_of(tls_server, "r", scheme="clickhouse"),
    }[case]
    store = ClickHouseServerStore(url, connect_timeout=2.0, send_receive_timeout=3.0)
    try:
        with pytest.raises(StoreUnavailable) as err:
            store.query("SELECT 1")
        assert "?" not in str(err.value) and ".key" not in str(err.value)
    finally:
        store.close()
    # and the same server answers the cluster's own identity meanwhile
    good = ClickHouseServerStore(url_of(tls_server, "r", ca=tls / "ca.crt", stem=f"site-{SITE}"))
    try:
        assert good.query("SELECT 1") == [(1,)]
    finally:
        good.close()


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (its socket inodes in /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_no_plaintext_port_is_served(tls_server, tls_dirs):
    config = (tls_server.dir / "config.xml").read_text()
    for element in ("<tcp_port>", "<http_port>", "<interserver_http_port>"):
        assert element not in config
    assert "<verificationMode>strict</verificationMode>" in config
    assert "<loadDefaultCAFile>false</loadDefaultCAFile>" in config
    assert listening_ports(tls_server.proc.pid) == {tls_server.tcp_port, tls_server.http_port}
    # HTTP answers over TLS only, and only to a client certificate of the CA
    tls = tls_dirs[0]
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{tls_server.http_port}/ping", timeout=3).read()
    ctx = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    with pytest.raises(OSError):
        urllib.request.urlopen(f"https://127.0.0.1:{tls_server.http_port}/ping", timeout=3, context=ctx).read()
    ctx.load_cert_chain(str(tls / f"{SERVER_STEM}.crt"), str(tls / f"{SERVER_STEM}.key"))
    with urllib.request.urlopen(f"https://127.0.0.1:{tls_server.http_port}/ping", timeout=3, context=ctx) as r:
        assert r.read().strip() == b"Ok."


async def offer_and_abandon(tls: Path, address: str, call_id: str) -> int:
    """One call offered and abandoned through the node's mTLS API, as operator admin."""
    channels = ChannelFactory(TlsFiles(tls, "operator-admin"))
    try:
        routing = routing_pb2_grpc.RoutingStub(channels.channel(address, SpiffeId("tandem", "site", SITE)))
        r = await routing.OfferCall(routing_pb2.OfferCallRequest(
            call_id=call_id, skill="billing", channel=t.CHANNEL_VOICE, language="fr", caller="+33700001234"),
            timeout=10)
        assert r.call.state == t.CallState.CALL_STATE_QUEUED, r
        r = await routing.AbandonCall(routing_pb2.AbandonCallRequest(call_id=call_id), timeout=10)
        return r.call.state
    finally:
        await channels.close_all()


def test_a_node_with_a_tls_dir_writes_its_history_over_tls(tls_server, tls_dirs, tmp_path):
    tls = tls_dirs[0]
    url = url_of(tls_server, unique_database("node"))  # no ca=: the node's own identity
    site = write_site(tmp_path / "site.yaml")
    env = {"TANDEM_HISTORY": url, "TANDEM_TLS_DIR": str(tls), "TANDEM_DRAIN_S": "0.2"}
    with node_process(site, tmp_path / "n", env=env) as np:
        state = asyncio.run(offer_and_abandon(tls, np.address, "tls-1"))
        assert state == t.CallState.CALL_STATE_ABANDONED
        assert np.terminate() == 0, np.log()
    log = np.log()
    assert f"history at clickhouses://127.0.0.1:{tls_server.tcp_port}/" in log, log
    assert ".key" not in log and "?ca=" not in log
    store = ClickHouseServerStore(url_of(tls_server, url.rsplit("/", 1)[1], ca=tls / "ca.crt", stem=f"site-{SITE}"))
    try:
        assert store.query("SELECT interaction_id, outcome FROM {db}.interactions FINAL") == [("tls-1", "abandoned")]
        (audited,), = store.query("SELECT count() FROM {db}.audit FINAL WHERE identity = {i}",
                                  {"i": "spiffe://tandem/operator/admin"})
        assert audited >= 2  # the offer and the abandon: audit rows take the same TLS path
        store.query("DROP DATABASE IF EXISTS {db}")
    finally:
        store.close()
