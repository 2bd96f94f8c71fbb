"""A real Prometheus scraping a real mTLS node (issue 10 §4).

One ``tandem node`` process serves its gRPC API and its /metrics over mTLS (``--tls-dir``
and ``--metrics-listen 127.0.0.1:0`` through their environment variables); Prometheus
scrapes it with an identity made by ``tandem certs issue --operator prometheus`` and
loads the shipped rules file. Under a bounded bit of traffic its HTTP API shows the
queue and the gRPC figures, the target is up and the rules are loaded; a scrape without
a client certificate, and a plaintext one, are refused by the node.
"""

from __future__ import annotations

import re
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from node_fixtures import REPO, site_dict, start_node_process
from prometheus_fixtures import prometheus_server
from router.security import pki
from router.v1 import admin_pb2, admin_pb2_grpc, routing_pb2, routing_pb2_grpc
from router.v1 import types_pb2 as t

pytestmark = pytest.mark.timeout(90)

SITE = "promsite"
SERVER_NAME = f"{SITE}.site.tandem"  # the site certificate's DNS SAN
_METRICS = re.compile(rb"tandem node (\S+) metrics on (\S+):(\d+)\s")


def write_site(path: Path) -> Path:
    d = site_dict()
    d["site"]["name"] = SITE
    d["queues"][0]["service_level"] = {"threshold_s": 25, "target": 0.9}  # billing-fr-voice
    path.write_text(yaml.safe_dump(d))
    return path


def https_get(url: str, tls: Path, stem: str | None) -> bytes:
    ctx = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    ctx.check_hostname = True
    if stem is not None:
        ctx.load_cert_chain(str(tls / f"{stem}.crt"), str(tls / f"{stem}.key"))
    host_url = url.replace("127.0.0.1", "localhost")  # localhost is a SAN of the site certificate
    with urllib.request.urlopen(host_url, timeout=5, context=ctx) as r:
        return r.read()


def test_prometheus_scrapes_an_mtls_node(tmp_path):
    tls = tmp_path / "tls"
    pki.init(tls, [(SITE, "in_house")])
    subprocess.run([sys.executable, "-m", "router.cli", "certs", "issue", str(tls), "--operator", "prometheus"],
                   cwd=REPO, check=True, capture_output=True, timeout=60)
    site_file = write_site(tmp_path / "site.yaml")
    node = start_node_process(site_file, tmp_path / "data", sync="none",
                              env={"TANDEM_TLS_DIR": str(tls), "TANDEM_METRICS_LISTEN": "127.0.0.1:0"})
    try:
        m = _METRICS.search(node.log_path.read_bytes())
        assert m and m.group(1).decode() == SITE, node.log()
        metrics_at = f"{m.group(2).decode()}:{int(m.group(3))}"
        url = f"https://{metrics_at}/metrics"

        # Nothing is served without a client certificate of the cluster CA, nor in plaintext.
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            https_get(url, tls, None)
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://{metrics_at}/metrics", timeout=5).read()
        body = https_get(url, tls, "operator-prometheus").decode()
        assert 'tandem_queue_wait_seconds_bucket{le="25.0",queue="billing-fr-voice",site="promsite"}' in body

        # A bounded bit of traffic over mTLS: five calls nobody answers, one refused offer.
        creds = grpc.ssl_channel_credentials((tls / "ca.crt").read_bytes(),
                                             (tls / "operator-admin.key").read_bytes(),
                                             (tls / "operator-admin.crt").read_bytes())
        with grpc.secure_channel(node.address, creds, options=(("grpc.ssl_target_name_override", SERVER_NAME),)) as ch:
            routing = routing_pb2_grpc.RoutingStub(ch)
            for i in range(5):
                r = routing.OfferCall(routing_pb2.OfferCallRequest(
                    call_id=f"p{i}", skill="billing", channel=t.CHANNEL_VOICE, language="fr",
                    caller=f"+3361000000{i}"), timeout=5)
                assert r.call.state == t.CALL_STATE_QUEUED
            with pytest.raises(grpc.RpcError):
                routing.OfferCall(routing_pb2.OfferCallRequest(call_id="bad", skill="astrology",
                                                               channel=t.CHANNEL_VOICE), timeout=5)
            admin_pb2_grpc.AdminStub(ch).GetStatus(admin_pb2.GetStatusRequest(), timeout=5)

        scrape = {
            "job_name": "tandem",
            "scheme": "https",
            "tls_config": {"ca_file": str(tls / "ca.crt"), "cert_file": str(tls / "operator-prometheus.crt"),
                           "key_file": str(tls / "operator-prometheus.key"), "server_name": SERVER_NAME},
            "static_configs": [{"targets": [metrics_at]}],
        }
        rules = str(REPO / "router" / "alerts" / "tandem.rules.yml")
        with prometheus_server(tmp_path / "prom", [scrape], [rules]) as prom:
            deadline = time.monotonic() + 30
            while True:
                targets = prom.targets()
                contacts = prom.query(f'tandem_queue_contacts{{site="{SITE}",queue="billing-fr-voice"}}')
                handled = prom.query('sum(grpc_server_handled_total{grpc_service="router.v1.Routing",'
                                     'grpc_method="OfferCall"}) by (grpc_code)')
                if targets and targets[0]["health"] == "up" and contacts and len(handled) >= 2:
                    break
                assert time.monotonic() < deadline, f"no scrape within 30 s: {targets}\n{prom.log()}"
                time.sleep(0.5)
            assert targets[0]["scrapeUrl"] == url and targets[0]["lastError"] == ""
            assert float(contacts[0]["value"][1]) == 5
            codes = {r["metric"]["grpc_code"]: float(r["value"][1]) for r in handled}
            assert codes["OK"] == 5 and codes["NOT_FOUND"] == 1, codes
            assert {r["name"] for r in prom.rules()} == {
                "ServiceLevelBelowTarget", "OldestContactTooOld", "SiteMemberLost", "PartnerCapReached",
                "EtcdUnreachable", "HistorySpoolGrowing"}
            # the target / SL of the site file, as Prometheus sees them
            target = prom.query(f'tandem_queue_service_level_target{{site="{SITE}",queue="billing-fr-voice"}}')
            assert float(target[0]["value"][1]) == 0.9
    finally:
        node.kill()
