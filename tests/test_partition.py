"""Invariant 6 with a real partition (issue 3 §4): one site cut off from etcd and its
peers by network namespaces and veth pairs (tests/netns_fixtures.py).

etcd and site ``alpha`` (A) run in the root namespace on the cluster link's address;
site ``beta`` (B) runs in its own namespace, registered with its address on the cluster
link, and is reached by its "local" callers and agents (the test) over a separate access
link that the partition does not touch.

The two sites complement each other: A's agents speak French only (fr-00x), B's speak
English only (en-00x), so French calls offered at B and English calls offered at A wait
for ever where they are unless they overflow — each site looks attractive to the other
in every load it ever published.

1. healthy: French calls at B overflow to A, English calls at A overflow to B;
2. partition (B's end of the cluster link down): B's lease expires at etcd; B keeps
   accepting and answering its own English calls; French calls at B stay queued at B
   (no overflow to A: B has no etcd session and only stale loads); English calls at A
   stay at A (B is no member any more); calls offered in the first instant of the cut
   (before any lease or load went stale) are never lost or duplicated;
3. heal: B registers again by itself, the calls that stayed overflow by themselves,
   new calls overflow again; a reconciliation over both sites (Admin.ListCalls) finds
   every call owned by exactly one site and answered exactly once; no process crashed.

A second test guards a bug found this way (fixed): an overflow whose transfer the
cut aborted must be decided again after the heal, not left queued at its origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from etcd_fixtures import _tmp_root
from netns_fixtures import HostEtcd, NetnsTopology, netns_topology, start_node
from node_fixtures import NodeProc, Stubs, all_calls, answering_agent, site_dict
from router.coord import EtcdCoordinator, EtcdSettings
from router.v1 import routing_pb2
from router.v1 import types_pb2 as t

pytestmark = pytest.mark.slow

TTL_S = 2
POLICY = {"default": {"wait_threshold": {"factor": 1.0}}, "max_peer_age_s": 3.0}
B_PORT = 7101  # inside B's own namespace every port is free
LIVE = {t.CALL_STATE_QUEUED, t.CALL_STATE_ASSIGNED, t.CALL_STATE_CONNECTED, t.CALL_STATE_TRANSFERRING,
        t.CALL_STATE_COMPLETED, t.CALL_STATE_ABANDONED}


def write_site(directory: Path, name: str) -> Path:
    d = site_dict()
    d["site"]["name"] = name
    d["agents"].append({"id": "en", "count": 2, "skills": {"billing": 7}, "languages": ["en"],
                        "capacity": {"voice": 1, "chat": 1}})
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


async def until(pred, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(step)


def offer(call_id: str, language: str) -> routing_pb2.OfferCallRequest:
    return routing_pb2.OfferCallRequest(call_id=call_id, skill="billing", channel=t.CHANNEL_VOICE, language=language,
                                        caller="+3361" + str(abs(hash(call_id)) % 10**7).zfill(7))


@contextlib.contextmanager
def host_etcd(host: str):
    root = Path(tempfile.mkdtemp(prefix="tandem-etcd-", dir=_tmp_root()))
    server = HostEtcd(root / "data", host)
    try:
        server.start()
        yield server
    finally:
        server.kill()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Cluster:
    topo: NetnsTopology
    obs: EtcdCoordinator
    alpha: NodeProc
    beta: NodeProc
    sa: Stubs  # A, in the root namespace
    sb: Stubs  # B, through its access link
    at_a: list[str]  # calls answered by A's (French) agents, in order
    at_b: list[str]  # calls answered by B's (English) agents

    @property
    def beta_advertised(self) -> str:
        return f"{self.topo.b_ip}:{B_PORT}"

    def alive(self) -> bool:
        return self.alpha.alive() and self.beta.alive()

    async def calls(self) -> dict[str, dict[str, int]]:
        """{call_id: {site: state}} over both sites (Admin.ListCalls)."""
        seen: dict[str, dict[str, int]] = {}
        for name, s in (("alpha", self.sa), ("beta", self.sb)):
            for cid, state in (await all_calls(s)).items():
                seen.setdefault(cid, {})[name] = state
        return seen


@contextlib.asynccontextmanager
async def partitionable_cluster(etcd_prefix: str, tmp_path: Path):
    """etcd + A in the root namespace, B in its own namespace, two agents at each site,
    the overflow policy in force; yields once both sites see each other's free agents."""
    with contextlib.ExitStack() as stack:
        topo = stack.enter_context(netns_topology())
        etcd = stack.enter_context(host_etcd(topo.core_ip))
        env = {"TANDEM_ETCD_ENDPOINTS": etcd.endpoint, "TANDEM_ETCD_PREFIX": etcd_prefix,
               "TANDEM_ETCD_TTL": str(TTL_S)}
        obs = EtcdCoordinator("observer", EtcdSettings(endpoints=etcd.endpoints, prefix=etcd_prefix, ttl_s=TTL_S,
                                                       op_timeout_s=1.0))
        await obs.start()
        agents: list[asyncio.Task] = []
        stubs: list[Stubs] = []
        try:
            await obs.wait_ready(10)
            await obs.put_policy(POLICY)
            a_file, b_file = write_site(tmp_path, "alpha"), write_site(tmp_path, "beta")
            alpha = start_node(a_file, tmp_path / "alpha", listen=f"{topo.core_ip}:0", env=env)
            stack.callback(alpha.kill)
            beta = start_node(b_file, tmp_path / "beta", listen=f"0.0.0.0:{B_PORT}", reach=topo.b_access_ip,
                              advertise=f"{topo.b_ip}:{B_PORT}", env=env, topo=topo)
            stack.callback(beta.kill)
            sa, sb = Stubs.connect(alpha.address), Stubs.connect(beta.address)
            stubs += [sa, sb]
            c = Cluster(topo, obs, alpha, beta, sa, sb, [], [])
            agents += [asyncio.create_task(answering_agent(sa, f"fr-00{i}", c.at_a)) for i in (1, 2)]
            agents += [asyncio.create_task(answering_agent(sb, f"en-00{i}", c.at_b)) for i in (1, 2)]

            members = await until(lambda: len(obs.members()) == 2 and obs.members(), 15, "both members")
            assert members["alpha"].address == alpha.address
            assert members["beta"].address == c.beta_advertised

            def free(site: str, queue: str) -> int:
                p = obs.peer_loads().get(site)
                return p.snapshot.queues[queue].free_agents if p is not None else -1

            await until(lambda: free("alpha", "billing-fr-voice") == 2 and free("beta", "billing-en-voice") == 2,
                        10, "both sites' free agents in their loads")
            await asyncio.sleep(0.5)  # each node's own watch sees the other's load too
            yield c
        finally:
            for a in agents:
                a.cancel()
            await asyncio.gather(*agents, return_exceptions=True)
            for s in stubs:
                await s.channel.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(obs.close(), 5)


async def test_partitioned_site_routes_locally_and_rejoins(etcd_prefix, tmp_path):
    t_start = time.monotonic()
    async with partitionable_cluster(etcd_prefix, tmp_path) as c:
        topo, obs, sa, sb, at_a, at_b = c.topo, c.obs, c.sa, c.sb, c.at_a, c.at_b

        # 1. healthy: overflow both ways.
        for i in range(3):
            r = await sb.routing.OfferCall(offer(f"h-b{i}", "fr"), timeout=5)
            assert r.call.state == t.CALL_STATE_QUEUED
            r = await sa.routing.OfferCall(offer(f"h-a{i}", "en"), timeout=5)
            assert r.call.state == t.CALL_STATE_QUEUED
        await until(lambda: {f"h-b{i}" for i in range(3)} <= set(at_a)
                    and {f"h-a{i}" for i in range(3)} <= set(at_b), 20, "overflow both ways while healthy")

        # 2. partition. Calls offered in the very first instant (loads fresh, leases
        # alive) may start a transfer into the cut: it must resolve without loss.
        topo.cut()
        cut_at = time.monotonic()
        r = await sa.routing.OfferCall(offer("w-a0", "en"), timeout=5)
        assert r.call.state == t.CALL_STATE_QUEUED
        r = await sb.routing.OfferCall(offer("w-b0", "fr"), timeout=5)
        assert r.call.state == t.CALL_STATE_QUEUED

        await until(lambda: "beta" not in obs.members(), TTL_S + 3, "B's lease to expire at etcd")
        lease_gone_s = time.monotonic() - cut_at
        await asyncio.sleep(0.3)  # A's own watch
        for i in range(3):
            r = await sb.routing.OfferCall(offer(f"p-bl{i}", "en"), timeout=5)  # B's own work
            assert r.call.state in (t.CALL_STATE_QUEUED, t.CALL_STATE_ASSIGNED), r
            r = await sb.routing.OfferCall(offer(f"p-b{i}", "fr"), timeout=5)  # only A could answer
            assert r.call.state == t.CALL_STATE_QUEUED, r
            r = await sa.routing.OfferCall(offer(f"p-al{i}", "fr"), timeout=5)  # A's own work
            assert r.call.state in (t.CALL_STATE_QUEUED, t.CALL_STATE_ASSIGNED), r
            r = await sa.routing.OfferCall(offer(f"p-a{i}", "en"), timeout=5)  # only B could answer
            assert r.call.state == t.CALL_STATE_QUEUED, r
        await until(lambda: {f"p-bl{i}" for i in range(3)} <= set(at_b)
                    and {f"p-al{i}" for i in range(3)} <= set(at_a), 10,
                    "each site to answer its own calls during the partition")
        # Several overflow sweeps (0.5 s) later, and past max_peer_age_s since the cut,
        # the calls only the other site could answer are still queued where they were
        # offered: no transfer was begun.
        stay_until = max(time.monotonic() + 2.0, cut_at + POLICY["max_peer_age_s"] + 1.0)
        while time.monotonic() < stay_until:
            ca, cb = await all_calls(sa), await all_calls(sb)
            for i in range(3):
                assert ca[f"p-a{i}"] == t.CALL_STATE_QUEUED, (f"p-a{i}", ca[f"p-a{i}"])
                assert cb[f"p-b{i}"] == t.CALL_STATE_QUEUED, (f"p-b{i}", cb[f"p-b{i}"])
            await asyncio.sleep(0.25)
        assert not {f"p-a{i}" for i in range(3)} & set(at_b)
        assert not {f"p-b{i}" for i in range(3)} & set(at_a)
        assert "beta" not in obs.members()
        assert c.alive(), (c.alpha.log(), c.beta.log())
        partition_s = time.monotonic() - cut_at

        # 3. heal: everything resumes by itself.
        topo.heal()
        healed_at = time.monotonic()
        await until(lambda: "beta" in obs.members(), 15, "B to register again by itself")
        rejoin_s = time.monotonic() - healed_at
        assert obs.members()["beta"].address == c.beta_advertised
        stayed_b = {f"p-b{i}" for i in range(3)}  # French, offered at B
        stayed_a = {f"p-a{i}" for i in range(3)}  # English, offered at A
        await until(lambda: stayed_b <= set(at_a) and stayed_a <= set(at_b), 20,
                    "the calls that stayed to overflow after the heal")
        resume_s = time.monotonic() - healed_at
        await sb.routing.OfferCall(offer("after-b", "fr"), timeout=5)
        await sa.routing.OfferCall(offer("after-a", "en"), timeout=5)
        await until(lambda: "after-b" in at_a and "after-a" in at_b, 15, "new calls to overflow after the heal")

        # Reconciliation over both sites.
        to_a = {*(f"h-b{i}" for i in range(3)), *stayed_b, "after-b", *(f"p-al{i}" for i in range(3))}
        to_b = {*(f"h-a{i}" for i in range(3)), *stayed_a, "after-a", *(f"p-bl{i}" for i in range(3))}
        window = {"w-b0": ("beta", "alpha"), "w-a0": ("alpha", "beta")}  # origin, the only site that can answer
        deadline = time.monotonic() + 15
        while True:  # until no call is transferring any more
            seen = await c.calls()
            if not any(t.CALL_STATE_TRANSFERRING in s.values() for s in seen.values()) \
                    or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        ids = to_a | to_b | set(window)
        assert set(seen) == ids, set(seen) ^ ids
        for cid in ids:
            owners = [s for s, st in seen[cid].items() if st in LIVE]
            assert len(owners) == 1, f"call {cid} owned by {owners}: {seen[cid]}"
        for cid in to_a | to_b:
            want = "alpha" if cid in to_a else "beta"
            other = "beta" if want == "alpha" else "alpha"
            assert seen[cid][want] == t.CALL_STATE_COMPLETED, (cid, seen[cid])
            if other in seen[cid]:  # the origin's record that it moved
                assert seen[cid][other] == t.CALL_STATE_TRANSFERRED, (cid, seen[cid])
        # A call whose overflow was caught by the cut: queued at its origin (see the
        # xfail test below: it is never decided again) or moved and answered once.
        for cid, (origin, answerer) in window.items():
            assert seen[cid] in ({origin: t.CALL_STATE_QUEUED},
                                 {origin: t.CALL_STATE_TRANSFERRED, answerer: t.CALL_STATE_COMPLETED}), (cid, seen[cid])
        answered = at_a + at_b
        assert len(answered) == len(set(answered)), "a call answered twice"
        assert set(at_a) - {"w-b0"} == to_a and set(at_b) - {"w-a0"} == to_b, (at_a, at_b)
        assert c.alive(), (c.alpha.log(), c.beta.log())
        total_s = time.monotonic() - t_start
        print(f"\npartition: lease gone after {lease_gone_s:.2f} s, cut for {partition_s:.2f} s; "
              f"B rejoined {rejoin_s:.2f} s after the heal, stayed calls moved within {resume_s:.2f} s; "
              f"window calls {({k: sorted(v) for k, v in seen.items() if k in window})}; total {total_s:.1f} s")
        assert total_s < 90, total_s


class StrandedCall(AssertionError):
    """The one failure the xfail test below expects (any other failure is real)."""


async def test_overflow_caught_by_the_cut_is_decided_again_after_the_heal(etcd_prefix, tmp_path):
    async with partitionable_cluster(etcd_prefix, tmp_path) as c:
        c.topo.cut()
        r = await c.sa.routing.OfferCall(offer("w-a0", "en"), timeout=5)  # loads fresh: goes for B
        assert r.call.state == t.CALL_STATE_QUEUED

        async def state_at_a() -> int:
            return (await all_calls(c.sa)).get("w-a0")

        deadline = time.monotonic() + 3
        while await state_at_a() != t.CALL_STATE_TRANSFERRING:
            assert time.monotonic() < deadline, "A never began a transfer to B after the cut"
            await asyncio.sleep(0.05)
        await until(lambda: "beta" not in c.obs.members(), TTL_S + 3, "B's lease to expire")
        # Heal only once the propose has failed: the transfer can then only abort (a heal
        # before that lets the retransmitted propose through, and it commits). It fails
        # as "no answer" (sent into the cut: the safe path) or, when the connection had
        # to be made again and could not be, "never sent" (aborted at once).
        await until(lambda: "propose w-a0/1" in c.alpha.log()
                    and ("no answer" in c.alpha.log() or "never sent" in c.alpha.log()), 6,
                    "A's propose into the cut to fail")
        c.topo.heal()
        await until(lambda: "beta" in c.obs.members(), 15, "B to register again")
        deadline = time.monotonic() + 15  # TTL + margin of the reservation at most
        while (st := await state_at_a()) == t.CALL_STATE_TRANSFERRING:
            assert time.monotonic() < deadline, "the transfer into the cut never resolved"
            await asyncio.sleep(0.1)
        assert st == t.CALL_STATE_QUEUED, f"w-a0 at A: {st} (expected back in its place after the abort)"
        assert "w-a0" not in c.at_b
        # Aborted and back in its place at A, where no agent speaks English: a sweep
        # must send it to B again now that B is back.
        try:
            await until(lambda: "w-a0" in c.at_b, 10, "w-a0 to overflow to B again after its aborted transfer")
        except AssertionError as e:
            raise StrandedCall(f"{e}; w-a0 at A: {await state_at_a()}") from None
        seen = await c.calls()
        assert seen["w-a0"] == {"alpha": t.CALL_STATE_TRANSFERRED, "beta": t.CALL_STATE_COMPLETED}, seen["w-a0"]
        assert c.alive()
