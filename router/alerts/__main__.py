"""``python -m router.alerts [RULES.yaml]``: print the Prometheus rules file."""

import sys

from router.alerts.promrules import prometheus_rules
from router.alerts.spec import SpecError, load_spec

try:
    sys.stdout.write(prometheus_rules(load_spec(sys.argv[1] if len(sys.argv) > 1 else None)))
except SpecError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
