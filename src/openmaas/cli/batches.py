"""``openmaas batches``: offline batch from a JSONL file (upload, create, a live progress bar, the output
downloaded), and list, show, cancel."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from openmaas.cli.client import ApiError, Client
from openmaas.cli.common import DEFAULT_URL, DataDirOpt, KeyOpt, UrlOpt, call, client, console, err, fail

batches_app = typer.Typer(help="Offline batches: create from a JSONL file, list, show, cancel.", no_args_is_help=True)
TERMINAL = ("completed", "failed", "expired", "cancelled")


def _counts(batch: dict[str, Any]) -> tuple[int, int, int]:
    c = batch.get("request_counts") or {}
    return int(c.get("total", 0)), int(c.get("completed", 0)), int(c.get("failed", 0))


def _watch(c: Client, batch_id: str) -> dict[str, Any]:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(batch_id, total=None, detail="validating")
        while True:
            batch: dict[str, Any] = c.get(f"/v1/batches/{batch_id}")
            total, done, failed = _counts(batch)
            detail = batch["status"] + (f", {failed} failed" if failed else "")
            progress.update(task, total=total or None, completed=done + failed, detail=detail)
            if batch["status"] in TERMINAL:
                return batch
            time.sleep(0.5)


def _download(c: Client, batch: dict[str, Any], output: Path) -> None:
    for kind, suffix in (("output_file_id", ""), ("error_file_id", ".errors")):
        file_id = batch.get(kind)
        if file_id:
            target = output.with_name(output.stem + suffix + output.suffix) if suffix else output
            written = c.download(f"/v1/files/{file_id}/content", target)
            console.print(f"{'results' if not suffix else 'error lines'}: {target} ({written:,} bytes)")


@batches_app.command("create")
def batches_create(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL: one request a line.")],
    endpoint: Annotated[
        str, typer.Option(help="/v1/embeddings, /v1/completions, /v1/chat/completions or /v2/models/{m}/infer")
    ],
    output: Annotated[
        Path | None, typer.Option(help="Where to write the results (default: FILE.output.jsonl).")
    ] = None,
    window: Annotated[str, typer.Option(help="Completion window, e.g. 24h or 90m.")] = "24h",
    wait: Annotated[bool, typer.Option(help="Follow the batch and download its results.")] = True,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """Upload FILE, create a batch, follow it with a progress bar and download its results."""
    with client(url, api_key, data_dir) as c:
        try:
            uploaded = c.upload("/v1/files", file, {"purpose": "batch"})
            batch = c.post(
                "/v1/batches",
                {"input_file_id": uploaded["id"], "endpoint": endpoint, "completion_window": window},
            )
            console.print(
                f"Batch [bold]{batch['id']}[/bold] created from {uploaded['id']} ({uploaded['bytes']:,} bytes)"
            )
            if not wait:
                return
            batch = _watch(c, batch["id"])
            if batch["status"] == "failed":
                for e in (batch.get("errors") or {}).get("data", []):
                    where = f"line {e['line']}: " if e.get("line") else ""
                    err.print(f"[red]{e['code']}[/red] {where}{e['message']}")
                raise typer.Exit(1)
            _download(c, batch, output or file.with_name(file.stem + ".output.jsonl"))
        except ApiError as e:
            fail(e)
    total, done, failed = _counts(batch)
    colour = "green" if batch["status"] == "completed" and not failed else "yellow"
    console.print(f"[{colour}]{batch['status']}[/{colour}]: {done} of {total} lines answered, {failed} failed")


@batches_app.command("list")
def batches_list(url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")) -> None:
    """Your organisation's recent batches."""
    rows = call(url, api_key, data_dir, lambda c: c.get("/v1/batches?limit=100"))["data"]
    table = Table("id", "endpoint", "model", "status", "done", "failed", "total", "created")
    for b in rows:
        total, done, failed = _counts(b)
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(b["created_at"]))
        table.add_row(
            b["id"], b["endpoint"], b["model"] or "", b["status"], str(done), str(failed), str(total), created
        )
    console.print(table)


@batches_app.command("show")
def batches_show(
    batch_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")
) -> None:
    """A batch's status, counts, files, errors and usage."""
    console.print_json(json.dumps(call(url, api_key, data_dir, lambda c: c.get(f"/v1/batches/{batch_id}"))))


@batches_app.command("cancel")
def batches_cancel(
    batch_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")
) -> None:
    """Cancel a batch: lines in flight finish, the rest do not run; completed lines are kept (and charged)."""
    batch = call(url, api_key, data_dir, lambda c: c.post(f"/v1/batches/{batch_id}/cancel"))
    console.print(f"{batch_id}: {batch['status']}")
