"""Distilling a text encoder: a student that keeps N of the teacher's transformer layers (evenly spaced, so it
starts close to the teacher) and learns to reproduce the teacher's embeddings of a set of texts (cosine loss)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def distil(
    source: Path,
    out: Path,
    layers: int,
    texts: list[str],
    targets: np.ndarray,
    *,
    epochs: int,
    learning_rate: float,
    seed: int,
    batch_size: int = 32,
    on_epoch: Callable[[int, float], None] = lambda epoch, loss: None,
    cancelled: Callable[[], bool] = lambda: False,
) -> None:
    """Train the student on ``texts`` towards the teacher's embeddings ``targets`` and save it as a
    sentence-transformers folder (safetensors) in ``out``."""
    import torch
    from sentence_transformers import SentenceTransformer
    from torch import nn

    torch.manual_seed(seed)
    st = SentenceTransformer(str(source), device="cpu", local_files_only=True)
    encoder: Any = st[0].auto_model
    total = int(encoder.config.num_hidden_layers)
    if not 1 <= layers < total:
        raise ValueError(f"the teacher has {total} layers; a student keeps 1 to {total - 1} of them")
    keep = sorted({round(float(i)) for i in np.linspace(0, total - 1, layers)})
    encoder.encoder.layer = nn.ModuleList([encoder.encoder.layer[i] for i in keep])
    encoder.config.num_hidden_layers = len(keep)
    target = torch.from_numpy(targets.astype(np.float32))
    optimiser = torch.optim.AdamW(st.parameters(), lr=learning_rate)
    rng = np.random.default_rng(seed)
    st.train()
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(texts))
        total_loss = 0.0
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            features = st.tokenize([texts[i] for i in idx])
            embedded = st(features)["sentence_embedding"]
            loss = (1 - nn.functional.cosine_similarity(embedded, target[idx], dim=1)).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total_loss += float(loss.detach()) * len(idx)
            if cancelled():
                return
        on_epoch(epoch, total_loss / len(texts))
    st.eval()
    out.mkdir(parents=True, exist_ok=True)
    st.save(str(out), create_model_card=False)
