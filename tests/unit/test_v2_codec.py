"""The v2 wire format without HTTP: JSON and binary tensors in, arrays out, and back."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest

from openmaas.api.v2_codec import decode_request, encode_response
from openmaas.errors import InvalidInput, InvalidRequest
from openmaas.serving.types import InferenceResponse


def _json(body: dict) -> bytes:
    return orjson.dumps(body)


def _binary_body(header: dict, *blobs: bytes) -> tuple[bytes, int]:
    h = orjson.dumps(header)
    return h + b"".join(blobs), len(h)


@pytest.mark.parametrize(
    ("data", "shape"),
    [([1.0, 2.0, 3.0, 4.0], [2, 2]), ([[1.0, 2.0], [3.0, 4.0]], [2, 2]), ([[[1, 2]], [[3, 4]]], [2, 1, 2])],
)
def test_json_tensor_flat_or_nested(data: list, shape: list[int]) -> None:
    body = _json({"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "data": data}]})
    x = decode_request(body, None).request.inputs["x"]
    assert x.dtype == np.float32
    assert x.shape == tuple(shape)
    assert x.reshape(-1).tolist() == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("BOOL", [True, False]),
        ("UINT8", [0, 255]),
        ("UINT16", [0, 65535]),
        ("UINT32", [0, 2**32 - 1]),
        ("UINT64", [0, 2**63]),
        ("INT8", [-128, 127]),
        ("INT16", [-(2**15), 2**15 - 1]),
        ("INT32", [-(2**31), 2**31 - 1]),
        ("INT64", [-(2**63), 2**63 - 1]),
        ("FP16", [0.5, -2.0]),
        ("FP32", [0.25, 1e30]),
        ("FP64", [1e-300, 1e300]),
    ],
)
def test_every_numeric_datatype_json_and_binary(datatype: str, values: list) -> None:
    from openmaas.entities.tensors import NUMPY_DTYPES

    dtype = NUMPY_DTYPES[datatype]
    expected = np.array(values, dtype=dtype)
    from_json = decode_request(
        _json({"inputs": [{"name": "x", "datatype": datatype, "shape": [2], "data": values}]}), None
    ).request.inputs["x"]
    np.testing.assert_array_equal(from_json, expected)
    assert from_json.dtype == dtype
    blob = expected.tobytes()
    body, n = _binary_body(
        {"inputs": [{"name": "x", "datatype": datatype, "shape": [2], "parameters": {"binary_data_size": len(blob)}}]},
        blob,
    )
    from_binary = decode_request(body, n).request.inputs["x"]
    np.testing.assert_array_equal(from_binary, expected)
    # And back out again, in both encodings.
    resp = InferenceResponse(model="m", version=1, outputs={"y": expected})
    out, length = encode_response(resp, {}, default_binary=True)
    assert length is not None
    header = orjson.loads(out[:length])
    assert header["outputs"][0]["datatype"] == datatype
    assert out[length:] == blob
    out, length = encode_response(resp, {}, default_binary=False)
    assert length is None
    assert np.array(orjson.loads(out)["outputs"][0]["data"], dtype=dtype).tolist() == expected.tolist()


def test_bytes_tensors_json_and_binary() -> None:
    texts = [b"hello", "caf\u00e9".encode(), b""]
    body = _json({"inputs": [{"name": "t", "datatype": "BYTES", "shape": [3], "data": ["hello", "caf\u00e9", ""]}]})
    assert decode_request(body, None).request.inputs["t"].tolist() == texts
    blob = b"".join(struct.pack("<I", len(t)) + t for t in texts)
    body, n = _binary_body(
        {"inputs": [{"name": "t", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": len(blob)}}]},
        blob,
    )
    assert decode_request(body, n).request.inputs["t"].tolist() == texts
    arr = np.array(texts, dtype=object)
    out, length = encode_response(InferenceResponse("m", 1, {"t": arr}), {"t": True}, False)
    assert length is not None
    assert out[length:] == blob


def test_two_binary_inputs_are_read_in_order_and_outputs_chosen_per_name() -> None:
    a = np.arange(6, dtype=np.float32)
    b = np.arange(3, dtype=np.int64)
    header = {
        "id": "r1",
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": a.nbytes}},
            {"name": "b", "datatype": "INT64", "shape": [3], "parameters": {"binary_data_size": b.nbytes}},
        ],
        "outputs": [{"name": "p", "parameters": {"binary_data": True}}, {"name": "q"}],
    }
    body, n = _binary_body(header, a.tobytes(), b.tobytes())
    dec = decode_request(body, n)
    np.testing.assert_array_equal(dec.request.inputs["a"], a.reshape(2, 3))
    np.testing.assert_array_equal(dec.request.inputs["b"], b)
    assert dec.request.outputs == ["p", "q"]
    assert dec.request.id == "r1"
    resp = InferenceResponse("m", 1, {"p": a, "q": b}, id="r1")
    out, length = encode_response(resp, dec.binary_outputs, dec.default_binary)
    assert length is not None
    head = orjson.loads(out[:length])
    assert head["id"] == "r1"
    assert head["outputs"][0]["parameters"]["binary_data_size"] == a.nbytes
    assert head["outputs"][1]["data"] == [0, 1, 2]


@pytest.mark.parametrize(
    ("body", "header_length", "error", "fragment"),
    [
        (b"{not json", None, InvalidRequest, "not valid JSON"),
        (b"[1,2]", None, InvalidRequest, "JSON object"),
        (b"{}", None, InvalidRequest, "'inputs'"),
        (b'{"inputs": []}', None, InvalidRequest, "'inputs'"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2]}]}', None, InvalidRequest, "neither"),
        (b'{"inputs": [{"name": "x", "datatype": "FP99", "shape": [1], "data": [1]}]}', None, InvalidInput, "FP99"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": "2", "data": [1]}]}', None, InvalidRequest, "shape"),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}]}',
            None,
            InvalidRequest,
            "negative",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2]}]}',
            None,
            InvalidInput,
            "needs 3",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": ["a", "b"]}]}',
            None,
            InvalidInput,
            "numbers",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [[1], [2, 3]]}]}',
            None,
            InvalidInput,
            "ragged",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1.5]}]}',
            None,
            InvalidInput,
            "integers",
        ),
        (b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [300]}]}', None, InvalidInput, "range"),
        (b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [5]}]}', None, InvalidInput, "strings"),
        (
            b'{"inputs": [{"name": "x", "datatype": "BOOL", "shape": [1], "data": [2]}]}',
            None,
            InvalidInput,
            "true/false",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},'
            b'{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}',
            None,
            InvalidRequest,
            "twice",
        ),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}', 500, InvalidRequest, "Header"),
    ],
)
def test_malformed_requests_name_the_problem(
    body: bytes, header_length: int | None, error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error, match=fragment):
        decode_request(body, header_length)


def test_binary_size_mismatches_are_rejected() -> None:
    blob = np.zeros(3, np.float32).tobytes()
    # Declared size disagrees with the shape.
    body, n = _binary_body(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 12}}]}, blob
    )
    with pytest.raises(InvalidInput, match="needs 16"):
        decode_request(body, n)
    # Declared size runs past the body.
    body, n = _binary_body(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "parameters": {"binary_data_size": 16}}]}, blob
    )
    with pytest.raises(InvalidInput, match="runs past"):
        decode_request(body, n)
    # Bytes nobody claims.
    body, n = _binary_body(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}]}, blob
    )
    with pytest.raises(InvalidInput, match="no input"):
        decode_request(body, n)
    # BYTES whose length prefix lies.
    bad = struct.pack("<I", 10) + b"abc"
    body, n = _binary_body(
        {"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(bad)}}]},
        bad,
    )
    with pytest.raises(InvalidInput, match="runs past"):
        decode_request(body, n)


def test_classification_extension_is_refused_clearly() -> None:
    body = _json(
        {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
            "outputs": [{"name": "y", "parameters": {"classification": 3}}],
        }
    )
    with pytest.raises(InvalidRequest, match="classification"):
        decode_request(body, None)
