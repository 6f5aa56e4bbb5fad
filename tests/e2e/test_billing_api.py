"""Billing over HTTP: plans, 402 without credit, a race for the last of a wallet, subscriptions, invoices."""

from __future__ import annotations

import concurrent.futures
import sqlite3
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess, bearer, matmul_chain_model, new_key, new_org, register_model, unique

X = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}


@pytest.fixture(scope="module")
def market(server: ServerProcess, admin: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> dict:
    provider, consumer = new_org(admin, "provider"), new_org(admin, "consumer")
    pkey = new_key(admin, provider["name"], scopes=["inference", "manage", "billing"])["key"]
    ckey = new_key(admin, consumer["name"], scopes=["inference", "billing"])["key"]
    path = tmp_path_factory.mktemp("bill") / "m.onnx"
    matmul_chain_model(path, 4)
    payg, sub = unique("payg-model"), unique("sub-model")
    with httpx.Client(base_url=server.url, headers=bearer(pkey), timeout=60) as p:
        for name in (payg, sub):
            assert register_model(p, path, name).status_code == 201
            assert (
                p.patch(
                    f"/api/models/{name}", json={"visibility": "shared", "shared_with": [consumer["name"]]}
                ).status_code
                == 200
            )
        r = p.post(
            f"/api/models/{payg}/plans",
            json={"name": "per-call", "kind": "usage", "unit": "requests", "price_micros": 1_000_000},
        )
        assert r.status_code == 201, r.text
        r = p.post(
            f"/api/models/{sub}/plans",
            json={
                "name": "pro",
                "kind": "subscription",
                "unit": "items",
                "monthly_fee_micros": 100_000_000,
                "included_units": 500_000,
                "overage_price_micros": 5_000_000,
                "block": 1000,
            },
        )
        assert r.status_code == 201, r.text
        bad = p.post(f"/api/models/{payg}/plans", json={"name": "x", "kind": "usage", "price_micros": -1})
        assert bad.status_code == 400 and bad.json()["param"] == "price_micros"
    return {"provider": provider, "consumer": consumer, "pkey": pkey, "ckey": ckey, "payg": payg, "sub": sub}


def test_pay_as_you_go_race_for_the_last_of_the_wallet(
    server: ServerProcess, admin: httpx.Client, market: dict
) -> None:
    consumer, payg = market["consumer"], market["payg"]
    with httpx.Client(base_url=server.url, headers=bearer(market["ckey"]), timeout=60) as c:
        refused = c.post(f"/v2/models/{payg}/infer", json={"inputs": [X]})
        assert refused.status_code == 402, refused.text
        assert "add credit" in refused.json()["error"]
        assert f"/api/orgs/{consumer['name']}/wallet/credits" in refused.json()["error"]  # not a literal {org}
        openai = c.post("/v1/embeddings", json={"model": payg, "input": "x"})
        assert openai.status_code in (400, 402)
        # Exactly the price of 100 calls: a whole-micro price is held exactly, so exactly 100 calls are served.
        credit = {"amount_micros": 100 * 1_000_000, "reference": unique("topup")}
        assert admin.post(f"/api/orgs/{consumer['name']}/wallet/credits", json=credit).status_code == 201
        assert admin.post(f"/api/orgs/{consumer['name']}/wallet/credits", json=credit).status_code == 200  # once
        assert (
            c.post(f"/api/orgs/{consumer['name']}/wallet/credits", json={**credit, "reference": "mine"}).status_code
            == 403
        )

        def call(_: int) -> int:
            return c.post(f"/v2/models/{payg}/infer", json={"inputs": [X]}).status_code

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(call, range(200)))
        assert set(statuses) <= {200, 402}
        assert statuses.count(200) == 100, statuses.count(200)
        wallet = c.get(f"/api/orgs/{consumer['name']}/wallet").json()
        assert wallet["held_micros"] == 0 and wallet["available_micros"] == 0
        assert wallet["balance_micros"] == 0 and wallet["currency"] == "CNY"
        # The boundary: a wallet holding exactly one call's price serves that call, and then no more.
        one = {"amount_micros": 1_000_000, "reference": unique("topup")}
        assert admin.post(f"/api/orgs/{consumer['name']}/wallet/credits", json=one).status_code == 201
        assert c.get(f"/api/orgs/{consumer['name']}/wallet").json()["available_micros"] == 1_000_000
        assert c.post(f"/v2/models/{payg}/infer", json={"inputs": [X]}).status_code == 200
        assert c.post(f"/v2/models/{payg}/infer", json={"inputs": [X]}).status_code == 402
        assert c.get(f"/api/orgs/{consumer['name']}/wallet").json()["balance_micros"] == 0
    verdict = admin.get("/api/billing/verify").json()
    assert verdict["ok"], verdict["problems"]
    usage = admin.get("/api/usage", params={"org": consumer["name"], "group_by": "model"}).json()["data"]
    full = f"{market['provider']['name']}/{payg}"
    assert [(u["model"], u["requests"]) for u in usage if u["model"] == full] == [(full, 101)]


def test_dedicated_capacity(server: ServerProcess, market: dict) -> None:
    consumer, payg = market["consumer"], market["payg"]
    with httpx.Client(base_url=server.url, headers=bearer(market["pkey"]), timeout=60) as p:
        r = p.post(
            f"/api/models/{payg}/plans", json={"name": "gpu", "kind": "dedicated", "hourly_price_micros": 1_000_000}
        )
        assert r.status_code == 201, r.text
    with httpx.Client(base_url=server.url, headers=bearer(market["ckey"]), timeout=60) as c:
        wallet = c.get(f"/api/orgs/{consumer['name']}/wallet").json()
        started = c.post(f"/api/orgs/{consumer['name']}/dedicated", json={"model": payg, "plan": "gpu"})
        assert started.status_code == 201, started.text
        assert c.post(f"/api/orgs/{consumer['name']}/dedicated", json={"model": payg, "plan": "gpu"}).status_code == 409
        states = {e["name"]: e["state"] for e in c.post("/v2/repository/index").json()}
        assert states[f"{market['provider']['name']}/{payg}"] == "READY"
        for _ in range(3):
            assert c.post(f"/v2/models/{payg}/infer", json={"inputs": [X]}).status_code == 200
        assert c.get(f"/api/orgs/{consumer['name']}/wallet").json() == wallet  # calls ride on the reservation
        stopped = c.delete(f"/api/orgs/{consumer['name']}/dedicated/{started.json()['id']}")
        assert stopped.status_code == 200 and stopped.json()["stopped_at"] is not None


def test_subscription_required_then_subscribed(server: ServerProcess, market: dict) -> None:
    consumer, sub = market["consumer"], market["sub"]
    with httpx.Client(base_url=server.url, headers=bearer(market["ckey"]), timeout=60) as c:
        refused = c.post(f"/v2/models/{sub}/infer", json={"inputs": [X]})
        assert refused.status_code == 402 and "subscribe" in refused.json()["error"]
        assert f"/api/orgs/{consumer['name']}/subscriptions" in refused.json()["error"]
        plans = c.get(f"/api/models/{sub}/plans").json()["plans"]
        assert [p["name"] for p in plans] == ["pro"]
        r = c.post(f"/api/orgs/{consumer['name']}/subscriptions", json={"model": sub, "plan": "pro"})
        assert r.status_code == 201, r.text
        again = c.post(f"/api/orgs/{consumer['name']}/subscriptions", json={"model": sub, "plan": "pro"})
        assert again.status_code == 409
        assert c.post(f"/v2/models/{sub}/infer", json={"inputs": [X]}).status_code == 200
        cancelled = c.delete(f"/api/orgs/{consumer['name']}/subscriptions/{r.json()['id']}").json()
        assert cancelled["ends_at"] > datetime.now(UTC).isoformat()  # runs to the end of the period
        assert c.post(f"/v2/models/{sub}/infer", json={"inputs": [X]}).status_code == 200
    with httpx.Client(base_url=server.url, headers=bearer(market["pkey"]), timeout=60) as p:
        assert p.post(f"/v2/models/{sub}/infer", json={"inputs": [X]}).status_code == 200  # own model: free


def test_invoice_as_json_csv_and_html(server: ServerProcess, admin: httpx.Client, market: dict) -> None:
    consumer, provider = market["consumer"], market["provider"]
    plan_id = admin.get(f"/api/models/{market['sub']}/plans").json()["plans"][0]["id"]
    # A subscription that ran through a past month (the server's own database, as an operator's import would).
    with sqlite3.connect(Path(server.data_dir) / "openmaas.db") as db:
        db.execute(
            "INSERT INTO subscriptions (id, org_id, plan_id, model, started_at, ends_at) VALUES (?, ?, ?, ?, ?, ?)",
            (
                uuid.uuid4().hex,
                consumer["id"],
                plan_id,
                market["sub"],
                "2026-09-01 00:00:00.000000",
                "2026-10-01 00:00:00.000000",
            ),
        )
    closed = admin.post("/api/billing/periods/2026-09/close")
    assert closed.status_code == 200, closed.text
    assert admin.post("/api/billing/periods/2026-09/close").json() == closed.json()
    assert admin.post("/api/billing/periods/2026-13/close").status_code == 400
    with httpx.Client(base_url=server.url, headers=bearer(market["ckey"]), timeout=60) as c:
        [invoice] = c.get(f"/api/orgs/{consumer['name']}/invoices").json()["invoices"]
        assert invoice["total_micros"] == 100_000_000 and invoice["due_micros"] == 100_000_000
        got = c.get(f"/api/invoices/{invoice['id']}")
        assert got.json() == invoice
        csv_text = c.get(f"/api/invoices/{invoice['id']}", params={"format": "csv"}).text
        assert "100.000000" in csv_text and csv_text.splitlines()[0].startswith("line,kind")
        page = c.get(f"/api/invoices/{invoice['id']}", headers={"Accept": "text/html"})
        assert page.headers["content-type"].startswith("text/html") and consumer["name"] in page.text
        records = c.get(f"/api/invoices/{invoice['id']}/lines/2/records").json()
        assert records["records"] == []
        assert c.get(f"/api/invoices/{invoice['id']}/lines/9/records").status_code == 404
    with httpx.Client(base_url=server.url, headers=bearer(market["pkey"]), timeout=60) as p:
        assert p.get(f"/api/invoices/{invoice['id']}").status_code == 404  # another org's invoice
        statement = p.get(f"/api/orgs/{provider['name']}/statements/2026-09").json()
        assert statement["gross_micros"] == 100_000_000 and statement["commission_micros"] == 20_000_000
        assert statement["net_micros"] == 80_000_000


def test_billing_cli(server: ServerProcess, admin_key: str, market: dict) -> None:
    import os
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "openmaas", "billing", *args, "--url", server.url, "--api-key", admin_key],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "COLUMNS": "200"},
        )

    org = market["consumer"]["name"]
    before = httpx.get(f"{server.url}/api/orgs/{org}/wallet", headers=bearer(admin_key)).json()["available_micros"]
    ref = unique("cli")
    out = cli("credit", org, "12.5", "--reference", ref)
    assert out.returncode == 0, out.stderr
    assert "(this reference" not in out.stdout
    assert "already credited" in cli("credit", org, "12.5", "--reference", ref).stdout
    assert cli("credit", org, "0.0000001", "--reference", "x").returncode == 1  # sub-micro amounts are refused
    after = httpx.get(f"{server.url}/api/orgs/{org}/wallet", headers=bearer(admin_key)).json()["available_micros"]
    assert after - before == 12_500_000
    assert "available" in cli("wallet", org).stdout
    verified = cli("verify")
    assert verified.returncode == 0 and "every invariant holds" in verified.stdout, verified.stdout + verified.stderr
    closed = cli("close", "2026-09")
    assert closed.returncode == 0 and "100.000000" in closed.stdout, closed.stdout + closed.stderr
    assert "2026-09" in cli("invoices", org).stdout
