"""Text classification: a head trained on a registered embedding model's (frozen) sentence embeddings."""

from __future__ import annotations

import numpy as np

from openmaas.datasets.parse import Table
from openmaas.errors import InvalidRequest


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
