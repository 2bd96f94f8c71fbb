"""One call's rows in the history, for ``tandem ctl describe call`` (``Admin.DescribeCall``):
its routing decisions (every site that decided for it: the offer's queue choice, overflow
decisions with their rule, candidates and waits) and its outcome rows (the site that
ended it; an overflowed call has its origin and the site that took it)."""

from __future__ import annotations

import json

from router.history.store import HistoryStore

DECISIONS_SQL = """
SELECT seq, site, toUInt32(at), rule, target_kind, target, candidates, candidate_waits_s,
       expected_wait_s, reason, details
FROM {db}.routing_decisions FINAL
WHERE call_id = {call_id}
ORDER BY at, site, seq
"""

OUTCOME_SQL = """
SELECT site, origin_site, queue, agent_id, outcome, reason, toUInt32(offered_at), toUInt32(answered_at),
       toUInt32(ended_at), wait_s, talk_s, handle_s, csat, resolved, transfer_count
FROM {db}.interactions FINAL
WHERE interaction_id = {call_id}
"""


def _array(v: object) -> list:
    """chdb's CSV gives arrays as text; the server driver gives lists."""
    if isinstance(v, (list, tuple)):
        return list(v)
    if isinstance(v, str) and v.startswith("["):
        try:
            return json.loads(v.replace("'", '"'))
        except ValueError:
            return []
    return []


def call_path(store: HistoryStore, call_id: str) -> list[dict]:
    """Rows of ``call_id``: dicts with ``kind`` "decision" (seq, site, at, rule,
    target_kind, target, candidates, candidate_waits_s, expected_wait_s, reason, details)
    or "outcome" (site, origin_site, queue, agent_id, outcome, reason, offered_at,
    answered_at, ended_at, wait_s, talk_s, handle_s, csat, resolved, transfer_count).
    Times are Unix seconds. Raises the store's errors."""
    out: list[dict] = []
    for r in store.query(DECISIONS_SQL, {"call_id": call_id}):
        out.append({
            "kind": "decision", "seq": int(r[0]), "site": str(r[1]), "at": float(r[2]), "rule": str(r[3]),
            "target_kind": str(r[4]), "target": str(r[5]), "candidates": [str(c) for c in _array(r[6])],
            "candidate_waits_s": [float(w) for w in _array(r[7])], "expected_wait_s": float(r[8]),
            "reason": str(r[9]), "details": str(r[10]),
        })  # fmt: skip
    for r in store.query(OUTCOME_SQL, {"call_id": call_id}):
        out.append({
            "kind": "outcome", "site": str(r[0]), "origin_site": str(r[1]), "queue": str(r[2]),
            "agent_id": str(r[3]), "outcome": str(r[4]), "reason": str(r[5]), "offered_at": float(r[6]),
            "answered_at": float(r[7]), "ended_at": float(r[8]), "at": float(r[8]), "wait_s": float(r[9]),
            "talk_s": float(r[10]), "handle_s": float(r[11]), "csat": int(r[12]), "resolved": bool(int(r[13])),
            "transfer_count": int(r[14]),
        })  # fmt: skip
    return out
