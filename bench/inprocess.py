"""The in-process limit: the runtime the server uses, called directly at its best batch size (no HTTP)."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from harness import in_new_thread, percentile


def throughput(
    runners: list[object], call: object, batch: int, seconds: float, items: int, intra_op: int | None = None
) -> float:
    """Items/s with every runner driven by its own thread at ``batch`` items per call (``intra_op``
    threads each: PyTorch's thread count is a setting of the calling thread, as in the server's copies)."""
    counts = [0] * len(runners)
    stop = time.perf_counter() + seconds

    def drive(k: int) -> None:
        i = k * 997
        if intra_op is not None:
            runners[k].set_threads(intra_op)  # type: ignore[attr-defined]
        call(runners[k], i, batch)  # type: ignore[operator]
        while time.perf_counter() < stop:
            call(runners[k], i, batch)  # type: ignore[operator]
            counts[k] += batch
            i = (i + batch) % items

    started = time.perf_counter()
    threads = [threading.Thread(target=drive, args=(k,)) for k in range(len(runners))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - started)


def summary(by_config: dict[str, float], single_s: list[float]) -> dict[str, object]:
    """Throughput by configuration, the best of them (the in-process limit), and single-call latency."""
    best = max(by_config, key=lambda k: by_config[k])
    return {
        "by_config": by_config,
        "best": best,
        "limit": by_config[best],
        "single_p50_ms": 1000 * percentile(single_s, 50),
    }


class InProcessEmbeddings:
    """The runtime's best throughput without HTTP, over batch sizes and two ways to use the cores: one copy with
    ``cores`` threads, or ``cores`` single-threaded copies side by side (what the server does by default).

    ``sweep`` finds each layout's best batch size once; ``limit`` measures every layout again at its best batch
    and returns the highest, so each HTTP level can be bracketed by in-process measurements taken just before
    and after it (this machine's speed drifts by 10-20% over minutes, more than the effects being measured, and
    a sweep in a noisy moment can rank the layouts wrongly)."""

    def __init__(self, texts: list[str], cores: int) -> None:
        self.texts = texts
        self.cores = cores
        #: Per layout (copies x threads): its runners, best batch size and threads per copy.
        self.layouts: dict[str, tuple[list[object], int, int]] = {}
        self.by_config: dict[str, float] = {}
        self._single = in_new_thread(lambda: self._make(cores))

    def _make(self, threads: int) -> object:
        from openmaas.catalogue.minilm import model_dir
        from openmaas.runtimes import RuntimeOptions
        from openmaas.runtimes.sentence_transformers import SentenceTransformerRuntime

        rt = SentenceTransformerRuntime(model_dir(), RuntimeOptions(onnx_threads=threads, torch_threads=threads))
        rt.load()
        return rt

    def _call(self, rt: object, i: int, batch: int) -> None:
        rt.embed([self.texts[(i + k) % len(self.texts)] for k in range(batch)])  # type: ignore[attr-defined]

    def sweep(self, seconds: float) -> dict[str, object]:
        configs = [(1, self.cores), (self.cores, 1)] if self.cores > 1 else [(1, 1)]
        for copies, threads in configs:
            # Each configuration in a thread of its own making, so thread pools do not carry over between them.
            runners = in_new_thread(lambda c=copies, t=threads: [self._make(t) for _ in range(c)])
            layout_best = -1.0
            for batch in (8, 32, 64, 128):
                name = f"{copies}x{threads}t@{batch}"
                self.by_config[name] = throughput(runners, self._call, batch, seconds / 8, len(self.texts), threads)
                if self.by_config[name] > layout_best:
                    layout_best = self.by_config[name]
                    self.layouts[f"{copies}x{threads}t"] = (runners, batch, threads)
        return summary(self.by_config, self.single_times(200))

    def limit(self, seconds: float) -> float:
        """The highest throughput now of the layouts at their best batch sizes (``seconds`` each)."""
        return max(
            throughput(runners, self._call, batch, seconds, len(self.texts), threads)
            for runners, batch, threads in self.layouts.values()
        )

    def single_p50_ms(self, calls: int = 200) -> float:
        """Median latency of one sentence on one copy using every core (what the server does at C=1)."""
        return 1000 * percentile(self.single_times(calls), 50)

    def single_times(self, calls: int) -> list[float]:
        """Seconds per call of ``calls`` single-sentence calls."""
        times: list[float] = []

        def run() -> None:
            self._single.set_threads(self.cores)  # type: ignore[attr-defined]
            for k in range(calls):
                t0 = time.perf_counter()
                self._call(self._single, k, 1)
                times.append(time.perf_counter() - t0)

        in_new_thread(run)
        return times


def in_process_digits(seconds: float, threads: int) -> dict[str, object]:
    import onnxruntime as ort

    from openmaas.catalogue.digits import build

    with tempfile.TemporaryDirectory() as tmp:
        path, _card = build(Path(tmp))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).integers(0, 17, (256, 1, 8, 8)).astype(np.float32)
        by_batch = {}
        for batch in (1, 16, 64, 256):
            done = 0
            started = time.perf_counter()
            while time.perf_counter() - started < seconds / 4:
                session.run(None, {"image": x[:batch]})
                done += batch
            by_batch[batch] = done / (time.perf_counter() - started)
        single = []
        for _ in range(500):
            t0 = time.perf_counter()
            session.run(None, {"image": x[:1]})
            single.append(time.perf_counter() - t0)
    return summary({f"1x{threads}t@{b}": v for b, v in by_batch.items()}, single)
