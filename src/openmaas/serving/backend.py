"""The serving contract: everything the gateway and the repository API ask of whatever runs the models.

``LocalBackend`` (``serving/local.py``: residency pool, batcher, generation engine, all in this process) and
``RayBackend`` (``serving/cluster.py``: Ray Serve deployments, each replica a ``LocalBackend``) implement it. Callers above serving name only this
contract and its neutral types: they never learn which runtime, thread or process computes a model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from openmaas.entities.generation import TokenEvent
from openmaas.entities.models import ModelVersion, Preparation
from openmaas.entities.speech import Transcript
from openmaas.runtimes.base import RuntimeResult
from openmaas.serving.stats import InferenceCounters
from openmaas.serving.types import InferenceRequest

#: Named output arrays (batch first) and, for text models, the tokens each item used.
TensorResult = RuntimeResult
#: What a model version is served for: v2 tensors only, or also embeddings, text generation, speech to text.
ServedAs = Literal["tensor", "embedding", "generation", "speech"]
#: A model version's state, in the Open Inference Protocol repository extension's words.
# PREPARING: one-time work (a conversion) runs before the version can load; calls get 503 until it is done.
ModelState = Literal["READY", "LOADING", "PREPARING", "UNAVAILABLE"]


@dataclass(frozen=True)
class TokenEstimate:
    """Tokens a request's text will use: ``expected`` (rate limits, batch cost) and ``at_most`` (billing holds)."""

    expected: int
    at_most: int


@dataclass(frozen=True)
class GenerationSpec:
    """A text-generation request as the client sent it: a prompt or chat messages, a length, sampling settings."""

    prompt: str | None
    messages: list[dict[str, str]] | None
    max_tokens: int | None
    sampling: dict[str, Any] = field(default_factory=dict)


class GenerationSession(Protocol):
    """A generation request checked against its model (prompt encoded, context window respected), holding the
    model until ``close``: ``start`` queues it, ``events`` streams it, ``cancel`` stops it early."""

    prompt_tokens: int
    #: The most tokens it may generate (the request's ``max_tokens`` or the default that fits the window).
    max_tokens: int

    def start(self) -> None:
        """Queue the request on the model; Overloaded (429) when the model's queue is full."""

    def events(self) -> AsyncIterator[TokenEvent]:
        """Generated pieces in order; the last one has ``finish_reason``."""

    def cancel(self) -> None:
        """Stop generating (the client went away); a no-op once finished."""

    async def close(self) -> None:
        """Give the model back (idempotent)."""


@dataclass(frozen=True)
class AudioClip:
    """Decoded speech: mono samples at the recogniser's rate, and its length in seconds."""

    samples: np.ndarray
    seconds: float


@dataclass(frozen=True)
class Batching:
    """A version's dynamic batching settings, as the model configuration extension reports them."""

    max_batch_size: int
    max_queue_delay_ms: float
    instances: int


@dataclass(frozen=True)
class ModelStats:
    """One model version as serving sees it now."""

    model: str
    version: int
    state: ModelState
    in_flight: int = 0
    queued: int = 0
    memory_bytes: int = 0
    pinned: bool = False
    copies: int = 0


class ServingBackend(Protocol):
    """What runs the models. Knows nothing of tenants, keys or money."""

    def served_as(self, mv: ModelVersion) -> ServedAs:
        """What the version is served for (from its format)."""

    def platform(self, mv: ModelVersion) -> str:
        """The platform string of Open Inference Protocol model metadata (``onnxruntime_onnx``, …)."""

    def estimate_tokens(self, mv: ModelVersion, request: InferenceRequest) -> TokenEstimate | None:
        """Tokens the request's text will use (without loading the model); None for models that read no text."""

    async def infer(self, mv: ModelVersion, request: InferenceRequest, rows: int, cost: int) -> TensorResult:
        """Run a validated tensor request (batched with others); ``cost`` is its weight in a batch."""

    async def open_generation(self, mv: ModelVersion, spec: GenerationSpec) -> GenerationSession:
        """Check a generation request against the model (InvalidRequest for a prompt past its window) and hold
        the model for it; the caller starts it once admitted and closes it when done."""

    def decode_audio(self, audio: bytes) -> AudioClip:
        """Decode an uploaded audio file (InvalidRequest when it is not audio or holds no sound)."""

    async def transcribe(
        self, mv: ModelVersion, clip: AudioClip, *, language: str | None, prompt: str | None, temperature: float
    ) -> Transcript:
        """Speech to text (InvalidRequest for a language the model cannot transcribe)."""

    async def load(self, mv: ModelVersion) -> None:
        """Load the version now (it would load on first use otherwise)."""

    async def unload(self, name: str, version: int | None = None) -> None:
        """Unload versions of ``name`` (all when None) once their requests in flight have finished."""

    async def pin(self, mv: ModelVersion, holder: str) -> None:
        """Load the version and keep it loaded while any holder holds it (each holder counts once)."""

    def unpin(self, mv: ModelVersion, holder: str) -> None:
        """``holder`` no longer needs the version kept loaded; it stays pinned while others (or settings) do."""

    def state(self, mv: ModelVersion) -> ModelState:
        """READY (loaded), LOADING, PREPARING (converting, see ``preparing``), or UNAVAILABLE (loads on first
        request)."""

    def preparing(self, mv: ModelVersion) -> Preparation | None:
        """The one-time preparation running for ``mv`` now (step, progress), else None."""

    def weights(self, mv: ModelVersion) -> dict[str, Any] | None:
        """How ``mv``'s weights are held when served (a language model's int8 or float32, with the quality
        guard's figures), once its preparation has told; None for formats served as stored."""

    def inference_stats(self, mv: ModelVersion) -> InferenceCounters:
        """Cumulative statistics of ``mv``'s batched inference (zeros for a version never run here)."""

    def batching(self, mv: ModelVersion) -> Batching:
        """How requests to ``mv`` are batched (for Triton's model configuration)."""

    def stats(self) -> list[ModelStats]:
        """Every version serving holds or is loading now."""

    def prepare(self, mv: ModelVersion) -> None:
        """Start slow one-time work for a newly registered version (a format conversion) in the background."""

    async def start(self) -> None:
        """Connect to whatever runs the models (the cluster); called once when the server starts."""

    async def describe(self) -> dict[str, Any]:
        """Where the models run: nodes, deployments, replicas and what each holds (``openmaas cluster status``)."""

    async def close(self) -> None:
        """Unload everything and stop background work."""
