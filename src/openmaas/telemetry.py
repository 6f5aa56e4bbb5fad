"""Metrics (one Prometheus registry per app) and structured logs."""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# The request id of the request being handled, so log lines anywhere in the call can carry it.
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("openmaas_request_id", default=None)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Children:
    """``metric.labels(...)`` memoised: prometheus_client validates the values and takes a lock on every call,
    which the request path paid several times a request. Label sets are bounded (models, versions, protocols,
    statuses), as the exported series are anyway."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self._cache: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._cache.get(values)
        if child is None:
            child = self._cache[values] = self.metric.labels(*values)
        return child


class Metrics:
    """Every metric the platform exports, on a registry of its own (no process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("model", "version", "protocol", "status")
        self.requests = Counter(
            "openmaas_inference_requests",
            "Inference requests by model, version, protocol and status.",
            labels,
            registry=self.registry,
        )
        self.latency = Histogram(
            "openmaas_inference_latency_seconds",
            "Inference request latency, end to end inside the server.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "openmaas_inference_in_flight",
            "Inference requests being processed now.",
            ("model",),
            registry=self.registry,
        )
        self.load_seconds = Histogram(
            "openmaas_model_load_seconds",
            "Time to load a model version into memory.",
            ("model", "version"),
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.resident_models = Gauge(
            "openmaas_resident_models", "Model versions loaded in memory.", registry=self.registry
        )
        self.resident_bytes = Gauge(
            "openmaas_resident_bytes", "Measured memory of the loaded model versions.", registry=self.registry
        )
        self.memory_budget_bytes = Gauge(
            "openmaas_memory_budget_bytes", "Memory budget for loaded models (0 = unlimited).", registry=self.registry
        )
        self.loads = Counter("openmaas_model_loads", "Model version loads.", ("model",), registry=self.registry)
        self.evictions = Counter(
            "openmaas_model_evictions",
            "Model versions evicted to stay within the memory budget.",
            ("model",),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "openmaas_queue_depth", "Requests waiting in a model's batch queue.", ("model",), registry=self.registry
        )
        self.queue_depth_by_priority = Gauge(
            "openmaas_queue_depth_by_priority",
            "Requests waiting in a model's batch queue, by priority: online calls, offline batch lines.",
            ("model", "priority"),
            registry=self.registry,
        )
        self.batch_lines = Counter(
            "openmaas_batch_lines",
            "Offline batch lines finished, by model and outcome (ok: a 2xx answer; error: an error line).",
            ("model", "outcome"),
            registry=self.registry,
        )
        self.batches_active = Gauge(
            "openmaas_batches_running", "Offline batches this process is running.", registry=self.registry
        )
        self.queue_wait = Histogram(
            "openmaas_queue_wait_seconds",
            "Time requests wait in a model's queue before their batch runs.",
            ("model",),
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "openmaas_batch_size",
            "Rows per runtime call.",
            ("model",),
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=self.registry,
        )
        self.compute = Counter(
            "openmaas_model_compute_seconds",
            "Time model copies spent running batches (divide its rate by the copies for their utilisation).",
            ("model",),
            registry=self.registry,
        )
        self.rejected = Counter(
            "openmaas_rejected_requests",
            "Requests refused at once because a queue was full.",
            ("model",),
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "openmaas_generated_tokens",
            "Generated tokens delivered to clients (as metered).",
            ("model",),
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "openmaas_time_to_first_token_seconds",
            "From admission of a generation request to its first generated text.",
            ("model",),
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.metering_group_size = Histogram(
            "openmaas_metering_group_size",
            "Usage records stored per transaction (group commit).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=self.registry,
        )
        self.metering_failures = Counter(
            "openmaas_metering_failures",
            "Calls whose usage could not be stored (their results were withheld).",
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "openmaas_rate_limited_requests",
            "Requests refused by a key's rate or concurrency limit or an org's quota.",
            ("reason",),
            registry=self.registry,
        )
        self.http_requests = Counter(
            "openmaas_http_requests",
            "HTTP requests by protocol and status.",
            ("protocol", "status"),
            registry=self.registry,
        )
        self.cluster_replicas = Gauge(
            "openmaas_cluster_replicas",
            "Cluster mode: replicas of each Ray Serve deployment that reported in the last seconds.",
            ("deployment",),
            registry=self.registry,
        )
        self.cluster_resident_models = Gauge(
            "openmaas_cluster_resident_models",
            "Cluster mode: model versions loaded in each deployment's replicas (summed over replicas).",
            ("deployment",),
            registry=self.registry,
        )
        self.cluster_call_seconds = Histogram(
            "openmaas_cluster_call_seconds",
            "Cluster mode: a gateway's call to a deployment, from sending to the answer.",
            ("deployment",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.cluster_lost_calls = Counter(
            "openmaas_cluster_lost_calls",
            "Cluster mode: calls whose replica was lost (each retried once).",
            ("deployment",),
            registry=self.registry,
        )
        # The labelled series the request path touches on every call, memoised (see Children).
        self.requests_of = Children(self.requests)
        self.latency_of = Children(self.latency)
        self.in_flight_of = Children(self.in_flight)
        self.http_requests_of = Children(self.http_requests)
        self.cluster_call_of = Children(self.cluster_call_seconds)
        self._cluster_seen: set[str] = set()

    def set_cluster(self, replicas: dict[str, int], resident: dict[str, int]) -> None:
        """Cluster gauges from the replicas' latest reports (deployments that vanished drop to 0)."""
        self._cluster_seen |= set(replicas)
        for deployment in self._cluster_seen:
            self.cluster_replicas.labels(deployment).set(replicas.get(deployment, 0))
            self.cluster_resident_models.labels(deployment).set(resident.get(deployment, 0))


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the request id when one is in scope."""

    _skip = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid:
            entry["request_id"] = rid
        for key, value in vars(record).items():
            if key not in self._skip and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Route the platform's and uvicorn's logs to stderr in one format. Called by the CLI, never at import."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # The middleware writes one access line per request with the request id; uvicorn's would repeat it.
    logging.getLogger("uvicorn.access").disabled = True
    # Libraries' warnings become log records (one JSON object a line), not raw text on stderr.
    logging.captureWarnings(True)
