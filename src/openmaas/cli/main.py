"""``openmaas``: run the server and manage models from the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from openmaas.cli import evaluation, publishing, tenancy
from openmaas.cli.batches import batches_app
from openmaas.cli.billing import billing_app
from openmaas.cli.client import ApiError
from openmaas.cli.cluster import cluster_app
from openmaas.cli.common import DEFAULT_URL, DataDirOpt, KeyOpt, UrlOpt, client, console, err, fail
from openmaas.cli.jobs import datasets_app, jobs_app, train

app = typer.Typer(help="OpenMaaS: models as a service.", no_args_is_help=True, add_completion=False)
models_app = typer.Typer(help="Register, list, show, load and unload models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
tenancy.install(app)
app.add_typer(billing_app, name="billing")
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")
app.add_typer(batches_app, name="batches")
app.add_typer(cluster_app, name="cluster")
app.command("train")(train)
app.command("evaluate")(evaluation.evaluate)
models_app.command("evaluations")(evaluation.evaluations)
models_app.command("compare")(evaluation.compare)
models_app.command("visibility")(publishing.visibility)
models_app.command("share")(publishing.share)
models_app.command("pending")(publishing.pending)
models_app.command("review")(publishing.review)
models_app.command("plans")(publishing.plans)
models_app.command("sell")(publishing.plan_create)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000; 0 picks a free one).")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Data folder (default ./.openmaas).")] = None,
) -> None:
    """Start the server (first start registers the bundled models)."""
    import os

    # Before any Hugging Face library is imported: their progress bars would break the one-JSON-object-a-line log.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import uvicorn

    from openmaas.api.http1 import protocol_class
    from openmaas.app import create_app
    from openmaas.config import Settings, SettingsError
    from openmaas.telemetry import configure_logging

    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    settings = Settings(**overrides)
    for port, what in (
        (
            settings.port,
            "is already in use (another OpenMaaS server?); choose another port with --port or OPENMAAS_PORT",
        ),
        (settings.grpc_port, "(gRPC) is already in use; choose another with OPENMAAS_GRPC_PORT, or 0 to turn gRPC off"),
    ):
        if port != 0 and not _port_is_free(settings.host, port):
            err.print(f"[red]error:[/red] {settings.host}:{port} {what}", soft_wrap=True)
            raise typer.Exit(1)
    configure_logging(settings.log_level, settings.log_format)
    try:
        application = create_app(settings)  # settings that cannot work together are said in one line
    except SettingsError as e:
        err.print(f"[red]error:[/red] {e}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from None
    uvicorn.run(
        application,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        loop="auto",
        http=protocol_class(),  # uvicorn's httptools protocol, a response's writes sent in one call
        timeout_graceful_shutdown=10,
    )


def _port_is_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        # As uvicorn binds: a port whose last server was killed (TIME_WAIT) is free, one with a listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@models_app.command("register")
def models_register(
    path: Annotated[Path, typer.Argument(exists=True, help="ONNX/skops file or a model folder.")],
    name: Annotated[str, typer.Option("--name", help="Model name.")],
    format: Annotated[str | None, typer.Option("--format", help="onnx, sentence-transformers or skops.")] = None,
    card: Annotated[Path | None, typer.Option("--card", exists=True, help="Model card as a JSON file.")] = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """Upload a model as the next version of NAME."""
    card_json = card.read_text() if card else None
    with client(url, api_key, data_dir) as c, console.status(f"Uploading and checking {path.name}..."):
        try:
            mv = c.register_model(path, name, format, card_json)
        except ApiError as e:
            fail(e)
            return
    console.print(
        f"Registered [bold]{mv['model']}[/bold] version {mv['version']} ({mv['format']}, sha256 {mv['sha256'][:12]})"
    )


@models_app.command("card-template")
def models_card_template() -> None:
    """Print a model card with every field to fill in (JSON); docs/model-cards.md says what each should say."""
    from openmaas.entities.models import card_template

    typer.echo(json.dumps(card_template(), indent=2))


@models_app.command("list")
def models_list(url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")) -> None:
    """List the models you can see."""
    with client(url, api_key, data_dir) as c:
        try:
            models = c.get("/api/models")["models"]
        except ApiError as e:
            fail(e)
            return
    table = Table("name", "latest", "visibility", "owner", "created")
    for m in models:
        table.add_row(
            m["name"],
            str(m["latest_version"]),
            m["visibility"],
            m["owner_org_id"] or "platform",
            m["created_at"][:19],
        )
    console.print(table)


@models_app.command("show")
def models_show(
    name: str,
    wait: Annotated[bool, typer.Option(help="Wait, with a progress bar, until the model is ready to serve.")] = False,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """Show a model's versions, signature and card (as JSON), and whether it is ready (on stderr)."""
    with client(url, api_key, data_dir) as c:
        try:
            model = c.get(f"/api/models/{name}")
            if wait and model.get("preparation"):
                model = _wait_until_ready(c, name, model)
        except ApiError as e:
            fail(e)
            return
    prep = model.get("preparation")
    if prep:
        err.print(
            f"{model['name']}: preparing, {prep['step']}, {prep['progress']:.0%} after {prep['elapsed_s']:.0f} s; "
            "calls get 503 until it is ready (--wait to follow it)"
        )
    elif "state" in model:
        err.print(f"{model['name']}: ready ({model['state'].lower()})")
    console.print_json(json.dumps(model))


def _wait_until_ready(c: Any, name: str, model: dict[str, Any]) -> dict[str, Any]:
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=err,
    ) as bar:
        task = bar.add_task(f"{model['name']}: {model['preparation']['step']}", total=1.0)
        while model.get("preparation"):
            prep = model["preparation"]
            bar.update(task, completed=prep["progress"], description=f"{model['name']}: {prep['step']}")
            time.sleep(1.0)
            model = c.get(f"/api/models/{name}")
        bar.update(task, completed=1.0, description=f"{model['name']}: ready")
    return model


def _repository(action: str, name: str, url: str, api_key: str | None, data_dir: Path) -> None:
    with client(url, api_key, data_dir) as c, console.status(f"{action.capitalize()}ing {name}..."):
        try:
            c.post(f"/v2/repository/models/{name}/{action}")
        except ApiError as e:
            fail(e)
            return
    console.print(f"{name}: {action}ed")


@models_app.command("load")
def models_load(
    name: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")
) -> None:
    """Load a model's latest version into memory now."""
    _repository("load", name, url, api_key, data_dir)


@models_app.command("unload")
def models_unload(
    name: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, data_dir: DataDirOpt = Path(".openmaas")
) -> None:
    """Unload a model (after its in-flight requests finish)."""
    _repository("unload", name, url, api_key, data_dir)


def main() -> None:
    app()
