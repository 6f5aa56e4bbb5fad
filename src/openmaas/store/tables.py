"""SQLAlchemy tables. Change them only together with a migration under store/migrations/versions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class ModelRow(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # Full name: "org/name" for an organisation's model, bare for the platform's catalogue.
    name: Mapped[str] = mapped_column(String(200), unique=True, nullable=False)
    # None: owned by the platform (the bundled catalogue).
    owner_org_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    visibility: Mapped[str] = mapped_column(String(16), nullable=False, default="private")
    # Publication review: none | pending | approved | rejected (making a model public needs approval).
    review_state: Mapped[str] = mapped_column(String(16), nullable=False, default="none")
    review_reason: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    # Overrides of the serving defaults (openmaas.entities.models.ServingConfig); None = defaults.
    serving: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)


class ModelVersionRow(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_model_versions_model_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), nullable=False, index=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    format: Mapped[str] = mapped_column(String(32), nullable=False)
    artifact_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    signature: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    card: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), nullable=False)
    prefix: Mapped[str] = mapped_column(String(16), nullable=False)
    # The secret's last four characters, shown with the prefix so a member can tell keys apart (None before 0011).
    suffix: Mapped[str | None] = mapped_column(String(8), nullable=True)
    # HMAC-SHA256 of the secret under the server secret; the secret itself is never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    org_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    scopes: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The most the key may do in its org, whatever its scopes: the role of whoever created it.
    role: Mapped[str] = mapped_column(String(16), nullable=False, default="admin")
    user_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # Optional allow-list of model names, and {"rpm", "tpm", "ipm", "concurrency"} limits.
    models: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    limits: Mapped[dict[str, int] | None] = mapped_column(JSON, nullable=True)
    rotated_from: Mapped[str | None] = mapped_column(String(32), nullable=True)


class PlatformStateRow(Base):
    """Small facts about the installation (catalogue version, ...)."""

    __tablename__ = "platform_state"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)


class OrgRow(Base):
    __tablename__ = "orgs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)


class UserRow(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True, nullable=False)
    # argon2id hash; the password itself is never stored.
    password_hash: Mapped[str] = mapped_column(String(256), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    # An operator: signs in to the console as the platform admin (set by a platform admin).
    platform_admin: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())


class ConsoleSessionRow(Base):
    """A console sign-in: the browser's cookie holds an opaque random id whose keyed hash is ``id_hash``; the
    session acts through ``key_id`` (a session key whose secret was never kept), so usage and audit name it."""

    __tablename__ = "console_sessions"
    __table_args__ = (Index("ix_console_sessions_user", "user_id"),)

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    org_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    key_id: Mapped[str] = mapped_column(String(32), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


class MembershipRow(Base):
    __tablename__ = "memberships"

    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)


class ModelShareRow(Base):
    """A model shared with another organisation (visibility ``shared``)."""

    __tablename__ = "model_shares"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"), primary_key=True)


class UsageRecordRow(Base):
    """One successful inference: written once, keyed by the request id, before the response leaves."""

    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_records_org_day", "org_id", "day"),
        Index("ix_usage_records_day", "day"),
    )

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    org_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    key_id: Mapped[str] = mapped_column(String(32), nullable=False)
    model: Mapped[str] = mapped_column(String(200), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    protocol: Mapped[str] = mapped_column(String(16), nullable=False)
    requests: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    input_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    items: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    audio_ms: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    # A job's run (protocol "job"): seconds its worker ran, rounded up.
    job_seconds: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    latency_ms: Mapped[float] = mapped_column(Float, nullable=False)
    outcome: Mapped[str] = mapped_column(String(16), nullable=False, default="completed")
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    day: Mapped[str] = mapped_column(String(10), nullable=False)


class IdempotencyKeyRow(Base):
    """An Idempotency-Key already served (per org), for 24 hours: retries replay instead of metering again."""

    __tablename__ = "idempotency_keys"

    scope: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), nullable=False)
    # sha256 of what was asked (model and body), so a key reused for another request is refused.
    fingerprint: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


class UsageDailyRow(Base):
    """Usage records summed per organisation, day, model, key and protocol, in the metering transaction: usage
    summaries (the API's /api/usage, the console's pages) read these instead of every record."""

    __tablename__ = "usage_daily"
    __table_args__ = (Index("ix_usage_daily_day", "day"),)

    # "" for records without an organisation (the platform admin's own calls).
    org_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    day: Mapped[str] = mapped_column(String(10), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    protocol: Mapped[str] = mapped_column(String(16), primary_key=True)
    records: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    requests: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    items: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    audio_ms: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    job_seconds: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class UsageCounterRow(Base):
    """Running monthly totals per org and unit, kept in the metering transaction (quota checks read these)."""

    __tablename__ = "usage_counters"

    org_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    month: Mapped[str] = mapped_column(String(7), primary_key=True)
    unit: Mapped[str] = mapped_column(String(16), primary_key=True)
    quantity: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class QuotaRow(Base):
    __tablename__ = "quotas"

    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"), primary_key=True)
    unit: Mapped[str] = mapped_column(String(16), primary_key=True)
    monthly_limit: Mapped[int] = mapped_column(BigInteger, nullable=False)


class AuditEventRow(Base):
    """Append-only, hash-chained record of management actions."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    actor_kind: Mapped[str] = mapped_column(String(16), nullable=False)
    actor_key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    actor_user_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    org_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    target: Mapped[str] = mapped_column(String(256), nullable=False)
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    client_ip: Mapped[str | None] = mapped_column(String(64), nullable=True)
    prev_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    hash: Mapped[str] = mapped_column(String(64), nullable=False)


# -- billing ------------------------------------------------------------------------------------------------------


class PlanRow(Base):
    __tablename__ = "plans"
    __table_args__ = (UniqueConstraint("model_id", "name", name="uq_plans_model_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), nullable=False, index=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)


class SubscriptionRow(Base):
    __tablename__ = "subscriptions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False, index=True)
    plan_id: Mapped[str] = mapped_column(ForeignKey("plans.id", ondelete="CASCADE"), nullable=False)
    model: Mapped[str] = mapped_column(String(200), nullable=False)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    # Cancelled subscriptions run to the end of the period they were cancelled in.
    ends_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class WalletRow(Base):
    """An org's prepaid money, as the ledger says (kept in the same transactions as the ledger entries)."""

    __tablename__ = "wallets"

    org_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    available_micros: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    held_micros: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class LedgerEntryRow(Base):
    """Double-entry and append-only: the entries of one transaction sum to zero."""

    __tablename__ = "ledger_entries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    txn_id: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    account: Mapped[str] = mapped_column(String(96), nullable=False, index=True)
    amount_micros: Mapped[int] = mapped_column(BigInteger, nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    reference: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


class CreditRow(Base):
    """Wallet credits by reference, so adding the same credit twice adds it once."""

    __tablename__ = "wallet_credits"

    org_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    reference: Mapped[str] = mapped_column(String(255), primary_key=True)
    amount_micros: Mapped[int] = mapped_column(BigInteger, nullable=False)
    txn_id: Mapped[str] = mapped_column(String(64), nullable=False)


class HoldRow(Base):
    __tablename__ = "holds"
    __table_args__ = (Index("ix_holds_open_holder", "state", "holder"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    org_id: Mapped[str] = mapped_column(String(32), nullable=False)
    amount_micros: Mapped[int] = mapped_column(BigInteger, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    #: The gateway process that took it (``gateways.id``): its holds are given back when its lease lapses.
    holder: Mapped[str | None] = mapped_column(String(64), nullable=True)


class GatewayRow(Base):
    """A server process's lease, renewed every few seconds while it runs (``billing/holds.py``)."""

    __tablename__ = "gateways"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255), nullable=False)
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


class ChargeAccumulatorRow(Base):
    """Exact running cost per org, model, plan and month: numerator over the plan's block (no rounding here)."""

    __tablename__ = "charge_accumulators"

    org_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    plan_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    month: Mapped[str] = mapped_column(String(7), primary_key=True)
    quantity: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    numerator: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class ChargeRow(Base):
    """One rated usage record of a pay-as-you-go plan (exactly one per record)."""

    __tablename__ = "charges"
    __table_args__ = (Index("ix_charges_org_invoice", "org_id", "invoice_id"),)

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    org_id: Mapped[str] = mapped_column(String(32), nullable=False)
    provider_org_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    model: Mapped[str] = mapped_column(String(200), nullable=False)
    plan_id: Mapped[str] = mapped_column(String(32), nullable=False)
    unit: Mapped[str] = mapped_column(String(16), nullable=False)
    quantity: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # What the wallet paid for this call: the rounded growth of the month's exact running cost.
    amount_micros: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    invoice_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # "online", or "batch" for a batch line (rated at the plan's batch discount, its own invoice line).
    channel: Mapped[str] = mapped_column(String(8), nullable=False, default="online")


class InvoiceRow(Base):
    __tablename__ = "invoices"
    __table_args__ = (UniqueConstraint("org_id", "period", name="uq_invoices_org_period"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str] = mapped_column(String(32), nullable=False, index=True)
    period: Mapped[str] = mapped_column(String(7), nullable=False)
    currency: Mapped[str] = mapped_column(String(8), nullable=False)
    total_micros: Mapped[int] = mapped_column(BigInteger, nullable=False)
    prepaid_micros: Mapped[int] = mapped_column(BigInteger, nullable=False)
    due_micros: Mapped[int] = mapped_column(BigInteger, nullable=False)
    lines: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


class PeriodRow(Base):
    __tablename__ = "billing_periods"

    period: Mapped[str] = mapped_column(String(7), primary_key=True)
    closed_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


class ReservationRow(Base):
    """Dedicated capacity an org runs for a model under a ``dedicated`` plan, billed per started minute."""

    __tablename__ = "reservations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str] = mapped_column(String(32), nullable=False, index=True)
    plan_id: Mapped[str] = mapped_column(String(32), nullable=False)
    model: Mapped[str] = mapped_column(String(200), nullable=False)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


# -- datasets and jobs --------------------------------------------------------------------------------------------


class DatasetRow(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    format: Mapped[str] = mapped_column(String(16), nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    rows: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # Columns with their types (tabular) or classes with image size (images); per-column class balance.
    schema: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


class JobRow(Base):
    """queued -> running -> succeeded | failed | cancelled, with progress, per-epoch metrics and a result."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    org_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    key_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    type: Mapped[str] = mapped_column(String(32), nullable=False)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    progress: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


# -- evaluations ---------------------------------------------------------------------------------------------------


class EvaluationRow(Base):
    """One measured report of a model version on a dataset (an evaluation job, or training's held-out split)."""

    __tablename__ = "evaluations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), nullable=False, index=True
    )
    # Who ran it (None: the platform); the model's owner's reports are shown on its card.
    org_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    task: Mapped[str] = mapped_column(String(32), nullable=False)
    # The dataset's id, name, rows and sha256, and which rows were used ("all", or a held-out split).
    dataset: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    # Reports with the same key measured the same rows: only those are compared.
    dataset_key: Mapped[str] = mapped_column(String(160), nullable=False)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    performance: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    machine: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    # Plot name -> sha256 of its PNG in the artifact store.
    plots: Mapped[dict[str, str]] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


# -- offline batch -------------------------------------------------------------------------------------------------


class FileRow(Base):
    """An uploaded file (OpenAI's Files API): its bytes are an artifact, shared by every file with that content."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_org_created", "org_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    filename: Mapped[str] = mapped_column(String(255), nullable=False)
    purpose: Mapped[str] = mapped_column(String(32), nullable=False)
    bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Deleted by its owner or expired: kept as a row (batches name it), its bytes gone once nothing else has them.
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class BatchRow(Base):
    """validating -> in_progress -> finalizing -> completed, or failed / expired / cancelling -> cancelled."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_org_created", "org_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    org_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # The key that created it: the lines run as that key (its model allow-list, its org's quota and wallet).
    key_id: Mapped[str] = mapped_column(String(32), nullable=False)
    endpoint: Mapped[str] = mapped_column(String(300), nullable=False)
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    input_file_id: Mapped[str] = mapped_column(String(40), nullable=False)
    completion_window: Mapped[str] = mapped_column(String(16), nullable=False)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # How long its output and error files are kept (OpenAI's output_expires_after; default 30 days).
    output_ttl_s: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    total: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    # Once the batch has ended: its final counts and tokens (its per-line results are then only in its files).
    final_counts: Mapped[dict[str, int] | None] = mapped_column(JSON, nullable=True)
    output_file_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    in_progress_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finalizing_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    cancelling_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Which server process runs it, until when (a lease a crashed process stops renewing); runs so far.
    runner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)


class BatchResultRow(Base):
    """One line's answer, written in the same transaction as its usage record (and its charge): exactly once."""

    __tablename__ = "batch_results"

    batch_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    line: Mapped[int] = mapped_column(Integer, primary_key=True)
    custom_id: Mapped[str] = mapped_column(String(512), nullable=False)
    request_id: Mapped[str] = mapped_column(String(64), nullable=False)
    status_code: Mapped[int] = mapped_column(Integer, nullable=False)
    # The response body as the online call would have sent it (JSON text).
    body: Mapped[str] = mapped_column(Text, nullable=False)
    # Set for a line that did not run (expired, cancelled) or was refused: OpenAI's {"code", "message"}.
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    input_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
