"""``tandem certs …``: the cluster's CA and certificates (registered by :func:`register`).

* ``tandem certs init DIR [--sites DIR] [--trust-domain tandem] [--host H …] [--force]``
  — a CA, a site and an agents certificate for every site file, an operator ``admin``
  certificate and the starter ``bindings.json``.
* ``tandem certs issue DIR (--operator NAME | --partner NAME | --agents SITE | --site NAME |
  --etcd NAME) [--host H …]`` — ``--etcd``: an etcd member's server certificate; give the
  addresses its clients dial (``--host 127.0.0.1 --host etcd1.lan``).
* ``tandem certs renew DIR [--within-days N]`` — from a timer: leaves live 7 days.
* ``tandem certs show DIR [-o table|json]``
* ``tandem certs etcd-access DIR --endpoints https://HOST:PORT[,…] [--prefix /tandem/]
  [--as admin]`` — etcd's own access control for the identities of DIR: the sites and
  operators (their certificates' CNs) may read and write under the prefix (sites only
  read its ``security/``), nobody else; connects as the operator ``--as`` (who gets
  etcd's root role); idempotent (see :mod:`router.coord.access`).

Data goes to stdout, errors to stderr with exit code 1. See :mod:`router.security.pki`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer

certs_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Certificates of the cluster's SPIFFE identities "
                             "(CA, sites, agents, operators, partners, etcd).")

_HOSTS = typer.Option(None, "--host", metavar="H",
                      help="DNS name or IP address the certificate is also valid for (repeatable; "
                           "default 127.0.0.1 and localhost)")


def register(app: typer.Typer) -> None:
    app.add_typer(certs_app, name="certs")


def default_sites_dir() -> Path | None:
    """The ``sites/`` directory of the source tree (router/../sites), if there is one."""
    p = Path(__file__).resolve().parents[2] / "sites"
    return p if p.is_dir() else None


def _fail(msg: str) -> NoReturn:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(1)


def _hosts(host: Optional[list[str]]) -> tuple[str, ...]:
    from router.security import pki

    return tuple(host) if host else pki.DEFAULT_HOSTS


def _site_pairs(sites_dir: Path) -> list[tuple[str, str]]:
    from router.config import ConfigError, load_sites

    if not sites_dir.is_dir():
        _fail(f"no sites directory {sites_dir}")
    try:
        sites = load_sites(sites_dir)
    except ConfigError as e:
        _fail(str(e))
    if not sites:
        _fail(f"no site files (*.yaml) in {sites_dir}")
    return [(s.site.name, "partner" if s.site.kind == "partner" else "in_house") for s in sites]


def _partner_names(sites_dir: Path) -> list[str]:
    """The BPO partners on the partner API: the contracts in ``SITES/partners/*.yaml``."""
    from router.contracts import ContractError, parse_contract

    out = []
    for f in sorted((sites_dir / "partners").glob("*.yaml")):
        try:
            out.append(parse_contract(f.read_text(), source=str(f)).partner)
        except (ContractError, OSError) as e:
            _fail(str(e))
    return out


@certs_app.command("init")
def init_cmd(
    directory: Path = typer.Argument(..., metavar="DIR", help="TLS directory to create (mode 0700)"),
    sites: Optional[Path] = typer.Option(None, "--sites", help="directory of site files (default: the repository's sites/)"),
    trust_domain: str = typer.Option("tandem", "--trust-domain", help="SPIFFE trust domain"),
    host: Optional[list[str]] = _HOSTS,
    force: bool = typer.Option(False, "--force", help="replace an existing CA (its certificates stop being trusted)"),
) -> None:
    """Create a CA and the certificates of every site, its agents gateway, the operator admin,
    the rebalancer and every BPO partner with a contract in SITES/partners/."""
    from router.security import pki

    sites_dir = sites or default_sites_dir()
    if sites_dir is None:
        _fail("no sites directory: give --sites DIR")
    pairs = _site_pairs(sites_dir)
    try:
        written = pki.init(directory, pairs, trust_domain=trust_domain, hosts=_hosts(host), force=force,
                           partners=_partner_names(sites_dir), rebalancers=("rebalancer",))
    except pki.PkiError as e:
        _fail(str(e))
    for p in written:
        typer.echo(str(p))


@certs_app.command("issue")
def issue_cmd(
    directory: Path = typer.Argument(..., metavar="DIR", help="TLS directory holding ca.crt and ca.key"),
    operator: Optional[str] = typer.Option(None, "--operator", metavar="NAME"),
    partner: Optional[str] = typer.Option(None, "--partner", metavar="NAME"),
    agents: Optional[str] = typer.Option(None, "--agents", metavar="SITE"),
    site: Optional[str] = typer.Option(None, "--site", metavar="NAME"),
    etcd: Optional[str] = typer.Option(None, "--etcd", metavar="NAME",
                                       help="an etcd member (server certificate for the addresses of --host)"),
    clickhouse: Optional[str] = typer.Option(None, "--clickhouse", metavar="NAME",
                                             help="a ClickHouse server of the history (for the addresses of --host)"),
    rebalancer: Optional[str] = typer.Option(None, "--rebalancer", metavar="NAME",
                                             help="a rebalancer process (server certificate for the addresses of --host)"),
    monitor: Optional[str] = typer.Option(None, "--monitor", metavar="NAME",
                                          help="a metrics scraper such as Prometheus (a client certificate "
                                               "for the nodes' metrics endpoints, no RPC)"),
    host: Optional[list[str]] = _HOSTS,
    days: Optional[float] = typer.Option(None, "--days", help="lifetime in days (default 7)"),
) -> None:
    """Issue (or re-issue, with a new key) one certificate signed by DIR's CA. A site, agents
    or partner identity without a role binding in DIR/bindings.json gets the starter one
    (as init gives: site -> site on *, agents -> agent-gateway of its site, partner ->
    partner on *); an existing binding is never changed."""
    from router.security import pki

    chosen = [(k, v) for k, v in (("operator", operator), ("partner", partner), ("agents", agents),
                                  ("site", site), ("etcd", etcd), ("clickhouse", clickhouse),
                                  ("rebalancer", rebalancer), ("monitor", monitor)) if v is not None]
    if len(chosen) != 1:
        _fail("give exactly one of --operator NAME, --partner NAME, --agents SITE, --site NAME, --etcd NAME, "
              "--clickhouse NAME, --rebalancer NAME, --monitor NAME")
    kind, name = chosen[0]
    try:
        update = pki.starter_update(directory, kind, name)  # before anything is written
        path = pki.issue(directory, kind, name, hosts=_hosts(host), days=pki.LEAF_DAYS if days is None else days)
        if update is not None:  # a site (or partner) added after init: let its node in
            added, doc = update
            where = pki.write_bindings(directory, doc)
    except pki.PkiError as e:
        _fail(str(e))
    typer.echo(str(path))
    if update is not None:
        typer.echo(f"{where}: bound {added.identity} to {added.role} on {','.join(added.sites)}")


@certs_app.command("renew")
def renew_cmd(
    directory: Path = typer.Argument(..., metavar="DIR", help="TLS directory holding ca.crt and ca.key"),
    within_days: Optional[float] = typer.Option(None, "--within-days", metavar="N",
                                                help="only certificates expiring within N days"),
) -> None:
    """Re-issue the certificates of DIR (same identity and names, new key and validity)."""
    from router.security import pki

    try:
        renewed = pki.renew(directory, within_days=within_days)
    except pki.PkiError as e:
        _fail(str(e))
    for p in renewed:
        typer.echo(str(p))
    if not renewed:
        typer.echo("nothing to renew", err=True)


@certs_app.command("show")
def show_cmd(
    directory: Path = typer.Argument(..., metavar="DIR", help="TLS directory"),
    output: str = typer.Option("table", "-o", "--output", help="table or json"),
) -> None:
    """Every certificate of DIR: identity, expiry, names, status."""
    from router.security import pki

    if output not in ("table", "json"):
        _fail(f"unknown output {output!r} (table or json)")
    try:
        rows = pki.describe(directory)
    except (pki.PkiError, OSError) as e:
        _fail(str(e))
    if output == "json":
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"certificates in {directory}")
    for col in ("file", "identity", "expires (UTC)", "days left", "DNS / IP", "status"):
        table.add_column(col, no_wrap=col in ("file", "identity"))
    for r in rows:
        sans = r.get("sans") or {}
        table.add_row(
            r["file"], r.get("identity") or "-",
            (r.get("expires") or "-").replace("+00:00", "Z"), str(r.get("days_left", "-")),
            ", ".join(sans.get("dns", []) + sans.get("ip", [])),
            r.get("status", ""), style=None if r.get("status") == "ok" else "red",
        )
    Console(file=sys.stdout, width=200 if not sys.stdout.isatty() else None).print(table)


@certs_app.command("etcd-access")
def etcd_access_cmd(
    directory: Path = typer.Argument(..., metavar="DIR", help="TLS directory of the cluster"),
    endpoints: list[str] = typer.Option(..., "--endpoints", metavar="URLS",
                                        help="etcd client URLs, comma-separated or repeated (https://host:port)"),
    prefix: str = typer.Option("/tandem/", "--prefix", help="the cluster's key prefix"),
    as_operator: str = typer.Option("admin", "--as", metavar="NAME",
                                    help="operator identity to connect with (DIR/operator-NAME.crt); "
                                         "it gets etcd's root role"),
) -> None:
    """Give DIR's sites and operators etcd users (read and write under --prefix) and turn etcd's auth on.

    Partners, agents gateways and every other identity of the CA are refused by etcd."""
    from pydantic import ValidationError

    from router.coord import access
    from router.coord.link import EtcdSettings
    from router.security import pki

    d = Path(directory)
    names: dict[str, list[str]] = {"site": [], "operator": []}
    for path in pki.leaves(d):
        kind, _, name = path.stem.partition("-")
        if kind in names:
            names[kind].append(name)
    if as_operator not in names["operator"]:
        _fail(f"no {d / f'operator-{as_operator}.crt'}: give --as NAME of an operator certificate in {d}")
    urls = tuple(u.strip() for e in endpoints for u in e.split(",") if u.strip())
    try:
        settings = EtcdSettings(endpoints=urls, prefix=prefix, op_timeout_s=5.0, ca_file=str(d / pki.CA_CERT),
                                cert_file=str(d / f"operator-{as_operator}.crt"),
                                key_file=str(d / f"operator-{as_operator}.key"))
    except ValidationError as e:
        _fail(f"bad --endpoints or --prefix: {e.errors()[0]['msg']}")
    try:
        changes = access.run_blocking(access.provision(settings, sites=names["site"], operators=names["operator"]))
    except (access.AccessError, OSError) as e:
        _fail(str(e))
    for c in changes:
        typer.echo(c)
    if not changes:
        typer.echo("nothing to change", err=True)
