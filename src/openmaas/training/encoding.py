"""One-hot encoding of categorical columns inside the served ONNX graph, so clients send the values as text."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np


def input_names(columns: list[str]) -> list[str]:
    """Tensor names for categorical columns: the column name with other characters replaced, never ``x``."""
    names: list[str] = []
    for c in columns:
        name = re.sub(r"[^A-Za-z0-9_]", "_", c) or "column"
        while name in names or name == "x":
            name += "_"
        names.append(name)
    return names


def with_categorical_inputs(
    net_path: Path, n_numeric: int, categories: dict[str, list[str]], out_path: Path
) -> list[str]:
    """Prefix the exported network (input ``features``) with a graph that takes ``x`` FP32 [-1, n_numeric] and one
    STRING [-1] input per categorical column, one-hot encodes each with the training categories (unknown values
    become all zeros, as in training) and concatenates them after ``x``. Returns the categorical inputs' names."""
    import onnx
    from onnx import TensorProto, compose, helper, numpy_helper

    net = onnx.load(str(net_path))
    names = input_names(list(categories))
    inputs, nodes, parts, inits = [], [], [], []
    if n_numeric:
        inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n_numeric]))
        parts.append("x")
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"))
    for name, cats in zip(names, categories.values(), strict=True):
        inputs.append(helper.make_tensor_value_info(name, TensorProto.STRING, [None]))
        inits.append(numpy_helper.from_array(np.arange(len(cats), dtype=np.int64)[None, :], f"{name}_range"))
        nodes += [
            helper.make_node(
                "LabelEncoder",
                [name],
                [f"{name}_index"],
                domain="ai.onnx.ml",
                keys_strings=cats,
                values_int64s=list(range(len(cats))),
                default_int64=-1,
            ),
            helper.make_node("Unsqueeze", [f"{name}_index", "axis1"], [f"{name}_column"]),
            helper.make_node("Equal", [f"{name}_column", f"{name}_range"], [f"{name}_hit"]),
            helper.make_node("Cast", [f"{name}_hit"], [f"{name}_onehot"], to=TensorProto.FLOAT),
        ]
        parts.append(f"{name}_onehot")
    nodes.append(helper.make_node("Concat", parts, ["features"], axis=1))
    total = n_numeric + sum(len(c) for c in categories.values())
    graph = helper.make_graph(
        nodes, "encode", inputs, [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, total])], inits
    )
    opsets = [o for o in net.opset_import if o.domain in ("", "ai.onnx")] + [helper.make_opsetid("ai.onnx.ml", 2)]
    pre = helper.make_model(graph, opset_imports=opsets)
    pre.ir_version = net.ir_version
    merged = compose.merge_models(pre, net, io_map=[("features", "features")])
    onnx.checker.check_model(merged)
    onnx.save(merged, str(out_path))
    return names
