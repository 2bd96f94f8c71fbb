"""The demo's traffic, played until SIGTERM against a cluster made by ``tandem up``.

``python -m router.ctl.traffic --data-dir D --sites DIR [--time-scale N] [--seed N]``
(``tandem up --traffic`` starts it detached, logging to ``D/traffic.log``). It reads the
nodes' addresses and the TLS dir from the context file ``D/tandem.yaml``, signs in every
agent of the site files of DIR (simulated desktops, :mod:`router.sim.agents`, over mTLS
as each site's agents gateway) and offers :data:`router.sim.demo.DEMO_LOAD` (unbalanced:
Montréal overloaded, so calls overflow to Lyon and CallPro) at ``--time-scale``
simulated seconds per real second — the nodes must run site files scaled the same way,
which ``tandem up`` writes.

Bounded: the generator plays rounds of :data:`ROUND_S` real seconds, each a fresh
:class:`router.sim.loadgen.LoadGen` (at most :data:`MAX_CALLS` calls and the demo's
5000 at once, so its records never grow without bound). Between rounds the callers still
waiting hang up, the agents sign out and in again (a pause of a few seconds). A round
that fails (a node unreachable) is logged and the next one starts after
:data:`RETRY_S`. Every :data:`REPORT_S` seconds a line per site goes to the log.

SIGTERM / SIGINT: no new calls; within :data:`DRAIN_S` real seconds the calls in
progress end or their callers hang up, the agents sign out, and it exits 0. The line
``offering calls`` in the log says the agents of the first round are in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
import time
from pathlib import Path

ROUND_S = 600.0  # real seconds per generator (at x60: ten simulated hours)
MAX_CALLS = 50_000  # per round; the demo's load at x60 offers about 20 calls a second
DRAIN_S = 2.0  # real seconds for calls in progress at the end of a round or at SIGTERM
RETRY_S = 5.0
REPORT_S = 10.0


def _log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


async def play(data_dir: Path, sites_dir: Path, scale: float, seed: int, stop: asyncio.Event) -> None:
    """Rounds of traffic until ``stop`` is set (see the module docstring)."""
    from router.config import load_sites
    from router.ctl import context
    from router.sim.demo import demo_config, demo_streams
    from router.sim.loadgen import LoadGen

    ctx = context.load(Path(data_dir) / "tandem.yaml").current()
    sites = [s for s in load_sites(sites_dir) if s.site.name in ctx.sites]
    streams = demo_streams(sites)
    rate = sum(s.rate_per_h for s in streams) / 3600 * scale
    _log(f"traffic: {len(streams)} call streams at {len(sites)} sites, about {rate:.1f} calls per real second "
         f"(time x{scale:g}), {sum(len(s.agent_profiles()) for s in sites)} agents")
    n = 0
    while not stop.is_set():
        n += 1
        cfg = dataclasses.replace(
            demo_config(sites, dict(ctx.sites), streams, ROUND_S, scale, seed + n, ctx.tls_dir),
            drain_s=DRAIN_S, agent_stop_s=DRAIN_S, max_calls=MAX_CALLS, run_id=f"t{int(time.time()) % 10**8:08d}r{n}",
        )
        gen = LoadGen(cfg)
        task = asyncio.create_task(gen.run(ROUND_S))
        reporter = asyncio.create_task(_report(gen, n, stop))
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if stop.is_set():
            _log(f"round {n}: stopping (no new calls; calls in progress end within {DRAIN_S:g} s)")
            gen.stop_arrivals.set()  # run() then drains, hangs up the rest, signs agents out
        try:
            await asyncio.wait_for(asyncio.shield(task), DRAIN_S + 60)
            failed = None
        except asyncio.TimeoutError:
            task.cancel()
            failed = "did not end in time"
        except Exception as e:  # noqa: BLE001 - a node gone: log it, try again
            failed = f"{type(e).__name__}: {e}"
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
        t = gen.totals()
        _log(f"round {n} ended: offered {t.offered}, answered {t.answered}, abandoned {t.abandoned}, "
             f"rejected {t.rejected}, offer failures {t.offer_failed}"
             + (f"; failed: {failed}" if failed else "") + "".join(f"; {e}" for e in gen.errors[:3]))
        if failed and not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_S)


async def _report(gen, n: int, stop: asyncio.Event) -> None:
    while not gen.started_at:
        await asyncio.sleep(0.1)
    _log(f"round {n}: {len(gen.agents)} agents signed in; {'offering calls' if not stop.is_set() else 'stopping'}")
    while True:
        await asyncio.sleep(REPORT_S)
        _log(f"round {n}, {time.time() - gen.started_at:.0f} s: " + "; ".join(
            f"{site} offered {c.offered} answered {c.answered} abandoned {c.abandoned} waiting {c.waiting}"
            for site, c in gen.counters.items()))


def main(argv: list[str] | None = None) -> int:
    import uvloop

    from router.sim.demo import DEMO_TIME_SCALE

    p = argparse.ArgumentParser(prog="python -m router.ctl.traffic", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--sites", type=Path, required=True, help="the unscaled site files the cluster runs")
    p.add_argument("--time-scale", type=float, default=DEMO_TIME_SCALE)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await play(a.data_dir, a.sites, a.time_scale, a.seed, stop)

    uvloop.run(run())
    _log("traffic stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
