"""``openmaas cluster``: where the models run (nodes, deployments, replicas, models resident where, memory)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from openmaas.cli.common import DEFAULT_URL, DataDirOpt, KeyOpt, UrlOpt, call, console

cluster_app = typer.Typer(
    help="The serving cluster (cluster mode on Ray; one process otherwise).", no_args_is_help=True
)


def _mib(n: int | float | None) -> str:
    return f"{(n or 0) / (1024 * 1024):,.0f} MiB"


@cluster_app.command("status")
def cluster_status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the server's answer as JSON.")] = False,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    data_dir: DataDirOpt = Path(".openmaas"),
) -> None:
    """Nodes, deployments and their replicas, and which models each replica holds (platform admin)."""
    view: dict[str, Any] = call(url, api_key, data_dir, lambda c: c.get("/api/cluster"))
    if as_json:
        console.print_json(json.dumps(view))
        return
    console.print(
        f"backend: [bold]{view['backend']}[/bold]" + (f" at {view['address']}" if view.get("address") else "")
    )
    nodes = Table("node", "alive", "address", "CPU", "memory", title="nodes")
    for n in view["nodes"]:
        res = n.get("resources", {})
        nodes.add_row(
            n["node_id"][:12],
            "yes" if n["alive"] else f"[red]no[/red] {n.get('death_reason') or ''}",
            n.get("address", ""),
            f"{res.get('CPU', 0):g}" if res else "",
            _mib(res.get("memory")) if res else "",
        )
    console.print(nodes)
    if view["applications"]:
        apps = Table("application", "status", "replicas", title="deployments")
        for a in view["applications"]:
            for d in a["deployments"]:
                states = ", ".join(f"{k.lower()} {v}" for k, v in d["replicas"].items()) or "none"
                apps.add_row(a["name"], d["status"].lower(), states)
        console.print(apps)
    replicas = Table("replica", "node", "model", "state", "in flight", "memory", title="replicas")
    for r in view["replicas"]:
        where = f"{r['deployment']} (pid {r['pid']})"
        budget = r.get("memory_budget_bytes") or 0
        used = f"{_mib(r.get('memory_used_bytes'))} of {_mib(budget)}" if budget else _mib(r.get("memory_used_bytes"))
        if not r["models"]:
            replicas.add_row(where, str(r["node"])[:12], "(none)", "", "", used)
        for m in r["models"]:
            replicas.add_row(
                where,
                str(r["node"])[:12],
                f"{m['model']} v{m['version']}",
                m["state"].lower(),
                str(m.get("in_flight", 0)),
                _mib(m.get("memory_bytes")),
            )
            where, used = "", ""
    console.print(replicas)
