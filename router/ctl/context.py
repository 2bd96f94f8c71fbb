"""Contexts: where the cluster is and as whom to reach it (kubeconfig-like).

A context file is YAML::

    current-context: local
    contexts:
      local:
        sites: {lyon: "127.0.0.1:40111", montreal: "127.0.0.1:40112"}   # gRPC addresses
        tls-dir: /abs/path/tls        # ca.crt and IDENTITY.crt/.key (tandem certs init)
        identity: operator-admin      # file stem in tls-dir; null with plaintext nodes
        metrics: {lyon: "127.0.0.1:40211"}   # Prometheus endpoints (optional)
        data-dir: /abs/path           # the cluster's data dir, when tandem up made it

The ``sites`` map is a seed list: clients also discover members through the nodes.
Which file is used: ``--context FILE`` over ``$TANDEM_CONTEXT`` over the user config dir
(``<typer app dir "tandem">/config.yaml``) — flags over environment over file.
Relative paths in a file are relative to the file's directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ENV = "TANDEM_CONTEXT"


class ContextError(ValueError):
    """No usable context: missing file, invalid YAML, unknown context name."""


class Context(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    sites: dict[str, str] = Field(default_factory=dict)
    tls_dir: Path | None = Field(None, alias="tls-dir")
    identity: str | None = None
    metrics: dict[str, str] = Field(default_factory=dict)
    data_dir: Path | None = Field(None, alias="data-dir")
    # the rebalancer's gRPC address (tandem rebalancer --listen) and its identity name
    rebalancer: str | None = None
    rebalancer_identity: str = Field("rebalancer", alias="rebalancer-identity")

    @property
    def secure(self) -> bool:
        return self.tls_dir is not None


class ContextFile(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    current_context: str = Field(alias="current-context")
    contexts: dict[str, Context]

    def current(self, name: str | None = None) -> Context:
        name = name or self.current_context
        try:
            return self.contexts[name]
        except KeyError:
            raise ContextError(f"no context {name!r} (have: {', '.join(sorted(self.contexts)) or 'none'})") from None


def user_file() -> Path:
    """The per-user default: ``~/.config/tandem/config.yaml`` on Linux."""
    return Path(typer.get_app_dir("tandem")) / "config.yaml"


def locate(flag: Path | None) -> tuple[Path, str]:
    """The file to read and where its name came from ("--context", "$TANDEM_CONTEXT",
    "user config")."""
    if flag is not None:
        return Path(flag), "--context"
    env = os.environ.get(ENV)
    if env:
        return Path(env), f"${ENV}"
    return user_file(), "user config"


def load(path: str | Path) -> ContextFile:
    """Read and validate a context file; relative paths become absolute (from the file's
    directory). Raises ContextError."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ContextError(f"cannot read context file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ContextError(f"context file {path} is not valid YAML: {e}") from None
    try:
        cf = ContextFile.model_validate(data)
    except ValidationError as e:
        raise ContextError(f"invalid context file {path}: {e}") from None
    base = path.resolve().parent
    for ctx in cf.contexts.values():
        if ctx.tls_dir is not None and not ctx.tls_dir.is_absolute():
            ctx.tls_dir = base / ctx.tls_dir
        if ctx.data_dir is not None and not ctx.data_dir.is_absolute():
            ctx.data_dir = base / ctx.data_dir
    return cf


def resolve(flag: Path | None, name: str | None = None) -> Context:
    """The context to use (see the module docstring). Raises ContextError."""
    path, source = locate(flag)
    if not path.exists():
        raise ContextError(f"no context file at {path} (from {source}); run `tandem up` or pass --context FILE")
    return load(path).current(name)


def save(path: str | Path, cf: ContextFile) -> None:
    """Write atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = cf.model_dump(mode="json", by_alias=True, exclude_none=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


def single(name: str, ctx: Context) -> ContextFile:
    """A file with one context, current."""
    return ContextFile(current_context=name, contexts={name: ctx})
