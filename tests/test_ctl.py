"""``tandem ctl`` against a real cluster: ``tandem up --traffic`` (etcd over mTLS, three
mTLS nodes with their embedded history, the demo's callers and agents), reached with the
context file it writes and the ``operator-admin`` identity; plus a Lyon supervisor
(``tandem certs issue --operator lyon-sup`` bound ``{role: supervisor, sites: [lyon]}``).

Each command's output formats, its exit codes (2 cannot connect, 3 permission denied,
4 not found, 64 usage), the ``[y/N]`` prompt on a terminal and ``--yes`` off one, every
mutation in ``ctl audit``, and ``policy apply --dry-run`` leaving the policy's revision
as it was. Commands run in-process (typer's runner: stdin is not a terminal) except the
prompt test, which gives a real ``tandem ctl`` a pseudo-terminal.
"""

from __future__ import annotations

import json
import os
import pty
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from router.cli import app
from router.ctl import client as ctl_client

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parent.parent
TANDEM = str(Path(sys.executable).parent / "tandem")
SITES = ("callpro", "lyon", "montreal")


@dataclass
class UpCluster:
    data_dir: Path
    context: Path       # operator-admin
    sup_context: Path   # operator-lyon-sup, supervisor of lyon


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_context(path: Path, base: Path, identity: str, extra_sites: dict | None = None) -> Path:
    doc = yaml.safe_load(base.read_text())
    ctx = doc["contexts"][doc["current-context"]]
    ctx["identity"] = identity
    ctx["sites"].update(extra_sites or {})
    path.write_text(yaml.safe_dump(doc))
    return path


def with_supervisor(data_dir: Path, root: Path) -> UpCluster:
    """The cluster ``tandem up`` made in ``data_dir``, plus a Lyon supervisor identity
    (``operator/lyon-sup`` bound as supervisor of lyon; the nodes reload the bindings
    file) and its context file in ``root``. Idempotent."""
    tls = data_dir / "tls"
    if not (tls / "operator-lyon-sup.crt").exists():
        subprocess.run([TANDEM, "certs", "issue", str(tls), "--operator", "lyon-sup"], check=True,
                       capture_output=True, timeout=60)
    doc = json.loads((tls / "bindings.json").read_text())
    domain = doc["bindings"][0]["identity"].split("/")[2]
    sup = {"identity": f"spiffe://{domain}/operator/lyon-sup", "role": "supervisor", "sites": ["lyon"]}
    if sup not in doc["bindings"]:
        doc["bindings"].append(sup)
        (tls / "bindings.json").write_text(json.dumps(doc, indent=2))
    ctx = data_dir / "tandem.yaml"
    return UpCluster(data_dir, ctx, _write_context(root / "lyon-sup.yaml", ctx, "operator-lyon-sup"))


@pytest.fixture(scope="module")
def cluster(tandem_cluster, tmp_path_factory):
    """The module's ``tandem up --traffic`` cluster (tests/ctl_fixtures.py): every test
    that changes it puts it back."""
    return with_supervisor(tandem_cluster.data_dir, tmp_path_factory.mktemp("ctl"))


def ctl(context: Path | None, *args: str, env: dict | None = None):
    """``tandem ctl [--context FILE] ARGS`` in-process; the result has exit_code, stdout, stderr."""
    pre = ["--context", str(context)] if context is not None else []
    e = {"NO_COLOR": "1", "COLUMNS": "250", "TANDEM_CONTEXT": ""}
    e.update(env or {})
    return CliRunner().invoke(app, ["ctl", *pre, *args], env=e)


def ok(r, what: str = "") -> str:
    assert r.exit_code == 0, f"{what} exit {r.exit_code}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout


def sites_json(context: Path) -> dict[str, dict]:
    return {s["name"]: s for s in json.loads(ok(ctl(context, "get", "sites", "-o", "json")))}


def audit_rows(context: Path, since: str = "30m") -> list[dict]:
    return json.loads(ok(ctl(context, "audit", "--since", since, "-o", "json"), "audit"))


def wait_for(pred, timeout: float = 20.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


# ---------------------------------------------------------------- without a cluster

def test_help_documents_exit_codes():
    r = CliRunner().invoke(app, ["ctl", "--help"], env={"NO_COLOR": "1", "COLUMNS": "200"})
    assert r.exit_code == 0
    for text in ("0 ok", "1 error", "2 cannot connect", "3 permission denied", "4 not found", "64 usage",
                 "[y/N]", "--yes"):
        assert text in r.stdout, text
    assert ctl_client.EXIT_USAGE == 64 and "64  usage" in (ctl_client.__doc__ or "")


def test_usage_errors_exit_64(tmp_path):
    assert ctl(tmp_path / "none.yaml", "get", "sites").exit_code == 64  # no context file
    r = ctl(None, "get", "sites", env={"TANDEM_CONTEXT": str(tmp_path / "missing.yaml")})
    assert r.exit_code == 64 and "missing.yaml" in r.stderr and r.stdout == ""
    ctx = _plain_context(tmp_path, {"lyon": f"127.0.0.1:{_free_port()}"})
    assert ctl(ctx, "get", "sites", "-o", "xml").exit_code == 64
    assert ctl(ctx, "get", "calls", "--state", "sleeping").exit_code == 64
    assert ctl(ctx, "mode", "lyon", "panic", "--yes").exit_code == 64
    assert ctl(ctx, "audit", "--since", "yesterday-ish").exit_code == 64
    assert ctl(ctx, "frobnicate").exit_code == 64
    assert ctl(ctx, "policy", "diff", str(tmp_path / "no-such-policy.json")).exit_code == 64


def _plain_context(tmp_path: Path, sites: dict) -> Path:
    p = tmp_path / "plain.yaml"
    p.write_text(yaml.safe_dump({"current-context": "x", "contexts": {"x": {"sites": sites}}}))
    return p


def test_cannot_connect_exits_2(tmp_path):
    ctx = _plain_context(tmp_path, {"lyon": f"127.0.0.1:{_free_port()}", "montreal": f"127.0.0.1:{_free_port()}"})
    for args in (["get", "sites"], ["get", "queues", "-o", "json"], ["describe", "call", "c1"],
                 ["drain", "lyon", "--yes"]):
        r = ctl(ctx, "--timeout", "1", *args)
        assert r.exit_code == 2, (args, r.stdout, r.stderr)
        assert r.stdout == "", args  # messages on stderr only


def test_flags_over_environment(tmp_path, monkeypatch):
    """--context wins over $TANDEM_CONTEXT (the environment names a file that is not there)."""
    ctx = _plain_context(tmp_path, {"lyon": f"127.0.0.1:{_free_port()}"})
    r = ctl(ctx, "--timeout", "0.5", "get", "sites", env={"TANDEM_CONTEXT": str(tmp_path / "nope.yaml")})
    assert r.exit_code == 2  # it used the flag's file and tried lyon


# ---------------------------------------------------------------- reads

def test_get_sites_formats(cluster):
    table = ok(ctl(cluster.context, "get", "sites"))
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["SITE", "KIND", "STATUS"]
    for s in SITES:
        assert any(line.split()[0] == s for line in lines[1:]), s
    assert "\x1b[" not in table  # NO_COLOR
    rows = json.loads(ok(ctl(cluster.context, "get", "sites", "-o", "json")))
    assert [r["name"] for r in rows] == sorted(SITES)
    for r in rows:
        for key in ("name", "kind", "serving", "draining", "mode", "waiting", "service_level"):
            assert key in r, key
        assert r["status"] == "ok"
        assert isinstance(r["waiting"], int) and isinstance(r["serving"], bool)
    kinds = {r["name"]: r["kind"] for r in rows}
    assert kinds == {"callpro": "partner", "lyon": "in-house", "montreal": "in-house"}
    as_yaml = yaml.safe_load(ok(ctl(cluster.context, "get", "sites", "-o", "yaml")))
    assert [r["name"] for r in as_yaml] == sorted(SITES) and {"kind", "service_level"} <= set(as_yaml[0])
    wide = ok(ctl(cluster.context, "get", "sites", "-o", "wide"))
    assert "ADDRESS" in wide and "ADDRESS" not in table


def test_get_sites_with_an_unreachable_node(cluster, tmp_path):
    """A node that does not answer is a row marked unreachable; the others are listed, exit 0."""
    ctx = _write_context(tmp_path / "ghost.yaml", cluster.context, "operator-admin",
                         {"ghost": f"127.0.0.1:{_free_port()}"})
    r = ctl(ctx, "--timeout", "1", "get", "sites", "-o", "json")
    rows = {s["name"]: s for s in json.loads(ok(r))}
    assert rows["ghost"]["status"] == "unreachable"
    assert rows["lyon"]["status"] == "ok"
    assert "ghost" in r.stderr or "ghost" in r.stdout


def test_get_sites_watch(cluster):
    r = ctl(cluster.context, "get", "sites", "-o", "json", "-w", "--watch-count", "3")
    docs = [json.loads(line) for line in ok(r).splitlines() if line.strip()]
    assert len(docs) == 3 and all({d["name"] for d in doc} == set(SITES) for doc in docs)
    r = ctl(cluster.context, "get", "queues", "-w", "--watch-count", "2")
    assert ok(r).count("QUEUE") == 2


def test_get_queues(cluster):
    rows = json.loads(ok(ctl(cluster.context, "get", "queues", "-o", "json")))
    names = {(r["site"], r["queue"]) for r in rows}
    assert ("lyon", "billing-fr-voice") in names and ("montreal", "billing-en-voice") in names
    for r in rows:
        for key in ("waiting", "oldest_wait_s", "expected_wait_s", "service_level", "service_level_target",
                    "agents_ready", "agents_on_contact", "agents_wrap_up", "agents_not_ready",
                    "overflow_in_last_min", "overflow_out_last_min"):
            assert key in r, key
    assert "billing-fr-voice" in ok(ctl(cluster.context, "get", "queues", "--site", "lyon"))
    assert ctl(cluster.context, "get", "queues", "--site", "atlantis").exit_code == 4


def test_get_calls(cluster):
    rows = wait_for(lambda: json.loads(ok(ctl(cluster.context, "get", "calls", "-o", "json"))), what="calls")
    assert {r["site"] for r in rows} <= set(SITES)
    assert {"call_id", "state", "queue", "agent_id"} <= set(rows[0])
    done = json.loads(ok(ctl(cluster.context, "get", "calls", "--state", "completed", "-o", "json")))
    assert done and all(r["state"] == "completed" for r in done)


@pytest.mark.parametrize("what", ["members", "agents", "alerts"])
def test_get_lists(cluster, what):
    rows = json.loads(ok(ctl(cluster.context, "get", what, "-o", "json"), f"get {what}"))
    assert isinstance(rows, list)
    if what == "members":
        assert {m["site"] for m in rows} == set(SITES)
        assert {"address", "kind", "accepting", "mode", "waiting"} <= set(rows[0])
    if what == "agents":
        assert {"lyon", "montreal"} <= {a["site"] for a in rows}
        assert {"agent_id", "group", "state"} <= set(rows[0])
    table = ok(ctl(cluster.context, "get", what))
    assert table.split()[0] == "SITE"


def test_get_policy(cluster):
    doc = json.loads(ok(ctl(cluster.context, "get", "policy", "-o", "json"), "get policy"))
    assert doc["revision"] > 0 and isinstance(doc["policy"], dict)
    assert yaml.safe_load(ok(ctl(cluster.context, "get", "policy"))) == doc["policy"]


# ---------------------------------------------------------------- describe

def test_describe_call(cluster):
    def an_overflowed_call():
        rows = json.loads(ok(ctl(cluster.context, "get", "calls", "--state", "completed", "-o", "json")))
        moved = [r for r in rows if r["transfer_count"]]
        return (moved or [None])[0]

    call = wait_for(an_overflowed_call, 60, "a completed call that overflowed")
    # the copy at the site that answered it says where it came from; the origin's, where it went
    assert call["transfer_origin"] and call["transfer_origin"] != call["site"], call
    rows = json.loads(ok(ctl(cluster.context, "get", "calls", "--state", "transferred", "-o", "json")))
    origin_copy = [r for r in rows if r["call_id"] == call["call_id"]]
    assert origin_copy and origin_copy[0]["site"] == call["transfer_origin"], (call, origin_copy)
    assert origin_copy[0]["transfer_target"], origin_copy
    # ... named: the site it went to (from the cluster's members), with the address
    assert origin_copy[0]["transfer_target_site"] == call["site"], (call, origin_copy)
    assert origin_copy[0]["to"] == f"{call['site']} ({origin_copy[0]['transfer_target']})", origin_copy
    doc = json.loads(ok(ctl(cluster.context, "describe", "call", call["call_id"], "-o", "json"), "describe"))
    assert doc["call_id"] == call["call_id"] and doc["owner"] == call["site"]
    kinds = [e["kind"] for e in doc["events"]]
    assert kinds[0] == "offered", kinds
    assert any("overflow" in k or "transfer" in k for k in kinds), kinds
    assert "completed" in kinds, kinds
    # in time order (the history keeps whole seconds: those sort within their second)
    assert [int(e["at"]) for e in doc["events"]] == sorted(int(e["at"]) for e in doc["events"])
    assert kinds.index("offered") < kinds.index("completed")
    assert len({e["site"] for e in doc["events"]}) >= 2  # the path crosses sites
    text = ok(ctl(cluster.context, "describe", "call", call["call_id"]))
    assert call["call_id"] in text and "Path:" in text and call["agent_id"] in text
    decisions = [e for e in doc["events"] if "decision" in e["kind"] and e["detail"].get("rule") != "queue_here"]
    assert decisions, kinds
    d = decisions[0]["detail"]  # the overflow decision: its rule, figures and candidates
    assert d["rule"] and d["candidates"] and d.get("details", {}).get("figures"), d
    assert d["rule"] in text


def test_describe_unknown_call_exits_4(cluster):
    r = ctl(cluster.context, "describe", "call", "no-such-call-42")
    assert r.exit_code == 4, (r.stdout, r.stderr)
    assert r.stdout == "" and "no-such-call-42" in r.stderr


# ---------------------------------------------------------------- mutations

def test_mutation_off_a_terminal_needs_yes(cluster):
    r = ctl(cluster.context, "drain", "lyon")
    assert r.exit_code == 64 and "--yes" in r.stderr
    assert sites_json(cluster.context)["lyon"]["draining"] is False


def test_mutation_prompts_on_a_terminal(cluster):
    """A real ``tandem ctl drain`` on a pseudo-terminal asks [y/N]; "n" changes nothing."""
    master, slave = pty.openpty()
    env = dict(os.environ, NO_COLOR="1", TANDEM_CONTEXT=str(cluster.context))
    p = subprocess.Popen([TANDEM, "ctl", "drain", "montreal"], stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    seen = b""
    try:
        end = time.monotonic() + 60
        while b"[y/N]" not in seen and time.monotonic() < end:
            if select.select([master], [], [], 1)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break
        assert b"[y/N]" in seen, seen
        os.write(master, b"n\n")
        assert p.wait(60) == 1
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    assert sites_json(cluster.context)["montreal"]["draining"] is False


def test_drain_undrain_audited(cluster):
    out = ok(ctl(cluster.context, "drain", "lyon", "--yes"), "drain")
    assert "lyon" in out and "drained" in out
    try:
        s = sites_json(cluster.context)["lyon"]
        assert s["draining"] is True and s["serving"] is False
    finally:
        ok(ctl(cluster.context, "undrain", "lyon", "--yes"), "undrain")
    s = sites_json(cluster.context)["lyon"]
    assert s["draining"] is False and s["serving"] is True
    drains = [a for a in audit_rows(cluster.context) if a["method"].endswith("/SetDrain") and a["site"] == "lyon"]
    assert len(drains) >= 2 and all(a["decision"] == "allow" for a in drains)
    assert all(a["identity"].endswith("/operator/admin") for a in drains)


def test_mode_audited(cluster):
    out = ok(ctl(cluster.context, "mode", "montreal", "surge", "--yes"), "mode surge")
    assert "surge" in out
    try:
        assert sites_json(cluster.context)["montreal"]["mode"] == "surge"
    finally:
        ok(ctl(cluster.context, "mode", "montreal", "normal", "--yes"), "mode normal")
    assert sites_json(cluster.context)["montreal"]["mode"] == "normal"
    assert any(a["method"].endswith("/SetMode") and a["site"] == "montreal" for a in audit_rows(cluster.context))


def _try_free_agents(cluster, site: str, group: str | None, act) -> str:
    """``act(agent_id)`` -> exit code, on agents of ``site`` (and ``group``) without a
    contact in hand, again and again while they are busy (AGENT_BUSY: the traffic gives
    them work between our listing and our action); the agent it worked for."""
    def attempt():
        agents = json.loads(ok(ctl(cluster.context, "get", "agents", "--site", site, "-o", "json"), "get agents"))
        for a in agents:
            if not a["call_ids"] and a["state"] != "signed_out" and (group is None or a["group"] == group):
                if act(a["agent_id"]) == 0:
                    return a["agent_id"]
        return None

    return wait_for(attempt, 60, f"a free agent at {site}")


def test_agent_move_audited(cluster):
    def move(aid: str) -> int:
        return ctl(cluster.context, "agent", "move", aid, "--group", "lyon-bi", "--yes").exit_code

    moved = _try_free_agents(cluster, "lyon", "lyon-fr", move)
    try:
        now = {a["agent_id"]: a for a in json.loads(ok(ctl(cluster.context, "get", "agents", "-o", "json")))}
        assert now[moved]["group"] == "lyon-bi" and now[moved]["state"] != "signed_out"  # no sign-out
    finally:
        wait_for(lambda: ctl(cluster.context, "agent", "move", moved, "--group", "lyon-fr",
                             "--yes").exit_code == 0, 60, "the move back")
    moves = [a for a in audit_rows(cluster.context) if a["method"].endswith("/MoveAgent")]
    assert any(a["decision"] == "allow" and a["site"] == "lyon" for a in moves), moves
    r = ctl(cluster.context, "agent", "move", moved, "--group", "no-such-group", "--yes")
    assert r.exit_code in (1, 4) and "UNKNOWN_GROUP" in r.stderr, (r.stdout, r.stderr)


def test_agent_logout_audited(cluster):
    def logout(aid: str) -> int:
        r = ctl(cluster.context, "agent", "logout", aid, "--yes")
        if r.exit_code == 0:
            assert aid in r.stdout and "signed_out" in r.stdout
        return r.exit_code

    _try_free_agents(cluster, "montreal", None, logout)
    assert any(a["method"].endswith("/SignOut") and a["site"] == "montreal" for a in audit_rows(cluster.context))


def test_unknown_objects_exit_4(cluster):
    assert ctl(cluster.context, "drain", "atlantis", "--yes").exit_code == 4
    assert ctl(cluster.context, "mode", "atlantis", "surge", "--yes").exit_code == 4
    assert ctl(cluster.context, "agent", "logout", "nobody-99", "--yes").exit_code == 4
    assert ctl(cluster.context, "agent", "move", "nobody-99", "--group", "x", "--yes").exit_code == 4


def test_supervisor_of_lyon_cannot_drain_montreal(cluster):
    sup = cluster.sup_context
    # the binding file is read again within a second: wait until lyon serves the supervisor
    wait_for(lambda: ctl(sup, "get", "queues", "--site", "lyon").exit_code == 0, 30, "the supervisor binding")
    r = ctl(sup, "drain", "montreal", "--yes")
    assert r.exit_code == 3, (r.stdout, r.stderr)
    assert "PERMISSION_DENIED" in r.stderr
    assert sites_json(cluster.context)["montreal"]["draining"] is False  # nothing changed
    # a supervisor may read lyon; montreal refuses it: listed as denied, exit 0
    rows = {s["name"]: s for s in json.loads(ok(ctl(sup, "get", "sites", "-o", "json")))}
    assert rows["lyon"]["status"] == "ok" and rows["montreal"]["status"] == "denied"
    denied = [a for a in audit_rows(cluster.context) if a["site"] == "montreal" and a["decision"] == "deny"
              and a["identity"].endswith("/operator/lyon-sup")]
    assert any(a["method"].endswith("/SetDrain") for a in denied), denied


# ---------------------------------------------------------------- policy

def _policy_files(cluster, tmp_path) -> tuple[Path, Path, dict]:
    doc = json.loads(ok(ctl(cluster.context, "get", "policy", "-o", "json"), "get policy"))
    same = tmp_path / "same.json"
    same.write_text(json.dumps(doc["policy"]))
    changed = dict(doc["policy"])
    changed["max_peer_age_s"] = float(changed.get("max_peer_age_s", 3.0)) + 1.5
    other = tmp_path / "changed.yaml"
    other.write_text(yaml.safe_dump(changed))
    return same, other, doc


def test_policy_diff(cluster, tmp_path):
    same, other, _ = _policy_files(cluster, tmp_path)
    r = ctl(cluster.context, "policy", "diff", str(same))
    assert r.exit_code == 0 and r.stdout == "", (r.stdout, r.stderr)
    r = ctl(cluster.context, "policy", "diff", str(other))
    assert r.exit_code == 1 and "max_peer_age_s" in r.stdout, (r.stdout, r.stderr)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "default": {"wait_threshold": {"factor": "lots"}}}))
    r = ctl(cluster.context, "policy", "diff", str(bad))
    assert r.exit_code == 1 and "INVALID_POLICY" in r.stderr


def test_policy_apply_dry_run_changes_nothing(cluster, tmp_path):
    _, other, before = _policy_files(cluster, tmp_path)
    r = ctl(cluster.context, "policy", "apply", str(other), "--dry-run", "--hours", "1", "-o", "json")
    rows = json.loads(ok(r, "dry run"))
    assert {"lyon", "montreal"} <= {x["site"] for x in rows}
    assert all("before" in x and "after" in x for x in rows)
    after = json.loads(ok(ctl(cluster.context, "get", "policy", "-o", "json")))
    assert after["revision"] == before["revision"] and after["policy"] == before["policy"]


def test_policy_apply_audited(cluster, tmp_path):
    same, other, before = _policy_files(cluster, tmp_path)
    assert ctl(cluster.context, "policy", "apply", str(other)).exit_code == 64  # no --yes off a terminal
    out = ok(ctl(cluster.context, "policy", "apply", str(other), "--yes"), "apply")
    assert "revision" in out
    try:
        now = json.loads(ok(ctl(cluster.context, "get", "policy", "-o", "json")))
        assert now["revision"] > before["revision"]
        assert now["policy"]["max_peer_age_s"] == before["policy"]["max_peer_age_s"] + 1.5
        assert ctl(cluster.context, "policy", "diff", str(other)).exit_code == 0
    finally:
        ok(ctl(cluster.context, "policy", "apply", str(same), "--yes"), "restore")
    assert any(a["method"].endswith("/ApplyPolicy") for a in audit_rows(cluster.context))
    # a Lyon supervisor may not apply a cluster-wide policy
    r = ctl(cluster.sup_context, "policy", "apply", str(other), "--yes")
    assert r.exit_code == 3, (r.stdout, r.stderr)


def test_audit_formats(cluster):
    ok(ctl(cluster.context, "drain", "callpro", "--yes"))
    ok(ctl(cluster.context, "undrain", "callpro", "--yes"))
    rows = audit_rows(cluster.context, "5m")
    assert rows == sorted(rows, key=lambda a: (a["at"], a["site"]))
    assert {"at", "site", "identity", "role", "method", "decision", "reason"} <= set(rows[0])
    table = ok(ctl(cluster.context, "audit", "--since", "5m"))
    assert table.split()[:2] == ["TIME", "SITE"] and "SetDrain" in table
    assert "PEER" in ok(ctl(cluster.context, "audit", "--since", "5m", "-o", "wide"))
    assert yaml.safe_load(ok(ctl(cluster.context, "audit", "--since", "5m", "--site", "callpro", "-o", "yaml")))


def test_audit_leaves_the_routing_traffic_out_unless_all(cluster):
    """By default: operators' and partners' requests and every denial; --all adds the
    agents' and sites' allowed requests (the traffic), --limit keeps the newest."""
    ok(ctl(cluster.context, "drain", "callpro", "--yes"))
    ok(ctl(cluster.context, "undrain", "callpro", "--yes"))
    quiet = audit_rows(cluster.context, "2m")
    assert quiet and all(a["decision"] == "deny" or "/operator/" in a["identity"] or "/partner/" in a["identity"]
                         for a in quiet)
    busy = json.loads(ok(ctl(cluster.context, "audit", "--since", "2m", "--all", "--limit", "0", "-o", "json")))
    assert any("/agents/" in a["identity"] and a["method"].endswith("/OfferCall") for a in busy)
    assert len(busy) > len(quiet)
    last = json.loads(ok(ctl(cluster.context, "audit", "--since", "2m", "--all", "--limit", "5", "-o", "json")))
    assert len(last) == 5 and last == sorted(last, key=lambda a: (a["at"], a["site"]))
