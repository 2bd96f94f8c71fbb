"""The coordination interface a site node uses, independent of etcd (patroni style).

A :class:`Coordinator` gives a node: a session (one lease for the process), membership,
load publishing and a cache of every peer's load, the cluster's overflow policy and
contingency modes (validated, watched, with callbacks), and elections with fencing
tokens for the rebalancer. ``router.coord.etcd.EtcdCoordinator`` implements it on etcd.

Failure contract (invariant 6): when the store is unreachable or too slow, every
``async`` operation raises :class:`CoordinationUnavailable` — never another error type —
and the operation may or may not have taken effect. Nothing else is raised for an
outage, no background task dies of one, and the caches keep their last contents (peer
loads only age: :class:`~router.overflow.PeerLoad` carries the age, and the overflow
policy never sends a call to a stale peer). Background loops retry with backoff and the
coordinator resumes by itself: new session, re-registration, fresh caches.

The synchronous reads (:meth:`Coordinator.peer_loads`, :attr:`Coordinator.policy`,
:meth:`Coordinator.contingency`, :meth:`Coordinator.members`) never block and never
raise: they read the local caches the watches maintain.
"""

from __future__ import annotations

import abc
import asyncio
import json
import os
import time
from collections.abc import Iterable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from router.overflow import (
    ContingencyState,
    LoadSnapshot,
    OverflowPolicy,
    PeerLoad,
    PolicyError,
)


class CoordinationError(Exception):
    """Base of the coordination errors."""


class CoordinationUnavailable(CoordinationError):
    """The coordination store did not answer (down, partitioned, too slow, or our
    session is gone). The operation may or may not have been applied; retrying later
    is safe for every operation of this interface."""


class NotLeader(CoordinationError):
    """A fenced write was refused: the fencing token is no longer the leader key's
    create revision (another candidate was elected since)."""


class StalePlan(CoordinationError):
    """A plan's apply was refused because what it was computed from moved: the targets,
    the generation, the overflow policy or a contingency mode changed after the plan's
    base revision. Re-plan from the current state."""


class PolicyRejected(PolicyError):
    """An invalid overflow policy or contingency state was refused; nothing was
    written. The message names every offending field."""


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Member:
    """A site node as registered under ``members/<site>``."""

    site: str
    address: str  # host:port of its gRPC server, as peers reach it
    region: str
    kind: str = "inhouse"  # "inhouse" | "partner"
    pid: int = field(default_factory=os.getpid)
    started_at: float = field(default_factory=time.time)
    version: str = ""
    #: which node process lineage this is: equal for every process started on the same
    #: data directory of the same host ("" = unknown; see ``Coordinator.register``)
    instance: str = ""

    def to_json(self) -> str:
        return _dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> "Member":
        d = json.loads(raw)
        if not isinstance(d, dict):
            raise ValueError("member value is not a JSON object")
        return cls(
            site=str(d["site"]),
            address=str(d["address"]),
            region=str(d.get("region", "")),
            kind=str(d.get("kind", "inhouse")),
            pid=int(d.get("pid", 0)),
            started_at=float(d.get("started_at", 0.0)),
            version=str(d.get("version", "")),
            instance=str(d.get("instance", "")),
        )


@dataclass(frozen=True, slots=True)
class Targets:
    """Rebalancer targets for a site, with the fencing token they were written under."""

    site: str
    fencing: int
    leader: str
    targets: dict[str, Any]
    revision: int  # mod revision of the targets key


class Session(abc.ABC):
    """One lease kept alive for the process (etcd's concurrency.Session).

    ``lost`` is set once the lease is gone or could not be refreshed for a whole TTL;
    a lost session never comes back (the coordinator opens a new one). Keys written
    under a session vanish at most TTL (+ the store's expiry check) after it is lost.
    """

    lease_id: int
    ttl_s: int
    lost: asyncio.Event

    @property
    def alive(self) -> bool:
        return not self.lost.is_set()


class Leadership(abc.ABC):
    """Being the leader of an election. ``token`` is the fencing token (the leader
    key's create revision): strictly greater for every later leader. ``lost`` is set
    when the leadership ends (resigned, session lost, key deleted or replaced); a
    leader must stop acting on it at once — fenced writes refuse a stale token anyway."""

    election: str
    token: int
    value: str
    lost: asyncio.Event

    @property
    def active(self) -> bool:
        return not self.lost.is_set()


PolicyCallback = Callable[[OverflowPolicy], None]
ContingencyCallback = Callable[[str, ContingencyState], None]
MembersCallback = Callable[[Mapping[str, Member]], None]


class Coordinator(abc.ABC):
    """What a site node needs from the cluster's coordination store.

    Lifecycle: ``await start()`` returns at once, even when the store is down (the
    node must route its own traffic regardless); the session and the watches come up
    in the background. ``await wait_ready(timeout)`` waits for a session and loaded
    caches. ``await close()`` revokes the session (peers see the node leave at once)
    and stops every background task.

    Callbacks are plain functions run on the event loop; an exception in one is
    logged and does not stop the watch. They fire after the cache is updated.
    """

    site: str

    # --- lifecycle -------------------------------------------------------------------

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the session and watch loops in the background; never raises for an
        outage."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop background work, revoke the session (best effort, bounded time)."""

    @abc.abstractmethod
    async def wait_ready(self, timeout: float) -> None:
        """Wait until a session is open and the caches are loaded; raises
        :class:`CoordinationUnavailable` after ``timeout`` seconds."""

    @property
    @abc.abstractmethod
    def session(self) -> Session | None:
        """The current session, or None while there is none."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True while a session is alive (the best available sign that the store is
        reachable)."""

    # --- membership ------------------------------------------------------------------

    @abc.abstractmethod
    async def register(self, member: Member) -> bool:
        """Register this node under ``members/<site>`` on the session lease.

        Returns True once registered, False when the key is held by another live
        session (another node with the same site name, or this node's previous
        process until its lease expires). Either way, and also after
        :class:`CoordinationUnavailable`, the coordinator keeps the registration
        wanted: it retries in the background and re-registers on every new session.

        Succession: when the coordinator has a ``successor_of`` predicate and it says
        True of the record held by the other lease (that record is provably an earlier,
        dead process of this very node), the key is taken over at once — overwritten on
        this session's lease in a transaction conditioned on the record being unchanged
        — and the old lease is revoked. Without the predicate, or when it says False,
        the key is never taken from another lease (no two live members of one site).
        """

    @abc.abstractmethod
    def members(self) -> dict[str, Member]:
        """Registered nodes by site, from the watch cache (includes this node)."""

    @abc.abstractmethod
    async def list_members(self) -> dict[str, Member]:
        """Registered nodes by site, read from the store (linearizable)."""

    @abc.abstractmethod
    def on_members(self, callback: MembersCallback) -> None:
        """Call ``callback(members)`` after every membership change."""

    # --- load ------------------------------------------------------------------------

    @abc.abstractmethod
    def publish_load(self, snapshot: LoadSnapshot) -> None:
        """Offer this node's load; never blocks, never raises.

        Published under ``load/<site>`` on the session lease when it differs from the
        last published one (ignoring ``seq`` and ``ts``, which the publisher stamps),
        at most ``load_max_rate`` times a second (the latest offered wins), and
        re-published every ``load_heartbeat_s`` so that peers can tell a live quiet
        site from a stale one."""

    @abc.abstractmethod
    def peer_loads(self) -> dict[str, PeerLoad]:
        """Every other site's latest load with its age in seconds (time since this
        node received it). Ages grow while the store is unreachable."""

    # --- overflow policy and contingency modes ----------------------------------------

    @property
    @abc.abstractmethod
    def policy(self) -> OverflowPolicy:
        """The overflow policy in force: the last valid one seen (the default,
        overflow-free policy until one is read). An invalid stored value leaves it
        unchanged; a deleted key reverts to the default."""

    @property
    @abc.abstractmethod
    def policy_error(self) -> str | None:
        """Why the last stored policy was ignored (None if it was valid)."""

    @abc.abstractmethod
    async def get_policy(self) -> tuple[OverflowPolicy, int]:
        """The stored policy and its mod revision (0 = no key: the default policy).
        A stored value that is invalid raises :class:`PolicyRejected`."""

    @abc.abstractmethod
    async def put_policy(
        self, policy: OverflowPolicy | Mapping[str, Any] | str | bytes,
        *, expected_revision: int | None = None,
    ) -> int:
        """Validate and store the policy; returns the new mod revision.

        Raises :class:`PolicyRejected` (nothing written) for an invalid policy, or when
        ``expected_revision`` is given and the stored policy's mod revision differs
        (0 = must not exist yet)."""

    @abc.abstractmethod
    def on_policy(self, callback: PolicyCallback) -> None:
        """Call ``callback(policy)`` whenever the policy in force changes."""

    @abc.abstractmethod
    def contingency(self, site: str) -> ContingencyState:
        """A site's contingency state from the cache (normal when unknown)."""

    @abc.abstractmethod
    async def get_contingency(self, site: str) -> ContingencyState:
        """A site's contingency state read from the store."""

    @abc.abstractmethod
    async def set_contingency(self, site: str, state: ContingencyState | Mapping[str, Any] | str) -> int:
        """Validate and store a site's contingency state (a bare mode name is
        accepted); returns the mod revision. :class:`PolicyRejected` if invalid."""

    @abc.abstractmethod
    def on_contingency(self, callback: ContingencyCallback) -> None:
        """Call ``callback(site, state)`` whenever a site's contingency state changes."""

    # --- election and fenced targets ----------------------------------------------------

    @abc.abstractmethod
    async def try_lead(self, election: str, value: str) -> Leadership | None:
        """Atomically become leader if nobody is (put the leader key on our session
        if its create revision is 0). Returns the leadership, or None when another
        session leads. If this session already leads, returns that leadership again."""

    @abc.abstractmethod
    async def campaign(self, election: str, value: str, timeout: float | None = None) -> Leadership:
        """Wait until elected (retrying through outages and session changes).
        Raises :class:`CoordinationUnavailable` if ``timeout`` passes first."""

    @abc.abstractmethod
    async def resign(self, leadership: Leadership) -> None:
        """Give the leadership up (delete the key if it still holds our token)."""

    @abc.abstractmethod
    async def leader(self, election: str) -> tuple[str, int] | None:
        """The current leader's value and fencing token, or None."""

    @abc.abstractmethod
    async def put_targets(self, site: str, targets: Mapping[str, Any], leadership: Leadership) -> int:
        """Write rebalancer targets for ``site``, fenced: only while the leader key's
        create revision equals ``leadership.token`` (one transaction). Returns the
        mod revision; raises :class:`NotLeader` for a stale token."""

    @abc.abstractmethod
    async def get_targets(self, site: str) -> Targets | None:
        """The targets stored for ``site`` with their fencing token, or None."""

    @abc.abstractmethod
    async def apply_plan(self, targets: Mapping[str, Mapping[str, Any]], leadership: Leadership, *,
                         base_revision: int, plan: str, sites: Iterable[str] = ()) -> tuple[int, int]:
        """Apply a plan in one transaction: the targets of every site in ``targets``
        (:class:`router.plans.TargetDoc` bodies: ``{"groups", "wait_factor",
        "partners"}``) and the next generation, written with ``leadership.token`` as the
        fencing epoch — only while the leader key still has that create revision and
        nothing the plan was computed from moved past ``base_revision`` (the generation
        key, the targets of every site of ``targets`` and ``sites``, the overflow policy,
        their contingency modes). Returns (generation, revision). Raises
        :class:`NotLeader` (the leadership is lost too) or :class:`StalePlan`."""

    @abc.abstractmethod
    async def rebalance_state(self) -> dict[str, Any]:
        """One consistent read (a single revision) of what a plan is computed from and
        applied against: ``{"revision", "generation": {...} | None, "targets": {site:
        raw dict}, "applied": {site: raw dict}, "mod_revisions": {"targets/<site>" |
        "applied/<site>": revision}}``. The revision is the base of a plan computed from it."""
