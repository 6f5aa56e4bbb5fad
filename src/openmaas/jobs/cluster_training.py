"""Data-parallel training on the Ray cluster (cluster mode): Ray Train's ``TorchTrainer`` drives the same training
loop (``training/loop.py``) on ``workers`` Ray Train workers spread over the nodes.

The job's worker process (``jobs/worker.py``) is the Ray driver, with the job's id in its Ray job metadata
(``openmaas_job``). Ray Train sets up the gloo process group; rank 0 writes progress into the job's row and the
checkpoint into the job's folder (on the shared data folder), and every rank reports each epoch to Ray Train with
rank 0's checkpoint attached. When a node is lost, Ray Train restarts the worker group (``FailureConfig``) on the
nodes left and the loop resumes from the last checkpoint; the job's process then reads the finished checkpoint,
evaluates and registers the model once, as a single-process job does.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from openmaas.config import Settings

#: Rank 0 appends a line here each time the worker group starts (the job's folder; the driver reads it).
ATTEMPTS_FILE = "ray-train-runs.jsonl"
#: How many times Ray Train restarts the worker group after a worker (or its node) is lost.
MAX_FAILURES = 3


def train_on_ray(
    settings: Settings,
    job_id: str,
    workers: int,
    data: dict[str, Any],
    spec: Any,
    n_classes: int,
    checkpoint: Path,
    network: Any,
) -> None:
    import ray
    from ray.job_config import JobConfig
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(
            address=settings.ray_address,
            namespace="openmaas",
            log_to_driver=False,
            job_config=JobConfig(metadata={"openmaas_job": job_id}),
        )
    database_url = settings.resolved_database_url
    threads = settings.job_threads

    def per_worker(config: dict[str, Any]) -> None:
        _train_worker(job_id, database_url, threads, data, spec, n_classes, checkpoint, network)

    print(
        f"training data-parallel on {workers} Ray Train workers (TorchTrainer, gloo, spread over the nodes)", flush=True
    )
    trainer = TorchTrainer(
        per_worker,
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}, placement_strategy="SPREAD"
        ),
        run_config=RunConfig(
            name=f"openmaas-{job_id}",
            storage_path=str((settings.data_dir / "ray-train").resolve()),
            failure_config=FailureConfig(max_failures=MAX_FAILURES),
        ),
    )
    attempts = checkpoint.parent / ATTEMPTS_FILE
    attempts.unlink(missing_ok=True)
    trainer.fit()
    runs = [json.loads(line) for line in attempts.read_text().splitlines()] if attempts.exists() else []
    for i, run in enumerate(runs[1:], start=2):
        print(
            f"Ray Train restarted the worker group (run {i}, after a worker or its node was lost): it resumed from "
            f"the checkpoint after epoch {run['resumed_after']}",
            flush=True,
        )


def _train_worker(
    job_id: str,
    database_url: str,
    threads: int,
    data: dict[str, Any],
    spec: Any,
    n_classes: int,
    checkpoint: Path,
    network: Any,
) -> None:
    """One Ray Train worker: this rank's share of every batch; rank 0 reports progress and checkpoints."""
    import ray
    import ray.train
    import torch

    from openmaas.jobs.progress import Reporter
    from openmaas.store import db
    from openmaas.training import loop

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, threads // world))
    reporter = Reporter(db.session_factory(db.create_db_engine(database_url)), job_id) if rank == 0 else None
    if rank == 0:
        resumed = int(torch.load(checkpoint, weights_only=False)["epoch"]) if checkpoint.exists() else 0  # our file
        with (checkpoint.parent / ATTEMPTS_FILE).open("a") as f:  # the driver reports the restarts from it
            f.write(json.dumps({"resumed_after": resumed, "node": ray.get_runtime_context().get_node_id()}) + "\n")

    def on_epoch(r: loop.EpochReport) -> None:
        assert reporter is not None
        print(f"epoch {r.epoch}/{r.epochs} loss {r.loss:.4f} val_metric {r.val_metric:.4f}", flush=True)
        reporter.progress(r.epoch / r.epochs, r.to_json(), replace_from=r.epoch)

    def after_epoch(epoch: int) -> None:
        attached = None
        if rank == 0:
            folder = checkpoint.parent / f"ray-checkpoint-{epoch}"
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy2(checkpoint, folder / checkpoint.name)
            attached = ray.train.Checkpoint.from_directory(str(folder))
        ray.train.report({"epoch": epoch}, checkpoint=attached)
        if rank == 0:
            shutil.rmtree(checkpoint.parent / f"ray-checkpoint-{epoch}", ignore_errors=True)

    cancelled: Callable[[], bool] = reporter.cancelled if reporter is not None else (lambda: False)
    loop.train(
        data,
        spec.params,
        spec.kind,
        n_classes,
        checkpoint,
        on_epoch,
        network,
        cancelled,
        rank,
        world,
        after_epoch=after_epoch,
    )
