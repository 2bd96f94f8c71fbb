"""``tandem partner-sim``: a simulated BPO partner ACD on the partner API, for trying a
cluster's partner overflow end to end (:class:`router.partner.sim.PartnerSim`)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

EXIT_OK = 0
EXIT_BROKEN = 1  # the contract was broken as the partner saw it, or an outcome was not reported
EXIT_USAGE = 2


def partner_sim(
    partner: str = typer.Option(..., "--partner", metavar="NAME", help="the partner's name (as in its contract)"),
    node: list[str] = typer.Option(
        ..., "--node", metavar="ADDR",
        help="an in-house node to take calls from, host:port or SITE=host:port (with --tls-dir, SITE= makes "
             "the node prove it is that site); repeat for every node",
    ),
    contract: Path = typer.Option(..., "--contract", metavar="FILE",
                                  help="the partner's own copy of its contract (YAML or JSON)"),
    agents: Optional[list[str]] = typer.Option(
        None, "--agents", metavar="SKILL=N",
        help="agents per skill (repeat, or comma-separated); default 3 per skill of the contract",
    ),
    aht_s: float = typer.Option(300.0, "--aht-s", help="mean talk time, simulated seconds (exponential)"),
    wrap_s: float = typer.Option(30.0, "--wrap-s", help="wrap-up time, simulated seconds"),
    answer_delay_s: float = typer.Option(5.0, "--answer-delay-s",
                                         help="an agent answers within this many simulated seconds"),
    handback_rate: float = typer.Option(0.0, "--handback-rate", help="share of assigned calls handed back (0..1)"),
    time_scale: float = typer.Option(1.0, "--time-scale", help="simulated seconds per real second"),
    seed: int = typer.Option(1, "--seed"),
    tls_dir: Optional[Path] = typer.Option(
        None, "--tls-dir", metavar="DIR",
        help="mTLS with DIR/partner-NAME.crt|.key and DIR/ca.crt (tandem certs issue DIR --partner NAME); "
             "without it plaintext, to loopback development nodes only",
    ),
    duration: Optional[float] = typer.Option(None, "--duration", help="real seconds to run (default: until Ctrl-C)"),
    json_out: bool = typer.Option(False, "--json", help="print the summary as one JSON line"),
) -> None:
    """Run a simulated partner ACD against in-house nodes until interrupted (or --duration),
    then print its summary: offered, accepted, declined, handled, handed_back, cap_exceeded,
    fields_outside_contract, max_concurrent.

    Exit codes: 0 ok; 1 the partner saw its contract broken (a cap exceeded, a field
    outside its data scopes) or could not report an outcome; 2 bad options or contract."""
    from router.contracts import ContractError, parse_contract
    from router.partner.gateway import NodeTarget
    from router.partner.sim import PartnerSim, parse_agents, run_for

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    try:
        c = parse_contract(contract.read_text(), partner=partner, source=str(contract))
        targets = [NodeTarget.parse(n) for n in node]
        per_skill = parse_agents(agents or [])
        if not per_skill:
            if not c.skills:
                raise ValueError("the contract takes every skill: give --agents SKILL=N")
            per_skill = {s: 3 for s in c.skills}
        sim = PartnerSim(partner, targets, c, per_skill, aht_s=aht_s, wrap_s=wrap_s, answer_delay_s=answer_delay_s,
                         handback_rate=handback_rate, time_scale=time_scale, seed=seed, tls=tls_dir)
    except (ContractError, OSError, ValueError) as e:
        typer.echo(f"partner-sim: {e}", err=True)
        raise typer.Exit(EXIT_USAGE) from None

    async def main() -> dict:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await run_for(sim, duration, stop)

    from router.security.tls import TlsConfigError

    try:
        summary = asyncio.run(main())
    except (ValueError, TlsConfigError) as e:  # TLS files missing or not the partner's
        typer.echo(f"partner-sim: {e}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    sys.stdout.write(json.dumps(summary) + "\n" if json_out else json.dumps(summary, indent=2) + "\n")
    sys.stdout.flush()
    broken = summary["cap_exceeded"] or summary["fields_outside_contract"] or summary["report_errors"]
    raise typer.Exit(EXIT_BROKEN if broken else EXIT_OK)


def register(app: typer.Typer) -> None:
    app.command("partner-sim")(partner_sim)
