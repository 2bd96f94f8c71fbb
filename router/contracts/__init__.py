"""BPO partner contracts, pure: the contract model (:mod:`router.contracts.model`: skills,
hours with holidays, caps, value tiers, price, SLA, data scopes; parsed from JSON or
YAML) and what of a call reaches a partner (:mod:`router.contracts.scope`: caller
tokens, the offer's allowed fields). No I/O; imports only ``router.config``."""

from router.contracts.model import (
    Caps,
    ContractError,
    Hours,
    PartnerContract,
    Price,
    Scopes,
    Sla,
    Tier,
    contract_json,
    parse_contract,
    rate_buckets,
    sla_credit,
)
from router.contracts.scope import (
    OFFER_BASE_FIELDS,
    allowed_fields,
    caller_token,
    fields_outside,
    last_digits,
    offer_fields,
)

__all__ = [
    "OFFER_BASE_FIELDS",
    "Caps",
    "ContractError",
    "Hours",
    "PartnerContract",
    "Price",
    "Scopes",
    "Sla",
    "Tier",
    "allowed_fields",
    "caller_token",
    "contract_json",
    "fields_outside",
    "last_digits",
    "offer_fields",
    "parse_contract",
    "rate_buckets",
    "sla_credit",
]
