"""The web console over HTTP (no browser): sessions, CSRF, security headers, isolation, keys, usage, playground.
The browser suite (tests/browser, ``make test-browser``) drives the same pages in chromium."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess, matmul_chain_model, new_org, register_model, unique

SAME = {"Sec-Fetch-Site": "same-origin"}
PASSWORD = "console-test-password-1"
CONSOLE_HEADERS = ("content-security-policy", "x-content-type-options", "referrer-policy")


@dataclass
class Member:
    org: dict
    email: str
    http: httpx.Client  # signed in to the console (cookie), same-origin by default


def sign_in(server: ServerProcess, email: str, org: str = "", password: str = PASSWORD) -> httpx.Client:
    http = httpx.Client(base_url=server.url, headers=SAME, timeout=120)
    r = http.post("/console/sign-in", data={"email": email, "password": password, "org": org})
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/console"
    return http


def new_member(server: ServerProcess, admin: httpx.Client, label: str, role: str = "admin") -> Member:
    org = new_org(admin, label)
    email = f"{unique(label)}@example.test"
    r = admin.post(f"/api/orgs/{org['name']}/members", json={"email": email, "role": role, "password": PASSWORD})
    assert r.status_code == 201, r.text
    return Member(org, email, sign_in(server, email))


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("console") / "m.onnx"
    matmul_chain_model(path, 4)
    return path


@pytest.fixture(scope="module")
def alice(server: ServerProcess, admin: httpx.Client) -> Iterator[Member]:
    m = new_member(server, admin, "alice")
    yield m
    m.http.close()


@pytest.fixture(scope="module")
def bob(server: ServerProcess, admin: httpx.Client) -> Iterator[Member]:
    m = new_member(server, admin, "bob")
    yield m
    m.http.close()


@pytest.fixture(scope="module")
def operator(server: ServerProcess, admin: httpx.Client) -> Iterator[httpx.Client]:
    email = f"{unique('operator')}@example.test"
    assert admin.post("/api/users", json={"email": email, "password": PASSWORD}).status_code == 201
    r = admin.patch(f"/api/users/{email}", json={"platform_admin": True})
    assert r.status_code == 200 and r.json()["platform_admin"] is True, r.text
    http = sign_in(server, email)
    yield http
    http.close()


def test_sign_in_sets_an_opaque_http_only_cookie_and_wrong_details_get_one_message(
    server: ServerProcess, alice: Member
) -> None:
    anon = httpx.Client(base_url=server.url, headers=SAME)
    r = anon.get("/console/keys")
    assert r.status_code == 303 and r.headers["location"] == "/console/sign-in?next=%2Fconsole%2Fkeys"
    for email, password in ((alice.email, "not-the-password"), ("nobody@example.test", PASSWORD)):
        r = anon.post("/console/sign-in", data={"email": email, "password": password})
        assert r.status_code == 401
        assert "wrong email, password or organisation" in r.text
        assert "set-cookie" not in r.headers
    r = anon.post("/console/sign-in", data={"email": alice.email, "password": PASSWORD, "next": "/console/usage"})
    assert r.status_code == 303 and r.headers["location"] == "/console/usage"
    cookie = r.headers["set-cookie"]
    assert "openmaas_session=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert "Secure" not in cookie  # plain http here; set over https
    token = r.cookies["openmaas_session"]
    assert not token.startswith("om_")  # never an API key: the cookie is not a bearer token
    r = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 401
    # An open redirect is not possible through ?next=.
    r = anon.post("/console/sign-in", data={"email": alice.email, "password": PASSWORD, "next": "https://evil.test/"})
    assert r.headers["location"] == "/console"
    anon.close()


def test_sign_in_rotates_the_session_and_sign_out_ends_it(server: ServerProcess, alice: Member) -> None:
    http = sign_in(server, alice.email)
    first = http.cookies["openmaas_session"]
    assert http.get("/console").status_code == 200
    r = http.post("/console/sign-in", data={"email": alice.email, "password": PASSWORD})
    assert r.status_code == 303
    second = http.cookies["openmaas_session"]
    assert second != first
    stale = httpx.Client(base_url=server.url, cookies={"openmaas_session": first})
    assert stale.get("/console").status_code == 303  # the session planted before sign-in is gone
    r = http.post("/console/sign-out")
    assert r.status_code == 303 and r.headers["location"] == "/console/sign-in"
    after = httpx.Client(base_url=server.url, cookies={"openmaas_session": second}, headers=SAME)
    assert after.get("/console").status_code == 303
    r = after.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "x"})
    assert r.status_code == 401 and "session has ended" in r.json()["error"]["message"]
    stale.close()
    after.close()
    http.close()


def test_every_console_response_carries_the_security_headers(alice: Member) -> None:
    for r in (
        alice.http.get("/console"),
        alice.http.get("/console/models", headers={"HX-Request": "true", "HX-Target": "model-list"}),
        alice.http.get("/console/static/console.css"),
        alice.http.get("/console/static/vendor/htmx.min.js"),
        alice.http.get("/console/no-such-page"),
        alice.http.get("/console/models/no-such-model"),
        httpx.get(f"{alice.http.base_url}/console/keys"),  # the redirect to sign-in
    ):
        for name in CONSOLE_HEADERS:
            assert name in r.headers, (r.request.url, name)
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "same-origin"
    page = alice.http.get("/console").text
    assert "<script>" not in page and " onclick=" not in page and "javascript:" not in page
    assert alice.http.get("/console/no-such-page").status_code == 404


def test_cross_site_requests_with_the_cookie_are_refused_and_bearer_calls_are_unaffected(
    server: ServerProcess, alice: Member, admin: httpx.Client
) -> None:
    cookie = {"openmaas_session": alice.http.cookies["openmaas_session"]}
    # The session reads the API as the member (the console's invoice downloads link to it)...
    assert alice.http.get(f"/api/orgs/{alice.org['name']}/keys").status_code == 200
    keys_before = admin.get(f"/api/orgs/{alice.org['name']}/keys").json()["keys"]
    for headers in (
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "https://evil.test"},
        {},  # neither header: not provably same-origin
    ):
        c = httpx.Client(base_url=server.url, cookies=cookie, headers=headers)
        r = c.post("/console/keys", data={"name": "evil", "scopes": "inference"})
        assert r.status_code == 403, (headers, r.status_code)
        assert "cross-site request refused" in r.text
        r = c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "x"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
        # ...but changes nothing through it from another site.
        r = c.post(f"/api/orgs/{alice.org['name']}/keys", json={"name": "evil"})
        assert r.status_code == 403 and r.json()["code"] == "permission_denied"
        c.close()
    assert admin.get(f"/api/orgs/{alice.org['name']}/keys").json()["keys"] == keys_before
    # A browser without Sec-Fetch-Site but with this origin's Origin is accepted. (The call may be the model's first:
    # a load, seconds beside the other test worker and the bundled model's conversion, past httpx's 5 s default.)
    c = httpx.Client(base_url=server.url, cookies=cookie, headers={"Origin": server.url}, timeout=120)
    r = c.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "x"})
    assert r.status_code == 200, r.text
    c.close()
    # A bearer call carrying a stray cookie of another site's making is judged by its key alone.
    r = httpx.post(f"{server.url}/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "x"},
                   headers={"Authorization": admin.headers["authorization"], "Sec-Fetch-Site": "cross-site"},
                   cookies=cookie, timeout=120)  # fmt: skip
    assert r.status_code == 200


def test_a_member_sees_only_their_organisation_and_operator_pages_are_404(
    server: ServerProcess, alice: Member, bob: Member, onnx_file: Path, admin: httpx.Client
) -> None:
    bobs = unique("bob-private")
    created = admin.post(f"/api/orgs/{bob.org['name']}/keys", json={"name": "k", "scopes": ["manage", "inference"]})
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {created.json()['key']}"}) as b:
        assert register_model(b, onnx_file, bobs).status_code == 201
    full = f"{bob.org['name']}/{bobs}"
    assert full in bob.http.get("/console/models").text
    page = alice.http.get("/console/models", params={"q": bobs}).text
    assert full not in page and "0 models" in page
    assert alice.http.get(f"/console/models/{full}").status_code == 404
    assert alice.http.get("/console/playground", params={"model": full}).text.count(full) == 0
    body = '{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}'
    r = alice.http.post("/console/playground/infer", data={"model": full, "body": body})
    assert r.status_code == 404
    for path in ("/console/operator", "/console/operator/audit", f"/console/operator/orgs/{bob.org['name']}"):
        r = alice.http.get(path)
        assert r.status_code == 404 and "no such page" in r.text
    r = alice.http.post("/console/operator/orgs", data={"name": unique("sneaky")})
    assert r.status_code == 404
    r = alice.http.post(f"/console/operator/orgs/{alice.org['name']}/credits", data={"amount": "5", "reference": "x"})
    assert r.status_code == 404
    assert admin.get(f"/api/orgs/{alice.org['name']}/wallet").json()["balance_micros"] == 0


def test_keys_show_the_secret_once_and_list_only_prefix_and_last_four(alice: Member, server: ServerProcess) -> None:
    r = alice.http.post("/console/keys", data={"name": "backend", "scopes": ["inference"], "rpm": "600"})
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"].startswith("no-store")
    secret = r.text.split('id="secret" class="mono wide" readonly value="')[1].split('"')[0]
    assert secret.startswith("om_")
    listed = alice.http.get("/console/keys")
    assert secret not in listed.text
    assert f"{secret[:8]}…{secret[-4:]}" in listed.text
    # The key works with the API like any other, for the member's organisation.
    r = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 200
    key_id = next(k for k in alice.http.get("/console/keys").text.split('action="/console/keys/')[1:] if "revoke" in k)
    r = alice.http.post(f"/console/keys/{key_id.split('/')[0]}/revoke")
    assert r.status_code == 303
    assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    r = alice.http.post("/console/keys", data={"name": "x", "scopes": ["inference"], "rpm": "lots"})
    assert r.status_code == 400 and "rpm&#39; must be a whole number" in r.text


def test_the_playground_compares_sentences_metered_to_the_members_organisation(
    alice: Member, admin: httpx.Client
) -> None:
    page = alice.http.get("/console/playground", params={"model": "all-minilm-l6-v2"})
    assert page.status_code == 200 and "Embed and compare" in page.text
    r = alice.http.post(
        "/console/playground/embeddings",
        data={"model": "all-minilm-l6-v2", "text": "A cat sits on the mat.\nA kitten rests on a rug.\nStocks fell."},
        headers={"HX-Request": "true"},
    )
    assert r.status_code == 200, r.text
    cells = [float(c.split(">")[-1]) for c in r.text.split("</td>")[:-1]]
    assert len(cells) == 9
    assert cells[0] == pytest.approx(1.0, abs=1e-3)
    assert cells[1] > cells[2]  # the two sentences about cats are closer than cat and stocks
    usage = admin.get("/api/usage", params={"org": alice.org["name"], "group_by": "model"}).json()
    assert {row["model"]: row["requests"] for row in usage["data"]}.get("all-minilm-l6-v2", 0) >= 1
    r = alice.http.post("/console/playground/embeddings", data={"model": "all-minilm-l6-v2", "text": " \n "},
                        headers={"HX-Request": "true"})  # fmt: skip
    assert r.status_code == 400 and "one sentence a line" in r.text


def test_usage_page_and_csv_agree_with_the_api(alice: Member, admin: httpx.Client) -> None:
    for _ in range(2):
        r = alice.http.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": ["a", "b"]})
        assert r.status_code == 200
    api = admin.get("/api/usage", params={"org": alice.org["name"], "group_by": "day,model"}).json()
    r = alice.http.get("/console/usage.csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [(row["day"], row["model"], int(row["requests"])) for row in rows] == [
        (d["day"], d["model"], d["requests"]) for d in api["data"]
    ]
    page = alice.http.get("/console/usage", params={"model": "all-minilm-l6-v2"})
    assert page.status_code == 200 and "<svg" in page.text and "all-minilm-l6-v2" in page.text
    assert alice.http.get("/console/usage", params={"start": "yesterday"}).status_code == 400


def test_every_page_renders_for_a_member_and_for_an_operator(alice: Member, operator: httpx.Client) -> None:
    for path in ("/console", "/console/models", "/console/models/all-minilm-l6-v2", "/console/playground",
                 "/console/playground?model=gemma-3-270m", "/console/playground?model=digits-cnn",
                 "/console/keys", "/console/usage", "/console/billing", "/console/jobs", "/console/batches",
                 "/console/provider"):  # fmt: skip
        r = alice.http.get(path)
        assert r.status_code == 200, (path, r.text[-2000:])
        assert 'role="alert"' not in r.text, (path, r.text[-2000:])
    for path in ("/console", "/console/operator", "/console/operator/audit", "/console/models",
                 "/console/playground"):  # fmt: skip
        r = operator.get(path)
        assert r.status_code == 200, (path, r.text[-2000:])
        assert 'role="alert"' not in r.text, (path, r.text[-2000:])
    assert "Hash chain: intact" in operator.get("/console/operator/audit").text


def test_the_api_reference_page_loads_nothing_from_a_cdn(server: ServerProcess) -> None:
    r = httpx.get(f"{server.url}/docs")
    assert r.status_code == 200
    assert "/console/static/vendor/swagger-ui-bundle.js" in r.text
    assert "cdn." not in r.text and "https://" not in r.text.split("<body>")[0]
    assert httpx.get(f"{server.url}/console/static/vendor/swagger-ui-bundle.js").status_code == 200


def test_rotating_a_key_shows_the_new_secret_once_and_the_old_one_keeps_working_for_the_grace(
    alice: Member, server: ServerProcess
) -> None:
    r = alice.http.post("/console/keys", data={"name": "to-rotate", "scopes": ["inference"]})
    old = r.text.split('readonly value="')[1].split('"')[0]
    key_id = alice.http.get("/console/keys").text.split("to-rotate")[1].split('action="/console/keys/')[1].split("/")[0]
    r = alice.http.post(f"/console/keys/{key_id}/rotate", data={"grace_seconds": "3600"})
    assert r.status_code == 200 and r.headers["cache-control"].startswith("no-store")
    new = r.text.split('readonly value="')[1].split('"')[0]
    assert new != old and "Key rotated" in r.text
    for secret in (old, new):
        assert httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 200


@pytest.mark.skipif(not shutil.which("espeak-ng") or not shutil.which("sox"), reason="espeak-ng and sox make speech")
def test_the_playground_transcribes_an_uploaded_recording(alice: Member, tmp_path: Path) -> None:
    raw, wav = tmp_path / "raw.wav", tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(raw), "We need three more chairs for the meeting room."], check=True)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", str(wav)], check=True)
    page = alice.http.get("/console/playground", params={"model": "whisper-tiny-en"})
    assert 'hx-post="/console/playground/transcribe"' in page.text
    with wav.open("rb") as f:
        r = alice.http.post("/console/playground/transcribe", data={"model": "whisper-tiny-en"},
                            files={"file": ("speech.wav", f, "audio/wav")}, headers={"HX-Request": "true"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert "chairs" in r.text.lower() or "meeting" in r.text.lower(), r.text
    r = alice.http.post("/console/playground/transcribe", data={"model": "whisper-tiny-en"},
                        files={"file": ("x.wav", b"not audio", "audio/wav")}, headers={"HX-Request": "true"})  # fmt: skip
    assert r.status_code == 400 and 'role="alert"' in r.text


def test_a_batch_uploaded_from_the_console_runs_and_its_results_download(alice: Member) -> None:
    lines = "".join(
        json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/embeddings",
                    "body": {"model": "all-minilm-l6-v2", "input": f"line {i}"}}) + "\n"
        for i in range(3)
    )  # fmt: skip
    r = alice.http.post("/console/batches", data={"purpose": "batch", "endpoint": "/v1/embeddings"},
                        files={"file": ("lines.jsonl", lines.encode(), "application/jsonl")})  # fmt: skip
    assert r.status_code == 303, r.text
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        page = alice.http.get("/console/batches").text
        if "completed" in page:
            break
        time.sleep(0.5)
    assert "3/3" in page
    output = page.split('href="/v1/files/')[1].split('"')[0]
    r = alice.http.get(f"/v1/files/{output}")  # the download link works on the session
    assert r.status_code == 200
    assert len(r.text.strip().splitlines()) == 3


def test_subscriptions_statements_and_job_pages(alice: Member, admin: httpx.Client, onnx_file: Path,
                                                server: ServerProcess) -> None:  # fmt: skip
    # Alice's organisation sells its own model on a subscription, and subscribes to it (as a consumer would).
    name = unique("sold")
    r = alice.http.post("/console/provider/models", data={"name": name, "task": "tabular-regression",
                        "metrics": "rmse=0.1"}, files={"file": ("m.onnx", onnx_file.read_bytes())})  # fmt: skip
    assert r.status_code == 303, r.text
    full = r.headers["location"].removeprefix("/console/models/")
    model_page = alice.http.get(r.headers["location"])
    assert model_page.status_code == 200 and "rmse" in model_page.text
    r = alice.http.post(f"/console/provider/models/{full}/plans", data={"plan": "monthly", "kind": "subscription",
                        "monthly_fee": "0", "included_units": "100", "overage_price": "0.001"})  # fmt: skip
    assert r.status_code == 303, r.text
    r = alice.http.post(f"/console/provider/models/{full}/plans", data={"plan": "bad", "kind": "usage", "price": "-1"})
    assert r.status_code == 400 and "zero or more" in r.text
    plan_id = admin.get(f"/api/models/{full}/plans").json()["plans"][0]["id"]
    r = alice.http.post("/console/billing/subscriptions", data={"model": full, "plan": plan_id})
    assert r.status_code == 303, r.text
    billing = alice.http.get("/console/billing").text
    assert full in billing and "Cancel" in billing
    sub_id = billing.split('action="/console/billing/subscriptions/')[1].split("/")[0]
    assert alice.http.post(f"/console/billing/subscriptions/{sub_id}/cancel").status_code == 303
    period = "2026-01"
    r = alice.http.get(f"/console/billing/statements/{period}")
    assert r.status_code == 200 and "Provider statement, 2026-01" in r.text
    assert alice.http.get("/console/billing/statements/2026-13").status_code == 400
    # A job that cannot start names its problem; one that can shows its page and can be cancelled.
    r = alice.http.post("/console/jobs", data={"type": "train", "task": "tabular-classification", "dataset": "nope",
                                               "output_model": "x"})  # fmt: skip
    assert r.status_code in (400, 404) and 'role="alert"' in r.text
    r = alice.http.post("/console/jobs", data={"spec": "{not json"})
    assert r.status_code == 400 and "not valid JSON" in r.text


def test_a_provider_edits_a_card_through_the_console_and_another_org_cannot(
    alice: Member, bob: Member, onnx_file: Path, admin: httpx.Client
) -> None:
    r = alice.http.post("/console/provider/models", data={"name": unique("carded"), "task": "tabular-regression"},
                        files={"file": ("m.onnx", onnx_file.read_bytes())})  # fmt: skip
    full = r.headers["location"].removeprefix("/console/models/")
    form = {"version": "1", "task": "tabular-regression", "description": "Doubles things.", "metrics": "rmse=0.25",
            "license": "MIT"}  # fmt: skip
    r = alice.http.post(f"/console/provider/models/{full}/card", data=form)
    assert r.status_code == 303, r.text
    card = admin.get(f"/api/models/{full}/versions/1").json()["card"]
    assert card["description"] == "Doubles things." and card["metrics"] == {"rmse": 0.25} and card["license"] == "MIT"
    assert "Doubles things." in alice.http.get(f"/console/models/{full}").text
    events = admin.get("/api/audit", params={"org": alice.org["name"], "limit": 1000}).json()["events"]
    assert any(e["action"] == "model.card" and e["before"]["description"] == "" for e in events)
    # Bob cannot see it, so cannot edit it (404, no existence leak); a malformed metric is a 400.
    assert bob.http.post(f"/console/provider/models/{full}/card", data=form).status_code == 404
    r = alice.http.post(f"/console/provider/models/{full}/card", data={**form, "metrics": "rmse=low"})
    assert r.status_code == 400 and "name=value" in r.text


def test_the_cli_makes_an_operator_who_signs_in_to_the_console(server: ServerProcess, admin: httpx.Client,
                                                               admin_key: str) -> None:  # fmt: skip
    email = f"{unique('cli-op')}@example.test"
    assert admin.post("/api/users", json={"email": email, "password": PASSWORD}).status_code == 201
    run = subprocess.run([sys.executable, "-m", "openmaas", "users", "operator", email, "--url", server.url],
                         env={**os.environ, "OPENMAAS_API_KEY": admin_key}, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "is now an operator" in run.stdout
    http = sign_in(server, email)
    assert http.get("/console/operator").status_code == 200
    run = subprocess.run([sys.executable, "-m", "openmaas", "users", "operator", email, "--off", "--url", server.url],
                         env={**os.environ, "OPENMAAS_API_KEY": admin_key}, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert run.returncode == 0 and "no longer an operator" in run.stdout
    assert http.get("/console/operator").status_code == 303  # the operator session ended with the role
    http.close()


def test_the_operator_closes_a_month_and_the_member_reads_the_invoice_line_by_line(
    server: ServerProcess, alice: Member, operator: httpx.Client, admin: httpx.Client, onnx_file: Path
) -> None:
    r = alice.http.post("/console/provider/models", data={"name": unique("monthly")},
                        files={"file": ("m.onnx", onnx_file.read_bytes())})  # fmt: skip
    full = r.headers["location"].removeprefix("/console/models/")
    r = alice.http.post(f"/console/provider/models/{full}/plans", data={"plan": "basic", "kind": "subscription",
                        "monthly_fee": "5", "included_units": "10"})  # fmt: skip
    assert r.status_code == 303, r.text
    plan_id = admin.get(f"/api/models/{full}/plans").json()["plans"][0]["id"]
    # A subscription that ran through a past month (written into the server's database, as an import would).
    with sqlite3.connect(Path(server.data_dir) / "openmaas.db") as db:
        db.execute("INSERT INTO subscriptions (id, org_id, plan_id, model, started_at, ends_at) VALUES (?, ?, ?, ?, ?, ?)",
                   (uuid.uuid4().hex, alice.org["id"], plan_id, full, "2026-04-01 00:00:00.000000",
                    "2026-05-01 00:00:00.000000"))  # fmt: skip
    page = operator.post("/console/operator/periods", data={"period": "2026-04"})
    assert page.status_code == 200 and "Period 2026-04 closed" in page.text, page.text
    billing = alice.http.get("/console/billing").text
    invoice_id = billing.split('href="/console/billing/invoices/')[1].split('"')[0]
    page = alice.http.get(f"/console/billing/invoices/{invoice_id}")
    assert page.status_code == 200 and "2026-04" in page.text and "basic, 30 of 30 days" in page.text
    assert "5.00" in page.text
    r = alice.http.get(f"/console/billing/invoices/{invoice_id}/lines/1", headers={"HX-Request": "true"})
    assert r.status_code == 200 and "The calls behind line 1" in r.text
    # Another organisation's member cannot open it.
    other = new_member(server, admin, "nosy")
    assert other.http.get(f"/console/billing/invoices/{invoice_id}").status_code == 404
    other.http.close()


def test_a_member_of_two_organisations_switches_between_them(server: ServerProcess, admin: httpx.Client) -> None:
    first, second = new_org(admin, "first"), new_org(admin, "second")
    email = f"{unique('both')}@example.test"
    admin.post(f"/api/orgs/{first['name']}/members", json={"email": email, "role": "admin", "password": PASSWORD})
    admin.post(f"/api/orgs/{second['name']}/members", json={"email": email, "role": "viewer"})
    anon = httpx.Client(base_url=server.url, headers=SAME)
    r = anon.post("/console/sign-in", data={"email": email, "password": PASSWORD})
    assert r.status_code == 401 and "name the organisation" in r.text
    anon.close()
    http = sign_in(server, email, first["name"])
    old = http.cookies["openmaas_session"]
    page = http.get("/console").text
    assert 'action="/console/switch"' in page and f"{first['name']} (admin)" in page
    r = http.post("/console/switch", data={"org": second["name"]})
    assert r.status_code == 303
    assert http.cookies["openmaas_session"] != old
    assert f"{second['name']} (viewer)" in http.get("/console").text
    assert http.get("/console/keys").status_code == 403  # a viewer does not manage keys
    r = http.post("/console/switch", data={"org": "not-mine"})
    assert r.status_code == 404
    stale = httpx.Client(base_url=server.url, cookies={"openmaas_session": old})
    assert stale.get("/console").status_code == 303  # the first session ended with the switch
    stale.close()
    http.close()


def test_the_catalogue_lists_fifty_models_a_page_and_the_api_pages_with_a_total(
    server: ServerProcess, admin: httpx.Client, onnx_file: Path
) -> None:
    carol = new_member(server, admin, "carol")
    created = admin.post(f"/api/orgs/{carol.org['name']}/keys", json={"name": "k", "scopes": ["manage"]})
    prefix = unique("pager")
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {created.json()['key']}"},
                      timeout=60) as c:  # fmt: skip
        for i in range(53):
            card = {"task": f"{prefix}-task"} if i < 2 else None
            assert register_model(c, onnx_file, f"{prefix}-{i:02d}", card=card).status_code == 201
        names = [f"{carol.org['name']}/{prefix}-{i:02d}" for i in range(53)]
        got = c.get("/api/models", params={"q": prefix, "limit": 20, "offset": 40, "include": "card", "facets": "task"})
        body = got.json()
        assert (body["total"], body["offset"], body["limit"]) == (53, 40, 20)
        assert [m["name"] for m in body["models"]] == names[40:]  # by name, the rest of the list
        assert f"{prefix}-task" in body["facets"]["task"]  # facets see every model, not the page
        assert len(c.get("/api/models", params={"q": prefix}).json()["models"]) == 53  # no limit: every model
        for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}, {"facets": "colour"}):
            assert c.get("/api/models", params=bad).status_code == 400, bad  # the error catalogue's invalid_request

    try:
        first = carol.http.get("/console/models", params={"q": prefix}).text
        assert "1\u201350 of 53 models" in first and "Page 1 of 2" in first
        assert names[49] in first and names[50] not in first
        assert 'rel="next"' in first and 'rel="prev"' not in first
        second = carol.http.get("/console/models", params={"q": prefix, "page": 2}).text
        assert "51\u201353 of 53 models" in second and names[50] in second and names[0] not in second
        assert 'rel="prev"' in second and 'rel="next"' not in second
        assert f'<option value="{prefix}-task"' in second  # the task menu lists every task, whatever the page
        past = carol.http.get("/console/models", params={"q": prefix, "page": 9})
        assert past.status_code == 200 and "No model on this page: there are 2." in past.text
        assert carol.http.get("/console/models", params={"page": "two"}).status_code == 400
    finally:
        carol.http.close()


def test_an_evaluation_started_from_its_form_runs_and_its_report_shows_on_the_model_page(
    alice: Member, tmp_path: Path
) -> None:
    from openmaas.catalogue.tabular import breast_cancer_split

    _, x_te, _, y_te = breast_cancer_split()
    data = tmp_path / "bc.csv"
    with data.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"f{i}" for i in range(x_te.shape[1])] + ["label"])
        w.writerows([*map(repr, map(float, x)), int(y)] for x, y in zip(x_te, y_te, strict=True))
    r = alice.http.post(
        "/console/datasets", data={"name": "bc-held-out"}, files={"file": ("bc.csv", data.read_bytes())}
    )
    assert r.status_code == 303, r.text
    jobs_page = alice.http.get("/console/jobs").text
    for heading in ("Evaluate a model", "Quantise to int8", "Prune a classifier", "Distil into a smaller model"):
        assert heading in jobs_page
    dataset = jobs_page.split('<select id="ev-data" name="dataset" required><option value="')[1].split('"')[0]
    # A number the form cannot take is named; nothing is started.
    r = alice.http.post("/console/jobs", data={"type": "evaluate", "model": "breast-cancer-logreg", "version": "one",
                                               "dataset": dataset})  # fmt: skip
    assert r.status_code == 400 and "&#39;version&#39; must be a whole number" in r.text
    r = alice.http.post("/console/jobs", data={"type": "evaluate", "model": "breast-cancer-logreg", "version": "",
                                               "dataset": dataset, "task": "", "target": "label"})  # fmt: skip
    assert r.status_code == 303, r.text
    job_url = r.headers["location"]
    deadline = time.monotonic() + 300
    while "succeeded" not in (fragment := alice.http.get(job_url, headers={"HX-Request": "true"}).text):
        assert "failed" not in fragment, alice.http.get(job_url).text[-3000:]
        assert time.monotonic() < deadline, fragment
        time.sleep(0.5)
    model_page = alice.http.get("/console/models/breast-cancer-logreg").text
    assert "accuracy" in model_page and "confusion matrix of report" in model_page
