"""The CLI for tenancy, the audit chain (and tampering with it), and secrets kept out of the database and logs."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess, bearer, matmul_chain_model

ADMIN = "om_audit-admin-key-0123456789abcdefghijklmn"
PASSWORD = "a very secret passphrase 42"


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("audit") / "data"
    proc = ServerProcess(data, env={"OPENMAAS_ADMIN_KEY": ADMIN, "OPENMAAS_BUNDLED_MODELS": "false"})
    proc.start()
    yield proc
    proc.stop()


def cli(
    server: ServerProcess, *args: str, key: str = ADMIN, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openmaas", *args, "--url", server.url, "--api-key", key],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
        env={**os.environ, "COLUMNS": "300"},
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_cli_tenancy_audit_chain_and_no_secret_at_rest(own_server: ServerProcess, tmp_path: Path) -> None:
    s = own_server
    ok(cli(s, "orgs", "create", "acme"))
    assert "acme" in ok(cli(s, "orgs", "list"))
    org_key = ok(
        cli(
            s,
            "keys",
            "create",
            "acme",
            "--name",
            "ci",
            "--scope",
            "inference",
            "--scope",
            "manage",
            "--scope",
            "billing",
            "--rpm",
            "100",
        )
    ).strip()
    assert org_key.startswith("om_") and len(org_key) > 40
    ok(cli(s, "users", "create", "ada@example.com", stdin=f"{PASSWORD}\n{PASSWORD}\n"))
    ok(cli(s, "users", "add", "acme", "ada@example.com", "--role", "admin"))
    assert "ada@example.com" in ok(cli(s, "users", "members", "acme"))

    def login(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "openmaas", "login", *args, "--url", s.url],
            capture_output=True,
            text=True,
            input=f"{PASSWORD}\n",
            timeout=120,
        )
        return ok(done).strip()

    session_key = login("acme", "ada@example.com")  # ORG first, as in every org-scoped command
    assert session_key.startswith("om_")
    assert login("ada@example.com", "acme").startswith("om_")  # the older order still works

    model = tmp_path / "m.onnx"
    matmul_chain_model(model, 4)
    ok(cli(s, "models", "register", str(model), "--name", "acme-model", key=org_key))
    x = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
    for key in (org_key, session_key):
        r = httpx.post(f"{s.url}/v2/models/acme-model/infer", json={"inputs": [x]}, headers=bearer(key))
        assert r.status_code == 200, r.text
    table = ok(cli(s, "usage", "--group-by", "model", key=org_key))
    assert "acme-model" in table and "Total: requests 2" in table

    # A wrong key is refused without being echoed.
    wrong = "om_this-is-not-a-real-key-but-looks-like-one"
    r = httpx.get(f"{s.url}/v1/models", headers=bearer(wrong))
    assert r.status_code == 401 and wrong not in r.text

    keys_table = ok(cli(s, "keys", "list", "acme"))
    assert org_key not in keys_table and org_key[:8] in keys_table

    audit = ok(cli(s, "audit", "list", "--limit", "100"))
    for action in ("org.create", "key.create", "user.create", "member.add", "session.create", "model.register"):
        assert action in audit, audit
    assert "chain intact" in ok(cli(s, "audit", "verify"))

    # Secrets at rest: not in the database files, not in the server's log.
    db_files = [p for p in s.data_dir.iterdir() if p.name.startswith("openmaas.db")]
    assert db_files
    blobs = b"".join(p.read_bytes() for p in db_files) + s.log().encode()
    for secret in (org_key, session_key, ADMIN, PASSWORD, wrong):
        assert secret.encode() not in blobs, f"a secret ({secret[:6]}...) is stored or logged in plain text"
    assert b"argon2id" in blobs  # the password is there as a hash

    # Tampering: change what an event says, then remove one.
    with sqlite3.connect(s.data_dir / "openmaas.db") as conn:
        conn.execute(
            """UPDATE audit_events SET "after" = '{"email": "mallory@example.com", "role": "owner"}' WHERE action = 'member.add'"""
        )
        seq = conn.execute("SELECT seq FROM audit_events WHERE action = 'member.add'").fetchone()[0]
    bad = cli(s, "audit", "verify")
    assert bad.returncode == 2 and f"event {seq}" in bad.stderr and "changed" in bad.stderr, bad.stderr
    with sqlite3.connect(s.data_dir / "openmaas.db") as conn:
        conn.execute("DELETE FROM audit_events WHERE seq = ?", (seq,))
    bad = cli(s, "audit", "verify")
    assert bad.returncode == 2 and "gap" in bad.stderr, bad.stderr

    # Org principals cannot verify or read the whole chain; the viewer role gets nothing of the audit.
    assert cli(s, "audit", "verify", key=org_key).returncode == 1
