"""Pure parts of text generation: stop sequences, hold-back, sampling, the GGUF header reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from openmaas.entities.generation import SamplingParams
from openmaas.runtimes.gguf import describe_gguf
from openmaas.runtimes.sampling import find_stop, held_back, sample


def test_stop_sequences_are_found_only_in_unsent_text() -> None:
    assert find_stop("Paris.\nUser: hi", ("\nUser:",), 0) == 6
    assert find_stop("one two", ("three",), 0) is None
    assert find_stop("a7b7", ("7",), 2) == 3  # the first 7 was already sent: it cannot be a new stop
    assert find_stop("abc END x STOP", ("STOP", "END"), 0) == 4  # the earliest wins


def test_text_that_may_start_a_stop_sequence_is_held_back() -> None:
    assert held_back("Paris\n", ("\nUser:",)) == 1
    assert held_back("Paris\nUs", ("\nUser:",)) == 3
    assert held_back("Paris", ("\nUser:",)) == 0
    assert held_back("abc", ()) == 0


def test_sampling_greedy_seeded_and_nucleus() -> None:
    logits = torch.tensor([0.0, 5.0, 1.0, 4.9])
    assert sample(logits, SamplingParams(max_tokens=1, temperature=0), None) == 1
    draws = []
    for _ in range(2):
        g = torch.Generator()
        g.manual_seed(7)
        draws.append([sample(logits, SamplingParams(max_tokens=1, temperature=1.0), g) for _ in range(20)])
    assert draws[0] == draws[1]  # same seed, same tokens
    g = torch.Generator()
    g.manual_seed(0)
    # top_p=0.5 keeps only the most likely tokens whose mass reaches 0.5: ids 1 and 3 here.
    picks = {sample(logits, SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5), g) for _ in range(200)}
    assert picks <= {1, 3} and 1 in picks
    with pytest.raises(RuntimeError):
        sample(torch.tensor([float("nan"), 1.0]), SamplingParams(max_tokens=1, temperature=1.0), torch.Generator())


def test_gguf_header_is_read_without_parsing_the_whole_file(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(2048)
    writer.add_token_list([f"t{i}" for i in range(1000)])
    writer.add_tensor("w", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert describe_gguf(path) == {"architecture": "llama", "context_length": 2048}
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="truncated"):
        describe_gguf(truncated)
    (tmp_path / "x.gguf").write_bytes(b"nope" * 10)
    with pytest.raises(ValueError, match="not a GGUF"):
        describe_gguf(tmp_path / "x.gguf")
