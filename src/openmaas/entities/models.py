"""Domain objects of the model registry: models, versions, cards and serving settings."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from openmaas.entities.tensors import Signature

Visibility = Literal["private", "shared", "public"]
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


class Model(BaseModel):
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
