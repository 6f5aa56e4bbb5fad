"""What every CLI command shares: options, consoles, the API client and error output."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import typer
from rich.console import Console

from openmaas.cli.client import ApiError, Client, resolve_key

T = TypeVar("T")
console = Console()
err = Console(stderr=True)

UrlOpt = Annotated[str, typer.Option("--url", envvar="OPENMAAS_URL", help="Server address.")]
KeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="OPENMAAS_API_KEY", help="API key (default: <data-dir>/admin.key)."),
]
DataDirOpt = Annotated[
    Path, typer.Option("--data-dir", envvar="OPENMAAS_DATA_DIR", help="Data folder of a local server.")
]
DEFAULT_URL = "http://127.0.0.1:8000"


def client(url: str, key: str | None, data_dir: Path) -> Client:
    return Client(url, resolve_key(key, data_dir))


def fail(e: ApiError) -> NoReturn:
    err.print(f"[red]error {e.status}:[/red] {e.message}")
    raise typer.Exit(1)


def call(url: str, api_key: str | None, data_dir: Path, fn: Callable[[Client], T]) -> T:
    """Run ``fn`` with a client of the server; an API error is printed and exits 1."""
    with client(url, api_key, data_dir) as c:
        try:
            return fn(c)
        except ApiError as e:
            fail(e)
