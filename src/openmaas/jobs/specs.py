"""What a job may ask for. Job types are looked up by name, so new ones (evaluation, compression, batch
inference) plug in beside ``train``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from openmaas.errors import InvalidRequest
from openmaas.training.optim import TrainParams

TASKS = ("tabular-classification", "tabular-regression", "image-classification", "text-classification")


class TrainSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["train"] = "train"
    task: Literal["tabular-classification", "tabular-regression", "image-classification", "text-classification"]
    dataset: str = Field(description="Dataset id.")
    target: str = Field(default="label", min_length=1, description="The column to predict (tabular tasks).")
    text_column: str = Field(default="text", min_length=1, description="The text to classify (text tasks).")
    encoder: str = Field(default="all-minilm-l6-v2", description="Registered embedding model (text tasks).")
    fine_tune: bool = Field(
        default=False,
        description="Text tasks: train the encoder's weights too (at params.encoder_learning_rate) instead of a "
        "head on its frozen embeddings; the tuned encoder is served with the head.",
    )
    params: TrainParams = Field(default_factory=TrainParams)
    output_model: str = Field(min_length=1, max_length=128, description="Model to register the result as.")

    @model_validator(mode="after")
    def _fine_tune_needs_text(self) -> TrainSpec:
        if self.fine_tune and self.task != "text-classification":
            raise ValueError("fine_tune applies to text-classification only")
        return self

    @property
    def kind(self) -> Literal["classification", "regression"]:
        return "classification" if self.task.endswith("classification") else "regression"


JOB_SPECS: dict[str, type[BaseModel]] = {"train": TrainSpec}


def parse_spec(body: dict[str, Any]) -> BaseModel:
    kind = body.get("type")
    spec_type = JOB_SPECS.get(kind) if isinstance(kind, str) else None
    if spec_type is None:
        raise InvalidRequest(f"unknown job type {kind!r}; use one of {', '.join(JOB_SPECS)}", param="type")
    try:
        return spec_type.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidRequest(f"invalid job field '{where}': {first['msg']}", param=where) from None
