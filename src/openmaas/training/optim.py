"""Optimisers and learning-rate schedules by name (the parameters a job spec may set)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

Optimizer = Literal["sgd", "momentum", "adagrad", "adam", "adamw"]
Schedule = Literal["constant", "exponential", "linear", "cosine"]


class TrainParams(BaseModel):
    """Everything a training job may tune; defaults suit small tabular data."""

    model_config = ConfigDict(extra="forbid")

    model: Literal["linear", "mlp"] = "linear"
    hidden: list[int] = Field(default_factory=lambda: [64])
    optimizer: Optimizer = "adam"
    learning_rate: float = Field(default=0.01, gt=0, le=10)
    encoder_learning_rate: float = Field(
        default=2e-5, gt=0, le=1, description="Learning rate of the encoder's own weights when fine-tuning it."
    )
    schedule: Schedule = "constant"
    warmup_epochs: int = Field(default=0, ge=0)
    decay: float = Field(default=0.95, gt=0, le=1, description="Per-epoch factor of the exponential schedule.")
    weight_decay: float = Field(default=0.0, ge=0, description="L2 penalty.")
    l1: float = Field(default=0.0, ge=0, description="L1 penalty on the weights.")
    batch_size: int = Field(default=32, ge=1, le=65536)
    epochs: int = Field(default=100, ge=1, le=10_000)
    early_stopping: bool = True
    monitor: Literal["val_loss", "val_metric"] = "val_loss"
    patience: int = Field(default=10, ge=1)
    validation_split: float = Field(default=0.15, gt=0, lt=0.5)
    test_split: float = Field(default=0.2, gt=0, lt=0.5)
    seed: int = 42
    workers: int = Field(default=1, ge=1, le=16, description="Data-parallel processes (gloo), gradients averaged.")


def make_optimizer(
    params: TrainParams, weights: list[torch.nn.Parameter] | list[dict[str, Any]]
) -> torch.optim.Optimizer:
    """``weights``: the parameters, or parameter groups each with its own base ``lr``."""
    lr, wd = params.learning_rate, params.weight_decay
    if params.optimizer == "sgd":
        return torch.optim.SGD(weights, lr=lr, weight_decay=wd)
    if params.optimizer == "momentum":
        return torch.optim.SGD(weights, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    if params.optimizer == "adagrad":
        return torch.optim.Adagrad(weights, lr=lr, weight_decay=wd)
    if params.optimizer == "adam":
        return torch.optim.Adam(weights, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(weights, lr=lr, weight_decay=wd)


def lr_factor(params: TrainParams, epoch: int) -> float:
    """Multiplier of the base learning rate at ``epoch`` (0-based): warm-up, then the schedule."""
    if epoch < params.warmup_epochs:
        return (epoch + 1) / (params.warmup_epochs + 1)
    t = epoch - params.warmup_epochs
    span = max(1, params.epochs - params.warmup_epochs)
    if params.schedule == "exponential":
        return float(params.decay**t)
    if params.schedule == "linear":
        return max(0.0, 1 - t / span)
    if params.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(t, span) / span))
    return 1.0
