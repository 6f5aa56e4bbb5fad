"""How the embedding runtimes cut a batch of texts into model runs (``runtimes/chunks.py``), on the real MiniLM:
by length, so short texts do not pay for a long one's padding, with the same embeddings as the library; and the
ONNX encoder's lone batch on every core."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from openmaas.runtimes import RuntimeOptions
from openmaas.runtimes.chunks import length_chunks
from openmaas.serving.pool import CoreShare, Instance

# One sentence a text, 9 to 17 word pieces, as the embeddings benchmark sends, and one past the 256-token window.
WORDS = [
    "the",
    "a",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "river",
    "mountain",
    "quarterly",
    "report",
    "finance",
    "meeting",
]
TEXTS = [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(5 + i % 9)) + "." for i in range(24)]
TEXTS += ["word " * 400]


def test_runs_cover_every_text_once_longest_first_and_pad_less_than_one_run() -> None:
    lengths = np.random.default_rng(0).integers(9, 18, 32)
    runs = length_chunks(lengths, run_tokens=8, max_batch_tokens=16384)
    assert sorted(np.concatenate(runs).tolist()) == list(range(32))
    widths = [int(lengths[r].max()) for r in runs]
    assert widths == sorted(widths, reverse=True) and all(lengths[r[0]] == w for r, w in zip(runs, widths, strict=True))
    padded = sum(len(r) * w for r, w in zip(runs, widths, strict=True))
    assert 1 < len(runs) < len(set(lengths.tolist()))  # neither one padded run nor one run a length
    assert padded + 8 * len(runs) < 32 * int(lengths.max()) + 8


def test_runs_of_one_length_stay_together_and_within_the_token_limit() -> None:
    assert [len(r) for r in length_chunks(np.full(40, 12), 8, 16384)] == [40]
    assert [len(r) for r in length_chunks(np.full(100, 256), 8, 16384)] == [50, 50]
    assert [r.tolist() for r in length_chunks(np.array([600, 3]), 8, 512)] == [[0], [1]]
    assert length_chunks(np.array([], dtype=np.int64), 8, 16384) == []


class _Recording:
    """Delegates to a model or session and records the [rows, width] of each run."""

    def __init__(self, inner: Any) -> None:
        self._inner, self.shapes = inner, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, features: dict[str, Any]) -> Any:
        self.shapes.append(tuple(features["input_ids"].shape))
        return self._inner(features)

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> Any:
        self.shapes.append(feeds["input_ids"].shape)
        return self._inner.run(outputs, feeds)


def _padded(shapes: list[tuple[int, int]]) -> int:
    return sum(rows * width for rows, width in shapes)


@pytest.fixture(scope="module")
def torch_runtime(minilm_dir: Path) -> Iterator[Any]:
    from openmaas.runtimes.sentence_transformers import SentenceTransformerRuntime

    runtime = SentenceTransformerRuntime(minilm_dir, RuntimeOptions())
    runtime.load()
    yield runtime
    runtime.unload()


def test_sentence_transformers_runs_by_length_match_the_library(torch_runtime: Any, minilm_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_dir), device="cpu", local_files_only=True).encode(TEXTS)
    model = torch_runtime._model
    torch_runtime._model = recording = _Recording(model)
    try:
        got, tokens = torch_runtime.embed(TEXTS)
    finally:
        torch_runtime._model = model
    np.testing.assert_allclose(got, reference, atol=2e-5)
    assert tokens[-1] == 256 and tokens.tolist() == [min(len(model.tokenizer(t)["input_ids"]), 256) for t in TEXTS]
    # The long text runs alone; the sentences in runs of their own lengths, not padded to 256 or to their longest.
    assert recording.shapes[0] == (1, 256) and len(recording.shapes) > 2
    assert _padded(recording.shapes[1:]) < (len(TEXTS) - 1) * int(tokens[:-1].max())


def test_a_tokenizer_that_pads_on_the_left_keeps_its_texts_tokens(torch_runtime: Any, minilm_dir: Path) -> None:
    """Runs cut their columns on the side the tokenizer pads: a short text run alone is the text alone."""
    tokenizer = torch_runtime._model.tokenizer
    texts = ["Short one.", "A much longer sentence " * 12]
    alone = [torch_runtime.embed([t])[0][0] for t in texts]
    tokenizer.padding_side = "left"
    try:
        got, _ = torch_runtime.embed(texts)
    finally:
        tokenizer.padding_side = "right"
    np.testing.assert_allclose(got, np.stack(alone), atol=2e-5)


@pytest.fixture(scope="module")
def onnx_folder(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    from openmaas.compression.quantize import export_encoder

    folder = tmp_path_factory.mktemp("onnx-embedding")
    export_encoder(minilm_dir, folder)
    return folder


def test_onnx_encoder_runs_by_length_and_a_lone_batch_on_every_core(onnx_folder: Path) -> None:
    from openmaas.runtimes.onnx_embedding import OnnxEmbeddingRuntime

    runtime = OnnxEmbeddingRuntime(onnx_folder, RuntimeOptions(onnx_threads=1, torch_threads=2))
    runtime.load()
    try:
        narrow, wide = _Recording(runtime._session), _Recording(runtime._wide)
        runtime._session, runtime._wide = narrow, wide
        one_by_one = np.concatenate([runtime.embed([t])[0] for t in TEXTS])
        calls = len(narrow.shapes)
        got, tokens = runtime.embed(TEXTS)
        np.testing.assert_allclose(got, one_by_one, atol=1e-5)
        runs = narrow.shapes[calls:]
        assert runs[0] == (1, 256) and len(runs) > 2
        assert _padded(runs[1:]) < (len(TEXTS) - 1) * int(tokens[:-1].max())
        assert wide.shapes == []

        # Through the pool: a copy alone runs its batch on the session with every core, then on its own again
        # while another copy is busy.
        cores, executor = CoreShare(2), ThreadPoolExecutor(1)
        copy = Instance(runtime, executor, cores)
        batch = {"text": np.array([t.encode() for t in TEXTS[:4]], dtype=object)}
        try:
            alone = asyncio.run(copy.infer(batch))
            assert len(wide.shapes) >= 1 and wide._inner.get_session_options().intra_op_num_threads == 2
            cores.begin()  # another copy is busy
            beside = asyncio.run(copy.infer(batch))
            cores.end()
        finally:
            executor.shutdown()
        np.testing.assert_allclose(alone.outputs["embedding"], beside.outputs["embedding"], atol=1e-5)
        assert narrow.shapes[-1][0] <= 4 and len(narrow.shapes) > len(runs) + calls
    finally:
        runtime.unload()


def test_no_second_session_when_the_copy_may_use_one_thread_only(onnx_folder: Path) -> None:
    from openmaas.runtimes.onnx_embedding import OnnxEmbeddingRuntime

    runtime = OnnxEmbeddingRuntime(onnx_folder, RuntimeOptions(onnx_threads=1, torch_threads=1))
    runtime.load()
    try:
        assert runtime._wide is None
        runtime.set_threads(2)
        assert runtime.embed(TEXTS[:3])[0].shape == (3, 384)
        assert runtime.memory_bytes() == (onnx_folder / "model.onnx").stat().st_size
    finally:
        runtime.unload()
