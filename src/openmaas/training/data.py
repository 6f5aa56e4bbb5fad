"""Training data: features and target from a checked table (or labelled images, or texts), and the splits.

Pure checks over numpy arrays (no model, no torch): the job submission runs them in the server to refuse at once
what would fail the job, naming the column, class or row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from openmaas.entities.tables import Images, Table
from openmaas.errors import InvalidRequest
from openmaas.training.optim import TrainParams

Kind = Literal["classification", "regression"]


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
    train, val, test = split_rows(prepared, params, kind)
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


def split_rows(prepared: Prepared, params: TrainParams, kind: Kind) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of the train / validation / test splits (the held-out report evaluates the test rows)."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(prepared.y))
    strat = prepared.y if kind == "classification" else None
    rest, test = train_test_split(rows, test_size=params.test_split, random_state=params.seed, stratify=strat)
    strat = prepared.y[rest] if kind == "classification" else None
    try:
        train, val = train_test_split(rest, test_size=params.validation_split, random_state=params.seed, stratify=strat)
    except ValueError:  # a class too small to stratify the validation split: split without
        train, val = train_test_split(rest, test_size=params.validation_split, random_state=params.seed)
    return train, val, test


def prepare_text(table: Table, text_column: str, target: str) -> tuple[list[str], np.ndarray, list[str]]:
    """Texts, class indices and class names; problems named like the tabular ones."""
    for column, role in ((text_column, "text"), (target, "target")):
        if column not in table.columns:
            raise InvalidRequest(
                f"{role} column '{column}' is not in the dataset; its columns are: {', '.join(table.columns)}",
                param="text_column" if role == "text" else "target",
            )
    labels = table.cells[target]
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise InvalidRequest(f"target '{target}' has a single class; classification needs two or more", param="target")
    counts = {c: labels.count(c) for c in classes}
    lonely = [c for c, n in counts.items() if n < 2]
    if lonely:
        raise InvalidRequest(
            f"class '{lonely[0]}' of '{target}' has only {counts[lonely[0]]} row; every class needs at least 2",
            param="target",
        )
    index = {c: i for i, c in enumerate(classes)}
    return table.cells[text_column], np.array([index[v] for v in labels], dtype=np.int64), classes


def prepare_images(images: Images) -> Prepared:
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
