from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess, free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Apps built in this process (tests/api, tests/gateway) must not all bind the default gRPC port.
os.environ.setdefault("OPENMAAS_GRPC_PORT", "0")

ADMIN_KEY = "om_test-admin-key-0123456789abcdefghijklmnop"
METRICS_TOKEN = "scrape-token-for-the-test-prometheus"


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server with the bundled catalogue, shared by the end-to-end tests."""
    data_dir = tmp_path_factory.mktemp("server") / "data"
    proc = ServerProcess(
        data_dir,
        env={
            "OPENMAAS_ADMIN_KEY": ADMIN_KEY,
            "OPENMAAS_MAX_REQUEST_BYTES": "4194304",
            "OPENMAAS_METRICS_TOKEN": METRICS_TOKEN,
            # As a user's first start does: the GGUF model converts in the background from the start.
            "OPENMAAS_PREPARE_AT_START": "1",
            "OPENMAAS_GRPC_PORT": str(free_port()),
        },
    )
    proc.start()
    # The generation tests check what a user sees in the first seconds, while that conversion runs.
    # (Where the model is converted already, as in the suites after `make test`, the call loads it: seconds.)
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    try:
        with httpx.Client(base_url=proc.url, headers=auth, timeout=600) as c:
            proc.first_look = {
                "ready": c.get("/v2/models/gemma-3-270m/ready").json(),
                "model": c.get("/api/models/gemma-3-270m").json(),
                "call": c.post("/v1/completions", json={"model": "gemma-3-270m", "prompt": "Hi", "max_tokens": 1}),
            }
        yield proc
    finally:
        proc.stop()  # also when the first look fails (a server was left running)


@pytest.fixture(scope="session", autouse=True)
def _shared_server_starts_first(request: pytest.FixtureRequest) -> None:
    """Where this run has tests of the shared server, it starts before the first test of each worker rather than
    at the first that asks for it. `make test`'s workers share the bundled model's conversion
    (OPENMAAS_CONVERSION_CACHE): started together, every worker's server finds that conversion in progress, as the
    generation tests' first look expects, and never already finished by another worker's."""
    if any("server" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("server")


@pytest.fixture(scope="session")
def admin_key() -> str:
    return ADMIN_KEY


@pytest.fixture(scope="session")
def auth_headers(admin_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {admin_key}"}


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from openmaas.catalogue.minilm import model_dir

    return model_dir()


@pytest.fixture(scope="session")
def admin(server: ServerProcess, auth_headers: dict[str, str]) -> Iterator[httpx.Client]:
    """An HTTP client of the shared server, signed in as the platform admin."""
    with httpx.Client(base_url=server.url, headers=auth_headers, timeout=120) as c:
        yield c
