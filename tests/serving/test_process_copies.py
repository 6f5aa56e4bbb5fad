"""Model copies in processes of their own (runtimes/process.py): the same answers as in the server's process, a
copy whose process dies is started again, and a child never outlives the process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from openmaas.catalogue.minilm import model_dir
from openmaas.runtimes import RuntimeOptions, create_runtime, process
from openmaas.runtimes.process import ModelCopyLost, ProcessRuntime, decode_arrays, encode_arrays
from openmaas.runtimes.sentence_transformers import SentenceTransformerRuntime

TEXTS = np.array(["A cat sits on the mat.", "Ünïcödé tëxt, ✓ and 漢字", "x" * 3000], dtype=object)


def test_arrays_cross_the_pipe_unchanged() -> None:
    arrays = {
        "text": np.array([b"bytes", "str \u00e9", b"", "\x00nul"], dtype=object).reshape(2, 2),
        "x": np.arange(12, dtype=np.float32).reshape(3, 4),
        "ids": np.array([1, -2, 3], dtype=np.int64),
        "empty": np.zeros((0, 5), dtype=np.float64),
    }
    specs, blobs = encode_arrays(arrays)
    back = decode_arrays(specs, blobs)
    assert back["text"].tolist() == [[b"bytes", "str \u00e9".encode()], [b"", b"\x00nul"]]
    for name in ("x", "ids", "empty"):
        assert back[name].dtype == arrays[name].dtype and back[name].shape == arrays[name].shape
        np.testing.assert_array_equal(back[name], arrays[name])
        assert back[name].flags.writeable


def test_only_formats_that_ask_for_it_get_a_process_and_only_when_allowed(tmp_path: object) -> None:
    assert isinstance(create_runtime("sentence-transformers", model_dir(), RuntimeOptions(copy_processes=True)),
                      ProcessRuntime)  # fmt: skip
    assert isinstance(
        create_runtime("sentence-transformers", model_dir(), RuntimeOptions()), SentenceTransformerRuntime
    )
    assert not isinstance(create_runtime("onnx", model_dir(), RuntimeOptions(copy_processes=True)), ProcessRuntime)


@pytest.fixture(scope="module")
def copies() -> tuple[ProcessRuntime, SentenceTransformerRuntime]:
    options = RuntimeOptions(torch_threads=1, copy_processes=True)
    remote = create_runtime("sentence-transformers", model_dir(), options)
    assert isinstance(remote, ProcessRuntime)
    remote.load()
    local = SentenceTransformerRuntime(model_dir(), options)
    local.load()
    yield remote, local
    remote.unload()


def test_a_copy_in_its_own_process_answers_like_one_in_the_servers(
    copies: tuple[ProcessRuntime, SentenceTransformerRuntime],
) -> None:
    remote, local = copies
    assert remote.signature == local.signature
    assert remote.parameters() == local.parameters()
    assert remote.memory_bytes() > 50 << 20  # the child's resident size (the model and its libraries)
    for threads in (1, 2):
        remote.set_threads(threads)
        got, want = remote.infer({"text": TEXTS}), local.infer({"text": TEXTS})
        np.testing.assert_allclose(got.outputs["embedding"], want.outputs["embedding"], atol=1e-5)
        assert got.tokens is not None and want.tokens is not None
        assert got.tokens.tolist() == want.tokens.tolist()


def test_a_copy_whose_process_dies_is_started_again_and_the_call_asked_once_more(
    copies: tuple[ProcessRuntime, SentenceTransformerRuntime], monkeypatch: pytest.MonkeyPatch
) -> None:
    remote, local = copies
    want = local.infer({"text": TEXTS[:1]}).outputs["embedding"]
    assert remote._proc is not None
    first = remote._proc.pid
    os.kill(first, signal.SIGKILL)
    remote._proc.wait(10)
    # Found dead before the call: started again, and the call is answered.
    np.testing.assert_allclose(remote.infer({"text": TEXTS[:1]}).outputs["embedding"], want, atol=1e-5)
    second = remote._proc.pid
    assert second != first
    # Dying during a call: a new process answers it.
    remote._proc.stdin = _KillOnWrite(remote._proc)  # type: ignore[assignment]
    np.testing.assert_allclose(remote.infer({"text": TEXTS[:1]}).outputs["embedding"], want, atol=1e-5)
    assert remote._proc.pid not in (first, second)
    # A call that every process dies of fails, after one more try; the copy still serves the next call.
    real = process.write_message

    def kill_first(f: object, header: dict, blobs: object = ()) -> None:
        if header.get("op") == "infer":
            assert remote._proc is not None
            remote._proc.kill()
            remote._proc.wait(10)
        real(f, header, blobs)  # type: ignore[arg-type]

    monkeypatch.setattr(process, "write_message", kill_first)
    with pytest.raises(ModelCopyLost, match="ended during the call twice"):
        remote.infer({"text": TEXTS[:1]})
    monkeypatch.undo()
    np.testing.assert_allclose(remote.infer({"text": TEXTS[:1]}).outputs["embedding"], want, atol=1e-5)


class _KillOnWrite:
    """A stdin that kills the child on the first write, as a crash in the middle of a call would."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.real = proc.stdin

    def write(self, data: bytes) -> int:
        self.proc.kill()
        self.proc.wait(10)
        assert self.real is not None
        self.real.write(data)
        return len(data)

    def flush(self) -> None:
        assert self.real is not None
        self.real.flush()

    def close(self) -> None:
        assert self.real is not None
        self.real.close()


def test_the_child_goes_when_its_parent_is_killed() -> None:
    script = (
        "from openmaas.catalogue.minilm import model_dir\n"
        "from openmaas.runtimes import RuntimeOptions, create_runtime\n"
        "r = create_runtime('sentence-transformers', model_dir(), RuntimeOptions(copy_processes=True))\n"
        "r.load()\n"
        "print(r._proc.pid, flush=True)\n"
        "import time; time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        os.kill(child, 0)  # running
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 15
        while _alive(child):
            assert time.monotonic() < deadline, "the model's process outlived the server"
            time.sleep(0.1)
    finally:
        parent.kill()
        parent.wait(10)
        if parent.stdout is not None:
            parent.stdout.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
