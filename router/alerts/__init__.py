"""Alert rules of a site node (issue 10 §4), pure: one spec (``rules.yaml``), two uses.

* :func:`prometheus_rules` — the Prometheus rules file (``tandem.rules.yml``, shipped
  next to the spec; ``python -m router.alerts`` prints it);
* :func:`evaluate` — the same rules evaluated in-app on a node's own samples, with
  pending / firing and ``for`` (``node.alerts``, ``tandem ctl get alerts``, ``top``).

Imports only libraries (pydantic, yaml): the node feeds it samples.
"""

from router.alerts.evaluate import Alert, Sample, evaluate, matches
from router.alerts.promrules import duration, expr, prometheus_rules
from router.alerts.spec import Rule, Selector, Spec, SpecError, load_spec, parse_spec

__all__ = [
    "Alert", "Rule", "Sample", "Selector", "Spec", "SpecError", "duration", "evaluate", "expr", "load_spec",
    "matches", "parse_spec", "prometheus_rules",
]
