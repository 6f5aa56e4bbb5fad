"""Model names in their owner's namespace: an organisation's model ``wine`` becomes ``acme/wine``.

Names were global before, so each old name maps to exactly one new one. What refers to a model by name is
renamed with it: usage records, subscriptions, charges, reservations, and the specs and results of jobs. Issued
invoices are documents and keep the names they were issued with. Platform models (no owner) keep bare names.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_BY_NAME = ("usage_records", "subscriptions", "charges", "reservations")


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":  # SQLite does not enforce VARCHAR lengths
        op.alter_column("models", "name", type_=sa.String(200), existing_nullable=False)
        for table in _BY_NAME:
            op.alter_column(table, "model", type_=sa.String(200), existing_nullable=False)
    models = sa.table("models", sa.column("id", sa.Integer), sa.column("name"), sa.column("owner_org_id"))
    orgs = sa.table("orgs", sa.column("id"), sa.column("name"))
    jobs = sa.table(
        "jobs", sa.column("id"), sa.column("org_id"), sa.column("spec", sa.JSON), sa.column("result", sa.JSON)
    )
    renames: dict[str, str] = {}
    rows = bind.execute(
        sa.select(models.c.id, models.c.name, orgs.c.name)
        .join(orgs, orgs.c.id == models.c.owner_org_id)
        .where(models.c.owner_org_id.is_not(None))
    ).all()
    for model_id, name, org_name in rows:
        if "/" in name:
            continue
        new = f"{org_name}/{name}"
        renames[name] = new
        bind.execute(sa.update(models).where(models.c.id == model_id).values(name=new))
        for table in _BY_NAME:
            t = sa.table(table, sa.column("model"))
            bind.execute(sa.update(t).where(t.c.model == name).values(model=new))
    org_names = dict(bind.execute(sa.select(orgs.c.id, orgs.c.name)).all())
    for job_id, org_id, spec, result in bind.execute(
        sa.select(jobs.c.id, jobs.c.org_id, jobs.c.spec, jobs.c.result)
    ).all():
        changes: dict[str, object] = {}
        output = spec.get("output_model") if isinstance(spec, dict) else None
        if isinstance(output, str) and "/" not in output and org_id in org_names:
            changes["spec"] = {**spec, "output_model": f"{org_names[org_id]}/{output}"}  # queued jobs too
        if isinstance(result, dict) and result.get("model") in renames:
            changes["result"] = {**result, "model": renames[result["model"]]}
        if changes:
            bind.execute(sa.update(jobs).where(jobs.c.id == job_id).values(**changes))


def downgrade() -> None:
    raise NotImplementedError("model namespaces cannot be undone: two organisations may now share a model name")
