"""router.local.nodes: nodes start from a process that already runs gRPC threads (no
preexec_fn between fork and exec), and die with the process that started them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A parent that runs grpc.aio (server and client threads) before it starts a node, then
# reports the node's pid and waits to be killed.
_PARENT = r"""
import asyncio, json, sys, time
from pathlib import Path
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from router.local.nodes import spawn_node, wait_listening

async def grpc_busy():
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return server

async def main():
    server = await grpc_busy()
    nodes = [spawn_node(Path(sys.argv[1]), Path(sys.argv[2]) / f"n{i}") for i in range(3)]
    wait_listening(nodes, 60)
    print(json.dumps({"pids": [n.pid for n in nodes], "alive": [n.alive() for n in nodes]}), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_nodes_start_under_grpc_threads_and_die_with_their_parent(tmp_path):
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(REPO / "sites" / "callpro.yaml"), str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        line = parent.stdout.readline()
        assert line, f"parent failed:\n{parent.stderr.read()[-3000:] if parent.poll() is not None else ''}"
        info = json.loads(line)
        assert all(info["alive"]), info
        # Every node runs (none crashed after fork), and nothing logged a segfault.
        for i, pid in enumerate(info["pids"]):
            assert _alive(pid), pid
            assert "listening on" in (tmp_path / f"n{i}" / "node.log").read_text()
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in info["pids"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [p for p in info["pids"] if _alive(p)]
        assert not left, f"nodes outlived their parent: {left}"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for f in (parent.stdout, parent.stderr):
            f.close()


def test_pdeathsig_argv_wraps_the_command():
    from router.local.nodes import pdeathsig_argv

    argv = pdeathsig_argv(["/bin/true"])
    assert argv[-1] == "/bin/true"
    assert subprocess.run(argv, timeout=10).returncode == 0
