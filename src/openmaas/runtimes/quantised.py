"""Quantised weights for causal language models: int8 blocks in ONNX Runtime's MatMulNBits kernels.

A Hugging Face causal LM (a registered folder, or a GGUF file once de-quantised) is converted once, in a child
process, into a folder beside the artifact: every ``nn.Linear`` as blocks of 32 int8 weights with one float32 scale
each (symmetric, round to nearest), the other weights as they were, and a record of the quality guard (perplexity
on a fixed English text and greedy agreement on fixed prompts, against the float32 model). A quantised model whose
perplexity rises more than ``MAX_PERPLEXITY_INCREASE`` is refused (served in float32, the record says why) unless
quantisation is forced.

Loading keeps the weights quantised in memory: each linear layer becomes a one-node ONNX Runtime session, and
layers that read the same input run as one call (attention's q/k/v; the MLP's gate and up projections with the
activation, the product and the down projection). The tied input embedding reads its rows from the head's
blocks in the file (memory-mapped: only the rows a prompt uses are read). The rest of the model (attention, norms,
rotary embeddings, the KV cache) stays the transformers model, so the generation engine (``engine.py``) batches
and samples exactly as it does for float32 weights.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from openmaas.runtimes.conversion import child_start, report

BLOCK = 32
BITS = 8
_ZERO = 1 << (BITS - 1)  # MatMulNBits' default zero point: weights are stored as q + 128
WEIGHTS_FILE = "model.safetensors"
RECORD_FILE = "openmaas-quantisation.json"
#: The largest perplexity rise (relative, on ``REFERENCE_TEXT``) a quantised model may show and still be served.
MAX_PERPLEXITY_INCREASE = 0.05
#: Below this share of its weights in linear layers and embeddings, quantising a model is not worth it.
_MIN_QUANTISED_SHARE = 0.8
ENGINE = "onnxruntime MatMulNBits"

#: The quality guard's text: plain English prose of several registers (written for this purpose).
REFERENCE_TEXT = (
    "The river runs through the middle of the old town, and most of the streets lead down to it. In the morning "
    "the market opens on the square by the bridge, where farmers sell bread, cheese, apples and flowers. By noon "
    "the stalls are packed away and the square fills with people eating lunch in the sun. "
    "Water boils at one hundred degrees Celsius at sea level, but at a lower temperature in the mountains, because "
    "the air pressure there is lower. This is why cooking pasta takes longer at high altitude. "
    "To reset the device, hold the power button for ten seconds until the light turns red, then release it and "
    "wait for the light to turn green. If the light stays red, unplug the device, wait a minute and try again. "
    "She opened the letter slowly. It was from her brother, who had left the country many years ago and had not "
    "written since. He said that he was well, that he had married, and that he hoped to visit in the spring. "
    "The committee will meet on Tuesday to discuss the budget for next year. Members are asked to read the report "
    "before the meeting and to send their questions to the secretary by Monday evening."
)
#: Prompts whose greedy continuations (``GREEDY_TOKENS`` tokens) the guard compares.
PROMPTS = ("The capital of France is", "Once upon a time, there was a", "The history of the city of Paris begins")
GREEDY_TOKENS = 32


# -- the arithmetic ------------------------------------------------------------------------------------------------


def quantise_matrix(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w`` [N, K] float32 as (blocks uint8 [N, ceil(K/32), 32], scales float32 [N * ceil(K/32)]): symmetric,
    round to nearest, stored as q + 128 (MatMulNBits' default zero point for 8 bits)."""
    n, k = w.shape
    nb = math.ceil(k / BLOCK)
    padded = np.zeros((n, nb * BLOCK), dtype=np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, nb, BLOCK)
    scales = np.abs(blocks).max(axis=-1) / (_ZERO - 1)
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(blocks / scales[..., None]), -(_ZERO - 1), _ZERO - 1) + _ZERO
    return q.astype(np.uint8), scales.reshape(-1).astype(np.float32)


def dequantise_rows(blocks: np.ndarray, scales: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Rows ``rows`` of the matrix ``blocks``/``scales`` hold, as float32 [len(rows), k]."""
    nb = blocks.shape[1]
    values = blocks[rows].astype(np.float32) - _ZERO  # [r, nb, 32]
    s = scales.reshape(-1, nb)[rows]
    out: np.ndarray = (values * s[..., None]).reshape(len(rows), nb * BLOCK)[:, :k]
    return out


# -- the file ------------------------------------------------------------------------------------------------------


class _File:
    """A safetensors file read in place: tensors as memory maps, and as ONNX external data (ONNX Runtime reads
    them from the file itself; no copy passes through Python)."""

    _DTYPES = {"U8": (np.uint8, 2), "F32": (np.float32, 1)}  # numpy type, ONNX TensorProto type

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            self.header: dict[str, Any] = json.loads(f.read(size))
        self.base = 8 + size
        self.header.pop("__metadata__", None)

    def __contains__(self, name: str) -> bool:
        return name in self.header

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def array(self, name: str) -> np.ndarray:
        info = self.header[name]
        start, end = info["data_offsets"]
        dtype = self._DTYPES[info["dtype"]][0]
        if end == start:
            return np.zeros(tuple(info["shape"]), dtype=dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.base + start, shape=tuple(info["shape"]))

    def initializer(self, name: str, as_name: str) -> Any:
        from onnx import TensorProto

        info = self.header[name]
        start, end = info["data_offsets"]
        t = TensorProto()
        t.name, t.data_type = as_name, self._DTYPES[info["dtype"]][1]
        t.dims.extend(info["shape"])
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", self.base + start), ("length", end - start)):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
        return t


# -- the kernels -----------------------------------------------------------------------------------------------------


def _matmul(graph: dict[str, Any], file: _File, tensor: str, x: str, out: str, k: int) -> None:
    """A MatMulNBits node computing ``out = x @ W.T (+ bias)`` for the matrix ``tensor``; its N."""
    from onnx import helper

    n = file.shape(f"{tensor}.qweight")[0]
    inputs = [x, f"{tensor}.B", f"{tensor}.S"]
    graph["inits"] += [
        file.initializer(f"{tensor}.qweight", inputs[1]),
        file.initializer(f"{tensor}.scales", inputs[2]),
    ]
    if f"{tensor}.qbias" in file:
        inputs += ["", "", f"{tensor}.bias"]  # (zero points, group index) absent, then the bias
        graph["inits"].append(file.initializer(f"{tensor}.qbias", inputs[-1]))
    graph["nodes"].append(
        helper.make_node(
            "MatMulNBits",
            inputs,
            [out],
            domain="com.microsoft",
            K=k,
            N=int(n),
            bits=BITS,
            block_size=BLOCK,
            accuracy_level=4,  # int8 activations inside the kernel: the fast path on CPUs
        )
    )


def _mlp_graph(graph: dict[str, Any], file: _File, module: str, activation: str, k: int, inner: int) -> None:
    """down(act(gate(x)) * up(x)), the gate and up projections stacked in one matrix."""
    from onnx import helper

    _matmul(graph, file, f"{module}.gate_up", "x", "gu", k)
    graph["nodes"].append(helper.make_node("Split", ["gu"], ["g", "u"], axis=-1, num_outputs=2))
    if activation == "silu":
        graph["nodes"] += [helper.make_node("Sigmoid", ["g"], ["s"]), helper.make_node("Mul", ["g", "s"], ["a"])]
    else:
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        graph["nodes"].append(helper.make_node("Gelu", ["g"], ["a"], approximate=approximate))
    graph["nodes"].append(helper.make_node("Mul", ["a", "u"], ["h"]))
    _matmul(graph, file, f"{module}.down", "h", "y", inner)


def _session(file: _File, build: Callable[[dict[str, Any]], None], k: int, threads: int) -> Any:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph: dict[str, Any] = {"nodes": [], "inits": []}
    build(graph)
    model = helper.make_model(
        helper.make_graph(
            graph["nodes"],
            "openmaas-int8",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            graph["inits"],
        ),
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = False  # an arena would keep what loading used
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads leave the cores
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(file.path.parent))
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _make_modules() -> dict[str, type]:
    """The torch modules, defined on first use (torch is imported lazily by every runtime)."""
    import torch

    class Kernel(torch.nn.Module):
        """A session taking ``x`` [..., k] and giving ``y`` [..., n]."""

        def __init__(self, session: Any, n: int) -> None:
            super().__init__()
            self.session, self.n = session, n

        def forward(self, x: Any) -> Any:
            flat = x.reshape(-1, x.shape[-1])
            if flat.dtype != torch.float32:
                flat = flat.float()
            (y,) = self.session._sess.run(["y"], {"x": flat.contiguous().numpy()}, None)
            return torch.from_numpy(y).reshape(*x.shape[:-1], self.n)

    class Projections(torch.nn.Module):
        """Several linear layers of one input (attention's q, k, v) as one kernel call; each layer's ``Part``
        takes its slice of the result computed for that input."""

        def __init__(self, kernel: Any, sizes: list[int]) -> None:
            super().__init__()
            self.kernel, self.sizes = kernel, sizes
            self._stash = threading.local()  # per thread: the engine and an evaluation may run the model at once

        def part(self, index: int, x: Any) -> Any:
            stash = self._stash
            if getattr(stash, "input", None) is not x or index in stash.taken:
                stash.outputs = list(torch.split(self.kernel(x), self.sizes, dim=-1))
                stash.input, stash.taken = x, set()
            stash.taken.add(index)
            out = stash.outputs[index]
            if len(stash.taken) == len(self.sizes):  # every part read: let the tensors go
                stash.input, stash.outputs, stash.taken = None, [], set()
            return out

    class Part(torch.nn.Module):
        def __init__(self, owner: Any, index: int) -> None:
            super().__init__()
            self.owner = [owner]  # in a list: registered once, under the attention module
            self.index = index

        def forward(self, x: Any) -> Any:
            return self.owner[0].part(self.index, x)

    class Embedding(torch.nn.Module):
        """Rows of a quantised matrix (memory-mapped), times the model's embedding scale if it has one."""

        def __init__(self, blocks: np.ndarray, scales: np.ndarray, k: int, scale: float | None) -> None:
            super().__init__()
            self.blocks, self.scales, self.k, self.scale = blocks, scales, k, scale
            self.num_embeddings, self.embedding_dim = int(blocks.shape[0]), k

        def forward(self, ids: Any) -> Any:
            flat = ids.reshape(-1).numpy()
            rows = torch.from_numpy(dequantise_rows(self.blocks, self.scales, flat, self.k))
            if self.scale is not None:
                rows = rows * self.scale
            return rows.reshape(*ids.shape, self.k)

    return {"Kernel": Kernel, "Projections": Projections, "Part": Part, "Embedding": Embedding}


_MODULES: dict[str, type] = {}


def _modules() -> dict[str, type]:
    if not _MODULES:
        _MODULES.update(_make_modules())
    return _MODULES


def _activation(mlp: Any) -> str | None:
    """The MLP's activation as the fused kernel names it; None where it is not one the kernel has."""
    name = type(getattr(mlp, "act_fn", None)).__name__
    if name in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "GELUPytorchTanh"):
        return "gelu_tanh"
    if name == "GELUActivation":
        return "gelu"
    if name in ("SiLUActivation", "SiLU"):
        return "silu"
    return None


def _plan_kernels(model: Any, linears: list[str]) -> list[dict[str, Any]]:
    """Which linear layers run as one kernel: an MLP's gate/up/down with its activation, attention's q/k/v."""
    kernels: list[dict[str, Any]] = []
    taken: set[str] = set()
    present = set(linears)
    for name in linears:
        if name in taken:
            continue
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        mlp = [f"{parent}.{c}" for c in ("gate_proj", "up_proj", "down_proj")]
        qkv = [f"{parent}.{c}" for c in ("q_proj", "k_proj", "v_proj")]
        activation = _activation(owner)
        if parent and child in ("gate_proj", "up_proj", "down_proj") and set(mlp) <= present and activation:
            kernels.append({"kind": "mlp", "module": parent, "layers": mlp, "activation": activation})
            taken.update(mlp)
        elif parent and child in ("q_proj", "k_proj", "v_proj") and set(qkv) <= present:
            kernels.append({"kind": "projections", "module": parent, "layers": qkv})
            taken.update(qkv)
        else:
            kernels.append({"kind": "linear", "module": name, "layers": [name]})
            taken.add(name)
    return kernels


def quantise_state(model: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tensors of the quantised file, and its plan (the kernels, how the embedding is read)."""
    import torch

    tensors: dict[str, np.ndarray] = {}
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    kernels = _plan_kernels(model, linears)
    covered: set[int] = set()

    def put(tensor: str, layers: list[str]) -> None:
        """The layers' matrices one above the other (they read the same input) as one quantised matrix."""
        modules = [model.get_submodule(n) for n in layers]
        weight = torch.cat([m.weight.detach().float() for m in modules]).numpy()
        tensors[f"{tensor}.qweight"], tensors[f"{tensor}.scales"] = quantise_matrix(weight)
        if any(m.bias is not None for m in modules):
            tensors[f"{tensor}.qbias"] = torch.cat(
                [m.bias.detach().float() if m.bias is not None else torch.zeros(m.out_features) for m in modules]
            ).numpy()
        for m in modules:
            covered.update({id(m.weight)} | ({id(m.bias)} if m.bias is not None else set()))

    for kernel in kernels:
        module = model.get_submodule(kernel["layers"][0])
        kernel["k"] = int(module.in_features)
        kernel["sizes"] = [int(model.get_submodule(n).out_features) for n in kernel["layers"]]
        if kernel["kind"] == "mlp":
            put(f"{kernel['module']}.gate_up", kernel["layers"][:2])
            put(f"{kernel['module']}.down", kernel["layers"][2:])
        else:
            put(kernel["module"], kernel["layers"])
    embedding = model.get_input_embeddings()
    emb_name = next(n for n, m in model.named_modules() if m is embedding)
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    tied = head is not None and head.weight is embedding.weight and head_name in linears
    if not tied:
        tensors[f"{emb_name}.qweight"], tensors[f"{emb_name}.scales"] = quantise_matrix(
            embedding.weight.detach().float().numpy()
        )
    covered.add(id(embedding.weight))
    quantised = sum(p.numel() for p in model.parameters() if id(p) in covered)
    total = sum(p.numel() for p in model.parameters())
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) not in covered and isinstance(value, torch.nn.Parameter):
            tensors[f"rest.{key}"] = np.ascontiguousarray(value.detach().float().numpy())
    scale = getattr(embedding, "embed_scale", None)
    plan = {
        "kernels": kernels,
        "embedding": emb_name,
        "embedding_from": head_name if tied else emb_name,
        "embedding_dim": int(embedding.weight.shape[1]),
        "embed_scale": float(scale) if scale is not None else None,
        "quantised_share": quantised / max(1, total),
    }
    return tensors, plan


def load_quantised(folder: Path, threads: int) -> tuple[Any, int]:
    """The causal LM in ``folder`` (written by ``convert``) with its quantised layers in ONNX Runtime, and the
    bytes its weights hold in memory (the quantised matrices and the float32 rest)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    plan = json.loads((folder / RECORD_FILE).read_text())["plan"]
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with no_init_weights():  # the weights come from the file; untouched empty tensors cost no memory
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    model.eval()
    file = _File(folder / WEIGHTS_FILE)
    m = _modules()

    def replace(name: str, module: Any) -> None:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)

    held = 0
    for kernel in plan["kernels"]:
        k, sizes, module = kernel["k"], kernel["sizes"], kernel["module"]
        if kernel["kind"] == "mlp":
            build = functools.partial(
                _mlp_graph, file=file, module=module, activation=kernel["activation"], k=k, inner=sizes[0]
            )
            replace(module, m["Kernel"](_session(file, build, k, threads), sizes[2]))
            tensors = [f"{module}.gate_up", f"{module}.down"]
        else:
            build = functools.partial(_matmul, file=file, tensor=module, x="x", out="y", k=k)
            kernel_module = m["Kernel"](_session(file, build, k, threads), sum(sizes))
            if kernel["kind"] == "projections":
                shared = m["Projections"](kernel_module, sizes)
                model.get_submodule(module).add_module("fused_projections", shared)
                for index, layer in enumerate(kernel["layers"]):
                    replace(layer, m["Part"](shared, index))
            else:
                replace(module, kernel_module)
            tensors = [module]
        held += sum(int(np.prod(file.shape(f"{t}.qweight"))) + 4 * file.shape(f"{t}.scales")[0] for t in tensors)
    source = plan["embedding_from"]
    replace(
        plan["embedding"],
        m["Embedding"](
            file.array(f"{source}.qweight"), file.array(f"{source}.scales"), plan["embedding_dim"], plan["embed_scale"]
        ),
    )
    rest = {key[5:]: torch.from_numpy(np.array(file.array(key))) for key in file.header if key.startswith("rest.")}
    _, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    if unexpected:
        raise RuntimeError(f"the quantised file holds weights the model does not have: {unexpected[:3]}")
    for name, _ in model.named_parameters():
        if name not in rest:
            raise RuntimeError(f"the quantised file lacks the weight {name}")
    return model, held + sum(int(v.numel() * 4) for v in rest.values())


# -- the quality guard ---------------------------------------------------------------------------------------------


def perplexity(model: Any, tokenizer: Any, text: str = REFERENCE_TEXT) -> tuple[float, int]:
    """exp(mean negative log-likelihood) of the text's tokens after the first, and how many were scored."""
    import torch

    ids = tokenizer(text)["input_ids"]
    window = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    ids = ids[:window]
    batch = torch.tensor([ids])
    with torch.inference_mode():
        logits = model(input_ids=batch).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, batch[0, 1:], reduction="mean")
    return float(torch.exp(nll)), len(ids) - 1


def greedy(model: Any, tokenizer: Any, prompt: str, tokens: int = GREEDY_TOKENS) -> list[int]:
    import torch

    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out: list[int] = []
    cache = None
    with torch.inference_mode():
        step = ids
        for _ in range(tokens):
            result = model(input_ids=step, cache=cache, use_cache=True, logits_to_keep=1)
            cache = result.cache
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            step = torch.tensor([[token]])
    return out


def agreement(reference: list[list[int]], other: list[list[int]]) -> float:
    """Share of the leading tokens where the two greedy runs agree (up to each run's first difference)."""
    same = 0
    for a, b in zip(reference, other, strict=True):
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            same += 1
    return same / max(1, sum(len(a) for a in reference))


# -- the conversion (a child process) -------------------------------------------------------------------------------


def convert(source: Path, out: Path) -> dict[str, Any]:
    """Quantise the causal LM in ``source`` into ``out``, with the record of the quality guard: ``supported``
    (the engine can run it), ``passed`` (the guard's limit held), and ``reason`` where either is false."""
    import shutil

    import torch
    from safetensors.numpy import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    started = time.perf_counter()
    report(0.02, "reading the float32 model")
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32, local_files_only=True)
    model.eval()  # type: ignore[no-untyped-call]
    out.mkdir(parents=True)
    record: dict[str, Any] = {"engine": ENGINE, "weights": f"int{BITS}", "block_size": BLOCK}
    report(0.1, "measuring the float32 model")
    ppl_ref, scored = perplexity(model, tokenizer)
    greedy_ref = [greedy(model, tokenizer, p) for p in PROMPTS]
    report(0.3, "quantising the weights")
    tensors, plan = quantise_state(model)
    record.update(
        plan=plan,
        parameters=int(sum(p.numel() for p in model.parameters())),
        perplexity_float32=round(ppl_ref, 4),
        scored_tokens=scored,
    )
    if plan["quantised_share"] < _MIN_QUANTISED_SHARE:
        record.update(
            supported=False,
            passed=False,
            reason=f"{type(model).__name__} keeps {1 - plan['quantised_share']:.0%} of its weights outside linear "
            "layers and embeddings (for example in Conv1D layers), which this engine does not quantise",
        )
        return _finish(out, record, started)
    del model
    report(0.5, "writing the quantised weights")
    save_file(tensors, str(out / WEIGHTS_FILE))
    del tensors
    for f in source.iterdir():
        if (
            f.is_file()
            and f.suffix != ".safetensors"
            and not f.name.startswith("openmaas-")
            and f.name != "model.safetensors.index.json"
        ):
            shutil.copyfile(f, out / f.name)
    (out / RECORD_FILE).write_text(json.dumps(record))
    report(0.7, "measuring the quantised model")
    quantised, _ = load_quantised(out, threads=1)
    ppl_q, _ = perplexity(quantised, tokenizer)
    greedy_q = [greedy(quantised, tokenizer, p) for p in PROMPTS]
    increase = ppl_q / ppl_ref - 1 if ppl_ref > 0 else 0.0
    record.update(
        perplexity=round(ppl_q, 4),
        perplexity_increase=round(increase, 5),
        greedy_agreement=round(agreement(greedy_ref, greedy_q), 4),
        greedy_tokens=GREEDY_TOKENS,
        bytes=(out / WEIGHTS_FILE).stat().st_size,
    )
    record["supported"] = True
    record["passed"] = math.isfinite(ppl_q) and increase <= MAX_PERPLEXITY_INCREASE
    if not record["passed"]:
        record["reason"] = (
            f"int8 perplexity {ppl_q:.3f} is {increase:+.1%} against float32's {ppl_ref:.3f} (the limit is "
            f"+{MAX_PERPLEXITY_INCREASE:.0%}); OPENMAAS_GENERATION_WEIGHTS=int8-forced serves it anyway"
        )
    return _finish(out, record, started)


def _finish(out: Path, record: dict[str, Any], started: float) -> dict[str, Any]:
    for key, value in record.items():  # a broken model's NaN is no figure (and not JSON)
        if isinstance(value, float) and not math.isfinite(value):
            record[key] = None
    record["seconds"] = round(time.perf_counter() - started, 1)
    (out / RECORD_FILE).write_text(json.dumps(record, indent=1))
    report(1.0, "done")
    return record


if __name__ == "__main__":
    child_start()
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
