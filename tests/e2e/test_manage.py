"""Registering models through the management API and the CLI, then serving them at once."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import OpenAI

from tests.helpers import ServerProcess


@pytest.fixture(scope="module")
def http(server: ServerProcess, auth_headers: dict[str, str]) -> httpx.Client:
    with httpx.Client(base_url=server.url, headers=auth_headers, timeout=120) as client:
        yield client  # type: ignore[misc]


@pytest.fixture(scope="module")
def iris_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_iris
    from sklearn.tree import DecisionTreeClassifier

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    clf = DecisionTreeClassifier(random_state=0).fit(x, y)
    onx = convert_sklearn(clf, initial_types=[("x", FloatTensorType([None, 4]))], options={id(clf): {"zipmap": False}})
    path = tmp_path_factory.mktemp("iris") / "iris.onnx"
    path.write_bytes(onx.SerializeToString())
    return path, x, clf.predict(x)


def _cli(server: ServerProcess, admin_key: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openmaas", *args, "--url", server.url, "--api-key", admin_key],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _v2(http: httpx.Client, model: str, inputs: list[dict], version: int | None = None) -> dict:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    r = http.post(path, json={"inputs": inputs})
    assert r.status_code == 200, r.text
    return {o["name"]: o for o in r.json()["outputs"]}


def test_register_model_over_the_api_and_serve_it(http: httpx.Client, iris_onnx: tuple) -> None:
    path, x, expected = iris_onnx
    card = {"task": "tabular-classification", "description": "iris tree", "license": "MIT", "metrics": {"acc": 1.0}}
    with path.open("rb") as f:
        r = http.post(
            "/api/models", data={"name": "iris-tree", "card": json.dumps(card)}, files={"file": ("iris.onnx", f)}
        )
    assert r.status_code == 201, r.text
    mv = r.json()
    assert mv["version"] == 1
    assert mv["format"] == "onnx"
    assert len(mv["sha256"]) == 64
    assert mv["signature"]["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert mv["card"]["description"] == "iris tree"
    out = _v2(
        http, "iris-tree", [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]
    )
    assert out["label"]["data"] == expected.tolist()
    # A second upload becomes version 2; version 1 stays callable.
    with path.open("rb") as f:
        assert (
            http.post("/api/models", data={"name": "iris-tree"}, files={"file": ("iris.onnx", f)}).json()["version"]
            == 2
        )
    assert http.get("/v2/models/iris-tree").json()["versions"] == ["1", "2"]
    assert _v2(
        http, "iris-tree", [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": x[0].tolist()}], version=1
    )
    shown = http.get("/api/models/iris-tree").json()
    assert [v["version"] for v in shown["versions"]] == [1, 2]


@pytest.mark.parametrize(
    ("filename", "payload"),
    [
        ("model.pkl", pickle.dumps({"weights": [1, 2]})),
        ("model.joblib", pickle.dumps([1])),
        ("model.pt", pickle.dumps([1])),
        ("model.onnx", pickle.dumps([1])),
    ],
)
def test_pickles_are_refused_with_the_safe_formats_named(http: httpx.Client, filename: str, payload: bytes) -> None:
    r = http.post("/api/models", data={"name": "evil"}, files={"file": (filename, payload)})
    assert r.status_code == 400
    problem = r.json()
    assert problem["code"] == "unsafe_format"
    assert "ONNX" in problem["detail"]
    assert "skops" in problem["detail"]
    assert "safetensors" in problem["detail"]
    assert http.get("/api/models/evil").status_code == 404


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"name": "bad name!"}, "invalid model name"),
        ({"name": "ok", "card": "{not json"}, "JSON object"),
        ({"name": "ok", "card": '{"unknown_field": 1}'}, "unknown_field"),
        ({"name": "ok", "format": "tensorflow"}, "unknown format"),
    ],
)
def test_bad_registrations(http: httpx.Client, iris_onnx: tuple, data: dict, fragment: str) -> None:
    path = iris_onnx[0]
    with path.open("rb") as f:
        r = http.post("/api/models", data=data, files={"file": ("iris.onnx", f)})
    assert r.status_code == 400, r.text
    assert fragment in r.json()["detail"]


def test_corrupt_onnx_is_a_400(http: httpx.Client) -> None:
    r = http.post("/api/models", data={"name": "broken"}, files={"file": ("m.onnx", b"\x08\x01garbage")})
    assert r.status_code == 400
    assert "could not be loaded" in r.json()["detail"]


@pytest.mark.parametrize(
    ("filename", "payload"),
    [("junk.onnx", b"\x08\x01garbage"), ("junk.gguf", b"GGUF\x03\x00\x00\x00"), ("junk.skops", b"PK\x03\x04junk")],
)
def test_upload_errors_never_name_the_servers_folders(
    http: httpx.Client, server: ServerProcess, filename: str, payload: bytes
) -> None:
    r = http.post("/api/models", data={"name": "junk"}, files={"file": (filename, payload)})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "could not be" in detail, detail
    for leak in (str(server.data_dir), str(server.data_dir.resolve()), "/tmp", ".openmaas", "tmp/tmp"):
        assert leak not in detail, detail


def test_missing_form_fields(http: httpx.Client) -> None:
    r = http.post("/api/models", data={"name": "x"})
    assert r.status_code == 400
    assert "file" in r.json()["detail"]


def test_cli_registers_skops_and_sentence_transformers_folder(
    server: ServerProcess, admin_key: str, http: httpx.Client, tmp_path: Path, minilm_dir: Path
) -> None:
    import skops.io as sio
    from sklearn.datasets import load_wine
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_wine(return_X_y=True)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y)
    path = tmp_path / "wine.skops"
    sio.dump(model, str(path))
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"task": "tabular-classification", "license": "BSD-3-Clause"}))
    done = _cli(server, admin_key, "models", "register", str(path), "--name", "wine-logreg", "--card", str(card))
    assert done.returncode == 0, done.stderr
    assert "wine-logreg" in done.stdout
    x32 = x[:5].astype(np.float32)
    out = _v2(
        http, "wine-logreg", [{"name": "features", "datatype": "FP32", "shape": [5, 13], "data": x32.ravel().tolist()}]
    )
    assert out["label"]["data"] == model.predict(x32).tolist()
    np.testing.assert_allclose(
        np.array(out["probabilities"]["data"]).reshape(5, 3), model.predict_proba(x32), rtol=1e-4
    )

    # A sentence-transformers folder, zipped by the CLI on the way.
    done = _cli(server, admin_key, "models", "register", str(minilm_dir), "--name", "my-embedder")
    assert done.returncode == 0, done.stderr
    with OpenAI(base_url=server.url + "/v1", api_key=admin_key, max_retries=0) as client:
        mine = client.embeddings.create(model="my-embedder", input=["hello world"]).data[0].embedding
        bundled = client.embeddings.create(model="all-minilm-l6-v2", input=["hello world"]).data[0].embedding
    np.testing.assert_allclose(mine, bundled, rtol=1e-5, atol=1e-6)
    # Same content, same artifact.
    assert (
        http.get("/api/models/my-embedder").json()["versions"][0]["sha256"]
        == (http.get("/api/models/all-minilm-l6-v2").json()["versions"][0]["sha256"])
    )

    listed = _cli(server, admin_key, "models", "list")
    assert listed.returncode == 0
    assert "wine-logreg" in listed.stdout
    assert "my-embedder" in listed.stdout
    shown = _cli(server, admin_key, "models", "show", "wine-logreg")
    assert shown.returncode == 0
    assert json.loads(shown.stdout)["versions"][0]["card"]["license"] == "BSD-3-Clause"
    assert _cli(server, admin_key, "models", "load", "wine-logreg").returncode == 0
    assert _cli(server, admin_key, "models", "unload", "wine-logreg").returncode == 0
    missing = _cli(server, admin_key, "models", "show", "no-such-model")
    assert missing.returncode == 1
    assert "404" in missing.stderr


def test_cli_refuses_a_pickle_with_a_clear_message(server: ServerProcess, admin_key: str, tmp_path: Path) -> None:
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"a": 1}))
    done = _cli(server, admin_key, "models", "register", str(path), "--name", "pickled")
    assert done.returncode == 1
    assert "pickle" in done.stderr
