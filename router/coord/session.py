"""Building blocks of the etcd coordinator: the session (one lease kept alive), the
range watch (get, then watch from the next revision, start over after any failure) and
the rate-limited load publisher. See ``router.coord.etcd`` for how they fit together."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import aetcd
from aetcd import utils

from router.coord.base import CoordinationUnavailable, Session
from router.coord.keys import Keys
from router.coord.link import Backoff, EtcdSettings, LeaseGone, Link, WatchEnded, cancel_all
from router.overflow import LoadSnapshot


class CoordinatorParts(Protocol):
    """What the session's helpers (the load publisher, leaderships) use of the
    coordinator that owns them: declared here so that they need not import
    :class:`router.coord.etcd.EtcdCoordinator`, which imports them."""

    site: str
    settings: EtcdSettings
    keys: Keys
    link: Link

    @property
    def session(self) -> "EtcdSession | None": ...

    def _spawn(self, coro: Any, name: str) -> "asyncio.Task[Any]": ...

log = logging.getLogger("tandem.coord")


def to_bytes(s: str) -> bytes:
    return s.encode()


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


class RangeWatch:
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
        self.start, self.end = to_bytes(start), end
        self.on_reset, self.on_event = on_reset, on_event
        self.loaded = asyncio.Event()
        self.restarts = 0

    @classmethod
    def prefix(cls, link: Link, name: str, prefix: str, on_reset, on_event) -> "RangeWatch":
        return cls(link, name, prefix, utils.prefix_range_end(to_bytes(prefix)), on_reset, on_event)

    @classmethod
    def key(cls, link: Link, name: str, key: str, on_reset, on_event) -> "RangeWatch":
        return cls(link, name, key, to_bytes(key) + b"\x00", on_reset, on_event)

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


class LoadPublisher:
    """Puts the latest offered load under ``load/<site>`` on the session lease: when it
    changed, at most ``max_rate`` times a second, and every ``heartbeat_s`` anyway."""

    def __init__(self, coord: CoordinatorParts) -> None:
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
        key = to_bytes(self.coord.keys.load(self.coord.site))
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
            value = to_bytes(stamped.model_dump_json())
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


