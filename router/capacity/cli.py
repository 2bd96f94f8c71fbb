"""``tandem capacity staff``: the agents one queue needs for one interval (Erlang C, or
Erlang A with the callers' patience), see :mod:`router.capacity.staffing`;
``tandem capacity forecast``: a day's staffing table per queue from the history, see
:mod:`router.capacity.plan`; ``tandem capacity whatif``: candidate plans simulated (as Ray
tasks) and the best chosen, see :mod:`router.capacity.whatif`."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

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


_DATA_DIR = typer.Option(None, "--data-dir", help="data dir whose history/ holds the embedded (chdb) history; "
                         "without one, the node histories below it are read merged")
FORECAST_CSV_FIELDS = ("site", "queue", "start", "calls", "aht_s", "agents", "scheduled", "service_level")


@app.command("forecast")
def forecast_command(
    clickhouse: str | None = typer.Option(None, "--clickhouse", help="clickhouse://host:port/database"),
    data_dir: Path | None = _DATA_DIR,
    site: str | None = typer.Option(None, "--site", help="only this site's queues"),
    queue: str | None = typer.Option(None, "--queue", help="only queues of this name"),
    day: str | None = typer.Option(
        None, "--day", metavar="YYYY-MM-DD", help="the day to staff, UTC (default: the day after the history's "
        "last; a day inside the history is forecast from the days before it)"),
    sl: str = typer.Option("20:0.8", "--sl", metavar="T:GOAL",
                           help="service-level goal: GOAL (0-1) of all calls answered within T seconds"),
    max_occupancy: float | None = typer.Option(
        None, "--max-occupancy", help="cap on occupancy (0-1]; more agents until it holds"),
    shrinkage: float = typer.Option(0.0, "--shrinkage", help="share of paid time off the phones [0-1)"),
    method: str = typer.Option("decomposition", "--method",
                               help="decomposition | seasonal_naive | weekday_average (with under 7 days of "
                               "history: the mean profile of the days there are)"),
    interval: str = typer.Option("15m", "--interval", help="interval length, e.g. 15m, 30m, 1h"),
    time_scale: float | None = typer.Option(
        None, "--time-scale", help="the history is of a run compressed N times (default: the scale `tandem "
        "demo` recorded in --data-dir, else 1); only 1 can be forecast"),
    output: str = typer.Option("table", "-o", "--output", help="table | json | csv"),
) -> None:
    """A day's staffing table per queue from the history: calls forecast per interval,
    their handle time, the agents to meet the service-level goal (Erlang A with the
    patience the history shows, Erlang C when nobody hung up), the agents to schedule
    after shrinkage, and the service level they give; day totals per queue.

    Times are UTC. A compressed `tandem demo` history is refused: its days are minutes.

    Exit codes: 0 ok; 1 the store failed or holds no calls; 2 bad options."""
    from router.capacity.history import arrival_rows
    from router.capacity.plan import METHODS, build_plan
    from router.history.cli import (
        _fail,
        _open,
        parse_interval,
        parse_time,
        recorded_time_scale,
    )
    from router.history.store import StoreError

    if output not in ("table", "json", "csv"):
        _fail(f"-o must be table, json or csv, not {output!r}")
    if method not in METHODS:
        _fail(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    threshold, goal = _parse_sl(sl)
    if max_occupancy is not None and not 0 < max_occupancy <= 1:
        _fail(f"--max-occupancy must be in (0, 1], got {max_occupancy}")
    if not 0 <= shrinkage < 1:
        _fail(f"--shrinkage must be in [0, 1), got {shrinkage}")
    try:
        interval_s = parse_interval(interval)
        day_s = parse_time(day) if day else None
    except typer.BadParameter as e:
        _fail(str(e))
    if not (60 <= interval_s <= 86_400 and 86_400 % interval_s == 0):
        _fail(f"--interval must divide a day and be at least a minute, got {interval!r}")
    recorded = None
    if time_scale is None:
        time_scale, recorded = recorded_time_scale(data_dir)
    elif not (0 < time_scale < float("inf")):
        _fail("--time-scale must be a positive number")
    if time_scale != 1.0:
        # Its offered_at are clock times of a run that lasted minutes: its "days" and
        # "intervals" are not the ones agents are staffed for.
        where = f" (recorded in {recorded})" if recorded else ""
        _fail(f"the history is compressed x{time_scale:g}{where}: interval forecasts need a real-time history "
              "(e.g. `tandem history synth --data-dir DIR --days 28`)")
    store = _open(clickhouse, data_dir)
    try:
        rows = arrival_rows(store, site=site, queue=queue)
    except StoreError as e:
        _fail(f"{store.url}: {e}", 1)
    finally:
        store.close()
    if not rows:
        which = " ".join(f"{k} {v}" for k, v in (("site", site), ("queue", queue)) if v)
        _fail(f"no calls in the history{' for ' + which if which else ''}: nothing to forecast", 1)
    try:
        plan = build_plan(rows, day_s, method=method, interval_s=interval_s, sl_threshold_s=threshold,
                          sl_goal=goal, max_occupancy=max_occupancy, shrinkage=shrinkage)
    except ValueError as e:
        _fail(str(e))
    doc = plan.to_dict()
    if output == "json":
        typer.echo(json.dumps(doc))
    elif output == "csv":
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(FORECAST_CSV_FIELDS)
        for q in doc["queues"]:
            for i in q["intervals"]:
                row = dict(i, site=q["site"], queue=q["queue"])
                w.writerow(["" if row[f] is None else row[f] for f in FORECAST_CSV_FIELDS])
    else:
        _print_plan(doc, method)


def _print_plan(doc: dict, asked: str) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    ran = doc["method"]
    how = ran if ran == asked else f"{ran} ({asked} needs 7 days of history)"
    typer.echo(f"Staffing for {doc['day']} (UTC): {how}, from {doc['history_days']} day(s) of history; "
               f"goal {doc['sl_goal']:.0%} of calls answered within {doc['sl_threshold_s']:g} s")
    hours = doc["interval_s"] / 3600
    for q in doc["queues"]:
        model = "Erlang C: nobody hung up" if q["patience_s"] is None else f"patience {q['patience_s']:.0f} s, Erlang A"
        t = Table(box=box.SIMPLE_HEAD, title=Text(f"{q['site']}/{q['queue']} — {model}"))
        for c in ("interval", "calls", "AHT", "agents", "scheduled", "SL"):
            t.add_column(c, justify="left" if c == "interval" else "right")
        quiet = 0
        for i in q["intervals"]:
            if i["calls"] < 0.005 and not i["agents"]:
                quiet += 1
                continue
            t.add_row(i["start"][11:16], f"{i['calls']:.1f}", "-" if i["aht_s"] is None else f"{i['aht_s']:.0f}s",
                      "-" if i["agents"] is None else str(i["agents"]),
                      "-" if i["scheduled"] is None else str(i["scheduled"]),
                      "-" if i["service_level"] is None else f"{100 * i['service_level']:.1f}%")
        console.print(t)
        typer.echo(f"  {q['site']}/{q['queue']} day total: {q['calls']:.0f} calls, {q['agent_hours']:g} agent-hours "
                   f"on the phones, {q['scheduled_hours']:g} scheduled ({hours:g} h intervals"
                   f"{f'; {quiet} without calls not shown' if quiet else ''})")


@app.command("whatif")
def whatif_command(
    sites: Path = typer.Option(Path("sites"), "--sites", help="directory of the site files (*.yaml)"),
    policy: Path | None = typer.Option(
        None, "--policy", help="overflow policy (JSON; default: overflow-policy.json in --sites if there, else none)"),
    traffic: Path | None = typer.Option(
        None, "--traffic", help="traffic profile (YAML, the format of tandem demo --traffic; default: the demo's)"),
    partners: Path | None = typer.Option(
        None, "--partners", help="partner contracts (*.yaml) for their prices (default: partners/ in --sites)"),
    horizon_s: float = typer.Option(3600.0, "--horizon-s", help="simulated seconds of traffic per replication"),
    replications: int = typer.Option(3, "--replications", help="seeds per candidate (the same calls for all)"),
    partner_price: float = typer.Option(1.0, "--partner-price", help="price of one contact at a partner "
                                        "without a contract"),
    move_cost: float = typer.Option(0.5, "--move-cost", help="cost of one moved agent, in the same money"),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="run on this Ray cluster (default: RAY_ADDRESS, else a local Ray on loopback)"),
    serial: bool = typer.Option(False, "--serial", help="run every replay in this process, without Ray"),
    top: int = typer.Option(10, "--top", help="candidates shown in the table"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Plan what-ifs: candidate plans (agents moved between groups, overflow wait factors,
    a partner closed or opened, surge mode; and no change) each simulated through the
    real engines and overflow policy on the same calls (common random numbers), as Ray
    tasks unless --serial; the plan with the best cluster service level at the least cost
    (ties within 0.005).

    Exit codes: 0 ok; 1 Ray failed; 2 bad options or files."""
    from router.capacity.whatif import generate_candidates, search
    from router.capacity.whatif_run import evaluate, scenario_from_files
    from router.config import ConfigError

    if not (horizon_s > 0 and math.isfinite(horizon_s)):
        raise typer.BadParameter(f"must be a positive number, got {horizon_s}", param_hint="--horizon-s")
    if replications < 1:
        raise typer.BadParameter(f"must be at least 1, got {replications}", param_hint="--replications")
    if not sites.is_dir():
        raise typer.BadParameter(f"{sites} is not a directory", param_hint="--sites")
    if policy is None and (sites / "overflow-policy.json").is_file():
        policy = sites / "overflow-policy.json"
    try:
        sc = scenario_from_files(sites, policy, traffic, horizon_s=horizon_s, seeds=tuple(range(1, replications + 1)),
                                 partners_dir=partners or sites / "partners", default_partner_price=partner_price,
                                 move_cost=move_cost)
        candidates = generate_candidates(sc)
    except (OSError, ValueError, ConfigError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if serial:
        results, stats = evaluate(sc, candidates)
    else:
        from router.capacity.raykit import ray_session

        try:
            with ray_session(ray_address) as session:
                results, stats = evaluate(sc, candidates, session=session)
        except Exception as e:  # noqa: BLE001 -- Ray's errors have no common base: report, exit 1
            typer.echo(f"error: Ray: {type(e).__name__}: {e}", err=True)
            raise typer.Exit(1) from None
    found = search(sc, candidates, results)
    if json_out:
        typer.echo(json.dumps({"candidates": len(candidates), "run": stats.to_dict(), **found.to_dict()},
                              sort_keys=True))
        return
    _print_whatif(found, stats, top)


def _print_whatif(found, stats, top: int) -> None:  # noqa: ANN001 -- SearchResult, RunStats (imported lazily)
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    evs = sorted(found.evaluations, key=lambda e: (-(e.service_level or 0.0), e.cost, e.index))
    t = Table(box=box.SIMPLE_HEAD, title=f"{len(evs)} candidates, {stats.units} replays ({stats.runner}, "
              f"{stats.tasks} tasks, {stats.seconds:.1f} s)")
    for c in ("#", "candidate", "SL", "delta", "moves", "partner calls", "cost"):
        t.add_column(c, justify="left" if c == "candidate" else "right")
    for e in evs[:top]:
        delta = "-" if e.delta is None else f"{100 * e.delta:+.2f}" + ("" if e.delta_se is None else
                                                                      f" ±{100 * e.delta_se:.2f}")
        t.add_row(str(e.index), ("* " if e.index == found.best.index else "") + e.name, pct(e.service_level), delta,
                  str(e.moves), f"{sum(e.partner_calls.values()):.1f}", f"{e.cost:.2f}")
    console.print(t)
    b, plan = found.best, found.plan
    typer.echo(f"best: {b.name}")
    typer.echo(f"  cluster service level {pct(found.evaluations[0].service_level)} -> {pct(b.service_level)}, "
               f"cost {b.cost:.2f} (moves {b.moves}, partner {b.partner_cost:.2f})")
    for site, sl in plan.expected.items():
        typer.echo(f"  {site:12} {pct(sl['before'])} -> {pct(sl['after'])}")
    typer.echo(f"  plan {plan.id}: targets for {', '.join(plan.sites) or 'no site (no change)'}")


def register(root: typer.Typer) -> None:
    """Add ``tandem capacity …`` to the ``tandem`` command."""
    root.add_typer(app, name="capacity")
