"""digits-cnn: a small PyTorch CNN trained at first start on scikit-learn's 8x8 digits, exported to ONNX."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from openmaas.registry.models import ModelCard

SEED = 0
EPOCHS = 40


def held_out_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, x_test, y_train, y_test): images (N,1,8,8) float32 with raw pixel values 0..16."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype(np.float32).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)
    return x_tr, x_te, y_tr, y_te


def build(workdir: Path) -> tuple[Path, ModelCard]:
    import torch
    from torch import nn

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1),
                nn.ReLU(),  # (B,16,8,8)
                nn.Conv2d(16, 32, 3, padding=1),
                nn.ReLU(),  # (B,32,8,8)
                nn.MaxPool2d(2),  # (B,32,4,4)
            )
            self.head = nn.Sequential(
                nn.Flatten(), nn.Linear(32 * 16, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10)
            )

        def logits(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x / 16.0))  # pixels arrive raw (0..16)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            probs = torch.softmax(self.logits(x), dim=-1)
            return probs, probs.argmax(dim=-1)

    torch.manual_seed(SEED)
    x_tr, x_te, y_tr, y_te = held_out_split()
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _epoch in range(EPOCHS):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model.logits(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        _, pred = model(torch.from_numpy(x_te))
    accuracy = float((pred.numpy() == y_te).mean())

    path = workdir / "digits-cnn.onnx"
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs onnxscript; this
        # graph is simple enough for either, and this one adds no dependency.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            model,
            (torch.zeros(2, 1, 8, 8),),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=["probabilities", "label"],
            dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}, "label": {0: "batch"}},
        )
    card = ModelCard(
        task="image-classification",
        description="Classifies 8x8 grayscale images of handwritten digits (0-9). Input 'image' FP32 "
        "[-1,1,8,8] with raw pixel values 0..16; outputs 'probabilities' FP32 [-1,10] and 'label' INT64 [-1].",
        intended_use="Demonstration and testing of image classification serving; digits scanned like the UCI "
        "optical recognition data set.",
        training_data=f"scikit-learn's digits data set (1,797 images from 43 writers), 75% used for training "
        f"(stratified split, seed {SEED}); trained at first start for {EPOCHS} epochs with Adam.",
        metrics={"held_out_accuracy": round(accuracy, 4), "held_out_samples": len(y_te)},
        limitations="Only 8x8 images with 17 grey levels, centred like the training data; not for real-world "
        "handwriting at other resolutions.",
        license="BSD-3-Clause (data set); model weights Apache-2.0",
        privacy="Trained on a public data set; requests are not stored.",
    )
    return path, card
