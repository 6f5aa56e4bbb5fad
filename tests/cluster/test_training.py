"""Training on the cluster (issue 17, test 6): a two-worker job runs on Ray Train's TorchTrainer across both
nodes, survives losing one node mid-epoch (Ray Train restarts the worker group, the loop resumes from its
checkpoint) and registers its model once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.cluster.conftest import Gateways, RayCluster, start_gateways
from tests.helpers import bearer, new_key, new_org, unique

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def gateway(ray_cluster: RayCluster, schema_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    yield from start_gateways(ray_cluster, schema_url, tmp_path_factory, 1, redis_db=4, OPENMAAS_JOB_THREADS="2")


def _dataset(c: httpx.Client, path: Path) -> str:
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=12000, n_features=16, n_informative=8, n_classes=3, random_state=0)
    header = ",".join([f"f{i}" for i in range(x.shape[1])] + ["target"])
    np.savetxt(path, np.column_stack([x, y]), delimiter=",", header=header, comments="", fmt="%.6g")
    with path.open("rb") as f:
        r = c.post("/api/datasets", files={"file": (path.name, f)})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_a_two_worker_job_survives_losing_a_node_and_registers_once(
    gateway: Gateways, ray_cluster: RayCluster, tmp_path: Path
) -> None:
    with gateway.admin() as admin:
        org = new_org(admin, "trainers")
        key = new_key(admin, org["name"], scopes=["inference", "manage"])["key"]
    output = unique("spread-mlp")
    epochs = 12
    with httpx.Client(base_url=gateway.servers[0].url, headers=bearer(key), timeout=120) as c:
        body = {
            "type": "train",
            "task": "tabular-classification",
            "dataset": _dataset(c, tmp_path / "blobs.csv"),
            "target": "target",
            "output_model": output,
            "params": {"epochs": epochs, "workers": 2, "batch_size": 32, "early_stopping": False},
        }
        r = c.post("/api/jobs", json=body)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 300
        while True:
            job = c.get(f"/api/jobs/{job_id}").json()
            assert job["status"] in ("queued", "running"), (job, c.get(f"/api/jobs/{job_id}/logs").text[-3000:])
            if job["history"] and job["history"][-1]["epoch"] >= 2:
                break
            assert time.monotonic() < deadline, c.get(f"/api/jobs/{job_id}/logs").text[-3000:]
            time.sleep(0.3)
        epoch_at_loss = job["history"][-1]["epoch"]
        assert epoch_at_loss < epochs, "the job finished before the node could be lost"
        ray_cluster.kill_worker(ray_cluster.worker)
        deadline = time.monotonic() + 480
        while job["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, c.get(f"/api/jobs/{job_id}/logs").text[-3000:]
            time.sleep(1)
            job = c.get(f"/api/jobs/{job_id}").json()
        logs = c.get(f"/api/jobs/{job_id}/logs").text
        assert job["status"] == "succeeded", (job, logs[-3000:])
        assert "Ray Train workers" in logs
        assert "Ray Train restarted the worker group" in logs, logs[-3000:]
        assert job["history"][-1]["epoch"] == epochs
        assert [h["epoch"] for h in job["history"]] == list(range(1, epochs + 1))  # redone epochs replaced
        assert all(len(h["workers"]) == 2 for h in job["history"])
        model = c.get(f"/api/models/{output}").json()
        assert [v["version"] for v in model["versions"]] == [1], model  # registered once
        assert job["result"]["metrics"]["accuracy"] > 0.6
    ray_cluster.worker = ray_cluster.add_worker()
