"""Role bindings: identity -> role -> scope. A JSON document, in etcd under the
cluster prefix (``<prefix>security/bindings``) or in ``TLS_DIR/bindings.json``::

    {"version": 1,
     "bindings": [
       {"identity": "spiffe://tandem/operator/admin", "role": "operator", "sites": ["*"]},
       {"identity": "spiffe://tandem/agents/lyon", "role": "agent-gateway", "sites": ["lyon"]}
     ]}

Validated like the overflow policy: :func:`parse` raises :class:`BindingsError` on an
invalid document (the caller keeps the previous one). One identity may hold several
roles (several entries). Default deny: an identity without a binding may do nothing.
Pure: no I/O except :func:`load_file`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from router.security import spiffe
from router.security.permissions import ROLES

Role = Literal["viewer", "supervisor", "operator", "site", "agent-gateway", "partner"]
assert set(Role.__args__) == set(ROLES)  # type: ignore[attr-defined]


class BindingsError(ValueError):
    """The document is not valid bindings; nothing was changed."""


class Binding(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    identity: str
    role: Role
    sites: tuple[str, ...] = Field(min_length=1)

    @field_validator("identity")
    @classmethod
    def _identity(cls, v: str) -> str:
        spiffe.parse(v)  # IdentityError is a ValueError: pydantic reports it
        return v

    @field_validator("sites")
    @classmethod
    def _sites(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for s in v:
            if s != "*" and not spiffe.NAME_RE.match(s):
                raise ValueError(f"bad site {s!r} in scope (a site name or '*')")
        return v

    def covers(self, site: str) -> bool:
        return "*" in self.sites or site in self.sites


class Bindings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    bindings: tuple[Binding, ...] = ()

    def roles_of(self, identity: str) -> list[Binding]:
        return [b for b in self.bindings if b.identity == identity]


def parse(doc: str | bytes | dict) -> Bindings:
    """Validate a bindings document; BindingsError says what is wrong."""
    try:
        if isinstance(doc, (str, bytes)):
            doc = json.loads(doc)
        return Bindings.model_validate(doc)
    except (ValidationError, ValueError, TypeError) as e:
        raise BindingsError(f"invalid bindings: {e}") from None


def load_file(path: str | Path) -> Bindings:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise BindingsError(f"cannot read bindings {path}: {e}") from None
    return parse(text)


def starter(trust_domain: str, sites: Iterable[tuple[str, str]], operators: Iterable[str] = ("admin",),
            partners: Iterable[str] = ()) -> Bindings:
    """The bindings ``tandem certs init`` writes: each operator -> operator on ``*``, each
    in-house site -> site (on ``*``: it may transfer to any member), each in-house site's
    agents identity -> agent-gateway of that site; a partner site gets a site binding too
    (it runs a Tandem node today); each BPO partner on the partner API (``partners``: its
    gateway's identity) -> partner on ``*`` (it may take offers from every origin). ``sites``
    are (name, kind) pairs, kind "in_house" or "partner"."""
    out: list[Binding | None] = []
    for op in operators:
        out.append(Binding(identity=spiffe.SpiffeId(trust_domain, "operator", op).uri, role="operator", sites=("*",)))
    for name, _kind in sites:
        out.append(starter_binding(spiffe.SpiffeId(trust_domain, "site", name)))
        out.append(starter_binding(spiffe.SpiffeId(trust_domain, "agents", name)))
    for p in partners:
        out.append(starter_binding(spiffe.SpiffeId(trust_domain, "partner", p)))
    return Bindings(bindings=tuple(b for b in out if b is not None))


def starter_binding(ident: spiffe.SpiffeId) -> Binding | None:
    """The binding :func:`starter` gives one identity of a site, its agents gateway or a
    partner; None for the other kinds (an operator's role is the administrator's choice)."""
    if ident.kind == "site":
        return Binding(identity=ident.uri, role="site", sites=("*",))
    if ident.kind == "agents":
        return Binding(identity=ident.uri, role="agent-gateway", sites=(ident.name,))
    if ident.kind == "partner":
        return Binding(identity=ident.uri, role="partner", sites=("*",))
    return None


def with_binding(b: Bindings, new: Binding) -> Bindings | None:
    """``b`` plus ``new``; None when the identity already holds a binding (whatever its
    role: an administrator's edit is never overridden)."""
    if b.roles_of(new.identity):
        return None
    return Bindings(version=b.version, bindings=(*b.bindings, new))


def dumps(b: Bindings) -> str:
    return json.dumps(b.model_dump(mode="json"), indent=2) + "\n"
