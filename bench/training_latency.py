"""Serving while training: embedding latency at C=1, idle and while a training job runs, in one run.

    python bench/training_latency.py [--duration 10] [--append docs/benchmarks.md]

A real server; a load generator in its own process sends one sentence per request (C=1) to /v1/embeddings:
first with nothing else running, then while a training job (an MLP on digits, long enough to outlast the
measurement) runs in its worker process. Target: p50 while training within 2x of idle.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from harness import http_request, machine, sentences, start_server
from loadgen import run_load

KEY = "om_bench-key-0123456789abcdefghijklmnopqrstuvwxyz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--append", type=Path, help="append the results as markdown to this file")
    args = parser.parse_args()
    from sklearn.datasets import load_digits

    texts = sentences(1024)
    headers = {"Authorization": f"Bearer {KEY}"}
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_server(Path(tmp) / "data", KEY, {})
        base = f"http://127.0.0.1:{port}"
        try:
            httpx.post(
                f"{base}/v2/repository/models/all-minilm-l6-v2/load", headers=headers, timeout=120
            ).raise_for_status()
            reqs = [
                http_request("/v1/embeddings", json.dumps({"model": "all-minilm-l6-v2", "input": t}).encode(), KEY)
                for t in texts
            ]
            idle = run_load(port, reqs, 1, args.warmup, args.duration)
            print(json.dumps({"idle": idle}), flush=True)

            digits = load_digits()
            data = Path(tmp) / "digits.csv"
            with data.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow([f"p{i}" for i in range(64)] + ["target"])
                for row, t in zip(digits.data, digits.target, strict=True):
                    writer.writerow([*row, t])
            with data.open("rb") as f:
                ds = httpx.post(f"{base}/api/datasets", files={"file": ("digits.csv", f)}, headers=headers).json()
            job = httpx.post(
                f"{base}/api/jobs",
                headers=headers,
                json={
                    "type": "train",
                    "task": "tabular-classification",
                    "dataset": ds["id"],
                    "target": "target",
                    "output_model": "bench-digits",
                    "params": {
                        "model": "mlp",
                        "hidden": [256, 256],
                        "epochs": 2000,
                        "batch_size": 16,
                        "early_stopping": False,
                    },
                },
            ).json()
            while not httpx.get(f"{base}/api/jobs/{job['id']}", headers=headers).json()["history"]:
                time.sleep(0.2)
            busy = run_load(port, reqs, 1, args.warmup, args.duration)
            state = httpx.get(f"{base}/api/jobs/{job['id']}", headers=headers).json()
            print(json.dumps({"training": busy, "job_status": state["status"], "epochs": len(state["history"])}))
            httpx.post(f"{base}/api/jobs/{job['id']}/cancel", headers=headers)
        finally:
            proc.terminate()
            proc.wait(30)
    ratio = busy["p50_ms"] / idle["p50_ms"]
    report = "\n".join(
        [
            "",
            "## Serving while training: `POST /v1/embeddings` at C=1",
            "",
            "Idle, then while a training job (an MLP on digits in its worker process: `nice 10`, one thread) runs; "
            f"{args.duration:.0f} s each, same server, same run; on {machine()}.",
            "",
            "| | req/s | p50 ms | p99 ms |",
            "|---|---:|---:|---:|",
            f"| idle | {idle['rps']:.0f} | {idle['p50_ms']:.2f} | {idle['p99_ms']:.2f} |",
            f"| training | {busy['rps']:.0f} | {busy['p50_ms']:.2f} | {busy['p99_ms']:.2f} |",
            "",
            f"p50 while training: **{ratio:.2f}x** idle (target <= 2x); the job ran {len(state['history'])} epochs "
            "during the run.",
            "",
        ]
    )
    print(report)
    if args.append:
        with args.append.open("a") as f:
            f.write(report)


if __name__ == "__main__":
    main()
