"""The alert rule spec (``rules.yaml``, shipped with the package), validated with pydantic.

Each rule is one comparison the in-app evaluator computes and PromQL expresses the same
way: ``left{matchers} OP right``, where ``right`` is a number or another metric joined
``on`` labels. ``load_spec()`` reads the packaged file; ``load_spec(path)`` an override
(the node takes ``TANDEM_ALERT_RULES``, so tests use short ``for`` durations).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

METRIC = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
ALERT_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*$")  # CamelCase, as Prometheus alerts are named
PLACEHOLDER = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)\}")

Op = Literal["<", ">", ">=", "<=", "==", "!="]


class SpecError(ValueError):
    """A rule file that does not validate (the message names the file and the field)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Selector(_Model):
    """A metric and equality matchers on its labels; ``on``: the labels a join matches."""

    metric: str
    match: dict[str, str] = Field(default_factory=dict)
    on: tuple[str, ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _yaml11_on(cls, data):
        # YAML 1.1 reads an unquoted `on:` key as the boolean true
        if isinstance(data, dict) and True in data and "on" not in data:
            data = {("on" if k is True else k): v for k, v in data.items()}
        return data

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if not METRIC.match(v):
            raise ValueError(f"{v!r} is not a metric name")
        return v

    @field_validator("match")
    @classmethod
    def _match(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not LABEL.match(k):
                raise ValueError(f"{k!r} is not a label name")
        return v

    @field_validator("on")
    @classmethod
    def _on(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for k in v or ():
            if not LABEL.match(k):
                raise ValueError(f"{k!r} is not a label name")
        return v


class Rule(_Model):
    name: str
    severity: Literal["info", "warning", "critical"] = "warning"
    for_s: float = Field(0.0, alias="for", ge=0, le=86400)
    summary: str = Field(min_length=1, max_length=500)
    left: Selector
    op: Op
    right: Union[float, Selector]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not ALERT_NAME.match(v):
            raise ValueError(f"alert names are CamelCase, got {v!r}")
        return v

    @model_validator(mode="after")
    def _shape(self) -> "Rule":
        if self.left.on is not None:
            raise ValueError("`on` belongs to the right-hand metric")
        for name in PLACEHOLDER.findall(self.summary):
            if name != "value" and not LABEL.match(name):
                raise ValueError(f"summary placeholder {{{name}}} is not a label")
        return self

    def metrics(self) -> set[str]:
        out = {self.left.metric}
        if isinstance(self.right, Selector):
            out.add(self.right.metric)
        return out


class Spec(_Model):
    rules: tuple[Rule, ...]

    @model_validator(mode="after")
    def _unique(self) -> "Spec":
        names = [r.name for r in self.rules]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"rule names must be unique: {sorted(dup)}")
        return self

    def metrics(self) -> set[str]:
        return set().union(*(r.metrics() for r in self.rules)) if self.rules else set()

    def rule(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(name)


def parse_spec(text: str, source: str = "<rules>") -> Spec:
    try:
        data = yaml.safe_load(text)
        return Spec.model_validate(data)
    except (yaml.YAMLError, ValidationError) as e:
        raise SpecError(f"{source}: {e}") from None


def default_text() -> str:
    return resources.files("router.alerts").joinpath("rules.yaml").read_text(encoding="utf-8")


def load_spec(path: str | Path | None = None) -> Spec:
    """The packaged rules, or those of ``path`` (SpecError when they do not validate)."""
    if path is None:
        return parse_spec(default_text(), "router/alerts/rules.yaml")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"{p}: {e}") from None
    return parse_spec(text, str(p))
