"""Overflow: how much of the pooling gain does the cluster get, on the same traffic?

For each load mix (``router.sim.demo.LOAD_MIXES``) on the example sites (``sites/``), the
same traffic — same seed: same arrivals, talk times and patience — is played three
times on compressed time (x60 by default), with the demo's machinery
(``router.sim.demo.run_traffic``):

* ``cluster``: one node per site, joined through a real etcd (``router.local.etcd``, free
  loopback ports, temp data dir) with the demo's overflow policy (``DEMO_POLICY``);
* ``isolated``: the same nodes without etcd: every site alone;
* ``pooled``: one node whose site merges every agent and queue of the cluster: the bound
  perfect pooling would reach.

Service level: every call against the definition of the queue it *arrived* in (its
threshold and how abandons count), its wait from the arrival to the answer wherever it
was answered; summed over all queues of all sites. ``gap_closed`` = (cluster − isolated)
/ (pooled − isolated). Target: ≥ 2/3. Every run is reconciled over all sites (lost and
duplicates must be 0: exit code 1 otherwise).

Output with ``--json``: one line per mix

    {"mix", "cluster_service_level", "isolated_service_level", "pooled_service_level",
     "gap_closed", "overflow", "offered", "lost", "duplicates", "duration_s"}

(``overflow``: calls handed from one site to another in the cluster run; ``lost`` /
``duplicates`` over the three runs; ``duration_s``: real seconds of arrivals per run.)
Bounded: 2 mixes × 3 runs × (30 s of arrivals + 5 s drain + start) ≈ 4 minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from router.config import load_sites  # noqa: E402
from router.sim.demo import DEMO_POLICY, DEMO_TIME_SCALE, LOAD_MIXES, _console, gap_closed, run_traffic  # noqa: E402
from router.local.etcd import etcd_server  # noqa: E402


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


async def run(args) -> list[dict]:
    sites = load_sites(args.sites)
    log = _console(sys.stderr)
    out = []
    with tempfile.TemporaryDirectory(prefix="tandem-overflow-") as tmp:
        root = Path(tmp)
        with etcd_server(root / "etcd") as etcd:
            for i, mix in enumerate(args.mix):
                load = LOAD_MIXES[mix]
                t0 = time.monotonic()
                runs = {}
                for kind in ("cluster", "isolated", "pooled"):
                    runs[kind] = await run_traffic(
                        kind, sites, root / mix, load=load, duration=args.duration, scale=args.time_scale,
                        seed=args.seed, etcd_endpoints=etcd.endpoints if kind == "cluster" else (),
                        etcd_prefix=f"/tandem-bench-overflow/{i}/", policy=DEMO_POLICY, log_console=log,
                    )
                c, iso, pool = (runs[k].service_level for k in ("cluster", "isolated", "pooled"))
                res = {
                    "mix": mix,
                    "cluster_service_level": _r(c),
                    "isolated_service_level": _r(iso),
                    "pooled_service_level": _r(pool),
                    "gap_closed": _r(gap_closed(c, iso, pool)),
                    "overflow": sum(f.out for f in runs["cluster"].flows.values()),
                    "offered": runs["cluster"].rec.offered,
                    "lost": sum(r.rec.lost for r in runs.values()),
                    "duplicates": sum(r.rec.duplicates for r in runs.values()),
                    "duration_s": args.duration,
                }
                per_site = {
                    s: (runs["cluster"].kpis[s], runs["isolated"].kpis.get(s, {})) for s in runs["cluster"].kpis
                }
                from router.sim.report import total

                log.print(f"{mix} ({time.monotonic() - t0:.0f} s): " + json.dumps(res))
                log.print("  per site, cluster vs isolated: " + ", ".join(
                    f"{s} {total(a.values()).service_level or 0:.3f} vs {total(b.values()).service_level or 0:.3f}"
                    for s, (a, b) in per_site.items()) + "; overflow out by site: " + json.dumps(
                    {s: f.out for s, f in runs["cluster"].flows.items()}))
                for r in runs.values():
                    for ex in r.rec.examples[:5]:
                        log.print(f"  {r.kind}: {ex}", markup=False)
                out.append(res)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="one JSON line per mix")
    p.add_argument("--mix", action="append", choices=sorted(LOAD_MIXES),
                   help="load mix (repeatable; default: all)")
    p.add_argument("--duration", type=float, default=30.0, help="real seconds of arrivals per run (default 30)")
    p.add_argument("--time-scale", type=float, default=DEMO_TIME_SCALE)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sites", type=Path, default=ROOT / "sites")
    args = p.parse_args()
    args.mix = args.mix or list(LOAD_MIXES)
    import uvloop

    results = uvloop.run(run(args))
    for res in results:
        if args.json:
            print(json.dumps(res), flush=True)
        else:
            g = res["gap_closed"]
            print(f"{res['mix']:>16}: cluster {res['cluster_service_level']}, isolated "
                  f"{res['isolated_service_level']}, pooled {res['pooled_service_level']}, gap closed "
                  f"{g} ({'met' if g is not None and g >= 2 / 3 else 'MISSED'}: target >= 2/3)")
    return 1 if any(r["lost"] or r["duplicates"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
