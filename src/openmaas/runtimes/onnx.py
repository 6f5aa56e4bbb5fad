"""ONNX Runtime: any ONNX graph, with the thread count from settings."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from openmaas.entities.tensors import Signature, TensorSpec
from openmaas.runtimes.base import Runtime, RuntimeResult

_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _spec(arg: object) -> TensorSpec:
    name = str(getattr(arg, "name"))  # noqa: B009 - onnxruntime NodeArg has no stubs
    ort_type = str(getattr(arg, "type"))  # noqa: B009
    datatype = _ORT_TYPES.get(ort_type)
    if datatype is None:
        raise ValueError(f"ONNX tensor '{name}' has type {ort_type}, which the Open Inference Protocol cannot carry")
    shape = [d if isinstance(d, int) and d >= 0 else -1 for d in getattr(arg, "shape")]  # noqa: B009
    return TensorSpec(name=name, datatype=datatype, shape=shape)  # type: ignore[arg-type]


class OnnxRuntime(Runtime):
    format = "onnx"
    platform = "onnxruntime_onnx"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._session: object | None = None
        self._signature: Signature | None = None

    @classmethod
    def _set_up(cls) -> None:
        start_onnxruntime()

    def load(self) -> None:
        session = cpu_session(str(self.path), self.options.onnx_threads)
        self._signature = Signature(
            inputs=[_spec(a) for a in session.get_inputs()],
            outputs=[_spec(a) for a in session.get_outputs()],
        )
        self._session = session

    @property
    def signature(self) -> Signature:
        if self._signature is None:
            raise RuntimeError("ONNX model is not loaded")
        return self._signature

    def infer(self, batch: Mapping[str, np.ndarray]) -> RuntimeResult:
        session = self._session
        if session is None:
            raise RuntimeError("ONNX model is not loaded")
        feeds = {}
        for spec in self.signature.inputs:
            array = batch[spec.name]
            if spec.datatype == "BYTES":
                # ONNX string tensors take Python str, the protocol carries bytes.
                array = np.vectorize(lambda b: b.decode("utf-8") if isinstance(b, bytes) else b, otypes=[object])(array)
            feeds[spec.name] = array
        names = [o.name for o in self.signature.outputs]
        results = session.run(names, feeds)  # type: ignore[attr-defined]
        return RuntimeResult(outputs=dict(zip(names, results, strict=True)))

    def memory_bytes(self) -> int:
        return self.path.stat().st_size

    def parameters(self) -> int | None:
        return onnx_parameters(self.path)

    def unload(self) -> None:
        self._session = None


def onnx_parameters(path: Path) -> int:
    """Elements of an ONNX graph's weights, read from the file without running it: its initializers, constant
    tensors, and the float arrays that ONNX-ML operators (scalers, linear models, trees) keep as attributes."""
    import math

    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    total = sum(math.prod(t.dims) for t in graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                total += math.prod(attr.t.dims)
            elif attr.type == onnx.AttributeProto.FLOATS:
                total += len(attr.floats)
    return total


@functools.cache
def start_onnxruntime() -> None:
    """Import ONNX Runtime and run a one-node graph: its environment (thread pools, allocators, kernel registry) is
    made by the first session in a process, ~40 MiB with the import that no model should be charged."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "set-up", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    cpu_session(model.SerializeToString(), 1).run(None, {"x": np.ones(1, np.float32)})


def cpu_session(model: str | bytes, threads: int) -> Any:
    """An ONNX Runtime session of ``model`` (a path or the graph's bytes) on the CPU with ``threads`` intra-op
    threads, one inter-op thread, and only errors logged."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
