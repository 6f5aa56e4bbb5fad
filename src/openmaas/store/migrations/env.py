"""Alembic environment: migrations run on the connection the application hands over (store.db.upgrade)."""

from __future__ import annotations

from alembic import context

from openmaas.store.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through openmaas.store.db.upgrade(engine)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
