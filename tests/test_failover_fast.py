"""Failures handled faster than lease speed (issue 9, part 2), with invariant 1 checked.

* A proposal that provably never left (the target's process is dead: the reconnect is
  refused) puts the call back in dispatch at once, in its place; after the target's
  restart a reconciliation finds every call at exactly one site.
* A peer whose node dies gets no new proposal 1 s after its connection dropped (the
  transfer driver's report makes it a suspect), long before its member key (TTL) or its
  load (``max_peer_age_s``) could expire; decisions name it "suspect".
* A node restarted on its data directory takes its member key over from its dead
  previous process at once — the site never leaves the membership — while a process
  that cannot prove it is that successor still waits for the holder's lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from pathlib import Path

from node_fixtures import Stubs, answering_agent, node_process, running_node
from router.coord import EtcdCoordinator, EtcdSettings, Member
from router.v1 import routing_pb2
from transfer_fixtures import (
    free_port, list_calls, named_site, offer_req, reconcile, start_node_on, state, write_named_site,
)

POLICY = {"default": {"wait_threshold": {"factor": 1.0}}, "max_peer_age_s": 30.0}
LONG_TTL_S = 10  # neither lease expiry nor stale loads can explain what these tests see


async def until(pred, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(step)


def node_env(endpoints, prefix: str, ttl: int = LONG_TTL_S) -> dict:
    return {"TANDEM_ETCD_ENDPOINTS": ",".join(endpoints), "TANDEM_ETCD_PREFIX": prefix,
            "TANDEM_ETCD_TTL": str(ttl), "TANDEM_DRAIN_S": "0.2"}


@contextlib.asynccontextmanager
async def observer(endpoints, prefix: str, site: str = "observer", ttl: int = LONG_TTL_S):
    c = EtcdCoordinator(site, EtcdSettings(endpoints=tuple(endpoints), prefix=prefix, ttl_s=ttl, op_timeout_s=1.0))
    await c.start()
    await c.wait_ready(10)
    try:
        yield c
    finally:
        await c.close()


# --- 1. never sent: back in dispatch at once ----------------------------------------------


async def test_refused_proposal_is_back_in_dispatch_at_once(tmp_path):
    t_file = write_named_site(tmp_path / "target.yaml", "target")
    port = free_port()
    target = await asyncio.to_thread(start_node_on, t_file, tmp_path / "t", port)
    ids = ["a", "b", "c", "d"]
    try:
        async with running_node(named_site("origin"), tmp_path / "o") as o:
            # a long reservation time: only "never sent" can explain a quick return
            o.node.transfers.ttl_s, o.node.transfers.margin_s = 30.0, 5.0
            for cid in ids:
                await o.stubs.routing.OfferCall(offer_req(cid))
            out = await o.node.transfer("a", target.address)  # the channel is READY now
            assert out.state == "committed", out
            target.kill()
            await asyncio.sleep(0.2)
            started = time.monotonic()
            out = await o.node.transfer("c", target.address)
            took = time.monotonic() - started
            assert (out.state, out.reason, out.unsent) == ("aborted", "unreachable", True), out
            assert took <= 1.0, took
            got = await o.stubs.routing.GetCall(routing_pb2.GetCallRequest(call_id="c"))
            assert state(got.call) == "queued" and got.position == 2 and got.call.transfer_count == 1
            # nothing listens at all (never was): the same
            out = await o.node.transfer("d", f"127.0.0.1:{free_port()}")
            assert out.unsent and out.state == "aborted"
            # the target comes back with its journal: every call at exactly one site
            target = await asyncio.to_thread(start_node_on, t_file, tmp_path / "t", port)
            st = Stubs.connect(target.address)
            try:
                owner = await reconcile(o.stubs, st, ids)
                assert owner == {"a": "target", "b": "origin", "c": "origin", "d": "origin"}, owner
                assert "c" not in await list_calls(st)
            finally:
                await st.channel.close()
    finally:
        target.kill()


# --- 2. a dead peer is left out within 1 s --------------------------------------------------


def _site(directory: Path, name: str) -> Path:
    return write_named_site(directory / f"{name}.yaml", name)


def _records(log_path: Path, kind: str) -> list[dict]:
    pat = re.compile(rf"tandem\.overflow: {kind} (\{{.*\}})$")
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        m = pat.search(line)
        if m:
            out.append(json.loads(m.group(1)))
    return out


async def test_dead_peer_gets_no_proposal_a_second_after_it_failed(etcd, etcd_prefix, tmp_path):
    env = node_env(etcd.endpoints, etcd_prefix)
    async with observer(etcd.endpoints, etcd_prefix) as obs:
        await obs.put_policy(POLICY)
        with contextlib.ExitStack() as stack:
            alpha = stack.enter_context(node_process(_site(tmp_path, "alpha"), tmp_path / "alpha", sync="none", env=env))
            beta = stack.enter_context(node_process(_site(tmp_path, "beta"), tmp_path / "beta", sync="none", env=env))
            gamma = stack.enter_context(node_process(_site(tmp_path, "gamma"), tmp_path / "gamma", sync="none",
                                                     env=env))
            sa, sb, sg = (Stubs.connect(p.address) for p in (alpha, beta, gamma))
            answered: list[str] = []
            agents = [asyncio.create_task(answering_agent(s, f"fr-00{i}", answered))
                      for s in (sb, sg) for i in (1, 2, 3)]
            try:
                def ready():
                    loads = obs.peer_loads()
                    return all(n in loads and loads[n].snapshot.queues["billing-fr-voice"].free_agents >= 3
                               for n in ("beta", "gamma")) and len(obs.members()) == 3
                await until(ready, 20, "beta and gamma with free agents")
                ids: list[str] = []
                n = 0

                async def offer_for(seconds: float) -> None:
                    nonlocal n
                    end = time.monotonic() + seconds
                    while time.monotonic() < end:
                        n += 1
                        ids.append(f"k{n:04d}")
                        await sa.routing.OfferCall(offer_req(ids[-1]), timeout=5)
                        await asyncio.sleep(0.05)

                await offer_for(2.0)
                assert any(d["target"] == "beta" for d in _records(alpha.log_path, "overflow")), "beta never chosen"
                beta.kill()
                killed = time.time()
                await offer_for(3.0)
                assert "beta" in obs.members(), "beta's lease expired: the test proves nothing"
                decided = [d for d in _records(alpha.log_path, "overflow") if d["t"] > killed]
                to_beta = [d["t"] - killed for d in decided if d["target"] == "beta"]
                assert not to_beta or max(to_beta) <= 1.0, to_beta
                late = [d for d in decided if d["t"] > killed + 1.0]
                assert late, "no decision after the kill"
                for d in late:
                    beta_c = [c for c in d["candidates"] if c["site"] == "beta"]
                    assert beta_c and beta_c[0]["excluded"].startswith("suspect"), d
                # the calls sent to beta that it provably never saw are back at once
                outcomes = [o for o in _records(alpha.log_path, "outcome") if o["target"] == "beta" and o["unsent"]]
                assert all(o["t"] - o["started"] <= 1.0 for o in outcomes), outcomes
                # beta comes back: every call is owned by exactly one site
                beta2 = stack.enter_context(node_process(_site(tmp_path, "beta"), tmp_path / "beta", sync="none",
                                                         env=env))
                sb2 = Stubs.connect(beta2.address)

                async def settled() -> bool:
                    return not any(state(c) == "transferring" for c in (await list_calls(sa)).values())

                deadline = time.monotonic() + 30
                while not await settled():
                    assert time.monotonic() < deadline, "transfers to beta never resolved"
                    await asyncio.sleep(0.2)
                owners: dict[str, list[str]] = {}
                for name, s in (("alpha", sa), ("beta", sb2), ("gamma", sg)):
                    for cid, c in (await list_calls(s)).items():
                        if state(c) not in ("transferred", "transferring"):
                            owners.setdefault(cid, []).append(name)
                lost = [c for c in ids if c not in owners]
                dups = {c: owners[c] for c in ids if len(owners.get(c, [])) > 1}
                assert not lost and not dups, (lost, dups)
                await sb2.channel.close()
            finally:
                for a in agents:
                    a.cancel()
                await asyncio.gather(*agents, return_exceptions=True)
                for s in (sa, sb, sg):
                    await s.channel.close()


# --- 3. a restarted node re-registers at once -------------------------------------------------


async def test_restarted_node_takes_its_member_key_before_the_old_lease_expires(etcd, etcd_prefix, tmp_path):
    env = node_env(etcd.endpoints, etcd_prefix)
    site_file = _site(tmp_path, "beta")
    async with observer(etcd.endpoints, etcd_prefix) as obs:
        absent: list[float] = []
        obs.on_members(lambda m: absent.append(time.monotonic()) if "beta" not in m else None)
        with node_process(site_file, tmp_path / "beta", sync="none", env=env) as first:
            old = await until(lambda: obs.members().get("beta"), 15, "beta registered")
            assert old.instance and old.pid == first.proc.pid
        killed = time.monotonic()  # node_process SIGKILLs at exit
        with node_process(site_file, tmp_path / "beta", sync="none", env=env) as second:
            new = await until(lambda: (m := obs.members().get("beta")) and m.pid != old.pid and m,
                              LONG_TTL_S, "the restarted beta registered")
            took = time.monotonic() - killed
            # the old lease was kept alive every TTL/3: it could not expire before 2/3 TTL
            assert took < LONG_TTL_S * 2 / 3, took
            assert new.pid == second.proc.pid and new.instance == old.instance
            assert absent == [], "beta left the membership"
            await asyncio.sleep(0.5)
            assert obs.members()["beta"].pid == second.proc.pid


async def test_only_a_proven_successor_takes_the_key(etcd, etcd_prefix):
    async with observer(etcd.endpoints, etcd_prefix, "lyon") as first, \
            observer(etcd.endpoints, etcd_prefix, "lyon") as second:
        held = Member("lyon", "127.0.0.1:1", "emea", instance="host:/data:1:2")
        assert await first.register(held) is True
        old_lease = first.session.lease_id
        # same instance claimed, but no proof (another data directory, or a live holder)
        second.successor_of = lambda m: False
        assert await second.register(Member("lyon", "127.0.0.1:2", "emea", instance="host:/data:1:2")) is False
        await asyncio.sleep(0.3)
        assert first.members()["lyon"].address == "127.0.0.1:1"
        # proven: taken at once, and the old lease is revoked (its session is lost)
        second.successor_of = lambda m: m.instance == "host:/data:1:2" and m.address == "127.0.0.1:1"
        assert await second.register(Member("lyon", "127.0.0.1:2", "emea", instance="host:/data:1:2")) is True
        await until(lambda: second.members().get("lyon") and second.members()["lyon"].address == "127.0.0.1:2",
                    2, "the successor's record")
        assert second.takeovers == 1
        info = await second.link.run("lease info", lambda c: c.get_lease_info(old_lease))
        assert info.TTL <= 0, "the predecessor's lease was not revoked"
        first.session.mark_lost("revoked")  # what its keepalive finds out within a TTL
        # the predecessor, on a new session, cannot take it back: it has no proof
        await until(lambda: first.connected, 5, "the predecessor's new session")
        assert await first.register(held) is False
        assert second.members()["lyon"].address == "127.0.0.1:2"
