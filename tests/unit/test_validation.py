"""Signature checks: every way a request can disagree with a model names the problem."""

from __future__ import annotations

import numpy as np
import pytest

from openmaas.entities.tensors import Signature, TensorSpec
from openmaas.errors import InvalidInput
from openmaas.serving.types import InferenceRequest
from openmaas.serving.validation import validate_request

SIG = Signature(
    inputs=[TensorSpec(name="image", datatype="FP32", shape=[-1, 1, 8, 8])],
    outputs=[
        TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 10]),
        TensorSpec(name="label", datatype="INT64", shape=[-1]),
    ],
)


def test_valid_request_returns_batch_size() -> None:
    assert validate_request(SIG, InferenceRequest(inputs={"image": np.zeros((5, 1, 8, 8), np.float32)})) == 5


@pytest.mark.parametrize(
    ("inputs", "outputs", "fragment"),
    [
        ({"img": np.zeros((1, 1, 8, 8), np.float32)}, None, "unknown input 'img'"),
        ({}, None, "missing input 'image'"),
        ({"image": np.zeros((1, 1, 8, 8), np.float64)}, None, "FP64 but the model expects FP32"),
        ({"image": np.zeros((1, 64), np.float32)}, None, r"shape \[1,64\] but the model expects \[-1,1,8,8\]"),
        ({"image": np.zeros((1, 1, 8, 9), np.float32)}, None, "shape"),
        ({"image": np.zeros((0, 1, 8, 8), np.float32)}, None, "empty batch"),
        ({"image": np.zeros((1, 1, 8, 8), np.float32)}, ["logits"], "unknown output 'logits'"),
    ],
)
def test_mismatches_are_named(inputs: dict, outputs: list[str] | None, fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        validate_request(SIG, InferenceRequest(inputs=inputs, outputs=outputs))


def test_inputs_must_agree_on_batch_size() -> None:
    sig = Signature(
        inputs=[
            TensorSpec(name="a", datatype="FP32", shape=[-1, 2]),
            TensorSpec(name="b", datatype="FP32", shape=[-1]),
        ],
        outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1])],
    )
    req = InferenceRequest(inputs={"a": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)})
    with pytest.raises(InvalidInput, match="batch size"):
        validate_request(sig, req)
