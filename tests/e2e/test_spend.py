"""Spend a consumer can see before the month closes: cost in usage, wallet movements, a draft invoice with
organisation names, unit prices and tiers."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess, bearer, matmul_chain_model, new_key, new_org, register_model, unique

X = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}


@pytest.fixture(scope="module")
def shop(server: ServerProcess, admin: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> dict:
    provider, consumer = new_org(admin, "seller"), new_org(admin, "buyer")
    pkey = new_key(admin, provider["name"], scopes=["inference", "manage", "billing"])["key"]
    ckey = new_key(admin, consumer["name"], scopes=["inference", "billing"])
    path = tmp_path_factory.mktemp("spend") / "m.onnx"
    matmul_chain_model(path, 4)
    tiered, monthly = unique("tiered"), unique("monthly")
    with httpx.Client(base_url=server.url, headers=bearer(pkey), timeout=60) as p:
        for name in (tiered, monthly):
            assert register_model(p, path, name).status_code == 201
            r = p.patch(f"/api/models/{name}", json={"visibility": "shared", "shared_with": [consumer["name"]]})
            assert r.status_code == 200, r.text
        tiers = [{"up_to": 3, "price_micros": 2_000_000}, {"up_to": None, "price_micros": 500_000}]
        r = p.post(
            f"/api/models/{tiered}/plans",
            json={"name": "graduated", "kind": "usage", "unit": "requests", "tiers": tiers},
        )
        assert r.status_code == 201, r.text
        r = p.post(
            f"/api/models/{monthly}/plans",
            json={
                "name": "basic",
                "kind": "subscription",
                "unit": "requests",
                "monthly_fee_micros": 30_000_000,
                "included_units": 1,
                "overage_price_micros": 1_000_000,
            },
        )
        assert r.status_code == 201, r.text
    credit = {"amount_micros": 50_000_000, "reference": unique("topup")}
    assert admin.post(f"/api/orgs/{consumer['name']}/wallet/credits", json=credit).status_code == 201
    with httpx.Client(base_url=server.url, headers=bearer(ckey["key"]), timeout=60) as c:
        for _ in range(5):  # 3 x 2.00 in the first tier, then 2 x 0.50
            assert c.post(f"/v2/models/{tiered}/infer", json={"inputs": [X]}).status_code == 200
        r = c.post(f"/api/orgs/{consumer['name']}/subscriptions", json={"model": monthly, "plan": "basic"})
        assert r.status_code == 201, r.text
        for _ in range(3):  # 1 included, 2 over
            assert c.post(f"/v2/models/{monthly}/infer", json={"inputs": [X]}).status_code == 200
    return {
        "provider": provider,
        "consumer": consumer,
        "ckey": ckey,
        "tiered": f"{provider['name']}/{tiered}",
        "monthly": f"{provider['name']}/{monthly}",
        "credit": credit,
    }


def test_usage_shows_what_calls_cost_per_model_key_and_day(server: ServerProcess, shop: dict) -> None:
    with httpx.Client(base_url=server.url, headers=bearer(shop["ckey"]["key"]), timeout=60) as c:
        r = c.get("/api/usage", params={"group_by": "model,key,day"})
        assert r.status_code == 200, r.text
        body = r.json()
        rows = {row["model"]: row for row in body["data"]}
        today = datetime.now(UTC).date().isoformat()
        assert rows[shop["tiered"]]["cost_micros"] == 7_000_000  # 3 x 2.00 + 2 x 0.50
        assert rows[shop["tiered"]]["key"] == shop["ckey"]["id"] and rows[shop["tiered"]]["day"] == today
        assert rows[shop["monthly"]]["cost_micros"] == 0  # a subscription's calls are billed on the invoice
        assert body["totals"]["cost_micros"] == 7_000_000 and body["currency"]
        by_unit = c.get("/api/usage", params={"group_by": "model,unit"}).json()["data"]
        assert {(x["model"], x["unit"]): x["cost_micros"] for x in by_unit}[(shop["tiered"], "requests")] == 7_000_000


def test_wallet_movements_list_credits_and_charges_with_the_balance_after_each(
    server: ServerProcess, shop: dict
) -> None:
    org = shop["consumer"]["name"]
    with httpx.Client(base_url=server.url, headers=bearer(shop["ckey"]["key"]), timeout=60) as c:
        result = c.get(f"/api/orgs/{org}/wallet/movements").json()
        moves = result["movements"]
        assert [m["kind"] for m in moves] == ["charge"] * 5 + ["credit"]
        assert sorted(m["amount_micros"] for m in moves[:5]) == [-2_000_000] * 3 + [-500_000] * 2
        assert moves[-1]["amount_micros"] == 50_000_000 and moves[-1]["reference"] == shop["credit"]["reference"]
        assert moves[-1]["balance_after_micros"] == 50_000_000
        assert (
            moves[0]["balance_after_micros"] == 43_000_000 == c.get(f"/api/orgs/{org}/wallet").json()["balance_micros"]
        )
        assert all(m["model"] == shop["tiered"] for m in moves[:5])
        # Paging back in time keeps the running balance right.
        page = c.get(f"/api/orgs/{org}/wallet/movements", params={"limit": 2}).json()
        assert page["movements"] == moves[:2] and page["next_before"]
        older = c.get(f"/api/orgs/{org}/wallet/movements", params={"limit": 10, "before": page["next_before"]}).json()[
            "movements"
        ]
        assert older[-1] == moves[-1] and older[0]["balance_after_micros"] == moves[2]["balance_after_micros"]
        bad = c.get(f"/api/orgs/{org}/wallet/movements", params={"before": "yesterday"})
        assert bad.status_code == 400 and bad.json()["param"] == "before"


def test_draft_invoice_for_the_open_month_with_names_prices_and_tiers(
    server: ServerProcess, admin: httpx.Client, shop: dict
) -> None:
    org = shop["consumer"]["name"]
    with httpx.Client(base_url=server.url, headers=bearer(shop["ckey"]["key"]), timeout=60) as c:
        r = c.get(f"/api/orgs/{org}/invoices/draft")
        assert r.status_code == 200, r.text
        inv = r.json()
        assert inv["draft"] is True and inv["period"] == datetime.now(UTC).strftime("%Y-%m")
        assert inv["org_name"] == org
        lines = {(line["kind"], line["model"]): line for line in inv["lines"]}
        usage = lines[("usage", shop["tiered"])]
        assert usage["amount_micros"] == 7_000_000 and usage["quantity"] == 5 and usage["prepaid"] is True
        assert usage["provider"] == shop["provider"]["name"]
        assert usage["pricing"]["tiers"][0] == {"up_to": 3, "price_micros": 2_000_000}
        assert "0-3: 2.000000" in usage["pricing"]["text"] and "over 3: 0.500000" in usage["pricing"]["text"]
        fee = lines[("subscription", shop["monthly"])]
        assert fee["pricing"]["monthly_fee_micros"] == 30_000_000 and fee["quantity"] == 1  # one day so far
        overage = lines[("overage", shop["monthly"])]
        assert overage["quantity"] == 2 and overage["amount_micros"] == 2_000_000
        assert "1 requests included, then 1.000000" in overage["pricing"]["text"]
        assert inv["total_micros"] == sum(line["amount_micros"] for line in inv["lines"])
        assert inv["due_micros"] == inv["total_micros"] - 7_000_000
        # Readable forms too; another org cannot see this one's draft.
        html = c.get(f"/api/orgs/{org}/invoices/draft", params={"format": "html"}).text
        assert "Draft invoice" in html and org in html and shop["provider"]["name"] in html
        rows = list(csv.reader(io.StringIO(c.get(f"/api/orgs/{org}/invoices/draft?format=csv").text)))
        assert rows[0][:6] == ["line", "kind", "description", "model", "provider", "plan"]
        other = new_org(admin, "nosy")
        okey = new_key(admin, other["name"], scopes=["inference", "billing"])["key"]
        with httpx.Client(base_url=server.url, headers=bearer(okey), timeout=60) as o:
            assert o.get(f"/api/orgs/{org}/invoices/draft").status_code == 404


def test_cli_shows_cost_movements_and_the_draft(server: ServerProcess, shop: dict, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OPENMAAS_URL": server.url,
        "OPENMAAS_API_KEY": shop["ckey"]["key"],
        "NO_COLOR": "1",
        "COLUMNS": "250",
    }
    org = shop["consumer"]["name"]

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "openmaas", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    usage = cli("usage", "--group-by", "model")
    assert "cost" in usage and "7.000000" in usage
    moves = cli("billing", "movements", org)
    assert shop["credit"]["reference"] in moves and "-2.000000" in moves and "43.000000" in moves
    draft = cli("billing", "draft", org)
    assert "Draft invoice" in draft and shop["provider"]["name"] in draft and "30.000000" in draft
