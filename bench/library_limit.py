"""The physical limit for embeddings: the libraries themselves (plain ``SentenceTransformer.encode``, or tokenizers
and ONNX Runtime for an int8 ONNX encoder; not the project's runtimes), in the best use of the cores, measured in
worker processes of their own.

Two layouts are kept loaded side by side: one process using every core, and one single-threaded process per core
(run together and summed). ``sweep`` finds each layout's best batch size; ``limit`` measures both again at their
best and returns the higher, so each level of a benchmark can be bracketed by it (this machine's speed drifts by
10-20% over minutes). ``single_times`` is the latency of one sentence per call in the all-cores process.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from harness import percentile


def _sentence_transformers(threads: int) -> Callable[[list[str]], object]:
    import torch
    from sentence_transformers import SentenceTransformer

    from openmaas.catalogue.minilm import model_dir

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(model_dir()), device="cpu", local_files_only=True)
    return lambda batch: model.encode(batch, batch_size=len(batch))


def _onnx_folder(folder: str, threads: int) -> Callable[[list[str]], object]:
    """An int8 ONNX encoder folder (model.onnx, tokenizer.json, its config) with the libraries alone: the
    tokenizers library pads and truncates, ONNX Runtime runs the graph (pooling and normalising are in it)."""
    import json

    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    root = Path(folder)
    config = json.loads((root / "openmaas_embedding.json").read_text())
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    tokenizer.enable_truncation(int(config["max_seq_length"]))
    tokenizer.enable_padding(pad_id=int(config.get("pad_token_id", 0)))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(root / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def encode(batch: list[str]) -> object:
        encoded = tokenizer.encode_batch(batch)
        feeds = {
            "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encoded], dtype=np.int64),
        }
        return session.run(None, {k: feeds[k] for k in names})[0]

    return encode


def _worker(conn: Connection, threads: int, texts: list[str], folder: str | None) -> None:
    encode = _onnx_folder(folder, threads) if folder else _sentence_transformers(threads)
    encode(texts[:8])
    conn.send("ready")
    n = len(texts)
    while True:
        command = conn.recv()
        if command[0] == "stop":
            return
        if command[0] == "run":
            _, batch, seconds, start_at = command
            time.sleep(max(0.0, start_at - time.time()))
            i, done = 0, 0
            started = time.perf_counter()
            while time.perf_counter() - started < seconds:
                encode([texts[(i + k) % n] for k in range(batch)])
                i, done = (i + batch) % n, done + batch
            conn.send((done, time.perf_counter() - started))
        elif command[0] == "single":
            times = []
            for k in range(command[1]):
                t0 = time.perf_counter()
                encode([texts[k % n]])
                times.append(time.perf_counter() - t0)
            conn.send(times)


class LibraryLimit:
    """Worker processes holding the model: ``1x{cores}t`` (one process, every core) and ``{cores}x1t``. The model
    is the bundled MiniLM through sentence-transformers, or with ``folder`` an ONNX encoder folder (the int8 model
    a quantisation job makes) through tokenizers and ONNX Runtime."""

    def __init__(self, texts: list[str], cores: int, folder: Path | None = None) -> None:
        self.cores = cores
        ctx = mp.get_context("spawn")
        shapes = {f"1x{cores}t": [cores]}
        if cores > 1:
            shapes[f"{cores}x1t"] = [1] * cores
        self.layouts: dict[str, list[tuple[Any, Connection]]] = {}
        for name, threads in shapes.items():
            procs = []
            for t in threads:
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker, args=(child, t, texts, str(folder) if folder else None), daemon=True)
                p.start()
                procs.append((p, parent))
            self.layouts[name] = procs
        for procs in self.layouts.values():
            for _, conn in procs:
                assert conn.recv() == "ready"
        self.best_batch: dict[str, int] = {}
        self.by_config: dict[str, float] = {}

    def _run(self, layout: str, batch: int, seconds: float) -> float:
        """Sentences/s of the layout's processes running together, summed."""
        start_at = time.time() + 0.05
        for _, conn in self.layouts[layout]:
            conn.send(("run", batch, seconds, start_at))
        return sum(done / elapsed for done, elapsed in (conn.recv() for _, conn in self.layouts[layout]))

    def sweep(self, seconds: float) -> dict[str, object]:
        for layout in self.layouts:
            best = -1.0
            for batch in (8, 32, 64, 128):
                rate = self._run(layout, batch, seconds / 8)
                self.by_config[f"{layout}@{batch}"] = rate
                if rate > best:
                    best, self.best_batch[layout] = rate, batch
        top = max(self.by_config, key=lambda k: self.by_config[k])
        return {
            "by_config": self.by_config,
            "best": top,
            "limit": self.by_config[top],
            "single_p50_ms": 1000 * percentile(self.single_times(200), 50),
        }

    def limit(self, seconds: float) -> float:
        """The higher of the layouts at their best batch sizes now (``seconds`` each)."""
        return max(self._run(layout, batch, seconds) for layout, batch in self.best_batch.items())

    def single_times(self, calls: int) -> list[float]:
        """Seconds per call of one sentence in the process that uses every core."""
        _, conn = self.layouts[f"1x{self.cores}t"][0]
        conn.send(("single", calls))
        times: list[float] = conn.recv()
        return times

    def close(self) -> None:
        for procs in self.layouts.values():
            for p, conn in procs:
                conn.send(("stop",))
                p.join(10)
