"""Exporting a trained network to ONNX with the served outputs (probabilities and label, or the prediction)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from openmaas.training.data import Kind
from openmaas.training.loop import Net


class _Served(nn.Module):
    """What the ONNX file computes: probabilities and label (classification) or the prediction (regression)."""

    def __init__(self, net: Net, kind: Kind) -> None:
        super().__init__()
        self.net = net
        self.kind = kind

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(x)
        if self.kind == "classification":
            probs = torch.softmax(out, dim=1)
            return probs, torch.argmax(probs, dim=1)
        return (out[:, 0],)


def export_onnx(model: Net, example_shape: tuple[int, ...], kind: Kind, path: Path, input_name: str = "x") -> None:
    """``x`` FP32 [-1, F] (or ``image`` [-1, C, H, W]) -> ``probabilities`` FP32 [-1, C] and ``label`` INT64 [-1],
    or ``prediction`` FP32 [-1]."""
    served = _Served(model, kind).eval()
    outputs = ["probabilities", "label"] if kind == "classification" else ["prediction"]
    example = torch.zeros(2, *example_shape)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of one that needs onnxscript (not installed).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            served,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=outputs,
            dynamic_axes={input_name: {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
            dynamo=False,
        )
