"""CLI for organisations, users, API keys, usage and the audit log."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from openmaas.billing.money import format_micros
from openmaas.cli.common import DEFAULT_URL, DataDirOpt, KeyOpt, UrlOpt, call, console, err

T = TypeVar("T")

orgs_app = typer.Typer(help="Create and list organisations.", no_args_is_help=True)
users_app = typer.Typer(help="Create users and give them roles in organisations.", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list, rotate and revoke API keys.", no_args_is_help=True)
audit_app = typer.Typer(help="Read and verify the audit log.", no_args_is_help=True)


def install(app: typer.Typer) -> None:
    app.add_typer(orgs_app, name="orgs")
    app.add_typer(users_app, name="users")
    app.add_typer(keys_app, name="keys")
    app.add_typer(audit_app, name="audit")
    app.command("usage")(usage)
    app.command("login")(login)


def _table(columns: list[str], rows: list[dict[str, Any]]) -> Table:
    table = Table(*columns)
    for row in rows:
        table.add_row(*["" if row.get(c) is None else str(row.get(c)) for c in columns])
    return table


# -- organisations ------------------------------------------------------------------------------------------------


@orgs_app.command("create")
def orgs_create(
    name: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")
) -> None:
    """Create an organisation (platform admin)."""
    org = call(url, api_key, data_dir, lambda c: c.post("/api/orgs", {"name": name}))
    console.print(f"Created organisation [bold]{org['name']}[/bold] (id {org['id']})")


@orgs_app.command("list")
def orgs_list(url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")) -> None:
    """List the organisations you can see."""
    orgs = call(url, api_key, data_dir, lambda c: c.get("/api/orgs"))["orgs"]
    console.print(_table(["name", "id", "created_at"], orgs))


# -- users --------------------------------------------------------------------------------------------------------


def _password(confirm: bool) -> str:
    # On stderr, so `openmaas login ... > key.txt` captures only the key.
    value: str = typer.prompt("Password", hide_input=True, confirmation_prompt=confirm, err=True)
    return value


@users_app.command("create")
def users_create(
    email: str,
    operator: Annotated[
        bool, typer.Option("--operator", help="An operator: signs in to the web console as the platform admin.")
    ] = False,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """Create a user (platform admin); the password is asked for, never taken on the command line."""
    password = _password(confirm=True)
    user = call(url, api_key, data_dir, lambda c: c.post("/api/users", {"email": email, "password": password}))
    if operator:
        user = call(url, api_key, data_dir, lambda c: c.patch(f"/api/users/{user['id']}", {"platform_admin": True}))
    role = " as an operator (console: /console, no organisation)" if operator else ""
    console.print(f"Created user {user['email']} (id {user['id']}){role}")


@users_app.command("operator")
def users_operator(
    email: str,
    off: Annotated[bool, typer.Option("--off", help="No longer an operator (their operator sessions end).")] = False,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """Make a user an operator of the platform (signs in to the web console as the platform admin), or not."""
    user = call(url, api_key, data_dir, lambda c: c.patch(f"/api/users/{email}", {"platform_admin": not off}))
    console.print(f"{user['email']} is {'now' if user['platform_admin'] else 'no longer'} an operator")


@users_app.command("list")
def users_list(url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")) -> None:
    """List all users (platform admin)."""
    users = call(url, api_key, data_dir, lambda c: c.get("/api/users"))["users"]
    console.print(_table(["email", "id", "platform_admin", "created_at"], users))


@users_app.command("add")
def users_add(
    org: str,
    email: str,
    role: Annotated[str, typer.Option(help="viewer, member, admin or owner.")] = "member",
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """Give an existing user a role in ORG."""
    member = call(url, api_key, data_dir, lambda c: c.post(f"/api/orgs/{org}/members", {"email": email, "role": role}))
    console.print(f"{member['email']} is now {member['role']} in {org}")


@users_app.command("members")
def users_members(
    org: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")
) -> None:
    """List the members of ORG."""
    members = call(url, api_key, data_dir, lambda c: c.get(f"/api/orgs/{org}/members"))["members"]
    console.print(_table(["email", "role", "user_id", "created_at"], members))


def login(
    org: Annotated[str, typer.Argument(help="The organisation to act in.")],
    email: Annotated[str, typer.Argument(help="Your email address.")],
    url: UrlOpt = DEFAULT_URL,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """Sign in to ORG as EMAIL and print a 12-hour session key (use it as OPENMAAS_API_KEY).

    ORG comes first, as in every org-scoped command; the older order (EMAIL ORG) still works."""
    if "@" in org and "@" not in email:  # an organisation name never holds "@"
        org, email = email, org
    password = _password(confirm=False)
    session = call(
        url, None, data_dir, lambda c: c.post("/api/auth/login", {"email": email, "password": password, "org": org})
    )
    err.print(f"Signed in to {org} as {session['role']}; the key expires at {session['expires_at']}.")
    print(session["key"])


# -- keys ---------------------------------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    org: str,
    name: Annotated[str, typer.Option("--name", help="What the key is for.")],
    scope: Annotated[list[str] | None, typer.Option("--scope", help="inference, manage, billing (repeat).")] = None,
    model: Annotated[list[str] | None, typer.Option("--model", help="Only these models (repeat).")] = None,
    expires_at: Annotated[str | None, typer.Option(help="ISO time with zone, e.g. 2026-12-31T00:00:00Z.")] = None,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(help="Input tokens per minute.")] = None,
    ipm: Annotated[int | None, typer.Option(help="Items per minute.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Requests in flight at once.")] = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """Create an API key in ORG; its secret is printed once."""
    body: dict[str, Any] = {"name": name, "scopes": scope or ["inference"]}
    if model:
        body["models"] = model
    if expires_at:
        body["expires_at"] = expires_at
    limits = {k: v for k, v in {"rpm": rpm, "tpm": tpm, "ipm": ipm, "concurrency": concurrency}.items() if v}
    if limits:
        body["limits"] = limits
    key = call(url, api_key, data_dir, lambda c: c.post(f"/api/orgs/{org}/keys", body))
    err.print(f"Created key {key['id']} ({', '.join(key['scopes'])}). The secret is shown once:")
    print(key["key"])


@keys_app.command("list")
def keys_list(
    org: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")
) -> None:
    """List ORG's keys (never their secrets)."""
    keys = call(url, api_key, data_dir, lambda c: c.get(f"/api/orgs/{org}/keys"))["keys"]
    for k in keys:
        k["scopes"] = ",".join(k["scopes"])
        k["limits"] = ",".join(f"{n}={v}" for n, v in k["limits"].items() if v) or ""
    console.print(_table(["id", "name", "prefix", "role", "scopes", "limits", "expires_at", "revoked_at"], keys))


@keys_app.command("revoke")
def keys_revoke(
    org: str, key_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")
) -> None:
    """Revoke a key (effective within a second on every server)."""
    call(url, api_key, data_dir, lambda c: c.delete(f"/api/orgs/{org}/keys/{key_id}"))
    console.print(f"Revoked {key_id}")


@keys_app.command("rotate")
def keys_rotate(
    org: str,
    key_id: str,
    grace: Annotated[int, typer.Option(help="Seconds the old secret keeps working.")] = 3600,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """Replace a key's secret; the old one works for --grace seconds more."""
    new = call(
        url, api_key, data_dir, lambda c: c.post(f"/api/orgs/{org}/keys/{key_id}/rotate", {"grace_seconds": grace})
    )
    err.print(f"New key {new['id']}; {key_id} expires at {new['previous']['expires_at']}. The secret is shown once:")
    print(new["key"])


# -- usage and audit ----------------------------------------------------------------------------------------------


def usage(
    start: Annotated[str | None, typer.Option("--from", help="First day (default: start of month).")] = None,
    end: Annotated[str | None, typer.Option("--to", help="Last day, inclusive (default: today).")] = None,
    group_by: Annotated[str, typer.Option(help="Comma-separated: model, key, day, org, protocol, unit.")] = "model",
    org: Annotated[str | None, typer.Option(help="Organisation (platform admin).")] = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """Print usage as a table."""
    params = {k: v for k, v in {"from": start, "to": end, "group_by": group_by, "org": org}.items() if v}
    result = call(url, api_key, data_dir, lambda c: c.get_params("/api/usage", params))
    dims = result["group_by"]
    units = (
        ["unit", "quantity"]
        if "unit" in dims
        else ["requests", "input_tokens", "output_tokens", "items", "audio_seconds", "job_seconds"]
    )
    currency = result.get("currency", "")
    columns = [d for d in dims if d != "unit"] + units + [f"cost ({currency})"]
    for row in result["data"]:
        row[f"cost ({currency})"] = format_micros(row.get("cost_micros", 0))
    table = _table(columns, result["data"])
    table.title = f"Usage {result['from']} .. {result['to']}"
    console.print(table)
    totals = dict(result["totals"])
    cost = format_micros(totals.pop("cost_micros", 0), currency)
    console.print("Total: " + ", ".join(f"{k} {v}" for k, v in totals.items()) + f"; cost {cost}")
    console.print(
        "[dim]cost: what pay-as-you-go calls paid from the wallet; fees, overage and dedicated capacity are on the "
        "invoice ('openmaas billing draft ORG')[/dim]"
    )


@audit_app.command("list")
def audit_list(
    after: Annotated[int, typer.Option(help="Events after this sequence number.")] = 0,
    limit: int = 50,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """List audit events (your organisation's; all for the platform admin)."""
    events = call(
        url, api_key, data_dir, lambda c: c.get_params("/api/audit", {"after": str(after), "limit": str(limit)})
    )["events"]
    for e in events:
        e["at"] = e["at"][:19]
        e["actor"] = e["actor"]["kind"] + (f":{e['actor']['key_id'][:8]}" if e["actor"]["key_id"] else "")
    console.print(_table(["seq", "at", "actor", "org_id", "action", "target", "client_ip"], events))


@audit_app.command("verify")
def audit_verify(url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")) -> None:
    """Check the audit log's hash chain from the first event to the last (platform admin)."""
    result = call(url, api_key, data_dir, lambda c: c.get("/api/audit/verify"))
    if result["ok"]:
        console.print(f"[green]OK[/green]: {result['events']} events, chain intact")
        return
    err.print(f"[red]TAMPERED[/red]: event {result['first_bad_seq']}: {result['reason']}")
    raise typer.Exit(2)
