"""Exactly-once metering across a crash: SIGKILL mid-load, restart, retry with the same Idempotency-Keys."""

from __future__ import annotations

import concurrent.futures
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess, bearer

ADMIN = "om_crash-admin-key-0123456789abcdefghijklmn"
TOTAL = 2000
CONCURRENCY = 16
KILL_AFTER = 600


@pytest.fixture(scope="module")
def crash_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("crash") / "data", env={"OPENMAAS_ADMIN_KEY": ADMIN})
    proc.start(timeout=300)
    yield proc
    proc.stop()


def _sentences() -> list[str]:
    words = ["river", "cloud", "engine", "violet", "harbour", "lantern", "meadow", "quartz"]
    return [
        f"Sentence {i} mentions the {words[i % 8]} and the {words[(i * 3) % 8]} {'again ' * (i % 5)}."
        for i in range(TOTAL)
    ]


def _expected_tokens(minilm_dir: Path, texts: list[str]) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    return sum(len(ids) for ids in tok(texts, truncation=True, max_length=256)["input_ids"])


def test_sigkill_midway_then_retries_meter_each_request_exactly_once(
    crash_server: ServerProcess, minilm_dir: Path
) -> None:
    s = crash_server
    with httpx.Client(base_url=s.url, headers=bearer(ADMIN), timeout=60) as admin:
        org = admin.post("/api/orgs", json={"name": "crashco"}).json()
        key = admin.post(
            f"/api/orgs/{org['id']}/keys", json={"name": "load", "scopes": ["inference", "billing"]}
        ).json()
    texts = _sentences()
    run = uuid.uuid4().hex[:8]
    idem = [f"{run}-{i}" for i in range(TOTAL)]
    done = 0
    lock = threading.Lock()
    killed = threading.Event()

    def send(client: httpx.Client, i: int) -> bool:
        nonlocal done
        try:
            r = client.post(
                "/v1/embeddings",
                json={"model": "all-minilm-l6-v2", "input": texts[i]},
                headers={"Idempotency-Key": idem[i]},
            )
        except httpx.HTTPError:
            return False
        if r.status_code != 200:
            return False
        with lock:
            done += 1
            if done == KILL_AFTER:
                s.kill()
                killed.set()
        return True

    limits = httpx.Limits(max_connections=CONCURRENCY)
    with (
        httpx.Client(base_url=s.url, headers=bearer(key["key"]), timeout=60, limits=limits) as client,
        concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool,
    ):
        results = list(pool.map(lambda i: send(client, i), range(TOTAL)))
    assert killed.is_set()
    failed = [i for i, good in enumerate(results) if not good]
    assert len(failed) > 0

    # Clients also retry calls whose answers they never saw although the server had finished them (a response
    # lost with the connection): take 100 that succeeded and send them again too.
    lost_answers = [i for i, good in enumerate(results) if good][::6][:100]
    s.start(timeout=300)
    replays = 0
    with (
        httpx.Client(base_url=s.url, headers=bearer(key["key"]), timeout=60, limits=limits) as client,
        concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool,
    ):

        def retry(i: int) -> bool:
            r = client.post(
                "/v1/embeddings",
                json={"model": "all-minilm-l6-v2", "input": texts[i]},
                headers={"Idempotency-Key": idem[i]},
            )
            assert r.status_code == 200, r.text
            return r.headers.get("idempotent-replayed") == "true"

        replays = sum(pool.map(retry, failed + lost_answers))

        usage = client.get("/api/usage").json()["totals"]
    print(f"killed after {KILL_AFTER}: {len(failed)} failed, {replays} of {len(failed) + 100} retries were replays")
    assert replays >= len(lost_answers) == 100
    assert usage["requests"] == TOTAL, (usage, len(failed), replays)
    assert usage["input_tokens"] == _expected_tokens(minilm_dir, texts)
    assert usage["items"] == TOTAL

    with sqlite3.connect(s.data_dir / "openmaas.db") as conn:
        rows, distinct_ids, distinct_keys = conn.execute(
            "SELECT count(*), count(DISTINCT request_id), count(DISTINCT idempotency_key) FROM usage_records "
            "WHERE org_id = ?",
            (org["id"],),
        ).fetchone()
    assert rows == distinct_ids == distinct_keys == TOTAL


GRPC_TOTAL = 600
GRPC_KILL_AFTER = 200


@pytest.fixture(scope="module")
def grpc_crash_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    from tests.helpers import free_port

    proc = ServerProcess(
        tmp_path_factory.mktemp("grpc-crash") / "data",
        env={"OPENMAAS_ADMIN_KEY": ADMIN, "OPENMAAS_GRPC_PORT": str(free_port())},
    )
    proc.start(timeout=300)
    yield proc
    proc.stop()


def test_sigkill_midway_then_grpc_retries_meter_each_call_exactly_once(grpc_crash_server: ServerProcess) -> None:
    """The same guarantee over gRPC: idempotency-key metadata, SIGKILL mid-load, restart, retries."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    s = grpc_crash_server
    with httpx.Client(base_url=s.url, headers=bearer(ADMIN), timeout=60) as admin:
        org = admin.post("/api/orgs", json={"name": "grpc-crashco"}).json()
        key = admin.post(f"/api/orgs/{org['id']}/keys", json={"name": "load", "scopes": ["inference"]}).json()
    run = uuid.uuid4().hex[:8]
    images = np.random.default_rng(3).integers(0, 17, (GRPC_TOTAL, 1, 1, 8, 8)).astype(np.float32)
    done = 0
    lock = threading.Lock()
    killed = threading.Event()

    def call(client: grpcclient.InferenceServerClient, i: int) -> str:
        """ "ok", "replayed" or "failed"."""
        nonlocal done
        inp = grpcclient.InferInput("image", [1, 1, 8, 8], "FP32")
        inp.set_data_from_numpy(images[i])
        headers = {"authorization": f"Bearer {key['key']}", "idempotency-key": f"{run}-{i}"}
        try:
            result = client.infer("digits-cnn", [inp], headers=headers, client_timeout=60)
        except InferenceServerException:
            return "failed"
        with lock:
            done += 1
            if done == GRPC_KILL_AFTER and not killed.is_set():
                s.kill()
                killed.set()
        return "ok" if result.get_response().model_name == "digits-cnn" else "failed"

    def load(indices: list[int]) -> list[str]:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            clients = [grpcclient.InferenceServerClient(f"127.0.0.1:{s.grpc_port}") for _ in range(8)]
            try:
                return list(pool.map(lambda i: call(clients[i % 8], i), indices))
            finally:
                for c in clients:
                    c.close()

    results = load(list(range(GRPC_TOTAL)))
    assert killed.is_set()
    failed = [i for i, r in enumerate(results) if r != "ok"]
    assert failed
    lost_answers = [i for i, r in enumerate(results) if r == "ok"][::4][:50]
    s.start(timeout=300)
    retried = load(failed + lost_answers)
    assert all(r == "ok" for r in retried), retried.count("failed")
    with sqlite3.connect(s.data_dir / "openmaas.db") as conn:
        rows, distinct_ids, distinct_keys, protocols = conn.execute(
            "SELECT count(*), count(DISTINCT request_id), count(DISTINCT idempotency_key), group_concat(DISTINCT "
            "protocol) FROM usage_records WHERE org_id = ?",
            (org["id"],),
        ).fetchone()
    assert rows == distinct_ids == distinct_keys == GRPC_TOTAL, (rows, distinct_ids, distinct_keys, len(failed))
    assert protocols == "grpc"
