"""Text classification on a registered embedding model: a head on its frozen sentence embeddings, or the encoder
fine-tuned together with a linear head (``fine_tune``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from openmaas.training.loop import Net
from openmaas.training.optim import TrainParams


def token_ids(encoder: Any, texts: list[str]) -> np.ndarray:
    """(N, L) int64 token ids, right-padded with the tokenizer's pad id to the longest text (at most the
    encoder's ``max_seq_length``; longer texts are truncated, as they are when served)."""
    ids: torch.Tensor = encoder.tokenize(texts)["input_ids"]
    return ids.numpy().astype(np.int64)


class FineTuned(Net):
    """A sentence-transformers encoder (every layer trainable) with a linear head on its sentence embedding.

    Input: token ids (B, L), right-padded with ``pad_id``; each batch is cut to its longest row, so short texts do
    not pay for the longest one in the dataset."""

    def __init__(self, encoder: Any, n_classes: int, pad_id: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.pad_id = pad_id
        self.head = nn.Linear(int(encoder.get_embedding_dimension()), n_classes)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != self.pad_id
        width = max(1, int(mask.sum(dim=1).max()))
        features = {"input_ids": ids[:, :width], "attention_mask": mask[:, :width].long()}
        out: torch.Tensor = self.encoder(features)["sentence_embedding"]
        return out

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or len(x) <= 64:
            return self.head(self.embed(x))
        # Validation and evaluation see a whole split: in chunks, so memory stays bounded.
        return torch.cat([self.head(self.embed(x[i : i + 64])) for i in range(0, len(x), 64)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaled(x)

    def param_groups(self, params: TrainParams) -> list[dict[str, Any]]:
        """The encoder learns at ``encoder_learning_rate`` (small: large steps wipe out what it knows), the new
        head at ``learning_rate``."""
        return [
            {"params": list(self.encoder.parameters()), "lr": params.encoder_learning_rate},
            {"params": list(self.head.parameters()), "lr": params.learning_rate},
        ]


class Head(Net):
    """The linear head alone, exported to ONNX beside the tuned encoder (input: its sentence embedding)."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.head = head

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaled(x)
