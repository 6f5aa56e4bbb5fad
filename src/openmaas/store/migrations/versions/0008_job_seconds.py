"""Jobs are metered: a usage record per job run counts the seconds its worker ran (``job_seconds``).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "usage_records", sa.Column("job_seconds", sa.BigInteger(), nullable=False, server_default=sa.text("0"))
    )


def downgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:  # SQLite drops a column by rebuilding the table
        batch.drop_column("job_seconds")
