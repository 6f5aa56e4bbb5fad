"""The official openai SDK against a real server."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from openai import OpenAI

from tests.helpers import ServerProcess

SENTENCES = ["A man is eating food.", "A man rides a horse.", "Ein Mann isst Essen.", "x " * 600]


@pytest.fixture(scope="module")
def client(server: ServerProcess, admin_key: str) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.url + "/v1", api_key=admin_key, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def reference(minilm_dir: Path) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_dir), device="cpu")
    return np.asarray(model.encode(SENTENCES))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_models_are_listed(client: OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"all-minilm-l6-v2", "digits-cnn", "breast-cancer-logreg", "diabetes-linreg"} <= ids
    assert client.models.retrieve("digits-cnn").id == "digits-cnn"


def test_models_say_what_they_are_for(client: OpenAI) -> None:
    """A client finds the text-generation models (or the embedding ones) from /v1/models alone."""
    listed = {m.id: m.model_dump() for m in client.models.list()}
    assert listed["gemma-3-270m"]["serves"] == "generation"
    assert listed["gemma-3-270m"]["task"] == "text-generation"
    assert listed["all-minilm-l6-v2"]["serves"] == "embedding"
    assert listed["whisper-tiny-en"]["serves"] == "speech"
    assert listed["digits-cnn"]["serves"] == "tensor" and listed["digits-cnn"]["task"] == "image-classification"
    assert client.models.retrieve("gemma-3-270m").model_dump()["serves"] == "generation"


@pytest.mark.parametrize("encoding_format", ["float", "base64", None])
def test_embeddings_match_in_process_sentence_transformers(
    client: OpenAI, reference: np.ndarray, encoding_format: str | None
) -> None:
    kwargs = {} if encoding_format is None else {"encoding_format": encoding_format}
    resp = client.embeddings.create(model="all-minilm-l6-v2", input=SENTENCES, **kwargs)  # type: ignore[arg-type]
    if encoding_format == "base64":  # asked for explicitly, the SDK hands the strings over undecoded
        got = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in resp.data])  # type: ignore[arg-type]
    else:  # the SDK asks for base64 itself when no format is given, and decodes it
        got = np.array([d.embedding for d in resp.data], dtype=np.float32)
    assert got.shape == (4, 384)
    assert [d.index for d in resp.data] == [0, 1, 2, 3]
    assert _cosine(got, reference).min() >= 0.9999
    # Tokens counted with the model's tokenizer, as the model read them (the long text is cut at 256).
    from transformers import AutoTokenizer

    from openmaas.catalogue.minilm import model_dir

    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    expected = sum(min(len(tok(s)["input_ids"]), 256) for s in SENTENCES)
    assert resp.usage.prompt_tokens == expected == resp.usage.total_tokens
    assert resp.model == "all-minilm-l6-v2"


def test_single_string_input(client: OpenAI, reference: np.ndarray) -> None:
    resp = client.embeddings.create(model="all-minilm-l6-v2", input=SENTENCES[0])
    assert len(resp.data) == 1
    assert _cosine(np.array(resp.data[0].embedding), reference[0]) >= 0.9999


def test_native_dimensions_accepted_others_refused(client: OpenAI) -> None:
    assert len(client.embeddings.create(model="all-minilm-l6-v2", input="hi", dimensions=384).data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="all-minilm-l6-v2", input="hi", dimensions=128)
    assert info.value.body["param"] == "dimensions"  # type: ignore[index]
    assert "384" in info.value.body["message"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"input": []}, "input"),
        ({"input": ""}, "input"),
        ({"input": [[1, 2, 3]]}, "input"),
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ],
)
def test_bad_embedding_requests_are_400(client: OpenAI, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="all-minilm-l6-v2", **kwargs)
    assert info.value.body["param"] == param  # type: ignore[index]


def test_unknown_model_is_404_and_non_embedding_model_is_400(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(model="no-such-model", input="hi")
    assert info.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with pytest.raises(openai.BadRequestError, match="not a text-embedding model"):
        client.embeddings.create(model="digits-cnn", input="hi")


def test_wrong_key_is_401_in_openai_format(server: ServerProcess) -> None:
    with OpenAI(base_url=server.url + "/v1", api_key="om_wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            bad.models.list()
        assert info.value.body["code"] == "invalid_api_key"  # type: ignore[index]
        with pytest.raises(openai.AuthenticationError):
            bad.embeddings.create(model="all-minilm-l6-v2", input="hi")
