"""Which model formats are accepted, how they are recognised, and why pickles are refused."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from openmaas.errors import UnsafeFormat, UnsupportedFormat

SAFE_FORMATS_HELP = (
    "Accepted formats: an ONNX file (.onnx), a Hugging Face or sentence-transformers folder with "
    "safetensors weights (upload it as .zip or .tar.gz; a causal language model is served for text generation), "
    "an ONNX text encoder folder (model.onnx, tokenizer.json, openmaas_embedding.json), a GGUF language model (.gguf), a Whisper model in CTranslate2 format (a folder), or a scikit-learn model "
    "saved with skops (.skops)."
)
PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".joblib", ".pt", ".pth", ".ckpt", ".bin", ".npy", ".npz"})
#: The formats a runtime serves (each runtime class names its own); anything else is refused at registration.
FORMATS = ("onnx", "onnx-embedding", "sentence-transformers", "skops", "transformers", "gguf", "whisper")


def looks_like_pickle(path: Path) -> bool:
    """True for pickle streams and for PyTorch's zip checkpoints (which wrap a pickle)."""
    with path.open("rb") as f:
        head = f.read(4)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                return any(n.endswith((".pkl", "data.pkl")) for n in z.namelist())
        except zipfile.BadZipFile:
            return False
    return False


def _refuse_pickle(what: str) -> UnsafeFormat:
    return UnsafeFormat(
        f"{what} is a pickle-based file, which can run arbitrary code when loaded, so it is refused. "
        + SAFE_FORMATS_HELP,
        param="file",
    )


def detect_format(path: Path, declared: str | None = None) -> str:
    """The registry format of the file or folder at ``path``; raises with a clear message if refused."""
    if declared is not None and declared not in FORMATS:
        if declared in ("pickle", "joblib", "pytorch", "pt"):
            raise _refuse_pickle(f"format '{declared}'")
        raise UnsupportedFormat(f"unknown format '{declared}'. {SAFE_FORMATS_HELP}", param="format")
    detected = _detect_dir(path) if path.is_dir() else _detect_file(path)
    if declared is not None and declared != detected:
        raise UnsupportedFormat(f"format '{declared}' was given but the upload is a {detected} model", param="format")
    return detected


def _detect_file(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES or looks_like_pickle(path):
        raise _refuse_pickle(f"'{path.name}'")
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".skops":
        return "skops"
    if suffix == ".gguf":
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise UnsupportedFormat(f"'{path.name}' is not a GGUF file (no GGUF header)", param="file")
        return "gguf"
    raise UnsupportedFormat(f"cannot tell the format of '{path.name}'. {SAFE_FORMATS_HELP}", param="file")


def _detect_dir(path: Path) -> str:
    from openmaas.runtimes.whisper import is_ctranslate2_whisper

    if is_ctranslate2_whisper(path):
        others = [p for p in path.rglob("*") if p.is_file() and p.name != "model.bin"]
        pickles = [p for p in others if p.suffix.lower() in PICKLE_SUFFIXES or looks_like_pickle(p)]
        if pickles:
            raise _refuse_pickle(f"the folder holds {pickles[0].relative_to(path).as_posix()}, which")
        return "whisper"  # model.bin is CTranslate2's own binary format, not a pickle
    files = [p for p in path.rglob("*") if p.is_file()]
    pickles = [p for p in files if p.suffix.lower() in PICKLE_SUFFIXES or looks_like_pickle(p)]
    if pickles:
        names = ", ".join(sorted(p.relative_to(path).as_posix() for p in pickles)[:5])
        raise _refuse_pickle(
            f"the folder holds {names}, which"
            if len(pickles) == 1
            else f"the folder holds pickle-based files ({names}); each"
        )
    from openmaas.runtimes.onnx_embedding import is_onnx_embedding

    if is_onnx_embedding(path):
        return "onnx-embedding"
    if not any(p.suffix == ".safetensors" for p in files):
        raise UnsupportedFormat(f"the folder has no .safetensors weights. {SAFE_FORMATS_HELP}", param="file")
    if (path / "modules.json").is_file() or (path / "config_sentence_transformers.json").is_file():
        return "sentence-transformers"
    config = path / "config.json"
    if config.is_file():
        try:
            architectures = json.loads(config.read_text()).get("architectures") or []
        except (json.JSONDecodeError, AttributeError):
            raise UnsupportedFormat("config.json in the folder is not valid JSON", param="file") from None
        if any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
            return "transformers"
        if any(str(a).endswith("ForConditionalGeneration") for a in architectures):
            raise UnsupportedFormat(
                "encoder-decoder and multimodal Hugging Face models are not servable yet; causal language models "
                "(architectures ending in ForCausalLM) are",
                param="file",
            )
        # An encoder without sentence-transformers config: served as embeddings with mean pooling.
        return "sentence-transformers"
    raise UnsupportedFormat(
        f"the folder has safetensors weights but no config.json or modules.json. {SAFE_FORMATS_HELP}",
        param="file",
    )
