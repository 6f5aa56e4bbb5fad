"""The tabular task's network: standardisation kept in the model, then a linear layer or an MLP."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from openmaas.training.data import Kind
from openmaas.training.loop import Net, target_scale
from openmaas.training.optim import TrainParams


class TabularNet(Net):
    """Standardise (statistics of the training split, kept in the model) -> linear or MLP."""

    mean: torch.Tensor
    std: torch.Tensor
    y_mean: torch.Tensor
    y_std: torch.Tensor

    def __init__(
        self,
        n_in: int,
        n_out: int,
        params: TrainParams,
        mean: np.ndarray,
        std: np.ndarray,
        y_scale: tuple[float, float],
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(mean.astype(np.float32)))
        self.register_buffer("std", torch.from_numpy(std.astype(np.float32)))
        # Regression learns a standardised target; the model answers in the target's own units.
        self.register_buffer("y_mean", torch.tensor(y_scale[0], dtype=torch.float32))
        self.register_buffer("y_std", torch.tensor(y_scale[1], dtype=torch.float32))
        layers: list[nn.Module] = []
        width = n_in
        if params.model == "mlp":
            for h in params.hidden:
                layers += [nn.Linear(width, h), nn.ReLU()]
                width = h
        layers.append(nn.Linear(width, n_out))
        self.net = nn.Sequential(*layers)

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net((x - self.mean) / self.std)  # (B, n_out)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaled(x) * self.y_std + self.y_mean


def tabular_net(x_train: np.ndarray, y_train: np.ndarray, kind: Kind, n_classes: int, params: TrainParams) -> Net:
    """A TabularNet standardising with the training split's statistics."""
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0
    n_out = n_classes if kind == "classification" else 1
    return TabularNet(x_train.shape[1], n_out, params, mean, std, target_scale(y_train, kind))
