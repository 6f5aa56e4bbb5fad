"""A real two-node Ray cluster on this machine, and gateways in cluster mode on PostgreSQL and Redis.

Ray binds every process to 127.0.0.1 here: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray resolve "localhost"
to the loopback address instead of the machine's network address (it must be set before ray is imported, in this
process and in every gateway). The nodes are ``ray.cluster_utils.Cluster`` processes started by this test process
(it is no Ray driver itself, so it may remove the worker node to simulate losing a machine).
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.helpers import ServerProcess, bearer

PG_URL = os.environ.get("OPENMAAS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("OPENMAAS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN = "om_cluster-admin-key-0123456789abcdefghijkl"
GiB = 1024**3

pytestmark = pytest.mark.cluster


def _services_or_fail() -> None:
    import redis

    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        pytest.fail("the cluster suite needs Ray Serve: pip install -e '.[cluster]' (make test-cluster does)")
    engine = create_engine(PG_URL, connect_args={"connect_timeout": 3})
    with engine.connect() as conn:
        conn.execute(text("select 1"))
    engine.dispose()
    redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()


@dataclass
class RayCluster:
    cluster: Any
    worker: Any = None
    extra: list[Any] = field(default_factory=list)

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def add_worker(self) -> Any:
        node = self.cluster.add_node(
            num_cpus=4, memory=6 * GiB, object_store_memory=96 * 1024 * 1024, resources={"worker": 1}
        )
        self.cluster.wait_for_nodes()
        return node

    def kill_worker(self, node: Any) -> None:
        """The node's processes are killed at once (raylet, workers): a machine lost."""
        self.cluster.remove_node(node, allow_graceful=False)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    _services_or_fail()
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 4,  # logical CPUs: replicas declare one each; the machine has two cores
            "memory": 6 * GiB,
            "object_store_memory": 96 * 1024 * 1024,
            "include_dashboard": False,
            "resources": {"head": 1},
        },
    )
    rc = RayCluster(cluster)
    try:
        rc.worker = rc.add_worker()
        yield rc
    finally:
        cluster.shutdown()


@dataclass
class Gateways:
    servers: list[ServerProcess]
    data_dir: Path
    database_url: str
    env: dict[str, str]

    def admin(self, i: int = 0) -> httpx.Client:
        return httpx.Client(base_url=self.servers[i].url, headers=bearer(ADMIN), timeout=120)

    def start(self, i: int) -> ServerProcess:
        proc = ServerProcess(self.data_dir, env=self.env)
        proc.log_path = self.data_dir.parent / f"gateway-{i}-{uuid.uuid4().hex[:4]}.log"
        self.servers[i] = proc.start(timeout=180)
        return proc


def cluster_env(address: str, database_url: str, redis_db: int = 1, **extra: str) -> dict[str, str]:
    """A gateway's settings in cluster mode; each test module has a Redis database of its own (emptied first), so
    rate limits and replica reports of an earlier cluster never mix with its own."""
    import redis

    url = REDIS_URL.rsplit("/", 1)[0] + f"/{redis_db}"
    redis.Redis.from_url(url).flushdb()
    return {
        "OPENMAAS_ADMIN_KEY": ADMIN,
        "OPENMAAS_SECRET_KEY": "cluster-test-secret-" + "0" * 24,
        "OPENMAAS_DATABASE_URL": database_url,
        "OPENMAAS_REDIS_URL": url,
        "OPENMAAS_BUNDLED_MODELS": "false",
        "OPENMAAS_BACKEND": "ray",
        "OPENMAAS_RAY_ADDRESS": address,
        "OPENMAAS_RAY_SHARED_MEMORY_MB": "512",
        "OPENMAAS_RAY_CALL_TIMEOUT_S": "30",
        "OPENMAAS_TORCH_THREADS": "1",
        "OPENMAAS_ONNX_THREADS": "1",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        **extra,
    }


@pytest.fixture(scope="module")
def schema_url() -> Iterator[str]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin_engine = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin_engine.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin_engine.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin_engine.dispose()


def start_gateways(
    ray_cluster: RayCluster,
    schema_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    count: int,
    redis_db: int,
    **extra: str,
) -> Iterator[Gateways]:
    data = tmp_path_factory.mktemp("cluster") / "data"
    env = cluster_env(ray_cluster.address, schema_url, redis_db, **extra)
    gw = Gateways([], data, schema_url, env)
    try:
        for i in range(count):
            proc = ServerProcess(data, env=env)
            proc.log_path = data.parent / f"gateway-{i}.log"
            gw.servers.append(proc)
            proc.start(timeout=180)
        yield gw
    finally:
        for proc in gw.servers:
            proc.stop()
        _delete_apps(ray_cluster.address)


@pytest.fixture(scope="module")
def gateways(ray_cluster: RayCluster, schema_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    """Two gateway processes on their own ports, one database, one Redis, one artifact folder."""
    yield from start_gateways(ray_cluster, schema_url, tmp_path_factory, 2, redis_db=1)


def _delete_apps(address: str) -> None:
    """Remove the test's Serve applications (a driver of its own in a child, so this process stays none)."""
    import subprocess
    import sys

    code = (
        "import ray\nfrom ray import serve\n"
        f"ray.init(address={address!r}, namespace='openmaas', log_to_driver=False)\n"
        "serve.shutdown()\n"
    )
    subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True, env=os.environ.copy())


def wait_for(check: Any, timeout: float, what: str, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:g} s (last: {last!r})")
