"""Cluster mode: ``ServingBackend`` over Ray Serve (``OPENMAAS_BACKEND=ray``).

Each gateway process is a Ray driver. A model version runs in a Serve application created at run time
(``serve.run`` with a name, no HTTP route; calls go through a ``DeploymentHandle``):

- a model with serving settings of its own (``min_replicas``, ``max_replicas``, ``target_ongoing_requests``,
  ``idle_timeout_s``) or pinned gets a deployment of its own, autoscaled by Serve (scale to zero after its idle time
  when ``min_replicas`` is 0), each replica declaring the memory the model measured at its last load;
- the long tail shares one deployment per runtime family: Serve's multiplexing routes a model's calls to the
  replicas that have it, and each replica's ``ResidencyPool`` keeps what fits its byte budget (never evicting a
  model with calls in flight), so Serve's count-based LRU never unloads anything.

Batching happens once, in the replica's batcher (``serving/replica.py``). What does not need the model (formats,
token estimates for rate limits, audio decoding, one-time conversions on the shared artifact store) runs here, in
a ``LocalBackend`` that never loads a model. Replicas report what they hold to Redis; this backend reads those
reports every second for model state, statistics and ``openmaas cluster status``.

A call whose replica dies is retried once (the gateway meters it once, after the answer, under the same request
id); if that fails too, or no replica answers within ``OPENMAAS_RAY_CALL_TIMEOUT_S``, the call is a 503 with
Retry-After.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

import ray
from ray import serve
from ray.exceptions import (
    NodeDiedError,
    ObjectLostError,
    RayActorError,
    RayTaskError,
    WorkerCrashedError,
)
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from openmaas.config import Settings, SettingsError
from openmaas.entities.generation import TokenEvent
from openmaas.entities.models import ModelVersion, Preparation, ServingConfig
from openmaas.entities.speech import Transcript
from openmaas.errors import DeadlineExceeded, ModelNotReady, OpenMaaSError
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
from openmaas.serving.local import LocalBackend
from openmaas.serving.replica import FOOTPRINT_PREFIX, REPORT_PREFIX, ModelReplica, ReplicaSpec, model_id
from openmaas.serving.stats import InferenceCounters
from openmaas.serving.types import InferenceRequest
from openmaas.telemetry import Metrics

log = logging.getLogger(__name__)

Handle = DeploymentHandle[Any]

NAMESPACE = "openmaas"
_LOST = (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError)
_DEPLOY_LOCK_S = 120
#: What a replica process needs besides its models (Python, torch, ONNX Runtime), declared to Ray with them.
_PROCESS_BYTES = 384 * 1024 * 1024
_FALLBACK_FOOTPRINT_FACTOR = 3
_SECRET_FIELDS = ("admin_key", "secret_key", "metrics_token")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


@dataclass(frozen=True)
class Target:
    """Where a version runs: the Serve application (one deployment) and its multiplexed id when shared."""

    app: str
    multiplexed: str | None


class RayBackend:
    """``ServingBackend`` over Ray Serve deployments; knows nothing of tenants, keys or money."""

    def __init__(
        self,
        settings: Settings,
        local: LocalBackend,
        serving_config: Callable[[ModelVersion], ServingConfig],
        metrics: Metrics,
    ) -> None:
        if not settings.redis_url:
            raise SettingsError(
                "OPENMAAS_BACKEND=ray needs OPENMAAS_REDIS_URL: the gateways share rate limits and read the "
                "replicas' reports there (see docs/cluster.md)"
            )
        self.local = local
        self._settings = settings
        self._serving_config = serving_config
        self._metrics = metrics
        self._handles: dict[str, tuple[ServingConfig, Handle]] = {}
        self._deploying: dict[str, asyncio.Task[Handle]] = {}
        self._reports: list[dict[str, Any]] = []
        self._refresher: asyncio.Task[None] | None = None
        self._groups: dict[tuple[str, int], _Group] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._redis: Any = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._connect)
        import redis.asyncio

        self._redis = redis.asyncio.from_url(self._settings.redis_url or "")
        await self._refresh()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())

    def _connect(self) -> None:
        if not ray.is_initialized():
            try:
                ray.init(
                    address=self._settings.ray_address,
                    namespace=NAMESPACE,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                )
            except (ConnectionError, ValueError) as e:
                raise SettingsError(
                    f"cannot reach the Ray cluster at OPENMAAS_RAY_ADDRESS={self._settings.ray_address!r}: {e}"
                ) from None
        # No Serve HTTP proxy: the gateways are the ingress.
        serve.start(http_options={"location": "NoServer"})
        log.info("connected to the Ray cluster", extra={"address": self._settings.ray_address})

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        if self._redis is not None:
            await self._redis.aclose()
        await self.local.close()
        # The deployments stay: other gateways use them (openmaas cluster down removes them).
        await asyncio.to_thread(ray.shutdown)

    # -- what a model is (no replica needed) ----------------------------------------------------------------

    def served_as(self, mv: ModelVersion) -> ServedAs:
        return self.local.served_as(mv)

    def platform(self, mv: ModelVersion) -> str:
        return self.local.platform(mv)

    def estimate_tokens(self, mv: ModelVersion, request: InferenceRequest) -> TokenEstimate | None:
        return self.local.estimate_tokens(mv, request)

    def decode_audio(self, audio: bytes) -> AudioClip:
        return self.local.decode_audio(audio)

    def prepare(self, mv: ModelVersion) -> None:
        self.local.prepare(mv)  # the conversion lands beside the artifact, on the shared store

    def preparing(self, mv: ModelVersion) -> Preparation | None:
        return self.local.preparing(mv)

    def weights(self, mv: ModelVersion) -> dict[str, Any] | None:
        return self.local.weights(mv)  # the record lies beside the artifact, on the shared store

    def batching(self, mv: ModelVersion) -> Batching:
        return self.local.batching(mv)

    # -- where a version runs ------------------------------------------------------------------------------

    def target(self, mv: ModelVersion) -> Target:
        serving = self._serving_config(mv)
        pinned = serving.pinned if serving.pinned is not None else mv.model in self._settings.pinned
        if serving.has_replica_settings or pinned:
            return Target(f"openmaas-model-{_slug(mv.model)}-v{mv.version}", None)
        return Target(f"openmaas-shared-{_slug(mv.format)}", model_id(mv))

    def _deployment_options(self, mv: ModelVersion, target: Target, footprint: int | None) -> dict[str, Any]:
        serving = self._serving_config(mv)
        options: dict[str, Any] = {
            "name": "replica",
            "max_ongoing_requests": max(serving.max_queue_size or self._settings.max_queue_size, 8),
            "graceful_shutdown_timeout_s": 10,
            "health_check_period_s": 2,
            "health_check_timeout_s": 10,
        }
        if target.multiplexed is not None:
            memory = self._settings.ray_shared_memory_mb * 1024 * 1024
            options["num_replicas"] = self._settings.ray_shared_replicas
        else:
            memory = footprint or max(mv.size_bytes * _FALLBACK_FOOTPRINT_FACTOR, 64 * 1024 * 1024)
            least = serving.min_replicas if serving.min_replicas is not None else 1
            autoscaling: dict[str, Any] = {
                "min_replicas": least,
                "initial_replicas": max(least, 1),
                "max_replicas": max(serving.max_replicas or max(least, 1), least, 1),
                "target_ongoing_requests": serving.target_ongoing_requests
                or float(serving.max_batch_size or self._settings.max_batch_size),
                "upscale_delay_s": 3.0,
                "downscale_delay_s": serving.idle_timeout_s or 600.0,
                "look_back_period_s": min(30.0, serving.idle_timeout_s or 30.0),
            }
            if least == 0:
                autoscaling["downscale_to_zero_delay_s"] = serving.idle_timeout_s or 600.0
            options["autoscaling_config"] = autoscaling
        options["ray_actor_options"] = {
            "num_cpus": self._settings.ray_replica_cpus,
            "memory": int(memory + _PROCESS_BYTES),
        }
        return options

    def _replica_settings(self) -> dict[str, Any]:
        data = self._settings.model_dump(mode="json", exclude=set(_SECRET_FIELDS))
        data["artifacts_url"] = str(self._settings.artifacts_dir.resolve())
        data["backend"] = "local"
        return data

    async def _handle(self, mv: ModelVersion) -> tuple[Target, Handle]:
        target = self.target(mv)
        serving = self._serving_config(mv)
        known = self._handles.get(target.app)
        if known is not None and (target.multiplexed is not None or known[0] == serving):
            return target, known[1]
        task = self._deploying.get(target.app)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._deploy(mv, target, serving))
            self._deploying[target.app] = task
            task.add_done_callback(lambda _: self._deploying.pop(target.app, None))
        return target, await asyncio.shield(task)

    async def _deploy(self, mv: ModelVersion, target: Target, serving: ServingConfig) -> Handle:
        footprint = None
        if target.multiplexed is None:
            measured = await self._redis.get(FOOTPRINT_PREFIX + mv.sha256)
            footprint = int(measured) if measured else None
        options = self._deployment_options(mv, target, footprint)
        memory_mb = self._settings.ray_shared_memory_mb if target.multiplexed is not None else 0
        spec = ReplicaSpec(self._replica_settings(), target.app, memory_mb)
        fingerprint = hashlib.sha256(
            json.dumps(
                {"options": options, "serving": serving.model_dump_json() if target.multiplexed is None else ""}
            ).encode()
        ).hexdigest()[:16]
        handle = await asyncio.to_thread(self._ensure_app, target, options, spec, fingerprint)
        self._handles[target.app] = (serving, handle)
        return handle

    def _ensure_app(self, target: Target, options: dict[str, Any], spec: ReplicaSpec, fingerprint: str) -> Handle:
        """The application's handle, deploying it first unless it runs with these options; one gateway deploys
        while the others wait (a Redis lock), since deploying again restarts every replica."""
        import redis

        client = redis.Redis.from_url(self._settings.redis_url or "")
        apps_key = "openmaas:cluster:apps"
        lock_key = f"openmaas:cluster:deploy:{target.app}"
        try:
            deadline = time.monotonic() + _DEPLOY_LOCK_S
            while True:
                current = cast(bytes | None, client.hget(apps_key, target.app))
                if current is not None and current.decode() == fingerprint and self._app_exists(target.app):
                    return serve.get_app_handle(target.app)
                if client.set(lock_key, fingerprint, nx=True, ex=_DEPLOY_LOCK_S):
                    break
                if time.monotonic() > deadline:
                    raise ModelNotReady(f"deploying '{target.app}' takes too long; retry shortly", retry_after=10)
                time.sleep(0.2)
            try:
                log.info("deploying a model application on Ray Serve", extra={"app": target.app, "options": options})
                app = serve.deployment(**options)(ModelReplica).bind(spec)
                serve.run(app, name=target.app, route_prefix=None, blocking=False)
                client.hset(apps_key, target.app, fingerprint)
            finally:
                client.delete(lock_key)
            return serve.get_app_handle(target.app)
        finally:
            client.close()

    @staticmethod
    def _app_exists(name: str) -> bool:
        try:
            serve.get_app_handle(name)
        except RayServeException:
            return False
        return True

    # -- calls ------------------------------------------------------------------------------------------------

    async def _call(self, mv: ModelVersion, method: str, *args: Any, deadline: float | None = None) -> Any:
        """Call a replica method for ``mv``; a replica lost mid-call is retried once, then 503."""
        # A conversion running here (this gateway registered the version) answers 503 with its progress, rather
        # than have a replica start the same conversion.
        self.local.pool.refuse_while_preparing(mv)
        timeout = self._settings.ray_call_timeout_s
        for attempt in (1, 2):
            target, handle = await self._handle(mv)
            routed = handle.options(multiplexed_model_id=target.multiplexed) if target.multiplexed else handle
            started = time.perf_counter()
            response = getattr(routed, method).remote(*args)
            try:
                result = await asyncio.wait_for(_result(response), timeout)
                self._metrics.cluster_call_of(target.app).observe(time.perf_counter() - started)
                return result
            except TimeoutError:
                response.cancel()
                if deadline is not None and time.monotonic() > deadline:
                    raise DeadlineExceeded(
                        f"model '{mv.model}' did not start the request before its deadline"
                    ) from None
                raise ModelNotReady(
                    f"no replica of model '{mv.model}' answered within {timeout:g} s; retry shortly", retry_after=5
                ) from None
            except _LOST as e:
                self._metrics.cluster_lost_calls.labels(target.app).inc()
                log.warning(
                    "a replica was lost during a call",
                    extra={"model": mv.model, "version": mv.version, "attempt": attempt, "error": type(e).__name__},
                )
                if attempt == 2:
                    raise ModelNotReady(
                        f"the replica serving model '{mv.model}' was lost; retry shortly", retry_after=2
                    ) from None
            except RayServeException:
                # The application is gone (deleted by another gateway's unload, or Serve restarted): deploy it
                # again once.
                self._handles.pop(target.app, None)
                if attempt == 2:
                    raise ModelNotReady(
                        f"model '{mv.model}' is being deployed again; retry shortly", retry_after=5
                    ) from None
        raise AssertionError("unreachable")

    async def infer(self, mv: ModelVersion, request: InferenceRequest, rows: int, cost: int) -> TensorResult:
        """Concurrent calls to one version leave together: while a group is on its way to a replica the next
        calls gather, and go as one handle call (``infer_many``) when a send slot frees up. This shares Ray's
        per-call cost (scheduling, serialising, the actor call) among the group; the replica's batcher then
        batches the rows as in embedded mode, so batching still happens once, there."""
        key = (mv.model, mv.version)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group()
        item = _Item(request, rows, cost, asyncio.get_running_loop().create_future())
        group.pending.append(item)
        if group.sending < _SENDS_PER_MODEL:
            group.sending += 1
            task = asyncio.get_running_loop().create_task(self._send(mv, group))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        result: TensorResult = await item.future
        return result

    async def _send(self, mv: ModelVersion, group: _Group) -> None:
        try:
            while group.pending:
                items, group.pending = group.pending[:_MAX_GROUP], group.pending[_MAX_GROUP:]
                now = time.monotonic()
                payload = [
                    (
                        i.request.inputs,
                        i.rows,
                        i.cost,
                        i.request.deadline - now if i.request.deadline is not None else None,
                        i.request.priority,
                    )
                    for i in items
                ]
                deadlines = [i.request.deadline for i in items if i.request.deadline is not None]
                try:
                    results = await self._call(
                        mv, "infer_many", mv, self._serving_config(mv), payload, deadline=min(deadlines, default=None)
                    )
                except asyncio.CancelledError:
                    for i in items + group.pending:
                        i.future.cancel()
                    raise
                except Exception as e:
                    for i in items:
                        if not i.future.done():
                            i.future.set_exception(e)
                    continue
                for i, r in zip(items, results, strict=True):
                    if i.future.done():
                        continue  # the caller went away
                    if isinstance(r, BaseException):
                        i.future.set_exception(r)
                    else:
                        i.future.set_result(r)
        finally:
            group.sending -= 1

    async def open_generation(self, mv: ModelVersion, spec: GenerationSpec) -> RayGeneration:
        serving = self._serving_config(mv)
        prompt_tokens, max_tokens = await self._call(mv, "check_generation", mv, serving, spec)
        target, handle = await self._handle(mv)
        routed = handle.options(stream=True, multiplexed_model_id=target.multiplexed or "")
        return RayGeneration(routed, mv, serving, replace(spec, max_tokens=max_tokens), prompt_tokens, max_tokens)

    async def transcribe(
        self, mv: ModelVersion, clip: AudioClip, *, language: str | None, prompt: str | None, temperature: float
    ) -> Transcript:
        transcript: Transcript = await self._call(
            mv, "transcribe", mv, self._serving_config(mv), clip.samples, clip.seconds, language, prompt, temperature
        )
        return transcript

    # -- residency ---------------------------------------------------------------------------------------------

    async def load(self, mv: ModelVersion) -> None:
        await self._call(mv, "load", mv, self._serving_config(mv))

    async def unload(self, name: str, version: int | None = None) -> None:
        """Unload ``name``: its own deployments are deleted (replicas stopped), a shared deployment's replica
        holding it unloads it once its calls in flight are done."""
        apps = [a for a in await asyncio.to_thread(_app_names) if a.startswith(f"openmaas-model-{_slug(name)}-v")]
        for app in apps:
            if version is None or app.endswith(f"-v{version}"):
                await asyncio.to_thread(serve.delete, app)
                self._handles.pop(app, None)
        for report in self._reports:
            if report["deployment"].startswith("openmaas-shared-"):
                for m in report["models"]:
                    if m["model"] == name and (version is None or m["version"] == version):
                        handle = await asyncio.to_thread(serve.get_app_handle, report["deployment"])
                        await handle.options(multiplexed_model_id=f"{name}@{m['version']}").unload.remote(
                            name, m["version"]
                        )

    async def pin(self, mv: ModelVersion, holder: str) -> None:
        await self._call(mv, "pin", mv, self._serving_config(mv), holder)

    def unpin(self, mv: ModelVersion, holder: str) -> None:
        target = self.target(mv)
        known = self._handles.get(target.app)
        if known is None:
            return  # never deployed from this gateway: nothing of it is pinned by this process
        routed = known[1].options(multiplexed_model_id=target.multiplexed) if target.multiplexed else known[1]
        routed.unpin.remote(mv, holder)

    # -- what the replicas report ---------------------------------------------------------------------------

    async def _refresh(self) -> None:
        keys = [k async for k in self._redis.scan_iter(match=REPORT_PREFIX + "*", count=500)]
        values = await self._redis.mget(keys) if keys else []
        reports = [json.loads(v) for v in values if v]
        self._reports = reports
        self._metrics_from(reports)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._refresh()
            except Exception:
                log.warning("could not read the replicas' reports from Redis", exc_info=True)

    def _metrics_from(self, reports: list[dict[str, Any]]) -> None:
        replicas: dict[str, int] = {}
        resident: dict[str, int] = {}
        for r in reports:
            replicas[r["deployment"]] = replicas.get(r["deployment"], 0) + 1
            resident[r["deployment"]] = resident.get(r["deployment"], 0) + sum(
                1 for m in r["models"] if m["state"] == "READY"
            )
        self._metrics.set_cluster(replicas, resident)

    def _entries(self, mv: ModelVersion) -> list[dict[str, Any]]:
        return [m for r in self._reports for m in r["models"] if m["model"] == mv.model and m["version"] == mv.version]

    def state(self, mv: ModelVersion) -> ModelState:
        states = {m["state"] for m in self._entries(mv)}
        if "READY" in states:
            return "READY"
        if "LOADING" in states:
            return "LOADING"
        if self.preparing(mv) is not None:
            return "PREPARING"
        return "UNAVAILABLE"

    def inference_stats(self, mv: ModelVersion) -> InferenceCounters:
        total = InferenceCounters()
        for r in self._reports:
            for s in r.get("stats", []):
                if s["model"] == mv.model and s["version"] == mv.version:
                    total.add(InferenceCounters.from_state(s["counters"]))
        return total

    def stats(self) -> list[ModelStats]:
        merged: dict[tuple[str, int], ModelStats] = {}
        for r in self._reports:
            for m in r["models"]:
                key = (m["model"], m["version"])
                seen = merged.get(key)
                state: ModelState = "READY" if m["state"] == "READY" or (seen and seen.state == "READY") else "LOADING"
                merged[key] = ModelStats(
                    model=m["model"],
                    version=m["version"],
                    state=state,
                    in_flight=(seen.in_flight if seen else 0) + m.get("in_flight", 0),
                    queued=(seen.queued if seen else 0) + m.get("queued", 0),
                    memory_bytes=(seen.memory_bytes if seen else 0) + m.get("memory_bytes", 0),
                    pinned=bool(m.get("pinned")) or bool(seen and seen.pinned),
                    copies=(seen.copies if seen else 0) + m.get("copies", 0),
                )
        return list(merged.values())

    async def describe(self) -> dict[str, Any]:
        """Nodes, applications (deployments and replica states) and what each replica holds."""
        nodes, apps = await asyncio.to_thread(_cluster_view)
        return {
            "backend": "ray",
            "address": self._settings.ray_address,
            "nodes": nodes,
            "applications": apps,
            "replicas": sorted(self._reports, key=lambda r: (r["deployment"], r["replica"])),
        }


#: Groups of calls one gateway sends to one version at once, and the most calls in a group.
_SENDS_PER_MODEL = 4
_MAX_GROUP = 256


@dataclass(eq=False)
class _Item:
    request: InferenceRequest
    rows: int
    cost: int
    future: asyncio.Future[TensorResult]


@dataclass(eq=False)
class _Group:
    pending: list[_Item] = field(default_factory=list)
    sending: int = 0


@dataclass(eq=False)
class RayGeneration:
    """A generation streamed from a replica through a streaming handle."""

    handle: Handle
    mv: ModelVersion
    serving: ServingConfig
    spec: GenerationSpec
    prompt_tokens: int
    max_tokens: int
    _stream: Any = None

    def start(self) -> None:
        self._stream = self.handle.generate.remote(self.mv, self.serving, self.spec)

    async def events(self) -> AsyncIterator[TokenEvent]:
        assert self._stream is not None, "start() first"
        try:
            async for event in self._stream:
                yield event
        except RayTaskError as e:
            cause = e.cause
            if isinstance(cause, OpenMaaSError):
                raise cause from None
            raise
        except _LOST:
            raise ModelNotReady(
                f"the replica generating for model '{self.mv.model}' was lost; retry", retry_after=2
            ) from None

    def cancel(self) -> None:
        if self._stream is not None:
            self._stream.cancel()

    async def close(self) -> None:
        self.cancel()


async def _result(response: Any) -> Any:
    """Await a Serve response, re-raising an OpenMaaS error a replica raised as itself."""
    try:
        return await response
    except RayTaskError as e:
        cause = e.cause
        if isinstance(cause, OpenMaaSError):
            raise cause from None
        raise


def _app_names() -> list[str]:
    return list(serve.status().applications)


def _cluster_view() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    nodes = [
        {
            "node_id": n["NodeID"],
            "alive": bool(n["Alive"]),
            "address": n["NodeManagerAddress"],
            "resources": {k: v for k, v in n["Resources"].items() if not k.startswith("node:")},
            "death_reason": n.get("DeathReasonMessage") or None,
        }
        for n in ray.nodes()  # type: ignore[no-untyped-call]
    ]
    status = serve.status()
    apps = [
        {
            "name": name,
            "status": str(app.status.value if hasattr(app.status, "value") else app.status),
            "deployments": [
                {
                    "name": d_name,
                    "status": str(d.status.value if hasattr(d.status, "value") else d.status),
                    "replicas": {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()},
                }
                for d_name, d in app.deployments.items()
            ],
        }
        for name, app in status.applications.items()
        if name.startswith("openmaas-")
    ]
    return nodes, apps
