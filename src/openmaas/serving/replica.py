"""One Ray Serve replica of cluster mode: a ``LocalBackend`` (residency pool, batcher, engines) in a Ray worker.

``RayBackend`` (``serving/ray.py``) deploys this class at run time, either for one model (a deployment of its own)
or for a runtime family (a shared deployment: Serve's multiplexing only routes a model's calls to the replicas that
have it, while this replica's ``ResidencyPool`` decides what stays loaded within its byte budget, never evicting a
model with calls in flight). Batching happens here, once, in OpenMaaS's batcher; Serve's own batching is not used.

Each call carries the version and its serving settings, so a replica needs no database. The replica writes what
it holds to Redis every second (a key per replica that expires when the replica is gone); gateways read those
reports for model state, Triton statistics and ``openmaas cluster status``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray import serve

from openmaas.artifacts.store import LocalArtifactStore
from openmaas.config import Settings
from openmaas.entities.generation import TokenEvent
from openmaas.entities.models import ModelVersion, ServingConfig
from openmaas.entities.speech import Transcript
from openmaas.errors import OpenMaaSError
from openmaas.serving.backend import AudioClip, GenerationSpec, TensorResult
from openmaas.serving.local import LocalBackend, local_backend, runtime_options
from openmaas.serving.types import InferenceRequest
from openmaas.telemetry import Metrics

log = logging.getLogger(__name__)

#: Redis keys: one report per replica, and each artifact's measured footprint (what a replica declares to Ray).
REPORT_PREFIX = "openmaas:cluster:replica:"
FOOTPRINT_PREFIX = "openmaas:cluster:footprint:"
REPORT_EVERY_S = 1.0
REPORT_TTL_S = 5


@dataclass(frozen=True)
class ReplicaSpec:
    """What a replica is built with: the server's settings (secrets left out) and its deployment's name."""

    settings: dict[str, Any]
    deployment: str
    #: The model budget of this replica's residency pool, in MiB (0: unlimited, a model's own deployment).
    memory_mb: int


def model_id(mv: ModelVersion) -> str:
    """The multiplexed model id of a version (Serve routes by it)."""
    return f"{mv.model}@{mv.version}"


class ModelReplica:
    """The class each cluster deployment runs (wrapped by ``serve.deployment`` at run time)."""

    def __init__(self, spec: ReplicaSpec) -> None:
        # Ray scales a replica by processes already; its copies stay threads inside it (its memory is declared).
        settings = Settings.model_validate(
            {**spec.settings, "model_memory_mb": spec.memory_mb, "model_processes": False}
        )
        self.spec = spec
        self._configs: dict[tuple[str, int], ServingConfig] = {}
        artifacts = LocalArtifactStore(settings.artifacts_dir)
        self.backend: LocalBackend = local_backend(
            settings,
            runtime_options(settings),
            lambda mv: artifacts.local_path(mv.sha256),
            lambda mv: self._configs.get((mv.model, mv.version), ServingConfig()),
            Metrics(),
        )
        self._id = f"{spec.deployment}#{os.getpid()}@{socket.gethostname()}"
        self._node = _node_id()
        self._redis_url = settings.redis_url
        self._stop = threading.Event()
        if self._redis_url:
            threading.Thread(target=self._reporter, name="openmaas-replica-report", daemon=True).start()

    # -- the calls (the gateway's RayBackend makes them through a deployment handle) ---------------------------

    def _use(self, mv: ModelVersion, serving: ServingConfig) -> None:
        self._configs[(mv.model, mv.version)] = serving

    async def _route(self, mv: ModelVersion) -> None:
        """Tell Serve's router this replica has the model: multiplexing routes calls, it does not keep models
        (no count limit; the residency pool decides what stays loaded, by bytes)."""
        if serve.get_multiplexed_model_id():
            await self._multiplexed(serve.get_multiplexed_model_id())

    @serve.multiplexed(max_num_models_per_replica=1_000_000)  # type: ignore[untyped-decorator]
    async def _multiplexed(self, model: str) -> str:
        return model

    async def infer_many(
        self,
        mv: ModelVersion,
        serving: ServingConfig,
        items: list[tuple[dict[str, np.ndarray], int, int, float | None, int]],
    ) -> list[TensorResult | OpenMaaSError]:
        """A gateway's group of calls to one version (inputs, rows, cost, seconds to its deadline, priority), each
        submitted to the batcher on its own (so they batch with everything else queued here); a call's own error
        comes back in its place."""
        self._use(mv, serving)
        await self._route(mv)
        now = time.monotonic()

        async def one(item: tuple[dict[str, np.ndarray], int, int, float | None, int]) -> TensorResult | OpenMaaSError:
            inputs, rows, cost, timeout_s, priority = item
            deadline = now + timeout_s if timeout_s is not None else None
            try:
                return await self.backend.infer(
                    mv, InferenceRequest(inputs=inputs, deadline=deadline, priority=priority), rows, cost
                )
            except OpenMaaSError as e:
                return e

        return list(await asyncio.gather(*(one(i) for i in items)))

    async def check_generation(self, mv: ModelVersion, serving: ServingConfig, spec: GenerationSpec) -> tuple[int, int]:
        """(prompt tokens, most tokens to generate); InvalidRequest for a prompt past the window."""
        self._use(mv, serving)
        await self._route(mv)
        session = await self.backend.open_generation(mv, spec)
        try:
            return session.prompt_tokens, session.max_tokens
        finally:
            await session.close()

    async def generate(
        self, mv: ModelVersion, serving: ServingConfig, spec: GenerationSpec
    ) -> AsyncIterator[TokenEvent]:
        """Stream a generation (through a streaming handle); stops when the gateway cancels the call."""
        self._use(mv, serving)
        await self._route(mv)
        session = await self.backend.open_generation(mv, spec)
        try:
            session.start()
            async for event in session.events():
                yield event
        finally:
            session.cancel()
            await session.close()

    async def transcribe(
        self,
        mv: ModelVersion,
        serving: ServingConfig,
        samples: np.ndarray,
        seconds: float,
        language: str | None,
        prompt: str | None,
        temperature: float,
    ) -> Transcript:
        self._use(mv, serving)
        await self._route(mv)
        clip = AudioClip(samples, seconds)
        return await self.backend.transcribe(mv, clip, language=language, prompt=prompt, temperature=temperature)

    async def load(self, mv: ModelVersion, serving: ServingConfig) -> None:
        self._use(mv, serving)
        await self._route(mv)
        await self.backend.load(mv)

    async def unload(self, name: str, version: int | None) -> None:
        await self.backend.unload(name, version)

    async def pin(self, mv: ModelVersion, serving: ServingConfig, holder: str) -> None:
        self._use(mv, serving)
        await self._route(mv)
        await self.backend.pin(mv, holder)

    async def unpin(self, mv: ModelVersion, holder: str) -> None:
        self.backend.unpin(mv, holder)

    def report(self) -> dict[str, Any]:
        """What this replica holds now (the same dict it writes to Redis)."""
        pool = self.backend.pool
        return {
            "replica": self._id,
            "deployment": self.spec.deployment,
            "node": self._node,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "memory_budget_bytes": self.spec.memory_mb * 1024 * 1024,
            "memory_used_bytes": pool.used_bytes,
            "at": time.time(),
            "models": [
                {
                    "model": r.version.model,
                    "version": r.version.version,
                    "sha256": r.version.sha256,
                    "state": "READY",
                    "in_flight": r.in_flight,
                    "queued": r.batcher.depth,
                    "memory_bytes": r.memory_bytes,
                    "pinned": r.pinned,
                    "copies": len(r.instances),
                }
                for r in pool.residents()
            ]
            + [{"model": m, "version": v, "state": "LOADING"} for m, v in pool.loading()],
            "stats": [
                {"model": m, "version": v, "counters": c.state()} for (m, v), c in pool.all_inference_stats().items()
            ],
        }

    def _reporter(self) -> None:
        import redis

        client = redis.Redis.from_url(self._redis_url or "")
        while True:
            try:
                report = self.report()
                pipe = client.pipeline()
                pipe.set(REPORT_PREFIX + self._id, json.dumps(report), ex=REPORT_TTL_S)
                for m in report["models"]:
                    if m.get("memory_bytes"):
                        pipe.set(FOOTPRINT_PREFIX + m["sha256"], m["memory_bytes"], ex=30 * 86400)
                pipe.execute()
            except Exception:  # a report is best effort: the next one comes a second later
                log.warning("could not report this replica to Redis", exc_info=True)
            if self._stop.wait(REPORT_EVERY_S):
                break
        client.close()

    def check_health(self) -> None:
        """Serve's health check: the replica answers (its event loop runs)."""

    def __del__(self) -> None:
        self._stop.set()


def _node_id() -> str:
    try:
        return str(ray.get_runtime_context().get_node_id())
    except Exception:  # outside a Ray worker (unit tests build the class directly)
        return "local"
