"""``tandem rebalancer``: run one rebalancer process (campaigns; the leader serves plans and
applies them; ``--auto-every-min`` re-plans and applies on its own)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

DEFAULT_LISTEN = "127.0.0.1:7190"


def rebalancer_command(
    sites: Path = typer.Option(Path("sites"), "--sites", help="directory of the cluster's site files"),
    etcd: str = typer.Option(..., "--etcd", envvar="TANDEM_ETCD_ENDPOINTS", metavar="ENDPOINTS",
                             help="etcd endpoints, comma-separated host:port (https://… for TLS)"),
    etcd_prefix: Optional[str] = typer.Option(None, "--etcd-prefix", envvar="TANDEM_ETCD_PREFIX",
                                              help="key prefix (default /tandem/)"),
    tls_dir: Optional[Path] = typer.Option(None, "--tls-dir", envvar="TANDEM_TLS_DIR", metavar="DIR",
                                           help="serve mTLS and reach etcd with DIR/rebalancer-IDENTITY.crt|.key and DIR/ca.crt"),
    identity: str = typer.Option("rebalancer", "--identity", help="rebalancer identity name (its certificate in --tls-dir)"),
    data_dir: Path = typer.Option(Path("rebalancer-data"), "--data-dir", help="where the audit log is kept (mTLS)"),
    listen: str = typer.Option(DEFAULT_LISTEN, "--listen", help="host:port of the Rebalancer gRPC service"),
    traffic: Optional[Path] = typer.Option(None, "--traffic", metavar="FILE",
                                           help="expected traffic (YAML of streams, as tandem capacity whatif); "
                                                "default: the example traffic"),
    horizon_s: float = typer.Option(1800.0, "--horizon-s", min=60, max=86400, help="simulated horizon of a plan"),
    replications: int = typer.Option(3, "--replications", min=1, max=64, help="seeds per candidate"),
    auto_every_min: Optional[float] = typer.Option(None, "--auto-every-min", min=0.01,
                                                   help="auto mode: re-plan (and apply a better plan) this often"),
    min_gain: float = typer.Option(0.005, "--min-gain", min=0, max=1,
                                   help="auto mode applies a plan only if its cluster SL gain is at least this"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS",
                                              help="an existing Ray cluster (default: a local Ray on loopback)"),
    serial: bool = typer.Option(False, "--serial", help="simulate candidates in this process, without Ray"),
    partners: Optional[Path] = typer.Option(None, "--partners", metavar="DIR",
                                            help="partner contracts (prices; default: SITES/partners)"),
) -> None:
    """Run a rebalancer: campaign for leadership (one leader at a time, etcd election);
    the leader answers tandem ctl plan / tandem ctl apply and, with --auto-every-min,
    applies better plans on its own. Plans are applied as fenced targets in etcd."""
    from router.capacity.planner import make_planner, load_streams
    from router.capacity.rebalancer import Rebalancer
    from router.capacity.service import serve_rebalancer
    from router.config import ConfigError, load_sites
    from router.coord import EtcdCoordinator, EtcdSettings
    from router.security.audit import AuditError
    from router.security.tls import TlsConfigError, is_loopback

    logging.basicConfig(level=os.environ.get("TANDEM_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        configs = load_sites(sites)
        streams = load_streams(traffic, configs)
    except (ConfigError, OSError, ValueError) as e:
        typer.echo(f"tandem rebalancer: {e}", err=True)
        raise typer.Exit(2) from None
    if tls_dir is None and not is_loopback(listen):
        typer.echo(f"tandem rebalancer: refusing plaintext on {listen}, which is not loopback: give --tls-dir",
                   err=True)
        raise typer.Exit(2)
    kw: dict = {"endpoints": tuple(e.strip() for e in etcd.split(",") if e.strip())}
    if etcd_prefix:
        kw["prefix"] = etcd_prefix
    if tls_dir is not None and EtcdSettings.wants_tls(kw["endpoints"], None, None):
        kw.update(ca_file=str(tls_dir / "ca.crt"), cert_file=str(tls_dir / f"rebalancer-{identity}.crt"),
                  key_file=str(tls_dir / f"rebalancer-{identity}.key"))
    settings = EtcdSettings(**kw)
    planner = make_planner(streams, ray_address=ray_address, serial=serial, partners_dir=partners or sites / "partners")

    async def main() -> int:
        coord = EtcdCoordinator("rebalancer", settings)
        rb = Rebalancer(coord, identity, configs, planner, horizon_s=horizon_s, replications=replications,
                        auto_every_s=None if auto_every_min is None else auto_every_min * 60, min_gain=min_gain)
        try:
            served = await serve_rebalancer(rb, listen, tls_dir, identity, data_dir)
        except (TlsConfigError, OSError, RuntimeError, ValueError, AuditError) as e:
            typer.echo(f"tandem rebalancer: {e}", err=True)
            return 2
        if served.bindings is not None:
            # bindings stored in etcd take over from the TLS dir's file, as on the nodes
            coord.watch_document("bindings", coord.keys.security_bindings, served.bindings.set_etcd)
        await coord.start()
        rb.start()
        typer.echo(f"tandem rebalancer {identity}: serving on port {served.port}", err=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await rb.stop()
        await served.stop(1.0)
        await coord.close()
        planner_close = getattr(planner, "close", None)
        if planner_close is not None:
            planner_close()
        return 0

    raise typer.Exit(asyncio.run(main()))


def register(root: typer.Typer) -> None:
    """Add ``tandem rebalancer`` to the ``tandem`` command."""
    root.command("rebalancer")(rebalancer_command)
