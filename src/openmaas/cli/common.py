"""What every CLI command shares: options, consoles, the API client and error output."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import typer
from rich.console import Console

from openmaas.cli.client import ApiError, Client, resolve_key

T = TypeVar("T")
console = Console()
err = Console(stderr=True)

UrlOpt = Annotated[
    str,
    typer.Option(
        "--url",
        envvar="OPENMAAS_URL",
        help="Server address (default: the local server, http://OPENMAAS_HOST:OPENMAAS_PORT, 127.0.0.1:8000).",
        show_default=False,
    ),
]
KeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="OPENMAAS_API_KEY", help="API key (default: <data-dir>/admin.key)."),
]
DataDirOpt = Annotated[
    Path, typer.Option("--data-dir", envvar="OPENMAAS_DATA_DIR", help="Data folder of a local server.")
]
#: "" means: the local server's address, from the same settings the server reads (OPENMAAS_HOST, OPENMAAS_PORT).
DEFAULT_URL = ""


def local_url() -> str:
    """The address ``openmaas serve`` listens on with this environment's settings."""
    host = os.environ.get("OPENMAAS_HOST") or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{os.environ.get('OPENMAAS_PORT') or 8000}"


def client(url: str, key: str | None, data_dir: Path) -> Client:
    target = (url or local_url()).rstrip("/")
    return Client(target, resolve_key(key, data_dir, local=target == local_url()))


def fail(e: ApiError) -> NoReturn:
    """One line on stderr, exit 1: the server's message, with a hint where one helps."""
    if e.status == 0:
        err.print(f"[red]error:[/red] {e.message}", soft_wrap=True, highlight=False)
    else:
        hint = " (send a valid key with --api-key or OPENMAAS_API_KEY)" if e.status == 401 else ""
        err.print(f"[red]error {e.status}:[/red] {e.message}{hint}", soft_wrap=True, highlight=False)
    raise typer.Exit(1)


def call(url: str, api_key: str | None, data_dir: Path, fn: Callable[[Client], T]) -> T:
    """Run ``fn`` with a client of the server; an API error is printed and exits 1."""
    with client(url, api_key, data_dir) as c:
        try:
            return fn(c)
        except ApiError as e:
            fail(e)
