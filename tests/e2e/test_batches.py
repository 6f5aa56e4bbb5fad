"""Offline batch through the official openai SDK on the shared server: outputs equal the online results, errors
per line, validation like OpenAI's, isolation, and an online call while a batch runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI

from tests.e2e.batch_helpers import by_custom_id, jsonl, line, submit, wait
from tests.e2e.test_generation import wait_until_ready
from tests.helpers import ServerProcess, bearer, new_key, new_org

EMBED = "all-minilm-l6-v2"
LLM = "gemma-3-270m"


@pytest.fixture(scope="module")
def tenant(server: ServerProcess, admin: httpx.Client) -> dict[str, Any]:
    org = new_org(admin, "batcher")
    return {"org": org, "key": new_key(admin, org["name"], scopes=["inference"])["key"]}


@pytest.fixture(scope="module")
def client(server: ServerProcess, tenant: dict[str, Any]) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.url + "/v1", api_key=tenant["key"], max_retries=0, timeout=120) as c:
        yield c


def test_embedding_batch_equals_the_online_results_with_errors_per_line(
    server: ServerProcess, client: OpenAI, tenant: dict[str, Any]
) -> None:
    sentences = [f"Sentence {i}: the quick brown fox jumps over {i} lazy dogs." for i in range(40)]
    lines = [line(f"s{i}", "/v1/embeddings", {"model": EMBED, "input": s}) for i, s in enumerate(sentences)]
    lines.append(line("empty", "/v1/embeddings", {"model": EMBED, "input": ""}))
    lines.append(line("dims", "/v1/embeddings", {"model": EMBED, "input": "x", "dimensions": 7}))
    batch = submit(client, lines, "/v1/embeddings")
    assert batch.status == "validating" and batch.endpoint == "/v1/embeddings"
    done = wait(client, batch.id)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (42, 40, 2)
    assert done.model == EMBED and done.in_progress_at and done.finalizing_at and done.completed_at
    got = by_custom_id(client, done)
    assert len(got) == 42
    online = client.embeddings.create(model=EMBED, input=sentences)
    for i, item in enumerate(online.data):
        answer = got[f"s{i}"]
        assert answer["error"] is None and answer["response"]["status_code"] == 200
        assert answer["response"]["request_id"] == f"{done.id}-{i + 1}"
        vector = answer["response"]["body"]["data"][0]["embedding"]
        np.testing.assert_allclose(vector, item.embedding, atol=1e-5)
    assert done.usage is not None and done.usage.input_tokens == sum(
        got[f"s{i}"]["response"]["body"]["usage"]["prompt_tokens"] for i in range(40)
    )
    # A line the model refuses carries the status and the body the online call gives.
    with httpx.Client(base_url=server.url, headers=bearer(tenant["key"])) as h:
        for custom_id, body in (("empty", lines[40]["body"]), ("dims", lines[41]["body"])):
            online_error = h.post("/v1/embeddings", json=body)
            assert got[custom_id]["response"]["status_code"] == online_error.status_code == 400
            assert got[custom_id]["response"]["body"] == online_error.json()
    # Each line is metered once, as protocol batch.
    assert done.output_file_id is not None and done.error_file_id is not None
    output = client.files.retrieve(done.output_file_id)
    assert output.purpose == "batch_output" and output.bytes > 0


def test_completion_and_chat_batches_equal_the_online_answers(
    server: ServerProcess, client: OpenAI, admin_key: str
) -> None:
    wait_until_ready(server, admin_key, LLM)
    prompts = ["The capital of France is", "One, two, three,", "Water boils at"]
    completions = [
        line(f"c{i}", "/v1/completions", {"model": LLM, "prompt": p, "max_tokens": 8, "temperature": 0})
        for i, p in enumerate(prompts)
    ]
    chats = [
        line(
            f"m{i}",
            "/v1/chat/completions",
            {"model": LLM, "messages": [{"role": "user", "content": p}], "max_tokens": 8, "temperature": 0},
        )
        for i, p in enumerate(prompts)
    ]
    first = submit(client, completions, "/v1/completions")
    second = submit(client, chats, "/v1/chat/completions")
    done = wait(client, first.id)
    chat_done = wait(client, second.id)
    assert done.status == chat_done.status == "completed", (done, chat_done)
    got, chat_got = by_custom_id(client, done), by_custom_id(client, chat_done)
    for i, p in enumerate(prompts):
        online = client.completions.create(model=LLM, prompt=p, max_tokens=8, temperature=0)
        body = got[f"c{i}"]["response"]["body"]
        assert body["choices"][0]["text"] == online.choices[0].text
        assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] > 0
        chat = client.chat.completions.create(
            model=LLM, messages=[{"role": "user", "content": p}], max_tokens=8, temperature=0
        )
        chat_body = chat_got[f"m{i}"]["response"]["body"]
        assert chat_body["choices"][0]["message"]["content"] == chat.choices[0].message.content
    assert done.usage is not None and done.usage.output_tokens == sum(
        got[f"c{i}"]["response"]["body"]["usage"]["completion_tokens"] for i in range(3)
    )


def test_v2_infer_batch_equals_the_online_call(server: ServerProcess, client: OpenAI, tenant: dict[str, Any]) -> None:
    url = "/v2/models/digits-cnn/infer"
    rng = np.random.default_rng(0)
    bodies = [
        {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": rng.random(64).tolist()}]}
        for _ in range(6)
    ]
    with httpx.Client(base_url=server.url, headers=bearer(tenant["key"])) as h:
        meta = h.get("/v2/models/digits-cnn").json()
        name = meta["inputs"][0]["name"]
        for b in bodies:
            b["inputs"][0]["name"] = name
        done = wait(client, submit(client, [line(f"d{i}", url, b) for i, b in enumerate(bodies)], url).id)
        assert done.status == "completed", done
        got = by_custom_id(client, done)
        for i, b in enumerate(bodies):
            online = h.post(url, json=b).json()
            answer = got[f"d{i}"]["response"]["body"]
            assert answer["outputs"][0]["name"] == online["outputs"][0]["name"]
            np.testing.assert_allclose(answer["outputs"][0]["data"], online["outputs"][0]["data"], rtol=1e-5)


@pytest.mark.parametrize(
    ("case", "code", "bad_line"),
    [
        ("malformed", "invalid_json_line", 2),
        ("duplicate", "duplicate_custom_id", 3),
        ("other_url", "mismatched_endpoint", 2),
        ("two_models", "mismatched_model", 3),
        ("too_many", "too_many_requests", None),
        ("unknown_model", "model_not_found", None),
    ],
)
def test_a_file_that_cannot_run_fails_the_batch_with_the_line(
    client: OpenAI, case: str, code: str, bad_line: int | None
) -> None:
    good = [line(f"g{i}", "/v1/embeddings", {"model": EMBED, "input": f"text {i}"}) for i in range(3)]
    data: bytes
    if case == "malformed":
        data = jsonl(good[:1]) + b'{"custom_id": "x", "method": \n' + jsonl(good[1:])
    elif case == "duplicate":
        data = jsonl([*good[:2], line("g0", "/v1/embeddings", {"model": EMBED, "input": "again"})])
    elif case == "other_url":
        data = jsonl([good[0], line("o", "/v1/completions", {"model": EMBED, "prompt": "x"}), good[1]])
    elif case == "two_models":
        data = jsonl([*good[:2], line("t", "/v1/embeddings", {"model": "other-model", "input": "x"})])
    elif case == "too_many":
        data = jsonl([line(f"n{i}", "/v1/embeddings", {"model": EMBED, "input": "x"}) for i in range(50_001)])
    else:
        data = jsonl([line("u", "/v1/embeddings", {"model": "no-such-model", "input": "x"})])
    uploaded = client.files.create(file=("bad.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    failed = wait(client, batch.id)
    assert failed.status == "failed" and failed.failed_at is not None, failed
    assert failed.errors is not None and failed.errors.data
    first = failed.errors.data[0]
    assert first.code == code and first.message, failed.errors
    assert first.line == bad_line
    # Nothing ran: no lines counted, no output.
    assert failed.request_counts is not None and failed.request_counts.completed == 0
    assert failed.output_file_id is None and failed.error_file_id is None


def test_bad_requests_are_refused_at_once(client: OpenAI) -> None:
    uploaded = client.files.create(
        file=("in.jsonl", jsonl([line("a", "/v1/embeddings", {"model": EMBED, "input": "x"})])), purpose="batch"
    )
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-doesnotexist", endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/moderations", completion_window="24h")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="3d")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("in.jsonl", b"{}"), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-doesnotexist")


def test_files_are_listed_in_pages_and_deleted(client: OpenAI) -> None:
    ids = [client.files.create(file=(f"f{i}.jsonl", b'{"a": 1}\n'), purpose="batch").id for i in range(3)]
    page = client.files.list(limit=2)
    assert [f.id for f in page.data] == ids[::-1][:2] and page.has_more
    rest = client.files.list(limit=2, after=page.data[-1].id)
    assert rest.data[0].id == ids[0]
    assert {f.id for f in client.files.list()} >= set(ids)  # the SDK's auto-paging reaches them all
    deleted = client.files.delete(ids[1])
    assert deleted.deleted and deleted.id == ids[1]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(ids[1])
    with pytest.raises(openai.NotFoundError):
        client.files.content(ids[1])
    assert client.files.content(ids[0]).text == '{"a": 1}\n'


def test_another_organisations_files_and_batches_are_404(
    server: ServerProcess, admin: httpx.Client, client: OpenAI
) -> None:
    done = wait(
        client, submit(client, [line("a", "/v1/embeddings", {"model": EMBED, "input": "x"})], "/v1/embeddings").id
    )
    stranger_org = new_org(admin, "stranger")
    stranger_key = new_key(admin, stranger_org["name"], scopes=["inference"])["key"]
    with OpenAI(base_url=server.url + "/v1", api_key=stranger_key, max_retries=0) as other:
        with pytest.raises(openai.NotFoundError):
            other.batches.retrieve(done.id)
        with pytest.raises(openai.NotFoundError):
            other.batches.cancel(done.id)
        with pytest.raises(openai.NotFoundError):
            other.files.retrieve(done.input_file_id)
        with pytest.raises(openai.NotFoundError):
            other.files.content(done.output_file_id or "")
        with pytest.raises(openai.NotFoundError):
            other.files.delete(done.input_file_id)
        with pytest.raises(openai.NotFoundError):
            other.batches.create(input_file_id=done.input_file_id, endpoint="/v1/embeddings", completion_window="24h")
        assert done.id not in {b.id for b in other.batches.list()}
        assert done.input_file_id not in {f.id for f in other.files.list()}
    assert done.id in {b.id for b in client.batches.list()}


def test_an_online_call_is_served_first_while_a_batch_runs(
    server: ServerProcess, client: OpenAI, admin_key: str
) -> None:
    lines = [
        line(f"b{i}", "/v1/embeddings", {"model": EMBED, "input": f"batch sentence number {i} " * 4})
        for i in range(3000)
    ]
    batch = submit(client, lines, "/v1/embeddings")
    wait(client, batch.id, until=("in_progress", "completed", "failed"))
    while (client.batches.retrieve(batch.id).request_counts or object()).completed < 200:  # type: ignore[attr-defined]
        time.sleep(0.1)
    latencies = []
    for i in range(10):
        started = time.perf_counter()
        client.embeddings.create(model=EMBED, input=f"an online question {i}")
        latencies.append(time.perf_counter() - started)
    running = client.batches.retrieve(batch.id)
    assert running.status == "in_progress", "the batch ended before the online calls were measured"
    with httpx.Client(base_url=server.url, headers=bearer(admin_key)) as h:
        metrics = h.get("/metrics").text
    assert f'openmaas_queue_depth_by_priority{{model="{EMBED}:1",priority="batch"}}' in metrics
    assert f'openmaas_batch_lines_total{{model="{EMBED}",outcome="ok"}}' in metrics
    # Behind the batch's rows an online call waited for a step of 64 of them (about 0.3 s on two cores); taken
    # first, on a copy the batch leaves free, it takes about what it takes on an idle server (10-15 ms).
    assert sorted(latencies)[len(latencies) // 2] < 0.15, latencies
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    final = wait(client, batch.id)
    assert final.status == "cancelled" and final.cancelled_at is not None


def test_cli_creates_a_batch_follows_it_and_downloads_the_results(
    server: ServerProcess, tenant: dict[str, Any], tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "OPENMAAS_URL": server.url,
        "OPENMAAS_API_KEY": tenant["key"],
        "NO_COLOR": "1",
        "COLUMNS": "250",
    }

    def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "openmaas", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert (done.returncode == 0) == ok, done.stdout + done.stderr
        return done

    source = tmp_path / "questions.jsonl"
    source.write_bytes(
        jsonl([line(f"q{i}", "/v1/embeddings", {"model": EMBED, "input": f"question {i}"}) for i in range(25)])
        + jsonl([line("bad", "/v1/embeddings", {"model": EMBED, "input": ""})])
    )
    created = cli("batches", "create", str(source), "--endpoint", "/v1/embeddings")
    assert "completed: 25 of 26 lines answered, 1 failed" in created.stdout, created.stdout
    answers = [json.loads(x) for x in (tmp_path / "questions.output.jsonl").read_text().splitlines()]
    assert sorted(a["custom_id"] for a in answers) == sorted(f"q{i}" for i in range(25))
    errors = (tmp_path / "questions.output.errors.jsonl").read_text()
    assert '"custom_id":"bad"' in errors
    batch_id = created.stdout.split("Batch ")[1].split()[0]
    assert batch_id in cli("batches", "list").stdout
    assert json.loads(cli("batches", "show", batch_id).stdout)["status"] == "completed"
    # A file that cannot run: its problems, with their lines, and exit 1.
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(jsonl([line("a", "/v1/completions", {"model": EMBED, "prompt": "x"})]))
    failed = cli("batches", "create", str(broken), "--endpoint", "/v1/embeddings", ok=False)
    assert "mismatched_endpoint" in failed.stderr and "line 1" in failed.stderr


def test_batch_lines_do_not_use_the_keys_online_rate_limits(
    server: ServerProcess, admin: httpx.Client, tenant: dict[str, Any]
) -> None:
    """A key allowed 3 requests a minute runs a 30-line batch, and still has its 3 online calls afterwards."""
    limited = new_key(admin, tenant["org"]["name"], scopes=["inference"], limits={"rpm": 3})["key"]
    with OpenAI(base_url=server.url + "/v1", api_key=limited, max_retries=0, timeout=120) as c:
        lines = [line(f"r{i}", "/v1/embeddings", {"model": EMBED, "input": f"limited {i}"}) for i in range(30)]
        done = wait(c, submit(c, lines, "/v1/embeddings").id)
        assert done.status == "completed" and done.request_counts is not None
        assert done.request_counts.completed == 30
        for i in range(3):
            c.embeddings.create(model=EMBED, input=f"online {i}")
        with pytest.raises(openai.RateLimitError):
            c.embeddings.create(model=EMBED, input="one too many")


def test_output_files_expire_when_the_batch_asks(client: OpenAI) -> None:
    uploaded = client.files.create(
        file=("in.jsonl", jsonl([line("a", "/v1/embeddings", {"model": EMBED, "input": "x"})])),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert uploaded.expires_at is not None and uploaded.expires_at - uploaded.created_at == 3600
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/embeddings",
        completion_window="24h",
        output_expires_after={"anchor": "created_at", "seconds": 7200},
    )
    done = wait(client, batch.id)
    output = client.files.retrieve(done.output_file_id or "")
    assert output.expires_at is not None and output.expires_at - output.created_at == 7200
    with pytest.raises(openai.BadRequestError, match="output_expires_after"):
        client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/embeddings",
            completion_window="24h",
            output_expires_after={"anchor": "created_at", "seconds": 60},
        )
