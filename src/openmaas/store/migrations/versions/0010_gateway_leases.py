"""Gateways hold leases: each server process renews a row in ``gateways``, and every billing hold names the
process that took it (``holds.holder``), so the holds of a process that died are given back by the others.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from openmaas.store.tables import UTCDateTime

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gateways",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("seen_at", UTCDateTime(), nullable=False),
    )
    op.add_column("holds", sa.Column("holder", sa.String(64), nullable=True))
    op.create_index("ix_holds_open_holder", "holds", ["state", "holder"])


def downgrade() -> None:
    op.drop_index("ix_holds_open_holder", table_name="holds")
    with op.batch_alter_table("holds") as batch:  # SQLite drops a column by rebuilding the table
        batch.drop_column("holder")
    op.drop_table("gateways")
