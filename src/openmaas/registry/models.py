"""Domain objects of the model registry."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from openmaas.runtimes.types import Signature

Visibility = Literal["private", "shared", "public"]


class ModelCard(BaseModel):
    """What a consumer needs to know before calling a model."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(default="", description="e.g. text-embedding, image-classification, tabular-regression")
    description: str = ""
    intended_use: str = ""
    training_data: str = ""
    metrics: dict[str, float] = Field(default_factory=dict, description="Evaluation figures, e.g. accuracy.")
    limitations: str = ""
    license: str = ""
    privacy: str = Field(default="", description="Privacy statement: what data the model saw and keeps.")


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
