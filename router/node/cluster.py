"""The site node's link to the cluster: membership, load, overflow (issue 3).

    cluster = ClusterLink(node, EtcdSettings(endpoints=("10.0.0.5:2379",)), advertise="10.0.0.7:7101")
    await cluster.start()      # returns at once, also when etcd is down
    node.cluster = cluster     # Routing.OfferCall then calls cluster.offered(result)
    ...
    await cluster.close()      # revoke the lease: peers see this site leave at once

What it does, on the node's event loop:

* starts an :class:`~router.coord.etcd.EtcdCoordinator` and registers this node's
  :class:`~router.coord.base.Member` (site, advertised address, region, kind); the
  coordinator keeps the registration wanted through outages and new sessions;
* publishes a :class:`~router.overflow.LoadSnapshot` built from the engine every
  ``LOAD_POLL_S`` (the coordinator skips unchanged ones and rate-limits the rest; the
  offer path stays free of it);
* after each offer that got QUEUED, evaluates :func:`router.overflow.decide` with the
  policy and contingency mode in force (read from the coordinator's watched caches, so a
  change in etcd applies to the next call, without restart) and the peers' loads; on an
  overflow it starts ``node.transfer(call_id, peer address)`` in the background. The
  decision is logged (``tandem.overflow``) and kept in :attr:`ClusterLink.decisions`
  as ``Decision.to_record()`` rows for the history store;
* every ``SWEEP_S`` decides again for the calls that stayed and are still queued,
  newest first (they have the longest expected wait), until one stays: overflow that
  was impossible when a call arrived (no peer with room, etcd down, stale loads)
  happens as soon as it is possible;
* follows this site's contingency mode (``contingency/<site>`` in etcd, with the mode's
  settings from the policy): each change, and once at start when etcd's state is
  loaded, becomes a journaled ``set_mode`` command (back-office agents on or off, the
  IVR announcement that EstimateWait and WatchCall carry); no restart, nobody is signed
  out. Partner overflow and wait factors follow the mode in ``decide``;
* counts, per peer, the transfers it started that the peer's published load cannot show
  yet (in flight, or committed after the snapshot was taken) and charges them to that
  peer's queue before deciding, so a burst does not send twenty calls to a site that
  showed two free agents; keeps the partner-cap counters (:class:`PartnerUsage`).

Failures faster than lease speed (issue 9): the transfer driver reports every peer that
fails it — a Propose, Commit or Abort without an answer, a connection lost and not
re-established — through :meth:`ClusterLink.peer_failed`; that peer is a *suspect*,
left out of every decision (``decide(..., suspect=...)``) until it publishes a load
snapshot stamped after the failure or ``SUSPECT_S`` passed, whichever comes first. A
dead peer thus gets no new call from the moment its connection drops or its first
proposal fails, not only once its lease expires (TTL) or its load goes stale. A
suspect is advice about where new calls go; it never changes a transfer's outcome.

Rebalancer targets (issue 12): ``targets/<site>`` is applied live by
:class:`router.node.targets.TargetsApplier` (``self.targets``): agents moved between
groups, and the overflow policy and contingency mode in force are :attr:`policy` and
:attr:`mode` — the coordinator's with this site's targets laid over them (wait factors,
closed partners; the targets' mode while the operator's is normal).

The member key is registered with a proof of succession (see :meth:`ClusterLink.is_predecessor`):
a node restarted on the same data directory takes its site's key over from its dead
previous process at once instead of waiting for that process's lease to expire.

Invariant 6: nothing here blocks routing or raises into it. While the coordinator has
no live session, overflow pauses (``paused`` counts the calls that stayed for that
reason); peers whose load is older than the policy's ``max_peer_age_s`` are never
chosen (``decide`` leaves them out), and a peer whose member key is gone (lease expired)
is no candidate either. Everything resumes by itself when etcd answers again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from router.coord import CoordinationUnavailable, EtcdCoordinator, EtcdSettings, Member
from router.engine.mode import MAX_ANNOUNCEMENT
from router.model import RoutingError
from router.node.metrics import OVERFLOW_DECISION_SECONDS
from router.overflow import (
    ACTIVE_STATES,  # noqa: F401 - kept importable here
    ContingencyState,
    Decision,
    LoadSnapshot,
    OverflowPolicy,
    PartnerUsage,
    PeerLoad,
    charge_transfers,
    decide,
    local_queue,
    site_load,
)

log = logging.getLogger("tandem.cluster")
dlog = logging.getLogger("tandem.overflow")

LOAD_POLL_S = 0.1  # how often the engine's load is offered to the publisher
DECISIONS_KEPT = 1000
PARTNER_POLL_S = 1.0  # how often calls handed to a capped partner are checked for their end
TRANSFER_WAIT_S = 60.0  # a transfer task waits this long for its outcome, then only logs
SWEEP_S = 0.5  # how often calls that stayed are decided again
SWEEP_MAX = 50  # calls moved per queue and sweep at most
SUSPECT_S = 5.0  # a peer that failed us is left out of decisions at most this long


def advertised_address(listen: str, port: int) -> str:
    """``host:port`` peers reach this node at: the listening host (a wildcard host is
    replaced by this machine's name) and the bound port."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = socket.getfqdn()
    return f"{host}:{port}"


def node_instance(node: Any) -> str:
    """This node's instance: ``host:data-dir:dev:inode`` of its journal's ``LOCK`` file,
    or "" (no takeover) when the node has no locked journal directory. Equal for every
    process ever started on that directory of this host, and for no other."""
    data_dir = getattr(getattr(node, "journal", None), "_dir", None)
    if data_dir is None:
        return ""
    try:
        st = os.stat(os.path.join(data_dir, "LOCK"))
    except OSError:
        return ""
    return f"{socket.gethostname()}:{os.path.realpath(data_dir)}:{st.st_dev}:{st.st_ino}"


def _holds_lock(node: Any) -> bool:
    """This process holds its journal's directory lock now (journal open, node not
    stopped or failed)."""
    journal = getattr(node, "journal", None)
    if journal is None or getattr(journal, "_lock_fd", None) is None or getattr(journal, "_closed", True):
        return False
    return node.failed is None and not node.stopped.is_set()


@dataclass(eq=False)
class _Sent:
    """A transfer this node started, until the peer's load can show it."""

    call_id: str
    site: str
    queue: str
    started: float  # wall clock
    done_at: float | None = None  # wall clock of the commit (None: still in flight)


@dataclass
class ClusterStats:
    decisions: int = 0
    overflow_started: int = 0
    overflow_out: int = 0  # committed at the target
    overflow_aborted: int = 0
    overflow_pending: int = 0  # not decided within TRANSFER_WAIT_S (still resolving)
    not_queued: int = 0  # the call was answered or abandoned before its transfer began
    paused: int = 0  # offers not evaluated: no etcd session
    failed: int = 0  # decide or transfer start raised (a bug: logged)
    by_rule: dict[str, int] = field(default_factory=dict)
    aborted_by_reason: dict[str, int] = field(default_factory=dict)
    out_by_site: dict[str, int] = field(default_factory=dict)


class ClusterLink:
    """One node's membership, load publishing and overflow; see the module docstring.

    ``coordinator`` may be given (tests); by default an :class:`EtcdCoordinator` on
    ``settings``. ``advertise``: the address peers reach this node at (default: the
    node's listening host and port).
    """

    def __init__(
        self, node: Any, settings: EtcdSettings | None = None, *, advertise: str | None = None,
        coordinator: Any = None, version: str = "",
    ) -> None:  # fmt: skip
        self.node = node
        info = node.site.site
        self.site = info.name
        # the decision histogram's two series, looked up once (not per decision)
        self._decision_seconds = {kind: OVERFLOW_DECISION_SECONDS.labels(self.site, kind) for kind in ("offer", "sweep")}
        self.region = info.region
        self.kind = info.kind
        self.address = advertise or f"127.0.0.1:{node.port}"
        self.coord = coordinator or EtcdCoordinator(self.site, settings)
        self.member = Member(
            self.site, self.address, self.region, self.kind, version=version, instance=node_instance(node),
        )  # fmt: skip
        if hasattr(self.coord, "successor_of"):
            self.coord.successor_of = self.is_predecessor
        # site -> (monotonic and wall time of the last failure, the peer's load (seq, ts) then)
        self._suspect: dict[str, tuple[float, float, tuple[int, float] | None]] = {}
        self.stats = ClusterStats()
        self.decisions: collections.deque[dict] = collections.deque(maxlen=DECISIONS_KEPT)
        self._queue_cfg = {q.name: q for q in node.site.queues}
        self._ratio_active: dict[str, frozenset[str]] = {}
        self._sent: list[_Sent] = []
        self._partner_calls: dict[str, dict[str, str]] = {}  # partner -> {call_id: address}
        self._partner_rate: dict[str, collections.deque[float]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._started = False
        self._closed = False
        self._mode = ContingencyState()
        self._stayed: dict[str, dict[str, None]] = {}  # queue -> call ids that stayed, in arrival order
        # BPO partners with their own ACD (router.node.partner): contracts, token keys
        # and cluster-wide caps in etcd (router.coord.partners).
        self.partner_book = None
        partners = getattr(node, "partners", None)
        if partners is not None and hasattr(self.coord, "watch_prefix"):
            from router.coord.partners import PartnerBook

            self.partner_book = PartnerBook(self.coord)
            partners.book = self.partner_book
        # The rebalancer's targets for this site (router.node.targets): its watch must be
        # added before the coordinator starts.
        self.targets: Any = None
        if hasattr(self.coord, "watch_prefix"):
            from router.node.targets import TargetsApplier

            self.targets = TargetsApplier(self)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the coordinator and the loops; returns at once (etcd may be down)."""
        if self._started:
            return
        self._started = True
        self.coord.on_contingency(self._on_contingency)
        self.coord.on_policy(self._on_policy)
        await self.coord.start()
        self._spawn(self._register(), "register")
        self._spawn(self._load_loop(), "load")
        self._spawn(self._partner_loop(), "partners")
        self._spawn(self._sweep_loop(), "sweep")
        self._spawn(self._mode_sync(), "mode")
        if self.partner_book is not None:
            self._spawn(self._partner_slots(), "partner-slots")
        if self.targets is not None:
            self._spawn(self.targets.run(), "targets")
        for c in self.node.engine.calls("queued"):  # recovered: decide for them in the sweeps
            if not c.transfer_origin:
                self._stayed.setdefault(c.queue, {})[c.call_id] = None
        log.info("%s: cluster link to %s, advertised as %s", self.site, self.coord, self.address)

    async def close(self) -> None:
        """Stop the loops and revoke the session (best effort, bounded). Transfers in
        flight are the node's (its driver resolves them); they are not cancelled."""
        if self._closed:
            return
        self._closed = True
        try:
            self.coord.publish_load(self.snapshot())  # "not accepting" if draining
        except Exception:  # noqa: BLE001
            pass
        for t in list(self._tasks):
            if t.get_name().startswith("cluster-transfer"):
                continue
            t.cancel()
        try:
            await asyncio.wait_for(self.coord.close(), 3.0)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - closing: best effort
            log.warning("%s: coordinator close did not finish cleanly", self.site)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=f"cluster-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and not self._closed:
            log.error("cluster task %s died", task.get_name(), exc_info=task.exception())

    async def _register(self) -> None:
        with contextlib.suppress(CoordinationUnavailable):
            await self.coord.wait_ready(2.0)  # usually quick; else register says why
        try:
            ok = await self.coord.register(self.member)
            if not ok:
                log.warning("%s: member key held by another session; the coordinator retries", self.site)
        except CoordinationUnavailable as e:
            # The coordinator keeps the registration wanted and retries by itself.
            log.info("%s: etcd not reachable yet (%s); registering when it is", self.site, e)

    def is_predecessor(self, held: Member) -> bool:
        """True when ``held`` (this site's member record, on another lease) is provably
        an earlier process of this very node, now dead — the coordinator may then take
        the key over at once (no wait for that lease to expire).

        The proof: the record names the same instance — this host, this data directory
        and the very inode of its ``LOCK`` file (:func:`node_instance`) — but another
        process (pid, start time), and this process holds that ``LOCK`` right now
        (flock, exclusive; taken before any registration, kept while the journal is
        open). A process that registered with that instance held the lock then; it cannot
        hold it now, so it has exited (or closed its journal: stopped, owning no call).
        Two live processes of one site never both pass: a second process on another data
        directory or host has another instance and waits for the holder's lease, as
        before (the split-brain guard), and a second process on the same directory
        cannot start at all (the journal refuses a locked directory)."""
        mine = self.member
        if not mine.instance or held.instance != mine.instance or held.site != mine.site:
            return False
        if (held.pid, held.started_at) == (mine.pid, mine.started_at):
            return False
        return _holds_lock(self.node)

    # --- policy and contingency --------------------------------------------------------

    def _on_policy(self, policy: Any) -> None:
        self._ratio_active.clear()  # hysteresis state belongs to the rules it came from
        log.info("%s: overflow policy changed (applies from the next call)", self.site)
        self._apply_mode()  # the policy holds the modes' settings

    def _on_contingency(self, site: str, state: ContingencyState) -> None:
        if site != self.site:
            return
        self._mode = state
        settings = state.settings(self.policy)
        log.warning(
            "%s: contingency mode %s (partner overflow %s, back-office agents %s, announcement %r)",
            self.site, state.mode, "on" if settings.partner_overflow else "off",
            "on" if settings.backoffice_agents else "off", settings.announcement,
        )
        self._apply_mode()

    def _apply_mode(self) -> None:
        """Hand the site's contingency mode to the engine (a journaled ``set_mode``):
        back-office agents on or off, the IVR announcement. Agents stay signed in;
        partner overflow follows the mode in :func:`router.overflow.decide`. A no-op
        when the engine already runs this mode."""
        if self._closed:
            return
        state = self.mode  # the operator's, or the rebalancer targets' while that is normal
        settings = state.settings(self.policy)
        cmd = {
            "op": "set_mode", "t": self.node.now(), "mode": state.mode,
            "backoffice": settings.backoffice_agents,
            "announcement": settings.announcement[:MAX_ANNOUNCEMENT],
        }  # fmt: skip
        try:
            self.node.submit(cmd)
        except Exception:  # noqa: BLE001 - a refused mode must not stop the watch
            log.exception("%s: could not apply contingency mode %s", self.site, state.mode)

    async def _mode_sync(self) -> None:
        """Once etcd's state is loaded, make the engine's mode (recovered from the
        journal) agree with it, also when the stored mode did not change meanwhile."""
        while not self._closed:
            try:
                await self.coord.wait_ready(5.0)
            except CoordinationUnavailable:
                continue
            self._apply_mode()
            return

    @property
    def mode(self) -> ContingencyState:
        """The contingency state in force here: the operator's (etcd), or the rebalancer
        targets' mode while the operator's is normal."""
        state = self.coord.contingency(self.site)
        if self.targets is None:
            return state
        return self.targets.mode_over(state)

    @property
    def policy(self) -> OverflowPolicy:
        """The overflow policy this node decides with: the coordinator's, with this site's
        rebalancer targets laid over it (:func:`router.plans.policy_with_targets`)."""
        policy = self.coord.policy
        if self.targets is None:
            return policy
        return self.targets.policy_over(policy)

    def targets_changed(self) -> None:
        """The applier's hook: other targets are in force (rules, maybe the mode)."""
        self._ratio_active.clear()  # hysteresis state belongs to the rules it came from
        self._apply_mode()

    @property
    def announcement(self) -> str:
        return self.mode.settings(self.policy).announcement

    # --- load --------------------------------------------------------------------------

    def snapshot(self) -> LoadSnapshot:
        """This site's load from the engine, now."""
        engine = self.node.engine
        return site_load(
            self.site, self.region, self.kind, engine.queues(now=self.node.view_time()), self._queue_cfg,
            engine.counts_by_state(), accepting=not self.node.draining, mode=self.mode.mode,
        )  # fmt: skip

    def publish(self) -> None:
        if self._closed or self.node.stopped.is_set():
            return
        try:
            self.coord.publish_load(self.snapshot())
        except Exception:  # noqa: BLE001 - publishing must never hurt routing
            log.exception("%s: building the load snapshot failed", self.site)

    async def _load_loop(self) -> None:
        while not self._closed and not self.node.stopped.is_set():
            self.publish()
            self._prune_sent()
            await asyncio.sleep(LOAD_POLL_S)

    # --- peers as this node sees them ----------------------------------------------------

    def _prune_sent(self) -> None:
        """Forget transfers every peer's load shows by now (committed before its
        snapshot) or that ended otherwise."""
        if not self._sent:
            return
        loads = self.coord.peer_loads()
        keep = []
        for s in self._sent:
            if s.done_at is None:
                keep.append(s)
                continue
            peer = loads.get(s.site)
            if peer is not None and peer.snapshot.ts >= s.done_at:
                continue
            if time.time() - s.done_at > 10.0:  # the peer went quiet: stop charging it
                continue
            keep.append(s)
        self._sent = keep

    def peer_loads(self) -> dict[str, PeerLoad]:
        """The peers' loads, each charged with our transfers it cannot show yet
        (:func:`router.overflow.charge_transfers`)."""
        loads = self.coord.peer_loads()
        if not self._sent:
            return loads
        pending = [
            (s.site, s.queue) for s in self._sent
            if s.site in loads and (s.done_at is None or loads[s.site].snapshot.ts < s.done_at)
        ]  # fmt: skip
        return charge_transfers(loads, pending)

    def partner_usage(self, loads: dict[str, PeerLoad]) -> dict[str, PartnerUsage]:
        now = time.monotonic()
        out = {}
        for site, peer in loads.items():
            if peer.snapshot.kind != "partner":
                continue
            rate = self._partner_rate.get(site)
            while rate and rate[0] < now - 1.0:
                rate.popleft()
            out[site] = PartnerUsage(
                concurrent=len(self._partner_calls.get(site, ())), calls_last_s=float(len(rate or ()))
            )
        return out

    def peer_failed(self, address: str, why: str) -> None:
        """The transfer driver's hook: the member at ``address`` just failed us (no
        answer, or a lost connection that could not be re-established). Makes it a
        suspect (see :meth:`suspects`); an address that is no current member's is
        ignored."""
        site = next((n for n, m in self.coord.members().items() if m.address == address and n != self.site), None)
        if site is None:
            return
        peer = self.coord.peer_loads().get(site)
        seen = (peer.snapshot.seq, peer.snapshot.ts) if peer is not None else None
        if site not in self.suspects():
            log.warning("%s: peer %s at %s is a suspect (%s): no overflow to it for up to %.0f s",
                        self.site, site, address, why, SUSPECT_S)
        self._suspect[site] = (time.monotonic(), time.time(), seen)

    def suspects(self) -> set[str]:
        """Peers left out of overflow decisions now: each failed us less than
        ``SUSPECT_S`` ago and has published no load since — a snapshot that differs from
        the one we held at the failure and is stamped after it (a live peer publishes at
        least every heartbeat; a dead one never again). A peer whose clock runs behind
        ours only stays suspect for the full ``SUSPECT_S``."""
        if not self._suspect:
            return set()
        now = time.monotonic()
        loads = self.coord.peer_loads()
        out = set()
        for site, (at, wall, seen) in list(self._suspect.items()):
            peer = loads.get(site)
            fresh = peer is not None and (peer.snapshot.seq, peer.snapshot.ts) != seen and peer.snapshot.ts > wall
            if now - at >= SUSPECT_S or fresh:
                del self._suspect[site]
                continue
            out.add(site)
        return out

    # --- overflow ------------------------------------------------------------------------

    def offered(self, result: Any) -> Decision | None:
        """Routing.OfferCall's hook: ``result`` is the engine's OfferResult of a call
        just offered here. Decides for a QUEUED call; never raises."""
        call = result.call
        if call.state != "queued" or self._closed:
            return None
        try:
            if not self.coord.connected:
                self.stats.paused += 1
                self._stayed.setdefault(call.queue, {})[call.call_id] = None
                return None
            d = self._decide(call.call_id, call.queue, result.expected_wait_s)
            if not d.overflow:
                self._stayed.setdefault(call.queue, {})[call.call_id] = None
            return d
        except Exception:  # noqa: BLE001 - overflow must never hurt routing
            self.stats.failed += 1
            log.exception("%s: overflow decision for %s failed", self.site, call.call_id)
            return None

    async def _sweep_loop(self) -> None:
        while not self._closed and not self.node.stopped.is_set():
            await asyncio.sleep(SWEEP_S)
            if not self.coord.connected or self.node.draining:
                continue
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - overflow must never hurt routing
                self.stats.failed += 1
                log.exception("%s: overflow sweep failed", self.site)

    def sweep(self) -> int:
        """Decide again for the calls that stayed (see the module docstring); returns
        how many overflows it started."""
        engine = self.node.engine
        started = 0
        for queue, ids in list(self._stayed.items()):
            for cid in list(ids):
                try:
                    if engine.call(cid).state != "queued":
                        del ids[cid]
                except RoutingError:  # left retention
                    del ids[cid]
            moved = 0
            for cid in reversed(list(ids)):
                if moved >= SWEEP_MAX:
                    break
                d = self._decide(cid, queue, engine.expected_wait(cid), log_stay=False)
                if not d.overflow:
                    break
                del ids[cid]
                moved += 1
            started += moved
            if not ids:
                del self._stayed[queue]
        return started

    def _decide(self, call_id: str, queue: str, expected_wait_s: float, log_stay: bool = True) -> Decision:
        """One overflow decision (and the transfer it starts), timed into
        ``tandem_overflow_decision_seconds``; ``log_stay=False`` is the sweep's."""
        t0 = time.perf_counter()
        d = self._decide_now(call_id, queue, expected_wait_s, log_stay)
        self._decision_seconds["offer" if log_stay else "sweep"].observe(time.perf_counter() - t0)
        return d

    def _decide_now(self, call_id: str, queue: str, expected_wait_s: float, log_stay: bool) -> Decision:
        node = self.node
        qv = node.engine.queue(queue, now=node.view_time())
        local = local_queue(self.site, self.region, qv, self._queue_cfg.get(queue), expected_wait_s)
        loads = self.peer_loads()
        members = self.coord.members()
        policy, usage, allowed = self.policy, self.partner_usage(loads), set(members)
        gateways = self._gateway_loads(call_id, queue, local, policy)
        if gateways:
            # Partners on the partner API: their loads come from their gateways'
            # availability, their contracts from etcd (router.coord.partners).
            partners = getattr(self.node, "partners", None)
            loads = {**loads, **gateways}
            policy = policy.model_copy(update={"partners": {**policy.partners, **partners.overflow_contracts()}})
            usage = {**usage, **partners.usage()}
            allowed |= set(gateways)
        d = decide(
            call_id, local, policy, loads, now=time.time(), mode=self.mode.mode,
            partner_usage=usage, ratio_active=self._ratio_active.get(queue, frozenset()),
            members=allowed, suspect=self.suspects(),
        )  # fmt: skip
        self._ratio_active[queue] = d.ratio_active
        if not d.overflow and not log_stay:
            return d  # a sweep's "still stays" is no news
        self.stats.decisions += 1
        self.stats.by_rule[d.rule] = self.stats.by_rule.get(d.rule, 0) + 1
        rec = d.to_record()
        rec["t"] = time.time()
        self.decisions.append(rec)
        if not d.overflow:
            if dlog.isEnabledFor(logging.DEBUG):
                dlog.debug("stay %s", json.dumps(rec, sort_keys=True))
            return d
        member = members.get(d.target)
        if member is None and d.target in gateways:
            dlog.info("overflow %s", json.dumps(rec, sort_keys=True))
            sent = _Sent(call_id, d.target, d.target_queue, time.time())
            self._sent.append(sent)
            self.stats.overflow_started += 1
            self._spawn(self._offer_partner(sent, str(d.figures.get("value", "standard"))), f"transfer-{call_id}")
            return d
        if member is None:  # decide got members: cannot happen
            return d
        dlog.info("overflow %s", json.dumps(rec, sort_keys=True))
        sent = _Sent(call_id, d.target, d.target_queue, time.time())
        self._sent.append(sent)
        if member.kind == "partner":
            self._partner_calls.setdefault(d.target, {})[call_id] = member.address
            self._partner_rate.setdefault(d.target, collections.deque()).append(time.monotonic())
        self.stats.overflow_started += 1
        self._spawn(self._transfer(sent, member.address), f"transfer-{call_id}")
        return d

    async def _transfer(self, sent: _Sent, address: str) -> None:
        try:
            out = await self.node.transfer(sent.call_id, address, timeout=TRANSFER_WAIT_S)
        except RoutingError as e:
            # Answered or abandoned between the offer and the begin: it stays here.
            self.stats.not_queued += 1
            self._forget(sent)
            log.debug("%s: transfer of %s not begun: %s", self.site, sent.call_id, e.reason)
            return
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001
            self.stats.failed += 1
            self._forget(sent)
            self._stay_again(sent.call_id)
            log.exception("%s: transfer of %s to %s failed", self.site, sent.call_id, sent.site)
            return
        if out.state != "pending":
            # One line per resolved transfer (bench/failover.py: how long calls sent to a
            # dead peer stayed out of dispatch).
            dlog.info("outcome %s", json.dumps({
                "call_id": sent.call_id, "target": sent.site, "state": out.state, "reason": out.reason,
                "unsent": out.unsent, "started": round(sent.started, 6), "t": round(time.time(), 6),
            }, sort_keys=True))  # fmt: skip
        if out.state == "committed":
            sent.done_at = time.time()
            self.stats.overflow_out += 1
            self.stats.out_by_site[sent.site] = self.stats.out_by_site.get(sent.site, 0) + 1
        elif out.state == "aborted":
            self.stats.overflow_aborted += 1
            self.stats.aborted_by_reason[out.reason] = self.stats.aborted_by_reason.get(out.reason, 0) + 1
            self._forget(sent)
            self._stay_again(sent.call_id)
            log.info("%s: overflow of %s to %s declined: %s", self.site, sent.call_id, sent.site, out.reason)
        else:
            self.stats.overflow_pending += 1
            sent.done_at = time.time()
            log.warning("%s: overflow of %s to %s still unresolved after %.0f s",
                        self.site, sent.call_id, sent.site, TRANSFER_WAIT_S)

    def _gateway_loads(self, call_id: str, queue: str, local: Any, policy: Any) -> dict[str, PeerLoad]:
        """Partners connected through the partner API that may take this queue's calls
        now (contract: skills, queues, value tier, hours, holidays), but not one that
        handed this very call back."""
        partners = getattr(self.node, "partners", None)
        if partners is None or not partners.gateways:
            return {}
        rules = policy.rules_for(self.site, queue)
        value = (rules.value if rules is not None and rules.value else None) or local.value
        loads = partners.loads_for(queue, local.skill, value, time.time())
        for p in partners.handed_back.get(call_id, ()):
            loads.pop(p, None)
        return loads

    async def _offer_partner(self, sent: _Sent, value: str) -> None:
        """Offer a call to a partner's gateway (router.node.partner); a decline leaves it
        here, in its place, for the sweeps to decide again."""
        try:
            out = await self.node.partners.offer(sent.call_id, sent.site, value)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001
            self.stats.failed += 1
            log.exception("%s: offer of %s to partner %s failed", self.site, sent.call_id, sent.site)
            out = "failed"
        if out == "assigned":
            sent.done_at = time.time()
            self.stats.overflow_out += 1
            self.stats.out_by_site[sent.site] = self.stats.out_by_site.get(sent.site, 0) + 1
            return
        self._forget(sent)
        if out == "not_queued":
            self.stats.not_queued += 1
            return
        self.stats.overflow_aborted += 1
        reason = out.split(":")[0]
        self.stats.aborted_by_reason[reason] = self.stats.aborted_by_reason.get(reason, 0) + 1
        self._stay_again(sent.call_id)
        log.info("%s: overflow of %s to partner %s not done: %s", self.site, sent.call_id, sent.site, out)

    async def _partner_slots(self) -> None:
        """Free the etcd slots of our calls no longer with a partner: once etcd answers
        after a start (a restart may have left some), then every minute."""
        while not self._closed:
            if self.coord.connected:
                try:
                    await self.node.partners.reconcile_slots()
                    await asyncio.sleep(60.0)
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - etcd away: later
                    log.debug("%s: partner slot reconciliation: %s", self.site, e)
            await asyncio.sleep(1.0)

    def _stay_again(self, call_id: str) -> None:
        """A declined or failed overflow leaves the call queued here, in its place: put it
        back among the calls the sweep decides again for (in arrival order), or it would
        wait here for good even when a peer has room later."""
        try:
            call = self.node.engine.call(call_id)
        except RoutingError:
            return
        if call.state != "queued":
            return
        ids = self._stayed.setdefault(call.queue, {})
        ids[call_id] = None
        engine = self.node.engine

        def arrival(cid: str) -> float:
            try:
                return engine.call(cid).offered_at
            except RoutingError:
                return 0.0

        self._stayed[call.queue] = dict.fromkeys(sorted(ids, key=arrival))

    def _forget(self, sent: _Sent) -> None:
        if sent in self._sent:
            self._sent.remove(sent)
        calls = self._partner_calls.get(sent.site)
        if calls is not None:
            calls.pop(sent.call_id, None)

    async def _partner_loop(self) -> None:
        """Partner caps count our calls still active at the partner: ask it about them
        (Routing.GetCall) and forget those that ended."""
        import grpc

        from router.v1 import routing_pb2, routing_pb2_grpc, types_pb2

        final = {types_pb2.CALL_STATE_COMPLETED, types_pb2.CALL_STATE_ABANDONED, types_pb2.CALL_STATE_REJECTED}
        channels: dict[str, grpc.aio.Channel] = {}
        try:
            while not self._closed:
                await asyncio.sleep(PARTNER_POLL_S)
                for site, calls in list(self._partner_calls.items()):
                    contract = self.coord.policy.partners.get(site)
                    if contract is None or contract.max_concurrent is None:
                        calls.clear()  # no concurrency cap: nothing to count
                        continue
                    for cid, address in list(calls.items()):
                        factory = getattr(self.node, "channels", None)
                        if factory is not None:  # mTLS: the partner node must prove it is `site`
                            ch = factory.channel(address, factory.expect("site", site))
                        else:
                            ch = channels.get(address) or channels.setdefault(address, grpc.aio.insecure_channel(address))
                        try:
                            r = await routing_pb2_grpc.RoutingStub(ch).GetCall(
                                routing_pb2.GetCallRequest(call_id=cid), timeout=1.0
                            )
                        except grpc.RpcError as e:
                            if e.code() == grpc.StatusCode.NOT_FOUND:
                                in_flight = any(s.call_id == cid and s.done_at is None for s in self._sent)
                                if not in_flight:
                                    calls.pop(cid, None)
                            continue
                        if r.call.state in final:
                            calls.pop(cid, None)
        finally:
            for ch in channels.values():
                await ch.close()

    # --- read-only figures (metrics, alerts) ---------------------------------------------

    def policy_sites(self) -> set[str]:
        """The sites the overflow policy in force names: targets, per-site rules, partners."""
        policy = self.coord.policy
        out = set(policy.sites) | set(policy.partners)
        rules = [policy.default, *policy.queues.values(), *(r for qs in policy.sites.values() for r in qs.values())]
        for r in rules:
            if r is None:
                continue
            out.update(r.to or ())
            if r.split is not None:
                out.update(r.split.to)
        out.discard(self.site)
        return out

    def partner_calls(self) -> dict[str, tuple[int, int | None]]:
        """partner -> (our calls active there, counted against its cap; the contract's
        ``max_concurrent``, None when uncapped) for every partner of the policy."""
        contracts = self.coord.policy.partners
        out = {p: (len(self._partner_calls.get(p, ())), c.max_concurrent) for p, c in contracts.items()}
        for p, calls in self._partner_calls.items():
            out.setdefault(p, (len(calls), None))
        if self.partner_book is not None:
            # Partners on the partner API: the slots every origin holds (the cap is the
            # whole cluster's, router.coord.partners).
            for p, c in self.partner_book.contracts().items():
                out[p] = (self.partner_book.held(p), c.caps.concurrent)
        return out

    def stats_dict(self) -> dict[str, Any]:
        s = self.stats
        return {
            "site": self.site,
            "address": self.address,
            "connected": self.coord.connected,
            "members": sorted(self.coord.members()),
            "mode": self.mode.mode,
            "decisions": s.decisions,
            "overflow_started": s.overflow_started,
            "overflow_out": s.overflow_out,
            "overflow_aborted": s.overflow_aborted,
            "overflow_pending": s.overflow_pending,
            "not_queued": s.not_queued,
            "paused": s.paused,
            "failed": s.failed,
            "by_rule": dict(s.by_rule),
            "aborted_by_reason": dict(s.aborted_by_reason),
            "out_by_site": dict(s.out_by_site),
            # the rebalancer's targets (router.node.targets): applied, pending, refused
            "targets": self.targets.stats() if self.targets is not None else None,
        }
