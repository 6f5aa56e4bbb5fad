"""Bootstrap auth in every protocol's format, health and metrics, request ids and logs, secrets kept out."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import METRICS_TOKEN
from tests.helpers import ServerProcess, bearer, matmul_chain_model, new_key, new_org, register_model, unique

PROTECTED = [
    ("GET", "/v1/models"),
    ("POST", "/v1/embeddings"),
    ("GET", "/v2"),
    ("GET", "/v2/models/digits-cnn"),
    ("POST", "/v2/models/digits-cnn/infer"),
    ("POST", "/v2/repository/index"),
    ("GET", "/metrics"),
    ("GET", "/api/models"),
    ("POST", "/api/models"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize("auth", [None, "Bearer om_wrong-key", "Basic abc", "Bearer"])
def test_every_endpoint_needs_a_valid_key(server: ServerProcess, method: str, path: str, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth else {}
    r = httpx.request(method, server.url + path, headers=headers, content=b"{}")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    body = r.json()
    if path.startswith("/v1"):
        assert body["error"]["code"] == "invalid_api_key"
        assert body["error"]["type"] == "invalid_request_error"
    elif path.startswith("/v2"):
        assert isinstance(body["error"], str)
        assert "API key" in body["error"]
    else:
        assert r.headers["content-type"] == "application/problem+json"
        assert body["status"] == 401


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready", "/healthz"])
def test_health_is_open(server: ServerProcess, path: str) -> None:
    assert httpx.get(server.url + path).status_code == 200


def test_metrics_need_the_scrape_token_or_the_admin_key(
    server: ServerProcess, admin: httpx.Client, auth_headers: dict[str, str]
) -> None:
    """Metrics labels name every organisation's models: an anonymous caller or an org's key learns nothing."""
    org = new_org(admin, "metrics")
    key = new_key(admin, org["name"], scopes=["inference", "manage"])["key"]
    private = unique("private-model")
    with httpx.Client(base_url=server.url, headers=bearer(key), timeout=60) as owner:
        path = server.data_dir.parent / f"{private}.onnx"
        matmul_chain_model(path, 4)
        assert register_model(owner, path, private).status_code == 201
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
        assert owner.post(f"/v2/models/{private}/infer", json=body).status_code == 200
    anonymous = httpx.get(server.url + "/metrics")
    assert anonymous.status_code == 401 and private not in anonymous.text
    assert anonymous.headers["www-authenticate"] == "Bearer"
    wrong = httpx.get(server.url + "/metrics", headers=bearer("scrape-token-guessed"))
    assert wrong.status_code == 401 and private not in wrong.text
    member = httpx.get(server.url + "/metrics", headers=bearer(key))
    assert member.status_code == 403 and private not in member.text
    for headers in (bearer(METRICS_TOKEN), auth_headers):
        scraped = httpx.get(server.url + "/metrics", headers=headers)
        assert scraped.status_code == 200
        assert f'openmaas_inference_requests_total{{model="{org["name"]}/{private}"' in scraped.text


def test_the_server_log_is_one_json_object_a_line(server: ServerProcess, auth_headers: dict[str, str]) -> None:
    """Loading a Hugging Face model drew a progress bar into the JSON log; warnings came as raw text."""
    body = {"model": "all-minilm-l6-v2", "input": "a sentence that loads the model"}
    assert httpx.post(server.url + "/v1/embeddings", json=body, headers=auth_headers, timeout=120).status_code == 200
    lines = [line for line in server.log().splitlines() if line.strip()]
    assert lines
    for line in lines:
        assert isinstance(orjson.loads(line), dict), line


def test_a_second_server_on_a_busy_port_fails_at_once_in_one_line(server: ServerProcess, tmp_path: Path) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "openmaas", "serve", "--port", str(server.port), "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OPENMAAS_ADMIN_KEY": "om_second-server-key-0123456789abcdefgh"},
    )
    assert done.returncode == 1
    assert time.monotonic() - started < 30  # before migrations, the catalogue or a "ready" line
    assert "already in use" in done.stderr and "--port" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "openmaas ready" not in done.stderr + done.stdout
    assert not (tmp_path / "d" / "openmaas.db").exists()


def test_request_ids_are_echoed_and_logged(server: ServerProcess, auth_headers: dict[str, str]) -> None:
    r = httpx.get(server.url + "/v1/models", headers={**auth_headers, "X-Request-Id": "client-chosen-42"})
    assert r.headers["x-request-id"] == "client-chosen-42"
    generated = httpx.get(server.url + "/v1/models", headers=auth_headers).headers["x-request-id"]
    assert len(generated) == 32
    bogus = httpx.get(server.url + "/v1/models", headers={**auth_headers, "X-Request-Id": "bad id\twith spaces"})
    assert bogus.headers["x-request-id"] != "bad id\twith spaces"
    lines = [orjson.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    access = [entry for entry in lines if entry.get("request_id") == "client-chosen-42"]
    assert access
    assert access[-1]["path"] == "/v1/models"
    assert access[-1]["status"] == 200


def test_metrics_count_requests_by_model_version_protocol_and_status(
    server: ServerProcess, auth_headers: dict[str, str]
) -> None:
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 10], "data": [0.0] * 10}]}
    # The first call may load the model on a machine busy with the other test worker: more than httpx's 5 s.
    first = httpx.post(server.url + "/v2/models/diabetes-linreg/infer", json=body, headers=auth_headers, timeout=120)
    assert first.status_code == 200, first.text
    bad = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 9], "data": [0.0] * 9}]}
    assert (
        httpx.post(server.url + "/v2/models/diabetes-linreg/infer", json=bad, headers=auth_headers).status_code == 400
    )
    text = httpx.get(server.url + "/metrics", headers=auth_headers).text
    ok = 'openmaas_inference_requests_total{model="diabetes-linreg",protocol="v2",status="ok",version="1"}'
    assert ok in text
    assert 'openmaas_inference_latency_seconds_bucket{le="0.001",model="diabetes-linreg"' in text
    assert "openmaas_model_load_seconds_count" in text
    assert "openmaas_inference_in_flight" in text


def test_admin_key_never_appears_in_logs_or_database(server: ServerProcess, admin_key: str) -> None:
    assert admin_key not in server.log()
    db = (server.data_dir / "openmaas.db").read_bytes()
    for suffix in ("-wal", "-shm"):
        wal = server.data_dir / ("openmaas.db" + suffix)
        if wal.exists():
            db += wal.read_bytes()
    assert admin_key.encode() not in db


def test_a_skops_models_first_call_after_a_restart_does_not_wait_for_scikit_learns_import(tmp_path: Path) -> None:
    """skops imports every scikit-learn estimator module (seconds, ~170 MB): a server that finds a skops model at
    start imports it in the background, so the model's first call loads in milliseconds and its measured memory
    is its own. Before, that call waited 5-9 s and the model was charged ~170 MB of libraries."""
    import skops.io as sio
    from sklearn.datasets import load_wine
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_wine(return_X_y=True)
    path = tmp_path / "wine.skops"
    sio.dump(make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y), str(path))
    key = "om_test-admin-key-0123456789abcdefghijklmnop"
    proc = ServerProcess(
        tmp_path / "d",
        env={"OPENMAAS_BUNDLED_MODELS": "false", "OPENMAAS_ADMIN_KEY": key, "OPENMAAS_PREPARE_AT_START": "1"},
    )
    proc.start()
    try:
        with httpx.Client(base_url=proc.url, headers=bearer(key), timeout=120) as c:
            assert register_model(c, path, "wine").status_code == 201
        proc.stop()
        proc.log_path.unlink()
        proc.start()
        deadline = time.monotonic() + 60
        while "model format set up" not in proc.log():
            assert time.monotonic() < deadline, proc.log()[-3000:]
            time.sleep(0.1)
        body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 13], "data": x[0].tolist()}]}
        r = httpx.post(f"{proc.url}/v2/models/wine/infer", json=body, headers=bearer(key), timeout=120)
        assert r.status_code == 200, r.text
    finally:
        proc.stop()
    lines = [orjson.loads(line) for line in proc.log().splitlines() if line.startswith("{")]
    set_up = [e for e in lines if e.get("msg") == "model format set up"]
    assert [(e["format"], e["libraries"]) for e in set_up] == [("skops", ["skops.io"])]
    loaded = [e for e in lines if e.get("msg") == "model loaded" and e.get("model") == "wine"]
    assert len(loaded) == 1, loaded
    assert loaded[0]["seconds"] < 1.0 and loaded[0]["bytes"] < 32 << 20, loaded[0]


def test_generated_admin_key_first_start(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh"
    proc = ServerProcess(data_dir, env={"OPENMAAS_BUNDLED_MODELS": "false", "OPENMAAS_ADMIN_KEY": ""})
    proc.env.pop("OPENMAAS_ADMIN_KEY")
    proc.start()
    try:
        key_file = data_dir / "admin.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        key = key_file.read_text().strip()
        assert key.startswith("om_")
        assert len(key) > 40
        assert proc.log().count(key) == 1  # printed once, on the console
        json_lines = [line for line in proc.log().splitlines() if line.startswith("{")]
        assert not any(key in line for line in json_lines)  # never in a log line
        assert httpx.get(proc.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        with sqlite3.connect(data_dir / "openmaas.db") as conn:
            (stored,) = conn.execute("select key_hash from api_keys").fetchone()
        assert key not in stored
    finally:
        proc.stop()
    # A restart reuses the key and prints nothing new.
    proc.start()
    try:
        assert proc.log().count(key) == 1
        assert httpx.get(proc.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    finally:
        proc.stop()
