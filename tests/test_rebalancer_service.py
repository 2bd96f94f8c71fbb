"""The Rebalancer service over mTLS (router.capacity.service): the permission matrix of its
three RPCs (every role, bound on "*" or only on lyon: the rebalancer acts on the whole
cluster, so only "*" bindings count), the audit of applies and refusals, plaintext refused
at the handshake, and a follower's NOT_LEADER. Real certificates, a real etcd, a real
gRPC server; the what-if planner serial."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from router.capacity.planner import WhatIfPlanner, load_streams
from router.capacity.rebalancer import Rebalancer
from router.capacity.service import serve_rebalancer
from router.config import load_sites
from router.coord import EtcdCoordinator, EtcdSettings
from router.security import bindings, permissions, pki
from router.security.spiffe import SpiffeId
from router.security.tls import ChannelFactory, TlsFiles
from router.status import error_info
from router.v1 import rebalancer_pb2, rebalancer_pb2_grpc
from test_cluster import until

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
RB = "/router.v1.Rebalancer/"
METHODS = [m for m in permissions.TABLE if m.startswith(RB)]
KIND = {"site": "site", "agent-gateway": "agents", "partner": "partner"}
DENIED = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


def holder(role: str, star: bool) -> tuple[str, str]:
    return KIND.get(role, "operator"), f"{role.replace('-', '')}-{'star' if star else 'lyon'}"


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("rb-tls")
    pki.init(d, [("lyon", "in_house")], rebalancers=("rebalancer",))
    out = []
    for role in permissions.ROLES:
        for star in (True, False):
            kind, name = holder(role, star)
            pki.issue(d, kind, name)
            out.append(bindings.Binding(identity=SpiffeId("tandem", kind, name).uri, role=role,
                                        sites=("*",) if star else ("lyon",)))
    (d / "bindings.json").write_text(bindings.dumps(bindings.Bindings(bindings=tuple(out))))
    return d


def request(method: str):
    """A request each RPC refuses after authorization, changing nothing (or a read)."""
    name = method.rsplit("/", 1)[1]
    return {
        "GetRebalancerStatus": rebalancer_pb2.GetRebalancerStatusRequest(),
        "PlanCapacity": rebalancer_pb2.PlanCapacityRequest(replications=65),  # INVALID_FIELD
        "ApplyPlan": rebalancer_pb2.ApplyPlanRequest(plan_json="not a plan"),  # INVALID_PLAN
    }[name]


@pytest.fixture
async def served(tls, etcd, etcd_prefix, tmp_path):
    coord = EtcdCoordinator("rebalancer", EtcdSettings(endpoints=tuple(etcd.endpoints), prefix=etcd_prefix, ttl_s=2))
    sites = load_sites(ROOT / "sites")
    planner = WhatIfPlanner(load_streams(None, sites), serial=True)
    rb = Rebalancer(coord, "rebalancer", sites, planner, horizon_s=600, replications=1)
    s = await serve_rebalancer(rb, "127.0.0.1:0", tls, "rebalancer", tmp_path / "rb")
    await coord.start()
    await coord.wait_ready(10)
    rb.start()
    await until(lambda: rb.leading, 10, "the rebalancer to lead")
    factories: list[ChannelFactory] = []

    def stub(kind: str, name: str) -> rebalancer_pb2_grpc.RebalancerStub:
        f = ChannelFactory(TlsFiles(tls, f"{kind}-{name}"), options=(("grpc.use_local_subchannel_pool", 1),))
        factories.append(f)
        return rebalancer_pb2_grpc.RebalancerStub(
            f.channel(f"127.0.0.1:{s.port}", SpiffeId("tandem", "rebalancer", "rebalancer")))

    yield s, rb, stub
    for f in factories:
        await f.close_all()
    await rb.stop()
    await s.stop(0.5)
    await coord.close()


async def test_matrix(served, tmp_path):
    s, rb, stub = served
    for method in METHODS:
        rule = permissions.TABLE[method]
        name = method.rsplit("/", 1)[1]
        for role in permissions.ROLES:
            for star in (True, False):
                kind, ident = holder(role, star)
                fn = getattr(stub(kind, ident), name)
                try:
                    await fn(request(method), timeout=10)
                    code, reason = grpc.StatusCode.OK, None
                except grpc.aio.AioRpcError as e:
                    info = error_info(e)
                    code, reason = e.code(), info.reason if info else None
                case = (method, role, star, code, reason)
                if role in rule.roles and star:
                    assert code not in DENIED and code != grpc.StatusCode.UNAVAILABLE, case
                    if name == "GetRebalancerStatus":
                        assert code == grpc.StatusCode.OK, case
                    else:
                        assert code == grpc.StatusCode.INVALID_ARGUMENT, case
                else:
                    want = "ROLE_FORBIDS" if role not in rule.roles else "OUT_OF_SCOPE"
                    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, want), case
    # nothing was applied by any of it
    assert (await rb.coord.rebalance_state())["generation"] is None


async def test_plaintext_is_refused_at_the_handshake(served):
    s, _, _ = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{s.port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await rebalancer_pb2_grpc.RebalancerStub(ch).GetRebalancerStatus(
                rebalancer_pb2.GetRebalancerStatusRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_an_apply_and_a_refusal_are_audited(served, tmp_path):
    s, rb, stub = served
    op = stub("operator", "operator-star")
    r = await op.PlanCapacity(rebalancer_pb2.PlanCapacityRequest(horizon_s=600, replications=1), timeout=60)
    applied = await op.ApplyPlan(rebalancer_pb2.ApplyPlanRequest(plan_json=r.plan_json), timeout=30)
    assert applied.generation == 1 and applied.fencing == rb.leadership.token
    with pytest.raises(grpc.aio.AioRpcError) as e:  # the same plan again: stale
        await op.ApplyPlan(rebalancer_pb2.ApplyPlanRequest(plan_json=r.plan_json), timeout=30)
    assert e.value.code() == grpc.StatusCode.ABORTED and error_info(e.value).reason == "STALE_PLAN"
    with pytest.raises(grpc.aio.AioRpcError) as e:  # a viewer may not apply
        await stub("operator", "viewer-star").ApplyPlan(rebalancer_pb2.ApplyPlanRequest(plan_json=r.plan_json),
                                                        timeout=30)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    rows = [r.to_dict() for r in s.audit.records() if r.method == RB + "ApplyPlan"]
    assert [(x["decision"], x["code"], x["reason"]) for x in rows] == [
        ("allow", "OK", ""), ("allow", "ABORTED", "STALE_PLAN"), ("deny", "PERMISSION_DENIED", "ROLE_FORBIDS")]
    assert rows[0]["identity"] == SpiffeId("tandem", "operator", "operator-star").uri

