"""router.plans, pure: targets documents and plans parsed with clear errors, the move
commands targets mean, the policy they lay over the one in force, their diff."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.config import load_site
from router.overflow import parse_policy
from router.plans import (
    Plan,
    PlanError,
    SiteTargets,
    check_targets,
    diff,
    move_commands,
    parse_plan,
    parse_target_doc,
    policy_with_targets,
)

ROOT = Path(__file__).resolve().parent.parent
LYON = load_site(ROOT / "sites" / "lyon.yaml")
POLICY = parse_policy((ROOT / "sites" / "overflow-policy.json").read_text())


def test_documents_parse_and_bad_ones_name_the_field():
    d = parse_target_doc(json.dumps({"fencing": 7, "generation": 2, "targets": {"groups": {"a": "b"}}}))
    assert (d.fencing, d.generation, d.targets.groups) == (7, 2, {"a": "b"})
    for raw, field in (('{"fencing": -1}', "fencing"), ('{"fencing": 1, "oops": 2}', "oops"),
                       ('{"fencing": 1, "targets": {"wait_factor": {"q": 0}}}', "targets"), ("{nope", "not JSON")):
        with pytest.raises(PlanError, match=field):
            parse_target_doc(raw)
    with pytest.raises(PlanError, match="base_revision"):
        parse_plan("{}")
    p = Plan(base_revision=5, sites={"lyon": SiteTargets(mode="surge")}).with_id()
    assert parse_plan(p.to_json()) == p and len(p.id) == 12
    assert p.with_id().id == p.id and Plan(base_revision=6, sites=p.sites).with_id().id != p.id


def test_check_targets_names_what_the_site_does_not_have():
    check_targets(LYON, SiteTargets(groups={"lyon-fr-001": "lyon-bi"}, wait_factor={"sales-voice": 2}),
                  partners=["callpro"])
    for t, what in ((SiteTargets(groups={"nobody": "lyon-bi"}), "agent 'nobody'"),
                    (SiteTargets(groups={"lyon-fr-001": "nogroup"}), "agent group 'nogroup'"),
                    (SiteTargets(wait_factor={"noqueue": 1.0}), "queue 'noqueue'"),
                    (SiteTargets(partners={"acme": False}), "partner 'acme'")):
        with pytest.raises(PlanError, match=what):
            check_targets(LYON, t, partners=["callpro"])


def test_move_commands_place_named_agents_and_send_the_previous_ones_home():
    home = {"a": "g1", "b": "g1", "c": "g2", "d": "g2"}
    current = {"a": "g2", "b": "g2", "c": "g2", "d": "g1"}  # a, b placed by targets; d moved by an operator
    cmds = move_commands(home, current, ["a", "b"], SiteTargets(groups={"a": "g2", "c": "g1"}))
    assert cmds == [{"op": "move_agent", "agent_id": "b", "group": "g1"},
                    {"op": "move_agent", "agent_id": "c", "group": "g1"}]  # a already there; d left alone


def test_policy_with_targets_sets_wait_factors_and_closes_partners_per_site():
    queues = {"lyon": [q.name for q in LYON.queues], "montreal": ["sales-voice"]}
    assert policy_with_targets(POLICY, {"lyon": SiteTargets()}, queues) is POLICY
    p = policy_with_targets(POLICY, {"lyon": SiteTargets(wait_factor={"sales-voice": 2.0},
                                                         partners={"callpro": False})}, queues)
    r = p.rules_for("lyon", "sales-voice")
    assert r.wait_threshold.factor == 2.0 and "callpro" in r.exclude and r.margin == POLICY.default.margin
    assert "callpro" in p.rules_for("lyon", "billing-fr-voice").exclude
    assert p.rules_for("lyon", "billing-email").enabled is False  # the policy's own rule kept, with the exclusion
    assert p.rules_for("montreal", "sales-voice") == POLICY.rules_for("montreal", "sales-voice")
    assert POLICY.sites == {}  # the policy in force is not changed


def test_diff_lists_every_change_sorted():
    before = {"lyon": SiteTargets(groups={"a": "g1"}, wait_factor={"q": 2.0})}
    after = {"lyon": SiteTargets(groups={"a": "g2", "b": "g1"}, mode="surge"), "mtl": SiteTargets(partners={"p": False})}
    assert diff(before, after) == [
        {"site": "lyon", "what": "group", "key": "a", "before": "g1", "after": "g2"},
        {"site": "lyon", "what": "group", "key": "b", "before": None, "after": "g1"},
        {"site": "lyon", "what": "wait_factor", "key": "q", "before": 2.0, "after": None},
        {"site": "lyon", "what": "mode", "key": "", "before": None, "after": "surge"},
        {"site": "mtl", "what": "partner", "key": "p", "before": None, "after": False},
    ]
    assert diff(after, after) == []
