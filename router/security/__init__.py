"""Identities, roles and the audit trail of a Tandem cluster (invariant 7); see
ARCHITECTURE.md for its modules and README "Security" for how to operate it."""
