"""The engine's half of transfers between sites (router.engine.transfer): origin commands
(begin / committing / done / abort), target commands (reserve / commit / cancel, expiry),
idempotency, validation, snapshot/restore with transfers in flight, and invariant 1 under
random interleavings of the protocol on two engines (with crashes and lost messages)."""

from __future__ import annotations

import copy
import json
import random

import pytest

from router.config import parse_site
from router.engine import Engine
from router.engine.transfer import TRANSFER_RETENTION
from router.model import RoutingError

SITE = {
    "site": {"name": "origin", "region": "emea"},
    "routing": {
        "head_start_s": {"standard": 0, "repeat": 30, "whitelist": 60, "vip": 120},
        "offer_timeout_s": 10,
        "repeat_window_h": 1,
        "ended_call_retention": 100,
    },
    "queues": [
        {"name": "billing", "skill": "billing", "channel": "voice", "max_length": 5},
        {"name": "support-chat", "skill": "support", "channel": "chat"},
    ],
    "lists": {"vip": ["+vip"], "blacklist": ["+black"]},
    "agents": [{"id": "a", "count": 2, "skills": {"billing": 5, "support": 5}, "capacity": {"voice": 1, "chat": 2}}],
}


def site(name: str):
    d = copy.deepcopy(SITE)
    d["site"]["name"] = name
    return parse_site(d, f"<{name}>")


def engines():
    return Engine(site("origin")), Engine(site("target"))


def offer(e: Engine, cid: str, t: float, **kw):
    cmd = {"op": "offer", "t": t, "call_id": cid, "channel": "voice", "skill": "billing",
           "caller": kw.pop("caller", f"+{cid}"), **kw}
    return e.apply(cmd)


def queue_order(e: Engine, name: str = "billing") -> list[str]:
    return e.snapshot()["queues"][name]["order"]


def reserve_cmd(e: Engine, cid: str, no: int, t: float, **kw) -> dict:
    c = e.call(cid)
    cmd = {"op": "transfer_reserve", "t": t, "call_id": cid, "transfer_no": no, "origin": "origin",
           "channel": c.channel, "skill": c.skill, "language": c.language, "caller": c.caller,
           "customer_id": c.customer_id, "priority_class": c.priority_class,
           "offered_at": c.offered_at, "context": c.context, "ttl_s": 10}
    cmd.update(kw)
    return cmd


def move(o: Engine, t: Engine, cid: str, now: float) -> None:
    """A whole successful transfer of cid from o to t."""
    no = o.call(cid).transfer_count + 1
    o.apply({"op": "transfer_begin", "t": now, "call_id": cid, "transfer_no": no, "target": "T"})
    assert t.apply(reserve_cmd(o, cid, no, now)).result.state == "reserved"
    o.apply({"op": "transfer_committing", "t": now, "call_id": cid, "transfer_no": no})
    assert t.apply({"op": "transfer_commit", "t": now, "call_id": cid, "transfer_no": no}).result.state == "committed"
    o.apply({"op": "transfer_done", "t": now, "call_id": cid, "transfer_no": no})


def refused(e: Engine, cmd: dict) -> str:
    before = json.dumps(e.snapshot(), sort_keys=True)
    with pytest.raises(RoutingError) as ei:
        e.apply(cmd)
    assert json.dumps(e.snapshot(), sort_keys=True) == before
    return ei.value.reason


def test_begin_takes_the_call_out_of_dispatch_and_abort_puts_it_back_in_place():
    o, _ = engines()
    for i, cid in enumerate(["c1", "c2", "c3"]):
        offer(o, cid, 100 + i)
    r = o.apply({"op": "transfer_begin", "t": 110, "call_id": "c2", "transfer_no": 1, "target": "T"})
    assert r.changed and r.result.state == "transferring" and r.result.transfer_count == 1
    assert queue_order(o) == ["c1", "c3"]
    assert o.counts_by_state()["transferring"] == 1
    # an agent freeing up does not get the transferring call
    o.apply({"op": "sign_in", "t": 111, "agent_id": "a-001"})
    o.apply({"op": "set_state", "t": 112, "agent_id": "a-001", "state": "ready"})
    assert o.call("c1").state == "assigned" and o.call("c2").state == "transferring"
    again = o.apply({"op": "transfer_begin", "t": 113, "call_id": "c2", "transfer_no": 1, "target": "T"})
    assert not again.changed
    r = o.apply({"op": "transfer_abort", "t": 114, "call_id": "c2", "transfer_no": 1, "reason": "declined"})
    assert r.result.state == "queued" and r.result.transfer_phase == "aborted"
    assert queue_order(o) == ["c2", "c3"]  # back ahead of c3, where it was
    assert not o.apply({"op": "transfer_abort", "t": 115, "call_id": "c2", "transfer_no": 1}).changed
    # the next attempt needs the next number
    assert refused(o, {"op": "transfer_begin", "t": 116, "call_id": "c2", "transfer_no": 1, "target": "T"}) == "TRANSFER_NO_MISMATCH"
    o.apply({"op": "transfer_begin", "t": 116, "call_id": "c2", "transfer_no": 2, "target": "T"})


def test_origin_validation():
    o, _ = engines()
    offer(o, "c1", 100)
    offer(o, "bl", 100, caller="+black")  # rejected
    base = {"op": "transfer_begin", "t": 101, "call_id": "c1", "target": "T"}
    assert refused(o, {**base, "transfer_no": 0}) == "INVALID_TRANSFER_NO"
    assert refused(o, {**base, "transfer_no": True}) == "INVALID_TRANSFER_NO"
    assert refused(o, {**base, "transfer_no": 1, "target": ""}) == "MISSING_FIELD"
    assert refused(o, {**base, "transfer_no": 2}) == "TRANSFER_NO_MISMATCH"
    assert refused(o, {**base, "call_id": "nope", "transfer_no": 1}) == "CALL_NOT_FOUND"
    assert refused(o, {**base, "call_id": "bl", "transfer_no": 1}) == "WRONG_STATE"
    assert refused(o, {"op": "transfer_done", "t": 101, "call_id": "c1", "transfer_no": 1}) == "WRONG_STATE"
    o.apply({**base, "transfer_no": 1})
    # done needs committing first; abort is refused once committing (the target decides)
    assert refused(o, {"op": "transfer_done", "t": 102, "call_id": "c1", "transfer_no": 1}) == "TRANSFER_NOT_COMMITTING"
    o.apply({"op": "transfer_committing", "t": 102, "call_id": "c1", "transfer_no": 1})
    assert not o.apply({"op": "transfer_committing", "t": 102, "call_id": "c1", "transfer_no": 1}).changed
    assert refused(o, {"op": "transfer_abort", "t": 103, "call_id": "c1", "transfer_no": 1}) == "TRANSFER_COMMITTING"
    assert refused(o, {"op": "transfer_abort", "t": 103, "call_id": "c1", "transfer_no": 2, "by_target": True}) == "TRANSFER_NO_MISMATCH"
    r = o.apply({"op": "transfer_abort", "t": 103, "call_id": "c1", "transfer_no": 1, "by_target": True, "reason": "expired"})
    assert r.result.state == "queued"


def test_a_committed_transfer_keeps_arrival_and_class_at_the_target():
    o, t = engines()
    offer(t, "t-early", 100)
    offer(o, "vip", 105, caller="+vip", context={"ivr_path": ["menu", "2"], "bot_transcript": "hi", "attributes": {"k": "v"}})
    offer(o, "std", 106)
    offer(t, "t-mid", 107)
    offer(t, "t-late", 150)
    move(o, t, "std", 200)
    move(o, t, "vip", 201)
    # vip: key 105 - 120 = -15 (first); std: arrival 106 (between t-early and t-mid)
    assert queue_order(t) == ["vip", "t-early", "std", "t-mid", "t-late"]
    v = t.call("vip")
    assert v.priority_class == "vip" and v.offered_at == 105 and v.queued_at == 201
    assert v.transfer_count == 1 and v.transfer_origin == "origin"
    assert v.context == {"ivr_path": ["menu", "2"], "bot_transcript": "hi", "attributes": {"k": "v"}}
    oc = o.call("vip")
    assert oc.state == "transferred" and oc.transfer_target == "T" and oc.ended_at == 201
    assert o.counts_by_state()["transferred"] == 2 and queue_order(o) == []
    # the agent who answers sees the context
    t.apply({"op": "sign_in", "t": 300, "agent_id": "a-001"})
    t.apply({"op": "set_state", "t": 301, "agent_id": "a-001", "state": "ready"})
    assert t.call("vip").state == "assigned" and t.call("vip").context["bot_transcript"] == "hi"
    # idempotent repeats on both sides
    assert not t.apply({"op": "transfer_commit", "t": 302, "call_id": "vip", "transfer_no": 1}).changed
    assert t.apply({"op": "transfer_cancel", "t": 302, "call_id": "vip", "transfer_no": 1}).result.state == "committed"
    assert t.apply(reserve_cmd(o, "vip", 1, 302)).result.state == "committed"
    assert not o.apply({"op": "transfer_done", "t": 303, "call_id": "vip", "transfer_no": 1}).changed


def test_target_validation_and_decline_reasons():
    o, t = engines()
    for i in range(5):
        offer(o, f"c{i}", 100 + i)
    cmd = reserve_cmd(o, "c0", 1, 110)
    assert refused(t, {**cmd, "skill": "nothing"}) == "UNKNOWN_SKILL"
    assert refused(t, {**cmd, "priority_class": "blacklist"}) == "INVALID_PRIORITY_CLASS"
    assert refused(t, {**cmd, "offered_at": "x"}) == "INVALID_FIELD"
    assert refused(t, {**cmd, "origin": ""}) == "MISSING_FIELD"
    assert refused(t, {**cmd, "ttl_s": -1}) == "INVALID_TTL"
    assert refused(t, {**cmd, "context": {"bad": 1}}) == "INVALID_FIELD"
    assert refused(t, {"op": "transfer_commit", "t": 110, "call_id": "c0", "transfer_no": 1}) == "TRANSFER_NOT_FOUND"
    # reservations count against max_length (5)
    offer(t, "here1", 100)
    offer(t, "here2", 100)
    for i in range(3):
        assert t.apply(reserve_cmd(o, f"c{i}", 1, 110)).result.state == "reserved"
    assert refused(t, reserve_cmd(o, "c3", 1, 110)) == "QUEUE_FULL"
    assert refused(t, {**reserve_cmd(o, "c0", 1, 110), "skill": "support", "channel": "chat"}) == "TRANSFER_CONFLICT"
    # a call of that id live here
    assert refused(t, reserve_cmd(o, "c0", 1, 110, call_id="here1")) == "CALL_ID_CONFLICT"


def test_reservation_expires_by_tick_or_at_commit_and_then_never_commits():
    o, t = engines()
    offer(o, "c1", 100)
    offer(o, "c2", 100)
    t.apply(reserve_cmd(o, "c1", 1, 110, ttl_s=5))
    t.apply(reserve_cmd(o, "c2", 1, 110, ttl_s=5))
    assert t.next_deadline() == 115
    assert not t.apply({"op": "tick", "t": 114.9}).changed
    assert t.apply({"op": "tick", "t": 115}).changed
    assert t.transfer("c1", 1).state == "aborted" and t.transfer("c1", 1).reason == "expired"
    r = t.apply({"op": "transfer_commit", "t": 116, "call_id": "c1", "transfer_no": 1})
    assert r.result.state == "aborted" and not r.changed
    with pytest.raises(RoutingError):
        t.call("c1")
    # expiry noticed by the commit itself (no tick in between)
    t2 = Engine(site("target"))
    t2.apply(reserve_cmd(o, "c2", 1, 110, ttl_s=5))
    r = t2.apply({"op": "transfer_commit", "t": 115, "call_id": "c2", "transfer_no": 1})
    assert r.changed and r.result.state == "aborted" and r.result.reason == "expired"
    assert t2.snapshot()["queues"]["billing"]["order"] == []


def test_cancel_before_propose_leaves_a_tombstone():
    o, t = engines()
    offer(o, "c1", 100)
    r = t.apply({"op": "transfer_cancel", "t": 101, "call_id": "c1", "transfer_no": 1, "origin": "origin"})
    assert r.changed and r.result.state == "aborted"
    r = t.apply(reserve_cmd(o, "c1", 1, 102))
    assert not r.changed and r.result.state == "aborted"
    assert t.transfer("c1", 2).state == "unknown"
    # the next number may still reserve
    assert t.apply(reserve_cmd(o, "c1", 2, 103)).result.state == "reserved"
    r = t.apply({"op": "transfer_cancel", "t": 104, "call_id": "c1", "transfer_no": 2})
    assert r.result.state == "aborted" and r.result.reason == "aborted_by_origin"
    assert t.next_deadline() is None


def test_abandon_while_transferring_and_after():
    o, t = engines()
    offer(o, "c1", 100)
    offer(o, "c2", 100)
    for cid in ("c1", "c2"):
        o.apply({"op": "transfer_begin", "t": 101, "call_id": cid, "transfer_no": 1, "target": "T"})
    r = o.apply({"op": "abandon", "t": 102, "call_id": "c1", "reason": "hangup"})
    assert r.changed and r.result.state == "transferring" and r.result.abandon_pending == 1
    assert not o.apply({"op": "abandon", "t": 102, "call_id": "c1", "reason": "hangup"}).changed
    # aborted: the abandon happens here
    r = o.apply({"op": "transfer_abort", "t": 103, "call_id": "c1", "transfer_no": 1})
    assert r.result.state == "abandoned" and r.result.abandon_reason == "hangup"
    assert "c1" not in o.transfers_pending()
    # committed: the node must forward it to the target
    o.apply({"op": "abandon", "t": 104, "call_id": "c2", "reason": "hangup"})
    o.apply({"op": "transfer_committing", "t": 104, "call_id": "c2", "transfer_no": 1})
    r = o.apply({"op": "transfer_done", "t": 105, "call_id": "c2", "transfer_no": 1})
    assert r.result.state == "transferred" and o.transfers_pending() == ["c2"]
    o2 = Engine.restore(site("origin"), json.loads(json.dumps(o.snapshot())))
    assert o2.transfers_pending() == ["c2"]
    r = o.apply({"op": "transfer_forwarded", "t": 106, "call_id": "c2"})
    assert r.changed and o.transfers_pending() == []
    assert not o.apply({"op": "abandon", "t": 107, "call_id": "c2", "reason": "again"}).changed


def test_a_call_can_move_back_and_forth():
    o, t = engines()
    offer(o, "c1", 100)
    move(o, t, "c1", 110)
    move(t, o, "c1", 120)
    c = o.call("c1")
    assert c.state == "queued" and c.transfer_count == 2 and c.offered_at == 100
    assert t.call("c1").state == "transferred"
    assert o.counts_by_state()["transferred"] == 0 and o.counts_by_state()["queued"] == 1
    assert queue_order(o) == ["c1"]
    assert "c1" not in o.snapshot()["ended"]
    move(o, t, "c1", 130)
    assert t.call("c1").transfer_count == 3 and queue_order(t) == ["c1"]


def test_snapshot_restore_with_transfers_in_flight():
    o, t = engines()
    for i in range(4):
        offer(o, f"c{i}", 100 + i)
    o.apply({"op": "transfer_begin", "t": 110, "call_id": "c1", "transfer_no": 1, "target": "T"})
    o.apply({"op": "transfer_begin", "t": 110, "call_id": "c2", "transfer_no": 1, "target": "T"})
    o.apply({"op": "transfer_committing", "t": 111, "call_id": "c2", "transfer_no": 1})
    t.apply(reserve_cmd(o, "c1", 1, 111, ttl_s=5))
    t.apply(reserve_cmd(o, "c2", 1, 111))
    t.apply({"op": "transfer_commit", "t": 112, "call_id": "c2", "transfer_no": 1})
    t.apply({"op": "transfer_cancel", "t": 112, "call_id": "zz", "transfer_no": 3})
    snaps = {name: json.loads(json.dumps(e.snapshot())) for name, e in (("origin", o), ("target", t))}
    o2 = Engine.restore(site("origin"), snaps["origin"])
    t2 = Engine.restore(site("target"), snaps["target"])
    assert o2.snapshot() == o.snapshot() and t2.snapshot() == t.snapshot()
    assert t2.next_deadline() == 116
    rest = [
        (o, {"op": "transfer_abort", "t": 120, "call_id": "c1", "transfer_no": 1}),
        (o, {"op": "transfer_done", "t": 120, "call_id": "c2", "transfer_no": 1}),
        (t, {"op": "tick", "t": 120}),
    ]
    for e, cmd in rest:
        e.apply(cmd)
        (o2 if e is o else t2).apply(cmd)
    assert o2.snapshot() == o.snapshot() and t2.snapshot() == t.snapshot()
    assert queue_order(o2) == ["c0", "c1", "c3"]
    assert t2.transfer("c1", 1).state == "aborted"


def test_old_snapshot_rows_without_transfer_fields_restore():
    o, _ = engines()
    offer(o, "c1", 100)
    snap = o.snapshot()
    snap["calls"] = [row[:-5] for row in snap["calls"]]
    del snap["transfers"]
    o2 = Engine.restore(site("origin"), snap)
    assert o2.call("c1").transfer_phase == "" and o2.call("c1").abandon_pending == 0


def test_decided_keys_are_retained_up_to_a_bound(monkeypatch):
    import router.engine.transfer as et

    monkeypatch.setattr(et, "TRANSFER_RETENTION", 3)
    _, t = engines()
    for i in range(5):
        t.apply({"op": "transfer_cancel", "t": 100 + i, "call_id": f"c{i}", "transfer_no": 1})
    assert [t.transfer(f"c{i}", 1).state for i in range(5)] == ["unknown"] * 2 + ["aborted"] * 3
    assert TRANSFER_RETENTION >= 10_000


# --- invariant 1 under random interleavings ----------------------------------------------

ACTIVE = ("queued", "assigned", "connected")


class World:
    """Two engines exchanging transfer messages in both directions through a lossy,
    reordering network, with random crashes (restore from a snapshot + replay) that lose
    every message in flight. Origins follow the driver's rules: abort unilaterally only
    before committing; after committing, only the target's answer resolves."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.e = {"a": Engine(site("a")), "b": Engine(site("b"))}
        self.t = 1000.0
        self.net: list[tuple[str, str, dict]] = []  # (to, kind, payload)
        self.calls: list[str] = []
        self.n = 0

    def other(self, s: str) -> str:
        return "b" if s == "a" else "a"

    def apply(self, s: str, cmd: dict):
        cmd["t"] = self.t
        try:
            return self.e[s].apply(cmd).result
        except RoutingError:
            return None

    def step(self) -> None:
        rng = self.rng
        self.t += rng.choice([0.0, 0.2, 1.0])
        r = rng.random()
        s = rng.choice("ab")
        e = self.e[s]
        if r < 0.12:
            cid = f"c{self.n}"
            self.n += 1
            if self.apply(s, {"op": "offer", "call_id": cid, "channel": "voice", "skill": "billing"}):
                self.calls.append(cid)  # (a full queue refuses it)
        elif r < 0.3:  # begin a transfer of a queued call, propose it
            queued = [c.call_id for c in e.calls("queued")]
            if queued:
                cid = rng.choice(queued)
                no = e.call(cid).transfer_count + 1
                if self.apply(s, {"op": "transfer_begin", "call_id": cid, "transfer_no": no, "target": self.other(s)}):
                    self.net.append((self.other(s), "propose", reserve_cmd(e, cid, no, self.t, origin=s, ttl_s=15)))
        elif r < 0.6 and self.net:  # deliver (or lose) a message
            to, kind, p = self.net.pop(rng.randrange(len(self.net)))
            if rng.random() < 0.1:
                return
            self.deliver(to, kind, p)
        elif r < 0.75:  # an origin resolves a transferring call on its own
            for c in e.calls("transferring"):
                if rng.random() < 0.5:
                    continue
                key = {"call_id": c.call_id, "transfer_no": c.transfer_count}
                if c.transfer_phase == "begun" and rng.random() < 0.5:
                    self.apply(s, {"op": "transfer_abort", **key})  # never sent commit
                    self.net.append((c.transfer_target, "cancel", key))
                elif c.transfer_phase == "begun":
                    self.net.append((c.transfer_target, "get", {**key, "from": s}))
                else:  # committing: ask again (recovery resends Commit)
                    self.net.append((c.transfer_target, "commit", {**key, "from": s}))
        elif r < 0.8:  # agents take calls
            for a in e.agents():
                if a.state == "signed_out":
                    self.apply(s, {"op": "sign_in", "agent_id": a.agent_id})
                self.apply(s, {"op": "set_state", "agent_id": a.agent_id, "state": "ready"})
        elif r < 0.85:
            self.apply(s, {"op": "tick"})
        elif r < 0.9:  # crash: restore from the snapshot (as if replayed); the network loses all
            self.e[s] = Engine.restore(site(s), json.loads(json.dumps(e.snapshot())))
            self.net = [m for m in self.net if m[0] != s]
        elif r < 0.95:
            cs = [c.call_id for c in e.calls("transferring")]
            if cs:
                self.apply(s, {"op": "abandon", "call_id": rng.choice(cs), "reason": "hangup"})

    def deliver(self, to: str, kind: str, p: dict) -> None:
        origin = self.other(to)
        key = {"call_id": p["call_id"], "transfer_no": p["transfer_no"]}
        if kind == "propose":
            v = self.apply(to, dict(p))
            st = v.state if v else "declined"
            self.net.append((origin, "proposed", {**key, "state": st}))
        elif kind == "proposed":
            c = self.e[to].call(p["call_id"])
            if c.state != "transferring" or c.transfer_count != p["transfer_no"]:
                return
            if p["state"] == "reserved" and c.transfer_phase in ("begun", "committing"):
                self.apply(to, {"op": "transfer_committing", **key})
                self.net.append((origin, "commit", key))
            elif p["state"] in ("declined", "aborted") and c.transfer_phase == "begun":
                self.apply(to, {"op": "transfer_abort", **key})
        elif kind == "commit":
            v = self.apply(to, {"op": "transfer_commit", **key})
            self.net.append((origin, "outcome", {**key, "state": v.state if v else "unknown"}))
        elif kind == "cancel":
            self.apply(to, {"op": "transfer_cancel", **key, "origin": origin})
        elif kind == "get":
            self.net.append((origin, "outcome", {**key, "state": self.e[to].transfer(**key).state}))
        elif kind == "outcome":
            c = self.e[to].call(p["call_id"])
            if c.state != "transferring" or c.transfer_count != p["transfer_no"]:
                return
            if p["state"] == "committed":
                self.apply(to, {"op": "transfer_committing", **key})
                self.apply(to, {"op": "transfer_done", **key})
            elif p["state"] == "aborted":
                self.apply(to, {"op": "transfer_abort", **key, "by_target": True})

    def check(self) -> None:
        """Invariant 1: every call is owned by exactly one site. A site owns a call it
        holds active, or transferring while the target has not committed that key."""
        for cid in self.calls:
            owners, agents = [], []
            for s, e in self.e.items():
                try:
                    c = e.call(cid)
                except RoutingError:
                    continue
                if c.state in ACTIVE:
                    owners.append(s)
                    if c.agent_id:
                        agents.append(c.agent_id)
                elif c.state == "transferring":
                    st = self.e[self.other(s)].transfer(cid, c.transfer_count).state
                    if st != "committed":
                        owners.append(s)
                elif c.state == "transferred":
                    assert self.e[self.other(s)].transfer(cid, c.transfer_count).state == "committed", cid
            ended = any(
                self.e[s].call(cid).state in ("abandoned", "completed", "rejected")
                for s in self.e if cid in {c.call_id for c in self.e[s].calls()}
            )
            assert len(owners) == 1 or (not owners and ended), (cid, owners)
            assert len(agents) <= 1

    def settle(self) -> None:
        """Deliver everything, resolve every transferring call, as recovery would."""
        for _ in range(200):
            while self.net:
                self.deliver(*self.net.pop(0))
            pending = [(s, c) for s, e in self.e.items() for c in e.calls("transferring")]
            if not pending:
                return
            self.t += 70  # past every reservation's TTL
            for s, c in pending:
                key = {"call_id": c.call_id, "transfer_no": c.transfer_count}
                if c.transfer_phase == "begun":
                    self.apply(s, {"op": "transfer_abort", **key})
                    self.net.append((c.transfer_target, "cancel", key))
                else:
                    self.net.append((c.transfer_target, "commit", key))
        raise AssertionError("transfers did not settle")


@pytest.mark.parametrize("seed", range(20))
def test_invariant_1_under_random_interleavings(seed):
    w = World(random.Random(seed))
    for _ in range(300):
        w.step()
        w.check()
    w.settle()
    w.check()
    # nothing left transferring or reserved; every committed key has its transferred origin
    for s, e in w.e.items():
        assert e.calls("transferring") == []
        w.apply(s, {"op": "tick"})
        assert all(e.transfer(*k.split("/")[:1], int(k.split("/")[1])).state != "reserved" for k in e._xin)
    for s, e in w.e.items():  # committed at the target iff transferred (or moved on) at the origin
        for k, r in e._xin.items():
            cid, no = k.rsplit("/", 1)
            c = w.e[w.other(s)].call(cid)
            if r["state"] == "committed":
                assert c.transfer_count > int(no) or c.state == "transferred", (k, c)
            else:
                assert c.transfer_count != int(no) or c.transfer_phase == "aborted", (k, c)
    n_moved = sum(1 for e in w.e.values() for c in e.calls() if c.state == "transferred")
    assert n_moved or seed % 4, "the random walk should commit some transfers"
