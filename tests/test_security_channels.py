"""The node's outgoing channels (router.security.tls.ChannelFactory): mTLS with the
node's identity, the server must prove the expected identity, and renewed files are
used for new channels without a restart (the old ones are retired, then closed)."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from router.security import pki
from router.security.tls import ChannelFactory, TlsConfigError, TlsFiles, server_credentials
from router.v1 import diagnostics_pb2, diagnostics_pb2_grpc


class _Echo(diagnostics_pb2_grpc.DiagnosticsServicer):
    async def Echo(self, request, context):
        return diagnostics_pb2.EchoResponse(payload=request.payload)


@pytest.fixture
async def lyon(tmp_path: Path):
    tls = tmp_path / "tls"
    pki.init(tls, [("lyon", "in_house"), ("montreal", "in_house")])
    server = grpc.aio.server()
    diagnostics_pb2_grpc.add_DiagnosticsServicer_to_server(_Echo(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(TlsFiles(tls, "site-lyon")))
    await server.start()
    yield tls, f"127.0.0.1:{port}"
    await server.stop(0)


async def echo(ch: grpc.aio.Channel) -> bytes:
    r = await diagnostics_pb2_grpc.DiagnosticsStub(ch).Echo(diagnostics_pb2.EchoRequest(payload=b"hi"), timeout=5)
    return r.payload


async def test_renewed_files_make_new_channels_and_retire_the_old(lyon):
    tls, address = lyon
    f = ChannelFactory(TlsFiles(tls, "site-montreal"), grace_s=0.0)
    try:
        first = f.channel(address, f.expect("site", "lyon"))
        assert await echo(first) == b"hi"
        assert f.channel(address, f.expect("site", "lyon")) is first  # cached while unchanged
        before = (tls / "site-montreal.crt").read_bytes()
        pki.renew(tls)
        os.utime(tls / "site-montreal.crt")  # a renewal within the same mtime tick still counts
        assert (tls / "site-montreal.crt").read_bytes() != before
        second = f.channel(address, f.expect("site", "lyon"))
        assert second is not first
        assert await echo(second) == b"hi"  # the renewed identity is accepted by the server
        await f.close_retired()  # grace 0: the retired channel is closed now
        with pytest.raises(Exception):
            await echo(first)
    finally:
        await f.close_all()


async def test_the_server_must_prove_the_expected_identity(lyon):
    tls, address = lyon
    f = ChannelFactory(TlsFiles(tls, "site-montreal"))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await echo(f.channel(address, f.expect("site", "montreal")))  # lyon answers
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(TlsConfigError):
            f.channel(address, None)  # an mTLS channel always names whom it must reach
    finally:
        await f.close_all()
