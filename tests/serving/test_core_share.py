"""Model copies and their threads: a lone request gets every core, and whichever copy takes it, the process holds
one OpenMP team of several threads (a second team made GNU OpenMP stop spinning, and a lone embedding request then
took twice as long for as long as the process lived)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from openmaas.entities.tensors import Signature, TensorSpec
from openmaas.runtimes import RuntimeOptions
from openmaas.runtimes.base import Runtime, RuntimeResult
from openmaas.serving.pool import CoreShare, Instance


class Recording(Runtime):
    """Records the thread and the thread count of every call."""

    threads_follow_caller = True

    def __init__(self, calls: list[tuple[str, int, int]], label: str) -> None:
        super().__init__(Path("."), RuntimeOptions())
        self.calls = calls
        self.label = label
        self.threads = 0

    def load(self) -> None:
        return None

    @property
    def signature(self) -> Signature:
        return Signature(inputs=[TensorSpec(name="x", datatype="FP32", shape=[-1])], outputs=[])

    def set_threads(self, threads: int) -> None:
        self.threads = threads

    def infer(self, batch: Mapping[str, np.ndarray]) -> RuntimeResult:
        self.calls.append((self.label, threading.get_ident(), self.threads))
        time.sleep(0.05)
        return RuntimeResult(outputs={})

    def memory_bytes(self) -> int:
        return 0

    def unload(self) -> None:
        return None


def _own_thread(executor: ThreadPoolExecutor) -> int:
    return executor.submit(threading.get_ident).result()


def test_every_multi_threaded_call_runs_on_one_thread_whichever_copy_takes_it() -> None:
    calls: list[tuple[str, int, int]] = []
    cores = CoreShare(2)
    executors = [ThreadPoolExecutor(1), ThreadPoolExecutor(1)]
    copies = [Instance(Recording(calls, f"copy{i}"), executors[i], cores) for i in range(2)]
    own = {f"copy{i}": _own_thread(e) for i, e in enumerate(executors)}
    x = {"x": np.ones(1, np.float32)}

    async def scenario() -> None:
        await copies[0].infer(x)  # alone: every core
        await copies[1].infer(x)  # alone too, on the other copy
        await asyncio.gather(copies[0].infer(x), copies[1].infer(x))  # both busy
        await copies[1].infer(x)

    try:
        asyncio.run(scenario())
    finally:
        cores.close()
        for e in executors:
            e.shutdown()
    wide = {ident for _, ident, threads in calls if threads > 1}
    assert len(wide) == 1, calls  # one thread runs every multi-threaded call, for both copies
    assert wide.isdisjoint(own.values())
    assert [label for label, _, threads in calls if threads > 1] == ["copy0", "copy1", "copy0", "copy1"]
    for label, ident, threads in calls:
        if ident == own[label]:
            assert threads == 1, calls  # a copy's own thread never runs a team of several
    assert sum(1 for _, _, threads in calls if threads == 1) == 1  # the second of the concurrent pair


def _threads_of_this_process() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or (os.cpu_count() or 1) < 2, reason="Linux, 2+ cores")
def test_two_real_copies_that_each_ran_alone_leave_one_openmp_team() -> None:
    """sentence-transformers copies on a real PyTorch: each copy runs a lone batch (every core), and the process
    gains the threads of one OpenMP team, not one team per copy."""
    from openmaas.catalogue.minilm import model_dir
    from openmaas.runtimes.sentence_transformers import SentenceTransformerRuntime

    cores = CoreShare(2)
    executors = [ThreadPoolExecutor(1), ThreadPoolExecutor(1)]
    copies = []
    for e in executors:
        runtime = SentenceTransformerRuntime(model_dir(), RuntimeOptions(torch_threads=2))
        e.submit(runtime.load).result()
        copies.append(Instance(runtime, e, cores))
    texts = {"text": np.array([b"A cat sits on the mat near the door of the house."] * 4, dtype=object)}

    async def alone(i: int) -> None:
        for _ in range(3):
            await copies[i].infer(texts)

    try:
        asyncio.run(alone(0))
        after_first = _threads_of_this_process()
        asyncio.run(alone(1))
        after_second = _threads_of_this_process()
        asyncio.run(alone(0))
        assert _threads_of_this_process() == after_first == after_second
    finally:
        cores.close()
        for e in executors:
            e.shutdown()
