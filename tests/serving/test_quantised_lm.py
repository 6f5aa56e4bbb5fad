"""Language models served with int8 weights (one fused ONNX decoder graph, MatMulNBits kernels): the conversion, its
quality guard, the float32 fallback, and the runtime that serves the result through the same generation engine."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from openmaas.entities.generation import SamplingParams
from openmaas.runtimes import RuntimeOptions
from openmaas.runtimes.causal_lm import CausalLMRuntime, quantised_folder
from openmaas.runtimes.quantised import RECORD_FILE, REFERENCE_TEXT

pytestmark = pytest.mark.timeout(600)


def tiny_model(folder: Path, kind: str = "llama", hidden_outlier: bool = False, hidden: int = 64) -> Path:
    """A small causal LM trained here for a few seconds on the quality guard's own text (so its perplexity there
    is low and means something), with a BPE tokenizer trained on the same text, saved like any Hugging Face folder.

    ``hidden_outlier``: the final norm silences hidden dimensions 0 and 32 and the output layer gives them huge
    weights. The float32 model is unchanged (those weights always meet zeros), but each int8 block of the output
    layer that holds one rounds its other weights to zero: the model int8 breaks, which the guard must catch."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        [REFERENCE_TEXT], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")  # type: ignore[no-untyped-call]
    folder.mkdir(parents=True)
    fast.save_pretrained(str(folder))
    torch.manual_seed(0)
    vocab = tok.get_vocab_size()
    model: torch.nn.Module
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=112,  # not a multiple of the 32-weight block: the down projection's last is padded
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=not hidden_outlier,
        )
        model = LlamaForCausalLM(config)
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=512))
    ids = torch.tensor([fast(REFERENCE_TEXT)["input_ids"]])
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(120):
        loss = model(input_ids=ids, labels=ids).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    if hidden_outlier:
        with torch.no_grad():
            model.model.norm.weight[[0, 32]] = 0.0
            model.lm_head.weight[:, [0, 32]] = 1e4
    model.save_pretrained(str(folder))
    return folder


def test_a_tiny_llama_converts_once_and_serves_int8_with_its_own_figures(tmp_path: Path) -> None:
    folder = tiny_model(tmp_path / "llama")
    options = RuntimeOptions(torch_threads=1)
    assert CausalLMRuntime.needs_preparation(folder, options)
    assert CausalLMRuntime.prepare(folder, options) is True  # in a child process, as in the server
    assert not CausalLMRuntime.needs_preparation(folder, options)
    record = json.loads((tmp_path / "llama.onnx-int8" / RECORD_FILE).read_text())
    assert record["supported"] and record["passed"], record
    assert abs(record["perplexity_increase"]) < 0.05 and record["greedy_agreement"] > 0.5
    # One graph: attention fused per layer, every projection and the output layer int8 blocks.
    assert record["graph"]["GroupQueryAttention"] == 2 and record["graph"]["MatMulNBits"] >= 2 * 4 + 1, record
    assert record["graph"]["logits_index"] == 1, record  # rewritten: prompts of different lengths share a prefill
    weights = CausalLMRuntime.prepared_weights(folder, options)
    assert weights is not None and weights["serving"] == "int8" and weights["weights"] == "int8"

    quantised = CausalLMRuntime(folder, options)
    quantised.load()
    reference = CausalLMRuntime(folder, RuntimeOptions(torch_threads=1, generation_weights="float32"))
    reference.load()
    try:
        assert quantised.weights["serving"] == "int8" and reference.weights["serving"] == "float32"
        assert quantised.parameters() == reference.parameters()
        assert quantised.memory_bytes() > 0
        # The same engine decodes both: greedy text, several requests at once, each its own answer.
        prompts = ["The river runs", "Water boils at", "She opened the"]
        ours, theirs = _greedy(quantised, prompts), _greedy(reference, prompts)
        assert all(len(t) > 0 for t in ours)
        assert sum(a == b for a, b in zip(ours, theirs, strict=True)) >= 2, (ours, theirs)
        nll, scored = quantised.log_likelihood(REFERENCE_TEXT)
        ref_nll, ref_scored = reference.log_likelihood(REFERENCE_TEXT)
        assert scored == ref_scored and abs(nll - ref_nll) / ref_nll < 0.05
    finally:
        quantised.unload()
        reference.unload()


def test_the_graph_decodes_a_changing_batch_as_each_row_alone(tmp_path: Path) -> None:
    """Rows of different lengths share one run a step; two prompts of different lengths are read together in one
    right-padded run, at the start and again mid-way (while the others give their newest token); one row leaves;
    every row's greedy tokens equal what it decodes alone, and the cache grows past its first capacity."""
    from openmaas.runtimes.decoder import OnnxDecoder

    folder = tiny_model(tmp_path / "llama")
    graph = quantised_folder(folder)
    decoder = OnnxDecoder(graph, threads=1, context=512)
    assert decoder.indexed  # each row's logits come from its own last position, not the padded run's
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    texts = ("The river runs", "Water boils at one hundred degrees", "She", "The rain in the")
    prompts = [tok(p)["input_ids"] for p in texts]
    assert len({len(p) for p in prompts}) == len(prompts)
    alone = [decoder.greedy(ids, 300) for ids in prompts]  # 300 tokens: past the first 256-position capacity

    def argmax(logits: object) -> list[int]:
        return [int(row.argmax()) for row in logits]  # type: ignore[attr-defined]

    sequences = [list(prompts[0]), list(prompts[1])]
    logits, state = decoder.join(None, sequences, 2)
    out: list[list[int]] = [[], [], [], []]
    rows = [0, 1]
    for step in range(300):
        for row, token in zip(rows, argmax(logits), strict=True):
            out[row].append(token)
        if step == 5:  # two prompts join: the others give their newest token, they their whole prompts
            rows += [2, 3]
            joining = [[out[0][-1]], [out[1][-1]], list(prompts[2]), list(prompts[3])]
            logits, state = decoder.join(state, joining, 2)
            continue
        if step == 200:  # the first leaves
            keep = [i for i, r in enumerate(rows) if r != 0]
            state = decoder.keep(state, keep)
            rows = [rows[i] for i in keep]
        logits, state = decoder.step(state, [out[r][-1] for r in rows])
    assert out[0] == alone[0][: len(out[0])] and len(out[0]) == 201
    assert out[1] == alone[1]
    assert out[2] == alone[2][: len(out[2])] and len(out[2]) == 294
    assert out[3] == alone[3][: len(out[3])] and len(out[3]) == 294
    assert state.capacity > 256


def test_joining_prompts_share_a_prefill_while_padding_them_costs_little() -> None:
    from openmaas.runtimes.decoder import prefill_groups

    assert prefill_groups([5]) == [[0]]
    assert prefill_groups([8, 10, 9, 12]) == [[0, 1, 2, 3]]  # padded 48 positions for 39 tokens
    # A long prompt does not make short ones pay for its length, and vice versa; the order is kept.
    assert prefill_groups([10, 12, 400, 380, 9]) == [[0, 1], [2, 3], [4]]
    assert prefill_groups([1500, 1400]) == [[0], [1]]  # together they would read over 2,048 positions


@pytest.mark.parametrize(
    ("kind", "hidden", "says"),
    [
        ("gpt2", 64, "GPT2LMHeadModel"),  # an architecture the graph builder does not know
        ("llama", 32, "head_size"),  # heads of 8: ONNX Runtime's attention kernel takes multiples of 16
    ],
)
def test_a_model_the_int8_graph_cannot_serve_is_served_in_float32_and_says_why(
    tmp_path: Path, kind: str, hidden: int, says: str
) -> None:
    folder = tiny_model(tmp_path / "lm", kind=kind, hidden=hidden)
    quantised_folder(folder)  # in a child process, as in the server
    record = json.loads((tmp_path / "lm.onnx-int8" / RECORD_FILE).read_text())
    assert record["supported"] is False and says in record["reason"], record
    assert not list((tmp_path / "lm.onnx-int8").glob("model.onnx*"))  # nothing kept that cannot serve
    runtime = CausalLMRuntime(folder, RuntimeOptions(torch_threads=1))
    runtime.load()
    try:
        assert runtime.weights["serving"] == "float32" and says in runtime.weights["reason"]
        assert _greedy(runtime, ["The river runs"])[0]
    finally:
        runtime.unload()


def test_the_quality_guard_refuses_int8_that_hurts_unless_forced(tmp_path: Path) -> None:
    folder = tiny_model(tmp_path / "spiky", hidden_outlier=True)
    quantised_folder(folder)
    record = json.loads((tmp_path / "spiky.onnx-int8" / RECORD_FILE).read_text())
    assert record["supported"] is True and record["passed"] is False, record
    assert record["perplexity_increase"] > 0.05
    assert "limit is +5%" in record["reason"] and "int8-forced" in record["reason"]
    guarded = CausalLMRuntime.prepared_weights(folder, RuntimeOptions())
    assert guarded is not None and guarded["serving"] == "float32"
    forced = CausalLMRuntime(folder, RuntimeOptions(torch_threads=1, generation_weights="int8-forced"))
    forced.load()
    try:
        assert forced.weights["serving"] == "int8" and forced.weights["reason"].startswith("forced past")
    finally:
        forced.unload()


def _greedy(runtime: CausalLMRuntime, prompts: list[str]) -> list[str]:
    async def run() -> list[str]:
        loop = asyncio.get_running_loop()
        requests = [
            runtime.generate(runtime.encode(p), SamplingParams(max_tokens=8, temperature=0.0), loop) for p in prompts
        ]
        out = []
        for r in requests:
            parts = []
            while True:
                event = await r.events.get()
                parts.append(event.text)
                if event.finish_reason is not None:
                    assert event.finish_reason in ("length", "stop"), event
                    break
            out.append("".join(parts))
        return out

    return asyncio.run(run())
