"""From a dataset to a model's inputs and targets, by the model's signature (pure checks, no model).

The job submission runs these in the server, so a column that is missing or a feature count that does not fit
the model is a 400 naming it before anything is queued; the evaluation job runs the same code on the same data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from openmaas.entities.tables import Images, Table
from openmaas.entities.tensors import Signature, TensorSpec
from openmaas.errors import InvalidRequest

#: What an evaluation measures.
TASKS = ("classification", "regression", "embedding", "text-generation", "speech")


def task_of(served_as: str, card_task: str, signature: Signature) -> str:
    """The task a version is evaluated as, from what it serves, its card, then its outputs."""
    if served_as == "generation":
        return "text-generation"
    if served_as == "speech":
        return "speech"
    outputs = {o.name for o in signature.outputs}
    if "regression" in card_task:
        return "regression"
    if "classification" in card_task or "probabilities" in outputs:
        return "classification"
    if served_as == "embedding":
        return "embedding"
    if "prediction" in outputs:
        return "regression"
    raise InvalidRequest(
        "cannot tell what this model does from its card or outputs; say 'task' (one of " + ", ".join(TASKS) + ")",
        param="task",
    )


@dataclass
class Labelled:
    """Model inputs for every row, and what each row should give."""

    inputs: dict[str, np.ndarray]
    y: np.ndarray  # class index (classification) or float target (regression)
    classes: list[str] | None = None
    rows: int = 0
    notes: list[str] = field(default_factory=list)


def _shape(spec: TensorSpec) -> str:
    return "[" + ",".join(str(d) for d in spec.shape) + "]"


def _column(table: Table, name: str, param: str, role: str) -> list[str]:
    if name not in table.columns:
        raise InvalidRequest(
            f"{role} column '{name}' is not in the dataset; its columns are: {', '.join(table.columns)}", param=param
        )
    return table.cells[name]


def table_inputs(signature: Signature, table: Table, exclude: Sequence[str]) -> dict[str, np.ndarray]:
    """Each input named like a column takes that column; the one numeric input left takes every other numeric
    column in the dataset's order, reshaped to the input's shape (so 64 pixel columns feed an [-1,1,8,8] image)."""
    inputs: dict[str, np.ndarray] = {}
    claimed = set(exclude)
    rest: list[TensorSpec] = []
    for spec in signature.inputs:
        if spec.name in table.columns and spec.name not in claimed:
            claimed.add(spec.name)
            values = table.cells[spec.name]
            width = math.prod(d for d in spec.shape[1:] if d > 0) if len(spec.shape) > 1 else 1
            if width != 1:
                rest.append(spec)
                claimed.discard(spec.name)
                continue
            if spec.datatype == "BYTES":
                array = np.array([v.encode("utf-8") for v in values], dtype=object)
            else:
                array = _numbers(table, [spec.name], spec)
            inputs[spec.name] = array.reshape([-1, *[1] * (len(spec.shape) - 1)])
        else:
            rest.append(spec)
    if len(rest) > 1:
        raise InvalidRequest(
            f"the model has inputs {', '.join(s.name for s in rest)} that no dataset column is named after; name "
            "the columns after the inputs",
            param="dataset",
        )
    if rest:
        spec = rest[0]
        columns = [c for c in table.columns if c not in claimed]
        if spec.datatype == "BYTES":
            raise InvalidRequest(
                f"the model's text input '{spec.name}' needs a dataset column of that name", param="dataset"
            )
        width = math.prod(d for d in spec.shape[1:] if d > 0) if len(spec.shape) > 1 else 1
        if any(d < 0 for d in spec.shape[1:]):
            width = len(columns)
        if len(columns) != width:
            raise InvalidRequest(
                f"the model's input '{spec.name}' is {spec.datatype} {_shape(spec)}: {width} values a row, but the "
                f"dataset has {len(columns)} feature columns besides the target ({', '.join(columns[:8])}"
                + (", ..." if len(columns) > 8 else "")
                + ")",
                param="dataset",
            )
        array = _numbers(table, columns, spec)
        inputs[spec.name] = array.reshape([-1, *[d if d > 0 else width for d in spec.shape[1:]]])
    return inputs


def _numbers(table: Table, columns: list[str], spec: TensorSpec) -> np.ndarray:
    dtype = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}.get(spec.datatype)
    if dtype is None:
        raise InvalidRequest(f"the model's input '{spec.name}' is {spec.datatype}; evaluation feeds numbers or text")
    bad = next((c for c in columns if table.kinds[c] != "number"), None)
    if bad is not None:
        raise InvalidRequest(
            f"column '{bad}' feeds the model's numeric input '{spec.name}' but holds text", param="dataset"
        )
    return np.array([table.numbers(c) for c in columns], dtype=dtype).reshape(len(columns), -1).T.copy()


def class_targets(labels: Sequence[str], classes: Sequence[str] | None, outputs: int, param: str) -> np.ndarray:
    """Class indices of ``labels``: by the model's class names when known, else the labels are the indices."""
    if classes:
        if len(classes) != outputs:
            raise InvalidRequest(
                f"{len(classes)} class names were given but the model scores {outputs} classes", param="classes"
            )
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted({v for v in labels if v not in index})
        if unknown:
            raise InvalidRequest(
                f"label '{unknown[0]}' is not one of the model's classes ({', '.join(classes[:12])})", param=param
            )
        return np.array([index[v] for v in labels], dtype=np.int64)
    try:
        y = np.array([int(float(v)) for v in labels], dtype=np.int64)
    except ValueError:
        raise InvalidRequest(
            "the model's card does not name its classes and the labels are not class indices 0.."
            f"{outputs - 1}; send 'classes' (names in the model's output order)",
            param="classes",
        ) from None
    if y.min() < 0 or y.max() >= outputs:
        raise InvalidRequest(f"labels must be class indices 0..{outputs - 1}; found {int(y.max())}", param=param)
    return y


def classifier_width(signature: Signature) -> int:
    """Classes the model scores (the width of its probabilities output)."""
    probs = signature.output("probabilities")
    if probs is None or len(probs.shape) != 2 or probs.shape[1] <= 0:
        raise InvalidRequest(
            "evaluating a classifier needs a 'probabilities' output FP32 [-1,C]; this model has "
            + ", ".join(f"{o.name} {o.datatype} {_shape(o)}" for o in signature.outputs),
            param="task",
        )
    return int(probs.shape[1])


def tabular(signature: Signature, table: Table, task: str, target: str, classes: Sequence[str] | None) -> Labelled:
    labels = _column(table, target, "target", "target")
    inputs = table_inputs(signature, table, [target])
    if task == "classification":
        width = classifier_width(signature)
        y = class_targets(labels, classes, width, "target")
        names = list(classes) if classes else [str(i) for i in range(width)]
        return Labelled(inputs, y, names, table.rows)
    if table.kinds[target] != "number":
        raise InvalidRequest(f"target '{target}' must be numeric for a regression model", param="target")
    regression_output(signature)
    return Labelled(inputs, np.array(table.numbers(target), dtype=np.float64), None, table.rows)


def text_classifier(
    signature: Signature, table: Table, target: str, text_column: str, classes: Sequence[str] | None
) -> Labelled:
    """A text classifier's ``text`` input from ``text_column``, and the class of each row."""
    labels = _column(table, target, "target", "target")
    width = classifier_width(signature)
    y = class_targets(labels, classes, width, "target")
    text = np.array([t.encode("utf-8") for t in texts(table, text_column)], dtype=object)
    names = list(classes) if classes else [str(i) for i in range(width)]
    return Labelled({"text": text}, y, names, table.rows)


def regression_output(signature: Signature) -> str:
    if signature.output("prediction") is not None:
        return "prediction"
    numeric = [o for o in signature.outputs if o.datatype.startswith("FP")]
    if not numeric:
        raise InvalidRequest("evaluating a regressor needs a numeric 'prediction' output", param="task")
    return numeric[0].name


def images(signature: Signature, data: Images, classes: Sequence[str] | None) -> Labelled:
    four = [s for s in signature.inputs if len(s.shape) == 4]
    if len(signature.inputs) != 1 or not four:
        raise InvalidRequest(
            "an image dataset feeds a model with one image input [-1,C,H,W]; this model takes "
            + ", ".join(f"{s.name} {_shape(s)}" for s in signature.inputs),
            param="dataset",
        )
    spec = four[0]
    got = data.x.shape[1:]
    if any(w > 0 and w != g for w, g in zip(spec.shape[1:], got, strict=True)):
        raise InvalidRequest(
            f"the images are {'x'.join(map(str, got))} (channels x height x width) but the model's input "
            f"'{spec.name}' is {_shape(spec)}",
            param="dataset",
        )
    width = classifier_width(signature)
    names = list(classes) if classes else None
    if names is None and len(data.classes) == width:
        names = list(data.classes)  # class folders in sorted order: the order training gives them
    y = class_targets(data.labels, names, width, "dataset")
    return Labelled({spec.name: data.x.astype(np.float32)}, y, names or [str(i) for i in range(width)], len(y))


def texts(table: Table, column: str) -> list[str]:
    values = _column(table, column, "text_column", "text")
    if not values:
        raise InvalidRequest("the dataset has no rows", param="dataset")
    return values


def pairs(table: Table) -> tuple[list[str], list[str], np.ndarray] | None:
    """Labelled pairs (``text1, text2, score``) when the dataset has those columns."""
    if not {"text1", "text2", "score"} <= set(table.columns):
        return None
    if table.kinds["score"] != "number":
        raise InvalidRequest("column 'score' of the pairs must be numeric", param="dataset")
    return table.cells["text1"], table.cells["text2"], np.array(table.numbers("score"), dtype=np.float64)
