"""Two gateway processes sharing PostgreSQL and Redis enforce one combined limit and see revocations."""

from __future__ import annotations

import concurrent.futures
import os
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.helpers import ServerProcess, bearer, matmul_chain_model, new_key, new_org, register_model

PG_URL = os.environ.get("OPENMAAS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("OPENMAAS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN = "om_shared-admin-key-0123456789abcdefghijklm"
X = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}

pytestmark = pytest.mark.postgres


def _services_or_skip() -> None:
    import redis

    problems = []
    try:
        engine = create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
    except Exception as e:
        problems.append(f"PostgreSQL at {PG_URL}: {e}")
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except Exception as e:
        problems.append(f"Redis at {REDIS_URL}: {e}")
    if problems:
        if os.environ.get("OPENMAAS_REQUIRE_POSTGRES") == "1":
            pytest.fail("; ".join(problems))
        pytest.skip("; ".join(problems))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    _services_or_skip()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin_engine = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin_engine.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    data = tmp_path_factory.mktemp("shared") / "data"  # one artifact store, as on a shared filesystem
    env = {
        "OPENMAAS_ADMIN_KEY": ADMIN,
        "OPENMAAS_SECRET_KEY": uuid.uuid4().hex,
        "OPENMAAS_DATABASE_URL": f"{PG_URL}?options=-csearch_path%3D{schema}",
        "OPENMAAS_REDIS_URL": REDIS_URL,
        "OPENMAAS_BUNDLED_MODELS": "false",
    }
    servers = []
    try:
        for i in range(2):
            proc = ServerProcess(data, env=env)
            proc.log_path = data.parent / f"server-{i}.log"
            servers.append(proc.start())
        yield servers[0], servers[1]
    finally:
        for proc in servers:
            proc.stop()
        with admin_engine.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin_engine.dispose()


@pytest.fixture(scope="module")
def setup(pair: tuple[ServerProcess, ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    one, _ = pair
    with httpx.Client(base_url=one.url, headers=bearer(ADMIN), timeout=60) as admin:
        org = new_org(admin, "shared")
        owner = new_key(admin, org["name"], scopes=["inference", "manage"])
    path = tmp_path_factory.mktemp("model") / "m.onnx"
    matmul_chain_model(path, 4)
    with httpx.Client(base_url=one.url, headers=bearer(owner["key"]), timeout=60) as c:
        assert register_model(c, path, "shared-model").status_code == 201
    return org["name"], owner["key"]


def test_requests_per_minute_hold_across_two_processes(
    pair: tuple[ServerProcess, ServerProcess], setup: tuple[str, str]
) -> None:
    org, owner_key = setup
    rpm = 20
    with httpx.Client(base_url=pair[0].url, headers=bearer(owner_key), timeout=60) as c:
        key = new_key(c, org, limits={"rpm": rpm})

    def call(i: int) -> int:
        server = pair[i % 2]
        r = httpx.post(f"{server.url}/v2/models/shared-model/infer", json={"inputs": [X]}, headers=bearer(key["key"]))
        return r.status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(call, range(3 * rpm)))
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) == rpm, statuses
    # Both processes admitted some and refused some: one window, two gateways.
    by_server = [[s for i, s in enumerate(statuses) if i % 2 == k] for k in (0, 1)]
    assert all(200 in part for part in by_server)


def test_revocation_reaches_the_other_process_within_a_second(
    pair: tuple[ServerProcess, ServerProcess], setup: tuple[str, str]
) -> None:
    org, owner_key = setup
    one, two = pair
    with httpx.Client(base_url=one.url, headers=bearer(owner_key), timeout=60) as c:
        key = new_key(c, org)
        infer = f"{two.url}/v2/models/shared-model/infer"
        assert httpx.post(infer, json={"inputs": [X]}, headers=bearer(key["key"])).status_code == 200
        assert c.delete(f"/api/orgs/{org}/keys/{key['id']}").status_code == 200
        revoked_at = time.monotonic()
    sent: list[tuple[float, int]] = []  # (seconds after the revocation a call was sent, its status)
    while not sent or sent[-1][1] == 200:
        at = time.monotonic() - revoked_at
        assert at < 10, ("the other process still accepts a revoked key", sent)
        sent.append((at, httpx.post(infer, json={"inputs": [X]}, headers=bearer(key["key"]), timeout=30).status_code))
        time.sleep(0.05)
    assert sent[-1][1] == 401, sent
    # The other process looked the key up before the revocation and keeps that for at most a second: no call sent
    # a second after the revocation may be accepted. (When a refusal came back is no bound: on a busy machine the
    # answer itself can take a few hundred ms, which failed this test at 1.45 s while the key was refused in time.)
    assert all(at < 1.0 for at, status in sent if status == 200), sent
