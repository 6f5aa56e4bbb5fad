"""Evaluation jobs: a registered version scored on a dataset through the serving path, and the report stored.

``plan`` reads the dataset and builds the model's inputs and the truth (the submission runs it in the server, so
what would fail the job is a 400 now); ``measure`` runs the version through a ``LocalBackend`` of the worker's own
(the pool, batcher and runtime the server uses, so what is measured is what serves): task metrics and plots, then
latency at batch 1, throughput at the best batch, size, parameters and memory, and the machine it ran on.
Training jobs call ``evaluate_version`` on their held-out split, so every trained model has a report.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from openmaas.datasets.audio import AudioSet
from openmaas.datasets.service import DatasetService
from openmaas.entities.models import ModelVersion
from openmaas.entities.tables import Images, Table
from openmaas.errors import InvalidRequest, OpenMaaSError
from openmaas.evaluation import inputs as ev_inputs
from openmaas.evaluation import machine, plots
from openmaas.evaluation import metrics as ev_metrics
from openmaas.jobs.specs import EvaluateSpec
from openmaas.serving.local import LocalBackend
from openmaas.serving.types import InferenceRequest
from openmaas.serving.validation import validate_request

log = logging.getLogger(__name__)

#: Which tasks each way of serving can be evaluated as.
_SERVES = {
    "tensor": ("classification", "regression"),
    "embedding": ("embedding", "classification"),
    "generation": ("text-generation",),
    "speech": ("speech",),
}
_BATCHES = (1, 8, 32, 128)


class Cancelled(Exception):
    """The job was cancelled while it ran."""


@dataclass
class Plan:
    """What one evaluation will feed the model and compare against."""

    task: str
    rows: int
    labelled: ev_inputs.Labelled | None = None
    texts: list[str] | None = None
    reference: ModelVersion | None = None
    pairs: tuple[list[str], list[str], np.ndarray] | None = None
    audio: AudioSet | None = None
    notes: list[str] = field(default_factory=list)


def _head(table: Table, n: int | None) -> Table:
    if n is None or n >= table.rows:
        return table
    return Table(table.columns, {c: v[:n] for c, v in table.cells.items()}, table.kinds)


def subset(table: Table, rows: np.ndarray) -> Table:
    """The given rows of a table (training's held-out split)."""
    picked = [int(i) for i in rows]
    return Table(table.columns, {c: [v[i] for i in picked] for c, v in table.cells.items()}, table.kinds)


def plan(
    spec: EvaluateSpec,
    mv: ModelVersion,
    served_as: str,
    data: Table | Images | AudioSet,
    reference: ModelVersion | None = None,
) -> Plan:
    """Check the data against the version and build its inputs (raises InvalidRequest naming the problem)."""
    task = spec.task or ev_inputs.task_of(served_as, mv.card.task, mv.signature)
    allowed = _SERVES.get(served_as, ())
    if task not in allowed:
        raise InvalidRequest(
            f"model '{mv.model}' is served as {served_as} and can be evaluated for {', '.join(allowed)}, not {task}",
            param="task",
        )
    classes = spec.classes or mv.card.classes or None
    if task == "speech":
        if not isinstance(data, AudioSet):
            raise InvalidRequest(
                "a speech evaluation needs a zip of audio files with a file,text CSV manifest", param="dataset"
            )
        n = min(len(data.files), spec.max_rows or len(data.files))
        return Plan(task, n, audio=AudioSet(data.path, data.files[:n], data.transcripts[:n]))
    if isinstance(data, AudioSet):
        raise InvalidRequest(f"the dataset holds audio; a {task} evaluation needs a table", param="dataset")
    if isinstance(data, Images):
        if task != "classification":
            raise InvalidRequest(f"an image dataset is for classifiers, not {task}", param="dataset")
        if spec.max_rows is not None:
            data = Images(data.x[: spec.max_rows], data.labels[: spec.max_rows], data.classes, data.mode)
        labelled = ev_inputs.images(mv.signature, data, classes)
        return Plan(task, labelled.rows, labelled=labelled)
    table = _head(data, spec.max_rows)
    if table.rows == 0:
        raise InvalidRequest("the dataset has no rows", param="dataset")
    if task == "text-generation":
        return Plan(task, table.rows, texts=ev_inputs.texts(table, spec.text_column))
    if task == "embedding":
        pairs = ev_inputs.pairs(table)
        texts = ev_inputs.texts(table, spec.text_column) if reference is not None else None
        if pairs is None and reference is None:
            raise InvalidRequest(
                "an embedding evaluation needs labelled pairs (columns text1, text2, score) or a reference_version "
                "to measure fidelity against (on the text column)",
                param="dataset",
            )
        return Plan(task, table.rows, texts=texts, reference=reference, pairs=pairs)
    if served_as == "embedding":  # a text classifier: its text input from the text column
        labelled = ev_inputs.text_classifier(mv.signature, table, spec.target, spec.text_column, classes)
        return Plan(task, labelled.rows, labelled=labelled)
    labelled = ev_inputs.tabular(mv.signature, table, task, spec.target, classes)
    return Plan(task, labelled.rows, labelled=labelled)


def load_data(datasets: DatasetService, dataset: dict[str, Any]) -> Table | Images | AudioSet:
    if dataset["format"] == "images":
        return datasets.images(dataset)
    if dataset["format"] == "audio":
        return datasets.audio(dataset)
    return datasets.table(dataset)


# -- measuring --------------------------------------------------------------------------------------------------


class _Progress:
    """Progress in [start, end] of the job's bar, written at most twice a second; cancellation checked too."""

    def __init__(self, report: Callable[[float], None], cancelled: Callable[[], bool]) -> None:
        self._report = report
        self._cancelled = cancelled
        self._last = 0.0

    def __call__(self, fraction: float, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last > 0.5:
            self._last = now
            if self._cancelled():
                raise Cancelled()
            self._report(min(1.0, fraction))


@dataclass
class Report:
    task: str
    metrics: dict[str, Any]
    performance: dict[str, Any]
    plots: dict[str, bytes]
    outputs: np.ndarray | None = None


async def _run(backend: LocalBackend, mv: ModelVersion, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    request = InferenceRequest(inputs=inputs)
    rows = validate_request(mv.signature, request)
    result = await backend.infer(mv, request, rows, rows)
    return result.outputs


async def _score(
    backend: LocalBackend,
    mv: ModelVersion,
    inputs: dict[str, np.ndarray],
    output: str,
    batch: int,
    progress: Callable[[float], None],
) -> np.ndarray:
    rows = len(next(iter(inputs.values())))
    parts = []
    for start in range(0, rows, batch):
        chunk = {k: v[start : start + batch] for k, v in inputs.items()}
        parts.append((await _run(backend, mv, chunk))[output])
        progress((start + batch) / rows)
    return np.concatenate(parts)


def _ms(values: list[float]) -> tuple[float, float]:
    return float(np.percentile(values, 50) * 1000), float(np.percentile(values, 95) * 1000)


async def _speed(backend: LocalBackend, mv: ModelVersion, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Latency p50/p95 at batch 1 (a few warm-up calls first), and rows a second at the best of a few batches."""
    rows = len(next(iter(inputs.values())))
    one = {k: v[:1] for k, v in inputs.items()}
    for _ in range(3):
        await _run(backend, mv, one)
    times: list[float] = []
    deadline = time.monotonic() + 5.0
    while len(times) < 200 and (len(times) < 20 or time.monotonic() < deadline):
        t0 = time.perf_counter()
        await _run(backend, mv, one)
        times.append(time.perf_counter() - t0)
    p50, p95 = _ms(times)
    throughput: dict[str, float] = {}
    for size in _BATCHES:
        if size > rows and size != 1:
            break
        chunk = {k: v[:size] for k, v in inputs.items()}
        calls, t0 = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - t0 < 0.5:
            await _run(backend, mv, chunk)
            calls += 1
        throughput[str(size)] = calls * size / (time.perf_counter() - t0)
    best = max(throughput, key=lambda k: throughput[k])
    return {
        "latency_p50_ms": p50,
        "latency_p95_ms": p95,
        "latency_calls": len(times),
        "throughput_rows_per_s": throughput[best],
        "best_batch": int(best),
        "throughput_by_batch": throughput,
    }


async def _embed(
    backend: LocalBackend, mv: ModelVersion, texts: list[str], batch: int, progress: Callable[[float], None]
) -> np.ndarray:
    array = np.array([t.encode("utf-8") for t in texts], dtype=object)
    return await _score(backend, mv, {"text": array}, "embedding", batch, progress)


async def measure(
    backend: LocalBackend, mv: ModelVersion, plan: Plan, batch: int, progress: Callable[[float, bool], None]
) -> Report:
    """Score ``mv`` (progress to 0.8), then its speed and footprint."""
    metrics: dict[str, Any] = {}
    performance: dict[str, Any] = {}
    drawn: dict[str, bytes] = {}
    outputs: np.ndarray | None = None  # what was scored (probabilities, predictions, embeddings), for fidelity
    title = f"{mv.model} v{mv.version}"

    def part(lo: float, hi: float) -> Callable[[float], None]:
        return lambda f: progress(lo + (hi - lo) * f, False)

    if plan.labelled is not None:
        labelled = plan.labelled
        if plan.task == "classification":
            probs = outputs = await _score(backend, mv, labelled.inputs, "probabilities", batch, part(0, 0.8))
            assert labelled.classes is not None
            metrics = ev_metrics.classification(labelled.y, probs, labelled.classes)
            drawn["confusion_matrix"] = plots.confusion(metrics["confusion_matrix"], labelled.classes, title)
            if len(np.unique(labelled.y)) > 1:
                drawn["roc"] = plots.roc(labelled.y, probs, labelled.classes, title)
                drawn["precision_recall"] = plots.precision_recall(labelled.y, probs, labelled.classes, title)
        else:
            output = ev_inputs.regression_output(mv.signature)
            pred = outputs = (await _score(backend, mv, labelled.inputs, output, batch, part(0, 0.8))).reshape(-1)
            metrics = ev_metrics.regression(labelled.y, pred.astype(np.float64))
            drawn["residuals"] = plots.residuals(labelled.y, pred.astype(np.float64), title)
        metrics["rows"] = labelled.rows
        progress(0.8, True)
        performance = await _speed(backend, mv, labelled.inputs)
    elif plan.task == "embedding":
        if plan.texts is not None:
            outputs = await _embed(backend, mv, plan.texts, batch, part(0, 0.3))
            metrics["texts"] = len(plan.texts)
            if plan.reference is not None:
                theirs = await _embed(backend, plan.reference, plan.texts, batch, part(0.3, 0.6))
                metrics.update(ev_metrics.fidelity(outputs, theirs))
                metrics["reference_version"] = plan.reference.version
        if plan.pairs is not None:
            first, second, scores = plan.pairs
            a = await _embed(backend, mv, first, batch, part(0.6, 0.7))
            b = await _embed(backend, mv, second, batch, part(0.7, 0.8))
            metrics.update(ev_metrics.pair_correlation(a, b, scores))
        progress(0.8, True)
        texts = plan.texts or plan.pairs[0]  # type: ignore[index]
        performance = await _speed(backend, mv, {"text": np.array([t.encode() for t in texts], dtype=object)})
    elif plan.task == "text-generation":
        assert plan.texts is not None
        nll, tokens, times = [], [], []
        for i, text in enumerate(plan.texts):
            t0 = time.perf_counter()
            [(n, t)] = await backend.log_likelihoods(mv, [text])
            times.append(time.perf_counter() - t0)
            nll.append(n)
            tokens.append(t)
            progress(0.9 * (i + 1) / len(plan.texts), False)
        metrics = {**ev_metrics.perplexity(nll, tokens), "texts": len(plan.texts)}
        p50, p95 = _ms(times)
        performance = {
            "latency_p50_ms": p50,
            "latency_p95_ms": p95,
            "scored_tokens_per_s": sum(tokens) / max(sum(times), 1e-9),
            "note": "latency of scoring one text (a forward pass), not of generating",
        }
    else:
        assert plan.audio is not None
        hypotheses, times, seconds = [], [], 0.0
        for i in range(len(plan.audio.files)):
            name = plan.audio.files[i]
            try:
                clip = backend.decode_audio(plan.audio.read(i))
            except InvalidRequest as e:
                raise OpenMaaSError(f"clip '{name}' of the dataset: {e.message}") from None
            t0 = time.perf_counter()
            transcript = await backend.transcribe(mv, clip, language=None, prompt=None, temperature=0.0)
            times.append(time.perf_counter() - t0)
            seconds += clip.seconds
            hypotheses.append(transcript.text)
            progress(0.9 * (i + 1) / len(plan.audio.files), False)
        metrics = ev_metrics.word_error_rate(plan.audio.transcripts, hypotheses)
        metrics["examples"] = [
            {"file": f, "reference": r, "hypothesis": h}
            for f, r, h in list(zip(plan.audio.files, plan.audio.transcripts, hypotheses, strict=True))[:10]
        ]
        p50, p95 = _ms(times)
        performance = {
            "latency_p50_ms": p50,
            "latency_p95_ms": p95,
            "audio_seconds": seconds,
            "real_time_factor": sum(times) / max(seconds, 1e-9),
            "note": "latency of transcribing one clip",
        }
    footprint = await backend.footprint(mv)
    performance.update(
        {
            "size_bytes": mv.size_bytes,
            "parameters": footprint.parameters,
            "memory_bytes": footprint.memory_bytes,
            "peak_rss_bytes": machine.peak_rss_bytes(),
        }
    )
    progress(1.0, True)
    return Report(plan.task, metrics, performance, drawn, outputs)


def dataset_info(dataset: dict[str, Any], split: str, rows: int) -> dict[str, Any]:
    return {
        "id": dataset["id"],
        "name": dataset["name"],
        "sha256": dataset["sha256"],
        "rows": rows,
        "split": split,
    }


def scores(
    backend_factory: Callable[[], LocalBackend], mv: ModelVersion, inputs: dict[str, np.ndarray], output: str
) -> np.ndarray:
    """One output of ``mv`` for every row of ``inputs``, through the serving path (a teacher's soft targets)."""

    async def main() -> np.ndarray:
        backend = backend_factory()
        try:
            return await _score(backend, mv, inputs, output, 64, lambda f: None)
        finally:
            await backend.close()

    return asyncio.run(main())


def run(
    backend_factory: Callable[[], LocalBackend],
    mv: ModelVersion,
    the_plan: Plan,
    batch: int,
    report: Callable[[float], None],
    cancelled: Callable[[], bool],
) -> Report:
    """Measure on an event loop of its own (the worker has no other)."""
    return run_many(backend_factory, [(mv, the_plan)], batch, report, cancelled)[0]


def run_many(
    backend_factory: Callable[[], LocalBackend],
    items: list[tuple[ModelVersion, Plan]],
    batch: int,
    report: Callable[[float], None],
    cancelled: Callable[[], bool],
) -> list[Report]:
    """Measure several versions one after the other on one backend; progress is shared out between them."""
    progress = _Progress(report, cancelled)

    async def main() -> list[Report]:
        backend = backend_factory()
        out = []
        try:
            for i, (mv, the_plan) in enumerate(items):

                def share(f: float, force: bool = False, i: int = i) -> None:
                    progress((i + f) / len(items), force)

                out.append(await measure(backend, mv, the_plan, batch, share))
                await backend.unload(mv.model, mv.version)
        finally:
            await backend.close()
        return out

    return asyncio.run(main())
