"""A model copy in a process of its own: a ``Runtime`` whose calls run in a child process over pipes.

Copies of a PyTorch model as threads of one process share its interpreter lock: a forward pass over a few
sentences is hundreds of small Python calls, so two copies as threads answered two clients at 15 ms each where one
took 7 ms (two processes take 10 ms each on one core), and the event loop's own work waited on the same lock. A
runtime class that sets ``own_process`` is served through ``ProcessRuntime``: the child loads the real runtime and
answers ``infer`` calls, one at a time, framed on its stdin and stdout (a JSON header, then raw array bytes: nothing
is pickled). The child exits when its stdin closes, so it goes with the server however the server ends; a child
that dies is started again, and a call that was in it is asked once more of the new one.

Run as ``python -m openmaas.runtimes.process FORMAT PATH OPTIONS_JSON``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson

from openmaas.entities.tensors import Signature
from openmaas.runtimes.base import Runtime, RuntimeOptions, RuntimeResult, process_rss
from openmaas.runtimes.conversion import use_cache

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("<I")
#: Library output that would only clutter the server's log (progress bars while loading weights).
_QUIET = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}


class ModelCopyLost(RuntimeError):
    """The copy's process ended during a call, and so did the one started to ask it again."""


# -- framing ----------------------------------------------------------------------------------------------------


def _pack(values: list[bytes | str]) -> bytes:
    """A BYTES tensor's items as one blob: their lengths (uint32), then their bytes."""
    raw = [v.encode() if isinstance(v, str) else bytes(v) for v in values]
    return np.array([len(r) for r in raw], dtype="<u4").tobytes() + b"".join(raw)


def _unpack(blob: bytes, count: int) -> np.ndarray:
    lengths = np.frombuffer(blob, dtype="<u4", count=count)
    out = np.empty(count, dtype=object)
    pos = 4 * count
    for i, n in enumerate(lengths.tolist()):
        out[i] = blob[pos : pos + n]
        pos += n
    return out


def encode_arrays(arrays: Mapping[str, np.ndarray]) -> tuple[list[dict[str, Any]], list[bytes]]:
    specs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in arrays.items():
        if array.dtype == object or array.dtype.kind in "SU":
            specs.append({"name": name, "dtype": "bytes", "shape": list(array.shape)})
            blobs.append(_pack(list(array.reshape(-1))))
        else:
            specs.append({"name": name, "dtype": array.dtype.str, "shape": list(array.shape)})
            blobs.append(np.ascontiguousarray(array).tobytes())
    return specs, blobs


def decode_arrays(specs: list[dict[str, Any]], blobs: list[bytes]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for spec, blob in zip(specs, blobs, strict=True):
        shape = tuple(spec["shape"])
        if spec["dtype"] == "bytes":
            out[spec["name"]] = _unpack(blob, int(np.prod(shape, dtype=np.int64))).reshape(shape)
        else:
            out[spec["name"]] = np.frombuffer(blob, dtype=np.dtype(spec["dtype"])).reshape(shape).copy()
    return out


def write_message(f: IO[bytes], header: dict[str, Any], blobs: Sequence[bytes] = ()) -> None:
    head = orjson.dumps({**header, "sizes": [len(b) for b in blobs]}, option=orjson.OPT_SERIALIZE_NUMPY)
    f.write(_LENGTH.pack(len(head)) + head)
    for b in blobs:
        f.write(b)
    f.flush()


def _exactly(f: IO[bytes], n: int) -> bytes:
    data = f.read(n)
    if data is None or len(data) != n:
        raise EOFError("the other end closed the pipe")
    return data


def read_message(f: IO[bytes]) -> tuple[dict[str, Any], list[bytes]]:
    (n,) = _LENGTH.unpack(_exactly(f, _LENGTH.size))
    header: dict[str, Any] = orjson.loads(_exactly(f, n))
    return header, [_exactly(f, size) for size in header.pop("sizes")]


# -- the parent's side ------------------------------------------------------------------------------------------


class ProcessRuntime(Runtime):
    """``inner`` (a runtime class) loaded and run in a child process; calls block the calling thread (the copy's
    own thread in the pool) while the child computes, and the child uses the threads ``set_threads`` last asked
    for. Its ``memory_bytes`` is the child's resident size after loading: what the copy costs the machine."""

    def __init__(self, inner: type[Runtime], path: Path, options: RuntimeOptions) -> None:
        super().__init__(path, options)
        self.inner = inner
        self.format = inner.format
        self.platform = inner.platform
        self.serves = inner.serves
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready: dict[str, Any] = {}
        self._signature: Signature | None = None
        self._threads = 1
        self._lock = threading.Lock()
        self._starting: subprocess.Popen[bytes] | None = None

    def begin_load(self) -> None:
        with self._lock:
            if self._starting is None:
                self._starting = self._spawn()

    def load(self) -> None:
        with self._lock:
            self._start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        options = orjson.dumps(dataclasses.asdict(self.options))
        env = {**os.environ, **_QUIET}
        proc = subprocess.Popen(
            [sys.executable, "-m", "openmaas.runtimes.process", self.inner.format, str(self.path), options],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        threading.Thread(target=_relay, args=(proc.stderr, proc.pid), daemon=True, name="openmaas-copy-log").start()
        return proc

    def _start(self) -> None:
        """The child begun by ``begin_load`` (or a new one), once it says it is ready."""
        proc = self._starting or self._spawn()
        self._starting = None
        assert proc.stdout is not None
        try:
            header, _ = read_message(proc.stdout)
        except EOFError:
            _stop(proc)
            raise RuntimeError(f"the model's process exited while loading (exit code {proc.returncode})") from None
        if header.get("op") == "error":
            _stop(proc)
            raise RuntimeError(header["message"])
        self._proc, self._ready = proc, header
        self._signature = Signature.model_validate(header["signature"])

    @property
    def signature(self) -> Signature:
        if self._signature is None:
            raise RuntimeError("the model is not loaded")
        return self._signature

    def set_threads(self, threads: int) -> None:
        self._threads = threads

    def infer(self, batch: Mapping[str, np.ndarray]) -> RuntimeResult:
        """The child's answer. A child found dead is started again first; one that dies during the call is started
        again and asked once more (inference has no side effects), and if that one dies too the call fails with
        ``ModelCopyLost``."""
        specs, blobs = encode_arrays(batch)
        with self._lock:
            for attempt in (1, 2):
                if self._proc is None or self._proc.poll() is not None:
                    if not self._ready:
                        raise RuntimeError("the model is not loaded")
                    log.warning("a model copy's process had exited; starting it again", extra={"format": self.format})
                    if self._proc is not None:
                        _stop(self._proc)
                    self._start()
                proc = self._proc
                assert proc is not None
                assert proc.stdin is not None
                assert proc.stdout is not None
                try:
                    write_message(proc.stdin, {"op": "infer", "threads": self._threads, "arrays": specs}, blobs)
                    header, out = read_message(proc.stdout)
                    break
                except (EOFError, OSError):
                    _stop(proc)
                    if attempt == 2:
                        raise ModelCopyLost(
                            f"the model copy's process ended during the call twice (exit code {proc.returncode})"
                        ) from None
        if header.get("op") == "error":
            raise RuntimeError(header["message"])
        arrays = decode_arrays(header["arrays"], out)
        tokens = arrays.pop("__tokens__", None)
        return RuntimeResult(outputs=arrays, tokens=tokens)

    def memory_bytes(self) -> int:
        return int(self._ready.get("rss_bytes", 0))

    def parameters(self) -> int | None:
        value = self._ready.get("parameters")
        return int(value) if value is not None else None

    def unload(self) -> None:
        with self._lock:
            for proc in (self._proc, self._starting):
                if proc is not None:
                    _stop(proc)
            self._starting = None
            self._proc, self._ready, self._signature = None, {}, None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Close the child's stdin (it exits at EOF); kill it if it has not gone within 10 s."""
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def _relay(stream: IO[bytes], pid: int) -> None:
    """The child's stderr into the server's log, a record a line."""
    for line in iter(stream.readline, b""):
        text = line.decode("utf-8", "replace").rstrip()
        if text:
            log.warning("model process: %s", text, extra={"pid": pid})
    stream.close()


# -- the child's side -------------------------------------------------------------------------------------------


def child(fmt: str, path: str, options_json: str) -> int:
    # The protocol owns the real stdout; anything a library prints goes to stderr (the server's log).
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    stdin = sys.stdin.buffer
    from openmaas.runtimes import runtime_class

    options = RuntimeOptions(**orjson.loads(options_json))
    use_cache(options.conversion_cache)
    runtime = runtime_class(fmt)(Path(path), options)
    try:
        runtime.load()
    except Exception as e:
        write_message(out, {"op": "error", "message": f"{type(e).__name__}: {e}"})
        return 1
    write_message(
        out,
        {
            "op": "ready",
            "signature": runtime.signature.model_dump(mode="json"),
            "rss_bytes": process_rss(),
            "parameters": runtime.parameters(),
        },
    )
    threads = 0
    while True:
        try:
            header, blobs = read_message(stdin)
        except EOFError:
            runtime.unload()
            return 0
        if header["threads"] != threads:
            threads = int(header["threads"])
            runtime.set_threads(threads)
        try:
            result = runtime.infer(decode_arrays(header["arrays"], blobs))
        except Exception as e:
            write_message(out, {"op": "error", "message": f"{type(e).__name__}: {e}"})
            continue
        arrays = dict(result.outputs)
        if result.tokens is not None:
            arrays["__tokens__"] = result.tokens
        specs, data = encode_arrays(arrays)
        write_message(out, {"op": "result", "arrays": specs}, data)


if __name__ == "__main__":
    sys.exit(child(sys.argv[1], sys.argv[2], sys.argv[3]))
