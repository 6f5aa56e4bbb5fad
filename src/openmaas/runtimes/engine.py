"""The generation engine: one thread per loaded language model decodes every active request together, step by step.

Step-level batching: a request that arrives joins the batch at the next step instead of waiting for the others to
finish, and one that finishes leaves it at once. Each request samples with its own random generator, so the same
seed and input give the same text whatever else runs beside it on the same batch shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from openmaas.entities.generation import SamplingParams, TokenEvent
from openmaas.runtimes.sampling import find_stop, held_back, sample

log = logging.getLogger(__name__)


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
        self, decoder: Any, tokenizer: Any, lock: threading.Lock, eos_ids: set[int], max_batch: int, threads: int
    ) -> None:
        self.decoder = decoder  # a TorchDecoder or an OnnxDecoder (decoder.py)
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
        state: Any = None
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
                        logits, state = self.decoder.join(state, [s.ids for s in active], len(joining))
                    else:
                        logits, state = self.decoder.step(state, [s.ids[-1] for s in active])
                    keep = self._advance(active, logits)
            except Exception as e:  # a runtime failure ends every request in the batch, never the engine
                log.exception("generation step failed")
                for s in active:
                    self._finish(s, "error", error=f"{type(e).__name__}: {e}")
                active, state = [], None
                continue
            if len(keep) < len(active):
                active = [active[i] for i in keep]
                state = self.decoder.keep(state, keep) if active else None
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
            cut = find_stop(text, params.stop, s.sent_chars)
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
        safe = len(text) - held_back(text, params.stop)
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
