"""``tandem ctl plan``, ``tandem ctl apply PLAN`` and ``tandem ctl get rebalancer``: the
operators' side of the rebalancer (``tandem rebalancer``, proto/router/v1/rebalancer.proto).

``plan`` asks the leading rebalancer for a plan computed now and shows what it would change
and the service level the simulation expects per site; ``--save FILE`` keeps the plan for
``apply``. ``apply`` sends the saved plan back: the rebalancer writes it in one fenced etcd
transaction, refused (STALE_PLAN, exit 1, nothing written) once the targets, the policy
or a contingency mode moved past the plan's base revision.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import grpc
import typer

from router.ctl import output
from router.ctl.client import EXIT_ERROR, EXIT_USAGE, ClusterClient, CtlError, describe
from router.ctl.commands import _YES, _fmt_option, _msg, confirm, ctl_app, get_app, run
from router.ctl.output import Column
from router.v1 import rebalancer_pb2


def _rebalancer_option() -> Any:
    return typer.Option(None, "--rebalancer", metavar="HOST:PORT",
                        help="the rebalancer's address (default: the context's rebalancer)")


def _sl(v: float) -> str:
    return "-" if v < 0 else f"{100 * v:.1f}%"


def _horizon(plan_json: str) -> str:
    try:
        return f"{float(json.loads(plan_json).get('horizon_s', 0)) / 60:g} simulated min"
    except (ValueError, AttributeError):
        return "the horizon"


def _site_rows(sites: Any) -> list[dict]:
    return [{"site": s.site, "generation": s.generation, "fencing": s.fencing, "applied": "yes" if s.applied else "no",
             "pending_moves": s.pending_moves, "refused": s.refused} for s in sites]


_SITE_COLUMNS = [Column("site", "SITE"), Column("generation", "GENERATION", justify="right"),
                 Column("fencing", "EPOCH", justify="right"), Column("applied", "APPLIED"),
                 Column("pending_moves", "PENDING MOVES", justify="right"), Column("refused", "REFUSED", justify="right")]


def _plan_cmd(ctx: typer.Context, rebalancer: Optional[str] = _rebalancer_option(),
              horizon_s: float = typer.Option(0.0, "--horizon-s", min=0, help="simulated horizon (0: the rebalancer's)"),
              replications: int = typer.Option(0, "--replications", min=0, max=64, help="seeds per candidate"),
              save: Optional[Path] = typer.Option(None, "--save", metavar="FILE", help="write the plan to FILE for apply"),
              fmt: str = _fmt_option()) -> None:
    """Compute a plan now (simulated what-ifs) and show its changes and expected SL per site.

    Nothing changes: apply it with tandem ctl apply FILE (--save FILE)."""

    async def body(c: ClusterClient) -> int | None:
        r = await c.rebalancer(rebalancer).PlanCapacity(
            rebalancer_pb2.PlanCapacityRequest(horizon_s=horizon_s, replications=replications), timeout=max(c.timeout, 600))
        if save is not None:
            save.write_text(r.plan_json + "\n")
        if fmt in ("json", "yaml"):
            output.emit(_msg(r), fmt)
            return None
        changes = [{"site": ch.site, "what": ch.what, "key": ch.key or "-", "before": ch.before or "(default)",
                    "after": ch.after or "(default)"} for ch in r.changes]
        print(f"plan {r.plan_id} (base revision {r.base_revision}): {r.candidate or 'no change'}")
        output.emit(changes, fmt, columns=[Column("site", "SITE"), Column("what", "CHANGE"), Column("key", "OF"),
                                           Column("before", "NOW"), Column("after", "PLAN")])
        rows = [{"site": e.site, "before": _sl(e.service_level_before), "after": _sl(e.service_level_after)}
                for e in r.expected]
        rows.append({"site": "cluster", "before": _sl(r.cluster_service_level_before),
                     "after": _sl(r.cluster_service_level_after)})
        print(f"expected service level over {_horizon(r.plan_json)} ({r.candidates} candidates simulated in "
              f"{r.seconds:.1f} s)")
        output.emit(rows, fmt, columns=[Column("site", "SITE"), Column("before", "SL NOW", justify="right"),
                                        Column("after", "SL WITH PLAN", justify="right")])
        if save is not None:
            output.message(f"plan saved to {save}: tandem ctl apply {save}")
        return None

    run(ctx, body)


def _apply_cmd(ctx: typer.Context, plan: Path = typer.Argument(..., metavar="PLAN", help="a plan saved by tandem ctl plan --save"),
               rebalancer: Optional[str] = _rebalancer_option(),
               wait: bool = typer.Option(True, "--wait/--no-wait", help="wait until every site reports the generation"),
               wait_timeout: float = typer.Option(10.0, "--wait-timeout", min=0.1, max=600),
               yes: bool = _YES, fmt: str = _fmt_option()) -> None:
    """Apply a saved plan: one fenced etcd transaction, refused if the plan is stale.

    Needs an operator bound with scope '*'. Exit 1 with STALE_PLAN when the targets, the
    policy or a contingency mode changed since the plan was computed: plan again."""

    async def body(c: ClusterClient) -> int | None:
        try:
            text = plan.read_text()
        except OSError as e:
            raise CtlError(EXIT_USAGE, f"cannot read {plan}: {e}") from None
        confirm(f"apply the plan in {plan}", yes)
        try:
            r = await c.rebalancer(rebalancer).ApplyPlan(
                rebalancer_pb2.ApplyPlanRequest(plan_json=text, wait=wait, timeout_s=wait_timeout),
                timeout=c.timeout + (wait_timeout if wait else 0))
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.ABORTED:
                raise CtlError(EXIT_ERROR, f"plan refused: {describe(e)}; nothing changed") from None
            raise
        if fmt in ("json", "yaml"):
            output.emit(_msg(r), fmt)
            return None
        took = f"; every site reported it in {r.seconds:.2f} s" if r.seconds >= 0 else ""
        output.message(f"applied as generation {r.generation} (epoch {r.fencing}, revision {r.revision}){took}")
        if r.sites:
            output.emit(_site_rows(r.sites), fmt, columns=_SITE_COLUMNS)
        return 0 if r.seconds >= 0 or not wait else EXIT_ERROR

    run(ctx, body)


def _status_cmd(ctx: typer.Context, rebalancer: Optional[str] = _rebalancer_option(), fmt: str = _fmt_option()) -> None:
    """The rebalancer: leader, epoch, generation in force, auto mode, what each site applied."""

    async def body(c: ClusterClient) -> int | None:
        r = await c.rebalancer(rebalancer).GetRebalancerStatus(rebalancer_pb2.GetRebalancerStatusRequest(),
                                                               timeout=c.timeout)
        if fmt in ("json", "yaml"):
            output.emit(_msg(r), fmt)
            return None
        auto = f"every {r.auto_every_s / 60:g} min" if r.auto else "off"
        output.message(f"leader {r.leader_name or '(none)'} (epoch {r.fencing}); generation {r.generation} "
                       f"(plan {r.plan_id or '-'}); auto {auto}; {r.plans_applied} applied, "
                       f"{r.stale_refused} refused as stale by this process")
        output.emit(_site_rows(r.sites), fmt, columns=_SITE_COLUMNS)
        return None

    run(ctx, body)


def register() -> None:
    """Add ``plan``, ``apply`` and ``get rebalancer`` to ``tandem ctl``."""
    ctl_app.command("plan")(_plan_cmd)
    ctl_app.command("apply")(_apply_cmd)
    get_app.command("rebalancer")(_status_cmd)
