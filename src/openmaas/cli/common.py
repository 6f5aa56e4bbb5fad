"""What every CLI command shares: options, consoles, the API client and error output."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from openmaas.cli.client import ApiError, Client, resolve_key

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
