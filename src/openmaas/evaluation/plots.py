"""PNG plots of an evaluation (matplotlib, drawn off-screen): confusion matrix, ROC and PR curves, residuals."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np


def _figure(width: float = 6.4, height: float = 4.8):  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display: never a GUI backend in a worker
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:  # type: ignore[no-untyped-def]
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str], title: str) -> bytes:
    m = np.asarray(matrix)
    n = len(classes)
    size = min(12.0, 3.0 + 0.5 * n)
    fig = _figure(size + 1, size)
    ax = fig.add_subplot()
    image = ax.imshow(m, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ticks = range(n)
    ax.set_xticks(ticks, [c[:16] for c in classes], rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(ticks, [c[:16] for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 20:
        threshold = m.max() / 2 if m.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > threshold else "black")
    return _png(fig)


def _one_vs_rest(y: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    if probs.shape[1] == 2:
        return [(classes[1], (y == 1).astype(int), probs[:, 1])]
    return [(c, (y == i).astype(int), probs[:, i]) for i, c in enumerate(classes) if 0 < (y == i).sum() < len(y)]


def roc(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], title: str) -> bytes:
    from sklearn import metrics

    fig = _figure()
    ax = fig.add_subplot()
    for name, truth, score in _one_vs_rest(y, probs, classes)[:20]:
        fpr, tpr, _ = metrics.roc_curve(truth, score)
        ax.plot(fpr, tpr, label=f"{name[:16]} (AUC {metrics.auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    return _png(fig)


def precision_recall(y: np.ndarray, probs: np.ndarray, classes: Sequence[str], title: str) -> bytes:
    from sklearn import metrics

    fig = _figure()
    ax = fig.add_subplot()
    for name, truth, score in _one_vs_rest(y, probs, classes)[:20]:
        precision, recall, _ = metrics.precision_recall_curve(truth, score)
        ax.plot(recall, precision, label=f"{name[:16]} (AP {metrics.average_precision_score(truth, score):.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize="small")
    return _png(fig)


def residuals(y: np.ndarray, pred: np.ndarray, title: str) -> bytes:
    fig = _figure(9.6, 4.8)
    left, right = fig.subplots(1, 2)
    left.scatter(pred, y - pred, s=8, alpha=0.6)
    left.axhline(0, color="grey", linestyle="--", linewidth=1)
    left.set_xlabel("predicted")
    left.set_ylabel("residual (true - predicted)")
    left.set_title(title)
    low, high = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
    right.scatter(y, pred, s=8, alpha=0.6)
    right.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1)
    right.set_xlabel("true")
    right.set_ylabel("predicted")
    right.set_title("predicted against true")
    return _png(fig)
