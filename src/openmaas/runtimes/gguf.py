"""GGUF files: reading their header, and converting them once to a safetensors folder in a child process."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from openmaas.entities.models import Preparation

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
    the artifact."""
    target = _target(gguf_path)
    with _conversion_lock(target):  # one conversion per file in this process; others wait for it
        if is_converted(gguf_path):
            return target
        return _convert_into(gguf_path, target)


def _target(gguf_path: Path) -> Path:
    """Where the conversion of ``gguf_path`` goes: beside the artifact."""
    return gguf_path.parent / "converted"


def is_converted(gguf_path: Path) -> bool:
    return (_target(gguf_path) / "config.json").is_file()


def conversion_progress(gguf_path: Path) -> Preparation | None:
    """The conversion of ``gguf_path`` running in this process now, else None."""
    state = _PROGRESS.get(_target(gguf_path))
    if state is None:
        return None
    step, fraction, started = state
    return Preparation(step=step, progress=round(fraction, 3), elapsed_s=round(time.monotonic() - started, 1))


_CONVERSIONS: dict[Path, threading.Lock] = {}
_CONVERSIONS_GUARD = threading.Lock()
# target folder -> (step, fraction done, monotonic start) while a conversion runs
_PROGRESS: dict[Path, tuple[str, float, float]] = {}
_PROGRESS_PREFIX = "openmaas-progress "


def _conversion_lock(target: Path) -> threading.Lock:
    with _CONVERSIONS_GUARD:
        return _CONVERSIONS.setdefault(target, threading.Lock())


def _convert_into(gguf_path: Path, target: Path) -> Path:
    staging = gguf_path.parent / f"converting-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(staging, ignore_errors=True)
    started = time.perf_counter()
    log.info("converting GGUF to safetensors (once)", extra={"path": gguf_path.name})
    _PROGRESS[target] = ("starting the converter", 0.0, time.monotonic())
    try:
        with tempfile.TemporaryFile("w+") as errors:
            child = subprocess.Popen(
                [sys.executable, "-m", "openmaas.runtimes.gguf", str(gguf_path), str(staging)],
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"},
            )
            assert child.stdout is not None
            for line in child.stdout:  # "openmaas-progress <fraction> <step>", a line per step
                if line.startswith(_PROGRESS_PREFIX):
                    fraction, _, step = line[len(_PROGRESS_PREFIX) :].strip().partition(" ")
                    _PROGRESS[target] = (step, float(fraction), _PROGRESS[target][2])
            try:
                code = child.wait(timeout=1800)
            except subprocess.TimeoutExpired:
                child.kill()
                code = child.wait()
            errors.seek(0)
            stderr = errors.read()
    finally:
        _PROGRESS.pop(target, None)
    if code != 0:
        shutil.rmtree(staging, ignore_errors=True)
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(f"GGUF conversion failed: {lines[-1] if lines else code}")
    try:
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process converted it first
    log.info("GGUF converted", extra={"seconds": round(time.perf_counter() - started, 1)})
    return target


def _report(fraction: float, step: str) -> None:
    print(f"{_PROGRESS_PREFIX}{fraction:.3f} {step}", flush=True)


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
                _report(0.1 + 0.7 * i / total, "de-quantising the weights")
            yield item

    if hasattr(gguf_utils, "tqdm"):
        gguf_utils.tqdm = counting


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """De-quantise a GGUF file into a Hugging Face folder (float32 safetensors, tokenizer, generation config)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    _report(0.02, "reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    _report(0.1, "de-quantising the weights")
    _count_tensors()
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    _report(0.8, "copying the weights")
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # The GGUF-loaded model is marked quantised and refuses to save; a plain copy of its weights does not.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    out.mkdir(parents=True)
    _report(0.85, "writing safetensors")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "openmaas-source.json").write_text(json.dumps({"gguf": name, "bytes": gguf_path.stat().st_size}))


if __name__ == "__main__":
    os.nice(10)  # a background conversion must not slow the models being served
    logging.disable(logging.WARNING)
    convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]))
