"""Property tests of the engine: random command streams against the design invariants.

After every command, checked from the engine's views alone (nothing internal):
invariant 1 (every active call in exactly one place), invariant 2 (capacity),
invariant 3 (each call handed to an agent had the best (key, arrival) of the calls that
agent could take at that moment, recomputed by brute force from the configuration),
work conservation, and invariant 8 (a refused command raises RoutingError and leaves
``snapshot()`` unchanged; a command with ``changed=False`` too). At the end: replaying
the changed commands on a fresh engine (the other queue core) gives the same snapshot
after every step, and an engine restored from any step's snapshot ends identically.
"""

from __future__ import annotations

import json
import re

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from router.config import parse_site
from router.engine import Engine
from router.model import AssignmentOffered, RoutingError
from router.pqueue import PyIndexedPQ

try:
    from router.pqueue import IndexedPQ
except ImportError:  # pragma: no cover
    IndexedPQ = None


def make_site(selection: str, blacklist: str):
    routing = {
        "head_start_s": {"standard": 0, "repeat": 4, "whitelist": 8, "vip": 16},
        "agent_selection": selection,
        "offer_timeout_s": 5,
        "repeat_window_h": 0.01,  # 36 s
        "screen_pop_history": 2,
        "ended_call_retention": 100,
        "service_level_window_s": 60,
        "blacklist_action": blacklist,
    }
    if blacklist == "restricted_queue":
        routing["restricted_queue"] = "sales"
    return parse_site({
        "site": {"name": "prop", "region": "r"},
        "routing": routing,
        "queues": [
            {"name": "sales-en", "skill": "sales", "channel": "voice", "language": "en",
             "wrap_up_s": 3, "max_length": 3, "aht_s": 30},
            {"name": "sales", "skill": "sales", "channel": "voice", "wrap_up_s": 0},
            {"name": "help-chat", "skill": "help", "channel": "chat", "wrap_up_s": 2},
        ],
        "lists": {"vip": ["+v"], "whitelist": ["+w"], "blacklist": ["+b"]},
        "agents": [
            {"id": "a1", "skills": {"sales": 5, "help": 3}, "languages": ["en"],
             "capacity": {"voice": 1, "chat": 2}},
            {"id": "a2", "skills": {"sales": 7}, "languages": ["fr"], "capacity": {"voice": 1}},
            {"id": "a3", "skills": {"help": 4}, "languages": ["en", "fr"], "capacity": {"chat": 3}},
            {"id": "a4", "skills": {"sales": 2, "help": 9}, "languages": ["fr"],
             "capacity": {"voice": 1, "chat": 1}, "backoffice": True},
            {"id": "a5", "skills": {"sales": 5, "help": 5}, "languages": ["en", "fr"],
             "capacity": {"voice": 2, "chat": 2}},
        ],
    })  # fmt: skip


SITES = {
    (sel, bl): make_site(sel, bl)
    for sel in ("longest_idle", "most_proficient")
    for bl in ("reject", "restricted_queue")
}
CALL_IDS = [f"c{i}" for i in range(14)]
AGENT_IDS = ["a1", "a2", "a3", "a4", "a5", "zz"]
ACTIVE = ("queued", "assigned", "connected")
CODES = {"INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION"}

# Junk for the malformed-command rule.
junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=70), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from(["voice", "chat", "sales", "help", "c1", "a1", "c1#1", "ready", "en"]),
)  # fmt: skip
FIELDS = ["call_id", "channel", "skill", "language", "caller", "customer_id", "priority_class",
          "context", "reason", "resolved", "csat", "wrap_up_code", "agent_id", "state",
          "timeout_s", "assignment_id", "mode", "backoffice", "announcement", "group", "draining",
          "transfer_no", "target", "partner", "agent", "answered_at", "talk_s", "wrap_s", "disposition",
          "transferred_back", "fencing", "generation", "plan", "moved", "doc", "when_free"]  # fmt: skip
OPS = ["offer", "abandon", "complete", "sign_in", "sign_out", "set_state", "accept", "reject",
       "disconnect", "tick", "set_mode", "move_agent", "set_drain", "launch", "transfer_begin",
       "transfer_abort", "partner_assign", "partner_outcome", "partner_handback", "targets_applied"]  # fmt: skip


def dump(snapshot: dict) -> str:
    return json.dumps(snapshot, sort_keys=True)


class EngineMachine(RuleBasedStateMachine):
    factory = PyIndexedPQ
    other = PyIndexedPQ

    @initialize(variant=st.sampled_from(sorted(SITES)))
    def setup(self, variant):
        self.site = SITES[variant]
        self.engine = Engine(self.site, queue_factory=self.factory)
        self.t = 0.0
        self.cmds: list[dict] = []
        self.snaps = [dump(self.engine.snapshot())]
        hs = {getattr(k, "value", k): v for k, v in self.site.routing.head_start_s.items()}
        self.hs = lambda c: float(hs.get(c, 0.0))
        self.queue_cfg = {q.name: q for q in self.site.queues}
        self.profiles = self.site.agent_profiles()
        self.groups = {g.id: g for g in self.site.agents}

    # -- driving ------------------------------------------------------------------------

    def advance(self, dt: float) -> float:
        self.t = max(0.0, self.t + dt)
        return self.t

    def run(self, cmd) -> None:
        before = self.snaps[-1]
        try:
            out = self.engine.apply(cmd)
        except RoutingError as e:
            assert e.code in CODES, e
            assert re.fullmatch(r"[A-Z][A-Z_]+", e.reason), e
            assert dump(self.engine.snapshot()) == before, f"refused {cmd} changed the state"
            return
        after = dump(self.engine.snapshot())
        if not out.changed:
            assert after == before, f"unchanged {cmd} changed the state"
            assert out.effects == []
            return
        self.check_fairness(out.effects)
        self.cmds.append(cmd)
        self.snaps.append(after)

    dts = st.sampled_from([0.0, 0.5, 1.0, 2.0, 6.0, 40.0, -3.0])

    @rule(cid=st.sampled_from(CALL_IDS), channel=st.sampled_from(["voice", "voice", "chat"]),
          skill=st.sampled_from(["sales", "sales", "help", "nope"]),
          language=st.sampled_from(["", "en", "fr"]),
          caller=st.sampled_from(["", "+1", "+2", "+3", "+v", "+w", "+b"]),
          pclass=st.sampled_from(["", "", "standard", "repeat", "vip", "blacklist"]), dt=dts)  # fmt: skip
    def offer(self, cid, channel, skill, language, caller, pclass, dt):
        if skill == "help":
            channel = "chat"
        self.run({"op": "offer", "t": self.advance(dt), "call_id": cid, "channel": channel,
                  "skill": skill, "language": language, "caller": caller,
                  "priority_class": pclass, "context": {"ivr_path": [skill]}})  # fmt: skip

    @rule(cid=st.sampled_from(CALL_IDS), dt=dts)
    def abandon(self, cid, dt):
        self.run({"op": "abandon", "t": self.advance(dt), "call_id": cid, "reason": "hangup"})

    @rule(data=st.data(), csat=st.sampled_from([0, 4, 9]), dt=dts)
    def complete(self, data, csat, dt):
        live = [c.call_id for c in self.engine.calls("connected")]
        cid = data.draw(st.sampled_from(live * 6 + CALL_IDS[:2]))
        self.run({"op": "complete", "t": self.advance(dt), "call_id": cid, "csat": csat,
                  "resolved": True})  # fmt: skip

    @rule(aid=st.sampled_from(AGENT_IDS), dt=dts,
          action=st.sampled_from(["ready", "ready", "ready", "sign_in", "sign_out", "disconnect"]))  # fmt: skip
    def agent_session(self, aid, dt, action):
        t = self.advance(dt)
        if action == "ready":  # sign in if needed, then ready
            if aid in self.profiles and self.engine.agent(aid).state == "signed_out":
                self.run({"op": "sign_in", "t": t, "agent_id": aid})
            self.run({"op": "set_state", "t": t, "agent_id": aid, "state": "ready"})
        else:
            self.run({"op": action, "t": t, "agent_id": aid})

    @rule(aid=st.sampled_from(AGENT_IDS),
          state=st.sampled_from(["ready", "not_ready", "wrap_up", "signed_out"]),
          reason=st.sampled_from(["", "break", "lunch"]), timeout=st.sampled_from([0, 2.5, 9, 5000]),
          dt=dts)  # fmt: skip
    def set_state(self, aid, state, reason, timeout, dt):
        self.run({"op": "set_state", "t": self.advance(dt), "agent_id": aid, "state": state,
                  "reason": reason, "timeout_s": timeout})  # fmt: skip

    def pick_assignment(self, data, weight: int):
        ringing = [(c.agent_id, c.assignment_id) for c in self.engine.calls("assigned")]
        junk_ = [("a1", "c1#1"), ("a5", "c2#2"), ("zz", "c0#1"), ("a2", "")]
        connected = [(c.agent_id, c.assignment_id) for c in self.engine.calls("connected")]
        return data.draw(st.sampled_from(ringing * weight + junk_ + connected))

    @rule(data=st.data(), dt=dts)
    def accept(self, data, dt):
        aid, asg = self.pick_assignment(data, 12)
        self.run({"op": "accept", "t": self.advance(dt), "agent_id": aid, "assignment_id": asg})

    @rule(data=st.data(), dt=dts)
    def reject(self, data, dt):
        aid, asg = self.pick_assignment(data, 3)
        self.run({"op": "reject", "t": self.advance(dt), "agent_id": aid, "assignment_id": asg,
                  "reason": "busy"})  # fmt: skip

    @rule(dt=st.sampled_from([0.0, 1.0, 3.0, 5.0, 12.0]))
    def tick(self, dt):
        self.run({"op": "tick", "t": self.advance(dt)})

    @rule(mode=st.sampled_from(["normal", "surge", "emergency", "panic"]),
          backoffice=st.booleans(), text=st.sampled_from(["", "Busy.", "x" * 257]), dt=dts)  # fmt: skip
    def set_mode(self, mode, backoffice, text, dt):
        self.run({"op": "set_mode", "t": self.advance(dt), "mode": mode,
                  "backoffice": backoffice, "announcement": text})  # fmt: skip

    @rule(aid=st.sampled_from(AGENT_IDS), data=st.data(), dt=dts,
          when_free=st.sampled_from([None, False, True, True, "yes"]))
    def move_agent(self, aid, data, dt, when_free):
        group = data.draw(st.sampled_from([*sorted(self.groups), "nope", ""]))
        cmd = {"op": "move_agent", "t": self.advance(dt), "agent_id": aid, "group": group}
        if when_free is not None:  # a busy agent's move waits for it to be free
            cmd["when_free"] = when_free
        self.run(cmd)

    @rule(draining=st.sampled_from([True, False, "yes"]), dt=dts)
    def set_drain(self, draining, dt):
        self.run({"op": "set_drain", "t": self.advance(dt), "draining": draining})

    @rule(fencing=st.sampled_from([0, 1, 2, 2, 3, -1]), generation=st.sampled_from([0, 1, 2, 5]),
          moved=st.lists(st.sampled_from([*AGENT_IDS, "nobody"]), max_size=3), dt=dts)  # fmt: skip
    def targets_applied(self, fencing, generation, moved, dt):
        """The rebalancer's targets applied (a lower fencing epoch is refused)."""
        self.run({"op": "targets_applied", "t": self.advance(dt), "fencing": fencing, "generation": generation,
                  "plan": f"p{generation}", "moved": moved})

    @rule(data=st.data(), step=st.sampled_from(["begin", "begin", "assign", "assign", "abort", "outcome",
                                                 "outcome", "handback"]),
          partner=st.sampled_from(["bl", "bl", "other"]), dt=dts)
    def partner(self, data, step, partner, dt):
        """A BPO partner's own ACD (router.engine.partner): offers begun, assigned, aborted;
        outcomes (some invalid, some conflicting) and hand-backs, by the right or a wrong
        partner."""
        e = self.engine
        t = self.advance(dt)
        if step == "begin":
            pool = [c for c in e.calls("queued")] or e.calls()
            if not pool:
                return
            c = data.draw(st.sampled_from(pool))
            self.run({"op": "transfer_begin", "t": t, "call_id": c.call_id,
                      "transfer_no": c.transfer_count + 1, "target": f"partner:{partner}"})
            return
        everything = e.calls()
        out = [c for c in everything if c.state == "transferring" and c.transfer_target.startswith("partner:")]
        owned = [c for c in everything if c.state == "transferred" and c.transfer_target.startswith("partner:")]
        pool = (out if step in ("assign", "abort") else owned) or e.calls()
        if not pool:
            return
        c = data.draw(st.sampled_from(pool))
        if step == "assign":
            self.run({"op": "partner_assign", "t": t, "call_id": c.call_id, "transfer_no": c.transfer_count,
                      "partner": partner, "agent": "x"})
        elif step == "abort":
            self.run({"op": "transfer_abort", "t": t, "call_id": c.call_id, "transfer_no": c.transfer_count,
                      "reason": "declined"})
        elif step == "outcome":
            self.run({"op": "partner_outcome", "t": t, "call_id": c.call_id, "partner": partner,
                      "answered_at": data.draw(st.sampled_from([0.0, t, -1.0])),
                      "talk_s": data.draw(st.sampled_from([0.0, 30.0, float("nan")])),
                      "wrap_s": 5.0, "disposition": "ok", "resolved": True,
                      "csat": data.draw(st.sampled_from([0, 3, 7]))})
        else:
            self.run({"op": "partner_handback", "t": t, "call_id": c.call_id, "partner": partner,
                      "reason": "back"})

    @rule(data=st.data())
    def malformed(self, data):
        cmd = data.draw(st.one_of(
            junk,
            st.fixed_dictionaries(
                {"op": st.sampled_from(OPS), "t": st.one_of(st.just(self.t), junk)},
                optional={f: junk for f in FIELDS},
            ),
        ))  # fmt: skip
        self.run(cmd)

    # -- invariants ---------------------------------------------------------------------

    def profile(self, agent_id: str):
        """The agent's profile now: its group's, which move_agent may have changed."""
        return self.groups[self.engine.agent_group(agent_id)]

    def eligible(self, agent_id: str, queue: str) -> bool:
        g, q = self.profile(agent_id), self.queue_cfg[queue]
        return (
            q.skill in g.skills
            and (q.language is None or q.language in g.languages)
            and g.capacity.get(q.channel, 0) > 0
            # back-office agents: voice/chat only while the mode turns them on
            and (not g.backoffice or self.engine.mode()["backoffice"])
        )

    def cap(self, agent_id: str, channel: str) -> int:
        return {ch.value: n for ch, n in self.profile(agent_id).capacity.items()}.get(channel, 0)

    def order_key(self, call, index: int):
        return (call.queued_at - self.hs(call.priority_class), index)

    @invariant()
    def pending_moves_wait_for_busy_agents(self):
        """A move waiting for its agent (when_free) exists only while the agent holds a
        contact, and goes elsewhere than where the agent is."""
        if not hasattr(self, "engine"):
            return
        for aid, group in self.engine.pending_groups().items():
            assert self.engine.agent(aid).call_ids, f"{aid} is free but its move to {group} waits"
            assert self.engine.agent_group(aid) != group

    @invariant()
    def placement_capacity_and_work_conservation(self):
        if not hasattr(self, "engine"):
            return
        e = self.engine
        calls = e.calls()
        index = {c.call_id: i for i, c in enumerate(calls)}
        by_id = {c.call_id: c for c in calls}
        snap = json.loads(self.snaps[-1])
        # invariant 1: queued calls in exactly their queue, in (key, arrival) order
        in_queues: dict[str, str] = {}
        for name, q in snap["queues"].items():
            for cid in q["order"]:
                assert cid not in in_queues, f"{cid} queued twice"
                in_queues[cid] = name
            expected = sorted(q["order"], key=lambda c: self.order_key(by_id[c], index[c]))
            assert q["order"] == expected
            for pos, cid in enumerate(q["order"], 1):
                assert e.position(cid) == pos
        at_agent: dict[str, str] = {}
        for a in e.agents():
            for cid in a.call_ids:
                assert cid not in at_agent, f"{cid} at two agents"
                at_agent[cid] = a.agent_id
            if a.state == "signed_out":
                assert not a.call_ids
        for c in calls:
            if c.state == "queued":
                assert in_queues.get(c.call_id) == c.queue and c.call_id not in at_agent
                assert c.agent_id == ""
            elif c.state in ("assigned", "connected"):
                assert at_agent.get(c.call_id) == c.agent_id and c.call_id not in in_queues
            else:
                assert c.call_id not in at_agent and c.call_id not in in_queues
        counts = e.counts_by_state()
        for state, n in counts.items():
            assert n == sum(1 for c in calls if c.state == state)
        assert sum(x.length for x in e.queues()) == counts["queued"]
        assert sum(e.agents_by_state().values()) == len(self.profiles)
        # invariant 2 and work conservation
        queued = [c for c in calls if c.state == "queued"]
        for a in e.agents():
            for ch in ("voice", "chat"):
                load = sum(1 for cid in a.call_ids if by_id[cid].channel == ch)
                assert load <= self.cap(a.agent_id, ch), f"{a.agent_id} over capacity on {ch}"
                if a.state == "ready" and load < self.cap(a.agent_id, ch):
                    waiting = [
                        c.call_id
                        for c in queued
                        if c.channel == ch and self.eligible(a.agent_id, c.queue)
                    ]
                    assert not waiting, f"{a.agent_id} idle on {ch} while {waiting} wait"
        # deadlines
        if snap["deadlines"]:
            assert e.next_deadline() == min(d[0] for d in snap["deadlines"])
        else:
            assert e.next_deadline() is None

    def check_fairness(self, effects) -> None:
        """Invariant 3, by brute force over the views after the command."""
        offers = [x for x in effects if isinstance(x, AssignmentOffered)]
        if not offers:
            return
        e = self.engine
        calls = e.calls()
        index = {c.call_id: i for i, c in enumerate(calls)}
        by_id = {c.call_id: c for c in calls}
        # Dispatch runs last in a command and only takes calls out of queues: what it
        # could choose from = still queued + handed out now.
        pool = {c.call_id for c in calls if c.state == "queued"} | {x.call_id for x in offers}
        final_load = {
            a.agent_id: {ch: sum(1 for cid in a.call_ids if by_id[cid].channel == ch)
                         for ch in ("voice", "chat")}
            for a in e.agents()
        }  # fmt: skip
        for i, x in enumerate(offers):
            c = by_id[x.call_id]
            assert c.state == "assigned" and c.agent_id == x.agent_id
            assert e.agent(x.agent_id).state == "ready"
            assert self.eligible(x.agent_id, c.queue)
            later = offers[i:]
            load = {
                ch: n - sum(1 for y in later if y.agent_id == x.agent_id and by_id[y.call_id].channel == ch)
                for ch, n in final_load[x.agent_id].items()
            }  # fmt: skip
            assert load[c.channel] < self.cap(x.agent_id, c.channel)
            mine = self.order_key(c, index[c.call_id])
            for other in pool:
                d = by_id[other]
                if (
                    other != c.call_id
                    and self.eligible(x.agent_id, d.queue)
                    and load[d.channel] < self.cap(x.agent_id, d.channel)
                ):
                    assert mine < self.order_key(d, index[other]), (
                        f"{x.agent_id} got {c.call_id} {mine} while {other} "
                        f"{self.order_key(d, index[other])} waited"
                    )
            pool.discard(c.call_id)

    # -- replay and restore -------------------------------------------------------------

    def teardown(self):
        if not hasattr(self, "engine"):
            return
        fresh = Engine(self.site, queue_factory=self.other)
        assert dump(fresh.snapshot()) == self.snaps[0]
        for k, cmd in enumerate(self.cmds, 1):
            fresh.apply(cmd)
            assert dump(fresh.snapshot()) == self.snaps[k], f"replay differs at step {k}"
        n = len(self.cmds)
        for k in sorted({0, n // 3, n // 2, max(0, n - 1), n}):
            restored = Engine.restore(
                self.site, json.loads(self.snaps[k]), queue_factory=self.factory
            )
            assert dump(restored.snapshot()) == self.snaps[k]
            for cmd in self.cmds[k:]:
                assert restored.apply(cmd).changed
            assert dump(restored.snapshot()) == self.snaps[-1], f"restore at {k} diverged"


SETTINGS = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class PyMachine(EngineMachine):
    factory = PyIndexedPQ
    other = IndexedPQ or PyIndexedPQ


TestEnginePy = PyMachine.TestCase
TestEnginePy.settings = SETTINGS

if IndexedPQ is not None:

    class CMachine(EngineMachine):
        factory = IndexedPQ
        other = PyIndexedPQ

    TestEngineC = CMachine.TestCase
    TestEngineC.settings = SETTINGS
