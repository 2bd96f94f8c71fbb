"""The alert rules (router.alerts, pure): the in-app evaluator's pending / firing / resolve
and its joins, the generated Prometheus rules file equal to the shipped one, and the
shipped file checked and unit-tested by the real ``promtool`` (Debian ``prometheus``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from router.alerts import SpecError, evaluate, load_spec, parse_spec, prometheus_rules
from router.alerts.promrules import duration

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "router" / "alerts" / "tandem.rules.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")

NAMES = {"ServiceLevelBelowTarget", "OldestContactTooOld", "SiteMemberLost", "PartnerCapReached",
         "EtcdUnreachable", "HistorySpoolGrowing"}


def sl(site: str, queue: str, value: float, target: float = 0.8) -> list:
    labels = {"site": site, "queue": queue}
    return [("tandem_queue_service_level", labels, value), ("tandem_queue_service_level_target", dict(labels), target)]


def test_packaged_spec_has_every_alert():
    spec = load_spec()
    assert {r.name for r in spec.rules} == NAMES
    assert spec.rule("ServiceLevelBelowTarget").for_s == 300
    for r in spec.rules:
        assert r.severity in ("warning", "critical")


def test_pending_then_firing_after_for_then_resolved():
    spec = load_spec()
    state: dict = {}
    t0 = 1_000_000.0
    a = evaluate(spec, sl("lyon", "fr", 0.5), t0, state)
    assert [(x.name, x.state, x.site, x.labels, x.since, x.value) for x in a] == [
        ("ServiceLevelBelowTarget", "pending", "lyon", {"queue": "fr"}, t0, 0.5)]
    assert a[0].summary == "Service level of queue fr at site lyon is 0.5, below its target"
    assert evaluate(spec, sl("lyon", "fr", 0.4), t0 + 299, state)[0].state == "pending"
    a = evaluate(spec, sl("lyon", "fr", 0.4), t0 + 300, state)
    assert a[0].state == "firing" and a[0].since == t0 and a[0].value == 0.4
    assert evaluate(spec, sl("lyon", "fr", 0.9), t0 + 301, state) == []  # resolved
    assert state == {}
    a = evaluate(spec, sl("lyon", "fr", 0.5), t0 + 302, state)  # a new episode starts over
    assert a[0].state == "pending" and a[0].since == t0 + 302


def test_join_on_labels_and_missing_partner():
    spec = load_spec()
    samples = [
        *sl("lyon", "fr", 0.5, target=0.4),  # meets its own target
        *sl("lyon", "en", 0.5, target=0.9),  # below its own target
        ("tandem_queue_service_level", {"site": "lyon", "queue": "orphan"}, 0.1),  # no target: no result
        ("tandem_partner_calls_in_use", {"site": "lyon", "partner": "acme"}, 3.0),
        ("tandem_partner_calls_cap", {"site": "lyon", "partner": "acme"}, 3.0),
        ("tandem_partner_calls_in_use", {"site": "lyon", "partner": "zeta"}, 4.0),
        ("tandem_partner_calls_cap", {"site": "lyon", "partner": "zeta"}, 5.0),
        ("tandem_partner_calls_in_use", {"site": "lyon", "partner": "nocap"}, 9.0),
    ]
    got = {(a.name, tuple(sorted(a.labels.items()))) for a in evaluate(spec, samples, 0.0, {})}
    assert got == {("ServiceLevelBelowTarget", (("queue", "en"),)), ("PartnerCapReached", (("partner", "acme"),))}


def test_every_rule_fires_on_its_condition():
    spec = parse_spec(load_spec().model_dump_json(by_alias=True).replace('"for":300.0', '"for":0.0')
                      .replace('"for":60.0', '"for":0.0'))
    site = {"site": "lyon"}
    samples = [
        *sl("lyon", "fr", 0.1),
        ("tandem_queue_oldest_contact_age_seconds", {**site, "queue": "fr"}, 121.0),
        ("tandem_queue_oldest_contact_age_seconds", {**site, "queue": "en"}, 120.0),  # not over
        ("tandem_cluster_member_up", {**site, "member": "paris"}, 0.0),
        ("tandem_cluster_member_up", {**site, "member": "berlin"}, 1.0),
        ("tandem_partner_calls_in_use", {**site, "partner": "acme"}, 3.0),
        ("tandem_partner_calls_cap", {**site, "partner": "acme"}, 3.0),
        ("tandem_etcd_connected", site, 0.0),
        ("tandem_history_spool_rows", site, 42.0),
    ]
    alerts = evaluate(spec, samples, 5.0, {})
    assert {a.name for a in alerts} == NAMES
    assert all(a.state == "firing" for a in alerts)
    assert {a.name: a.labels for a in alerts}["SiteMemberLost"] == {"member": "paris"}


def test_matchers_and_site_default():
    spec = parse_spec("""
rules:
  - name: FrOnly
    for: 0
    summary: "{queue} {value} at {site}"
    left: {metric: tandem_queue_contacts, match: {queue: fr}}
    op: ">="
    right: 3
""")
    samples = [("tandem_queue_contacts", {"queue": "fr"}, 3.0), ("tandem_queue_contacts", {"queue": "en"}, 9.0)]
    [a] = evaluate(spec, samples, 0.0, {}, site="lyon")
    assert (a.site, a.labels, a.summary) == ("lyon", {"queue": "fr"}, "fr 3 at lyon")
    assert 'tandem_queue_contacts{queue="fr"} >= 3' in prometheus_rules(spec)


@pytest.mark.parametrize("text", [
    "rules: [{name: lowercase, summary: s, left: {metric: m}, op: '>', right: 1}]",
    "rules: [{name: Bad, summary: s, left: {metric: 'no-dash'}, op: '>', right: 1}]",
    "rules: [{name: Bad, summary: s, left: {metric: m}, op: '=~', right: 1}]",
    "rules: [{name: Bad, summary: s, left: {metric: m}, op: '>', right: 1, extra: 1}]",
    "rules: [{name: Dup, summary: s, left: {metric: m}, op: '>', right: 1}, "
    "{name: Dup, summary: s, left: {metric: m}, op: '>', right: 2}]",
])
def test_bad_specs_are_refused(text):
    with pytest.raises(SpecError):
        parse_spec(text)


def test_durations():
    assert [duration(s) for s in (0, 0.5, 30, 60, 90, 300, 3600, 5400)] == [
        "0s", "500ms", "30s", "1m", "1m30s", "5m", "1h", "1h30m"]


def test_generated_rules_equal_the_shipped_file():
    assert prometheus_rules() == SHIPPED.read_text(), (
        "router/alerts/tandem.rules.yml is stale: run `python -m router.alerts > router/alerts/tandem.rules.yml`")


def test_python_m_router_alerts_prints_the_rules():
    import sys

    out = subprocess.run([sys.executable, "-m", "router.alerts"], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out == SHIPPED.read_text()


@needs_promtool
def test_promtool_check_rules():
    r = subprocess.run([PROMTOOL, "check", "rules", str(SHIPPED)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 6 rules found" in r.stdout


@needs_promtool
def test_promtool_test_rules_covers_every_alert():
    unit = REPO / "tests" / "data" / "tandem_rules_test.yml"
    tested = {line.split(":", 1)[1].strip() for line in unit.read_text().splitlines()
              if line.strip().startswith("alertname:")}
    assert tested == NAMES
    r = subprocess.run([PROMTOOL, "test", "rules", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
