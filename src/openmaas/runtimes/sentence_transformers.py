"""sentence-transformers: text embeddings from a Hugging Face / sentence-transformers folder (safetensors)."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from openmaas.entities.tensors import Signature, TensorSpec
from openmaas.runtimes.base import Runtime, RuntimeResult, route_library_logs
from openmaas.runtimes.chunks import length_chunks

HEAD_FILE = "openmaas_head.onnx"
#: The window when a folder does not name one (BERT-style encoders read at most 512 tokens).
DEFAULT_WINDOW = 512
#: The fixed cost of one forward pass in tokens' worth of work (see ``length_chunks``): a PyTorch call over the
#: encoder's modules costs more than an ONNX Runtime run; on MiniLM, one thread, batches of 32 sentences of 9-17
#: tokens, cutting this way was about 10% faster than one padded pass (8 and 16 within the spread of each other).
RUN_TOKENS = 16
#: Texts tokenised in one call (padded to the longest of them), so a job embedding a whole dataset stays bounded.
_TOKENISE_AT_ONCE = 1024


@functools.lru_cache(maxsize=256)
def window_of(path: Path) -> int:
    """The most tokens the model folder at ``path`` reads of one text (``max_seq_length`` of its
    ``sentence_bert_config.json``; 512 when it names none)."""
    try:
        configured = json.loads((path / "sentence_bert_config.json").read_text()).get("max_seq_length")
    except (OSError, ValueError, AttributeError):
        return DEFAULT_WINDOW
    return int(configured) if isinstance(configured, int) and configured > 0 else DEFAULT_WINDOW


class SentenceTransformerRuntime(Runtime):
    """Input ``text`` BYTES [-1]; output ``embedding`` FP32 [-1, dim]; counts the tokens each text used.

    A folder that also holds ``openmaas_head.onnx`` (a classifier trained on these embeddings by a
    text-classification job) adds its outputs: ``probabilities`` FP32 [-1, classes] and ``label`` INT64 [-1]."""

    format = "sentence-transformers"
    serves = "embedding"
    platform = "sentence_transformers"
    threads_follow_caller = True
    own_process = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._model: Any = None
        self._signature: Signature | None = None
        self._head: Any = None

    @classmethod
    def token_estimate(cls, batch: Mapping[str, np.ndarray], path: Path) -> tuple[int, int] | None:
        """About 4 bytes a token, at most one token a byte; the model reads at most its window of each text
        (longer ones are truncated), so no text counts for more than that."""
        text = batch.get("text")
        if text is None:
            return None
        window = window_of(path)
        items = text.reshape(-1)
        return (
            int(sum(min(len(t) // 4 + 2, window) for t in items)),
            int(sum(min(len(t) + 2, window) for t in items)),
        )

    def load(self) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        route_library_logs()
        torch.set_num_threads(1)  # the copy's own thread never runs an OpenMP team (threads_follow_caller)
        model = SentenceTransformer(str(self.path), device="cpu", local_files_only=True)
        model.eval()
        dim = int(model.get_embedding_dimension() or 0)
        outputs = [TensorSpec(name="embedding", datatype="FP32", shape=[-1, dim])]
        head_path = self.path / HEAD_FILE
        if head_path.is_file():
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            self._head = ort.InferenceSession(str(head_path), opts, providers=["CPUExecutionProvider"])
            classes = int(self._head.get_outputs()[0].shape[-1])
            outputs += [
                TensorSpec(name="probabilities", datatype="FP32", shape=[-1, classes]),
                TensorSpec(name="label", datatype="INT64", shape=[-1]),
            ]
        self._signature = Signature(inputs=[TensorSpec(name="text", datatype="BYTES", shape=[-1])], outputs=outputs)
        self._model = model

    @property
    def signature(self) -> Signature:
        if self._signature is None:
            raise RuntimeError("sentence-transformers model is not loaded")
        return self._signature

    @property
    def max_tokens(self) -> int:
        """Longest input in tokens; longer texts are truncated to it (the model's max_seq_length)."""
        return int(self._model.max_seq_length)

    def embed(self, texts: list[str], max_batch_tokens: int = 16384) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings (N, dim) and the number of tokens the model read for each text.

        The texts are tokenised together (in blocks of ``_TOKENISE_AT_ONCE``), then run longest first in runs of
        similar lengths (``length_chunks``) whose padded size stays within ``max_batch_tokens``, so short texts do not
        pay for a long one's padding.
        """
        import torch

        model = self._model
        if model is None:
            raise RuntimeError("sentence-transformers model is not loaded")
        left = getattr(model.tokenizer, "padding_side", "right") == "left"
        embeddings: np.ndarray | None = None
        tokens = np.zeros(len(texts), dtype=np.int64)
        for first in range(0, len(texts), _TOKENISE_AT_ONCE):
            block = texts[first : first + _TOKENISE_AT_ONCE]
            # Same pipeline as SentenceTransformer.encode, minus its per-call bookkeeping, so the tokenisation done
            # for the forward pass also gives the token counts. A run's columns are cut to its longest text, on the
            # side the tokenizer pads.
            features = model.preprocess(block)
            lengths = features["attention_mask"].sum(dim=1).numpy()
            tokens[first : first + len(block)] = lengths
            padded = int(features["attention_mask"].shape[1])
            for idx in length_chunks(lengths, RUN_TOKENS, max_batch_tokens):
                rows, width = torch.from_numpy(idx), int(lengths[idx[0]])
                cols = slice(padded - width, None) if left else slice(0, width)
                run = {
                    k: v[rows, cols] if isinstance(v, torch.Tensor) and v.dim() == 2 else v for k, v in features.items()
                }
                with torch.inference_mode():
                    out = model(run)["sentence_embedding"].float().numpy()
                if embeddings is None:
                    embeddings = np.empty((len(texts), out.shape[1]), dtype=np.float32)
                embeddings[first + idx] = out
        assert embeddings is not None
        return embeddings, tokens

    def infer(self, batch: Mapping[str, np.ndarray]) -> RuntimeResult:
        texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in batch["text"].reshape(-1)]
        embeddings, tokens = self.embed(texts)
        outputs = {"embedding": embeddings}
        if self._head is not None:
            probabilities, label = self._head.run(None, {"x": embeddings.astype(np.float32)})
            outputs.update(probabilities=probabilities, label=label)
        return RuntimeResult(outputs=outputs, tokens=tokens)

    def set_threads(self, threads: int) -> None:
        import torch

        # Always set, even when get_num_threads() already says ``threads``: that reads this thread's OpenMP
        # setting, but torch.set_num_threads also sets MKL's thread count, which is process-wide, so another
        # copy's thread may have changed it since (a lone request then ran its matrix products on one thread,
        # ~2 ms slower here).
        torch.set_num_threads(threads)

    def memory_bytes(self) -> int:
        model = self._model
        if model is None:
            return 0
        return int(sum(p.numel() * p.element_size() for p in model.parameters()))

    def parameters(self) -> int | None:
        if self._model is None:
            return None
        encoder = int(sum(p.numel() for p in self._model.parameters()))
        head = self.path / HEAD_FILE
        if head.is_file():
            from openmaas.runtimes.onnx import onnx_parameters

            encoder += onnx_parameters(head)
        return encoder

    def unload(self) -> None:
        self._model = None
        self._head = None
