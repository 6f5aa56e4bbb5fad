"""Task metrics from a model's outputs: classification, regression, embeddings, perplexity, word error rate."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def classification(y: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro and per-class precision / recall / F1, ROC-AUC and PR-AUC (binary, or one-vs-rest macro),
    log loss and the confusion matrix (rows: true class, columns: predicted), for ``probs`` [N, C] against class
    indices ``y``. AUCs are None when a class is missing from ``y`` (they are undefined then)."""
    from sklearn import metrics

    labels = list(range(probs.shape[1]))
    pred = probs.argmax(axis=1)
    precision, recall, f1, support = metrics.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    clipped = np.clip(probs.astype(np.float64), 1e-15, 1.0)
    clipped /= clipped.sum(axis=1, keepdims=True)
    result: dict[str, Any] = {
        "accuracy": float(metrics.accuracy_score(y, pred)),
        "precision_macro": float(np.mean(precision)),
        "recall_macro": float(np.mean(recall)),
        "f1_macro": float(np.mean(f1)),
        "log_loss": float(metrics.log_loss(y, clipped, labels=labels)),
        "roc_auc": None,
        "pr_auc": None,
        "confusion_matrix": metrics.confusion_matrix(y, pred, labels=labels).tolist(),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
    }
    present = set(np.unique(y).tolist())
    if present == set(labels):
        if len(labels) == 2:
            result["roc_auc"] = float(metrics.roc_auc_score(y, probs[:, 1]))
            result["pr_auc"] = float(metrics.average_precision_score(y, probs[:, 1]))
        else:
            onehot = np.eye(len(labels))[y]
            result["roc_auc"] = float(metrics.roc_auc_score(onehot, probs, average="macro"))
            result["pr_auc"] = float(metrics.average_precision_score(onehot, probs, average="macro"))
    return result


def regression(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """R², MAE, RMSE (and MSE) of ``pred`` against ``y``."""
    from sklearn import metrics

    mse = float(metrics.mean_squared_error(y, pred))
    return {
        "r2": float(metrics.r2_score(y, pred)),
        "mae": float(metrics.mean_absolute_error(y, pred)),
        "rmse": math.sqrt(mse),
        "mse": mse,
    }


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    out: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return out


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``."""
    out: np.ndarray = (_unit(a) * _unit(b)).sum(axis=1)
    return out


def fidelity(candidate: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """How closely one version's embeddings follow a reference's on the same texts: cosine mean, p5, min."""
    cos = cosine_rows(candidate, reference)
    return {
        "cosine_mean": float(cos.mean()),
        "cosine_p5": float(np.percentile(cos, 5)),
        "cosine_min": float(cos.min()),
    }


def pair_correlation(first: np.ndarray, second: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """Semantic similarity: Spearman (and Pearson) correlation of the pairs' cosine with their labelled scores."""
    from scipy import stats

    cos = cosine_rows(first, second)
    return {
        "spearman": float(stats.spearmanr(cos, scores).statistic),
        "pearson": float(stats.pearsonr(cos, scores).statistic),
        "pairs": len(scores),
    }


def perplexity(negative_log_likelihoods: Sequence[float], tokens: Sequence[int]) -> dict[str, Any]:
    """Perplexity over every predicted token of every text: exp(total NLL / tokens), and the mean NLL."""
    total_tokens = int(sum(tokens))
    if total_tokens == 0:
        return {"perplexity": None, "mean_nll": None, "tokens": 0}
    mean = float(sum(negative_log_likelihoods)) / total_tokens
    return {"perplexity": math.exp(mean), "mean_nll": mean, "tokens": total_tokens}


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, Any]:
    """WER (and CER) over all clips after the usual normalisation (case, punctuation, spacing)."""
    import jiwer

    normalise = jiwer.Compose(
        [
            jiwer.ToLowerCase(),
            jiwer.RemovePunctuation(),  # type: ignore[no-untyped-call]
            jiwer.RemoveMultipleSpaces(),
            jiwer.Strip(),
            jiwer.ReduceToListOfListOfWords(),
        ]
    )
    chars = jiwer.Compose(
        [
            jiwer.ToLowerCase(),
            jiwer.RemovePunctuation(),  # type: ignore[no-untyped-call]
            jiwer.RemoveMultipleSpaces(),
            jiwer.Strip(),
            jiwer.ReduceToListOfListOfChars(),
        ]
    )
    refs = [r if r.strip() else "-" for r in references]
    hyps = [h if h.strip() else "" for h in hypotheses]
    out = jiwer.process_words(refs, hyps, reference_transform=normalise, hypothesis_transform=normalise)
    cer = jiwer.cer(refs, hyps, reference_transform=chars, hypothesis_transform=chars)
    return {
        "wer": float(out.wer),
        "cer": float(cer),
        "substitutions": int(out.substitutions),
        "deletions": int(out.deletions),
        "insertions": int(out.insertions),
        "clips": len(refs),
    }


def headline(task: str, metrics: dict[str, Any]) -> tuple[str, bool] | None:
    """The one figure a task is judged by, and whether higher is better (for comparisons and budgets)."""
    for name, higher in {
        "classification": (("accuracy", True),),
        "regression": (("r2", True),),
        "embedding": (("cosine_mean", True), ("spearman", True)),
        "text-generation": (("perplexity", False),),
        "speech": (("wer", False),),
    }.get(task, ()):
        if metrics.get(name) is not None:
            return name, higher
    return None
