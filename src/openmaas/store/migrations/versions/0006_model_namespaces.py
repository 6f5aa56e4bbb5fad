"""Model names in their owner's namespace: an organisation's model ``wine`` becomes ``acme/wine``.

Names were global before, so each old name maps to exactly one new one. What refers to a model by name is
renamed with it: usage records, subscriptions, charges, reservations, and the specs and results of jobs. Issued
invoices are documents and keep the names they were issued with. Platform models (no owner) keep bare names.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_BY_NAME = ("usage_records", "subscriptions", "charges", "reservations")


_models = sa.table("models", sa.column("id", sa.Integer), sa.column("name"), sa.column("owner_org_id"))
_orgs = sa.table("orgs", sa.column("id"), sa.column("name"))
_jobs = sa.table("jobs", sa.column("id"), sa.column("org_id"), sa.column("spec", sa.JSON), sa.column("result", sa.JSON))


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":  # SQLite does not enforce VARCHAR lengths
        op.alter_column("models", "name", type_=sa.String(200), existing_nullable=False)
        for table in _BY_NAME:
            op.alter_column(table, "model", type_=sa.String(200), existing_nullable=False)
    org_names = dict(bind.execute(sa.select(_orgs.c.id, _orgs.c.name)).all())
    renames = {
        name: f"{org_names[owner]}/{name}"
        for name, owner in bind.execute(sa.select(_models.c.name, _models.c.owner_org_id)).all()
        if owner in org_names and "/" not in name
    }
    # Queued jobs too: their model will be registered in their organisation's namespace.
    _rename(
        bind,
        renames,
        lambda output, org_id: f"{org_names[org_id]}/{output}" if "/" not in output and org_id in org_names else output,
    )


def downgrade() -> None:
    """Back to global names, unless two organisations (or one and the platform) now share a model's own name."""
    bind = op.get_bind()
    names = [name for (name,) in bind.execute(sa.select(_models.c.name)).all()]
    renames = {name: name.split("/", 1)[1] for name in names if "/" in name}
    own = [renames.get(name, name) for name in names]
    clashes = sorted({n for n in own if own.count(n) > 1})
    if clashes:
        raise RuntimeError(
            "cannot return to global model names: several organisations have models named "
            + ", ".join(clashes)
            + "; rename or delete all but one of each first"
        )
    _rename(bind, renames, lambda output, org_id: output.split("/", 1)[1] if "/" in output else output)


def _rename(bind: sa.Connection, renames: dict[str, str], output_model: Callable[[str, str], str]) -> None:
    """Rename models (old -> new name) and everything that names them; ``output_model`` renames what an
    organisation's job will register (its model may not exist yet)."""
    for old, new in renames.items():
        bind.execute(sa.update(_models).where(_models.c.name == old).values(name=new))
        for table in _BY_NAME:
            t = sa.table(table, sa.column("model"))
            bind.execute(sa.update(t).where(t.c.model == old).values(model=new))
    for job_id, org_id, spec, result in bind.execute(
        sa.select(_jobs.c.id, _jobs.c.org_id, _jobs.c.spec, _jobs.c.result)
    ).all():
        changes: dict[str, object] = {}
        output = spec.get("output_model") if isinstance(spec, dict) else None
        if isinstance(output, str) and org_id is not None and output_model(output, org_id) != output:
            changes["spec"] = {**spec, "output_model": output_model(output, org_id)}
        if isinstance(result, dict) and result.get("model") in renames:
            changes["result"] = {**result, "model": renames[result["model"]]}
        if changes:
            bind.execute(sa.update(_jobs).where(_jobs.c.id == job_id).values(**changes))
