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


class EvaluateSpec(BaseModel):
    """Score a registered version on a dataset, through the serving path, and store the report with it."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["evaluate"] = "evaluate"
    model: str = Field(min_length=1, max_length=200, description="The model to evaluate.")
    version: int | None = Field(default=None, ge=1, description="Its version (default: the latest).")
    dataset: str = Field(description="Dataset id.")
    task: Literal["classification", "regression", "embedding", "text-generation", "speech"] | None = Field(
        default=None, description="What to measure (default: from the version's card and signature)."
    )
    target: str = Field(default="label", min_length=1, description="The column holding the truth (tables).")
    text_column: str = Field(default="text", min_length=1, description="The text column (text models).")
    classes: list[str] | None = Field(
        default=None, description="Class names in the model's output order, when its card does not name them."
    )
    reference_version: int | None = Field(
        default=None, ge=1, description="Embeddings: the version of the same model to measure fidelity against."
    )
    max_rows: int | None = Field(default=None, ge=1, le=1_000_000, description="Evaluate the first rows only.")
    batch_size: int = Field(default=32, ge=1, le=1024, description="Rows per call while scoring.")


class QuantizeSpec(BaseModel):
    """Quantise a registered version to int8 and register the result (within the metric budget) as a new version,
    or as a new model named ``output_model``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["quantize"] = "quantize"
    model: str = Field(min_length=1, max_length=200, description="The model to quantise.")
    version: int | None = Field(default=None, ge=1, description="Its version (default: the latest).")
    method: Literal["dynamic-int8", "static-int8"] = Field(
        default="dynamic-int8",
        description="dynamic-int8: text encoders (weights int8, embedding table included); static-int8: ONNX "
        "classifiers and regressors (weights and activations int8, calibrated on calibration_dataset).",
    )
    calibration_dataset: str | None = Field(default=None, description="static-int8: rows to calibrate ranges on.")
    eval_dataset: str | None = Field(
        default=None,
        description="Data to measure the task metric and fidelity on (classifiers: required; text encoders: "
        "texts in text_column, or labelled pairs text1,text2,score; default: 600 built-in English sentences).",
    )
    target: str = Field(default="label", min_length=1, description="The truth column of eval_dataset (tables).")
    text_column: str = Field(default="text", min_length=1, description="Texts of eval_dataset (text encoders).")
    output_model: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Register as this model instead of a new version (default: a new version of a model you own, "
        "else '<name>-int8' in your namespace).",
    )
    max_metric_drop: float = Field(
        default=0.01, ge=0, le=1, description="Largest absolute drop of the task metric that is accepted."
    )
    force: bool = Field(default=False, description="Register even when the result is outside the budget.")


class _Budget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    output_model: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Register as this model (default: a new version of a model you own, else '<name>-<method>' "
        "in your namespace).",
    )
    max_metric_drop: float = Field(default=0.01, ge=0, le=1, description="Largest accepted accuracy drop (absolute).")
    force: bool = Field(default=False, description="Register even when the result is outside the budget.")


class PruneSpec(_Budget):
    """Magnitude pruning of an ONNX classifier's Conv and Linear layers, then fine-tuning on ``dataset``."""

    type: Literal["prune"] = "prune"
    model: str = Field(min_length=1, max_length=200)
    version: int | None = Field(default=None, ge=1)
    dataset: str = Field(description="Labelled rows: fine-tuning, validation and the held-out test split.")
    eval_dataset: str | None = Field(
        default=None, description="Rows to measure both on (default: a held-out fifth of dataset)."
    )
    target: str = Field(default="label", min_length=1)
    classes: list[str] | None = Field(default=None, description="Class names in output order (default: the card's).")
    sparsity: float = Field(ge=0.0, le=0.95, description="Fraction of weights (unstructured) or channels removed.")
    structured: bool = Field(
        default=False,
        description="false: zero single weights (the dense file is not smaller or faster); true: remove whole "
        "channels and units, so the served graph is smaller and faster.",
    )
    fine_tune_epochs: int = Field(default=20, ge=0, le=1000)
    learning_rate: float = Field(default=0.001, gt=0, le=1)
    seed: int = 42


class DistillSpec(_Budget):
    """A smaller student: a classifier trained on a teacher's soft targets (and the labels), or a text encoder with
    fewer layers trained to reproduce the teacher's embeddings."""

    type: Literal["distill"] = "distill"
    teacher: str = Field(min_length=1, max_length=200)
    teacher_version: int | None = Field(default=None, ge=1)
    dataset: str = Field(
        description="Classifiers: labelled rows (training, validation, held-out test). Text encoders: the texts "
        "(text_column) the student learns the teacher's embeddings on."
    )
    eval_dataset: str | None = Field(
        default=None,
        description="Rows to measure teacher and student on, e.g. the teacher's own held-out data (default: a "
        "held-out fifth of dataset; text encoders: 600 built-in English sentences, or pairs text1,text2,score).",
    )
    text_column: str = Field(default="text", min_length=1, description="Text encoders: the texts of dataset.")
    target: str = Field(default="label", min_length=1)
    classes: list[str] | None = Field(
        default=None, description="The student's classes: must be the teacher's (default: the teacher's)."
    )
    student: dict[str, list[int] | int] = Field(
        default_factory=lambda: {"hidden": [32]},  # type: ignore[arg-type]
        description='Classifiers: {"hidden": [units, ...]} for an MLP, or {"channels": [c, ...]} for a CNN on image '
        'inputs. Text encoders: {"layers": N}, the teacher with N of its transformer layers.',
    )
    temperature: float = Field(default=4.0, gt=0, le=100)
    alpha: float = Field(default=0.9, ge=0, le=1, description="Weight of the soft targets against the labels.")
    epochs: int = Field(default=200, ge=1, le=10_000)
    patience: int = Field(default=40, ge=1, description="Epochs without a better validation accuracy before stopping.")
    learning_rate: float = Field(default=0.003, gt=0, le=1)
    seed: int = 42

    @model_validator(mode="after")
    def _one_student_shape(self) -> DistillSpec:
        keys = set(self.student)
        if len(keys) != 1 or not keys <= {"hidden", "channels", "layers"}:
            raise ValueError('student is {"hidden": [units, ...]}, {"channels": [channels, ...]} or {"layers": N}')
        value = next(iter(self.student.values()))
        if "layers" in keys:
            if not isinstance(value, int) or not 1 <= value <= 48:
                raise ValueError("student layers must be a number of transformer layers, 1..48")
        elif not isinstance(value, list) or any(not 1 <= w <= 4096 for w in value):
            raise ValueError("student widths must be a list of numbers 1..4096")
        return self


JOB_SPECS: dict[str, type[BaseModel]] = {
    "train": TrainSpec,
    "evaluate": EvaluateSpec,
    "quantize": QuantizeSpec,
    "prune": PruneSpec,
    "distill": DistillSpec,
}


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
