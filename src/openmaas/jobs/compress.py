"""Compression jobs: quantise a registered version, measure original and result through the serving path on the
same data, and register the result only within the metric budget (or with ``force``).

``check_quantize`` runs at submission (in the server) and refuses what the job would fail on; ``run_quantize``
runs in the job worker. The candidate is measured from the artifact store before anything is registered, so a
result outside the budget (or a crash) leaves no version behind; each version's report is stored as an
evaluation on the same data, so ``models compare`` puts them side by side afterwards.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from openmaas.datasets.service import DatasetService
from openmaas.entities.models import ModelCard, ModelVersion, split_name
from openmaas.entities.tables import Table
from openmaas.errors import InvalidRequest, OpenMaaSError
from openmaas.evaluation import inputs as ev_inputs
from openmaas.evaluation import metrics as ev_metrics
from openmaas.evaluation.sentences import english_sentences
from openmaas.jobs import evaluate
from openmaas.jobs.specs import EvaluateSpec, QuantizeSpec
from openmaas.registry.service import full_name_for

#: Which formats each method quantises, in words for a refusal.
SUPPORTED = {
    "dynamic-int8": ("sentence-transformers", "text encoders (sentence-transformers folders)"),
    "static-int8": ("onnx", "ONNX classifiers and regressors"),
}
BUILTIN_TEXTS = "builtin:english-sentences-600"


class OutsideBudget(OpenMaaSError):
    """The result lost more of the task metric than the budget allows; ``result`` is the report."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def supported_words() -> str:
    return "; ".join(f"{method} for {words}" for method, (_, words) in SUPPORTED.items())


@dataclass
class Prepared:
    """What a quantisation job measures with: the evaluation plan, its dataset's description, calibration rows."""

    eval_plan: evaluate.Plan
    dataset: dict[str, Any]
    calibration: dict[str, np.ndarray] | None
    metric: str


def _table(
    datasets: DatasetService, org_id: str | None, dataset_id: str, by_admin: bool, param: str
) -> tuple[dict[str, Any], Table]:
    ds = datasets.get(org_id, dataset_id, any_org=by_admin)
    if ds["format"] in ("images", "audio"):
        raise InvalidRequest(
            f"{param} must be a table (CSV, JSONL or Parquet); dataset {dataset_id} holds {ds['format']}", param=param
        )
    return ds, datasets.table(ds)


def embedding_eval(
    eval_dataset: str | None, text_column: str, datasets: DatasetService, org_id: str | None, by_admin: bool
) -> Prepared:
    """What a text encoder and its compressed version are measured on: labelled pairs (Spearman), texts (cosine
    to the original), or 600 built-in English sentences."""
    if eval_dataset is None:
        texts = english_sentences()
        digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
        info = {"id": BUILTIN_TEXTS, "name": "600 built-in English sentences", "sha256": digest}
        return Prepared(evaluate.Plan("embedding", len(texts), texts=texts), info, None, "cosine_mean")
    ds, table = _table(datasets, org_id, eval_dataset, by_admin, "eval_dataset")
    pairs = ev_inputs.pairs(table)
    given = ev_inputs.texts(table, text_column) if text_column in table.columns else None
    if pairs is None and given is None:
        raise InvalidRequest(
            f"eval_dataset needs a '{text_column}' column (texts) or labelled pairs (text1, text2, score)",
            param="eval_dataset",
        )
    measured_texts = given if given is not None else pairs[0] if pairs is not None else []
    plan = evaluate.Plan("embedding", table.rows, texts=measured_texts, pairs=pairs)
    return Prepared(plan, ds, None, "spearman" if pairs is not None else "cosine_mean")


def is_encoder(mv: ModelVersion) -> bool:
    """A text encoder alone (no classifier head): distilled into fewer layers, quantised with its embeddings."""
    return mv.format == "sentence-transformers" and mv.signature.output("probabilities") is None


def prepare_encoder_distillation(
    spec: Any, mv: ModelVersion, artifact: Path, datasets: DatasetService, org_id: str | None, by_admin: bool
) -> tuple[Prepared, list[str]]:
    """The texts the student learns on and what both are measured on (InvalidRequest naming what is wrong)."""
    if "layers" not in spec.student:
        raise InvalidRequest(
            f"'{mv.model}' is a text encoder: its student is {{\"layers\": N}} (N of its transformer layers)",
            param="student",
        )
    try:
        total = int(json.loads((artifact / "config.json").read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError):
        raise InvalidRequest(
            f"'{mv.model}' does not say how many layers it has (config.json)", param="teacher"
        ) from None
    layers = int(spec.student["layers"])
    if layers >= total:
        raise InvalidRequest(f"the teacher has {total} layers; a student keeps 1 to {total - 1}", param="student")
    _, table = _table(datasets, org_id, spec.dataset, by_admin, "dataset")
    texts = ev_inputs.texts(table, spec.text_column)
    if len(texts) < 20:
        raise InvalidRequest(f"the dataset has {len(texts)} texts; a student needs 20 or more", param="dataset")
    return embedding_eval(spec.eval_dataset, spec.text_column, datasets, org_id, by_admin), texts


def prepare(
    spec: QuantizeSpec, mv: ModelVersion, datasets: DatasetService, org_id: str | None, by_admin: bool
) -> Prepared:
    """Everything the job will read, checked against the version (InvalidRequest naming what is wrong)."""
    fmt = SUPPORTED[spec.method][0]
    if mv.format != fmt:
        raise InvalidRequest(
            f"{spec.method} does not quantise '{mv.model}' (a {mv.format} model); supported: {supported_words()}",
            param="method",
        )
    if spec.method == "dynamic-int8":
        if spec.calibration_dataset is not None:
            raise InvalidRequest(
                "dynamic-int8 needs no calibration_dataset (it is for static-int8)", param="calibration_dataset"
            )
        if mv.signature.output("probabilities") is not None:  # a text classifier: the encoder's head is kept
            if spec.eval_dataset is None:
                raise InvalidRequest(
                    f"'{mv.model}' is a text classifier: send eval_dataset (texts in text_column, classes in "
                    "target) to measure the accuracy the budget is checked on",
                    param="eval_dataset",
                )
            ds = datasets.get(org_id, spec.eval_dataset, any_org=by_admin)
            ev_spec = EvaluateSpec(
                model=mv.model, version=mv.version, dataset=spec.eval_dataset, task="classification",
                target=spec.target, text_column=spec.text_column,
            )  # fmt: skip
            plan = evaluate.plan(ev_spec, mv, "embedding", evaluate.load_data(datasets, ds))
            return Prepared(plan, ds, None, "accuracy")
        return embedding_eval(spec.eval_dataset, spec.text_column, datasets, org_id, by_admin)
    if spec.calibration_dataset is None:
        raise InvalidRequest(
            "static-int8 calibrates activation ranges on data: send calibration_dataset", param="calibration_dataset"
        )
    if spec.eval_dataset is None:
        raise InvalidRequest(
            "send eval_dataset (rows with the truth in 'target') to measure the metric the budget is checked on",
            param="eval_dataset",
        )
    _, calibration_table = _table(datasets, org_id, spec.calibration_dataset, by_admin, "calibration_dataset")
    try:
        calibration = ev_inputs.table_inputs(mv.signature, calibration_table, [spec.target])
    except InvalidRequest as e:
        raise InvalidRequest(f"calibration_dataset: {e.message}", param="calibration_dataset") from None
    ds = datasets.get(org_id, spec.eval_dataset, any_org=by_admin)
    ev_spec = EvaluateSpec(model=mv.model, version=mv.version, dataset=spec.eval_dataset, target=spec.target)
    plan = evaluate.plan(ev_spec, mv, "tensor", evaluate.load_data(datasets, ds))
    return Prepared(plan, ds, calibration, "accuracy" if plan.task == "classification" else "r2")


def output_name(
    spec: Any,
    mv: ModelVersion,
    owner: str | None,
    org_id: str | None,
    namespace: str | None,
    by_admin: bool,
    suffix: str = "int8",
) -> str | None:
    """The full name to register as (None: a new version of the model itself, which its owner may add)."""
    if spec.output_model is not None:
        return full_name_for(spec.output_model, namespace, "output_model")
    if owner == org_id or (by_admin and owner is None):
        return None
    return full_name_for(f"{split_name(mv.model)[1]}-{suffix}", namespace, "output_model")


# -- pruning and distillation: ONNX classifiers read back into PyTorch -------------------------------------------


@dataclass
class Split:
    """A classifier's dataset as its input tensor, split train / validation / test (the report's rows)."""

    input_name: str
    shape: tuple[int, ...]
    data: dict[str, tuple[np.ndarray, np.ndarray]]
    classes: list[str]


def prepare_network(
    spec: Any, mv: ModelVersion, artifact: Path, datasets: DatasetService, org_id: str | None, by_admin: bool
) -> tuple[Prepared, Split]:
    """Check that the version is an ONNX classifier whose graph reads back into PyTorch, and split ``dataset``
    into its input and labels (InvalidRequest naming what is wrong)."""
    from sklearn.model_selection import train_test_split

    from openmaas.compression import networks

    words = "pruning and distillation take ONNX classifiers (the networks training produces, the digits CNN)" + (
        "; distillation also text encoders (sentence-transformers)" if hasattr(spec, "teacher") else ""
    )
    if "layers" in getattr(spec, "student", {}):
        raise InvalidRequest(
            "{\"layers\": N} is a text encoder's student; a classifier's is hidden or channels", param="student"
        )
    if mv.format != "onnx":
        raise InvalidRequest(f"{words}; '{mv.model}' is a {mv.format} model", param="model")
    if mv.signature.output("probabilities") is None:
        raise InvalidRequest(f"{words}; '{mv.model}' has no probabilities output", param="model")
    try:
        networks.from_onnx(artifact.read_bytes())
    except networks.UnsupportedGraph as e:
        raise InvalidRequest(f"{words}: {e}", param="model") from None
    ds = datasets.get(org_id, spec.dataset, any_org=by_admin)
    classes = spec.classes or mv.card.classes or None
    ev_spec = EvaluateSpec(
        model=mv.model,
        version=mv.version,
        dataset=spec.dataset,
        task="classification",
        target=spec.target,
        classes=classes,
    )
    labelled = evaluate.plan(ev_spec, mv, "tensor", evaluate.load_data(datasets, ds)).labelled
    assert labelled is not None
    assert labelled.classes is not None
    if len(labelled.inputs) != 1:
        raise InvalidRequest(f"{words}: the model must take one input", param="model")
    name, x = next(iter(labelled.inputs.items()))
    rows = np.arange(len(x))
    if len(rows) < 20:
        raise InvalidRequest(
            f"the dataset has {len(rows)} rows; fine-tuning and a held-out test need 20 or more", param="dataset"
        )

    def two(idx: np.ndarray, size: float) -> tuple[np.ndarray, np.ndarray]:
        try:
            a, b = train_test_split(idx, test_size=size, random_state=spec.seed, stratify=labelled.y[idx])
        except ValueError:  # a class too small to stratify
            a, b = train_test_split(idx, test_size=size, random_state=spec.seed)
        return a, b

    if spec.eval_dataset is None:
        rest, test = two(rows, 0.2)
        train, val = two(rest, 0.15)
        data = {k: (x[idx], labelled.y[idx]) for k, idx in (("train", train), ("val", val), ("test", test))}
        info = {**ds, "split": f"held-out 0.2 (seed {spec.seed})"}
    else:
        train, val = two(rows, 0.15)
        data = {k: (x[idx], labelled.y[idx]) for k, idx in (("train", train), ("val", val))}
        info = datasets.get(org_id, spec.eval_dataset, any_org=by_admin)
        ev_spec = ev_spec.model_copy(update={"dataset": spec.eval_dataset, "classes": labelled.classes})
        held = evaluate.plan(ev_spec, mv, "tensor", evaluate.load_data(datasets, info)).labelled
        assert held is not None
        data["test"] = (held.inputs[name], held.y)
        info = {**info, "split": "all"}
    x_test, y_test = data["test"]
    plan = evaluate.Plan(
        "classification",
        len(x_test),
        labelled=ev_inputs.Labelled({name: x_test}, y_test, labelled.classes, len(x_test)),
    )
    return Prepared(plan, info, None, "accuracy"), Split(name, tuple(x.shape[1:]), data, labelled.classes)


# -- in the worker -----------------------------------------------------------------------------------------------


def build_candidate(
    spec: QuantizeSpec, source: Path, work: Path, calibration: dict[str, np.ndarray] | None
) -> tuple[Path, str]:
    """The quantised artifact (folder or file) in ``work`` and its format."""
    from openmaas.compression import quantize

    if spec.method == "dynamic-int8":
        fp32, int8 = work / "fp32", work / "int8"
        shutil.rmtree(fp32, ignore_errors=True)
        shutil.rmtree(int8, ignore_errors=True)
        quantize.export_encoder(source, fp32)
        quantize.quantize_dynamic_folder(fp32, int8)
        shutil.rmtree(fp32, ignore_errors=True)
        from openmaas.runtimes.sentence_transformers import HEAD_FILE

        if (source / HEAD_FILE).is_file():  # a text classifier keeps its head (already small, on fp32 embeddings)
            shutil.copy(source / HEAD_FILE, int8 / HEAD_FILE)
        return int8, "onnx-embedding"
    assert calibration is not None
    out = work / "model-int8.onnx"
    quantize.quantize_static_file(source, out, calibration)
    return out, "onnx"


def _figures(report: evaluate.Report, metric: str) -> dict[str, Any]:
    perf = report.performance
    return {
        "size_bytes": perf["size_bytes"],
        "parameters": perf["parameters"],
        "latency_p50_ms": perf["latency_p50_ms"],
        "latency_p95_ms": perf["latency_p95_ms"],
        "throughput_batch_32": perf["throughput_by_batch"].get("32"),
        metric: report.metrics.get(metric),
    }


def fidelity(task: str, original: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """How closely the result follows the original on the same rows: prediction agreement (classifiers), cosine
    (embeddings), or the error between the predictions (regressors)."""
    if task == "classification":
        return {"agreement": float((original.argmax(axis=1) == candidate.argmax(axis=1)).mean())}
    if task == "embedding":
        return ev_metrics.fidelity(candidate, original)
    diff = candidate.astype(np.float64) - original.astype(np.float64)
    return {"prediction_mae": float(np.abs(diff).mean()), "prediction_max_error": float(np.abs(diff).max())}


def compression_report(
    spec: Any,
    prepared: Prepared,
    original: evaluate.Report,
    candidate: evaluate.Report,
    mv: ModelVersion,
    method: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Original against result on the same rows: sizes, speed, the metric, fidelity, deltas and the verdict
    against ``spec.max_metric_drop`` (``spec.force`` registers a result outside it)."""
    metric = prepared.metric
    a, b = _figures(original, metric), _figures(candidate, metric)
    assert original.outputs is not None
    assert candidate.outputs is not None
    faithful = fidelity(prepared.eval_plan.task, original.outputs, candidate.outputs)
    if metric == "cosine_mean":  # no labelled data: the metric is the fidelity to the original itself
        a[metric], b[metric] = 1.0, faithful["cosine_mean"]
    drop = float(a[metric]) - float(b[metric])
    within = drop <= spec.max_metric_drop + 1e-12

    def ratio(x: Any, y: Any) -> float | None:
        return float(x) / float(y) if x and y else None

    return {
        "method": method,
        "source": {"model": mv.model, "version": mv.version},
        "dataset": prepared.dataset,
        "metric": metric,
        "original": a,
        "compressed": b,
        "deltas": {k: (float(b[k]) - float(a[k])) if a[k] is not None and b[k] is not None else None for k in a},
        "smaller_by": ratio(a["size_bytes"], b["size_bytes"]),
        "fewer_parameters_by": ratio(a["parameters"], b["parameters"]),
        "faster_at_batch_32_by": ratio(b["throughput_batch_32"], a["throughput_batch_32"]),
        "latency_p50_ratio": ratio(b["latency_p50_ms"], a["latency_p50_ms"]),
        "fidelity": faithful,
        "metric_drop": drop,
        "budget": spec.max_metric_drop,
        "verdict": "within budget" if within else "outside budget",
        "forced": bool(spec.force and not within),
        **(extra or {}),
    }


def derived_card(card: ModelCard, mv: ModelVersion, report: dict[str, Any], job_id: str) -> ModelCard:
    metric = report["metric"]
    what = {"prune": "pruning", "distill": "distillation"}.get(report["method"], "quantisation")
    note = (
        f"{report['method']} {what} of {mv.model} version {mv.version} by job {job_id}: "
        f"{report['smaller_by']:.2f}x smaller"
        + (
            f", {report['faster_at_batch_32_by']:.2f}x the throughput at batch 32"
            if report["faster_at_batch_32_by"]
            else ""
        )
        + f"; {metric} {report['compressed'][metric]:.4f} against {report['original'][metric]:.4f} on "
        f"{report['dataset']['name']}. "
    )
    measured = {f"{report['method'].replace('-', '_')}_{metric}": float(report["compressed"][metric])}
    return card.model_copy(
        update={
            "description": note + card.description,
            "metrics": {**card.metrics, **measured},
            "limitations": (card.limitations + " " if card.limitations else "")
            + "Compressed: outputs differ slightly from the original's (see the compression report).",
        }
    )


def dataset_record(prepared: Prepared) -> dict[str, Any]:
    return evaluate.dataset_info({**prepared.dataset, "name": prepared.dataset["name"]}, "all", prepared.eval_plan.rows)


def marker(work: Path) -> Path:
    return work / "registered.json"


def read_marker(work: Path) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = json.loads(marker(work).read_text())
    except (OSError, ValueError):
        return None
    return found


def write_marker(work: Path, result: dict[str, Any]) -> None:
    tmp = marker(work).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(marker(work))


def candidate_version(mv: ModelVersion, sha256: str, size: int, fmt: str, signature: Any) -> ModelVersion:
    """The quantised artifact as a version that serving can load but the registry does not know (version 0)."""
    return ModelVersion(
        model=mv.model,
        version=0,
        format=fmt,
        sha256=sha256,
        size_bytes=size,
        signature=signature,
        card=mv.card,
        created_at=datetime.now(UTC),
    )
