"""A shared deployment's replica keeps the models that fit its byte budget (issue 17, test 5): Serve's
multiplexing routes, OpenMaaS's residency pool decides what stays loaded and never drops a model in use."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests.cluster.conftest import Gateways, RayCluster, start_gateways
from tests.helpers import bearer, matmul_chain_model, new_key, new_org, register_model

pytestmark = pytest.mark.cluster

N = 4096  # a 4096 x 4096 float matrix: a 67 MB model, measured at about that when loaded
BUDGET_MB = 190  # two such models fit, three do not


@pytest.fixture(scope="module")
def gateway(ray_cluster: RayCluster, schema_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    yield from start_gateways(
        ray_cluster,
        schema_url,
        tmp_path_factory,
        1,
        redis_db=3,
        OPENMAAS_RAY_SHARED_MEMORY_MB=str(BUDGET_MB),
        OPENMAAS_MODEL_INSTANCES="1",  # one copy each: a model takes about its file
    )


def test_a_budget_for_two_of_three_models_keeps_two_and_drops_none_in_use(
    gateway: Gateways, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("big")
    with gateway.admin() as admin:
        org = new_org(admin, "budget")
        key = new_key(admin, org["name"], scopes=["inference", "manage"])["key"]
    names = ["big-a", "big-b", "big-c"]
    with httpx.Client(base_url=gateway.servers[0].url, headers=bearer(key), timeout=300) as c:
        for i, name in enumerate(names):
            path = root / f"{name}.onnx"
            matmul_chain_model(path, N, seed=i)
            assert register_model(c, path, name).status_code == 201
    x = np.linspace(-1, 1, N, dtype=np.float32).reshape(1, N)
    body = {"inputs": [{"name": "x", "shape": [1, N], "datatype": "FP32", "data": x.ravel().tolist()}]}
    samples: list[dict[str, Any]] = []
    done = threading.Event()

    def sample() -> None:
        with gateway.admin() as admin:
            while not done.is_set():
                view = admin.get("/api/cluster").json()
                samples.extend(r for r in view["replicas"] if r["deployment"] == "openmaas-shared-onnx")
                time.sleep(0.2)

    def calls(name: str) -> list[int]:
        codes = []
        with httpx.Client(base_url=gateway.servers[0].url, headers=bearer(key), timeout=120) as c:
            for _ in range(12):
                codes.append(c.post(f"/v2/models/{name}/infer", json=body).status_code)
        return codes

    watcher = threading.Thread(target=sample)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            results = dict(zip(names, pool.map(calls, names), strict=True))
    finally:
        done.set()
        watcher.join()
    assert all(code == 200 for codes in results.values() for code in codes), results
    assert samples, "no replica of the shared ONNX deployment reported"
    resident = [sum(1 for m in s["models"] if m["state"] == "READY") for s in samples]
    assert max(resident) <= 2, resident
    assert all(s["memory_used_bytes"] <= BUDGET_MB * 1024 * 1024 for s in samples)

    # Now one after the other: two models stay loaded together, the third takes the place of the least recent.
    def ready() -> dict[str, int]:
        time.sleep(2.5)  # a replica reports every second, the gateway reads the reports every second
        with gateway.admin() as admin:
            view = admin.get("/api/cluster").json()
        (replica,) = [r for r in view["replicas"] if r["deployment"] == "openmaas-shared-onnx"]
        return {m["model"].split("/")[1]: m["memory_bytes"] for m in replica["models"] if m["state"] == "READY"}

    with httpx.Client(base_url=gateway.servers[0].url, headers=bearer(key), timeout=120) as c:
        for name in ("big-a", "big-b"):
            assert c.post(f"/v2/models/{name}/infer", json=body).status_code == 200
        assert set(ready()) == {"big-a", "big-b"}
        assert c.post("/v2/models/big-c/infer", json=body).status_code == 200
        now = ready()
        assert set(now) == {"big-b", "big-c"}, now
        assert sum(now.values()) <= BUDGET_MB * 1024 * 1024
