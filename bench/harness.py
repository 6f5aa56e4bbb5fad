"""Benchmark harness: starting a real server on a free port, raw HTTP requests, test sentences, percentiles,
and a description of the machine."""

from __future__ import annotations

import os
import platform
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


WORDS = [
    "the",
    "a",
    "man",
    "woman",
    "child",
    "dog",
    "cat",
    "horse",
    "car",
    "train",
    "city",
    "river",
    "mountain",
    "eats",
    "rides",
    "reads",
    "writes",
    "plays",
    "sings",
    "walks",
    "runs",
    "quickly",
    "slowly",
    "happily",
    "under",
    "over",
    "near",
    "beside",
    "small",
    "large",
    "red",
    "green",
    "old",
    "new",
    "bright",
    "dark",
    "morning",
    "evening",
    "food",
    "music",
    "book",
    "letter",
    "game",
    "song",
    "road",
    "bridge",
    "garden",
    "house",
]


T = TypeVar("T")


# At the start of a header line: "Inference-Header-Content-Length" must not be taken for it.
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "." for _ in range(n)]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def in_new_thread(fn: Callable[[], T]) -> T:
    box: list[T] = []
    thread = threading.Thread(target=lambda: box.append(fn()))
    thread.start()
    thread.join()
    return box[0]


def http_request(path: str, body: bytes, key: str, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(data_dir: Path, key: str, env_extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {
        **os.environ,
        "OPENMAAS_ADMIN_KEY": key,
        "OPENMAAS_LOG_LEVEL": "warning",
        "HF_HUB_OFFLINE": "1",
        # A fresh data folder would convert the bundled GGUF model in the background, taking a core from what
        # is measured; the generation benchmark converts it at its first load instead.
        "OPENMAAS_PREPARE_AT_START": "0",
        "OPENMAAS_GRPC_PORT": "0",  # bench/protocols.py gives the server a free one
        **env_extra,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "openmaas", "serve", "--port", str(port), "--data-dir", str(data_dir)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if wait_until_ready(proc, f"http://127.0.0.1:{port}/healthz", 180):
        return proc, port
    if proc.poll() is not None:
        raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "server exited")
    proc.kill()
    raise RuntimeError("server did not start")


def wait_until_ready(proc: subprocess.Popen[bytes], url: str, timeout: float) -> bool:
    """True once GET ``url`` answers 200; False if the process exits first or ``timeout`` seconds pass."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            time.sleep(0.3)
    return False


def vector_units(flags_line: str) -> str:
    """The widest vector instructions the CPU offers, as ONNX Runtime's and PyTorch's kernels pick them: int8
    figures in particular differ between AVX2-only cores and cores with AVX-512 VNNI (" (AVX-512 VNNI)")."""
    flags = set(flags_line.split(":", 1)[-1].split())
    for flag, name in (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"),
                       ("avx512f", "AVX-512"), ("avx2", "AVX2")):  # fmt: skip
        if flag in flags:
            return f" ({name})"
    return ""


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        cpu += vector_units(next((line for line in info if line.startswith("flags")), ""))
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB memory"
    except (OSError, ValueError, IndexError):
        pass
    return f"{cpu}, {os.cpu_count()} CPU cores{mem}, {platform.system()} {platform.release()}, Python {platform.python_version()}"
