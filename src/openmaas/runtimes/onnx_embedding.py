"""Text embeddings from an ONNX encoder: a folder with ``model.onnx`` (the encoder with its pooling and
normalisation in the graph, e.g. int8-quantised by a compression job), the tokenizer (``tokenizer.json``) and
``openmaas_embedding.json`` (window, dimension, how it was made).

Served exactly like the sentence-transformers model it came from: input ``text`` BYTES [-1], output ``embedding``
FP32 [-1, dim], the same tokenizer and window, and the tokens each text used counted the same way (its attention
mask)."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from openmaas.entities.tensors import Signature, TensorSpec
from openmaas.runtimes.base import Runtime, RuntimeResult
from openmaas.runtimes.chunks import length_chunks
from openmaas.runtimes.onnx import onnx_parameters, start_onnxruntime
from openmaas.runtimes.sentence_transformers import HEAD_FILE

CONFIG_FILE = "openmaas_embedding.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
#: The fixed cost of one ONNX Runtime run in tokens' worth of work (see ``length_chunks``): measured on MiniLM int8,
#: one thread, batches of 16-32 sentences of 9-17 tokens: runs cut this way were 20-25% faster than one padded run,
#: and 4 to 32 were within the spread of each other.
RUN_TOKENS = 8


def is_onnx_embedding(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file() and (path / TOKENIZER_FILE).is_file()


@functools.lru_cache(maxsize=256)
def _config(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((path / CONFIG_FILE).read_text())
    return loaded


class OnnxEmbeddingRuntime(Runtime):
    format = "onnx-embedding"
    serves = "embedding"
    platform = "onnxruntime_onnx"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._session: Any = None
        #: A session with ``torch_threads`` intra-op threads for a batch that runs alone (see ``set_threads``).
        self._wide: Any = None
        self._threads = 1
        self._tokenizer: Any = None
        self._inputs: list[str] = []
        self._head: Any = None
        self._window = 0
        self._dim = 0

    @classmethod
    def static_signature(cls, path: Path) -> Signature | None:
        return _signature(int(_config(path)["dimension"]), _head_classes(path))

    @classmethod
    def token_estimate(cls, batch: Mapping[str, np.ndarray], path: Path) -> tuple[int, int] | None:
        """As the sentence-transformers runtime: about 4 bytes a token, at most one a byte, at most the window."""
        text = batch.get("text")
        if text is None:
            return None
        window = int(_config(path)["max_seq_length"])
        items = text.reshape(-1)
        return (
            int(sum(min(len(t) // 4 + 2, window) for t in items)),
            int(sum(min(len(t) + 2, window) for t in items)),
        )

    @classmethod
    def _set_up(cls) -> None:
        start_onnxruntime()

    def load(self) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        config = _config(self.path)
        self._window = int(config["max_seq_length"])
        self._dim = int(config["dimension"])
        tokenizer = Tokenizer.from_file(str(self.path / TOKENIZER_FILE))
        tokenizer.enable_truncation(self._window)
        tokenizer.enable_padding(pad_id=int(config.get("pad_token_id", 0)))
        session = self._new_session(self.options.onnx_threads)
        wide = self.options.torch_threads
        if wide > self.options.onnx_threads:
            # Its own thread pool, used only while the copy runs alone (under load every batch runs on the narrow
            # one). Its threads spin between the graph's operators as ONNX Runtime's do by default: without spinning
            # each operator woke them again, and a lone sentence took about 0.8 ms longer (MiniLM int8, AVX2).
            self._wide = self._new_session(wide)
        self._inputs = [i.name for i in session.get_inputs()]
        if (self.path / HEAD_FILE).is_file():  # a text classifier: the head trained on these embeddings
            head_opts = ort.SessionOptions()
            head_opts.intra_op_num_threads = 1
            self._head = ort.InferenceSession(str(self.path / HEAD_FILE), head_opts, providers=["CPUExecutionProvider"])
        self._tokenizer, self._session = tokenizer, session

    def _new_session(self, threads: int) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        return ort.InferenceSession(str(self.path / MODEL_FILE), opts, providers=["CPUExecutionProvider"])

    def set_threads(self, threads: int) -> None:
        """A batch the pool runs alone (``CoreShare``) uses the wide session: a lone sentence's matrix products on
        every core, as the library's own single-sentence call does."""
        self._threads = threads

    @property
    def signature(self) -> Signature:
        return _signature(self._dim or int(_config(self.path)["dimension"]), _head_classes(self.path))

    def embed(self, texts: list[str], max_batch_tokens: int = 16384) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings (N, dim) and the tokens each text used; texts run longest first, cut into runs of similar
        lengths (``length_chunks``) whose padded size stays within ``max_batch_tokens``."""
        session = self._wide if self._threads > 1 and self._wide is not None else self._session
        if session is None:
            raise RuntimeError("the ONNX embedding model is not loaded")
        encoded = self._tokenizer.encode_batch(texts)  # padded on the right to the longest of all
        columns = {
            "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encoded], dtype=np.int64),
        }
        lengths = columns["attention_mask"].sum(axis=1)
        out = np.empty((len(texts), self._dim), dtype=np.float32)
        for idx in length_chunks(lengths, RUN_TOKENS, max_batch_tokens):
            width = int(lengths[idx[0]])
            out[idx] = session.run(None, {k: columns[k][idx, :width] for k in self._inputs})[0]
        return out, lengths

    def infer(self, batch: Mapping[str, np.ndarray]) -> RuntimeResult:
        texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in batch["text"].reshape(-1)]
        embeddings, tokens = self.embed(texts)
        outputs = {"embedding": embeddings}
        if self._head is not None:
            probabilities, label = self._head.run(None, {"x": embeddings})
            outputs.update(probabilities=probabilities, label=label)
        return RuntimeResult(outputs=outputs, tokens=tokens)

    def memory_bytes(self) -> int:
        return (self.path / MODEL_FILE).stat().st_size * (2 if self._wide is not None else 1)

    def parameters(self) -> int | None:
        head = onnx_parameters(self.path / HEAD_FILE) if (self.path / HEAD_FILE).is_file() else 0
        return onnx_parameters(self.path / MODEL_FILE) + head

    def unload(self) -> None:
        self._session = None
        self._wide = None
        self._head = None
        self._tokenizer = None


@functools.lru_cache(maxsize=256)
def _head_classes(path: Path) -> int | None:
    """Classes the folder's classifier head scores (None: an encoder alone)."""
    head = path / HEAD_FILE
    if not head.is_file():
        return None
    import onnx

    output = onnx.load(str(head), load_external_data=False).graph.output[0]
    return int(output.type.tensor_type.shape.dim[1].dim_value)


def _signature(dim: int, classes: int | None = None) -> Signature:
    outputs = [TensorSpec(name="embedding", datatype="FP32", shape=[-1, dim])]
    if classes is not None:
        outputs += [
            TensorSpec(name="probabilities", datatype="FP32", shape=[-1, classes]),
            TensorSpec(name="label", datatype="INT64", shape=[-1]),
        ]
    return Signature(inputs=[TensorSpec(name="text", datatype="BYTES", shape=[-1])], outputs=outputs)
