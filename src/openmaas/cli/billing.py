"""CLI for billing: credits, wallets, invoices, closing periods and checking the books."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from openmaas.billing.money import format_micros, parse_amount
from openmaas.cli.common import DEFAULT_URL, DataDirOpt, KeyOpt, UrlOpt, call, console, err

billing_app = typer.Typer(
    help="Credits, wallets, invoices, closing periods and checking the books.", no_args_is_help=True
)


@billing_app.command("close")
def close(
    period: Annotated[str, typer.Argument(help="The month, e.g. 2026-11.")],
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """Close a month into one invoice per organisation (again: the same invoices)."""
    result = call(url, api_key, data_dir, lambda c: c.post(f"/api/billing/periods/{period}/close"))
    table = Table("invoice", "org", "total", "paid from wallet", "due", title=f"Invoices {period}")
    for inv in result["invoices"]:
        table.add_row(
            inv["id"][:12],
            inv["org_id"][:12],
            format_micros(inv["total_micros"], inv["currency"]),
            format_micros(inv["prepaid_micros"]),
            format_micros(inv["due_micros"]),
        )
    console.print(table)


@billing_app.command("verify")
def verify(url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")) -> None:
    """Check the books: balanced ledger, wallets equal to it, holds, charges and invoice totals."""
    result = call(url, api_key, data_dir, lambda c: c.get("/api/billing/verify"))
    if result["ok"]:
        console.print(f"[green]OK[/green]: {result['ledger_entries']} ledger entries, every invariant holds")
        return
    for problem in result["problems"]:
        err.print(f"[red]problem:[/red] {problem}")
    raise typer.Exit(2)


@billing_app.command("credit")
def credit(
    org: str,
    amount: Annotated[str, typer.Argument(help="In currency units, e.g. 100 or 12.50.")],
    reference: Annotated[str, typer.Option(help="Payment reference; the same one twice credits once.")],
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """Add prepaid credit to ORG's wallet (platform admin)."""
    try:
        micros = parse_amount(amount)
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    body = {"amount_micros": micros, "reference": reference}
    wallet = call(url, api_key, data_dir, lambda c: c.post(f"/api/orgs/{org}/wallet/credits", body))
    note = "" if wallet["added"] else " (this reference was already credited; nothing added)"
    console.print(f"{org}: available {format_micros(wallet['available_micros'], wallet['currency'])}{note}")


@billing_app.command("wallet")
def wallet(
    org: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")
) -> None:
    """Show ORG's balance, what is held for calls in flight, and what is available."""
    w = call(url, api_key, data_dir, lambda c: c.get(f"/api/orgs/{org}/wallet"))
    cur = w["currency"]
    console.print(
        f"balance {format_micros(w['balance_micros'], cur)}, held {format_micros(w['held_micros'], cur)}, "
        f"available {format_micros(w['available_micros'], cur)}"
    )


@billing_app.command("statement")
def statement(
    org: str,
    period: Annotated[str, typer.Argument(help="A closed month, e.g. 2026-11.")],
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """A provider's revenue in a closed month: gross per model and plan, the commission, the payout."""
    s = call(url, api_key, data_dir, lambda c: c.get(f"/api/orgs/{org}/statements/{period}"))
    table = Table("model", "plan", "gross", title=f"Statement {period} for {org} ({s['currency']})")
    for line in s["lines"]:
        table.add_row(line["model"], line["plan"] or "", format_micros(line["gross_micros"]))
    console.print(table)
    console.print(
        f"gross {format_micros(s['gross_micros'])}, commission ({s['commission_bps'] / 100:g}%) "
        f"{format_micros(s['commission_micros'])}, payout {format_micros(s['net_micros'])}"
    )


@billing_app.command("invoice")
def invoice(
    invoice_id: str,
    format: Annotated[str, typer.Option("--format", help="json, csv or html (to save or print).")] = "json",
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """Print one invoice (its lines explained), as JSON, CSV or HTML."""
    text = call(url, api_key, data_dir, lambda c: c.text(f"/api/invoices/{invoice_id}?format={format}"))
    typer.echo(text)


@billing_app.command("invoices")
def invoices(
    org: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")
) -> None:
    """List ORG's invoices."""
    result = call(url, api_key, data_dir, lambda c: c.get(f"/api/orgs/{org}/invoices"))
    table = Table("period", "invoice", "total", "due", "lines")
    for inv in result["invoices"]:
        table.add_row(
            inv["period"],
            inv["id"],
            format_micros(inv["total_micros"], inv["currency"]),
            format_micros(inv["due_micros"]),
            str(len(inv["lines"])),
        )
    console.print(table)


@billing_app.command("draft")
def draft(
    org: str,
    format: Annotated[str, typer.Option("--format", help="table, json, csv or html.")] = "table",
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """ORG's invoice for the open month as it stands now (not issued: it changes until the month is closed)."""
    if format != "table":
        typer.echo(call(url, api_key, data_dir, lambda c: c.text(f"/api/orgs/{org}/invoices/draft?format={format}")))
        return
    inv = call(url, api_key, data_dir, lambda c: c.get(f"/api/orgs/{org}/invoices/draft"))
    cur = inv["currency"]
    table = Table("#", "line", "provider", "pricing", "quantity", f"amount ({cur})")
    table.title = f"Draft invoice {inv['period']} for {inv['org_name']}, as of {inv['as_of'][:16]} UTC"
    for line in inv["lines"]:
        table.add_row(
            str(line["n"]),
            line["description"],
            line["provider"],
            line.get("pricing", {}).get("text", ""),
            f"{line['quantity']} {line.get('unit', '')}".strip(),
            format_micros(line["amount_micros"]),
        )
    console.print(table)
    console.print(
        f"total {format_micros(inv['total_micros'], cur)}, paid from the wallet {format_micros(inv['prepaid_micros'])}"
        f", due at close {format_micros(inv['due_micros'])}"
    )


@billing_app.command("movements")
def movements(
    org: str,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 50,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """What moved ORG's wallet balance: credits in, and what each pay-as-you-go call paid."""
    result = call(
        url, api_key, data_dir, lambda c: c.get_params(f"/api/orgs/{org}/wallet/movements", {"limit": str(limit)})
    )
    cur = result["currency"]
    table = Table("at", "kind", "what", f"amount ({cur})", f"balance after ({cur})")
    for m in result["movements"]:
        what = m.get("reference") or f"{m.get('model')} ({m.get('request_id', '')[:12]})"
        table.add_row(
            m["at"][:19], m["kind"], what, format_micros(m["amount_micros"]), format_micros(m["balance_after_micros"])
        )
    console.print(table)
