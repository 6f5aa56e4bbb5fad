"""A batch's input file is checked the way OpenAI checks one: every problem, each with its line."""

from __future__ import annotations

import json

import pytest

from openmaas.batches.lines import MAX_BYTES, InvalidBatch, check, endpoint_error, window_seconds


def _file(*lines: object) -> bytes:
    return b"\n".join(x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines)


def _line(custom_id: str = "a", url: str = "/v1/embeddings", **body: object) -> dict[str, object]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "m", "input": "x", **body}}


def test_a_good_file_gives_its_lines_and_model() -> None:
    checked = check(_file(_line("a"), b"", _line("b")), "/v1/embeddings")
    assert [(x.number, x.custom_id) for x in checked.lines] == [(1, "a"), (3, "b")]  # blank lines keep numbering
    assert checked.model == "m" and json.loads(checked.lines[0].body) == {"model": "m", "input": "x"}


def test_every_problem_is_reported_with_its_line() -> None:
    bad = _file(
        _line("a"),
        b"not json",
        [1, 2],
        {"custom_id": "c", "method": "POST", "url": "/v1/embeddings"},
        _line("a"),
        {**_line("d"), "method": "GET"},
        _line("e", stream=True),
        {**_line("f"), "extra": 1},
        {"custom_id": "", "method": "POST", "url": "/v1/embeddings", "body": {}},
        {"custom_id": "g", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
    )
    with pytest.raises(InvalidBatch) as e:
        check(bad, "/v1/embeddings")
    codes = [(x.code, x.line) for x in e.value.errors]
    assert codes == [
        ("invalid_json_line", 2),
        ("invalid_request", 3),
        ("missing_required_parameter", 4),
        ("duplicate_custom_id", 5),
        ("invalid_method", 6),
        ("invalid_body", 7),
        ("invalid_request", 8),
        ("invalid_custom_id", 9),
        ("missing_model", 10),
    ]


def test_limits_on_size_and_count() -> None:
    with pytest.raises(InvalidBatch) as e:
        check(b"\n" * (MAX_BYTES + 1), "/v1/embeddings")
    assert e.value.errors[0].code == "file_too_large"
    with pytest.raises(InvalidBatch) as e:
        check(b"\n\n", "/v1/embeddings")
    assert e.value.errors[0].code == "empty_file"


def test_v2_lines_take_the_model_from_the_url() -> None:
    url = "/v2/models/acme/scaler/infer"
    checked = check(_file({"custom_id": "a", "method": "POST", "url": url, "body": {"inputs": []}}), url)
    assert checked.model == "acme/scaler"
    assert endpoint_error(url) is None and endpoint_error("/v2/models/x/versions/3/infer") is None
    assert endpoint_error("/v1/moderations") is not None and endpoint_error("/v2/models/x/ready") is not None


@pytest.mark.parametrize(("window", "seconds"), [("24h", 86400), ("90m", 5400), ("30s", 30)])
def test_completion_windows(window: str, seconds: int) -> None:
    assert window_seconds(window) == seconds


@pytest.mark.parametrize("window", ["25h", "1d", "0h", "h", "24 h"])
def test_bad_completion_windows(window: str) -> None:
    with pytest.raises(ValueError, match="completion_window"):
        window_seconds(window)
