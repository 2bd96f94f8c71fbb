"""``tandem node``: run one site node in the foreground until SIGTERM / SIGINT.

Prints one line ``tandem node <site> listening on <host>:<port>`` on stdout once it
serves (tools and tests parse the port from it).

Environment: ``TANDEM_DRAIN_S`` (seconds of drain after SIGTERM, default 2),
``TANDEM_METRICS_PORT`` (serve Prometheus metrics on 127.0.0.1:PORT; ``--metrics-listen``
HOST:PORT, env ``TANDEM_METRICS_LISTEN``, takes precedence: the node then prints
``tandem node <site> metrics on <host>:<port>``; with ``--tls-dir`` the endpoint is
HTTPS and requires a client certificate of the cluster CA), ``TANDEM_ALERT_RULES`` (a
rule file replacing the packaged alert rules, see :mod:`router.alerts`),
``TANDEM_LOG_LEVEL`` (default INFO), ``TANDEM_HISTORY`` (= ``--history``: off,
embedded or a clickhouse:// URL; see :mod:`router.node.history_link`) and
``TANDEM_HISTORY_LOOKUP_MS`` (the repeat-caller look-up's bound, default 20),
``TANDEM_COMPACT_EVERY`` (journal records between snapshots, default 20000). With etcd endpoints (``--etcd`` or
``TANDEM_ETCD_ENDPOINTS``) the node joins the cluster (:mod:`router.node.cluster`):
it registers, publishes its load and overflows queued calls; etcd being down never
delays its start nor its routing. Exit codes: 0 after a clean shutdown,
1 when the node failed (journal error, recovery error, address in use), 2 for a bad
site file.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from pathlib import Path

from router.config import ConfigError, load_site

log = logging.getLogger("tandem.node")


# The node holds every retained call (up to routing.ended_call_retention) in memory and
# allocates a few short-lived containers per message: with the default thresholds
# (700, 10, 10) the collector ran every few hundred calls (≈ 10 % of the node's CPU).
GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc() -> None:
    """After recovery: freeze what it built (the collector never walks it again) and
    collect the young generations less often. Cycles are still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _url_address(url: str) -> str:
    """``clickhouse://user@host:port/db?x`` -> ``host:port``."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.hostname or ''}:{parts.port or 0}"


def _host_of(address: str) -> str:
    host = address.rsplit(":", 1)[0]
    return host or "127.0.0.1"


async def serve(
    site, data_dir: Path, listen: str, sync: str, drain_s: float, etcd=None, advertise: str | None = None,
    history: str = "off", security=None, metrics_listen: str | None = None,
) -> int:
    from router.node.server import RecoveryError, build_node

    # The handlers go in first: a SIGTERM while the node starts (systemd restarting a unit
    # it has just started) then stops it the clean way once it is up. With the default
    # action it died at once and left its history insert processes to systemd's SIGKILL,
    # which in a container waits out the whole stop timeout and marks the unit failed.
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        node, port = await build_node(site, data_dir, listen, sync=sync, drain_s=drain_s, security=security)
    except (RecoveryError, RuntimeError, OSError) as e:
        print(f"tandem node {site.site.name}: {e}", file=sys.stderr, flush=True)
        return 1
    except Exception as e:  # noqa: BLE001 - e.g. JournalError: data dir in use, JournalCorrupt
        print(f"tandem node {site.site.name}: cannot start: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    if os.environ.get("TANDEM_COMPACT_EVERY"):  # journal records between compactions (benchmarks)
        node.compact_every = int(os.environ["TANDEM_COMPACT_EVERY"])
    link = None
    if history != "off":
        from router.node.history_link import HistoryLink

        try:
            link = HistoryLink.open(node, history, data_dir, tls=security.tls if security is not None else None)
        except Exception as e:  # noqa: BLE001 - e.g. chdb path in use, bad URL
            print(f"tandem node {site.site.name}: history: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            await node.stop(grace=0)
            return 1
        if security is not None:
            security.attach_history(link.writer.submit)  # audit rows reach ClickHouse too
    tune_gc()
    if metrics_listen is None and os.environ.get("TANDEM_METRICS_PORT"):
        metrics_listen = f"127.0.0.1:{os.environ['TANDEM_METRICS_PORT']}"
    metrics_at = None
    if metrics_listen:
        try:
            metrics_at = serve_metrics(metrics_listen, security)
        except (OSError, ValueError) as e:
            print(f"tandem node {site.site.name}: metrics on {metrics_listen}: {e}", file=sys.stderr, flush=True)
            await node.stop(grace=0)
            if link is not None:
                await link.aclose()
            return 1
    # the gauges and the in-app alerts are refreshed once a second, served or not
    await node.start(publish_metrics=True)
    cluster = None
    if etcd is not None:
        from router.node.cluster import ClusterLink, advertised_address

        cluster = ClusterLink(node, etcd, advertise=advertise or advertised_address(listen, port))
        if security is not None and security.tls is not None:
            # bindings stored in etcd take over from the TLS dir's file (hot reload)
            cluster.coord.watch_document("bindings", cluster.coord.keys.security_bindings, security.bindings.set_etcd)
        await cluster.start()
        node.cluster = cluster
        if link is not None:
            link.attach_cluster(cluster)
    if metrics_at is not None:
        print(f"tandem node {site.site.name} metrics on {metrics_at}", flush=True)
    print(f"tandem node {site.site.name} listening on {_host_of(listen)}:{port}", flush=True)

    stopper = asyncio.create_task(stop.wait())
    stopped = asyncio.create_task(node.wait_stopped())
    await asyncio.wait({stopper, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set() and not node.stopped.is_set():
        log.info("signal received: draining for %.1f s", node.drain_s)
        if cluster is not None:
            await cluster.close()  # leave the cluster first: peers stop sending calls
        await node.shutdown()
    await node.wait_stopped()
    if cluster is not None:
        await cluster.close()
    if link is not None:
        await link.aclose()
    if security is not None:
        await security.aclose()
    stopper.cancel()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    if node.failed is not None:
        print(f"tandem node {site.site.name}: stopped after a failure: {node.failed!r}", file=sys.stderr, flush=True)
        return 1
    return 0


def serve_metrics(listen: str, security=None) -> str:
    """Start the /metrics endpoint on ``listen`` (HOST:PORT, port 0 = any free one);
    returns the bound HOST:PORT. With mTLS (``security.tls``) it is HTTPS with the
    site's certificate and requires a client certificate of the cluster CA."""
    from router.node import metrics

    host, sep, port_s = listen.rpartition(":")
    if not sep or not port_s.isdigit():
        raise ValueError("expected HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    tls = security.tls if security is not None else None
    if tls is not None:
        port = metrics.serve(int(port_s), host, certfile=str(tls.cert_path), keyfile=str(tls.key_path),
                             client_cafile=str(tls.ca_path))
    else:
        port = metrics.serve(int(port_s), host)
    return f"{host}:{port}"


def run_node(
    site_path, data_dir, listen: str | None = None, sync: str = "fdatasync", *,
    etcd: dict | None = None, advertise: str | None = None, history: str | None = "off",
    tls_dir: str | Path | None = None, insecure: bool = False, metrics_listen: str | None = None,
) -> int:
    """Load the site file and serve until a signal. Returns the process exit code.

    ``etcd``: keyword arguments of :class:`router.coord.EtcdSettings` (``endpoints``,
    ``prefix``, ``ttl_s``, ``ca_file``, ``cert_file``, ``key_file``); None = no cluster.
    ``advertise``: the host:port peers reach this node at (default: the listening one).
    ``tls_dir``: serve mTLS (see :mod:`router.security.site`); without it the node refuses
    a non-loopback address unless ``insecure``.
    """
    try:
        site = load_site(site_path)
    except ConfigError as e:
        print(str(e), file=sys.stderr, flush=True)
        return 2
    if sync not in ("fsync", "fdatasync", "none"):
        print(f"--sync must be fsync, fdatasync or none, got {sync!r}", file=sys.stderr, flush=True)
        return 2
    logging.basicConfig(
        level=os.environ.get("TANDEM_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    address = listen or site.site.listen
    from router.security.tls import TlsConfigError, is_loopback

    if metrics_listen is None and os.environ.get("TANDEM_METRICS_LISTEN"):
        metrics_listen = os.environ["TANDEM_METRICS_LISTEN"]
    if tls_dir is None and not insecure and metrics_listen and not is_loopback(metrics_listen):
        print(f"tandem node {site.site.name}: refusing plaintext metrics on {metrics_listen}, which is not "
              "loopback: give --tls-dir DIR, or --insecure", file=sys.stderr, flush=True)
        return 2
    if tls_dir is None and not insecure and not is_loopback(address):
        print(f"tandem node {site.site.name}: refusing plaintext on {address}, which is not loopback: "
              "give --tls-dir DIR (tandem certs init), or --insecure", file=sys.stderr, flush=True)
        return 2
    from router.security.site import NodeSecurity

    try:
        security = NodeSecurity.open(site.site.name, data_dir, tls_dir)
    except (TlsConfigError, OSError) as e:
        print(f"tandem node {site.site.name}: TLS: {e}", file=sys.stderr, flush=True)
        return 2
    settings = None
    if etcd is not None:
        from pydantic import ValidationError

        from router.coord import EtcdSettings

        if tls_dir is not None and EtcdSettings.wants_tls(etcd.get("endpoints") or (), etcd.get("ca_file"),
                                                          etcd.get("cert_file")):
            # the site's own identity for etcd too, unless other files are given
            etcd = dict(etcd)
            etcd["ca_file"] = etcd.get("ca_file") or str(Path(tls_dir) / "ca.crt")
            if not etcd.get("cert_file") and not etcd.get("key_file"):  # a pair, never half of each
                etcd["cert_file"], etcd["key_file"] = str(security.tls.cert_path), str(security.tls.key_path)
        try:
            settings = EtcdSettings(**{k: v for k, v in etcd.items() if v is not None})
        except ValidationError as e:
            print(f"bad etcd options: {e}", file=sys.stderr, flush=True)
            return 2
    from router.node.history_link import history_spec

    try:
        history = history_spec(history)
    except ValueError as e:
        print(str(e), file=sys.stderr, flush=True)
        return 2
    if not insecure:
        # An mTLS node does not talk plaintext to etcd or ClickHouse across a network.
        plain = []
        if settings is not None and not settings.tls:
            plain = [e for e in settings.endpoints if not is_loopback(str(e).split("://")[-1])]
        if history.startswith("clickhouse://") and not is_loopback(_url_address(history)):
            plain.append(history.split("?")[0])
        if tls_dir is not None and plain:
            print(f"tandem node {site.site.name}: refusing plaintext to {', '.join(plain)} (not loopback): "
                  "use https:// etcd endpoints and a clickhouses:// history, or --insecure", file=sys.stderr, flush=True)
            return 2
    drain_s = float(os.environ.get("TANDEM_DRAIN_S", "2.0"))
    import uvloop

    return uvloop.run(serve(site, Path(data_dir), address, sync, drain_s, settings, advertise, history,
                            security if security.tls is not None else None, metrics_listen))
