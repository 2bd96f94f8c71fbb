"""Partner caps counted for the whole cluster in etcd (router.coord.partners), against a
real etcd: several origins (each its own coordinator and connection) racing for the same
partner never take more than its concurrency cap or its per-second / per-hour / per-day
counts; a release frees exactly the caller's slot; a restarted origin's reconciliation
frees only its own slots of calls no longer out; contracts in etcd are validated (an
invalid value leaves the previous one in force) and token keys are made once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest

from router.contracts import parse_contract
from router.coord import EtcdCoordinator, EtcdSettings
from router.coord.keys import Keys
from router.coord.partners import CapReached, ContractRejected, PartnerBook

BASE = {"partner": "blueline", "value_tiers": ["low", "standard"]}


def contract(**caps):
    return parse_contract(json.dumps({**BASE, "caps": caps}))


@contextlib.asynccontextmanager
async def books(etcd, prefix: str, sites: list[str]):
    """One PartnerBook per origin site, each on its own etcd connection."""
    out = []
    try:
        for s in sites:
            c = EtcdCoordinator(s, EtcdSettings(endpoints=tuple(etcd.endpoints), prefix=prefix, ttl_s=3,
                                                op_timeout_s=2.0))
            b = PartnerBook(c)
            await c.start()
            await c.wait_ready(10)
            out.append(b)
        yield out
    finally:
        for b in out:
            await b.coord.close()


async def test_racing_origins_never_exceed_the_concurrency_cap(etcd, etcd_prefix):
    cap = 5
    c = contract(concurrent=cap)
    async with books(etcd, etcd_prefix, ["alpha", "beta", "gamma"]) as bs:
        async def take(b: PartnerBook, cid: str) -> bool:
            try:
                await b.acquire("blueline", cid, c, time.time())
                return True
            except CapReached:
                return False

        results = await asyncio.gather(*(take(b, f"{b.site}-{i}") for b in bs for i in range(8)))
        assert sum(results) == cap
        rng = await bs[0].coord.link.run("t", lambda cl: cl.get_prefix(Keys(etcd_prefix).partner_slots("blueline").encode()))
        holders = sorted(json.loads(kv.value)["call_id"] for kv in rng)
        assert len(holders) == cap == len(set(holders))
        # releasing one frees one: exactly one more gets in
        winner = holders[0]
        owner = next(b for b in bs if winner.startswith(b.site))
        assert await owner.release("blueline", winner)
        assert not await owner.release("blueline", winner)  # idempotent
        again = await asyncio.gather(*(take(b, f"{b.site}-late") for b in bs))
        assert sum(again) == 1
        # a second acquire of a call that holds a slot is no new slot
        held = next(h for h in holders if h != winner)
        b = next(b for b in bs if held.startswith(b.site))
        await b.acquire("blueline", held, c, time.time())
        rng = await bs[0].coord.link.run("t", lambda cl: cl.get_prefix(Keys(etcd_prefix).partner_slots("blueline").encode()))
        assert len(list(rng)) == cap


async def test_rate_caps_hold_across_origins(etcd, etcd_prefix):
    c = contract(per_hour=7)
    async with books(etcd, etcd_prefix, ["alpha", "beta"]) as bs:
        async def take(b: PartnerBook, cid: str) -> bool:
            try:
                await b.acquire("blueline", cid, c, time.time())
                return True
            except CapReached as e:
                assert "per hour" in e.reason
                return False

        results = await asyncio.gather(*(take(b, f"{b.site}-{i}") for b in bs for i in range(6)))
        assert sum(results) == 7
        # the counter carries a lease of its own (it expires with its bucket)
        key = Keys(etcd_prefix).partner_rate("blueline", "h", str(int(time.time()) // 3600)).encode()
        got = await bs[0].coord.link.run("t", lambda cl: cl.get(key))
        assert got is not None and int(got.value) == 7 and got.lease != 0


async def test_per_second_cap_resets_with_the_second(etcd, etcd_prefix):
    c = contract(per_second=2)
    async with books(etcd, etcd_prefix, ["alpha"]) as (b,):
        t0 = float(int(time.time()) + 1)
        await b.acquire("blueline", "s1", c, t0)
        await b.acquire("blueline", "s2", c, t0 + 0.5)
        with pytest.raises(CapReached):
            await b.acquire("blueline", "s3", c, t0 + 0.9)
        await b.acquire("blueline", "s3", c, t0 + 1.0)


async def test_day_cap_counts_in_the_partners_time_zone(etcd, etcd_prefix):
    c = parse_contract(json.dumps({**BASE, "caps": {"per_day": 1}, "hours": {"tz": "Asia/Manila"}}))
    async with books(etcd, etcd_prefix, ["alpha"]) as (b,):
        # 2026-12-01 15:59:59 UTC is 23:59:59 in Manila; one second later is the next local day
        t = 1796140799.0
        await b.acquire("blueline", "d1", c, t)
        with pytest.raises(CapReached):
            await b.acquire("blueline", "d2", c, t - 3600)  # same Manila day
        await b.acquire("blueline", "d2", c, t + 1)


async def test_reconcile_frees_only_this_sites_calls_no_longer_out(etcd, etcd_prefix):
    c = contract(concurrent=10)
    async with books(etcd, etcd_prefix, ["alpha", "beta"]) as (a, b):
        for cid in ("a1", "a2", "a3"):
            await a.acquire("blueline", cid, c, time.time())
        await b.acquire("blueline", "b1", c, time.time())
        freed = await a.reconcile(lambda partner, cid: cid == "a2")  # only a2 is still out
        assert freed == 2
        rng = await a.coord.link.run("t", lambda cl: cl.get_prefix(Keys(etcd_prefix).partner_slots("blueline").encode()))
        assert sorted(json.loads(kv.value)["call_id"] for kv in rng) == ["a2", "b1"]


async def test_contracts_in_etcd_are_validated_and_token_keys_made_once(etcd, etcd_prefix):
    async with books(etcd, etcd_prefix, ["alpha", "beta"]) as (a, b):
        with pytest.raises(ContractRejected):
            await a.put_contract(json.dumps({**BASE, "caps": {"concurrent": 0}}))
        rev = await a.put_contract(json.dumps({**BASE, "caps": {"concurrent": 3}}))
        deadline = time.monotonic() + 5
        while "blueline" not in b.contracts() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert b.contracts()["blueline"].caps.concurrent == 3 and b.revision("blueline") == rev
        # written behind the validator's back: ignored, the previous one stays, the error is told
        etcd.etcdctl("put", Keys(etcd_prefix).partner_contract("blueline"), '{"partner": "blueline", "oops": 1}')
        while "blueline" not in b.errors() and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.05)
        assert "oops" in b.errors()["blueline"]
        assert b.contracts()["blueline"].caps.concurrent == 3
        ka, kb = await asyncio.gather(a.token_key("blueline"), b.token_key("blueline"))
        assert ka == kb and len(ka) == 32
        assert await a.token_key("other") != ka
