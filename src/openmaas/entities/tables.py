"""Parsed datasets: what an upload becomes (a table, or labelled images) and what training reads."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Table:
    columns: list[str]
    cells: dict[str, list[str]]  # column -> its cells as text ("" = missing)
    kinds: dict[str, str]  # column -> "number" | "category"

    @property
    def rows(self) -> int:
        return len(self.cells[self.columns[0]]) if self.columns else 0

    def numbers(self, column: str) -> list[float]:
        return [float(v) for v in self.cells[column]]

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"columns": []}
        for c in self.columns:
            entry: dict[str, Any] = {"name": c, "type": self.kinds[c]}
            if self.kinds[c] == "category":
                counts = Counter(self.cells[c])
                entry["classes"] = dict(counts.most_common(50))
            out["columns"].append(entry)
        return out


@dataclass
class Images:
    x: np.ndarray  # (N, C, H, W) float32 in [0, 1]
    labels: list[str]  # class name of each image
    classes: list[str]
    mode: str  # "L" (grayscale) or "RGB"

    def schema(self) -> dict[str, Any]:
        _, c, h, w = self.x.shape
        return {
            "kind": "images",
            "mode": self.mode,
            "channels": c,
            "height": h,
            "width": w,
            "classes": dict(sorted(Counter(self.labels).items())),
        }
