"""Elections and fenced writes on etcd (etcd's concurrency.Election, patroni style).

One leader key per election (``<prefix><election>/leader``), put on the candidate's
session lease only if its create revision is 0 (one transaction). The key's create
revision is the fencing token: every later leader's is greater, and a fenced write
(:meth:`ElectionMixin.put_targets`) is a transaction that compares it, so a leader that
was replaced (frozen, partitioned) cannot write any more.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import aetcd
from aetcd import transactions

from router.coord.base import CoordinationUnavailable, Leadership, NotLeader, StalePlan, Targets, _dumps
from router.coord.link import Backoff, LeaseGone, WatchEnded, cancel_all
from router.coord.session import CoordinatorParts, EtcdSession, to_bytes as _b

log = logging.getLogger("tandem.coord")


# --- leadership -----------------------------------------------------------------------


class EtcdLeadership(Leadership):
    """Leadership held on a session; see :class:`Leadership`."""

    def __init__(self, coord: CoordinatorParts, election: str, token: int, value: str, session: EtcdSession) -> None:
        self.election, self.token, self.value = election, token, value
        self.session = session
        self.lost = asyncio.Event()
        self._coord = coord
        self._task = coord._spawn(self._guard(), f"leader-{election}")

    def __repr__(self) -> str:
        return f"EtcdLeadership({self.election!r}, token={self.token}, active={self.active})"

    @property
    def active(self) -> bool:
        return not self.lost.is_set() and self.session.alive

    async def _guard(self) -> None:
        session_lost = asyncio.ensure_future(self.session.lost.wait())
        watch_end = asyncio.ensure_future(self._watch_key())
        try:
            await asyncio.wait({session_lost, watch_end}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_all({session_lost, watch_end})
            if not self.lost.is_set():
                log.warning("leadership of %s (token %d) lost", self.election, self.token)
            self.lost.set()

    async def _watch_key(self) -> None:
        """Returns once the leader key no longer holds our token."""
        key = self._coord.keys.leader(self.election)
        backoff = Backoff()
        while True:
            gen = self._coord.link.generation
            try:
                rng = await self._coord.link.run("get leader", lambda c: c.get_range(_b(key), _b(key) + b"\x00"))
                kvs = list(rng)
                if not kvs or kvs[0].create_revision != self.token:
                    return
                watch = await self._coord.link.watch("watch leader", _b(key), None, rng.header.revision + 1)
                backoff.reset()
                try:
                    async for ev in watch:
                        if ev.kind != aetcd.EventKind.PUT or ev.kv.create_revision != self.token:
                            return
                finally:
                    await watch.cancel()
            except CoordinationUnavailable:
                pass
            except WatchEnded:
                self._coord.link.reset(gen, "leader watch ended")
            await backoff.sleep()



class ElectionMixin:
    """The election part of :class:`router.coord.etcd.EtcdCoordinator`."""

    # --- election and fenced targets ----------------------------------------------------

    def _require_session(self, what: str) -> EtcdSession:
        s = self._session
        if s is None or not s.alive:
            raise CoordinationUnavailable(f"{what}: no etcd session")
        return s

    async def _try_lead(self, election: str, value: str) -> tuple[Leadership | None, int]:
        session = self._require_session("campaign")
        current = self._leaderships.get(election)
        if current is not None and current.active and current.session is session:
            return current, 0
        key = _b(self.keys.leader(election))
        raw = _b(_dumps({"candidate": value, "pid": os.getpid(), "since": time.time()}))
        tx = transactions
        try:
            ok, resp = await self.link.run(
                "campaign",
                lambda c: c.transaction(
                    compare=[tx.Create(key) == 0],
                    success=[tx.Put(key, raw, lease=session.lease_id)],
                    failure=[tx.Get(key)],
                ),
            )
        except LeaseGone:
            session.mark_lost("lease not found on campaign")
            raise
        if ok:
            token = resp[0].response_put.header.revision
        else:
            if not resp or not resp[0]:
                return None, -1  # deleted meanwhile: try again at once
            held = resp[0][0][1]
            if held.lease != session.lease_id:
                return None, held.header.revision
            token = held.create_revision  # we already lead on this session
        lead = EtcdLeadership(self, election, token, value, session)
        self._leaderships[election] = lead
        log.info("elected %s leader (fencing token %d)", election, token)
        return lead, 0

    async def try_lead(self, election: str, value: str) -> Leadership | None:
        lead, _ = await self._try_lead(election, value)
        return lead

    async def campaign(self, election: str, value: str, timeout: float | None = None) -> Leadership:
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = Backoff(0.1, 1.0)
        key = _b(self.keys.leader(election))

        def left() -> float:
            return 5.0 if deadline is None else deadline - time.monotonic()

        while left() > 0:
            try:
                if self._session is None or not self._session.alive:
                    await asyncio.wait_for(self._session_up.wait(), max(0.01, min(left(), 5.0)))
                lead, rev = await self._try_lead(election, value)
                if lead is not None:
                    return lead
                backoff.reset()
                if rev < 0:
                    continue
                watch = await self.link.watch("watch leader", key, None, rev + 1)
                try:
                    async def deleted() -> None:
                        async for ev in watch:
                            if ev.kind == aetcd.EventKind.DELETE:
                                return

                    await asyncio.wait_for(deleted(), max(0.01, min(left(), 5.0)))
                except asyncio.TimeoutError:
                    pass
                finally:
                    await watch.cancel()
            except (CoordinationUnavailable, asyncio.TimeoutError, WatchEnded):
                await asyncio.sleep(min(backoff.delay(), max(0.0, left())))
        raise CoordinationUnavailable(f"campaign {election}: not elected within {timeout} s")

    async def resign(self, leadership: Leadership) -> None:
        key = _b(self.keys.leader(leadership.election))
        leadership.lost.set()
        if self._leaderships.get(leadership.election) is leadership:
            del self._leaderships[leadership.election]
        await self.link.run(
            "resign",
            lambda c: c.transaction(
                compare=[transactions.Create(key) == leadership.token],
                success=[transactions.Delete(key)],
                failure=[],
            ),
        )

    async def leader(self, election: str) -> tuple[str, int] | None:
        key = _b(self.keys.leader(election))
        got = await self.link.run("get leader", lambda c: c.get(key))
        if got is None:
            return None
        try:
            value = str(json.loads(got.value).get("candidate", ""))
        except (ValueError, AttributeError):
            value = got.value.decode(errors="replace")
        return value, got.create_revision

    async def put_targets(self, site: str, targets: Mapping[str, Any], leadership: Leadership) -> int:
        lkey = _b(self.keys.leader(leadership.election))
        tkey = _b(self.keys.targets(site))
        raw = _b(_dumps({"fencing": leadership.token, "leader": leadership.value, "ts": time.time(),
                         "targets": dict(targets)}))
        ok, resp = await self.link.run(
            "put targets",
            lambda c: c.transaction(
                compare=[transactions.Create(lkey) == leadership.token],
                success=[transactions.Put(tkey, raw)],
                failure=[transactions.Get(lkey)],
            ),
        )
        if not ok:
            held = resp[0][0][1] if resp and resp[0] else None
            now = f"created at revision {held.create_revision}" if held else "absent"
            leadership.lost.set()
            raise NotLeader(f"fencing token {leadership.token} is stale: the leader key is {now}")
        return resp[0].response_put.header.revision

    async def get_targets(self, site: str) -> Targets | None:
        key = _b(self.keys.targets(site))
        got = await self.link.run("get targets", lambda c: c.get(key))
        if got is None:
            return None
        try:
            d = json.loads(got.value)
            return Targets(site=site, fencing=int(d["fencing"]), leader=str(d.get("leader", "")),
                           targets=dict(d.get("targets", {})), revision=got.mod_revision)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("ignoring unreadable targets %s: %s", key.decode(), e)
            return None


    # --- plans ---------------------------------------------------------------------------

    async def rebalance_state(self) -> dict[str, Any]:
        k = self.keys
        # The first read's revision is the base: anything a later read sees that changed
        # after it has a greater mod revision, so a plan computed from this state can only
        # be refused as stale for it, never applied over it.
        gen = await self.link.run("get generation", lambda c: c.get_range(_b(k.rebalancer_generation),
                                                                            _b(k.rebalancer_generation) + b"\x00"))
        revision = gen.header.revision
        generation = None
        for kv in gen:
            try:
                generation = json.loads(kv.value)
            except ValueError:
                generation = None
        out: dict[str, Any] = {"revision": revision, "generation": generation, "targets": {}, "applied": {},
                               "mod_revisions": {}}
        for what, prefix in (("targets", k.targets_prefix), ("applied", k.applied_prefix)):
            rng = await self.link.run(f"get {what}", lambda c, p=prefix: c.get_prefix(_b(p)))
            for kv in rng:
                site = k.site_of(kv.key, prefix)
                if site is None:
                    continue
                try:
                    doc = json.loads(kv.value)
                except ValueError:
                    continue
                if isinstance(doc, dict):
                    out[what][site] = doc
                    out["mod_revisions"][f"{what}/{site}"] = kv.mod_revision
        return out

    async def apply_plan(self, targets: Mapping[str, Mapping[str, Any]], leadership: Leadership, *,
                         base_revision: int, plan: str, sites: Iterable[str] = ()) -> tuple[int, int]:
        tx = transactions
        k = self.keys
        lkey, gkey = _b(k.leader(leadership.election)), _b(k.rebalancer_generation)
        fence = base_revision + 1
        watched = sorted(set(targets) | set(sites))
        # Read the generation to number the next one; the transaction compares it again.
        got = await self.link.run("get generation", lambda c: c.get(gkey))
        current = 0
        if got is not None:
            try:
                current = int(json.loads(got.value).get("generation", 0))
            except (ValueError, AttributeError, TypeError):
                current = 0
        generation = current + 1
        now = time.time()
        compare = [tx.Create(lkey) == leadership.token, tx.Mod(gkey) < fence, tx.Mod(_b(k.policy_overflow)) < fence]
        for site in watched:
            compare.append(tx.Mod(_b(k.targets(site))) < fence)
            compare.append(tx.Mod(_b(k.contingency(site))) < fence)
        success = [tx.Put(gkey, _b(_dumps({"generation": generation, "plan": plan, "fencing": leadership.token,
                                              "leader": leadership.value, "ts": now, "sites": watched})))]
        for site in sorted(targets):
            success.append(tx.Put(_b(k.targets(site)), _b(_dumps({
                "fencing": leadership.token, "generation": generation, "plan": plan, "base_revision": base_revision,
                "leader": leadership.value, "ts": now, "targets": dict(targets[site])}))))
        ok, resp = await self.link.run(
            "apply plan", lambda c: c.transaction(compare=compare, success=success, failure=[tx.Get(lkey)]))
        if ok:
            return generation, resp[0].response_put.header.revision
        held = resp[0][0][1] if resp and resp[0] else None
        if held is None or held.create_revision != leadership.token:
            now_s = f"created at revision {held.create_revision}" if held else "absent"
            leadership.lost.set()
            raise NotLeader(f"fencing token {leadership.token} is stale: the leader key is {now_s}")
        raise StalePlan(f"plan {plan or '?'} was computed at revision {base_revision}; the targets, the "
                        "generation, the overflow policy or a contingency mode changed since: plan again")
