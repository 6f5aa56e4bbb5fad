"""The CLI as a new user meets it: it finds the local server from the server's own settings, says in one line
when it cannot reach one or the key is wrong, and the operator can list what awaits review."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.helpers import ServerProcess, bearer, free_port, matmul_chain_model, new_key, new_org, register_model, unique

CARD = {
    "intended_use": "tests",
    "training_data": "none",
    "metrics": {"mse": 1.0},
    "limitations": "none",
    "license": "Apache-2.0",
    "privacy": "no data",
}


def _cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENMAAS_")}
    return subprocess.run(
        [sys.executable, "-m", "openmaas", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, "COLUMNS": "200", **env},
        cwd=cwd,
    )


def test_the_cli_talks_to_the_port_the_server_runs_on(server: ServerProcess, admin_key: str, tmp_path: Path) -> None:
    done = _cli("models", "list", env={"OPENMAAS_PORT": str(server.port), "OPENMAAS_API_KEY": admin_key}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "digits-cnn" in done.stdout


def test_no_server_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    port = free_port()
    done = _cli("models", "list", env={"OPENMAAS_PORT": str(port), "OPENMAAS_API_KEY": "om_x"}, cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"cannot reach http://127.0.0.1:{port}" in lines[0] and "is the server running?" in lines[0]
    assert "--url or OPENMAAS_URL" in lines[0]


def test_a_wrong_key_is_one_line_naming_where_the_key_comes_from(server: ServerProcess, tmp_path: Path) -> None:
    done = _cli("models", "list", "--url", server.url, "--api-key", "om_wrong", env={}, cwd=tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error 401") and "--api-key or OPENMAAS_API_KEY" in lines[0]


def test_models_awaiting_review_can_be_listed(server: ServerProcess, admin: httpx.Client, tmp_path: Path) -> None:
    """GET /api/models?review_state=pending filters (the parameter used to be ignored)."""
    org = new_org(admin, "reviewed")
    key = new_key(admin, org["name"], scopes=["inference", "manage"])["key"]
    path = tmp_path / "m.onnx"
    matmul_chain_model(path, 4)
    waiting, private = unique("waiting"), unique("private")
    with httpx.Client(base_url=server.url, headers=bearer(key), timeout=60) as owner:
        for name in (waiting, private):
            assert register_model(owner, path, name, card=CARD).status_code == 201
        assert owner.patch(f"/api/models/{waiting}", json={"visibility": "public"}).status_code == 200
    pending = [m["name"] for m in admin.get("/api/models", params={"review_state": "pending"}).json()["models"]]
    assert f"{org['name']}/{waiting}" in pending and f"{org['name']}/{private}" not in pending
    assert all(m["review_state"] == "pending" for m in admin.get("/api/models?review_state=pending").json()["models"])
    privates = [m["name"] for m in admin.get("/api/models", params={"visibility": "private"}).json()["models"]]
    assert f"{org['name']}/{private}" in privates and "digits-cnn" not in privates
    bad = admin.get("/api/models", params={"review_state": "maybe"})
    assert bad.status_code == 400 and bad.json()["param"] == "review_state"


def test_provider_and_operator_commands(
    server: ServerProcess, admin: httpx.Client, admin_key: str, tmp_path: Path
) -> None:
    """A provider shares and sells a model and asks for publication; the operator lists what awaits review,
    approves it and reads the provider's statement: all from the CLI, model first, then what to do."""
    provider, consumer = new_org(admin, "cli-provider"), new_org(admin, "cli-consumer")
    key = new_key(admin, provider["name"], scopes=["inference", "manage", "billing"])["key"]
    path = tmp_path / "m.onnx"
    matmul_chain_model(path, 4)
    name = unique("cli-sold")
    with httpx.Client(base_url=server.url, headers=bearer(key), timeout=60) as owner:
        assert register_model(owner, path, name, card=CARD).status_code == 201
    as_provider = {"OPENMAAS_PORT": str(server.port), "OPENMAAS_API_KEY": key}
    as_admin = {"OPENMAAS_PORT": str(server.port), "OPENMAAS_API_KEY": admin_key}

    def ok(*args: str, env: dict[str, str]) -> str:
        done = _cli(*args, env=env, cwd=tmp_path)
        assert done.returncode == 0, (args, done.stderr)
        return done.stdout

    assert f"{name}: shared with {consumer['name']}" in ok("models", "share", name, consumer["name"], env=as_provider)
    plan = tmp_path / "plan.json"
    plan.write_text('{"name": "per-call", "kind": "usage", "unit": "requests", "price_micros": 20000}')
    assert "plan per-call" in ok("models", "sell", name, str(plan), env=as_provider)
    listed = ok("models", "plans", name, env=as_provider)
    assert "per-call" in listed and "0.020000" in listed
    assert "review pending" in ok("models", "visibility", name, "public", env=as_provider)
    assert name in ok("models", "pending", env=as_admin)
    refused = _cli("models", "review", name, "reject", env=as_admin, cwd=tmp_path)
    assert refused.returncode == 1 and "reason" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert f"{name}: public" in ok("models", "review", name, "approve", env=as_admin)
    assert name not in ok("models", "pending", env=as_admin)
    statement = ok("billing", "statement", provider["name"], "2026-01", env=as_provider)
    assert "payout 0.000000" in statement


def test_the_local_admin_key_goes_only_to_the_local_server(
    server: ServerProcess, admin_key: str, tmp_path: Path
) -> None:
    """With no key given, the CLI falls back on .openmaas/admin.key, but only for the server this environment
    runs (it used to send it to whatever --url named)."""
    (tmp_path / ".openmaas").mkdir()
    (tmp_path / ".openmaas" / "admin.key").write_text(admin_key)
    elsewhere = _cli("models", "list", "--url", server.url, env={}, cwd=tmp_path)
    assert elsewhere.returncode == 1 and elsewhere.stderr.startswith("error 401"), elsewhere.stderr
    local = _cli("models", "list", env={"OPENMAAS_PORT": str(server.port)}, cwd=tmp_path)
    assert local.returncode == 0 and "digits-cnn" in local.stdout, local.stderr
