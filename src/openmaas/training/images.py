"""Image classification: a small CNN for grayscale or RGB images of one fixed size."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from openmaas.datasets.images import Images
from openmaas.errors import InvalidRequest
from openmaas.training.tabular import Net, Prepared


def prepare(images: Images) -> Prepared:
    if len(images.classes) < 2:
        raise InvalidRequest(
            f"the zip has one class folder ('{images.classes[0]}'); classification needs two or more", param="dataset"
        )
    counts = {c: images.labels.count(c) for c in images.classes}
    lonely = [c for c, n in counts.items() if n < 2]
    if lonely:
        raise InvalidRequest(
            f"class folder '{lonely[0]}' has only {counts[lonely[0]]} image; every class needs at least 2",
            param="dataset",
        )
    index = {c: i for i, c in enumerate(images.classes)}
    y = np.array([index[label] for label in images.labels], dtype=np.int64)
    return Prepared(images.x, y, ["image"], images.classes)


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
