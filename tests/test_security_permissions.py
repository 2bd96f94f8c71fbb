"""The permission table is written once (router/security/permissions.py); the README's
copy must be the current one, and the table itself must be coherent."""

from __future__ import annotations

from pathlib import Path

from router.security import permissions

ROOT = Path(__file__).resolve().parent.parent


def test_readme_prints_the_current_table():
    assert permissions.markdown_table() in (ROOT / "README.md").read_text(), (
        "README.md's permission table is stale: paste router.security.permissions.markdown_table()")


def test_every_rule_names_known_roles_and_partner_gets_no_node_service():
    for method, rule in permissions.TABLE.items():
        assert rule.roles <= set(permissions.ROLES), method
        if method.startswith("/router.v1.Partner/"):
            assert rule.roles == {"partner"}, method  # the partner API is the partner's alone
        elif method.startswith("/router.v1."):
            assert "partner" not in rule.roles, method  # nothing of the node's services


def test_default_deny_and_members_only_rules_are_site_only():
    assert not permissions.allowed("operator", "/router.v1.Admin/NoSuchMethod")
    for method, rule in permissions.TABLE.items():
        if rule.members_only:
            assert rule.roles == {"site"}, method
