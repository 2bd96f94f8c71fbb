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
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Any

from router.config import SiteConfig
from router.engine.records import Call

SNAPSHOT_VERSION = 1


class SnapshotMixin:
    def snapshot(self) -> dict:
        """The whole state as a JSON-able dict (fresh lists; serialize it as it is)."""
        by_handle = self._by_handle
        return {
            "version": SNAPSHOT_VERSION,
            "site": self._site_name,
            "now": self._now,
            "next_handle": self._next_handle,
            "calls": [c.row() for c in self._calls.values()],
            "ended": list(self._ended),
            "queues": {
                name: q.dump([by_handle[h].call_id for h, _ in q.pq.items()])
                for name, q in self._queues.items()
            },
            "agents": {aid: a.dump() for aid, a in self._agents.items()},
            "memory": {who: [list(c) for c in cs] for who, cs in self._memory.items()},
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
        e._load_transfers(snapshot.get("transfers"))
        e._load_partner(snapshot.get("partners"))
        heapq.heapify(e._deadlines)
        e._ended = deque(snapshot["ended"])
        fifo = []
        for who, contacts in snapshot["memory"].items():
            e._memory[who] = [list(c) for c in contacts]
            fifo += [(c[1], c[5], who) for c in contacts]
        e._memory_fifo = deque((t, who) for t, _, who in sorted(fifo))
        e._fx = []
        e._dirty_agents = {}
        e._dirty_queues = {}
        got = [list(x) for x in sorted(set(e._deadlines))]
        if got != [list(x) for x in snapshot.get("deadlines", got)]:
            raise ValueError("snapshot deadlines disagree with its calls and agents")
        return e
