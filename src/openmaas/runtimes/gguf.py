"""GGUF files: reading their header, and converting them once to a safetensors folder in a child process."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from openmaas.entities.models import Preparation
from openmaas.runtimes.conversion import child_start, convert_once, home, progress, report

log = logging.getLogger(__name__)

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def describe_gguf(path: Path) -> dict[str, Any]:
    """Architecture and context length from a GGUF file's header; ValueError if it is not a GGUF language model.

    Reads the key-value header only, stopping as soon as both are known (a full parse, vocabulary included, takes
    seconds for a large tokenizer)."""
    import struct

    def read(f: Any, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = f.read(size)
        if len(data) != size:
            raise ValueError("the GGUF header is truncated")
        return struct.unpack(fmt, data)[0]

    def string(f: Any) -> str:
        n = read(f, "<Q")
        if n > 1 << 20:
            raise ValueError("the GGUF header has an implausibly long string")
        return str(f.read(n).decode("utf-8", errors="replace"))

    def skip(f: Any, kind: int) -> None:
        if kind in _GGUF_SCALARS:
            f.seek(struct.calcsize(_GGUF_SCALARS[kind]), 1)
        elif kind == 8:
            f.seek(read(f, "<Q"), 1)
        elif kind == 9:
            inner, count = read(f, "<I"), read(f, "<Q")
            if inner in _GGUF_SCALARS:
                f.seek(count * struct.calcsize(_GGUF_SCALARS[inner]), 1)
            else:
                for _ in range(count):
                    skip(f, inner)
        else:
            raise ValueError(f"unknown GGUF value type {kind}")

    found: dict[str, Any] = {}
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file (no GGUF header)")
        version = read(f, "<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old; convert it with a current llama.cpp")
        read(f, "<Q")  # tensors
        for _ in range(read(f, "<Q")):
            key, kind = string(f), read(f, "<I")
            arch = found.get("architecture")
            if key == "general.architecture" and kind == 8:
                found["architecture"] = string(f)
            elif arch and key == f"{arch}.context_length" and kind in _GGUF_SCALARS:
                found["context_length"] = int(read(f, _GGUF_SCALARS[kind]))
            else:
                skip(f, kind)
            if "architecture" in found and "context_length" in found:
                break
    if "architecture" not in found:
        raise ValueError("the GGUF file names no architecture (general.architecture)")
    found.setdefault("context_length", None)
    return found


def converted_folder(gguf_path: Path) -> Path:
    """The safetensors folder converted from ``gguf_path``, made on first use (in a child process) and kept beside
    the artifact or in the conversion cache."""
    return convert_once(
        converted_target(gguf_path), "openmaas.runtimes.gguf", [str(gguf_path)], "converting GGUF to safetensors"
    )


def converted_target(gguf_path: Path) -> Path:
    """Where the conversion of ``gguf_path`` goes: beside the artifact, or in the conversion cache."""
    return home(gguf_path) / "converted"


def conversion_progress(gguf_path: Path) -> Preparation | None:
    """The conversion of ``gguf_path`` running in this process now, else None."""
    return progress(converted_target(gguf_path))


def _count_tensors() -> None:
    """Report progress through transformers' GGUF de-quantisation loop (its slow part), which iterates the file's
    tensors through the module's ``tqdm``; without that hook the steps alone are reported."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        return

    def counting(iterable: Any, *args: Any, **kwargs: Any) -> Any:
        total = len(iterable) if hasattr(iterable, "__len__") else 0
        every = max(1, total // 40)
        for i, item in enumerate(iterable):
            if total and i % every == 0:
                report(0.1 + 0.7 * i / total, "de-quantising the weights")
            yield item

    if hasattr(gguf_utils, "tqdm"):
        gguf_utils.tqdm = counting


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """De-quantise a GGUF file into a Hugging Face folder (float32 safetensors, tokenizer, generation config)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    report(0.02, "reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    report(0.1, "de-quantising the weights")
    _count_tensors()
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    report(0.8, "copying the weights")
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # The GGUF-loaded model is marked quantised and refuses to save; a plain copy of its weights does not.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    out.mkdir(parents=True)
    report(0.85, "writing safetensors")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "openmaas-source.json").write_text(json.dumps({"gguf": name, "bytes": gguf_path.stat().st_size}))


if __name__ == "__main__":
    child_start()
    convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]))
