"""``tandem capacity validate --calls FILE``: a live demo's calls replayed through the
cluster simulator, service level per site compared within sampling error (see
:mod:`router.capacity.validate`; the file comes from ``run_demo(calls_out=FILE)``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from router.capacity.validate import (
    JITTERS,
    REPLICATIONS,
    ValidateError,
    parse_calls,
    report_lines,
    validate,
)


def validate_command(
    calls: Path = typer.Option(..., "--calls", metavar="FILE", help="the demo's call file (one JSON line per call)"),
    jitters: int = typer.Option(JITTERS, "--jitters", min=0, help="replays of the same calls, arrival times jittered"),
    replications: int = typer.Option(REPLICATIONS, "--replications", min=0,
                                     help="replays of independent traffic like the run's"),
    seed: int = typer.Option(1, "--seed", help="seed of the jitter and of the independent traffic"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Replay a live demo's calls through the cluster simulator (real engine, real
    overflow policy, the scaled site files the nodes ran) and compare service level and
    abandon rate per site. Exit 0 when every in-house site's service level is within
    sampling error (|z| <= 3), 1 when not, 2 for a file that cannot be replayed."""
    try:
        run = parse_calls(calls.read_text(), str(calls))
        v = validate(run, jitters=jitters, replications=replications, seed=seed)
    except OSError as e:
        typer.echo(f"cannot read {calls}: {e.strerror or e}", err=True)
        raise typer.Exit(2) from None
    except ValidateError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    if json_out:
        sys.stdout.write(json.dumps(v.to_dict(), sort_keys=True) + "\n")
    else:
        for line in report_lines(v):
            typer.echo(line)
    raise typer.Exit(0 if v.ok else 1)


def register(root: typer.Typer) -> None:
    """Add ``tandem capacity validate`` to the ``tandem capacity`` group
    (:data:`router.capacity.cli.app`); ``root`` is the ``tandem`` command, as for the
    other ``register`` functions: the group reaches it through
    :func:`router.capacity.cli.register`."""
    from router.capacity.cli import app as capacity

    if not any(c.name == "validate" for c in capacity.registered_commands):  # registered once
        capacity.command("validate")(validate_command)
