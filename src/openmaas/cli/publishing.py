"""CLI for providers and the operator: who may see a model, the review before it goes public, what it is sold for.

Every command takes the model first, then what to do with it (``openmaas models share NAME ORG...``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.table import Table

from openmaas.billing.plans import PlanSpec, pricing
from openmaas.cli.common import DEFAULT_URL, DataDirOpt, KeyOpt, UrlOpt, call, console

Access = Literal["private", "shared", "public"]


def _access_row(model: dict[str, Any]) -> str:
    shared = f" with {len(model['shared_with'])} organisation(s)" if model.get("shared_with") else ""
    review = f", review {model['review_state']}" if model.get("review_state") not in (None, "none") else ""
    reason = f" ({model['review_reason']})" if model.get("review_reason") else ""
    return f"{model['name']}: {model['visibility']}{shared}{review}{reason}"


def visibility(
    name: str,
    access: Annotated[Access, typer.Argument(help="private, shared or public (public is reviewed first).")],
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """Set who may see NAME; asking for public puts it up for the platform admin's review."""
    model = call(url, api_key, data_dir, lambda c: c.patch(f"/api/models/{name}", {"visibility": access}))
    console.print(_access_row(model))


def share(
    name: str,
    orgs: Annotated[list[str], typer.Argument(help="Organisation names to share NAME with (replaces the list).")],
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """Share NAME with these organisations (and make it shared)."""
    body = {"visibility": "shared", "shared_with": orgs}
    model = call(url, api_key, data_dir, lambda c: c.patch(f"/api/models/{name}", body))
    console.print(f"{model['name']}: {model['visibility']} with {', '.join(orgs)}")


def pending(url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")) -> None:
    """List the models waiting for the platform admin's review."""
    models = call(url, api_key, data_dir, lambda c: c.get_params("/api/models", {"review_state": "pending"}))
    table = Table("model", "owner", "visibility", title="Awaiting review")
    for m in models["models"]:
        table.add_row(m["name"], m.get("owner_org_id") or "", m["visibility"])
    console.print(table)


def review(
    name: str,
    decision: Annotated[Literal["approve", "reject"], typer.Argument(help="approve or reject")],
    reason: Annotated[str, typer.Option(help="Why (required to reject: the owner acts on it).")] = "",
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """Approve or reject NAME's request to be public (platform admin)."""
    body = {"decision": decision, "reason": reason}
    model = call(url, api_key, data_dir, lambda c: c.post(f"/api/models/{name}/review", body))
    console.print(_access_row(model))


def plans(
    name: str,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """List NAME's plans (service packages) and their prices."""
    result = call(url, api_key, data_dir, lambda c: c.get(f"/api/models/{name}/plans"))
    currency = result["currency"]
    table = Table("plan", "kind", "unit", "price", title=f"Plans of {name} ({currency})")
    for p in result["plans"]:
        spec = PlanSpec.model_validate({k: v for k, v in p.items() if k in PlanSpec.model_fields})
        table.add_row(spec.name, spec.kind, spec.unit, pricing(spec, spec.kind, "")["text"])  # as invoices word it
    console.print(table)


def plan_create(
    name: str,
    spec: Annotated[Path, typer.Argument(exists=True, help="The plan as a JSON file (see docs/billing.md).")],
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """Sell NAME under the plan in SPEC (a JSON object: name, kind, unit, prices)."""
    body = json.loads(spec.read_text())
    plan = call(url, api_key, data_dir, lambda c: c.post(f"/api/models/{name}/plans", body))
    console.print(f"plan {plan.get('name') or body.get('name')} of {name} created ({plan.get('id', '')})")
