"""Cluster coordination through etcd: membership, load snapshots, the overflow policy,
contingency modes and elections with fencing. Start with :mod:`router.coord.base` (the
interface and its contract) and :mod:`router.coord.keys` (the key layout)."""

from router.coord.base import (
    CoordinationError,
    CoordinationUnavailable,
    Coordinator,
    Leadership,
    Member,
    NotLeader,
    PolicyRejected,
    Session,
    StalePlan,
    Targets,
)
from router.coord.etcd import EtcdCoordinator
from router.coord.keys import Keys
from router.coord.link import EtcdSettings

__all__ = [
    "CoordinationError",
    "CoordinationUnavailable",
    "Coordinator",
    "EtcdCoordinator",
    "EtcdSettings",
    "Keys",
    "Leadership",
    "Member",
    "NotLeader",
    "PolicyRejected",
    "Session",
    "StalePlan",
    "Targets",
]
