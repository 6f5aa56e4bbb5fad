"""The composition root: ``create_app(settings)`` builds every part from Settings. Nothing happens at import."""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

from fastapi import FastAPI
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from openmaas import __version__
from openmaas.api import batches as batches_api
from openmaas.api import billing as billing_api
from openmaas.api import generation, health, inprocess, manage, openai, tenancy, usage, v2
from openmaas.api import jobs as jobs_api
from openmaas.api.deps import Services
from openmaas.api.errors import install_error_handlers
from openmaas.api.hot import HotPath, OpenMaaSApp
from openmaas.api.middleware import RequestContextMiddleware
from openmaas.api.routing import V2_INFER_PATH
from openmaas.artifacts import LocalArtifactStore
from openmaas.audit import AuditLog
from openmaas.batches import lines as batch_lines
from openmaas.batches.files import FileService
from openmaas.batches.runner import BatchRunner, LineOutcome
from openmaas.batches.service import BatchService
from openmaas.billing.dedicated import DedicatedCapacity
from openmaas.billing.holds import HoldKeeper, new_holder_id
from openmaas.billing.service import BillingService
from openmaas.config import Settings, SettingsError
from openmaas.console import router as console
from openmaas.console.web import ConsoleHeaders
from openmaas.datasets.service import DatasetService
from openmaas.entities.models import ModelVersion, ServingConfig
from openmaas.gateway.admission import BATCH_LINE, AdmissionControl, BatchLine, Metering
from openmaas.gateway.auth import KeyAuthenticator, Principal, load_or_create_secret, new_key
from openmaas.gateway.limits import QuotaGuard, RateLimiter
from openmaas.gateway.service import Gateway
from openmaas.jobs.runner import JobRunner
from openmaas.jobs.service import JobService
from openmaas.jobs.submission import JobSubmission
from openmaas.metering.usage import UsageQueries
from openmaas.metering.writer import GroupCommitWriter
from openmaas.registry.evaluations import EvaluationService
from openmaas.registry.inspect import inspect_in_subprocess
from openmaas.registry.service import ModelRegistry
from openmaas.runtimes import RuntimeOptions
from openmaas.serving.backend import ServingBackend
from openmaas.serving.local import local_backend, runtime_options
from openmaas.store import db
from openmaas.store.registry import RegistryStore
from openmaas.telemetry import Metrics
from openmaas.tenancy.service import TenancyService
from openmaas.tenancy.sessions import ConsoleSessions

log = logging.getLogger(__name__)


@dataclass
class Platform:
    """Every long-lived part, built once per app."""

    settings: Settings
    engine: Engine
    metrics: Metrics
    backend: ServingBackend
    services: Services
    runner: JobRunner
    leases: HoldKeeper

    @property
    def gateway(self) -> Gateway:
        return self.services.gateway


def build_platform(settings: Settings) -> Platform:
    """Wire stores, registry, serving and gateway together (no I/O beyond creating folders)."""
    # Models ship in packages; nothing may fetch weights from a hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = db.create_db_engine(settings.resolved_database_url)
    sessions = db.session_factory(engine)
    metrics = Metrics()
    options = runtime_options(settings)
    # Uploaded models are loaded for inspection in a child process (crash isolation; see registry/inspect.py).
    registry = ModelRegistry(
        RegistryStore(sessions), LocalArtifactStore(settings.artifacts_dir), options, inspect_in_subprocess
    )
    backend = serving_backend(settings, options, registry, metrics)
    secret = load_or_create_secret(
        settings.secret_key.get_secret_value() if settings.secret_key else None,
        settings.data_dir / "secret.key",
    )
    auth = KeyAuthenticator(sessions, secret)
    usage_queries = UsageQueries(sessions)
    tenancy_service = TenancyService(sessions, auth.digest, new_key, on_key_changed=auth.forget)
    quotas = QuotaGuard(tenancy_service.all_quotas, usage_queries.month_totals)
    tenancy_service.on_quotas_changed(quotas.invalidate)
    holder = new_holder_id()
    billing = BillingService(engine, settings.currency, settings.commission_bps, holder)
    admission = AdmissionControl(
        RateLimiter(settings.redis_url),
        quotas,
        billing,
        Metering(
            GroupCommitWriter(engine, metrics, settle=billing.settle, release=billing.release_in),
            usage_queries,
            enabled=settings.metering,
            batch_writer=GroupCommitWriter(
                engine,
                metrics,
                settle=billing.settle,
                release=billing.release_in,
                max_group=64,
                name="openmaas-metering-batch",
            ),
        ),
        metrics,
        owner_of=lambda model: registry.cached_model(model).owner_org_id,
    )
    audit = AuditLog(sessions, secret)
    gateway = Gateway(auth, registry, backend, admission, audit, metrics)
    datasets = DatasetService(sessions, LocalArtifactStore(settings.artifacts_dir), settings.data_dir / "cache")
    jobs_dir = settings.data_dir / "jobs"
    worker_env = {
        **os.environ,
        "OPENMAAS_DATA_DIR": str(settings.data_dir.resolve()),
        "OPENMAAS_DATABASE_URL": settings.resolved_database_url,
        "OPENMAAS_JOB_THREADS": str(settings.job_threads),
        "OMP_NUM_THREADS": str(settings.job_threads),
        "MKL_NUM_THREADS": str(settings.job_threads),
        "PYTHONUNBUFFERED": "1",
    }
    if settings.secret_key is not None:
        worker_env["OPENMAAS_SECRET_KEY"] = settings.secret_key.get_secret_value()
    jobs = JobService(sessions, jobs_dir)
    services = Services(
        gateway=gateway,
        registry=registry,
        tenancy=tenancy_service,
        billing=billing,
        dedicated=DedicatedCapacity(engine, billing, backend, registry.resolve),
        usage=usage_queries,
        audit=audit,
        datasets=datasets,
        jobs=jobs,
        submissions=JobSubmission(jobs, datasets, registry),
        evaluations=EvaluationService(sessions, LocalArtifactStore(settings.artifacts_dir)),
        console_sessions=ConsoleSessions(
            sessions,
            tenancy_service,
            auth.digest,
            idle=timedelta(minutes=settings.console_idle_minutes),
            absolute=timedelta(hours=settings.console_session_hours),
            on_key_changed=auth.forget,
        ),
        batches=BatchService(
            sessions,
            FileService(
                sessions,
                LocalArtifactStore(settings.data_dir / "files"),
                settings.data_dir / "tmp",
                settings.files_quota_bytes,
            ),
        ),
    )
    return Platform(
        settings,
        engine,
        metrics,
        backend,
        services,
        JobRunner(sessions, jobs_dir, worker_env, settings.max_jobs),
        HoldKeeper(engine, holder),
    )


def serving_backend(
    settings: Settings, options: RuntimeOptions, registry: ModelRegistry, metrics: Metrics
) -> ServingBackend:
    """In-process serving (``local``, the default) or Ray Serve deployments (``ray``, docs/cluster.md)."""

    def serving_config(mv: ModelVersion) -> ServingConfig:
        return registry.get_model(mv.model).serving

    local = local_backend(settings, options, registry.artifact_path, serving_config, metrics)
    if settings.backend == "local":
        return local
    try:
        from openmaas.serving.cluster import RayBackend
    except ImportError as e:
        raise SettingsError(
            f"OPENMAAS_BACKEND=ray needs Ray Serve ({e.name} is not installed): pip install 'openmaas[cluster]'"
        ) from None
    return RayBackend(settings, local, serving_config, metrics)


def _start(platform: Platform) -> None:
    """Blocking start-up work: migrations, the admin key, the bundled catalogue."""
    from openmaas.catalogue import ensure_catalogue_in_subprocess

    settings = platform.settings
    db.upgrade(platform.engine)
    configured = settings.admin_key.get_secret_value() if settings.admin_key else None
    key_file = settings.data_dir / "admin.key"
    generated = platform.gateway.auth.ensure_admin_key(configured, key_file)
    if generated is not None:
        # Printed once, on the console only (never logged); the file keeps it for the CLI.
        print(
            f"\nGenerated the platform-admin API key (shown once; also saved to {key_file}, mode 0600):\n"
            f"  {generated}\n",
            file=sys.stdout,
            flush=True,
        )
    if settings.bundled_models:
        env = {
            "OPENMAAS_DATA_DIR": str(settings.data_dir),
            "OPENMAAS_DATABASE_URL": settings.resolved_database_url,
            "OPENMAAS_ONNX_THREADS": str(settings.onnx_threads),
            "OPENMAAS_TORCH_THREADS": str(settings.torch_threads),
            "OPENMAAS_LOG_LEVEL": settings.log_level,
            "OPENMAAS_LOG_FORMAT": settings.log_format,
        }
        ensure_catalogue_in_subprocess(platform.services.registry, env)
    platform.leases.start()
    platform.runner.start()


def _latest_versions(platform: Platform) -> list[ModelVersion]:
    registry = platform.services.registry
    return [registry.resolve(m.name) for m in registry.list_models() if m.latest_version is not None]


def create_app(settings: Settings) -> FastAPI:
    """The ASGI application for ``settings``."""
    platform = build_platform(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(_start, platform)
        await platform.backend.start()
        # What start-up built (libraries, the platform's parts) lives as long as the process: keep it out of the
        # cyclic collector's full passes, which otherwise walk it all and stall a request for tens of ms. Frozen
        # before any background preparation starts, so nothing short-lived is frozen with it.
        gc.collect()
        gc.freeze()
        if settings.prepare_at_start:
            for mv in await run_in_threadpool(_latest_versions, platform):
                platform.gateway.prepare(mv)  # in the background: e.g. the bundled GGUF model's conversion
        grpc_surface = None
        if settings.grpc_port:
            from openmaas.api.grpc.server import GrpcSurface

            grpc_surface = GrpcSurface(
                platform.gateway,
                platform.metrics,
                lambda: bool(app.state.ready),
                host=settings.host,
                port=settings.grpc_port,
                max_bytes=settings.max_request_bytes,
            )
            await grpc_surface.start()
        app.state.ready = True
        app.state.batch_runner.start()
        log.info("openmaas ready", extra={"version": __version__, "data_dir": str(settings.data_dir)})
        try:
            yield
        finally:
            app.state.ready = False
            await app.state.batch_runner.stop()
            if grpc_surface is not None:
                await grpc_surface.stop()
            await run_in_threadpool(platform.runner.stop)
            await platform.backend.close()
            await platform.gateway.close()
            await run_in_threadpool(platform.leases.stop)
            platform.engine.dispose()

    app = OpenMaaSApp(
        title="OpenMaaS",
        version=__version__,
        description="Model-as-a-service: OpenAI-compatible and Open Inference Protocol v2 endpoints, "
        "model registry and management API.",
        lifespan=lifespan,
        # OpenMaaS exports its own Prometheus metrics; FastAPI's OpenTelemetry hooks would cost every request
        # an environment lookup for nothing.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        # /docs is served by the console with vendored Swagger UI files (FastAPI's own page loads a CDN).
        docs_url=None,
        redoc_url=None,
    )
    app.state.platform = platform
    app.state.services = platform.services
    app.state.metrics = platform.metrics
    app.state.ready = False

    install_error_handlers(app)
    app.include_router(health.router(settings.metrics_token.get_secret_value() if settings.metrics_token else None))
    app.include_router(v2.health_router())
    app.include_router(v2.router())
    app.include_router(openai.router(settings.max_embedding_inputs))
    app.include_router(generation.router(settings.audio_max_seconds))
    app.include_router(manage.schema_router())
    app.include_router(manage.router(settings.data_dir / "tmp", settings.max_upload_bytes))
    app.include_router(tenancy.public_router())
    app.include_router(tenancy.router())
    app.include_router(usage.router())
    app.include_router(billing_api.router())
    app.include_router(jobs_api.router(settings.data_dir / "tmp"))
    app.include_router(batches_api.router())
    console.install(app)

    def body_limit(method: str, path: str) -> int:
        if method == "POST" and path in (
            "/api/models",
            "/api/datasets",
            "/console/provider/models",
            "/console/datasets",
        ):
            return settings.max_upload_bytes
        if method == "POST" and path in ("/v1/files", "/console/batches"):
            return batch_lines.MAX_BYTES + 1024 * 1024  # the file and its multipart envelope
        return settings.max_request_bytes

    compress = settings.response_compression
    app.add_middleware(ConsoleHeaders)
    app.add_middleware(
        RequestContextMiddleware, metrics=platform.metrics, body_limit=body_limit, compress_responses=compress
    )
    max_inputs = settings.max_embedding_inputs

    def hot(handler: Callable[[Request], Awaitable[Response]]) -> RequestContextMiddleware:
        return RequestContextMiddleware(
            HotPath(app, handler), metrics=platform.metrics, body_limit=body_limit, compress_responses=compress
        )

    app.hot = {("POST", "/v1/embeddings"): hot(lambda request: openai.embeddings_response(request, max_inputs))}
    app.hot_patterns = [
        (
            V2_INFER_PATH,
            hot(lambda r: v2.infer_response(r, r.path_params["model"], r.path_params.get("version"))),
        )
    ]
    app.state.batch_runner = _batch_runner(platform, app)
    return app


async def _run_line(app: OpenMaaSApp, url: str, body: bytes, line: BatchLine, request_id: str) -> LineOutcome:
    """One batch line through the app itself, in-process: the route, checks, errors and formatting of the online
    call (the line's principal and ids ride in the scope's state, which no network request can set)."""
    answer = await inprocess.call(app, "POST", url, body=body, state={BATCH_LINE: line, "call_id": request_id})
    return LineOutcome(answer.status, answer.body, line.deferred)


def _batch_runner(platform: Platform, app: OpenMaaSApp) -> BatchRunner:
    gateway, settings = platform.gateway, platform.settings

    def cap_of(who: Principal, endpoint: str, model: str) -> int:
        """Lines of one batch in flight at once: two model steps of rows (the next step queued behind the running
        one, both behind any online request), or a few sequences of a language model's engine."""
        mv = gateway.model_version(who, model)
        if gateway.served_as(mv) == "generation":
            return settings.batch_generation_in_flight
        batching = gateway.batching(mv)
        return 2 * batching.max_batch_size * max(1, batching.instances)

    batches = platform.services.batches
    return BatchRunner(
        batches,
        lambda url, body, line, rid: _run_line(app, url, body, line, rid),
        gateway.auth.by_key_id,
        cap_of,
        gateway.admission,
        platform.services.billing,
        platform.metrics,
        lease_s=settings.batch_lease_s,
    )
