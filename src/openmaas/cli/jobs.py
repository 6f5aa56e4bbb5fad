"""CLI for datasets, jobs and ``openmaas train`` (upload, submit, watch with a live progress bar)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from openmaas.cli.client import Client
from openmaas.cli.common import DEFAULT_URL, DataDirOpt, KeyOpt, UrlOpt, call, client, console, err

datasets_app = typer.Typer(help="Upload, list, show and delete datasets.", no_args_is_help=True)
jobs_app = typer.Typer(help="List, watch, cancel jobs and read their logs.", no_args_is_help=True)
TERMINAL = ("succeeded", "failed", "cancelled")


@datasets_app.command("upload")
def datasets_upload(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="CSV or JSONL file.")],
    name: Annotated[str | None, typer.Option(help="Dataset name (default: the file name).")] = None,
    format: Annotated[str | None, typer.Option(help="csv or jsonl (default: from the file name).")] = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """Upload a dataset (checked on upload)."""
    data = {k: v for k, v in {"name": name, "format": format}.items() if v}
    ds = call(url, api_key, data_dir, lambda c: c.upload("/api/datasets", file, data))
    shape = f", {len(ds['schema']['columns'])} columns" if "columns" in ds["schema"] else ""
    console.print(f"Dataset [bold]{ds['id']}[/bold]: {ds['format']}, {ds['rows']} rows{shape}")


@datasets_app.command("list")
def datasets_list(url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")) -> None:
    """List your organisation's datasets."""
    rows = call(url, api_key, data_dir, lambda c: c.get("/api/datasets"))["datasets"]
    table = Table("id", "name", "format", "rows", "sha256", "created")
    for d in rows:
        table.add_row(d["id"], d["name"], d["format"], str(d["rows"]), d["sha256"][:12], d["created_at"][:19])
    console.print(table)


@datasets_app.command("show")
def datasets_show(
    dataset_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")
) -> None:
    """Schema, row count, class balance and sha256 of a dataset."""
    import json

    console.print_json(json.dumps(call(url, api_key, data_dir, lambda c: c.get(f"/api/datasets/{dataset_id}"))))


@datasets_app.command("delete")
def datasets_delete(
    dataset_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")
) -> None:
    """Delete a dataset and its stored data."""
    call(url, api_key, data_dir, lambda c: c.delete(f"/api/datasets/{dataset_id}"))
    console.print(f"Deleted {dataset_id}")


@jobs_app.command("list")
def jobs_list(url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")) -> None:
    """List recent jobs."""
    rows = call(url, api_key, data_dir, lambda c: c.get("/api/jobs"))["jobs"]
    table = Table("id", "type", "status", "progress", "created", "error")
    for j in rows:
        table.add_row(
            j["id"],
            j["type"],
            j["status"],
            f"{100 * j['progress']:.0f}%",
            j["created_at"][:19],
            (j["error"] or "")[:60],
        )
    console.print(table)


def watch_job(c: Client, job_id: str) -> dict[str, Any]:
    """A live progress bar with the latest epoch's loss and metric, until the job ends."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"job {job_id[:8]}", total=1.0, detail="queued")
        while True:
            job: dict[str, Any] = c.get(f"/api/jobs/{job_id}")
            last = job["history"][-1] if job["history"] else None
            detail = job["status"]
            if last:
                detail = f"epoch {last['epoch']} loss {last['loss']:.4f} val_loss {last['val_loss']:.4f} metric {last['val_metric']:.4f}"
            progress.update(task, completed=job["progress"], detail=detail)
            if job["status"] in TERMINAL:
                return job
            time.sleep(0.5)


def _report(job: dict[str, Any]) -> None:
    if job["status"] == "succeeded":
        result = job["result"]
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items() if isinstance(v, float))
        console.print(f"[green]succeeded[/green]: {result['model']} version {result['version']} ({metrics})")
        return
    err.print(f"[red]{job['status']}[/red]: {job['error']}")
    raise typer.Exit(1)


@jobs_app.command("watch")
def jobs_watch(
    job_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")
) -> None:
    """Follow a job with a live progress bar until it ends."""
    with client(url, api_key, data_dir) as c:
        _report(watch_job(c, job_id))


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")
) -> None:
    """Cancel a job (a running one stops after its current epoch)."""
    job = call(url, api_key, data_dir, lambda c: c.post(f"/api/jobs/{job_id}/cancel"))
    console.print(f"{job_id}: {job['status']}{' (stopping)' if job['status'] == 'running' else ''}")


@jobs_app.command("logs")
def jobs_logs(
    job_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")
) -> None:
    """Print a job's log."""
    print(call(url, api_key, data_dir, lambda c: c.text(f"/api/jobs/{job_id}/logs")), end="")


def train(
    task: Annotated[
        str,
        typer.Option(help="tabular-classification, tabular-regression, image-classification or text-classification."),
    ],
    data: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="CSV, JSONL, Parquet or image zip.")],
    target: Annotated[str, typer.Option(help="The column to predict.")],
    output: Annotated[str | None, typer.Option(help="Model name (default: the file's name).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs.")] = None,
    model: Annotated[str | None, typer.Option(help="linear or mlp.")] = None,
    optimizer: Annotated[str | None, typer.Option(help="sgd, momentum, adagrad, adam or adamw.")] = None,
    learning_rate: Annotated[float | None, typer.Option("--lr", help="Learning rate.")] = None,
    text_column: Annotated[str | None, typer.Option(help="The text to classify (text-classification).")] = None,
    fine_tune: Annotated[
        bool, typer.Option("--fine-tune", help="text-classification: train the encoder too, not just a head.")
    ] = False,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """Upload DATA, train a model on it in the platform and watch it; the result is served at once."""
    params = {
        k: v
        for k, v in {"epochs": epochs, "model": model, "optimizer": optimizer, "learning_rate": learning_rate}.items()
        if v is not None
    }
    name = output or data.stem.replace("_", "-")
    with client(url, api_key, data_dir) as c:
        ds = call(url, api_key, data_dir, lambda c2: c2.upload("/api/datasets", data, {}))
        console.print(f"Uploaded {data.name}: {ds['rows']} rows (dataset {ds['id'][:8]})")
        body = {
            "type": "train",
            "task": task,
            "dataset": ds["id"],
            "target": target,
            "output_model": name,
            "params": params,
        }
        if text_column:
            body["text_column"] = text_column
        if fine_tune:
            body["fine_tune"] = True
        job = call(url, api_key, data_dir, lambda c2: c2.post("/api/jobs", body))
        _report(watch_job(c, job["id"]))
