"""Text generation: Hugging Face causal LMs (a folder with safetensors) and GGUF files.

One engine thread per loaded model decodes every active request together, step by step (step-level batching):
a request that arrives joins the batch at the next step instead of waiting for the others to finish, and one that
finishes leaves it at once. Each request samples with its own random generator, so the same seed and input give
the same text whatever else runs beside it on the same batch shape.

A GGUF file is converted once (de-quantised into a safetensors folder, in a child process) the first time it is
loaded; the folder is kept beside the artifact and every later load reads it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from openmaas.errors import Overloaded
from openmaas.runtimes.base import Runtime, RuntimeOptions, RuntimeResult
from openmaas.runtimes.types import Signature, TensorSpec

log = logging.getLogger(__name__)

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
#: With the plain template the model would go on to write the user's next turn: that ends the answer.
PLAIN_CHAT_STOP = "\nUser:"

SIGNATURE = Signature(
    inputs=[TensorSpec(name="text_input", datatype="BYTES", shape=[-1])],
    outputs=[TensorSpec(name="text_output", datatype="BYTES", shape=[-1])],
)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """A piece of generated text and the number of generated tokens it accounts for; the last event of a request
    has ``finish_reason`` (stop, length or error)."""

    text: str
    tokens: int
    finish_reason: str | None = None
    error: str | None = None


class Generation:
    """One request inside the engine. Events arrive on ``events`` (an asyncio queue of the caller's loop)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._loop = loop
        self._cancelled = threading.Event()

    def emit(self, event: TokenEvent) -> None:
        with contextlib.suppress(RuntimeError):  # the caller's loop has closed: nobody is listening
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        """Stop generating for this request (the client went away); the engine drops it at its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass(eq=False)
class _Sequence:
    request: Generation
    ids: list[int]  # prompt and generated tokens; the last one is not yet read by the model
    generated: list[int] = field(default_factory=list)
    sent_chars: int = 0  # characters of the decoded text already emitted
    unsent_tokens: int = 0  # generated tokens not yet accounted for in an event
    generator: Any = None


class Engine:
    """The decode loop of one loaded causal LM, on its own thread."""

    def __init__(
        self, model: Any, tokenizer: Any, lock: threading.Lock, eos_ids: set[int], max_batch: int, threads: int
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer_lock = lock  # the Rust tokenizer must not be used from two threads at once
        self.eos_ids = eos_ids
        self.max_batch = max(1, max_batch)
        self.threads = threads
        self._waiting: queue.SimpleQueue[Generation] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="openmaas-generate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    def submit(self, request: Generation) -> None:
        self._waiting.put(request)
        self._wake.set()

    # -- the loop ----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        torch.set_num_threads(self.threads)
        active: list[_Sequence] = []
        cache: Any = None
        mask: Any = None
        while not self._stopping:
            joining: list[Generation] = []
            while len(active) + len(joining) < self.max_batch:
                try:
                    joining.append(self._waiting.get_nowait())
                except queue.Empty:
                    break
            joining = [g for g in joining if not g.cancelled]
            if not active and not joining:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                with torch.inference_mode():
                    if joining:
                        active += [self._start(g) for g in joining]
                        logits, cache, mask = self._prefill(active)
                    else:
                        logits, cache, mask = self._step(active, cache, mask)
                    keep = self._advance(active, logits)
            except Exception as e:  # a runtime failure ends every request in the batch, never the engine
                log.exception("generation step failed")
                for s in active:
                    self._finish(s, "error", error=f"{type(e).__name__}: {e}")
                active, cache, mask = [], None, None
                continue
            if len(keep) < len(active):
                active = [active[i] for i in keep]
                if active:
                    index = torch.tensor(keep, dtype=torch.long)
                    cache.batch_select_indices(index)
                    mask = mask[index]
                else:
                    cache, mask = None, None
        for s in active:
            self._finish(s, "error", error="the model was unloaded")
        while True:
            try:
                self._waiting.get_nowait().emit(TokenEvent("", 0, "error", "the model was unloaded"))
            except queue.Empty:
                break

    def _start(self, request: Generation) -> _Sequence:
        import torch

        generator = torch.Generator()
        generator.manual_seed(request.params.seed if request.params.seed is not None else int.from_bytes(os.urandom(7)))
        return _Sequence(request=request, ids=list(request.prompt_ids), generator=generator)

    def _prefill(self, active: list[_Sequence]) -> tuple[Any, Any, Any]:
        """Read every active sequence in full (left-padded), giving a fresh cache for the new batch."""
        import torch

        width = max(len(s.ids) for s in active)
        ids = torch.zeros((len(active), width), dtype=torch.long)
        mask = torch.zeros((len(active), width), dtype=torch.long)
        for row, s in enumerate(active):
            ids[row, width - len(s.ids) :] = torch.tensor(s.ids)
            mask[row, width - len(s.ids) :] = 1
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float(), out.past_key_values, mask

    def _step(self, active: list[_Sequence], cache: Any, mask: Any) -> tuple[Any, Any, Any]:
        """Read each sequence's newest token."""
        import torch

        ids = torch.tensor([[s.ids[-1]] for s in active], dtype=torch.long)
        mask = torch.cat([mask, torch.ones((len(active), 1), dtype=torch.long)], dim=1)
        position = mask.sum(-1, keepdim=True) - 1
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :].float(), out.past_key_values, mask

    def _advance(self, active: list[_Sequence], logits: Any) -> list[int]:
        """Sample each sequence's next token, emit text, and return the rows still generating."""
        keep = []
        for row, s in enumerate(active):
            if s.request.cancelled:
                continue  # nobody is listening: no event
            try:
                token = sample(logits[row], s.request.params, s.generator)
            except RuntimeError as e:  # say, the model produced NaN for this row: it alone fails
                self._finish(s, "error", error=f"sampling failed: {e}")
                continue
            s.generated.append(token)
            s.ids.append(token)
            s.unsent_tokens += 1
            if self._emit(s, token):
                keep.append(row)
        return keep

    def _emit(self, s: _Sequence, token: int) -> bool:
        """Emit what can be emitted; False when the sequence has finished."""
        params = s.request.params
        if token in self.eos_ids:  # the end-of-text token is not part of the answer, nor counted in it
            s.unsent_tokens -= 1
            return self._finish(s, "stop", text=self._text(s, drop_last=True))
        text = self._text(s)
        if params.stop:
            cut = _find_stop(text, params.stop, s.sent_chars)
            if cut is not None:
                # Count the tokens that make up the answer up to the stop sequence, not the stop sequence's own.
                needed = len(s.generated)
                while needed > 1 and len(self._text(s, upto=needed - 1)) >= cut:
                    needed -= 1
                s.unsent_tokens = max(0, s.unsent_tokens - (len(s.generated) - needed))
                return self._finish(s, "stop", text=text[:cut])
        if len(s.generated) >= params.max_tokens:
            return self._finish(s, "length", text=text)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the token that completes it
            return True
        safe = len(text) - _held_back(text, params.stop)
        if safe > s.sent_chars:
            s.request.emit(TokenEvent(text[s.sent_chars : safe], s.unsent_tokens))
            s.sent_chars, s.unsent_tokens = safe, 0
        return True

    def _text(self, s: _Sequence, drop_last: bool = False, upto: int | None = None) -> str:
        ids = s.generated[: len(s.generated) - 1 if drop_last else upto]
        with self.tokenizer_lock:
            return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _finish(self, s: _Sequence, reason: str, text: str = "", error: str | None = None) -> bool:
        s.request.emit(TokenEvent(text[s.sent_chars :], s.unsent_tokens, reason, error))
        s.sent_chars, s.unsent_tokens = max(s.sent_chars, len(text)), 0
        return False


def sample(logits: Any, params: SamplingParams, generator: Any) -> int:
    """Greedy at temperature 0; otherwise temperature, then nucleus (top_p) sampling with the request's generator."""
    import torch

    if params.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        cut = cumulative - sorted_probs > params.top_p  # keep the smallest head whose mass reaches top_p
        sorted_probs[cut] = 0.0
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def _find_stop(text: str, stops: tuple[str, ...], sent: int) -> int | None:
    """Where the earliest stop sequence begins in ``text`` (only text not yet sent can hold a new one)."""
    found = [i for s in stops if (i := text.find(s, max(0, sent - len(s) + 1))) >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters might be the start of a stop sequence (kept until the next token tells)."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


# -- runtimes --------------------------------------------------------------------------------------------------


class CausalLMRuntime(Runtime):
    """A Hugging Face causal language model folder (config.json, safetensors, tokenizer).

    Over v2 it takes ``text_input`` BYTES [-1] and returns ``text_output`` (greedy, ``max_tokens`` from settings);
    the OpenAI completion endpoints use ``generate`` for sampling and streaming."""

    format = "transformers"
    platform = "transformers"

    def __init__(self, path: Path, options: RuntimeOptions) -> None:
        super().__init__(path, options)
        self.tokenizer: Any = None
        self.engine: Engine | None = None
        self.context_window = 0
        self.chat_template = PLAIN_CHAT_TEMPLATE
        self.chat_stop: tuple[str, ...] = (PLAIN_CHAT_STOP,)
        self._bytes = 0
        self._lock = threading.Lock()

    @classmethod
    def static_signature(cls, path: Path) -> Signature | None:
        return SIGNATURE

    def model_folder(self) -> Path:
        return self.path

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = self.model_folder()
        torch.set_num_threads(self.options.torch_threads)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
        model.eval()  # type: ignore[no-untyped-call]
        config = model.config
        window = int(getattr(config, "max_position_embeddings", 0) or 2048)
        self.context_window = min(window, self.options.generation_context)
        if self.tokenizer.chat_template:
            self.chat_template, self.chat_stop = self.tokenizer.chat_template, ()
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(int(self.tokenizer.eos_token_id))
        end_of_turn = self.tokenizer.convert_tokens_to_ids("<end_of_turn>")
        if isinstance(end_of_turn, int) and end_of_turn != self.tokenizer.unk_token_id:
            eos_ids.add(end_of_turn)
        self._bytes = int(sum(p.numel() * p.element_size() for p in model.parameters()))
        self.engine = Engine(
            model, self.tokenizer, self._lock, eos_ids, self.options.generation_batch, self.options.torch_threads
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

    def unload(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        self.engine = None
        self.tokenizer = None


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

    def model_folder(self) -> Path:
        return converted_folder(self.path)


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def describe_gguf(path: Path) -> dict[str, Any]:
    """Architecture and context length from a GGUF file's header; ValueError if it is not a GGUF language model.

    Reads the key-value header only, stopping as soon as both are known (a full parse, vocabulary included, takes
    seconds for a large tokenizer)."""
    import struct

    def read(f: Any, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = f.read(size)
        if len(data) != size:
            raise ValueError("the GGUF header is truncated")
        return struct.unpack(fmt, data)[0]

    def string(f: Any) -> str:
        n = read(f, "<Q")
        if n > 1 << 20:
            raise ValueError("the GGUF header has an implausibly long string")
        return str(f.read(n).decode("utf-8", errors="replace"))

    def skip(f: Any, kind: int) -> None:
        if kind in _GGUF_SCALARS:
            f.seek(struct.calcsize(_GGUF_SCALARS[kind]), 1)
        elif kind == 8:
            f.seek(read(f, "<Q"), 1)
        elif kind == 9:
            inner, count = read(f, "<I"), read(f, "<Q")
            if inner in _GGUF_SCALARS:
                f.seek(count * struct.calcsize(_GGUF_SCALARS[inner]), 1)
            else:
                for _ in range(count):
                    skip(f, inner)
        else:
            raise ValueError(f"unknown GGUF value type {kind}")

    found: dict[str, Any] = {}
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file (no GGUF header)")
        version = read(f, "<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old; convert it with a current llama.cpp")
        read(f, "<Q")  # tensors
        for _ in range(read(f, "<Q")):
            key, kind = string(f), read(f, "<I")
            arch = found.get("architecture")
            if key == "general.architecture" and kind == 8:
                found["architecture"] = string(f)
            elif arch and key == f"{arch}.context_length" and kind in _GGUF_SCALARS:
                found["context_length"] = int(read(f, _GGUF_SCALARS[kind]))
            else:
                skip(f, kind)
            if "architecture" in found and "context_length" in found:
                break
    if "architecture" not in found:
        raise ValueError("the GGUF file names no architecture (general.architecture)")
    found.setdefault("context_length", None)
    return found


def converted_folder(gguf_path: Path) -> Path:
    """The safetensors folder converted from ``gguf_path``, made on first use (in a child process) and kept beside
    the artifact."""
    target = gguf_path.parent / "converted"
    with _conversion_lock(target):  # one conversion per file in this process; others wait for it
        if (target / "config.json").is_file():
            return target
        return _convert_into(gguf_path, target)


_CONVERSIONS: dict[Path, threading.Lock] = {}
_CONVERSIONS_GUARD = threading.Lock()


def _conversion_lock(target: Path) -> threading.Lock:
    with _CONVERSIONS_GUARD:
        return _CONVERSIONS.setdefault(target, threading.Lock())


def _convert_into(gguf_path: Path, target: Path) -> Path:
    staging = gguf_path.parent / f"converting-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(staging, ignore_errors=True)
    started = time.perf_counter()
    log.info("converting GGUF to safetensors (once)", extra={"path": str(gguf_path)})
    done = subprocess.run(
        [sys.executable, "-m", "openmaas.runtimes.generative", str(gguf_path), str(staging)],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(f"GGUF conversion failed: {lines[-1] if lines else done.returncode}")
    try:
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process converted it first
    log.info("GGUF converted", extra={"seconds": round(time.perf_counter() - started, 1)})
    return target


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """De-quantise a GGUF file into a Hugging Face folder (float32 safetensors, tokenizer, generation config)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # The GGUF-loaded model is marked quantised and refuses to save; a plain copy of its weights does not.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    out.mkdir(parents=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "openmaas-source.json").write_text(json.dumps({"gguf": name, "bytes": gguf_path.stat().st_size}))


if __name__ == "__main__":
    os.nice(10)  # a background conversion must not slow the models being served
    logging.disable(logging.WARNING)
    convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]))
