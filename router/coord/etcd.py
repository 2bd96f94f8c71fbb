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
  by another lease — unless ``successor_of`` proves that holder to be this node's dead
  previous process: then it takes the key over at once, see ``_take_over`` —
  re-registers if someone deletes it);
* the load publisher (on change, at most ``load_max_rate``/s, heartbeat);
* four watches (members, loads, policy, contingency modes) — each one a "get the range,
  then watch from the next revision" loop that starts over after any failure;
* one task per leadership, watching the leader key and the session.

Modules: ``link`` (settings, TLS client, endpoint failover, error mapping), ``session``
(lease, range watch, load publisher), ``election`` (leader key and fenced targets),
this one (the coordinator: lifecycle, membership, load cache, policy, contingency).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aetcd import rpc, transactions
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
    Targets,
)
from router.coord.election import ElectionMixin, EtcdLeadership
from router.coord.keys import Keys
from router.coord.link import Backoff, EtcdSettings, LeaseGone, Link, cancel_all
from router.coord.session import EtcdSession, LoadPublisher, RangeWatch, to_bytes as _b
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


# --- the coordinator ------------------------------------------------------------------


class EtcdCoordinator(ElectionMixin, Coordinator):
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
        #: set by the node: True when a member record held by another lease is provably
        #: this node's dead predecessor (see ``Coordinator.register``, "Succession")
        self.successor_of: Callable[[Member], bool] | None = None
        self.takeovers = 0
        # load
        self._publisher = LoadPublisher(self)
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
            RangeWatch.prefix(self.link, "members", k.members_prefix, self._members_reset, self._members_event),
            RangeWatch.prefix(self.link, "loads", k.load_prefix, self._loads_reset, self._loads_event),
            RangeWatch.key(self.link, "policy", k.policy_overflow, self._policy_reset, self._policy_event),
            RangeWatch.prefix(
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
            if held is None:
                return False
            if held.lease != session.lease_id:
                return await self._take_over(session, key, value, held)
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

    async def _take_over(self, session: EtcdSession, key: bytes, value: bytes, held: Any) -> bool:
        """The key is held by another lease: take it when ``successor_of`` proves that
        holder to be this node's dead predecessor (else False: wait for its lease).

        One transaction, conditioned on the key's mod revision being the one just read,
        puts our record on our lease; a holder that changed meanwhile (another process
        registered, the key vanished) makes it fail, and the loop reads again. The old
        lease is then revoked (best effort): its other keys (load, leaderships) go too,
        and it can no longer renew anything."""
        check = self.successor_of
        if check is None:
            return False
        try:
            old = Member.from_json(held.value)
        except (ValueError, KeyError, TypeError):
            return False
        try:
            proven = check(old)
        except Exception:  # noqa: BLE001 - no proof: no takeover
            log.exception("successor check failed")
            proven = False
        if not proven:
            return False
        tx = transactions
        ok, resp = await self.link.run(
            "register (take over)",
            lambda c: c.transaction(
                compare=[tx.Mod(key) == held.mod_revision, _LeaseCompare(key) == held.lease],
                success=[tx.Put(key, value, lease=session.lease_id)],
                failure=[],
            ),
        )
        if not ok:
            return False
        self.takeovers += 1
        log.warning(
            "%s: took over from this node's previous process (pid %d, lease %x, started %.3f)",
            key.decode(), old.pid, held.lease, old.started_at,
        )
        self._registered = True
        self._registered_rev = resp[0].response_put.header.revision
        old_lease = held.lease
        try:
            await self.link.run("lease revoke (predecessor)", lambda c: c.revoke_lease(old_lease), timeout=0.5)
        except (LeaseGone, CoordinationUnavailable):
            pass  # gone already, or it expires by itself
        return True

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

    # --- documents of other parts (security bindings…) ---------------------------------

    def watch_document(self, name: str, key: str, callback: Callable[[bytes | None], None]) -> None:
        """Also keep watching one key whose value another part validates: ``callback(value)``
        at each (re)load and on every change, ``callback(None)`` when the key is absent
        or deleted. Call before :meth:`start`."""
        if self._started:
            raise RuntimeError("watch_document must be called before start()")

        def reset(kvs: dict[str, Any]) -> None:
            kv = kvs.get(key)
            _call(name, callback, kv.value if kv is not None else None)

        def event(put: bool, k: str, kv: Any) -> None:
            if k == key:
                _call(name, callback, kv.value if put else None)

        self._watches.append(RangeWatch.key(self.link, name, key, reset, event))

    def watch_prefix(self, name: str, prefix: str, on_reset: Callable[[dict[str, Any]], None],
                     on_event: Callable[[bool, str, Any], None]) -> None:
        """Also keep a local view of every key under ``prefix``: ``on_reset(kvs)`` at each
        (re)load, ``on_event(put, key, kv)`` on every change. Call before :meth:`start`."""
        if self._started:
            raise RuntimeError("watch_prefix must be called before start()")
        self._watches.append(RangeWatch.prefix(self.link, name, prefix, on_reset, on_event))

    async def put_document(self, key: str, value: str | bytes) -> int:
        """Put one document (validated by its owner beforehand); returns the revision."""
        k, v = _b(key), _b(value)
        put = await self.link.run(f"put {key}", lambda c: c.put(k, v))
        return put.header.revision

    async def get_document(self, key: str) -> bytes | None:
        k = _b(key)
        got = await self.link.run(f"get {key}", lambda c: c.get(k))
        return None if got is None else got.value

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

