"""Text generation runtimes: Hugging Face causal LMs (a folder with safetensors) and GGUF files.

A GGUF file is converted once (de-quantised into a safetensors folder, in a child process; see ``gguf.py``), and
every causal LM is then built once into a fused int8 ONNX decoder graph (``quantised.py``; also a child process,
with a quality guard); both folders are kept beside the artifact and every later load reads them directly.
Decoding runs on the model's ``Engine`` (``engine.py``), the same loop for both: the int8 graph through
``OnnxDecoder``, float32 weights (the fallback) through transformers and ``TorchDecoder`` (``decoder.py``).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from openmaas.entities.generation import SamplingParams
from openmaas.entities.models import Preparation
from openmaas.entities.tensors import Signature, TensorSpec
from openmaas.errors import Overloaded
from openmaas.runtimes.base import Runtime, RuntimeOptions, RuntimeResult, process_rss, route_library_logs
from openmaas.runtimes.conversion import convert_once, home, progress
from openmaas.runtimes.decoder import OnnxDecoder, TorchDecoder
from openmaas.runtimes.engine import Engine, Generation
from openmaas.runtimes.gguf import conversion_progress, converted_folder, converted_target, describe_gguf
from openmaas.runtimes.quantised import RECORD_FILE

#: Conversation rendered as a plain transcript: what suits a base (not instruction-tuned) model. A model folder
#: whose tokenizer has its own chat template uses that instead.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
#: With the plain template the model would go on to write the next turn (the user's, or another of its own):
#: either ends the answer.
PLAIN_CHAT_STOPS = ("\nUser:", "\nAssistant:")

SIGNATURE = Signature(
    inputs=[TensorSpec(name="text_input", datatype="BYTES", shape=[-1])],
    outputs=[TensorSpec(name="text_output", datatype="BYTES", shape=[-1])],
)


class CausalLMRuntime(Runtime):
    """A Hugging Face causal language model folder (config.json, safetensors, tokenizer).

    Over v2 it takes ``text_input`` BYTES [-1] and returns ``text_output`` (greedy, ``max_tokens`` from settings);
    the OpenAI completion endpoints use ``generate`` for sampling and streaming."""

    format = "transformers"
    serves = "generation"
    platform = "transformers"

    def __init__(self, path: Path, options: RuntimeOptions) -> None:
        super().__init__(path, options)
        self.tokenizer: Any = None
        self.engine: Engine | None = None
        self.context_window = 0
        self.chat_template = PLAIN_CHAT_TEMPLATE
        self.chat_stop: tuple[str, ...] = PLAIN_CHAT_STOPS
        self._bytes = 0
        self._parameters = 0
        self._model: Any = None  # the float32 transformers model, where that is what serves
        self._onnx: OnnxDecoder | None = None  # the int8 graph, where that is what serves
        self._lock = threading.Lock()
        #: How the loaded weights are held: the quantisation record, plus ``serving`` (int8 or float32) and why.
        self.weights: dict[str, Any] = {}

    @classmethod
    def static_signature(cls, path: Path) -> Signature | None:
        return SIGNATURE

    def model_folder(self) -> Path:
        return self.path

    # -- preparation: the one-time int8 conversion --------------------------------------------------------------

    @classmethod
    def float32_path(cls, path: Path) -> Path:
        """Where the folder of float32 weights for the artifact at ``path`` is (or will be)."""
        return path

    @classmethod
    def float32_folder(cls, path: Path) -> Path:
        """The folder of float32 weights for the artifact at ``path``, made first where needed."""
        return path

    @classmethod
    def prepare(cls, path: Path, options: RuntimeOptions) -> bool:
        needed = cls.needs_preparation(path, options)
        folder = cls.float32_folder(path)
        if options.generation_weights != "float32":
            quantised_folder(folder)
        return needed

    @classmethod
    def needs_preparation(cls, path: Path, options: RuntimeOptions) -> bool:
        if not (cls.float32_path(path) / "config.json").is_file():
            return True
        return options.generation_weights != "float32" and not _record_path(cls.float32_path(path)).is_file()

    @classmethod
    def preparing(cls, path: Path) -> Preparation | None:
        return progress(_int8_target(cls.float32_path(path)))

    @classmethod
    def prepared_weights(cls, path: Path, options: RuntimeOptions) -> dict[str, object] | None:
        if options.generation_weights == "float32":
            return {"serving": "float32", "reason": "OPENMAAS_GENERATION_WEIGHTS=float32"}
        record = _record_path(cls.float32_path(path))
        if not record.is_file():
            return None
        return weights_summary(json.loads(record.read_text()), options)

    def load(self) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        route_library_logs()
        folder = self.model_folder()
        torch.set_num_threads(self.options.torch_threads)
        self.weights = {"serving": "float32", "reason": "OPENMAAS_GENERATION_WEIGHTS=float32"}
        if self.options.generation_weights != "float32":
            record = json.loads((quantised_folder(folder) / RECORD_FILE).read_text())
            self.weights = weights_summary(record, self.options)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        window = int(getattr(config, "max_position_embeddings", 0) or 2048)
        self.context_window = min(window, self.options.generation_context)
        decoder: TorchDecoder | OnnxDecoder
        if self.weights["serving"] == "int8":
            before = process_rss()
            self._onnx = OnnxDecoder(_int8_target(folder), self.options.torch_threads, self.context_window)
            self._onnx.greedy([int(self.tokenizer.bos_token_id or 0)], 1)  # weights packed, first buffers made
            self._bytes = max(0, process_rss() - before)
            self._parameters = int(self.weights.get("parameters") or 0)
            decoder = self._onnx
        else:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
            model.eval()  # type: ignore[no-untyped-call]
            self._bytes = int(sum(p.numel() * p.element_size() for p in model.parameters()))
            self._parameters = int(sum(p.numel() for p in model.parameters()))
            self._model = model
            decoder = TorchDecoder(model)
        if self.tokenizer.chat_template:
            self.chat_template, self.chat_stop = self.tokenizer.chat_template, ()
        eos_ids = _ids(getattr(config, "eos_token_id", None))
        if (folder / "generation_config.json").is_file():
            eos_ids |= _ids(GenerationConfig.from_pretrained(str(folder), local_files_only=True).eos_token_id)
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(int(self.tokenizer.eos_token_id))
        end_of_turn = self.tokenizer.convert_tokens_to_ids("<end_of_turn>")
        if isinstance(end_of_turn, int) and end_of_turn != self.tokenizer.unk_token_id:
            eos_ids.add(end_of_turn)
        self.engine = Engine(
            decoder, self.tokenizer, self._lock, eos_ids, self.options.generation_batch, self.options.torch_threads
        )
        self.engine.start()

    @property
    def signature(self) -> Signature:
        return SIGNATURE

    # -- generation --------------------------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt (with the tokenizer's start-of-text token, as the model was trained)."""
        with self._lock:
            return list(self.tokenizer(prompt)["input_ids"])

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        with self._lock:
            rendered = self.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
            )
        return str(rendered)

    def generate(self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop) -> Generation:
        """Queue a request for the engine; Overloaded (429) when its queue is full."""
        if self.engine is None:
            raise RuntimeError("the language model is not loaded")
        if self.engine.waiting >= self.options.generation_queue:
            raise Overloaded(
                f"{self.engine.waiting} generation requests are already waiting for this model; retry shortly",
                retry_after=2,
            )
        request = Generation(prompt_ids, params, loop)
        self.engine.submit(request)
        return request

    def infer(self, batch: Mapping[str, np.ndarray]) -> RuntimeResult:
        """v2: greedy continuations of each ``text_input`` (runs on the model's thread, waits for the engine)."""
        prompts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in batch["text_input"].reshape(-1)]
        loop = asyncio.new_event_loop()
        try:
            texts, tokens = [], []
            for prompt in prompts:
                ids = self.encode(prompt)
                budget = max(1, min(self.options.generation_max_tokens, self.context_window - len(ids)))
                request = self.generate(ids, SamplingParams(max_tokens=budget, temperature=0.0), loop)
                text, count = loop.run_until_complete(_collect(request))
                texts.append(text.encode("utf-8"))
                tokens.append(len(ids) + count)
        finally:
            loop.close()
        return RuntimeResult(
            outputs={"text_output": np.array(texts, dtype=object)}, tokens=np.array(tokens, dtype=np.int64)
        )

    def memory_bytes(self) -> int:
        return self._bytes

    def parameters(self) -> int | None:
        return self._parameters

    def log_likelihood(self, text: str) -> tuple[float, int]:
        """Negative log-likelihood (nats, summed) of ``text``'s tokens after the first, and how many were
        predicted; the text is cut at the context window. For evaluation (perplexity), not for serving."""
        import torch

        with self._lock:
            ids = list(self.tokenizer(text)["input_ids"])[: self.context_window]
            if len(ids) < 2:
                return 0.0, 0
        if self._onnx is not None:
            return self._onnx.log_likelihood(ids), len(ids) - 1
        with self._lock:
            batch = torch.tensor([ids])
            with torch.no_grad():
                loss = self._model(input_ids=batch, labels=batch).loss
        return float(loss) * (len(ids) - 1), len(ids) - 1

    def unload(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        self.engine = None
        self.tokenizer = None
        self._model = None
        self._onnx = None


async def _collect(request: Generation) -> tuple[str, int]:
    parts, count = [], 0
    while True:
        event = await request.events.get()
        parts.append(event.text)
        count += event.tokens
        if event.finish_reason is not None:
            if event.finish_reason == "error":
                raise RuntimeError(event.error or "generation failed")
            return "".join(parts), count


class GGUFRuntime(CausalLMRuntime):
    """A GGUF file (llama.cpp's format), served through transformers after a one-time conversion."""

    format = "gguf"

    @classmethod
    def static_signature(cls, path: Path) -> Signature | None:
        describe_gguf(path)  # refuses what is not a readable GGUF language model
        return SIGNATURE

    @classmethod
    def float32_path(cls, path: Path) -> Path:
        return converted_target(path)

    @classmethod
    def float32_folder(cls, path: Path) -> Path:
        return converted_folder(path)

    @classmethod
    def preparing(cls, path: Path) -> Preparation | None:
        return conversion_progress(path) or super().preparing(path)

    def model_folder(self) -> Path:
        return converted_folder(self.path)


def _int8_target(folder: Path) -> Path:
    """Where the int8 graph of the float32 ``folder`` goes: beside it, or in the conversion cache. (``.int8`` folders
    of earlier releases, int8 weights inside the transformers model, are left unread.)"""
    return home(folder) / f"{folder.name}.onnx-int8"


def _ids(value: Any) -> set[int]:
    """Token ids from a config's ``eos_token_id`` (an int, a list, or None)."""
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, list | tuple) else {int(value)}


def _record_path(folder: Path) -> Path:
    return _int8_target(folder) / RECORD_FILE


def quantised_folder(folder: Path) -> Path:
    """The int8 conversion of ``folder`` (made once, in a child process), holding at least its record."""
    return convert_once(
        _int8_target(folder),
        "openmaas.runtimes.quantised",
        [str(folder)],
        "quantising the language model to int8",
        done=RECORD_FILE,
    )


def weights_summary(record: dict[str, Any], options: RuntimeOptions) -> dict[str, Any]:
    """What a model's details say of its weights: how they are served and the quality guard's figures."""
    summary = {k: v for k, v in record.items() if k not in ("plan", "seconds")}
    forced = options.generation_weights == "int8-forced"
    if record.get("supported") and (record.get("passed") or forced):
        summary["serving"] = "int8"
        if not record.get("passed"):
            summary["reason"] = f"forced past the quality guard: {record.get('reason', '')}"
    else:
        summary["serving"] = "float32"
    return summary
