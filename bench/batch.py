"""Offline batch benchmark: a 10,000-line embedding batch against the in-process limit, and online calls while
it runs against the same calls on an idle server, all measured in one run.

    python bench/batch.py [--lines 10000] [--duration 10] [--append docs/benchmarks.md]

1. In-process limit: the embedding runtime the server uses, called directly at its best batch size and layout
   (no HTTP, no gateway), measured before and after the server runs; the mean of the two is the limit.
2. A real ``openmaas serve``; online ``/v1/embeddings`` at 1 and 8 clients on the idle server.
3. A batch of one sentence a line, alone on the server: lines/s from ``in_progress_at`` to ``completed_at``.
4. The same batch again, and while it runs, online calls at 1 and 8 clients: p50 and throughput against idle.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from harness import http_request, machine, sentences, start_server
from inprocess import InProcessEmbeddings
from loadgen import run_load

KEY = "om_bench-admin-key-0123456789abcdefghijklmnop"
MODEL = "all-minilm-l6-v2"


def _submit(c: httpx.Client, texts: list[str]) -> str:
    lines = [
        {"custom_id": f"l{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": MODEL, "input": t}}
        for i, t in enumerate(texts)
    ]
    data = "\n".join(json.dumps(x) for x in lines).encode()
    f = c.post("/v1/files", data={"purpose": "batch"}, files={"file": ("bench.jsonl", data)})
    f.raise_for_status()
    b = c.post("/v1/batches", json={"input_file_id": f.json()["id"], "endpoint": "/v1/embeddings"})
    b.raise_for_status()
    return str(b.json()["id"])


def _poll(c: httpx.Client, batch_id: str, until: str, completed: int = 0) -> dict[str, Any]:
    while True:
        b: dict[str, Any] = c.get(f"/v1/batches/{batch_id}").json()
        if b["status"] in ("failed", "expired", "cancelled"):
            raise RuntimeError(f"batch {batch_id} {b['status']}: {b.get('errors')}")
        if b["status"] == until and b["request_counts"]["completed"] >= completed:
            return b
        if until == "in_progress" and b["status"] == "completed":
            return b
        time.sleep(0.05)


def _counts(c: httpx.Client, batch_id: str) -> int:
    b = c.get(f"/v1/batches/{batch_id}").json()
    if b["status"] in ("failed", "expired", "cancelled"):
        raise RuntimeError(f"batch {batch_id} {b['status']}")
    return int(b["request_counts"]["completed"]) + int(b["request_counts"]["failed"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=10.0, help="Seconds per online measurement.")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--append", type=Path, default=None)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    texts = sentences(args.lines, seed=3)
    in_process = InProcessEmbeddings(texts, cores)
    sweep = in_process.sweep(8)
    limit_before = float(sweep["limit"])  # type: ignore[arg-type]
    print(f"in-process limit before: {limit_before:.0f} sentences/s ({sweep['best']})", flush=True)
    online_reqs = [
        http_request("/v1/embeddings", json.dumps({"model": MODEL, "input": t}).encode(), KEY)
        for t in sentences(512, seed=5)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_server(Path(tmp) / "data", KEY, {})
        try:
            with httpx.Client(
                base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"}, timeout=300
            ) as c:
                c.post("/v1/embeddings", json={"model": MODEL, "input": "warm up"}).raise_for_status()
                idle1 = run_load(port, online_reqs, 1, args.warmup, args.duration)
                idle8 = run_load(port, online_reqs, 8, args.warmup, args.duration)
                print(f"idle online: C=1 p50 {idle1['p50_ms']:.2f} ms, C=8 {idle8['rps']:.0f} req/s", flush=True)

                # Timed here (the batch object's timestamps are whole seconds): from the first poll that sees it
                # running to the first that sees every line answered; then to completed (its output file written).
                alone_id = _submit(c, texts)
                _poll(c, alone_id, "in_progress")
                t0 = time.perf_counter()
                while _counts(c, alone_id) < args.lines:
                    time.sleep(0.02)
                alone_s = time.perf_counter() - t0
                _poll(c, alone_id, "completed", args.lines)
                finalized_s = time.perf_counter() - t0
                batch_id = _submit(c, texts)
                started = time.perf_counter()
                _poll(c, batch_id, "in_progress", 1)
                mid = _poll(c, batch_id, "in_progress", 200)
                busy1 = run_load(port, online_reqs, 1, 0.5, args.duration)
                busy8 = run_load(port, online_reqs, 8, 0.5, args.duration)
                during = c.get(f"/v1/batches/{batch_id}").json()
                still_running = during["status"] == "in_progress"
                done = _poll(c, batch_id, "completed", args.lines)
                shared_s = time.perf_counter() - started
                print(f"batch alone: {args.lines / alone_s:.0f} lines/s; with online load {shared_s:.1f} s")
                assert mid["request_counts"]["completed"] >= 200
                assert done["request_counts"]["completed"] == args.lines
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    limit_after = in_process.limit(4)
    limit = (limit_before + limit_after) / 2
    lines_per_s = args.lines / alone_s
    rows = [
        ("batch alone: lines/s", f"{lines_per_s:.0f}", f"{lines_per_s / limit:.2f}x the in-process limit",
         ">= 0.8x", lines_per_s / limit >= 0.8),
        ("online C=1 p50 during the batch", f"{busy1['p50_ms']:.2f} ms", f"{busy1['p50_ms'] / idle1['p50_ms']:.2f}x idle "
         f"({idle1['p50_ms']:.2f} ms)", "<= 1.5x", busy1["p50_ms"] / idle1["p50_ms"] <= 1.5),
        ("online C=8 throughput during the batch", f"{busy8['rps']:.0f} req/s", f"{busy8['rps'] / idle8['rps']:.2f}x idle "
         f"({idle8['rps']:.0f} req/s)", ">= 0.8x", busy8["rps"] / idle8["rps"] >= 0.8),
    ]  # fmt: skip
    lines = [
        "",
        "## Offline batch",
        "",
        f"Measured by `bench/batch.py` on {machine()}: a {args.lines:,}-line `/v1/embeddings` batch (one sentence a "
        f"line) on a real server; in-process limit {limit:.0f} sentences/s (before {limit_before:.0f}, after "
        f"{limit_after:.0f}; {sweep['best']}). The batch alone answered every line {alone_s:.1f} s after it was "
        f"seen running, and had its output file written {finalized_s - alone_s:.1f} s later. Online calls: {args.duration:g} s each at 1 and 8 clients"
        + ("" if still_running else " (the batch finished before they did: the figures understate its effect)")
        + ".",
        "",
        "| figure | measured | against | target | met |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {value} | {against} | {target} | {'yes' if ok else 'no'} |"
        for name, value, against, target, ok in rows
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.append:
        with args.append.open("a") as f:
            f.write(report)


if __name__ == "__main__":
    main()
