"""What a text-generation request asks for and what it streams back."""

from __future__ import annotations

from dataclasses import dataclass


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
