"""Networks for pruning and distillation: an ONNX classifier read back into PyTorch, magnitude pruning
(unstructured, or structured with torch-pruning's dependency graph), and small students.

``from_onnx`` reads the chain of layers that training exports (and the digits CNN): Conv, Gemm or MatMul+Add,
BatchNormalization, ReLU/Sigmoid/Tanh, pooling, Flatten, and scaling by constants, ending in Softmax (the served
``probabilities``; ``label`` is their ArgMax). Anything else is refused naming the operator."""

from __future__ import annotations

import gzip
import io
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from openmaas.training.loop import Net

SUPPORTED_OPS = (
    "Conv, Gemm, MatMul+Add, BatchNormalization, Relu, Sigmoid, Tanh, MaxPool, AveragePool, GlobalAveragePool, "
    "Flatten, Dropout, Identity, and Add/Sub/Mul/Div by a constant, ending in Softmax"
)


class UnsupportedGraph(ValueError):
    pass


class Scale(nn.Module):
    """``x op constant`` for the scaling steps a graph holds (pixels / 16, standardisation)."""

    def __init__(self, op: str, value: np.ndarray, constant_first: bool) -> None:
        super().__init__()
        self.op = op
        self.constant_first = constant_first
        self.register_buffer("value", torch.from_numpy(np.asarray(value, dtype=np.float32)))

    value: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = (self.value, x) if self.constant_first else (x, self.value)
        if self.op == "Add":
            return a + b
        if self.op == "Sub":
            return a - b
        return a * b if self.op == "Mul" else a / b


class Classifier(Net):
    """Logits from a chain of layers; what is exported adds softmax and argmax (``training.export``)."""

    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__()
        self.layers = layers

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaled(x)


def from_onnx(data: bytes) -> Classifier:
    """The classifier in ONNX bytes as a PyTorch network with the same weights (UnsupportedGraph otherwise)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(data).graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in consts]
    if len(inputs) != 1:
        raise UnsupportedGraph(f"pruning and distillation take models with one input; this one has {len(inputs)}")
    current = inputs[0]
    layers: list[nn.Module] = []
    nodes = list(graph.node)
    i = 0
    while i < len(nodes):
        node = nodes[i]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        op = node.op_type
        i += 1
        if op == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(attrs["value"])
            continue
        data_inputs = [n for n in node.input if n not in consts]
        if data_inputs != [current]:
            raise UnsupportedGraph(f"the graph branches at its {op} node; only a chain of layers is read back")
        if op == "Softmax":
            return Classifier(nn.Sequential(*layers))
        if op == "Conv":
            w = consts[node.input[1]]
            pads = list(attrs.get("pads", [0, 0, 0, 0]))
            if len(w.shape) != 4 or pads[:2] != pads[2:]:
                raise UnsupportedGraph("only 2-D convolutions with symmetric padding are read back")
            conv = nn.Conv2d(
                w.shape[1] * int(attrs.get("group", 1)), w.shape[0], tuple(w.shape[2:]),
                stride=tuple(attrs.get("strides", [1, 1])), padding=tuple(pads[:2]),
                dilation=tuple(attrs.get("dilations", [1, 1])), groups=int(attrs.get("group", 1)),
                bias=len(node.input) > 2,
            )  # fmt: skip
            conv.weight.data = torch.from_numpy(w.copy())
            if conv.bias is not None:
                conv.bias.data = torch.from_numpy(consts[node.input[2]].copy())
            layers.append(conv)
        elif op == "Gemm":
            if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
                raise UnsupportedGraph("a Gemm with scaling or a transposed input is not read back")
            w = consts[node.input[1]]
            w = w if attrs.get("transB", 0) else w.T
            layers.append(_linear(w, consts.get(node.input[2]) if len(node.input) > 2 else None))
        elif op == "MatMul":
            w = consts[node.input[1]].T
            bias = None
            nxt = nodes[i] if i < len(nodes) else None
            if nxt is not None and nxt.op_type == "Add" and node.output[0] in nxt.input:
                other = [n for n in nxt.input if n != node.output[0]]
                if other and other[0] in consts:
                    bias, i = consts[other[0]], i + 1
                    node = nxt
            layers.append(_linear(w, bias))
        elif op == "BatchNormalization":
            scale, shift, mean, var = (consts[n] for n in node.input[1:5])
            bn = nn.BatchNorm2d(len(scale), eps=float(attrs.get("epsilon", 1e-5)))
            bn.weight.data, bn.bias.data = torch.from_numpy(scale.copy()), torch.from_numpy(shift.copy())
            bn.running_mean.data, bn.running_var.data = torch.from_numpy(mean.copy()), torch.from_numpy(var.copy())  # type: ignore[union-attr]
            layers.append(bn)
        elif op in ("Relu", "Sigmoid", "Tanh"):
            layers.append({"Relu": nn.ReLU, "Sigmoid": nn.Sigmoid, "Tanh": nn.Tanh}[op]())
        elif op in ("MaxPool", "AveragePool"):
            kernel = tuple(attrs["kernel_shape"])
            pads = list(attrs.get("pads", [0, 0, 0, 0]))
            cls = nn.MaxPool2d if op == "MaxPool" else nn.AvgPool2d
            layers.append(cls(kernel, stride=tuple(attrs.get("strides", kernel)), padding=tuple(pads[:2])))
        elif op == "GlobalAveragePool":
            layers.append(nn.AdaptiveAvgPool2d(1))
        elif op == "Flatten":
            if int(attrs.get("axis", 1)) != 1:
                raise UnsupportedGraph("only Flatten from axis 1 is read back")
            layers.append(nn.Flatten())
        elif op in ("Dropout", "Identity"):
            pass
        elif op in ("Add", "Sub", "Mul", "Div"):
            constant = [n for n in node.input if n in consts]
            if len(constant) != 1:
                raise UnsupportedGraph(f"an {op} of two computed values is not read back")
            layers.append(Scale(op, consts[constant[0]], node.input[0] == constant[0]))
        else:
            raise UnsupportedGraph(f"the graph uses {op}, which is not read back; supported: {SUPPORTED_OPS}")
        current = node.output[0]
    raise UnsupportedGraph("the graph does not end in Softmax (a classifier's probabilities)")


def _linear(w: np.ndarray, bias: np.ndarray | None) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    layer.weight.data = torch.from_numpy(np.ascontiguousarray(w))
    if bias is not None:
        assert layer.bias is not None
        layer.bias.data = torch.from_numpy(np.asarray(bias, dtype=np.float32).copy())
    return layer


def _prunable(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def prune_unstructured(model: Classifier, sparsity: float) -> None:
    """Zero the smallest-magnitude ``sparsity`` of all Conv and Linear weights together (global L1); the masks stay
    on while fine-tuning (``finish_unstructured`` makes them permanent)."""
    from torch.nn.utils import prune

    prune.global_unstructured(
        [(m, "weight") for m in _prunable(model)], pruning_method=prune.L1Unstructured, amount=sparsity
    )


def finish_unstructured(model: Classifier) -> None:
    from torch.nn.utils import prune

    for m in _prunable(model):
        if prune.is_pruned(m):
            prune.remove(m, "weight")


def sparsity_of(model: nn.Module) -> float:
    weights: list[torch.Tensor] = [m.weight for m in _prunable(model)]  # type: ignore[misc]
    total = sum(int(w.numel()) for w in weights)
    return float(sum(int(torch.count_nonzero(w == 0)) for w in weights)) / max(1, total)


def prune_structured(model: Classifier, ratio: float, example: torch.Tensor) -> None:
    """Remove the ``ratio`` of channels (Conv) and units (Linear) with the smallest L1 norm, with every layer that
    depends on them (torch-pruning's dependency graph); the last layer keeps its classes."""
    import torch_pruning as tp

    last = _prunable(model)[-1]
    pruner = tp.pruner.MagnitudePruner(
        model.layers, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
        ignored_layers=[last],
    )  # fmt: skip
    pruner.step()


def flops_and_parameters(model: Classifier, example: torch.Tensor) -> tuple[int, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model.layers, example)
    return int(macs), int(params)


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gzip_size(data: bytes) -> int:
    """Bytes of ``data`` gzip-compressed (what a sparse file of mostly zeros costs to store and ship)."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9, mtime=0) as f:
        f.write(data)
    return len(out.getvalue())


def student(shape: tuple[int, ...], classes: int, spec: dict[str, Any], x_train: np.ndarray) -> Classifier:
    """A small network for inputs of ``shape`` (no batch): a CNN with ``channels`` (images), else an MLP with
    ``hidden`` units (an empty list: a linear model); inputs are standardised with the training rows' statistics."""
    layers: list[nn.Module] = []
    if len(shape) == 3 and spec.get("channels") is not None:
        scale = float(np.abs(x_train).max()) or 1.0
        layers.append(Scale("Div", np.array(scale, dtype=np.float32), False))
        c_in = shape[0]
        h, w = shape[1], shape[2]
        for c in spec["channels"]:
            layers += [nn.Conv2d(c_in, int(c), 3, padding=1), nn.ReLU()]
            c_in = int(c)
            if h >= 4 and w >= 4:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
        layers += [nn.Flatten(), nn.Linear(c_in * h * w, classes)]
        return Classifier(nn.Sequential(*layers))
    flat = x_train.reshape(len(x_train), -1)
    mean, std = flat.mean(axis=0), flat.std(axis=0)
    std[std == 0] = 1.0
    if len(shape) > 1:
        layers.append(nn.Flatten())
    layers += [Scale("Sub", mean, False), Scale("Div", std, False)]
    width = int(math.prod(shape))
    for h in spec.get("hidden", [32]):
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    layers.append(nn.Linear(width, classes))
    return Classifier(nn.Sequential(*layers))
