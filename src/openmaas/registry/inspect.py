"""Reading a model's signature by loading it once, in a separate process.

Registration loads uploaded files. Doing that in a child process keeps a crafted or broken upload from crashing
the server, and keeps the server's model threads the only ones that ever run PyTorch (an idle thread that once ran
PyTorch slows every later inference on another thread by about half on a small machine).

    python -m openmaas.registry.inspect FORMAT PATH   ->   prints the signature as JSON
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from openmaas.entities.tensors import Signature
from openmaas.errors import InvalidRequest
from openmaas.runtimes import RuntimeOptions, create_runtime

_TIMEOUT_S = 600


def without_paths(message: str, path: Path) -> str:
    """``message`` with the server's folders taken out of ``path`` (and of anything inside it): a client sees
    the name it uploaded, never where the server keeps it."""
    for p in sorted({path, path.resolve()}, key=lambda q: len(str(q)), reverse=True):
        message = message.replace(str(p.parent) + os.sep, "").replace(str(p.parent), "")
    return message


def inspect_in_process(fmt: str, path: Path, options: RuntimeOptions) -> Signature:
    """Load the model, read its signature, unload it; InvalidRequest if it does not load."""
    runtime = create_runtime(fmt, path, options)
    try:
        static = type(runtime).static_signature(path)
    except Exception as e:
        raise InvalidRequest(without_paths(f"the {fmt} model could not be read: {e}", path), param="file") from None
    if static is not None:
        return static
    try:
        runtime.load()
        return runtime.signature
    except Exception as e:
        raise InvalidRequest(without_paths(f"the {fmt} model could not be loaded: {e}", path), param="file") from None
    finally:
        runtime.unload()


def inspect_in_subprocess(fmt: str, path: Path, options: RuntimeOptions) -> Signature:
    """``inspect_in_process`` in a child Python process."""
    env = {**os.environ, "OPENMAAS_ONNX_THREADS": str(options.onnx_threads)}
    env["OPENMAAS_TORCH_THREADS"] = str(options.torch_threads)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "openmaas.registry.inspect", fmt, str(path)],
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise InvalidRequest(f"the {fmt} model took more than {_TIMEOUT_S} s to load", param="file") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"the loader exited with status {done.returncode}"
        if done.returncode < 0:
            reason = f"the loader crashed (signal {-done.returncode})"
        raise InvalidRequest(without_paths(reason.removeprefix("error: "), path), param="file")
    return Signature.model_validate_json(done.stdout)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m openmaas.registry.inspect FORMAT PATH", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    fmt, path = argv
    threads = int(os.environ.get("OPENMAAS_TORCH_THREADS", "1"))
    options = RuntimeOptions(onnx_threads=int(os.environ.get("OPENMAAS_ONNX_THREADS", "1")), torch_threads=threads)
    try:
        signature = inspect_in_process(fmt, Path(path), options)
    except InvalidRequest as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    print(signature.model_dump_json())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
