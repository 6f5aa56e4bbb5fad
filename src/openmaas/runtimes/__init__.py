"""Runtimes: one class per model format, behind the ``Runtime`` contract."""

from __future__ import annotations

from pathlib import Path

from openmaas.runtimes.base import Runtime, RuntimeOptions, RuntimeResult
from openmaas.runtimes.generative import CausalLMRuntime, GGUFRuntime
from openmaas.runtimes.onnx import OnnxRuntime
from openmaas.runtimes.sentence_transformers import SentenceTransformerRuntime
from openmaas.runtimes.sklearn import SkopsRuntime
from openmaas.runtimes.whisper import WhisperRuntime

RUNTIMES: dict[str, type[Runtime]] = {
    cls.format: cls
    for cls in (OnnxRuntime, SentenceTransformerRuntime, SkopsRuntime, CausalLMRuntime, GGUFRuntime, WhisperRuntime)
}

#: Formats served for text generation (one engine per model batches its requests itself).
GENERATIVE_FORMATS = frozenset({CausalLMRuntime.format, GGUFRuntime.format})


def create_runtime(fmt: str, path: Path, options: RuntimeOptions) -> Runtime:
    """A not-yet-loaded runtime for an artifact of format ``fmt``."""
    try:
        cls = RUNTIMES[fmt]
    except KeyError:
        raise ValueError(f"no runtime for format '{fmt}' (known: {', '.join(sorted(RUNTIMES))})") from None
    return cls(path, options)


__all__ = ["GENERATIVE_FORMATS", "RUNTIMES", "Runtime", "RuntimeOptions", "RuntimeResult", "create_runtime"]
