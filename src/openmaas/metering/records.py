"""The usage record and the units it counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

#: ``job_seconds``: what a job (training, evaluation, compression) ran in its worker, a record per run.
UNITS = ("requests", "input_tokens", "output_tokens", "items", "audio_seconds", "job_seconds")


@dataclass(frozen=True)
class UsageRecord:
    """What one successful call used. Never holds request or response bodies."""

    request_id: str
    org_id: str | None
    key_id: str
    model: str
    version: int
    protocol: str
    latency_ms: float
    requests: int = 1
    input_tokens: int = 0
    output_tokens: int = 0
    items: int = 0
    audio_ms: int = 0
    job_seconds: int = 0
    outcome: str = "completed"
    idempotency_key: str | None = None
    # sha256 of what was asked; stored with the idempotency key only.
    fingerprint: str | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # A pay-as-you-go hold (billing.service.PendingCharge) settled in the same transaction as this record.
    charge: Any = None
    # A row written in the same transaction as this record, whether the record is new or a duplicate (a batch
    # line's result): an INSERT statement built once (it must be idempotent itself: ON CONFLICT DO NOTHING) and
    # the row's values; the rows of one statement in a group are written with one executemany.
    also: tuple[Any, dict[str, Any]] | None = None

    def units(self) -> dict[str, int]:
        """Quantities per billing unit (audio in whole milliseconds under ``audio_seconds``' counter: ms)."""
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "items": self.items,
            "audio_seconds": self.audio_ms,
            "job_seconds": self.job_seconds,
        }

    def row(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "org_id": self.org_id,
            "key_id": self.key_id,
            "model": self.model,
            "version": self.version,
            "protocol": self.protocol,
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "items": self.items,
            "audio_ms": self.audio_ms,
            "job_seconds": self.job_seconds,
            "latency_ms": self.latency_ms,
            "outcome": self.outcome,
            "idempotency_key": self.idempotency_key,
            "created_at": self.created_at,
            "day": self.created_at.astimezone(UTC).date().isoformat(),
        }


def month_of(when: datetime) -> str:
    utc = when.astimezone(UTC)
    return f"{utc.year:04d}-{utc.month:02d}"


def idempotency_scope(org_id: str | None) -> str:
    """Idempotency keys are unique per organisation (the platform admin has its own scope)."""
    return org_id or "platform"
