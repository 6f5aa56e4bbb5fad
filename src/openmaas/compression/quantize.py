"""Quantisation: a sentence-transformers encoder to an int8 ONNX embedding folder (dynamic, the embedding table
included), and an ONNX classifier or regressor to static int8 (QDQ) with calibration data."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from openmaas.runtimes.onnx_embedding import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE

_TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def export_encoder(source: Path, out: Path) -> None:
    """The sentence-transformers folder ``source`` as an FP32 ONNX embedding folder ``out``: the transformer with
    its pooling (mean over the attention mask, or the CLS token) and L2 normalisation in the graph, the same
    tokenizer and window."""
    import torch
    from sentence_transformers import SentenceTransformer

    try:  # sentence-transformers 6 moved the modules (the old path warns)
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling
        from sentence_transformers.sentence_transformer.modules import Transformer as STTransformer
    except ImportError:  # pragma: no cover - older releases
        from sentence_transformers.models import Normalize, Pooling  # type: ignore[no-redef]
        from sentence_transformers.models import Transformer as STTransformer  # type: ignore[no-redef]

    st = SentenceTransformer(str(source), device="cpu", local_files_only=True)
    modules = list(st)
    if not isinstance(modules[0], STTransformer) or not any(isinstance(m, Pooling) for m in modules):
        raise ValueError("only a transformer with a pooling layer (a sentence-transformers encoder) is exported")
    config = next(m for m in modules if isinstance(m, Pooling)).get_config_dict()
    named = config.get("pooling_mode") or ("cls" if config.get("pooling_mode_cls_token") else "mean"
                                           if config.get("pooling_mode_mean_tokens") else "other")  # fmt: skip
    if named not in ("mean", "cls"):
        raise ValueError(f"the encoder pools by '{named}'; the export supports mean and CLS pooling")
    mode = str(named)
    normalize = any(isinstance(m, Normalize) for m in modules)
    auto = modules[0].auto_model.eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = auto

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
        ) -> torch.Tensor:
            hidden = self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            if mode == "cls":
                pooled = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1) if normalize else pooled

    out.mkdir(parents=True, exist_ok=True)
    example = st.tokenizer(["an example", "a second, longer example"], padding=True, return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    if "token_type_ids" not in example:
        example["token_type_ids"] = torch.zeros_like(example["input_ids"])
    axes = {n: {0: "batch", 1: "tokens"} for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            Encoder().eval(),
            tuple(example[n] for n in names),
            str(out / MODEL_FILE),
            input_names=names,
            output_names=["embedding"],
            dynamic_axes={**axes, "embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    if not (out / TOKENIZER_FILE).is_file():
        st.tokenizer.save_pretrained(str(out))  # a fast tokenizer writes tokenizer.json
    (out / CONFIG_FILE).write_text(
        json.dumps(
            {
                "max_seq_length": int(st.max_seq_length or 512),
                "dimension": int(st.get_embedding_dimension() or 0),
                "pad_token_id": int(st.tokenizer.pad_token_id or 0),
                "pooling": mode,
                "normalize": normalize,
                "source": "exported from a sentence-transformers folder",
            },
            indent=2,
        )
    )


def quantize_dynamic_folder(fp32: Path, out: Path, per_channel: bool = True) -> None:
    """Dynamic int8 of an ONNX embedding folder: weights of every MatMul and the embedding tables (Gather) stored
    as int8 with a scale per output channel, activations quantised at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(
        str(fp32 / MODEL_FILE),
        str(out / MODEL_FILE),
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
        op_types_to_quantize=["MatMul", "Gather"],
        extra_options={"MatMulConstBOnly": True},
    )
    for p in fp32.iterdir():
        if p.name != MODEL_FILE and p.is_file():
            shutil.copy(p, out / p.name)
    config = json.loads((out / CONFIG_FILE).read_text())
    config.update(quantization="dynamic-int8 (MatMul and Gather weights, per channel)")
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def quantize_static_file(source: Path, out: Path, calibration: dict[str, np.ndarray], per_channel: bool = True) -> None:
    """Static int8 (QDQ) of an ONNX model: weights and activations of Conv, Gemm and MatMul in int8, activation
    ranges calibrated on ``calibration`` (named inputs, batch first)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    rows = len(next(iter(calibration.values())))

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches: Iterator[dict[str, np.ndarray]] = iter(
                {k: v[i : i + 16] for k, v in calibration.items()} for i in range(0, rows, 16)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    prepared = out.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    except Exception:  # pre-processing only helps; quantise the model as it is if it fails
        shutil.copy(source, prepared)
    try:
        quantize_static(
            str(prepared),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            op_types_to_quantize=["Conv", "Gemm", "MatMul"],
            calibrate_method=CalibrationMethod.MinMax,
        )
    finally:
        prepared.unlink(missing_ok=True)
