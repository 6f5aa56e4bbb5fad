"""Offline batch and money, on a server of its own: the batch discount on the invoice, cancel and expiry charge
completed lines only, and a SIGKILL mid-batch resumes with every line exactly once in output, usage and wallet."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import ADMIN_KEY
from tests.e2e.batch_helpers import by_custom_id, line, results, submit, wait
from tests.helpers import ServerProcess, bearer, matmul_chain_model, new_key, new_org, register_model

PRICE = 1_000  # micros a request online; a batch line pays half
CREDIT = 100_000_000


def _x(i: int) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [i, 1, 2, 3]}]}


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("batch-billing")
    server = ServerProcess(
        root / "data",
        env={
            "OPENMAAS_ADMIN_KEY": ADMIN_KEY,
            "OPENMAAS_BUNDLED_MODELS": "0",
            "OPENMAAS_BATCH_LEASE_S": "1",
            "OPENMAAS_FILES_QUOTA_BYTES": str(64 * 1024 * 1024),
        },
    )
    server.start()
    try:
        with httpx.Client(base_url=server.url, headers=bearer(ADMIN_KEY), timeout=60) as admin:
            provider, consumer = new_org(admin, "maker"), new_org(admin, "bulk")
            pkey = new_key(admin, provider["name"], scopes=["inference", "manage", "billing"])["key"]
            ckey = new_key(admin, consumer["name"], scopes=["inference", "billing"])["key"]
            path = root / "m.onnx"
            matmul_chain_model(path, 4)
            with httpx.Client(base_url=server.url, headers=bearer(pkey), timeout=60) as p:
                assert register_model(p, path, "scaler").status_code == 201
                r = p.patch("/api/models/scaler", json={"visibility": "shared", "shared_with": [consumer["name"]]})
                assert r.status_code == 200, r.text
                r = p.post(
                    "/api/models/scaler/plans",
                    json={"name": "per-call", "kind": "usage", "unit": "requests", "price_micros": PRICE},
                )
                assert r.status_code == 201, r.text
                assert r.json()["batch_discount_pct"] == 50
            credit = {"amount_micros": CREDIT, "reference": "bulk-topup"}
            assert admin.post(f"/api/orgs/{consumer['name']}/wallet/credits", json=credit).status_code == 201
        model = f"{provider['name']}/scaler"
        yield {"server": server, "consumer": consumer, "key": ckey, "model": model, "url": f"/v2/models/{model}/infer"}
    finally:
        server.stop()


@pytest.fixture
def client(shop: dict[str, Any]) -> Iterator[OpenAI]:
    with OpenAI(base_url=shop["server"].url + "/v1", api_key=shop["key"], max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
def books(shop: dict[str, Any]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=shop["server"].url, headers=bearer(shop["key"]), timeout=60) as c:
        yield c


def _wallet(books: httpx.Client, shop: dict[str, Any]) -> dict[str, int]:
    return dict(books.get(f"/api/orgs/{shop['consumer']['name']}/wallet").json())


def _lines(shop: dict[str, Any], n: int, prefix: str) -> list[dict[str, Any]]:
    return [line(f"{prefix}{i}", shop["url"], _x(i)) for i in range(n)]


def _when(client: OpenAI, batch_id: str, completed: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        b = client.batches.retrieve(batch_id)
        assert b.status in ("validating", "in_progress"), b
        if b.request_counts is not None and b.request_counts.completed >= completed:
            return
        time.sleep(0.05)
    raise AssertionError("the batch made no progress")


def test_files_count_against_the_organisations_storage_quota(shop: dict[str, Any], client: OpenAI) -> None:
    big = b"x" * (30 * 1024 * 1024)
    first = client.files.create(file=("a.jsonl", big), purpose="batch")
    second = client.files.create(file=("b.jsonl", big + b"y"), purpose="batch")
    with pytest.raises(openai.APIStatusError) as refused:
        client.files.create(file=("c.jsonl", big + b"z"), purpose="batch")
    assert refused.value.status_code == 413
    assert "quota" in refused.value.message
    client.files.delete(first.id)
    third = client.files.create(file=("c.jsonl", big + b"z"), purpose="batch")
    for f in (second, third):
        client.files.delete(f.id)


def test_batch_lines_are_billed_at_the_discount_on_their_own_invoice_line(
    shop: dict[str, Any], client: OpenAI, books: httpx.Client
) -> None:
    before = _wallet(books, shop)
    for i in range(4):
        assert books.post(shop["url"], json=_x(i)).status_code == 200
    done = wait(client, submit(client, _lines(shop, 10, "d"), shop["url"]).id)
    assert done.status == "completed" and done.request_counts is not None and done.request_counts.completed == 10
    after = _wallet(books, shop)
    assert before["balance_micros"] - after["balance_micros"] == 4 * PRICE + 10 * PRICE // 2
    assert after["held_micros"] == 0
    draft = books.get(f"/api/orgs/{shop['consumer']['name']}/invoices/draft").json()
    usage = {line["channel"]: line for line in draft["lines"] if line["kind"] == "usage"}
    assert usage["batch"]["quantity"] >= 10 and "50% off" in usage["batch"]["description"]
    assert usage["batch"]["amount_micros"] == usage["batch"]["quantity"] * PRICE // 2
    assert usage["online"]["amount_micros"] == usage["online"]["quantity"] * PRICE
    # The batch's outputs are the online answers.
    online = books.post(shop["url"], json=_x(3)).json()
    assert by_custom_id(client, done)["d3"]["response"]["body"]["outputs"] == online["outputs"]
    assert books.get("/api/billing/verify", headers=bearer(ADMIN_KEY)).json()["ok"]
    with pytest.raises(openai.ConflictError):  # a completed batch stays as it is
        client.batches.cancel(done.id)


def test_cancel_mid_batch_keeps_and_charges_the_completed_lines_only(
    shop: dict[str, Any], client: OpenAI, books: httpx.Client
) -> None:
    before = _wallet(books, shop)
    batch = submit(client, _lines(shop, 20_000, "c"), shop["url"])
    _when(client, batch.id, 50)
    client.batches.cancel(batch.id)
    done = wait(client, batch.id)
    assert done.status == "cancelled" and done.cancelling_at and done.cancelled_at
    counts = done.request_counts
    assert counts is not None and 50 <= counts.completed < 20_000 and counts.failed == 0
    output = results(client, done.output_file_id)
    assert len(output) == counts.completed == len({o["custom_id"] for o in output})
    after = _wallet(books, shop)
    assert before["balance_micros"] - after["balance_micros"] == counts.completed * PRICE // 2
    assert after["held_micros"] == 0
    assert client.batches.cancel(batch.id).status == "cancelled"  # asking again changes nothing


def test_an_expired_batch_keeps_what_completed_and_reports_the_rest(
    shop: dict[str, Any], client: OpenAI, books: httpx.Client
) -> None:
    before = _wallet(books, shop)
    done = wait(client, submit(client, _lines(shop, 20_000, "e"), shop["url"], window="2s").id)
    assert done.status == "expired" and done.expired_at is not None, done
    counts = done.request_counts
    assert counts is not None and 0 < counts.completed < 20_000 and counts.completed + counts.failed == 20_000
    errors = results(client, done.error_file_id)
    assert len(errors) == counts.failed and {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert all(e["response"] is None for e in errors)
    after = _wallet(books, shop)
    assert before["balance_micros"] - after["balance_micros"] == counts.completed * PRICE // 2
    assert after["held_micros"] == 0


def test_sigkill_mid_batch_resumes_with_every_line_exactly_once(
    shop: dict[str, Any], client: OpenAI, books: httpx.Client
) -> None:
    server: ServerProcess = shop["server"]
    before = _wallet(books, shop)
    usage_before = books.get("/api/usage", params={"group_by": "protocol"}).json()["data"]
    batch_before = next((u["requests"] for u in usage_before if u["protocol"] == "batch"), 0)
    n = 4_000
    batch = submit(client, _lines(shop, n, "k"), shop["url"])
    _when(client, batch.id, 500)
    server.kill()
    server.start()
    done = wait(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts is not None and done.request_counts.completed == n
    output = results(client, done.output_file_id)
    assert sorted(o["custom_id"] for o in output) == sorted(f"k{i}" for i in range(n))
    after = _wallet(books, shop)
    assert before["balance_micros"] - after["balance_micros"] == n * PRICE // 2
    assert after["held_micros"] == 0
    usage = books.get("/api/usage", params={"group_by": "protocol"}).json()["data"]
    assert next(u["requests"] for u in usage if u["protocol"] == "batch") - batch_before == n
    verified = books.get("/api/billing/verify", headers=bearer(ADMIN_KEY)).json()
    assert verified["ok"], verified
