"""The coordination interface on etcd, through the aetcd client.

``EtcdCoordinator(site, settings)`` implements :class:`router.coord.base.Coordinator`;
the contract (and the failure contract: :class:`CoordinationUnavailable` and nothing
else on an outage, self-healing background loops) is documented there. Key names are in
:mod:`router.coord.keys`.

Background tasks of a running coordinator:

* the session loop — grants a lease (``ttl_s``), keeps it alive (every ``ttl_s / 3``),
  and when it is lost (expired, or no keepalive answer for a whole TTL) opens a new one
  as soon as etcd answers, re-registers the member and re-publishes the load;
* the registration loop of the current session (retries while the member key is held
  by another lease, re-registers if someone deletes it);
* the load publisher (on change, at most ``load_max_rate``/s, heartbeat);
* four watches (members, loads, policy, contingency modes) — each one a "get the range,
  then watch from the next revision" loop that starts over after any failure;
* one task per leadership, watching the leader key and the session.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aetcd
from aetcd import rpc, transactions, utils
from pydantic import ValidationError

from router.coord.base import (
    ContingencyCallback,
    CoordinationError,
    CoordinationUnavailable,
    Coordinator,
    Leadership,
    Member,
    MembersCallback,
    NotLeader,
    PolicyCallback,
    PolicyRejected,
    Session,
    Targets,
    _dumps,
)
from router.coord.keys import Keys
from router.coord.link import Backoff, EtcdSettings, LeaseGone, Link, WatchEnded, cancel_all
from router.overflow import (
    ContingencyState,
    LoadSnapshot,
    OverflowPolicy,
    PeerLoad,
    PolicyError,
    parse_contingency,
    parse_policy,
)

__all__ = [
    "CoordinationError",
    "CoordinationUnavailable",
    "Coordinator",
    "EtcdCoordinator",
    "EtcdSession",
    "EtcdSettings",
    "Leadership",
    "Member",
    "NotLeader",
    "PolicyRejected",
    "Targets",
]

log = logging.getLogger("tandem.coord")


def _b(s: str) -> bytes:
    return s.encode()


class _LeaseCompare(transactions.BaseCompare):
    """Compare a key's lease (aetcd 1.0 has value/version/create/mod only)."""

    def build_compare(self, compare: Any) -> None:
        compare.target = rpc.Compare.LEASE
        compare.lease = int(self.value)


def _call(what: str, fn: Callable, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - a faulty callback must not stop a watch
        log.exception("%s callback failed", what)


# --- session --------------------------------------------------------------------------


class EtcdSession(Session):
    """One etcd lease kept alive by a background task (see :class:`Session`)."""

    def __init__(self, link: Link, lease_id: int, ttl_s: int, granted_at: float) -> None:
        self.lease_id = lease_id
        self.ttl_s = ttl_s
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self._link = link
        self._last_ok = granted_at
        self._task = asyncio.get_running_loop().create_task(self._keepalive(), name=f"lease-{lease_id:x}")

    def __repr__(self) -> str:
        return f"EtcdSession(lease={self.lease_id:x}, ttl={self.ttl_s}, alive={self.alive})"

    @property
    def alive(self) -> bool:
        """False once lost, and also as soon as a whole TTL passed since the last
        acknowledged keepalive (e.g. after this process was frozen): the lease may be
        gone before the keepalive loop finds out."""
        return not self.lost.is_set() and time.monotonic() - self._last_ok < self.ttl_s

    def mark_lost(self, why: str) -> None:
        if self.lost.is_set():
            return
        self.lost_reason = why
        self.lost.set()
        if asyncio.current_task() is not self._task:
            self._task.cancel()
        log.warning("etcd session %x lost: %s", self.lease_id, why)

    async def _keepalive(self) -> None:
        interval = max(0.2, self.ttl_s / 3.0)
        while True:
            await asyncio.sleep(interval)
            sent = time.monotonic()
            try:
                resp = await self._link.run(
                    "lease keepalive", lambda c: c.refresh_lease(self.lease_id),
                    timeout=min(interval, self._link.settings.op_timeout_s),
                )
            except CoordinationUnavailable as e:
                if time.monotonic() - self._last_ok >= self.ttl_s:
                    self.mark_lost(f"no keepalive answer for {self.ttl_s} s ({e})")
                    return
                continue
            if resp is None or resp.TTL <= 0:
                self.mark_lost("lease expired")
                return
            self._last_ok = sent

    async def close(self, revoke: bool = True) -> None:
        alive = self.alive
        await cancel_all({self._task})
        if revoke and alive:
            try:
                await self._link.run("lease revoke", lambda c: c.revoke_lease(self.lease_id), timeout=1.0)
            except CoordinationUnavailable:
                pass  # it expires by itself
        self.lost_reason = self.lost_reason or "closed"
        self.lost.set()


# --- watches --------------------------------------------------------------------------


class _RangeWatch:
    """A local view of a key range: get it, then watch from the next revision; after
    any failure, start over (a fresh get replaces the view)."""

    def __init__(
        self,
        link: Link,
        name: str,
        start: str,
        end: bytes,
        on_reset: Callable[[dict[str, Any]], None],
        on_event: Callable[[bool, str, Any], None],
    ) -> None:
        self.link, self.name = link, name
        self.start, self.end = _b(start), end
        self.on_reset, self.on_event = on_reset, on_event
        self.loaded = asyncio.Event()
        self.restarts = 0

    @classmethod
    def prefix(cls, link: Link, name: str, prefix: str, on_reset, on_event) -> "_RangeWatch":
        return cls(link, name, prefix, utils.prefix_range_end(_b(prefix)), on_reset, on_event)

    @classmethod
    def key(cls, link: Link, name: str, key: str, on_reset, on_event) -> "_RangeWatch":
        return cls(link, name, key, _b(key) + b"\x00", on_reset, on_event)

    async def run(self) -> None:
        backoff = Backoff()
        while True:
            gen = self.link.generation
            try:
                rng = await self.link.run(f"get {self.name}", lambda c: c.get_range(self.start, self.end))
                self.on_reset({kv.key.decode(): kv for kv in rng})
                self.loaded.set()
                watch = await self.link.watch(f"watch {self.name}", self.start, self.end, rng.header.revision + 1)
                backoff.reset()
                try:
                    async for ev in watch:
                        self.on_event(ev.kind == aetcd.EventKind.PUT, ev.kv.key.decode(), ev.kv)
                finally:
                    await watch.cancel()
            except CoordinationUnavailable as e:
                log.debug("watch %s: %s", self.name, e)
            except WatchEnded as e:  # the channel was reset, or the stream broke
                log.debug("watch %s ended (%s); starting over", self.name, e)
                self.link.reset(gen, f"watch {self.name} ended")
            self.restarts += 1
            await backoff.sleep()


# --- load publisher ---------------------------------------------------------------------


class _LoadPublisher:
    """Puts the latest offered load under ``load/<site>`` on the session lease: when it
    changed, at most ``max_rate`` times a second, and every ``heartbeat_s`` anyway."""

    def __init__(self, coord: "EtcdCoordinator") -> None:
        self.coord = coord
        self.min_gap = 1.0 / coord.settings.load_max_rate
        self.heartbeat = coord.settings.load_heartbeat_s
        self.latest: LoadSnapshot | None = None
        self.published: LoadSnapshot | None = None
        self.wake = asyncio.Event()
        self.seq = 0
        self.puts = 0
        self.last_put = -1e9  # monotonic time of the last put

    def offer(self, snap: LoadSnapshot) -> None:
        self.latest = snap
        if not snap.same_load(self.published):
            self.wake.set()

    async def run(self) -> None:
        backoff = Backoff()
        key = _b(self.coord.keys.load(self.coord.site))
        while True:
            due = self.last_put + self.heartbeat - time.monotonic()
            if not self.wake.is_set() and due > 0:
                try:
                    await asyncio.wait_for(self.wake.wait(), due)
                except asyncio.TimeoutError:
                    pass
            gap = self.last_put + self.min_gap - time.monotonic()
            if gap > 0:
                await asyncio.sleep(gap)
            snap, session = self.latest, self.coord.session
            if snap is None:
                self.wake.clear()
                await self.wake.wait()
                continue
            if session is None or not session.alive:
                await asyncio.sleep(0.1)  # until the session loop opens a new one
                continue
            self.wake.clear()
            self.seq += 1
            stamped = snap.model_copy(update={"seq": self.seq, "ts": time.time()})
            value = _b(stamped.model_dump_json())
            started = time.monotonic()
            try:
                await self.coord.link.run("publish load", lambda c: c.put(key, value, lease=session.lease_id))
            except LeaseGone:
                session.mark_lost("lease not found on load publish")
                self.wake.set()
                continue
            except CoordinationUnavailable as e:
                log.debug("load publish: %s", e)
                self.wake.set()
                await backoff.sleep()
                continue
            backoff.reset()
            self.published, self.last_put = snap, started
            self.puts += 1


# --- leadership -----------------------------------------------------------------------


class EtcdLeadership(Leadership):
    """Leadership held on a session; see :class:`Leadership`."""

    def __init__(self, coord: "EtcdCoordinator", election: str, token: int, value: str, session: EtcdSession) -> None:
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
            session_lost.cancel()
            watch_end.cancel()
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


# --- the coordinator ------------------------------------------------------------------


class EtcdCoordinator(Coordinator):
    """:class:`Coordinator` on etcd. Create and use it inside the running event loop."""

    def __init__(self, site: str, settings: EtcdSettings | None = None) -> None:
        self.site = site
        self.settings = settings or EtcdSettings()
        self.keys = Keys(self.settings.prefix)
        self.keys.member(site)  # validates the site name
        self.link = Link(self.settings)
        self._session: EtcdSession | None = None
        self._session_up = asyncio.Event()
        self._sessions = 0
        self._tasks: set[asyncio.Task] = set()
        self._started = False
        self._closed = False
        # membership
        self._member: Member | None = None
        self._registered = False
        self._registered_rev = 0  # revision of our last member put
        self._reregister = asyncio.Event()
        self._members: dict[str, Member] = {}
        self._members_cbs: list[MembersCallback] = []
        # load
        self._publisher = _LoadPublisher(self)
        self._loads: dict[str, tuple[LoadSnapshot, float]] = {}
        # policy and contingency
        self._policy = OverflowPolicy()
        self._policy_revision = 0
        self._policy_error: str | None = None
        self._policy_cbs: list[PolicyCallback] = []
        self._contingency: dict[str, ContingencyState] = {}
        self._contingency_cbs: list[ContingencyCallback] = []
        self._leaderships: dict[str, EtcdLeadership] = {}
        k = self.keys
        self._watches = [
            _RangeWatch.prefix(self.link, "members", k.members_prefix, self._members_reset, self._members_event),
            _RangeWatch.prefix(self.link, "loads", k.load_prefix, self._loads_reset, self._loads_event),
            _RangeWatch.key(self.link, "policy", k.policy_overflow, self._policy_reset, self._policy_event),
            _RangeWatch.prefix(
                self.link, "contingency", k.contingency_prefix, self._contingency_reset, self._contingency_event
            ),
        ]

    def __repr__(self) -> str:
        return f"EtcdCoordinator({self.site!r}, {self.settings.endpoints}, {self.keys.prefix!r})"

    # --- lifecycle --------------------------------------------------------------------

    def _spawn(self, coro: Awaitable, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=f"coord-{self.site}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not self._closed:
            log.error("coordination task %s died", task.get_name(), exc_info=task.exception())

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._spawn(self._session_loop(), "session")
        self._spawn(self._publisher.run(), "publisher")
        for w in self._watches:
            self._spawn(w.run(), f"watch-{w.name}")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await cancel_all(self._tasks)
        if self._session is not None:
            await self._session.close(revoke=True)
        await self.link.close()

    async def wait_ready(self, timeout: float) -> None:
        async def ready() -> None:
            await self._session_up.wait()
            for w in self._watches:
                await w.loaded.wait()

        try:
            await asyncio.wait_for(ready(), timeout)
        except asyncio.TimeoutError:
            raise CoordinationUnavailable(
                f"no etcd session within {timeout} s (endpoints {', '.join(self.settings.endpoints)})"
            ) from None

    @property
    def session(self) -> EtcdSession | None:
        return self._session

    @property
    def connected(self) -> bool:
        return self._session is not None and self._session.alive

    def stats(self) -> dict[str, Any]:
        """Counters for diagnostics and tests."""
        return {
            "sessions": self._sessions,
            "lease_id": self._session.lease_id if self._session else 0,
            "connected": self.connected,
            "registered": self._registered,
            "load_puts": self._publisher.puts,
            "policy_revision": self._policy_revision,
            "policy_error": self._policy_error,
            "watch_restarts": {w.name: w.restarts for w in self._watches},
            "endpoint": self.link.endpoint,
        }

    async def _session_loop(self) -> None:
        backoff = Backoff(0.1, 1.0)
        stale: list[int] = []  # leases of lost sessions, to revoke once etcd answers
        while True:
            sent = time.monotonic()
            try:
                lease = await self.link.run("lease grant", lambda c: c.lease(self.settings.ttl_s))
            except CoordinationUnavailable as e:
                log.debug("no etcd session yet: %s", e)
                await backoff.sleep()
                continue
            backoff.reset()
            session = EtcdSession(self.link, lease.id, int(lease.ttl), sent)
            # A restarted etcd renews every lease it had: revoke the ones we gave up on,
            # or our old member key would block the new registration for a whole TTL.
            await self._revoke(stale)
            self._session = session
            self._sessions += 1
            self._session_up.set()
            log.info("etcd session %x open (ttl %d s) at %s", lease.id, lease.ttl, self.link.endpoint)
            self._publisher.wake.set()  # publish on the new lease at once
            reg = self._spawn(self._registration(session), "register")
            try:
                await session.lost.wait()
            finally:
                self._session_up.clear()
                self._registered = False
                reg.cancel()
            stale.append(session.lease_id)
            await self._revoke(stale)

    async def _revoke(self, leases: list[int]) -> None:
        for lease_id in list(leases):
            try:
                await self.link.run("lease revoke", lambda c: c.revoke_lease(lease_id), timeout=0.5)
            except LeaseGone:
                pass  # expired already
            except CoordinationUnavailable:
                return
            leases.remove(lease_id)

    # --- membership -------------------------------------------------------------------

    async def _put_member(self, session: EtcdSession) -> bool:
        assert self._member is not None
        key, value = _b(self.keys.member(self.site)), _b(self._member.to_json())
        tx = transactions
        ok, resp = await self.link.run(
            "register",
            lambda c: c.transaction(
                compare=[tx.Create(key) == 0],
                success=[tx.Put(key, value, lease=session.lease_id)],
                failure=[tx.Get(key)],
            ),
        )
        if not ok:
            held = resp[0][0][1] if resp and resp[0] else None
            if held is None or held.lease != session.lease_id:
                return False
            ok, resp = await self.link.run(
                "register",
                lambda c: c.transaction(
                    compare=[_LeaseCompare(key) == session.lease_id],
                    success=[tx.Put(key, value, lease=session.lease_id)],
                    failure=[],
                ),
            )
        if ok:
            if not self._registered:
                log.info("registered %s at %s", self.keys.member(self.site), self._member.address)
            self._registered = True
            self._registered_rev = resp[0].response_put.header.revision
        return ok

    async def _registration(self, session: EtcdSession) -> None:
        backoff = Backoff(0.2, 1.0)
        warned = False
        while session.alive:
            if self._member is None:
                self._reregister.clear()
                await self._reregister.wait()
                continue
            try:
                self._reregister.clear()
                if await self._put_member(session):
                    backoff.reset()
                    await self._reregister.wait()
                    continue
                if not warned:
                    log.warning(
                        "%s is held by another session (another node named %s, or this node's "
                        "previous process until its lease expires); retrying",
                        self.keys.member(self.site), self.site,
                    )
                    warned = True
                await asyncio.sleep(min(1.0, session.ttl_s / 3.0))
            except LeaseGone:
                session.mark_lost("lease not found on register")
                return
            except CoordinationUnavailable:
                await backoff.sleep()

    async def register(self, member: Member) -> bool:
        if member.site != self.site:
            raise ValueError(f"member site {member.site!r} is not this coordinator's site {self.site!r}")
        self._member = member
        self._registered = False
        self._reregister.set()
        session = self._session
        if session is None or not session.alive:
            raise CoordinationUnavailable("register: no etcd session (registration will be retried)")
        try:
            return await self._put_member(session)
        except LeaseGone:
            session.mark_lost("lease not found on register")
            raise

    def members(self) -> dict[str, Member]:
        return dict(self._members)

    async def list_members(self) -> dict[str, Member]:
        prefix = _b(self.keys.members_prefix)
        rng = await self.link.run("list members", lambda c: c.get_prefix(prefix))
        out = {}
        for kv in rng:
            m = self._parse_member(kv.key.decode(), kv.value)
            if m is not None:
                out[m.site] = m
        return out

    def on_members(self, callback: MembersCallback) -> None:
        self._members_cbs.append(callback)

    def _parse_member(self, key: str, raw: bytes) -> Member | None:
        site = Keys.site_of(key, self.keys.members_prefix)
        try:
            m = Member.from_json(raw)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable member %s: %s", key, e)
            return None
        if m.site != site:
            log.warning("ignoring member %s: its value names site %r", key, m.site)
            return None
        return m

    def _members_changed(self) -> None:
        snapshot = dict(self._members)
        for cb in self._members_cbs:
            _call("members", cb, snapshot)

    def _members_reset(self, kvs: dict[str, Any]) -> None:
        new = {}
        for key, kv in kvs.items():
            m = self._parse_member(key, kv.value)
            if m is not None:
                new[m.site] = m
        changed = new != self._members
        self._members = new
        if self._registered and self.site not in new:
            self._reregister.set()
        if changed:
            self._members_changed()

    def _members_event(self, put: bool, key: str, kv: Any) -> None:
        site = Keys.site_of(key, self.keys.members_prefix)
        if site is None:
            return
        if put:
            m = self._parse_member(key, kv.value)
            if m is None:
                self._members.pop(site, None)
            else:
                self._members[site] = m
        else:
            self._members.pop(site, None)
            if site == self.site and self._registered and kv.mod_revision > self._registered_rev:
                log.warning("%s was deleted while this node is alive; registering again", key)
                self._registered = False
                self._reregister.set()
        self._members_changed()

    # --- load -------------------------------------------------------------------------

    def publish_load(self, snapshot: LoadSnapshot) -> None:
        if snapshot.site != self.site:
            raise ValueError(f"load of site {snapshot.site!r} offered to the coordinator of {self.site!r}")
        self._publisher.offer(snapshot)

    def peer_loads(self) -> dict[str, PeerLoad]:
        now = time.monotonic()
        return {
            site: PeerLoad(snap, now - received)
            for site, (snap, received) in self._loads.items()
            if site != self.site
        }

    def _parse_load(self, key: str, raw: bytes) -> LoadSnapshot | None:
        site = Keys.site_of(key, self.keys.load_prefix)
        if site is None:
            return None
        try:
            snap = LoadSnapshot.model_validate_json(raw)
        except ValidationError as e:
            log.warning("ignoring unreadable load %s: %s", key, e.errors()[0]["msg"] if e.errors() else e)
            return None
        if snap.site != site:
            log.warning("ignoring load %s: it names site %r", key, snap.site)
            return None
        return snap

    def _loads_reset(self, kvs: dict[str, Any]) -> None:
        now = time.monotonic()
        new = {}
        for key, kv in kvs.items():
            snap = self._parse_load(key, kv.value)
            if snap is not None:
                new[snap.site] = (snap, now)
        self._loads = new

    def _loads_event(self, put: bool, key: str, kv: Any) -> None:
        site = Keys.site_of(key, self.keys.load_prefix)
        if site is None:
            return
        snap = self._parse_load(key, kv.value) if put else None
        if snap is None:
            self._loads.pop(site, None)
        else:
            self._loads[site] = (snap, time.monotonic())

    # --- overflow policy ----------------------------------------------------------------

    @property
    def policy(self) -> OverflowPolicy:
        return self._policy

    @property
    def policy_error(self) -> str | None:
        return self._policy_error

    def on_policy(self, callback: PolicyCallback) -> None:
        self._policy_cbs.append(callback)

    def _set_policy(self, policy: OverflowPolicy, revision: int) -> None:
        self._policy_error = None
        self._policy_revision = revision
        if policy == self._policy:
            return
        self._policy = policy
        log.info("overflow policy in force: revision %d", revision)
        for cb in self._policy_cbs:
            _call("policy", cb, policy)

    def _apply_policy(self, raw: bytes, revision: int) -> None:
        try:
            policy = parse_policy(raw, f"{self.keys.policy_overflow}@{revision}")
        except PolicyError as e:
            if self._policy_error != str(e):
                log.error("ignoring the stored overflow policy, the previous one stays in force: %s", e)
            self._policy_error = str(e)
            return
        self._set_policy(policy, revision)

    def _policy_reset(self, kvs: dict[str, Any]) -> None:
        kv = kvs.get(self.keys.policy_overflow)
        if kv is None:
            self._set_policy(OverflowPolicy(), 0)
        else:
            self._apply_policy(kv.value, kv.mod_revision)

    def _policy_event(self, put: bool, key: str, kv: Any) -> None:
        if key != self.keys.policy_overflow:
            return
        if put:
            self._apply_policy(kv.value, kv.mod_revision)
        else:
            log.warning("overflow policy deleted: back to the default (no overflow)")
            self._set_policy(OverflowPolicy(), kv.mod_revision)

    async def get_policy(self) -> tuple[OverflowPolicy, int]:
        key = _b(self.keys.policy_overflow)
        got = await self.link.run("get policy", lambda c: c.get(key))
        if got is None:
            return OverflowPolicy(), 0
        try:
            return parse_policy(got.value, f"{self.keys.policy_overflow}@{got.mod_revision}"), got.mod_revision
        except PolicyError as e:
            raise PolicyRejected(str(e)) from None

    async def put_policy(
        self, policy: OverflowPolicy | Mapping[str, Any] | str | bytes,
        *, expected_revision: int | None = None,
    ) -> int:
        try:
            valid = parse_policy(policy, "overflow policy")
        except PolicyError as e:
            raise PolicyRejected(str(e)) from None
        key, value = _b(self.keys.policy_overflow), _b(valid.to_json())
        if expected_revision is None:
            put = await self.link.run("put policy", lambda c: c.put(key, value))
            return put.header.revision
        ok, resp = await self.link.run(
            "put policy",
            lambda c: c.transaction(
                compare=[transactions.Mod(key) == expected_revision],
                success=[transactions.Put(key, value)],
                failure=[transactions.Get(key)],
            ),
        )
        if not ok:
            current = resp[0][0][1].mod_revision if resp and resp[0] else 0
            raise PolicyRejected(
                f"overflow policy changed meanwhile: stored revision {current}, expected {expected_revision}"
            )
        return resp[0].response_put.header.revision

    # --- contingency modes --------------------------------------------------------------

    def contingency(self, site: str) -> ContingencyState:
        return self._contingency.get(site) or ContingencyState()

    def on_contingency(self, callback: ContingencyCallback) -> None:
        self._contingency_cbs.append(callback)

    def _set_contingency(self, site: str, state: ContingencyState) -> None:
        if self.contingency(site) == state:
            return
        self._contingency[site] = state
        log.info("contingency of %s: %s", site, state.mode)
        for cb in self._contingency_cbs:
            _call("contingency", cb, site, state)

    def _apply_contingency(self, key: str, raw: bytes | None) -> None:
        site = Keys.site_of(key, self.keys.contingency_prefix)
        if site is None:
            return
        if raw is None:
            self._set_contingency(site, ContingencyState())
            return
        try:
            state = parse_contingency(raw, key)
        except PolicyError as e:
            log.error("ignoring the stored contingency state, the previous one stays in force: %s", e)
            return
        self._set_contingency(site, state)

    def _contingency_reset(self, kvs: dict[str, Any]) -> None:
        for site in list(self._contingency):
            if self.keys.contingency(site) not in kvs:
                self._apply_contingency(self.keys.contingency(site), None)
        for key, kv in kvs.items():
            self._apply_contingency(key, kv.value)

    def _contingency_event(self, put: bool, key: str, kv: Any) -> None:
        self._apply_contingency(key, kv.value if put else None)

    async def get_contingency(self, site: str) -> ContingencyState:
        key = _b(self.keys.contingency(site))
        got = await self.link.run("get contingency", lambda c: c.get(key))
        if got is None:
            return ContingencyState()
        try:
            return parse_contingency(got.value, key.decode())
        except PolicyError as e:
            raise PolicyRejected(str(e)) from None

    async def set_contingency(self, site: str, state: ContingencyState | Mapping[str, Any] | str) -> int:
        try:
            valid = parse_contingency(state, f"contingency of {site}")
        except PolicyError as e:
            raise PolicyRejected(str(e)) from None
        if not valid.set_at:
            valid = valid.model_copy(update={"set_at": time.time()})
        key, value = _b(self.keys.contingency(site)), _b(valid.to_json())
        put = await self.link.run("set contingency", lambda c: c.put(key, value))
        return put.header.revision

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
