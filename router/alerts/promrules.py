"""The Prometheus rules file made from the spec (``tandem.rules.yml``, shipped with the
package and kept equal to this output by a test)::

    python -m router.alerts > router/alerts/tandem.rules.yml
"""

from __future__ import annotations

import yaml

from router.alerts.spec import PLACEHOLDER, Rule, Selector, Spec, load_spec

HEADER = ("# Generated from router/alerts/rules.yaml by `python -m router.alerts`: do not edit.\n"
          "# Check: promtool check rules tandem.rules.yml\n")


def duration(seconds: float) -> str:
    """Seconds as a Prometheus duration: 300 -> 5m, 90 -> 1m30s, 0.5 -> 500ms."""
    ms = round(seconds * 1000)
    if ms == 0:
        return "0s"
    out = ""
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        n, ms = divmod(ms, size)
        if n:
            out += f"{n}{unit}"
    return out


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def selector(sel: Selector) -> str:
    if not sel.match:
        return sel.metric
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(sel.match.items()))
    return f"{sel.metric}{{{inner}}}"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def expr(rule: Rule) -> str:
    """``left OP right``; a metric on the right is joined ``on(...)`` its labels (or on
    all labels, PromQL's default, when the rule names none)."""
    left = selector(rule.left)
    if isinstance(rule.right, Selector):
        on = f" on({', '.join(rule.right.on)})" if rule.right.on is not None else ""
        return f"{left} {rule.op}{on} {selector(rule.right)}"
    return f"{left} {rule.op} {_number(rule.right)}"


def template(summary: str) -> str:
    """``{queue}`` -> ``{{ $labels.queue }}``, ``{value}`` -> ``{{ $value }}``."""
    def sub(m) -> str:
        name = m.group(1)
        return "{{ $value }}" if name == "value" else "{{ $labels.%s }}" % name

    return PLACEHOLDER.sub(sub, summary)


def prometheus_rules(spec: Spec | None = None) -> str:
    spec = spec or load_spec()
    rules = []
    for r in spec.rules:
        rules.append({
            "alert": r.name,
            "expr": expr(r),
            "for": duration(r.for_s),
            "labels": {"severity": r.severity},
            "annotations": {"summary": template(r.summary)},
        })  # fmt: skip
    body = yaml.safe_dump({"groups": [{"name": "tandem", "rules": rules}]}, sort_keys=False, width=1000)
    return HEADER + body
