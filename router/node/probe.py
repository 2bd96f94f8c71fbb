"""``python -m router.node.probe``: wait until a node serves, over mTLS (the deploy's
health-wait: the Ansible role's handlers and ``tandem_node`` start tasks run it on the
node's host with the host's own site identity).

    python -m router.node.probe --address 10.0.0.11:7000 --site lyon \\
        --tls-dir /etc/tandem/pki --identity site-lyon --timeout 90

It asks the standard gRPC health check (``grpc.health.v1.Health/Check``, every identity
of the permission table may) until the answer is SERVING, checking that the server is
site ``--site`` (its certificate's DNS SAN), and exits 0; 1 when ``--timeout`` seconds
pass first (the last error is printed); 2 on bad arguments (missing TLS files).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path


async def wait_serving(address: str, site: str, tls_dir: Path | None, identity: str, timeout: float) -> str:
    """Until ``address`` answers SERVING as site ``site``: returns "" then, else the last
    error once ``timeout`` seconds have passed."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from router.security.tls import ChannelFactory, TlsFiles

    factory = ChannelFactory(TlsFiles(tls_dir, identity) if tls_dir is not None else None)
    deadline = time.monotonic() + timeout
    last = "no answer"
    try:
        stub = health_pb2_grpc.HealthStub(factory.channel(address, factory.expect("site", site)))
        while True:
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return ""
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
            except grpc.aio.AioRpcError as e:
                last = f"{e.code().name}: {e.details()}"
            if time.monotonic() >= deadline:
                return last
            await asyncio.sleep(0.5)
    finally:
        await factory.close_all()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m router.node.probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", required=True, help="host:port of the node's gRPC server")
    ap.add_argument("--site", required=True, help="the site the node must prove it is")
    ap.add_argument("--tls-dir", type=Path, help="ca.crt and IDENTITY.crt/.key (omit: plaintext, loopback)")
    ap.add_argument("--identity", default="", help="file stem of the client identity in --tls-dir")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    a = ap.parse_args(argv)
    if a.tls_dir is not None:
        missing = [p for p in (a.tls_dir / "ca.crt", a.tls_dir / f"{a.identity}.crt", a.tls_dir / f"{a.identity}.key")
                   if not p.is_file()]
        if not a.identity or missing:
            print(f"error: --tls-dir needs ca.crt and --identity STEM's .crt/.key; missing: "
                  f"{', '.join(map(str, missing)) or '--identity'}", file=sys.stderr)
            return 2
    err = asyncio.run(wait_serving(a.address, a.site, a.tls_dir, a.identity, a.timeout))
    if err:
        print(f"site {a.site} at {a.address} not serving after {a.timeout:g} s: {err}", file=sys.stderr)
        return 1
    print(f"site {a.site} at {a.address} serving")
    return 0


if __name__ == "__main__":
    sys.exit(main())
