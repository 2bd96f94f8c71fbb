"""The Admin service of a site node: what ``tandem ctl`` and ``tandem top`` use.

Reads (status, calls, agents, members, policy, partners, alerts, audit, a call's path)
come from the engine's views, the cluster link, the audit log and the history. Actions go
where their state lives: drain and agent moves are journaled engine commands
(``set_drain``, ``move_agent``: :mod:`router.engine.staffing`), the contingency mode, the
overflow policy and the BPO partners' contracts are stored in etcd by this node on the
operator's behalf (the client never writes etcd). Authorization happens before a handler runs (the permission table in
:mod:`router.security.permissions`); every action is audited there too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import time
from typing import Any

import yaml

from router import overflow
from router.contracts import ContractError, PartnerContract, contract_json, parse_contract
from router.engine.partner import partner_of_target
from router.model import RoutingError
from router.node import convert
from router.node.errors import guard
from router.node.node import Node
from router.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger("tandem.node")

DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 1000
# Calls a ListCalls page examines at most (a sparse state filter may return a short
# page with a token to go on): bounds the time one page holds the event loop.
PAGE_SCAN_LIMIT = 20_000
MAX_POLICY_BYTES = 256 * 1024
MAX_CONTRACT_BYTES = 64 * 1024
#: how long ApplyContract waits for this node's watch to put a stored contract in force
CONTRACT_SETTLE_S = 3.0
#: queued calls a drain hands out per pass, and how long it keeps trying
DRAIN_TIMEOUT_S = 60.0
HISTORY_TIMEOUT_S = 10.0
MAX_REPLAY_CALLS = 200_000


def _encode_token(kind: str, *position: int) -> str:
    """An opaque page token: ``kind`` ("2": ListCalls, "a": ListAudit) and a position."""
    return base64.urlsafe_b64encode(":".join((kind, *map(str, position))).encode()).decode().rstrip("=")


def _decode_token(token: str, kind: str, size: int, least: int = 0) -> tuple[int, ...]:
    """The position (``size`` numbers >= ``least``) a page token of ``kind`` resumes after;
    INVALID_ARGUMENT INVALID_PAGE_TOKEN for anything this node did not issue."""
    bad = RoutingError("INVALID_ARGUMENT", "INVALID_PAGE_TOKEN", "page_token is not one this node issued",
                       field="page_token")
    if len(token) > 200:
        raise bad
    try:
        fields = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode().split(":")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise bad from None
    if fields[0] != kind or len(fields) != size + 1 or not all(f.isdigit() and len(f) <= 19 for f in fields[1:]):
        raise bad
    position = tuple(int(f) for f in fields[1:])
    if min(position) < least:
        raise bad
    return position


def _page_size(n: int) -> int:
    size = n or DEFAULT_PAGE_SIZE
    if size > MAX_PAGE_SIZE:
        raise RoutingError("INVALID_ARGUMENT", "INVALID_PAGE_SIZE", f"page_size must be 0..{MAX_PAGE_SIZE}",
                           field="page_size")
    return size


def _cluster(node: Node) -> Any:
    cluster = node.cluster
    if cluster is None:
        raise RoutingError("FAILED_PRECONDITION", "NOT_IN_CLUSTER",
                           "this node runs without etcd: there is no cluster membership or policy")
    return cluster


def _etcd_error(what: str, e: BaseException) -> RoutingError:
    return RoutingError("UNAVAILABLE", "ETCD_UNAVAILABLE", f"{what}: etcd did not answer ({e}); nothing changed")


def parse_policy_text(text: str) -> overflow.OverflowPolicy:
    """A policy document (JSON or YAML) -> a validated policy, or INVALID_POLICY."""
    if not text.strip():
        raise RoutingError("INVALID_ARGUMENT", "MISSING_FIELD", "policy is required", field="policy")
    if len(text.encode()) > MAX_POLICY_BYTES:
        raise RoutingError("INVALID_ARGUMENT", "INVALID_POLICY", f"policy is over {MAX_POLICY_BYTES} bytes",
                           field="policy")
    try:
        data = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as e:
        raise RoutingError("INVALID_ARGUMENT", "INVALID_POLICY", f"not JSON or YAML: {e}", field="policy") from None
    try:
        return overflow.parse_policy(data, "policy")
    except overflow.PolicyError as e:
        raise RoutingError("INVALID_ARGUMENT", "INVALID_POLICY", str(e), field="policy") from None


def parse_contract_text(text: str) -> PartnerContract:
    """A partner contract (JSON or YAML) -> a validated contract, or INVALID_CONTRACT."""
    if not text.strip():
        raise RoutingError("INVALID_ARGUMENT", "MISSING_FIELD", "contract is required", field="contract")
    if len(text.encode()) > MAX_CONTRACT_BYTES:
        raise RoutingError("INVALID_ARGUMENT", "INVALID_CONTRACT", f"contract is over {MAX_CONTRACT_BYTES} bytes",
                           field="contract")
    try:
        return parse_contract(text, source="contract")
    except ContractError as e:
        raise RoutingError("INVALID_ARGUMENT", "INVALID_CONTRACT", str(e), field="contract") from None


def _leaf_changes(a: Any, b: Any, path: str = "") -> list[str]:
    """``path: old -> new`` per changed leaf of two JSON documents (``path: added …``,
    ``path: removed``), sorted by path; the same lines as :func:`router.overflow.policy_changes`."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            p = f"{path}.{k}" if path else str(k)
            if k not in b:
                out.append(f"{p}: removed")
            elif k not in a:
                out.append(f"{p}: added {json.dumps(b[k], sort_keys=True)}")
            else:
                out += _leaf_changes(a[k], b[k], p)
        return out
    return [] if a == b else [f"{path}: {json.dumps(a, sort_keys=True)} -> {json.dumps(b, sort_keys=True)}"]


def contract_changes(old: PartnerContract | None, new: PartnerContract) -> list[str]:
    """What replacing ``old`` (None: no contract) by ``new`` changes, one line per changed
    leaf of their canonical JSON (defaults included), sorted by path; empty when they are
    the same contract. Pure."""
    before = json.loads(contract_json(old)) if old is not None else {}
    return _leaf_changes(before, json.loads(contract_json(new)))


def _partner_book(node: Node) -> Any:
    book = getattr(_cluster(node), "partner_book", None)
    if book is None:
        raise RoutingError("FAILED_PRECONDITION", "NOT_IN_CLUSTER",
                           "this node keeps no partner contracts (it runs without etcd)")
    return book


def _who() -> str:
    from router.security.authz import caller

    p = caller()
    return p.identity if p is not None else ""


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, node: Node) -> None:
        self.node = node
        self._drain_task: asyncio.Task | None = None

    # -- status ----------------------------------------------------------------------------

    def _queue_agents(self) -> dict[str, dict[str, int]]:
        """queue -> eligible agents by what they do now (on_contact, wrap_up, not_ready)."""
        eng = self.node.engine
        out: dict[str, dict[str, int]] = {}
        for a in eng.agents():
            if a.state == "signed_out":
                continue
            kind = "on_contact" if a.call_ids else a.state
            for q in eng.agent_queues(a.agent_id):
                d = out.setdefault(q, {})
                d[kind] = d.get(kind, 0) + 1
        return out

    @guard
    async def GetStatus(self, request, context):
        node = self.node
        eng = node.engine
        info = node.site.site
        cfg = {q.name: q for q in node.site.queues}
        per_queue = self._queue_agents()
        flow = node.flow.counts()
        queues = []
        for q in eng.queues(now=node.view_time()):
            msg = convert.queue_status_msg(q)
            sl = cfg[q.name].service_level
            msg.service_level_target = float(sl.target)
            msg.service_level_threshold_s = float(sl.threshold_s)
            agents = per_queue.get(q.name, {})
            msg.agents_on_contact = agents.get("on_contact", 0)
            msg.agents_wrap_up = agents.get("wrap_up", 0)
            msg.agents_not_ready = agents.get("not_ready", 0)
            msg.overflow_out_last_min = flow.get(("out", q.name), 0)
            msg.overflow_in_last_min = flow.get(("in", q.name), 0)
            queues.append(msg)
        mode = eng.mode()
        alerts = getattr(node, "alerts", None)
        firing = sum(1 for a in alerts.active() if a.state == "firing") if alerts is not None else 0
        msg = admin_pb2.GetStatusResponse(
            site=info.name,
            region=info.region,
            kind=info.kind,
            serving=not node.draining,
            queues=queues,
            agents_by_state={k: int(v) for k, v in eng.agents_by_state().items()},
            calls_by_state={k: int(v) for k, v in eng.counts_by_state().items()},
            draining=eng.drained,
            mode=mode["mode"],
            backoffice=mode["backoffice"],
            announcement=mode["announcement"],
            alerts_firing=firing,
            overflow_out_last_min=flow.get(("out", ""), 0),
            overflow_in_last_min=flow.get(("in", ""), 0),
        )
        applied = eng.targets_applied()
        msg.targets_generation = applied["generation"]
        msg.targets_fencing = applied["fencing"]
        msg.targets_plan = applied["plan"]
        msg.targets_pending_moves = len(eng.pending_groups())
        await node.barrier()
        msg.journal_seq = node.durable_seq
        return msg

    @guard
    async def ListCalls(self, request, context):
        size = _page_size(request.page_size)
        after = _decode_token(request.page_token, "2", 1, least=1)[0] if request.page_token else 0  # a handle
        state = convert.call_state_str(request.state) or None
        if state == "offered":
            # no call rests in "offered" (it is queued, assigned or rejected at once)
            page, after = [], 0
        else:
            # O(page): resumes after the last handle seen, scans a bounded number of calls
            page, after = self.node.engine.calls_page(state, after, size, PAGE_SCAN_LIMIT)
        msg = admin_pb2.ListCallsResponse(calls=[self._call_msg(c) for c in page])
        if after:
            msg.next_page_token = _encode_token("2", after)
        await self.node.barrier()
        return msg

    def _agent_status(self, a: Any) -> admin_pb2.AgentStatus:
        eng = self.node.engine
        return admin_pb2.AgentStatus(
            agent_id=a.agent_id, group=eng.agent_group(a.agent_id), state=convert.agent_state_enum(a.state),
            reason=a.reason, queues=eng.agent_queues(a.agent_id), call_ids=list(a.call_ids),
            state_since=a.state_since, connected=a.agent_id in self._connected(),
        )

    def _site_of_address(self, address: str) -> str:
        cluster = self.node.cluster
        if not address or cluster is None:
            return ""
        return next((name for name, m in cluster.coord.members().items() if m.address == address), "")

    def _call_msg(self, view: Any) -> Any:
        """The call as Admin answers it: with the name behind its transfer target."""
        msg = convert.call_msg(view)
        if msg.transfer_target:
            msg.transfer_target_site = (partner_of_target(msg.transfer_target)
                                        or self._site_of_address(msg.transfer_target))
        return msg

    def _connected(self) -> set[str]:
        return set(self.node.connected_agents)

    @guard
    async def ListAgents(self, request, context):
        connected = self._connected()
        eng = self.node.engine
        agents = []
        for a in eng.agents():
            agents.append(admin_pb2.AgentStatus(
                agent_id=a.agent_id, group=eng.agent_group(a.agent_id), state=convert.agent_state_enum(a.state),
                reason=a.reason, queues=eng.agent_queues(a.agent_id), call_ids=list(a.call_ids),
                state_since=a.state_since, connected=a.agent_id in connected,
            ))  # fmt: skip
        await self.node.barrier()
        return admin_pb2.ListAgentsResponse(agents=agents)

    # -- cluster ---------------------------------------------------------------------------

    @guard
    async def ListMembers(self, request, context):
        cluster = _cluster(self.node)
        coord = cluster.coord
        loads = coord.peer_loads()
        me = self.node.site.site.name
        out = []
        for name, m in sorted(coord.members().items()):
            pl = loads.get(name)
            snap = pl.snapshot if pl is not None else None
            if name == me:  # our own load is not a peer's: take it as published now
                snap, pl = cluster.snapshot(), None
            waiting = sum(q.length for q in snap.queues.values()) if snap is not None else 0
            out.append(admin_pb2.Member(
                site=name, address=m.address, kind=m.kind, region=m.region,
                accepting=snap.accepting if snap is not None else False,
                mode=snap.mode if snap is not None else coord.contingency(name).mode,
                waiting=waiting, load_age_s=pl.age_s if pl is not None else (0.0 if name == me else -1.0),
            ))  # fmt: skip
        stats = coord.stats()
        return admin_pb2.ListMembersResponse(
            members=out, policy_revision=int(stats.get("policy_revision") or 0),
            policy_error=coord.policy_error or "", etcd_connected=coord.connected,
        )  # fmt: skip

    @guard
    async def GetPolicy(self, request, context):
        coord = _cluster(self.node).coord
        return admin_pb2.GetPolicyResponse(
            policy_json=coord.policy.to_json(), revision=int(coord.stats().get("policy_revision") or 0),
            error=coord.policy_error or "",
        )  # fmt: skip

    async def _stored_policy(self) -> tuple[overflow.OverflowPolicy, int]:
        coord = _cluster(self.node).coord
        try:
            return await coord.get_policy()
        except overflow.PolicyError:
            return coord.policy, int(coord.stats().get("policy_revision") or 0)
        except Exception as e:  # noqa: BLE001 - the coordinator's errors: etcd unreachable
            raise _etcd_error("reading the policy", e) from None

    @guard
    async def DiffPolicy(self, request, context):
        new = parse_policy_text(request.policy)
        old, revision = await self._stored_policy()
        return admin_pb2.DiffPolicyResponse(
            revision=revision, changes=overflow.policy_changes(old, new), policy_json=new.to_json()
        )

    @guard
    async def ApplyPolicy(self, request, context):
        from router.coord.base import PolicyRejected

        new = parse_policy_text(request.policy)
        coord = _cluster(self.node).coord
        old, revision = await self._stored_policy()
        if request.expected_revision and request.expected_revision != revision:
            raise RoutingError("FAILED_PRECONDITION", "POLICY_CHANGED",
                               f"the stored policy is at revision {revision}, not {request.expected_revision}")
        changes = overflow.policy_changes(old, new)
        if not changes:
            return admin_pb2.ApplyPolicyResponse(revision=revision)
        try:
            stored = await coord.put_policy(new, expected_revision=revision or None)
        except PolicyRejected as e:
            raise RoutingError("FAILED_PRECONDITION", "POLICY_CHANGED", str(e)) from None
        except Exception as e:  # noqa: BLE001
            raise _etcd_error("storing the policy", e) from None
        log.warning("%s: overflow policy revision %d stored by %s (%d change(s))",
                    self.node.site.site.name, stored, _who() or "?", len(changes))
        return admin_pb2.ApplyPolicyResponse(revision=stored, changes=changes)

    # -- partner contracts -----------------------------------------------------------------

    @guard
    async def ListPartners(self, request, context):
        book = _partner_book(self.node)
        contracts, errors = book.contracts(), book.errors()
        link = getattr(self.node, "partners", None)
        gateways = link.gateways if link is not None else {}
        out = []
        for p in sorted(set(contracts) | set(errors)):
            c = contracts.get(p)
            gw = gateways.get(p)
            here = gw is not None and not gw.closed
            out.append(admin_pb2.PartnerInfo(
                partner=p, contract_json=contract_json(c) if c is not None else "",
                revision=book.revision(p) if c is not None else 0, error=errors.get(p, ""),
                connected=here, gateway=gw.name if here else "", held=book.held(p),
                cap=(c.caps.concurrent or 0) if c is not None else 0,
                connected_at=gw.connected_at if here else 0.0,
            ))  # fmt: skip
        stats = link.stats if link is not None else None
        return admin_pb2.ListPartnersResponse(
            partners=out, offered=stats.offered if stats else 0, assigned=stats.assigned if stats else 0,
        )  # fmt: skip

    async def _stored_contract(self, book: Any, partner: str) -> tuple[PartnerContract | None, int, list[str]]:
        """(the contract of ``partner`` to compare with, the stored key's revision, lines
        to add to the changes). A stored contract that does not validate is compared as
        the one in force (the watch ignores it) and always replaced."""
        try:
            raw, revision = await book.get_contract(partner)
        except Exception as e:  # noqa: BLE001 - the coordinator's errors: etcd unreachable
            raise _etcd_error("reading the contract", e) from None
        if raw is None:
            return None, 0, []
        try:
            return parse_contract(raw, partner=partner, source="stored contract"), int(revision), []
        except ContractError:
            note = f"(stored contract, revision {revision}): invalid, ignored -> replaced"
            return book.contracts().get(partner), int(revision), [note]

    @guard
    async def DiffContract(self, request, context):
        new = parse_contract_text(request.contract)
        book = _partner_book(self.node)
        old, revision, notes = await self._stored_contract(book, new.partner)
        return admin_pb2.DiffContractResponse(
            partner=new.partner, revision=revision, changes=notes + contract_changes(old, new),
            contract_json=contract_json(new),
        )  # fmt: skip

    @guard
    async def ApplyContract(self, request, context):
        new = parse_contract_text(request.contract)
        book = _partner_book(self.node)
        p = new.partner
        old, revision, notes = await self._stored_contract(book, p)
        if request.expected_revision and request.expected_revision != revision:
            raise RoutingError("FAILED_PRECONDITION", "CONTRACT_CHANGED",
                               f"the stored contract of {p} is at revision {revision}, not {request.expected_revision}")
        changes = notes + contract_changes(old, new)
        if not changes:
            return admin_pb2.ApplyContractResponse(partner=p, revision=revision)
        stored = await _put_contract(book, new, revision)
        log.warning("%s: contract of partner %s revision %d stored by %s (%d change(s))",
                    self.node.site.site.name, p, stored, _who() or "?", len(changes))
        # this node applies it from its watch: wait (bounded) so a read right after sees it
        deadline = time.monotonic() + CONTRACT_SETTLE_S
        while book.revision(p) < stored and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return admin_pb2.ApplyContractResponse(partner=p, revision=stored, changes=changes)

    # -- replay input ---------------------------------------------------------------------

    @guard
    async def GetReplayInput(self, request, context):
        node = self.node
        since = request.since_s
        if not math.isfinite(since) or since <= 0:
            raise RoutingError("INVALID_ARGUMENT", "INVALID_SINCE", "since_s must be a Unix time > 0",
                               field="since_s")
        if node.history is None:
            raise RoutingError("UNAVAILABLE", "HISTORY_OFF", "this node keeps no history (--history off)")
        from router.history.replay import recent_arrivals

        try:
            rows = await node.history.query(lambda store: recent_arrivals(store, since), timeout_s=HISTORY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RoutingError("UNAVAILABLE", "HISTORY_UNAVAILABLE", "the history did not answer in time") from None
        except Exception as e:  # noqa: BLE001 - the store's errors
            raise RoutingError("UNAVAILABLE", "HISTORY_UNAVAILABLE", f"the history failed: {e}") from None
        calls = [admin_pb2.ReplayCall(
            call_id=r["call_id"], offered_at=float(r["at"]), skill=r["skill"],
            channel=convert.channel_enum(r["channel"]), language=r.get("language") or "",
            caller=r.get("caller") or "", customer_id=r.get("customer_id") or "",
            handle_s=float(r.get("handle_s") or 0.0), waited_s=float(r.get("waited_s") or 0.0),
            outcome=r.get("outcome") or "", origin_site=r.get("site") or "",
            priority_class=r.get("priority_class") or "",
        ) for r in rows[:MAX_REPLAY_CALLS]]  # fmt: skip
        text = yaml.safe_dump(node.site.model_dump(mode="json", exclude_none=True), sort_keys=False)
        return admin_pb2.GetReplayInputResponse(site_yaml=text, calls=calls)

    # -- actions ---------------------------------------------------------------------------

    @guard
    async def SetDrain(self, request, context):
        node = self.node
        was = node.engine.drained
        await node.execute({"op": "set_drain", "t": node.now(), "draining": bool(request.draining)})
        cluster = node.cluster
        if request.draining != was:
            log.warning("%s: %s by %s", node.site.site.name, "drained" if request.draining else "undrained",
                        _who() or "?")
            if cluster is not None:
                cluster.coord.publish_load(cluster.snapshot())  # "not accepting" at once
        if request.draining and cluster is not None:
            self._start_handing_out()
        elif not request.draining and self._drain_task is not None:
            self._drain_task.cancel()  # the calls not handed out yet stay here
        return admin_pb2.SetDrainResponse(
            draining=node.engine.drained, changed=request.draining != was,
            queued=node.engine.counts_by_state().get("queued", 0),
        )

    def _start_handing_out(self) -> None:
        """Hand the queued calls to in-house members that accept transfers (partners get
        only what their contract sends them: the overflow policy, not a drain)."""
        if self._drain_task is not None and not self._drain_task.done():
            return
        self._drain_task = asyncio.get_running_loop().create_task(self._hand_out(), name="operator-drain")

    async def _hand_out(self) -> None:
        node = self.node
        cluster = node.cluster
        try:
            loads = cluster.coord.peer_loads()
            targets = [
                name for name, m in sorted(cluster.coord.members().items())
                if name != node.site.site.name and m.kind != "partner"
                and (loads.get(name) is None or loads[name].snapshot.accepting)
            ]  # fmt: skip
            if not targets or not node.engine.calls("queued"):
                return
            res = await node.transfers.drain(targets, DRAIN_TIMEOUT_S, refuse_new=False)
            log.info("%s: drain handed out %d call(s), %d stay (%s)", node.site.site.name, res.moved,
                     res.remaining, res.declined)
        except Exception:  # noqa: BLE001 - the calls stay queued here: still served locally
            log.exception("%s: handing out the queued calls failed", node.site.site.name)

    @guard
    async def SetMode(self, request, context):
        node = self.node
        mode = request.mode
        if mode not in ("normal", "surge", "emergency"):
            raise RoutingError("INVALID_ARGUMENT", "INVALID_MODE", "mode must be normal, surge or emergency",
                               field="mode")
        if len(request.announcement) > 256:
            raise RoutingError("INVALID_ARGUMENT", "INVALID_FIELD", "announcement is over 256 characters",
                               field="announcement")
        before = node.engine.mode()
        cluster = node.cluster
        if cluster is None:
            res = await node.execute({"op": "set_mode", "t": node.now(), "mode": mode,
                                      "backoffice": request.backoffice, "announcement": request.announcement})
            return admin_pb2.SetModeResponse(mode=res["mode"], backoffice=res["backoffice"],
                                             announcement=res["announcement"], changed=res != before)
        # In a cluster the mode lives in etcd (the overflow policy reads it); back-office
        # agents and the default announcement follow the policy's settings of the mode.
        from router.overflow import ContingencyState

        site = node.site.site.name
        state = ContingencyState(mode=mode, announcement=request.announcement or None, set_by=_who()[:100],
                                 set_at=time.time())
        current = cluster.coord.contingency(site)
        changed = (current.mode, current.announcement) != (state.mode, state.announcement)
        if changed:
            try:
                await cluster.coord.set_contingency(site, state)
            except Exception as e:  # noqa: BLE001
                raise _etcd_error("storing the mode", e) from None
            # the node applies it from its watch: wait (bounded) to answer what is in force
            deadline = time.monotonic() + 3.0
            while node.engine.mode()["mode"] != mode and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        now = node.engine.mode()
        return admin_pb2.SetModeResponse(mode=now["mode"], backoffice=now["backoffice"],
                                         announcement=now["announcement"], changed=changed)

    @guard
    async def MoveAgent(self, request, context):
        node = self.node
        if not request.agent_id:
            raise RoutingError("INVALID_ARGUMENT", "MISSING_FIELD", "agent_id is required", field="agent_id")
        previous = node.engine.agent_group(request.agent_id)  # NOT_FOUND UNKNOWN_AGENT
        await node.execute({"op": "move_agent", "t": node.now(), "agent_id": request.agent_id,
                            "group": request.group})
        a = node.engine.agent(request.agent_id)
        return admin_pb2.MoveAgentResponse(agent=self._agent_status(a), previous_group=previous,
                                           changed=previous != node.engine.agent_group(request.agent_id))

    # -- alerts, audit ---------------------------------------------------------------------

    @guard
    async def ListAlerts(self, request, context):
        alerts = getattr(self.node, "alerts", None)
        out = []
        for a in (alerts.active() if alerts is not None else []):
            out.append(admin_pb2.Alert(
                name=a.name, severity=a.severity, site=a.site, labels=dict(a.labels), state=a.state,
                since=a.since, value=a.value if math.isfinite(a.value) else 0.0, summary=a.summary,
            ))  # fmt: skip
        return admin_pb2.ListAlertsResponse(alerts=out)

    @guard
    async def ListAudit(self, request, context):
        size = _page_size(request.page_size)
        if not math.isfinite(request.since) or request.since < 0:
            raise RoutingError("INVALID_ARGUMENT", "INVALID_SINCE", "since must be a Unix time >= 0", field="since")
        after = _decode_token(request.page_token, "a", 2) if request.page_token else None
        security = self.node.security
        audit = getattr(security, "audit", None) if security is not None else None
        if audit is None:
            return admin_pb2.ListAuditResponse()  # plaintext node: no audit log

        def keep(r) -> bool:
            return r.decision != "allow" or not _traffic_identity(r.identity)

        page, resume = await audit.page(size, after, since=request.since or None,
                                        keep=keep if request.exclude_traffic else None)
        msg = admin_pb2.ListAuditResponse(entries=[admin_pb2.AuditEntry(
            id=r.id, at=r.at, site=r.site, identity=r.identity, role=r.role, method=r.method,
            objects=dict(r.objects), decision=r.decision, reason=r.reason, code=r.code, peer=r.peer,
        ) for r in page])  # fmt: skip
        if resume is not None:
            msg.next_page_token = _encode_token("a", *resume)
        return msg

    # -- a call's path ---------------------------------------------------------------------

    @guard
    async def DescribeCall(self, request, context):
        node = self.node
        cid = request.call_id
        if not cid:
            raise RoutingError("INVALID_ARGUMENT", "MISSING_FIELD", "call_id is required", field="call_id")
        site = node.site.site.name
        events: list[admin_pb2.CallEvent] = []
        msg = admin_pb2.DescribeCallResponse()
        try:
            view = node.engine.call(cid)
        except RoutingError:
            view = None
        if view is not None:
            msg.call.CopyFrom(self._call_msg(view))
            events += call_events(view, site, self._site_of_address(view.transfer_target))
        decisions = []
        cluster = node.cluster
        if cluster is not None:
            decisions = [d for d in list(cluster.decisions) if d.get("call_id") == cid]
        rows: list[dict] = []
        if node.history is not None:
            from router.history.calls import call_path

            try:
                rows = await node.history.query(lambda store: call_path(store, cid), timeout_s=HISTORY_TIMEOUT_S)
                msg.history = True
            except Exception as e:  # noqa: BLE001 - the node's own records still answer
                log.warning("%s: history look-up of call %s failed: %s", site, cid, e)
        # Each node tells its own site's part (a shared ClickHouse holds every site's rows).
        rows = [r for r in rows if r["site"] == site]
        exact = list(decisions)  # the node's memory has exact times and every figure
        for r in rows:
            if r["kind"] == "outcome" and view is not None:
                continue  # the engine's record says the same, to the millisecond
            if r["kind"] == "decision":
                # the history keeps whole seconds: the offer's decision is at the offer,
                # an overflow decision at the time the node's memory has for it
                if r["seq"] == 0 and view is not None:
                    r = {**r, "at": view.offered_at}
                else:
                    twin = next((d for d in exact if d.get("rule") == r["rule"]
                                 and int(d.get("t", 0.0)) == int(r["at"])), None)
                    if twin is not None:
                        exact.remove(twin)
                        r = {**r, "at": float(twin.get("t", r["at"]))}
            events.append(history_event(r))
        if not any(r["kind"] == "decision" for r in rows):  # no history (yet): the memory
            for d in decisions:
                events.append(decision_event(d, site))
        if view is None and not events:
            raise RoutingError("NOT_FOUND", "UNKNOWN_CALL", f"call {cid} is unknown to site {site}", call_id=cid)
        events = _dedupe(events)
        events.sort(key=lambda e: (e.at, _ORDER.get(e.kind, 50)))
        msg.events.extend(events)
        return msg


async def _put_contract(book: Any, contract: PartnerContract, revision: int) -> int:
    """Store ``contract`` (canonical JSON, as :meth:`PartnerBook.put_contract` writes it)
    if its key is still at ``revision`` (0: still absent), in one etcd transaction, like
    ``EtcdCoordinator.put_policy``; returns the new revision. CONTRACT_CHANGED when the
    key moved, ETCD_UNAVAILABLE when etcd does not answer (nothing stored)."""
    from aetcd import transactions as tx

    from router.coord.session import to_bytes

    key, value = to_bytes(book.keys.partner_contract(contract.partner)), to_bytes(contract_json(contract))
    compare = [tx.Mod(key) == revision] if revision else [tx.Create(key) == 0]
    try:
        ok, resp = await book.coord.link.run(
            "put contract", lambda c: c.transaction(compare=compare, success=[tx.Put(key, value)], failure=[]))
    except Exception as e:  # noqa: BLE001 - the coordinator's errors: etcd unreachable
        raise _etcd_error("storing the contract", e) from None
    if not ok:
        raise RoutingError("FAILED_PRECONDITION", "CONTRACT_CHANGED",
                           f"the contract of {contract.partner} changed meanwhile (it was at revision {revision}): "
                           "nothing stored, diff again")
    return int(resp[0].response_put.header.revision)


def _traffic_identity(identity: str) -> bool:
    """An identity whose allowed requests are the routing traffic (site, agents)."""
    parts = identity.split("/")
    return identity.startswith("insecure:") or (len(parts) >= 5 and parts[3] in ("site", "agents"))


_ORDER = {"offered": 0, "decision": 1, "queued": 2, "overflow": 3, "transfer": 4, "assigned": 5,
          "answered": 6, "completed": 7, "abandoned": 7, "rejected": 7, "transferred": 7}


def _dedupe(events: list) -> list:
    seen, out = set(), []
    for e in events:
        key = (round(e.at, 3), e.site, e.kind, e.summary)
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def _ev(at: float, site: str, kind: str, summary: str, detail: dict | None = None) -> admin_pb2.CallEvent:
    return admin_pb2.CallEvent(at=float(at), site=site, kind=kind, summary=summary,
                               detail_json=json.dumps(detail or {}, sort_keys=True, default=str))


def call_events(v: Any, site: str, target_site: str = "") -> list:
    """The steps a call record shows at this site (``target_site``: the site a transfer
    went to, when known)."""
    out = []
    came = f" (transferred from {v.transfer_origin})" if v.transfer_origin else ""
    # a call taken over from another site keeps its first arrival time: its step here
    # is when it was queued here
    out.append(_ev(v.queued_at if v.transfer_origin and v.queued_at else v.offered_at, site, "offered",
                   f"offered at {site}{came}: {v.channel} {v.skill}{'/' + v.language if v.language else ''}, "
                   f"class {v.priority_class or '-'}",
                   {"caller": v.caller, "customer_id": v.customer_id, "priority_class": v.priority_class}))
    if v.queued_at:
        out.append(_ev(v.queued_at, site, "queued", f"queued in {v.queue}", {"queue": v.queue}))
    if v.transfer_target:
        out.append(_ev(v.ended_at or v.queued_at, site, "transfer",
                       f"transfer to {target_site or v.transfer_target}: {v.transfer_phase}",
                       {"target": v.transfer_target, "target_site": target_site, "phase": v.transfer_phase,
                        "transfer_count": v.transfer_count}))
    if v.answered_at:
        out.append(_ev(v.answered_at, site, "answered", f"answered by {v.agent_id} at {site}",
                       {"agent_id": v.agent_id, "wait_s": round(v.answered_at - v.offered_at, 3)}))
    elif v.agent_id and v.state == "assigned":
        out.append(_ev(v.queued_at, site, "assigned", f"ringing at {v.agent_id}", {"agent_id": v.agent_id}))
    if v.ended_at and v.state in ("completed", "abandoned", "rejected", "transferred"):
        why = v.abandon_reason or v.reject_reason or v.wrap_up_code
        out.append(_ev(v.ended_at, site, v.state, f"{v.state} at {site}" + (f" ({why})" if why else ""),
                       {"resolved": v.resolved, "csat": v.csat, "reason": why}))
    return out


def decision_event(d: dict, site: str) -> admin_pb2.CallEvent:
    """A cluster overflow decision (``Decision.to_record()`` + ``t``)."""
    target = d.get("target") or ""
    verdict = f"overflow to {target}/{d.get('target_queue') or ''}" if target else "stay"
    cands = ", ".join(
        f"{c.get('site')}{'' if c.get('eligible', True) else '(x)'}" for c in d.get("candidates", [])
    )
    return _ev(d.get("t", 0.0), d.get("site") or site, "decision",
               f"rule {d.get('rule')}: {verdict} — {d.get('reason', '')}" + (f" [candidates: {cands}]" if cands else ""),
               {k: d.get(k) for k in ("rule", "reason", "mode", "figures", "candidates", "target", "target_queue")})


def history_event(r: dict) -> admin_pb2.CallEvent:
    """A row of :func:`router.history.replay.call_path`: ``kind`` "decision" (a
    routing_decisions row) or "outcome" (an interactions row)."""
    if r.get("kind") == "decision":
        cands = list(zip(r.get("candidates", []), r.get("candidate_waits_s", [])))
        c_txt = ", ".join(f"{c} ({w:.1f} s)" for c, w in cands)
        summary = (f"rule {r['rule']}: {r['target_kind']} {r['target']} — {r['reason']}"
                   + (f" [candidates: {c_txt}]" if c_txt else ""))
        try:
            details = json.loads(r.get("details") or "{}")
        except ValueError:
            details = {"raw": r.get("details")}
        return _ev(r["at"], r["site"], "decision", summary,
                   {"seq": r.get("seq"), "rule": r["rule"], "target_kind": r["target_kind"], "target": r["target"],
                    "candidates": r.get("candidates", []), "candidate_waits_s": r.get("candidate_waits_s", []),
                    "expected_wait_s": r.get("expected_wait_s"), "details": details})
    outcome = r.get("outcome", "")
    who = f" by {r['agent_id']}" if r.get("agent_id") else ""
    return _ev(r.get("ended_at") or r.get("at", 0.0), r["site"], outcome or "outcome",
               f"{outcome}{who} at {r['site']} (waited {float(r.get('wait_s', 0)):.0f} s, "
               f"handled {float(r.get('handle_s', 0)):.0f} s)",
               {k: r.get(k) for k in ("queue", "agent_id", "wait_s", "talk_s", "handle_s", "csat", "resolved",
                                      "origin_site", "transfer_count")})
