"""Contingency mode of the site (part of :class:`router.engine.Engine`): ``set_mode``.

``set_mode`` {"mode": "normal"|"surge"|"emergency", "backoffice": bool, "announcement":
str (<= 256 chars)} is journaled like any command. It stores the mode and the IVR
announcement and switches back-office eligibility: an agent of a ``backoffice: true``
group is eligible for its queues on the voice and chat channels only while
``backoffice`` is on (its other channels, e.g. email, always). Switched on, ready
back-office agents take queued calls at once (the usual dispatch, invariant 3);
switched off, they keep the calls in hand but get no new ones of those queues. The
mode is in the snapshot (``"mode"``); a snapshot without it restores as normal.
Result (also when unchanged): the mode as a dict.
"""

from __future__ import annotations

from router.engine import validate as v
from router.engine.records import Agent, Queue
from router.model import AgentChanged, Outcome

MODES = ("normal", "surge", "emergency")
MAX_ANNOUNCEMENT = 256
#: Channels on which back-office agents work only while their mode allows it.
GATED_CHANNELS = ("voice", "chat")
_STAFFED = ("ready", "wrap_up")


class ModeMixin:
    def _init_mode(self, all_queues: dict[str, list[Queue]], backoffice: set[str]) -> None:
        """``all_queues``: agent id -> every queue it is eligible for (config order)."""
        self._mode_name = "normal"
        self._backoffice_on = False
        self._announcement = ""
        self._all_queues = all_queues
        self._gated: dict[str, list[Queue]] = {
            aid: [q for q in all_queues[aid] if q.channel in GATED_CHANNELS]
            for aid in sorted(backoffice)
        }
        self._gated = {aid: qs for aid, qs in self._gated.items() if qs}
        self._ops["set_mode"] = self._op_set_mode

    def mode(self) -> dict:
        return {
            "mode": self._mode_name,
            "backoffice": self._backoffice_on,
            "announcement": self._announcement,
        }

    @property
    def announcement(self) -> str:
        return self._announcement

    def _op_set_mode(self, cmd: dict, now: float) -> Outcome:
        mode = cmd.get("mode")
        if not isinstance(mode, str) or mode not in MODES:
            raise v.invalid("INVALID_MODE", f"mode must be one of {', '.join(MODES)}", field="mode")
        backoffice = cmd.get("backoffice", False)
        if not isinstance(backoffice, bool):
            raise v.invalid("INVALID_FIELD", "backoffice must be a boolean", field="backoffice")
        text = v.text(cmd, "announcement", MAX_ANNOUNCEMENT)
        if (mode, backoffice, text) == (self._mode_name, self._backoffice_on, self._announcement):
            return Outcome(False, self.mode())
        self._begin(now)
        self._mode_name, self._announcement = mode, text
        if backoffice != self._backoffice_on:
            self._switch_backoffice(backoffice)
            self._dispatch()
        return self._commit(self.mode())

    def _switch_backoffice(self, on: bool) -> None:
        self._backoffice_on = on
        for aid, gated in self._gated.items():
            a: Agent = self._agents[aid]
            staffed = a.state in _STAFFED
            signed_in = a.state != "signed_out"
            sign = 1 if on else -1
            for q in gated:
                if staffed:
                    q.staffed_slots += sign * a.capacity[q.channel]
                if signed_in:
                    q.signed_in += sign
                if on:
                    q.agents.append(a)
                else:
                    q.agents.remove(a)
                    q.free.pop(aid, None)
            a.queues = list(self._all_queues[aid]) if on else [
                q for q in self._all_queues[aid] if q not in gated
            ]
            self._refresh(a)
            if on and a.state == "ready":
                self._dirty_agents[aid] = a
            if signed_in:
                self._fx.append(AgentChanged(aid))
