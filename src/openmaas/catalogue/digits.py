"""digits-cnn: a small PyTorch CNN trained at first start on scikit-learn's 8x8 digits, exported to ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from openmaas.entities.models import ModelCard

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

    from openmaas.training.export import export_onnx
    from openmaas.training.loop import Net, evaluate, train
    from openmaas.training.optim import TrainParams

    class DigitsCNN(Net):
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

        def scaled(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.head(self.features(x / 16.0))  # (B,10) logits; pixels arrive raw (0..16)
            return out

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.scaled(x)

    # The platform's own training loop (the one jobs use): a validation tenth of the training images picks the
    # best epoch, and the held-out quarter is only ever used for the card's accuracy.
    x_tr, x_te, y_tr, y_te = held_out_split()
    from sklearn.model_selection import train_test_split

    x_fit, x_val, y_fit, y_val = train_test_split(x_tr, y_tr, test_size=0.1, random_state=SEED, stratify=y_tr)
    params = TrainParams(
        optimizer="adam", learning_rate=2e-3, batch_size=64, epochs=EPOCHS, early_stopping=False, seed=SEED
    )
    data = {"train": (x_fit, y_fit), "val": (x_val, y_val)}
    checkpoint = workdir / "digits-cnn.ckpt"
    model = train(data, params, "classification", 10, checkpoint, lambda report: None, DigitsCNN())
    checkpoint.unlink(missing_ok=True)
    accuracy = float(evaluate(model, x_te, y_te, "classification")["accuracy"])

    path = workdir / "digits-cnn.onnx"
    export_onnx(model, (1, 8, 8), "classification", path, input_name="image")
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
