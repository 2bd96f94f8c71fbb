"""Snapshot and restore of the engine state (part of :class:`router.engine.Engine`).

A snapshot is a JSON-able dict holding everything the engine needs to continue exactly
as before: calls (rows of :attr:`Call.FIELDS`, offer order), queue order (call ids in
service order), per-queue counters, AHT, abandonment statistics (``patience``; absent
in older snapshots, which restore with none learned yet) and service-level window,
agents, repeat-caller memory, pending deadlines, the ended-call retention order, id
counters, the contingency mode (``set_mode``; absent in older snapshots, which restore as normal)
the rebalancer's targets last applied (``targets_applied``) and the agent moves waiting
for a free agent (``pending_groups``); both absent in older snapshots, which restore with
none. Derived
indexes (heaps, free-agent sets, staffed slots) are rebuilt on restore. Restoring a
snapshot and applying the same commands gives the same states as the original engine.

Capture without a stall (issue 14): :meth:`SnapshotMixin.snapshot_parts` is what the node
uses. It copies on the caller's thread only references (the calls in offer order, the
ended ids, the repeat-caller memory, the service-level windows: C-speed list and dict
copies) and the rows of the *live* calls (``Engine._live``: any state but completed,
abandoned, rejected). A call in one of those three states is never changed again (a
transfer that brings its id back makes a new ``Call``), repeat-caller contacts and window
entries are immutable tuples replaced rather than changed, so the rest can be turned
into rows and JSON later, in another thread, and still be the state at the cut
(:class:`CallRows`; tests/test_scale_snapshot.py checks both).
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Any, Iterator

from router.config import SiteConfig
from router.engine.core import FROZEN_STATES
from router.engine.records import Call, _row

SNAPSHOT_VERSION = 1


def _dump_queue(q: Any, order: list[str]) -> dict:
    """``Queue.dump`` with its service-level window as a list of the window's own
    (immutable) tuples, not list copies: O(1) Python work per entry instead of a list
    each. The window is lent out empty while dump runs, so every other field stays
    Queue.dump's."""
    window = q.window
    q.window = ()
    try:
        d = q.dump(order)
    finally:
        q.window = window
    d["window"] = list(window)
    return d


class CallRows:
    """The snapshot's ``calls`` (rows of :attr:`Call.FIELDS`, offer order) captured at a
    cut without copying every call: live calls' rows were taken at the cut, frozen
    calls (``core.FROZEN_STATES``, never changed again) are read when encoded.

    Contract for the encoder (:meth:`router.journal.Journal.compact`, ``handed_over``):
    ``json_slices()`` yields lists of rows (tuples) that together are the JSON array, and
    may run in another thread while the engine goes on: it reads only frozen calls and
    the ids of live ones. ``len()`` is the number of rows.
    """

    __slots__ = ("_calls", "_live_rows", "slice_size")

    def __init__(self, calls: list[Call], live_rows: dict[str, tuple], slice_size: int = 32) -> None:
        self._calls = calls
        self._live_rows = live_rows
        self.slice_size = slice_size

    def __len__(self) -> int:
        return len(self._calls)

    def json_slices(self) -> Iterator[list[tuple]]:
        live, calls, n = self._live_rows, self._calls, self.slice_size
        for i in range(0, len(calls), n):
            yield [live.get(c.call_id) or _row(c) for c in calls[i:i + n]]

    def rows(self) -> list[list]:
        """Every row as a fresh list (the plain snapshot's form)."""
        return [list(r) for part in self.json_slices() for r in part]


class SnapshotMixin:
    def snapshot(self) -> dict:
        """The whole state as a JSON-able dict (fresh lists; serialize it as it is)."""
        head, shared = self.snapshot_parts()
        head["calls"] = shared["calls"].rows()
        head["ended"] = shared["ended"]
        head["memory"] = {who: [list(c) for c in cs] for who, cs in shared["memory"].items()}
        for name, q in head["queues"].items():
            q["window"] = [list(x) for x in q["window"]]
        return head

    def snapshot_parts(self) -> tuple[dict, dict]:
        """The state at this instant, for a snapshot written while the engine goes on:
        ``(head, shared)``. ``head`` is a JSON-able dict of fresh objects; ``shared`` holds
        the big parts — ``calls`` (a :class:`CallRows`), ``ended`` (a fresh list) and
        ``memory`` (a fresh dict of immutable tuples) — whose contents the engine never
        changes afterwards, so another thread may encode them later; ``head["queues"]``
        windows are fresh lists of immutable tuples too. Their JSON, merged into
        ``head``, is :meth:`snapshot`'s.

        Work here, on the caller's thread, is copies of references (C loops over the
        calls, ended ids and callers) plus a row per *live* call (queued, ringing,
        connected, in transfer): no per-call Python work for retained finished calls.
        """
        by_handle = self._by_handle
        calls = list(self._calls.values())
        live = self._live
        if len(live) != len(calls) - sum(self._call_counts[s] for s in FROZEN_STATES):
            # cannot happen (_set_call_state keeps both); never trust a stale index
            live = self._live = {c.call_id: c for c in calls if c.state not in FROZEN_STATES}
        live_rows = dict(zip(live, map(_row, live.values())))
        head = {
            "version": SNAPSHOT_VERSION,
            "site": self._site_name,
            "now": self._now,
            "next_handle": self._next_handle,
            "queues": {
                name: _dump_queue(q, [by_handle[h].call_id for h, _ in q.pq.items()])
                for name, q in self._queues.items()
            },
            "agents": {aid: a.dump() for aid, a in self._agents.items()},
            "transfers": self._dump_transfers(),
            "partners": self._dump_partner(),  # absent in old snapshots: none
            "mode": self.mode(),  # contingency mode; absent in old snapshots: normal
            # operator actions (router.engine.staffing); absent in old snapshots: none
            "groups": self.moved_groups(),
            "drained": self._drained,
            # rebalancer targets applied (router.engine.staffing); absent in old snapshots: none
            "targets": self.targets_applied(),
            "pending_groups": self.pending_groups(),  # absent in old snapshots: none
            # Derived from calls and agents, listed for readers (and checked on restore).
            "deadlines": [
                list(e) for e in sorted({e for e in self._deadlines if self._deadline_live(e)})
            ],
        }
        shared = {
            "calls": CallRows(calls, live_rows),
            "ended": list(self._ended),
            "memory": dict(self._memory),
        }
        return head, shared

    @classmethod
    def restore(cls, site: SiteConfig, snapshot: dict, *, queue_factory: Any = None):
        """An engine continuing from ``snapshot`` (taken with the same site config)."""
        if snapshot.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported snapshot version {snapshot.get('version')!r}")
        if snapshot.get("site") != site.site.name:
            raise ValueError(
                f"snapshot of site {snapshot.get('site')!r} cannot restore site {site.site.name!r}"
            )
        e = cls(site, queue_factory=queue_factory)
        e._now = float(snapshot["now"])
        mode = snapshot.get("mode") or {}
        e._mode_name = mode.get("mode", "normal")
        e._announcement = mode.get("announcement", "")
        if mode.get("backoffice", False):  # before the agents: their queue lists change
            e._switch_backoffice(True)
        for aid, group in (snapshot.get("groups") or {}).items():  # before states: counters
            e._regroup(e._agents[aid], group)
        e._drained = bool(snapshot.get("drained", False))
        e._load_targets(snapshot.get("targets"))
        e._pending_group = dict(snapshot.get("pending_groups") or {})
        e._dirty_agents = {}
        e._next_handle = int(snapshot["next_handle"])
        for row in snapshot["calls"]:
            c = Call.from_row(list(row))
            ctx = c.context
            c.context = {
                "ivr_path": list(ctx["ivr_path"]),
                "bot_transcript": ctx["bot_transcript"],
                "attributes": dict(ctx["attributes"]),
            }
            e._calls[c.call_id] = c
            e._call_counts[c.state] += 1
            if c.state not in FROZEN_STATES:
                e._live[c.call_id] = c
            if c.state == "assigned":
                e._ringing[c.assignment_id] = c
                e._deadlines.append((c.offer_deadline, 0, c.assignment_id))
        for name, d in snapshot["queues"].items():
            q = e._queues[name]
            q.load(d)
            for cid in d["order"]:
                c = e._calls[cid]
                q.pq.push(c.handle, c.key)
                q.age.push(c.handle, c.queued_at)
                hs = e._hs[c.priority_class]
                q.head_starts[hs] = q.head_starts.get(hs, 0) + 1
                e._by_handle[c.handle] = c
        for aid, d in snapshot["agents"].items():
            a = e._agents[aid]
            if d["state"] != "signed_out":
                e._set_agent_state(a, d["state"], d["reason"], d["state_since"])
            a.reason = d["reason"]
            a.state_since = d["state_since"]
            a.wrap_up_until = d["wrap_up_until"]
            a.available_since = d["available_since"]
            a.calls = dict.fromkeys(d["calls"])
            for cid in a.calls:
                a.load[e._calls[cid].channel] += 1
            if a.state == "wrap_up":
                e._deadlines.append((a.wrap_up_until, 1, aid))
            e._refresh(a)
        for q in e._queues.values():  # available_since was set after the agents got free
            e._free_heap_rebuild(q)
        e._load_transfers(snapshot.get("transfers"))
        e._load_partner(snapshot.get("partners"))
        heapq.heapify(e._deadlines)
        e._ended = deque(snapshot["ended"])
        fifo = []
        for who, contacts in snapshot["memory"].items():
            e._memory[who] = tuple(tuple(c) for c in contacts)
            fifo += [(c[1], c[5], who) for c in contacts]
        e._memory_fifo = deque((t, who) for t, _, who in sorted(fifo))
        e._fx = []
        e._dirty_agents = {}
        e._dirty_queues = {}
        got = [list(x) for x in sorted(set(e._deadlines))]
        if got != [list(x) for x in snapshot.get("deadlines", got)]:
            raise ValueError("snapshot deadlines disagree with its calls and agents")
        return e
