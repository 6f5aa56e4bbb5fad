"""Choosing the next token, and finding stop sequences in the text generated so far (pure functions)."""

from __future__ import annotations

from typing import Any

from openmaas.entities.generation import SamplingParams


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


def find_stop(text: str, stops: tuple[str, ...], sent: int) -> int | None:
    """Where the earliest stop sequence begins in ``text`` (only text not yet sent can hold a new one)."""
    found = [i for s in stops if (i := text.find(s, max(0, sent - len(s) + 1))) >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters might be the start of a stop sequence (kept until the next token tells)."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
