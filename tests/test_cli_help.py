"""`tandem --help` and every subcommand's help read as text: no reStructuredText markup
leaking from docstrings, no promises of commands that are not there."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from router.cli import app

COMMANDS = [[], ["node"], ["demo"], ["certs"], ["report"], ["history"], ["up"], ["down"], ["top"], ["ctl"],
            ["ctl", "get"], ["ctl", "describe"], ["ctl", "drain"], ["ctl", "mode"], ["ctl", "agent"],
            ["ctl", "agent", "move"], ["ctl", "policy"], ["ctl", "policy", "apply"], ["ctl", "audit"],
            ["ctl", "partner"], ["ctl", "partner", "apply"], ["report", "partner"],
            ["partner-sim"], ["capacity"], ["capacity", "staff"], ["capacity", "forecast"],
            ["capacity", "whatif"], ["capacity", "validate"], ["rebalancer"], ["ctl", "plan"], ["ctl", "apply"],
            ["ctl", "get", "rebalancer"]]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "tandem")
def test_help_is_plain_text(args):
    r = CliRunner().invoke(app, [*args, "--help"], env={"NO_COLOR": "1", "COLUMNS": "120"})
    assert r.exit_code == 0, r.output
    assert "``" not in r.output, r.output
    assert "later" not in r.output.lower(), r.output
