"""Runtimes: one class per model format, behind the ``Runtime`` contract."""

from __future__ import annotations

from pathlib import Path

from openmaas.runtimes.base import Runtime, RuntimeOptions, RuntimeResult
from openmaas.runtimes.causal_lm import CausalLMRuntime, GGUFRuntime
from openmaas.runtimes.onnx import OnnxRuntime
from openmaas.runtimes.onnx_embedding import OnnxEmbeddingRuntime
from openmaas.runtimes.sentence_transformers import SentenceTransformerRuntime
from openmaas.runtimes.sklearn import SkopsRuntime
from openmaas.runtimes.whisper import WhisperRuntime

RUNTIMES: dict[str, type[Runtime]] = {
    cls.format: cls
    for cls in (
        OnnxRuntime,
        OnnxEmbeddingRuntime,
        SentenceTransformerRuntime,
        SkopsRuntime,
        CausalLMRuntime,
        GGUFRuntime,
        WhisperRuntime,
    )
}


def runtime_class(fmt: str) -> type[Runtime]:
    """The runtime class for format ``fmt``; ValueError naming the known formats."""
    try:
        return RUNTIMES[fmt]
    except KeyError:
        raise ValueError(f"no runtime for format '{fmt}' (known: {', '.join(sorted(RUNTIMES))})") from None


def create_runtime(fmt: str, path: Path, options: RuntimeOptions) -> Runtime:
    """A not-yet-loaded runtime for an artifact of format ``fmt`` (in a process of its own where the format asks
    for one and ``options.copy_processes`` allows)."""
    cls = runtime_class(fmt)
    if cls.own_process and options.copy_processes:
        from openmaas.runtimes.process import ProcessRuntime

        return ProcessRuntime(cls, path, options)
    return cls(path, options)


__all__ = ["RUNTIMES", "Runtime", "RuntimeOptions", "RuntimeResult", "create_runtime", "runtime_class"]
