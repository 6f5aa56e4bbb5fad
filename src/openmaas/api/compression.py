"""HTTP compression on /v1 and /v2: gzip or deflate request bodies, and responses when the client accepts them.

A compressed body is inflated within the body limit, so a small upload that would inflate past it is a 413 and
never a memory spike; ``Inference-Header-Content-Length`` then refers to the inflated body, as in Triton.
"""

from __future__ import annotations

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
    attempts = [_GZIP] if encoding != "deflate" else [_ZLIB, _RAW]
    for i, wbits in enumerate(attempts):
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, limit + 1)
        except zlib.error:
            if i + 1 < len(attempts):
                continue
            raise InvalidRequest(f"the request body is not valid {encoding} data", param="Content-Encoding") from None
        if len(out) > limit or inflater.unconsumed_tail:
            raise PayloadTooLarge(f"the request body inflates past the limit of {limit} bytes")
        if not inflater.eof:
            raise InvalidRequest(f"the request body's {encoding} data is truncated", param="Content-Encoding")
        return out
    raise AssertionError("unreachable")


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
    start: list[Message] = []

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = message.get("headers", [])
            passthrough = any(
                (k == b"content-encoding") or (k == b"content-type" and v.startswith(b"text/event-stream"))
                for k, v in headers
            )
            if passthrough:
                await send(message)
                start.append({"type": "passthrough"})
            else:
                start.append(message)
            return
        if message["type"] != "http.response.body" or not start or start[0].get("type") == "passthrough":
            await send(message)
            return
        head = start.pop()
        start.append({"type": "passthrough"})  # whatever follows goes as it is
        body = message.get("body", b"")
        if message.get("more_body", False) or len(body) < MIN_RESPONSE_BYTES:
            await send(head)
            await send(message)
            return
        packed = compress(body, encoding)
        headers = [(k, v) for k, v in head.get("headers", []) if k != b"content-length"]
        headers += [
            (b"content-encoding", encoding.encode()),
            (b"content-length", str(len(packed)).encode()),
            (b"vary", b"Accept-Encoding"),
        ]
        await send({**head, "headers": headers})
        await send({"type": "http.response.body", "body": packed})

    return wrapped
