"""The audit log: an append-only, hash-chained record of management actions."""

from openmaas.audit.log import Actor, AuditEvent, AuditLog, chain_hash, verify_chain

__all__ = ["Actor", "AuditEvent", "AuditLog", "chain_hash", "verify_chain"]
