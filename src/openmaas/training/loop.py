"""The training loop every task shares: resumable epochs with checkpoints, data-parallel workers, early stopping,
and the held-out evaluation.

Reads top to bottom: the model contract -> per-epoch report -> the loop -> held-out metrics.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from openmaas.training.data import Kind
from openmaas.training.optim import TrainParams, lr_factor, make_optimizer


class Net(nn.Module, abc.ABC):
    """What the training loop needs of a model: ``scaled`` outputs for the loss, ``forward`` for serving."""

    @abc.abstractmethod
    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        """The outputs the loss is computed on (logits, or a standardised regression target)."""


def target_scale(y: np.ndarray, kind: Kind) -> tuple[float, float]:
    """(mean, std) a regression target is standardised with for the loss; classification keeps its labels."""
    return (0.0, 1.0) if kind == "classification" else (float(y.mean()), float(y.std() or 1.0))


# -- training ------------------------------------------------------------------------------------------------------


@dataclass
class EpochReport:
    epoch: int  # 1-based
    epochs: int
    loss: float
    val_loss: float
    val_metric: float  # accuracy or R²
    lr: float
    stopped_early: bool = False
    workers: list[float] | None = None  # each data-parallel worker's training loss

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "epoch": self.epoch,
            "loss": round(self.loss, 6),
            "val_loss": round(self.val_loss, 6),
            "val_metric": round(self.val_metric, 6),
            "lr": self.lr,
        }
        if self.workers is not None:
            out["workers"] = [{"rank": r, "loss": round(v, 6)} for r, v in enumerate(self.workers)]
        return out


def train(
    data: dict[str, tuple[np.ndarray, np.ndarray]],
    params: TrainParams,
    kind: Kind,
    n_classes: int,
    checkpoint: Path,
    on_epoch: Callable[[EpochReport], None],
    network: Net | Callable[[], Net],
    cancelled: Callable[[], bool] = lambda: False,
    rank: int = 0,
    world: int = 1,
    soft_targets: tuple[np.ndarray, float, float] | None = None,
    after_epoch: Callable[[int], None] | None = None,
) -> Net:
    """Train, saving a checkpoint after every epoch; an existing checkpoint is resumed from.

    Any ``network`` with ``scaled`` (the outputs the loss sees) and ``forward`` (what is served) trains the same
    way; a function instead builds it once the seed is set, so its initial weights follow ``params.seed`` (and are
    the same on every data-parallel rank). With ``world`` > 1 this is one of that many
    data-parallel processes (a gloo process group is already set up): each takes its share of every global batch,
    gradients are averaged across them, and rank 0 validates, checkpoints, reports and decides when to stop.

    ``soft_targets`` (distillation): a teacher's probabilities for each training row, a temperature T and a weight
    alpha; the loss is alpha * T² * KL(teacher at T || student at T) + (1 - alpha) * cross-entropy.

    ``after_epoch`` runs on every rank once an epoch's checkpoint is written (Ray Train reports there)."""
    import torch.distributed as dist

    torch.manual_seed(params.seed)
    x_train, y_train = data["train"]
    y_scale = target_scale(y_train, kind)
    model = network if isinstance(network, Net) else network()
    groups = getattr(model, "param_groups", None)
    opt = make_optimizer(params, groups(params) if groups else list(model.parameters()))
    for group in opt.param_groups:
        group["base_lr"] = group["lr"]  # the schedule scales each group's own rate
    loss_fn: nn.Module = nn.CrossEntropyLoss() if kind == "classification" else nn.MSELoss()
    start, best, best_state, waited, done = 0, (math.inf, math.inf), None, 0, False
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)  # our own file, written below; never an upload
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, best, best_state, waited = state["epoch"], state["best"], state["best_state"], state["waited"]
        if not isinstance(best, tuple):  # a checkpoint from before the tie-break: the monitored score alone
            best = (best, math.inf)
        done = state.get("done", False)
        torch.set_rng_state(state["rng"])
    if done:
        start = params.epochs  # finished earlier (say, by data-parallel workers): only the best weights remain

    xt = torch.from_numpy(x_train)

    def target(y: np.ndarray) -> torch.Tensor:
        if kind == "classification":
            return torch.from_numpy(y)
        return torch.from_numpy(((y - y_scale[0]) / y_scale[1]).astype(np.float32))

    yt = target(y_train)
    soft, temperature, alpha = None, 1.0, 0.0
    if soft_targets is not None:
        probs, temperature, alpha = soft_targets
        sharp = np.clip(probs.astype(np.float64), 1e-12, 1.0) ** (1.0 / temperature)  # softmax(logits / T)
        soft = torch.from_numpy((sharp / sharp.sum(axis=1, keepdims=True)).astype(np.float32))
    xv, yv = torch.from_numpy(data["val"][0]), target(data["val"][1])
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    for epoch in range(start, params.epochs):
        if world == 1 and cancelled():
            break
        lr = params.learning_rate * lr_factor(params, epoch)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(params, epoch)
        model.train()
        order = torch.randperm(len(xt))  # the same on every rank: same seed, same RNG state
        total, seen = 0.0, 0
        step = params.batch_size * world
        for i in range(0, len(xt), step):
            idx = order[i : i + step][rank::world]  # this rank's share of the global batch
            opt.zero_grad()
            if len(idx):
                out = model.scaled(xt[idx])
                loss = loss_fn(out, yt[idx]) if kind == "classification" else loss_fn(out[:, 0], yt[idx])
                if soft is not None:
                    kd = nn.functional.kl_div(
                        nn.functional.log_softmax(out / temperature, dim=1), soft[idx], reduction="batchmean"
                    )
                    loss = alpha * temperature * temperature * kd + (1 - alpha) * loss
                if params.l1:
                    loss = loss + params.l1 * sum(w.abs().sum() for w in weights)
                loss.backward()
                total += float(loss.detach()) * len(idx)
                seen += len(idx)
            if world > 1:
                for p in model.parameters():
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                    p.grad /= world
            opt.step()
        losses = [total / max(seen, 1)]
        if world > 1:
            gathered = [torch.zeros(1) for _ in range(world)]
            dist.all_gather(gathered, torch.tensor([losses[0]]))
            losses = [float(g) for g in gathered]
        model.eval()
        with torch.no_grad():
            out = model.scaled(xv)
            if kind == "classification":
                val_loss = float(loss_fn(out, yv))
                val_metric = float((out.argmax(dim=1) == yv).float().mean())
            else:
                val_loss = float(loss_fn(out[:, 0], yv))
                val_metric = _r2(yv.numpy(), out[:, 0].numpy())
        # Validation accuracy moves in steps of one row, so ties are common: among equal accuracies the lower
        # validation loss is the better epoch (else training stops at the first epoch that reaches the best
        # accuracy, often the least fitted one).
        score = (val_loss, math.inf) if params.monitor == "val_loss" else (-val_metric, val_loss)
        if score[0] < best[0] - 1e-6 or (score[0] <= best[0] + 1e-6 and score[1] < best[1] - 1e-6):
            best, waited = score, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
        stop = params.early_stopping and waited >= params.patience
        if rank == 0:
            # Report before checkpointing: a crash between the two then redoes (and re-reports) this epoch,
            # instead of resuming after an epoch the job's history never heard of.
            report = EpochReport(epoch + 1, params.epochs, sum(losses) / world, val_loss, val_metric, lr, stop)
            report.workers = losses if world > 1 else None
            on_epoch(report)
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "epoch": epoch + 1,
                    "best": best,
                    "best_state": best_state,
                    "waited": waited,
                    "rng": torch.get_rng_state(),
                    "done": stop or epoch + 1 == params.epochs,
                },
                checkpoint.with_suffix(".tmp"),
            )
            checkpoint.with_suffix(".tmp").replace(checkpoint)  # atomic: a crash never leaves half a checkpoint
            stop = stop or cancelled()
        if world > 1:
            flag = torch.tensor([1 if stop else 0])
            dist.broadcast(flag, src=0)  # rank 0 decides: early stop or cancel
            stop = bool(flag.item())
        if after_epoch is not None:
            after_epoch(epoch + 1)
        if stop:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum()) or 1.0
    return 1 - ss_res / ss_tot


# -- evaluation ----------------------------------------------------------------------------------------------------


def evaluate(model: Net, x: np.ndarray, y: np.ndarray, kind: Kind) -> dict[str, Any]:
    """Held-out metrics of the network in memory, by the evaluation jobs' code (``evaluation.metrics``)."""
    from openmaas.evaluation import metrics

    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    if kind == "regression":
        return metrics.regression(y, out[:, 0].numpy().astype(np.float64))
    probs = torch.softmax(out, dim=1).numpy()
    return metrics.classification(y, probs, [str(i) for i in range(probs.shape[1])])
