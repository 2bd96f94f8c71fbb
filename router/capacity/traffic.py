"""Traffic for the what-ifs from a traffic profile, pure: the format of ``tandem demo
--traffic`` (``router/sim/traffic_example.yaml``, documented in ``router/sim/traffic.py``)
read into :class:`router.whatif.Stream` per site and queue.

What the what-if uses of a profile: per site, each stream's queue (or skill, channel,
language), its rate (``rate_per_h``, or ``erlangs`` with the talk time plus the queue's
wrap-up), its talk time (``handle``: exponential or lognormal ``mean_s`` and ``cv``;
``fixed`` as a lognormal of cv 0.01) and its callers' patience (``patience``: exponential
``mean_s``, or ``none``). The what-if's handle time is talk plus the queue's wrap-up (what
an answered call costs an agent). Ignored: ``time_scale`` (the what-if runs on simulated
time), ``callers`` (no caller lists: every call is a standard caller) and
``head_start_s``. A ``fixed`` patience is refused (the what-if's streams draw exponential
patience). The traffic simulator's own module is not imported: it is of the same layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from router.config import SiteConfig
from router.whatif import Stream


class TrafficError(ValueError):
    """A profile the what-if cannot use; the message names the field."""


def _num(d: Mapping, key: str, where: str, *, positive: bool = True) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 if positive else v >= 0):
        raise TrafficError(f"{where}.{key}: expected a number {'> 0' if positive else '>= 0'}, got {v!r}")
    return float(v)


def streams_from_profile(data: Any, sites: Sequence[SiteConfig]) -> list[Stream]:
    """The profile's streams (sites in the order of ``sites``, then each site's list);
    streams of rate 0 are left out. Raises :class:`TrafficError` naming the field (an
    unknown site or queue, a missing rate, an unsupported distribution)."""
    if not isinstance(data, Mapping) or not isinstance(data.get("sites"), Mapping):
        raise TrafficError("traffic profile: expected a mapping with 'sites'")
    by_name = {s.site.name: s for s in sites}
    unknown = sorted(set(data["sites"]) - set(by_name))
    if unknown:
        raise TrafficError(f"traffic profile: unknown site(s) {', '.join(map(str, unknown))} "
                           f"(the cluster has {', '.join(sorted(by_name))})")
    out = []
    for cfg in sites:
        name = cfg.site.name
        spec = data["sites"].get(name) or {}
        for i, st in enumerate(spec.get("streams") or ()):
            where = f"sites.{name}.streams[{i}]"
            if not isinstance(st, Mapping):
                raise TrafficError(f"{where}: expected a mapping")
            if st.get("queue") is not None:
                q = next((q for q in cfg.queues if q.name == st["queue"]), None)
                if q is None:
                    raise TrafficError(f"{where}.queue: site {name} has no queue {st['queue']!r}")
            else:
                q = cfg.queue_for(st.get("skill"), st.get("channel") or "voice", st.get("language") or None)  # type: ignore[arg-type]
                if q is None:
                    raise TrafficError(f"{where}: no queue of site {name} serves skill {st.get('skill')!r}")
            handle = st.get("handle")
            if not isinstance(handle, Mapping) or handle.get("dist") not in ("exponential", "lognormal", "fixed"):
                raise TrafficError(f"{where}.handle: expected {{dist: exponential|lognormal|fixed, mean_s}}")
            talk = _num(handle, "mean_s", f"{where}.handle")
            handle_s = talk + q.wrap_up_s
            if ("rate_per_h" in st) == ("erlangs" in st):
                raise TrafficError(f"{where}: give exactly one of rate_per_h and erlangs")
            if "rate_per_h" in st:
                rate = _num(st, "rate_per_h", where, positive=False)
            else:
                rate = _num(st, "erlangs", where, positive=False) * 3600.0 / handle_s
            pat = st.get("patience") or {"dist": "none"}
            if not isinstance(pat, Mapping) or pat.get("dist") not in ("exponential", "none"):
                raise TrafficError(f"{where}.patience: the what-if takes exponential or none, got {pat!r}")
            patience = None if pat["dist"] == "none" else _num(pat, "mean_s", f"{where}.patience")
            if rate <= 0:
                continue
            dist = handle["dist"]
            cv = 0.01 if dist == "fixed" else float(handle.get("cv", 0.8))
            # the stream's handle time is talk + wrap-up: scale the talk's spread to keep its sd
            out.append(Stream(
                site=name, skill=q.skill, channel=q.channel.value, language=q.language or "", rate_per_h=rate,
                handle_s=handle_s, handle_dist="exponential" if dist == "exponential" else "lognormal",
                handle_cv=cv * talk / handle_s, patience_s=patience,
            ))  # fmt: skip
    return out
