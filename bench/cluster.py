"""Cluster mode figures (docs/cluster.md, docs/benchmarks.md "Cluster mode"), measured in one run on this machine:

- `/v1/embeddings` (one sentence a request) at 64 concurrent clients in cluster mode, against Ray Serve's own HTTP
  ingress serving the same MiniLM with `@serve.batch` (the plain Ray Serve way), and both against the in-process
  limit, beside embedded mode's;
- the cold start of a scaled-to-zero MiniLM deployment (p50 of 5);
- throughput with 1, 2 and 3 replicas of the model's own deployment;
- what stays shared per call: PostgreSQL transactions and Redis commands per call (and Redis's own time for them).

It needs PostgreSQL and Redis on this machine (as the tests do) and Ray (`pip install -e '.[cluster]'`).
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray process on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import httpx
from harness import free_port, http_request, machine, percentile, sentences, start_server
from inprocess import InProcessEmbeddings
from loadgen import run_load
from sqlalchemy import create_engine, text

KEY = "om_bench-admin-key-0123456789abcdefghijklmnop"
MODEL = "all-minilm-l6-v2"
PG_URL = os.environ.get("OPENMAAS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = "redis://127.0.0.1:6379/6"
GiB = 1024**3

PLAIN_SERVE = """
import sys
from ray import serve
from sentence_transformers import SentenceTransformer
from starlette.requests import Request
from starlette.responses import JSONResponse

@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=256)
class Embedder:
    def __init__(self, path: str) -> None:
        self.model = SentenceTransformer(path, device="cpu")

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def embed(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(texts, normalize_embeddings=True).tolist()

    async def __call__(self, request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({"data": [{"embedding": await self.embed(body["input"])}]})

app = Embedder.bind(sys.argv[1])
"""


def _cluster(cpus: int) -> Any:
    from ray.cluster_utils import Cluster

    return Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": cpus,
            "memory": 8 * GiB,
            "object_store_memory": 128 * 1024 * 1024,
            "include_dashboard": False,
        },
    )


def _redis_stats() -> tuple[int, float]:
    import redis

    stats = redis.Redis.from_url(REDIS_URL).info("commandstats")
    calls = sum(int(v["calls"]) for v in stats.values())
    usec = sum(float(v["usec"]) for v in stats.values())
    return calls, usec


def _pg_commits(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("select xact_commit from pg_stat_database where datname = 'test'")).scalar_one())


def _replicas(c: httpx.Client, app: str) -> int:
    for a in c.get("/api/cluster").json()["applications"]:
        if a["name"] == app:
            return sum(n for s, n in a["deployments"][0]["replicas"].items() if s == "RUNNING")
    return 0


def _wait(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.5)


def cluster_mode(args: argparse.Namespace, requests: list[bytes]) -> dict[str, Any]:
    import redis

    from openmaas.catalogue.minilm import model_dir

    out: dict[str, Any] = {}
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin_engine = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin_engine.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    redis.Redis.from_url(REDIS_URL).flushdb()
    cluster = _cluster(4)
    proc = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = {
                "OPENMAAS_BACKEND": "ray",
                "OPENMAAS_RAY_ADDRESS": cluster.address,
                "OPENMAAS_DATABASE_URL": f"{PG_URL}?options=-csearch_path%3D{schema}",
                "OPENMAAS_REDIS_URL": REDIS_URL,
                "OPENMAAS_BUNDLED_MODELS": "false",
                "OPENMAAS_SECRET_KEY": "bench-secret-" + "0" * 24,
            }
            proc, port = start_server(Path(tmp) / "data", KEY, env)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"},
                              timeout=600) as c:  # fmt: skip
                archive = shutil.make_archive(str(Path(tmp) / "minilm"), "zip", root_dir=model_dir())
                with open(archive, "rb") as f:
                    r = c.post("/api/models", data={"name": MODEL}, files={"file": ("minilm.zip", f)})
                r.raise_for_status()
                c.post("/v1/embeddings", json={"model": MODEL, "input": "warm up"}).raise_for_status()
                engine = create_engine(PG_URL)
                commits0, (rcalls0, rusec0) = _pg_commits(engine), _redis_stats()
                shared = run_load(port, requests, 64, args.warmup, args.duration)
                commits1, (rcalls1, rusec1) = _pg_commits(engine), _redis_stats()
                # Redis also gets the replicas' reports (one write a second per replica): those are not per call.
                calls = shared["rps"] * args.duration
                out["shared"] = shared
                out["pg_commits_per_call"] = (commits1 - commits0) / max(calls, 1)
                out["redis_commands_per_call"] = (rcalls1 - rcalls0) / max(calls, 1)
                out["redis_usec_per_command"] = (rusec1 - rusec0) / max(rcalls1 - rcalls0, 1)
                print(f"cluster mode, shared deployment: {shared['rps']:.0f} req/s", flush=True)

                app = f"openmaas-model-{MODEL}-v1"
                scaling = {}
                for k in (1, 2, 3):
                    r = c.patch(f"/api/models/{MODEL}", json={"serving": {"min_replicas": k, "max_replicas": k}})
                    r.raise_for_status()
                    time.sleep(2.5)  # the registry's cache: the next call sees the new settings
                    c.post("/v1/embeddings", json={"model": MODEL, "input": "scale"}).raise_for_status()
                    _wait(lambda k=k: _replicas(c, app) == k, 300)
                    scaling[k] = run_load(port, requests, 64, args.warmup, args.duration)
                    print(f"{k} replica(s): {scaling[k]['rps']:.0f} req/s", flush=True)
                out["scaling"] = scaling

                c.patch(f"/api/models/{MODEL}", json={"serving": {"min_replicas": 0, "max_replicas": 1,
                                                                    "idle_timeout_s": 2}}).raise_for_status()  # fmt: skip
                time.sleep(2.5)
                colds = []
                for _ in range(5):
                    c.post("/v1/embeddings", json={"model": MODEL, "input": "wake"}).raise_for_status()
                    _wait(lambda: _replicas(c, app) == 0, 300)
                    t0 = time.perf_counter()
                    c.post("/v1/embeddings", json={"model": MODEL, "input": "cold"}).raise_for_status()
                    colds.append(time.perf_counter() - t0)
                out["cold_starts_s"] = colds
                print(f"cold starts: {[round(x, 2) for x in colds]} s", flush=True)
                engine.dispose()
    except Exception:
        traceback.print_exc()  # before the cluster's shutdown, which may fail too and hide it
        raise
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
        subprocess.run(
            [sys.executable, "-c", "import ray; from ray import serve; "
             f"ray.init(address={cluster.address!r}, log_to_driver=False); serve.shutdown()"],
            timeout=120, capture_output=True,
        )  # fmt: skip
        cluster.shutdown()
        with admin_engine.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin_engine.dispose()
    return out


def plain_ray_serve(args: argparse.Namespace, texts: list[str]) -> dict[str, float]:
    """The same model as Ray Serve's own HTTP ingress serves it, with @serve.batch."""
    from openmaas.catalogue.minilm import model_dir

    cluster = _cluster(4)
    port = free_port()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "plain_serve.py"
            script.write_text(PLAIN_SERVE)
            driver = (
                "import ray, runpy, sys; from ray import serve\n"
                f"ray.init(address={cluster.address!r}, log_to_driver=False)\n"
                f"serve.start(http_options={{'host': '127.0.0.1', 'port': {port}}})\n"
                f"sys.argv = ['x', {str(model_dir())!r}]\n"
                f"ns = runpy.run_path({str(script)!r})\n"
                "serve.run(ns['app'], route_prefix='/embed', name='plain')\n"
            )
            subprocess.run([sys.executable, "-c", driver], check=True, timeout=300, capture_output=True)
            body = json.dumps({"input": "warm up"}).encode()
            httpx.post(f"http://127.0.0.1:{port}/embed", content=body, timeout=120).raise_for_status()
            requests = [http_request("/embed", json.dumps({"input": t}).encode(), KEY) for t in texts]
            result = run_load(port, requests, 64, args.warmup, args.duration)
            print(f"plain Ray Serve (HTTP ingress, @serve.batch): {result['rps']:.0f} req/s", flush=True)
            subprocess.run(
                [sys.executable, "-c", f"import ray; from ray import serve; ray.init(address={cluster.address!r}, "
                 "log_to_driver=False); serve.shutdown()"],
                timeout=120, capture_output=True,
            )  # fmt: skip
            return result
    finally:
        cluster.shutdown()


def embedded_mode(args: argparse.Namespace, requests: list[bytes]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_server(Path(tmp) / "data", KEY, {})
        try:
            httpx.post(
                f"http://127.0.0.1:{port}/v1/embeddings",
                json={"model": MODEL, "input": "warm up"},
                headers={"Authorization": f"Bearer {KEY}"},
                timeout=300,
            ).raise_for_status()
            result = run_load(port, requests, 64, args.warmup, args.duration)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(f"embedded mode: {result['rps']:.0f} req/s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--append", type=Path, default=None)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    texts = sentences(512, seed=7)
    in_process = InProcessEmbeddings(texts, cores)
    sweep = in_process.sweep(8)
    limit_before = float(sweep["limit"])  # type: ignore[arg-type]
    requests = [http_request("/v1/embeddings", json.dumps({"model": MODEL, "input": t}).encode(), KEY) for t in texts]
    embedded = embedded_mode(args, requests)
    plain = plain_ray_serve(args, texts)
    cluster = cluster_mode(args, requests)
    limit = (limit_before + in_process.limit(4)) / 2
    shared = cluster["shared"]
    cold = percentile(cluster["cold_starts_s"], 50)
    ratio = shared["rps"] / plain["rps"]
    rows = [
        ("cluster mode (shared deployment, 1 replica)", f"{shared['rps']:.0f} req/s",
         f"{ratio:.2f}x plain Ray Serve; {shared['rps'] / limit:.2f}x the in-process limit", ">= 2x plain Ray Serve",
         ratio >= 2),
        ("plain Ray Serve (HTTP ingress, @serve.batch)", f"{plain['rps']:.0f} req/s",
         f"{plain['rps'] / limit:.2f}x the in-process limit", "", None),
        ("embedded mode", f"{embedded['rps']:.0f} req/s", f"{embedded['rps'] / limit:.2f}x the in-process limit", "",
         None),
        ("cold start of a scaled-to-zero deployment (p50 of 5)", f"{cold:.2f} s",
         "from the call to its answer, replica start and model load included", "reported", None),
    ]  # fmt: skip
    lines = [
        "",
        "## Cluster mode",
        "",
        f"Measured by `bench/cluster.py` on {machine()}: `/v1/embeddings`, one sentence a request, 64 concurrent "
        f"clients for {args.duration:g} s, on a one-node Ray cluster on this machine (4 logical CPUs declared, "
        f"PostgreSQL and Redis local); in-process limit {limit:.0f} sentences/s ({sweep['best']}).",
        "",
        "| figure | measured | against | target | met |",
        "|---|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {d} | {'' if e is None else ('yes' if e else 'no')} |" for a, b, c, d, e in rows),
        "",
        "Throughput with the model's own deployment at 1, 2 and 3 replicas (all on this machine's two cores, so"
        " added replicas compete for the same cores: the figure per added replica is what a second machine would"
        " add only when it brings its own cores):",
        "",
        "| replicas | req/s | per replica |",
        "|---|---|---|",
        *(f"| {k} | {r['rps']:.0f} | {r['rps'] / k:.0f} |" for k, r in cluster["scaling"].items()),
        "",
        f"Shared per call: {cluster['pg_commits_per_call']:.2f} PostgreSQL transactions (usage records are group "
        f"committed), {cluster['redis_commands_per_call']:.2f} Redis commands (the benchmark's admin key has no "
        f"limits: these are the replicas' reports; a limited key adds one per limit and two for its slot), {cluster['redis_usec_per_command']:.1f} µs of Redis's own time per command. Cold starts: "
        + ", ".join(f"{x:.2f} s" for x in cluster["cold_starts_s"])
        + ".",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.append is not None:
        with args.append.open("a") as f:
            f.write(report)


if __name__ == "__main__":
    main()
