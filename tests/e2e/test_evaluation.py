"""Evaluation jobs end to end on the bundled models: reports per task with plots, the card's measured figures,
comparing versions, the held-out report of every trained model, and refusals at submission."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import ServerProcess, bearer, new_key, new_org, unique


def _csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _upload(c: httpx.Client, path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        r = c.post("/api/datasets", files={"file": (path.name, f)})
    assert r.status_code == 201, r.text
    return dict(r.json())


def _run(c: httpx.Client, body: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    r = c.post("/api/jobs", json={"type": "evaluate", **body})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get(f"/api/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            assert job["status"] == "succeeded", (job["error"], c.get(f"/api/jobs/{job_id}/logs").text[-3000:])
            return dict(job)
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish: {c.get(f'/api/jobs/{job_id}/logs').text[-2000:]}")


def _report(c: httpx.Client, job: dict[str, Any]) -> dict[str, Any]:
    r = c.get(job["result"]["report"])
    assert r.status_code == 200, r.text
    return dict(r.json())


def _assert_png(c: httpx.Client, url: str) -> None:
    r = c.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text[:200]
    image = Image.open(io.BytesIO(r.content))
    image.verify()
    assert image.format == "PNG" and image.size[0] >= 300


def _assert_performance(report: dict[str, Any]) -> None:
    perf = report["performance"]
    assert 0 < perf["latency_p50_ms"] <= perf["latency_p95_ms"]
    assert perf["size_bytes"] > 0 and perf["peak_rss_bytes"] > perf["memory_bytes"] > 0
    machine = report["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and isinstance(machine["isa"], list)


@pytest.fixture(scope="module")
def org(server: ServerProcess, admin: httpx.Client) -> Iterator[httpx.Client]:
    o = new_org(admin, "evaluators")
    key = new_key(admin, o["name"], scopes=["inference", "manage"])
    with httpx.Client(base_url=server.url, headers=bearer(key["key"]), timeout=120) as c:
        yield c


def test_classifier_report_matches_the_card_and_has_plots(admin: httpx.Client, tmp_path: Path) -> None:
    """The bundled logistic regression on its own held-out quarter: the report's accuracy and ROC-AUC are the
    card's (measured through serving here, by scikit-learn at build time there)."""
    from openmaas.catalogue.tabular import breast_cancer_split

    _, x_te, _, y_te = breast_cancer_split()
    header = [f"f{i}" for i in range(x_te.shape[1])] + ["label"]
    ds = _upload(
        admin,
        _csv(
            tmp_path / "bc.csv", header, [[*map(repr, map(float, x)), int(y)] for x, y in zip(x_te, y_te, strict=True)]
        ),
    )
    job = _run(admin, {"model": "breast-cancer-logreg", "dataset": ds["id"]})
    report = _report(admin, job)
    card = admin.get("/api/models/breast-cancer-logreg").json()["versions"][0]["card"]["metrics"]
    m = report["metrics"]
    assert report["task"] == "classification" and m["rows"] == len(y_te)
    assert round(m["accuracy"], 4) == card["held_out_accuracy"]
    assert round(m["roc_auc"], 4) == card["held_out_roc_auc"]
    assert 0 < m["pr_auc"] <= 1 and m["log_loss"] > 0
    assert np.array(m["confusion_matrix"]).sum() == len(y_te)
    assert set(m["per_class"]) == {"0", "1"} and m["per_class"]["1"]["support"] == int(y_te.sum())
    assert set(report["plots"]) == {"confusion_matrix", "roc", "precision_recall"}
    for url in report["plots"].values():
        _assert_png(admin, url)
    _assert_performance(report)
    assert report["performance"]["parameters"] > 30  # the scaler's and the regression's weights
    assert report["performance"]["throughput_rows_per_s"] > 0
    # Run by the platform on the platform's model: the card shows it as measured, apart from what was written.
    version = admin.get("/api/models/breast-cancer-logreg").json()["versions"][0]
    assert version["measured"]["evaluation"] == report["id"]
    assert version["measured"]["measured_by"] == "platform"
    assert version["measured"]["dataset"]["sha256"] == ds["sha256"]
    assert version["measured"]["metrics"]["accuracy"] == m["accuracy"]
    assert version["card"]["metrics"] == card


def test_regressor_and_a_pixel_table_through_the_serving_path(admin: httpx.Client, tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    from openmaas.catalogue.tabular import diabetes_split

    _, x_te, _, y_te = diabetes_split()
    header = [f"x{i}" for i in range(x_te.shape[1])] + ["label"]
    ds = _upload(
        admin,
        _csv(
            tmp_path / "diab.csv",
            header,
            [[*map(repr, map(float, x)), float(y)] for x, y in zip(x_te, y_te, strict=True)],
        ),
    )
    report = _report(admin, _run(admin, {"model": "diabetes-linreg", "dataset": ds["id"]}))
    card = admin.get("/api/models/diabetes-linreg").json()["versions"][0]["card"]["metrics"]
    assert report["task"] == "regression"
    assert round(report["metrics"]["r2"], 4) == card["held_out_r2"]
    assert report["metrics"]["rmse"] >= report["metrics"]["mae"] > 0
    assert set(report["plots"]) == {"residuals"}
    _assert_png(admin, report["plots"]["residuals"])
    assert report["performance"]["parameters"] == 11  # ten coefficients and the intercept

    # 64 pixel columns feed the CNN's [-1,1,8,8] input.
    digits = load_digits()
    rows = [[*map(float, img), int(t)] for img, t in zip(digits.data[:300], digits.target[:300], strict=True)]
    ds = _upload(admin, _csv(tmp_path / "digits.csv", [f"p{i}" for i in range(64)] + ["label"], rows))
    report = _report(admin, _run(admin, {"model": "digits-cnn", "dataset": ds["id"], "max_rows": 200}))
    assert report["metrics"]["rows"] == 200 and report["metrics"]["accuracy"] > 0.9
    assert len(report["metrics"]["confusion_matrix"]) == 10


def test_embedding_pairs_and_fidelity(admin: httpx.Client, tmp_path: Path) -> None:
    pairs = [
        ("A man is playing a guitar.", "A person plays the guitar.", 4.8),
        ("A dog runs in the park.", "A puppy is running on the grass.", 4.2),
        ("The stock market fell sharply today.", "Shares dropped steeply this afternoon.", 4.4),
        ("She is cooking pasta for dinner.", "A woman prepares spaghetti.", 4.0),
        ("The train was late again.", "A man is playing a guitar.", 0.2),
        ("Children are swimming in the lake.", "The committee approved the budget.", 0.1),
        ("He fixed the broken bicycle.", "The bike was repaired by him.", 4.5),
        ("It is snowing in the mountains.", "Stock prices rose on Monday.", 0.3),
        ("The cat sleeps on the sofa.", "A kitten naps on the couch.", 4.6),
        ("The meeting starts at noon.", "Bananas are rich in potassium.", 0.0),
        ("A plane takes off from the runway.", "An aircraft departs the airport.", 4.3),
        ("She reads a novel in bed.", "A girl is climbing a tree.", 1.0),
    ]
    ds = _upload(
        admin,
        _csv(tmp_path / "pairs.csv", ["text1", "text2", "score", "text"], [[a, b, s, a] for a, b, s in pairs]),
    )
    report = _report(admin, _run(admin, {"model": "all-minilm-l6-v2", "dataset": ds["id"], "reference_version": 1}))
    m = report["metrics"]
    assert report["task"] == "embedding"
    assert m["spearman"] > 0.7 and m["pairs"] == len(pairs)
    # The version against itself: the serving path is deterministic.
    assert m["cosine_min"] > 0.9999 and m["texts"] == len(pairs)
    assert report["performance"]["parameters"] > 20_000_000  # MiniLM-L6: 22.7 M


@pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("sox") is None,
    reason="espeak-ng and sox make the speech (.ci/run installs them)",
)
def test_speech_word_error_rate(admin: httpx.Client, tmp_path: Path) -> None:
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "Please send the quarterly report to the finance team by Friday.",
        "We need three more chairs for the meeting room.",
    ]
    archive = tmp_path / "speech.zip"
    with zipfile.ZipFile(archive, "w") as z:
        manifest = io.StringIO()
        w = csv.writer(manifest)
        w.writerow(["file", "text"])
        for i, sentence in enumerate(sentences):
            raw, wav = tmp_path / f"{i}.raw.wav", tmp_path / f"{i}.wav"
            subprocess.run(["espeak-ng", "-w", str(raw), sentence], check=True)
            subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", str(wav)], check=True)
            z.write(wav, f"clips/{i}.wav")
            w.writerow([f"clips/{i}.wav", sentence])
        z.writestr("manifest.csv", manifest.getvalue().replace("clips/", "clips/"))
    ds = _upload(admin, archive)
    assert ds["format"] == "audio" and ds["rows"] == 3
    report = _report(admin, _run(admin, {"model": "whisper-tiny-en", "dataset": ds["id"]}))
    m = report["metrics"]
    assert report["task"] == "speech" and m["clips"] == 3
    assert m["wer"] < 0.3, m["examples"]
    assert m["examples"][0]["reference"] == sentences[0]
    assert report["performance"]["audio_seconds"] > 3 and report["performance"]["real_time_factor"] > 0


def test_training_reports_held_out_figures_and_versions_compare(org: httpx.Client, tmp_path: Path) -> None:
    from sklearn.datasets import load_wine

    data = load_wine()
    header = [*data.feature_names, "label"]
    ds = _upload(
        org, _csv(tmp_path / "wine.csv", header, [[*x, int(t)] for x, t in zip(data.data, data.target, strict=True)])
    )
    name = unique("wine-eval")

    def train(epochs: int, seed: int) -> dict[str, Any]:
        r = org.post(
            "/api/jobs",
            json={
                "type": "train",
                "task": "tabular-classification",
                "dataset": ds["id"],
                "target": "label",
                "output_model": name,
                "params": {"epochs": epochs, "seed": seed},
            },
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        for _ in range(600):
            job = org.get(f"/api/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed"):
                break
            time.sleep(0.5)
        assert job["status"] == "succeeded", org.get(f"/api/jobs/{job_id}/logs").text[-3000:]
        return dict(job["result"])

    first, second, other_split = train(2, 0), train(60, 0), train(60, 1)
    full = first["model"]
    held_out = org.get(first["evaluation"]).json()
    assert held_out["dataset"]["split"].startswith("held-out") and held_out["dataset"]["sha256"] == ds["sha256"]
    # The served model's held-out figures are the training loop's (same rows, same metric code).
    assert held_out["metrics"]["accuracy"] == pytest.approx(first["metrics"]["accuracy"], abs=1e-9)
    assert set(held_out["metrics"]["per_class"]) == {"0", "1", "2"}
    model = org.get(f"/api/models/{full}").json()
    assert [v["measured"]["dataset"]["split"] for v in model["versions"]] == [held_out["dataset"]["split"]] * 2 + [
        "held-out 0.2 (seed 1)"
    ]

    r = org.get(f"/api/models/{full}/compare", params={"a": first["version"], "b": second["version"]})
    assert r.status_code == 200, r.text
    cmp = r.json()
    assert cmp["comparable"] is True and cmp["task"] == "classification"
    acc_a, acc_b = cmp["a"]["metrics"]["accuracy"], cmp["b"]["metrics"]["accuracy"]
    assert cmp["deltas"]["accuracy"] == pytest.approx(acc_b - acc_a)
    assert cmp["headline"] == {"metric": "accuracy", "higher_is_better": True, "delta": cmp["deltas"]["accuracy"]}
    assert "latency_p50_ms" in cmp["performance"] and cmp["performance"]["parameters"]["ratio"] == 1.0

    cmp = org.get(f"/api/models/{full}/compare", params={"a": first["version"], "b": other_split["version"]}).json()
    assert cmp["comparable"] is False
    assert "never measured on the same data" in cmp["reason"] and "seed 1" in cmp["reason"]
    assert org.get(f"/api/models/{full}/compare", params={"a": 1, "b": 9}).status_code == 404


def test_reports_other_organisations_ran_stay_theirs(
    org: httpx.Client, admin: httpx.Client, server: ServerProcess, tmp_path: Path
) -> None:
    """An organisation evaluating a public model on its own data sees its report; others (and the card) do not."""
    from openmaas.catalogue.tabular import diabetes_split

    _, x_te, _, y_te = diabetes_split()
    rows = [[*map(float, x), float(y)] for x, y in zip(x_te[:40], y_te[:40], strict=True)]
    ds = _upload(org, _csv(tmp_path / "mine.csv", [f"x{i}" for i in range(10)] + ["label"], rows))
    report = _report(org, _run(org, {"model": "diabetes-linreg", "dataset": ds["id"]}))
    ours = org.get("/api/models/diabetes-linreg/versions/1/evaluations").json()["evaluations"]
    assert report["id"] in [e["id"] for e in ours]
    other = new_org(admin, "others")
    key = new_key(admin, other["name"], scopes=["inference", "manage"])
    with httpx.Client(base_url=server.url, headers=bearer(key["key"]), timeout=60) as them:
        theirs = them.get("/api/models/diabetes-linreg/versions/1/evaluations").json()["evaluations"]
        assert report["id"] not in [e["id"] for e in theirs]
        assert them.get(f"/api/models/diabetes-linreg/versions/1/evaluations/{report['id']}").status_code == 404
        assert them.get(report["plots"]["residuals"]).status_code == 404
    measured = admin.get("/api/models/diabetes-linreg").json()["versions"][0]["measured"]
    assert measured is None or measured["evaluation"] != report["id"]


def test_bad_evaluation_requests_are_refused_before_anything_is_queued(org: httpx.Client, tmp_path: Path) -> None:
    ds = _upload(org, _csv(tmp_path / "small.csv", ["a", "b", "label"], [[1.0, 2.0, 0], [2.0, 1.0, 1], [3.0, 0.5, 1]]))
    texts = _upload(org, _csv(tmp_path / "texts.csv", ["text"], [["hello"], ["world"]]))
    before = len(org.get("/api/jobs").json()["jobs"])
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"model": "breast-cancer-logreg", "dataset": ds["id"]}, 400, "30 values a row, but the dataset has 2"),
        ({"model": "breast-cancer-logreg", "dataset": ds["id"], "target": "nope"}, 400, "target column 'nope'"),
        ({"model": "no-such-model", "dataset": ds["id"]}, 404, "no-such-model"),
        ({"model": "diabetes-linreg", "version": 7, "dataset": ds["id"]}, 404, "version 7"),
        ({"model": "diabetes-linreg", "dataset": "missing"}, 404, "dataset 'missing'"),
        ({"model": "all-minilm-l6-v2", "dataset": texts["id"]}, 400, "labelled pairs"),
        ({"model": "diabetes-linreg", "dataset": ds["id"], "task": "speech"}, 400, "can be evaluated for"),
        ({"model": "whisper-tiny-en", "dataset": ds["id"]}, 400, "zip of audio files"),
        ({"model": "diabetes-linreg", "dataset": ds["id"], "max_rows": 0}, 400, "max_rows"),
        ({"model": "digits-cnn", "dataset": ds["id"], "classes": ["a", "b"]}, 400, "64 values a row"),
    ]
    for body, status, words in cases:
        r = org.post("/api/jobs", json={"type": "evaluate", **body})
        assert r.status_code == status, (body, r.text)
        assert words in r.json()["detail"], (body, r.json()["detail"])
    assert len(org.get("/api/jobs").json()["jobs"]) == before


def test_the_cli_evaluates_with_a_report_and_compares(server: ServerProcess, admin_key: str, tmp_path: Path) -> None:
    import os
    import sys

    from openmaas.catalogue.tabular import diabetes_split

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENMAAS_")}
        env = {**clean, "COLUMNS": "200", "OPENMAAS_URL": server.url, "OPENMAAS_API_KEY": admin_key}
        return subprocess.run(
            [sys.executable, "-m", "openmaas", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=tmp_path,
        )

    _, x_te, _, y_te = diabetes_split()
    data = _csv(
        tmp_path / "diabetes.csv",
        [f"x{i}" for i in range(10)] + ["progression"],
        [[*map(float, x), float(y)] for x, y in zip(x_te, y_te, strict=True)],
    )
    done = cli("evaluate", "diabetes-linreg", "--data", str(data), "--target", "progression")
    assert done.returncode == 0, done.stderr
    assert "regression, on dataset diabetes.csv (111 rows, all rows)" in done.stdout
    assert "r2" in done.stdout and "latency_p50_ms" in done.stdout and "measured on" in done.stdout
    assert "/plots/residuals.png" in done.stdout

    listed = cli("models", "evaluations", "diabetes-linreg")
    assert listed.returncode == 0 and "diabetes.csv" in listed.stdout, listed.stderr
    same = cli("models", "compare", "diabetes-linreg", "1", "1")
    assert same.returncode == 0, same.stderr
    assert "r2: version 1 is the same (+0.0000)" in same.stdout

    done = cli("evaluate", "diabetes-linreg", "--data", str(data))  # no 'label' column: refused, one line
    assert done.returncode == 1 and "target column 'label' is not in the dataset" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow  # loads Gemma in a job worker twice: about 80 s
def test_language_model_perplexity_tells_text_from_word_salad(admin: httpx.Client, tmp_path: Path) -> None:
    import random

    deadline = time.monotonic() + 600  # the shared server converts the GGUF file at start
    while not admin.get("/api/models/gemma-3-270m").json().get("ready") and time.monotonic() < deadline:
        time.sleep(2)
    sentences = [
        "The weather was cold, so she wore a warm coat and a scarf.",
        "He opened the door and walked into the kitchen to make some tea.",
        "Many people enjoy reading books before they go to sleep at night.",
        "The children played football in the park until it started to rain.",
    ]
    rng = random.Random(0)
    salad = [" ".join(rng.sample(s.split(), len(s.split()))) for s in sentences]
    figures = []
    for name, texts in (("prose", sentences), ("salad", salad)):
        ds = _upload(admin, _csv(tmp_path / f"{name}.csv", ["text"], [[t] for t in texts]))
        report = _report(admin, _run(admin, {"model": "gemma-3-270m", "dataset": ds["id"]}, timeout=600))
        assert report["task"] == "text-generation" and report["metrics"]["texts"] == 4
        assert report["metrics"]["tokens"] > 40
        assert report["performance"]["parameters"] > 200_000_000  # Gemma 3 270M
        figures.append(report["metrics"]["perplexity"])
    prose, shuffled = figures
    assert 1 < prose < 100 and shuffled > 3 * prose, figures
