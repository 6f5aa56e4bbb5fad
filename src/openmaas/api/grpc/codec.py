"""ModelInfer messages to and from the serving core's requests and responses (pure functions, no server)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from openmaas.api.grpc import inference_pb2 as pb
from openmaas.api.v2_codec import tensor_bytes, tensor_from_binary
from openmaas.entities.tensors import NUMPY_DTYPES, datatype_of
from openmaas.errors import InvalidInput, InvalidRequest
from openmaas.serving.types import InferenceRequest, InferenceResponse

# Which typed ``contents`` field carries each datatype (FP16 and BF16 travel only as raw bytes).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter_value(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind is not None else None


def _shape(raw: Any, name: str) -> tuple[int, ...]:
    shape = tuple(int(d) for d in raw)
    if any(d < 0 for d in shape):
        raise InvalidRequest(f"input '{name}': shape {list(shape)} has a negative dimension", param=name)
    return shape


def _from_contents(tensor: pb.ModelInferRequest.InferInputTensor, shape: tuple[int, ...]) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    field = _CONTENTS.get(datatype)
    if field is None:
        raise InvalidInput(f"input '{name}': {datatype} data must be sent in raw_input_contents", param=name)
    values = list(getattr(tensor.contents, field))
    if len(values) != math.prod(shape):
        raise InvalidInput(
            f"input '{name}': {len(values)} values in contents.{field} but shape {list(shape)} needs "
            f"{math.prod(shape)}",
            param=name,
        )
    if datatype == "BYTES":
        return np.array(values, dtype=object).reshape(shape)
    dtype: np.dtype[Any] = NUMPY_DTYPES[datatype]
    if dtype.kind in "iu" and values:
        info = np.iinfo(dtype.type)
        if min(values) < info.min or max(values) > info.max:
            raise InvalidInput(f"input '{name}': a value is out of range for {datatype}", param=name)
    return np.array(values, dtype=dtype).reshape(shape)


def decode_infer(request: pb.ModelInferRequest) -> InferenceRequest:
    """The request's tensors: from ``raw_input_contents`` (one entry per input, in order) or typed contents."""
    if not request.inputs:
        raise InvalidRequest("the request has no inputs", param="inputs")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if not name:
            raise InvalidRequest("every input needs a name", param="inputs")
        if name in inputs:
            raise InvalidRequest(f"input '{name}' is given twice", param=name)
        if tensor.datatype not in NUMPY_DTYPES:
            raise InvalidInput(
                f"input '{name}': unsupported datatype {tensor.datatype!r}; use one of {', '.join(NUMPY_DTYPES)}",
                param=name,
            )
        shape = _shape(tensor.shape, name)
        if raw:
            inputs[name] = tensor_from_binary(memoryview(raw[i]), tensor.datatype, shape, name)
        else:
            inputs[name] = _from_contents(tensor, shape)
    parameters = {key: parameter_value(value) for key, value in request.parameters.items()}
    outputs = [o.name for o in request.outputs] or None
    return InferenceRequest(inputs=inputs, outputs=outputs, parameters=parameters, id=request.id or None)


def encode_infer(response: InferenceResponse) -> pb.ModelInferResponse:
    """Outputs as raw little-endian bytes (what tritonclient reads first), in the order the model gave them."""
    out = pb.ModelInferResponse(model_name=response.model, model_version=str(response.version), id=response.id or "")
    for name, array in response.outputs.items():
        out.outputs.add(name=name, datatype=datatype_of(array), shape=list(array.shape))
        out.raw_output_contents.append(tensor_bytes(array))
    return out
