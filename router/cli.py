"""The ``tandem`` command: ``tandem node``, ``tandem demo`` (later ``ctl``, ``report``,
``rebalance``). Subcommands import their modules lazily so ``tandem --help`` is fast."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
from router.history.cli import register as _register_history  # noqa: E402
_register_history(app)  # tandem history …, tandem report …


@app.command()
def node(
    site: Path = typer.Option(..., "--site", help="site file (sites/*.yaml)"),
    data_dir: Path = typer.Option(..., "--data-dir", help="journal and snapshots live here"),
    listen: Optional[str] = typer.Option(None, "--listen", help="host:port, overrides the site file"),
    sync: str = typer.Option("fdatasync", "--sync", help="journal sync: fsync|fdatasync|none"),
) -> None:
    """Run one site node until SIGTERM/SIGINT."""
    from router.node.main import run_node

    raise typer.Exit(run_node(site, data_dir, listen=listen, sync=sync))


@app.command()
def demo(
    sites: Path = typer.Option(Path("sites"), "--sites", help="directory of site files"),
    duration: float = typer.Option(60.0, "--duration", help="seconds of traffic"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="default: a temp dir"),
    json_out: bool = typer.Option(False, "--json", help="end with one JSON summary line"),
    seed: int = typer.Option(1, "--seed"),
) -> None:
    """Start the example sites' nodes, drive traffic, print KPIs per site and queue."""
    from router.demo import run_demo

    raise typer.Exit(run_demo(sites, duration, data_dir=data_dir, json_out=json_out, seed=seed))


if __name__ == "__main__":
    app()
