"""Dedicated capacity over the management API, in process (so the test can see what serving keeps pinned).

Stopping one organisation's reservation must not unpin a model another organisation's reservation or
OPENMAAS_PINNED_MODELS still needs (it set ``pinned = False`` outright), and a reservation whose model cannot be
loaded must bill nothing (it stayed as a running, billed reservation)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from starlette.testclient import TestClient

from openmaas.app import Platform, create_app
from openmaas.config import Settings
from openmaas.store.tables import ReservationRow
from tests.helpers import matmul_chain_model

ADMIN = "om_dedicated-admin-key-0123456789abcdefghij"
GPU = {"name": "gpu", "kind": "dedicated", "hourly_price_micros": 1_000_000}


def _client(data: Path, **settings: object) -> TestClient:
    app = create_app(Settings(data_dir=data, bundled_models=False, admin_key=ADMIN, max_jobs=0, **settings))  # type: ignore[arg-type]
    return TestClient(app, headers={"Authorization": f"Bearer {ADMIN}"})


def _platform(c: TestClient) -> Platform:
    return c.app.state.platform  # type: ignore[attr-defined,no-any-return]


def _sell(c: TestClient, data: Path, name: str, n: int) -> None:
    matmul_chain_model(data / f"{name}.onnx", n)
    with (data / f"{name}.onnx").open("rb") as f:
        r = c.post("/api/models", data={"name": name}, files={"file": (f"{name}.onnx", f)})
    assert r.status_code == 201, r.text
    assert c.post(f"/api/models/{name}/plans", json=GPU).status_code == 201


def _pinned(c: TestClient, name: str) -> bool:
    platform = _platform(c)
    resident = platform.backend.pool.get(name, 1)  # type: ignore[attr-defined]
    return resident is not None and bool(resident.pinned)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Path]]:
    data = tmp_path_factory.mktemp("dedicated")
    with _client(data / "data", pinned_models="always") as c:
        for org in ("org-a", "org-b"):
            assert c.post("/api/orgs", json={"name": org}).status_code == 201
        yield c, data


def test_a_model_stays_pinned_while_another_reservation_needs_it(client: tuple[TestClient, Path]) -> None:
    c, data = client
    _sell(c, data, "shared", 4)
    started = {}
    for org in ("org-a", "org-b"):
        r = c.post(f"/api/orgs/{org}/dedicated", json={"model": "shared", "plan": "gpu"})
        assert r.status_code == 201, r.text
        started[org] = r.json()["id"]
    assert _pinned(c, "shared")
    assert c.delete(f"/api/orgs/org-a/dedicated/{started['org-a']}").status_code == 200
    assert _pinned(c, "shared"), "org b's reservation still needs the model loaded"
    assert c.delete(f"/api/orgs/org-b/dedicated/{started['org-b']}").status_code == 200
    assert not _pinned(c, "shared"), "nobody needs it any more: it may be evicted again"


def test_a_model_pinned_by_the_settings_stays_pinned_after_a_reservation(client: tuple[TestClient, Path]) -> None:
    c, data = client
    _sell(c, data, "always", 4)  # named in OPENMAAS_PINNED_MODELS
    r = c.post("/api/orgs/org-a/dedicated", json={"model": "always", "plan": "gpu"})
    assert r.status_code == 201, r.text
    assert c.delete(f"/api/orgs/org-a/dedicated/{r.json()['id']}").status_code == 200
    assert _pinned(c, "always")


def test_a_reservation_whose_model_cannot_load_bills_nothing(tmp_path: Path) -> None:
    with _client(tmp_path / "data", model_memory_mb=1) as c:
        assert c.post("/api/orgs", json={"name": "org-a"}).status_code == 201
        _sell(c, tmp_path, "big", 700)  # 1.9 MB of weights: more than the whole 1 MiB budget
        for _ in range(2):  # the second try is refused the same way, not as "already runs" (409)
            r = c.post("/api/orgs/org-a/dedicated", json={"model": "big", "plan": "gpu"})
            assert r.status_code == 503, r.text
            assert "memory budget" in r.json()["detail"]
        with _platform(c).engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(ReservationRow)).scalar_one() == 0
