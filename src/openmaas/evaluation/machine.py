"""What a measurement ran on: the CPU (model, instruction-set flags), cores, library versions, peak memory."""

from __future__ import annotations

import os
import platform
import resource
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

# The instruction-set extensions that decide how fast int8 and fp32 kernels run.
_ISA = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx_vnni", "amx_bf16", "amx_int8", "amx_tile", "asimd", "asimddp", "sve", "i8mm", "bf16",
)  # fmt: skip


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), set[str]()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and value.strip():
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
        if key == "" and flags:  # the first processor's block is enough
            break
    return model, [f for f in _ISA if f in flags]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe(threads: int) -> dict[str, Any]:
    model, flags = _cpuinfo()
    return {
        "cpu": model,
        "isa": flags,
        "architecture": platform.machine(),
        "cores": os.cpu_count(),
        "threads": threads,
        "python": sys.version.split()[0],
        "libraries": {p: _version(p) for p in ("torch", "onnxruntime", "scikit-learn", "transformers")},
    }


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
