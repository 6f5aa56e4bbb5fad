"""Checking a request's tensors against a model's signature, with messages that name the problem."""

from __future__ import annotations

from openmaas.entities.tensors import Signature, datatype_of
from openmaas.errors import InvalidInput
from openmaas.serving.types import InferenceRequest


def _shape(shape: tuple[int, ...] | list[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def validate_request(signature: Signature, request: InferenceRequest) -> int:
    """Raise InvalidInput unless inputs and requested outputs fit ``signature``; return the batch size."""
    expected = {t.name for t in signature.inputs}
    for name in request.inputs:
        if name not in expected:
            raise InvalidInput(
                f"unknown input '{name}'; the model's inputs are: {', '.join(sorted(expected))}", param=name
            )
    batch: int | None = None
    for spec in signature.inputs:
        array = request.inputs.get(spec.name)
        if array is None:
            raise InvalidInput(f"missing input '{spec.name}' ({spec.datatype} {_shape(spec.shape)})", param=spec.name)
        got_type = datatype_of(array)
        if got_type != spec.datatype:
            raise InvalidInput(
                f"input '{spec.name}' has datatype {got_type} but the model expects {spec.datatype}",
                param=spec.name,
            )
        if array.ndim != len(spec.shape) or any(
            want != -1 and want != got for want, got in zip(spec.shape, array.shape, strict=True)
        ):
            raise InvalidInput(
                f"input '{spec.name}' has shape {_shape(array.shape)} but the model expects {_shape(spec.shape)}",
                param=spec.name,
            )
        if array.ndim == 0:
            continue
        if array.shape[0] == 0:
            raise InvalidInput(f"input '{spec.name}' is an empty batch (first dimension is 0)", param=spec.name)
        if batch is None:
            batch = int(array.shape[0])
        elif batch != array.shape[0]:
            raise InvalidInput(
                f"inputs disagree on the batch size: '{spec.name}' has {array.shape[0]}, another has {batch}",
                param=spec.name,
            )
    if request.outputs is not None:
        known = {t.name for t in signature.outputs}
        for name in request.outputs:
            if name not in known:
                raise InvalidInput(
                    f"unknown output '{name}'; the model's outputs are: {', '.join(sorted(known))}",
                    param=name,
                )
    return batch or 1
