"""Tabular classification and regression: prepare, split, train with checkpoints, evaluate, export to ONNX.

Reads top to bottom: data -> splits -> model -> training loop (resumable) -> held-out metrics -> ONNX.
"""

from __future__ import annotations

import abc
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from openmaas.datasets.parse import Table
from openmaas.errors import InvalidRequest
from openmaas.training.optim import TrainParams, lr_factor, make_optimizer

Kind = Literal["classification", "regression"]

# -- data ----------------------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    x: np.ndarray  # (N, F) float32, raw numeric feature values
    y: np.ndarray  # (N,) int64 class index, or float32 target
    features: list[str]  # the numeric features, in the order of x's columns
    classes: list[str] | None
    categorical: list[str] = field(default_factory=list)  # categorical feature columns
    raw: np.ndarray | None = None  # (N, len(categorical)) their values, as text
    # Categories of each categorical column, learned from the training split (filled by ``split``).
    categories: dict[str, list[str]] = field(default_factory=dict)


def prepare(table: Table, target: str, kind: Kind) -> Prepared:
    """Features and target from a checked table; problems are named (column, class, row)."""
    if target not in table.columns:
        raise InvalidRequest(
            f"target column '{target}' is not in the dataset; its columns are: {', '.join(table.columns)}",
            param="target",
        )
    columns = [c for c in table.columns if c != target]
    if not columns:
        raise InvalidRequest("the dataset has no feature columns besides the target", param="target")
    free_text = [c for c in columns if table.kinds[c] == "text"]
    if free_text:
        raise InvalidRequest(
            f"feature column '{free_text[0]}' looks like free text (most values differ); drop it, or classify the "
            "text with the text-classification task",
            param="dataset",
        )
    features = [c for c in columns if table.kinds[c] == "number"]
    categorical = [c for c in columns if table.kinds[c] == "category"]
    x = np.array([table.numbers(c) for c in features], dtype=np.float32).reshape(len(features), -1).T
    if not features:
        x = np.zeros((table.rows, 0), dtype=np.float32)
    raw = np.array([table.cells[c] for c in categorical], dtype=object).T if categorical else None
    if kind == "regression":
        if table.kinds[target] != "number":
            bad = next(i for i, v in enumerate(table.cells[target]) if not _is_float(v))
            raise InvalidRequest(
                f"target '{target}' must be numeric for regression; row {bad + 1} has '{table.cells[target][bad][:40]}'",
                param="target",
            )
        return Prepared(x, np.array(table.numbers(target), dtype=np.float32), features, None, categorical, raw)
    labels = table.cells[target]
    classes = sorted(set(labels), key=lambda v: (float(v), v) if _is_float(v) else (math.inf, v))
    if len(classes) < 2:
        raise InvalidRequest(
            f"target '{target}' has a single class ('{classes[0]}'); classification needs two or more", param="target"
        )
    counts = {c: labels.count(c) for c in classes}
    lonely = [c for c, n in counts.items() if n < 2]
    if lonely:
        raise InvalidRequest(
            f"class '{lonely[0]}' of '{target}' has only {counts[lonely[0]]} row; every class needs at least 2 "
            "(one to learn from, one to test on)",
            param="target",
        )
    index = {c: i for i, c in enumerate(classes)}
    return Prepared(x, np.array([index[v] for v in labels], dtype=np.int64), features, classes, categorical, raw)


def _is_float(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def split(prepared: Prepared, params: TrainParams, kind: Kind) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train / validation / test, stratified by class for classification, fixed by the seed.

    Categorical columns are one-hot encoded with the categories seen in the training split (a category seen only
    elsewhere encodes as all zeros, as it will when served); the encoded columns follow the numeric ones."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(prepared.y))
    strat = prepared.y if kind == "classification" else None
    rest, test = train_test_split(rows, test_size=params.test_split, random_state=params.seed, stratify=strat)
    strat = prepared.y[rest] if kind == "classification" else None
    try:
        train, val = train_test_split(rest, test_size=params.validation_split, random_state=params.seed, stratify=strat)
    except ValueError:  # a class too small to stratify the validation split: split without
        train, val = train_test_split(rest, test_size=params.validation_split, random_state=params.seed)
    if prepared.raw is not None:
        prepared.categories = {
            c: sorted(set(prepared.raw[train, j].tolist())) for j, c in enumerate(prepared.categorical)
        }

    def features(idx: np.ndarray) -> np.ndarray:
        if prepared.raw is None:
            return prepared.x[idx]  # as prepared (token ids stay integers)
        parts = [prepared.x[idx]]
        if prepared.raw is not None:
            for j, c in enumerate(prepared.categorical):
                cats = np.array(prepared.categories[c], dtype=object)
                parts.append((prepared.raw[idx, j][:, None] == cats[None, :]).astype(np.float32))
        return np.concatenate(parts, axis=1).astype(np.float32)

    return {name: (features(idx), prepared.y[idx]) for name, idx in (("train", train), ("val", val), ("test", test))}


# -- model ---------------------------------------------------------------------------------------------------------


class Net(nn.Module, abc.ABC):
    """What the training loop needs of a model: ``scaled`` outputs for the loss, ``forward`` for serving."""

    @abc.abstractmethod
    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        """The outputs the loss is computed on (logits, or a standardised regression target)."""


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


class _Served(nn.Module):
    """What the ONNX file computes: probabilities and label (classification) or the prediction (regression)."""

    def __init__(self, net: Net, kind: Kind) -> None:
        super().__init__()
        self.net = net
        self.kind = kind

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(x)
        if self.kind == "classification":
            probs = torch.softmax(out, dim=1)
            return probs, torch.argmax(probs, dim=1)
        return (out[:, 0],)


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
    cancelled: Callable[[], bool] = lambda: False,
    network: Net | None = None,
    rank: int = 0,
    world: int = 1,
) -> Net:
    """Train, saving a checkpoint after every epoch; an existing checkpoint is resumed from.

    ``network`` defaults to a TabularNet for the data; any module with ``scaled`` (the outputs the loss sees)
    and ``forward`` (what is served) trains the same way. With ``world`` > 1 this is one of that many
    data-parallel processes (a gloo process group is already set up): each takes its share of every global batch,
    gradients are averaged across them, and rank 0 validates, checkpoints, reports and decides when to stop."""
    import torch.distributed as dist

    torch.manual_seed(params.seed)
    x_train, y_train = data["train"]
    y_scale = (0.0, 1.0) if kind == "classification" else (float(y_train.mean()), float(y_train.std() or 1.0))
    if network is None:
        mean = x_train.mean(axis=0)
        std = x_train.std(axis=0)
        std[std == 0] = 1.0
        network = TabularNet(x_train.shape[1], n_classes if kind == "classification" else 1, params, mean, std, y_scale)
    model = network
    groups = getattr(model, "param_groups", None)
    opt = make_optimizer(params, groups(params) if groups else list(model.parameters()))
    for group in opt.param_groups:
        group["base_lr"] = group["lr"]  # the schedule scales each group's own rate
    loss_fn: nn.Module = nn.CrossEntropyLoss() if kind == "classification" else nn.MSELoss()
    start, best, best_state, waited, done = 0, math.inf, None, 0, False
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)  # our own file, written below; never an upload
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, best, best_state, waited = state["epoch"], state["best"], state["best_state"], state["waited"]
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
                if params.l1:
                    loss = loss + params.l1 * sum(w.abs().sum() for w in weights)
                loss.backward()
                total += float(loss) * len(idx)
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
        score = val_loss if params.monitor == "val_loss" else -val_metric
        if score < best - 1e-6:
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
        if stop:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum()) or 1.0
    return 1 - ss_res / ss_tot


# -- evaluation and export -----------------------------------------------------------------------------------------


def evaluate(model: Net, x: np.ndarray, y: np.ndarray, kind: Kind) -> dict[str, Any]:
    """Held-out metrics: accuracy, precision, recall, F1 (macro), ROC-AUC, log loss, confusion; or MSE, MAE, R²."""
    from sklearn import metrics

    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    if kind == "regression":
        pred = out[:, 0].numpy()
        return {
            "mse": float(metrics.mean_squared_error(y, pred)),
            "mae": float(metrics.mean_absolute_error(y, pred)),
            "r2": float(metrics.r2_score(y, pred)),
        }
    probs = torch.softmax(out, dim=1).numpy()
    pred = probs.argmax(axis=1)
    labels = list(range(probs.shape[1]))
    result: dict[str, Any] = {
        "accuracy": float(metrics.accuracy_score(y, pred)),
        "precision_macro": float(metrics.precision_score(y, pred, average="macro", zero_division=0)),
        "recall_macro": float(metrics.recall_score(y, pred, average="macro", zero_division=0)),
        "f1_macro": float(metrics.f1_score(y, pred, average="macro", zero_division=0)),
        "log_loss": float(metrics.log_loss(y, probs, labels=labels)),
        "confusion_matrix": metrics.confusion_matrix(y, pred, labels=labels).tolist(),
    }
    try:
        if probs.shape[1] == 2:
            result["roc_auc"] = float(metrics.roc_auc_score(y, probs[:, 1]))
        else:
            result["roc_auc"] = float(
                metrics.roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=labels)
            )
    except ValueError:  # a class missing from the held-out split
        result["roc_auc"] = None
    return result


def export_onnx(model: Net, example_shape: tuple[int, ...], kind: Kind, path: Path, input_name: str = "x") -> None:
    """``x`` FP32 [-1, F] (or ``image`` [-1, C, H, W]) -> ``probabilities`` FP32 [-1, C] and ``label`` INT64 [-1],
    or ``prediction`` FP32 [-1]."""
    served = _Served(model, kind).eval()
    outputs = ["probabilities", "label"] if kind == "classification" else ["prediction"]
    example = torch.zeros(2, *example_shape)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of one that needs onnxscript (not installed).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            served,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=outputs,
            dynamic_axes={input_name: {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
            dynamo=False,
        )
