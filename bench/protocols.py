"""v2 protocol benchmark: digits-cnn over HTTP (JSON and binary tensors) and gRPC, against a floor, in one run.

    python bench/protocols.py [--duration 8] [--concurrency 1,64] [--append docs/benchmarks.md]

1. The floor: a bare ASGI app under the server's uvicorn settings (uvloop, httptools, one process) answering
   every request with a fixed v2 response of the same size as the real one. What any Python HTTP server on this
   machine can do; the server's figures are compared with it, measured in the same run.
2. A real ``openmaas serve`` (free HTTP and gRPC ports); digits-cnn is loaded first.
3. The same closed-loop load generator as ``bench/serving.py`` (its own process, keep-alive connections) for HTTP,
   and a ``grpc.aio`` client process with the same number of requests in flight for gRPC.
4. Where nghttp2's ``h2load`` is installed (Debian: ``nghttp2-client``), gRPC again from it: a load generator in C
   that costs the two cores little, as the raw-socket HTTP generator does, where the Python gRPC client takes a
   large share of them. It cannot read gRPC's status (sent in trailers), so the server's count of gRPC answers by
   status (``openmaas_http_requests_total``) says how many failed: every status but OK and CANCELLED is an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import free_port, http_request, machine, start_server, wait_until_ready
from loadgen import run_load, summarise

KEY = "om_bench-key-0123456789abcdefghijklmnopqrstuvwxyz"

FLOOR_APP = """
import sys
body = open(sys.argv[1], "rb").read()
headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while True:
        message = await receive()
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
import uvicorn
from openmaas.api.http1 import protocol_class  # the server's own HTTP/1.1 protocol (one write a response)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False, http=protocol_class())
"""


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 17, (n, 1, 1, 8, 8)).astype(np.float32)


def json_requests(images: np.ndarray) -> list[bytes]:
    return [
        http_request(
            "/v2/models/digits-cnn/infer",
            json.dumps(
                {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": x.ravel().tolist()}]}
            ).encode(),
            KEY,
        )
        for x in images
    ]


def binary_requests(images: np.ndarray) -> list[bytes]:
    out = []
    for x in images:
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "FP32",
                        "shape": [1, 1, 8, 8],
                        "parameters": {"binary_data_size": 256},
                    }
                ],
                "outputs": [{"name": "label", "parameters": {"binary_data": True}}],
            }
        ).encode()
        body = header + struct.pack("<64f", *x.ravel())
        out.append(
            http_request(
                "/v2/models/digits-cnn/infer", body, KEY, f"Inference-Header-Content-Length: {len(header)}\r\n"
            )
        )
    return out


def _grpc_process(port: int, concurrency: int, warmup: float, duration: float, queue: mp.Queue) -> None:
    import grpc

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    requests = [pb_request(x) for x in _images(256)]

    async def main() -> tuple[list[float], int]:
        latencies: list[float] = []
        errors = 0
        start = time.perf_counter() + warmup
        stop = start + duration
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            metadata = (("authorization", f"Bearer {KEY}"),)

            async def worker(i: int) -> None:
                nonlocal errors
                while True:
                    t0 = time.perf_counter()
                    if t0 >= stop:
                        return
                    try:
                        await call(requests[i % len(requests)], metadata=metadata)
                        ok = True
                    except grpc.aio.AioRpcError:
                        ok = False
                    i += 1
                    if t0 >= start:
                        if ok:
                            latencies.append(time.perf_counter() - t0)
                        else:
                            errors += 1

            await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return latencies, errors

    latencies, errors = asyncio.run(main())
    queue.put({"latencies": latencies, "errors": errors, "duration": duration})


def run_grpc(port: int, concurrency: int, warmup: float, duration: float) -> dict[str, float]:
    queue: mp.Queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_grpc_process, args=(port, concurrency, warmup, duration, queue))
    proc.start()
    result = queue.get(timeout=warmup + duration + 120)
    proc.join()
    return summarise(result["latencies"], result["duration"], concurrency, result["errors"])


def _grpc_statuses(port: int) -> dict[str, float]:
    """gRPC calls the server has answered, by status code (its Prometheus counter)."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text
    found = re.findall(r'^openmaas_http_requests_total\{protocol="grpc",status="(\w+)"\} (\S+)$', text, re.MULTILINE)
    return {status: float(n) for status, n in found}


def run_h2load(
    grpc_port: int, http_port: int, concurrency: int, warmup: float, duration: float, tmp: Path
) -> dict[str, float]:
    """ModelInfer from h2load: one HTTP/2 connection with ``concurrency`` streams (as the Python client's one
    channel), the same request each time, framed as gRPC (a flag byte and a length, then the message)."""
    message = pb_request(_images(1)[0])
    body = tmp / "grpc-request.bin"
    body.write_bytes(b"\0" + struct.pack(">I", len(message)) + message)
    log = tmp / "h2load.log"
    seconds = max(1, round(duration))  # h2load takes whole seconds
    before = _grpc_statuses(http_port)
    out = subprocess.run(
        ["h2load", "-c", "1", "-m", str(concurrency), "-D", str(seconds),
         "--warm-up-time", str(max(1, round(warmup))), "--log-file", str(log), "-d", str(body),
         "-H", "content-type: application/grpc", "-H", "te: trailers", "-H", f"authorization: Bearer {KEY}",
         f"http://127.0.0.1:{grpc_port}/inference.GRPCInferenceService/ModelInfer"],
        capture_output=True, text=True, check=True, timeout=warmup + duration + 60,
    ).stdout  # fmt: skip
    after = _grpc_statuses(http_port)
    counts = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored", out)
    measured = [int(line.split("\t")[2]) / 1e6 for line in log.read_text().splitlines() if line.count("\t") == 2]
    client_errors = int(counts.group(2)) + int(counts.group(3)) if counts else 0
    # A gRPC error is an HTTP 200 to h2load: the server's count of answers by status has them. CANCELLED: the
    # calls h2load abandons when its time is up.
    refused = sum(n - before.get(status, 0) for status, n in after.items() if status not in ("OK", "CANCELLED"))
    return summarise(measured, float(seconds), concurrency, client_errors + int(refused))


def pb_request(image: np.ndarray) -> bytes:
    from openmaas.api.grpc import inference_pb2 as pb

    r = pb.ModelInferRequest(model_name="digits-cnn")
    r.inputs.add(name="image", datatype="FP32", shape=[1, 1, 8, 8])
    r.raw_input_contents.append(image.astype("<f4").tobytes())
    return r.SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--append", type=Path, help="also append the results as markdown to this file")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    images = _images(256)
    print(f"machine: {machine()}", flush=True)
    rows: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        grpc_port = free_port()
        proc, port = start_server(Path(tmp) / "data", KEY, {"OPENMAAS_GRPC_PORT": str(grpc_port)})
        floor = None
        try:
            import httpx

            auth = {"Authorization": f"Bearer {KEY}"}
            httpx.post(f"http://127.0.0.1:{port}/v2/repository/models/digits-cnn/load", headers=auth, timeout=120)
            sample = httpx.post(
                f"http://127.0.0.1:{port}/v2/models/digits-cnn/infer",
                content=json_requests(images[:1])[0].split(b"\r\n\r\n", 1)[1],
                headers={**auth, "Content-Type": "application/json"},
                timeout=60,
            )
            sample.raise_for_status()
            body_file = Path(tmp) / "floor-body.json"
            body_file.write_bytes(sample.content)
            floor_port = free_port()
            floor = subprocess.Popen(
                [sys.executable, "-c", FLOOR_APP, str(body_file), str(floor_port)], env={**os.environ}
            )
            if not wait_until_ready(floor, f"http://127.0.0.1:{floor_port}/", 60):
                raise RuntimeError("the floor app did not start")
            jreqs, breqs = json_requests(images), binary_requests(images)
            for c in levels:
                # Alternate floor and server so drift over the run affects both alike.
                for label, runner in (
                    (
                        "floor (bare ASGI, same response)",
                        lambda c=c: run_load(floor_port, jreqs, c, args.warmup, args.duration),
                    ),
                    ("v2 HTTP, JSON tensors", lambda c=c: run_load(port, jreqs, c, args.warmup, args.duration)),
                    ("v2 HTTP, binary tensors", lambda c=c: run_load(port, breqs, c, args.warmup, args.duration)),
                    ("v2 gRPC, raw tensors", lambda c=c: run_grpc(grpc_port, c, args.warmup, args.duration)),
                    *(
                        [
                            (
                                "v2 gRPC, raw tensors, h2load (C) client",
                                lambda c=c: run_h2load(grpc_port, port, c, args.warmup, args.duration, Path(tmp)),
                            )
                        ]
                        if shutil.which("h2load")
                        else []
                    ),
                ):
                    r = runner()
                    rows.append((label, r))
                    print(json.dumps({"what": label, **r}), flush=True)
        finally:
            if floor is not None:
                floor.terminate()
                floor.wait(30)
            proc.terminate()
            proc.wait(30)
    report = render(rows, levels, args)
    print()
    print(report)
    if args.append:
        with args.append.open("a") as f:
            f.write(report)


def render(rows: list[tuple[str, dict[str, float]]], levels: list[int], args: argparse.Namespace) -> str:
    lines = [
        "",
        "## v2 protocol: digits-cnn over HTTP and gRPC against a floor",
        "",
        f"`python bench/protocols.py --duration {args.duration:g}`; {machine()}. The floor is a bare ASGI app",
        "under the same uvicorn settings answering a fixed v2 response of the same size, measured in the same run.",
        "",
        "| what | C | req/s | x floor | p50 ms | p50 - floor's, ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in levels:
        at = [(label, r) for label, r in rows if r["concurrency"] == c]
        floor = next(r for label, r in at if label.startswith("floor"))
        for label, r in at:
            lines.append(
                f"| {label} | {c} | {r['rps']:.0f} | {r['rps'] / floor['rps']:.2f} | {r['p50_ms']:.2f} | "
                f"{r['p50_ms'] - floor['p50_ms']:+.2f} | {r['p99_ms']:.2f} | {r['errors']} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
