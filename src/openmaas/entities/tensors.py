"""Tensor datatypes and model signatures, shared by runtimes, serving and the protocols."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

DataType = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]

# Open Inference Protocol datatype -> numpy dtype (little-endian, as the binary extension sends it).
NUMPY_DTYPES: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}

_BY_KIND_SIZE = {(dt.kind, dt.itemsize): name for name, dt in NUMPY_DTYPES.items() if name != "BYTES"}


def datatype_of(array: np.ndarray) -> str:
    """The protocol datatype of a numpy array (object and string arrays are BYTES)."""
    if array.dtype.kind in ("O", "S", "U"):
        return "BYTES"
    try:
        return _BY_KIND_SIZE[(array.dtype.kind, array.dtype.itemsize)]
    except KeyError:
        raise ValueError(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype") from None


class TensorSpec(BaseModel):
    """One named input or output: datatype and shape, with -1 for a variable dimension."""

    model_config = ConfigDict(frozen=True)

    name: str
    datatype: DataType
    shape: list[int] = Field(description="Dimensions; -1 marks a variable one (the first is the batch).")


class Signature(BaseModel):
    model_config = ConfigDict(frozen=True)

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)
