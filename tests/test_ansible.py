"""The Ansible roles (ansible/): ansible-lint's production profile, the pinned
ansible-core and its own modules only, every role's variables prefixed and specified.
The real deploy is tests/test_deploy_ansible.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE = ROOT / "ansible"
DEPLOY_VENV = ROOT / ".venv-deploy"
ROLES = ("tandem_pki", "etcd", "clickhouse", "tandem_node", "prometheus")


def _need_deploy_venv() -> None:
    if not (DEPLOY_VENV / "bin" / "ansible-lint").exists():
        pytest.fail(f"no {DEPLOY_VENV}: make deploy-deps (make test runs it)")


def test_ansible_lint_production_profile_passes():
    _need_deploy_venv()
    env = dict(os.environ, PATH=f"{DEPLOY_VENV / 'bin'}:{os.environ.get('PATH', '')}", NO_COLOR="1", LC_ALL="C.UTF-8", LANG="C.UTF-8")
    p = subprocess.run([str(DEPLOY_VENV / "bin" / "ansible-lint"), "--profile", "production", "--offline", "."],
                       cwd=ANSIBLE, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in p.stderr + p.stdout


def test_ansible_core_is_pinned_and_only_builtin_modules_are_used():
    reqs = (ANSIBLE / "requirements.txt").read_text()
    assert "ansible-core==2.19." in reqs
    for path in ANSIBLE.rglob("*.yml"):
        if "inventories" in path.parts or path.name.startswith("."):
            continue
        for line in path.read_text().splitlines():
            s = line.strip()
            if s.startswith("ansible.") and s.endswith(":"):
                assert s.startswith("ansible.builtin."), f"{path}: {s} (only ansible-core's modules)"


@pytest.mark.parametrize("role", ROLES)
def test_every_role_documents_its_variables(role):
    """Variables are prefixed by the role and every default has an argument spec."""
    d = ANSIBLE / "roles" / role
    defaults = yaml.safe_load((d / "defaults" / "main.yml").read_text()) or {}
    specs = yaml.safe_load((d / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]["options"]
    assert defaults, role
    for name in defaults:
        assert name.startswith(role + "_"), f"{role}: {name} is not prefixed {role}_"
        assert name in specs, f"{role}: {name} has no argument spec"
    assert set(specs) <= set(defaults), f"{role}: specs without a default: {set(specs) - set(defaults)}"
