"""The site node's link to the interaction history (issue 4, DESIGN.md invariant 5).

``tandem node --history off|embedded|clickhouse://host:port/db`` (or ``TANDEM_HISTORY``):

* ``off`` (the default of a plain ``tandem node``): no history, nothing imported.
* ``embedded``: chdb in ``<data dir>/history`` (one path per process; chdb costs ~0.3 s
  to import and ~0.5 GB resident, which is why it is not the default of every node —
  ``tandem demo`` turns it on for its nodes).
* a ``clickhouse://`` URL: a real server through clickhouse-driver (inserts in child
  processes, see :mod:`router.history.inserter`); ``clickhouses://`` over TLS. A node with
  ``--tls-dir`` opens a ``clickhouses://`` URL that names no ``ca=`` with its own identity
  (``ca.crt``, and ``site-NAME.crt``/``.key`` unless the URL names a ``cert=``).

What the node feeds (:class:`HistoryLink`):

* **after the journal ack, never before**: :meth:`HistoryLink.capture` runs inside
  ``Node.submit`` for a command that changed the state and adds itself to the step's
  deliveries; the node calls :meth:`HistoryLink.deliver` once the record is durable (in
  journal order). Views are taken at submit time (the state right after the command),
  rows are built and handed to the writer at delivery. ``writer.submit`` is an O(1)
  append: nothing here waits on ClickHouse.
  - a call reaching a final state (completed, abandoned, rejected) -> one
    ``interactions`` row (and the caller's cached contacts learn it at once);
  - an offer -> a ``routing_decisions`` row (seq 0: queue chosen, class, expected wait,
    position; or the rejection);
  - an agent's history state changing -> an ``agent_state_changes`` row (journal seq);
* overflow decisions of the cluster link (:mod:`router.node.cluster`, its
  ``decisions`` log) -> ``routing_decisions`` rows (seq 1, 2, … per call on this node);
* at start: the ``interactions`` row of every ended call the engine retains is
  submitted again (keys make the copies invisible: invariant 5 after a SIGKILL), and
  the agent tracker is seeded from the engine; at a clean stop every signed-in agent's
  current interval is closed (a checkpoint row) and the writer flushes or spools.

Routing uses the history through :class:`~router.history.recent.RecentContacts`:

* :meth:`HistoryLink.prepare_offer` (Routing.OfferCall, before the offer is applied):
  the caller's contacts from the cache, or one look-up bounded by
  ``TANDEM_HISTORY_LOOKUP_MS`` (default 20 ms; a timeout or failure trips the cache's
  cooldown, 5 s, during which look-ups answer "no history" at once). A contact within
  ``routing.repeat_window_h`` puts ``"history_repeat": true`` in the offer command: the
  engine gives the call the repeat class as if its own memory had the contact, and the
  journal keeps the decision (a replay does not ask the history again).
* :meth:`HistoryLink.screen_pop` (every Assignment): the engine's own contacts merged
  with the history's (newest first, one per call id, at most
  ``routing.screen_pop_history``).

A ClickHouse outage only degrades both (no repeat class from older contacts, a shorter
screen pop); rows go to ``<data dir>/history-spool`` and are replayed after recovery.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from router.model import AgentChanged, CallChanged, OfferResult, PastContact

log = logging.getLogger("tandem.history")

FINAL = frozenset({"completed", "abandoned", "rejected"})
GONE = FINAL | {"transferred"}
DEFAULT_LOOKUP_MS = 20.0
#: How far back screen pops and repeat checks look in the history (the repeat class
#: itself only counts contacts within routing.repeat_window_h).
LOOKBACK_S = 30 * 86400
POPS_KEPT = 50_000  # calls whose history contacts are kept until they end


def history_spec(value: str | None) -> str:
    """Normalise ``--history`` / ``TANDEM_HISTORY``: "off", "embedded" or a URL."""
    v = (value or "off").strip()
    if v.lower() in ("", "off", "none", "no", "0", "false"):
        return "off"
    if v.lower() in ("embedded", "chdb", "on"):
        return "embedded"
    if v.startswith(("clickhouse://", "clickhouses://")):
        return v
    raise ValueError(f"--history must be off, embedded or a clickhouse:// URL, got {value!r}")


def store_tls(spec: str, tls: Any) -> dict[str, str]:
    """The store's TLS keywords from the node's identity (``tls``: a
    :class:`router.security.tls.TlsFiles`, or None): for a ``clickhouses://`` URL without
    ``ca=``, the node's ``ca.crt``, and its certificate and key unless the URL names a
    ``cert=``. Nothing otherwise: the URL's own parameters stand."""
    if tls is None or not spec.startswith("clickhouses://"):
        return {}
    from router.history.store import tls_params

    given = tls_params(spec)
    if "ca" in given:
        return {}
    kw = {"ca": str(tls.ca_path)}
    if "cert" not in given and "key" not in given:
        kw.update(cert=str(tls.cert_path), key=str(tls.key_path))
    return kw


class _DecisionLog(collections.deque):
    """The cluster link's ``decisions`` deque, also feeding each record to the history."""

    def __init__(self, old: collections.deque, sink: Any) -> None:
        super().__init__(old, maxlen=old.maxlen)
        self._sink = sink

    def append(self, rec: Any) -> None:  # noqa: D102
        super().append(rec)
        try:
            self._sink(rec)
        except Exception:  # noqa: BLE001 - history must never hurt overflow
            log.exception("history: overflow decision not recorded")


class HistoryLink:
    """See the module docstring. Build with :meth:`open` (or directly, in tests)."""

    def __init__(self, node: Any, store: Any, writer: Any, recent: Any, *,
                 recent_store: Any = None, lookup_timeout_s: float = DEFAULT_LOOKUP_MS / 1000) -> None:
        from router.history.rows import AgentStateTracker

        self.node = node
        self.site = node.site
        self.store = store
        self.writer = writer
        self.recent = recent
        self._recent_store = recent_store
        self.lookup_timeout_s = lookup_timeout_s
        recent.timeout_s = lookup_timeout_s
        r = self.site.routing
        self.repeat_window_h = float(r.repeat_window_h)
        self.pop_limit = int(r.screen_pop_history)
        self.tracker = AgentStateTracker(self.site)
        self._pops: collections.OrderedDict[str, list[PastContact]] = collections.OrderedDict()
        self._decision_seq: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.history_repeats = 0  # offers that got the repeat class from the history
        self.submitted = 0
        self._closed = False

    # --- building ----------------------------------------------------------------------

    @classmethod
    def open(cls, node: Any, spec: str, data_dir: str | Path, *, tls: Any = None,
             lookup_timeout_s: float | None = None, **writer_kw: Any) -> "HistoryLink":
        """Open the store, start the writer (it applies the migrations), attach to
        ``node`` (``node.history``) and re-submit the rows of the ended calls the engine
        retains. Synchronous: call it before the node serves. ``tls``: the node's
        identity files, for a ``clickhouses://`` URL (:func:`store_tls`)."""
        from router.history.recent import RecentContacts
        from router.history.store import open_store
        from router.history.writer import HistoryWriter

        spec = history_spec(spec)
        if spec == "off":
            raise ValueError("history is off")
        data_dir = Path(data_dir)
        target = spec if spec != "embedded" else data_dir / "history"
        if lookup_timeout_s is None:
            lookup_timeout_s = float(os.environ.get("TANDEM_HISTORY_LOOKUP_MS", DEFAULT_LOOKUP_MS)) / 1000
        store_kw = store_tls(spec, tls)
        store = open_store(target, **store_kw)
        # Look-ups: their own connection (chdb: the same session), failing fast.
        recent_store = open_store(target, **({} if spec == "embedded" else
                                             {"connect_timeout": 1.0, "send_receive_timeout": 2.0, **store_kw}))
        try:
            if spec == "embedded":
                # In-process and quick: migrate now, so the first look-ups do not race
                # the migrations (and pay chdb's first-query cost) within their bound.
                store.migrate()
                writer_kw.setdefault("migrate", False)
            writer_kw.setdefault("flush_interval_s", 0.5)
            writer = HistoryWriter(store, data_dir / "history-spool", **writer_kw).start()
        except BaseException:
            store.close()
            recent_store.close()
            raise
        recent = RecentContacts(recent_store, limit=max(1, node.site.routing.screen_pop_history),
                                window_s=LOOKBACK_S, timeout_s=lookup_timeout_s, trip_on_timeout=False)
        link = cls(node, store, writer, recent, recent_store=recent_store, lookup_timeout_s=lookup_timeout_s)
        link.attach()
        log.info("%s: history at %s", node.site.site.name, store.url)
        return link

    async def query(self, fn: Any, timeout_s: float = 10.0) -> Any:
        """``fn(store)`` on the look-up store, in a thread, bounded by ``timeout_s``
        (asyncio.TimeoutError): operator reads (Admin.DescribeCall, GetReplayInput)."""
        store = self._recent_store if self._recent_store is not None else self.store
        return await asyncio.wait_for(asyncio.to_thread(fn, store), timeout_s)

    def attach(self) -> None:
        """Become ``node.history``; seed the tracker; re-submit the retained ended calls."""
        engine = self.node.engine
        self.tracker.restore(engine.agents())
        n = 0
        for view in engine.calls():
            if view.state in FINAL:
                self._interaction(view)
                n += 1
        if n:
            log.info("%s: %d ended call(s) re-submitted to the history", self.site.site.name, n)
        self.node.history = self

    def attach_cluster(self, cluster: Any) -> None:
        """Record the cluster link's overflow decisions (``cluster.decisions``)."""
        cluster.decisions = _DecisionLog(cluster.decisions, self.overflow_decision)

    # --- the node's side: after the journal ---------------------------------------------

    def capture(self, records: list, effects: list, result: Any, deliveries: list) -> None:
        """In ``Node.submit``, for a command that changed the state: take the views the
        rows need now, and queue the rows' submission behind the journal record."""
        try:
            self._capture(records, effects, result, deliveries)
        except Exception:  # noqa: BLE001 - history must never hurt routing
            log.exception("history: step not captured")

    def _capture(self, records: list, effects: list, result: Any, deliveries: list) -> None:
        engine = self.node.engine
        calls: list = []
        agents: list = []
        for e in effects:
            kind = type(e)
            if kind is CallChanged:
                view = engine.call(e.call_id)
                if view.state in GONE:
                    self._pops.pop(e.call_id, None)
                    self._decision_seq.pop(e.call_id, None)
                    if view.state in FINAL:
                        calls.append(view)
            elif kind is AgentChanged:
                agents.append(engine.agent(e.agent_id))
        offer = result if type(result) is OfferResult and records[0].get("op") == "offer" else None
        if not calls and not agents and offer is None:
            return
        deliveries.append((self, (records[-1].get("t", 0.0), offer, calls, agents)))

    def deliver(self, token: tuple) -> None:
        """The record is durable: hand the rows to the writer (O(1) each)."""
        if self._closed:
            return
        t, offer, calls, agents = token
        try:
            if offer is not None:
                from router.history.rows import decision_from_offer

                self._submit("routing_decisions", decision_from_offer(self.site, offer, seq=0, at=t))
            if calls:
                for view in calls:
                    self._interaction(view)
            if agents:
                seq = int(self.node.durable_seq)
                for view in agents:
                    row = self.tracker.observe(view, seq=seq, at=t)
                    if row is not None:
                        self._submit("agent_state_changes", row)
        except Exception:  # noqa: BLE001 - history must never hurt routing
            log.exception("history: rows of a step not recorded")

    def _interaction(self, view: Any) -> None:
        from router.history.rows import interaction_row

        self._submit("interactions", interaction_row(view, self.site, regions=self._regions()))
        if view.caller:
            self.recent.record(view.caller, PastContact(view.call_id, view.offered_at, view.skill,
                                                        view.state, int(view.csat or 0)))

    def _regions(self) -> dict[str, str] | None:
        cluster = getattr(self.node, "cluster", None)
        if cluster is None:
            return None
        try:
            return {name: m.region for name, m in cluster.coord.members().items()}
        except Exception:  # noqa: BLE001 - no membership known: the row says ""
            return None

    def _submit(self, table: str, row: dict) -> None:
        self.writer.submit(table, row)
        self.submitted += 1

    def partner_event(self, *, event: str, partner: str, call_id: str, offer_no: int, at: float,
                      **fields: Any) -> None:
        """One event of a partner offer (router.node.partner), for statements
        (:mod:`router.history.partner`)."""
        if self._closed:
            return
        from router.history.partner import partner_event_row

        fields.setdefault("origin_region", self.node.site.site.region)
        self._submit("partner_events", partner_event_row(
            partner=partner, call_id=call_id, offer_no=offer_no, event=event, at=at, **fields))

    def overflow_decision(self, rec: dict) -> None:
        """A cluster decision record (``Decision.to_record()`` + ``t``)."""
        if self._closed:
            return
        from router.history.rows import routing_decision_row

        cid = rec["call_id"]
        seq = self._decision_seq.get(cid, 0) + 1
        self._decision_seq[cid] = seq
        while len(self._decision_seq) > POPS_KEPT:
            self._decision_seq.popitem(last=False)
        cands = [(c.get("site", ""), c.get("expected_wait_s")) for c in rec.get("candidates", ())]
        target = rec.get("target") or ""
        kinds = {c.get("site"): c.get("kind") for c in rec.get("candidates", ())}
        figures = rec.get("figures") or {}
        self._submit("routing_decisions", routing_decision_row(
            self.site, call_id=cid, seq=seq, at=float(rec.get("t") or time.time()),
            rule=rec.get("rule", ""),
            target_kind=("partner" if kinds.get(target) == "partner" else "site") if target else "stay",
            target=f"{target}/{rec.get('target_queue', '')}" if target else f"{rec.get('site')}/{rec.get('queue')}",
            candidates=[(n, w if isinstance(w, (int, float)) else math.inf) for n, w in cands],
            expected_wait_s=float(figures.get("local_expected_wait_s", 0.0) or 0.0),
            reason=rec.get("reason", ""),
            details={"mode": rec.get("mode", ""), "figures": figures,
                     "excluded": {c.get("site", ""): c.get("excluded", "") for c in rec.get("candidates", ())
                                  if c.get("excluded")}},
        ))

    # --- routing uses the history -------------------------------------------------------

    async def prepare_offer(self, cmd: dict) -> None:
        """Before an offer is applied: the caller's history (cache, or one look-up of at
        most ``lookup_timeout_s``); a recent contact marks the command
        ``history_repeat``. Never raises."""
        caller = cmd.get("caller")
        if not caller or self._closed:
            return
        try:
            contacts = await self.recent.lookup(caller)
        except Exception:  # noqa: BLE001 - routing goes on without history
            return
        cid = cmd.get("call_id")
        contacts = [c for c in contacts if c.call_id != cid]
        if not contacts:
            return
        from router.history.recent import is_repeat

        if is_repeat(contacts, time.time(), self.repeat_window_h):
            cmd["history_repeat"] = True
            self.history_repeats += 1
        if self.pop_limit:
            self._pops[cid] = contacts
            while len(self._pops) > POPS_KEPT:
                self._pops.popitem(last=False)

    def screen_pop(self, call: Any, local: list[PastContact]) -> list[PastContact]:
        """The engine's contacts merged with the history's: newest first, one per call
        id (the engine's, with the live outcome, wins), at most screen_pop_history."""
        extra = self._pops.get(call.call_id)
        if extra is None and call.caller:
            extra = self.recent.cached(call.caller)
        if not extra:
            return local
        seen = {c.call_id for c in local}
        merged = list(local)
        for c in extra:
            if c.call_id in seen or c.call_id == call.call_id or c.offered_at > call.offered_at:
                continue
            seen.add(c.call_id)
            merged.append(c)
        merged.sort(key=lambda c: (c.offered_at, c.call_id), reverse=True)
        return merged[: self.pop_limit]

    # --- lifecycle ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        w = self.writer.stats()
        return {"store": self.store.url, "submitted": self.submitted, "inserted": w.inserted,
                "spooled": w.spooled, "spool_files": w.spool_files, "healthy": w.healthy,
                "history_repeats": self.history_repeats, "lookup_hits": self.recent.hits,
                "lookup_misses": self.recent.misses, "lookup_degraded": self.recent.degraded}

    def spool_rows(self) -> int:
        """Rows waiting in the outage spool (0 when it is empty): spooled minus replayed
        since start, at least one per spooled batch (a restart forgets the counts)."""
        w = self.writer.stats()
        if not w.spool_files:
            return 0
        return max(w.spooled - w.replayed, w.spool_files)

    async def aclose(self, timeout: float = 5.0) -> bool:
        """Close agents' open intervals, flush (or spool) and close. True when nothing
        was left in the spool."""
        if self._closed:
            return True
        try:
            for row in self.tracker.checkpoint(seq=int(self.node.durable_seq), at=self.node.view_time()):
                self._submit("agent_state_changes", row)
        except Exception:  # noqa: BLE001
            log.exception("history: checkpoint rows not recorded")
        self._closed = True
        if getattr(self.node, "history", None) is self:
            self.node.history = None
        try:
            ok = await self.writer.aclose(timeout)
        finally:
            if self._recent_store is not None:
                self._recent_store.close()
            self.store.close()
        st = self.writer.stats()
        log.info("history closed: %d rows inserted, %d spooled, %d file(s) left in the spool",
                 st.inserted, st.spooled, st.spool_files)
        return ok
