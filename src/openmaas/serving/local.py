"""The local serving backend: models in this process (residency pool, batcher, one engine per language model).

The only code above the runtimes that touches a runtime instance: it picks the runtime by format, holds a loaded
model for a request through the pool, and turns runtime errors a client caused into ``InvalidRequest``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, cast

from openmaas.config import Settings
from openmaas.entities.generation import SamplingParams, TokenEvent
from openmaas.entities.models import ModelVersion, Preparation, ServingConfig
from openmaas.entities.speech import Transcript
from openmaas.errors import InvalidRequest
from openmaas.runtimes import Runtime, RuntimeOptions, runtime_class
from openmaas.runtimes.causal_lm import CausalLMRuntime
from openmaas.runtimes.conversion import use_cache
from openmaas.runtimes.engine import Generation
from openmaas.runtimes.whisper import SAMPLE_RATE, AudioError, WhisperRuntime, decode_audio
from openmaas.serving.backend import (
    AudioClip,
    Batching,
    GenerationSpec,
    ModelState,
    ModelStats,
    ServedAs,
    TensorResult,
    TokenEstimate,
)
from openmaas.serving.batcher import BatchConfig
from openmaas.serving.pool import ResidencyPool, Resident
from openmaas.serving.stats import InferenceCounters
from openmaas.serving.types import InferenceRequest
from openmaas.telemetry import Metrics

log = logging.getLogger(__name__)

_BATCH_FIELDS = frozenset(f.name for f in fields(BatchConfig))
#: Artifacts smaller than this are prepared by their first load rather than in the background at registration.
_PREPARE_INLINE_BYTES = 32 << 20
#: Formats whose background set-up has started in this process (``LocalBackend._set_up_format``).
_SETTING_UP: set[type[Runtime]] = set()


def runtime_options(settings: Settings) -> RuntimeOptions:
    return RuntimeOptions(
        onnx_threads=settings.onnx_threads,
        torch_threads=settings.torch_threads,
        generation_batch=settings.generation_batch,
        generation_context=settings.generation_context,
        generation_max_tokens=settings.generation_max_tokens,
        generation_queue=settings.generation_queue,
        generation_weights=settings.generation_weights,
        copy_processes=settings.model_processes,
        conversion_cache=str(settings.conversion_cache) if settings.conversion_cache else None,
    )


def local_backend(
    settings: Settings,
    options: RuntimeOptions,
    artifact_path: Callable[[ModelVersion], Path],
    serving_config: Callable[[ModelVersion], ServingConfig],
    metrics: Metrics,
) -> LocalBackend:
    """The backend the server runs (and an evaluation job runs in its worker): each model's batching, copies
    and pin from its ``serving_config``, the rest from settings."""
    use_cache(options.conversion_cache)
    defaults = BatchConfig(
        max_batch_size=settings.max_batch_size,
        max_queue_delay_ms=settings.max_queue_delay_ms,
        max_balance_wait_ms=settings.max_balance_wait_ms,
        max_queue_size=settings.max_queue_size,
        max_batch_tokens=settings.max_batch_tokens,
    )

    def batch_config(mv: ModelVersion) -> BatchConfig:
        configured = serving_config(mv).model_dump(exclude_none=True)
        return replace(defaults, **{k: v for k, v in configured.items() if k in _BATCH_FIELDS})

    def instances(mv: ModelVersion) -> int:
        if runtime_class(mv.format).serves == "generation":
            return 1  # one engine per model batches every request itself
        configured = serving_config(mv).instances
        return configured if configured is not None else settings.model_instances

    def pinned(mv: ModelVersion) -> bool:
        configured = serving_config(mv).pinned
        return configured if configured is not None else mv.model in settings.pinned

    pool = ResidencyPool(
        artifact_path,
        options,
        metrics,
        budget_bytes=settings.model_memory_mb * 1024 * 1024 or None,
        batch_config=batch_config,
        pinned=pinned,
        instances=instances,
    )
    return LocalBackend(pool, metrics)


@dataclass(frozen=True)
class Footprint:
    parameters: int | None
    memory_bytes: int


@dataclass(eq=False)
class LocalGeneration:
    """A generation request on a model held from the pool until ``close``."""

    pool: ResidencyPool
    resident: Resident
    runtime: CausalLMRuntime
    ids: list[int]
    params: SamplingParams
    prompt_tokens: int = 0
    max_tokens: int = 0
    request: Generation | None = None
    closed: bool = False

    def start(self) -> None:
        self.request = self.runtime.generate(self.ids, self.params, asyncio.get_running_loop())

    async def events(self) -> AsyncIterator[TokenEvent]:
        assert self.request is not None, "start() first"
        while True:
            event = await self.request.events.get()
            yield event
            if event.finish_reason is not None:
                return

    def cancel(self) -> None:
        if self.request is not None:
            self.request.cancel()

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.pool.release(self.resident)


class LocalBackend:
    """``ServingBackend`` over a ``ResidencyPool`` in this process."""

    def __init__(self, pool: ResidencyPool, metrics: Metrics) -> None:
        self.pool = pool
        self._metrics = metrics
        self._background: set[asyncio.Task[None]] = set()
        # Artifacts are content-addressed and immutable: a version's path is looked up once, not per request.
        self._paths: dict[str, Path] = {}

    # -- what a model is -------------------------------------------------------------------------------------

    def served_as(self, mv: ModelVersion) -> ServedAs:
        return cast(ServedAs, runtime_class(mv.format).serves)

    def platform(self, mv: ModelVersion) -> str:
        return runtime_class(mv.format).platform

    def _path(self, mv: ModelVersion) -> Path:
        path = self._paths.get(mv.sha256)
        if path is None:
            path = self._paths[mv.sha256] = self.pool.artifact_path(mv)
        return path

    def estimate_tokens(self, mv: ModelVersion, request: InferenceRequest) -> TokenEstimate | None:
        counted = runtime_class(mv.format).token_estimate(request.inputs, self._path(mv))
        return TokenEstimate(*counted) if counted is not None else None

    # -- the request paths -----------------------------------------------------------------------------------

    async def infer(self, mv: ModelVersion, request: InferenceRequest, rows: int, cost: int) -> TensorResult:
        return await self.pool.infer(mv, request.inputs, rows, cost, request.deadline, request.priority)

    async def open_generation(self, mv: ModelVersion, spec: GenerationSpec) -> LocalGeneration:
        resident = await self.pool.acquire(mv)
        try:
            runtime = resident.instances[0].runtime
            if not isinstance(runtime, CausalLMRuntime):
                raise InvalidRequest(f"model '{mv.model}' does not generate text", param="model")
            sampling = dict(spec.sampling)
            stop = tuple(sampling.pop("stop", ()))
            prompt = spec.prompt
            if spec.messages is not None:
                prompt = runtime.render_chat(spec.messages)
                stop = stop + tuple(s for s in runtime.chat_stop if s not in stop)
            ids = runtime.encode(prompt or "")
            param = "messages" if spec.messages is not None else "prompt"
            window = runtime.context_window
            if spec.max_tokens is not None and len(ids) + spec.max_tokens > window:
                raise InvalidRequest(
                    f"this model's context window is {window} tokens; the request asks for "
                    f"{len(ids) + spec.max_tokens} ({len(ids)} in the prompt, {spec.max_tokens} to generate): "
                    "shorten the prompt or lower max_tokens",
                    param=param,
                )
            if len(ids) >= window:
                raise InvalidRequest(
                    f"the prompt is {len(ids)} tokens; this model's context window is {window} tokens", param=param
                )
            budget = (
                spec.max_tokens
                if spec.max_tokens is not None
                else min(self.pool.options.generation_max_tokens, window - len(ids))
            )
            params = SamplingParams(max_tokens=budget, stop=stop, **sampling)
        except BaseException:
            await self.pool.release(resident)
            raise
        return LocalGeneration(self.pool, resident, runtime, ids, params, prompt_tokens=len(ids), max_tokens=budget)

    def decode_audio(self, audio: bytes) -> AudioClip:
        try:
            samples = decode_audio(audio)
        except AudioError as e:
            raise InvalidRequest(str(e), param="file") from None
        return AudioClip(samples, len(samples) / SAMPLE_RATE)

    async def transcribe(
        self, mv: ModelVersion, clip: AudioClip, *, language: str | None, prompt: str | None, temperature: float
    ) -> Transcript:
        resident = await self.pool.acquire(mv)
        try:
            instance = resident.instances[0]
            runtime = instance.runtime
            if not isinstance(runtime, WhisperRuntime):
                raise InvalidRequest(f"model '{mv.model}' is not a speech-recognition model", param="model")
            if language and runtime.english_only and language != "en":
                raise InvalidRequest(
                    f"model '{mv.model}' transcribes English only; omit 'language' or send 'en'", param="language"
                )
            return await instance.call(
                functools.partial(runtime.transcribe, clip.samples, language, prompt, temperature)
            )
        finally:
            await self.pool.release(resident)

    # -- measuring (evaluation jobs run a backend of their own in the worker) ---------------------------------

    async def footprint(self, mv: ModelVersion) -> Footprint:
        """The loaded version's weights and measured memory (loads it if needed)."""
        resident = await self.pool.acquire(mv)
        try:
            runtime = resident.instances[0].runtime
            return Footprint(await resident.instances[0].call(runtime.parameters), resident.memory_bytes)
        finally:
            await self.pool.release(resident)

    async def log_likelihoods(self, mv: ModelVersion, texts: list[str]) -> list[tuple[float, int]]:
        """Each text's summed negative log-likelihood and predicted tokens under a language model."""
        resident = await self.pool.acquire(mv)
        try:
            instance = resident.instances[0]
            runtime = instance.runtime
            if not isinstance(runtime, CausalLMRuntime):
                raise InvalidRequest(f"model '{mv.model}' is not a language model", param="model")
            return [await instance.call(functools.partial(runtime.log_likelihood, t)) for t in texts]
        finally:
            await self.pool.release(resident)

    # -- residency -------------------------------------------------------------------------------------------

    async def load(self, mv: ModelVersion) -> None:
        await self.pool.load(mv)

    async def unload(self, name: str, version: int | None = None) -> None:
        await self.pool.unload(name, version)

    async def pin(self, mv: ModelVersion, holder: str) -> None:
        await self.pool.pin(mv, holder)

    def unpin(self, mv: ModelVersion, holder: str) -> None:
        self.pool.unpin(mv, holder)

    def state(self, mv: ModelVersion) -> ModelState:
        if self.pool.get(mv.model, mv.version) is not None:
            return "READY"
        if self.pool.is_loading(mv.model, mv.version):
            return "LOADING"
        if self.preparing(mv) is not None:
            return "PREPARING"
        return "UNAVAILABLE"

    def inference_stats(self, mv: ModelVersion) -> InferenceCounters:
        return self.pool.inference_stats(mv.model, mv.version)

    def batching(self, mv: ModelVersion) -> Batching:
        config = self.pool.batch_config(mv)
        return Batching(config.max_batch_size, config.max_queue_delay_ms, self.pool.instances(mv))

    def preparing(self, mv: ModelVersion) -> Preparation | None:
        return self.pool.preparing(mv)

    def weights(self, mv: ModelVersion) -> dict[str, Any] | None:
        cls = runtime_class(mv.format)
        if cls.prepared_weights.__func__ is Runtime.prepared_weights.__func__:  # type: ignore[attr-defined]
            return None  # served as stored: no path lookup
        return cls.prepared_weights(self.pool.artifact_path(mv), self.pool.options)

    def stats(self) -> list[ModelStats]:
        out = [
            ModelStats(
                model=r.version.model,
                version=r.version.version,
                state="READY",
                in_flight=r.in_flight,
                queued=r.batcher.depth,
                memory_bytes=r.memory_bytes,
                pinned=r.pinned,
                copies=len(r.instances),
            )
            for r in self.pool.residents()
        ]
        return out + [ModelStats(model=m, version=v, state="LOADING") for m, v in self.pool.loading()]

    def prepare(self, mv: ModelVersion) -> None:
        cls = runtime_class(mv.format)
        self._set_up_format(cls)
        if cls.prepare.__func__ is Runtime.prepare.__func__:  # type: ignore[attr-defined]
            return  # the format needs no preparation: no thread for nothing
        path = self.pool.artifact_path(mv)
        if not cls.needs_preparation(path, self.pool.options):
            return
        if mv.size_bytes < _PREPARE_INLINE_BYTES:
            return  # seconds of work: the first load does it, so the model serves from its first call
        where = {"model": mv.model, "version": mv.version}
        log.info("preparing the model in the background: calls get 503 until it is ready", extra=where)
        # On failure the first load tries again and reports the problem to its caller.
        self._in_background(functools.partial(cls.prepare, path, self.pool.options), where, "model prepared",
                            "preparing a model failed")  # fmt: skip

    def _in_background(self, work: Callable[[], object], where: dict[str, Any], done: str, failed: str) -> None:
        """Run ``work`` on a thread off the event loop, logging ``done`` with its seconds or ``failed``."""

        async def run() -> None:
            started = time.perf_counter()
            try:
                await asyncio.to_thread(work)
            except Exception:
                log.exception(failed, extra=where)
            else:
                log.info(done, extra={**where, "seconds": round(time.perf_counter() - started, 1)})

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _set_up_format(self, cls: type[Runtime]) -> None:
        """Run the format's one-time set-up in this process (``Runtime.set_up_process``: its slow imports, ONNX
        Runtime's environment) off the event loop, once, so that a first call does not wait for it; on failure the
        first load runs it again and reports the problem to its caller."""
        if cls.is_set_up() or cls in _SETTING_UP:
            return
        _SETTING_UP.add(cls)
        self._in_background(cls.set_up_process, {"format": cls.format, "libraries": list(cls.libraries)},
                            "model format set up", "setting up a model format failed")  # fmt: skip

    async def start(self) -> None:
        """Nothing to connect to: models load in this process on first use."""

    async def describe(self) -> dict[str, Any]:
        return {
            "backend": "local",
            "nodes": [{"node_id": "local", "alive": True, "address": socket.gethostname(), "resources": {}}],
            "applications": [],
            "replicas": [
                {
                    "replica": f"local#{os.getpid()}",
                    "deployment": "local",
                    "node": "local",
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "memory_budget_bytes": self.pool.budget_bytes or 0,
                    "memory_used_bytes": self.pool.used_bytes,
                    "models": [dataclasses.asdict(m) for m in self.stats()],
                }
            ],
        }

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await self.pool.close()
