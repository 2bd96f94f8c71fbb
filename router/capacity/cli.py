"""``tandem capacity staff``: the agents one queue needs for one interval (Erlang C, or
Erlang A with the callers' patience), see :mod:`router.capacity.staffing`."""

from __future__ import annotations

import json
import math

import typer

from router.capacity.staffing import staff as _staff

app = typer.Typer(no_args_is_help=True, help="Capacity planning: the agents a queue needs.")


def _parse_sl(text: str) -> tuple[float, float]:
    """'T:GOAL' -> (T seconds >= 0, 0 < GOAL < 1)."""
    head, sep, tail = text.partition(":")
    try:
        if not sep:
            raise ValueError
        threshold, goal = float(head), float(tail)
    except ValueError:
        raise typer.BadParameter(f"expected T:GOAL, e.g. 20:0.8, got {text!r}", param_hint="--sl") from None
    if not (threshold >= 0 and math.isfinite(threshold)):
        raise typer.BadParameter(f"T must be a number of seconds >= 0, got {head!r}", param_hint="--sl")
    if not 0 < goal < 1:
        raise typer.BadParameter(f"GOAL must be a fraction between 0 and 1 (exclusive), got {tail!r}",
                                 param_hint="--sl")
    return threshold, goal


def _positive(value: float | None, hint: str) -> None:
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise typer.BadParameter(f"must be a positive number, got {value}", param_hint=hint)


@app.command("staff")
def staff_command(
    arrivals_per_hour: float = typer.Option(..., "--arrivals-per-hour", help="calls offered per hour in the interval"),
    aht_s: float = typer.Option(..., "--aht-s", help="mean handle time, seconds"),
    sl: str = typer.Option(..., "--sl", metavar="T:GOAL",
                           help="service-level goal: GOAL (0-1) of all calls answered within T seconds, e.g. 20:0.8"),
    patience_s: float | None = typer.Option(
        None, "--patience-s", help="callers' mean patience, seconds: Erlang A (without it nobody hangs up: Erlang C)"),
    agents: int | None = typer.Option(None, "--agents", help="evaluate this many agents instead of solving"),
    max_occupancy: float | None = typer.Option(
        None, "--max-occupancy", help="cap on occupancy (0-1]; more agents until it holds"),
    shrinkage: float = typer.Option(0.0, "--shrinkage", help="share of paid time off the phones [0-1)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """The agents a queue needs for one interval to meet a service-level goal (or, with
    --agents, how N agents do): service level, ASA and wait probability, abandonment
    (0 without --patience-s), occupancy, the agents to schedule with shrinkage, and the
    square-root staffing rule's answer as a cross-check.

    Exit codes: 0 ok (also when the given agents miss the goal: see meets_goal); 2 bad
    options."""
    threshold, goal = _parse_sl(sl)
    _positive(arrivals_per_hour, "--arrivals-per-hour")
    _positive(aht_s, "--aht-s")
    _positive(patience_s, "--patience-s")
    if agents is not None and agents < 1:
        raise typer.BadParameter(f"must be at least 1, got {agents}", param_hint="--agents")
    if max_occupancy is not None and not 0 < max_occupancy <= 1:
        raise typer.BadParameter(f"must be in (0, 1], got {max_occupancy}", param_hint="--max-occupancy")
    if not 0 <= shrinkage < 1:
        raise typer.BadParameter(f"must be in [0, 1), got {shrinkage}", param_hint="--shrinkage")
    try:
        result = _staff(arrivals_per_hour, aht_s, threshold, goal, patience_s=patience_s, agents=agents,
                        max_occupancy=max_occupancy, shrinkage=shrinkage)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    d = result.to_dict()
    if json_out:
        typer.echo(json.dumps(d))
        return
    asa = "unbounded (too few agents: the queue grows without end)" if d["asa_s"] is None else f"{d['asa_s']:.1f} s"
    typer.echo(f"model           {d['model']} ({d['offered_load']:.2f} Erlangs offered)")
    typer.echo(f"agents          {d['agents']}{'' if agents is None else ' (given)'}"
               f"{'' if d['meets_goal'] else '  -- misses the goal'}")
    typer.echo(f"service level   {d['service_level']:.2%} within {threshold:g} s (goal {goal:.0%})")
    typer.echo(f"asa             {asa}")
    typer.echo(f"p(wait)         {d['p_wait']:.2%}")
    typer.echo(f"p(abandon)      {d['p_abandon']:.2%}")
    typer.echo(f"occupancy       {d['occupancy']:.2%}")
    typer.echo(f"scheduled       {d['scheduled']} (shrinkage {shrinkage:.0%})")
    typer.echo(f"sqrt staffing   {d['sqrt_staffing_agents']} (beta {d['sqrt_staffing_beta']:.3f})")


def register(root: typer.Typer) -> None:
    """Add ``tandem capacity …`` to the ``tandem`` command."""
    root.add_typer(app, name="capacity")
