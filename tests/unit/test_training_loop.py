"""The shared training loop's choice of the best epoch when it monitors validation accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from openmaas.training import loop
from openmaas.training.optim import TrainParams


class _Linear(loop.Net):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaled(x)


def _separable(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes far apart: every epoch classifies all of them, while the loss keeps falling for many epochs."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(0.0, 0.3, (n, 2)).astype(np.float32) + np.where(y[:, None] == 1, 2.0, -2.0).astype(np.float32)
    return x, y.astype(np.int64)


def test_among_epochs_of_equal_validation_accuracy_the_lowest_validation_loss_is_kept(tmp_path: Path) -> None:
    """Accuracy moves in steps of one row, so it ties for epochs on end while the model still improves: the loop
    goes on while the validation loss falls, and keeps the epoch with the lowest loss among the most accurate.
    Before, it kept the first epoch that reached the best accuracy and stopped ``patience`` epochs later (a pruned
    network was fine-tuned for 6 of its 25 epochs and its held-out accuracy fell by up to two rows)."""
    data = {"train": _separable(200, 0), "val": _separable(60, 1)}
    params = TrainParams(epochs=15, learning_rate=0.05, batch_size=32, seed=0, patience=3, monitor="val_metric")
    reports: list[loop.EpochReport] = []
    model = loop.train(data, params, "classification", 2, tmp_path / "c.pt", reports.append, _Linear)

    first = next(r.epoch for r in reports if r.val_metric == 1.0)  # from here on every epoch ties on accuracy ...
    assert all(r.val_metric == 1.0 for r in reports[first - 1 :])
    assert len(reports) > first + params.patience  # ... and training does not stop at the first of them
    losses = [r.val_loss for r in reports[first - 1 :]]
    assert losses[-1] < losses[0]
    x_val, y_val = (torch.from_numpy(a) for a in data["val"])
    with torch.no_grad():
        kept = float(nn.CrossEntropyLoss()(model.eval().scaled(x_val), y_val))
    assert kept == min(losses)  # the weights returned are the epoch with the lowest validation loss


def test_a_checkpoint_written_before_the_tie_break_still_resumes(tmp_path: Path) -> None:
    """Checkpoints from earlier versions hold the monitored score alone as ``best``; resuming one goes on."""
    data = {"train": _separable(100, 0), "val": _separable(30, 1)}
    params = TrainParams(epochs=4, learning_rate=0.01, seed=0, early_stopping=False, monitor="val_metric")
    reports: list[loop.EpochReport] = []
    loop.train(data, params.model_copy(update={"epochs": 2}), "classification", 2, tmp_path / "c.pt", reports.append,
               _Linear)  # fmt: skip
    state = torch.load(tmp_path / "c.pt", weights_only=False)
    state["best"], state["done"] = -1.0, False  # the old form: a float, -accuracy
    torch.save(state, tmp_path / "c.pt")
    loop.train(data, params, "classification", 2, tmp_path / "c.pt", reports.append, _Linear)
    assert [r.epoch for r in reports] == [1, 2, 3, 4]
