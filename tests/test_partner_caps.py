"""Partner caps and value-based eligibility end to end (issue 3 §2): real etcd, real
node processes.

``alpha`` is an in-house site with no agent signed in: every call it queues would wait
for ever. ``gamma`` is a partner site (``kind: partner``) whose agents are signed in but
never READY: they are staffed (so gamma is a candidate) and answer nothing, so every
call moved there stays active (queued) at gamma until the test abandons it there — the
partner's concurrent load is what Admin.ListCalls at gamma shows. The policy sends 100 %
of alpha's queues to gamma (a split: overflow wants every call; no expected-wait
comparison with a site where nobody is ready), under a contract with ``max_concurrent``,
``max_calls_per_s`` and, in the last test, ``hours``.

Checked: at most ``max_concurrent`` calls are active at gamma at any time, and the first
ones arrive no faster than ``max_calls_per_s``; when gamma ends some (abandons), more
move, until all have; high-value work (alpha's ``billing-en-voice`` is ``value: high``)
never goes to gamma even when it has room; a partner closed by ``hours`` gets nothing,
and opening it (a new policy in etcd) lets the waiting calls move. A reconciliation over
both sites finds every call at exactly one site, none lost or duplicated.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import yaml

from node_fixtures import Stubs, node_process, site_dict
from test_cluster import all_calls, node_env, observer, offer, reconcile, until
from router.v1 import agents_pb2, routing_pb2
from router.v1 import types_pb2 as t

S = t
CAP = 3
RATE = 2.0
FR = "billing-fr-voice"
ACTIVE = {S.CALL_STATE_QUEUED, S.CALL_STATE_ASSIGNED, S.CALL_STATE_CONNECTED, S.CALL_STATE_TRANSFERRING}


def policy(hours: dict | None = None) -> dict:
    contract: dict = {"max_value": "standard", "max_concurrent": CAP, "max_calls_per_s": RATE}
    if hours is not None:
        contract["hours"] = hours
    return {
        "max_peer_age_s": 3.0,
        "default": {"split": {"percent": 100, "to": ["gamma"]}},
        "partners": {"gamma": contract},
    }


def closed_now(tz: str = "Asia/Tokyo") -> dict:
    """Opening hours that exclude the present hour in ``tz`` (2 to 3 hours from now)."""
    h = datetime.now(ZoneInfo(tz)).hour
    return {"tz": tz, "open": f"{(h + 2) % 24:02d}:00", "close": f"{(h + 3) % 24:02d}:00"}


def write_sites(directory: Path) -> tuple[Path, Path]:
    a = site_dict()
    a["site"]["name"] = "alpha"
    for q in a["queues"]:
        if q["name"] == "billing-en-voice":
            q["value"] = "high"
    g = site_dict()
    g["site"]["name"] = "gamma"
    g["site"]["kind"] = "partner"
    paths = []
    for d in (a, g):
        p = directory / f"{d['site']['name']}.yaml"
        p.write_text(yaml.safe_dump(d))
        paths.append(p)
    return paths[0], paths[1]


def offer_en(call_id: str) -> routing_pb2.OfferCallRequest:
    r = offer(call_id)
    r.language = "en"
    return r


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, endpoints, prefix: str, obs):
    """alpha (no agents) and gamma (partner; every agent signed in, never READY)."""
    alpha_f, gamma_f = write_sites(tmp_path)
    env = node_env(endpoints, prefix)
    with node_process(alpha_f, tmp_path / "alpha", sync="none", env=env) as alpha, \
            node_process(gamma_f, tmp_path / "gamma", sync="none", env=env) as gamma:
        sa, sg = Stubs.connect(alpha.address), Stubs.connect(gamma.address)
        try:
            for aid in ("fr-001", "fr-002", "fr-003", "bi-001", "bi-002"):
                await sg.agents.SignIn(agents_pb2.SignInRequest(agent_id=aid), timeout=5)

            def ready():
                p = obs.peer_loads().get("gamma")
                m = obs.members()
                return (p is not None and p.snapshot.kind == "partner" and "alpha" in m
                        and p.snapshot.queues[FR].staffed >= 3
                        and p.snapshot.queues["billing-en-voice"].staffed >= 2)

            await until(ready, 10, "gamma's load to show its signed-in agents")
            await asyncio.sleep(0.5)  # alpha's own watch sees gamma too
            yield alpha, gamma, sa, sg
            assert alpha.alive() and gamma.alive()
        finally:
            await sa.channel.close()
            await sg.channel.close()


def active(calls: dict[str, int], ids) -> set[str]:
    return {c for c in ids if calls.get(c) in ACTIVE}


async def test_concurrency_and_rate_caps_high_value_stays(etcd, etcd_prefix, tmp_path):
    async with observer(etcd.endpoints, etcd_prefix) as obs:
        await obs.put_policy(policy())
        async with cluster(tmp_path, etcd.endpoints, etcd_prefix, obs) as (alpha, gamma, sa, sg):
            await until(lambda: "overflow policy in force" in alpha.log(), 5, "alpha to read the policy")
            std = [f"std-{i}" for i in range(10)]
            high = [f"high-{i}" for i in range(3)]
            for cid in high:  # first: gamma has room for them, and still must not get them
                r = await sa.routing.OfferCall(offer_en(cid), timeout=5)
                assert r.call.state == S.CALL_STATE_QUEUED
            for cid in std:
                r = await sa.routing.OfferCall(offer(cid), timeout=5)
                assert r.call.state == S.CALL_STATE_QUEUED

            # Watch gamma: arrival times, the most ever active there at once.
            arrived: dict[str, float] = {}
            peak = 0
            t0 = time.monotonic()

            async def look() -> dict[str, int]:
                nonlocal peak
                calls = await all_calls(sg)
                now = time.monotonic()
                for c in calls:
                    arrived.setdefault(c, now)
                peak = max(peak, len(active(calls, std + high)))
                assert not set(calls) & set(high), f"high-value call at the partner: {calls}"
                return calls

            async def until_gamma(pred, timeout, what):
                deadline = time.monotonic() + timeout
                while True:
                    calls = await look()
                    if pred(calls):
                        return calls
                    if time.monotonic() > deadline:
                        raise AssertionError(f"timed out after {timeout} s waiting for {what}: {calls}")
                    await asyncio.sleep(0.03)

            await until_gamma(lambda c: len(active(c, std)) == CAP, 10, f"{CAP} calls active at gamma")
            # The rate cap: no more than RATE calls in the first second.
            first = sorted(arrived.values())
            assert first[CAP - 1] - first[0] >= 1.0 - 0.35, (first, "rate cap not applied")
            # At the cap, nothing more moves (partner polls and sweeps run meanwhile).
            hold_until = time.monotonic() + 2.5
            while time.monotonic() < hold_until:
                calls = await look()
                assert len(calls) == CAP, calls
                await asyncio.sleep(0.05)
            ca = await all_calls(sa)
            assert sum(ca[c] == S.CALL_STATE_QUEUED for c in std) == len(std) - CAP, ca
            assert all(ca[c] == S.CALL_STATE_QUEUED for c in high), ca

            # The partner ends calls (the caller hangs up there): more move, never above the cap.
            ended: set[str] = set()
            while len(ended) < len(std):
                calls = await until_gamma(lambda c: len(active(c, std)) == min(CAP, len(std) - len(ended)),
                                          10, "gamma to fill up to the cap again")
                for cid in active(calls, std):
                    await sg.routing.AbandonCall(routing_pb2.AbandonCallRequest(call_id=cid, reason="hangup"),
                                                 timeout=5)
                    ended.add(cid)
            assert ended == set(std)
            assert peak <= CAP, peak

            # The high-value calls are still queued at alpha (gamma had room for a while).
            await asyncio.sleep(1.0)
            await look()
            seen = await reconcile({"alpha": sa, "gamma": sg}, std + high)
            for cid in std:
                assert seen[cid] == {"alpha": S.CALL_STATE_TRANSFERRED, "gamma": S.CALL_STATE_ABANDONED}, seen[cid]
            for cid in high:
                assert seen[cid] == {"alpha": S.CALL_STATE_QUEUED}, seen[cid]
            assert time.monotonic() - t0 < 40


async def test_partner_closed_by_hours_gets_nothing_until_open(etcd, etcd_prefix, tmp_path):
    async with observer(etcd.endpoints, etcd_prefix) as obs:
        await obs.put_policy(policy(hours=closed_now()))
        async with cluster(tmp_path, etcd.endpoints, etcd_prefix, obs) as (alpha, gamma, sa, sg):
            await until(lambda: "overflow policy in force" in alpha.log(), 5, "alpha to read the policy")
            ids = [f"closed-{i}" for i in range(2)]
            for cid in ids:
                r = await sa.routing.OfferCall(offer(cid), timeout=5)
                assert r.call.state == S.CALL_STATE_QUEUED
            await asyncio.sleep(2.0)  # several sweeps
            assert not await all_calls(sg)
            ca = await all_calls(sa)
            assert all(ca[c] == S.CALL_STATE_QUEUED for c in ids), ca

            # Open now (the same contract, hours covering the whole day): they move.
            await obs.put_policy(policy(hours={"tz": "Asia/Tokyo", "open": "00:00", "close": "24:00"}))

            async def moved():
                return len(active(await all_calls(sg), ids)) == len(ids)

            deadline = time.monotonic() + 10
            while not await moved():
                assert time.monotonic() < deadline, "calls did not move once the partner opened"
                await asyncio.sleep(0.1)
            seen = await reconcile({"alpha": sa, "gamma": sg}, ids)
            for cid in ids:
                assert seen[cid] == {"alpha": S.CALL_STATE_TRANSFERRED, "gamma": S.CALL_STATE_QUEUED}, seen[cid]
