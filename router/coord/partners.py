"""BPO partners in etcd: their contracts, their token keys, and their caps counted for the
whole cluster (every origin node together).

    book = PartnerBook(coord)            # before coord.start(): it adds its watches
    book.contracts()                     # {partner: PartnerContract} in force
    await book.acquire("blueline", "c-17", contract, time.time())   # or CapReached
    await book.release("blueline", "c-17")

**Contracts** live under ``partners/contracts/<p>`` (keys in :mod:`router.coord.keys`).
:meth:`put_contract` validates before it writes (ContractRejected: nothing written); the
watcher validates again and keeps the previous contract of that partner in force when the
stored value is invalid (:meth:`errors` says why), so a bad write with etcdctl cannot open
a partner to work it never agreed to.

**Caps for the whole cluster.** Every origin that offers a call to a partner first takes,
in ONE etcd transaction, a concurrency slot and a unit of each rate counter:

* a slot is a key ``partners/slots/<p>/<i>`` for some free ``i < caps.concurrent``
  (compare: the key does not exist), holding the origin's site and the call id, until
  the call's outcome, hand-back, decline, timeout or abort releases it;
* the counters ``partners/rate/<p>/{s,h,d}/<bucket>`` (this second, this hour, this local
  day in the contract's time zone) are compared on their current value and incremented.

Two origins racing for the last slot or the last unit of a counter cannot both succeed:
etcd serializes the transactions and the loser's compare fails (it re-reads and finds the
cap reached). So the caps hold across any number of origins, whatever each one believes.
Restarts: slots are **not** on a session lease, so a node that dies keeps its calls'
slots; the partner still has those calls. When it is back, :meth:`reconcile` releases the
slots of its calls that its journal shows are no longer with the partner (aborted while
it was down, or decided as it restarted). Counters carry a lease of their own, granted
with the bucket's length, so they expire whatever happens to their writers. When etcd is
unreachable no slot can be taken: the origin offers nothing to partners (the caps hold;
calls stay queued in-house).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Iterable
from typing import Any

from aetcd import transactions as tx

from router.contracts import ContractError, PartnerContract, contract_json, parse_contract, rate_buckets
from router.coord.base import CoordinationUnavailable
from router.coord.session import to_bytes as _b

log = logging.getLogger("tandem.coord.partners")

#: How long a rate counter outlives its bucket (its own lease).
RATE_TTL_S = {"s": 5, "h": 3600 + 60, "d": 2 * 86400}
RATE_NAMES = {"s": "per_second", "h": "per_hour", "d": "per_day"}
MAX_ATTEMPTS = 8


class CapReached(Exception):
    """The partner is at one of its caps now: ``reason`` says which (offer nothing)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ContractRejected(ValueError):
    """A contract that cannot be stored (invalid); nothing was written."""


class PartnerBook:
    """Contracts, token keys and caps of every partner, for one node (``coord``: its
    :class:`router.coord.etcd.EtcdCoordinator`)."""

    def __init__(self, coord: Any) -> None:
        self.coord = coord
        self.site: str = coord.site
        self.keys = coord.keys
        self._contracts: dict[str, PartnerContract] = {}
        self._revisions: dict[str, int] = {}
        self._errors: dict[str, str] = {}
        self._slots: dict[str, dict[str, bytes]] = {}  # partner -> {slot key: value}
        self._token_keys: dict[str, bytes] = {}
        self._cbs: list[Callable[[dict[str, PartnerContract]], None]] = []
        coord.watch_prefix("partner-contracts", self.keys.partner_contracts_prefix,
                           self._contracts_reset, self._contracts_event)
        coord.watch_prefix("partner-slots", self.keys.partner_slots_prefix, self._slots_reset, self._slots_event)

    # --- contracts -----------------------------------------------------------------------

    def contracts(self) -> dict[str, PartnerContract]:
        return dict(self._contracts)

    def errors(self) -> dict[str, str]:
        """partner -> why its stored contract is ignored (the previous one stays)."""
        return dict(self._errors)

    def revision(self, partner: str) -> int:
        return self._revisions.get(partner, 0)

    def on_contracts(self, cb: Callable[[dict[str, PartnerContract]], None]) -> None:
        self._cbs.append(cb)

    def _partner_of(self, key: str) -> str | None:
        p = self.keys.partner_contracts_prefix
        return key[len(p):] if key.startswith(p) and "/" not in key[len(p):] else None

    def _apply(self, partner: str, raw: bytes, revision: int) -> bool:
        try:
            c = parse_contract(raw, partner=partner, source=f"partners/contracts/{partner}@{revision}")
        except ContractError as e:
            if self._errors.get(partner) != str(e):
                log.error("ignoring the stored contract of %s, the previous one stays in force: %s", partner, e)
            self._errors[partner] = str(e)
            return False
        self._errors.pop(partner, None)
        changed = self._contracts.get(partner) != c
        self._contracts[partner], self._revisions[partner] = c, revision
        if changed:
            log.info("contract of partner %s in force: revision %d", partner, revision)
        return changed

    def _notify(self) -> None:
        for cb in self._cbs:
            try:
                cb(self.contracts())
            except Exception:  # noqa: BLE001 - a listener's bug must not stop the watch
                log.exception("contract listener failed")

    def _contracts_reset(self, kvs: dict[str, Any]) -> None:
        seen = set()
        for key, kv in kvs.items():
            p = self._partner_of(key)
            if p is not None:
                seen.add(p)
                self._apply(p, kv.value, kv.mod_revision)
        for p in set(self._contracts) - seen:
            del self._contracts[p]
        for p in set(self._errors) - seen:
            del self._errors[p]
        self._notify()

    def _contracts_event(self, put: bool, key: str, kv: Any) -> None:
        p = self._partner_of(key)
        if p is None:
            return
        if put:
            if self._apply(p, kv.value, kv.mod_revision):
                self._notify()
        else:
            log.warning("contract of partner %s deleted: it receives nothing now", p)
            self._contracts.pop(p, None)
            self._errors.pop(p, None)
            self._notify()

    async def put_contract(self, text: str | bytes, *, partner: str | None = None) -> int:
        """Validate and store a contract (JSON or YAML); returns the revision.
        ContractRejected when it is invalid (nothing written)."""
        try:
            c = parse_contract(text, partner=partner, source="contract")
        except ContractError as e:
            raise ContractRejected(str(e)) from None
        key, value = _b(self.keys.partner_contract(c.partner)), _b(contract_json(c))
        put = await self.coord.link.run("put contract", lambda cl: cl.put(key, value))
        return put.header.revision

    async def get_contract(self, partner: str) -> tuple[bytes | None, int]:
        key = _b(self.keys.partner_contract(partner))
        got = await self.coord.link.run("get contract", lambda cl: cl.get(key))
        return (None, 0) if got is None else (got.value, got.mod_revision)

    # --- token keys ----------------------------------------------------------------------

    async def token_key(self, partner: str) -> bytes:
        """The partner's token key: read, or created once (create-if-absent) by the first
        node that needs it, so every origin gives a caller the same token."""
        k = self._token_keys.get(partner)
        if k is not None:
            return k
        key = _b(self.keys.partner_token_key(partner))
        fresh = _b(os.urandom(32).hex())
        ok, resp = await self.coord.link.run(
            "token key",
            lambda cl: cl.transaction(compare=[tx.Create(key) == 0], success=[tx.Put(key, fresh)],
                                      failure=[tx.Get(key)]),
        )  # fmt: skip
        raw = fresh if ok else resp[0][0][0]
        k = bytes.fromhex(raw.decode())
        self._token_keys[partner] = k
        return k

    # --- caps ----------------------------------------------------------------------------

    def held(self, partner: str) -> int:
        """Slots of ``partner`` held now by every origin (from the watch: advice for
        overflow decisions; :meth:`acquire` is what enforces the cap)."""
        return len(self._slots.get(partner, ()))

    def _slot_partner(self, key: str) -> str | None:
        rest = key[len(self.keys.partner_slots_prefix):] if key.startswith(self.keys.partner_slots_prefix) else ""
        p, _, i = rest.partition("/")
        return p if p and i.isdigit() else None

    def _slots_reset(self, kvs: dict[str, Any]) -> None:
        self._slots = {}
        for key, kv in kvs.items():
            p = self._slot_partner(key)
            if p is not None:
                self._slots.setdefault(p, {})[key] = kv.value

    def _slots_event(self, put: bool, key: str, kv: Any) -> None:
        p = self._slot_partner(key)
        if p is None:
            return
        if put:
            self._slots.setdefault(p, {})[key] = kv.value
        else:
            self._slots.get(p, {}).pop(key, None)

    def _value(self, call_id: str) -> bytes:
        return _b(json.dumps({"call_id": call_id, "site": self.site}, sort_keys=True, separators=(",", ":")))

    async def acquire(self, partner: str, call_id: str, contract: PartnerContract, now: float) -> None:
        """Take a concurrency slot and a unit of every rate counter of ``partner`` for
        ``call_id``, all or nothing. CapReached when a cap is reached;
        CoordinationUnavailable when etcd does not answer (nothing taken, or — if the
        answer was lost — a slot that :meth:`release` or :meth:`reconcile` frees)."""
        caps = contract.caps
        tz = contract.hours.tz if contract.hours is not None else "UTC"
        buckets = rate_buckets(now, tz)
        limits = {u: getattr(caps, RATE_NAMES[u]) for u in ("s", "h", "d")}
        rate_keys = {u: self.keys.partner_rate(partner, u, buckets[u]) for u, lim in limits.items() if lim is not None}
        n_slots = caps.concurrent or 0
        mine = self._value(call_id)
        link = self.coord.link
        for _ in range(MAX_ATTEMPTS):
            compare: list = []
            success: list = []
            if n_slots:
                prefix = _b(self.keys.partner_slots(partner))
                rng = await link.run("get partner slots", lambda cl: cl.get_prefix(prefix))
                taken = {kv.key.decode(): kv.value for kv, *_ in _kvs(rng)}
                if mine in taken.values():
                    return  # already ours (a retry after a lost answer)
                free = [k for i in range(n_slots) if (k := self.keys.partner_slot(partner, i)) not in taken]
                if len(taken) >= n_slots or not free:
                    raise CapReached(f"concurrent cap ({n_slots}) reached")
                slot = _b(random.choice(free))
                compare.append(tx.Create(slot) == 0)
                success.append(tx.Put(slot, mine))
            for u, key in rate_keys.items():
                k = _b(key)
                got = await link.run("get partner rate", lambda cl: cl.get(k))
                count = int(got.value) if got is not None else 0
                if count >= limits[u]:
                    raise CapReached(f"{RATE_NAMES[u].replace('_', ' ')} cap ({limits[u]}) reached")
                if got is not None:
                    compare.append(tx.Value(k) == got.value)
                    success.append(tx.Put(k, _b(str(count + 1)), lease=got.lease or None))
                else:
                    ttl = RATE_TTL_S[u]
                    lease = await link.run("rate lease", lambda cl: cl.lease(ttl))
                    compare.append(tx.Create(k) == 0)
                    success.append(tx.Put(k, b"1", lease=lease.id))
            if not compare:
                return
            ok, _ = await link.run("take partner slot", lambda cl: cl.transaction(compare=compare, success=success, failure=[]))
            if ok:
                return
        raise CapReached("caps contended (try later)")

    async def release(self, partner: str, call_id: str) -> bool:
        """Free the slot ``call_id`` holds (if any); True when one was freed. Idempotent."""
        mine = self._value(call_id)
        prefix = _b(self.keys.partner_slots(partner))
        rng = await self.coord.link.run("get partner slots", lambda cl: cl.get_prefix(prefix))
        freed = False
        for kv, *_ in _kvs(rng):
            if kv.value == mine:
                k = kv.key
                ok, _ = await self.coord.link.run(
                    "free partner slot",
                    lambda cl: cl.transaction(compare=[tx.Value(k) == mine], success=[tx.Delete(k)], failure=[]),
                )  # fmt: skip
                freed = freed or ok
        return freed

    async def reconcile(self, keep: Callable[[str, str], bool]) -> int:
        """After a restart: free every slot of this site whose call ``keep(partner,
        call_id)`` says is no longer with the partner. Returns how many were freed."""
        prefix = _b(self.keys.partner_slots_prefix)
        rng = await self.coord.link.run("get partner slots", lambda cl: cl.get_prefix(prefix))
        freed = 0
        for kv, *_ in _kvs(rng):
            p = self._slot_partner(kv.key.decode())
            try:
                v = json.loads(kv.value)
            except ValueError:
                continue
            if p is None or v.get("site") != self.site or keep(p, v.get("call_id", "")):
                continue
            if await self.release(p, v["call_id"]):
                freed += 1
        return freed


def _kvs(rng: Any) -> Iterable[tuple[Any]]:
    """aetcd range results iterate as KeyValue objects; tuples keep ``for kv, *_`` uniform."""
    for item in rng or ():
        yield (item,) if not isinstance(item, tuple) else item


__all__ = ["CapReached", "ContractRejected", "PartnerBook", "CoordinationUnavailable"]
