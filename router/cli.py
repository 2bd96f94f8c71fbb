"""Tandem, a multi-site contact-center routing cluster: `tandem node` runs a site node,
`tandem demo` the example cluster under load, `tandem certs` makes the cluster's
identities, `tandem report` and `tandem history` read the interaction history."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=True, no_args_is_help=True, help=__doc__)
from router.history.cli import register as _register_history  # noqa: E402
_register_history(app)  # tandem history …, tandem report …
from router.security.certs_cli import register as _register_certs  # noqa: E402
_register_certs(app)  # tandem certs …
from router.ctl.commands import register as _register_ctl; _register_ctl(app)  # noqa: E402,E702 tandem ctl …, tandem top
from router.ctl.up import register as _register_up  # noqa: E402
_register_up(app)  # tandem up, tandem down
from router.partner.cli import register as _register_partner  # noqa: E402
_register_partner(app)  # tandem partner-sim
from router.capacity.cli import register as _register_capacity  # noqa: E402
_register_capacity(app)  # tandem capacity staff
from router.capacity.rebalancer_cli import register as _register_rebalancer  # noqa: E402
_register_rebalancer(app)  # tandem rebalancer
from router.capacity.validate_cli import register as _register_validate  # noqa: E402
_register_validate(app)  # tandem capacity validate
from router.ctl.plan import register as _register_plan  # noqa: E402
_register_plan()  # tandem ctl plan, tandem ctl apply, tandem ctl get rebalancer


@app.command()
def node(
    site: Path = typer.Option(..., "--site", help="site file (sites/*.yaml)"),
    data_dir: Path = typer.Option(..., "--data-dir", help="journal and snapshots live here"),
    listen: Optional[str] = typer.Option(None, "--listen", help="host:port, overrides the site file"),
    sync: str = typer.Option("fdatasync", "--sync", help="journal sync: fsync|fdatasync|none"),
    etcd: Optional[str] = typer.Option(
        None, "--etcd", envvar="TANDEM_ETCD_ENDPOINTS", metavar="ENDPOINTS",
        help="join the cluster: etcd endpoints, comma-separated host:port (https://… for TLS)",
    ),
    etcd_prefix: Optional[str] = typer.Option(None, "--etcd-prefix", envvar="TANDEM_ETCD_PREFIX",
                                              help="key prefix (default /tandem/)"),
    etcd_ttl: Optional[int] = typer.Option(None, "--etcd-ttl", envvar="TANDEM_ETCD_TTL",
                                           help="membership lease TTL in seconds (default 3)"),
    etcd_ca: Optional[Path] = typer.Option(None, "--etcd-ca", envvar="TANDEM_ETCD_CA", help="CA file (TLS)"),
    etcd_cert: Optional[Path] = typer.Option(None, "--etcd-cert", envvar="TANDEM_ETCD_CERT",
                                             help="client certificate (TLS)"),
    etcd_key: Optional[Path] = typer.Option(None, "--etcd-key", envvar="TANDEM_ETCD_KEY", help="client key (TLS)"),
    advertise: Optional[str] = typer.Option(None, "--advertise", help="host:port peers reach this node at"),
    history: str = typer.Option(
        "off", "--history", envvar="TANDEM_HISTORY", metavar="off|embedded|URL",
        help="interaction history: off, embedded (chdb in DATA_DIR/history) or clickhouse://host:port/db",
    ),
    tls_dir: Optional[Path] = typer.Option(
        None, "--tls-dir", envvar="TANDEM_TLS_DIR",
        help="serve mTLS with DIR/site-SITE.crt|.key and DIR/ca.crt (tandem certs init); also for peers and https etcd",
    ),
    insecure: bool = typer.Option(False, "--insecure", help="allow plaintext on a non-loopback address"),
    metrics_listen: Optional[str] = typer.Option(
        None, "--metrics-listen", envvar="TANDEM_METRICS_LISTEN", metavar="HOST:PORT",
        help="serve Prometheus /metrics on HOST:PORT (port 0: any free one); HTTPS with a client "
             "certificate of the cluster CA required when --tls-dir is given",
    ),
) -> None:
    """Run one site node until SIGTERM/SIGINT (with --etcd: as a member of the cluster).

    Without --tls-dir the node serves plaintext, trusts every caller and keeps no audit
    log: it refuses to listen on anything but loopback unless --insecure is given."""
    from router.node.main import run_node

    cluster = None
    if etcd:
        cluster = {
            "endpoints": tuple(e.strip() for e in etcd.split(",") if e.strip()),
            "prefix": etcd_prefix, "ttl_s": etcd_ttl,
            "ca_file": str(etcd_ca) if etcd_ca else None,
            "cert_file": str(etcd_cert) if etcd_cert else None,
            "key_file": str(etcd_key) if etcd_key else None,
        }
    raise typer.Exit(run_node(site, data_dir, listen=listen, sync=sync, etcd=cluster, advertise=advertise,
                              history=history, tls_dir=tls_dir, insecure=insecure, metrics_listen=metrics_listen))


@app.command()
def demo(
    sites: Path = typer.Option(Path("sites"), "--sites", help="directory of site files"),
    duration: float = typer.Option(40.0, "--duration", help="seconds of traffic per run"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="default: a temp dir"),
    json_out: bool = typer.Option(False, "--json", help="end with one JSON summary line"),
    seed: int = typer.Option(1, "--seed"),
    reference: bool = typer.Option(
        True, "--reference/--no-reference",
        help="also run the same traffic on isolated sites and on all agents pooled (reference figures)",
    ),
    traffic: Optional[Path] = typer.Option(
        None, "--traffic", metavar="FILE",
        help="traffic profile (YAML): per site, streams with rate, handle-time and patience "
             "distributions, caller pool, head starts; example: router/sim/traffic_example.yaml",
    ),
    calls_out: Optional[Path] = typer.Option(
        None, "--calls-out", metavar="FILE",
        help="also write the cluster run's offered calls, one JSON line each (tandem capacity validate reads it)",
    ),
    partners: bool = typer.Option(
        True, "--partners/--no-partners",
        help="play the BPO partners of SITES/partners on the partner API (tandem capacity validate needs --no-partners)",
    ),
) -> None:
    """Start etcd and the example cluster, drive unbalanced traffic (overflow between
    sites), print KPIs per site and queue against the isolated and pooled references."""
    from router.partner.sim import PartnerSim
    from router.sim.demo import run_demo

    # The BPO partners of SITES/partners run as simulated ACDs in the demo's process; the
    # simulator may not import router.partner (same layer), so they are joined here.
    raise typer.Exit(run_demo(sites, duration, data_dir=data_dir, json_out=json_out, seed=seed,
                              reference=reference, traffic=traffic, partner_sim=PartnerSim if partners else None,
                              calls_out=calls_out))


if __name__ == "__main__":
    app()
