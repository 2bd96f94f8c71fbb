"""Synthetic history rows (seeded, deterministic) for tests, benchmarks and demos.

The rows look like what a small cluster writes: three sites (two in-house, one partner),
a few queues per site, every outcome, repeat callers (so FCR has work), CSAT on some
calls, agents moving through ready / busy / wrap-up / not-ready.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

SITES = (
    # name, region, partner?, queues (name, skill, channel, language)
    ("lyon", "emea", False, (("billing-fr-voice", "billing", "voice", "fr"),
                             ("support-chat", "support", "chat", ""),
                             ("sales-voice", "sales", "voice", ""))),
    ("montreal", "amer", False, (("billing-en-voice", "billing", "voice", "en"),
                                 ("support-en-voice", "support", "voice", "en"),
                                 ("support-chat", "support", "chat", ""))),
    ("callpro", "apac", True, (("billing-en-voice", "billing", "voice", "en"),
                               ("support-chat", "support", "chat", ""))),
)
ORIGINS = {"callpro": (("lyon", "emea"), ("montreal", "amer"))}


def interactions(n: int, *, seed: int = 1, start: int = 1_790_000_000, span_s: int = 86_400,
                 callers: int | None = None, prefix: str = "c") -> list[dict[str, Any]]:
    """``n`` interaction rows offered over ``span_s`` seconds from ``start``; callers are
    drawn from a pool of ``callers`` (default n // 3) so repeats happen."""
    rnd = random.Random(seed)
    pool = callers or max(1, n // 3)
    out = []
    for i in range(n):
        site, region, is_partner, queues = rnd.choice(SITES)
        qname, skill, channel, lang = rnd.choice(queues)
        offered = start + rnd.randrange(span_s)
        queued = offered + rnd.choice((0, 0, 1))
        who = rnd.randrange(pool)
        caller = f"+3361{who:07d}"
        customer = f"cust{who}" if who % 3 == 0 else ""
        r = rnd.random()
        outcome = "completed" if r < 0.8 else "abandoned" if r < 0.95 else "rejected"
        wait = round(rnd.expovariate(1 / 25.0), 3) if outcome != "rejected" else 0.0
        answered = queued + wait if outcome == "completed" else 0.0
        talk = round(rnd.uniform(30, 600), 3) if outcome == "completed" else 0.0
        wrap = 15.0 if outcome == "completed" else 0.0
        ended = (answered + talk) if outcome == "completed" else (queued + wait if outcome == "abandoned" else offered)
        if is_partner:
            o_site, o_region = rnd.choice(ORIGINS[site])
        else:
            o_site, o_region = site, region
        out.append({
            "interaction_id": f"{prefix}{i}",
            "ver": int(ended * 1000),
            "site": site, "region": region, "partner": site if is_partner else "",
            "origin_site": o_site, "origin_region": o_region,
            "queue": qname if outcome != "rejected" else "",
            "skill": skill, "channel": channel, "language": lang,
            "priority_class": rnd.choice(("standard", "standard", "standard", "repeat", "vip")),
            "caller": caller, "customer_id": customer,
            "agent_id": f"{site}-{rnd.randrange(1, 20):03d}" if outcome == "completed" else "",
            "outcome": outcome,
            "reason": "caller_hung_up" if outcome == "abandoned" else ("blacklist" if outcome == "rejected" else ""),
            "offered_at": offered, "queued_at": queued if outcome != "rejected" else 0,
            "transferred_at": offered if is_partner else 0,
            "answered_at": int(answered), "ended_at": int(ended),
            "wait_s": wait, "talk_s": talk, "wrap_s": wrap,
            "handle_s": talk + wrap if outcome == "completed" else 0.0,
            "csat": rnd.choice((0, 0, 1, 2, 3, 4, 5, 5)) if outcome == "completed" else 0,
            "resolved": int(outcome == "completed" and rnd.random() < 0.7),
            "wrap_up_code": "ok" if outcome == "completed" else "",
            "transfer_count": 1 if is_partner else 0,
        })
    return out


def agent_state_changes(agents_per_site: int = 3, *, seed: int = 1, start: int = 1_790_000_000,
                        span_s: int = 4 * 3600) -> list[dict[str, Any]]:
    """Each agent signs in, cycles ready -> busy -> wrap_up (sometimes not_ready) and signs
    out; each row carries the interval it closes."""
    rnd = random.Random(seed)
    out = []
    seq = 0
    for site, region, is_partner, _ in SITES:
        for a in range(agents_per_site):
            agent = f"{site}-{a + 1:03d}"
            t = start + rnd.randrange(600)
            prev_state, prev_at = "signed_out", 0
            state = "not_ready"
            end = start + span_s - rnd.randrange(600)
            while True:
                seq += 1
                out.append({
                    "site": site, "region": region, "partner": site if is_partner else "",
                    "agent_id": agent, "seq": seq, "at": t, "state": state, "reason": "",
                    "prev_state": prev_state, "prev_at": prev_at, "calls": int(state == "busy"),
                })
                if state == "signed_out":
                    break
                prev_state, prev_at = state, t
                t += {"not_ready": 120, "ready": 30, "busy": 240, "wrap_up": 15}[state] + rnd.randrange(200)
                if t >= end:
                    state = "signed_out"
                elif state == "ready":
                    state = "busy"
                elif state == "busy":
                    state = "wrap_up"
                else:
                    state = "not_ready" if rnd.random() < 0.1 else "ready"
    return out


def routing_decisions(calls: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for c in calls:
        here = f"{c['site']}/{c['queue']}"
        yield {
            "call_id": c["interaction_id"], "seq": 0, "site": c["site"], "region": c["region"],
            "at": c["offered_at"], "rule": "reject" if c["outcome"] == "rejected" else "queue_here",
            "target_kind": "reject" if c["outcome"] == "rejected" else "queue",
            "target": "" if c["outcome"] == "rejected" else here,
            "candidates": [here, "callpro/support-chat"], "candidate_waits_s": [c["wait_s"], 60.0],
            "expected_wait_s": c["wait_s"], "reason": "queued", "details": "{}",
        }
