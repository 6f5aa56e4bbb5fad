"""Open Inference Protocol v2 wire format: JSON tensors and Triton's binary tensor extension.

Pure functions (bytes in, arrays out and back) so they are tested without HTTP.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from openmaas.entities.tensors import NUMPY_DTYPES, datatype_of
from openmaas.errors import InvalidInput, InvalidRequest
from openmaas.serving.types import InferenceRequest, InferenceResponse

HEADER_LENGTH = "inference-header-content-length"


@dataclass
class DecodedRequest:
    request: InferenceRequest
    #: Outputs to return as binary data; ``default_binary`` applies to the rest.
    binary_outputs: dict[str, bool] = field(default_factory=dict)
    default_binary: bool = False


def _bad(message: str, param: str | None = None) -> InvalidRequest:
    return InvalidRequest(message, param=param)


def _shape_of(raw: Any, name: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in raw):
        raise _bad(f"input '{name}': 'shape' must be a list of integers", name)
    if any(d < 0 for d in raw):
        raise _bad(f"input '{name}': shape {raw} has a negative dimension", name)
    return tuple(raw)


def _bytes_from_binary(chunk: memoryview, count: int, name: str) -> np.ndarray:
    """BYTES elements in binary form: each is a little-endian uint32 length then that many bytes."""
    items: list[bytes] = []
    pos = 0
    while pos < len(chunk):
        if pos + 4 > len(chunk):
            raise InvalidInput(f"input '{name}': BYTES data ends inside an element length prefix", param=name)
        (length,) = struct.unpack_from("<I", chunk, pos)
        pos += 4
        if pos + length > len(chunk):
            raise InvalidInput(f"input '{name}': BYTES element of {length} bytes runs past the data", param=name)
        items.append(bytes(chunk[pos : pos + length]))
        pos += length
    if len(items) != count:
        raise InvalidInput(
            f"input '{name}': binary BYTES data holds {len(items)} elements but the shape needs {count}",
            param=name,
        )
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def _flatten(data: Any) -> list[Any]:
    out: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def _tensor_from_json(data: Any, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    count = math.prod(shape)
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        flat = _flatten(data)
        if len(flat) != count:
            raise InvalidInput(
                f"input '{name}': 'data' has {len(flat)} elements but shape {list(shape)} needs {count}",
                param=name,
            )
        if not all(isinstance(v, str) for v in flat):
            raise InvalidInput(f"input '{name}': BYTES data must be strings", param=name)
        array = np.empty(count, dtype=object)
        array[:] = [v.encode("utf-8") for v in flat]
        return array.reshape(shape)
    dtype = NUMPY_DTYPES[datatype]
    if dtype.kind in "iu":
        return _integers_from_json(data, datatype, dtype, shape, name)
    try:
        array = np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidInput(f"input '{name}': 'data' is ragged or not numeric", param=name) from None
    if array.size != count:
        raise InvalidInput(
            f"input '{name}': 'data' has {array.size} elements but shape {list(shape)} needs {count}", param=name
        )
    kind = array.dtype.kind
    if count and kind not in "biuf":
        raise InvalidInput(f"input '{name}': {datatype} data must be numbers", param=name)
    if datatype == "BOOL" and count and kind != "b":
        raise InvalidInput(f"input '{name}': BOOL data must be true/false", param=name)
    return array.astype(dtype, copy=False).reshape(shape)


def _integers_from_json(
    data: list[Any], datatype: str, dtype: np.dtype[Any], shape: tuple[int, ...], name: str
) -> np.ndarray:
    # Checked in Python: numpy would turn integers past int64 into floats and lose precision silently.
    flat = _flatten(data)
    count = math.prod(shape)
    if len(flat) != count:
        raise InvalidInput(
            f"input '{name}': 'data' has {len(flat)} elements but shape {list(shape)} needs {count}", param=name
        )
    if not all(type(v) is int for v in flat):
        raise InvalidInput(f"input '{name}': {datatype} data must be integers", param=name)
    info = np.iinfo(dtype.type)
    if flat and (min(flat) < info.min or max(flat) > info.max):
        raise InvalidInput(f"input '{name}': a value is out of range for {datatype}", param=name)
    return np.array(flat, dtype=dtype).reshape(shape)


def tensor_from_binary(chunk: memoryview, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_from_binary(chunk, count, name).reshape(shape)
    dtype = NUMPY_DTYPES[datatype]
    if len(chunk) != count * dtype.itemsize:
        raise InvalidInput(
            f"input '{name}': binary_data_size is {len(chunk)} bytes but {datatype} shape {list(shape)} needs "
            f"{count * dtype.itemsize}",
            param=name,
        )
    return np.frombuffer(chunk, dtype=dtype).reshape(shape)


def decode_request(body: bytes, header_length: int | None) -> DecodedRequest:
    """Parse an infer request body (JSON, or JSON header followed by binary tensor data)."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise _bad(
            f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes",
            "Inference-Header-Content-Length",
        )
    json_part = body if header_length is None else body[:header_length]
    try:
        header = orjson.loads(json_part)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"the request body is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise _bad("the request body must be a JSON object with an 'inputs' list")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _bad("'inputs' must be a non-empty list of tensors", "inputs")
    binary = memoryview(body)[header_length:] if header_length is not None else memoryview(b"")
    offset = 0
    inputs: dict[str, np.ndarray] = {}
    for raw in raw_inputs:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise _bad("each input must be an object with a 'name'", "inputs")
        name = raw["name"]
        if name in inputs:
            raise _bad(f"input '{name}' is given twice", name)
        datatype = raw.get("datatype")
        if datatype not in NUMPY_DTYPES:
            raise InvalidInput(
                f"input '{name}': unsupported datatype {datatype!r}; use one of {', '.join(NUMPY_DTYPES)}",
                param=name,
            )
        shape = _shape_of(raw.get("shape"), name)
        params = raw.get("parameters") or {}
        if not isinstance(params, dict):
            raise _bad(f"input '{name}': 'parameters' must be an object", name)
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise _bad(f"input '{name}': binary_data_size must be a non-negative integer", name)
            if "data" in raw:
                raise _bad(f"input '{name}' has both 'data' and binary_data_size", name)
            if offset + size > len(binary):
                raise InvalidInput(
                    f"input '{name}': binary_data_size {size} runs past the {len(binary) - offset} binary bytes "
                    "left in the body",
                    param=name,
                )
            inputs[name] = tensor_from_binary(binary[offset : offset + size], datatype, shape, name)
            offset += size
        elif "data" in raw:
            inputs[name] = _tensor_from_json(raw["data"], datatype, shape, name)
        else:
            raise _bad(f"input '{name}' has neither 'data' nor parameters.binary_data_size", name)
    if offset != len(binary):
        raise InvalidInput(
            f"the body has {len(binary) - offset} bytes of binary data that no input's binary_data_size claims"
        )
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("'parameters' must be an object", "parameters")
    decoded = DecodedRequest(
        request=InferenceRequest(inputs=inputs, parameters=params),
        default_binary=bool(params.get("binary_data_output", False)),
    )
    request_id = header.get("id")
    if request_id is not None:
        decoded.request.id = str(request_id)
    raw_outputs = header.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise _bad("'outputs' must be a list", "outputs")
        names = []
        for raw in raw_outputs:
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise _bad("each requested output must be an object with a 'name'", "outputs")
            oparams = raw.get("parameters") or {}
            if not isinstance(oparams, dict):
                raise _bad(f"output '{raw['name']}': 'parameters' must be an object", raw["name"])
            if oparams.get("classification"):
                raise InvalidRequest("the classification extension is not supported", param=raw["name"])
            if "binary_data" in oparams:
                decoded.binary_outputs[raw["name"]] = bool(oparams["binary_data"])
            names.append(raw["name"])
        decoded.request.outputs = names or None
    return decoded


def tensor_bytes(array: np.ndarray) -> bytes:
    if datatype_of(array) == "BYTES":
        parts = []
        for item in array.reshape(-1):
            b = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts.append(struct.pack("<I", len(b)))
            parts.append(b)
        return b"".join(parts)
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def _json_data(array: np.ndarray) -> Any:
    if datatype_of(array) == "BYTES":
        return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
    return np.ascontiguousarray(array).reshape(-1)


def encode_response(
    response: InferenceResponse, binary_outputs: dict[str, bool], default_binary: bool
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the length of its JSON header."""
    outputs = []
    blobs: list[bytes] = []
    for name, array in response.outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if binary_outputs.get(name, default_binary):
            blob = tensor_bytes(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(array)
        outputs.append(entry)
    body: dict[str, Any] = {
        "model_name": response.model,
        "model_version": str(response.version),
        "outputs": outputs,
    }
    if response.id is not None:
        body["id"] = response.id
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
