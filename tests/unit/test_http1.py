"""The server's HTTP/1.1 protocol: uvicorn's, with a response's writes sent in one call."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from openmaas.api.http1 import JOIN_LIMIT, CoalescingTransport, protocol_class


class RecordingTransport(asyncio.Transport):
    """The socket's side: what the protocol hands to the kernel, one entry a ``write`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    await receive()
    body = b'{"object":"list"}'
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]}
    )
    await send({"type": "http.response.body", "body": body})


def _serve(requests: bytes) -> RecordingTransport:
    async def main() -> RecordingTransport:
        config = uvicorn.Config(_app, http=protocol_class(), lifespan="off", log_config=None)
        config.load()
        protocol = config.http_protocol_class(config=config, server_state=ServerState(), app_state={})
        transport = RecordingTransport()
        protocol.connection_made(transport)
        protocol.data_received(requests)
        for _ in range(50):
            await asyncio.sleep(0.01)
        protocol.connection_lost(None)
        return transport

    return asyncio.run(main())


def test_a_response_leaves_in_one_write_not_one_for_the_head_and_one_for_the_body() -> None:
    transport = _serve(b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
    assert len(transport.writes) == 1
    head, _, body = transport.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and body == b'{"object":"list"}'


def test_keep_alive_requests_each_get_their_own_complete_response() -> None:
    one = b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n"
    transport = _serve(one + one + one)
    answers = b"".join(transport.writes)
    assert answers.count(b"HTTP/1.1 200 OK") == 3 and answers.count(b'{"object":"list"}') == 3
    assert len(transport.writes) <= 3


def test_close_sends_what_is_held_before_closing() -> None:
    async def main() -> RecordingTransport:
        real = RecordingTransport()
        coalescing = CoalescingTransport(real, asyncio.get_running_loop())
        coalescing.write(b"head")
        coalescing.write(b"body")
        assert real.writes == []  # held until the end of the turn
        coalescing.close()
        return real

    real = asyncio.run(main())
    assert real.writes == [b"headbody"] and real.closed


def test_nothing_is_written_to_a_transport_that_is_closing() -> None:
    async def main() -> RecordingTransport:
        real = RecordingTransport()
        coalescing = CoalescingTransport(real, asyncio.get_running_loop())
        coalescing.write(b"late")
        real.closed = True  # the peer went away during the turn
        await asyncio.sleep(0)
        return real

    assert asyncio.run(main()).writes == []


def test_a_large_body_is_not_copied_to_join_it_to_its_head() -> None:
    async def main() -> RecordingTransport:
        real = RecordingTransport()
        coalescing = CoalescingTransport(real, asyncio.get_running_loop())
        coalescing.write(b"head")
        coalescing.write(b"x" * (JOIN_LIMIT + 1))
        await asyncio.sleep(0)
        return real

    real = asyncio.run(main())
    assert [len(w) for w in real.writes] == [4, JOIN_LIMIT + 1]
