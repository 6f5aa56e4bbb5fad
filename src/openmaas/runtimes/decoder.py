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
read without the running rows (joining prompts together, right-padded, when their lengths are close), and no row is
read twice. The builder's graph takes the last position of every row; ``index_logit_rows`` rewrites it once, at
conversion, to take each row's own last position (``logits_index``), which is what lets right-padded prompts share a
run (a graph without that input reads each joining prompt alone).
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
#: Joining prompts share a run while padding them to the longest costs at most this share of their own tokens...
_PADDING_SHARE = 0.5
#: ...and the run reads at most this many positions (or the one prompt, if longer).
_PREFILL_POSITIONS = 2048
GENAI_CONFIG = "genai_config.json"
#: The input ``index_logit_rows`` adds: per row, the position whose logits the graph returns.
LOGITS_INDEX = "logits_index"


def index_logit_rows(model: Path) -> bool:
    """Rewrite the builder's graph in ``model`` so that it returns, per row, the logits of the position given in
    the ``logits_index`` input instead of the last position (the builder's ``prune_lm_head`` Gather of index -1).
    False (graph unchanged) where the graph has no such node."""
    import onnx
    from onnx import TensorProto, helper

    proto = onnx.load(str(model), load_external_data=False)
    graph = proto.graph
    found = [
        (i, n)
        for i, n in enumerate(graph.node)
        if n.op_type == "Gather" and n.name.endswith("/prune/Gather") and len(n.input) == 2
    ]
    if len(found) != 1:
        return False
    at, gather = found[0]
    hidden, last, picked = gather.input[0], gather.input[1], gather.output[0]
    index = f"{gather.name}/{LOGITS_INDEX}"
    axes = f"{gather.name}/axes"
    graph.input.append(helper.make_tensor_value_info(LOGITS_INDEX, TensorProto.INT64, ["batch_size"]))
    graph.initializer.append(helper.make_tensor(axes, TensorProto.INT64, [1], [1]))
    del graph.node[at]
    graph.node.insert(at, helper.make_node("Unsqueeze", [LOGITS_INDEX, axes], [index], name=f"{gather.name}/Index"))
    # (batch, positions, hidden) and (batch, 1) -> (batch, hidden): the same shape the Gather gave.
    graph.node.insert(at + 1, helper.make_node("GatherND", [hidden, index], [picked], name=gather.name, batch_dims=1))
    if not any(last in n.input for n in graph.node):  # the -1 constant: drop it rather than leave it unused
        for tensor in [t for t in graph.initializer if t.name == last]:
            graph.initializer.remove(tensor)
        for node in [n for n in graph.node if last in n.output]:
            graph.node.remove(node)
    onnx.save(proto, str(model))
    return True


def prefill_groups(lengths: list[int]) -> list[list[int]]:
    """Consecutive runs of joining prompts (indices into ``lengths``) read in one run each: a prompt joins the run
    before it while padding every prompt of the run to the longest adds at most ``_PADDING_SHARE`` of their tokens
    and the run stays within ``_PREFILL_POSITIONS`` positions."""
    groups: list[list[int]] = []
    for i, n in enumerate(lengths):
        if groups:
            group = groups[-1]
            width = max(n, *(lengths[j] for j in group))
            padded, real = width * (len(group) + 1), n + sum(lengths[j] for j in group)
            if padded <= (1 + _PADDING_SHARE) * real and padded <= _PREFILL_POSITIONS:
                group.append(i)
                continue
        groups.append([i])
    return groups


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
    """The KV cache of a batch: per cache input, an array (row capacity, kv heads, capacity, head size) whose first
    ``rows`` rows are the batch's, row r with ``lengths[r]`` positions filled (the rest is free space, never read).
    Rows join at the end and leave by moving the later rows up, in place: neither copies the cache as a whole."""

    buffers: list[np.ndarray]
    lengths: list[int]

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return int(self.buffers[0].shape[2])

    @property
    def row_capacity(self) -> int:
        return int(self.buffers[0].shape[0])


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
        #: Whether rows of different lengths can share a prefill (see ``index_logit_rows``).
        self.indexed = any(i.name == LOGITS_INDEX for i in self.session.get_inputs())
        self._lock = threading.Lock()  # one run at a time: the engine's steps and an evaluation's scoring

    # -- the graph ---------------------------------------------------------------------------------------------

    def _run(self, slots: _Slots, ids: np.ndarray, mask: np.ndarray, first: int = 0) -> np.ndarray:
        """One run of the graph over cache rows ``first`` to ``first + len(ids)``, read and written in place: the
        logits (rows, vocab) of each row's last position (the mask's ones: rows are right-padded)."""
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.ids_name, ids)
        binding.bind_cpu_input(self.mask_name, mask)
        if self.indexed:  # a step reads one position per row; a prefill (no past) ends where each row's ones end
            last = mask.sum(axis=1) - 1 if ids.shape[1] > 1 else np.zeros(len(ids), np.int64)
            binding.bind_cpu_input(LOGITS_INDEX, last)
        for past, present, buffer in zip(self.past, self.present, slots.buffers, strict=True):
            rows = buffer[first : first + len(ids)]  # contiguous: a range of the first axis
            shape = list(rows.shape)
            binding.bind_input(past, "cpu", 0, np.float32, shape, rows.ctypes.data)
            binding.bind_output(present, "cpu", 0, np.float32, shape, rows.ctypes.data)
        # The graph keeps the last position's logits only; written straight into this array (reading the
        # binding's outputs back would copy every cache buffer too).
        logits = np.empty((len(ids), 1, self.vocab), np.float32)
        binding.bind_output(self.logits_name, "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        with self._lock:
            self.session.run_with_iobinding(binding)
        return logits[:, -1, :]

    def _empty(self, row_capacity: int, capacity: int) -> _Slots:
        shape = (row_capacity, self.kv_heads, capacity, self.head_size)
        return _Slots([np.zeros(shape, np.float32) for _ in self.past], [])

    def _capacity(self, needed: int) -> int:
        return min(self.context, -(-needed // _CAPACITY_STEP) * _CAPACITY_STEP)

    def _reserved(self, slots: _Slots, rows: int, positions: int) -> _Slots:
        """``slots`` with room for ``rows`` rows of ``positions`` positions (its rows copied into larger buffers
        if short: positions in steps of ``_CAPACITY_STEP``, rows by half again, so joins rarely copy)."""
        if rows <= slots.row_capacity and positions <= slots.capacity:
            return slots
        if positions > max(slots.capacity, self.context):
            raise ValueError(f"the sequence needs {positions} positions; the context window is {self.context}")
        row_capacity = slots.row_capacity if rows <= slots.row_capacity else max(rows, slots.row_capacity * 3 // 2)
        grown = self._empty(row_capacity, max(slots.capacity, self._capacity(positions)))
        for old, new in zip(slots.buffers, grown.buffers, strict=True):
            new[: slots.rows, :, : slots.capacity] = old[: slots.rows]
        grown.lengths = list(slots.lengths)
        return grown

    def _fill(self, slots: _Slots, prompts: list[list[int]]) -> np.ndarray:
        """Read whole prompts in one run, right-padded to the longest, into new rows at the end of ``slots`` (which
        has room for them): their logits (rows, vocab)."""
        assert len(prompts) == 1 or self.indexed
        width = max(len(ids) for ids in prompts)
        ids = np.zeros((len(prompts), width), np.int64)
        mask = np.zeros((len(prompts), width), np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
            mask[row, : len(prompt)] = 1
        logits = self._run(slots, ids, mask, first=slots.rows)
        slots.lengths.extend(len(p) for p in prompts)
        return logits

    def prefill(self, prompts: list[list[int]]) -> tuple[np.ndarray, _Slots]:
        """Read whole prompts in one run (one prompt unless ``indexed``): their logits (rows, vocab) and cache."""
        slots = self._empty(len(prompts), self._capacity(max(len(p) for p in prompts) + 1))
        return self._fill(slots, prompts), slots

    # -- the decoder interface ---------------------------------------------------------------------------------

    def step(self, state: _Slots, tokens: list[int]) -> tuple[Any, _Slots]:
        import torch

        slots = self._reserved(state, state.rows, max(state.lengths) + 1)
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
        prompts = sequences[old:]
        positions = max(len(p) for p in prompts) + 1
        parts: list[np.ndarray] = []
        if old:
            assert state is not None
            assert state.rows == old
            # Room for the running rows' next position and the joining prompts: one copy at most, not two.
            slots = self._reserved(state, len(sequences), max(positions, max(state.lengths) + 1))
            logits, slots = self.step(slots, [ids[-1] for ids in sequences[:old]])
            parts.append(logits.numpy())
        else:
            slots = self._empty(new, self._capacity(positions))
        groups = prefill_groups([len(p) for p in prompts]) if self.indexed else [[i] for i in range(new)]
        for group in groups:  # consecutive: the rows land in the order of ``sequences``
            parts.append(self._fill(slots, [prompts[i] for i in group]))
        return torch.from_numpy(np.concatenate(parts)), slots

    def keep(self, state: _Slots, rows: list[int]) -> _Slots:
        """Only ``rows`` (ascending) go on: each moves up to its new place (rows before the first that leaves
        stay where they are)."""
        for place, row in enumerate(rows):
            if row != place:
                filled = state.lengths[row]
                for buffer in state.buffers:
                    buffer[place, :, :filled] = buffer[row, :, :filled]
        return _Slots(state.buffers, [state.lengths[r] for r in rows])

    # -- scoring -----------------------------------------------------------------------------------------------

    def log_likelihood(self, ids: list[int]) -> float:
        """Negative log-likelihood (nats, summed) of ``ids[1:]`` given what comes before each (the graph keeps
        only the last position's logits, so the text is read one token at a time)."""
        total = 0.0
        slots = self._empty(1, self._capacity(len(ids) + 1))
        slots.lengths = [0]
        for position in range(len(ids) - 1):
            logits, slots = self.step(slots, [ids[position]])
            row = logits[0].numpy().astype(np.float64)
            top = row.max()
            total += float(np.log(np.exp(row - top).sum()) + top - row[ids[position + 1]])
        return total

    def greedy(self, ids: list[int], tokens: int) -> list[int]:
        logits, slots = self.prefill([ids])
        out: list[int] = []
        for _ in range(tokens):
            token = int(np.argmax(logits[0]))
            out.append(token)
            step, slots = self.step(slots, [token])
            logits = step.numpy()
        return out
