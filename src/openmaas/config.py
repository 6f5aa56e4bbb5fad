"""The one Settings object: every knob of the platform, read from ``OPENMAAS_*`` environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class SettingsError(ValueError):
    """Settings that cannot work together (said in one line when the server starts)."""


class Settings(BaseSettings):
    """Platform settings. Each field is documented in docs/settings.md (a test keeps the two in step)."""

    model_config = SettingsConfigDict(env_prefix="OPENMAAS_", extra="ignore")

    data_dir: Path = Field(
        default=Path(".openmaas"),
        description="Folder for the embedded database, artifacts, the admin key and the server secret.",
    )
    host: str = Field(default="127.0.0.1", description="Address `openmaas serve` binds to.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port `openmaas serve` listens on.")
    grpc_port: int = Field(
        default=8001, ge=0, le=65535, description="Port of the v2 gRPC endpoint (tritonclient.grpc); 0 turns it off."
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the database; default SQLite (WAL) at <data_dir>/openmaas.db. "
        "Use postgresql+psycopg://user@host/db for PostgreSQL.",
    )
    admin_key: SecretStr | None = Field(
        default=None,
        description="Platform-admin API key. When unset, one is generated at first start, printed once "
        "and written to <data_dir>/admin.key (mode 0600).",
    )
    secret_key: SecretStr | None = Field(
        default=None,
        description="Server secret for keyed hashes of API keys. When unset, one is generated into "
        "<data_dir>/secret.key. Servers sharing a database must share it.",
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        description="Bearer token a Prometheus scraper sends to read /metrics (its labels name every "
        "organisation's models, so it is never open). The platform-admin key works too; unset: only that key.",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis URL (redis://host:6379/0) for rate-limit and concurrency counters shared by every "
        "gateway process; unset keeps them in this process's memory.",
    )
    metering: bool = Field(
        default=True,
        description="Record a durable usage record for every successful call. Turn off only to measure its cost "
        "(benchmarks): unmetered calls cannot be billed and Idempotency-Key replays are not detected.",
    )
    currency: str = Field(
        default="CNY", min_length=3, max_length=8, description="Currency of all prices, wallets and invoices."
    )
    commission_bps: int = Field(
        default=2000,
        ge=0,
        le=10_000,
        description="Platform commission on providers' revenue, in basis points (2000 = 20%).",
    )
    max_jobs: int = Field(default=1, ge=0, le=64, description="Jobs (training, ...) run at once; 0 runs none.")
    job_threads: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Threads each job's worker process may use (it also runs at lower priority).",
    )
    files_quota_bytes: int = Field(
        default=10 * 1024**3,
        ge=0,
        description="Most bytes of files (batch inputs and results) one organisation may store at a time.",
    )
    batch_lease_s: float = Field(
        default=10.0,
        gt=0,
        description="How long a server holds a running batch without renewing its claim; after a crash another "
        "server (or the restarted one) takes the batch over once this has passed.",
    )
    batch_generation_in_flight: int = Field(
        default=4,
        ge=1,
        description="Most lines of one batch generating at once on a language model (online requests keep the "
        "engine's other slots).",
    )
    bundled_models: bool = Field(
        default=True, description="Register the bundled model catalogue at start (first start trains it)."
    )
    response_compression: bool = Field(
        default=True,
        description="Compress /v1 responses and /v2 inference responses of 1 KiB or more with gzip or deflate when the client's "
        "Accept-Encoding asks for it (about 0.1 ms per 8 KB response; halves embedding responses).",
    )
    console_idle_minutes: int = Field(
        default=30, ge=1, le=24 * 60, description="A console session ends after this long without a page or call."
    )
    console_session_hours: int = Field(
        default=12, ge=1, le=24 * 30, description="A console session ends this long after sign-in, however busy."
    )
    prepare_at_start: bool = Field(
        default=True,
        description="At start, begin in the background the one-time preparation models need (converting the bundled "
        "GGUF model takes a few minutes on 2 cores; importing scikit-learn for skops models a few seconds); its "
        "progress shows in 'openmaas models show'.",
    )
    conversion_cache: Path | None = Field(
        default=None,
        description="Folder for the one-time conversions of models (a GGUF file de-quantised, a language model's "
        "int8 graph), kept by the artifact's digest so that servers on one machine share them: one converts, the "
        "others wait for it. Unset: beside each artifact in the data dir. Nothing removes entries: delete the "
        "folder to reclaim the space.",
    )
    model_instances: int = Field(
        default_factory=_default_threads,
        ge=1,
        le=64,
        description="Copies of each loaded model, each run by its own thread; batches run on them in parallel. "
        "Several single-threaded copies use a small machine better than one copy with several threads.",
    )
    model_processes: bool = Field(
        default=True,
        description="Run each copy of a PyTorch embedding model in a process of its own (copies as threads of the "
        "server's process share its interpreter lock: two answered two clients at twice one's latency).",
    )
    onnx_threads: int = Field(default=1, ge=1, description="Intra-op threads of each ONNX Runtime model copy.")
    torch_threads: int = Field(
        default_factory=_default_threads,
        ge=1,
        description="Most intra-op threads a PyTorch model copy (or an ONNX text encoder's) uses: all of them "
        "while it is the only copy running a batch, one while other copies are busy too.",
    )
    max_request_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024, description="Largest request body accepted; larger ones get 413."
    )
    max_upload_bytes: int = Field(
        default=2 * 1024 * 1024 * 1024, ge=1024, description="Largest model upload accepted by /api/models."
    )
    max_embedding_inputs: int = Field(
        default=2048, ge=1, description="Most strings one /v1/embeddings request may carry."
    )
    model_memory_mb: int = Field(
        default=0,
        ge=0,
        description="Memory budget for loaded models in MiB; least-recently-used idle models are unloaded to stay "
        "within it. 0 = unlimited.",
    )
    pinned_models: str = Field(
        default="", description="Comma-separated model names that, once loaded, are never evicted."
    )
    max_batch_size: int = Field(default=64, ge=1, description="Default most rows per model call (dynamic batching).")
    max_queue_delay_ms: float = Field(
        default=0.0,
        ge=0,
        description="Default time a request may wait for others to join its batch; 0 dispatches as soon as the model "
        "is free (requests arriving meanwhile are batched together).",
    )
    max_balance_wait_ms: float = Field(
        default=3.0,
        ge=0,
        description="With several model copies: most time a free copy waits for a batch as large as the busy "
        "copies are running, so concurrent load does not fragment into batches of one; nothing waits when no "
        "other copy is busy. 0 = never wait.",
    )
    max_queue_size: int = Field(
        default=256, ge=1, description="Default most requests queued per model; beyond it 429 (OpenAI) / 503 (v2)."
    )
    max_batch_tokens: int = Field(
        default=16384, ge=1, description="Default most (estimated) tokens per batch for text models."
    )
    generation_batch: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Most generation requests one language model decodes together (step by "
        "step: a request joins at the next step and leaves when done); the rest wait in its queue.",
    )
    generation_queue: int = Field(
        default=64, ge=1, description="Most generation requests waiting per language model; beyond it 429."
    )
    generation_context: int = Field(
        default=8192,
        ge=16,
        description="Longest context (prompt plus answer, in tokens) a language model serves, at most its own window.",
    )
    generation_max_tokens: int = Field(
        default=256, ge=1, description="Answer length when a completion request gives no max_tokens."
    )
    generation_weights: Literal["int8", "int8-forced", "float32"] = Field(
        default="int8",
        description="Language models' weights in memory: int8 (converted once, in the background; served in "
        "float32 where the model's perplexity rises more than 5% or the engine cannot run it, and the model's "
        "details say why), int8-forced (int8 even past the 5% guard) or float32.",
    )
    audio_max_seconds: float = Field(
        default=600.0, gt=0, description="Longest audio /v1/audio/transcriptions accepts; longer files get 413."
    )
    backend: Literal["local", "ray"] = Field(
        default="local",
        description="Where models run: `local` (in this process) or `ray` (Ray Serve deployments on the cluster at "
        "OPENMAAS_RAY_ADDRESS; needs `pip install openmaas[cluster]`, PostgreSQL and Redis). See docs/cluster.md.",
    )
    ray_address: str = Field(
        default="auto",
        description="Ray cluster address for OPENMAAS_BACKEND=ray (`host:port` of the head's GCS, or `auto` for the "
        "cluster started on this machine).",
    )
    artifacts_url: str | None = Field(
        default=None,
        description="Folder (or `file://` URL) of the artifact store; every gateway and Ray replica must see the "
        "same one in cluster mode (a shared folder). Unset: <data_dir>/artifacts.",
    )
    ray_replica_cpus: float = Field(
        default=1.0, ge=0, description="Logical CPUs each model replica declares to Ray (cluster mode)."
    )
    ray_shared_replicas: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Replicas of each shared (multiplexed) deployment, one per runtime family, that serves the "
        "models without serving settings of their own (cluster mode).",
    )
    ray_shared_memory_mb: int = Field(
        default=2048,
        ge=64,
        description="Model memory budget of each shared deployment's replica in MiB: its residency pool keeps "
        "what fits, never evicting a model with calls in flight; the replica declares it to Ray (cluster mode).",
    )
    ray_call_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Longest a gateway waits for a replica's answer; past it the call is 503 with Retry-After "
        "(504 when the request's own deadline passed first) (cluster mode).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log level of the server's JSON logs."
    )
    log_format: Literal["json", "text"] = Field(default="json", description="Log line format.")

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'openmaas.db').resolve()}"

    @property
    def pinned(self) -> frozenset[str]:
        return frozenset(n.strip() for n in self.pinned_models.split(",") if n.strip())

    @property
    def artifacts_dir(self) -> Path:
        if self.artifacts_url:
            url = self.artifacts_url
            if url.startswith("file://"):
                return Path(url.removeprefix("file://"))
            if "://" in url:
                raise SettingsError(
                    f"OPENMAAS_ARTIFACTS_URL={url!r}: only a folder or a file:// URL is supported (mount the shared "
                    "storage as a folder on every machine)"
                )
            return Path(url)
        return self.data_dir / "artifacts"


def settings_table() -> str:
    """The settings as markdown table rows (docs/settings.md is built from this: python -m openmaas.config)."""
    rows = []
    for name, field in Settings.model_fields.items():
        if field.default_factory is not None:
            default = "min(4, CPU cores)"
        elif field.default is None:
            default = "unset"
        elif field.default == "":
            default = "empty"
        elif name == "data_dir":
            default = "./.openmaas"
        else:
            default = str(field.default)
        rows.append(f"| `OPENMAAS_{name.upper()}` | {default} | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
