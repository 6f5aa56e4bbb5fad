"""HTTP compression on /v1 and /v2: gzip or deflate request bodies, and responses when the client accepts them.

A compressed body is inflated within the body limit, so a small upload that would inflate past it is a 413 and
never a memory spike; ``Inference-Header-Content-Length`` then refers to the inflated body, as in Triton.
"""

from __future__ import annotations

import contextlib
import zlib

from starlette.types import Message, Send

from openmaas.errors import InvalidRequest, PayloadTooLarge, UnsupportedEncoding

# zlib window bits: gzip framing, zlib framing (HTTP's "deflate"), raw deflate (what some clients send instead).
_GZIP, _ZLIB, _RAW = 31, 15, -15
#: Responses smaller than this go out as they are (compressing them costs more than it saves).
MIN_RESPONSE_BYTES = 1024
# Level 1: about 0.1 ms for an 8 KB embedding response on this machine's cores, and most of the saving.
_LEVEL = 1


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """The body as sent before ``encoding`` (gzip, deflate or identity); at most ``limit`` bytes."""
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise UnsupportedEncoding(
            f"Content-Encoding '{encoding}' is not supported: send gzip, deflate or an uncompressed body",
            param="Content-Encoding",
        )
    try:
        return _inflate(body, _ZLIB if encoding == "deflate" else _GZIP, encoding, limit)
    except zlib.error:
        if encoding == "deflate":  # some clients send raw deflate data under that name
            with contextlib.suppress(zlib.error):
                return _inflate(body, _RAW, encoding, limit)
        raise InvalidRequest(f"the request body is not valid {encoding} data", param="Content-Encoding") from None


def _inflate(body: bytes, wbits: int, encoding: str, limit: int) -> bytes:
    """Inflate with one framing; zlib.error when the data is not in it."""
    inflater = zlib.decompressobj(wbits)
    out = inflater.decompress(body, limit + 1)
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"the request body inflates past the limit of {limit} bytes")
    if not inflater.eof:
        raise InvalidRequest(f"the request body's {encoding} data is truncated", param="Content-Encoding")
    return out


def chosen_encoding(accept: str) -> str | None:
    """gzip or deflate if the Accept-Encoding header admits one (gzip first), else None."""
    offered: dict[str, float] = {}
    for part in accept.split(","):
        name, _, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        offered[name.strip().lower()] = q
    for name in ("gzip", "deflate"):
        if offered.get(name, offered.get("*", 0.0)) > 0:
            return name
    return None


def compress(body: bytes, encoding: str) -> bytes:
    deflater = zlib.compressobj(_LEVEL, zlib.DEFLATED, _GZIP if encoding == "gzip" else _ZLIB)
    return deflater.compress(body) + deflater.flush()


def compressing(send: Send, encoding: str) -> Send:
    """``send``, compressing a whole (not streamed) response of at least MIN_RESPONSE_BYTES with ``encoding``."""
    head: Message | None = None  # the response start, held back until the body shows whether to compress
    passthrough = False  # a stream, an already encoded response, or what follows the first body message

    async def wrapped(message: Message) -> None:
        nonlocal head, passthrough
        if message["type"] == "http.response.start":
            if any(
                k == b"content-encoding" or (k == b"content-type" and v.startswith(b"text/event-stream"))
                for k, v in message.get("headers", [])
            ):
                passthrough = True
                await send(message)
            else:
                head = message
            return
        if passthrough or head is None or message["type"] != "http.response.body":
            await send(message)
            return
        start, head, passthrough = head, None, True
        body = message.get("body", b"")
        if message.get("more_body", False) or len(body) < MIN_RESPONSE_BYTES:
            await send(start)
            await send(message)
            return
        packed = compress(body, encoding)
        headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
        headers += [
            (b"content-encoding", encoding.encode()),
            (b"content-length", str(len(packed)).encode()),
            (b"vary", b"Accept-Encoding"),
        ]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": packed})

    return wrapped
