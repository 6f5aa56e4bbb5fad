"""``openmaas evaluate`` (upload, submit, watch, print the report), ``models evaluations`` and ``models compare``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from openmaas.cli.common import DEFAULT_URL, DataDirOpt, KeyOpt, UrlOpt, call, client, console, err
from openmaas.cli.jobs import watch_job

_UNITS = {"latency_p50_ms": "ms", "latency_p95_ms": "ms", "throughput_rows_per_s": "rows/s"}


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def print_report(report: dict[str, Any], base_url: str) -> None:
    dataset = report["dataset"]
    split = "all rows" if dataset.get("split", "all") == "all" else dataset["split"]
    console.print(
        f"[bold]{report['model']}[/bold] version {report['version']}, {report['task']}, on dataset "
        f"{dataset['name']} ({dataset['rows']} rows, {split}); evaluation {report['id']}"
    )
    table = Table("metric", "value", title="measured by the platform")
    for name, value in report["metrics"].items():
        if isinstance(value, int | float):
            table.add_row(name, _figure(value))
    perf = report["performance"]
    for name in ("latency_p50_ms", "latency_p95_ms", "throughput_rows_per_s", "best_batch", "size_bytes",
                 "parameters", "memory_bytes", "peak_rss_bytes", "real_time_factor", "scored_tokens_per_s"):  # fmt: skip
        if perf.get(name) is not None:
            table.add_row(name, f"{_figure(perf[name])} {_UNITS.get(name, '')}".strip(), style="dim")
    console.print(table)
    machine = report["machine"]
    console.print(
        f"measured on {machine['cpu']} ({machine['cores']} cores; {' '.join(machine['isa']) or 'no ISA flags'})"
    )
    for name, path in report["plots"].items():
        console.print(f"plot {name}: {base_url}{path}")


def evaluate(
    model: Annotated[str, typer.Argument(help="The model to evaluate.")],
    data: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="A dataset file to upload (CSV, JSONL, zip).")
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="An uploaded dataset's id (instead of --data).")] = None,
    version: Annotated[int | None, typer.Option(help="The version (default: the latest).")] = None,
    task: Annotated[
        str | None, typer.Option(help="classification, regression, embedding, text-generation or speech.")
    ] = None,
    target: Annotated[str | None, typer.Option(help="The column holding the truth (default: label).")] = None,
    text_column: Annotated[str | None, typer.Option(help="The text column (default: text).")] = None,
    reference_version: Annotated[int | None, typer.Option(help="Embeddings: measure fidelity to this version.")] = None,
    classes: Annotated[str | None, typer.Option(help="Class names in output order, comma-separated.")] = None,
    max_rows: Annotated[int | None, typer.Option(help="Evaluate the first rows only.")] = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """Score MODEL on a dataset through the serving path, with a progress bar, and print its report."""
    if (data is None) == (dataset is None):
        err.print("[red]error:[/red] give --data FILE or --dataset ID (one of them)")
        raise typer.Exit(2)
    with client(url, api_key, data_dir) as c:
        if data is not None:
            ds = call(url, api_key, data_dir, lambda c2: c2.upload("/api/datasets", data, {}))
            console.print(f"Uploaded {data.name}: {ds['rows']} rows (dataset {ds['id'][:8]})")
            dataset = ds["id"]
        body: dict[str, Any] = {"type": "evaluate", "model": model, "dataset": dataset}
        options = {
            "version": version,
            "task": task,
            "target": target,
            "text_column": text_column,
            "reference_version": reference_version,
            "max_rows": max_rows,
            "classes": [s.strip() for s in classes.split(",")] if classes else None,
        }
        body.update({k: v for k, v in options.items() if v is not None})
        job = call(url, api_key, data_dir, lambda c2: c2.post("/api/jobs", body))
        done = watch_job(c, job["id"])
        if done["status"] != "succeeded":
            err.print(f"[red]{done['status']}[/red]: {done['error']}")
            raise typer.Exit(1)
        report = call(url, api_key, data_dir, lambda c2: c2.get(done["result"]["report"]))
    print_report(report, c.url)


def evaluations(
    name: str,
    version: Annotated[int | None, typer.Option(help="The version (default: the latest).")] = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """List a version's evaluation reports, newest first."""

    def fetch(c: Any) -> dict[str, Any]:
        v = version or c.get(f"/api/models/{name}")["versions"][-1]["version"]
        return dict(c.get(f"/api/models/{name}/versions/{v}/evaluations"))

    out = call(url, api_key, data_dir, fetch)
    table = Table("evaluation", "task", "dataset", "rows", "headline", "p50 ms", "measured")
    for r in out["evaluations"]:
        m = r["metrics"]
        main = next((f"{k} {m[k]:.4f}" for k in ("accuracy", "r2", "cosine_mean", "spearman", "perplexity", "wer")
                     if isinstance(m.get(k), float)), "-")  # fmt: skip
        split = r["dataset"].get("split", "all")
        table.add_row(
            r["id"][:12],
            r["task"],
            r["dataset"]["name"] + ("" if split == "all" else f" ({split})"),
            str(r["dataset"]["rows"]),
            main,
            _figure(r["performance"].get("latency_p50_ms", "-")),
            r["created_at"][:19],
        )
    console.print(f"{out['model']} version {out['version']}")
    console.print(table)


def compare(
    name: str,
    a: Annotated[int, typer.Argument(help="The first version.")],
    b: Annotated[int, typer.Argument(help="The second version.")],
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """Two versions side by side on the same data, with the deltas (exit 1 when they are not comparable)."""
    out = call(url, api_key, data_dir, lambda c: c.get(f"/api/models/{name}/compare?a={a}&b={b}"))
    if not out["comparable"]:
        err.print(f"[yellow]not comparable:[/yellow] {out['reason']}")
        raise typer.Exit(1)
    ds = out["dataset"]
    console.print(f"{out['model']}: version {a} against {b}, {out['task']}, on {ds['name']} ({ds['rows']} rows)")
    table = Table("figure", f"v{a}", f"v{b}", "delta")
    for k, delta in out["deltas"].items():
        table.add_row(k, _figure(out["a"]["metrics"][k]), _figure(out["b"]["metrics"][k]), f"{delta:+.4g}")
    for k, p in out["performance"].items():
        ratio = f" (x{p['ratio']:.2f})" if p.get("ratio") else ""
        table.add_row(k, _figure(p["a"]), _figure(p["b"]), f"{p['delta']:+.4g}{ratio}", style="dim")
    console.print(table)
    head = out.get("headline")
    if head and head["delta"] is not None:
        better = (head["delta"] > 0) == head["higher_is_better"]
        word = "better" if better and head["delta"] else "worse" if head["delta"] else "the same"
        console.print(f"{head['metric']}: version {b} is {word} ({head['delta']:+.4f})")
