"""Datasets and training jobs end to end: upload, train in a worker process, serve the result over v2."""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers import ServerProcess, bearer, new_key, new_org, unique

ADMIN = "om_jobs-admin-key-0123456789abcdefghijklmno"


@pytest.fixture(scope="module")
def jobs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tmp_path_factory.mktemp("jobs") / "data", env={"OPENMAAS_ADMIN_KEY": ADMIN, "OPENMAAS_BUNDLED_MODELS": "false"}
    )
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def org_client(jobs_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=jobs_server.url, headers=bearer(ADMIN), timeout=60) as admin:
        org = new_org(admin, "trainers")
        key = new_key(admin, org["name"], scopes=["inference", "manage"])
    with httpx.Client(base_url=jobs_server.url, headers=bearer(key["key"]), timeout=60) as c:
        yield c


def _csv(path: Path, names: list[str], x: np.ndarray, y: np.ndarray) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*names, "target"])
        for row, t in zip(x, y, strict=True):
            writer.writerow([*row, t])
    return path


def _upload(c: httpx.Client, path: Path) -> dict:
    with path.open("rb") as f:
        r = c.post("/api/datasets", files={"file": (path.name, f)})
    assert r.status_code == 201, r.text
    return dict(r.json())


def _submit_wine(c: httpx.Client, tmp_path: Path, output: str, params: dict) -> str:
    """Upload the wine data and submit a tabular-classification job on it; returns the job id."""
    from sklearn.datasets import load_wine

    data = load_wine()
    ds = _upload(c, _csv(tmp_path / f"{output}.csv", list(data.feature_names), data.data, data.target))
    body = {
        "type": "train",
        "task": "tabular-classification",
        "dataset": ds["id"],
        "target": "target",
        "output_model": output,
        "params": params,
    }
    r = c.post("/api/jobs", json=body)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _assert_uploads_refused(c: httpx.Client, cases: dict[str, tuple[bytes, str]]) -> None:
    """Each file (name -> content, words the refusal must contain) is refused at upload with a 400."""
    for filename, (content, message) in cases.items():
        r = c.post("/api/datasets", files={"file": (filename, content)})
        assert r.status_code == 400, (filename, r.text)
        assert message in r.json()["detail"], (filename, r.json()["detail"])


def _wait(c: httpx.Client, job_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/api/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return dict(job)
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish: {c.get(f'/api/jobs/{job_id}/logs').text[-2000:]}")


@pytest.mark.parametrize(
    ("dataset", "task", "metric", "bar"),
    [("wine", "tabular-classification", "accuracy", 0.93), ("diabetes", "tabular-regression", "r2", 0.4)],
)
def test_train_tabular_and_serve_through_tritonclient(
    jobs_server: ServerProcess,
    org_client: httpx.Client,
    tmp_path: Path,
    dataset: str,
    task: str,
    metric: str,
    bar: float,
) -> None:
    import tritonclient.http as triton
    from sklearn import datasets as skd

    data = skd.load_wine() if dataset == "wine" else skd.load_diabetes()
    ds = _upload(org_client, _csv(tmp_path / f"{dataset}.csv", list(data.feature_names), data.data, data.target))
    assert ds["rows"] == len(data.target) and len(ds["schema"]["columns"]) == len(data.feature_names) + 1
    assert org_client.get(f"/api/datasets/{ds['id']}").json()["sha256"] == ds["sha256"]
    name = unique(dataset)
    r = org_client.post(
        "/api/jobs",
        json={
            "type": "train",
            "task": task,
            "dataset": ds["id"],
            "target": "target",
            "output_model": name,
            "params": {"epochs": 150, "optimizer": "adam", "schedule": "cosine", "warmup_epochs": 2},
        },
    )
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued"
    job = _wait(org_client, r.json()["id"])
    assert job["status"] == "succeeded", (job["error"], org_client.get(f"/api/jobs/{job['id']}/logs").text[-3000:])
    assert job["result"]["metrics"][metric] >= bar, job["result"]["metrics"]
    assert job["progress"] == 1.0 and job["history"] and "val_loss" in job["history"][0]
    assert "held-out metrics" in org_client.get(f"/api/jobs/{job['id']}/logs").text
    png = org_client.get(job["result"]["curves"])
    assert (
        png.status_code == 200
        and png.headers["content-type"] == "image/png"
        and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    )
    events = org_client.get(f"/api/jobs/{job['id']}/events")  # a finished job: its final state, then the end
    assert events.headers["content-type"].startswith("text/event-stream")
    assert '"status":"succeeded"' in events.text and events.text.startswith("event: progress")

    # The new model answers at once, through tritonclient, with the card filled in.
    card = org_client.get(f"/api/models/{name}").json()["versions"][-1]["card"]
    assert card["task"] == task and card["metrics"][metric] >= bar and ds["sha256"] in card["training_data"]
    client = triton.InferenceServerClient(jobs_server.url.removeprefix("http://"))
    x = data.data[:16].astype(np.float32)
    inp = triton.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    out_name = "label" if task.endswith("classification") else "prediction"
    result = client.infer(
        name, [inp], outputs=[triton.InferRequestedOutput(out_name)], headers=dict(org_client.headers)
    )
    got = result.as_numpy(out_name)
    assert got.shape == (16,)
    if task.endswith("classification"):
        assert (got == data.target[:16]).mean() >= 0.9
    client.close()


def test_bad_data_is_refused_with_the_problem_named(org_client: httpx.Client, tmp_path: Path) -> None:
    cases = {
        "empty.csv": (b"", "empty"),
        "ragged.csv": (b"a,b,target\n1,2,x\n3,4\n", "row 2 has 2 fields"),
        "text.csv": (b"a,target\n" + b"".join(b"%d,x\n" % i for i in range(30)) + b"abc,y\n", "'abc' is not a number"),
        "bad.jsonl": (b'{"a": 1}\n[1, 2]\n', "line 2 is not a JSON object"),
        "notes.txt": (b"hello", "format"),
    }
    _assert_uploads_refused(org_client, cases)
    ds = _upload(
        org_client,
        _write(
            tmp_path / "ok.csv",
            b"a,b,target\n" + b"".join(b"%d,%d,c%d\n" % (i, i * 2, i % 3) for i in range(30)) + b"5,6,lonely\n",
        ),
    )
    base = {"type": "train", "task": "tabular-classification", "dataset": ds["id"], "output_model": unique("m")}
    for body, message in (
        ({**base, "target": "nope"}, "target column 'nope' is not in the dataset"),
        ({**base, "target": "target"}, "class 'lonely'"),
        ({**base, "target": "target", "task": "tabular-regression"}, "must be numeric"),
        ({**base, "target": "a", "dataset": "missing"}, "does not exist"),
        ({**base, "target": "a", "params": {"optimizer": "rmsprop"}}, "params.optimizer"),
        ({**base, "target": "a", "type": "dance"}, "unknown job type"),
        ({**base, "target": "a", "fine_tune": True}, "fine_tune applies to text-classification only"),
    ):
        r = org_client.post("/api/jobs", json=body)
        assert r.status_code in (400, 404), r.text
        assert message in r.json()["detail"], (message, r.json()["detail"])
    assert org_client.delete(f"/api/datasets/{ds['id']}").status_code == 200
    assert org_client.get(f"/api/datasets/{ds['id']}").status_code == 404


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def test_sigkill_during_training_resumes_from_the_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:

    server = ServerProcess(
        tmp_path_factory.mktemp("resume") / "data",
        env={"OPENMAAS_ADMIN_KEY": ADMIN, "OPENMAAS_BUNDLED_MODELS": "false"},
    ).start()
    try:
        with httpx.Client(base_url=server.url, headers=bearer(ADMIN), timeout=60) as c:
            job_id = _submit_wine(c, tmp_path, "resumed", {"epochs": 400, "batch_size": 4, "early_stopping": False})
            deadline = time.monotonic() + 120
            while len(c.get(f"/api/jobs/{job_id}").json()["history"]) < 30:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        server.kill()  # the worker dies with it
        server.start()
        with httpx.Client(base_url=server.url, headers=bearer(ADMIN), timeout=60) as c:
            job = _wait(c, job_id, timeout=300)
            logs = c.get(f"/api/jobs/{job_id}/logs").text
        assert job["status"] == "succeeded", (job["error"], logs[-2000:])
        assert job["attempts"] == 2 and "resuming from the checkpoint after epoch" in logs
        epochs = [h["epoch"] for h in job["history"]]
        assert epochs == list(range(1, 401))  # the count continues; nothing redone twice in the history
        assert job["result"]["metrics"]["accuracy"] >= 0.93
    finally:
        server.stop()


def test_cli_train_datasets_and_jobs(jobs_server: ServerProcess, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    path = _csv(tmp_path / "cancer_data.csv", list(data.feature_names), data.data, data.target)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "openmaas", *args, "--url", jobs_server.url, "--api-key", ADMIN],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "COLUMNS": "200"},
        )

    out = cli("train", "--task", "tabular-classification", "--data", str(path), "--target", "target", "--epochs", "60")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "succeeded" in out.stdout and "cancer-data version 1" in out.stdout and "accuracy" in out.stdout
    assert "cancer_data.csv" in cli("datasets", "list").stdout
    listed = cli("jobs", "list").stdout
    assert "succeeded" in listed
    jobs = httpx.get(f"{jobs_server.url}/api/jobs", headers=bearer(ADMIN)).json()["jobs"]
    job_id = jobs[0]["id"]
    assert "held-out metrics" in cli("jobs", "logs", job_id).stdout
    assert cli("jobs", "cancel", job_id).returncode == 1  # already finished: refused with a message
    bad = cli("train", "--task", "tabular-classification", "--data", str(path), "--target", "nope")
    assert bad.returncode == 1 and "target column 'nope'" in bad.stderr


def _digits_zip(path: Path, count: int | None = None) -> Path:
    import io
    import zipfile

    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    with zipfile.ZipFile(path, "w") as z:
        for i, (img, label) in enumerate(zip(digits.images[:count], digits.target[:count], strict=False)):
            buf = io.BytesIO()
            Image.fromarray((img * 255 / 16).astype(np.uint8), mode="L").save(buf, format="PNG")
            z.writestr(f"digits/{label}/{i}.png", buf.getvalue())
    return path


def test_image_classification_from_a_png_zip(
    jobs_server: ServerProcess, org_client: httpx.Client, tmp_path: Path
) -> None:
    import tritonclient.http as triton
    from sklearn.datasets import load_digits

    ds = _upload(org_client, _digits_zip(tmp_path / "digits.zip"))
    assert ds["format"] == "images" and ds["rows"] == 1797
    assert ds["schema"]["height"] == 8 and ds["schema"]["channels"] == 1 and len(ds["schema"]["classes"]) == 10
    name = unique("digits")
    r = org_client.post(
        "/api/jobs",
        json={
            "type": "train",
            "task": "image-classification",
            "dataset": ds["id"],
            "output_model": name,
            "params": {"epochs": 40, "learning_rate": 0.005},
        },
    )
    assert r.status_code == 202, r.text
    job = _wait(org_client, r.json()["id"], timeout=400)
    assert job["status"] == "succeeded", (job["error"], org_client.get(f"/api/jobs/{job['id']}/logs").text[-2000:])
    assert job["result"]["metrics"]["accuracy"] >= 0.95, job["result"]["metrics"]
    x = (load_digits().images[:32] / 16).astype(np.float32)[:, None]
    client = triton.InferenceServerClient(jobs_server.url.removeprefix("http://"))
    inp = triton.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    labels = client.infer(name, [inp], headers=dict(org_client.headers)).as_numpy("label")
    assert (labels == load_digits().target[:32]).mean() >= 0.9
    client.close()


def test_bad_image_zips_are_refused(org_client: httpx.Client, tmp_path: Path) -> None:
    import io
    import zipfile

    def zip_of(files: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for n, content in files.items():
                z.writestr(n, content)
        return buf.getvalue()

    good = _digits_zip(tmp_path / "g.zip", count=4).read_bytes()
    png = zipfile.ZipFile(io.BytesIO(good)).read(zipfile.ZipFile(io.BytesIO(good)).namelist()[0])
    cases = {
        "flat.zip": (zip_of({"a.png": png, "b.png": png}), "wrong zip layout"),
        "corrupt.zip": (
            zip_of({"cats/1.png": png, "cats/2.png": b"\x89PNG not really"}),
            "'cats/2.png' is not a readable image",
        ),
        "notzip.zip": (b"hello", "not a zip archive"),
    }
    _assert_uploads_refused(org_client, cases)
    one = _upload(
        org_client, _write(tmp_path / "one.zip", zip_of({"cats/1.png": png, "cats/2.png": png, "dogs/1.png": png}))
    )
    r = org_client.post(
        "/api/jobs",
        json={"type": "train", "task": "image-classification", "dataset": one["id"], "output_model": unique("m")},
    )
    assert r.status_code == 400 and "'dogs' has only 1 image" in r.json()["detail"]


def _topics(n_per_topic: int = 40, seed: int = 0) -> list[tuple[str, str]]:
    import random

    rng = random.Random(seed)
    vocab = {
        "sport": (
            ["the striker", "our goalkeeper", "the coach", "the team", "a sprinter"],
            [
                "scored in the final minute",
                "won the league title",
                "trained for the marathon",
                "missed a penalty",
                "broke the record",
            ],
        ),
        "cooking": (
            ["the chef", "my grandmother", "the baker", "a home cook", "the pastry team"],
            [
                "simmered the tomato sauce",
                "kneaded the bread dough",
                "roasted garlic and onions",
                "whisked eggs for an omelette",
                "seasoned the soup with thyme",
            ],
        ),
        "finance": (
            ["the central bank", "investors", "the stock market", "the treasury", "a hedge fund"],
            [
                "raised interest rates",
                "sold government bonds",
                "reported quarterly earnings",
                "hedged against inflation",
                "cut the dividend",
            ],
        ),
        "weather": (
            ["a cold front", "the storm", "heavy rain", "the forecast", "a heatwave"],
            [
                "brought snow to the mountains",
                "flooded the valley",
                "promised sunshine tomorrow",
                "pushed temperatures above forty degrees",
                "caused strong winds on the coast",
            ],
        ),
    }
    rows = []
    for topic, (subjects, predicates) in vocab.items():
        for _ in range(n_per_topic):
            rows.append((f"{rng.choice(subjects)} {rng.choice(predicates)}", topic))
    rng.shuffle(rows)
    return rows


@pytest.mark.parametrize(
    ("fine_tune", "params"),
    [(False, {"epochs": 60}), (True, {"epochs": 4, "batch_size": 16, "encoder_learning_rate": 5e-5})],
    ids=["frozen", "fine-tuned"],
)
def test_text_classification_head_on_minilm(
    server: ServerProcess, admin: httpx.Client, tmp_path: Path, fine_tune: bool, params: dict
) -> None:
    import tritonclient.http as triton

    org = new_org(admin, "texts")
    key = new_key(admin, org["name"], scopes=["inference", "manage"])
    path = tmp_path / "topics.jsonl"
    import json

    path.write_text("".join(json.dumps({"text": t, "topic": y}) + "\n" for t, y in _topics()))
    with httpx.Client(base_url=server.url, headers=bearer(key["key"]), timeout=60) as c:
        ds = _upload(c, path)
        name = unique("topics")
        body = {
            "type": "train",
            "task": "text-classification",
            "dataset": ds["id"],
            "target": "topic",
            "output_model": name,
            "params": params,
            "fine_tune": fine_tune,
        }
        assert c.post("/api/jobs", json={**body, "encoder": "digits-cnn"}).status_code == 400
        assert c.post("/api/jobs", json={**body, "text_column": "body"}).status_code == 400
        r = c.post("/api/jobs", json=body)
        assert r.status_code == 202, r.text
        job = _wait(c, r.json()["id"], timeout=400)
        assert job["status"] == "succeeded", (job["error"], c.get(f"/api/jobs/{job['id']}/logs").text[-2000:])
        assert job["result"]["metrics"]["accuracy"] >= 0.9
        classes = job["result"]["classes"]
        texts = [
            "the goalkeeper saved a penalty in extra time",
            "bake the bread with rosemary and olive oil",
            "the bank raised rates to fight inflation",
            "thunderstorms and hail are expected tonight",
        ]
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        inp = triton.InferInput("text", [len(texts)], "BYTES")
        inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
        wanted = [triton.InferRequestedOutput("label"), triton.InferRequestedOutput("embedding")]
        result = client.infer(name, [inp], outputs=wanted, headers=dict(c.headers))
        assert [classes[i] for i in result.as_numpy("label")] == ["sport", "cooking", "finance", "weather"]
        base = client.infer("all-minilm-l6-v2", [inp], headers=dict(c.headers)).as_numpy("embedding")
        client.close()
        # Frozen: the encoder served with the head is the base model, bit for bit; fine-tuned: its weights moved.
        cosine = (result.as_numpy("embedding") * base).sum(axis=1)
        if fine_tune:
            assert cosine.max() < 0.999, cosine
            assert "fine-tuned" in c.get(f"/api/models/{name}/versions/1").json()["card"]["description"]
        else:
            np.testing.assert_allclose(cosine, 1.0, atol=1e-5)


def test_two_data_parallel_workers(org_client: httpx.Client, tmp_path: Path) -> None:
    job_id = _submit_wine(org_client, tmp_path, unique("wine-dp"), {"epochs": 100, "workers": 2})
    job = _wait(org_client, job_id)
    logs = org_client.get(f"/api/jobs/{job['id']}/logs").text
    assert job["status"] == "succeeded", (job["error"], logs[-3000:])
    assert "data-parallel on 2 workers" in logs
    assert job["result"]["metrics"]["accuracy"] >= 0.93
    first = job["history"][0]
    assert [w["rank"] for w in first["workers"]] == [0, 1]  # both workers' progress, every epoch
    assert all(len(h["workers"]) == 2 for h in job["history"])


def test_parquet_dataset(org_client: httpx.Client, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    columns = {name: data.data[:, i] for i, name in enumerate(data.feature_names)} | {"target": data.target}
    path = tmp_path / "diabetes.parquet"
    pq.write_table(pa.table(columns), path)
    ds = _upload(org_client, path)
    assert ds["format"] == "parquet" and ds["rows"] == 442
    assert {c["type"] for c in ds["schema"]["columns"]} == {"number"}
    r = org_client.post("/api/datasets", files={"file": ("broken.parquet", b"PAR1 not really parquet")})
    assert r.status_code == 400 and "Parquet" in r.json()["detail"]


def test_cancel_a_running_job(org_client: httpx.Client, tmp_path: Path) -> None:
    job_id = _submit_wine(
        org_client, tmp_path, unique("cancelled"), {"epochs": 5000, "batch_size": 2, "early_stopping": False}
    )
    deadline = time.monotonic() + 120
    while not org_client.get(f"/api/jobs/{job_id}").json()["history"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    r = org_client.post(f"/api/jobs/{job_id}/cancel")
    assert r.status_code == 200, r.text
    job = _wait(org_client, job_id, timeout=60)
    assert job["status"] == "cancelled" and job["result"] is None
    assert len(job["history"]) < 5000
    again = org_client.post(f"/api/jobs/{job_id}/cancel")
    assert again.status_code == 400 and "already cancelled" in again.json()["detail"]


def test_categorical_columns_are_one_hot_encoded_in_the_served_model(
    jobs_server: ServerProcess, org_client: httpx.Client, tmp_path: Path
) -> None:
    import random

    import tritonclient.http as triton

    rng = random.Random(0)
    colours = {"red": "stop", "green": "go", "amber": "wait"}
    lines = ["speed,colour,action"]
    for _ in range(300):
        colour = rng.choice(list(colours))
        lines.append(f"{rng.uniform(0, 100):.2f},{colour},{colours[colour]}")
    ds = _upload(org_client, _write(tmp_path / "lights.csv", ("\n".join(lines) + "\n").encode()))
    kinds = {c["name"]: c["type"] for c in ds["schema"]["columns"]}
    assert kinds == {"speed": "number", "colour": "category", "action": "category"}
    name = unique("lights")
    r = org_client.post(
        "/api/jobs",
        json={
            "type": "train",
            "task": "tabular-classification",
            "dataset": ds["id"],
            "target": "action",
            "output_model": name,
            "params": {"epochs": 60},
        },
    )
    job = _wait(org_client, r.json()["id"])
    assert job["status"] == "succeeded", (job["error"], org_client.get(f"/api/jobs/{job['id']}/logs").text[-2000:])
    assert job["result"]["metrics"]["accuracy"] >= 0.95
    classes = job["result"]["classes"]
    client = triton.InferenceServerClient(jobs_server.url.removeprefix("http://"))
    speed = triton.InferInput("x", [4, 1], "FP32")
    speed.set_data_from_numpy(np.array([[10], [50], [90], [30]], dtype=np.float32))
    colour = triton.InferInput("colour", [4], "BYTES")
    colour.set_data_from_numpy(np.array([b"red", b"green", b"amber", b"purple"], dtype=object))
    result = client.infer(
        name, [speed, colour], outputs=[triton.InferRequestedOutput("label")], headers=dict(org_client.headers)
    )
    labels = [classes[i] for i in result.as_numpy("label")]
    assert labels[:3] == ["stop", "go", "wait"]  # an unseen colour still gets an answer (all-zero encoding)
    client.close()


@pytest.mark.parametrize("task", ["tabular-regression", "image-classification"])
def test_two_data_parallel_workers_reach_the_same_bars(org_client: httpx.Client, tmp_path: Path, task: str) -> None:
    from sklearn.datasets import load_diabetes

    if task == "image-classification":
        ds = _upload(org_client, _digits_zip(tmp_path / "digits.zip"))
        body = {"dataset": ds["id"], "params": {"epochs": 40, "learning_rate": 0.005, "workers": 2}}
        metric, bar = "accuracy", 0.95
    else:
        data = load_diabetes()
        ds = _upload(org_client, _csv(tmp_path / "diabetes.csv", list(data.feature_names), data.data, data.target))
        body = {"dataset": ds["id"], "target": "target", "params": {"epochs": 150, "workers": 2}}
        metric, bar = "r2", 0.4
    r = org_client.post("/api/jobs", json={"type": "train", "task": task, "output_model": unique("dp"), **body})
    assert r.status_code == 202, r.text
    job = _wait(org_client, r.json()["id"], timeout=400)
    assert job["status"] == "succeeded", (job["error"], org_client.get(f"/api/jobs/{job['id']}/logs").text[-2000:])
    assert job["result"]["metrics"][metric] >= bar, job["result"]["metrics"]
    assert all(len(h["workers"]) == 2 for h in job["history"])


def test_a_second_org_trains_the_same_name_into_its_own_namespace(
    jobs_server: ServerProcess, org_client: httpx.Client, tmp_path: Path
) -> None:
    """The second organisation to train on wine.csv as "wine" used to be told the name was taken, after uploading
    its data; each now gets its own org/wine, and calls its own by the bare name."""
    with httpx.Client(base_url=jobs_server.url, headers=bearer(ADMIN), timeout=60) as admin:
        other = new_org(admin, "trainers-too")
        key = new_key(admin, other["name"], scopes=["inference", "manage"])["key"]
    name = unique("wine")
    params = {"epochs": 2, "hidden": [8]}
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
    with httpx.Client(base_url=jobs_server.url, headers=bearer(key), timeout=60) as second:
        jobs = [(c, _submit_wine(c, tmp_path / label, name, params)) for label, c in (("a", org_client), ("b", second))]
        owners = set()
        for c, job_id in jobs:
            job = _wait(c, job_id)
            assert job["status"] == "succeeded", job
            full = job["result"]["model"]
            assert full.endswith(f"/{name}") and c.get(f"/api/models/{name}").json()["name"] == full
            owners.add(full.split("/")[0])
        assert len(owners) == 2 and other["name"] in owners
