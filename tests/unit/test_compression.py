"""Inflating request bodies within a limit, and choosing a response encoding (no HTTP)."""

from __future__ import annotations

import gzip
import zlib

import pytest

from openmaas.api.compression import chosen_encoding, compress, inflate
from openmaas.errors import InvalidRequest, PayloadTooLarge, UnsupportedEncoding

BODY = b'{"inputs": []}' * 100


def test_gzip_zlib_and_raw_deflate_inflate_to_the_body() -> None:
    assert inflate(gzip.compress(BODY), "gzip", 10_000) == BODY
    assert inflate(zlib.compress(BODY), "deflate", 10_000) == BODY
    raw = zlib.compressobj(6, zlib.DEFLATED, -15)
    assert inflate(raw.compress(BODY) + raw.flush(), "deflate", 10_000) == BODY  # what some clients send
    assert inflate(BODY, "identity", 10_000) == BODY
    for encoding in ("gzip", "deflate"):
        assert inflate(compress(BODY, encoding), encoding, 10_000) == BODY


def test_a_body_that_inflates_past_the_limit_is_refused_without_inflating_it_all() -> None:
    bomb = gzip.compress(b" " * 50_000_000)
    with pytest.raises(PayloadTooLarge):
        inflate(bomb, "gzip", 1_000_000)
    assert inflate(gzip.compress(BODY), "gzip", len(BODY)) == BODY  # exactly the limit is fine


def test_bad_truncated_and_unknown_encodings() -> None:
    with pytest.raises(InvalidRequest, match="not valid gzip"):
        inflate(b"plain text", "gzip", 1000)
    with pytest.raises(InvalidRequest, match="truncated"):
        inflate(gzip.compress(BODY)[:40], "gzip", 10_000)
    with pytest.raises(UnsupportedEncoding):
        inflate(BODY, "br", 10_000)


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        ("gzip, deflate", "gzip"),
        ("deflate", "deflate"),
        ("gzip;q=0, deflate", "deflate"),
        ("br", None),
        ("*", "gzip"),
        ("identity", None),
        ("GZIP", "gzip"),
        ("gzip;q=bad", None),
    ],
)
def test_choosing_the_response_encoding(accept: str, chosen: str | None) -> None:
    assert chosen_encoding(accept) == chosen
