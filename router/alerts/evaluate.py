"""The in-app evaluator: the spec's rules over samples, with Prometheus's semantics.

A sample is ``(metric name, labels, value)`` — on a node, every sample of its own
prometheus_client registry, so ``ctl get alerts`` sees what Prometheus scrapes. A rule's
result is one series per left sample that passes the comparison (a metric on the right
is matched on the ``on`` labels, or on all labels; a left sample with no partner has no
result, as in PromQL). A series is *pending* from the first evaluation it appears in
(``since``) and *firing* once it has lasted the rule's ``for``; an evaluation without it
resolves it (its ``since`` is forgotten). ``state`` is the caller's dict, kept between
evaluations.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from router.alerts.spec import PLACEHOLDER, Rule, Selector, Spec

Sample = tuple[str, Mapping[str, str], float]

OPS = {"<": operator.lt, ">": operator.gt, ">=": operator.ge, "<=": operator.le, "==": operator.eq,
       "!=": operator.ne}


@dataclass(frozen=True)
class Alert:
    name: str
    severity: str
    site: str
    labels: dict[str, str] = field(hash=False)  # the series' labels but site (e.g. queue)
    state: str  # "pending" | "firing"
    since: float  # unix seconds the condition began
    value: float
    summary: str

    @property
    def firing(self) -> bool:
        return self.state == "firing"


def _matches(sel: Selector, labels: Mapping[str, str]) -> bool:
    return all(labels.get(k, "") == v for k, v in sel.match.items())


def _key(labels: Mapping[str, str], on: tuple[str, ...] | None) -> tuple:
    if on is None:
        return tuple(sorted(labels.items()))
    return tuple(labels.get(k, "") for k in on)


def _fmt(x: float) -> str:
    return f"{x:.4g}" if not float(x).is_integer() else str(int(x))


def summary(rule: Rule, labels: Mapping[str, str], value: float) -> str:
    def sub(m) -> str:
        name = m.group(1)
        return _fmt(value) if name == "value" else labels.get(name, "")

    return PLACEHOLDER.sub(sub, rule.summary)


def matches(rule: Rule, samples: Iterable[Sample]) -> list[tuple[dict[str, str], float]]:
    """The series (labels, left value) for which the rule's condition holds now."""
    left: list[tuple[Mapping[str, str], float]] = []
    right: dict[tuple, float] = {}
    rsel = rule.right if isinstance(rule.right, Selector) else None
    for name, labels, value in samples:
        if name == rule.left.metric and _matches(rule.left, labels):
            left.append((labels, value))
        if rsel is not None and name == rsel.metric and _matches(rsel, labels):
            right.setdefault(_key(labels, rsel.on), value)
    op = OPS[rule.op]
    out = []
    for labels, value in left:
        if rsel is None:
            other = float(rule.right)  # type: ignore[arg-type]
        else:
            found = right.get(_key(labels, rsel.on))
            if found is None:
                continue
            other = found
        if math.isnan(value) or math.isnan(other):
            continue
        if op(value, other):
            out.append((dict(labels), float(value)))
    return out


def evaluate(spec: Spec, samples: Iterable[Sample], now: float, state: dict, *, site: str = "") -> list[Alert]:
    """Every alert whose condition holds at ``now``, pending or firing, by rule order.
    ``site``: the site of series that carry no ``site`` label. ``state`` maps
    (rule, labels) -> since and is updated in place."""
    samples = list(samples)
    seen: set = set()
    alerts: list[Alert] = []
    for rule in spec.rules:
        for labels, value in matches(rule, samples):
            key = (rule.name, tuple(sorted(labels.items())))
            seen.add(key)
            since = state.setdefault(key, now)
            firing = now - since >= rule.for_s
            alerts.append(Alert(
                name=rule.name, severity=rule.severity, site=labels.get("site", site),
                labels={k: v for k, v in labels.items() if k != "site"},
                state="firing" if firing else "pending", since=since, value=value,
                summary=summary(rule, {"site": site, **labels}, value),
            ))  # fmt: skip
    for key in [k for k in state if k not in seen]:
        del state[key]
    return alerts
