"""``tandem ctl get partners`` and ``tandem ctl partner diff|apply`` against a real node
process with a real etcd (Admin.ListPartners, DiffContract, ApplyContract): a valid
contract is stored and shown with its cap, the same file again changes nothing, a change
is listed (diff exits 1), an invalid contract is refused with INVALID_CONTRACT and the
stored one stays, a stale revision is refused (by the tool and by the node's
compare-and-set), and the JSON rows carry every field. Plus the pure helpers.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import yaml
from typer.testing import CliRunner

from node_fixtures import error_reason, node_process
from router.cli import app
from router.ctl.client import NodeResult
from router.ctl.commands import partner_rows
from router.contracts import parse_contract
from router.node.admin import contract_changes
from router.v1 import admin_pb2, admin_pb2_grpc
from test_cluster import node_env, write_site
from test_partner_api import CONTRACT, PARTNER

pytestmark = pytest.mark.timeout(120)


def ctl(context: Path, *args: str):
    return CliRunner().invoke(app, ["ctl", "--context", str(context), *args],
                              env={"NO_COLOR": "1", "COLUMNS": "250", "TANDEM_CONTEXT": ""})


def ok(r, what: str, code: int = 0) -> str:
    assert r.exit_code == code, f"{what}: exit {r.exit_code}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout


def wait_for(pred, what: str, timeout: float = 15.0):
    import time

    end = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def write_contract(path: Path, **over) -> Path:
    path.write_text(yaml.safe_dump({**CONTRACT, **over}, sort_keys=False))
    return path


def partners(context: Path) -> dict[str, dict]:
    return {r["partner"]: r for r in json.loads(ok(ctl(context, "get", "partners", "-o", "json"), "get partners"))}


def test_partner_contracts_through_ctl(etcd, etcd_prefix, tmp_path):
    site = write_site(tmp_path, "alpha")
    with node_process(site, tmp_path / "alpha", sync="none", env=node_env(etcd.endpoints, etcd_prefix)) as node:
        context = tmp_path / "ctx.yaml"
        doc = {"current-context": "t", "contexts": {"t": {"sites": {"alpha": node.address}}}}
        context.write_text(yaml.safe_dump(doc))

        def registered() -> bool:
            r = ctl(context, "get", "members", "-o", "json")
            return r.exit_code == 0 and [m["site"] for m in json.loads(r.stdout)] == ["alpha"]

        wait_for(registered, "alpha to register in etcd")
        assert partners(context) == {}
        first = write_contract(tmp_path / "blueline.yaml")

        # a new partner: everything would be added (diff exits 1); off a terminal, --yes
        out = ok(ctl(context, "partner", "diff", str(first)), "diff of a new contract", 1)
        assert f"partner: added \"{PARTNER}\"" in out and "caps: added" in out
        assert ok(ctl(context, "partner", "apply", str(first)), "apply without --yes", 64) == ""
        assert partners(context) == {}
        dry = ctl(context, "partner", "apply", str(first), "--dry-run", "-o", "json")
        assert json.loads(ok(dry, "dry run"))["changed"] and "nothing was changed" in dry.stderr
        assert partners(context) == {}

        out = ok(ctl(context, "partner", "apply", str(first), "--yes"), "apply")
        assert out.startswith(f"contract of {PARTNER} applied: revision ")
        rev = int(out.split("revision ")[1].split()[0])
        row = partners(context)[PARTNER]
        assert {k: row[k] for k in ("partner", "cap", "held", "connected", "gateways", "revision", "error")} == {
            "partner": PARTNER, "cap": CONTRACT["caps"]["concurrent"], "held": 0, "connected": [], "gateways": {},
            "revision": rev, "error": ""}
        assert row["contract"] == json.loads(parse_contract(json.dumps(CONTRACT)).model_dump_json())
        assert row["from"] == "alpha"
        table = ok(ctl(context, "get", "partners"), "get partners (table)")
        assert table.split("\n")[0].split() == ["PARTNER", "CAP", "HELD", "CONNECTED", "REVISION", "ERROR"]
        assert [PARTNER, "2", "0", "-", str(rev), "-"] in [line.split() for line in table.splitlines()]

        # the same file again: no change, same revision
        again = ctl(context, "partner", "apply", str(first), "--yes")
        assert ok(again, "apply again") == "" and "nothing to apply" in again.stderr
        assert ok(ctl(context, "partner", "diff", str(first)), "diff of the stored contract") == ""
        assert partners(context)[PARTNER]["revision"] == rev

        # a change is listed, diff exits 1
        second = write_contract(tmp_path / "blueline-2.yaml", caps={**CONTRACT["caps"], "concurrent": 3})
        assert ok(ctl(context, "partner", "diff", str(second)), "diff of a change", 1) == "caps.concurrent: 2 -> 3\n"
        d = json.loads(ok(ctl(context, "partner", "diff", str(second), "-o", "json"), "diff -o json", 1))
        assert d == {"partner": PARTNER, "revision": rev, "changes": ["caps.concurrent: 2 -> 3"], "changed": True}

        # an invalid contract is refused; the stored one stays
        bad = write_contract(tmp_path / "bad.yaml", value_tiers=["high"], caps={"concurrent": 0})
        for args in (["diff", str(bad)], ["apply", str(bad), "--yes"]):
            r = ctl(context, "partner", *args)
            assert r.exit_code == 1 and r.stdout == "", (args, r.stdout, r.stderr)
            assert "INVALID_ARGUMENT/INVALID_CONTRACT" in r.stderr and "value_tiers" in r.stderr
            assert "caps.concurrent" in r.stderr
        assert partners(context)[PARTNER]["revision"] == rev

        # a stale revision is refused by the tool, and by the node's compare-and-set
        stale = ctl(context, "partner", "apply", str(second), "--yes", "--expected-revision", str(rev - 1))
        assert stale.exit_code == 1 and "CONTRACT_CHANGED" in stale.stderr, stale.stderr
        with grpc.insecure_channel(node.address) as ch:
            admin = admin_pb2_grpc.AdminStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                admin.ApplyContract(admin_pb2.ApplyContractRequest(contract=second.read_text(),
                                                                   expected_revision=rev + 100), timeout=5)
            assert (e.value.code(), error_reason(e.value)) == (grpc.StatusCode.FAILED_PRECONDITION, "CONTRACT_CHANGED")
        assert partners(context)[PARTNER]["cap"] == 2

        out = ok(ctl(context, "partner", "apply", str(second), "--yes", "--expected-revision", str(rev)), "apply 2")
        assert out.endswith("(1 change(s))\n")
        row = partners(context)[PARTNER]
        assert row["cap"] == 3 and row["revision"] > rev

        # an invalid value written behind the nodes' back (etcdctl): ignored (the error
        # says why), the contract in force stays; the diff says it would be replaced
        from router.coord.keys import Keys

        invalid = json.dumps({**CONTRACT, "value_tiers": ["high"]})
        etcd.etcdctl("put", Keys(etcd_prefix).partner_contract(PARTNER), invalid)
        row = wait_for(lambda: (r := partners(context)[PARTNER])["error"] and r, "the stored contract's error")
        assert "high-value work never goes to a partner" in row["error"] and row["cap"] == 3
        out = ok(ctl(context, "partner", "diff", str(second)), "diff against an invalid stored contract", 1)
        assert "invalid, ignored -> replaced" in out
        ok(ctl(context, "partner", "apply", str(second), "--yes"), "apply over an invalid stored contract")
        row = partners(context)[PARTNER]
        assert row["error"] == "" and row["cap"] == 3


def test_contract_changes_and_partner_rows():
    c = parse_contract(json.dumps(CONTRACT))
    assert contract_changes(c, c) == []
    changed = parse_contract(json.dumps({**CONTRACT, "offer_timeout_s": 5, "skills": ["billing"]}))
    assert contract_changes(c, changed) == ["offer_timeout_s: 2.0 -> 5.0",
                                            'skills: ["billing", "support"] -> ["billing"]']
    assert "partner: added \"blueline\"" in contract_changes(None, c)

    def answer(*infos):
        return admin_pb2.ListPartnersResponse(partners=[admin_pb2.PartnerInfo(**i) for i in infos])

    results = {
        "a": NodeResult("a", "x:1", answer({"partner": "p", "revision": 5, "cap": 2, "held": 1})),
        "b": NodeResult("b", "x:2", answer({"partner": "p", "revision": 6, "cap": 3, "held": 2, "connected": True,
                                            "gateway": "gw-1"})),
        "c": NodeResult("c", "x:3", error=RuntimeError("down")),
    }
    [row] = partner_rows(results)
    assert (row["cap"], row["held"], row["revision"], row["from"]) == (3, 2, 6, "b")  # the newest revision
    assert (row["connected"], row["gateways"]) == (["b"], {"b": "gw-1"})
