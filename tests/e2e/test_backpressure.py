"""Bounded queues, Retry-After, deadlines and disconnects against a real server with a deliberately slow model."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from tests.conftest import ADMIN_KEY
from tests.helpers import ServerProcess, matmul_chain_model

N = 2048
ROWS = 64
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("busy")
    proc = ServerProcess(
        root / "data",
        env={
            "OPENMAAS_ADMIN_KEY": ADMIN_KEY,
            "OPENMAAS_BUNDLED_MODELS": "false",
            "OPENMAAS_MAX_QUEUE_SIZE": "3",
            "OPENMAAS_MAX_BATCH_SIZE": str(ROWS),  # one request per batch
            "OPENMAAS_MODEL_INSTANCES": "1",
        },
    ).start()
    try:
        path = root / "slow.onnx"
        matmul_chain_model(path, N, depth=48)
        _register(proc.url, "slow", path)
        httpx.post(proc.url + "/v2/repository/models/slow/load", headers=AUTH, timeout=60).raise_for_status()
        yield proc
    finally:
        proc.stop()


async def _until_busy(client: httpx.AsyncClient) -> None:
    """Wait until a request to the slow model is in the server (and so, with an empty queue, running)."""
    for _ in range(500):
        text = (await client.get("/metrics")).text
        if 'openmaas_inference_in_flight{model="slow"} 1.0' in text:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the blocking request never reached the model")


def _register(url: str, name: str, path: Path) -> None:
    with path.open("rb") as f:
        r = httpx.post(
            url + "/api/models", data={"name": name}, files={"file": (path.name, f)}, headers=AUTH, timeout=300
        )
    assert r.status_code == 201, r.text


def _body(parameters: dict | None = None) -> bytes:
    """A request in Triton's binary form, so the server spends its time in the model, not in parsing."""
    blob = np.full((ROWS, N), 0.5, np.float32).tobytes()
    header: dict = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [ROWS, N], "parameters": {"binary_data_size": len(blob)}}]
    }
    if parameters:
        header["parameters"] = parameters
    head = orjson.dumps(header)
    return head + blob


def _headers(parameters: dict | None = None) -> dict[str, str]:
    return {"Inference-Header-Content-Length": str(len(orjson.dumps(_header_only(parameters))))}


def _header_only(parameters: dict | None) -> dict:
    header: dict = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [ROWS, N], "parameters": {"binary_data_size": ROWS * N * 4}}
        ]
    }
    if parameters:
        header["parameters"] = parameters
    return header


async def _fire(url: str, count: int, headers: dict[str, str] | None = None) -> list[tuple[int, float, httpx.Headers]]:
    body = _body()
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120) as client:

        async def one() -> tuple[int, float, httpx.Headers]:
            t0 = time.perf_counter()
            r = await client.post("/v2/models/slow/infer", content=body, headers={**_headers(), **(headers or {})})
            return r.status_code, time.perf_counter() - t0, r.headers

        return await asyncio.gather(*(one() for _ in range(count)))


def _batch_seconds(url: str) -> float:
    body = _body()
    t0 = time.perf_counter()
    httpx.post(
        url + "/v2/models/slow/infer", content=body, headers={**AUTH, **_headers()}, timeout=60
    ).raise_for_status()
    return time.perf_counter() - t0


def test_flood_is_refused_fast_with_retry_after(busy_server: ServerProcess) -> None:
    one = _batch_seconds(busy_server.url)
    results = asyncio.run(_fire(busy_server.url, 24))
    statuses = [s for s, _, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    rejected = [(t, h) for s, t, h in results if s == 503]
    admitted = [t for s, t, _ in results if s == 200]
    assert rejected, "nothing was refused"
    assert admitted, "nothing was served"
    for _elapsed, headers in rejected:
        assert int(headers["retry-after"]) >= 1
    # Refusals come back at once rather than after waiting their turn...
    assert np.median([t for t, _ in rejected]) < one
    # ...and what was admitted waited for at most the bounded queue ahead of it (queue 3 + 1 running),
    # with a generous allowance for this busy 2-core machine.
    assert max(admitted) < 5 * one + 2.0
    # Refusals are counted, not logged as the server's errors (before: an error line for each refused request).
    logged = [json.loads(line) for line in busy_server.log().splitlines() if line.startswith("{")]
    assert not [e for e in logged if e.get("level") == "error" and e.get("code") == "overloaded"]
    assert [e for e in logged if e.get("msg") == "request" and e.get("status") == 503]  # the access log has them


def test_openai_surface_answers_429_when_full(busy_server: ServerProcess, minilm_dir: Path) -> None:
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        archive = shutil.make_archive(str(Path(tmp) / "embedder"), "zip", root_dir=minilm_dir)
        _register(busy_server.url, "embedder", Path(archive))
    long_texts = ["word " * 200] * 16  # heavy requests: the queue of 3 fills at once

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=busy_server.url, headers=AUTH, timeout=300) as client:
            body = {"model": "embedder", "input": long_texts}
            return list(await asyncio.gather(*(client.post("/v1/embeddings", json=body) for _ in range(10))))

    responses = asyncio.run(scenario())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, statuses
    refused = [r for r in responses if r.status_code == 429]
    assert refused
    assert 200 in statuses
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1
        error = r.json()["error"]
        assert error["code"] == "overloaded"
        assert error["type"] == "rate_limit_error"


def test_deadline_passing_in_the_queue_is_504(busy_server: ServerProcess) -> None:
    one = _batch_seconds(busy_server.url)

    async def scenario() -> list[tuple[int, float, httpx.Headers]]:
        async with httpx.AsyncClient(base_url=busy_server.url, headers=AUTH, timeout=120) as client:
            blocker = asyncio.create_task(client.post("/v2/models/slow/infer", content=_body(), headers=_headers()))
            await _until_busy(client)  # the blocker holds the model's only copy from here on
            late = await _fire(busy_server.url, 2, headers={"X-Request-Timeout": str(one / 10)})
            await blocker
            return late

    late = asyncio.run(scenario())
    assert [s for s, _, _ in late] == [504, 504]
    timeout = {"timeout": int(one * 1e6 / 10)}  # Triton's microseconds

    async def with_parameter() -> int:
        async with httpx.AsyncClient(base_url=busy_server.url, headers=AUTH, timeout=120) as client:
            blocker = asyncio.create_task(client.post("/v2/models/slow/infer", content=_body(), headers=_headers()))
            await _until_busy(client)  # the blocker holds the model's only copy from here on
            r = await client.post("/v2/models/slow/infer", content=_body(timeout), headers=_headers(timeout))
            await blocker
            return r.status_code

    assert asyncio.run(with_parameter()) == 504
    bad = httpx.post(
        busy_server.url + "/v2/models/slow/infer",
        content=_body(),
        headers={**AUTH, **_headers(), "X-Request-Timeout": "soon"},
    )
    assert bad.status_code == 400


def test_disconnected_clients_leave_the_queue(busy_server: ServerProcess) -> None:
    one = _batch_seconds(busy_server.url)

    def cancelled() -> float:
        text = httpx.get(busy_server.url + "/metrics", headers=AUTH).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith("openmaas_inference_requests_total") and 'status="cancelled"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    before = cancelled()

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=busy_server.url, headers=AUTH, timeout=120) as client:
            blocker = asyncio.create_task(client.post("/v2/models/slow/infer", content=_body(), headers=_headers()))
            await _until_busy(client)  # the blocker holds the model's only copy from here on
            async with httpx.AsyncClient(base_url=busy_server.url, headers=AUTH, timeout=one / 3) as impatient:
                with pytest.raises(httpx.TimeoutException):
                    await impatient.post("/v2/models/slow/infer", content=_body(), headers=_headers())
            await blocker

    asyncio.run(scenario())
    deadline = time.monotonic() + 10
    while cancelled() <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancelled() > before
