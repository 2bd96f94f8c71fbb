"""The documents of rebalancing: targets per site, the fenced targets document, a plan.

A rebalancer sets three things on a site, declaratively (the whole of what it wants, not
a change): the group of some agents (``groups``: agent id -> agent group of the site
file; an agent the previous targets moved and these do not name goes back to its
site-file group), the overflow wait factor of some queues (``wait_factor``: queue ->
the factor of :class:`router.overflow.WaitThreshold`, overflow when the expected wait
exceeds factor × target), and partners closed to or opened for the site's overflow
(``partners``: partner -> open), and a contingency mode (``mode``; it applies while the
operator's mode for the site is normal: an operator's surge or emergency wins). What a
rebalancer does not name stays as the site file
and the overflow policy say.

In etcd, ``targets/<site>`` holds a :class:`TargetDoc`: the targets with the fencing
epoch of the leader that wrote them (its leader key's create revision), the cluster's
plan generation they belong to, the plan id and the revision the plan was computed from.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class PlanError(ValueError):
    """A plan or targets document that cannot be used; the message names the field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteTargets(_Model):
    """What the rebalancer wants on one site (see the module docstring)."""

    groups: dict[str, str] = Field(default_factory=dict)
    wait_factor: dict[str, float] = Field(default_factory=dict)
    partners: dict[str, bool] = Field(default_factory=dict)
    mode: Literal["normal", "surge", "emergency"] | None = None

    def model_post_init(self, _ctx: Any) -> None:
        for q, f in self.wait_factor.items():
            if not (0 < f <= 100):
                raise ValueError(f"wait_factor[{q}] must be in (0, 100], got {f}")

    @property
    def empty(self) -> bool:
        return not (self.groups or self.wait_factor or self.partners or self.mode)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class TargetDoc(_Model):
    """The JSON under ``targets/<site>``: targets written under a fencing epoch."""

    fencing: int = Field(ge=0)
    generation: int = Field(0, ge=0)
    plan: str = ""
    base_revision: int = Field(0, ge=0)
    leader: str = ""
    ts: float = 0.0
    targets: SiteTargets = SiteTargets()


class Plan(_Model):
    """A rebalancing plan: the targets of every site it changes, computed from the etcd
    state at ``base_revision`` (it cannot be applied once the targets, the policy or a
    contingency mode moved past it), with what the simulation expects.

    ``expected``: site -> {"before", "after"} service levels of the simulated horizon
    (None where the site finished no call); ``cluster``: the same for the whole cluster;
    ``cost``: {"moves" (agents), "partner_calls" (per horizon), "partner_cost" (money)};
    ``candidates``: how many the search simulated; ``candidate``: what it changed, in words.
    """

    id: str = ""
    base_revision: int = Field(ge=0)
    computed_at: float = 0.0
    leader: str = ""
    candidate: str = ""
    sites: dict[str, SiteTargets] = Field(default_factory=dict)
    expected: dict[str, dict[str, float | None]] = Field(default_factory=dict)
    cluster: dict[str, float | None] = Field(default_factory=dict)
    cost: dict[str, float] = Field(default_factory=dict)
    candidates: int = Field(0, ge=0)
    horizon_s: float = 0.0

    def with_id(self) -> "Plan":
        """This plan with ``id`` = a short hash of what it sets and where it starts from."""
        body = json.dumps({"base": self.base_revision, "sites": {s: t.to_dict() for s, t in sorted(self.sites.items())}},
                          sort_keys=True)
        return self.model_copy(update={"id": hashlib.sha256(body.encode()).hexdigest()[:12]})

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=2)


def _field(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(document)"
    return f"{loc}: {err['msg']}"


def _parse(model: type[_Model], raw: bytes | str | dict, what: str) -> Any:
    try:
        data = raw if isinstance(raw, dict) else json.loads(raw)
        return model.model_validate(data)
    except ValidationError as e:
        raise PlanError(f"{what}: {_field(e)}") from None
    except ValueError as e:
        raise PlanError(f"{what}: not JSON ({e})") from None


def parse_target_doc(raw: bytes | str | dict) -> TargetDoc:
    """A :class:`TargetDoc` from its JSON; :class:`PlanError` naming the field otherwise."""
    return _parse(TargetDoc, raw, "targets document")


def parse_plan(raw: bytes | str | dict) -> Plan:
    """A :class:`Plan` from its JSON (``tandem ctl plan --save``); :class:`PlanError`."""
    return _parse(Plan, raw, "plan")
