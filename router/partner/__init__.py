"""The reference partner gateway: a BPO partner's own ACD on the partner API
(``proto/router/v1/partner.proto``).

* :mod:`router.partner.gateway` — the protocol client: one :class:`GatewaySession` per
  in-house node (Hello, Availability, Accept/Decline, Assign, ReportOutcome, HandBack),
  reconnecting with backoff; plaintext or mTLS as ``partner-NAME``.
* :mod:`router.partner.sim` — :class:`PartnerSim`, a simulated ACD (agents per skill,
  talk and wrap times, hand-backs) that checks what it receives against its own copy of
  its contract (fields outside the data scopes, the concurrency cap).
* :mod:`router.partner.cli` — ``tandem partner-sim``.
"""

from router.partner.gateway import Channels, GatewaySession, NodeTarget
from router.partner.sim import PartnerLine, PartnerSim, SimCall, parse_agents

__all__ = ["Channels", "GatewaySession", "NodeTarget", "PartnerLine", "PartnerSim", "SimCall", "parse_agents"]
