"""The neutral request and response every protocol is translated into and out of."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class InferenceRequest:
    """Named input tensors (batch first; BYTES as object arrays of bytes), requested outputs, parameters."""

    inputs: dict[str, np.ndarray]
    outputs: list[str] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str | None = None
    #: time.monotonic() by which the request must have started running, else it fails with 504.
    deadline: float | None = None
    #: 0 for online calls; higher runs only when no online request waits (offline batch lines: 1).
    priority: int = 0


@dataclass
class InferenceResponse:
    model: str
    version: int
    outputs: dict[str, np.ndarray]
    #: Tokens each input item used (text models), for usage reporting.
    tokens: np.ndarray | None = None
    id: str | None = None
