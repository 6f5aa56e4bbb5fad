"""Daily usage roll-ups: usage records summed per organisation, day, model, key and protocol, kept in the
metering transaction, so usage summaries no longer read every record. Filled from the existing records.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

SUMS = ("requests", "input_tokens", "output_tokens", "items", "audio_ms", "job_seconds")


def upgrade() -> None:
    op.create_table(
        "usage_daily",
        sa.Column("org_id", sa.String(32), primary_key=True),
        sa.Column("day", sa.String(10), primary_key=True),
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("protocol", sa.String(16), primary_key=True),
        sa.Column("records", sa.BigInteger(), nullable=False),
        *[sa.Column(name, sa.BigInteger(), nullable=False) for name in SUMS],
    )
    op.create_index("ix_usage_daily_day", "usage_daily", ["day"])
    sums = ", ".join(f"coalesce(sum({name}), 0)" for name in SUMS)
    op.execute(
        f"INSERT INTO usage_daily (org_id, day, model, key_id, protocol, records, {', '.join(SUMS)}) "
        f"SELECT coalesce(org_id, ''), day, model, key_id, protocol, count(*), {sums} FROM usage_records "
        "GROUP BY coalesce(org_id, ''), day, model, key_id, protocol"
    )


def downgrade() -> None:
    op.drop_index("ix_usage_daily_day", table_name="usage_daily")
    op.drop_table("usage_daily")
