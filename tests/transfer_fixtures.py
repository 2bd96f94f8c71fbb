"""Fixtures for transfer tests: two sites built from the node test site, helpers to
offer calls, list calls over both sites and reconcile them (invariant 1).

* :func:`site_pair` — origin and target site dicts (names "origin" / "target").
* :func:`list_calls` — every call a node knows (Admin.ListCalls, all pages).
* :func:`reconcile` — the cross-site check: every call owned by exactly one site, none
  lost, none duplicated, none assigned twice, "transferred" at the origin iff the target
  holds it (with the same arrival time and class).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import yaml

from node_fixtures import Stubs, site_dict
from router.config import parse_site
from router.node import convert
from router.v1 import admin_pb2, interconnect_pb2_grpc, routing_pb2, types_pb2

OWNING = {"queued", "assigned", "connected", "completed", "abandoned"}


def named_site_dict(name: str, **routing: object) -> dict:
    d = site_dict(**routing)
    d["site"]["name"] = name
    return d


def named_site(name: str, **routing: object):
    return parse_site(named_site_dict(name, **routing), f"<{name}>")


def write_named_site(path: Path, name: str, **routing: object) -> Path:
    path.write_text(yaml.safe_dump(named_site_dict(name, **routing)))
    return path


def offer_req(call_id: str, **kw) -> routing_pb2.OfferCallRequest:
    kw.setdefault("channel", types_pb2.CHANNEL_VOICE)
    kw.setdefault("skill", "billing")
    kw.setdefault("language", "fr")
    return routing_pb2.OfferCallRequest(call_id=call_id, **kw)


def interconnect(stubs: Stubs) -> interconnect_pb2_grpc.InterconnectStub:
    return interconnect_pb2_grpc.InterconnectStub(stubs.channel)


async def list_calls(stubs: Stubs) -> dict[str, types_pb2.Call]:
    out: dict[str, types_pb2.Call] = {}
    token = ""
    while True:
        r = await stubs.admin.ListCalls(admin_pb2.ListCallsRequest(page_size=1000, page_token=token), timeout=10)
        for c in r.calls:
            assert c.call_id not in out, f"{c.call_id} listed twice"
            out[c.call_id] = c
        token = r.next_page_token
        if not token:
            return out


def state(c: types_pb2.Call) -> str:
    return convert.call_state_str(c.state)


async def reconcile(origin: Stubs, target: Stubs, call_ids: list[str]) -> dict[str, str]:
    """Check invariant 1 over both sites; returns {call_id: "origin" | "target"} (the
    owner). Fails if any call is still transferring."""
    at_o, at_t = await list_calls(origin), await list_calls(target)
    owner: dict[str, str] = {}
    agents: dict[str, str] = {}
    for cid in call_ids:
        o, t = at_o.get(cid), at_t.get(cid)
        assert o is not None, f"{cid} lost: unknown at the origin"
        so = state(o)
        assert so != "transferring", f"{cid} still transferring at the origin"
        st = state(t) if t is not None else None
        assert st != "transferring" and st != "transferred", (cid, st)
        if so == "transferred":
            assert t is not None and st in OWNING, f"{cid} transferred at the origin but {st} at the target"
            assert t.offered_at == o.offered_at and t.priority_class == o.priority_class, cid
            assert t.transfer_count == o.transfer_count, cid
            owner[cid] = "target"
        else:
            assert so in OWNING, (cid, so)
            assert t is None, f"{cid} duplicated: {so} at the origin and {st} at the target"
            owner[cid] = "origin"
        c = t if owner[cid] == "target" else o
        if c.agent_id and state(c) in ("assigned", "connected"):
            assert c.agent_id not in agents or c.channel != types_pb2.CHANNEL_VOICE, (cid, c.agent_id)
            agents[c.agent_id] = cid
    return owner


async def wait_for(pred, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = await pred()
        except Exception as e:  # noqa: BLE001 - a node restarting
            got, last = None, e
        else:
            last = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s (last error: {last!r})")
        await asyncio.sleep(interval)


async def no_transferring(stubs: Stubs) -> bool:
    calls = await list_calls(stubs)
    return not any(state(c) == "transferring" for c in calls.values())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node_on(site_file: Path, data_dir: Path, port: int, *, env: dict | None = None, timeout: float = 30.0):
    """Like node_fixtures.start_node_process, on a fixed port: a restarted node keeps
    its address, which its peers recorded (a transfer's target)."""
    import os
    import re
    import subprocess

    from node_fixtures import PYTHON, REPO, NodeProc

    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"{data_dir.name}.log"
    run_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TANDEM_DRAIN_S": "1.0", **(env or {})}
    with open(log_path, "ab") as log:
        offset = log.tell()
        proc = subprocess.Popen(
            [PYTHON, "-m", "router.cli", "node", "--site", str(site_file), "--data-dir", str(data_dir),
             "--listen", f"127.0.0.1:{port}", "--sync", "none"],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=run_env,
        )
    np = NodeProc(proc, log_path, "127.0.0.1", port)
    pattern = re.compile(rb"tandem node \S+ listening on ")
    deadline = time.monotonic() + timeout
    while True:
        with open(log_path, "rb") as f:
            f.seek(offset)
            if pattern.search(f.read()):
                return np
        if not np.alive():
            raise AssertionError(f"node exited with {proc.returncode} before listening:\n{np.log()}")
        if time.monotonic() > deadline:
            np.kill()
            raise AssertionError(f"node did not listen within {timeout} s:\n{np.log()}")
        time.sleep(0.02)
