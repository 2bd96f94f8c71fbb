"""The node against queueing theory: one queue, N agents, Poisson arrivals, exponential
talk times, no abandonment, no wrap-up. A work-conserving FIFO router is then an M/M/N
queue, so the measured ASA and service level must agree with Erlang C.

The node's own latency (push the offer, accept, connect, complete) keeps an agent busy on
top of the drawn talk time, so the formula is fed the *measured* mean service time:
from the moment the agent got the offer to the node's end of the call. Wait = from the
node queuing the call to the agent getting the offer. Both clocks are this machine's wall
clock (the node's times are Unix seconds).

Measurement: calls offered after a warm-up, in offer order, cut into 20 batches; the
batch means give the mean and a 99% confidence interval (Student t, 19 df). The check
allows the interval plus 8% of the theoretical value for what the M/M/N model leaves out
(service times are exponential plus a near-constant overhead, not exactly exponential).
A router that left agents idle while calls wait, or that served out of order, misses by
far more: at this load, one agent in four idle doubles the ASA.
"""

from __future__ import annotations

import asyncio
import math
import statistics
from pathlib import Path

import pytest
import uvloop
import yaml

from router import erlang
from router.loadgen import CallStream, LoadGen, LoadGenConfig
from router.loadgen_agents import AgentBehaviour
from router.loadgen_report import reconcile
from router.loadgen_rpc import NodeClient
from router.nodeproc import running_nodes

pytestmark = pytest.mark.slow

N_AGENTS = 4
RHO = 0.75
SCALE = 1000.0  # simulated seconds per real second
TALK_S = 60.0  # simulated: 60 ms real
RUN_S = 45.0  # real seconds of arrivals
WARMUP_S = 5.0
BATCHES = 20
T99_19DF = 2.861
MODEL_SLACK = 0.08
SL_THRESHOLD = 0.25  # service level threshold, as a fraction of the mean service time


def erlang_site() -> dict:
    return {
        "site": {"name": "erlang", "region": "lab", "kind": "inhouse"},
        "routing": {"offer_timeout_s": 30, "repeat_window_h": 0,
                    "head_start_s": {"standard": 0, "repeat": 0, "whitelist": 0, "vip": 0}},
        "queues": [{"name": "mmn-voice", "skill": "mmn", "channel": "voice", "wrap_up_s": 0,
                    "aht_s": TALK_S / SCALE, "max_length": 100_000}],
        "agents": [{"id": "a", "count": N_AGENTS, "skills": {"mmn": 5}, "capacity": {"voice": 1}}],
    }


def batch_ci(values: list[float]) -> tuple[float, float]:
    """(mean of batch means, 99% half-width)."""
    size = len(values) // BATCHES
    means = [statistics.fmean(values[i * size:(i + 1) * size]) for i in range(BATCHES)]
    return statistics.fmean(means), T99_19DF * statistics.stdev(means) / math.sqrt(BATCHES)


async def _run(address: str):
    rate_per_h = RHO * N_AGENTS * 3600.0 / TALK_S
    cfg = LoadGenConfig(
        addresses={"erlang": address},
        streams=[CallStream(site="erlang", skill="mmn", rate_per_h=rate_per_h, talk_s=TALK_S,
                            talk_dist="exponential", patience_s=None, name="mmn-voice")],
        agents={"erlang": [f"a-{n:03d}" for n in range(1, N_AGENTS + 1)]},
        time_scale=SCALE,
        behaviour=AgentBehaviour(csat_p=0.0),
        seed=7,
        drain_s=10.0,
        max_active=2_000,
    )
    gen = LoadGen(cfg)
    await gen.run(RUN_S)
    client = NodeClient("erlang", address)
    try:
        calls = await client.list_calls()
    finally:
        await client.close()
    return gen, calls


def test_erlang_c_agreement(tmp_path: Path):
    site_file = tmp_path / "erlang.yaml"
    site_file.write_text(yaml.safe_dump(erlang_site()))
    with running_nodes([site_file], tmp_path / "nodes") as nodes:
        gen, calls = uvloop.run(_run(nodes["erlang"].address))

    rec = reconcile(gen.records.values(), {"erlang": calls}, gen.ledger, gen.run_id)
    assert rec.lost == 0 and rec.duplicates == 0, rec.examples
    assert gen.totals().forced_abandons == 0, "the drain did not empty the queue"

    node = {c.call_id: c for c in calls}
    t_start = gen.started_at + WARMUP_S
    t_end = gen.arrivals_ended_at
    measured = sorted(
        (r for r in gen.records.values() if t_start <= r.offered_at <= t_end),
        key=lambda r: r.offered_at,
    )
    assert len(measured) >= 1500, f"only {len(measured)} calls measured"
    waits, services = [], []
    for r in measured:
        c = node[r.call_id]
        assert r.outcome == "completed" and r.assignments == 1, r
        waits.append(max(0.0, r.assign_recv_at - (c.queued_at or c.offered_at)))
        services.append(c.ended_at - r.assign_recv_at)
    lam = len(measured) / (measured[-1].offered_at - measured[0].offered_at)
    s_mean = statistics.fmean(services)
    rho = lam * s_mean / N_AGENTS
    assert rho < 0.9, f"measured occupancy {rho:.2f}: the node's overhead is too large for this test"

    threshold = SL_THRESHOLD * s_mean
    asa_theory = erlang.asa(N_AGENTS, lam, s_mean)
    sl_theory = erlang.service_level(N_AGENTS, lam, s_mean, threshold)
    asa, asa_ci = batch_ci(waits)
    sl, sl_ci = batch_ci([1.0 if w <= threshold else 0.0 for w in waits])
    pw, pw_ci = batch_ci([1.0 if w > 0.1 * (s_mean - TALK_S / SCALE) + 0.002 else 0.0 for w in waits])
    report = (
        f"\n{len(measured)} calls, lambda {lam:.2f}/s, mean service {1000 * s_mean:.2f} ms "
        f"(talk {TALK_S:.0f} ms + node overhead {1000 * (s_mean - TALK_S / SCALE):.2f} ms), rho {rho:.3f}\n"
        f"ASA  measured {1000 * asa:.2f} ± {1000 * asa_ci:.2f} ms, Erlang C {1000 * asa_theory:.2f} ms\n"
        f"SL(<= {1000 * threshold:.1f} ms) measured {sl:.3f} ± {sl_ci:.3f}, Erlang C {sl_theory:.3f}\n"
        f"P(wait) ~ measured {pw:.3f} ± {pw_ci:.3f}, Erlang C {erlang.erlang_c(N_AGENTS, lam * s_mean):.3f}"
    )
    print(report)
    assert abs(asa - asa_theory) <= asa_ci + MODEL_SLACK * asa_theory, report
    assert abs(sl - sl_theory) <= sl_ci + MODEL_SLACK * (1 - sl_theory), report
