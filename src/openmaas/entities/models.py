"""Domain objects of the model registry: models, versions, cards and serving settings."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from openmaas.entities.tensors import Signature

Visibility = Literal["private", "shared", "public"]
# A model's own name (the part after its organisation's namespace).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Words that follow a model's name in URLs (/v2/models/{name}/ready ...): a model may not be called so.
RESERVED_NAMES = frozenset(
    {"ready", "versions", "infer", "load", "unload", "stats", "config", "plans", "review", "compare", "evaluations"}
)
ReviewState = Literal["none", "pending", "approved", "rejected"]
# What a card must say before its model may be reviewed for publication.
REQUIRED_FOR_PUBLICATION = ("intended_use", "training_data", "metrics", "limitations", "license", "privacy")


class ModelCard(BaseModel):
    """What a consumer needs to know before calling a model. Every field is optional at registration; the ones in
    ``REQUIRED_FOR_PUBLICATION`` must be filled before the model can be reviewed for publication."""

    model_config = ConfigDict(extra="forbid", title="OpenMaaS model card")

    task: str = Field(
        default="",
        description="What the model does, e.g. text-embedding, text-generation, automatic-speech-recognition, "
        "image-classification, tabular-classification, tabular-regression.",
        examples=["tabular-classification"],
    )
    description: str = Field(
        default="", description="One paragraph: what it takes, what it returns, how it was made.", examples=[""]
    )
    intended_use: str = Field(
        default="", description="Who should use it for what, and what it is not for.", examples=[""]
    )
    training_data: str = Field(
        default="", description="What data it learnt from (source, size, period, how it was split).", examples=[""]
    )
    metrics: dict[str, float] = Field(
        default_factory=dict,
        description="Measured figures, by name (e.g. accuracy, f1_macro, r2), on held-out data; numbers only.",
        examples=[{"accuracy": 0.95}],
    )
    classes: list[str] = Field(
        default_factory=list,
        description="Classifiers: the class names in the order of the model's outputs (index 0 first).",
        examples=[[]],
    )
    limitations: str = Field(
        default="", description="Where it fails or is biased; input limits (e.g. longest text it reads).", examples=[""]
    )
    license: str = Field(
        default="", description="The licence of the weights (an SPDX id where one fits).", examples=[""]
    )
    privacy: str = Field(
        default="", description="Privacy statement: what data the model saw, and what it keeps.", examples=[""]
    )

    def missing_for_publication(self) -> list[str]:
        return [f for f in REQUIRED_FOR_PUBLICATION if not getattr(self, f)]


def card_template() -> dict[str, Any]:
    """A card with every field holding its example (``openmaas models card-template``): fill it in."""
    return {name: (f.examples or [""])[0] for name, f in ModelCard.model_fields.items()}


class Preparation(BaseModel):
    """One-time work in progress before a model version can load (e.g. converting a GGUF file)."""

    model_config = ConfigDict(frozen=True)

    step: str
    progress: float = Field(ge=0, le=1, description="Fraction done, 0-1.")
    elapsed_s: float


class ServingConfig(BaseModel):
    """Per-model overrides of the serving defaults in Settings; unset fields keep the defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int | None = Field(default=None, ge=1, le=65536)
    max_queue_delay_ms: float | None = Field(default=None, ge=0, le=10_000)
    max_balance_wait_ms: float | None = Field(default=None, ge=0, le=10_000)
    max_queue_size: int | None = Field(default=None, ge=1, le=1_000_000)
    max_batch_tokens: int | None = Field(default=None, ge=1)
    pinned: bool | None = Field(default=None, description="Never evict this model once loaded.")
    instances: int | None = Field(default=None, ge=1, le=64, description="Copies of the model to run batches on.")
    # Cluster mode (OPENMAAS_BACKEND=ray): a model with any of these runs as a Ray Serve deployment of its own.
    min_replicas: int | None = Field(
        default=None, ge=0, le=1024, description="Fewest replicas (0: scale to zero after idle_timeout_s)."
    )
    max_replicas: int | None = Field(default=None, ge=1, le=1024, description="Most replicas the autoscaler starts.")
    target_ongoing_requests: float | None = Field(
        default=None, gt=0, le=100_000, description="Requests in flight per replica the autoscaler aims at."
    )
    idle_timeout_s: float | None = Field(
        default=None, gt=0, le=86_400, description="Seconds without calls before a replica is stopped."
    )

    @model_validator(mode="after")
    def _replicas_in_order(self) -> ServingConfig:
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self

    @property
    def has_replica_settings(self) -> bool:
        return any(
            v is not None
            for v in (self.min_replicas, self.max_replicas, self.target_ongoing_requests, self.idle_timeout_s)
        )


class ModelVersion(BaseModel):
    """One immutable version: an artifact, its signature and its card."""

    model_config = ConfigDict(frozen=True)

    model: str
    version: int
    format: str
    sha256: str
    size_bytes: int
    signature: Signature
    card: ModelCard
    created_at: datetime


def split_name(name: str) -> tuple[str | None, str]:
    """``"acme/wine"`` -> ``("acme", "wine")``; a platform model's bare ``"wine"`` -> ``(None, "wine")``."""
    namespace, sep, short = name.partition("/")
    return (namespace, short) if sep else (None, name)


def qualify(namespace: str | None, name: str) -> str:
    """The full name of ``name`` registered in ``namespace`` (an organisation's name; None: the platform's)."""
    return f"{namespace}/{name}" if namespace else name


class Model(BaseModel):
    """A model: its full name is ``org/name`` for an organisation's model, bare for the platform's catalogue."""

    model_config = ConfigDict(frozen=True)

    name: str
    owner_org_id: str | None
    visibility: Visibility
    created_at: datetime
    latest_version: int | None = None
    serving: ServingConfig = Field(default_factory=ServingConfig)
    # Org ids a ``shared`` model is visible to (besides its owner).
    shared_with: tuple[str, ...] = ()
    review_state: ReviewState = "none"
    review_reason: str | None = None

    @property
    def namespace(self) -> str | None:
        return split_name(self.name)[0]

    @property
    def short_name(self) -> str:
        return split_name(self.name)[1]
