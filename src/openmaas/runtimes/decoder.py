"""Decoding steps for the generation engine: how a batch of sequences is read by the model, one step at a time.

``engine.py`` owns the loop (who joins, sampling, stops, events); a decoder owns the model and its KV cache:

- ``join(state, sequences, new)``: the last ``new`` sequences are new (whole prompts); the others are already in
  ``state`` and give their newest token. Returns the next-token logits of every row and the new state.
- ``step(state, tokens)``: every row reads its newest token.
- ``keep(state, rows)``: only these rows go on.

``TorchDecoder`` runs a transformers model (float32 weights): a join reads every sequence again, left-padded.
``OnnxDecoder`` runs one fused ONNX graph of the whole decoder (built once by ONNX Runtime GenAI's model builder,
see ``quantised.py``: int8 weights in MatMulNBits, GroupQueryAttention with rotary embeddings inside) with one
``run`` per step: each row's cache is a right-padded slot of preallocated buffers that the graph writes in place
(past and present bound to the same memory), so a row's length is all the graph needs to know, a joining prompt is
read alone, and no row is read twice.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Cache slots grow in steps of this many positions (a reallocation copies the cache).
_CAPACITY_STEP = 256
GENAI_CONFIG = "genai_config.json"


class TorchDecoder:
    """A transformers causal LM: a join prefills the whole batch again (left-padded), steps use its cache. The
    engine calls it under ``torch.inference_mode``."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def join(self, state: Any, sequences: list[list[int]], new: int) -> tuple[Any, Any]:
        import torch

        width = max(len(ids) for ids in sequences)
        ids = torch.zeros((len(sequences), width), dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float(), (out.cache, mask)

    def step(self, state: Any, tokens: list[int]) -> tuple[Any, Any]:
        import torch

        cache, mask = state
        ids = torch.tensor([[t] for t in tokens], dtype=torch.long)
        mask = torch.cat([mask, torch.ones((len(tokens), 1), dtype=torch.long)], dim=1)
        position = mask.sum(-1, keepdim=True) - 1
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=position, cache=cache, use_cache=True, logits_to_keep=1
        )
        return out.logits[:, -1, :].float(), (out.cache, mask)

    def keep(self, state: Any, rows: list[int]) -> Any:
        import torch

        cache, mask = state
        index = torch.tensor(rows, dtype=torch.long)
        cache.batch_select_indices(index)
        return cache, mask[index]


@dataclass
class _Slots:
    """The KV cache of a batch: per cache input, an array (rows, kv heads, capacity, head size); ``lengths[r]``
    positions of row r are filled (the rest is free space, never read)."""

    buffers: list[np.ndarray]
    lengths: list[int]

    @property
    def capacity(self) -> int:
        return int(self.buffers[0].shape[2])


class OnnxDecoder:
    """A decoder graph made by ONNX Runtime GenAI's builder (``genai_config.json`` beside ``model.onnx``), run with
    plain ONNX Runtime."""

    def __init__(self, folder: Path, threads: int, context: int) -> None:
        import onnxruntime as ort

        config = json.loads((folder / GENAI_CONFIG).read_text())["model"]
        decoder = config["decoder"]
        self.kv_heads = int(decoder["num_key_value_heads"])
        self.head_size = int(decoder["head_size"])
        self.layers = int(decoder["num_hidden_layers"])
        self.vocab = int(config["vocab_size"])
        self.context = max(1, min(context, int(config.get("context_length") or context)))
        names = decoder["inputs"]
        self.past = [names[k] % i for i in range(self.layers) for k in ("past_key_names", "past_value_names")]
        outputs = decoder["outputs"]
        self.present = [
            outputs[k] % i for i in range(self.layers) for k in ("present_key_names", "present_value_names")
        ]
        self.logits_name = outputs["logits"]
        self.ids_name, self.mask_name = names["input_ids"], names["attention_mask"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(folder / decoder["filename"]), options, providers=["CPUExecutionProvider"]
        )
        self._lock = threading.Lock()  # one run at a time: the engine's steps and an evaluation's scoring

    # -- the graph ---------------------------------------------------------------------------------------------

    def _run(self, slots: _Slots, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """One run of the graph: the cache is read and written in place; next-token logits (rows, vocab)."""
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.ids_name, ids)
        binding.bind_cpu_input(self.mask_name, mask)
        for past, present, buffer in zip(self.past, self.present, slots.buffers, strict=True):
            shape = list(buffer.shape)
            binding.bind_input(past, "cpu", 0, np.float32, shape, buffer.ctypes.data)
            binding.bind_output(present, "cpu", 0, np.float32, shape, buffer.ctypes.data)
        # The graph keeps the last position's logits only; written straight into this array (reading the
        # binding's outputs back would copy every cache buffer too).
        logits = np.empty((len(ids), 1, self.vocab), np.float32)
        binding.bind_output(self.logits_name, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        with self._lock:
            self.session.run_with_iobinding(binding)
        return logits[:, -1, :]

    def _empty(self, rows: int, capacity: int) -> _Slots:
        shape = (rows, self.kv_heads, capacity, self.head_size)
        return _Slots([np.zeros(shape, np.float32) for _ in self.past], [0] * rows)

    def _capacity(self, needed: int) -> int:
        return min(self.context, -(-needed // _CAPACITY_STEP) * _CAPACITY_STEP)

    def _grown(self, slots: _Slots, needed: int) -> _Slots:
        """``slots`` with room for ``needed`` positions in every row (copied into larger buffers if short)."""
        if needed <= slots.capacity:
            return slots
        capacity = self._capacity(needed)
        if needed > capacity:
            raise ValueError(f"the sequence needs {needed} positions; the context window is {self.context}")
        pad = ((0, 0), (0, 0), (0, capacity - slots.capacity), (0, 0))
        return _Slots([np.pad(b, pad) for b in slots.buffers], slots.lengths)

    def prefill(self, ids: list[int]) -> tuple[np.ndarray, _Slots]:
        """Read a whole prompt alone: its logits (1, vocab) and its one-row cache."""
        slots = self._empty(1, self._capacity(len(ids) + 1))
        logits = self._run(slots, np.array([ids], np.int64), np.ones((1, len(ids)), np.int64))
        slots.lengths = [len(ids)]
        return logits, slots

    # -- the decoder interface ---------------------------------------------------------------------------------

    def step(self, state: _Slots, tokens: list[int]) -> tuple[Any, _Slots]:
        import torch

        slots = self._grown(state, max(state.lengths) + 1)
        width = max(slots.lengths) + 1
        mask = np.zeros((len(tokens), width), np.int64)
        for row, length in enumerate(slots.lengths):
            mask[row, : length + 1] = 1  # right-padded: the graph reads each row's length from its mask
        logits = self._run(slots, np.array(tokens, np.int64)[:, None], mask)
        slots.lengths = [n + 1 for n in slots.lengths]
        return torch.from_numpy(logits), slots

    def join(self, state: _Slots | None, sequences: list[list[int]], new: int) -> tuple[Any, _Slots]:
        import torch

        old = len(sequences) - new
        parts: list[np.ndarray] = []
        batches: list[_Slots] = []
        if old:
            assert state is not None
            logits, state = self.step(state, [ids[-1] for ids in sequences[:old]])
            parts.append(logits.numpy())
            batches.append(state)
        for ids in sequences[old:]:
            logits_one, slots = self.prefill(ids)
            parts.append(logits_one)
            batches.append(slots)
        capacity = max(b.capacity for b in batches)
        batches = [self._grown(b, capacity) for b in batches]
        merged = _Slots(
            [np.concatenate([b.buffers[i] for b in batches]) for i in range(len(self.past))],
            [n for b in batches for n in b.lengths],
        )
        return torch.from_numpy(np.concatenate(parts)), merged

    def keep(self, state: _Slots, rows: list[int]) -> _Slots:
        return _Slots([b[rows] for b in state.buffers], [state.lengths[r] for r in rows])

    # -- scoring -----------------------------------------------------------------------------------------------

    def log_likelihood(self, ids: list[int]) -> float:
        """Negative log-likelihood (nats, summed) of ``ids[1:]`` given what comes before each (the graph keeps
        only the last position's logits, so the text is read one token at a time)."""
        total = 0.0
        slots = self._empty(1, self._capacity(len(ids) + 1))
        for position in range(len(ids) - 1):
            logits, slots = self.step(slots, [ids[position]])
            row = logits[0].numpy().astype(np.float64)
            top = row.max()
            total += float(np.log(np.exp(row - top).sum()) + top - row[ids[position + 1]])
        return total

    def greedy(self, ids: list[int], tokens: int) -> list[int]:
        logits, slots = self.prefill(ids)
        out: list[int] = []
        for _ in range(tokens):
            token = int(np.argmax(logits[0]))
            out.append(token)
            step, slots = self.step(slots, [token])
            logits = step.numpy()
        return out
