"""Image classification: a small CNN for grayscale or RGB images of one fixed size."""

from __future__ import annotations

import torch
from torch import nn

from openmaas.training.loop import Net


class SmallCNN(Net):
    """(B, C, H, W) in [0, 1] -> two conv blocks (halving the size while it is at least 8) -> 4x4 pool -> linear."""

    def __init__(self, channels: int, height: int, width: int, n_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, side = channels, min(height, width)
        for c_out in (16, 32):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
            if side >= 8:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Dropout(0.2), nn.Linear(32 * 16, n_classes)]
        self.net = nn.Sequential(*layers)

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)  # (B, n_classes) logits
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaled(x)
