"""Quantised weights for causal language models: one fused ONNX graph with int8 weights, built once.

A Hugging Face causal LM (a registered folder, or a GGUF file once de-quantised) is converted once, in a child
process, into a folder beside the artifact by ONNX Runtime GenAI's model builder: the whole decoder as one ONNX
graph (``model.onnx``), every linear layer and the output layer as MatMulNBits with blocks of 128 int8 weights
(symmetric, round to nearest) and int8 arithmetic, GroupQueryAttention with the rotary embeddings inside, fused
norms, and the KV cache as inputs and outputs the graph updates in place. ``decoder.py`` runs it for the generation
engine, one ``run`` a step. The record beside it holds the quality guard's figures (perplexity on a fixed English
text and greedy agreement on fixed prompts, against the float32 model): a quantised model whose perplexity rises
more than ``MAX_PERPLEXITY_INCREASE`` is refused (served in float32, the record says why) unless quantisation is
forced, and an architecture the builder does not know is served in float32 too.

4-bit weights were measured and refused: Gemma 3 270M's perplexity rose 32-46% with every 4-bit scheme the builder
offers (the GGUF's own 4-bit grid is not the builder's), against +0.6% for int8 in blocks of 128 (+0.04% in blocks
of 32, which hold 20% more memory and decode 15% slower).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from openmaas.runtimes.conversion import child_start, report

BLOCK = 128
BITS = 8
RECORD_FILE = "openmaas-quantisation.json"
#: The largest perplexity rise (relative, on ``REFERENCE_TEXT``) a quantised model may show and still be served.
MAX_PERPLEXITY_INCREASE = 0.05
ENGINE = "onnxruntime-genai model builder, onnxruntime MatMulNBits"

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


def _builder_config(config: Any) -> Any:
    """transformers 5 keeps Gemma 3's two rotary bases in ``rope_parameters`` per layer type; the builder reads the
    older attributes (``rope_theta``, ``rope_local_base_freq``). Give it those, same values."""
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope and "sliding_attention" in rope:
        config.rope_theta = rope["full_attention"]["rope_theta"]
        config.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
        config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    return config


def build_graph(source: Path, out: Path) -> None:
    """The builder's int8 graph of ``source`` in ``out``. ValueError / NotImplementedError / KeyError where the
    builder does not support the model."""
    import onnxruntime_genai.models.builder as builder

    from openmaas.runtimes.decoder import index_logit_rows

    loaded = builder.AutoConfig.from_pretrained

    def patched(*args: Any, **kwargs: Any) -> Any:
        return _builder_config(loaded(*args, **kwargs))

    builder.AutoConfig.from_pretrained = patched  # this child process only
    options = {
        "prune_lm_head": "true",  # logits of the last position only: a long prompt does not make (S, vocab) floats
        "windowed_kv_cache": "false",  # sliding-window layers keep whole-length slots, as the engine lays them out
        "block_size": str(BLOCK),
        "accuracy_level": "4",  # int8 arithmetic (the fast kernels)
        "hf_remote": "false",
    }
    cache = out / "builder-cache"
    try:
        extra = builder.parse_extra_options(
            str(source), str(source), str(out), "int8", "cpu", str(cache), [f"{k}={v}" for k, v in options.items()]
        )
        builder.create_model(str(source), str(source), str(out), "int8", "cpu", str(cache), **extra)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    index_logit_rows(out / "model.onnx")  # joining prompts of different lengths can then share a run


def convert(source: Path, out: Path) -> dict[str, Any]:
    """Quantise the causal LM in ``source`` into ``out``, with the record of the quality guard: ``supported``
    (the engine can run it), ``passed`` (the guard's limit held), and ``reason`` where either is false."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openmaas.runtimes.decoder import OnnxDecoder

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
    architecture = type(model).__name__
    window = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    record.update(
        architecture=architecture,
        parameters=int(sum(p.numel() for p in model.parameters())),
        perplexity_float32=round(ppl_ref, 4),
        scored_tokens=scored,
    )
    del model
    report(0.3, "building the int8 decoder graph")
    try:
        build_graph(source, out)
    except (NotImplementedError, ValueError, KeyError, AttributeError) as e:
        _drop_graph(out)
        record.update(
            supported=False,
            passed=False,
            reason=f"the ONNX Runtime GenAI model builder cannot build {architecture} ({type(e).__name__}: "
            f"{str(e)[:200]})",
        )
        return _finish(out, record, started)
    report(0.7, "measuring the quantised model")
    decoder: OnnxDecoder | None = None
    try:
        decoder = OnnxDecoder(out, threads=1, context=window)
        ids = tokenizer(REFERENCE_TEXT)["input_ids"][:window]
        ppl_q = math.exp(decoder.log_likelihood(ids) / max(1, len(ids) - 1))
        greedy_q = [decoder.greedy(tokenizer(p)["input_ids"], GREEDY_TOKENS) for p in PROMPTS]
    except RuntimeError as e:  # ONNX Runtime refuses the graph's shapes, e.g. an attention head size it lacks
        decoder = None  # the session lets go of the files
        _drop_graph(out)
        record.update(supported=False, passed=False, reason=f"the int8 graph does not run: {_last_line(e)}")
        return _finish(out, record, started)
    increase = ppl_q / ppl_ref - 1 if ppl_ref > 0 else 0.0
    record.update(
        perplexity=round(ppl_q, 4),
        perplexity_increase=round(increase, 5),
        greedy_agreement=round(agreement(greedy_ref, greedy_q), 4),
        greedy_tokens=GREEDY_TOKENS,
        bytes=sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model.onnx")),
        graph=_graph_summary(out),
    )
    record["supported"] = True
    record["passed"] = math.isfinite(ppl_q) and increase <= MAX_PERPLEXITY_INCREASE
    if not record["passed"]:
        record["reason"] = (
            f"int8 perplexity {ppl_q:.3f} is {increase:+.1%} against float32's {ppl_ref:.3f} (the limit is "
            f"+{MAX_PERPLEXITY_INCREASE:.0%}); OPENMAAS_GENERATION_WEIGHTS=int8-forced serves it anyway"
        )
    return _finish(out, record, started)


def _drop_graph(out: Path) -> None:
    """Remove what the builder wrote of a graph that will not serve (the record stays)."""
    for f in out.iterdir():
        if f.name.startswith("model.onnx"):
            f.unlink()


def _last_line(error: Exception) -> str:
    """ONNX Runtime's message without its node path preamble (the part after the last 'Status Message: ')."""
    text = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return text.rsplit("Status Message: ", 1)[-1][:300]


def _graph_summary(out: Path) -> dict[str, int]:
    """How many nodes of the kinds that matter the graph has (MatMulNBits, GroupQueryAttention), and whether it
    takes each row's logits position (``logits_index``: 1, prompts of different lengths share a prefill)."""
    import onnx

    from openmaas.runtimes.decoder import LOGITS_INDEX

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    kinds = ("MatMulNBits", "GroupQueryAttention")
    summary = {k: sum(1 for n in graph.node if n.op_type == k) for k in kinds}
    summary[LOGITS_INDEX] = int(any(i.name == LOGITS_INDEX for i in graph.input))
    return summary


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
