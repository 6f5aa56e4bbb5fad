"""A job's own process: ``python -m openmaas.jobs.worker JOB_ID`` (started by the runner, never by hand).

It reads the job, does the work with a checkpoint per epoch (a restarted job resumes from it), reports progress to
the job table, and ends the job as succeeded or failed with a message that says why.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from openmaas.config import Settings
from openmaas.errors import OpenMaaSError
from openmaas.jobs.compress import OutsideBudget
from openmaas.jobs.evaluate import Cancelled
from openmaas.jobs.progress import Reporter
from openmaas.store import db
from openmaas.store.tables import JobRow

log = logging.getLogger("openmaas.jobs.worker")


def run_train(settings: Settings, sessions: sessionmaker[Session], reporter: Reporter, job: JobRow) -> dict[str, Any]:
    import torch

    from openmaas.artifacts import LocalArtifactStore
    from openmaas.datasets.service import DatasetService
    from openmaas.entities.models import ModelCard
    from openmaas.jobs.specs import TrainSpec
    from openmaas.registry.inspect import inspect_in_process
    from openmaas.registry.service import ModelRegistry
    from openmaas.runtimes import RuntimeOptions
    from openmaas.store.registry import RegistryStore
    from openmaas.training import data as training_data
    from openmaas.training import export, loop, tabular

    torch.set_num_threads(settings.job_threads)
    spec = TrainSpec.model_validate(job.spec)
    artifacts = LocalArtifactStore(settings.artifacts_dir)
    datasets = DatasetService(sessions, artifacts, settings.data_dir / "cache")
    dataset = datasets.get(job.org_id, spec.dataset, any_org=job.org_id is None)
    print(f"dataset {dataset['name']} ({dataset['rows']} rows, sha256 {dataset['sha256'][:12]})", flush=True)
    from openmaas.training import images as image_training

    network: loop.Net | None = None
    example_shape: tuple[int, ...]
    encoder_dir: Path | None = None
    if spec.task == "text-classification":
        from openmaas.runtimes.sentence_transformers import SentenceTransformerRuntime

        texts, labels, classes = training_data.prepare_text(datasets.table(dataset), spec.text_column, spec.target)
        encoder = RegistryStore(sessions).get_version(spec.encoder)
        if encoder.format != SentenceTransformerRuntime.format:
            raise OpenMaaSError(f"encoder '{spec.encoder}' is not a text-embedding model")
        encoder_dir = artifacts.local_path(encoder.sha256)
        if spec.fine_tune:
            from sentence_transformers import SentenceTransformer

            from openmaas.training.text import FineTuned, token_ids

            st = SentenceTransformer(str(encoder_dir), device="cpu", local_files_only=True)
            print(f"fine-tuning {spec.encoder} version {encoder.version} on {len(texts)} texts", flush=True)
            network = FineTuned(st, len(classes), int(st.tokenizer.pad_token_id or 0))
            prepared = training_data.Prepared(token_ids(st, texts), labels, ["text"], classes)
            example_shape, input_name = (network.head.in_features,), "x"
        else:
            runtime = SentenceTransformerRuntime(encoder_dir, RuntimeOptions(torch_threads=settings.job_threads))
            runtime.load()
            print(f"embedding {len(texts)} texts with {spec.encoder} version {encoder.version}", flush=True)
            embeddings, _ = runtime.embed(texts)
            runtime.unload()
            prepared = training_data.Prepared(embeddings, labels, ["embedding"], classes)
            example_shape, input_name = (embeddings.shape[1],), "x"
    elif spec.task == "image-classification":
        prepared = training_data.prepare_images(datasets.images(dataset))
        _, c, h, w = prepared.x.shape
        network = image_training.SmallCNN(c, h, w, len(prepared.classes or []))
        example_shape, input_name = (c, h, w), "image"
    else:
        prepared = training_data.prepare(datasets.table(dataset), spec.target, spec.kind)
        example_shape, input_name = (len(prepared.features),), "x"
    data = training_data.split(prepared, spec.params, spec.kind)
    print(
        f"train {len(data['train'][0])}, validation {len(data['val'][0])}, test {len(data['test'][0])} rows; "
        f"{len(prepared.features)} features",
        flush=True,
    )
    workdir = settings.data_dir / "jobs" / job.id
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = workdir / "checkpoint.pt"
    if checkpoint.exists():
        resumed_at = int(torch.load(checkpoint, weights_only=False)["epoch"])
        print(f"resuming from the checkpoint after epoch {resumed_at}", flush=True)
        reporter.progress(resumed_at / spec.params.epochs, replace_from=resumed_at + 1)

    def on_epoch(r: loop.EpochReport) -> None:
        print(
            f"epoch {r.epoch}/{r.epochs} loss {r.loss:.4f} val_loss {r.val_loss:.4f} val_metric {r.val_metric:.4f}"
            + (" (early stop)" if r.stopped_early else ""),
            flush=True,
        )
        reporter.progress(r.epoch / r.epochs, r.to_json())

    n_classes = len(prepared.classes or [0])
    build: loop.Net | Callable[[], loop.Net] = network or (
        lambda: tabular.tabular_net(*data["train"], spec.kind, n_classes, spec.params)
    )
    if spec.params.workers > 1 and settings.backend == "ray":
        from openmaas.jobs.cluster_training import train_on_ray

        train_on_ray(settings, job.id, spec.params.workers, data, spec, n_classes, checkpoint, build)
    elif spec.params.workers > 1:
        _train_data_parallel(
            spec.params.workers, sessions, reporter, data, spec, n_classes, checkpoint, on_epoch, build
        )
    # Single process, or after the parallel workers: this resumes from (or just reads) the checkpoint.
    model = loop.train(data, spec.params, spec.kind, n_classes, checkpoint, on_epoch, build, reporter.cancelled)
    if reporter.cancelled():
        raise Cancelled()
    metrics = loop.evaluate(model, *data["test"], spec.kind)
    print(f"held-out metrics: {metrics}", flush=True)
    from openmaas.training.curves import draw_curves

    draw_curves(reporter.row().history, workdir / "curves.png", "accuracy" if spec.kind == "classification" else "R²")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        fmt = "onnx"
        if encoder_dir is not None:  # the encoder's folder plus the head: served by the sentence-transformers runtime
            import shutil

            from openmaas.runtimes.sentence_transformers import HEAD_FILE

            folder = Path(tmp) / "model"
            if spec.fine_tune:
                from openmaas.training.text import FineTuned, Head

                assert isinstance(model, FineTuned)
                model.encoder.save(str(folder), create_model_card=False)  # safetensors
                head: loop.Net = Head(model.head)
            else:
                shutil.copytree(encoder_dir, folder)
                folder.chmod(0o755)
                head = model
            path, fmt = folder, "sentence-transformers"
            export.export_onnx(head, example_shape, spec.kind, folder / HEAD_FILE, input_name)
        elif prepared.categorical:
            from openmaas.training.encoding import with_categorical_inputs

            encoded = sum(len(c) for c in prepared.categories.values())
            net_path = Path(tmp) / "net.onnx"
            export.export_onnx(model, (len(prepared.features) + encoded,), spec.kind, net_path, "features")
            names = with_categorical_inputs(net_path, len(prepared.features), prepared.categories, path)
            print(f"categorical inputs (text): {', '.join(names)}", flush=True)
        else:
            export.export_onnx(model, example_shape, spec.kind, path, input_name)
        registry = ModelRegistry(RegistryStore(sessions), artifacts, RuntimeOptions(), inspect_in_process)
        if registry.exists(spec.output_model):
            owner = registry.get_model(spec.output_model).owner_org_id
            if owner != job.org_id:
                raise OpenMaaSError(
                    f"model name '{spec.output_model}' is taken by another organisation; choose another"
                )
        scalar = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        class_note = f" Classes (label index order): {', '.join(prepared.classes)}." if prepared.classes else ""
        card = ModelCard(
            task=spec.task,
            description=f"Trained by job {job.id} on dataset {dataset['name']}: "
            + (
                f"classifies {'x'.join(map(str, example_shape[1:]))} images (input image, values 0-1)."
                if input_name == "image"
                else f"classifies text (input text) with {spec.encoder} fine-tuned on this data and a linear head; "
                "its embedding output is the tuned encoder's."
                if spec.fine_tune
                else f"classifies text (input text) with a head on {spec.encoder}'s embeddings."
                if encoder_dir is not None
                else f"predicts '{spec.target}' from {', '.join(prepared.features)} (input x, in that order)"
                + (f" and the text inputs {', '.join(prepared.categorical)}." if prepared.categorical else ".")
            )
            + class_note,
            intended_use="Predictions for data like the training set.",
            training_data=f"dataset {dataset['id']} ({dataset['rows']} rows, sha256 {dataset['sha256']}); "
            f"parameters: {spec.params.model_dump_json()}",
            metrics=scalar,
            classes=prepared.classes or [],
            limitations="Measured on a random held-out split of the same dataset only.",
        )
        mv = registry.register(
            path,
            spec.output_model,
            format=fmt,
            card=card,
            owner_org_id=job.org_id,
            visibility="private" if job.org_id else "public",
        )
    _audit_registration(settings, sessions, job, mv, {"dataset": dataset["id"], "sha256": dataset["sha256"]})
    report = _held_out_report(settings, sessions, reporter, job, spec, mv, datasets, dataset, prepared)
    return {
        "model": mv.model,
        "version": mv.version,
        "metrics": metrics,
        "features": prepared.features,
        "curves": f"/api/jobs/{job.id}/curves.png",
        "classes": prepared.classes,
        "evaluation": report,
    }


def _held_out_report(
    settings: Settings,
    sessions: sessionmaker[Session],
    reporter: Reporter,
    job: JobRow,
    spec: Any,
    mv: Any,
    datasets: Any,
    dataset: dict[str, Any],
    prepared: Any,
) -> str | None:
    """The trained version's report on the held-out split, measured like an evaluation job (through the serving
    path); returns its URL. A failure here is reported and leaves the trained model as registered."""
    from openmaas.entities.tables import Images
    from openmaas.jobs import evaluate
    from openmaas.jobs.specs import EvaluateSpec
    from openmaas.runtimes import runtime_class
    from openmaas.training import data as training_data

    _, _, test_rows = training_data.split_rows(prepared, spec.params, spec.kind)
    split = f"held-out {spec.params.test_split:g} (seed {spec.params.seed})"
    try:
        data = evaluate.load_data(datasets, dataset)
        held_out = (
            Images(data.x[test_rows], [data.labels[i] for i in test_rows], data.classes, data.mode)
            if isinstance(data, Images)
            else evaluate.subset(data, test_rows)  # type: ignore[arg-type]
        )
        ev_spec = EvaluateSpec(
            model=mv.model,
            version=mv.version,
            dataset=dataset["id"],
            task=spec.kind,
            target=spec.target,
            text_column=spec.text_column,
            classes=prepared.classes,
        )
        the_plan = evaluate.plan(ev_spec, mv, runtime_class(mv.format).serves, held_out)
        stored = evaluate_registered(
            settings, sessions, reporter, job, mv, the_plan, dataset, split, 64, lambda f: None
        )
    except Cancelled:
        raise
    except Exception as e:  # the model is trained and registered; say why it has no report
        traceback.print_exc()
        print(f"warning: the held-out report could not be measured: {e}", flush=True)
        return None
    print(f"held-out report: {stored['id']} (accuracy/r2 as served: {_headline(stored)})", flush=True)
    return f"/api/models/{mv.model}/versions/{mv.version}/evaluations/{stored['id']}"


def _headline(report: dict[str, Any]) -> str:
    from openmaas.evaluation.metrics import headline

    main = headline(report["task"], report["metrics"])
    return f"{main[0]} {report['metrics'][main[0]]:.4f}" if main else "-"


def _train_data_parallel(
    workers: int,
    sessions: sessionmaker[Session],
    reporter: Reporter,
    data: dict[str, Any],
    spec: Any,
    n_classes: int,
    checkpoint: Path,
    on_epoch: Any,
    network: Any,
) -> None:
    """``workers`` forked processes joined in a gloo group on this machine (Ray Train drives the same loop on a
    cluster); rank 0 checkpoints and reports, every epoch report lists each worker's loss."""
    import socket

    import torch
    import torch.distributed as dist
    from torch.multiprocessing.spawn import start_processes

    from openmaas.training import loop

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"training data-parallel on {workers} workers (gloo)", flush=True)

    def rank_main(rank: int) -> None:
        sessions.kw["bind"].dispose(close=False)  # the parent's pooled connections are not this process's
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=workers)
        try:
            loop.train(
                data,
                spec.params,
                spec.kind,
                n_classes,
                checkpoint,
                on_epoch if rank == 0 else (lambda r: None),
                network,
                reporter.cancelled,
                rank,
                workers,
            )
        finally:
            dist.destroy_process_group()

    start_processes(rank_main, nprocs=workers, join=True, start_method="fork")  # type: ignore[no-untyped-call]


def _backend_factory(settings: Settings, sessions: sessionmaker[Session]) -> Callable[[], Any]:
    """The serving backend the server would build, in this worker (with the job threads, at job priority)."""
    from dataclasses import replace

    from openmaas.artifacts import LocalArtifactStore
    from openmaas.serving.local import local_backend, runtime_options
    from openmaas.store.registry import RegistryStore
    from openmaas.telemetry import Metrics

    artifacts = LocalArtifactStore(settings.artifacts_dir)
    store = RegistryStore(sessions)
    # Copies stay in this process: the job is one caller, and its report measures this process's memory.
    options = replace(
        runtime_options(settings),
        torch_threads=settings.job_threads,
        onnx_threads=settings.job_threads,
        copy_processes=False,
    )
    return lambda: local_backend(
        settings,
        options,
        lambda mv: artifacts.local_path(mv.sha256),
        lambda mv: store.get_model(mv.model).serving,
        Metrics(),
    )


def evaluate_registered(
    settings: Settings,
    sessions: sessionmaker[Session],
    reporter: Reporter,
    job: JobRow,
    mv: Any,
    the_plan: Any,
    dataset: dict[str, Any],
    split: str,
    batch: int,
    report_progress: Callable[[float], None],
) -> dict[str, Any]:
    """Measure ``mv`` on ``the_plan`` through the serving path and store the report with the version."""
    from openmaas.jobs import evaluate

    report = evaluate.run(
        _backend_factory(settings, sessions), mv, the_plan, batch, report_progress, reporter.cancelled
    )
    return _store_report(settings, sessions, job, mv, report, evaluate.dataset_info(dataset, split, the_plan.rows))


def _store_report(
    settings: Settings, sessions: sessionmaker[Session], job: JobRow, mv: Any, report: Any, dataset: dict[str, Any]
) -> dict[str, Any]:
    """A measured report stored with the version it measured (by the job, for the job's organisation)."""
    from openmaas.artifacts import LocalArtifactStore
    from openmaas.evaluation import machine
    from openmaas.registry.evaluations import EvaluationService

    return EvaluationService(sessions, LocalArtifactStore(settings.artifacts_dir)).add(
        mv.model,
        mv.version,
        org_id=job.org_id,
        job_id=job.id,
        task=report.task,
        dataset=dataset,
        metrics=report.metrics,
        performance=report.performance,
        machine=machine.describe(settings.job_threads),
        plots=report.plots,
    )


def run_evaluate(
    settings: Settings, sessions: sessionmaker[Session], reporter: Reporter, job: JobRow
) -> dict[str, Any]:
    from openmaas.artifacts import LocalArtifactStore
    from openmaas.datasets.service import DatasetService
    from openmaas.jobs import evaluate
    from openmaas.jobs.specs import EvaluateSpec
    from openmaas.registry.evaluations import EvaluationService
    from openmaas.runtimes import runtime_class
    from openmaas.store.registry import RegistryStore

    spec = EvaluateSpec.model_validate(job.spec)
    artifacts = LocalArtifactStore(settings.artifacts_dir)
    store = RegistryStore(sessions)
    mv = store.get_version(spec.model, spec.version)
    done = EvaluationService(sessions, artifacts).for_job(job.id)
    if done is not None:  # a restarted job whose report was stored before the worker died
        print(f"the report of this job is already stored ({done['id']})", flush=True)
        report = done
    else:
        datasets = DatasetService(sessions, artifacts, settings.data_dir / "cache")
        dataset = datasets.get(job.org_id, spec.dataset, any_org=job.org_id is None)
        reference = store.get_version(spec.model, spec.reference_version) if spec.reference_version else None
        the_plan = evaluate.plan(
            spec, mv, runtime_class(mv.format).serves, evaluate.load_data(datasets, dataset), reference
        )
        print(
            f"evaluating {mv.model} version {mv.version} as {the_plan.task} on dataset {dataset['name']} "
            f"({the_plan.rows} rows, sha256 {dataset['sha256'][:12]})",
            flush=True,
        )
        report = evaluate_registered(
            settings, sessions, reporter, job, mv, the_plan, dataset, "all", spec.batch_size, reporter.progress
        )
    figures = {k: v for k, v in report["metrics"].items() if isinstance(v, int | float)}
    print(f"metrics: {figures}", flush=True)
    print(
        "performance: " + ", ".join(f"{k} {v:.4g}" for k, v in report["performance"].items() if isinstance(v, float)),
        flush=True,
    )
    return {
        "model": mv.model,
        "version": mv.version,
        "evaluation": report["id"],
        "task": report["task"],
        "metrics": figures,
        "performance": {k: v for k, v in report["performance"].items() if isinstance(v, int | float)},
        "report": f"/api/models/{mv.model}/versions/{mv.version}/evaluations/{report['id']}",
        "plots": report["plots"],
    }


def _audit_registration(
    settings: Settings, sessions: sessionmaker[Session], job: JobRow, new: Any, made_from: dict[str, Any]
) -> None:
    """Who made what from what: the job's registration in the audit chain, by the key that submitted the job."""
    from openmaas.audit import AuditLog
    from openmaas.audit.log import Actor

    if settings.secret_key is not None:
        secret = settings.secret_key.get_secret_value().encode()
    else:
        secret = (settings.data_dir / "secret.key").read_bytes().strip()
    from sqlalchemy.exc import IntegrityError

    log_ = AuditLog(sessions, secret)
    for attempt in range(5):  # the server may append the same sequence number at the same moment: try the next
        try:
            log_.append(
                Actor(kind="job", key_id=job.key_id),
                "model.register",
                f"model:{new.model}",
                org_id=job.org_id,
                after={
                    "version": new.version,
                    "format": new.format,
                    "sha256": new.sha256,
                    "job": job.id,
                    "job_type": job.type,
                    "from": made_from,
                },
            )
            return
        except IntegrityError:
            time.sleep(0.05 * (attempt + 1))
    print("warning: the registration could not be written to the audit log", flush=True)


def _compression_setup(
    settings: Settings, sessions: sessionmaker[Session], job: JobRow, model: str, version: int | None
) -> Any:
    """What every compression job starts from: the version and its artifact, the stores, the job's folder (and the
    result a rerun finds there if it registered before its worker died), torch on the job threads."""
    from types import SimpleNamespace

    import torch

    from openmaas.artifacts import LocalArtifactStore
    from openmaas.datasets.service import DatasetService
    from openmaas.jobs import compress
    from openmaas.store.registry import RegistryStore

    torch.set_num_threads(settings.job_threads)  # exports, fine-tuning and students run in this process
    artifacts = LocalArtifactStore(settings.artifacts_dir)
    store = RegistryStore(sessions)
    work = settings.data_dir / "jobs" / job.id
    work.mkdir(parents=True, exist_ok=True)
    done = compress.read_marker(work)
    if done is not None:
        print(f"already registered as {done['model']} version {done['version']}", flush=True)
    mv = store.get_version(model, version)
    return SimpleNamespace(
        done=done,
        artifacts=artifacts,
        store=store,
        mv=mv,
        source=artifacts.local_path(mv.sha256),
        work=work,
        datasets=DatasetService(sessions, artifacts, settings.data_dir / "cache"),
    )


def _finish_compression(
    settings: Settings,
    sessions: sessionmaker[Session],
    reporter: Reporter,
    job: JobRow,
    spec: Any,
    env: Any,
    prepared: Any,
    path: Path,
    fmt: str,
    method: str,
    extra: Callable[[Any], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Measure the original and the result (from the artifact store, unregistered) on the same rows through the
    serving path, then register the result within the budget (or forced) with both reports; else fail with the
    report and leave nothing behind."""
    from sqlalchemy import func

    from openmaas.jobs import compress, evaluate
    from openmaas.registry.inspect import inspect_in_process
    from openmaas.registry.service import ModelRegistry
    from openmaas.runtimes import RuntimeOptions
    from openmaas.store.tables import ModelVersionRow

    mv, artifacts, store = env.mv, env.artifacts, env.store
    if reporter.cancelled():
        raise Cancelled()
    artifact = artifacts.put(path)
    candidate = compress.candidate_version(
        mv, artifact.sha256, artifact.size_bytes, fmt, inspect_in_process(fmt, path, RuntimeOptions())
    )
    print(
        f"{method}: {artifact.size_bytes:,} bytes (from {mv.size_bytes:,}); measuring both on "
        f"{prepared.dataset['name']} ({prepared.eval_plan.rows} rows)",
        flush=True,
    )
    start = float(reporter.row().progress)
    original, result = evaluate.run_many(
        _backend_factory(settings, sessions),
        [(mv, prepared.eval_plan), (candidate, prepared.eval_plan)],
        32,
        lambda f: reporter.progress(start + (0.98 - start) * f),
        reporter.cancelled,
    )
    report = compress.compression_report(spec, prepared, original, result, mv, method, extra(result) if extra else None)
    metric = report["metric"]
    print(
        f"{metric}: {report['original'][metric]:.4f} -> {report['compressed'][metric]:.4f} "
        f"(drop {report['metric_drop']:.4f}, budget {report['budget']}); {report['smaller_by']:.2f}x smaller; "
        f"fidelity {report['fidelity']}; {report['verdict']}",
        flush=True,
    )
    if report["verdict"] != "within budget" and not spec.force:
        with sessions() as s:
            used = s.scalar(
                select(func.count())
                .select_from(ModelVersionRow)
                .where(ModelVersionRow.artifact_sha256 == artifact.sha256)
            )
        if not used:
            artifacts.delete(artifact.sha256)
        raise compress.OutsideBudget(
            f"{metric} dropped by {report['metric_drop']:.4f}, more than max_metric_drop {spec.max_metric_drop}: "
            'nothing was registered (send "force": true to register it anyway)',
            {"report": report},
        )
    registry = ModelRegistry(store, artifacts, RuntimeOptions(), inspect_in_process)
    name = spec.output_model or mv.model
    owner = store.get_model(mv.model).owner_org_id if spec.output_model is None else job.org_id
    card = compress.derived_card(mv.card, mv, report, job.id)
    if prepared.eval_plan.labelled is not None and prepared.eval_plan.labelled.classes:
        card = card.model_copy(update={"classes": prepared.eval_plan.labelled.classes})
    new = registry.register(
        path, name, format=fmt, card=card, owner_org_id=owner, visibility="private" if owner else "public"
    )
    _audit_registration(settings, sessions, job, new, {"model": mv.model, "version": mv.version, "method": method})
    dataset = compress.dataset_record(prepared)
    urls = {}
    for which, version, measured in (("original", mv, original), ("compressed", new, result)):
        stored = _store_report(settings, sessions, job, version, measured, dataset)
        urls[which] = f"/api/models/{version.model}/versions/{version.version}/evaluations/{stored['id']}"
    out = {
        "model": new.model,
        "version": new.version,
        "metrics": {metric: report["compressed"][metric]},
        "report": report,
        "evaluations": urls,
    }
    compress.write_marker(env.work, out)
    return out


def run_quantize(
    settings: Settings, sessions: sessionmaker[Session], reporter: Reporter, job: JobRow
) -> dict[str, Any]:
    from openmaas.jobs import compress
    from openmaas.jobs.specs import QuantizeSpec

    spec = QuantizeSpec.model_validate(job.spec)
    env = _compression_setup(settings, sessions, job, spec.model, spec.version)
    if env.done is not None:  # registered before the worker died: the same result, not a second version
        return dict(env.done)
    mv = env.mv
    prepared = compress.prepare(spec, mv, env.datasets, job.org_id, job.org_id is None)
    print(f"quantizing {mv.model} version {mv.version} ({mv.format}) with {spec.method}", flush=True)
    reporter.progress(0.02)
    path, fmt = compress.build_candidate(spec, env.source, env.work, prepared.calibration)
    reporter.progress(0.3)
    out = _finish_compression(settings, sessions, reporter, job, spec, env, prepared, path, fmt, spec.method)
    shutil.rmtree(env.work / "int8", ignore_errors=True)
    return out


def _fine_tune(
    reporter: Reporter,
    split: Any,
    build: Callable[[], Any],
    params: Any,
    checkpoint: Path,
    lo: float,
    hi: float,
    soft: Any = None,
) -> Any:
    from openmaas.training import loop

    def on_epoch(r: loop.EpochReport) -> None:
        print(
            f"epoch {r.epoch}/{r.epochs} loss {r.loss:.4f} val_loss {r.val_loss:.4f} val_accuracy {r.val_metric:.4f}",
            flush=True,
        )
        reporter.progress(lo + (hi - lo) * r.epoch / r.epochs, r.to_json())

    model = loop.train(
        split.data, params, "classification", len(split.classes), checkpoint, on_epoch, build, reporter.cancelled,
        soft_targets=soft,
    )  # fmt: skip
    if reporter.cancelled():
        raise Cancelled()
    return model


def run_prune(settings: Settings, sessions: sessionmaker[Session], reporter: Reporter, job: JobRow) -> dict[str, Any]:
    import torch

    from openmaas.compression import networks
    from openmaas.jobs import compress
    from openmaas.jobs.specs import PruneSpec
    from openmaas.training.export import export_onnx
    from openmaas.training.optim import TrainParams

    spec = PruneSpec.model_validate(job.spec)
    env = _compression_setup(settings, sessions, job, spec.model, spec.version)
    if env.done is not None:
        return dict(env.done)
    mv, source = env.mv, env.source
    prepared, split = compress.prepare_network(spec, mv, source, env.datasets, job.org_id, job.org_id is None)
    example = torch.from_numpy(split.data["train"][0][:2])
    original = networks.from_onnx(source.read_bytes())
    flops_before, params_before = networks.flops_and_parameters(original, example)
    kind = "structured" if spec.structured else "unstructured"
    print(
        f"pruning {mv.model} version {mv.version}: {kind}, sparsity {spec.sparsity}, then {spec.fine_tune_epochs} "
        f"epochs of fine-tuning on {len(split.data['train'][0])} rows",
        flush=True,
    )

    def build() -> networks.Classifier:  # deterministic: a resumed job rebuilds the same pruned network
        model = networks.from_onnx(source.read_bytes())
        if spec.structured:
            networks.prune_structured(model, spec.sparsity, example)
        else:
            networks.prune_unstructured(model, spec.sparsity)
        return model

    params = TrainParams(
        epochs=max(1, spec.fine_tune_epochs), learning_rate=spec.learning_rate, seed=spec.seed, patience=5,
        monitor="val_metric",
    )  # fmt: skip
    reporter.progress(0.02)
    if spec.fine_tune_epochs:
        model = _fine_tune(reporter, split, build, params, env.work / "checkpoint.pt", 0.02, 0.6)
    else:
        model = build()
    if not spec.structured:
        networks.finish_unstructured(model)
    model.eval()
    flops_after, params_after = networks.flops_and_parameters(model, example)
    path = env.work / "pruned.onnx"
    export_onnx(model, split.shape, "classification", path, split.input_name)
    dense = source.read_bytes()
    pruned = path.read_bytes()
    sparsity = networks.sparsity_of(model)

    def extra(_: Any) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pruning": kind,
            "sparsity_asked": spec.sparsity,
            "weights_zero": sparsity,
            "flops": {"original": flops_before, "pruned": flops_after, "fewer_by": flops_before / max(1, flops_after)},
            "nonzero_parameters": {"original": params_before, "pruned": round(params_after * (1 - sparsity))},
            "fine_tune_epochs": spec.fine_tune_epochs,
        }
        if not spec.structured:
            out["note"] = (
                "unstructured pruning zeroes single weights: the served ONNX file is dense, so it is neither "
                "smaller nor faster than the original; only compressed storage gains (gzip sizes below). Use "
                '"structured": true to remove whole channels and units.'
            )
            out["gzip_bytes"] = {"original": networks.gzip_size(dense), "pruned": networks.gzip_size(pruned)}
        return out

    return _finish_compression(settings, sessions, reporter, job, spec, env, prepared, path, "onnx", "prune", extra)


def run_distill(settings: Settings, sessions: sessionmaker[Session], reporter: Reporter, job: JobRow) -> dict[str, Any]:

    from openmaas.compression import networks
    from openmaas.jobs import compress, evaluate
    from openmaas.jobs.specs import DistillSpec
    from openmaas.training.export import export_onnx
    from openmaas.training.optim import TrainParams

    spec = DistillSpec.model_validate(job.spec)
    env = _compression_setup(settings, sessions, job, spec.teacher, spec.teacher_version)
    if env.done is not None:
        return dict(env.done)
    mv, source = env.mv, env.source
    if compress.is_encoder(mv):
        return _distill_encoder(settings, sessions, reporter, job, spec, env, source)
    prepared, split = compress.prepare_network(spec, mv, source, env.datasets, job.org_id, job.org_id is None)
    x_train = split.data["train"][0]
    print(
        f"distilling {mv.model} version {mv.version} into a student {spec.student} on {len(x_train)} rows", flush=True
    )
    soft = evaluate.scores(_backend_factory(settings, sessions), mv, {split.input_name: x_train}, "probabilities")
    reporter.progress(0.05)

    def build() -> networks.Classifier:
        return networks.student(split.shape, len(split.classes), spec.student, x_train)

    params = TrainParams(
        epochs=spec.epochs, learning_rate=spec.learning_rate, seed=spec.seed, monitor="val_metric",
        patience=spec.patience,
    )  # fmt: skip
    model = _fine_tune(
        reporter, split, build, params, env.work / "checkpoint.pt", 0.05, 0.6, (soft, spec.temperature, spec.alpha)
    ).eval()
    path = env.work / "student.onnx"
    export_onnx(model, split.shape, "classification", path, split.input_name)
    extra = {"student": spec.student, "temperature": spec.temperature, "alpha": spec.alpha, "epochs": spec.epochs}
    return _finish_compression(
        settings, sessions, reporter, job, spec, env, prepared, path, "onnx", "distill", lambda _: extra
    )


def _distill_encoder(
    settings: Settings,
    sessions: sessionmaker[Session],
    reporter: Reporter,
    job: JobRow,
    spec: Any,
    env: Any,
    source: Path,
) -> dict[str, Any]:
    """A text encoder with fewer layers, trained towards the teacher's embeddings (taken through serving)."""
    from openmaas.compression import encoders
    from openmaas.jobs import compress, evaluate

    mv = env.mv
    prepared, texts = compress.prepare_encoder_distillation(
        spec, mv, source, env.datasets, job.org_id, job.org_id is None
    )
    layers = int(spec.student["layers"])
    print(f"distilling {mv.model} version {mv.version} into {layers} layers on {len(texts)} texts", flush=True)
    array = np.array([t.encode("utf-8") for t in texts], dtype=object)
    targets = evaluate.scores(_backend_factory(settings, sessions), mv, {"text": array}, "embedding")
    reporter.progress(0.05)

    def on_epoch(epoch: int, loss: float) -> None:
        print(f"epoch {epoch}/{spec.epochs} cosine loss {loss:.5f}", flush=True)
        reporter.progress(0.05 + 0.55 * epoch / spec.epochs, {"epoch": epoch, "loss": round(loss, 6)})

    out = env.work / "student"
    shutil.rmtree(out, ignore_errors=True)
    encoders.distil(
        source, out, layers, texts, targets, epochs=spec.epochs, learning_rate=spec.learning_rate, seed=spec.seed,
        on_epoch=on_epoch, cancelled=reporter.cancelled,
    )  # fmt: skip
    if reporter.cancelled():
        raise Cancelled()
    extra = {"student": spec.student, "epochs": spec.epochs, "texts": len(texts)}
    result = _finish_compression(
        settings, sessions, reporter, job, spec, env, prepared, out, "sentence-transformers", "distill",
        lambda _: extra,
    )  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    return result


RUNNERS = {
    "train": run_train,
    "evaluate": run_evaluate,
    "quantize": run_quantize,
    "prune": run_prune,
    "distill": run_distill,
}


def meter(engine: Any, job: JobRow, seconds: float, outcome: str, result: dict[str, Any] | None) -> None:
    """The run's usage record (protocol ``job``): the seconds the worker ran, once per attempt (keyed by the job
    and attempt), on the model the job made or worked on. Not a request: no request quota or price counts it."""
    import math

    from openmaas.metering.records import UsageRecord
    from openmaas.metering.writer import GroupCommitWriter

    spec = job.spec
    model = (result or {}).get("model") or spec.get("model") or spec.get("teacher") or spec.get("output_model")
    version = (result or {}).get("version") or spec.get("version") or spec.get("teacher_version") or 0
    record = UsageRecord(
        request_id=f"job-{job.id}-{job.attempts}",
        org_id=job.org_id,
        key_id=job.key_id or "",
        model=str(model or job.type)[:200],
        version=int(version),
        protocol="job",
        latency_ms=seconds * 1000,
        requests=0,
        job_seconds=max(1, math.ceil(seconds)),
        outcome=outcome,
    )
    writer = GroupCommitWriter(engine)
    try:
        writer.write([record])
    except Exception:  # the job's own outcome stands; the log says its run went unmetered
        traceback.print_exc()
        print("warning: this run could not be metered", flush=True)
    finally:
        writer.close()


def main(job_id: str) -> int:
    settings = Settings()
    engine = db.create_db_engine(settings.resolved_database_url)
    sessions = db.session_factory(engine)
    reporter = Reporter(sessions, job_id)
    job = reporter.row()
    print(f"{datetime.now(UTC).isoformat()} job {job_id} ({job.type}), attempt {job.attempts}", flush=True)
    started = time.monotonic()
    outcome, result, code = "failed", None, 1
    try:
        result = RUNNERS[job.type](settings, sessions, reporter, job)
    except Cancelled:
        reporter.finish("cancelled", error="cancelled while running")
        outcome, code = "cancelled", 0
    except OutsideBudget as e:
        print(f"failed: {e.message}", flush=True)
        reporter.finish("failed", error=e.message, result=e.result)
    except OpenMaaSError as e:
        print(f"failed: {e.message}", flush=True)
        reporter.finish("failed", error=e.message)
    except Exception as e:
        traceback.print_exc()
        reporter.finish("failed", error=f"internal error ({type(e).__name__}): {e}"[:2000])
    else:
        print(f"done in {time.monotonic() - started:.1f} s: {result['model']} version {result['version']}", flush=True)
        reporter.finish("succeeded", result=result)
        outcome, code = "completed", 0
    meter(engine, job, time.monotonic() - started, outcome, result)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
